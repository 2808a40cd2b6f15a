//! The fraud rules: their settings, with per-tenant overrides, and the evidence each one gives
//! when it fires.
//!
//! Every rule is explainable: a [`RuleHit`] names the rule, its severity and the numbers that made
//! it fire (counts, windows, limits, costs). The rules, by name:
//!
//! | rule | looks at | fires when | severity |
//! |---|---|---|---|
//! | `premium_destination` | the remote number's prefix | premium-rate range, or cost ≥ `high_cost_per_min_micros` | end call (outbound), block (inbound) |
//! | `geo_permission` | the remote party's country | not in `allowed_countries` (empty = all allowed) | end call |
//! | `velocity_from` | inbound calls per caller | more than `max_calls_per_number` in `velocity_window_secs` | block |
//! | `velocity_to` | outbound calls per destination | more than `max_calls_per_number` in `velocity_window_secs` | block |
//! | `short_call_burst` | ended calls per remote number (wangiri) | `short_call_count` calls of ≤ `short_call_max_secs` in `short_call_window_secs` | block |
//! | `sequential_dialling` | dialled numbers (enumeration) | `sequential_run` consecutive numbers in `sequential_window_secs` | block (inbound) / `sequential_outbound_severity` (outbound) |
//! | `off_hours` | the call's local time | outside `business_hours` (none configured = off) | alert |
//! | `volume_anomaly` | the tenant's calls this UTC hour | above mean + 2σ of the same hour over the last 7 days | alert, once per hour |
//! | `spend_velocity` | the tenant's estimated spend | above `max_spend_per_hour_micros` in the trailing hour | end call |
//!
//! The remote party is the caller on inbound calls (and [`Direction::Other`]) and the callee on
//! outbound ones, as in the webhook gate. A country is taken from the webhook (`FromCountry` /
//! `ToCountry`) when it is two letters, else from the prefix table; a number of unknown country
//! (not E.164, no matching prefix) does not trip `geo_permission`.
//!
//! `sequential_dialling` watches the dialled side (`to`) of each direction separately. Outbound, a
//! run of consecutive destinations is the tenant's own account sweeping a number range (a
//! compromised account testing premium ranges, or a robo-dialler): the destinations are victims,
//! so by default it only alerts (`sequential_outbound_severity = "alert"`; raise it to `end_call`
//! to stop the sweep). Inbound, a run into the tenant's own consecutive numbers is someone
//! war-dialling the tenant's number block: the caller of the call that completes the run is
//! blocked.
//!
//! `spend_velocity` estimates cost per second of call time: outbound calls at their destination's
//! `cost_per_min_micros`, inbound calls at `inbound_cost_per_min_micros` (a caller's prefix says
//! nothing about what receiving the call costs). Calls that ended in the trailing hour count with
//! their whole duration; calls still up count from when they were received.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use voxgate_protocol::event::{Direction, RuleHit, Severity};
use voxgate_protocol::{AccountSid, Timestamp};

use super::prefixes::{PrefixEntry, PrefixError, PrefixTable};
use super::usd;

const US_PER_SEC: i64 = 1_000_000;

/// The rules, in the order their hits appear in a verdict.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Rule {
    PremiumDestination,
    GeoPermission,
    VelocityFrom,
    VelocityTo,
    ShortCallBurst,
    SequentialDialling,
    OffHours,
    VolumeAnomaly,
    SpendVelocity,
}

impl Rule {
    pub const ALL: [Rule; 9] = [
        Self::PremiumDestination,
        Self::GeoPermission,
        Self::VelocityFrom,
        Self::VelocityTo,
        Self::ShortCallBurst,
        Self::SequentialDialling,
        Self::OffHours,
        Self::VolumeAnomaly,
        Self::SpendVelocity,
    ];

    /// The rule's stable name (`RuleHit::rule`, `disabled_rules`, alert names `fraud.<name>`).
    pub fn name(self) -> &'static str {
        match self {
            Self::PremiumDestination => "premium_destination",
            Self::GeoPermission => "geo_permission",
            Self::VelocityFrom => "velocity_from",
            Self::VelocityTo => "velocity_to",
            Self::ShortCallBurst => "short_call_burst",
            Self::SequentialDialling => "sequential_dialling",
            Self::OffHours => "off_hours",
            Self::VolumeAnomaly => "volume_anomaly",
            Self::SpendVelocity => "spend_velocity",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|r| r.name() == s)
    }

    /// One bit per rule, for rule sets (disabled rules, rules already fired on a call).
    pub(crate) fn bit(self) -> u16 {
        1 << (self as u16)
    }

    pub(crate) fn hit(self, severity: Severity, evidence: String) -> RuleHit {
        RuleHit { rule: self.name().to_owned(), severity, evidence }
    }
}

