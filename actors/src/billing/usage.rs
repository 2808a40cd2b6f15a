//! The usage book: every tenant's metered usage per category per UTC day, and the usage records,
//! roll-ups and invoices priced from it.
//!
//! What is metered, and how (units are Twilio's):
//!
//! - `calls-inbound` / `calls-outbound`: one count per call that ended `completed`, billed in
//!   whole minutes rounded up per call (61 s is 2 minutes). The seconds are Twilio's
//!   `CallDuration` from the earliest terminal status that carries one; failing that, the span
//!   from `CallReceived` to the earliest terminal status (rounded up to the second). When a
//!   terminal status with a duration turns up after voxgate's own (no duration), the call is
//!   re-rated with it: still one call. The authoritative terminal status decides whether the call
//!   is billable at all (busy, no-answer, failed, canceled are not). `outbound-api` and
//!   `outbound-dial` are outbound; `inbound`, `other`, and calls whose `CallReceived` was never
//!   seen are inbound.
//! - `transcriptions`: the count is transcribed speech segments (rejected ones too: the model
//!   ran); the usage is minutes of speech (`end_ms - start_ms` of every segment), summed per call
//!   and rounded up to the whole minute per call, like call minutes, so many short utterances are
//!   not each charged a minute. A segment is counted once (keyed by its speech segment's event
//!   id), however many transcripts of it arrive.
//! - `recordings`: always zero for now (voxgate does not record), but listed and priced.
//! - `phonenumbers-local`: one count per number per calendar month the tenant holds it at any
//!   instant, charged on the day it was first held that month (the assignment day, then the 1st
//!   of each following month); usage is in numbers. A month is only charged once the book's time
//!   (the latest event time applied, or [`UsageBook::advance`]) has reached it.
//!
//! Everything of a call lands on the UTC day the call started (its `CallReceived`, else the
//! earliest event of the call seen). Per-call state makes application idempotent (a replayed
//! event changes nothing) and order-independent: each call's contribution is recomputed from
//! its state and only the difference is filed.
//!
//! Prices are not stored: they are computed when asked from the minutes and the [`PriceTable`],
//! so a price change re-rates history. Volume tiers price each tenant's calendar month; a day's
//! price is its marginal share: the price of the month's minutes up to the end of that day minus
//! the price up to the end of the day before, so the days of a month add up to the month's price
//! exactly, to the micro-dollar. Each account is priced on its own volume; a parent's records
//! with subaccounts are the sums of each account's priced usage.

use std::collections::{BTreeMap, BTreeSet};

use serde::Serialize;
use voxgate_protocol::event::{CallStatus, Direction, Event};
use voxgate_protocol::{AccountSid, CallSid, Envelope, EventId, Timestamp};

use super::periods::{
    day_of, day_start, month_first_day, month_of_day, split, window_dates, Date, Month, Period, PeriodError, Window,
};
use super::prices::{tier_lines, tiered_price, PriceError, PriceTable, Tier, TierLine};
use super::{format_micros, Category};

/// Something a tenant's usage changed in: a metered category or a roll-up, on one UTC day.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct UsageChange {
    pub tenant: AccountSid,
    pub category: Category,
    pub day: Date,
}

/// One usage record, in Twilio's units (see [`Category::count_unit`] and
/// [`Category::usage_unit`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct UsageRecord {
    /// The account asked about (with its subaccounts' usage when they were included).
    pub account_sid: AccountSid,
    pub category: Category,
    pub description: &'static str,
    /// `None` for `totalprice`.
    pub count: Option<u64>,
    pub count_unit: &'static str,
    /// Minutes, numbers, or (for `totalprice`, `usage_unit` `usd`) micro-dollars.
    pub usage: u64,
    pub usage_unit: &'static str,
    pub price_micros: u64,
    /// Always `usd`.
    pub price_unit: &'static str,
    /// Inclusive UTC dates.
    pub start_date: Date,
    pub end_date: Date,
}

impl UsageRecord {
    /// `count` as Twilio writes it (`null` for `totalprice`).
    pub fn count_string(&self) -> Option<String> {
        self.count.map(|c| c.to_string())
    }

    /// `usage` as Twilio writes it: an integer, or a decimal amount for `totalprice`.
    pub fn usage_string(&self) -> String {
        if self.category == Category::Totalprice {
            format_micros(self.usage)
        } else {
            self.usage.to_string()
        }
    }

    /// `price` as Twilio writes it (`"0.0255"`).
    pub fn price_string(&self) -> String {
        format_micros(self.price_micros)
    }
}

/// One metered category's line on a monthly invoice.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct InvoiceLine {
    pub category: Category,
    pub description: &'static str,
    pub count: u64,
    /// Minutes, or numbers for `phonenumbers-local`.
    pub usage: u64,
    pub usage_unit: &'static str,
    /// How the minutes split over the volume tiers (empty for numbers and for no minutes).
    pub tiers: Vec<TierLine>,
    pub price_micros: u64,
}

/// A tenant's own usage for one calendar month, priced (subaccounts are invoiced separately).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Invoice {
    pub account_sid: AccountSid,
    pub month: Month,
    /// One line per metered category, zero lines included.
    pub lines: Vec<InvoiceLine>,
    pub total_micros: u64,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct DayUsage {
    count: u64,
    minutes: u64,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct Totals {
    count: u64,
    usage: u64,
    price: u64,
}

impl Totals {
    fn add(&mut self, o: Totals) {
        self.count = self.count.saturating_add(o.count);
        self.usage = self.usage.saturating_add(o.usage);
        self.price = self.price.saturating_add(o.price);
    }
}

/// A number's assign/release events for one tenant, by (time, event id): the holding periods
/// are derived from them in time order, so the order they were applied in does not matter.
#[derive(Debug, Clone, Default)]
struct Holding {
    /// `true` = assigned, `false` = released; `None` id = held without an event (config file).
    events: BTreeMap<(Timestamp, Option<EventId>), bool>,
}

impl Holding {
    /// `[start, end)` periods, `end` `None` while held. An assign while held and a release while
    /// not held change nothing.
    fn intervals(&self) -> Vec<(Timestamp, Option<Timestamp>)> {
        let mut out: Vec<(Timestamp, Option<Timestamp>)> = Vec::new();
        for (&(at, _), &assign) in &self.events {
            let open = out.last().is_some_and(|(_, e)| e.is_none());
            match (assign, open) {
                (true, false) => out.push((at, None)),
                (false, true) => {
                    if let Some(last) = out.last_mut() {
                        last.1 = Some(at);
                    }
                }
                _ => {}
            }
        }
        out
    }

    fn held(&self) -> bool {
        self.intervals().last().is_some_and(|(_, e)| e.is_none())
    }

    /// Charged months (index → day charged) within `months`, as of `as_of`.
    fn charges(&self, as_of: Option<Timestamp>, months: (i64, i64)) -> BTreeMap<i64, i64> {
        let mut out: BTreeMap<i64, i64> = BTreeMap::new();
        let Some(as_of) = as_of else {
            return out;
        };
        for (s, e) in self.intervals() {
            if s > as_of {
                continue;
            }
            let last = match e {
                Some(e) if e <= s => continue,
                Some(e) => Timestamp(e.0 - 1).min(as_of),
                None => as_of,
            };
            let first_m = month_of_day(day_of(s)).max(months.0);
            let last_m = month_of_day(day_of(last)).min(months.1);
            let mut m = first_m;
            while m <= last_m {
                let day = day_of(s).max(month_first_day(m));
                out.entry(m).and_modify(|d| *d = (*d).min(day)).or_insert(day);
                m += 1;
            }
        }
        out
    }
}

#[derive(Debug, Clone, Default)]
struct Account {
    parent: Option<AccountSid>,
    created_at: Option<Timestamp>,
    /// Metered per-minute categories (and their counts) by (category, day).
    days: BTreeMap<(Category, i64), DayUsage>,
    /// Numbers by E.164 string.
    numbers: BTreeMap<String, Holding>,
}

/// One call's contribution to one (tenant, category, day).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Filed {
    tenant: AccountSid,
    category: Category,
    day: i64,
    count: u64,
    minutes: u64,
}

