//! The fraud engine: folds call events into per-tenant state and runs the [rules](super::rules)
//! on them, returning a [`FraudVerdict`] when one fires.
//!
//! Events it reads (others are ignored, as are events without a call):
//! - `CallReceived`: every rule but `short_call_burst` (velocity, sequence and volume windows
//!   count the call; a repeated webhook for a call already seen is ignored);
//! - `CallStatusChanged`, terminal: ends the call (duration from `duration_secs`, else received →
//!   terminal event time) and runs `short_call_burst`; non-terminal: `spend_velocity`;
//! - `Transcript`: `spend_velocity` (a call in progress can still be ended).
//!
//! A rule fires at most once per call, so a call that was blocked or ended is not flagged again for
//! the same rule. State is bounded: windows are `VecDeque`s pruned by event time (every minute of
//! event time per tenant, and whenever a table reaches `max_tracked_numbers`, when the least
//! recently seen entries go first); the hourly histogram is a fixed 8 × 24 array (today and the 7
//! days before). Time never steps back within a tenant: an event older than the newest one seen
//! counts as happening at the newest time. Maps use a fixed hasher and eviction sorts, so the
//! same events in the same order always give the same verdicts (replay), and a restarted engine
//! rebuilds its state by replaying the last 7 days of calls.

use std::collections::VecDeque;

use voxgate_protocol::event::{CallReceived, CallStatusChanged, FraudVerdict, RuleHit, Severity};
use voxgate_protocol::{AccountSid, CallSid, Envelope, Event, Timestamp};

use super::prefixes::{digits_key, PrefixTable};
use super::rules::{self, is_outbound, secs_us, FraudConfig, FraudConfigError, Rule, Settings};
use super::{number_key, FixedMap, Num};

const US_PER_SEC: i64 = 1_000_000;
const US_PER_MIN: i128 = 60_000_000;
const HOUR_US: i64 = 3600 * US_PER_SEC;
const DAY_US: i64 = 24 * HOUR_US;
/// How often (event time) a tenant's windows are swept for expired entries.
const PRUNE_EVERY_US: i64 = 60 * US_PER_SEC;
/// How long an ended call is remembered (to ignore repeated or late events for it).
const ENDED_KEEP_US: i64 = 900 * US_PER_SEC;
/// Entries one window keeps at least (more when a limit needs more).
const WINDOW_CAP: usize = 4096;
/// Steps a run search takes either way (`sequential_run` is at most 1000).
const RUN_WALK: usize = 1000;
/// Spend is estimated over this trailing window.
const SPEND_WINDOW_US: i64 = HOUR_US;

/// How much state the engine holds (for metrics).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StateSize {
    pub tenants: usize,
    /// Calls in progress and recently ended ones.
    pub calls: usize,
    /// Distinct remote numbers with a window.
    pub numbers: usize,
    /// Dialled numbers in the sequence windows.
    pub dialled: usize,
}

/// The fraud stage's pure core. See the [module docs](self).
#[derive(Debug)]
pub struct FraudEngine {
    config: FraudConfig,
    /// The table it was built with, before the config's `prefixes`.
    base_prefixes: PrefixTable,
    prefixes: PrefixTable,
    defaults: Settings,
    overrides: FixedMap<AccountSid, Settings>,
    tenants: FixedMap<AccountSid, TenantState>,
}

impl FraudEngine {
    /// An engine with no history. Fails when the config does not validate.
    pub fn new(config: FraudConfig, prefixes: PrefixTable) -> Result<Self, FraudConfigError> {
        let mut e = Self {
            config: FraudConfig::default(),
            prefixes: prefixes.clone(),
            base_prefixes: prefixes,
            defaults: FraudConfig::default().resolve()?.defaults,
            overrides: FixedMap::default(),
            tenants: FixedMap::default(),
        };
        e.set_config(config)?;
        Ok(e)
    }

    /// Replaces the config and keeps every window and counter (a reload). On error nothing
    /// changes.
    pub fn set_config(&mut self, config: FraudConfig) -> Result<(), FraudConfigError> {
        let resolved = config.resolve()?;
        self.prefixes = self.base_prefixes.with_overrides(&config.prefixes)?;
        self.defaults = resolved.defaults;
        self.overrides = resolved.tenants.into_iter().collect();
        self.config = config;
        Ok(())
    }

    pub fn config(&self) -> &FraudConfig {
        &self.config
    }

    /// The destination table in use (the base table with the config's `prefixes`).
    pub fn prefixes(&self) -> &PrefixTable {
        &self.prefixes
    }

    pub fn state_size(&self) -> StateSize {
        let mut s = StateSize { tenants: self.tenants.len(), ..Default::default() };
        for t in self.tenants.values() {
            s.calls += t.calls.len();
            s.numbers += t.numbers.len();
            s.dialled += t.dialled.iter().map(|d| d.recent.len()).sum::<usize>();
        }
        s
    }

    /// Folds one event in; `Some` when a rule fired on it. The verdict's `cause` is the event.
    pub fn apply(&mut self, env: &Envelope) -> Option<FraudVerdict> {
        let call = env.call?;
        let settings = self.overrides.get(&env.tenant).unwrap_or(&self.defaults);
        let ctx = Ctx {
            env,
            s: settings,
            table: &self.prefixes,
            max_tracked: self.config.max_tracked_numbers as usize,
            max_call_us: secs_us(self.config.max_call_secs),
        };
        match &env.payload {
            Event::CallReceived(c) => {
                let t = self.tenants.entry(env.tenant).or_insert_with(|| TenantState::new(env.occurred_at.0));
                t.received(&ctx, call, c)
            }
            Event::CallStatusChanged(c) => self.tenants.get_mut(&env.tenant)?.status(&ctx, call, c),
            Event::Transcript(_) => self.tenants.get_mut(&env.tenant)?.tick(&ctx, call),
            _ => None,
        }
    }
}

/// What one event is judged with.
struct Ctx<'a> {
    env: &'a Envelope,
    s: &'a Settings,
    table: &'a PrefixTable,
    max_tracked: usize,
    max_call_us: i64,
}

