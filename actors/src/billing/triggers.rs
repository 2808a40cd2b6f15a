//! Usage triggers (Twilio's `UT…` resources) and monthly budgets, judged on the usage book.
//!
//! A trigger watches one category of its account's usage records (subaccounts included, as
//! Twilio's records are by default) over the period holding the evaluation time: the UTC day,
//! month or year for `daily`, `monthly`, `yearly`; all time for `alltime` and non-recurring
//! triggers, which fire once ever (`alltime` and none differ only in the `Recurring` string sent).
//! It fires when the watched value (count, usage or price) is at or above its threshold, at most
//! once per period: the book remembers the start of the period it last fired in, and never fires
//! for that period, or an earlier one, again. A trigger created when the value is already past
//! its threshold fires at the next evaluation that looks at it.
//!
//! Values are compared in micro-units: counts and minutes times 10^6, money in micro-dollars, so
//! `TriggerValue=2.5` works for every `TriggerBy`. `TriggerValue=+30` is relative: the value of
//! the current period at creation plus 30.
//!
//! A budget is a hard monthly cap on an account's `totalprice` (its subaccounts' included). A
//! tenant is over budget when its own budget, or any ancestor's, has been reached this month.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};
use voxgate_protocol::event::{BudgetExceeded, Event, UsageTriggerCreated, UsageTriggerFired};
use voxgate_protocol::{AccountSid, Envelope, SidError, Timestamp};

use super::periods::{Date, Granularity, Month, Window};
use super::usage::{UsageBook, UsageChange};
use super::{format_micros, parse_micros, BillingConfigError, Category, MICROS};

/// The most triggers one account may have.
pub const MAX_TRIGGERS_PER_ACCOUNT: usize = 1000;
/// The longest friendly name (characters).
pub const MAX_FRIENDLY_NAME: usize = 64;

/// A usage trigger's id: `UT` + 32 hex digits.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TriggerSid(pub u128);

impl TriggerSid {
    pub const PREFIX: &'static str = "UT";

    /// Parses `UT` + 32 hex digits, either case.
    pub fn parse(s: &str) -> Result<Self, SidError> {
        let (kind, prefix) = ("UsageTriggerSid", Self::PREFIX);
        if s.len() != 34 {
            return Err(SidError::Length { kind, prefix, len: s.chars().count() });
        }
        let Some(hex) = s.strip_prefix(prefix) else {
            return Err(SidError::Prefix { kind, prefix });
        };
        if !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(SidError::Hex { kind, prefix });
        }
        u128::from_str_radix(hex, 16).map(Self).map_err(|_| SidError::Hex { kind, prefix })
    }
}

impl std::fmt::Display for TriggerSid {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "UT{:032x}", self.0)
    }
}

impl std::fmt::Debug for TriggerSid {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Display::fmt(self, f)
    }
}

impl Serialize for TriggerSid {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        if s.is_human_readable() {
            s.collect_str(self)
        } else {
            s.serialize_u128(self.0)
        }
    }
}

impl<'de> Deserialize<'de> for TriggerSid {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        if d.is_human_readable() {
            let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
            Self::parse(&s).map_err(serde::de::Error::custom)
        } else {
            u128::deserialize(d).map(Self)
        }
    }
}

/// What a trigger watches in its usage record.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TriggerBy {
    Count,
    Usage,
    Price,
}

impl TriggerBy {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Count => "count",
            Self::Usage => "usage",
            Self::Price => "price",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "count" => Self::Count,
            "usage" => Self::Usage,
            "price" => Self::Price,
            _ => return None,
        })
    }
}

/// How often a trigger may fire.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Recurring {
    Daily,
    Monthly,
    Yearly,
    /// Once ever, over all-time usage.
    Alltime,
    /// Not recurring: like `Alltime`, sent as `""`.
    None,
}

impl Recurring {
    /// Twilio's string (`""` for none).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Daily => "daily",
            Self::Monthly => "monthly",
            Self::Yearly => "yearly",
            Self::Alltime => "alltime",
            Self::None => "",
        }
    }

    /// Parses Twilio's string; `""` is none.
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "daily" => Self::Daily,
            "monthly" => Self::Monthly,
            "yearly" => Self::Yearly,
            "alltime" => Self::Alltime,
            "" => Self::None,
            _ => return None,
        })
    }

    /// The period holding `at`: its usage is what the trigger compares.
    pub fn window(self, at: Timestamp) -> Window {
        match self {
            Self::Daily => Granularity::Day.window_of(at),
            Self::Monthly => Granularity::Month.window_of(at),
            Self::Yearly => Granularity::Year.window_of(at),
            Self::Alltime | Self::None => (Timestamp(i64::MIN), Timestamp(i64::MAX)),
        }
    }

    /// The usage-record list resource (under `…/Usage/Records`) that shows the watched value.
    fn records_resource(self) -> &'static str {
        match self {
            Self::Daily => "Today",
            Self::Monthly => "ThisMonth",
            Self::Yearly => "Yearly",
            Self::Alltime | Self::None => "AllTime",
        }
    }
}

/// How the callback is requested: `GET` or `POST`, as for any URL Twilio calls.
pub use voxgate_protocol::event::HttpMethod as CallbackMethod;

/// A trigger to create (the REST `POST …/Usage/Triggers.json`, parsed). The sid comes from the
/// caller (derived from the creating event) so a replay creates the same trigger.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NewTrigger {
    pub sid: TriggerSid,
    pub tenant: AccountSid,
    pub usage_category: Category,
    pub trigger_by: TriggerBy,
    /// A positive decimal (`"100"`, `"2.5"`), or `+N` relative to the current value.
    pub trigger_value: String,
    pub recurring: Recurring,
    pub callback_url: String,
    pub callback_method: CallbackMethod,
    pub friendly_name: String,
}