type Mark = (Timestamp, EventId);

#[derive(Debug, Clone)]
struct CallState {
    /// The tenant of the call's earliest event, used until its `CallReceived` is seen.
    first: (Mark, AccountSid),
    received: Option<(Mark, Direction, AccountSid)>,
    /// Terminal statuses with the tenant that recorded each and the duration it reported; only
    /// the call's own tenant's count (a callback signed by another tenant never bills this call).
    /// The earliest few are kept.
    terminals: Vec<(Mark, AccountSid, CallStatus, Option<u32>)>,
    last_seen: Timestamp,
    /// Speech segments transcribed: segment event id → milliseconds.
    segments: BTreeMap<EventId, u64>,
    filed: Vec<Filed>,
}

/// Terminal statuses kept per call (a call has one or two; the rest would be noise).
const MAX_TERMINALS: usize = 8;

/// Seconds a reported `CallDuration` may exceed what voxgate observed (Twilio rounds up; clocks
/// and delivery differ a little).
pub const DURATION_GRACE_SECS: u32 = 2;

/// From `received` to `ended` in whole seconds, rounded up (0 when `ended` is earlier).
pub fn observed_secs(received: Timestamp, ended: Timestamp) -> u32 {
    u32::try_from(ceil_div(ended.micros_since(received).max(0) as u64, 1_000_000)).unwrap_or(u32::MAX)
}

/// The longest duration believed for a call seen from `received` to `ended`: what voxgate
/// observed, or the maximum call duration when that is shorter, plus [`DURATION_GRACE_SECS`].
pub fn duration_bound_secs(received: Timestamp, ended: Timestamp, max_call_secs: Option<u32>) -> u32 {
    let observed = observed_secs(received, ended);
    max_call_secs.map_or(observed, |m| observed.min(m)).saturating_add(DURATION_GRACE_SECS)
}

impl CallState {
    fn desired(&self) -> Vec<Filed> {
        let (tenant, start) = match &self.received {
            Some(((at, _), _, t)) => (*t, *at),
            None => (self.first.1, self.first.0 .0),
        };
        let day = day_of(start);
        let mut out = Vec::new();
        let own = || self.terminals.iter().filter(|(_, t, _, _)| *t == tenant);
        // The earliest terminal status that carries a duration decides; else the earliest one.
        let authority = own()
            .filter(|(_, _, _, d)| d.is_some())
            .min_by_key(|(m, _, _, _)| *m)
            .or_else(|| own().min_by_key(|(m, _, _, _)| *m))
            .map(|((at, _), _, st, d)| (*at, *st, *d));
        if let Some((ended, CallStatus::Completed, secs)) = authority {
            let secs = match (secs, &self.received) {
                // Never more than voxgate itself saw of the call.
                (Some(s), Some(((at, _), _, _))) => u64::from(s.min(duration_bound_secs(*at, ended, None))),
                (Some(s), None) => u64::from(s),
                (None, Some(((at, _), _, _))) => u64::from(observed_secs(*at, ended)),
                (None, None) => 0,
            };
            let category = match self.received.as_ref().map(|r| r.1) {
                Some(Direction::OutboundApi | Direction::OutboundDial) => Category::CallsOutbound,
                _ => Category::CallsInbound,
            };
            out.push(Filed { tenant, category, day, count: 1, minutes: ceil_div(secs, 60) });
        }
        if !self.segments.is_empty() {
            let ms = self.segments.values().fold(0u64, |a, &b| a.saturating_add(b));
            out.push(Filed {
                tenant,
                category: Category::Transcriptions,
                day,
                count: self.segments.len() as u64,
                minutes: ceil_div(ms, 60_000),
            });
        }
        out
    }
}

fn ceil_div(a: u64, b: u64) -> u64 {
    a / b + u64::from(!a.is_multiple_of(b))
}

/// What a call event tells the book.
enum CallInput {
    Received(Direction),
    Terminal(CallStatus, Option<u32>),
    Transcript { segment: EventId, ms: u64 },
}

/// Every tenant's metered usage; see the module docs for what is metered and how it is priced.
#[derive(Debug, Clone)]
pub struct UsageBook {
    prices: PriceTable,
    rates: BTreeMap<Category, Vec<Tier>>,
    accounts: BTreeMap<AccountSid, Account>,
    children: BTreeMap<AccountSid, BTreeSet<AccountSid>>,
    calls: BTreeMap<CallSid, CallState>,
    as_of: Option<Timestamp>,
}

impl Default for UsageBook {
    fn default() -> Self {
        Self::with_prices(PriceTable::default())
    }
}

fn push_changes(changes: &mut BTreeSet<UsageChange>, tenant: AccountSid, category: Category, day: i64) {
    let day = Date::from_day(day);
    changes.insert(UsageChange { tenant, category, day });
    for &c in category.rollups() {
        changes.insert(UsageChange { tenant, category: c, day });
    }
}

impl UsageBook {
    /// An empty book pricing with `prices` (checked).
    pub fn new(prices: PriceTable) -> Result<Self, PriceError> {
        prices.validate()?;
        Ok(Self::with_prices(prices))
    }

    fn with_prices(prices: PriceTable) -> Self {
        let rates =
            Category::METERED.into_iter().filter(|c| c.per_minute()).map(|c| (c, prices.tiers_for(c))).collect();
        Self {
            prices,
            rates,
            accounts: BTreeMap::new(),
            children: BTreeMap::new(),
            calls: BTreeMap::new(),
            as_of: None,
        }
    }

    pub fn prices(&self) -> &PriceTable {
        &self.prices
    }

    /// The book's time: the latest event time applied or time advanced to.
    pub fn as_of(&self) -> Option<Timestamp> {
        self.as_of
    }

    /// Calls the book remembers (for idempotency and re-rating); see [`UsageBook::prune_calls`].
    pub fn tracked_calls(&self) -> usize {
        self.calls.len()
    }

