//! The node's side of fraud screening: it follows the fraud log and acts on it — blocks go into
//! the webhook gate (so the next call from that number is refused synchronously), hang-up requests
//! end the call's actor and ask Twilio to complete the call through its REST API.

use std::sync::Arc;
use std::time::Duration;

use ractor::RpcReplyPort;
use voxgate_actors::call::{CallActor, CallMsg};
use voxgate_actors::tenancy::directory::Block;
use voxgate_protocol::{Clock, Envelope, Event};
use voxgate_storage::{topics, Log, StorageError};

use crate::tenancy::Tenancy;

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
    pub async fn complete_call(&self, tenancy: &Tenancy, env: &Envelope) -> Result<u16, String> {
        let call = env.call.ok_or("no call")?;
        let token = tenancy.token(env.tenant).ok_or("unknown tenant")?;
        let url = format!("{}/2010-04-01/Accounts/{}/Calls/{call}.json", self.base, env.tenant);
        let mut delay = Duration::from_millis(200);
        let mut last = String::new();
        for attempt in 1..=3 {
            let r = self
                .http
                .post(&url)
                .basic_auth(env.tenant.to_string(), Some(token.expose()))
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
            tracing::warn!(stage = "fraud", call_sid = %call, tenant = %env.tenant, attempt, error = %last, "ending the call at Twilio failed; retrying");
            tokio::time::sleep(delay).await;
            delay *= 2;
        }
        metrics::counter!("voxgate_twilio_rest_requests_total", "outcome" => "failed").increment(1);
        Err(format!("ending {call} at Twilio failed after 3 attempts: {last}"))
    }
}

/// How long (in 10 ms polls) a hang-up waits for the call's actor to start.
const ACTOR_WAIT_POLLS: u32 = 200;

/// Applies one fraud-log event; `live` events also end calls (not those read at startup).
async fn act(env: &Envelope, tenancy: &Arc<Tenancy>, twilio: &TwilioRest, clock: &dyn Clock, live: bool) {
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
            // Ending a call waits for its actor and for Twilio; blocks keep flowing meanwhile.
            let (env, h, tenancy, twilio) = (env.clone(), h.clone(), tenancy.clone(), twilio.clone());
            tokio::spawn(async move {
                // Ingress appends `CallReceived` before it starts the call's actor, so a verdict
                // can overtake the actor's start by a few milliseconds: wait for it briefly.
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
                            source: h.source.clone(),
                            reason: h.reason.clone(),
                            reply
                        });
                        if !matches!(r, Ok(Ok(()))) {
                            tracing::error!(stage = "fraud", call_sid = %call, tenant = %env.tenant, result = ?r, "call actor did not record the hang-up");
                        }
                    }
                    None => {
                        tracing::info!(stage = "fraud", call_sid = %call, tenant = %env.tenant, "no live actor for the call; ending it at Twilio only")
                    }
                }
                match twilio.complete_call(&tenancy, &env).await {
                    Ok(status) => {
                        tracing::info!(stage = "fraud", call_sid = %call, tenant = %env.tenant, status, "call completed at Twilio")
                    }
                    Err(e) => {
                        tracing::error!(stage = "fraud", call_sid = %call, tenant = %env.tenant, error = %e, "call not completed at Twilio")
                    }
                }
            });
        }
        _ => {}
    }
}

/// Reads the whole fraud log (blocks still in force), then follows it until the log closes.
pub async fn follow(
    log: Log,
    tenancy: Arc<Tenancy>,
    twilio: TwilioRest,
    clock: Arc<dyn Clock>,
) -> Result<(), StorageError> {
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
                        act(&env, &tenancy, &twilio, clock.as_ref(), live).await;
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
