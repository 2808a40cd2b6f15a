//! voxgate's own `Quotas` and `BlockedNumbers`: an account's call limits and the numbers it refuses.

use axum::http::{Method, StatusCode};
use serde_json::{json, Value};
use voxgate_actors::tenancy::Quota;
use voxgate_protocol::{AccountSid, Timestamp};

use super::{page, ApiError, Request, Resource, API};
use crate::http::AppState;

pub(super) async fn handle(cx: &Request<'_>, method: &Method, res: Resource) -> Result<(StatusCode, Value), ApiError> {
    let (state, t, params, admin, _who, path) = (cx.state, &cx.state.tenancy, &cx.params, cx.admin, cx.who, cx.path);
    match (method.clone(), res) {
        (Method::GET, Resource::Quotas(a)) => Ok((StatusCode::OK, quota_json(state, a))),
        (Method::POST, Resource::Quotas(a)) => {
            if !admin {
                return Err(ApiError::forbidden("changing quotas"));
            }
            let current = t.read(|d| d.tenant(a).map(|r| r.quota)).unwrap_or_default();
            let q = Quota {
                max_concurrent_calls: params.u32("MaxConcurrentCalls")?.unwrap_or(current.max_concurrent_calls),
                calls_per_second: params.u32("CallsPerSecond")?.unwrap_or(current.calls_per_second),
            };
            t.command(a, |d| d.set_quota(a, q)).await?;
            Ok((StatusCode::OK, quota_json(state, a)))
        }
        (Method::GET, Resource::Blocks(a)) => {
            let now = state.clock.now();
            let items: Vec<Value> = t.read(|d| {
                d.blocks_of(a)
                    .filter(|(_, b)| b.until.is_none_or(|u| now < u))
                    .map(|(n, b)| block_json(a, n, b.reason.as_str(), b.since, b.until))
                    .collect()
            });
            page(items, "blocked_numbers", &format!("{API}/Accounts/{a}/BlockedNumbers.json"), params)
        }
        (Method::POST, Resource::Blocks(a)) => {
            if !admin {
                return Err(ApiError::forbidden("blocking numbers"));
            }
            let number = params.get("PhoneNumber").ok_or_else(|| ApiError::invalid("PhoneNumber", "is required"))?;
            let reason = params.get("Reason").unwrap_or("blocked by the operator");
            let now = state.clock.now();
            let until = params.u32("DurationSeconds")?.map(|s| now.add_millis(i64::from(s) * 1000));
            let env = t.command(a, |d| d.block_caller(a, number, reason, until)).await?;
            Ok((StatusCode::CREATED, block_json(a, number, reason, env.occurred_at, until)))
        }
        (Method::DELETE, Resource::Block(a, n)) => {
            if !admin {
                return Err(ApiError::forbidden("unblocking numbers"));
            }
            t.command(a, |d| d.unblock_caller(a, &n)).await?;
            Ok((StatusCode::NO_CONTENT, Value::Null))
        }
        (m, _) => Err(ApiError::method_not_allowed(&m, path)),
    }
}

pub(super) fn quota_json(state: &AppState, a: AccountSid) -> Value {
    let q = state.tenancy.read(|d| d.tenant(a).map(|r| r.quota)).unwrap_or_default();
    json!({
        "account_sid": a.to_string(),
        "max_concurrent_calls": q.max_concurrent_calls,
        "calls_per_second": q.calls_per_second,
        "active_calls": state.tenancy.active_calls(a),
        "warning_percent": voxgate_actors::tenancy::quota::WARN_PERCENT,
        "uri": format!("{API}/Accounts/{a}/Quotas.json"),
    })
}

pub(super) fn block_json(
    a: AccountSid,
    number: &str,
    reason: &str,
    since: Timestamp,
    until: Option<Timestamp>,
) -> Value {
    let enc: String = form_urlencoded::byte_serialize(number.as_bytes()).collect();
    json!({
        "account_sid": a.to_string(),
        "phone_number": number,
        "reason": reason,
        "date_created": since.rfc2822(),
        "date_expires": until.map(|u| u.rfc2822()),
        "uri": format!("{API}/Accounts/{a}/BlockedNumbers/{enc}.json"),
    })
}
