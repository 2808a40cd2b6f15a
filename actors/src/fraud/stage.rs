//! The fraud stage: reads the calls log from its durable cursor, runs the [`FraudEngine`] over
//! each round of new events in event-time order, and appends what it decides: verdicts and
//! hang-up requests to the fraud log, alerts to the alerts log.
//!
//! Restart: the engine's windows are rebuilt by feeding it the calls log up to the cursor without
//! emitting (the calls log holds only lifecycle events, so this is quick), then it goes on from
//! the cursor. Output event ids derive from the input event's id, so a round repeated after a
//! crash between append and cursor commit produces the same ids, which consumers de-duplicate on.

use std::sync::Arc;

use ractor::{Actor, ActorProcessingErr, ActorRef};
use voxgate_protocol::event::{AlertRaised, Event, FraudVerdict, HangupRequested, Severity};
use voxgate_protocol::{Envelope, EventId};
use voxgate_storage::{topics, Log, Record, StorageError};

use super::engine::FraudEngine;
use crate::call::id_kind;
use crate::progress::Progress;

/// The stage's cursor name on the calls log.
pub const CURSOR: &str = "fraud";
const READ_BATCH: usize = 512;

/// Messages the stage takes.
pub enum FraudMsg {
    /// New call events may be durable.
    Poll,
    /// New rules and thresholds (config reload): applied from the next event on.
    Reconfigure(Box<super::rules::FraudConfig>),
}

/// What the stage needs.
pub struct FraudStageArgs {
    pub log: Log,
    pub engine: FraudEngine,
    pub progress: Arc<Progress>,
}

pub struct FraudState {
    log: Log,
    engine: FraudEngine,
    progress: Arc<Progress>,
    next: Vec<u64>,
    watcher: tokio::task::JoinHandle<()>,
}

/// The fraud stage actor.
pub struct FraudStage;

/// The events a verdict leads to, in append order: (topic, key, envelope).
pub fn outputs(input: &Envelope, v: FraudVerdict) -> Vec<(&'static str, u64, Envelope)> {
    let key = input.call.map(|c| c.partition_key()).unwrap_or_else(|| input.tenant.partition_key());
    let cause = input.event_id.0;
    let mut out = Vec::with_capacity(3);
    let severity = v.severity;
    let summary: Vec<String> = v.hits.iter().map(|h| format!("{}: {}", h.rule, h.evidence)).collect();
    let summary = summary.join("; ");
    let first_rule = v.hits.first().map(|h| h.rule.clone()).unwrap_or_default();
    let env = |kind: u64, payload: Event| Envelope {
        event_id: EventId::derive(kind, &[cause]),
        tenant: input.tenant,
        call: input.call,
        occurred_at: input.occurred_at,
        payload,
    };
    out.push((topics::FRAUD, key, env(id_kind::FRAUD_VERDICT, Event::FraudVerdict(v))));
    if severity >= Severity::Alert {
        out.push((
            topics::ALERTS,
            input.tenant.partition_key(),
            env(
                id_kind::FRAUD_ALERT,
                Event::AlertRaised(AlertRaised {
                    source: "fraud".into(),
                    name: format!("fraud.{first_rule}"),
                    severity,
                    message: summary.clone(),
                }),
            ),
        ));
    }
    if severity >= Severity::EndCall && input.call.is_some() {
        out.push((
            topics::FRAUD,
            key,
            env(
                id_kind::FRAUD_HANGUP,
                Event::HangupRequested(HangupRequested { source: "fraud".into(), reason: summary }),
            ),
        ));
    }
    out
}

impl Actor for FraudStage {
    type Msg = FraudMsg;
    type State = FraudState;
    type Arguments = FraudStageArgs;

