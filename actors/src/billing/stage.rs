//! The billing stage: usage is a pure fold of the calls, transcripts and tenants logs into a
//! [`UsageBook`], applied idempotently (by event id), so a node rebuilds it from the start of the
//! logs on every start and then follows them: a restart, a crash mid-stream or a replay from zero
//! give the same totals to the micro-dollar. The REST API reads the books ([`Billing::read`]).
//!
//! It runs on the follower harness ([`crate::follow`]) as [`BillingFollower`]. Every node keeps
//! the books; the tenants' actions are split into tenant shards, and a node acts for the shards
//! it holds ([`Billing::take_over`]): it fires usage triggers, records budget stops and delivers
//! trigger callbacks.
//!
//! Usage triggers and budget stops live on the `billing` log. A trigger's creation, update and
//! deletion are recorded there by the REST API ([`Billing::command`]); a firing is recorded there
//! (event id derived from the trigger and the period, so once per period) before its callback is
//! sent, and every callback attempt after it is made. A node taking a shard over first folds in
//! what the shard's previous owner recorded, then resumes the firings whose callback has no final
//! attempt (and resumes any that arrive later), so a callback is not lost and not fired for a
//! period twice by a restart or a move. The receiver may see an attempt again if a node died (or
//! lost its shard) between sending it and recording it: the `IdempotencyToken` is for that.
//!
//! Must not: do I/O other than the log's (what billing does to the world goes through
//! [`BillingEffects`]), or read the wall clock (time is the injected clock's).

use std::collections::{BTreeMap, BTreeSet};
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use voxgate_protocol::event::{
    AlertRaised, CallbackOutcome, Event, Severity, TriggerCallbackAttempted, UsageTriggerFired,
};
use voxgate_protocol::{AccountSid, CallSid, Clock, Envelope, EventId, Timestamp};
use voxgate_storage::{topics, Log, StorageError};

use super::{CallbackPolicy, Month, TriggerBook, TriggerError, TriggerSid, UsageBook, UsageChange};
use crate::call::id_kind;
use crate::follow::Follower;
use crate::progress::Progress;
use crate::stage::Shard;

/// The logs billing folds, in the order a round reads them.
pub const TOPICS: [&str; 4] = [topics::TENANTS, topics::CALLS, topics::TRANSCRIPTS, topics::BILLING];

/// A callback's HTTP status, or why there was none.
pub type CallbackResult = (Option<u16>, Option<String>);

/// A callback on its way.
pub type Sending = Pin<Box<dyn Future<Output = CallbackResult> + Send>>;

/// What billing does to the world, provided by the node.
pub trait BillingEffects: Send + Sync + 'static {
    /// Refuses `account`'s new calls until `until` and ends its active ones.
    fn stop_account(&self, account: AccountSid, until: Timestamp, budget_micros: u64);
    /// A call reached a terminal status (a quota place held for it can go).
    fn call_ended(&self, call: CallSid);
    /// Every tenant in the directory.
    fn tenants(&self) -> Vec<AccountSid>;
    /// A tenant's label in metrics.
    fn label(&self, tenant: AccountSid) -> String;
    /// Sends a firing's callback once: the HTTP status, or why there was none.
    fn send_callback(&self, tenant: AccountSid, fired: &UsageTriggerFired) -> Sending;
}

/// A firing whose callback has no final attempt yet.
#[derive(Debug, Clone)]
struct Delivery {
    tenant: AccountSid,
    fired: UsageTriggerFired,
    attempts: u32,
}

/// What billing knows: usage, triggers and budgets, and callbacks still to deliver.
pub struct Books {
    pub usage: UsageBook,
    pub triggers: TriggerBook,
    deliveries: BTreeMap<String, Delivery>,
    /// Firings whose callback had its final attempt (a firing read again after it is not owed).
    finished: BTreeSet<String>,
}