/// A usage trigger and its firing state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Trigger {
    pub sid: TriggerSid,
    pub tenant: AccountSid,
    pub usage_category: Category,
    pub trigger_by: TriggerBy,
    /// The threshold in micro-units (a relative value already resolved).
    pub trigger_value_micros: u64,
    pub recurring: Recurring,
    pub callback_url: String,
    pub callback_method: CallbackMethod,
    pub friendly_name: String,
    pub date_created: Timestamp,
    pub date_updated: Timestamp,
    pub date_fired: Option<Timestamp>,
    /// The start of the period it last fired in.
    pub fired_period: Option<Timestamp>,
    /// The watched value at the last evaluation, in micro-units.
    pub current_value_micros: u64,
}

impl Trigger {
    /// The billing-log event that creates this trigger.
    pub fn created_event(&self) -> UsageTriggerCreated {
        UsageTriggerCreated {
            sid: self.sid.to_string(),
            usage_category: self.usage_category.as_str().to_owned(),
            trigger_by: self.trigger_by.as_str().to_owned(),
            trigger_value_micros: self.trigger_value_micros,
            recurring: self.recurring.as_str().to_owned(),
            callback_url: self.callback_url.clone(),
            callback_method: self.callback_method.as_str().to_owned(),
            friendly_name: self.friendly_name.clone(),
        }
    }

    /// The trigger a creation event describes (`None` when a field is not one voxgate knows).
    pub fn from_event(tenant: AccountSid, e: &UsageTriggerCreated, at: Timestamp) -> Option<Self> {
        Some(Self {
            sid: TriggerSid::parse(&e.sid).ok()?,
            tenant,
            usage_category: Category::parse(&e.usage_category)?,
            trigger_by: TriggerBy::parse(&e.trigger_by)?,
            trigger_value_micros: e.trigger_value_micros,
            recurring: Recurring::parse(&e.recurring)?,
            callback_url: e.callback_url.clone(),
            callback_method: CallbackMethod::parse(&e.callback_method)?,
            friendly_name: e.friendly_name.clone(),
            date_created: at,
            date_updated: at,
            date_fired: None,
            fired_period: None,
            current_value_micros: 0,
        })
    }

    /// `trigger_value` as Twilio writes it.
    pub fn trigger_value(&self) -> String {
        format_micros(self.trigger_value_micros)
    }

    /// `current_value` as Twilio writes it.
    pub fn current_value(&self) -> String {
        format_micros(self.current_value_micros)
    }

    /// `usage_record_uri`: the usage records the trigger watches.
    pub fn usage_record_uri(&self) -> String {
        format!(
            "/2010-04-01/Accounts/{}/Usage/Records/{}.json?Category={}",
            self.tenant,
            self.recurring.records_resource(),
            self.usage_category
        )
    }

    /// `uri`: the trigger itself.
    pub fn uri(&self) -> String {
        format!("/2010-04-01/Accounts/{}/Usage/Triggers/{}.json", self.tenant, self.sid)
    }
}

/// A trigger fired: everything its callback carries.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Firing {
    pub account_sid: AccountSid,
    pub usage_trigger_sid: TriggerSid,
    pub date_fired: Timestamp,
    pub recurring: Recurring,
    pub usage_category: Category,
    pub trigger_by: TriggerBy,
    pub trigger_value: String,
    pub current_value: String,
    pub trigger_value_micros: u64,
    pub current_value_micros: u64,
    pub usage_record_uri: String,
    /// `UT…-YYYY-MM-DD` (the period's first day) or `UT…-alltime`: unique per firing.
    pub idempotency_token: String,
    pub callback_url: String,
    pub callback_method: CallbackMethod,
    /// The start of the period it fired for (`i64::MIN` for all time).
    pub period_start: Timestamp,
}

impl Firing {
    /// The billing-log event that records this firing.
    pub fn event(&self) -> UsageTriggerFired {
        UsageTriggerFired {
            sid: self.usage_trigger_sid.to_string(),
            period_start: self.period_start,
            trigger_value_micros: self.trigger_value_micros,
            current_value_micros: self.current_value_micros,
            idempotency_token: self.idempotency_token.clone(),
            params: self.params().into_iter().map(|(k, v)| (k.to_owned(), v)).collect(),
            callback_url: self.callback_url.clone(),
            callback_method: self.callback_method.as_str().to_owned(),
        }
    }

    /// The callback's form parameters, in Twilio's names.
    pub fn params(&self) -> Vec<(&'static str, String)> {
        vec![
            ("AccountSid", self.account_sid.to_string()),
            ("UsageTriggerSid", self.usage_trigger_sid.to_string()),
            ("DateFired", self.date_fired.rfc2822()),
            ("Recurring", self.recurring.as_str().to_owned()),
            ("UsageCategory", self.usage_category.as_str().to_owned()),
            ("TriggerBy", self.trigger_by.as_str().to_owned()),
            ("TriggerValue", self.trigger_value.clone()),
            ("CurrentValue", self.current_value.clone()),
            ("UsageRecordUri", self.usage_record_uri.clone()),
            ("IdempotencyToken", self.idempotency_token.clone()),
        ]
    }
}

/// Why a trigger was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TriggerError {
    #[error("TriggerValue {0:?} must be a positive decimal number, or +N relative to the current value")]
    BadValue(String),
    #[error("CallbackUrl must be an http or https URL of at most 4000 characters")]
    BadUrl,
    #[error("FriendlyName must be at most {MAX_FRIENDLY_NAME} characters")]
    FriendlyName,
    #[error("totalprice has no count: trigger it by usage or price")]
    CountOfTotalprice,
    #[error("an account may have at most {MAX_TRIGGERS_PER_ACCOUNT} usage triggers")]
    TooMany,
    #[error("usage trigger {0} already exists")]
    Exists(TriggerSid),
    #[error("usage trigger {0} was not found")]
    NotFound(TriggerSid),
}