    /// Folds one event in and says what changed. Reads `CallReceived`, terminal
    /// `CallStatusChanged`, `Transcript`, `NumberAssigned`, `NumberReleased` and `TenantCreated`;
    /// anything else (and an event already applied) changes nothing and returns nothing. The
    /// event's time also advances the book's time (see [`UsageBook::advance`]).
    pub fn apply(&mut self, env: &Envelope) -> Vec<UsageChange> {
        let input = match &env.payload {
            Event::CallReceived(r) => Some(CallInput::Received(r.direction)),
            Event::CallStatusChanged(s) if s.status.is_terminal() => {
                Some(CallInput::Terminal(s.status, s.duration_secs))
            }
            Event::Transcript(t) => {
                Some(CallInput::Transcript { segment: t.segment_event, ms: t.end_ms.saturating_sub(t.start_ms) })
            }
            Event::NumberAssigned(_) | Event::NumberReleased(_) | Event::TenantCreated(_) => None,
            _ => return Vec::new(),
        };
        let mut changes = BTreeSet::new();
        self.advance_into(env.occurred_at, &mut changes);
        match (&env.payload, input) {
            (_, Some(input)) => self.apply_call(env, input, &mut changes),
            (Event::NumberAssigned(n), None) => {
                self.number_event(env.tenant, &n.number, Some(env.event_id), env.occurred_at, true, &mut changes)
            }
            (Event::NumberReleased(n), None) => {
                self.number_event(env.tenant, &n.number, Some(env.event_id), env.occurred_at, false, &mut changes)
            }
            (Event::TenantCreated(t), None) => self.tenant_created(env.tenant, t.parent, env.occurred_at),
            _ => {}
        }
        changes.into_iter().collect()
    }

    /// Moves the book's time forward to `now` (never back), charging the numbers held into every
    /// month it enters. The stage calls it on a timer so a month's rental shows from its 1st even
    /// when no event arrives.
    pub fn advance(&mut self, now: Timestamp) -> Vec<UsageChange> {
        let mut changes = BTreeSet::new();
        self.advance_into(now, &mut changes);
        changes.into_iter().collect()
    }

    /// A number held since `since` without an event: a config-file tenant's numbers. Idempotent
    /// while the number is held.
    pub fn hold_number(&mut self, tenant: AccountSid, number: &str, since: Timestamp) -> Vec<UsageChange> {
        let mut changes = BTreeSet::new();
        self.advance_into(since, &mut changes);
        self.number_event(tenant, number, None, since, true, &mut changes);
        changes.into_iter().collect()
    }

    /// Forgets calls with no event since before `before`; returns how many. A duplicate of a
    /// forgotten call's event would be counted again, so prune only past the replay horizon.
    pub fn prune_calls(&mut self, before: Timestamp) -> usize {
        let n = self.calls.len();
        self.calls.retain(|_, c| c.last_seen >= before);
        n - self.calls.len()
    }

    /// Whose call this is and when its webhook was received, once its `CallReceived` is in the
    /// book (for calls the book still remembers; see [`UsageBook::prune_calls`]).
    pub fn call_owner(&self, call: CallSid) -> Option<(AccountSid, Timestamp)> {
        self.calls.get(&call).and_then(|c| c.received.as_ref()).map(|((at, _), _, t)| (*t, *at))
    }

    /// Whether the call's own tenant has reported it ended.
    pub fn call_ended(&self, call: CallSid) -> bool {
        self.calls.get(&call).is_some_and(|c| {
            let owner = c.received.as_ref().map_or(c.first.1, |r| r.2);
            c.terminals.iter().any(|t| t.1 == owner)
        })
    }

    /// The tenant's parent account, for a subaccount.
    pub fn parent(&self, tenant: AccountSid) -> Option<AccountSid> {
        self.accounts.get(&tenant).and_then(|a| a.parent)
    }

    /// The tenant's subaccounts (and theirs), not the tenant itself.
    pub fn subaccounts(&self, tenant: AccountSid) -> Vec<AccountSid> {
        let mut out = Vec::new();
        let mut seen = BTreeSet::from([tenant]);
        let mut queue = vec![tenant];
        while let Some(t) = queue.pop() {
            for &c in self.children.get(&t).into_iter().flatten() {
                if seen.insert(c) {
                    out.push(c);
                    queue.push(c);
                }
            }
        }
        out.sort();
        out
    }

    /// The tenant, then its parent, then its parent's parent…
    pub fn self_and_ancestors(&self, tenant: AccountSid) -> Vec<AccountSid> {
        let mut out = vec![tenant];
        let mut cur = tenant;
        while let Some(p) = self.parent(cur) {
            if out.contains(&p) || out.len() > 16 {
                break;
            }
            out.push(p);
            cur = p;
        }
        out
    }

    /// One record per category over `window` (taken by whole UTC days), for the tenant alone or
    /// with its subaccounts, in [`Category::ALL`] order, zero records included.
    pub fn records(&self, tenant: AccountSid, include_subaccounts: bool, window: Window) -> Vec<UsageRecord> {
        let totals = self.totals(tenant, include_subaccounts, window);
        let (start_date, end_date) = window_dates(window);
        Category::ALL
            .into_iter()
            .map(|category| {
                let t = rollup(&totals, category);
                UsageRecord {
                    account_sid: tenant,
                    category,
                    description: category.description(),
                    count: (category != Category::Totalprice).then_some(t.count),
                    count_unit: category.count_unit(),
                    usage: t.usage,
                    usage_unit: category.usage_unit(),
                    price_micros: t.price,
                    price_unit: "usd",
                    start_date,
                    end_date,
                }
            })
            .collect()
    }

    /// One category's record over `window`.
    pub fn record(
        &self,
        tenant: AccountSid,
        include_subaccounts: bool,
        category: Category,
        window: Window,
    ) -> UsageRecord {
        let mut all = self.records(tenant, include_subaccounts, window);
        let i = Category::ALL.iter().position(|&c| c == category).unwrap_or(0);
        all.swap_remove(i)
    }

    /// A usage-record list: the period resolved at `now` and split by its granularity, records per
    /// sub-period in order. `AllTime` and `Yearly` start at the tenant's first activity (creation,
    /// first usage or first number), not 1970.
    pub fn report(
        &self,
        tenant: AccountSid,
        include_subaccounts: bool,
        period: &Period,
        now: Timestamp,
    ) -> Result<Vec<UsageRecord>, PeriodError> {
        let mut w = period.resolve(now);
        if matches!(period, Period::AllTime | Period::Yearly) {
            let today = day_start(day_of(now));
            let first = self.first_activity(tenant, include_subaccounts).map_or(today, |t| day_start(day_of(t)));
            w.0 = w.0.max(first.min(today));
        }
        let windows = match period.granularity() {
            Some(g) => split(w, g)?,
            None => vec![w],
        };
        Ok(windows.into_iter().flat_map(|w| self.records(tenant, include_subaccounts, w)).collect())
    }

    /// The earliest of the tenant's (and its subaccounts') creation, usage and numbers.
    pub fn first_activity(&self, tenant: AccountSid, include_subaccounts: bool) -> Option<Timestamp> {
        let mut first: Option<Timestamp> = None;
        let mut see = |t: Timestamp| first = Some(first.map_or(t, |f| f.min(t)));
        for acct in self.accounts_of(tenant, include_subaccounts) {
            let Some(a) = self.accounts.get(&acct) else { continue };
            if let Some(c) = a.created_at {
                see(c);
            }
            for c in Category::METERED {
                if let Some((&(_, day), _)) = a.days.range((c, i64::MIN)..=(c, i64::MAX)).next() {
                    see(day_start(day));
                }
            }
            for h in a.numbers.values() {
                if let Some(&(s, _)) = h.events.keys().next() {
                    see(s);
                }
            }
        }
        first
    }

