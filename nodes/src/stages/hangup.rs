//! Ending calls: the call's actor records the hang-up and closes its stream, and Twilio's REST API
//! is asked to complete the call. Used by the fraud stage (a verdict) and billing (a budget).

use std::time::Duration;

use voxgate_protocol::{AccountSid, CallSid};

pub use crate::http::twilio_rest::TwilioRest;
use crate::stages::calls::Calls;
use crate::stages::tenancy::Tenancy;

/// Counts a hang-up about to be handed to [`end_call`] (`voxgate_hangups_requested_total`), before
/// the task that runs it is spawned: with `voxgate_hangups_total` (counted when Twilio answered or
/// failed) an operator sees hang-ups in flight, and a test waits until none is.
pub fn count_requested(source: &'static str) {
    metrics::counter!("voxgate_hangups_requested_total", "source" => source).increment(1);
}

/// Ends `call`: its actor (here or on its call node) records `HangupRequested` and `completed`
/// (source voxgate) and closes the stream; then Twilio completes it. Ingress appends
/// `CallReceived` before it starts the call's actor, so a decision can overtake the actor's start
/// by a few milliseconds: wait for it briefly.
pub async fn end_call(
    call: CallSid,
    tenant: AccountSid,
    source: &str,
    reason: &str,
    calls: &Calls,
    tenancy: &Tenancy,
    twilio: &TwilioRest,
) {
    let mut recorded = calls.hangup(call, source, reason).await;
    let until = tokio::time::Instant::now() + Duration::from_secs(2);
    while recorded.is_none() && tokio::time::Instant::now() < until {
        tokio::time::sleep(Duration::from_millis(50)).await;
        recorded = calls.hangup(call, source, reason).await;
    }
    match recorded {
        Some(Ok(())) => {}
        Some(Err(e)) => {
            tracing::error!(stage = source, call_sid = %call, tenant = %tenant, error = %e, "call actor did not record the hang-up")
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
