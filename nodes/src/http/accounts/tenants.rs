//! `Accounts`: tenants and their subaccounts (list, create, fetch, rename, change status).

use axum::http::{Method, StatusCode};
use serde_json::{json, Value};
use voxgate_actors::tenancy::TenantRecord;
use voxgate_protocol::{AccountSid, Timestamp};

use super::{page, ApiError, Request, Resource, API};
use crate::stages::tenancy::{new_auth_token, random_bytes, random_u128, Principal};

pub(super) async fn handle(cx: &Request<'_>, method: &Method, res: Resource) -> Result<(StatusCode, Value), ApiError> {
    let (state, t, params, admin, who, path) = (cx.state, &cx.state.tenancy, &cx.params, cx.admin, cx.who, cx.path);
    match (method.clone(), res) {
        (Method::GET, Resource::Accounts) => {
            let name = params.get("FriendlyName");
            let status = params.status()?;
            let items: Vec<Value> = t.read(|d| {
                d.tenants()
                    .filter(|r| match who {
                        Principal::Admin => true,
                        Principal::Tenant(s) => d.may_access(s, r.sid),
                    })
                    .filter(|r| name.is_none_or(|n| r.friendly_name == n))
                    .filter(|r| status.is_none_or(|s| r.status == s))
                    .map(account_json)
                    .collect()
            });
            page(items, "accounts", &format!("{API}/Accounts.json"), params)
        }
        (Method::POST, Resource::Accounts) => {
            if !admin {
                return Err(ApiError::forbidden("creating an account"));
            }
            let parent = params
                .get("ParentAccountSid")
                .map(|p| AccountSid::parse(p).map_err(|e| ApiError::invalid("ParentAccountSid", e)))
                .transpose()?;
            let now = state.clock.now();
            let name = params.get("FriendlyName").map(str::to_owned).unwrap_or_else(|| default_name(now));
            let sid = AccountSid::from_u128(random_u128());
            let token = new_auth_token();
            let sealed = t.sealer().seal(sid, &token, random_bytes::<12>());
            t.command(sid, |d| d.create_tenant(sid, parent, &name, sealed)).await?;
            Ok((StatusCode::CREATED, t.read(|d| d.tenant(sid).map(account_json)).unwrap_or(Value::Null)))
        }
        (Method::GET, Resource::Account(a)) => {
            Ok((StatusCode::OK, t.read(|d| d.tenant(a).map(account_json)).unwrap_or(Value::Null)))
        }
        (Method::POST, Resource::Account(a)) => {
            let name = params.get("FriendlyName");
            let status = params.status()?;
            // A tenant renames itself; its status is changed by its parent or the operator (a
            // config-file tenant has no parent, so only the operator changes its status).
            if status.is_some() && who == Principal::Tenant(a) {
                return Err(ApiError::forbidden("changing an account's own status"));
            }
            t.command(a, |d| d.update_tenant(a, name, status, admin)).await?;
            Ok((StatusCode::OK, t.read(|d| d.tenant(a).map(account_json)).unwrap_or(Value::Null)))
        }
        (m, _) => Err(ApiError::method_not_allowed(&m, path)),
    }
}

pub(super) fn account_json(r: &TenantRecord) -> Value {
    let uri = format!("{API}/Accounts/{}.json", r.sid);
    let base = format!("{API}/Accounts/{}", r.sid);
    json!({
        "auth_token": r.auth_token.expose(),
        "date_created": r.created_at.rfc2822(),
        "date_updated": r.updated_at.rfc2822(),
        "friendly_name": r.friendly_name,
        "owner_account_sid": r.parent.unwrap_or(r.sid).to_string(),
        "sid": r.sid.to_string(),
        "status": r.status.as_str(),
        "subresource_uris": {
            "incoming_phone_numbers": format!("{base}/IncomingPhoneNumbers.json"),
            "usage": format!("{base}/Usage.json"),
            "quotas": format!("{base}/Quotas.json"),
            "blocked_numbers": format!("{base}/BlockedNumbers.json"),
        },
        "type": "Full",
        "uri": uri,
    })
}

pub(super) fn default_name(now: Timestamp) -> String {
    let s = now.to_string(); // 2025-01-07T18:02:11.000Z
    let (date, time) = (s.get(..10).unwrap_or(""), s.get(11..16).unwrap_or(""));
    let (h, m) = time.split_once(':').unwrap_or(("0", "0"));
    let h: u32 = h.parse().unwrap_or(0);
    let (h12, ampm) = match h {
        0 => (12, "am"),
        1..=11 => (h, "am"),
        12 => (12, "pm"),
        _ => (h - 12, "pm"),
    };
    format!("SubAccount Created at {date} {h12}:{m} {ampm}")
}
