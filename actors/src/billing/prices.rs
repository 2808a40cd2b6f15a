//! What usage costs: flat prices and automatic volume tiers, in integer micro-dollars.
//!
//! Defaults are the runbook's: inbound calls $0.0085 a minute, outbound $0.013, recordings
//! $0.0025, a local number $1 a calendar month. Transcription runs on voxgate's own Whisper, so it
//! is free unless `transcription_per_min_micros` (or a tier list) says otherwise; Twilio's own
//! transcription list price was $0.024 a minute (`24000`), a reasonable value to resell at.
//!
//! Volume tiers apply to the per-minute categories (`calls-inbound`, `calls-outbound`,
//! `recordings`, `transcriptions`), to every tenant's own minutes, per calendar month (UTC):
//! pricing a month's `m` minutes walks the tiers, each tier pricing the minutes from its
//! `from_minutes` up to the next tier's (the last one: all the rest). A tier list replaces that
//! category's flat price. Numbers have no tiers.
//!
//! ```toml
//! [[billing.prices.tiers.calls-inbound]]
//! from_minutes = 0
//! price_per_min_micros = 8500
//! [[billing.prices.tiers.calls-inbound]]
//! from_minutes = 100000
//! price_per_min_micros = 8000
//! ```

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::Category;

/// The highest price a minute may have: $1,000 (keeps every product far from `u64` overflow).
pub const MAX_PER_MIN_MICROS: u64 = 1_000_000_000;
/// The highest price a number-month may have: $100,000.
pub const MAX_PER_NUMBER_MICROS: u64 = 100_000_000_000;
/// The most tiers one category may have.
pub const MAX_TIERS: usize = 64;

/// One volume tier: from the `from_minutes`-th minute of the month on, a minute costs this.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Tier {
    pub from_minutes: u64,
    pub price_per_min_micros: u64,
}

/// Prices (`[billing.prices]`): micro-dollars per minute, per number-month, and volume tiers
/// keyed by category name.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PriceTable {
    /// `calls-inbound` (also `Direction::Other` and calls whose direction was never seen).
    pub inbound_per_min_micros: u64,
    /// `calls-outbound` (`outbound-api`, `outbound-dial`).
    pub outbound_per_min_micros: u64,
    /// `recordings` (metered at zero minutes until voxgate records).
    pub recording_per_min_micros: u64,
    /// `transcriptions`.
    pub transcription_per_min_micros: u64,
    /// `phonenumbers-local`: per number, per calendar month it is held at any time.
    pub local_number_per_month_micros: u64,
    /// Volume tiers by category (`calls-inbound`, `calls-outbound`, `recordings`,
    /// `transcriptions`); each list replaces that category's flat price.
    pub tiers: BTreeMap<String, Vec<Tier>>,
}

impl Default for PriceTable {
    fn default() -> Self {
        Self {
            inbound_per_min_micros: 8_500,
            outbound_per_min_micros: 13_000,
            recording_per_min_micros: 2_500,
            transcription_per_min_micros: 0,
            local_number_per_month_micros: 1_000_000,
            tiers: BTreeMap::new(),
        }
    }
}

/// Why a price table was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PriceError {
    #[error("billing.prices.{field}: {reason}")]
    Invalid { field: String, reason: String },
}

fn invalid(field: impl Into<String>, reason: impl Into<String>) -> PriceError {
    PriceError::Invalid { field: field.into(), reason: reason.into() }
}

/// One tier's share of a month's bill (invoice lines).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct TierLine {
    pub from_minutes: u64,
    /// Where the next tier starts; `None` for the last tier.
    pub to_minutes: Option<u64>,
    /// Minutes priced at this tier.
    pub minutes: u64,
    pub price_per_min_micros: u64,
    pub price_micros: u64,
}

