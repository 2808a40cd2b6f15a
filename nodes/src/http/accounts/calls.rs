//! `Calls/{CA}/Transcriptions`: real-time transcription of a running call, started and stopped
//! over REST as on Twilio.

use axum::http::{Method, StatusCode};
use serde_json::{json, Value};
use voxgate_protocol::event::HttpMethod;
use voxgate_protocol::{AccountSid, CallSid, Timestamp};

use super::usage::check_callback_url;
use super::{ApiError, Request, Resource, API};
use crate::http::AppState;

pub(super) async fn handle(cx: &Request<'_>, method: &Method, res: Resource) -> Result<(StatusCode, Value), ApiError> {
    let (state, _t, params, _admin, _who, path) = (cx.state, &cx.state.tenancy, &cx.params, cx.admin, cx.who, cx.path);
    match (method.clone(), res) {
        (Method::POST, Resource::CallTranscriptions(a, call)) => {
            running_call_of(state, a, call, path).await?;
            if let Some(u) = params.get("StatusCallbackUrl") {
                check_callback_url(state, u).await?;
            }
            if let Some(m) = params.get("StatusCallbackMethod") {
                HttpMethod::parse(m).ok_or_else(|| ApiError::invalid("StatusCallbackMethod", "must be GET or POST"))?;
            }
            if let Some(t) = params.get("Track") {
                if !matches!(t, "inbound_track" | "outbound_track" | "both_tracks") {
                    return Err(ApiError::invalid("Track", "must be inbound_track, outbound_track or both_tracks"));
                }
            }
            if let Some(h) = params.get("Hints") {
                voxgate_actors::tenancy::directory::check_hints(h)?;
            }
            let started = crate::http::gateway::start_transcription(state, a, call, &params.0)
                .await
                .map_err(ApiError::unavailable)?;
            Ok((
                StatusCode::CREATED,
                transcription_json(
                    a,
                    call,
                    Some(&started.sid),
                    started.name.as_deref(),
                    "in-progress",
                    state.clock.now(),
                ),
            ))
        }
        (Method::POST, Resource::CallTranscription(a, call, which)) => {
            running_call_of(state, a, call, path).await?;
            if params.get("Status") != Some("stopped") {
                return Err(ApiError::invalid("Status", "must be stopped"));
            }
            crate::http::gateway::stop_transcription(state, a, call, &which).await.map_err(ApiError::unavailable)?;
            // Stopped by its sid or by its name (the path says which).
            let (sid, name) =
                if which.starts_with("GT") { (Some(which.as_str()), None) } else { (None, Some(which.as_str())) };
            Ok((StatusCode::OK, transcription_json(a, call, sid, name, "stopped", state.clock.now())))
        }
        (m, _) => Err(ApiError::method_not_allowed(&m, path)),
    }
}

/// The call, when it is the tenant's and still running; a foreign or unknown call is not found
/// (no probing for other tenants' calls), an ended one is Twilio's 21220.
pub(super) async fn running_call_of(
    state: &AppState,
    a: AccountSid,
    call: CallSid,
    path: &str,
) -> Result<(), ApiError> {
    match crate::http::ingress::call_owner(state, call).await {
        Some(id) if id.tenant == a => {}
        _ => return Err(ApiError::not_found(path)),
    }
    if state.billing.read().usage.call_ended(call) {
        return Err(ApiError::new(StatusCode::BAD_REQUEST, 21220, format!("call {call} is not in progress")));
    }
    Ok(())
}

/// Twilio's `Transcription` resource of a call (its `uri` names it by sid, else by name).
pub(super) fn transcription_json(
    a: AccountSid,
    call: CallSid,
    sid: Option<&str>,
    name: Option<&str>,
    status: &str,
    now: Timestamp,
) -> Value {
    json!({
        "account_sid": a.to_string(),
        "call_sid": call.to_string(),
        "sid": sid,
        "name": name,
        "status": status,
        "date_updated": now.rfc2822(),
        "uri": format!("{API}/Accounts/{a}/Calls/{call}/Transcriptions/{}.json", sid.or(name).unwrap_or_default()),
    })
}