impl Ctx<'_> {
    /// The verdict for `hits` (none → `None`): severity ≥ block blocks the remote number.
    fn verdict(&self, remote: &str, hits: Vec<RuleHit>) -> Option<FraudVerdict> {
        let severity = hits.iter().map(|h| h.severity).max()?;
        let block = severity >= Severity::Block && !remote.is_empty();
        Some(FraudVerdict {
            severity,
            hits,
            blocked_number: block.then(|| remote.to_owned()),
            blocked_until: block.then(|| Timestamp(self.env.occurred_at.0.saturating_add(secs_us(self.s.block_secs)))),
            cause: self.env.event_id,
        })
    }
}

#[derive(Debug)]
struct CallState {
    remote: Num,
    remote_key: u64,
    received: i64,
    /// Estimated cost, micro-dollars a minute.
    rate: u64,
    ended: Option<i64>,
    /// [`Rule::bit`]s of the rules that already fired on this call.
    fired: u16,
}

/// One remote number's windows (event times, oldest first).
#[derive(Debug, Default)]
struct NumberState {
    last_seen: i64,
    /// Inbound calls from it.
    from: VecDeque<i64>,
    /// Outbound calls to it.
    to: VecDeque<i64>,
    /// Ends of short calls with it, either direction.
    short: VecDeque<i64>,
}

/// Drops entries that left the window ending at `now`.
fn slide(q: &mut VecDeque<i64>, now: i64, window: i64) {
    while q.front().is_some_and(|&t| now - t >= window) {
        q.pop_front();
    }
}

/// Appends `now` to a window holding at most `cap` entries; true when it had to drop one.
fn push_capped(q: &mut VecDeque<i64>, now: i64, cap: usize) -> bool {
    let capped = q.len() >= cap;
    if capped {
        q.pop_front();
    }
    q.push_back(now);
    capped
}

/// Dialled numbers of one direction in the sequence window.
#[derive(Debug, Default)]
struct RunTracker {
    /// (time, [`digits_key`]) oldest first.
    recent: VecDeque<(i64, u64)>,
    /// Key → how many of `recent` hold it.
    present: FixedMap<u64, u32>,
}

impl RunTracker {
    fn slide(&mut self, now: i64, window: i64) {
        while let Some(&(t, k)) = self.recent.front() {
            if now - t < window {
                break;
            }
            self.recent.pop_front();
            self.forget(k);
        }
    }

    fn forget(&mut self, k: u64) {
        if let Some(n) = self.present.get_mut(&k) {
            *n -= 1;
            if *n == 0 {
                self.present.remove(&k);
            }
        }
    }

    /// Records a call to `key`; returns the run of consecutive keys holding it (length, lowest,
    /// highest).
    fn record(&mut self, now: i64, window: i64, key: u64, cap: usize) -> (usize, u64, u64) {
        self.slide(now, window);
        if self.recent.len() >= cap {
            if let Some((_, k)) = self.recent.pop_front() {
                self.forget(k);
            }
        }
        self.recent.push_back((now, key));
        *self.present.entry(key).or_insert(0) += 1;
        let (mut lo, mut hi) = (key, key);
        while key - lo < RUN_WALK as u64 && lo > 0 && self.present.contains_key(&(lo - 1)) {
            lo -= 1;
        }
        while hi - key < RUN_WALK as u64 && self.present.contains_key(&(hi + 1)) {
            hi += 1;
        }
        ((hi - lo + 1) as usize, lo, hi)
    }
}

/// `+` and the digits of an E.164 number as a [`digits_key`]; `None` for anything else.
fn e164_key(number: &str) -> Option<u64> {
    let d = number.strip_prefix('+')?;
    if d.is_empty() || d.len() > 15 || !d.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    Some(digits_key(d.len(), d.bytes().fold(0u64, |v, b| v * 10 + u64::from(b - b'0'))))
}

/// The number back from its key.
fn e164_from_key(key: u64) -> String {
    let len = (key >> 56) as usize;
    format!("+{:0len$}", key & ((1 << 56) - 1))
}

/// Calls per UTC hour: today and the 7 days before.
#[derive(Debug)]
struct Hourly {
    /// The UTC day the tenant was first seen (days before it are not history).
    first_day: i64,
    /// The UTC day each row holds (`i64::MIN`: none).
    day_of_row: [i64; 8],
    counts: [[u32; 24]; 8],
    /// The UTC hour (since the epoch) `volume_anomaly` last fired in.
    fired_hour: i64,
}

impl Hourly {
    fn new(now: i64) -> Self {
        Self {
            first_day: now.div_euclid(DAY_US),
            day_of_row: [i64::MIN; 8],
            counts: [[0; 24]; 8],
            fired_hour: i64::MIN,
        }
    }

    /// Counts a call at `now`; returns (hour of day, calls this hour, the same hour on each day
    /// of history, days of history).
    fn record(&mut self, now: i64) -> (u8, u32, [u32; 7], usize) {
        let day = now.div_euclid(DAY_US);
        let hour = (now.rem_euclid(DAY_US) / HOUR_US) as usize;
        let row = day.rem_euclid(8) as usize;
        if self.day_of_row[row] != day {
            self.day_of_row[row] = day;
            self.counts[row] = [0; 24];
        }
        self.counts[row][hour] = self.counts[row][hour].saturating_add(1);
        let mut history = [0u32; 7];
        let mut n = 0;
        for back in 1..=7 {
            let d = day - back;
            if d < self.first_day {
                break;
            }
            let r = d.rem_euclid(8) as usize;
            history[n] = if self.day_of_row[r] == d { self.counts[r][hour] } else { 0 };
            n += 1;
        }
        (hour as u8, self.counts[row][hour], history, n)
    }
}

/// Estimated spend: calls ended in the trailing hour, and calls in progress.
#[derive(Debug, Default)]
struct Spend {
    /// (end time, cost in micro-dollars), oldest first.
    ended: VecDeque<(i64, u64)>,
    /// Their sum (wide, so hostile durations cannot overflow it).
    ended_sum: u128,
    /// Σ rate and Σ rate × received over calls in progress, so their running cost at `now` is
    /// `(now × Σ rate − Σ rate × received) / 1 min` without visiting them.
    active_rate: i128,
    active_rate_at: i128,
}

impl Spend {
    fn start(&mut self, rate: u64, at: i64) {
        self.active_rate += i128::from(rate);
        self.active_rate_at += i128::from(rate) * i128::from(at);
    }