impl PriceTable {
    /// Checks every price is in range, and every tier list is for a per-minute category, starts at
    /// minute 0 and is sorted by strictly increasing `from_minutes`.
    pub fn validate(&self) -> Result<(), PriceError> {
        for (field, v) in [
            ("inbound_per_min_micros", self.inbound_per_min_micros),
            ("outbound_per_min_micros", self.outbound_per_min_micros),
            ("recording_per_min_micros", self.recording_per_min_micros),
            ("transcription_per_min_micros", self.transcription_per_min_micros),
        ] {
            if v > MAX_PER_MIN_MICROS {
                return Err(invalid(field, format!("must be at most {MAX_PER_MIN_MICROS}, got {v}")));
            }
        }
        if self.local_number_per_month_micros > MAX_PER_NUMBER_MICROS {
            return Err(invalid(
                "local_number_per_month_micros",
                format!("must be at most {MAX_PER_NUMBER_MICROS}, got {}", self.local_number_per_month_micros),
            ));
        }
        for (name, tiers) in &self.tiers {
            let field = format!("tiers.{name}");
            match Category::parse(name) {
                Some(c) if c.per_minute() => {}
                _ => {
                    return Err(invalid(
                        field,
                        "tiers are for calls-inbound, calls-outbound, recordings or transcriptions",
                    ))
                }
            }
            let Some(first) = tiers.first() else {
                return Err(invalid(field, "needs at least one tier"));
            };
            if tiers.len() > MAX_TIERS {
                return Err(invalid(field, format!("at most {MAX_TIERS} tiers")));
            }
            if first.from_minutes != 0 {
                return Err(invalid(field, "the first tier must start at from_minutes = 0"));
            }
            for pair in tiers.windows(2) {
                if pair[1].from_minutes <= pair[0].from_minutes {
                    return Err(invalid(field, "tiers must be sorted by strictly increasing from_minutes"));
                }
            }
            if let Some(t) = tiers.iter().find(|t| t.price_per_min_micros > MAX_PER_MIN_MICROS) {
                return Err(invalid(
                    field,
                    format!(
                        "price_per_min_micros must be at most {MAX_PER_MIN_MICROS}, got {}",
                        t.price_per_min_micros
                    ),
                ));
            }
        }
        Ok(())
    }

    /// The tiers a per-minute category is priced by: its configured list, or one tier at the flat
    /// price. Empty for other categories.
    pub fn tiers_for(&self, category: Category) -> Vec<Tier> {
        if let Some(t) = self.tiers.get(category.as_str()).filter(|t| !t.is_empty()) {
            return t.clone();
        }
        let flat = match category {
            Category::CallsInbound => self.inbound_per_min_micros,
            Category::CallsOutbound => self.outbound_per_min_micros,
            Category::Recordings => self.recording_per_min_micros,
            Category::Transcriptions => self.transcription_per_min_micros,
            _ => return Vec::new(),
        };
        vec![Tier { from_minutes: 0, price_per_min_micros: flat }]
    }
}

/// The price of a month's first `minutes` minutes under `tiers` (sorted, from 0).
pub(crate) fn tiered_price(tiers: &[Tier], minutes: u64) -> u64 {
    let total: u128 = tier_lines(tiers, minutes).iter().map(|l| u128::from(l.price_micros)).sum();
    u64::try_from(total).unwrap_or(u64::MAX)
}