/// Budgets (`[billing.budgets]`): monthly caps on `totalprice`, micro-dollars.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Budgets {
    /// Every account's cap, unless it has its own; none = no cap.
    pub default_monthly_micros: Option<u64>,
    /// Caps by AccountSid.
    pub tenants: BTreeMap<String, u64>,
}

impl Budgets {
    pub fn validate(&self) -> Result<(), BillingConfigError> {
        for sid in self.tenants.keys() {
            AccountSid::parse(sid)
                .map_err(|e| BillingConfigError::Budget { field: format!("tenants.{sid}"), reason: e.to_string() })?;
        }
        Ok(())
    }
}

/// Every account's usage triggers, and the budgets.
#[derive(Debug, Clone, Default)]
pub struct TriggerBook {
    triggers: BTreeMap<(AccountSid, TriggerSid), Trigger>,
    default_budget: Option<u64>,
    budgets: BTreeMap<AccountSid, u64>,
    /// Accounts whose budget was recorded as exceeded: the latest such month and its budget.
    stopped: BTreeMap<AccountSid, (Month, u64)>,
}

fn valid_url(url: &str) -> bool {
    let rest = url.strip_prefix("https://").or_else(|| url.strip_prefix("http://"));
    rest.is_some_and(|r| !r.is_empty() && !r.starts_with('/'))
        && url.len() <= crate::tenancy::limits::URL
        && !url.chars().any(|c| c.is_whitespace() || c.is_control())
}

/// The watched value of a trigger over `window`, in micro-units.
fn value_micros(book: &UsageBook, tenant: AccountSid, c: Category, by: TriggerBy, window: Window) -> u64 {
    let r = book.record(tenant, true, c, window);
    match by {
        TriggerBy::Count => r.count.unwrap_or(0).saturating_mul(MICROS),
        TriggerBy::Usage if c == Category::Totalprice => r.usage,
        TriggerBy::Usage => r.usage.saturating_mul(MICROS),
        TriggerBy::Price => r.price_micros,
    }
}

impl TriggerBook {
    pub fn new() -> Self {
        Self::default()
    }

    /// A book with the configured budgets.
    pub fn with_budgets(budgets: &Budgets) -> Result<Self, BillingConfigError> {
        budgets.validate()?;
        let mut b = Self { default_budget: budgets.default_monthly_micros, ..Self::default() };
        for (sid, &cap) in &budgets.tenants {
            if let Ok(t) = AccountSid::parse(sid) {
                b.budgets.insert(t, cap);
            }
        }
        Ok(b)
    }

    /// Creates a trigger at `at` (a relative `+N` value counts from the usage at `at`).
    pub fn create(&mut self, new: NewTrigger, book: &UsageBook, at: Timestamp) -> Result<&Trigger, TriggerError> {
        let t = self.prepare(new, book, at)?;
        Ok(self.triggers.entry((t.tenant, t.sid)).or_insert(t))
    }

    /// Checks a trigger to create at `at` and resolves its threshold, without adding it: the
    /// caller records [`Trigger::created_event`] and then applies it.
    pub fn prepare(&self, new: NewTrigger, book: &UsageBook, at: Timestamp) -> Result<Trigger, TriggerError> {
        if self.triggers.contains_key(&(new.tenant, new.sid)) {
            return Err(TriggerError::Exists(new.sid));
        }
        if self.list(new.tenant).len() >= MAX_TRIGGERS_PER_ACCOUNT {
            return Err(TriggerError::TooMany);
        }
        if !valid_url(&new.callback_url) {
            return Err(TriggerError::BadUrl);
        }
        if new.friendly_name.chars().count() > MAX_FRIENDLY_NAME {
            return Err(TriggerError::FriendlyName);
        }
        if new.usage_category == Category::Totalprice && new.trigger_by == TriggerBy::Count {
            return Err(TriggerError::CountOfTotalprice);
        }
        let bad = || TriggerError::BadValue(new.trigger_value.clone());
        let (relative, digits) = match new.trigger_value.strip_prefix('+') {
            Some(d) => (true, d),
            None => (false, new.trigger_value.as_str()),
        };
        let v = parse_micros(digits).map_err(|_| bad())?;
        if v == 0 {
            return Err(bad());
        }
        let window = new.recurring.window(at);
        let current = value_micros(book, new.tenant, new.usage_category, new.trigger_by, window);
        let trigger = Trigger {
            sid: new.sid,
            tenant: new.tenant,
            usage_category: new.usage_category,
            trigger_by: new.trigger_by,
            trigger_value_micros: if relative { current.saturating_add(v) } else { v },
            recurring: new.recurring,
            callback_url: new.callback_url,
            callback_method: new.callback_method,
            friendly_name: new.friendly_name,
            date_created: at,
            date_updated: at,
            date_fired: None,
            fired_period: None,
            current_value_micros: current,
        };
        Ok(trigger)
    }

    /// Changes what Twilio lets change: the callback and the name.
    pub fn update(
        &mut self,
        tenant: AccountSid,
        sid: TriggerSid,
        callback_url: Option<String>,
        callback_method: Option<CallbackMethod>,
        friendly_name: Option<String>,
        at: Timestamp,
    ) -> Result<&Trigger, TriggerError> {
        if callback_url.as_deref().is_some_and(|u| !valid_url(u)) {
            return Err(TriggerError::BadUrl);
        }
        if friendly_name.as_deref().is_some_and(|n| n.chars().count() > MAX_FRIENDLY_NAME) {
            return Err(TriggerError::FriendlyName);
        }
        let t = self.triggers.get_mut(&(tenant, sid)).ok_or(TriggerError::NotFound(sid))?;
        if let Some(u) = callback_url {
            t.callback_url = u;
        }
        if let Some(m) = callback_method {
            t.callback_method = m;
        }
        if let Some(n) = friendly_name {
            t.friendly_name = n;
        }
        t.date_updated = at;
        Ok(t)
    }