impl std::fmt::Display for Rule {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// A tenant's business hours (`off_hours`): local time is UTC + `utc_offset_minutes`; a call is
/// in hours on one of `days` (ISO weekdays, 1 = Monday … 7 = Sunday) from `start_hour` to just
/// before `end_hour`. `start_hour > end_hour` is an overnight shift that starts on a listed day
/// (`start_hour = 22, end_hour = 6, days = [1]` covers Monday 22:00 to Tuesday 06:00).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BusinessHours {
    /// 0 to 23.
    pub start_hour: u8,
    /// 1 to 24, not equal to `start_hour`.
    pub end_hour: u8,
    /// -840 to 840 (UTC-14:00 to UTC+14:00). Fixed: no daylight saving.
    pub utc_offset_minutes: i16,
    pub days: Vec<u8>,
}

impl Default for BusinessHours {
    fn default() -> Self {
        Self { start_hour: 9, end_hour: 17, utc_offset_minutes: 0, days: vec![1, 2, 3, 4, 5] }
    }
}

const DAY_NAMES: [&str; 7] = ["Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun"];

/// Local wall time of an instant: (ISO weekday 1..=7, hour, minute).
fn local_time(at: Timestamp, utc_offset_minutes: i16) -> (u8, u8, u8) {
    let local = at.0.saturating_add(i64::from(utc_offset_minutes) * 60 * US_PER_SEC);
    let day = local.div_euclid(86_400 * US_PER_SEC);
    let sod = local.rem_euclid(86_400 * US_PER_SEC) / US_PER_SEC;
    // 1970-01-01 was a Thursday (ISO 4).
    let dow = (day + 3).rem_euclid(7) as u8 + 1;
    (dow, (sod / 3600) as u8, ((sod / 60) % 60) as u8)
}

impl BusinessHours {
    pub fn validate(&self) -> Result<(), crate::InvalidSetting> {
        if self.start_hour > 23 {
            return Err(crate::InvalidSetting::new("start_hour", "must be between 0 and 23"));
        }
        if self.end_hour == 0 || self.end_hour > 24 || self.end_hour == self.start_hour {
            return Err(crate::InvalidSetting::new("end_hour", "must be between 1 and 24 and differ from start_hour"));
        }
        if !(-840..=840).contains(&self.utc_offset_minutes) {
            return Err(crate::InvalidSetting::new("utc_offset_minutes", "must be between -840 and 840"));
        }
        if self.days.is_empty() || self.days.iter().any(|d| !(1..=7).contains(d)) {
            return Err(crate::InvalidSetting::new("days", "must list ISO weekdays, 1 (Monday) to 7 (Sunday)"));
        }
        Ok(())
    }

    /// Whether `at` falls within these hours.
    pub fn contains(&self, at: Timestamp) -> bool {
        let (dow, hour, _) = local_time(at, self.utc_offset_minutes);
        let on = |d: u8| self.days.contains(&d);
        if self.start_hour < self.end_hour {
            on(dow) && (self.start_hour..self.end_hour).contains(&hour)
        } else {
            let yesterday = if dow == 1 { 7 } else { dow - 1 };
            (hour >= self.start_hour && on(dow)) || (hour < self.end_hour && on(yesterday))
        }
    }

    /// `09:00-17:00 Mon,Tue,Wed,Thu,Fri (UTC+00:00)`.
    fn describe(&self) -> String {
        let days: Vec<&str> =
            self.days.iter().filter_map(|&d| DAY_NAMES.get(usize::from(d).wrapping_sub(1)).copied()).collect();
        format!(
            "{:02}:00-{:02}:00 {} ({})",
            self.start_hour,
            self.end_hour,
            days.join(","),
            utc_offset(self.utc_offset_minutes)
        )
    }
}

fn utc_offset(minutes: i16) -> String {
    let sign = if minutes < 0 { '-' } else { '+' };
    let m = minutes.unsigned_abs();
    format!("UTC{sign}{:02}:{:02}", m / 60, m % 60)
}