impl Books {
    /// Applies one event of any of the four logs; returns the usage it changed.
    fn apply(&mut self, env: &Envelope) -> Vec<UsageChange> {
        match &env.payload {
            Event::UsageTriggerFired(f) => {
                self.triggers.apply(env);
                if !self.finished.contains(&f.idempotency_token) {
                    self.deliveries.entry(f.idempotency_token.clone()).or_insert_with(|| Delivery {
                        tenant: env.tenant,
                        fired: f.clone(),
                        attempts: 0,
                    });
                }
                Vec::new()
            }
            Event::TriggerCallbackAttempted(a) => {
                match a.outcome {
                    CallbackOutcome::Retrying => {
                        if let Some(d) = self.deliveries.get_mut(&a.idempotency_token) {
                            d.attempts = d.attempts.max(a.attempt);
                        }
                    }
                    CallbackOutcome::Delivered | CallbackOutcome::GaveUp => {
                        self.deliveries.remove(&a.idempotency_token);
                        self.finished.insert(a.idempotency_token.clone());
                    }
                }
                Vec::new()
            }
            Event::UsageTriggerCreated(c) => {
                self.triggers.apply(env);
                if let Ok(sid) = TriggerSid::parse(&c.sid) {
                    self.triggers.observe(&self.usage, env.tenant, sid, env.occurred_at);
                }
                Vec::new()
            }
            Event::UsageTriggerUpdated(_) | Event::UsageTriggerDeleted(_) | Event::BudgetExceeded(_) => {
                self.triggers.apply(env);
                Vec::new()
            }
            _ => self.usage.apply(env),
        }
    }
}

/// The tenant shards a billing node acts for.
#[derive(Debug, Default, Clone)]
struct Acting {
    shards: Vec<u32>,
    of: u32,
}

impl Acting {
    fn holds(&self, account: AccountSid) -> bool {
        !self.shards.is_empty() && self.shards.contains(&Shard::of_tenant(account, self.of))
    }
}

/// The books, shared by the follower, the REST API and the acting side.
pub struct Billing {
    books: Mutex<Books>,
    log: Log,
    clock: Arc<dyn Clock>,
    effects: Arc<dyn BillingEffects>,
    policy: CallbackPolicy,
    /// One trigger command at a time (checks see the previous command's effect).
    commands: tokio::sync::Mutex<()>,
    /// How far the follower has read the calls log (health and lag metrics).
    progress: Arc<Progress>,
    /// The tenant shards this node acts for (fires triggers, records budget stops, delivers
    /// callbacks). Every node keeps the books; in a cluster each shard has one acting node.
    acting: Mutex<Acting>,
    /// Callbacks being delivered by this node, by idempotency token (one sender each).
    sending: Mutex<BTreeSet<String>>,
    /// How far the follower has folded the billing log in (a node taking tenants over first
    /// sees what their previous owner fired).
    applied: tokio::sync::watch::Sender<u64>,
}

