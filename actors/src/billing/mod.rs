//! Billing, the pure core: metering and rating of every tenant's usage, Twilio-shaped usage
//! records, invoices, usage triggers and monthly budgets.
//!
//! - [`prices`]: the [`PriceTable`] (flat prices per minute and per number-month, automatic volume
//!   tiers per calendar month), as config, validated.
//! - [`periods`]: UTC calendar arithmetic on event time ([`Date`], [`Month`]) and the usage-record
//!   periods ([`Period`]: `Daily`, `ThisMonth`, `StartDate`/`EndDate` ranges…).
//! - [`usage`]: the [`UsageBook`], which folds call, transcript, number and tenant events into
//!   per-tenant, per-category, per-UTC-day usage and answers [`UsageRecord`]s and [`Invoice`]s.
//! - [`triggers`]: the [`TriggerBook`] of usage triggers (fire at most once per period, with the
//!   Twilio callback's parameters) and budgets.
//!
//! - [`stage`]: the billing stage on the follower harness: every node's books, and the acting
//!   side (triggers fired, budgets stopped, callbacks delivered) for the tenant shards it holds.
//!
//! Apart from [`stage`], everything here is a pure function of the events fed in and the times
//! passed in: no clock, no I/O, ordered maps only. Applying an event twice changes nothing, and the book's contents depend
//! on the set of events applied (and the latest time seen), not on their order. Money is integer
//! micro-dollars (`u64`) throughout; it is only turned into a decimal string at the edge
//! ([`format_micros`]). The REST API and CLI around it live in nodes/.

pub mod periods;
pub mod prices;
pub mod stage;
pub mod triggers;
pub mod usage;

pub use periods::{Date, Granularity, Month, Period, PeriodError};
pub use prices::{PriceError, PriceTable, Tier, TierLine};
pub use triggers::{
    Budgets, CallbackMethod, Firing, NewTrigger, Recurring, Trigger, TriggerBook, TriggerBy, TriggerError, TriggerSid,
};
pub use usage::{Invoice, InvoiceLine, UsageBook, UsageChange, UsageRecord};

use serde::{Deserialize, Serialize};

/// Micro-units in one unit (one dollar, one minute, one call).
pub const MICROS: u64 = 1_000_000;

/// The `[billing]` section: prices (`[billing.prices]`, with volume tiers as
/// `[[billing.prices.tiers.calls-inbound]]`) and budgets (`[billing.budgets]`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BillingConfig {
    pub prices: PriceTable,
    pub budgets: Budgets,
    pub callbacks: CallbackPolicy,
}

/// How usage-trigger callbacks are retried (`[billing.callbacks]`): up to `attempts` in all, the
/// n-th retry `first_retry_ms × 2^(n-1)` after the failure before it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CallbackPolicy {
    pub attempts: u32,
    pub first_retry_ms: u64,
    /// Each attempt's time limit.
    pub timeout_ms: u64,
}

impl Default for CallbackPolicy {
    fn default() -> Self {
        Self { attempts: 6, first_retry_ms: 1000, timeout_ms: 10_000 }
    }
}

impl CallbackPolicy {
    /// The pause after failed attempt `attempt` (1-based).
    pub fn backoff(&self, attempt: u32) -> std::time::Duration {
        let factor = 1u64 << attempt.saturating_sub(1).min(20);
        std::time::Duration::from_millis(self.first_retry_ms.saturating_mul(factor))
    }
}

/// Why a `[billing]` section was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BillingConfigError {
    #[error(transparent)]
    Prices(#[from] PriceError),
    #[error("billing.budgets.{field}: {reason}")]
    Budget { field: String, reason: String },
    #[error("billing.callbacks: {0}")]
    Callbacks(String),
}

impl BillingConfig {
    pub fn validate(&self) -> Result<(), BillingConfigError> {
        self.prices.validate()?;
        self.budgets.validate()?;
        let c = &self.callbacks;
        if !(1..=20).contains(&c.attempts) || c.timeout_ms == 0 {
            return Err(BillingConfigError::Callbacks("attempts must be 1 to 20 and timeout_ms positive".into()));
        }
        Ok(())
    }
}