/// The fraud stage's settings (`[fraud]`). Every rule setting is a default that a tenant can
/// override in `[fraud.tenants.AC…]`; the rest is engine-wide.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FraudConfig {
    /// `premium_destination`: a remote prefix costing at least this (micro-dollars a minute)
    /// counts as premium even when the table does not flag it.
    pub high_cost_per_min_micros: u64,
    /// `geo_permission`: ISO 3166 alpha-2 countries the remote party may be in; empty = any.
    pub allowed_countries: Vec<String>,
    /// `velocity_from` / `velocity_to`: calls one number may make to (or receive from) the tenant
    /// per window; the one after that fires.
    pub max_calls_per_number: u32,
    pub velocity_window_secs: u32,
    /// `short_call_burst`: this many calls with one number, each lasting at most
    /// `short_call_max_secs`, within the window, fire.
    pub short_call_count: u32,
    pub short_call_max_secs: u32,
    pub short_call_window_secs: u32,
    /// `sequential_dialling`: this many consecutive dialled numbers within the window fire.
    pub sequential_run: u32,
    pub sequential_window_secs: u32,
    /// What an outbound sweep gets (inbound sweeps are always `block`).
    pub sequential_outbound_severity: Severity,
    /// `off_hours`: none = the rule is off.
    pub business_hours: Option<BusinessHours>,
    /// `volume_anomaly`: an hour must hold at least this many calls to be an anomaly.
    pub min_anomaly_calls: u32,
    /// `spend_velocity`: estimated spend in the trailing hour above this (micro-dollars) fires.
    pub max_spend_per_hour_micros: u64,
    /// What a minute of an inbound call is estimated to cost (micro-dollars).
    pub inbound_cost_per_min_micros: u64,
    /// How long a number stays blocked after a verdict of severity `block` or more.
    pub block_secs: u32,
    /// Rules switched off, by name.
    pub disabled_rules: Vec<String>,
    /// Engine-wide: distinct numbers (and calls) remembered per tenant; past it the least recently
    /// seen are forgotten first.
    pub max_tracked_numbers: u32,
    /// Engine-wide: a call with no terminal status after this long is forgotten (and stops counting
    /// towards spend).
    pub max_call_secs: u32,
    /// Engine-wide: prefix entries added to (or replacing those of) the destination table.
    pub prefixes: Vec<PrefixEntry>,
    /// Per-tenant overrides, keyed by AccountSid.
    pub tenants: BTreeMap<String, TenantFraudConfig>,
}

impl Default for FraudConfig {
    fn default() -> Self {
        Self {
            high_cost_per_min_micros: 1_000_000,
            allowed_countries: Vec::new(),
            max_calls_per_number: 10,
            velocity_window_secs: 60,
            short_call_count: 5,
            short_call_max_secs: 3,
            short_call_window_secs: 300,
            sequential_run: 5,
            sequential_window_secs: 300,
            sequential_outbound_severity: Severity::Alert,
            business_hours: None,
            min_anomaly_calls: 10,
            max_spend_per_hour_micros: 50_000_000,
            inbound_cost_per_min_micros: 8_500,
            block_secs: 3600,
            disabled_rules: Vec::new(),
            max_tracked_numbers: 100_000,
            max_call_secs: 14_400,
            prefixes: Vec::new(),
            tenants: BTreeMap::new(),
        }
    }
}

/// One tenant's overrides: every field left out falls back to the [`FraudConfig`] default.
/// `allowed_countries` and `disabled_rules` replace the default lists, they do not extend them.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TenantFraudConfig {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub high_cost_per_min_micros: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub allowed_countries: Option<Vec<String>>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_calls_per_number: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub velocity_window_secs: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub short_call_count: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub short_call_max_secs: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub short_call_window_secs: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sequential_run: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sequential_window_secs: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sequential_outbound_severity: Option<Severity>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub business_hours: Option<BusinessHours>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub min_anomaly_calls: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_spend_per_hour_micros: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub inbound_cost_per_min_micros: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub block_secs: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub disabled_rules: Option<Vec<String>>,
}

/// Why a fraud config was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FraudConfigError {
    #[error("fraud.{field}: {reason}")]
    Invalid { field: String, reason: String },
    #[error("fraud.prefixes: {0}")]
    Prefix(#[from] PrefixError),
}

fn invalid(field: impl Into<String>, reason: impl Into<String>) -> FraudConfigError {
    FraudConfigError::Invalid { field: field.into(), reason: reason.into() }
}

impl FraudConfig {
    /// Checks the defaults, every tenant's overrides (applied to the defaults) and the prefix
    /// entries.
    pub fn validate(&self) -> Result<(), FraudConfigError> {
        self.resolve().map(|_| ())
    }

    /// The checked, resolved form the engine runs on.
    pub(crate) fn resolve(&self) -> Result<Resolved, FraudConfigError> {
        let defaults = Settings::resolve(self, None).map_err(|(f, r)| invalid(f, r))?;
        if !(16..=10_000_000).contains(&self.max_tracked_numbers) {
            return Err(invalid("max_tracked_numbers", "must be between 16 and 10000000"));
        }
        if !(60..=7 * 86_400).contains(&self.max_call_secs) {
            return Err(invalid("max_call_secs", "must be between 60 and 604800"));
        }
        PrefixTable::empty().with_overrides(&self.prefixes)?;
        let mut tenants = Vec::with_capacity(self.tenants.len());
        for (sid, over) in &self.tenants {
            let tenant = AccountSid::parse(sid).map_err(|e| invalid(format!("tenants.{sid}"), e.to_string()))?;
            let s = Settings::resolve(self, Some(over)).map_err(|(f, r)| invalid(format!("tenants.{sid}.{f}"), r))?;
            tenants.push((tenant, s));
        }
        Ok(Resolved { defaults, tenants })
    }
}