    async fn pre_start(&self, myself: ActorRef<FraudMsg>, a: FraudStageArgs) -> Result<FraudState, ActorProcessingErr> {
        let cursor = a.log.cursor(CURSOR, topics::CALLS)?;
        let mut engine = a.engine;
        // Warm the windows up on what was already judged (no output).
        let mut round = Vec::new();
        for (p, &upto) in cursor.iter().enumerate() {
            let mut from = a.log.first_offset(topics::CALLS, p as u32)?;
            let mut recs = Vec::new();
            while from < upto {
                recs.clear();
                let next =
                    a.log.read(topics::CALLS, p as u32, from, READ_BATCH.min((upto - from) as usize), &mut recs)?;
                if recs.is_empty() {
                    break;
                }
                round.extend(recs.iter().filter_map(|r| voxgate_protocol::decode(r.payload()).ok()));
                from = next;
            }
        }
        sort_round(&mut round);
        for env in &round {
            let _ = engine.apply(env);
        }
        for (p, next) in cursor.iter().enumerate() {
            a.progress.set(p as u32, *next);
        }
        tracing::info!(stage = "fraud", warmed_up_events = round.len(), "fraud stage ready");
        let watcher = crate::progress::wake_on_append(&a.log, topics::CALLS, myself.clone(), || FraudMsg::Poll)?;
        myself.cast(FraudMsg::Poll)?;
        Ok(FraudState { log: a.log, engine, progress: a.progress, next: cursor, watcher })
    }

    async fn post_stop(&self, _: ActorRef<FraudMsg>, s: &mut FraudState) -> Result<(), ActorProcessingErr> {
        s.watcher.abort();
        let _ = s.log.sync().await;
        Ok(())
    }

    async fn handle(
        &self,
        myself: ActorRef<FraudMsg>,
        msg: FraudMsg,
        s: &mut FraudState,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            FraudMsg::Poll => {
                if poll(s).await? {
                    myself.cast(FraudMsg::Poll)?;
                }
            }
            FraudMsg::Reconfigure(cfg) => match s.engine.set_config(*cfg) {
                Ok(()) => tracing::info!(stage = "fraud", "fraud rules reloaded"),
                Err(e) => {
                    tracing::error!(stage = "fraud", error = %e, "fraud rules not reloaded; the previous ones stay")
                }
            },
        }
        Ok(())
    }
}

/// Event-time order, ties by event id: the order verdicts are a function of.
fn sort_round(round: &mut [Envelope]) {
    round.sort_by_key(|e| (e.occurred_at, e.event_id));
}

/// One round: every partition's new events, judged in event-time order. True when more wait.
async fn poll(s: &mut FraudState) -> Result<bool, StorageError> {
    let mut recs: Vec<Record> = Vec::new();
    let mut round = Vec::new();
    let mut next = s.next.clone();
    let mut more = false;
    for (p, n) in next.iter_mut().enumerate() {
        recs.clear();
        let to = s.log.read(topics::CALLS, p as u32, *n, READ_BATCH, &mut recs)?;
        more |= recs.len() == READ_BATCH;
        for r in &recs {
            match voxgate_protocol::decode(r.payload()) {
                Ok(e) => round.push(e),
                Err(e) => {
                    metrics::counter!("voxgate_stage_undecodable_total", "stage" => "fraud").increment(1);
                    tracing::error!(stage = "fraud", partition = p, offset = r.offset, error = %e, "call record cannot be decoded; skipped");
                }
            }
        }
        *n = to;
    }
    if round.is_empty() {
        return Ok(false);
    }
    sort_round(&mut round);
    let mut out: Vec<(&'static str, u64, Vec<u8>)> = Vec::new();
    for env in &round {
        if let Some(v) = s.engine.apply(env) {
            for h in &v.hits {
                metrics::counter!("voxgate_fraud_verdicts_total", "rule" => h.rule.clone(), "severity" => h.severity.as_str()).increment(1);
            }
            tracing::warn!(stage = "fraud", tenant = %env.tenant, call_sid = %env.call.map(|c| c.to_string()).unwrap_or_default(), severity = v.severity.as_str(), rules = v.hits.len(), "fraud verdict");
            for (topic, key, e) in outputs(env, v) {
                out.push((topic, key, voxgate_protocol::encode(&e)));
            }
        }
    }
    for topic in [topics::FRAUD, topics::ALERTS] {
        let batch: Vec<(u64, &[u8])> = out.iter().filter(|o| o.0 == topic).map(|o| (o.1, o.2.as_slice())).collect();
        if !batch.is_empty() {
            s.log.append_many(topic, batch).await?;
        }
    }
    for (p, n) in next.iter().enumerate() {
        s.log.store_cursor(CURSOR, topics::CALLS, p as u32, *n)?;
        s.progress.set(p as u32, *n);
    }
    s.log.sync().await?;
    crate::progress::report_lag(&s.log, "fraud", topics::CALLS, &next);
    s.next = next;
    Ok(more)
}