/// A usage category, by Twilio's name. Five are metered (`calls-inbound`, `calls-outbound`,
/// `recordings`, `transcriptions`, `phonenumbers-local`); the others are roll-ups: `calls` =
/// inbound + outbound, `phonenumbers` = `phonenumbers-local`, `totalprice` = the price of all five.
/// Roll-ups overlap their members: never add a roll-up to one of its members.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Category {
    Calls,
    CallsInbound,
    CallsOutbound,
    Phonenumbers,
    PhonenumbersLocal,
    Recordings,
    Totalprice,
    Transcriptions,
}

impl Category {
    /// Every category, in the order usage records list them (alphabetical, as Twilio does).
    pub const ALL: [Category; 8] = [
        Self::Calls,
        Self::CallsInbound,
        Self::CallsOutbound,
        Self::Phonenumbers,
        Self::PhonenumbersLocal,
        Self::Recordings,
        Self::Totalprice,
        Self::Transcriptions,
    ];

    /// The metered categories (everything else is a sum of these).
    pub const METERED: [Category; 5] =
        [Self::CallsInbound, Self::CallsOutbound, Self::PhonenumbersLocal, Self::Recordings, Self::Transcriptions];

    /// Twilio's category string.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Calls => "calls",
            Self::CallsInbound => "calls-inbound",
            Self::CallsOutbound => "calls-outbound",
            Self::Phonenumbers => "phonenumbers",
            Self::PhonenumbersLocal => "phonenumbers-local",
            Self::Recordings => "recordings",
            Self::Totalprice => "totalprice",
            Self::Transcriptions => "transcriptions",
        }
    }

    /// Parses Twilio's category string (only the categories voxgate meters).
    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|c| c.as_str() == s)
    }

    /// The record's `description`.
    pub fn description(self) -> &'static str {
        match self {
            Self::Calls => "Voice Minutes",
            Self::CallsInbound => "Inbound Voice Minutes",
            Self::CallsOutbound => "Outbound Voice Minutes",
            Self::Phonenumbers => "Phone Numbers",
            Self::PhonenumbersLocal => "Local Phone Numbers",
            Self::Recordings => "Recording Minutes",
            Self::Totalprice => "Total Price",
            Self::Transcriptions => "Transcription Minutes",
        }
    }

    /// The record's `count_unit` (`""` for `totalprice`, whose count is null).
    pub fn count_unit(self) -> &'static str {
        match self {
            Self::Calls | Self::CallsInbound | Self::CallsOutbound => "calls",
            Self::Phonenumbers | Self::PhonenumbersLocal => "numbers",
            Self::Recordings => "recordings",
            Self::Transcriptions => "transcriptions",
            Self::Totalprice => "",
        }
    }

    /// The record's `usage_unit`.
    pub fn usage_unit(self) -> &'static str {
        match self {
            Self::Calls | Self::CallsInbound | Self::CallsOutbound | Self::Recordings | Self::Transcriptions => {
                "minutes"
            }
            Self::Phonenumbers | Self::PhonenumbersLocal => "numbers",
            Self::Totalprice => "usd",
        }
    }

    /// Priced per minute (with volume tiers), as opposed to per number-month or a roll-up.
    pub fn per_minute(self) -> bool {
        matches!(self, Self::CallsInbound | Self::CallsOutbound | Self::Recordings | Self::Transcriptions)
    }

    /// The roll-ups a metered category belongs to.
    pub(crate) fn rollups(self) -> &'static [Category] {
        match self {
            Self::CallsInbound | Self::CallsOutbound => &[Self::Calls, Self::Totalprice],
            Self::PhonenumbersLocal => &[Self::Phonenumbers, Self::Totalprice],
            Self::Recordings | Self::Transcriptions => &[Self::Totalprice],
            Self::Calls | Self::Phonenumbers | Self::Totalprice => &[],
        }
    }
}

