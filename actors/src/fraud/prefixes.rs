//! The destination table: for an E.164 prefix, the country it belongs to, what a minute to it
//! costs to terminate, and whether it is a premium-rate (revenue-share) range.
//!
//! voxgate ships one ([`PrefixTable::builtin`], from `prefixes.toml` next to this file: country
//! codes of about 70 countries, mobile ranges of the big ones, the usual premium ranges and the
//! satellite and international-network codes that toll fraud favours). Operators replace it
//! ([`PrefixTable::from_toml`]) or add and override single entries ([`PrefixTable::with_overrides`],
//! the fraud config's `prefixes`). A number is looked up by its longest matching prefix, digit by
//! digit, without allocating.

use serde::{Deserialize, Serialize};

use super::FixedMap;

/// The built-in table.
const BUILTIN: &str = include_str!("prefixes.toml");

/// Longest prefix accepted: E.164 numbers have at most 15 digits.
const MAX_DIGITS: usize = 15;

/// Highest termination cost accepted: $1000 a minute (keeps cost arithmetic far from overflow).
pub const MAX_COST_PER_MIN_MICROS: u64 = 1_000_000_000;

/// One destination range.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PrefixEntry {
    /// `+` followed by 1 to 15 digits, e.g. `+1900`.
    pub prefix: String,
    /// ISO 3166 alpha-2 (upper case once loaded); `X?` codes for non-geographic ranges.
    pub country: String,
    /// Estimated termination cost, micro-dollars per minute.
    pub cost_per_min_micros: u64,
    /// A premium-rate (revenue-share) range.
    #[serde(default)]
    pub premium: bool,
}

/// Why a prefix table (or an entry of one) was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PrefixError {
    #[error("prefix table is not valid TOML: {0}")]
    Toml(String),
    #[error("prefix entry {index}: {prefix:?} is not + followed by 1 to 15 digits")]
    BadPrefix { index: usize, prefix: String },
    #[error("prefix entry {index} ({prefix}): country {country:?} is not two letters A-Z")]
    BadCountry { index: usize, prefix: String, country: String },
    #[error("prefix entry {index} ({prefix}): cost_per_min_micros {cost} is above {max} ($1000/min)", max = MAX_COST_PER_MIN_MICROS)]
    BadCost { index: usize, prefix: String, cost: u64 },
    #[error("prefix {prefix} is listed twice (entries {first} and {second})")]
    Duplicate { prefix: String, first: usize, second: usize },
}

/// The file's shape: `prefixes = [ { prefix = "+1900", country = "US", ... }, ... ]`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TableFile {
    #[serde(default)]
    prefixes: Vec<PrefixEntry>,
}

/// Prefix → entry, with longest-prefix lookup.
#[derive(Debug, Clone)]
pub struct PrefixTable {
    entries: Vec<PrefixEntry>,
    /// [`digits_key`] of each entry's prefix → its index in `entries`.
    index: FixedMap<u64, usize>,
    /// Digits in the longest prefix (bounds the lookup walk).
    max_digits: usize,
}

impl PrefixTable {
    /// The table voxgate ships (`prefixes.toml`).
    pub fn builtin() -> Self {
        match Self::from_toml(BUILTIN) {
            Ok(t) => t,
            // The file is part of the source and a unit test loads it.
            Err(e) => panic!("built-in prefix table is invalid: {e}"),
        }
    }

    /// A table with no entries: every lookup misses.
    pub fn empty() -> Self {
        Self { entries: Vec::new(), index: FixedMap::default(), max_digits: 0 }
    }

    /// Parses a table in the built-in file's format. A prefix listed twice is an error.
    pub fn from_toml(text: &str) -> Result<Self, PrefixError> {
        let file: TableFile =
            toml::from_str(text).map_err(|e| PrefixError::Toml(e.to_string().trim_end().to_owned()))?;
        Self::from_entries(file.prefixes)
    }

    /// Builds a table from entries (checked; a prefix listed twice is an error). Entry numbers in
    /// errors count from 1.
    pub fn from_entries(entries: Vec<PrefixEntry>) -> Result<Self, PrefixError> {
        let mut t = Self::empty();
        for (i, e) in entries.into_iter().enumerate() {
            let e = checked(i + 1, e)?;
            let key = prefix_key(&e.prefix);
            if let Some(&first) = t.index.get(&key) {
                return Err(PrefixError::Duplicate { prefix: e.prefix, first: first + 1, second: i + 1 });
            }
            t.push(key, e);
        }
        Ok(t)
    }

    /// Adds an entry, or replaces the one with the same prefix (returned).
    pub fn insert(&mut self, entry: PrefixEntry) -> Result<Option<PrefixEntry>, PrefixError> {
        let e = checked(self.entries.len() + 1, entry)?;
        let key = prefix_key(&e.prefix);
        match self.index.get(&key) {
            Some(&i) => Ok(Some(std::mem::replace(&mut self.entries[i], e))),
            None => {
                self.push(key, e);
                Ok(None)
            }
        }
    }

