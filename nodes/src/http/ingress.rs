//! The Twilio-facing HTTP side: voice webhook, status callback, health.
//!
//! The webhook is the one synchronous path in voxgate, because Twilio waits for it: parse, find
//! the tenant, check the signature against the URL Twilio signed (rebuilt from `public_url`), check
//! the number, append the call durably, start its actor, answer TwiML.

// The request checks below return the finished HTTP response as their error (Twilio-shaped
// JSON), which is large; they run once per request, so it is not boxed.
#![allow(clippy::result_large_err)]

use std::time::Instant;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use voxgate_actors::billing::usage::{duration_bound_secs, observed_secs};
use voxgate_actors::call::{id_kind, CallIdentity};
use voxgate_protocol::event::{
    CallDurationImplausible, CallReceived, CallRejected, CallStatusChanged, Event, RejectReason, StatusSource,
};
use voxgate_protocol::twilio::{signature, twiml, SignedBody, StatusCallback, VoiceWebhook};
use voxgate_protocol::{AccountSid, CallSid, Envelope, EventId};
use voxgate_storage::topics;

use crate::config::Secret;
use crate::http::{twilio_error, AppState};
use voxgate_actors::tenancy::gate::{CallAttempt, Decision};
use voxgate_protocol::event::QuotaWarning;

/// Log lines about requests nobody authenticated: at most one a second (metrics count them all).
static UNAUTHENTICATED_LINES: crate::http::perimeter::LineLimit = crate::http::perimeter::LineLimit::per_second();

pub(crate) fn twiml_response(xml: String) -> Response {
    ([(header::CONTENT_TYPE, "text/xml; charset=utf-8")], xml).into_response()
}

fn form_pairs(body: &[u8]) -> Vec<(String, String)> {
    form_urlencoded::parse(body).map(|(k, v)| (k.into_owned(), v.into_owned())).collect()
}

fn param<'a>(pairs: &'a [(String, String)], name: &str) -> Option<&'a str> {
    pairs.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
}

fn is_form(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .map(|v| v.trim_start().to_ascii_lowercase().starts_with("application/x-www-form-urlencoded"))
        .unwrap_or(false)
}

/// Checks a form webhook's signature with the tenant's token. On failure the response says which
/// URL was checked: a public_url mismatch is the most common production mistake.
fn check_signature(
    state: &AppState,
    tenant: AccountSid,
    token: &Secret,
    uri: &Uri,
    headers: &HeaderMap,
    pairs: &[(String, String)],
    endpoint: &'static str,
) -> Result<(), Response> {
    let path_and_query = uri.path_and_query().map(|p| p.as_str()).unwrap_or("/");
    let url = signature::public_url(&state.cfg.public_url, path_and_query);
    let presented = headers.get("x-twilio-signature").and_then(|v| v.to_str().ok());
    let ok = match presented {
        Some(sig) => signature::validate(token.expose().as_bytes(), &url, SignedBody::Form(pairs), sig),
        None => false,
    };
    if ok {
        return Ok(());
    }
    let why = if presented.is_some() { "invalid" } else { "missing" };
    metrics::counter!("voxgate_webhook_rejected_total", "endpoint" => endpoint, "reason" => "signature").increment(1);
    if let Some(suppressed) = UNAUTHENTICATED_LINES.admit() {
        tracing::warn!(tenant = %tenant, endpoint, url = %url, suppressed, "{why} X-Twilio-Signature (checked against this URL; is public_url right?)");
    }
    Err(twilio_error(
        StatusCode::FORBIDDEN,
        20003,
        format!("{why} X-Twilio-Signature for {url} (the URL voxgate checked; set public_url to the URL Twilio calls)"),
    ))
}

fn bad_request(endpoint: &'static str, reason: &'static str, message: String) -> Response {
    metrics::counter!("voxgate_webhook_rejected_total", "endpoint" => endpoint, "reason" => reason).increment(1);
    twilio_error(StatusCode::BAD_REQUEST, 20422, message)
}

