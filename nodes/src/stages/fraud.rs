//! The node's side of fraud screening: it follows the fraud log ([`FraudActions`], on the follower
//! harness) and acts on it — blocks go into the webhook gate (so the next call from that number is
//! refused synchronously), hang-up requests end the call's actor and ask Twilio to complete the
//! call through its REST API.

use std::sync::Arc;

use voxgate_actors::follow::Follower;
use voxgate_actors::tenancy::directory::Block;
use voxgate_protocol::{CallSid, Clock, Envelope, Event};
use voxgate_storage::topics;

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

/// Fraud's effects on the follower harness: the whole fraud log at start (blocks still in force),
/// then what arrives (blocks and hang-ups).
pub struct FraudActions {
    fx: Effects,
    clock: Arc<dyn Clock>,
    round: Vec<Envelope>,
}

impl FraudActions {
    pub fn new(fx: Effects, clock: Arc<dyn Clock>) -> Self {
        Self { fx, clock, round: Vec::new() }
    }
}

impl Follower for FraudActions {
    type Msg = std::convert::Infallible;
    const NAME: &'static str = "fraud_actions";
    const TOPICS: &'static [&'static str] = &[topics::FRAUD];
    const LAG: &'static str = topics::FRAUD;

    fn apply(&mut self, _: &'static str, env: Envelope) {
        // Only what it acts on is kept until the round settles.
        let acts = match &env.payload {
            Event::FraudVerdict(v) => v.blocked_number.is_some(),
            Event::HangupRequested(_) => true,
            _ => false,
        };
        if acts {
            self.round.push(env);
        }
    }

    /// What the log held at start only restores blocks; what comes after also ends calls.
    async fn settle(&mut self, live: bool) {
        for env in std::mem::take(&mut self.round) {
            act(&env, &self.fx, self.clock.as_ref(), live).await;
        }
    }
}