impl std::fmt::Display for Category {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Micro-units as Twilio's decimal string: `8500` → `"0.0085"`, `1_000_000` → `"1"`, `0` → `"0"`.
pub fn format_micros(micros: u64) -> String {
    let whole = micros / MICROS;
    let frac = micros % MICROS;
    if frac == 0 {
        return whole.to_string();
    }
    let digits = format!("{frac:06}");
    format!("{whole}.{}", digits.trim_end_matches('0'))
}

/// Why a decimal string is not an amount.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AmountError {
    #[error("{0:?} is not a non-negative decimal number")]
    NotDecimal(String),
    #[error("{0:?} has more than 6 decimal places")]
    TooPrecise(String),
    #[error("{0:?} is too large")]
    TooLarge(String),
}

/// Parses a non-negative decimal (`"12"`, `"0.5"`, `".25"`, up to 6 decimal places) into
/// micro-units, exactly (no float on the way).
pub fn parse_micros(s: &str) -> Result<u64, AmountError> {
    let (whole, frac) = match s.split_once('.') {
        Some((w, f)) => (w, f),
        None => (s, ""),
    };
    let digits = |p: &str| p.bytes().all(|b| b.is_ascii_digit());
    if (whole.is_empty() && frac.is_empty()) || !digits(whole) || !digits(frac) || (s.contains('.') && frac.is_empty())
    {
        return Err(AmountError::NotDecimal(s.to_owned()));
    }
    if frac.len() > 6 {
        return Err(AmountError::TooPrecise(s.to_owned()));
    }
    let too_large = || AmountError::TooLarge(s.to_owned());
    let whole: u64 = if whole.is_empty() { 0 } else { whole.parse().map_err(|_| too_large())? };
    let mut f: u64 = if frac.is_empty() { 0 } else { frac.parse().map_err(|_| too_large())? };
    for _ in frac.len()..6 {
        f *= 10;
    }
    whole.checked_mul(MICROS).and_then(|w| w.checked_add(f)).ok_or_else(too_large)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn category_names_round_trip() {
        for c in Category::ALL {
            assert_eq!(Category::parse(c.as_str()), Some(c));
            let json = serde_json::to_string(&c).unwrap();
            assert_eq!(json, format!("\"{}\"", c.as_str()));
        }
        assert_eq!(Category::parse("calls-sip"), None);
    }

    #[test]
    fn money_formats_and_parses_exactly() {
        assert_eq!(format_micros(8_500), "0.0085");
        assert_eq!(format_micros(1_000_000), "1");
        assert_eq!(format_micros(0), "0");
        assert_eq!(format_micros(2_192_848_550), "2192.84855");
        assert_eq!(parse_micros("0.0085"), Ok(8_500));
        assert_eq!(parse_micros("12"), Ok(12_000_000));
        assert_eq!(parse_micros(".5"), Ok(500_000));
        assert_eq!(parse_micros("0.000001"), Ok(1));
        for bad in ["", ".", "1.", "-1", "1e3", "1,5", "+1", " 1", "abc"] {
            assert!(matches!(parse_micros(bad), Err(AmountError::NotDecimal(_))), "{bad:?}");
        }
        assert!(matches!(parse_micros("0.0000001"), Err(AmountError::TooPrecise(_))));
        assert!(matches!(parse_micros("99999999999999999999"), Err(AmountError::TooLarge(_))));
        assert!(matches!(parse_micros("18446744073709.551616"), Err(AmountError::TooLarge(_))));
        for m in [0, 1, 8_500, 999_999, 1_000_001, 123_456_789] {
            assert_eq!(parse_micros(&format_micros(m)), Ok(m));
        }
    }

    #[test]
    fn billing_config_reads_nested_tables() {
        let cfg: BillingConfig = toml::from_str(
            r#"
            [prices]
            inbound_per_min_micros = 9000
            [[prices.tiers.calls-inbound]]
            from_minutes = 0
            price_per_min_micros = 8500
            [[prices.tiers.calls-inbound]]
            from_minutes = 100000
            price_per_min_micros = 8000
            [budgets]
            default_monthly_micros = 50000000
            "#,
        )
        .unwrap();
        cfg.validate().unwrap();
        assert_eq!(cfg.prices.inbound_per_min_micros, 9_000);
        assert_eq!(cfg.budgets.default_monthly_micros, Some(50_000_000));
        assert!(toml::from_str::<BillingConfig>("[prices]\nnope = 1").is_err());
    }
}