/// A validated config, resolved per tenant.
#[derive(Debug, Clone)]
pub(crate) struct Resolved {
    pub defaults: Settings,
    pub tenants: Vec<(AccountSid, Settings)>,
}

/// One tenant's effective rule settings (the defaults with its overrides applied), checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Settings {
    pub high_cost_per_min_micros: u64,
    /// Upper-case.
    pub allowed_countries: Vec<[u8; 2]>,
    pub max_calls_per_number: u32,
    pub velocity_window_secs: u32,
    pub short_call_count: u32,
    pub short_call_max_secs: u32,
    pub short_call_window_secs: u32,
    pub sequential_run: u32,
    pub sequential_window_secs: u32,
    pub sequential_outbound_severity: Severity,
    pub business_hours: Option<BusinessHours>,
    pub min_anomaly_calls: u32,
    pub max_spend_per_hour_micros: u64,
    pub inbound_cost_per_min_micros: u64,
    pub block_secs: u32,
    /// [`Rule::bit`]s of the rules switched off.
    pub disabled: u16,
}

type FieldError = (&'static str, String);

fn in_range<T: PartialOrd + std::fmt::Display>(field: &'static str, v: T, lo: T, hi: T) -> Result<T, FieldError> {
    if v < lo || v > hi {
        return Err((field, format!("must be between {lo} and {hi}, got {v}")));
    }
    Ok(v)
}

impl Settings {
    fn resolve(d: &FraudConfig, t: Option<&TenantFraudConfig>) -> Result<Self, FieldError> {
        let t = t.cloned().unwrap_or_default();
        let max_cost = super::prefixes::MAX_COST_PER_MIN_MICROS;
        let countries = t.allowed_countries.as_ref().unwrap_or(&d.allowed_countries);
        let mut allowed_countries = Vec::with_capacity(countries.len());
        for c in countries {
            match c.as_bytes() {
                &[a, b] if a.is_ascii_alphabetic() && b.is_ascii_alphabetic() => {
                    allowed_countries.push([a.to_ascii_uppercase(), b.to_ascii_uppercase()])
                }
                _ => return Err(("allowed_countries", format!("{c:?} is not a two-letter country code"))),
            }
        }
        let mut disabled = 0u16;
        for name in t.disabled_rules.as_ref().unwrap_or(&d.disabled_rules) {
            let r = Rule::parse(name).ok_or_else(|| {
                let known: Vec<&str> = Rule::ALL.iter().map(|r| r.name()).collect();
                ("disabled_rules", format!("unknown rule {name:?} (rules: {})", known.join(", ")))
            })?;
            disabled |= r.bit();
        }
        let business_hours = t.business_hours.or_else(|| d.business_hours.clone());
        if let Some(h) = &business_hours {
            h.validate().map_err(|e| ("business_hours", e.to_string()))?;
        }
        let day = 86_400;
        Ok(Self {
            high_cost_per_min_micros: in_range(
                "high_cost_per_min_micros",
                t.high_cost_per_min_micros.unwrap_or(d.high_cost_per_min_micros),
                1,
                max_cost,
            )?,
            allowed_countries,
            max_calls_per_number: in_range(
                "max_calls_per_number",
                t.max_calls_per_number.unwrap_or(d.max_calls_per_number),
                1,
                10_000,
            )?,
            velocity_window_secs: in_range(
                "velocity_window_secs",
                t.velocity_window_secs.unwrap_or(d.velocity_window_secs),
                1,
                day,
            )?,
            short_call_count: in_range(
                "short_call_count",
                t.short_call_count.unwrap_or(d.short_call_count),
                2,
                10_000,
            )?,
            short_call_max_secs: in_range(
                "short_call_max_secs",
                t.short_call_max_secs.unwrap_or(d.short_call_max_secs),
                0,
                3600,
            )?,
            short_call_window_secs: in_range(
                "short_call_window_secs",
                t.short_call_window_secs.unwrap_or(d.short_call_window_secs),
                1,
                day,
            )?,
            sequential_run: in_range("sequential_run", t.sequential_run.unwrap_or(d.sequential_run), 2, 1000)?,
            sequential_window_secs: in_range(
                "sequential_window_secs",
                t.sequential_window_secs.unwrap_or(d.sequential_window_secs),
                1,
                day,
            )?,
            sequential_outbound_severity: t.sequential_outbound_severity.unwrap_or(d.sequential_outbound_severity),
            business_hours,
            min_anomaly_calls: in_range(
                "min_anomaly_calls",
                t.min_anomaly_calls.unwrap_or(d.min_anomaly_calls),
                1,
                10_000_000,
            )?,
            max_spend_per_hour_micros: in_range(
                "max_spend_per_hour_micros",
                t.max_spend_per_hour_micros.unwrap_or(d.max_spend_per_hour_micros),
                1,
                u64::MAX / 4,
            )?,
            inbound_cost_per_min_micros: in_range(
                "inbound_cost_per_min_micros",
                t.inbound_cost_per_min_micros.unwrap_or(d.inbound_cost_per_min_micros),
                0,
                max_cost,
            )?,
            block_secs: in_range("block_secs", t.block_secs.unwrap_or(d.block_secs), 1, 30 * day)?,
            disabled,
        })
    }

    pub fn enabled(&self, r: Rule) -> bool {
        self.disabled & r.bit() == 0
    }
}

/// Seconds as event-time microseconds.
pub(crate) fn secs_us(secs: u32) -> i64 {
    i64::from(secs) * US_PER_SEC
}

/// Whether the remote party is the callee (outbound) rather than the caller.
pub(crate) fn is_outbound(d: Direction) -> bool {
    matches!(d, Direction::OutboundApi | Direction::OutboundDial)
}

fn call_word(outbound: bool) -> &'static str {
    if outbound {
        "call to"
    } else {
        "call from"
    }
}

