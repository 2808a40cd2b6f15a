//! The fraud stage: reads the calls log from its durable cursor, runs the [`FraudEngine`] over
//! each round of new events in event-time order, and appends what it decides: verdicts and
//! hang-up requests to the fraud log, alerts to the alerts log.
//!
//! It runs on the stage harness ([`crate::stage`]), one round over every partition. Its state is
//! per tenant, so in a cluster it runs as tenant shards spread over the fraud nodes; each shard
//! judges only its tenants' events.
//!
//! Restart: the engine's windows are rebuilt by feeding it the calls log up to the cursor without
//! emitting (the calls log holds only lifecycle events, so this is quick), then it goes on from
//! the cursor. Output event ids derive from the input event's id, so a round repeated after a
//! crash between append and cursor commit produces the same ids, which consumers de-duplicate on.

use voxgate_protocol::event::{AlertRaised, Event, FraudVerdict, HangupRequested, Severity};
use voxgate_protocol::{Envelope, EventId};
use voxgate_storage::{topics, Log};

use super::engine::FraudEngine;
use super::prefixes::PrefixTable;
use super::rules::FraudConfig;
use crate::call::id_kind;
use crate::stage::{Batch, Durability, Outputs, Reading, Shard, Stage, StageError};

/// The stage's cursor name on the calls log.
pub const CURSOR: &str = "fraud";
const READ_BATCH: usize = 512;

/// Messages of the fraud stage's own.
pub enum FraudMsg {
    /// New rules and thresholds (config reload): applied from the next event on.
    Reconfigure(Box<FraudConfig>),
}

/// What the fraud stage is built from.
#[derive(Clone)]
pub struct FraudSettings {
    pub config: FraudConfig,
    pub prefixes: PrefixTable,
}

/// The fraud stage: its engine, windows warmed up on what was judged before.
pub struct FraudStage {
    engine: FraudEngine,
    /// The tenants it judges.
    shard: Shard,
}

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

impl Stage for FraudStage {
    type Args = FraudSettings;
    type Msg = FraudMsg;
    const NAME: &'static str = "fraud";
    const CURSOR: &'static str = CURSOR;
    const INPUT: &'static str = topics::CALLS;
    const DURABILITY: Durability = Durability::EachRound;

    fn reading(_: &FraudSettings, _owned: usize) -> Reading {
        Reading::Together { per_partition: READ_BATCH }
    }

    async fn open(settings: &FraudSettings, log: &Log, from: &[u64], shard: Shard) -> Result<Self, StageError> {
        let mut engine = FraudEngine::new(settings.config.clone(), settings.prefixes.clone())
            .map_err(|e| StageError::Setup(format!("fraud rules: {e}")))?;
        // Warm the windows up on what was already judged (no output).
        let mut round = Vec::new();
        for (p, &upto) in from.iter().enumerate() {
            if upto == crate::progress::NOT_OURS {
                continue;
            }
            let mut at = log.first_offset(topics::CALLS, p as u32)?;
            let mut recs = Vec::new();
            while at < upto {
                recs.clear();
                let next = log.read(topics::CALLS, p as u32, at, READ_BATCH.min((upto - at) as usize), &mut recs)?;
                if recs.is_empty() {
                    break;
                }
                round.extend(
                    recs.iter()
                        .filter_map(|r| voxgate_protocol::decode(r.payload()).ok())
                        .filter(|e| shard.holds(e.tenant)),
                );
                at = next;
            }
        }
        sort_round(&mut round);
        for env in &round {
            let _ = engine.apply(env);
        }
        tracing::info!(
            stage = "fraud",
            shard = shard.index,
            of = shard.of,
            warmed_up_events = round.len(),
            "fraud stage ready"
        );
        Ok(Self { engine, shard })
    }

    /// Every partition's new events, judged in event-time order.
    async fn handle(&mut self, _: &Log, batch: &Batch, out: &mut Outputs) -> Result<(), StageError> {
        let mut round = Vec::new();
        for (p, r) in batch.records() {
            match voxgate_protocol::decode(r.payload()) {
                Ok(e) if self.shard.holds(e.tenant) => round.push(e),
                Ok(_) => {}
                Err(e) => {
                    metrics::counter!("voxgate_stage_undecodable_total", "stage" => "fraud").increment(1);
                    tracing::error!(stage = "fraud", partition = p, offset = r.offset, error = %e, "call record cannot be decoded; skipped");
                }
            }
        }
        sort_round(&mut round);
        for env in &round {
            if let Some(v) = self.engine.apply(env) {
                for h in &v.hits {
                    metrics::counter!("voxgate_fraud_verdicts_total", "rule" => h.rule.clone(), "severity" => h.severity.as_str()).increment(1);
                }
                tracing::warn!(stage = "fraud", tenant = %env.tenant, call_sid = %env.call.map(|c| c.to_string()).unwrap_or_default(), severity = v.severity.as_str(), rules = v.hits.len(), "fraud verdict");
                for (topic, key, e) in outputs(env, v) {
                    out.push(topic, key, voxgate_protocol::encode(&e));
                }
            }
        }
        Ok(())
    }

    fn message(&mut self, settings: &mut FraudSettings, msg: FraudMsg) {
        match msg {
            FraudMsg::Reconfigure(cfg) => match self.engine.set_config((*cfg).clone()) {
                Ok(()) => {
                    settings.config = *cfg;
                    tracing::info!(stage = "fraud", "fraud rules reloaded");
                }
                Err(e) => {
                    tracing::error!(stage = "fraud", error = %e, "fraud rules not reloaded; the previous ones stay")
                }
            },
        }
    }
}

/// Event-time order, ties by event id: the order verdicts are a function of.
fn sort_round(round: &mut [Envelope]) {
    round.sort_by_key(|e| (e.occurred_at, e.event_id));
}