    /// The tenant's own usage in `month`, priced with the month's volume tiers.
    pub fn invoice(&self, tenant: AccountSid, month: Month) -> Invoice {
        let (d0, d1) = (month.first_date().day_number(), month.last_date().day_number());
        let acct = self.accounts.get(&tenant);
        let mut lines = Vec::with_capacity(Category::METERED.len());
        for category in Category::METERED {
            let mut line = InvoiceLine {
                category,
                description: category.description(),
                count: 0,
                usage: 0,
                usage_unit: category.usage_unit(),
                tiers: Vec::new(),
                price_micros: 0,
            };
            if let Some(a) = acct {
                if category.per_minute() {
                    for (_, u) in a.days.range((category, d0)..=(category, d1)) {
                        line.count = line.count.saturating_add(u.count);
                        line.usage = line.usage.saturating_add(u.minutes);
                    }
                    let tiers = self.rates.get(&category).map_or(&[][..], |v| v.as_slice());
                    line.tiers = tier_lines(tiers, line.usage);
                    line.price_micros = tiered_price(tiers, line.usage);
                } else {
                    let t = self.number_totals(a, d0, d1);
                    (line.count, line.usage, line.price_micros) = (t.count, t.usage, t.price);
                }
            }
            lines.push(line);
        }
        let total_micros = lines.iter().fold(0u64, |a, l| a.saturating_add(l.price_micros));
        Invoice { account_sid: tenant, month, lines, total_micros }
    }

    fn accounts_of(&self, tenant: AccountSid, include_subaccounts: bool) -> Vec<AccountSid> {
        let mut v = vec![tenant];
        if include_subaccounts {
            v.extend(self.subaccounts(tenant));
        }
        v
    }

    /// Metered totals over the whole UTC days `window` touches.
    fn totals(&self, tenant: AccountSid, include_subaccounts: bool, window: Window) -> BTreeMap<Category, Totals> {
        let mut out: BTreeMap<Category, Totals> =
            Category::METERED.into_iter().map(|c| (c, Totals::default())).collect();
        if window.1 <= window.0 {
            return out;
        }
        let (d0, d1) = (day_of(window.0), day_of(Timestamp(window.1 .0 - 1)));
        for acct in self.accounts_of(tenant, include_subaccounts) {
            let Some(a) = self.accounts.get(&acct) else { continue };
            for c in Category::METERED {
                let t = if c.per_minute() { self.minute_totals(a, c, d0, d1) } else { self.number_totals(a, d0, d1) };
                out.entry(c).or_default().add(t);
            }
        }
        out
    }

    /// A per-minute category over days `d0..=d1`, each day priced at its marginal share of its
    /// month's tiered price.
    fn minute_totals(&self, a: &Account, c: Category, d0: i64, d1: i64) -> Totals {
        let tiers = self.rates.get(&c).map_or(&[][..], |v| v.as_slice());
        let mut t = Totals::default();
        let mut month = None;
        let mut cum = 0u64;
        for (&(_, day), u) in a.days.range((c, d0)..=(c, d1)) {
            let m = month_of_day(day);
            if month != Some(m) {
                month = Some(m);
                let first = month_first_day(m);
                cum = if first < d0 {
                    a.days.range((c, first)..(c, d0)).fold(0u64, |s, (_, u)| s.saturating_add(u.minutes))
                } else {
                    0
                };
            }
            let after = cum.saturating_add(u.minutes);
            let price = tiered_price(tiers, after).saturating_sub(tiered_price(tiers, cum));
            cum = after;
            t.add(Totals { count: u.count, usage: u.minutes, price });
        }
        t
    }

    /// `phonenumbers-local` over days `d0..=d1`: number-months charged on those days.
    fn number_totals(&self, a: &Account, d0: i64, d1: i64) -> Totals {
        let months = (month_of_day(d0), month_of_day(d1));
        let mut n = 0u64;
        for h in a.numbers.values() {
            n += h.charges(self.as_of, months).values().filter(|&&d| (d0..=d1).contains(&d)).count() as u64;
        }
        Totals { count: n, usage: n, price: n.saturating_mul(self.prices.local_number_per_month_micros) }
    }

    fn advance_into(&mut self, now: Timestamp, changes: &mut BTreeSet<UsageChange>) {
        let old = self.as_of;
        if old.is_some_and(|o| o >= now) {
            return;
        }
        self.as_of = Some(now);
        // Every holding starts at or before the book's time, so a new charge can only appear in
        // a month the time just entered.
        let Some(old) = old else { return };
        let from = month_of_day(day_of(old)) + 1;
        let to = month_of_day(day_of(now));
        if from > to {
            return;
        }
        for (&tenant, a) in &self.accounts {
            for h in a.numbers.values() {
                for (_, day) in h.charges(self.as_of, (from, to)) {
                    push_changes(changes, tenant, Category::PhonenumbersLocal, day);
                }
            }
        }
    }

    fn number_event(
        &mut self,
        tenant: AccountSid,
        number: &str,
        id: Option<EventId>,
        at: Timestamp,
        assign: bool,
        changes: &mut BTreeSet<UsageChange>,
    ) {
        let as_of = self.as_of;
        let h = self.accounts.entry(tenant).or_default().numbers.entry(number.to_owned()).or_default();
        let key = (at, id);
        if h.events.contains_key(&key) || (id.is_none() && h.held()) {
            return;
        }
        let all = (i64::MIN, i64::MAX);
        let before = h.charges(as_of, all);
        h.events.insert(key, assign);
        let after = h.charges(as_of, all);
        for (m, day) in before.iter().chain(after.iter()) {
            if before.get(m) != after.get(m) {
                push_changes(changes, tenant, Category::PhonenumbersLocal, *day);
            }
        }
    }

    fn tenant_created(&mut self, tenant: AccountSid, parent: Option<AccountSid>, at: Timestamp) {
        let a = self.accounts.entry(tenant).or_default();
        a.created_at = Some(a.created_at.map_or(at, |c| c.min(at)));
        if let Some(p) = parent.filter(|&p| p != tenant) {
            if a.parent.is_none() {
                a.parent = Some(p);
                self.children.entry(p).or_default().insert(tenant);
            }
        }
    }

    fn apply_call(&mut self, env: &Envelope, input: CallInput, changes: &mut BTreeSet<UsageChange>) {
        let Some(call) = env.call else {
            return;
        };
        let mark = (env.occurred_at, env.event_id);
        let st = self.calls.entry(call).or_insert_with(|| CallState {
            first: (mark, env.tenant),
            received: None,
            terminals: Vec::new(),
            last_seen: env.occurred_at,
            segments: BTreeMap::new(),
            filed: Vec::new(),
        });
        if mark < st.first.0 {
            st.first = (mark, env.tenant);
        }
        st.last_seen = st.last_seen.max(env.occurred_at);
        match input {
            CallInput::Received(dir) => {
                if st.received.as_ref().is_none_or(|(m, _, _)| mark < *m) {
                    st.received = Some((mark, dir, env.tenant));
                    st.terminals.retain(|(_, t, _, _)| *t == env.tenant);
                }
            }
            CallInput::Terminal(status, secs) => {
                let foreign = st.received.as_ref().is_some_and(|(_, _, t)| *t != env.tenant);
                if !foreign && !st.terminals.iter().any(|(m, _, _, _)| *m == mark) {
                    st.terminals.push((mark, env.tenant, status, secs));
                    st.terminals.sort_by_key(|(m, _, _, _)| *m);
                    st.terminals.truncate(MAX_TERMINALS);
                }
            }
            CallInput::Transcript { segment, ms } => {
                st.segments.entry(segment).or_insert(ms);
            }
        }
        let desired = st.desired();
        if desired == st.filed {
            return;
        }
        let old = std::mem::replace(&mut st.filed, desired);
        let desired = &st.filed;
        for f in old.iter().filter(|f| !desired.contains(f)) {
            file(&mut self.accounts, f, false);
            push_changes(changes, f.tenant, f.category, f.day);
        }
        for f in desired.iter().filter(|f| !old.contains(f)) {
            file(&mut self.accounts, f, true);
            push_changes(changes, f.tenant, f.category, f.day);
        }
    }
}