/// The sids every voice request carries, checked before anything else (cheap, no secrets).
fn sids(pairs: &[(String, String)], endpoint: &'static str) -> Result<(AccountSid, CallSid), Response> {
    let account = param(pairs, "AccountSid")
        .ok_or_else(|| bad_request(endpoint, "missing_field", "missing required parameter AccountSid".into()))?;
    let account = AccountSid::parse(account)
        .map_err(|e| bad_request(endpoint, "invalid_field", format!("invalid parameter AccountSid: {e}")))?;
    let call = param(pairs, "CallSid")
        .ok_or_else(|| bad_request(endpoint, "missing_field", "missing required parameter CallSid".into()))?;
    let call = CallSid::parse(call)
        .map_err(|e| bad_request(endpoint, "invalid_field", format!("invalid parameter CallSid: {e}")))?;
    Ok((account, call))
}

pub(crate) async fn append_call_event(
    state: &AppState,
    tenant: AccountSid,
    call: CallSid,
    id: EventId,
    ev: Event,
) -> Result<(), Response> {
    let env = Envelope { event_id: id, tenant, call: Some(call), occurred_at: state.clock.now(), payload: ev };
    let bytes = voxgate_protocol::encode(&env);
    state.log.append_or_spool(topics::CALLS, call.partition_key(), &bytes).await.map(|_| ()).map_err(|e| {
        tracing::error!(stage = "ingress", call_sid = %call, tenant = %tenant, error = %e, "event log append failed");
        metrics::counter!("voxgate_ingress_log_failures_total").increment(1);
        twilio_error(StatusCode::SERVICE_UNAVAILABLE, 20503, format!("{e}; retry"))
    })
}

/// A voice request's form pairs and its sids.
type VoiceForm = (Vec<(String, String)>, AccountSid, CallSid);

/// The form and the sids every voice request carries, checked before any secret is used.
fn voice_request(headers: &HeaderMap, body: &[u8], endpoint: &'static str) -> Result<VoiceForm, Response> {
    if !is_form(headers) {
        return Err(bad_request(
            endpoint,
            "content_type",
            "expected Content-Type application/x-www-form-urlencoded".into(),
        ));
    }
    let pairs = form_pairs(body);
    let (account, call) = sids(&pairs, endpoint)?;
    Ok((pairs, account, call))
}