/// `premium_destination`.
pub(crate) fn premium_destination(
    s: &Settings,
    outbound: bool,
    remote: &str,
    entry: Option<&PrefixEntry>,
) -> Option<RuleHit> {
    let e = entry?;
    let severity = if outbound { Severity::EndCall } else { Severity::Block };
    let what = call_word(outbound);
    let evidence = if e.premium {
        format!(
            "{what} {remote} matches premium-rate prefix {} ({}, {}/min)",
            e.prefix,
            e.country,
            usd(e.cost_per_min_micros)
        )
    } else if e.cost_per_min_micros >= s.high_cost_per_min_micros {
        format!(
            "{what} {remote}: prefix {} ({}) costs {}/min, at or above the high-cost limit {}/min",
            e.prefix,
            e.country,
            usd(e.cost_per_min_micros),
            usd(s.high_cost_per_min_micros)
        )
    } else {
        return None;
    };
    Some(Rule::PremiumDestination.hit(severity, evidence))
}

/// `geo_permission`. `event_country` is the webhook's country for the remote side.
pub(crate) fn geo_permission(
    s: &Settings,
    outbound: bool,
    remote: &str,
    event_country: Option<&str>,
    entry: Option<&PrefixEntry>,
) -> Option<RuleHit> {
    if s.allowed_countries.is_empty() {
        return None;
    }
    let from_event = event_country.filter(|c| c.len() == 2 && c.bytes().all(|b| b.is_ascii_alphabetic()));
    let (country, source) = match (from_event, entry) {
        (Some(c), _) => (c, format!("{} from the webhook", if outbound { "ToCountry" } else { "FromCountry" })),
        (None, Some(e)) => (e.country.as_str(), format!("from prefix {}", e.prefix)),
        (None, None) => return None,
    };
    let b = country.as_bytes();
    let code = [b[0].to_ascii_uppercase(), b[1].to_ascii_uppercase()];
    if s.allowed_countries.contains(&code) {
        return None;
    }
    let allowed: Vec<&str> = s.allowed_countries.iter().filter_map(|c| std::str::from_utf8(c).ok()).collect();
    let evidence = format!(
        "{} {remote} is in {} ({source}), not one of the allowed countries {}",
        call_word(outbound),
        String::from_utf8_lossy(&code),
        allowed.join(", ")
    );
    Some(Rule::GeoPermission.hit(Severity::EndCall, evidence))
}

/// `velocity_from` (inbound) / `velocity_to` (outbound): `count` calls in the window, this one
/// included.
pub(crate) fn velocity(s: &Settings, outbound: bool, remote: &str, count: usize, capped: bool) -> Option<RuleHit> {
    if count <= s.max_calls_per_number as usize {
        return None;
    }
    let (rule, dir) = if outbound { (Rule::VelocityTo, "to") } else { (Rule::VelocityFrom, "from") };
    let at_least = if capped { "at least " } else { "" };
    let evidence = format!(
        "{at_least}{count} calls {dir} {remote} in {} s (limit {})",
        s.velocity_window_secs, s.max_calls_per_number
    );
    Some(rule.hit(Severity::Block, evidence))
}