    /// Checks an update of what Twilio lets change (the callback URL and the name).
    pub fn check_update(
        &self,
        tenant: AccountSid,
        sid: TriggerSid,
        callback_url: Option<&str>,
        friendly_name: Option<&str>,
    ) -> Result<(), TriggerError> {
        self.triggers.get(&(tenant, sid)).ok_or(TriggerError::NotFound(sid))?;
        if callback_url.is_some_and(|u| !valid_url(u)) {
            return Err(TriggerError::BadUrl);
        }
        if friendly_name.is_some_and(|n| n.chars().count() > MAX_FRIENDLY_NAME) {
            return Err(TriggerError::FriendlyName);
        }
        Ok(())
    }

    pub fn remove(&mut self, tenant: AccountSid, sid: TriggerSid) -> Result<Trigger, TriggerError> {
        self.triggers.remove(&(tenant, sid)).ok_or(TriggerError::NotFound(sid))
    }

    pub fn get(&self, tenant: AccountSid, sid: TriggerSid) -> Option<&Trigger> {
        self.triggers.get(&(tenant, sid))
    }

    /// The account's triggers, by sid.
    pub fn list(&self, tenant: AccountSid) -> Vec<&Trigger> {
        self.triggers.range((tenant, TriggerSid(0))..=(tenant, TriggerSid(u128::MAX))).map(|(_, t)| t).collect()
    }

    pub fn len(&self) -> usize {
        self.triggers.len()
    }

    pub fn is_empty(&self) -> bool {
        self.triggers.is_empty()
    }

    /// Evaluates, at `at`, the triggers the changes can move: those on a changed category of the
    /// changed account or any of its ancestors (whose records include it). Firings come in
    /// (account, sid) order.
    pub fn evaluate(&mut self, book: &UsageBook, changes: &[UsageChange], at: Timestamp) -> Vec<Firing> {
        self.evaluate_for(book, changes, at, |_| true)
    }

    /// [`TriggerBook::evaluate`] for the triggers of the accounts `owns` says (a billing node
    /// acts for its tenant shards; the others' triggers are left as they are).
    pub fn evaluate_for(
        &mut self,
        book: &UsageBook,
        changes: &[UsageChange],
        at: Timestamp,
        owns: impl Fn(AccountSid) -> bool,
    ) -> Vec<Firing> {
        let mut watched: BTreeSet<(AccountSid, Category)> = BTreeSet::new();
        for c in changes {
            for acct in book.self_and_ancestors(c.tenant) {
                watched.insert((acct, c.category));
            }
        }
        let accounts: BTreeSet<AccountSid> = watched.iter().map(|(a, _)| *a).filter(|a| owns(*a)).collect();
        let mut out = Vec::new();
        for acct in accounts {
            for (_, t) in self.triggers.range_mut((acct, TriggerSid(0))..=(acct, TriggerSid(u128::MAX))) {
                if watched.contains(&(acct, t.usage_category)) {
                    out.extend(check(t, book, at));
                }
            }
        }
        out
    }

    /// Evaluates every trigger at `at` (after creating triggers, or on a timer).
    pub fn evaluate_all(&mut self, book: &UsageBook, at: Timestamp) -> Vec<Firing> {
        self.evaluate_all_for(book, at, |_| true)
    }

    /// [`TriggerBook::evaluate_all`] for the triggers of the accounts `owns` says.
    pub fn evaluate_all_for(
        &mut self,
        book: &UsageBook,
        at: Timestamp,
        owns: impl Fn(AccountSid) -> bool,
    ) -> Vec<Firing> {
        self.triggers.iter_mut().filter(|((a, _), _)| owns(*a)).filter_map(|(_, t)| check(t, book, at)).collect()
    }

    /// Applies a billing-log event (trigger created, updated, deleted or fired; budget exceeded).
    /// Idempotent: a creation of an existing trigger, or a firing for a period already fired,
    /// changes nothing. Returns whether the event was about triggers or budgets.
    pub fn apply(&mut self, env: &Envelope) -> bool {
        let tenant = env.tenant;
        let sid = |s: &str| TriggerSid::parse(s).ok();
        match &env.payload {
            Event::UsageTriggerCreated(e) => {
                if let Some(t) = Trigger::from_event(tenant, e, env.occurred_at) {
                    self.triggers.entry((tenant, t.sid)).or_insert(t);
                }
            }
            Event::UsageTriggerUpdated(e) => {
                if let Some(t) = sid(&e.sid).and_then(|s| self.triggers.get_mut(&(tenant, s))) {
                    if let Some(u) = &e.callback_url {
                        t.callback_url = u.clone();
                    }
                    if let Some(m) = e.callback_method.as_deref().and_then(CallbackMethod::parse) {
                        t.callback_method = m;
                    }
                    if let Some(n) = &e.friendly_name {
                        t.friendly_name = n.clone();
                    }
                    t.date_updated = env.occurred_at;
                }
            }
            Event::UsageTriggerDeleted(e) => {
                if let Some(s) = sid(&e.sid) {
                    self.triggers.remove(&(tenant, s));
                }
            }
            Event::UsageTriggerFired(e) => {
                if let Some(t) = sid(&e.sid).and_then(|s| self.triggers.get_mut(&(tenant, s))) {
                    if t.fired_period.is_none_or(|p| p < e.period_start) {
                        t.fired_period = Some(e.period_start);
                        t.date_fired = Some(env.occurred_at);
                        t.current_value_micros = t.current_value_micros.max(e.current_value_micros);
                    }
                }
            }
            Event::BudgetExceeded(e) => {
                let month = Month::of(Timestamp(e.until.0.saturating_sub(1)));
                let stop = self.stopped.entry(tenant).or_insert((month, e.budget_micros));
                if stop.0 < month {
                    *stop = (month, e.budget_micros);
                }
            }
            _ => return false,
        }
        true
    }