    fn stop(&mut self, rate: u64, at: i64) {
        self.active_rate -= i128::from(rate);
        self.active_rate_at -= i128::from(rate) * i128::from(at);
    }

    fn end(&mut self, now: i64, cost: u64, cap: usize) {
        if self.ended.len() >= cap {
            if let Some((_, c)) = self.ended.pop_front() {
                self.ended_sum -= u128::from(c);
            }
        }
        self.ended.push_back((now, cost));
        self.ended_sum += u128::from(cost);
    }

    fn slide(&mut self, now: i64) {
        while let Some(&(t, c)) = self.ended.front() {
            if now - t < SPEND_WINDOW_US {
                break;
            }
            self.ended.pop_front();
            self.ended_sum -= u128::from(c);
        }
    }

    /// (ended in the trailing hour, in progress) at `now`, micro-dollars.
    fn at(&mut self, now: i64) -> (u64, u64) {
        self.slide(now);
        let running = (i128::from(now) * self.active_rate - self.active_rate_at) / US_PER_MIN;
        let ended = u64::try_from(self.ended_sum).unwrap_or(u64::MAX);
        (ended, u64::try_from(running.max(0)).unwrap_or(u64::MAX))
    }
}

/// A call's cost at `rate` micro-dollars a minute.
fn cost(rate: u64, duration_us: i64) -> u64 {
    let c = i128::from(rate) * i128::from(duration_us.max(0)) / US_PER_MIN;
    u64::try_from(c).unwrap_or(u64::MAX)
}

#[derive(Debug)]
struct TenantState {
    /// Newest event time seen.
    now: i64,
    last_prune: i64,
    calls: FixedMap<CallSid, CallState>,
    numbers: FixedMap<u64, NumberState>,
    /// Dialled numbers: [inbound (the tenant's own), outbound (destinations)].
    dialled: [RunTracker; 2],
    hourly: Hourly,
    spend: Spend,
}

impl TenantState {
    fn new(now: i64) -> Self {
        Self {
            now,
            last_prune: now,
            calls: FixedMap::default(),
            numbers: FixedMap::default(),
            dialled: Default::default(),
            hourly: Hourly::new(now),
            spend: Spend::default(),
        }
    }

    /// Advances the tenant's clock to the event (never back) and sweeps when due.
    fn advance(&mut self, ctx: &Ctx) -> i64 {
        self.now = self.now.max(ctx.env.occurred_at.0);
        if self.now - self.last_prune >= PRUNE_EVERY_US {
            self.prune(ctx);
        }
        self.now
    }

    fn received(&mut self, ctx: &Ctx, call: CallSid, c: &CallReceived) -> Option<FraudVerdict> {
        let now = self.advance(ctx);
        if self.calls.contains_key(&call) {
            return None;
        }
        let s = ctx.s;
        let outbound = is_outbound(c.direction);
        let (remote, event_country) = if outbound { (&c.to, &c.to_country) } else { (&c.from, &c.from_country) };
        let entry = ctx.table.lookup(remote);
        let rate = if outbound { entry.map_or(0, |e| e.cost_per_min_micros) } else { s.inbound_cost_per_min_micros };
        let remote_key = number_key(remote);
        if self.calls.len() >= ctx.max_tracked {
            self.make_room_for_call(ctx);
        }
        self.spend.start(rate, now);
        let mut fired = 0u16;
        let mut hits = Vec::new();
        let mut add = |hit: Option<RuleHit>, rule: Rule| {
            if let Some(h) = hit.filter(|_| s.enabled(rule)) {
                fired |= rule.bit();
                hits.push(h);
            }
        };

        add(rules::premium_destination(s, outbound, remote, entry), Rule::PremiumDestination);
        add(rules::geo_permission(s, outbound, remote, event_country.as_deref(), entry), Rule::GeoPermission);
        if !remote.is_empty() {
            let cap = WINDOW_CAP.max(s.max_calls_per_number as usize + 1);
            let n = self.number(ctx, remote_key, now);
            let q = if outbound { &mut n.to } else { &mut n.from };
            slide(q, now, secs_us(s.velocity_window_secs));
            let capped = push_capped(q, now, cap);
            let rule = if outbound { Rule::VelocityTo } else { Rule::VelocityFrom };
            add(rules::velocity(s, outbound, remote, q.len(), capped), rule);
        }
        if let Some(key) = e164_key(&c.to) {
            let window = secs_us(s.sequential_window_secs);
            let (len, lo, hi) = self.dialled[usize::from(outbound)].record(now, window, key, ctx.max_tracked);
            if len >= s.sequential_run as usize {
                let (lo, hi) = (e164_from_key(lo), e164_from_key(hi));
                add(rules::sequential_dialling(s, outbound, remote, len, &lo, &hi), Rule::SequentialDialling);
            }
        }
        add(rules::off_hours(s, outbound, remote, Timestamp(now)), Rule::OffHours);
        let (hour, count, history, days) = self.hourly.record(now);
        let this_hour = now.div_euclid(HOUR_US);
        if self.hourly.fired_hour != this_hour && s.enabled(Rule::VolumeAnomaly) {
            let hit = rules::volume_anomaly(s, hour, count, &history[..days]);
            if hit.is_some() {
                self.hourly.fired_hour = this_hour;
            }
            add(hit, Rule::VolumeAnomaly);
        }
        if s.enabled(Rule::SpendVelocity) {
            let (ended, running) = self.spend.at(now);
            add(rules::spend_velocity(s, ended, running), Rule::SpendVelocity);
        }

        self.calls
            .insert(call, CallState { remote: Num::new(remote), remote_key, received: now, rate, ended: None, fired });
        ctx.verdict(remote, hits)
    }

