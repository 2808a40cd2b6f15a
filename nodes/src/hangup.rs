//! Ending calls: the call's actor records the hang-up and closes its stream, and Twilio's REST API
//! is asked to complete the call. Used by the fraud stage (a verdict) and billing (a budget).

use std::time::Duration;

use ractor::RpcReplyPort;
use voxgate_actors::call::{CallActor, CallMsg};
use voxgate_protocol::{AccountSid, CallSid};

use crate::tenancy::Tenancy;

/// How long (in 10 ms polls) a hang-up waits for the call's actor to start.
const ACTOR_WAIT_POLLS: u32 = 200;

/// Twilio's REST API, as far as voxgate calls it: ending a call.
#[derive(Clone)]
pub struct TwilioRest {
    base: String,
    http: reqwest::Client,
}

impl TwilioRest {
    /// `base` is e.g. `https://api.twilio.com` (config `twilio_api_url`; a fake in tests).
    pub fn new(base: &str) -> Self {
        let http = reqwest::Client::builder().timeout(Duration::from_secs(10)).build().unwrap_or_default();
        Self { base: base.trim_end_matches('/').to_owned(), http }
    }

    /// `POST /2010-04-01/Accounts/{AC}/Calls/{CA}.json` with `Status=completed`, retried with
    /// exponential backoff (3 attempts). Returns the final HTTP status.
    pub async fn complete_call(&self, tenancy: &Tenancy, tenant: AccountSid, call: CallSid) -> Result<u16, String> {
        let token = tenancy.token(tenant).ok_or("unknown tenant")?;
        let url = format!("{}/2010-04-01/Accounts/{tenant}/Calls/{call}.json", self.base);
        let mut delay = Duration::from_millis(200);
        let mut last = String::new();
        for attempt in 1..=3 {
            let r = self
                .http
                .post(&url)
                .basic_auth(tenant.to_string(), Some(token.expose()))
                .header("content-type", "application/x-www-form-urlencoded")
                .body("Status=completed")
                .send()
                .await;
            match r {
                Ok(resp) if resp.status().is_success() || resp.status().as_u16() == 404 => {
                    metrics::counter!("voxgate_twilio_rest_requests_total", "outcome" => "ok").increment(1);
                    return Ok(resp.status().as_u16());
                }
                Ok(resp) if resp.status().is_client_error() && resp.status().as_u16() != 429 => {
                    metrics::counter!("voxgate_twilio_rest_requests_total", "outcome" => "refused").increment(1);
                    return Err(format!("Twilio refused ending {call}: HTTP {}", resp.status()));
                }
                Ok(resp) => last = format!("HTTP {}", resp.status()),
                Err(e) => last = e.to_string(),
            }
            metrics::counter!("voxgate_twilio_rest_requests_total", "outcome" => "retry").increment(1);
            tracing::warn!(stage = "hangup", call_sid = %call, tenant = %tenant, attempt, error = %last, "ending the call at Twilio failed; retrying");
            tokio::time::sleep(delay).await;
            delay *= 2;
        }
        metrics::counter!("voxgate_twilio_rest_requests_total", "outcome" => "failed").increment(1);
        Err(format!("ending {call} at Twilio failed after 3 attempts: {last}"))
    }
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
    match twilio.complete_call(tenancy, tenant, call).await {
        Ok(status) => {
            tracing::info!(stage = source, call_sid = %call, tenant = %tenant, status, "call completed at Twilio")
        }
        Err(e) => {
            tracing::error!(stage = source, call_sid = %call, tenant = %tenant, error = %e, "call not completed at Twilio")
        }
    }
}