    /// Undoes a firing that could not be recorded, so the next evaluation fires it again.
    pub fn forget_firing(&mut self, tenant: AccountSid, sid: TriggerSid, period_start: Timestamp) {
        if let Some(t) = self.triggers.get_mut(&(tenant, sid)) {
            if t.fired_period == Some(period_start) {
                t.fired_period = None;
            }
        }
    }

    /// Sets a trigger's `current_value` to its watched value at `at` (no firing).
    pub fn observe(&mut self, book: &UsageBook, tenant: AccountSid, sid: TriggerSid, at: Timestamp) {
        if let Some(t) = self.triggers.get_mut(&(tenant, sid)) {
            t.current_value_micros =
                value_micros(book, t.tenant, t.usage_category, t.trigger_by, t.recurring.window(at));
        }
    }

    /// Accounts, among `candidates` and their ancestors, whose own monthly budget is reached at
    /// `at` and not yet recorded as exceeded this month: (account, spent, budget), in account
    /// order. Record each as a [`BudgetExceeded`] event and apply it, so it is reported once a
    /// month.
    pub fn budgets_reached(
        &self,
        book: &UsageBook,
        candidates: &[AccountSid],
        at: Timestamp,
    ) -> Vec<(AccountSid, u64, u64)> {
        let month = Month::of(at);
        let accounts: BTreeSet<AccountSid> = candidates.iter().flat_map(|&c| book.self_and_ancestors(c)).collect();
        accounts
            .into_iter()
            .filter(|a| self.stopped.get(a).is_none_or(|(m, _)| *m < month))
            .filter_map(|a| {
                let cap = self.budget(a)?;
                let spent = book.record(a, true, Category::Totalprice, month.window()).price_micros;
                (spent >= cap).then_some((a, spent, cap))
            })
            .collect()
    }

    /// The event recording that an account spent `spent` of its `budget` in `month`.
    pub fn budget_event(month: Month, spent: u64, budget: u64) -> BudgetExceeded {
        BudgetExceeded { month: month.to_string(), until: month.end(), budget_micros: budget, spent_micros: spent }
    }

    /// Accounts stopped for their budget: the latest month and that month's budget.
    pub fn stopped(&self) -> impl Iterator<Item = (AccountSid, Month, u64)> + '_ {
        self.stopped.iter().map(|(a, (m, b))| (*a, *m, *b))
    }

    /// Sets (or, with `None`, removes) an account's own monthly budget.
    pub fn set_budget(&mut self, tenant: AccountSid, micros: Option<u64>) {
        match micros {
            Some(m) => {
                self.budgets.insert(tenant, m);
            }
            None => {
                self.budgets.remove(&tenant);
            }
        }
    }

    /// The account's monthly budget: its own, else the default.
    pub fn budget(&self, tenant: AccountSid) -> Option<u64> {
        self.budgets.get(&tenant).copied().or(self.default_budget)
    }

    /// Whether this month's `totalprice` (at `at`) has reached the tenant's budget, or any
    /// ancestor's (each counted with its subaccounts).
    pub fn over_budget(&self, book: &UsageBook, tenant: AccountSid, at: Timestamp) -> bool {
        let month = Month::of(at).window();
        book.self_and_ancestors(tenant).into_iter().any(|acct| {
            self.budget(acct)
                .is_some_and(|cap| book.record(acct, true, Category::Totalprice, month).price_micros >= cap)
        })
    }
}