/// How a month's `minutes` split over `tiers` (only the tiers that price at least one minute).
pub(crate) fn tier_lines(tiers: &[Tier], minutes: u64) -> Vec<TierLine> {
    let mut out = Vec::new();
    for (i, t) in tiers.iter().enumerate() {
        if minutes <= t.from_minutes {
            break;
        }
        let next = tiers.get(i + 1).map(|n| n.from_minutes);
        let upto = next.map_or(minutes, |n| n.min(minutes));
        let m = upto - t.from_minutes;
        let price = u128::from(m) * u128::from(t.price_per_min_micros);
        out.push(TierLine {
            from_minutes: t.from_minutes,
            to_minutes: next,
            minutes: m,
            price_per_min_micros: t.price_per_min_micros,
            price_micros: u64::try_from(price).unwrap_or(u64::MAX),
        });
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tiers() -> Vec<Tier> {
        vec![
            Tier { from_minutes: 0, price_per_min_micros: 8_500 },
            Tier { from_minutes: 100, price_per_min_micros: 8_000 },
            Tier { from_minutes: 1_000, price_per_min_micros: 7_000 },
        ]
    }

    #[test]
    fn defaults_are_the_runbooks() {
        let p = PriceTable::default();
        p.validate().unwrap();
        assert_eq!(p.tiers_for(Category::CallsInbound), vec![Tier { from_minutes: 0, price_per_min_micros: 8_500 }]);
        assert_eq!(p.tiers_for(Category::CallsOutbound)[0].price_per_min_micros, 13_000);
        assert_eq!(p.tiers_for(Category::Recordings)[0].price_per_min_micros, 2_500);
        assert_eq!(p.tiers_for(Category::Transcriptions)[0].price_per_min_micros, 0);
        assert_eq!(p.local_number_per_month_micros, 1_000_000);
        assert!(p.tiers_for(Category::Totalprice).is_empty());
    }

    #[test]
    fn tiers_walk_the_thresholds() {
        let t = tiers();
        assert_eq!(tiered_price(&t, 0), 0);
        assert_eq!(tiered_price(&t, 1), 8_500);
        assert_eq!(tiered_price(&t, 100), 850_000);
        assert_eq!(tiered_price(&t, 101), 858_000);
        assert_eq!(tiered_price(&t, 1_500), 850_000 + 900 * 8_000 + 500 * 7_000);
        let lines = tier_lines(&t, 150);
        assert_eq!(lines.len(), 2);
        assert_eq!(
            lines[1],
            TierLine {
                from_minutes: 100,
                to_minutes: Some(1_000),
                minutes: 50,
                price_per_min_micros: 8_000,
                price_micros: 400_000
            }
        );
        // Never overflows, however many minutes.
        assert_eq!(
            tiered_price(&[Tier { from_minutes: 0, price_per_min_micros: MAX_PER_MIN_MICROS }], u64::MAX),
            u64::MAX
        );
    }

    #[test]
    fn configured_tiers_replace_the_flat_price() {
        let mut p = PriceTable::default();
        p.tiers.insert("calls-inbound".into(), tiers());
        p.validate().unwrap();
        assert_eq!(p.tiers_for(Category::CallsInbound), tiers());
    }

    #[test]
    fn validate_refuses_bad_tiers() {
        let bad = |name: &str, t: Vec<Tier>| {
            let mut p = PriceTable::default();
            p.tiers.insert(name.into(), t);
            p.validate().unwrap_err().to_string()
        };
        let tier = |from, price| Tier { from_minutes: from, price_per_min_micros: price };
        assert!(bad("calls-inbound", vec![]).contains("at least one"));
        assert!(bad("calls-inbound", vec![tier(10, 1)]).contains("from_minutes = 0"));
        assert!(bad("calls-inbound", vec![tier(0, 1), tier(100, 1), tier(50, 1)]).contains("sorted"));
        assert!(bad("calls-inbound", vec![tier(0, 1), tier(0, 2)]).contains("sorted"));
        assert!(bad("phonenumbers-local", vec![tier(0, 1)]).contains("tiers are for"));
        assert!(bad("calls-sip", vec![tier(0, 1)]).contains("tiers.calls-sip"));
        assert!(bad("calls-outbound", vec![tier(0, MAX_PER_MIN_MICROS + 1)]).contains("at most"));
        let p = PriceTable { inbound_per_min_micros: MAX_PER_MIN_MICROS + 1, ..PriceTable::default() };
        assert!(p.validate().unwrap_err().to_string().contains("inbound_per_min_micros"));
    }

    #[test]
    fn reads_toml_tiers() {
        let p: PriceTable = toml::from_str(
            "[[tiers.calls-outbound]]\nfrom_minutes = 0\nprice_per_min_micros = 13000\n\
             [[tiers.calls-outbound]]\nfrom_minutes = 500\nprice_per_min_micros = 12000\n",
        )
        .unwrap();
        p.validate().unwrap();
        assert_eq!(p.tiers_for(Category::CallsOutbound)[1], Tier { from_minutes: 500, price_per_min_micros: 12_000 });
        assert!(toml::from_str::<PriceTable>("[[tiers.calls-outbound]]\nfrom_minutes = 0\n").is_err());
    }
}
