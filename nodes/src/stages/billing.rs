//! The node's billing stage: usage is a pure fold of the calls, transcripts and tenants logs into
//! a [`UsageBook`], applied idempotently (by event id), so the node rebuilds it from the start of
//! the logs on every start and then follows them: a restart, a crash mid-stream or a replay from
//! zero give the same totals to the micro-dollar. The REST API reads the book.
//!
//! Usage triggers and budget stops live on the `billing` log. A trigger's creation, update and
//! deletion are recorded there by the REST API; a firing is recorded there (event id derived from
//! the trigger and the period, so once per period) before its callback is sent, and every
//! callback attempt after it is made. On start, firings whose callback has no final attempt are
//! resumed, so a callback is neither lost nor sent for a period twice by a restart (the receiver
//! may see an attempt again if the node died between sending it and recording it: the
//! `IdempotencyToken` is for that).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use voxgate_actors::billing::{CallbackPolicy, Month, TriggerBook, UsageBook, UsageChange};
use voxgate_actors::call::id_kind;
use voxgate_actors::progress::{report_lag, Progress};
use voxgate_protocol::event::{AlertRaised, CallbackOutcome, Severity, TriggerCallbackAttempted, UsageTriggerFired};
use voxgate_protocol::twilio::signature::{self, Algorithm};
use voxgate_protocol::{AccountSid, Clock, Envelope, Event, EventId, Timestamp};
use voxgate_storage::{topics, Log, StorageError};

use crate::config::Config;
use crate::stages::hangup::{end_call, TwilioRest};
use crate::stages::tenancy::Tenancy;

const TOPICS: [&str; 4] = [topics::TENANTS, topics::CALLS, topics::TRANSCRIPTS, topics::BILLING];

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
}

