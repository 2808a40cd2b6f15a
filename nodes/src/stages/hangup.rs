//! Ending calls: the call's actor records the hang-up and closes its stream, and Twilio's REST API
//! is asked to complete the call. Used by the fraud stage (a verdict) and billing (a budget).

use std::time::Duration;

use ractor::RpcReplyPort;
use voxgate_actors::call::{CallActor, CallMsg};
use voxgate_protocol::{AccountSid, CallSid};

pub use crate::http::twilio_rest::TwilioRest;
use crate::stages::tenancy::Tenancy;

/// How long (in 10 ms polls) a hang-up waits for the call's actor to start.
const ACTOR_WAIT_POLLS: u32 = 200;

/// Counts a hang-up about to be handed to [`end_call`] (`voxgate_hangups_requested_total`), before
/// the task that runs it is spawned: with `voxgate_hangups_total` (counted when Twilio answered or
/// failed) an operator sees hang-ups in flight, and a test waits until none is.
pub fn count_requested(source: &'static str) {
    metrics::counter!("voxgate_hangups_requested_total", "source" => source).increment(1);
}

/// Ends `call`: its actor records `HangupRequested` and `completed` (source voxgate) and closes
/// the stream; then Twilio completes it. Ingress appends `CallReceived` before it starts the call's
/// actor, so a decision can overtake the actor's start by a few milliseconds: wait for it briefly.
pub async fn end_call(
    call: CallSid,
    tenant: AccountSid,
    source: &str,
    reason: &str,
    tenancy: &Tenancy,
    twilio: &TwilioRest,
) {
    let mut actor = CallActor::find(call);
    for _ in 0..ACTOR_WAIT_POLLS {
        if actor.is_some() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
        actor = CallActor::find(call);
    }
    match actor {
        Some(actor) => {
            let r = ractor::call!(actor, |reply: RpcReplyPort<_>| CallMsg::Hangup {
                source: source.to_owned(),
                reason: reason.to_owned(),
                reply
            });
            if !matches!(r, Ok(Ok(()))) {
                tracing::error!(stage = source, call_sid = %call, tenant = %tenant, result = ?r, "call actor did not record the hang-up");
            }
        }
        None => {
            tracing::info!(stage = source, call_sid = %call, tenant = %tenant, "no live actor for the call; ending it at Twilio only")
        }
    }
    let outcome = match twilio.complete_call(tenancy, tenant, call).await {
        Ok(status) => {
            tracing::info!(stage = source, call_sid = %call, tenant = %tenant, status, "call completed at Twilio");
            "completed"
        }
        Err(e) => {
            tracing::error!(stage = source, call_sid = %call, tenant = %tenant, error = %e, "call not completed at Twilio");
            "failed"
        }
    };
    metrics::counter!("voxgate_hangups_total", "source" => source.to_owned(), "outcome" => outcome).increment(1);
}