    fn status(&mut self, ctx: &Ctx, call: CallSid, c: &CallStatusChanged) -> Option<FraudVerdict> {
        if !c.status.is_terminal() {
            return self.tick(ctx, call);
        }
        let now = self.advance(ctx);
        let s = ctx.s;
        let cs = self.calls.get_mut(&call).filter(|cs| cs.ended.is_none())?;
        cs.ended = Some(now);
        let duration_us = match c.duration_secs {
            Some(d) => secs_us(d),
            None => now - cs.received,
        };
        let (remote_key, rate, received) = (cs.remote_key, cs.rate, cs.received);
        self.spend.stop(rate, received);
        self.spend.end(now, cost(rate, duration_us), ctx.max_tracked);

        if duration_us > secs_us(s.short_call_max_secs) || cs.remote.as_str().is_empty() {
            return None;
        }
        let cap = WINDOW_CAP.max(s.short_call_count as usize);
        let window = secs_us(s.short_call_window_secs);
        let n = self.number(ctx, remote_key, now);
        slide(&mut n.short, now, window);
        push_capped(&mut n.short, now, cap);
        let count = n.short.len();
        let cs = self.calls.get_mut(&call)?;
        if !s.enabled(Rule::ShortCallBurst) || cs.fired & Rule::ShortCallBurst.bit() != 0 {
            return None;
        }
        let hit = rules::short_call_burst(s, cs.remote.as_str(), count, duration_us)?;
        cs.fired |= Rule::ShortCallBurst.bit();
        ctx.verdict(cs.remote.as_str(), vec![hit])
    }

    /// A call in progress moved on: only `spend_velocity` can fire.
    fn tick(&mut self, ctx: &Ctx, call: CallSid) -> Option<FraudVerdict> {
        let now = self.advance(ctx);
        let s = ctx.s;
        if !s.enabled(Rule::SpendVelocity) {
            return None;
        }
        let cs = self.calls.get(&call)?;
        if cs.ended.is_some() || cs.fired & Rule::SpendVelocity.bit() != 0 {
            return None;
        }
        let (ended, running) = self.spend.at(now);
        let hit = rules::spend_velocity(s, ended, running)?;
        let cs = self.calls.get_mut(&call)?;
        cs.fired |= Rule::SpendVelocity.bit();
        ctx.verdict(cs.remote.as_str(), vec![hit])
    }

    /// The windows of the number with `key`, made if need be (room made first when full).
    fn number(&mut self, ctx: &Ctx, key: u64, now: i64) -> &mut NumberState {
        if !self.numbers.contains_key(&key) && self.numbers.len() >= ctx.max_tracked {
            self.prune(ctx);
            if self.numbers.len() >= ctx.max_tracked {
                // Forget the least recently seen eighth (sorted, so the choice is deterministic).
                let mut by_age: Vec<(i64, u64)> = self.numbers.iter().map(|(&k, n)| (n.last_seen, k)).collect();
                by_age.sort_unstable();
                for &(_, k) in &by_age[..(by_age.len() / 8).max(1)] {
                    self.numbers.remove(&k);
                }
            }
        }
        let n = self.numbers.entry(key).or_default();
        n.last_seen = now;
        n
    }

    /// Makes room in the call table: sweeps, then forgets ended calls and then the oldest calls
    /// in progress (which stop counting towards spend), an eighth of the table at a time.
    fn make_room_for_call(&mut self, ctx: &Ctx) {
        self.prune(ctx);
        if self.calls.len() < ctx.max_tracked {
            return;
        }
        let mut by_age: Vec<(bool, i64, CallSid)> =
            self.calls.iter().map(|(&sid, c)| (c.ended.is_none(), c.received, sid)).collect();
        by_age.sort_unstable();
        for &(_, _, sid) in &by_age[..(by_age.len() / 8).max(1)] {
            if let Some(c) = self.calls.remove(&sid) {
                if c.ended.is_none() {
                    self.spend.stop(c.rate, c.received);
                }
            }
        }
    }

