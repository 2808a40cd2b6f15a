//! The node's side of fraud screening: it follows the fraud log and acts on it — blocks go into
//! the webhook gate (so the next call from that number is refused synchronously), hang-up requests
//! end the call's actor and ask Twilio to complete the call through its REST API.

use std::sync::Arc;

use voxgate_actors::tenancy::directory::Block;
use voxgate_protocol::{CallSid, Clock, Envelope, Event};
use voxgate_storage::{topics, Log, StorageError};

use crate::stages::calls::Calls;
use crate::stages::hangup::{count_requested, end_call, TwilioRest};
use crate::stages::tenancy::Tenancy;

/// Whether this node ends a call a verdict asks to end: every call on an embedded node; in a
/// cluster, the calls whose partition this node runs (one node acts on each hang-up).
pub type HangsUp = Arc<dyn Fn(CallSid) -> bool + Send + Sync>;

/// What the follower acts with.
#[derive(Clone)]
pub struct Effects {
    pub tenancy: Arc<Tenancy>,
    pub twilio: TwilioRest,
    pub calls: Calls,
    pub hangs_up: HangsUp,
}

/// Applies one fraud-log event; `live` events also end calls (not those read at startup).
async fn act(env: &Envelope, fx: &Effects, clock: &dyn Clock, live: bool) {
    let tenancy = &fx.tenancy;
    match &env.payload {
        Event::FraudVerdict(v) => {
            if let (Some(number), Some(until)) = (&v.blocked_number, v.blocked_until) {
                if until > clock.now() {
                    let rules: Vec<&str> = v.hits.iter().map(|h| h.rule.as_str()).collect();
                    tenancy.add_block(
                        env.tenant,
                        number,
                        Block {
                            reason: format!("fraud: {}", rules.join(", ")),
                            until: Some(until),
                            since: env.occurred_at,
                        },
                    );
                    if live {
                        tracing::warn!(stage = "fraud", tenant = %env.tenant, number = %number, until = %until, "number blocked by fraud screening");
                    }
                }
            }
        }
        Event::HangupRequested(h) if live => {
            let Some(call) = env.call else { return };
            if !(fx.hangs_up)(call) {
                return;
            }
            // Ending a call waits for its actor and for Twilio; blocks keep flowing meanwhile.
            let (tenant, h, fx) = (env.tenant, h.clone(), fx.clone());
            count_requested("fraud");
            tokio::spawn(async move {
                end_call(call, tenant, &h.source, &h.reason, &fx.calls, &fx.tenancy, &fx.twilio).await
            });
        }
        _ => {}
    }
}

/// Reads the whole fraud log (blocks still in force), then follows it until the log closes.
pub async fn follow(log: Log, fx: Effects, clock: Arc<dyn Clock>) -> Result<(), StorageError> {
    let parts = log.partitions(topics::FRAUD)?;
    let mut next = vec![0u64; parts as usize];
    let mut rx = log.watch(topics::FRAUD)?;
    let mut recs = Vec::new();
    let mut live = false;
    loop {
        for (p, n) in next.iter_mut().enumerate() {
            loop {
                recs.clear();
                let to = log.read(topics::FRAUD, p as u32, *n, 256, &mut recs)?;
                if recs.is_empty() {
                    break;
                }
                for r in &recs {
                    if let Ok(env) = voxgate_protocol::decode(r.payload()) {
                        act(&env, &fx, clock.as_ref(), live).await;
                    }
                }
                *n = to;
            }
        }
        // Everything up to the heads at startup only restores blocks; what comes after is live.
        live = true;
        if rx.changed().await.is_err() {
            return Ok(());
        }
    }
}