/// `POST /api/voice/twilio/inbound`
pub(crate) async fn inbound(State(state): State<AppState>, uri: Uri, headers: HeaderMap, body: Bytes) -> Response {
    const EP: &str = "inbound";
    let request_started = Instant::now();
    let (pairs, account, call) = match voice_request(&headers, &body, EP) {
        Ok(r) => r,
        Err(r) => return r,
    };
    let from = param(&pairs, "From").unwrap_or_default().chars().take(255).collect::<String>();
    let to = param(&pairs, "To").unwrap_or_default().chars().take(255).collect::<String>();
    let Some(token) = state.tenancy.token(account) else {
        // Unauthenticated (we hold no token for it): refuse, count, and write nothing — anyone can
        // send this, with any CallSid, as often as they like.
        metrics::counter!("twilio_calls_total", "status" => "rejected", "from_country" => "unknown").increment(1);
        metrics::counter!("voxgate_webhook_rejected_total", "endpoint" => EP, "reason" => "unknown_tenant")
            .increment(1);
        if let Some(suppressed) = UNAUTHENTICATED_LINES.admit() {
            tracing::warn!(stage = "ingress", tenant = %account, call_sid = %call, from = %from, to = %to, suppressed, "call for an unknown tenant rejected (not recorded)");
        }
        return twiml_response(twiml::reject(None));
    };
    if let Err(r) = check_signature(&state, account, &token, &uri, &headers, &pairs, EP) {
        return r;
    }
    let hook = match VoiceWebhook::from_form(&pairs) {
        Ok(h) => h,
        Err(e) => return bad_request(EP, "invalid_field", e.to_string()),
    };
    let from_country = hook.from_country.clone().filter(|c| c.len() == 2).unwrap_or_else(|| "unknown".into());
    let session = call.to_string();
    let xml = match crate::http::stream::answer(&state.cfg.public_url, account, call) {
        Ok(x) => x,
        Err(e) => return twilio_error(StatusCode::INTERNAL_SERVER_ERROR, 20500, e.to_string()),
    };

    // Gateway mode: the number's calls are the customer's app's to answer.
    let routing = state
        .tenancy
        .read(|d| d.owner_of(&hook.to).filter(|n| n.tenant == account).map(|n| n.routing.clone()))
        .filter(|r| r.voice_url.is_some());
    if already_received(&state, call) {
        // Twilio retried a webhook we already took: the same answer, nothing appended twice.
        if let Some(r) = routing {
            return crate::http::gateway::answer(&state, account, call, &token, &pairs, &r, request_started).await;
        }
        return twiml_response(xml);
    }
    let received_at = state.clock.now();
    let attempt = CallAttempt {
        tenant: account,
        call,
        from: &hook.from,
        to: &hook.to,
        direction: hook.direction,
        at: received_at,
    };
    let warn = match state.tenancy.decide(&attempt) {
        Decision::Accept { warn } => warn,
        Decision::Refuse(reason) => {
            let label = reason.label();
            metrics::counter!("twilio_calls_total", "status" => "rejected", "from_country" => from_country)
                .increment(1);
            metrics::counter!("voxgate_webhook_rejected_total", "endpoint" => EP, "reason" => label).increment(1);
            metrics::counter!("voxgate_calls_refused_total", "reason" => label, "tenant" => state.tenancy.labels.label(account))
                .increment(1);
            tracing::warn!(stage = "ingress", tenant = %account, call_sid = %call, reason = label, code = reason.code(), "call refused");
            // Quota refusals are a busy signal (try later); the others a plain rejection.
            let cause = match reason {
                RejectReason::ConcurrencyQuota { .. } | RejectReason::RateQuota { .. } => Some("busy"),
                _ => None,
            };
            let ev = Event::CallRejected(CallRejected { from: hook.from, to: hook.to, reason });
            let id = EventId::derive(id_kind::CALL_REJECTED, &[call.as_u128()]);
            if let Err(r) = append_call_event(&state, account, call, id, ev).await {
                return r;
            }
            return twiml_response(twiml::reject(cause));
        }
    };
    // From here on an early return frees the quota place (the slot is dropped).
    let slot = state.tenancy.slot(account, call);
    let ev = Event::CallReceived(CallReceived {
        from: hook.from.clone(),
        to: hook.to.clone(),
        direction: hook.direction,
        status: hook.call_status,
        from_country: hook.from_country.clone(),
        to_country: hook.to_country.clone(),
        stream_session: session.clone(),
    });
    let id = EventId::derive(id_kind::CALL_RECEIVED, &[call.as_u128()]);
    if let Err(r) = append_call_event(&state, account, call, id, ev).await {
        return r;
    }
    if let Some((active, limit)) = warn {
        metrics::counter!("voxgate_quota_warnings_total", "tenant" => state.tenancy.labels.label(account)).increment(1);
        tracing::warn!(stage = "ingress", tenant = %account, call_sid = %call, active, limit, code = 53121, "tenant approaching its concurrent-call quota");
        let ev = Event::QuotaWarning(QuotaWarning { active, limit, code: 53121 });
        let id = EventId::derive(id_kind::QUOTA_WARNING, &[call.as_u128()]);
        if let Err(r) = append_call_event(&state, account, call, id, ev).await {
            return r;
        }
    }
    let started = state.calls.start(account, call, hook.call_status, received_at, slot).await;
    if let Err(e) = started {
        // The call is in the log; Twilio will retry the webhook and the retry starts the actor.
        tracing::error!(stage = "ingress", call_sid = %call, tenant = %account, error = %e, "call actor did not start");
        return twilio_error(StatusCode::SERVICE_UNAVAILABLE, 20503, "call could not be started; retry");
    }
    metrics::counter!("twilio_calls_total", "status" => "accepted", "from_country" => from_country).increment(1);
    tracing::info!(stage = "ingress", call_sid = %call, tenant = %account, gateway = routing.is_some(), "call accepted");
    if let Some(r) = routing {
        return crate::http::gateway::answer(&state, account, call, &token, &pairs, &r, request_started).await;
    }
    twiml_response(xml)
}