/// `short_call_burst`: `count` short calls with `remote` in the window, this one (`this_us` long)
/// included.
pub(crate) fn short_call_burst(s: &Settings, remote: &str, count: usize, this_us: i64) -> Option<RuleHit> {
    if count < s.short_call_count as usize {
        return None;
    }
    let evidence = format!(
        "{count} calls with {remote} lasting at most {} s within {} s (limit {}); this one lasted {:.1} s",
        s.short_call_max_secs,
        s.short_call_window_secs,
        s.short_call_count,
        this_us as f64 / 1e6
    );
    Some(Rule::ShortCallBurst.hit(Severity::Block, evidence))
}

/// `sequential_dialling`: a run of `len` consecutive dialled numbers from `lo` to `hi`.
pub(crate) fn sequential_dialling(
    s: &Settings,
    outbound: bool,
    remote: &str,
    len: usize,
    lo: &str,
    hi: &str,
) -> Option<RuleHit> {
    if len < s.sequential_run as usize {
        return None;
    }
    let (severity, evidence) = if outbound {
        (
            s.sequential_outbound_severity,
            format!(
                "{len} calls to consecutive numbers {lo} to {hi} within {} s (run limit {}); latest to {remote}",
                s.sequential_window_secs, s.sequential_run
            ),
        )
    } else {
        (
            Severity::Block,
            format!(
                "{len} calls into the tenant's consecutive numbers {lo} to {hi} within {} s (run limit {}); latest from {remote}",
                s.sequential_window_secs, s.sequential_run
            ),
        )
    };
    Some(Rule::SequentialDialling.hit(severity, evidence))
}

/// `off_hours`.
pub(crate) fn off_hours(s: &Settings, outbound: bool, remote: &str, at: Timestamp) -> Option<RuleHit> {
    let h = s.business_hours.as_ref()?;
    if h.contains(at) {
        return None;
    }
    let (dow, hour, minute) = local_time(at, h.utc_offset_minutes);
    let evidence = format!(
        "{} {remote} at {} {hour:02}:{minute:02} local time is outside business hours {}",
        call_word(outbound),
        DAY_NAMES[usize::from(dow - 1)],
        h.describe()
    );
    Some(Rule::OffHours.hit(Severity::Alert, evidence))
}

/// `volume_anomaly`: `count` calls so far in the UTC hour `hour`, against the same hour on each
/// day of `history` (at least 3 days). Fires when `count` is at least `min_anomaly_calls` and
/// above mean + 2σ, σ floored at 1 call. The comparison is exact integer arithmetic.
pub(crate) fn volume_anomaly(s: &Settings, hour: u8, count: u32, history: &[u32]) -> Option<RuleHit> {
    let n = history.len() as i128;
    if n < 3 || count < s.min_anomaly_calls {
        return None;
    }
    let sum: i128 = history.iter().map(|&c| i128::from(c)).sum();
    let sumsq: i128 = history.iter().map(|&c| i128::from(c) * i128::from(c)).sum();
    // count > mean + 2·max(σ, 1)  ⇔  d > 2·max(√V, n) with d = n·count − sum, V = n·sumsq − sum².
    let d = n * i128::from(count) - sum;
    let v = n * sumsq - sum * sum;
    if d <= 0 || d * d <= 4 * v.max(n * n) {
        return None;
    }
    let mean = sum as f64 / n as f64;
    let sigma = (v as f64).sqrt() / n as f64;
    let evidence = format!(
        "{count} calls in the hour from {hour:02}:00 UTC; the same hour over the last {n} days averaged {mean:.1} \
         (σ {sigma:.1}), threshold {:.1} (σ at least 1, at least {} calls)",
        mean + 2.0 * sigma.max(1.0),
        s.min_anomaly_calls
    );
    Some(Rule::VolumeAnomaly.hit(Severity::Alert, evidence))
}

/// `spend_velocity`: estimated spend of calls ended in the trailing hour and of calls in progress.
pub(crate) fn spend_velocity(s: &Settings, ended_micros: u64, running_micros: u64) -> Option<RuleHit> {
    let total = ended_micros.saturating_add(running_micros);
    if total <= s.max_spend_per_hour_micros {
        return None;
    }
    let evidence = format!(
        "estimated spend {} in the trailing hour is above the limit {} (ended calls {}, calls in progress {})",
        usd(total),
        usd(s.max_spend_per_hour_micros),
        usd(ended_micros),
        usd(running_micros)
    );
    Some(Rule::SpendVelocity.hit(Severity::EndCall, evidence))
}

#[cfg(test)]
mod tests {
    use super::*;

    const SID: &str = "AC0123456789abcdef0123456789abcdef";

    fn defaults() -> Settings {
        FraudConfig::default().resolve().unwrap().defaults
    }

    fn err_field(c: &FraudConfig) -> String {
        match c.validate().unwrap_err() {
            FraudConfigError::Invalid { field, .. } => field,
            e => panic!("{e}"),
        }
    }