/// Adds (or takes back) one call's contribution.
fn file(accounts: &mut BTreeMap<AccountSid, Account>, f: &Filed, add: bool) {
    let days = &mut accounts.entry(f.tenant).or_default().days;
    let key = (f.category, f.day);
    let u = days.entry(key).or_default();
    if add {
        u.count = u.count.saturating_add(f.count);
        u.minutes = u.minutes.saturating_add(f.minutes);
    } else {
        u.count = u.count.saturating_sub(f.count);
        u.minutes = u.minutes.saturating_sub(f.minutes);
    }
    if *u == DayUsage::default() {
        days.remove(&key);
    }
}

/// A category's totals from the metered ones.
fn rollup(t: &BTreeMap<Category, Totals>, c: Category) -> Totals {
    let get = |c: Category| t.get(&c).copied().unwrap_or_default();
    match c {
        Category::Calls => {
            let mut s = get(Category::CallsInbound);
            s.add(get(Category::CallsOutbound));
            s
        }
        Category::Phonenumbers => get(Category::PhonenumbersLocal),
        Category::Totalprice => {
            let price = Category::METERED.iter().fold(0u64, |a, &c| a.saturating_add(get(c).price));
            Totals { count: 0, usage: price, price }
        }
        c => get(c),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use voxgate_protocol::event::{
        CallReceived, CallStatusChanged, NumberAssigned, NumberReleased, StatusSource, TenantCreated, TenantStatus,
        Transcript,
    };
    use voxgate_protocol::{PhoneNumberSid, StreamSid};

    const A: AccountSid = AccountSid::from_u128(0xa);
    const SUB: AccountSid = AccountSid::from_u128(0x5b);
    const B: AccountSid = AccountSid::from_u128(0xb);
    const SEC: i64 = 1_000_000;

    fn at(date: &str, secs: i64) -> Timestamp {
        Timestamp(Date::parse(date).unwrap().start().0 + secs * SEC)
    }

    fn env(tenant: AccountSid, call: Option<u128>, t: Timestamp, id: u128, payload: Event) -> Envelope {
        Envelope { event_id: EventId(id), tenant, call: call.map(CallSid::from_u128), occurred_at: t, payload }
    }

    fn received(tenant: AccountSid, call: u128, t: Timestamp, direction: Direction) -> Envelope {
        let p = CallReceived {
            from: "+15550001111".into(),
            to: "+14155550100".into(),
            direction,
            status: CallStatus::Ringing,
            from_country: None,
            to_country: None,
            stream_session: String::new(),
        };
        env(tenant, Some(call), t, call << 8 | 1, Event::CallReceived(p))
    }

    fn ended(tenant: AccountSid, call: u128, t: Timestamp, status: CallStatus, secs: Option<u32>) -> Envelope {
        let source = if secs.is_some() { StatusSource::Callback } else { StatusSource::Voxgate };
        let p = CallStatusChanged { status, source, sequence: None, duration_secs: secs };
        let id = call << 8 | 2 | u128::from(secs.is_some()) << 4 | (t.0 as u128 & 0xffff) << 16;
        env(tenant, Some(call), t, id, Event::CallStatusChanged(p))
    }

    fn transcript(tenant: AccountSid, call: u128, t: Timestamp, segment: u32, ms: u64, rejected: bool) -> Envelope {
        let p = Transcript {
            stream_sid: StreamSid::from_u128(call),
            segment_index: segment,
            segment_event: EventId(call << 16 | u128::from(segment)),
            start_ms: 1_000,
            end_ms: 1_000 + ms,
            text: if rejected { String::new() } else { "hello".into() },
            model: "whisper-tiny.en/ct2-f16".into(),
            processing_ms: 10,
            avg_logprob: -0.2,
            no_speech_prob: 0.01,
            rejected: rejected.then(|| "no_speech".into()),
            track: voxgate_protocol::event::Track::Inbound,
            doubt: None,
        };
        env(tenant, Some(call), t, call << 16 | u128::from(segment) | 1 << 100, Event::Transcript(p))
    }

    fn assigned(tenant: AccountSid, n: &str, t: Timestamp, id: u128) -> Envelope {
        let p = NumberAssigned { sid: PhoneNumberSid::from_u128(1), number: n.into(), friendly_name: String::new() };
        env(tenant, None, t, id, Event::NumberAssigned(p))
    }

    fn released(tenant: AccountSid, n: &str, t: Timestamp, id: u128) -> Envelope {
        let p = NumberReleased { sid: PhoneNumberSid::from_u128(1), number: n.into() };
        env(tenant, None, t, id, Event::NumberReleased(p))
    }

    fn created(tenant: AccountSid, parent: Option<AccountSid>, t: Timestamp) -> Envelope {
        let p = TenantCreated {
            friendly_name: "sub".into(),
            parent,
            sealed_auth_token: Default::default(),
            status: TenantStatus::Active,
        };
        env(tenant, None, t, tenant.as_u128() << 8 | 7, Event::TenantCreated(p))
    }

    /// A call: received at `t`, answered for `secs` seconds by Twilio's callback.
    fn call(tenant: AccountSid, n: u128, t: Timestamp, dir: Direction, secs: u32) -> Vec<Envelope> {
        vec![
            received(tenant, n, t, dir),
            ended(tenant, n, Timestamp(t.0 + i64::from(secs) * SEC), CallStatus::Completed, Some(secs)),
        ]
    }

    fn day(date: &str) -> Window {
        let d = Date::parse(date).unwrap();
        (d.start(), d.add_days(1).start())
    }

    fn month(m: &str) -> Window {
        Month::parse(m).unwrap().window()
    }

    fn rec(book: &UsageBook, tenant: AccountSid, c: Category, w: Window) -> (Option<u64>, u64, u64) {
        let r = book.record(tenant, true, c, w);
        (r.count, r.usage, r.price_micros)
    }

    fn apply_all(book: &mut UsageBook, events: &[Envelope]) -> Vec<UsageChange> {
        events.iter().flat_map(|e| book.apply(e)).collect()
    }

    #[test]
    fn call_minutes_round_up_per_call() {
        let mut book = UsageBook::default();
        let t = at("2025-01-07", 3600);
        for (n, secs) in [(1, 60), (2, 61), (3, 1), (4, 0), (5, 119)] {
            apply_all(&mut book, &call(A, n, t, Direction::Inbound, secs));
        }
        // 1 + 2 + 1 + 0 + 2 minutes over 5 calls.
        assert_eq!(rec(&book, A, Category::CallsInbound, day("2025-01-07")), (Some(5), 6, 6 * 8_500));
        let r = book.record(A, true, Category::CallsInbound, day("2025-01-07"));
        assert_eq!((r.count_unit, r.usage_unit, r.price_unit), ("calls", "minutes", "usd"));
        assert_eq!((r.usage_string(), r.price_string()), ("6".to_string(), "0.051".to_string()));
        assert_eq!(r.description, "Inbound Voice Minutes");
    }

    #[test]
    fn only_the_calls_own_tenant_ends_it_and_never_for_longer_than_observed() {
        let mut book = UsageBook::default();
        let t = at("2025-01-07", 3600);
        let w = day("2025-01-07");
        // Tenant B, holding A's CallSid, reports it completed after an hour: nothing changes.
        book.apply(&received(A, 1, t, Direction::Inbound));
        let forged = ended(B, 1, Timestamp(t.0 + 10 * SEC), CallStatus::Completed, Some(3600));
        assert!(book.apply(&forged).is_empty());
        assert_eq!(rec(&book, A, Category::CallsInbound, w), (Some(0), 0, 0));
        assert_eq!(rec(&book, B, Category::CallsInbound, w), (Some(0), 0, 0));
        assert_eq!(book.call_owner(CallSid::from_u128(1)), Some((A, t)));
        // A's own callback 30 s after the webhook claims 3,600 s: billed as observed (30 s plus
        // the grace), one minute.
        book.apply(&ended(A, 1, Timestamp(t.0 + 30 * SEC), CallStatus::Completed, Some(3600)));
        assert_eq!(rec(&book, A, Category::CallsInbound, w), (Some(1), 1, 8_500));
        // A duration not believed (recorded without one): the observed time.
        book.apply(&received(A, 2, t, Direction::Inbound));
        book.apply(&ended(A, 2, Timestamp(t.0 + 95 * SEC), CallStatus::Completed, None));
        assert_eq!(rec(&book, A, Category::CallsInbound, w), (Some(2), 3, 3 * 8_500));
        // A forged terminal event seen before the call's webhook is dropped once it is.
        let mut late = UsageBook::default();
        late.apply(&ended(B, 3, Timestamp(t.0 + 5 * SEC), CallStatus::Completed, Some(5)));
        late.apply(&received(A, 3, t, Direction::Inbound));
        assert_eq!(rec(&late, A, Category::CallsInbound, w), (Some(0), 0, 0));
        assert_eq!(rec(&late, B, Category::CallsInbound, w), (Some(0), 0, 0));
        assert_eq!(duration_bound_secs(t, Timestamp(t.0 + 10 * SEC + 1), Some(5)), 7);
        assert_eq!(duration_bound_secs(t, Timestamp(t.0 - SEC), None), DURATION_GRACE_SECS);
    }

    #[test]
    fn categories_and_rollups() {
        let mut book = UsageBook::default();
        let t = at("2025-01-07", 0);
        apply_all(&mut book, &call(A, 1, t, Direction::Inbound, 90));
        apply_all(&mut book, &call(A, 2, t, Direction::OutboundApi, 30));
        apply_all(&mut book, &call(A, 3, t, Direction::OutboundDial, 150));
        apply_all(&mut book, &call(A, 4, t, Direction::Other, 10));
        book.apply(&assigned(A, "+14155550100", t, 900));
        let w = day("2025-01-07");
        assert_eq!(rec(&book, A, Category::CallsInbound, w), (Some(2), 3, 3 * 8_500));
        assert_eq!(rec(&book, A, Category::CallsOutbound, w), (Some(2), 4, 4 * 13_000));
        assert_eq!(rec(&book, A, Category::Calls, w), (Some(4), 7, 3 * 8_500 + 4 * 13_000));
        assert_eq!(rec(&book, A, Category::PhonenumbersLocal, w), (Some(1), 1, 1_000_000));
        assert_eq!(rec(&book, A, Category::Phonenumbers, w), (Some(1), 1, 1_000_000));
        assert_eq!(rec(&book, A, Category::Recordings, w), (Some(0), 0, 0));
        assert_eq!(rec(&book, A, Category::Transcriptions, w), (Some(0), 0, 0));
        let total = 3 * 8_500 + 4 * 13_000 + 1_000_000;
        assert_eq!(rec(&book, A, Category::Totalprice, w), (None, total, total));
        let records = book.records(A, true, w);
        let names: Vec<&str> = records.iter().map(|r| r.category.as_str()).collect();
        assert_eq!(
            names,
            [
                "calls",
                "calls-inbound",
                "calls-outbound",
                "phonenumbers",
                "phonenumbers-local",
                "recordings",
                "totalprice",
                "transcriptions"
            ]
        );
        let tp = &records[6];
        assert_eq!((tp.count_string(), tp.usage_unit, tp.usage_string()), (None, "usd", "1.0775".to_string()));
        assert_eq!((tp.start_date.to_string(), tp.end_date.to_string()), ("2025-01-07".into(), "2025-01-07".into()));
    }

    #[test]
    fn only_completed_calls_are_billed_once() {
        let mut book = UsageBook::default();
        let t = at("2025-01-07", 0);
        // Busy, no-answer: not billed.
        book.apply(&received(A, 1, t, Direction::Inbound));
        book.apply(&ended(A, 1, t, CallStatus::Busy, Some(0)));
        book.apply(&received(A, 2, t, Direction::Inbound));
        book.apply(&ended(A, 2, t, CallStatus::NoAnswer, None));
        // Non-terminal statuses are ignored.
        let ringing = ended(A, 3, t, CallStatus::InProgress, None);
        assert!(book.apply(&ringing).is_empty());
        // Twilio's callback and voxgate's own end: one call, Twilio's duration.
        book.apply(&received(A, 3, t, Direction::Inbound));
        book.apply(&ended(A, 3, Timestamp(t.0 + 200 * SEC), CallStatus::Completed, None));
        assert_eq!(rec(&book, A, Category::CallsInbound, day("2025-01-07")), (Some(1), 4, 4 * 8_500));
        let ch = book.apply(&ended(A, 3, Timestamp(t.0 + 201 * SEC), CallStatus::Completed, Some(150)));
        assert!(ch.contains(&UsageChange { tenant: A, category: Category::CallsInbound, day: Date::of(t) }));
        assert_eq!(rec(&book, A, Category::CallsInbound, day("2025-01-07")), (Some(1), 3, 3 * 8_500));
        // A later callback with another duration changes nothing: the first one with a duration wins.
        assert!(book.apply(&ended(A, 3, Timestamp(t.0 + 300 * SEC), CallStatus::Completed, Some(400))).is_empty());
        assert_eq!(rec(&book, A, Category::CallsInbound, day("2025-01-07")), (Some(1), 3, 3 * 8_500));
    }

    #[test]
    fn span_is_used_without_a_duration() {
        let mut book = UsageBook::default();
        let t = at("2025-01-07", 0);
        book.apply(&received(A, 1, t, Direction::OutboundApi));
        // 120.5 s → 121 s → 3 minutes.
        book.apply(&ended(A, 1, Timestamp(t.0 + 120 * SEC + SEC / 2), CallStatus::Completed, None));
        assert_eq!(rec(&book, A, Category::CallsOutbound, day("2025-01-07")), (Some(1), 3, 3 * 13_000));
        // A call whose start was never seen: counted, inbound, zero minutes, on its end's day.
        book.apply(&ended(A, 2, at("2025-01-08", 5), CallStatus::Completed, None));
        assert_eq!(rec(&book, A, Category::CallsInbound, day("2025-01-08")), (Some(1), 0, 0));
    }

    #[test]
    fn a_call_lands_on_the_day_it_started() {
        let mut book = UsageBook::default();
        let t = at("2025-01-31", 86_400 - 30);
        apply_all(&mut book, &call(A, 1, t, Direction::Inbound, 90));
        assert_eq!(rec(&book, A, Category::CallsInbound, day("2025-01-31")), (Some(1), 2, 17_000));
        assert_eq!(rec(&book, A, Category::CallsInbound, day("2025-02-01")), (Some(0), 0, 0));
    }

    #[test]
    fn transcriptions_are_minutes_per_call() {
        let prices = PriceTable { transcription_per_min_micros: 24_000, ..PriceTable::default() };
        let mut book = UsageBook::new(prices).unwrap();
        let t = at("2025-01-07", 0);
        book.apply(&received(A, 1, t, Direction::Inbound));
        book.apply(&transcript(A, 1, t, 0, 10_000, false));
        book.apply(&transcript(A, 1, t, 1, 20_000, true));
        let ch = book.apply(&transcript(A, 1, t, 2, 40_000, false));
        assert!(ch.contains(&UsageChange { tenant: A, category: Category::Totalprice, day: Date::of(t) }));
        // 70 s of speech → 2 minutes, 3 segments (the rejected one too).
        assert_eq!(rec(&book, A, Category::Transcriptions, day("2025-01-07")), (Some(3), 2, 48_000));
        // The same segment again (a re-run of STT) is not counted twice.
        let mut again = transcript(A, 1, t, 2, 40_000, false);
        again.event_id = EventId(12345);
        assert!(book.apply(&again).is_empty());
        // Another call rounds on its own.
        book.apply(&transcript(A, 2, t, 0, 1_000, false));
        assert_eq!(rec(&book, A, Category::Transcriptions, day("2025-01-07")), (Some(4), 3, 72_000));
        let r = book.record(A, true, Category::Transcriptions, day("2025-01-07"));
        assert_eq!((r.count_unit, r.usage_unit), ("transcriptions", "minutes"));
    }

    #[test]
    fn numbers_are_charged_once_per_month_held() {
        let mut book = UsageBook::default();
        let n = "+14155550100";
        book.apply(&assigned(A, n, at("2025-01-15", 0), 1));
        assert_eq!(rec(&book, A, Category::PhonenumbersLocal, day("2025-01-15")), (Some(1), 1, 1_000_000));
        // February is charged on the 1st, once the book's time reaches it.
        assert_eq!(rec(&book, A, Category::PhonenumbersLocal, month("2025-02")), (Some(0), 0, 0));
        let ch = book.advance(at("2025-02-01", 1));
        assert_eq!(ch.len(), 3, "{ch:?}");
        assert_eq!(ch[0].day.to_string(), "2025-02-01");
        assert_eq!(rec(&book, A, Category::PhonenumbersLocal, day("2025-02-01")), (Some(1), 1, 1_000_000));
        // Released and taken back in February: still one charge for February.
        book.apply(&released(A, n, at("2025-02-10", 0), 2));
        book.apply(&assigned(A, n, at("2025-02-20", 0), 3));
        assert_eq!(rec(&book, A, Category::PhonenumbersLocal, month("2025-02")), (Some(1), 1, 1_000_000));
        // Released in March: March charged (held on the 1st), April not.
        book.advance(at("2025-03-05", 0));
        book.apply(&released(A, n, at("2025-03-05", 0), 4));
        book.advance(at("2025-05-01", 0));
        let r = book.record(A, true, Category::Phonenumbers, (at("2025-01-01", 0), at("2025-06-01", 0)));
        assert_eq!((r.count, r.usage, r.price_micros, r.usage_unit), (Some(3), 3, 3_000_000, "numbers"));
        // Held from a config file: idempotent.
        book.hold_number(B, n, at("2025-05-02", 0));
        assert!(book.hold_number(B, n, at("2025-05-03", 0)).is_empty());
        assert_eq!(rec(&book, B, Category::PhonenumbersLocal, month("2025-05")), (Some(1), 1, 1_000_000));
    }

    #[test]
    fn a_late_release_takes_back_months_not_held() {
        let n = "+14155550100";
        let mut book = UsageBook::default();
        book.apply(&assigned(A, n, at("2025-01-15", 0), 1));
        // Another log ran ahead to March before the release (January 20) was read.
        apply_all(&mut book, &call(B, 9, at("2025-03-03", 0), Direction::Inbound, 60));
        assert_eq!(rec(&book, A, Category::PhonenumbersLocal, (at("2025-01-01", 0), at("2025-04-01", 0))).0, Some(3));
        let ch = book.apply(&released(A, n, at("2025-01-20", 0), 2));
        assert_eq!(ch.iter().filter(|c| c.category == Category::PhonenumbersLocal).count(), 2);
        assert_eq!(rec(&book, A, Category::PhonenumbersLocal, (at("2025-01-01", 0), at("2025-04-01", 0))).0, Some(1));
    }

    fn sample_events() -> Vec<Envelope> {
        let mut ev = vec![created(A, None, at("2025-01-01", 0)), created(SUB, Some(A), at("2025-01-02", 0))];
        ev.push(assigned(A, "+14155550100", at("2025-01-03", 0), 100));
        ev.push(assigned(SUB, "+14155550101", at("2025-01-04", 0), 101));
        for i in 0..40u128 {
            let t = at("2025-01-05", 0).add_millis(i as i64 * 7_200_000);
            let tenant = if i % 3 == 0 { SUB } else { A };
            let dir = if i % 2 == 0 { Direction::Inbound } else { Direction::OutboundApi };
            ev.extend(call(tenant, 1000 + i, t, dir, 30 + (i as u32 * 37) % 300));
            ev.push(transcript(tenant, 1000 + i, t, 0, 3_000 + i as u64 * 500, i % 5 == 0));
        }
        ev.push(ended(A, 1001, at("2025-01-06", 0), CallStatus::Completed, None));
        ev.push(released(SUB, "+14155550101", at("2025-02-10", 0), 102));
        ev
    }

    fn snapshot(book: &UsageBook) -> Vec<UsageRecord> {
        let mut v = Vec::new();
        for tenant in [A, SUB] {
            for incl in [true, false] {
                for w in [month("2025-01"), month("2025-02"), (Timestamp(0), at("2026-01-01", 0))] {
                    v.extend(book.records(tenant, incl, w));
                }
            }
        }
        v
    }

    #[test]
    fn duplicates_change_nothing_and_replay_is_identical() {
        let events = sample_events();
        let mut book = UsageBook::default();
        let changes = apply_all(&mut book, &events);
        assert!(!changes.is_empty());
        let first = snapshot(&book);
        // Every event applied a second time: nothing changes.
        for e in &events {
            assert!(book.apply(e).is_empty(), "{:?}", e.payload.kind());
        }
        assert_eq!(snapshot(&book), first);
        // The same events in the same order on a fresh book: the same changes and records.
        let mut replay = UsageBook::default();
        assert_eq!(apply_all(&mut replay, &events), changes);
        assert_eq!(snapshot(&replay), first);
        // In reverse order too (logs read at different paces): the same records.
        let mut reversed = UsageBook::default();
        for e in events.iter().rev() {
            reversed.apply(e);
        }
        assert_eq!(snapshot(&reversed), first);
        // Irrelevant events change nothing.
        let mut other = events[0].clone();
        other.payload =
            Event::QuotaSet(voxgate_protocol::event::QuotaSet { max_concurrent_calls: 1, calls_per_second: 1 });
        assert!(book.apply(&other).is_empty());
    }

    #[test]
    fn subaccounts_roll_up_into_the_parent() {
        let mut book = UsageBook::default();
        let t = at("2025-01-07", 0);
        book.apply(&created(SUB, Some(A), at("2025-01-01", 0)));
        apply_all(&mut book, &call(A, 1, t, Direction::Inbound, 60));
        apply_all(&mut book, &call(SUB, 2, t, Direction::Inbound, 120));
        apply_all(&mut book, &call(B, 3, t, Direction::Inbound, 600));
        let w = day("2025-01-07");
        assert_eq!(book.record(A, true, Category::CallsInbound, w).usage, 3);
        assert_eq!(book.record(A, false, Category::CallsInbound, w).usage, 1);
        assert_eq!(book.record(SUB, true, Category::CallsInbound, w).usage, 2);
        assert_eq!(book.record(A, true, Category::CallsInbound, w).account_sid, A);
        assert_eq!(book.subaccounts(A), vec![SUB]);
        assert_eq!(book.self_and_ancestors(SUB), vec![SUB, A]);
        assert_eq!(book.parent(A), None);
    }

    #[test]
    fn tiers_price_the_month_and_days_add_up_exactly() {
        let mut prices = PriceTable::default();
        prices.tiers.insert(
            "calls-inbound".into(),
            vec![
                Tier { from_minutes: 0, price_per_min_micros: 8_500 },
                Tier { from_minutes: 10, price_per_min_micros: 8_001 },
                Tier { from_minutes: 25, price_per_min_micros: 7_333 },
            ],
        );
        let mut book = UsageBook::new(prices).unwrap();
        // 3 calls a day for 20 days of 7, 4 and 1 minutes: 240 minutes, crossing both tiers.
        for d in 0..20i64 {
            let t = at("2025-03-01", d * 86_400 + 600);
            for (k, secs) in [(0u128, 400u32), (1, 200), (2, 30)] {
                apply_all(&mut book, &call(A, (d as u128) * 10 + k, t, Direction::Inbound, secs));
            }
        }
        let month_total = rec(&book, A, Category::CallsInbound, month("2025-03"));
        let expected = 10 * 8_500 + 15 * 8_001 + (240 - 25) * 7_333;
        assert_eq!(month_total, (Some(60), 240, expected));
        let mut sum = 0;
        for d in split(month("2025-03"), super::super::Granularity::Day).unwrap() {
            sum += book.record(A, true, Category::CallsInbound, d).price_micros;
        }
        assert_eq!(sum, expected, "the days add up to the month, to the micro-dollar");
        // The first day is all at the first tier but for its last minutes.
        assert_eq!(rec(&book, A, Category::CallsInbound, day("2025-03-01")).2, 10 * 8_500 + 2 * 8_001);
        // A window starting mid-month prices its days at the month's marginal tier.
        let late = book.record(A, true, Category::CallsInbound, (at("2025-03-10", 0), month("2025-03").1));
        let early = book.record(A, true, Category::CallsInbound, (month("2025-03").0, at("2025-03-10", 0)));
        assert_eq!(late.price_micros + early.price_micros, expected);
        // Another month starts over at the first tier.
        apply_all(&mut book, &call(A, 9999, at("2025-04-01", 0), Direction::Inbound, 60));
        assert_eq!(rec(&book, A, Category::CallsInbound, month("2025-04")).2, 8_500);
        // The invoice shows the tiers and the same total.
        let inv = book.invoice(A, Month::parse("2025-03").unwrap());
        let line = &inv.lines[0];
        assert_eq!(
            (line.category, line.count, line.usage, line.price_micros),
            (Category::CallsInbound, 60, 240, expected)
        );
        assert_eq!(line.tiers.iter().map(|t| t.minutes).collect::<Vec<_>>(), vec![10, 15, 215]);
        assert_eq!(inv.total_micros, expected);
        assert_eq!(inv.lines.len(), 5);
    }

    #[test]
    fn invoice_totals_every_metered_category() {
        let prices = PriceTable { transcription_per_min_micros: 24_000, ..PriceTable::default() };
        let mut book = UsageBook::new(prices).unwrap();
        let t = at("2025-02-10", 0);
        book.apply(&assigned(A, "+14155550100", at("2025-01-20", 0), 1));
        apply_all(&mut book, &call(A, 1, t, Direction::Inbound, 61));
        apply_all(&mut book, &call(A, 2, t, Direction::OutboundDial, 59));
        book.apply(&transcript(A, 1, t, 0, 5_000, false));
        let inv = book.invoice(A, Month::parse("2025-02").unwrap());
        let prices: Vec<(Category, u64)> = inv.lines.iter().map(|l| (l.category, l.price_micros)).collect();
        assert_eq!(
            prices,
            vec![
                (Category::CallsInbound, 17_000),
                (Category::CallsOutbound, 13_000),
                (Category::PhonenumbersLocal, 1_000_000),
                (Category::Recordings, 0),
                (Category::Transcriptions, 24_000)
            ]
        );
        assert_eq!(inv.total_micros, 1_054_000);
        assert_eq!(inv.total_micros, book.record(A, false, Category::Totalprice, month("2025-02")).price_micros);
    }

    #[test]
    fn money_is_exact_integers() {
        // 0.0085 × 3 in f64 is 0.025499999999999998; in micro-dollars it is exact.
        let mut book = UsageBook::default();
        for n in 0..3 {
            apply_all(&mut book, &call(A, n, at("2025-01-07", 0), Direction::Inbound, 60));
        }
        let r = book.record(A, true, Category::Totalprice, day("2025-01-07"));
        assert_eq!((r.price_micros, r.price_string(), r.usage_string()), (25_500, "0.0255".into(), "0.0255".into()));
    }

    #[test]
    fn report_splits_and_starts_at_first_activity() {
        let mut book = UsageBook::default();
        book.apply(&created(A, None, at("2024-11-20", 0)));
        apply_all(&mut book, &call(A, 1, at("2025-01-07", 0), Direction::Inbound, 60));
        let now = at("2025-01-10", 100);
        let all = book.report(A, true, &Period::AllTime, now).unwrap();
        assert_eq!(all.len(), 8);
        assert_eq!(
            (all[0].start_date.to_string(), all[0].end_date.to_string()),
            ("2024-11-20".into(), "2025-01-10".into())
        );
        let yearly = book.report(A, true, &Period::Yearly, now).unwrap();
        assert_eq!(yearly.len(), 16);
        assert_eq!(yearly[0].end_date.to_string(), "2024-12-31");
        let daily = book.report(A, true, &Period::Daily, now).unwrap();
        assert_eq!(daily.len(), 10 * 8);
        let jan7: Vec<_> = daily.iter().filter(|r| r.start_date.to_string() == "2025-01-07").collect();
        assert_eq!(jan7[1].usage, 1);
        // No activity at all: AllTime is today.
        let none = book.report(B, true, &Period::AllTime, now).unwrap();
        assert_eq!(none[0].start_date.to_string(), "2025-01-10");
        assert_eq!(book.report(A, true, &Period::Yesterday, now).unwrap().len(), 8);
    }

    #[test]
    fn pruned_calls_are_forgotten() {
        let mut book = UsageBook::default();
        apply_all(&mut book, &call(A, 1, at("2025-01-07", 0), Direction::Inbound, 60));
        apply_all(&mut book, &call(A, 2, at("2025-01-09", 0), Direction::Inbound, 60));
        assert_eq!(book.tracked_calls(), 2);
        assert_eq!(book.prune_calls(at("2025-01-08", 0)), 1);
        assert_eq!(book.tracked_calls(), 1);
        assert_eq!(rec(&book, A, Category::CallsInbound, month("2025-01")).1, 2);
    }
}