impl Books {
    /// Applies one event of any of the four logs; returns the usage it changed.
    fn apply(&mut self, env: &Envelope) -> Vec<UsageChange> {
        match &env.payload {
            Event::UsageTriggerFired(f) => {
                self.triggers.apply(env);
                self.deliveries.entry(f.idempotency_token.clone()).or_insert_with(|| Delivery {
                    tenant: env.tenant,
                    fired: f.clone(),
                    attempts: 0,
                });
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
                    }
                }
                Vec::new()
            }
            Event::UsageTriggerCreated(c) => {
                self.triggers.apply(env);
                if let Ok(sid) = voxgate_actors::billing::TriggerSid::parse(&c.sid) {
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

/// The book, shared by the follower and the REST API.
pub struct Billing {
    books: Mutex<Books>,
    log: Log,
    clock: Arc<dyn Clock>,
    tenancy: Arc<Tenancy>,
    twilio: TwilioRest,
    /// Where the calls a spent budget ends run.
    calls: crate::stages::calls::Calls,
    http: reqwest::Client,
    /// `allow_private_callbacks`: callbacks may go to non-public addresses.
    allow_private: bool,
    policy: CallbackPolicy,
    /// One trigger command at a time (checks see the previous command's effect).
    commands: tokio::sync::Mutex<()>,
    /// How far the stage has read the calls log (health and lag metrics).
    progress: Arc<Progress>,
    /// Whether this node acts on the books (fires triggers, records budget stops, delivers
    /// callbacks). Every node keeps the books; in a cluster one node at a time acts.
    acting: std::sync::atomic::AtomicBool,
}

/// Why a trigger command failed.
#[derive(Debug, thiserror::Error)]
pub enum BillingCommandError {
    #[error(transparent)]
    Rule(#[from] voxgate_actors::billing::TriggerError),
    #[error("event log: {0}")]
    Log(#[from] StorageError),
}

impl Billing {
    /// An empty book with the configured prices; config-file numbers are held from `since`.
    pub fn new(
        cfg: &Config,
        log: Log,
        clock: Arc<dyn Clock>,
        tenancy: Arc<Tenancy>,
        twilio: TwilioRest,
        calls: crate::stages::calls::Calls,
    ) -> anyhow::Result<Self> {
        let since = clock.now();
        let mut usage =
            UsageBook::new(cfg.billing.prices.clone()).map_err(|e| anyhow::anyhow!("billing prices: {e}"))?;
        for t in &cfg.tenants {
            for n in &t.numbers {
                usage.hold_number(t.account_sid, n, since);
            }
        }
        let triggers =
            TriggerBook::with_budgets(&cfg.billing.budgets).map_err(|e| anyhow::anyhow!("billing budgets: {e}"))?;
        let policy = cfg.billing.callbacks;
        // Callback URLs are the tenants': public addresses only, unless the operator allows more.
        let http = crate::http::outbound::client(Duration::from_millis(policy.timeout_ms), cfg.allow_private_callbacks)
            .map_err(|e| anyhow::anyhow!("HTTP client: {e}"))?;
        let progress = Arc::new(Progress::new(log.partitions(topics::CALLS)? as usize));
        Ok(Self {
            progress,
            books: Mutex::new(Books { usage, triggers, deliveries: BTreeMap::new() }),
            allow_private: cfg.allow_private_callbacks,
            log,
            clock,
            tenancy,
            twilio,
            calls,
            http,
            policy,
            commands: tokio::sync::Mutex::new(()),
            acting: std::sync::atomic::AtomicBool::new(false),
        })
    }

    fn acting(&self) -> bool {
        self.acting.load(std::sync::atomic::Ordering::Acquire)
    }

    /// This node starts acting on the books: resumes undelivered callbacks and judges every
    /// trigger and budget (what the previous actor fired is in the billing log, and a firing's
    /// event id is derived from trigger and period, so nothing fires twice).
    pub async fn take_over(self: &Arc<Self>) {
        self.acting.store(true, std::sync::atomic::Ordering::Release);
        let pending: Vec<Delivery> = self.read().deliveries.values().cloned().collect();
        for d in pending {
            self.spawn_delivery(d);
        }
        self.judge(&[], true).await;
    }

    /// This node stops acting (another node took billing over, or the node is stopping).
    pub fn step_down(&self) {
        self.acting.store(false, std::sync::atomic::Ordering::Release);
    }

    /// The stage's position in the calls log.
    pub fn progress(&self) -> Arc<Progress> {
        self.progress.clone()
    }

    pub fn read(&self) -> MutexGuard<'_, Books> {
        self.books.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Checks a trigger command against the books (`check` returns the event to record), records
    /// it on the billing log and applies it; returns the event.
    pub async fn command(
        &self,
        tenant: AccountSid,
        check: impl FnOnce(&Books, Timestamp) -> Result<Event, voxgate_actors::billing::TriggerError>,
    ) -> Result<Envelope, BillingCommandError> {
        let _one_at_a_time = self.commands.lock().await;
        let now = self.clock.now();
        let payload = check(&self.read(), now)?;
        let env = Envelope {
            event_id: EventId(crate::stages::tenancy::random_u128()),
            tenant,
            call: None,
            occurred_at: now,
            payload,
        };
        self.log.append(topics::BILLING, 0, &voxgate_protocol::encode(&env)).await?;
        self.read().apply(&env);
        tracing::info!(stage = "billing", tenant = %tenant, kind = env.payload.kind(), "billing change recorded");
        Ok(env)
    }

    /// Applies every durable record of the logs from `next` on; returns how many and (when
    /// `collect`) the usage they changed, and whether a trigger was created (it needs a first look).
    fn catch_up(&self, next: &mut [Vec<u64>], collect: bool) -> Result<CaughtUp, StorageError> {
        let mut n = 0;
        let mut changes = Vec::new();
        let mut created = false;
        let mut stops = Vec::new();
        let mut ended = Vec::new();
        let mut books = self.read();
        for (t, topic) in TOPICS.iter().enumerate() {
            for (p, from) in next[t].iter_mut().enumerate() {
                let to = self.log.scan(topic, p as u32, *from, |r| {
                    match voxgate_protocol::decode(r.payload()) {
                        Ok(env) => {
                            created |= matches!(env.payload, Event::UsageTriggerCreated(_));
                            if let Event::BudgetExceeded(b) = &env.payload {
                                stops.push((env.tenant, b.until, b.budget_micros));
                            }
                            if let (Event::CallStatusChanged(c), Some(call)) = (&env.payload, env.call) {
                                if c.status.is_terminal() {
                                    ended.push(call);
                                }
                            }
                            let ch = books.apply(&env);
                            if collect {
                                changes.extend(ch);
                            }
                        }
                        Err(e) => {
                            metrics::counter!("voxgate_stage_undecodable_total", "stage" => "billing").increment(1);
                            tracing::error!(stage = "billing", topic, offset = r.offset, error = %e, "record cannot be decoded; skipped");
                        }
                    }
                    Ok::<_, StorageError>(())
                })?;
                n += to - *from;
                *from = to;
                if *topic == topics::CALLS {
                    self.progress.set(p as u32, to);
                }
            }
        }
        drop(books);
        // Quota places an ingress node holds for calls running elsewhere are given back.
        for call in ended {
            self.calls.ended(call);
        }
        report_lag(&self.log, "billing", topics::CALLS, &next[1]);
        Ok(CaughtUp { events: n, changes, created, stops })
    }

    async fn record(&self, topic: &str, env: &Envelope) -> Result<(), StorageError> {
        self.log.append(topic, env.tenant.partition_key(), &voxgate_protocol::encode(env)).await?;
        Ok(())
    }

    /// Judges triggers and budgets at `now` (on `changes`, or on everything when `all`), records
    /// what fired and acts on it.
    async fn judge(self: &Arc<Self>, changes: &[UsageChange], all: bool) {
        if !self.acting() {
            return;
        }
        let now = self.clock.now();
        let (firings, budgets) = {
            let mut b = self.read();
            let Books { usage, triggers, .. } = &mut *b;
            let firings = if all { triggers.evaluate_all(usage, now) } else { triggers.evaluate(usage, changes, now) };
            let candidates: Vec<AccountSid> = if all {
                self.tenancy.read(|d| d.tenants().map(|t| t.sid).collect())
            } else {
                changes.iter().map(|c| c.tenant).collect()
            };
            (firings, triggers.budgets_reached(usage, &candidates, now))
        };
        for f in firings {
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
            metrics::counter!("voxgate_usage_triggers_fired_total", "tenant" => self.tenancy.labels.label(f.account_sid))
                .increment(1);
            tracing::warn!(stage = "billing", tenant = %f.account_sid, trigger = %f.usage_trigger_sid, token = %f.idempotency_token, current = %f.current_value, "usage trigger fired");
            self.spawn_delivery(Delivery { tenant: f.account_sid, fired: event, attempts: 0 });
        }
        for (account, spent, budget) in budgets {
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
            self.stop(account, until, budget);
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
                        voxgate_actors::billing::format_micros(spent),
                        voxgate_actors::billing::format_micros(budget)
                    ),
                }),
                ..exceeded.clone()
            };
            if let Err(e) = self.record(topics::ALERTS, &alert).await {
                tracing::error!(stage = "billing", tenant = %account, error = %e, "budget alert not recorded");
            }
            metrics::counter!("voxgate_budget_stops_total", "tenant" => self.tenancy.labels.label(account))
                .increment(1);
            tracing::warn!(stage = "billing", tenant = %account, spent, budget, "monthly budget spent; refusing and ending calls");
        }
    }

    /// Refuses the account's new calls until `until` and ends its active ones.
    fn stop(&self, account: AccountSid, until: Timestamp, budget: u64) {
        for (tenant, call) in self.tenancy.stop_for_budget(account, until, budget) {
            let (tenancy, twilio, calls) = (self.tenancy.clone(), self.twilio.clone(), self.calls.clone());
            crate::stages::hangup::count_requested("billing");
            tokio::spawn(async move {
                end_call(call, tenant, "billing", "monthly budget spent", &calls, &tenancy, &twilio).await;
            });
        }
    }

    fn spawn_delivery(self: &Arc<Self>, d: Delivery) {
        let me = self.clone();
        tokio::spawn(async move {
            let token = d.fired.idempotency_token.clone();
            if let Err(e) = me.deliver(d).await {
                tracing::error!(stage = "billing", token = %token, error = %e, "trigger callback attempt not recorded; resumed at the next start");
            }
        });
    }

    /// Sends a firing's callback until it is delivered or the attempts are spent, recording
    /// every attempt.
    async fn deliver(&self, d: Delivery) -> Result<(), StorageError> {
        let Delivery { tenant, fired, mut attempts } = d;
        let period = fired.period_start.0 as u128;
        let sid = voxgate_actors::billing::TriggerSid::parse(&fired.sid).map(|s| s.0).unwrap_or(0);
        if attempts > 0 {
            tokio::time::sleep(self.policy.backoff(attempts)).await;
        }
        loop {
            attempts += 1;
            let (status, error) = self.send(tenant, &fired).await;
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

    /// One callback request, signed as Twilio signs it (HMAC-SHA1 of the URL and the sorted
    /// parameters with the account's auth token). Returns the status, or why there was none.
    async fn send(&self, tenant: AccountSid, f: &UsageTriggerFired) -> (Option<u16>, Option<String>) {
        let Some(token) = self.tenancy.token(tenant) else {
            return (None, Some("the account is gone".into()));
        };
        if let Err(e) = crate::http::outbound::check_at_delivery(&f.callback_url, self.allow_private) {
            metrics::counter!("voxgate_outbound_refused_total", "reason" => "not_public").increment(1);
            return (None, Some(format!("CallbackUrl refused: {e}")));
        }
        let key = token.expose().as_bytes();
        let req = if f.callback_method.eq_ignore_ascii_case("GET") {
            let query = form(&f.params);
            let sep = if f.callback_url.contains('?') { '&' } else { '?' };
            let url = format!("{}{sep}{query}", f.callback_url);
            let sig = signature::compute(Algorithm::Sha1, key, &url, &[]);
            self.http.get(url).header("X-Twilio-Signature", sig)
        } else {
            let sig = signature::compute(Algorithm::Sha1, key, &f.callback_url, &f.params);
            self.http
                .post(&f.callback_url)
                .header("X-Twilio-Signature", sig)
                .header("content-type", "application/x-www-form-urlencoded")
                .body(form(&f.params))
        };
        match req.header("I-Twilio-Idempotency-Token", &f.idempotency_token).send().await {
            Ok(r) if r.status().is_success() => (Some(r.status().as_u16()), None),
            Ok(r) => (Some(r.status().as_u16()), Some(format!("HTTP {}", r.status()))),
            Err(e) => (None, Some(e.to_string())),
        }
    }

    /// Rebuilds the books from the start of the logs, restores budget stops, resumes undelivered
    /// callbacks and judges every trigger once. The node calls it before it answers anything, so
    /// no call slips past a spent budget and no trigger is created against a half-built book.
    pub async fn rebuild(self: &Arc<Self>) -> Result<Cursor, StorageError> {
        let log = &self.log;
        let mut next: Vec<Vec<u64>> = Vec::new();
        for topic in TOPICS {
            let parts = log.partitions(topic)?;
            next.push((0..parts).map(|p| log.first_offset(topic, p).unwrap_or(0)).collect());
        }
        // Every trigger is judged once afterwards, so the changes are not kept.
        let n = self.catch_up(&mut next, false)?.events;
        let now = self.clock.now();
        let (pending, stops) = {
            let mut b = self.read();
            b.usage.advance(now);
            let month = Month::of(now);
            let stops: Vec<_> = b.triggers.stopped().filter(|(_, m, _)| *m == month).collect();
            (b.deliveries.values().cloned().collect::<Vec<_>>(), stops)
        };
        tracing::info!(
            stage = "billing",
            events = n,
            pending_callbacks = pending.len(),
            budget_stops = stops.len(),
            "usage rebuilt from the logs"
        );
        for (account, month, budget) in stops {
            self.stop(account, month.end(), budget);
        }
        if self.acting() {
            for d in pending {
                self.spawn_delivery(d);
            }
        }
        self.judge(&[], true).await;
        Ok(Cursor(next))
    }

    /// Follows the logs from where [`Billing::rebuild`] left them until the log closes: each new
    /// batch is applied and judged; a timer moves the book's time on (a new month's number
    /// rental) even when no event comes. A failing read is retried, never the end of billing.
    pub async fn follow(self: Arc<Self>, cursor: Cursor) -> Result<(), StorageError> {
        let Cursor(mut next) = cursor;
        let mut watches = Vec::new();
        for topic in TOPICS {
            watches.push(self.log.watch(topic)?);
        }
        let [mut a, mut b, mut c, mut d] =
            <[_; 4]>::try_from(watches).map_err(|_| StorageError::Engine("watches".into()))?;
        let mut tick = tokio::time::interval(Duration::from_secs(60));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let mut timer = false;
            tokio::select! {
                r = a.changed() => if r.is_err() { return Ok(()) },
                r = b.changed() => if r.is_err() { return Ok(()) },
                r = c.changed() => if r.is_err() { return Ok(()) },
                r = d.changed() => if r.is_err() { return Ok(()) },
                _ = tick.tick() => timer = true,
            }
            let CaughtUp { changes, created, stops, .. } = match self.catch_up(&mut next, true) {
                Ok(c) => c,
                Err(e) => {
                    metrics::counter!("voxgate_billing_record_failures_total").increment(1);
                    tracing::error!(stage = "billing", error = %e, "reading the logs failed; retrying in 1 s");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    continue;
                }
            };
            // A stop the acting node recorded (maybe another node) reaches this node's gate and
            // the calls it holds.
            let now = self.clock.now();
            for (account, until, budget) in stops {
                if until > now {
                    self.stop(account, until, budget);
                }
            }
            let mut changes = changes;
            if timer {
                let now = self.clock.now();
                changes.extend(self.read().usage.advance(now));
            }
            if created || timer || !changes.is_empty() {
                // On the timer every trigger and budget is looked at (retrying what failed).
                self.judge(&changes, created || timer).await;
            }
        }
    }
}

/// Where the billing follower is in each of its logs.
pub struct Cursor(Vec<Vec<u64>>);

/// What one catch-up applied.
struct CaughtUp {
    events: u64,
    /// The usage it changed (when asked to collect).
    changes: Vec<UsageChange>,
    /// Whether a trigger was created (it needs a first look).
    created: bool,
    /// Budget stops recorded: account, until, budget.
    stops: Vec<(AccountSid, Timestamp, u64)>,
}

fn form(params: &[(String, String)]) -> String {
    form_urlencoded::Serializer::new(String::new()).extend_pairs(params).finish()
}