    /// Drops everything that left its window, ended calls past their keep time, and calls that
    /// never ended within `max_call_secs`.
    fn prune(&mut self, ctx: &Ctx) {
        let (now, s) = (self.now, ctx.s);
        self.last_prune = now;
        let (vw, sw) = (secs_us(s.velocity_window_secs), secs_us(s.short_call_window_secs));
        self.numbers.retain(|_, n| {
            slide(&mut n.from, now, vw);
            slide(&mut n.to, now, vw);
            slide(&mut n.short, now, sw);
            !(n.from.is_empty() && n.to.is_empty() && n.short.is_empty())
        });
        let spend = &mut self.spend;
        self.calls.retain(|_, c| match c.ended {
            Some(end) => now - end < ENDED_KEEP_US,
            None if now - c.received >= ctx.max_call_us => {
                spend.stop(c.rate, c.received);
                false
            }
            None => true,
        });
        for d in &mut self.dialled {
            d.slide(now, secs_us(s.sequential_window_secs));
        }
        self.spend.slide(now);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fraud::prefixes::PrefixEntry;
    use crate::fraud::rules::TenantFraudConfig;
    use voxgate_protocol::event::{CallStatus, Direction, EventId, StatusSource, Transcript};
    use voxgate_protocol::StreamSid;

    const T1: AccountSid = AccountSid::from_u128(0x1111);
    const T2: AccountSid = AccountSid::from_u128(0x2222);
    const OWN: &str = "+14155550100";

    /// Monday 2025-01-06 10:00 UTC, in seconds.
    fn base_secs() -> i64 {
        voxgate_protocol::time::days_from_civil(2025, 1, 6) * 86_400 + 10 * 3600
    }

    fn at(secs: f64) -> Timestamp {
        Timestamp(base_secs() * US_PER_SEC + (secs * 1e6) as i64)
    }

    fn env(tenant: AccountSid, call: u128, t: Timestamp, kind: u64, payload: Event) -> Envelope {
        Envelope {
            event_id: EventId::derive(kind, &[tenant.as_u128(), call, t.0 as u128]),
            tenant,
            call: Some(CallSid::from_u128(call)),
            occurred_at: t,
            payload,
        }
    }

    fn received(tenant: AccountSid, call: u128, t: Timestamp, dir: Direction, from: &str, to: &str) -> Envelope {
        received_c(tenant, call, t, dir, from, to, None, None)
    }

    #[allow(clippy::too_many_arguments)]
    fn received_c(
        tenant: AccountSid,
        call: u128,
        t: Timestamp,
        dir: Direction,
        from: &str,
        to: &str,
        from_country: Option<&str>,
        to_country: Option<&str>,
    ) -> Envelope {
        env(
            tenant,
            call,
            t,
            1,
            Event::CallReceived(CallReceived {
                from: from.into(),
                to: to.into(),
                direction: dir,
                status: CallStatus::Ringing,
                from_country: from_country.map(Into::into),
                to_country: to_country.map(Into::into),
                stream_session: format!("s{call}"),
            }),
        )
    }

    fn inbound(tenant: AccountSid, call: u128, t: Timestamp, from: &str) -> Envelope {
        received(tenant, call, t, Direction::Inbound, from, OWN)
    }

    fn outbound(tenant: AccountSid, call: u128, t: Timestamp, to: &str) -> Envelope {
        received(tenant, call, t, Direction::OutboundApi, OWN, to)
    }

    fn status(tenant: AccountSid, call: u128, t: Timestamp, st: CallStatus, duration: Option<u32>) -> Envelope {
        env(
            tenant,
            call,
            t,
            2,
            Event::CallStatusChanged(CallStatusChanged {
                status: st,
                source: StatusSource::Callback,
                sequence: None,
                duration_secs: duration,
            }),
        )
    }

    fn transcript(tenant: AccountSid, call: u128, t: Timestamp) -> Envelope {
        env(
            tenant,
            call,
            t,
            3,
            Event::Transcript(Transcript {
                stream_sid: StreamSid::from_u128(call),
                segment_index: 0,
                segment_event: EventId(0),
                start_ms: 0,
                end_ms: 1000,
                text: "hello".into(),
                model: "test".into(),
                processing_ms: 1,
                avg_logprob: -0.1,
                no_speech_prob: 0.0,
                rejected: None,
                track: voxgate_protocol::event::Track::Inbound,
                doubt: None,
            }),
        )
    }

    fn engine(c: FraudConfig) -> FraudEngine {
        FraudEngine::new(c, PrefixTable::builtin()).unwrap()
    }

    fn prefix(prefix: &str, cost: u64) -> PrefixEntry {
        PrefixEntry { prefix: prefix.into(), country: "ZZ".into(), cost_per_min_micros: cost, premium: false }
    }

    fn rules_of(v: &FraudVerdict) -> Vec<&str> {
        v.hits.iter().map(|h| h.rule.as_str()).collect()
    }

    /// A US number unlike the others, so no run forms by accident.
    fn caller(i: u64) -> String {
        format!("+1212{:07}", 1_000_000 + i * 37)
    }

    #[test]
    fn premium_destination_ends_outbound_calls_and_blocks_the_number() {
        let mut e = engine(FraudConfig::default());
        let ev = outbound(T1, 1, at(0.0), "+19005551234");
        let v = e.apply(&ev).unwrap();
        assert_eq!(v.severity, Severity::EndCall);
        assert_eq!(rules_of(&v), ["premium_destination"]);
        assert_eq!(v.hits[0].evidence, "call to +19005551234 matches premium-rate prefix +1900 (US, $2.0000/min)");
        assert_eq!(v.blocked_number.as_deref(), Some("+19005551234"));
        assert_eq!(v.blocked_until, Some(Timestamp(at(0.0).0 + 3600 * US_PER_SEC)));
        assert_eq!(v.cause, ev.event_id);
        // An ordinary destination is quiet.
        assert_eq!(e.apply(&outbound(T1, 2, at(1.0), "+14155550199")), None);
    }

    #[test]
    fn premium_destination_blocks_inbound_callers_from_premium_numbers() {
        let mut e = engine(FraudConfig::default());
        let v = e.apply(&inbound(T1, 1, at(0.0), "+449012345678")).unwrap();
        assert_eq!((v.severity, rules_of(&v)), (Severity::Block, vec!["premium_destination"]));
        assert!(v.hits[0].evidence.starts_with("call from +449012345678 matches premium-rate prefix +449"));
        assert_eq!(v.blocked_number.as_deref(), Some("+449012345678"));
    }

    #[test]
    fn premium_destination_fires_at_the_high_cost_threshold() {
        let c =
            FraudConfig { prefixes: vec![prefix("+999", 1_000_000), prefix("+998", 999_999)], ..Default::default() };
        let mut e = engine(c);
        let v = e.apply(&outbound(T1, 1, at(0.0), "+9991234567")).unwrap();
        assert_eq!(
            v.hits[0].evidence,
            "call to +9991234567: prefix +999 (ZZ) costs $1.0000/min, at or above the high-cost limit $1.0000/min"
        );
        assert_eq!(e.apply(&outbound(T1, 2, at(1.0), "+9981234567")), None);
        // Cuba is in the built-in table above the default limit.
        let v = e.apply(&outbound(T1, 3, at(2.0), "+5371234567")).unwrap();
        assert!(v.hits[0].evidence.contains("+53 (CU) costs $1.1000/min"), "{}", v.hits[0].evidence);
    }

    #[test]
    fn geo_permission_ends_calls_outside_the_allowed_countries() {
        let mut e = engine(FraudConfig { allowed_countries: vec!["US".into(), "CA".into()], ..Default::default() });
        let v = e.apply(&outbound(T1, 1, at(0.0), "+442071234567")).unwrap();
        assert_eq!((v.severity, rules_of(&v)), (Severity::EndCall, vec!["geo_permission"]));
        assert_eq!(
            v.hits[0].evidence,
            "call to +442071234567 is in GB (from prefix +44), not one of the allowed countries US, CA"
        );
        // The webhook's country wins over the prefix, in any case.
        let ev = received_c(T1, 2, at(1.0), Direction::Inbound, "+14165550123", OWN, Some("mx"), None);
        let v = e.apply(&ev).unwrap();
        assert!(v.hits[0].evidence.contains("is in MX (FromCountry from the webhook)"), "{}", v.hits[0].evidence);
        let ev = received_c(T1, 3, at(2.0), Direction::Inbound, "+442071234567", OWN, Some("us"), None);
        assert_eq!(e.apply(&ev), None);
        // Allowed by prefix; unknown numbers do not trip the rule.
        assert_eq!(e.apply(&outbound(T1, 4, at(3.0), "+14165550199")), None);
        assert_eq!(e.apply(&inbound(T1, 5, at(4.0), "anonymous")), None);
        // No list: every country is allowed.
        let mut e = engine(FraudConfig::default());
        assert_eq!(e.apply(&outbound(T1, 1, at(0.0), "+442071234567")), None);
    }

    #[test]
    fn velocity_from_blocks_the_eleventh_call_in_a_minute() {
        let mut e = engine(FraudConfig::default());
        let spammer = "+13125550111";
        for i in 0..10 {
            assert_eq!(e.apply(&inbound(T1, i, at(i as f64 * 5.0), spammer)), None, "call {i}");
        }
        let v = e.apply(&inbound(T1, 10, at(50.0), spammer)).unwrap();
        assert_eq!((v.severity, rules_of(&v)), (Severity::Block, vec!["velocity_from"]));
        assert_eq!(v.hits[0].evidence, "11 calls from +13125550111 in 60 s (limit 10)");
        assert_eq!(v.blocked_number.as_deref(), Some(spammer));
        // Another caller is unaffected; once the window slides the count drops.
        assert_eq!(e.apply(&inbound(T1, 11, at(51.0), &caller(1))), None);
        assert_eq!(e.apply(&inbound(T1, 12, at(111.0), spammer)), None);
    }

    #[test]
    fn velocity_to_blocks_repeated_calls_to_one_destination() {
        let mut e = engine(FraudConfig::default());
        for i in 0..10 {
            assert_eq!(e.apply(&outbound(T1, i, at(i as f64), "+13125550111")), None, "call {i}");
        }
        let v = e.apply(&outbound(T1, 10, at(10.0), "+13125550111")).unwrap();
        assert_eq!((v.severity, rules_of(&v)), (Severity::Block, vec!["velocity_to"]));
        assert_eq!(v.hits[0].evidence, "11 calls to +13125550111 in 60 s (limit 10)");
        // Inbound calls from that number count separately.
        assert_eq!(e.apply(&inbound(T1, 11, at(11.0), "+13125550111")), None);
    }

    #[test]
    fn short_call_burst_blocks_a_wangiri_number() {
        let mut e = engine(FraudConfig::default());
        let bait = "+13125550123";
        for i in 0..4u128 {
            let t = i as f64 * 30.0;
            assert_eq!(e.apply(&inbound(T1, i, at(t), bait)), None);
            assert_eq!(e.apply(&status(T1, i, at(t + 1.0), CallStatus::NoAnswer, Some(0))), None, "call {i}");
        }
        // A long call does not count, nor does a repeated terminal callback.
        assert_eq!(e.apply(&inbound(T1, 10, at(130.0), bait)), None);
        assert_eq!(e.apply(&status(T1, 10, at(190.0), CallStatus::Completed, Some(60))), None);
        assert_eq!(e.apply(&status(T1, 3, at(191.0), CallStatus::NoAnswer, Some(0))), None);
        // Duration from event time when Twilio gives none: 3 s is still short.
        assert_eq!(e.apply(&inbound(T1, 4, at(200.0), bait)), None);
        let v = e.apply(&status(T1, 4, at(203.0), CallStatus::Canceled, None)).unwrap();
        assert_eq!((v.severity, rules_of(&v)), (Severity::Block, vec!["short_call_burst"]));
        assert_eq!(
            v.hits[0].evidence,
            "5 calls with +13125550123 lasting at most 3 s within 300 s (limit 5); this one lasted 3.0 s"
        );
        assert_eq!(v.blocked_number.as_deref(), Some(bait));
        // 3.5 s is not short.
        let mut e = engine(FraudConfig::default());
        for i in 0..5u128 {
            e.apply(&outbound(T1, i, at(i as f64 * 10.0), bait));
            assert_eq!(e.apply(&status(T1, i, at(i as f64 * 10.0 + 3.5), CallStatus::Completed, None)), None);
        }
    }

    #[test]
    fn short_call_burst_forgets_calls_outside_its_window() {
        let mut e = engine(FraudConfig::default());
        for i in 0..6u128 {
            let t = i as f64 * 80.0; // 5 calls span 320 s > 300 s
            e.apply(&inbound(T1, i, at(t), "+13125550123"));
            assert_eq!(e.apply(&status(T1, i, at(t + 1.0), CallStatus::Busy, Some(0))), None, "call {i}");
        }
    }

    #[test]
    fn sequential_dialling_outbound_alerts_without_blocking() {
        let mut e = engine(FraudConfig::default());
        for (i, n) in [102, 100, 104, 101].into_iter().enumerate() {
            assert_eq!(e.apply(&outbound(T1, i as u128, at(i as f64 * 10.0), &format!("+1555010{n:04}"))), None);
        }
        let v = e.apply(&outbound(T1, 9, at(40.0), "+15550100103")).unwrap();
        assert_eq!((v.severity, rules_of(&v)), (Severity::Alert, vec!["sequential_dialling"]));
        assert_eq!(
            v.hits[0].evidence,
            "5 calls to consecutive numbers +15550100100 to +15550100104 within 300 s (run limit 5); latest to +15550100103"
        );
        assert_eq!((v.blocked_number, v.blocked_until), (None, None));
        // The run continues: the next number alerts again (a new call).
        let v = e.apply(&outbound(T1, 10, at(50.0), "+15550100105")).unwrap();
        assert!(v.hits[0].evidence.starts_with("6 calls"));
        // Outbound severity is configurable.
        let mut e = engine(FraudConfig { sequential_outbound_severity: Severity::EndCall, ..Default::default() });
        let mut last = None;
        for i in 0..5u128 {
            last = e.apply(&outbound(T1, i, at(i as f64), &format!("+1555010{:04}", 200 + i)));
        }
        let v = last.unwrap();
        assert_eq!((v.severity, v.blocked_number.as_deref()), (Severity::EndCall, Some("+15550100204")));
    }

    #[test]
    fn sequential_dialling_stays_quiet_below_the_run_or_outside_the_window() {
        let mut e = engine(FraudConfig::default());
        for (i, n) in [1, 2, 3, 4, 6, 7, 8, 9].into_iter().enumerate() {
            assert_eq!(e.apply(&outbound(T1, i as u128, at(i as f64), &format!("+1555010{n:04}"))), None);
        }
        let mut e = engine(FraudConfig::default());
        for i in 0..5u128 {
            assert_eq!(e.apply(&outbound(T1, i, at(i as f64 * 80.0), &format!("+1555010{:04}", i))), None);
        }
    }

    #[test]
    fn sequential_dialling_inbound_blocks_the_caller_sweeping_the_tenants_numbers() {
        let mut e = engine(FraudConfig::default());
        for i in 0..4u128 {
            let ev = received(T1, i, at(i as f64), Direction::Inbound, &caller(i as u64), &format!("+1415555{:04}", i));
            assert_eq!(e.apply(&ev), None);
        }
        let ev = received(T1, 4, at(4.0), Direction::Inbound, "+13125550999", "+14155550004");
        let v = e.apply(&ev).unwrap();
        assert_eq!((v.severity, rules_of(&v)), (Severity::Block, vec!["sequential_dialling"]));
        assert!(v.hits[0].evidence.contains("into the tenant's consecutive numbers +14155550000 to +14155550004"));
        assert_eq!(v.blocked_number.as_deref(), Some("+13125550999"));
    }

    #[test]
    fn off_hours_alerts_outside_business_hours_only_when_configured() {
        let mut e = engine(FraudConfig::default());
        let saturday_3am = 5.0 * 86_400.0 - 7.0 * 3600.0; // base is Monday 10:00
        assert_eq!(e.apply(&inbound(T1, 1, at(saturday_3am), &caller(1))), None);
        let hours = crate::fraud::BusinessHours { utc_offset_minutes: 60, ..Default::default() };
        let mut e = engine(FraudConfig { business_hours: Some(hours), ..Default::default() });
        let v = e.apply(&outbound(T1, 1, at(saturday_3am), "+14155550199")).unwrap();
        assert_eq!((v.severity, rules_of(&v)), (Severity::Alert, vec!["off_hours"]));
        assert_eq!(
            v.hits[0].evidence,
            "call to +14155550199 at Sat 04:00 local time is outside business hours 09:00-17:00 Mon,Tue,Wed,Thu,Fri (UTC+01:00)"
        );
        assert_eq!((v.blocked_number, v.blocked_until), (None, None));
        // Monday 10:00 UTC is 11:00 local.
        assert_eq!(e.apply(&outbound(T1, 2, at(saturday_3am + 2.0 * 86_400.0 + 7.0 * 3600.0), "+14155550199")), None);
    }

    #[test]
    fn volume_anomaly_alerts_once_per_hour_after_three_days_of_history() {
        let day = 86_400.0;
        let mut e = engine(FraudConfig::default());
        let mut call = 0u128;
        let mut next = |e: &mut FraudEngine, t: f64| {
            call += 1;
            e.apply(&inbound(T1, call, at(t), &caller(call as u64)))
        };
        // Two calls in the 10:00 hour on each of three days.
        for d in 0..3 {
            for k in 0..2 {
                assert_eq!(next(&mut e, d as f64 * day + k as f64 * 60.0), None);
            }
        }
        // Day 4: mean 2, σ 0 → floored at 1, threshold 4; but at least 10 calls are needed.
        for k in 0..9 {
            assert_eq!(next(&mut e, 3.0 * day + k as f64 * 60.0), None, "call {k}");
        }
        let v = next(&mut e, 3.0 * day + 600.0).unwrap();
        assert_eq!((v.severity, rules_of(&v)), (Severity::Alert, vec!["volume_anomaly"]));
        assert_eq!(
            v.hits[0].evidence,
            "10 calls in the hour from 10:00 UTC; the same hour over the last 3 days averaged 2.0 (σ 0.0), \
             threshold 4.0 (σ at least 1, at least 10 calls)"
        );
        // Once per tenant-hour.
        assert_eq!(next(&mut e, 3.0 * day + 660.0), None);
        // Two days of history are not enough.
        let mut e = engine(FraudConfig::default());
        for d in 0..2 {
            next(&mut e, d as f64 * day);
        }
        for k in 0..30 {
            assert_eq!(next(&mut e, 2.0 * day + k as f64 * 10.0), None);
        }
    }

    #[test]
    fn spend_velocity_ends_calls_once_the_hourly_estimate_is_over_the_limit() {
        // $0.50 a minute: 100 minutes is exactly the $50 limit.
        let c = FraudConfig { prefixes: vec![prefix("+999", 500_000)], ..Default::default() };
        let mut e = engine(c);
        assert_eq!(e.apply(&outbound(T1, 1, at(0.0), "+9991000001")), None);
        assert_eq!(e.apply(&status(T1, 1, at(3000.0), CallStatus::Completed, Some(3000))), None);
        assert_eq!(e.apply(&outbound(T1, 2, at(3000.0), "+9992000002")), None);
        assert_eq!(e.apply(&status(T1, 2, at(6000.0), CallStatus::Completed, Some(3000))), None);
        // $50.00 ended in the last hour: at the limit, not above it.
        assert_eq!(e.apply(&outbound(T1, 3, at(6000.0), "+9993000003")), None);
        assert_eq!(e.apply(&transcript(T1, 3, at(6000.0))), None);
        // Twelve seconds of call 3 add $0.10.
        let v = e.apply(&transcript(T1, 3, at(6012.0))).unwrap();
        assert_eq!((v.severity, rules_of(&v)), (Severity::EndCall, vec!["spend_velocity"]));
        assert_eq!(
            v.hits[0].evidence,
            "estimated spend $50.1000 in the trailing hour is above the limit $50.0000 \
             (ended calls $50.0000, calls in progress $0.1000)"
        );
        assert_eq!(v.blocked_number.as_deref(), Some("+9993000003"));
        // Not repeated for the same call; a new call is ended too.
        assert_eq!(e.apply(&transcript(T1, 3, at(6013.0))), None);
        let v = e.apply(&outbound(T1, 4, at(6014.0), "+9994000004")).unwrap();
        assert_eq!(rules_of(&v), ["spend_velocity"]);
        // An hour after the first call ended, its cost has left the window.
        assert_eq!(e.apply(&status(T1, 3, at(6020.0), CallStatus::Completed, Some(20))), None);
        assert_eq!(e.apply(&status(T1, 4, at(6020.0), CallStatus::Completed, Some(6))), None);
        assert_eq!(e.apply(&outbound(T1, 5, at(6601.0), "+9995000005")), None);
    }

    #[test]
    fn per_tenant_overrides_apply_to_their_tenant_only() {
        let mut c = FraudConfig::default();
        c.tenants.insert(
            T1.to_string(),
            TenantFraudConfig {
                max_calls_per_number: Some(2),
                disabled_rules: Some(vec!["premium_destination".into()]),
                ..Default::default()
            },
        );
        let mut e = engine(c);
        for tenant in [T1, T2] {
            for i in 0..2u128 {
                assert_eq!(e.apply(&inbound(tenant, i, at(i as f64), "+13125550111")), None);
            }
        }
        let v = e.apply(&inbound(T1, 2, at(2.0), "+13125550111")).unwrap();
        assert_eq!(v.hits[0].evidence, "3 calls from +13125550111 in 60 s (limit 2)");
        assert_eq!(e.apply(&inbound(T2, 2, at(2.0), "+13125550111")), None);
        // T1 switched premium_destination off; T2 still has it.
        assert_eq!(e.apply(&outbound(T1, 3, at(3.0), "+19005550000")), None);
        assert!(e.apply(&outbound(T2, 3, at(3.0), "+19005550000")).is_some());
    }

    #[test]
    fn repeated_webhooks_and_unknown_calls_are_ignored() {
        let mut e = engine(FraudConfig::default());
        for _ in 0..20 {
            assert_eq!(e.apply(&inbound(T1, 1, at(0.0), "+13125550111")), None);
        }
        assert_eq!(e.apply(&status(T1, 99, at(1.0), CallStatus::NoAnswer, Some(0))), None);
        assert_eq!(e.apply(&transcript(T2, 99, at(1.0))), None);
        let mut no_call = inbound(T1, 2, at(1.0), "+19005550000");
        no_call.call = None;
        assert_eq!(e.apply(&no_call), None);
        // A clock stepping back is treated as standing still.
        assert_eq!(e.apply(&inbound(T1, 3, at(-100.0), "+13125550112")), None);
        assert_eq!(e.state_size().calls, 2);
    }

    #[test]
    fn set_config_keeps_the_windows() {
        let mut e = engine(FraudConfig::default());
        for i in 0..8u128 {
            assert_eq!(e.apply(&inbound(T1, i, at(i as f64), "+13125550111")), None);
        }
        let bad = FraudConfig { max_calls_per_number: 0, ..Default::default() };
        assert!(e.set_config(bad).is_err());
        assert_eq!(e.config().max_calls_per_number, 10);
        e.set_config(FraudConfig {
            max_calls_per_number: 5,
            prefixes: vec![prefix("+1312", 10)],
            ..Default::default()
        })
        .unwrap();
        assert_eq!(e.prefixes().lookup("+13125550111").unwrap().country, "ZZ");
        let v = e.apply(&inbound(T1, 8, at(8.0), "+13125550111")).unwrap();
        assert_eq!(v.hits[0].evidence, "9 calls from +13125550111 in 60 s (limit 5)");
    }

    #[test]
    fn state_stays_bounded() {
        let mut e = engine(FraudConfig { max_tracked_numbers: 64, ..Default::default() });
        for i in 0..5000u128 {
            let t = at(i as f64 * 0.01);
            e.apply(&inbound(T1, i, t, &caller(i as u64)));
            e.apply(&status(T1, i, t, CallStatus::NoAnswer, Some(0)));
        }
        let s = e.state_size();
        assert!(s.numbers <= 64 && s.calls <= 64 && s.dialled <= 64, "{s:?}");
        // Once every window has passed, a sweep leaves almost nothing.
        e.apply(&inbound(T1, 9999, at(3600.0), &caller(9999)));
        let s = e.state_size();
        assert!(s.numbers <= 1 && s.calls <= 1, "{s:?}");
    }

    /// A reproducible mix of ordinary and fraudulent traffic over three tenants and several days,
    /// in event-time order.
    fn traffic() -> Vec<Envelope> {
        let mut x: u64 = 0x1234_5678;
        let mut rnd = move |n: u64| {
            x = x.wrapping_add(1);
            crate::fraud::mix(x) % n
        };
        let mut out = Vec::new();
        let mut t = 0.0;
        for call in 0..6000u128 {
            t += if rnd(300) == 0 { 3600.0 } else { rnd(2) as f64 + 0.1 };
            let tenant = [T1, T2, AccountSid::from_u128(0x3333)][rnd(3) as usize];
            let remote = match rnd(10) {
                0 => "+19005550000".to_string(),
                1..=3 => "+13125550111".to_string(),
                4 => format!("+1555010{:04}", rnd(8)),
                5 => "+5371234567".to_string(),
                _ => caller(rnd(100_000)),
            };
            let ev = if rnd(2) == 0 {
                inbound(tenant, call, at(t), &remote)
            } else {
                outbound(tenant, call, at(t), &remote)
            };
            out.push((at(t), out.len(), ev));
            let dur = [0, 1, 2, 30, 600, 3000][rnd(6) as usize];
            if rnd(4) == 0 {
                out.push((at(t + 0.5), out.len(), transcript(tenant, call, at(t + 0.5))));
            }
            let end = at(t + dur as f64 + 0.05);
            out.push((end, out.len(), status(tenant, call, end, CallStatus::Completed, Some(dur))));
        }
        out.sort_by_key(|(t, i, _)| (*t, *i));
        out.into_iter().map(|(_, _, e)| e).collect()
    }

    #[test]
    fn same_events_give_the_same_verdicts() {
        let mut c = FraudConfig {
            allowed_countries: vec!["US".into()],
            business_hours: Some(Default::default()),
            max_tracked_numbers: 500,
            ..Default::default()
        };
        c.tenants.insert(T2.to_string(), TenantFraudConfig { max_calls_per_number: Some(3), ..Default::default() });
        let events = traffic();
        let run = |c: &FraudConfig| {
            let mut e = engine(c.clone());
            events.iter().map(|ev| e.apply(ev)).collect::<Vec<_>>()
        };
        let a = run(&c);
        let b = run(&c);
        assert_eq!(a, b);
        let mut fired: Vec<&str> = a.iter().flatten().flat_map(|v| v.hits.iter().map(|h| h.rule.as_str())).collect();
        fired.sort_unstable();
        fired.dedup();
        for rule in [
            "premium_destination",
            "geo_permission",
            "velocity_from",
            "velocity_to",
            "short_call_burst",
            "sequential_dialling",
            "off_hours",
            "spend_velocity",
        ] {
            assert!(fired.contains(&rule), "{rule} never fired: {fired:?}");
        }
    }

    #[test]
    fn e164_keys_round_trip() {
        for n in ["+1", "+14155550100", "+123456789012345", "+1000"] {
            assert_eq!(e164_from_key(e164_key(n).unwrap()), n);
        }
        for n in ["", "+", "1415", "+1415x", "+1234567890123456"] {
            assert_eq!(e164_key(n), None, "{n}");
        }
    }
}