    #[test]
    fn defaults_validate_and_match_the_documented_values() {
        let c = FraudConfig::default();
        c.validate().unwrap();
        let s = defaults();
        assert_eq!(s.high_cost_per_min_micros, 1_000_000);
        assert_eq!((s.max_calls_per_number, s.velocity_window_secs), (10, 60));
        assert_eq!((s.short_call_count, s.short_call_max_secs, s.short_call_window_secs), (5, 3, 300));
        assert_eq!((s.sequential_run, s.sequential_window_secs), (5, 300));
        assert_eq!(s.sequential_outbound_severity, Severity::Alert);
        assert_eq!((s.min_anomaly_calls, s.max_spend_per_hour_micros, s.block_secs), (10, 50_000_000, 3600));
        assert!(s.business_hours.is_none() && s.allowed_countries.is_empty() && s.disabled == 0);
    }

    #[test]
    fn validation_names_the_bad_field() {
        type Breaker = fn(&mut FraudConfig);
        let cases: Vec<(Breaker, &str)> = vec![
            (|c| c.max_calls_per_number = 0, "max_calls_per_number"),
            (|c| c.velocity_window_secs = 0, "velocity_window_secs"),
            (|c| c.short_call_count = 1, "short_call_count"),
            (|c| c.short_call_window_secs = 100_000, "short_call_window_secs"),
            (|c| c.sequential_run = 1, "sequential_run"),
            (|c| c.high_cost_per_min_micros = 0, "high_cost_per_min_micros"),
            (|c| c.max_spend_per_hour_micros = 0, "max_spend_per_hour_micros"),
            (|c| c.block_secs = 0, "block_secs"),
            (|c| c.min_anomaly_calls = 0, "min_anomaly_calls"),
            (|c| c.allowed_countries = vec!["USA".into()], "allowed_countries"),
            (|c| c.disabled_rules = vec!["velocity".into()], "disabled_rules"),
            (|c| c.business_hours = Some(BusinessHours { end_hour: 9, ..Default::default() }), "business_hours"),
            (|c| c.business_hours = Some(BusinessHours { days: vec![0], ..Default::default() }), "business_hours"),
            (|c| c.max_tracked_numbers = 1, "max_tracked_numbers"),
            (|c| c.max_call_secs = 1, "max_call_secs"),
        ];
        for (break_it, field) in cases {
            let mut c = FraudConfig::default();
            break_it(&mut c);
            assert_eq!(err_field(&c), field);
        }
        let c = FraudConfig { disabled_rules: vec!["nope".into()], ..Default::default() };
        let msg = c.validate().unwrap_err().to_string();
        assert!(msg.starts_with("fraud.disabled_rules: unknown rule \"nope\"") && msg.contains("off_hours"), "{msg}");
    }

    #[test]
    fn validation_checks_tenants_and_prefixes() {
        let mut c = FraudConfig::default();
        c.tenants.insert("ACnot-a-sid".into(), TenantFraudConfig::default());
        assert_eq!(err_field(&c), "tenants.ACnot-a-sid");
        let mut c = FraudConfig::default();
        c.tenants.insert(SID.into(), TenantFraudConfig { velocity_window_secs: Some(0), ..Default::default() });
        assert_eq!(err_field(&c), format!("tenants.{SID}.velocity_window_secs"));
        let mut c = FraudConfig::default();
        c.prefixes.push(PrefixEntry {
            prefix: "+1x".into(),
            country: "US".into(),
            cost_per_min_micros: 1,
            premium: false,
        });
        assert!(matches!(c.validate(), Err(FraudConfigError::Prefix(PrefixError::BadPrefix { index: 1, .. }))));
    }

    #[test]
    fn tenant_overrides_fall_back_to_the_defaults() {
        let mut c = FraudConfig { allowed_countries: vec!["us".into()], ..Default::default() };
        c.tenants.insert(
            SID.into(),
            TenantFraudConfig {
                max_calls_per_number: Some(3),
                allowed_countries: Some(vec!["GB".into(), "fr".into()]),
                disabled_rules: Some(vec!["off_hours".into()]),
                ..Default::default()
            },
        );
        let r = c.resolve().unwrap();
        assert_eq!(r.defaults.allowed_countries, vec![*b"US"]);
        let (sid, t) = &r.tenants[0];
        assert_eq!(sid.to_string(), SID);
        assert_eq!(t.max_calls_per_number, 3);
        assert_eq!(t.velocity_window_secs, 60);
        assert_eq!(t.allowed_countries, vec![*b"GB", *b"FR"]);
        assert!(!t.enabled(Rule::OffHours) && t.enabled(Rule::VelocityFrom));
    }