/// Whether `call` was received already (a webhook Twilio retried). Its actor running here says
/// so; in a cluster, where the actor may run on another node, so does the usage book, which every
/// node keeps from the calls log: no round trip to the call's node on the webhook's path.
fn already_received(state: &AppState, call: CallSid) -> bool {
    voxgate_actors::call::CallActor::find(call).is_some()
        || (state.calls.clustered() && state.billing.read().usage.call_owner(call).is_some())
}

/// `POST /api/voice/twilio/status`
///
/// A valid signature proves only "this tenant": the callback changes a call only when that tenant
/// owns it. A call of another tenant answers exactly like a call nobody knows, and changes
/// nothing. A `CallDuration` voxgate does not believe is recorded as such and not billed.
pub(crate) async fn status(State(state): State<AppState>, uri: Uri, headers: HeaderMap, body: Bytes) -> Response {
    const EP: &str = "status";
    let (pairs, account, call) = match voice_request(&headers, &body, EP) {
        Ok(r) => r,
        Err(r) => return r,
    };
    let Some(token) = state.tenancy.token(account) else {
        metrics::counter!("voxgate_webhook_rejected_total", "endpoint" => EP, "reason" => "unknown_tenant")
            .increment(1);
        if let Some(suppressed) = UNAUTHENTICATED_LINES.admit() {
            tracing::warn!(stage = "ingress", tenant = %account, call_sid = %call, suppressed, "status callback for an unknown tenant refused");
        }
        return twilio_error(StatusCode::NOT_FOUND, 20404, format!("unknown account {account}"));
    };
    if let Err(r) = check_signature(&state, account, &token, &uri, &headers, &pairs, EP) {
        return r;
    }
    let cb = match StatusCallback::from_form(&pairs) {
        Ok(c) => c,
        Err(e) => return bad_request(EP, "invalid_field", e.to_string()),
    };
    let received_at = match call_owner(&state, call).await {
        Some(CallIdentity { tenant, received_at }) if tenant == account => received_at,
        owner => {
            let reason = if owner.is_some() { "foreign_call" } else { "unknown_call" };
            metrics::counter!("voxgate_webhook_rejected_total", "endpoint" => EP, "reason" => reason).increment(1);
            if let Some(suppressed) = FOREIGN_LINES.admit() {
                tracing::warn!(stage = "ingress", tenant = %account, call_sid = %call, reason, suppressed, "status callback for a call this tenant does not own: nothing changed");
            }
            // The same answer either way: no probing for other tenants' calls.
            return twilio_error(StatusCode::NOT_FOUND, 20404, format!("call {call} was not found"));
        }
    };
    // The duration is believed up to what voxgate observed of the call itself.
    let now = state.clock.now();
    let max_secs = u32::try_from(state.cfg.calls.max_duration.as_secs()).unwrap_or(u32::MAX);
    let bound = duration_bound_secs(received_at, now, Some(max_secs));
    let (duration, implausible) = match (cb.call_duration, &cb.call_duration_invalid) {
        (_, Some(raw)) => (None, Some(raw.clone())),
        (Some(d), None) if d > bound => (None, Some(d.to_string())),
        (d, None) => (d, None),
    };
    if let Some(reported) = implausible {
        metrics::counter!("voxgate_call_duration_implausible_total").increment(1);
        tracing::warn!(stage = "ingress", tenant = %account, call_sid = %call, reported = %reported, bound_secs = bound, "CallDuration not believed; usage uses the observed duration");
        let ev = Event::CallDurationImplausible(CallDurationImplausible {
            reported,
            observed_secs: observed_secs(received_at, now),
            bound_secs: bound,
        });
        let id = EventId::derive(
            id_kind::DURATION_IMPLAUSIBLE,
            &[call.as_u128(), u128::from(cb.sequence_number.unwrap_or(u32::MAX))],
        );
        if let Err(r) = append_call_event(&state, account, call, id, ev).await {
            return r;
        }
    }
    if cb.call_status.is_terminal() {
        metrics::counter!("twilio_calls_total", "status" => cb.call_status.as_str(), "from_country" => "all")
            .increment(1);
        if let Some(d) = duration {
            metrics::histogram!("twilio_call_duration_seconds").record(f64::from(d));
        }
    }
    if let Some(r) = state.calls.status(call, cb.call_status, cb.sequence_number, duration).await {
        match r {
            Ok(()) => {
                crate::http::gateway::forward_status(&state, account, call, &token, &pairs);
                return StatusCode::NO_CONTENT.into_response();
            }
            Err(e) => {
                tracing::error!(stage = "ingress", call_sid = %call, tenant = %account, error = %e, "status not recorded");
                metrics::counter!("voxgate_ingress_log_failures_total").increment(1);
                return twilio_error(
                    StatusCode::SERVICE_UNAVAILABLE,
                    20503,
                    format!("event log unavailable: {e}; retry"),
                );
            }
        }
    }
    // No running actor (the call already ended, or another node owns it): record the callback.
    let recorded = record_status(&state, account, call, &cb, duration).await;
    if recorded.status() == StatusCode::NO_CONTENT {
        crate::http::gateway::forward_status(&state, account, call, &token, &pairs);
    }
    recorded
}