    /// This table with `overrides` added, each replacing an entry with the same prefix (later
    /// overrides win). Entry numbers in errors count within `overrides`, from 1.
    pub fn with_overrides(&self, overrides: &[PrefixEntry]) -> Result<Self, PrefixError> {
        let mut t = self.clone();
        for (i, e) in overrides.iter().enumerate() {
            let e = checked(i + 1, e.clone())?;
            t.insert(e)?;
        }
        Ok(t)
    }

    /// The entry with the longest prefix `number` starts with. `number` must be E.164 (`+` and
    /// digits); anything else (`anonymous`, `client:…`, SIP URIs) matches nothing.
    pub fn lookup(&self, number: &str) -> Option<&PrefixEntry> {
        let digits = number.strip_prefix('+')?;
        let mut value = 0u64;
        let mut best = None;
        for (n, b) in digits.bytes().take(self.max_digits).enumerate() {
            if !b.is_ascii_digit() {
                break;
            }
            value = value * 10 + u64::from(b - b'0');
            if let Some(&i) = self.index.get(&digits_key(n + 1, value)) {
                best = Some(i);
            }
        }
        best.map(|i| &self.entries[i])
    }

    /// The entries, in the order they were added.
    pub fn entries(&self) -> &[PrefixEntry] {
        &self.entries
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    fn push(&mut self, key: u64, e: PrefixEntry) {
        self.max_digits = self.max_digits.max(e.prefix.len() - 1);
        self.index.insert(key, self.entries.len());
        self.entries.push(e);
    }
}

/// Checks an entry and upper-cases its country.
fn checked(index: usize, mut e: PrefixEntry) -> Result<PrefixEntry, PrefixError> {
    if !is_e164_prefix(&e.prefix) {
        return Err(PrefixError::BadPrefix { index, prefix: e.prefix });
    }
    if e.country.len() != 2 || !e.country.bytes().all(|b| b.is_ascii_alphabetic()) {
        return Err(PrefixError::BadCountry { index, prefix: e.prefix, country: e.country });
    }
    if e.cost_per_min_micros > MAX_COST_PER_MIN_MICROS {
        return Err(PrefixError::BadCost { index, prefix: e.prefix, cost: e.cost_per_min_micros });
    }
    e.country.make_ascii_uppercase();
    Ok(e)
}

/// `+` followed by 1 to 15 digits.
pub(crate) fn is_e164_prefix(p: &str) -> bool {
    p.strip_prefix('+').is_some_and(|d| !d.is_empty() && d.len() <= MAX_DIGITS && d.bytes().all(|b| b.is_ascii_digit()))
}

/// A checked prefix's key.
fn prefix_key(p: &str) -> u64 {
    let d = &p[1..];
    digits_key(d.len(), d.bytes().fold(0u64, |v, b| v * 10 + u64::from(b - b'0')))
}

/// (digit count, value) packed into one key: up to 15 digits fit in 50 bits, the count goes on top,
/// so `+1` and `+01` (or `+19` and `+190`) never collide.
pub(crate) fn digits_key(len: usize, value: u64) -> u64 {
    ((len as u64) << 56) | value
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(prefix: &str, country: &str, cost: u64, premium: bool) -> PrefixEntry {
        PrefixEntry { prefix: prefix.into(), country: country.into(), cost_per_min_micros: cost, premium }
    }

    #[test]
    fn builtin_table_loads_and_covers_the_common_countries() {
        let t = PrefixTable::builtin();
        assert!(t.len() >= 80, "{}", t.len());
        for (number, country) in [
            ("+14155550100", "US"),
            ("+442071234567", "GB"),
            ("+33142685300", "FR"),
            ("+4930123456", "DE"),
            ("+390612345678", "IT"),
            ("+34911234567", "ES"),
            ("+31201234567", "NL"),
            ("+61291234567", "AU"),
            ("+81312345678", "JP"),
            ("+911123456789", "IN"),
            ("+861012345678", "CN"),
            ("+525512345678", "MX"),
            ("+551112345678", "BR"),
            ("+2341234567", "NG"),
            ("+5371234567", "CU"),
            ("+74951234567", "RU"),
            ("+8801712345678", "BD"),
            ("+252612345678", "SO"),
            ("+882123456789", "XN"),
            ("+8816123456", "XS"),
            ("+870772123456", "XS"),
            ("+18765551234", "JM"),
            ("+14165551234", "CA"),
        ] {
            assert_eq!(t.lookup(number).map(|e| e.country.as_str()), Some(country), "{number}");
        }
    }

    #[test]
    fn lookup_takes_the_longest_prefix() {
        let t = PrefixTable::builtin();
        let e = t.lookup("+19005551234").unwrap();
        assert_eq!((e.prefix.as_str(), e.premium, e.cost_per_min_micros), ("+1900", true, 2_000_000));
        assert_eq!(t.lookup("+14155550100").unwrap().prefix, "+1");
        assert_eq!(t.lookup("+449012345678").unwrap().prefix, "+449");
        assert_eq!(t.lookup("+448712345678").unwrap().prefix, "+44871");
        assert_eq!(t.lookup("+447700900123").unwrap().prefix, "+447");
        assert_eq!(t.lookup("+49900123456").unwrap().prefix, "+49900");
        assert_eq!(t.lookup("+611900123456").unwrap().prefix, "+611900");
        assert_eq!(t.lookup("+3389123456").unwrap().prefix, "+3389");
        assert_eq!(t.lookup("+39899123456").unwrap().prefix, "+39899");
        assert!(t.lookup("+1976123").unwrap().premium);
    }

    #[test]
    fn lookup_misses_what_is_not_e164() {
        let t = PrefixTable::builtin();
        for n in ["", "+", "anonymous", "client:alice", "14155550100", "sip:bob@example.com", "+0123"] {
            assert!(t.lookup(n).is_none(), "{n}");
        }
        // Digits stop at the first non-digit, what matched so far counts.
        assert_eq!(t.lookup("+44 20 7123").unwrap().prefix, "+44");
    }

    #[test]
    fn from_toml_reports_clear_errors() {
        let bad = |text: &str| PrefixTable::from_toml(text).unwrap_err();
        assert!(matches!(bad("prefixes = ["), PrefixError::Toml(_)));
        assert!(matches!(bad("prefix = []"), PrefixError::Toml(_)));
        let e = bad(r#"prefixes = [{ prefix = "+1", country = "US", cost_per_min_micros = 1, colour = "red" }]"#);
        assert!(e.to_string().contains("colour"), "{e}");
        let e = bad(r#"prefixes = [{ prefix = "1900", country = "US", cost_per_min_micros = 1 }]"#);
        assert_eq!(e, PrefixError::BadPrefix { index: 1, prefix: "1900".into() });
        assert_eq!(e.to_string(), "prefix entry 1: \"1900\" is not + followed by 1 to 15 digits");
        let e = bad(r#"prefixes = [{ prefix = "+1", country = "USA", cost_per_min_micros = 1 }]"#);
        assert!(matches!(e, PrefixError::BadCountry { index: 1, .. }), "{e}");
        let e = bad(r#"prefixes = [{ prefix = "+1", country = "US", cost_per_min_micros = 2_000_000_000 }]"#);
        assert!(matches!(e, PrefixError::BadCost { .. }), "{e}");
        let e = bad(r#"prefixes = [
                { prefix = "+44", country = "GB", cost_per_min_micros = 1 },
                { prefix = "+1", country = "US", cost_per_min_micros = 1 },
                { prefix = "+44", country = "GB", cost_per_min_micros = 2 },
            ]"#);
        assert_eq!(e, PrefixError::Duplicate { prefix: "+44".into(), first: 1, second: 3 });
    }

    #[test]
    fn from_toml_upper_cases_countries_and_defaults_premium() {
        let t = PrefixTable::from_toml(r#"prefixes = [{ prefix = "+999", country = "zz", cost_per_min_micros = 5 }]"#)
            .unwrap();
        assert_eq!(t.lookup("+9991234").unwrap(), &entry("+999", "ZZ", 5, false));
        assert!(PrefixTable::from_toml("").unwrap().is_empty());
    }

    #[test]
    fn overrides_add_and_replace_entries() {
        let base = PrefixTable::builtin();
        let t = base.with_overrides(&[entry("+1", "US", 9_000, false), entry("+1555", "US", 3_000_000, true)]).unwrap();
        assert_eq!(t.len(), base.len() + 1);
        assert_eq!(t.lookup("+14155550100").unwrap().cost_per_min_micros, 9_000);
        assert!(t.lookup("+15551234567").unwrap().premium);
        // The base is untouched.
        assert_eq!(base.lookup("+14155550100").unwrap().cost_per_min_micros, 14_000);
        assert!(!base.lookup("+15551234567").unwrap().premium);
        let e = base.with_overrides(&[entry("+1", "US", 1, false), entry("+x", "US", 1, false)]).unwrap_err();
        assert_eq!(e, PrefixError::BadPrefix { index: 2, prefix: "+x".into() });
        let mut t = PrefixTable::empty();
        assert_eq!(t.insert(entry("+7", "RU", 1, false)).unwrap(), None);
        assert_eq!(t.insert(entry("+7", "ru", 2, false)).unwrap(), Some(entry("+7", "RU", 1, false)));
        assert_eq!(t.lookup("+7495").unwrap().cost_per_min_micros, 2);
    }
}