    #[test]
    fn config_reads_from_toml() {
        let c: FraudConfig = toml::from_str(&format!(
            r#"
            allowed_countries = ["US", "CA"]
            max_calls_per_number = 20
            sequential_outbound_severity = "end_call"
            business_hours = {{ start_hour = 8, end_hour = 18, utc_offset_minutes = -300 }}
            prefixes = [{{ prefix = "+1555", country = "US", cost_per_min_micros = 3_000_000, premium = true }}]
            [tenants.{SID}]
            max_calls_per_number = 5
            "#
        ))
        .unwrap();
        c.validate().unwrap();
        assert_eq!(c.max_calls_per_number, 20);
        assert_eq!(c.sequential_outbound_severity, Severity::EndCall);
        assert_eq!(c.business_hours.as_ref().unwrap().days, vec![1, 2, 3, 4, 5]);
        assert_eq!(c.tenants[SID].max_calls_per_number, Some(5));
        let e = toml::from_str::<FraudConfig>("max_calls_per_numbr = 3").unwrap_err();
        assert!(e.to_string().contains("max_calls_per_numbr"), "{e}");
        let e = toml::from_str::<FraudConfig>(&format!("[tenants.{SID}]\nblock = 3")).unwrap_err();
        assert!(e.to_string().contains("block"), "{e}");
    }

    #[test]
    fn business_hours_in_local_time_and_overnight() {
        // 2025-01-06 was a Monday.
        let monday = Timestamp::from_micros(day(2025, 1, 6) * 86_400 * US_PER_SEC);
        let at = |h: i64, m: i64| Timestamp(monday.0 + (h * 3600 + m * 60) * US_PER_SEC);
        let nine_to_five = BusinessHours::default();
        assert!(!nine_to_five.contains(at(8, 59)));
        assert!(nine_to_five.contains(at(9, 0)));
        assert!(nine_to_five.contains(at(16, 59)));
        assert!(!nine_to_five.contains(at(17, 0)));
        assert!(!nine_to_five.contains(at(24 * 5 + 12, 0)), "Saturday noon");
        // New York (UTC-5): 09:00 local is 14:00 UTC.
        let ny = BusinessHours { utc_offset_minutes: -300, ..Default::default() };
        assert!(!ny.contains(at(13, 59)) && ny.contains(at(14, 0)) && ny.contains(at(21, 59)));
        // Night shift Monday 22:00 to Tuesday 06:00 only.
        let night = BusinessHours { start_hour: 22, end_hour: 6, days: vec![1], ..Default::default() };
        assert!(night.contains(at(23, 0)) && night.contains(at(24 + 5, 59)));
        assert!(!night.contains(at(5, 0)), "Monday 05:00 belongs to Sunday's shift");
        assert!(!night.contains(at(24 + 22, 0)), "Tuesday evening");
        assert_eq!(nine_to_five.describe(), "09:00-17:00 Mon,Tue,Wed,Thu,Fri (UTC+00:00)");
        assert_eq!(ny.describe(), "09:00-17:00 Mon,Tue,Wed,Thu,Fri (UTC-05:00)");
    }

    fn day(y: i64, m: i64, d: i64) -> i64 {
        voxgate_protocol::time::days_from_civil(y, m, d)
    }

    #[test]
    fn volume_anomaly_threshold_is_mean_plus_two_sigma_with_a_floor() {
        let s = Settings { min_anomaly_calls: 1, ..defaults() };
        // Flat history of 4: σ = 0 → floor 1 → threshold 6: 6 quiet, 7 fires.
        assert!(volume_anomaly(&s, 3, 6, &[4, 4, 4]).is_none());
        let hit = volume_anomaly(&s, 3, 7, &[4, 4, 4]).unwrap();
        assert_eq!(hit.rule, "volume_anomaly");
        assert!(hit.evidence.contains("7 calls") && hit.evidence.contains("threshold 6.0"), "{}", hit.evidence);
        // History 2, 4, 6, 8: mean 5, σ √5 ≈ 2.236 → threshold 9.47: 9 quiet, 10 fires.
        assert!(volume_anomaly(&s, 3, 9, &[2, 4, 6, 8]).is_none());
        assert!(volume_anomaly(&s, 3, 10, &[2, 4, 6, 8]).is_some());
        // Too little history, or too few calls.
        assert!(volume_anomaly(&s, 3, 100, &[0, 0]).is_none());
        assert!(volume_anomaly(&defaults(), 3, 9, &[0, 0, 0]).is_none());
        assert!(volume_anomaly(&defaults(), 3, 10, &[0, 0, 0]).is_some());
    }

    #[test]
    fn rule_names_round_trip() {
        for r in Rule::ALL {
            assert_eq!(Rule::parse(r.name()), Some(r));
        }
        assert_eq!(Rule::parse("premium"), None);
        let bits: u16 = Rule::ALL.iter().map(|r| r.bit()).fold(0, |a, b| a | b);
        assert_eq!(bits.count_ones(), 9);
    }
}