/// Why a trigger command failed.
#[derive(Debug, thiserror::Error)]
pub enum BillingCommandError {
    #[error(transparent)]
    Rule(#[from] TriggerError),
    #[error("event log: {0}")]
    Log(#[from] StorageError),
}

impl Billing {
    /// Empty books (the follower fills them from the logs); acts for no tenant until
    /// [`Billing::take_over`].
    pub fn new(
        usage: UsageBook,
        triggers: TriggerBook,
        policy: CallbackPolicy,
        log: Log,
        clock: Arc<dyn Clock>,
        effects: Arc<dyn BillingEffects>,
    ) -> Result<Self, StorageError> {
        let progress = Arc::new(Progress::new(log.partitions(topics::CALLS)? as usize));
        Ok(Self {
            books: Mutex::new(Books { usage, triggers, deliveries: BTreeMap::new(), finished: BTreeSet::new() }),
            log,
            clock,
            effects,
            policy,
            commands: tokio::sync::Mutex::new(()),
            progress,
            acting: Mutex::default(),
            sending: Mutex::default(),
            applied: tokio::sync::watch::Sender::new(0),
        })
    }

    /// Resumes the undelivered callbacks of the tenants this node acts for (those it is sending
    /// already aside).
    fn resume_deliveries(self: &Arc<Self>) {
        let pending: Vec<Delivery> =
            self.read().deliveries.values().filter(|d| self.acts_for(d.tenant)).cloned().collect();
        for d in pending {
            self.spawn_delivery(d);
        }
    }

    fn acting(&self) -> MutexGuard<'_, Acting> {
        self.acting.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether this node acts for `account` now.
    fn acts_for(&self, account: AccountSid) -> bool {
        self.acting().holds(account)
    }

    /// This node starts acting for the tenants of `shards` (of `of`): resumes their undelivered
    /// callbacks and judges every trigger and budget it now owns (what the previous owner fired is
    /// in the billing log, and a firing's event id is derived from trigger and period, so nothing
    /// fires twice).
    pub async fn take_over(self: &Arc<Self>, shards: Vec<u32>, of: u32) {
        // What the shards' previous owner recorded is folded in first.
        let head = self.log.durable_head(topics::BILLING, 0).unwrap_or(0);
        let mut rx = self.applied.subscribe();
        if tokio::time::timeout(Duration::from_secs(10), rx.wait_for(|n| *n >= head)).await.is_err() {
            tracing::warn!(stage = "billing", head, "taking tenants over before the billing log is folded in");
        }
        drop(rx);
        tracing::info!(stage = "billing", ?shards, of, "acting for these tenant shards");
        *self.acting() = Acting { shards, of };
        self.resume_deliveries();
        self.judge(&[], true).await;
    }

    /// This node stops acting (its shards moved to other nodes, or the node is stopping). A
    /// callback being sent stops before its next attempt; the shard's new owner resumes it.
    pub fn step_down(&self) {
        *self.acting() = Acting::default();
    }

    /// The follower's position in the calls log.
    pub fn progress(&self) -> Arc<Progress> {
        self.progress.clone()
    }

    pub fn read(&self) -> MutexGuard<'_, Books> {
        self.books.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Checks a trigger command against the books (`check` returns the event to record), records
    /// it on the billing log as event `id` and applies it; returns the event.
    pub async fn command(
        &self,
        tenant: AccountSid,
        id: EventId,
        check: impl FnOnce(&Books, Timestamp) -> Result<Event, TriggerError>,
    ) -> Result<Envelope, BillingCommandError> {
        let _one_at_a_time = self.commands.lock().await;
        let now = self.clock.now();
        let payload = check(&self.read(), now)?;
        let env = Envelope { event_id: id, tenant, call: None, occurred_at: now, payload };
        self.log.append(topics::BILLING, 0, &voxgate_protocol::encode(&env)).await?;
        self.read().apply(&env);
        tracing::info!(stage = "billing", tenant = %tenant, kind = env.payload.kind(), "billing change recorded");
        Ok(env)
    }

    async fn record(&self, topic: &str, env: &Envelope) -> Result<(), StorageError> {
        self.log.append(topic, env.tenant.partition_key(), &voxgate_protocol::encode(env)).await?;
        Ok(())
    }

    /// Judges the triggers and budgets of the tenants this node acts for at `now` (on `changes`,
    /// or on everything when `all`), records what fired and acts on it.
    async fn judge(self: &Arc<Self>, changes: &[UsageChange], all: bool) {
        let acting = self.acting().clone();
        if acting.shards.is_empty() {
            return;
        }
        let owns = |a: AccountSid| acting.holds(a);
        let now = self.clock.now();
        let candidates: Vec<AccountSid> =
            if all { self.effects.tenants() } else { changes.iter().map(|c| c.tenant).collect() };
        let (firings, budgets) = {
            let mut b = self.read();
            let Books { usage, triggers, .. } = &mut *b;
            let firings = if all {
                triggers.evaluate_all_for(usage, now, owns)
            } else {
                triggers.evaluate_for(usage, changes, now, owns)
            };
            let mut budgets = triggers.budgets_reached(usage, &candidates, now);
            budgets.retain(|(a, _, _)| owns(*a));
            (firings, budgets)
        };
        for f in firings {
            if !self.acts_for(f.account_sid) {
                // Its shard moved meanwhile: the new owner judges it.
                self.read().triggers.forget_firing(f.account_sid, f.usage_trigger_sid, f.period_start);
                continue;
            }
            let period = f.period_start.0 as u128;
            let sid = f.usage_trigger_sid.0;
            let event = f.event();
            let fired = Envelope {
                event_id: EventId::derive(id_kind::TRIGGER_FIRED, &[sid, period]),
                tenant: f.account_sid,
                call: None,
                occurred_at: now,
                payload: Event::UsageTriggerFired(event.clone()),
            };
            if let Err(e) = self.record(topics::BILLING, &fired).await {
                // Not recorded, so not fired: the next judgement tries again.
                self.read().triggers.forget_firing(f.account_sid, f.usage_trigger_sid, f.period_start);
                metrics::counter!("voxgate_billing_record_failures_total").increment(1);
                tracing::error!(stage = "billing", tenant = %f.account_sid, trigger = %f.usage_trigger_sid, error = %e, "trigger firing not recorded; retried at the next judgement");
                continue;
            }
            self.read().apply(&fired);
            let alert = Envelope {
                event_id: EventId::derive(id_kind::TRIGGER_ALERT, &[sid, period]),
                payload: Event::AlertRaised(AlertRaised {
                    source: "billing".into(),
                    name: "usage_trigger".into(),
                    severity: Severity::Alert,
                    message: format!(
                        "usage trigger {} fired: {} {} is {} (threshold {})",
                        f.usage_trigger_sid,
                        f.usage_category,
                        f.trigger_by.as_str(),
                        f.current_value,
                        f.trigger_value
                    ),
                }),
                ..fired.clone()
            };
            if let Err(e) = self.record(topics::ALERTS, &alert).await {
                tracing::error!(stage = "billing", tenant = %f.account_sid, error = %e, "trigger alert not recorded");
            }
            metrics::counter!("voxgate_usage_triggers_fired_total", "tenant" => self.effects.label(f.account_sid))
                .increment(1);
            tracing::warn!(stage = "billing", tenant = %f.account_sid, trigger = %f.usage_trigger_sid, token = %f.idempotency_token, current = %f.current_value, "usage trigger fired");
            self.spawn_delivery(Delivery { tenant: f.account_sid, fired: event, attempts: 0 });
        }
        for (account, spent, budget) in budgets {
            if !self.acts_for(account) {
                continue;
            }
            let month = Month::of(now);
            let ev = TriggerBook::budget_event(month, spent, budget);
            let until = ev.until;
            let exceeded = Envelope {
                event_id: EventId::derive(id_kind::BUDGET_EXCEEDED, &[account.as_u128(), month.start().0 as u128]),
                tenant: account,
                call: None,
                occurred_at: now,
                payload: Event::BudgetExceeded(ev),
            };
            // The stop applies even if it cannot be recorded now; recording is retried at the
            // next judgement (the account is not marked stopped until it is).
            self.effects.stop_account(account, until, budget);
            if let Err(e) = self.record(topics::BILLING, &exceeded).await {
                metrics::counter!("voxgate_billing_record_failures_total").increment(1);
                tracing::error!(stage = "billing", tenant = %account, error = %e, "budget stop not recorded; retried at the next judgement");
                continue;
            }
            self.read().apply(&exceeded);
            let alert = Envelope {
                event_id: EventId::derive(id_kind::BUDGET_ALERT, &[account.as_u128(), month.start().0 as u128]),
                payload: Event::AlertRaised(AlertRaised {
                    source: "billing".into(),
                    name: "budget_exceeded".into(),
                    severity: Severity::EndCall,
                    message: format!(
                        "monthly budget of {account} spent: {} of {} usd in {month}; calls refused until the month ends",
                        super::format_micros(spent),
                        super::format_micros(budget)
                    ),
                }),
                ..exceeded.clone()
            };
            if let Err(e) = self.record(topics::ALERTS, &alert).await {
                tracing::error!(stage = "billing", tenant = %account, error = %e, "budget alert not recorded");
            }
            metrics::counter!("voxgate_budget_stops_total", "tenant" => self.effects.label(account)).increment(1);
            tracing::warn!(stage = "billing", tenant = %account, spent, budget, "monthly budget spent; refusing and ending calls");
        }
    }

    /// Delivers a firing's callback on a task of its own, unless this node is sending it already.
    fn spawn_delivery(self: &Arc<Self>, d: Delivery) {
        let token = d.fired.idempotency_token.clone();
        if !self.sending.lock().unwrap_or_else(|e| e.into_inner()).insert(token.clone()) {
            return;
        }
        let me = self.clone();
        tokio::spawn(async move {
            let done = me.deliver(d).await;
            me.sending.lock().unwrap_or_else(|e| e.into_inner()).remove(&token);
            if let Err(e) = done {
                tracing::error!(stage = "billing", token = %token, error = %e, "trigger callback attempt not recorded; resumed when its tenant shard is next taken over or the node restarts");
                return;
            }
            // Still pending: it stopped while its shard was between owners, and the shard came
            // back here before it let go. It goes on.
            let again = me.read().deliveries.get(&token).filter(|d| me.acts_for(d.tenant)).cloned();
            if let Some(d) = again {
                me.spawn_delivery(d);
            }
        });
    }

    /// Sends a firing's callback until it is delivered or the attempts are spent, recording
    /// every attempt; stops (for the shard's new owner) when this node no longer acts for the
    /// tenant.
    async fn deliver(&self, d: Delivery) -> Result<(), StorageError> {
        let Delivery { tenant, fired, mut attempts } = d;
        let period = fired.period_start.0 as u128;
        let sid = TriggerSid::parse(&fired.sid).map(|s| s.0).unwrap_or(0);
        if attempts > 0 {
            tokio::time::sleep(self.policy.backoff(attempts)).await;
        }
        loop {
            if !self.acts_for(tenant) {
                tracing::info!(stage = "billing", tenant = %tenant, token = %fired.idempotency_token, "trigger callback handed over with the tenant's shard");
                return Ok(());
            }
            attempts += 1;
            let (status, error) = self.effects.send_callback(tenant, &fired).await;
            let ok = status.is_some_and(|s| (200..300).contains(&s));
            // A 4xx other than 408/429 will not change by asking again.
            let hopeless = status.is_some_and(|s| (400..500).contains(&s) && s != 408 && s != 429);
            let outcome = if ok {
                CallbackOutcome::Delivered
            } else if hopeless || attempts >= self.policy.attempts {
                CallbackOutcome::GaveUp
            } else {
                CallbackOutcome::Retrying
            };
            let env = Envelope {
                event_id: EventId::derive(id_kind::TRIGGER_CALLBACK, &[sid, period, u128::from(attempts)]),
                tenant,
                call: None,
                occurred_at: self.clock.now(),
                payload: Event::TriggerCallbackAttempted(TriggerCallbackAttempted {
                    sid: fired.sid.clone(),
                    idempotency_token: fired.idempotency_token.clone(),
                    attempt: attempts,
                    status,
                    error: error.clone(),
                    outcome,
                }),
            };
            self.record(topics::BILLING, &env).await?;
            self.read().apply(&env);
            let label = match outcome {
                CallbackOutcome::Delivered => "delivered",
                CallbackOutcome::Retrying => "retrying",
                CallbackOutcome::GaveUp => "gave_up",
            };
            metrics::counter!("voxgate_usage_trigger_callbacks_total", "outcome" => label).increment(1);
            match outcome {
                CallbackOutcome::Delivered => {
                    tracing::info!(stage = "billing", tenant = %tenant, token = %fired.idempotency_token, attempt = attempts, "trigger callback delivered");
                    return Ok(());
                }
                CallbackOutcome::GaveUp => {
                    tracing::error!(stage = "billing", tenant = %tenant, token = %fired.idempotency_token, attempt = attempts, ?status, error = ?error, "trigger callback given up");
                    return Ok(());
                }
                CallbackOutcome::Retrying => {
                    tracing::warn!(stage = "billing", tenant = %tenant, token = %fired.idempotency_token, attempt = attempts, ?status, error = ?error, "trigger callback failed; retrying");
                    tokio::time::sleep(self.policy.backoff(attempts)).await;
                }
            }
        }
    }
}

/// What a round of the logs asked billing to act on.
#[derive(Default)]
struct Round {
    /// The usage it changed.
    changes: Vec<UsageChange>,
    /// A trigger was created (it needs a first look).
    created: bool,
    /// Budget stops recorded: account, until, budget.
    stops: Vec<(AccountSid, Timestamp, u64)>,
    /// Calls that reached a terminal status.
    ended: Vec<CallSid>,
}

/// Billing on the follower harness: folds the four logs into the books, then acts.
pub struct BillingFollower {
    billing: Arc<Billing>,
    round: Round,
}

impl BillingFollower {
    pub fn new(billing: Arc<Billing>) -> Self {
        Self { billing, round: Round::default() }
    }
}

impl Follower for BillingFollower {
    type Msg = std::convert::Infallible;
    const NAME: &'static str = "billing";
    const TOPICS: &'static [&'static str] = &TOPICS;
    const LAG: &'static str = topics::CALLS;
    /// The book's time moves on (a new month's number rental) even when no event comes, and what
    /// failed to record is tried again.
    const TICK: Option<Duration> = Some(Duration::from_secs(60));

    fn apply(&mut self, _: &'static str, env: Envelope) {
        let r = &mut self.round;
        match &env.payload {
            Event::UsageTriggerCreated(_) => r.created = true,
            Event::BudgetExceeded(b) => r.stops.push((env.tenant, b.until, b.budget_micros)),
            Event::CallStatusChanged(c) if c.status.is_terminal() => r.ended.extend(env.call),
            _ => {}
        }
        r.changes.extend(self.billing.read().apply(&env));
    }

    async fn settle(&mut self, live: bool) {
        let Round { changes, created, stops, ended } = std::mem::take(&mut self.round);
        let b = &self.billing;
        // Quota places an ingress node holds for calls running elsewhere are given back.
        for call in ended {
            b.effects.call_ended(call);
        }
        let now = b.clock.now();
        if !live {
            // The books are rebuilt: this month's budget stops hold again, what this node acts
            // for is resumed and judged whole.
            let (pending, stops) = {
                let mut books = b.read();
                books.usage.advance(now);
                let month = Month::of(now);
                let stops: Vec<_> = books.triggers.stopped().filter(|(_, m, _)| *m == month).collect();
                (books.deliveries.len(), stops)
            };
            tracing::info!(
                stage = "billing",
                pending_callbacks = pending,
                budget_stops = stops.len(),
                "usage rebuilt from the logs"
            );
            for (account, month, budget) in stops {
                b.effects.stop_account(account, month.end(), budget);
            }
            b.resume_deliveries();
            b.judge(&[], true).await;
            return;
        }
        // A firing its previous owner recorded after this node took its tenant over.
        b.resume_deliveries();
        // A stop the acting node recorded (maybe another node) reaches this node's gate and the
        // calls it holds.
        for (account, until, budget) in stops {
            if until > now {
                b.effects.stop_account(account, until, budget);
            }
        }
        if created || !changes.is_empty() {
            b.judge(&changes, created).await;
        }
    }

    fn reached(&mut self, topic: &'static str, _: u32, next: u64) {
        if topic == topics::BILLING {
            self.billing.applied.send_replace(next);
        }
    }

    async fn tick(&mut self) {
        let b = &self.billing;
        b.resume_deliveries();
        let now = b.clock.now();
        let changes = b.read().usage.advance(now);
        // Every trigger and budget is looked at (retrying what failed).
        b.judge(&changes, true).await;
    }
}
