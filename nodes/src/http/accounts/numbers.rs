//! `IncomingPhoneNumbers`: a tenant's numbers and where their calls go (gateway routing).

use axum::http::{Method, StatusCode};
use serde_json::{json, Value};
use voxgate_actors::tenancy::NumberRecord;
use voxgate_protocol::event::{HttpMethod, NumberRouting};
use voxgate_protocol::PhoneNumberSid;

use super::{page, ApiError, Params, Request, Resource, API};
use crate::http::AppState;
use crate::stages::tenancy::random_u128;

pub(super) async fn handle(cx: &Request<'_>, method: &Method, res: Resource) -> Result<(StatusCode, Value), ApiError> {
    let (state, t, params, _admin, _who, path) = (cx.state, &cx.state.tenancy, &cx.params, cx.admin, cx.who, cx.path);
    match (method.clone(), res) {
        (Method::GET, Resource::Numbers(a)) => {
            let filter = params.get("PhoneNumber");
            let items: Vec<Value> = t.read(|d| {
                d.numbers_of(a)
                    .filter(|n| filter.is_none_or(|f| n.number == f))
                    .map(|n| number_json(state, n))
                    .collect()
            });
            page(items, "incoming_phone_numbers", &format!("{API}/Accounts/{a}/IncomingPhoneNumbers.json"), params)
        }
        (Method::POST, Resource::Numbers(a)) => {
            let number = params.get("PhoneNumber").ok_or_else(|| ApiError::invalid("PhoneNumber", "is required"))?;
            let sid = PhoneNumberSid::from_u128(random_u128());
            let routing = routing_params(state, params, None).await?;
            t.command_many(a, |d| {
                let mut events = vec![d.assign_number(a, sid, number, params.get("FriendlyName"))?];
                if let Some(r) = routing {
                    events.push(d.route_number(a, sid, Some(number), r)?);
                }
                Ok(events)
            })
            .await?;
            Ok((StatusCode::CREATED, t.read(|d| d.number(sid).map(|n| number_json(state, n))).unwrap_or(Value::Null)))
        }
        (Method::GET, Resource::Number(a, n)) => t
            .read(|d| d.number(n).filter(|r| r.tenant == a).map(|r| number_json(state, r)))
            .map(|v| (StatusCode::OK, v))
            .ok_or_else(|| ApiError::not_found(path)),
        (Method::POST, Resource::Number(a, n)) => {
            let current = t
                .read(|d| d.number(n).filter(|r| r.tenant == a).map(|r| r.routing.clone()))
                .ok_or_else(|| ApiError::not_found(path))?;
            if let Some(r) = routing_params(state, params, Some(current)).await? {
                t.command(a, |d| d.route_number(a, n, None, r)).await?;
            }
            t.read(|d| d.number(n).filter(|r| r.tenant == a).map(|r| number_json(state, r)))
                .map(|v| (StatusCode::OK, v))
                .ok_or_else(|| ApiError::not_found(path))
        }
        (Method::DELETE, Resource::Number(a, n)) => {
            t.command(a, |d| d.release_number(a, n)).await?;
            Ok((StatusCode::NO_CONTENT, Value::Null))
        }
        (m, _) => Err(ApiError::method_not_allowed(&m, path)),
    }
}

/// A number as Twilio's IncomingPhoneNumbers resource shows it. `voice_url` and the other routing
/// fields are the customer's (where voxgate forwards the calls); `voxgate_voice_url` and
/// `voxgate_status_callback` are where the number must point at Twilio for voxgate to see them.
pub(super) fn number_json(state: &AppState, n: &NumberRecord) -> Value {
    let r = &n.routing;
    json!({
        "account_sid": n.tenant.to_string(),
        "api_version": "2010-04-01",
        "capabilities": { "voice": true, "sms": false, "mms": false, "fax": false },
        "date_created": n.created_at.rfc2822(),
        "date_updated": n.created_at.rfc2822(),
        "friendly_name": n.friendly_name,
        "phone_number": n.number,
        "sid": n.sid.to_string(),
        "status": "in-use",
        "status_callback": r.status_callback,
        "status_callback_method": r.status_callback_method.as_str(),
        "voice_fallback_method": r.voice_fallback_method.as_str(),
        "voice_fallback_url": r.voice_fallback_url,
        "voice_method": r.voice_method.as_str(),
        "voice_url": r.voice_url,
        "voxgate_voice_url": format!("{}/api/voice/twilio/inbound", state.cfg.public_url),
        "voxgate_status_callback": format!("{}/api/voice/twilio/status", state.cfg.public_url),
        "uri": format!("{API}/Accounts/{}/IncomingPhoneNumbers/{}.json", n.tenant, n.sid),
    })
}

/// The routing fields of a create or update (`VoiceUrl`, `VoiceMethod`, `VoiceFallbackUrl`,
/// `VoiceFallbackMethod`, `StatusCallback`, `StatusCallbackMethod`) over `current`; `None` when
/// the request names none. An empty URL clears it. Every URL must reach the public internet
/// (unless `allow_private_callbacks`).
pub(super) async fn routing_params(
    state: &AppState,
    params: &Params,
    current: Option<NumberRouting>,
) -> Result<Option<NumberRouting>, ApiError> {
    const FIELDS: [&str; 6] = [
        "VoiceUrl",
        "VoiceMethod",
        "VoiceFallbackUrl",
        "VoiceFallbackMethod",
        "StatusCallback",
        "StatusCallbackMethod",
    ];
    if !FIELDS.iter().any(|f| params.get(f).is_some()) {
        return Ok(None);
    }
    let mut r = current.unwrap_or_default();
    let method = |field: &'static str, into: &mut HttpMethod| -> Result<(), ApiError> {
        if let Some(m) = params.get(field) {
            *into = HttpMethod::parse(m).ok_or_else(|| ApiError::invalid(field, "must be GET or POST"))?;
        }
        Ok(())
    };
    method("VoiceMethod", &mut r.voice_method)?;
    method("VoiceFallbackMethod", &mut r.voice_fallback_method)?;
    method("StatusCallbackMethod", &mut r.status_callback_method)?;
    for (field, slot) in [
        ("VoiceUrl", &mut r.voice_url),
        ("VoiceFallbackUrl", &mut r.voice_fallback_url),
        ("StatusCallback", &mut r.status_callback),
    ] {
        if let Some(u) = params.get(field) {
            if u.is_empty() {
                *slot = None;
                continue;
            }
            crate::http::outbound::check_url(u, state.cfg.allow_private_callbacks).await.map_err(|e| {
                metrics::counter!("voxgate_outbound_refused_total", "reason" => "at_creation").increment(1);
                ApiError::invalid(field, e)
            })?;
            *slot = Some(u.to_owned());
        }
    }
    Ok(Some(r))
}