fn check(t: &mut Trigger, book: &UsageBook, at: Timestamp) -> Option<Firing> {
    let window = t.recurring.window(at);
    let value = value_micros(book, t.tenant, t.usage_category, t.trigger_by, window);
    t.current_value_micros = value;
    if t.fired_period.is_some_and(|p| p >= window.0) || value < t.trigger_value_micros {
        return None;
    }
    t.fired_period = Some(window.0);
    t.date_fired = Some(at);
    let period = match t.recurring {
        Recurring::Alltime | Recurring::None => "alltime".to_owned(),
        _ => Date::of(window.0).to_string(),
    };
    Some(Firing {
        account_sid: t.tenant,
        usage_trigger_sid: t.sid,
        date_fired: at,
        recurring: t.recurring,
        usage_category: t.usage_category,
        trigger_by: t.trigger_by,
        trigger_value: t.trigger_value(),
        current_value: t.current_value(),
        trigger_value_micros: t.trigger_value_micros,
        current_value_micros: value,
        usage_record_uri: t.usage_record_uri(),
        idempotency_token: format!("{}-{period}", t.sid),
        callback_url: t.callback_url.clone(),
        callback_method: t.callback_method,
        period_start: window.0,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use voxgate_protocol::event::{
        CallReceived, CallStatus, CallStatusChanged, Direction, Event, StatusSource, TenantCreated, TenantStatus,
    };
    use voxgate_protocol::{CallSid, Envelope, EventId};

    const A: AccountSid = AccountSid::from_u128(0xa);
    const SUB: AccountSid = AccountSid::from_u128(0x5b);
    const UT1: TriggerSid = TriggerSid(1);

    fn at(date: &str, secs: i64) -> Timestamp {
        Timestamp(Date::parse(date).unwrap().start().0 + secs * 1_000_000)
    }

    /// A completed inbound call of `secs` seconds received at `t`.
    fn call(book: &mut UsageBook, tenant: AccountSid, n: u128, t: Timestamp, secs: u32) -> Vec<UsageChange> {
        let recv = Envelope {
            event_id: EventId(n << 4 | 1),
            tenant,
            call: Some(CallSid::from_u128(n)),
            occurred_at: t,
            payload: Event::CallReceived(CallReceived {
                from: "+15550001111".into(),
                to: "+14155550100".into(),
                direction: Direction::Inbound,
                status: CallStatus::Ringing,
                from_country: None,
                to_country: None,
                stream_session: String::new(),
            }),
        };
        let end = Envelope {
            event_id: EventId(n << 4 | 2),
            occurred_at: t.add_millis(i64::from(secs) * 1000),
            payload: Event::CallStatusChanged(CallStatusChanged {
                status: CallStatus::Completed,
                source: StatusSource::Callback,
                sequence: None,
                duration_secs: Some(secs),
            }),
            ..recv.clone()
        };
        let mut ch = book.apply(&recv);
        ch.extend(book.apply(&end));
        ch
    }

    fn new_trigger(category: Category, by: TriggerBy, value: &str, recurring: Recurring) -> NewTrigger {
        NewTrigger {
            sid: UT1,
            tenant: A,
            usage_category: category,
            trigger_by: by,
            trigger_value: value.into(),
            recurring,
            callback_url: "https://example.com/usage".into(),
            callback_method: CallbackMethod::Post,
            friendly_name: "minutes".into(),
        }
    }

    #[test]
    fn trigger_sid_parses_and_prints() {
        let s = TriggerSid::parse("UT0123456789ABCDEF0123456789abcdef").unwrap();
        assert_eq!(s.to_string(), "UT0123456789abcdef0123456789abcdef");
        assert!(TriggerSid::parse("AC0123456789abcdef0123456789abcdef").is_err());
        assert!(TriggerSid::parse("UT+123456789abcdef0123456789abcdef").is_err());
        assert!(TriggerSid::parse("UT12").is_err());
        assert_eq!(serde_json::to_string(&TriggerSid(0xab)).unwrap(), "\"UT000000000000000000000000000000ab\"");
    }

    #[test]
    fn monthly_trigger_fires_once_per_month_and_again_next_month() {
        let mut book = UsageBook::default();
        let mut tb = TriggerBook::new();
        tb.create(new_trigger(Category::Calls, TriggerBy::Usage, "10", Recurring::Monthly), &book, at("2025-01-01", 0))
            .unwrap();
        // 6 minutes: below.
        let ch = call(&mut book, A, 1, at("2025-01-05", 0), 360);
        assert!(tb.evaluate(&book, &ch, at("2025-01-05", 400)).is_empty());
        assert_eq!(tb.get(A, UT1).unwrap().current_value(), "6");
        // 12 minutes: crosses.
        let ch = call(&mut book, A, 2, at("2025-01-06", 0), 360);
        let fired = tb.evaluate(&book, &ch, at("2025-01-06", 400));
        assert_eq!(fired.len(), 1);
        let f = &fired[0];
        assert_eq!((f.current_value.as_str(), f.trigger_value.as_str()), ("12", "10"));
        assert_eq!(f.idempotency_token, "UT00000000000000000000000000000001-2025-01-01");
        assert_eq!(
            f.usage_record_uri,
            "/2010-04-01/Accounts/AC0000000000000000000000000000000a/Usage/Records/ThisMonth.json?Category=calls"
        );
        // More usage the same month: never again.
        let ch = call(&mut book, A, 3, at("2025-01-20", 0), 600);
        assert!(tb.evaluate(&book, &ch, at("2025-01-20", 700)).is_empty());
        assert!(tb.evaluate_all(&book, at("2025-01-31", 0)).is_empty());
        // February starts at zero and crosses again.
        let ch = call(&mut book, A, 4, at("2025-02-01", 0), 300);
        assert!(tb.evaluate(&book, &ch, at("2025-02-01", 400)).is_empty());
        let ch = call(&mut book, A, 5, at("2025-02-02", 0), 300);
        let fired = tb.evaluate(&book, &ch, at("2025-02-02", 400));
        assert_eq!(fired.len(), 1);
        assert_eq!(fired[0].idempotency_token, "UT00000000000000000000000000000001-2025-02-01");
        // Time going back to January (a replay) does not fire January again.
        assert!(tb.evaluate_all(&book, at("2025-01-25", 0)).is_empty());
        assert_eq!(tb.get(A, UT1).unwrap().date_fired, Some(at("2025-02-02", 400)));
    }

    #[test]
    fn daily_and_one_shot_triggers() {
        let mut book = UsageBook::default();
        let mut tb = TriggerBook::new();
        let mut daily = new_trigger(Category::CallsInbound, TriggerBy::Count, "2", Recurring::Daily);
        daily.sid = TriggerSid(2);
        tb.create(daily, &book, at("2025-01-01", 0)).unwrap();
        tb.create(
            new_trigger(Category::CallsInbound, TriggerBy::Count, "3", Recurring::None),
            &book,
            at("2025-01-01", 0),
        )
        .unwrap();
        let mut fired = Vec::new();
        for (n, d) in [(1, "2025-01-01"), (2, "2025-01-01"), (3, "2025-01-02"), (4, "2025-01-02"), (5, "2025-01-02")] {
            let ch = call(&mut book, A, n, at(d, n as i64 * 100), 30);
            fired.extend(tb.evaluate(&book, &ch, at(d, n as i64 * 100 + 50)));
        }
        let tokens: Vec<&str> = fired.iter().map(|f| f.idempotency_token.as_str()).collect();
        assert_eq!(
            tokens,
            vec![
                "UT00000000000000000000000000000002-2025-01-01",
                "UT00000000000000000000000000000001-alltime",
                "UT00000000000000000000000000000002-2025-01-02",
            ]
        );
        assert_eq!(fired[1].params()[3], ("Recurring", String::new()));
    }

    #[test]
    fn price_triggers_and_relative_values() {
        let mut book = UsageBook::default();
        let mut tb = TriggerBook::new();
        call(&mut book, A, 1, at("2025-01-05", 0), 60);
        // +0.01 dollars on top of the 0.0085 already spent this month.
        let t = tb
            .create(
                new_trigger(Category::Totalprice, TriggerBy::Price, "+0.01", Recurring::Monthly),
                &book,
                at("2025-01-05", 100),
            )
            .unwrap();
        assert_eq!((t.trigger_value(), t.current_value()), ("0.0185".to_string(), "0.0085".to_string()));
        let ch = call(&mut book, A, 2, at("2025-01-05", 200), 60);
        assert!(tb.evaluate(&book, &ch, at("2025-01-05", 300)).is_empty());
        let ch = call(&mut book, A, 3, at("2025-01-05", 400), 60);
        let fired = tb.evaluate(&book, &ch, at("2025-01-05", 500));
        assert_eq!(fired.len(), 1);
        assert_eq!(fired[0].current_value, "0.0255");
        let params = fired[0].params();
        let names: Vec<&str> = params.iter().map(|(k, _)| *k).collect();
        assert_eq!(
            names,
            [
                "AccountSid",
                "UsageTriggerSid",
                "DateFired",
                "Recurring",
                "UsageCategory",
                "TriggerBy",
                "TriggerValue",
                "CurrentValue",
                "UsageRecordUri",
                "IdempotencyToken"
            ]
        );
        assert_eq!(params[2].1, "Sun, 05 Jan 2025 00:08:20 +0000");
        assert_eq!(params[4].1, "totalprice");
        assert_eq!(params[5].1, "price");
        // Changes in other categories do not evaluate it.
        let unrelated = [UsageChange { tenant: A, category: Category::Recordings, day: Date::of(at("2025-01-05", 0)) }];
        tb.remove(A, UT1).unwrap();
        assert!(tb.evaluate(&book, &unrelated, at("2025-01-06", 0)).is_empty());
    }

    /// A book that knows SUB is a subaccount of A.
    fn book_with_subaccount() -> UsageBook {
        let mut book = UsageBook::default();
        book.apply(&Envelope {
            event_id: EventId(99),
            tenant: SUB,
            call: None,
            occurred_at: at("2025-01-01", 0),
            payload: Event::TenantCreated(TenantCreated {
                friendly_name: "sub".into(),
                parent: Some(A),
                sealed_auth_token: Default::default(),
                status: TenantStatus::Active,
            }),
        });
        book
    }

    #[test]
    fn subaccount_usage_fires_the_parents_trigger() {
        let mut book = book_with_subaccount();
        let mut tb = TriggerBook::new();
        tb.create(new_trigger(Category::Calls, TriggerBy::Count, "1", Recurring::Monthly), &book, at("2025-01-01", 0))
            .unwrap();
        let ch = call(&mut book, SUB, 1, at("2025-01-03", 0), 10);
        let fired = tb.evaluate(&book, &ch, at("2025-01-03", 20));
        assert_eq!(fired.len(), 1);
        assert_eq!(fired[0].account_sid, A);
    }

    #[test]
    fn creation_is_checked() {
        let book = UsageBook::default();
        let mut tb = TriggerBook::new();
        let now = at("2025-01-01", 0);
        let mut try_create = |f: &dyn Fn(&mut NewTrigger)| {
            let mut n = new_trigger(Category::Calls, TriggerBy::Usage, "10", Recurring::Monthly);
            f(&mut n);
            tb.create(n, &book, now).map(|t| t.sid)
        };
        for v in ["0", "", "-5", "abc", "1.0000001", " 30", "+"] {
            assert!(matches!(try_create(&|n| n.trigger_value = v.into()), Err(TriggerError::BadValue(_))), "{v:?}");
        }
        for u in ["", "ftp://x", "https://", "https:///x", "https://a b", "example.com"] {
            assert_eq!(try_create(&|n| n.callback_url = u.into()), Err(TriggerError::BadUrl), "{u:?}");
        }
        assert_eq!(try_create(&|n| n.friendly_name = "x".repeat(65)), Err(TriggerError::FriendlyName));
        assert_eq!(
            try_create(&|n| {
                n.usage_category = Category::Totalprice;
                n.trigger_by = TriggerBy::Count
            }),
            Err(TriggerError::CountOfTotalprice)
        );
        assert_eq!(try_create(&|_| {}), Ok(UT1));
        assert_eq!(try_create(&|_| {}), Err(TriggerError::Exists(UT1)));
        let t =
            tb.update(A, UT1, None, Some(CallbackMethod::Get), Some("renamed".into()), at("2025-01-02", 0)).unwrap();
        assert_eq!((t.callback_method, t.friendly_name.as_str()), (CallbackMethod::Get, "renamed"));
        assert!(tb.update(A, TriggerSid(7), None, None, None, now).is_err());
        assert_eq!(tb.list(A).len(), 1);
        assert!(tb.list(SUB).is_empty());
        assert_eq!(Recurring::parse(""), Some(Recurring::None));
        assert_eq!(CallbackMethod::parse("post"), Some(CallbackMethod::Post));
        assert_eq!(TriggerBy::parse("price"), Some(TriggerBy::Price));
    }

    #[test]
    fn budgets_cap_the_month_up_the_tree() {
        let mut book = book_with_subaccount();
        let budgets = Budgets { default_monthly_micros: None, tenants: BTreeMap::from([(A.to_string(), 30_000)]) };
        let mut tb = TriggerBook::with_budgets(&budgets).unwrap();
        call(&mut book, A, 1, at("2025-01-03", 0), 120);
        assert!(!tb.over_budget(&book, A, at("2025-01-03", 500)));
        // The subaccount's 2 minutes bring the parent to 0.034 ≥ 0.03: both are over.
        call(&mut book, SUB, 2, at("2025-01-04", 0), 120);
        assert!(tb.over_budget(&book, A, at("2025-01-04", 500)));
        assert!(tb.over_budget(&book, SUB, at("2025-01-04", 500)));
        // A new month starts under budget.
        assert!(!tb.over_budget(&book, A, at("2025-02-01", 0)));
        // The subaccount's own budget.
        tb.set_budget(A, None);
        tb.set_budget(SUB, Some(17_000));
        assert!(tb.over_budget(&book, SUB, at("2025-01-04", 500)));
        assert!(!tb.over_budget(&book, A, at("2025-01-04", 500)));
        let bad = Budgets { default_monthly_micros: None, tenants: BTreeMap::from([("nope".to_string(), 1)]) };
        assert!(TriggerBook::with_budgets(&bad).is_err());
    }

    fn billing_env(n: u128, tenant: AccountSid, t: Timestamp, payload: Event) -> Envelope {
        Envelope { event_id: EventId(n), tenant, call: None, occurred_at: t, payload }
    }

    #[test]
    fn events_rebuild_triggers_and_firings_idempotently() {
        let book = UsageBook::default();
        let live = TriggerBook::new();
        let t0 = at("2025-01-01", 0);
        let prepared =
            live.prepare(new_trigger(Category::Calls, TriggerBy::Count, "+2", Recurring::Monthly), &book, t0).unwrap();
        assert!(live.get(A, UT1).is_none(), "prepare adds nothing");
        let created = billing_env(1, A, t0, Event::UsageTriggerCreated(prepared.created_event()));
        let renamed = billing_env(
            2,
            A,
            at("2025-01-02", 0),
            Event::UsageTriggerUpdated(voxgate_protocol::event::UsageTriggerUpdated {
                sid: UT1.to_string(),
                callback_url: None,
                callback_method: Some("GET".into()),
                friendly_name: Some("renamed".into()),
            }),
        );
        let mut book = book;
        let ch = call(&mut book, A, 1, at("2025-01-05", 0), 30);
        let mut tb = TriggerBook::new();
        for e in [&created, &renamed, &created] {
            assert!(tb.apply(e));
        }
        assert!(tb.evaluate(&book, &ch, at("2025-01-05", 100)).is_empty(), "1 call < 2");
        let ch = call(&mut book, A, 2, at("2025-01-06", 0), 30);
        let fired = tb.evaluate(&book, &ch, at("2025-01-06", 100));
        assert_eq!(fired.len(), 1);
        assert_eq!(fired[0].callback_method, CallbackMethod::Get);
        let fired_env = billing_env(3, A, at("2025-01-06", 100), Event::UsageTriggerFired(fired[0].event()));

        // Another book rebuilt from the events (twice over) knows the firing: nothing fires again.
        let mut rebuilt = TriggerBook::new();
        for e in [&created, &fired_env, &renamed, &created, &fired_env] {
            rebuilt.apply(e);
        }
        let t = rebuilt.get(A, UT1).unwrap();
        assert_eq!((t.friendly_name.as_str(), t.trigger_value_micros), ("renamed", 2 * MICROS));
        assert_eq!(t.date_fired, Some(at("2025-01-06", 100)));
        assert!(rebuilt.evaluate_all(&book, at("2025-01-20", 0)).is_empty());
        // Next month it fires again.
        call(&mut book, A, 3, at("2025-02-01", 0), 30);
        call(&mut book, A, 4, at("2025-02-01", 60), 30);
        assert_eq!(rebuilt.evaluate_all(&book, at("2025-02-02", 0)).len(), 1);
        let deleted = billing_env(
            4,
            A,
            at("2025-02-03", 0),
            Event::UsageTriggerDeleted(voxgate_protocol::event::UsageTriggerDeleted { sid: UT1.to_string() }),
        );
        rebuilt.apply(&deleted);
        assert!(rebuilt.is_empty());
    }

    #[test]
    fn a_budget_is_reported_reached_once_a_month() {
        let mut book = book_with_subaccount();
        let budgets = Budgets { default_monthly_micros: None, tenants: BTreeMap::from([(A.to_string(), 30_000)]) };
        let mut tb = TriggerBook::with_budgets(&budgets).unwrap();
        call(&mut book, A, 1, at("2025-01-03", 0), 120);
        assert!(tb.budgets_reached(&book, &[A], at("2025-01-03", 500)).is_empty());
        // The subaccount's calls reach the parent's budget: the parent is reported, not the sub.
        call(&mut book, SUB, 2, at("2025-01-04", 0), 120);
        let now = at("2025-01-04", 500);
        let reached = tb.budgets_reached(&book, &[SUB], now);
        assert_eq!(reached, vec![(A, 34_000, 30_000)]);
        let ev = TriggerBook::budget_event(Month::of(now), 34_000, 30_000);
        assert_eq!((ev.month.as_str(), ev.until), ("2025-01", Month::of(now).end()));
        tb.apply(&billing_env(9, A, now, Event::BudgetExceeded(ev)));
        assert!(tb.budgets_reached(&book, &[SUB, A], at("2025-01-05", 0)).is_empty(), "once a month");
        assert_eq!(tb.stopped().collect::<Vec<_>>(), vec![(A, Month::of(now), 30_000)]);
        // February: spent again, reported again.
        call(&mut book, A, 3, at("2025-02-02", 0), 300);
        assert_eq!(tb.budgets_reached(&book, &[A], at("2025-02-02", 400)).len(), 1);
    }
}