/// Records a status callback the call's actor could not take.
async fn record_status(
    state: &AppState,
    account: AccountSid,
    call: CallSid,
    cb: &StatusCallback,
    duration: Option<u32>,
) -> Response {
    let ev = Event::CallStatusChanged(CallStatusChanged {
        status: cb.call_status,
        source: StatusSource::Callback,
        sequence: cb.sequence_number,
        duration_secs: duration,
    });
    let id = EventId::derive(
        id_kind::STATUS_CALLBACK,
        &[call.as_u128(), u128::from(cb.sequence_number.unwrap_or(u32::MAX))],
    );
    match append_call_event(state, account, call, id, ev).await {
        Ok(()) => StatusCode::NO_CONTENT.into_response(),
        Err(r) => r,
    }
}

/// Log lines about callbacks for calls the tenant does not own: at most one a second.
static FOREIGN_LINES: crate::http::perimeter::LineLimit = crate::http::perimeter::LineLimit::per_second();

/// Whose call `call` is: its running actor says; else the usage book, which holds every call
/// received (on any node) that it still remembers. A call the book has not seen may simply not
/// have reached it yet, so the book is given a moment to catch up with the calls log.
pub(crate) async fn call_owner(state: &AppState, call: CallSid) -> Option<CallIdentity> {
    if let Some(id) = state.calls.identity(call).await {
        return Some(id);
    }
    let deadline = Instant::now() + std::time::Duration::from_secs(2);
    loop {
        let known = state.billing.read().usage.call_owner(call);
        if let Some((tenant, received_at)) = known {
            return Some(CallIdentity { tenant, received_at });
        }
        let behind = crate::http::health::lag(&state.log, &state.billing.progress(), topics::CALLS).unwrap_or(0) > 0;
        if !behind || Instant::now() >= deadline {
            return None;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
}
