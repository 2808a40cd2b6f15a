//! Twilio-shaped REST for tenants under `/2010-04-01/`: Accounts (tenants and subaccounts),
//! IncomingPhoneNumbers, and voxgate's own Quotas and BlockedNumbers resources, with HTTP Basic
//! auth, per-tenant throttles and Twilio's JSON shapes (snake_case fields, RFC 2822 dates, the
//! paging envelope, `{code, message, more_info, status}` errors).
//!
//! Who may do what: a tenant reads and changes its own data and its subaccounts'; creating
//! tenants, changing quotas, blocking numbers and reading an unrelated tenant's data need the
//! admin token.

use axum::body::Bytes;
use std::net::{IpAddr, SocketAddr};

use axum::extract::{ConnectInfo, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Value};
use voxgate_actors::tenancy::directory::{check_len, TenancyError};
use voxgate_actors::tenancy::{limits, NumberRecord, Quota, TenantRecord};
use voxgate_protocol::event::{HttpMethod, NumberRouting, TenantStatus};
use voxgate_protocol::{AccountSid, CallSid, PhoneNumberSid, Timestamp};

use voxgate_actors::billing::{
    CallbackMethod, Category, NewTrigger, Recurring, Trigger, TriggerBy, TriggerError, TriggerSid,
};
use voxgate_protocol::event::{UsageTriggerDeleted, UsageTriggerUpdated};
use voxgate_protocol::Event;

use crate::billing::BillingCommandError;
use crate::ingress::{twilio_error, AppState};
use crate::perimeter::LineLimit;
use crate::tenancy::{new_auth_token, random_bytes, random_u128, AuthError, CommandError, Principal, Tenancy};

static AUTH_LINES: LineLimit = LineLimit::per_second();

const API: &str = "/2010-04-01";

/// The resource a path names.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Resource {
    Accounts,
    Account(AccountSid),
    Numbers(AccountSid),
    Number(AccountSid, PhoneNumberSid),
    Quotas(AccountSid),
    Blocks(AccountSid),
    Block(AccountSid, String),
    /// `Usage/Records.json` (None) or `Usage/Records/{Daily,…}.json`.
    UsageRecords(AccountSid, Option<&'static str>),
    /// `Usage/Invoices/{YYYY-MM|ThisMonth|LastMonth}.json` (voxgate's own).
    Invoice(AccountSid, String),
    /// `Usage/Triggers.json`.
    Triggers(AccountSid),
    /// `Usage/Triggers/{UT}.json`.
    Trigger(AccountSid, TriggerSid),
    /// `Calls/{CA}/Transcriptions.json`: real-time transcription of a running call.
    CallTranscriptions(AccountSid, CallSid),
    /// `Calls/{CA}/Transcriptions/{GT…|name}.json`.
    CallTranscription(AccountSid, CallSid, String),
}

impl Resource {
    fn endpoint(&self) -> &'static str {
        match self {
            Self::Accounts | Self::Account(_) => "accounts",
            Self::Numbers(_) | Self::Number(..) => "incoming_phone_numbers",
            Self::Quotas(_) => "quotas",
            Self::Blocks(_) | Self::Block(..) => "blocked_numbers",
            Self::UsageRecords(..) => "usage_records",
            Self::Triggers(_) | Self::Trigger(..) => "usage_triggers",
            Self::Invoice(..) => "usage_invoices",
            Self::CallTranscriptions(..) | Self::CallTranscription(..) => "call_transcriptions",
        }
    }

    fn parse(path: &str) -> Option<Self> {
        let rest = path.strip_prefix(API)?.strip_prefix('/')?;
        let segs: Vec<&str> = rest.split('/').collect();
        let sid = |s: &str| AccountSid::parse(s).ok();
        Some(match segs.as_slice() {
            ["Accounts.json"] => Self::Accounts,
            ["Accounts", a] => Self::Account(sid(a.strip_suffix(".json")?)?),
            ["Accounts", a, "IncomingPhoneNumbers.json"] => Self::Numbers(sid(a)?),
            ["Accounts", a, "IncomingPhoneNumbers", n] => {
                Self::Number(sid(a)?, PhoneNumberSid::parse(n.strip_suffix(".json")?).ok()?)
            }
            ["Accounts", a, "Quotas.json"] => Self::Quotas(sid(a)?),
            ["Accounts", a, "BlockedNumbers.json"] => Self::Blocks(sid(a)?),
            ["Accounts", a, "Usage", "Records.json"] => Self::UsageRecords(sid(a)?, None),
            ["Accounts", a, "Usage", "Records", sub] => {
                let name = USAGE_SUBRESOURCES.iter().find(|(f, _)| Some(*f) == sub.strip_suffix(".json"))?.0;
                Self::UsageRecords(sid(a)?, Some(name))
            }
            ["Accounts", a, "Usage", "Triggers.json"] => Self::Triggers(sid(a)?),
            ["Accounts", a, "Usage", "Invoices", m] => Self::Invoice(sid(a)?, m.strip_suffix(".json")?.to_owned()),
            ["Accounts", a, "Usage", "Triggers", t] => {
                Self::Trigger(sid(a)?, TriggerSid::parse(t.strip_suffix(".json")?).ok()?)
            }
            ["Accounts", a, "Calls", c, "Transcriptions.json"] => {
                Self::CallTranscriptions(sid(a)?, CallSid::parse(c).ok()?)
            }
            ["Accounts", a, "Calls", c, "Transcriptions", t] => {
                let t = percent_decode(t.strip_suffix(".json")?)?;
                Self::CallTranscription(sid(a)?, CallSid::parse(c).ok()?, t)
            }
            ["Accounts", a, "BlockedNumbers", n] => {
                let n = n.strip_suffix(".json")?;
                let n = percent_decode(n)?;
                Self::Block(sid(a)?, n)
            }
            _ => return None,
        })
    }
}

/// A path segment, percent-decoded (`%2B15550001` → `+15550001`); `None` when not UTF-8.
fn percent_decode(s: &str) -> Option<String> {
    percent_encoding::percent_decode_str(s).decode_utf8().ok().map(|c| c.into_owned())
}

/// The `endpoint` label of a REST path (bounded: one per resource kind).
pub fn endpoint_of(path: &str) -> &'static str {
    Resource::parse(path).map(|r| r.endpoint()).unwrap_or("rest_other")
}

/// An error response the REST API sends.
struct ApiError {
    status: StatusCode,
    code: u32,
    message: String,
    retry_after: Option<u32>,
}

impl ApiError {
    fn new(status: StatusCode, code: u32, message: impl Into<String>) -> Self {
        Self { status, code, message: message.into(), retry_after: None }
    }

    fn not_found(path: &str) -> Self {
        Self::new(StatusCode::NOT_FOUND, 20404, format!("The requested resource {path} was not found"))
    }

    fn forbidden(what: &str) -> Self {
        Self::new(StatusCode::FORBIDDEN, 20403, format!("{what} needs the admin token"))
    }

    fn unavailable(e: impl std::fmt::Display) -> Self {
        Self::new(StatusCode::SERVICE_UNAVAILABLE, 20503, format!("{e}; retry"))
    }

    fn invalid(field: &str, reason: impl std::fmt::Display) -> Self {
        Self::new(StatusCode::BAD_REQUEST, 20422, format!("{field}: {reason}"))
    }
}

impl From<TenancyError> for ApiError {
    fn from(e: TenancyError) -> Self {
        let (code, status) = e.code_and_status();
        Self::new(StatusCode::from_u16(status).unwrap_or(StatusCode::BAD_REQUEST), code, e.to_string())
    }
}

impl From<BillingCommandError> for ApiError {
    fn from(e: BillingCommandError) -> Self {
        match e {
            BillingCommandError::Rule(TriggerError::NotFound(sid)) => {
                Self::new(StatusCode::NOT_FOUND, 20404, format!("usage trigger {sid} was not found"))
            }
            BillingCommandError::Rule(r) => Self::new(StatusCode::BAD_REQUEST, 20422, r.to_string()),
            BillingCommandError::Log(l) => {
                tracing::error!(error = %l, "billing event not recorded");
                Self::new(StatusCode::SERVICE_UNAVAILABLE, 20503, "event log unavailable; retry")
            }
        }
    }
}

impl From<CommandError> for ApiError {
    fn from(e: CommandError) -> Self {
        match e {
            CommandError::Rule(r) => r.into(),
            CommandError::Log(l) => {
                tracing::error!(error = %l, "tenancy event not recorded");
                Self::new(StatusCode::SERVICE_UNAVAILABLE, 20503, "event log unavailable; retry")
            }
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut r = twilio_error(self.status, self.code, self.message);
        if let Some(s) = self.retry_after {
            r.headers_mut().insert(header::RETRY_AFTER, HeaderValue::from(s));
        }
        if self.status == StatusCode::UNAUTHORIZED {
            r.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Basic realm=\"voxgate\""));
        }
        r
    }
}

/// Request parameters: the query string, then (for POST) the form body. Every value is checked
/// against its field's length limit.
struct Params(Vec<(String, String)>);

impl Params {
    fn read(uri: &Uri, body: &[u8]) -> Result<Self, ApiError> {
        let mut v: Vec<(String, String)> = uri
            .query()
            .map(|q| form_urlencoded::parse(q.as_bytes()).map(|(k, v)| (k.into_owned(), v.into_owned())).collect())
            .unwrap_or_default();
        v.extend(form_urlencoded::parse(body).map(|(k, v)| (k.into_owned(), v.into_owned())));
        for (k, val) in &v {
            let max = match k.as_str() {
                "FriendlyName" => limits::FRIENDLY_NAME,
                "UniqueName" => limits::UNIQUE_NAME,
                _ => limits::URL,
            };
            if k.chars().count() > 64 {
                return Err(ApiError::invalid("parameter name", "longer than 64 characters"));
            }
            check_len(field_name(k), val, max)
                .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, 20422, e.to_string()))?;
        }
        Ok(Self(v))
    }

    fn get(&self, name: &str) -> Option<&str> {
        self.0.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
    }

    /// `Status`, when given: active, suspended or closed.
    fn status(&self) -> Result<Option<TenantStatus>, ApiError> {
        self.get("Status")
            .map(|s| {
                TenantStatus::parse(s).ok_or_else(|| ApiError::invalid("Status", "must be active, suspended or closed"))
            })
            .transpose()
    }

    fn u32(&self, name: &'static str) -> Result<Option<u32>, ApiError> {
        self.get(name)
            .map(|v| v.trim().parse::<u32>().map_err(|_| ApiError::invalid(name, "must be a whole number")))
            .transpose()
    }
}

/// A `'static` name for the length-limit error of a known field.
fn field_name(k: &str) -> &'static str {
    match k {
        "FriendlyName" => "FriendlyName",
        "UniqueName" => "UniqueName",
        "PhoneNumber" => "PhoneNumber",
        "VoiceUrl" => "VoiceUrl",
        "VoiceFallbackUrl" => "VoiceFallbackUrl",
        "StatusCallback" => "StatusCallback",
        "CallbackUrl" => "CallbackUrl",
        "Reason" => "Reason",
        "Status" => "Status",
        _ => "parameter",
    }
}

/// `ANY /2010-04-01/*`
pub async fn api(
    State(state): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let client = crate::perimeter::client_addr(&headers, Some(peer.ip()), &state.cfg.trusted_proxies);
    let mut resp = match handle(&state, client, &method, &uri, &headers, &body).await {
        Ok((status, _)) if status == StatusCode::NO_CONTENT => status.into_response(),
        Ok((status, v)) => (status, Json(v)).into_response(),
        Err(e) => e.into_response(),
    };
    // Accounts carry their auth token, and every answer here is one tenant's private data: no
    // proxy or browser cache may keep it.
    resp.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    resp
}

async fn handle(
    state: &AppState,
    client: Option<IpAddr>,
    method: &Method,
    uri: &Uri,
    headers: &HeaderMap,
    body: &[u8],
) -> Result<(StatusCode, Value), ApiError> {
    let t = &state.tenancy;
    // Guessing is throttled per account name and per client address, before any secret is used.
    let keys = Tenancy::attempt_keys(headers, client);
    if let Err(locked) = t.check_lockout(&keys) {
        metrics::counter!("voxgate_rest_auth_locked_out_total").increment(1);
        if let Some(suppressed) = AUTH_LINES.admit() {
            tracing::warn!(path = uri.path(), client = ?client, suppressed, "REST sign-in refused: too many failed attempts");
        }
        let mut e = ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            20429,
            format!("Too many failed authentication attempts; retry after {} s", locked.retry_after_secs),
        );
        e.retry_after = Some(u32::try_from(locked.retry_after_secs).unwrap_or(u32::MAX));
        return Err(e);
    }
    let who = t.authenticate(headers).map_err(|e| {
        metrics::counter!("voxgate_rest_auth_failures_total").increment(1);
        match e {
            AuthError::Missing | AuthError::Invalid => {
                // A request without credentials is a client asking how to sign in, not a guess.
                if matches!(e, AuthError::Invalid) {
                    t.sign_in_failed(&keys);
                }
                if let Some(suppressed) = AUTH_LINES.admit() {
                    tracing::warn!(path = uri.path(), client = ?client, suppressed, "REST authentication failed");
                }
                ApiError::new(StatusCode::UNAUTHORIZED, 20003, "Authenticate")
            }
            AuthError::Inactive(sid) => {
                ApiError::new(StatusCode::FORBIDDEN, 20005, format!("account {sid} is not active"))
            }
        }
    })?;
    let path = uri.path();
    let res = Resource::parse(path).ok_or_else(|| ApiError::not_found(path))?;
    if let Err(th) = t.throttle(who, res.endpoint()) {
        let tenant = match who {
            Principal::Tenant(sid) => t.labels.label(sid),
            Principal::Admin => "admin".to_owned(),
        };
        metrics::counter!("voxgate_rest_throttled_total", "endpoint" => res.endpoint(), "tenant" => tenant)
            .increment(1);
        let mut e = ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            20429,
            format!(
                "Too many requests: {} in the last {} s on {} (baseline {}/s); retry after {} s",
                th.in_window,
                state.cfg.throttle.window_secs,
                res.endpoint(),
                state.cfg.throttle.requests_per_second,
                th.retry_after_secs
            ),
        );
        e.retry_after = Some(th.retry_after_secs);
        return Err(e);
    }
    let params = Params::read(uri, body)?;
    // Every resource under an account belongs to that account: check access once.
    let target = match &res {
        Resource::Accounts => None,
        Resource::Account(a)
        | Resource::Numbers(a)
        | Resource::Number(a, _)
        | Resource::Quotas(a)
        | Resource::Blocks(a)
        | Resource::Block(a, _)
        | Resource::UsageRecords(a, _)
        | Resource::Triggers(a)
        | Resource::Invoice(a, _)
        | Resource::Trigger(a, _)
        | Resource::CallTranscriptions(a, _)
        | Resource::CallTranscription(a, _, _) => Some(*a),
    };
    if let Some(a) = target {
        let exists = t.read(|d| d.tenant(a).is_some());
        if !exists || !t.may_access(who, a) {
            // Unknown and foreign accounts look the same: no probing for other tenants' SIDs.
            return Err(ApiError::not_found(path));
        }
    }
    let admin = who == Principal::Admin;
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
            page(items, "accounts", &format!("{API}/Accounts.json"), &params)
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
        (Method::GET, Resource::Numbers(a)) => {
            let filter = params.get("PhoneNumber");
            let items: Vec<Value> = t.read(|d| {
                d.numbers_of(a)
                    .filter(|n| filter.is_none_or(|f| n.number == f))
                    .map(|n| number_json(state, n))
                    .collect()
            });
            page(items, "incoming_phone_numbers", &format!("{API}/Accounts/{a}/IncomingPhoneNumbers.json"), &params)
        }
        (Method::POST, Resource::Numbers(a)) => {
            let number = params.get("PhoneNumber").ok_or_else(|| ApiError::invalid("PhoneNumber", "is required"))?;
            let sid = PhoneNumberSid::from_u128(random_u128());
            let routing = routing_params(state, &params, None).await?;
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
            if let Some(r) = routing_params(state, &params, Some(current)).await? {
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
            page(items, "blocked_numbers", &format!("{API}/Accounts/{a}/BlockedNumbers.json"), &params)
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
        (Method::GET, Resource::UsageRecords(a, sub)) => usage_records(state, a, sub, &params),
        (Method::GET, Resource::Invoice(a, m)) => {
            use voxgate_actors::billing::Month;
            let this = Month::of(state.clock.now());
            let month = match m.as_str() {
                "ThisMonth" => this,
                "LastMonth" => Month::from_index(this.index() - 1),
                m => Month::parse(m).map_err(|e| ApiError::invalid("month", e))?,
            };
            let inv = state.billing.read().usage.invoice(a, month);
            Ok((StatusCode::OK, invoice_json(&inv)))
        }
        (Method::GET, Resource::Triggers(a)) => {
            let filter = |name: &'static str| params.get(name).filter(|v| !v.is_empty());
            let (recurring, by, category) = (filter("Recurring"), filter("TriggerBy"), filter("UsageCategory"));
            let items: Vec<Value> = state
                .billing
                .read()
                .triggers
                .list(a)
                .into_iter()
                .filter(|t| recurring.is_none_or(|r| t.recurring.as_str() == r))
                .filter(|t| by.is_none_or(|b| t.trigger_by.as_str() == b))
                .filter(|t| category.is_none_or(|c| t.usage_category.as_str() == c))
                .map(trigger_json)
                .collect();
            page(items, "usage_triggers", &format!("{API}/Accounts/{a}/Usage/Triggers.json"), &params)
        }
        (Method::POST, Resource::Triggers(a)) => {
            let new = new_trigger(a, &params)?;
            check_callback_url(state, &new.callback_url).await?;
            let sid = new.sid;
            state
                .billing
                .command(a, |b, now| {
                    Ok(Event::UsageTriggerCreated(b.triggers.prepare(new, &b.usage, now)?.created_event()))
                })
                .await?;
            let v = state.billing.read().triggers.get(a, sid).map(trigger_json);
            Ok((StatusCode::CREATED, v.unwrap_or(Value::Null)))
        }
        (Method::GET, Resource::Trigger(a, sid)) => {
            let v = state.billing.read().triggers.get(a, sid).map(trigger_json);
            v.map(|v| (StatusCode::OK, v)).ok_or_else(|| ApiError::not_found(path))
        }
        (Method::POST, Resource::Trigger(a, sid)) => {
            let url = params.get("CallbackUrl").map(str::to_owned);
            if let Some(u) = &url {
                check_callback_url(state, u).await?;
            }
            let method = params
                .get("CallbackMethod")
                .map(|m| {
                    CallbackMethod::parse(m).ok_or_else(|| ApiError::invalid("CallbackMethod", "must be GET or POST"))
                })
                .transpose()?;
            let name = params.get("FriendlyName").map(str::to_owned);
            state
                .billing
                .command(a, |b, _| {
                    b.triggers.check_update(a, sid, url.as_deref(), name.as_deref())?;
                    Ok(Event::UsageTriggerUpdated(UsageTriggerUpdated {
                        sid: sid.to_string(),
                        callback_url: url,
                        callback_method: method.map(|m| m.as_str().to_owned()),
                        friendly_name: name,
                    }))
                })
                .await?;
            let v = state.billing.read().triggers.get(a, sid).map(trigger_json);
            Ok((StatusCode::OK, v.unwrap_or(Value::Null)))
        }
        (Method::DELETE, Resource::Trigger(a, sid)) => {
            state
                .billing
                .command(a, |b, _| {
                    b.triggers.get(a, sid).ok_or(TriggerError::NotFound(sid))?;
                    Ok(Event::UsageTriggerDeleted(UsageTriggerDeleted { sid: sid.to_string() }))
                })
                .await?;
            Ok((StatusCode::NO_CONTENT, Value::Null))
        }
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
            let started =
                crate::gateway::start_transcription(state, a, call, &params.0).await.map_err(ApiError::unavailable)?;
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
            crate::gateway::stop_transcription(state, a, call, &which).await.map_err(ApiError::unavailable)?;
            // Stopped by its sid or by its name (the path says which).
            let (sid, name) =
                if which.starts_with("GT") { (Some(which.as_str()), None) } else { (None, Some(which.as_str())) };
            Ok((StatusCode::OK, transcription_json(a, call, sid, name, "stopped", state.clock.now())))
        }
        (m, _) => {
            Err(ApiError::new(StatusCode::METHOD_NOT_ALLOWED, 20004, format!("method {m} not allowed on {path}")))
        }
    }
}

/// The call, when it is the tenant's and still running; a foreign or unknown call is not found
/// (no probing for other tenants' calls), an ended one is Twilio's 21220.
async fn running_call_of(state: &AppState, a: AccountSid, call: CallSid, path: &str) -> Result<(), ApiError> {
    match crate::ingress::call_owner(state, call).await {
        Some(id) if id.tenant == a => {}
        _ => return Err(ApiError::not_found(path)),
    }
    if state.billing.read().usage.call_ended(call) {
        return Err(ApiError::new(StatusCode::BAD_REQUEST, 21220, format!("call {call} is not in progress")));
    }
    Ok(())
}

/// Twilio's `Transcription` resource of a call (its `uri` names it by sid, else by name).
fn transcription_json(
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

/// Usage record sub-resources: path name and `subresource_uris` key.
const USAGE_SUBRESOURCES: [(&str, &str); 8] = [
    ("AllTime", "all_time"),
    ("Daily", "daily"),
    ("LastMonth", "last_month"),
    ("Monthly", "monthly"),
    ("ThisMonth", "this_month"),
    ("Today", "today"),
    ("Yearly", "yearly"),
    ("Yesterday", "yesterday"),
];

/// `GET …/Usage/Records[/{Sub}].json`: `Category`, `StartDate`, `EndDate`, `IncludeSubaccounts`.
fn usage_records(
    state: &AppState,
    a: AccountSid,
    sub: Option<&'static str>,
    params: &Params,
) -> Result<(StatusCode, Value), ApiError> {
    use voxgate_actors::billing::periods::{parse_date_param, Period};
    let now = state.clock.now();
    let category = params
        .get("Category")
        .map(|c| {
            Category::parse(c)
                .ok_or_else(|| ApiError::invalid("Category", format!("{c:?} is not a usage category voxgate meters")))
        })
        .transpose()?;
    let include = match params.get("IncludeSubaccounts") {
        None | Some("true") => true,
        Some("false") => false,
        Some(_) => return Err(ApiError::invalid("IncludeSubaccounts", "must be true or false")),
    };
    let date = |name: &'static str| {
        params.get(name).map(|d| parse_date_param(d, now).map_err(|e| ApiError::invalid(name, e))).transpose()
    };
    let (start, end) = (date("StartDate")?, date("EndDate")?);
    let period = match (sub, start, end) {
        // A named sub-resource is its own period (Daily/Monthly/Yearly from their defaults).
        (Some(name), None, None) => Period::parse(name).ok_or_else(|| ApiError::not_found(name))?,
        (None, None, None) => Period::AllTime,
        // Dates given: one record per category over that range.
        (_, s, e) => {
            let today = voxgate_actors::billing::periods::Date::of(now);
            let s = s.unwrap_or_else(|| today.month().first_date());
            Period::range(s, e.unwrap_or(today)).map_err(|e| ApiError::invalid("EndDate", e))?
        }
    };
    let records =
        state.billing.read().usage.report(a, include, &period, now).map_err(|e| ApiError::invalid("StartDate", e))?;
    let as_of = now.to_string().replace(".000Z", "+00:00");
    let base = format!("{API}/Accounts/{a}/Usage/Records");
    let items: Vec<Value> = records
        .iter()
        .filter(|r| category.is_none_or(|c| r.category == c))
        .map(|r| {
            let cat = r.category.as_str();
            let subs: serde_json::Map<String, Value> = USAGE_SUBRESOURCES
                .iter()
                .map(|(f, k)| ((*k).to_owned(), Value::from(format!("{base}/{f}.json?Category={cat}"))))
                .collect();
            json!({
                "account_sid": r.account_sid.to_string(),
                "api_version": "2010-04-01",
                "as_of": as_of,
                "category": cat,
                "count": r.count_string(),
                "count_unit": r.count_unit,
                "description": r.description,
                "end_date": r.end_date.to_string(),
                "price": r.price_string(),
                "price_unit": r.price_unit,
                "start_date": r.start_date.to_string(),
                "subresource_uris": subs,
                "uri": format!("{base}.json?Category={cat}&StartDate={}&EndDate={}", r.start_date, r.end_date),
                "usage": r.usage_string(),
                "usage_unit": r.usage_unit,
            })
        })
        .collect();
    let path = match sub {
        Some(f) => format!("{base}/{f}.json"),
        None => format!("{base}.json"),
    };
    page(items, "usage_records", &path, params)
}

/// A tenant's `CallbackUrl` must not aim inside the node's network (unless the operator allows).
async fn check_callback_url(state: &AppState, url: &str) -> Result<(), ApiError> {
    crate::outbound::check_url(url, state.cfg.allow_private_callbacks).await.map_err(|e| {
        metrics::counter!("voxgate_outbound_refused_total", "reason" => "at_creation").increment(1);
        ApiError::invalid("CallbackUrl", e)
    })
}

/// `POST …/Usage/Triggers.json`'s parameters as a trigger to create.
fn new_trigger(a: AccountSid, params: &Params) -> Result<NewTrigger, ApiError> {
    let required = |name: &'static str| {
        params.get(name).filter(|v| !v.is_empty()).ok_or_else(|| ApiError::invalid(name, "is required"))
    };
    let category = required("UsageCategory")?;
    let usage_category = Category::parse(category).ok_or_else(|| {
        ApiError::invalid("UsageCategory", format!("{category:?} is not a usage category voxgate meters"))
    })?;
    let trigger_by = match params.get("TriggerBy") {
        None => TriggerBy::Usage,
        Some(b) => {
            TriggerBy::parse(b).ok_or_else(|| ApiError::invalid("TriggerBy", "must be count, usage or price"))?
        }
    };
    let recurring = match params.get("Recurring") {
        None => Recurring::None,
        Some(r) => Recurring::parse(r)
            .ok_or_else(|| ApiError::invalid("Recurring", "must be daily, monthly, yearly or alltime"))?,
    };
    let callback_method = match params.get("CallbackMethod") {
        None => CallbackMethod::Post,
        Some(m) => {
            CallbackMethod::parse(m).ok_or_else(|| ApiError::invalid("CallbackMethod", "must be GET or POST"))?
        }
    };
    Ok(NewTrigger {
        sid: TriggerSid(random_u128()),
        tenant: a,
        usage_category,
        trigger_by,
        trigger_value: required("TriggerValue")?.trim().to_owned(),
        recurring,
        callback_url: required("CallbackUrl")?.to_owned(),
        callback_method,
        friendly_name: params.get("FriendlyName").unwrap_or("").to_owned(),
    })
}

/// An invoice: one line per metered category with its volume tiers, and the total.
fn invoice_json(inv: &voxgate_actors::billing::Invoice) -> Value {
    use voxgate_actors::billing::format_micros;
    let lines: Vec<Value> = inv
        .lines
        .iter()
        .map(|l| {
            let tiers: Vec<Value> = l
                .tiers
                .iter()
                .map(|t| {
                    json!({
                        "from_minutes": t.from_minutes,
                        "to_minutes": t.to_minutes,
                        "minutes": t.minutes,
                        "price_per_minute": format_micros(t.price_per_min_micros),
                        "price": format_micros(t.price_micros),
                    })
                })
                .collect();
            json!({
                "category": l.category.as_str(),
                "description": l.description,
                "count": l.count.to_string(),
                "usage": l.usage.to_string(),
                "usage_unit": l.usage_unit,
                "tiers": tiers,
                "price": format_micros(l.price_micros),
            })
        })
        .collect();
    json!({
        "account_sid": inv.account_sid.to_string(),
        "month": inv.month.to_string(),
        "lines": lines,
        "total_price": format_micros(inv.total_micros),
        "price_unit": "usd",
    })
}

/// A usage trigger in Twilio's JSON.
fn trigger_json(t: &Trigger) -> Value {
    json!({
        "account_sid": t.tenant.to_string(),
        "api_version": "2010-04-01",
        "callback_method": t.callback_method.as_str(),
        "callback_url": t.callback_url,
        "current_value": t.current_value(),
        "date_created": t.date_created.rfc2822(),
        "date_fired": t.date_fired.map(|d| d.rfc2822()),
        "date_updated": t.date_updated.rfc2822(),
        "friendly_name": t.friendly_name,
        "recurring": match t.recurring { Recurring::None => Value::Null, r => Value::from(r.as_str()) },
        "sid": t.sid.to_string(),
        "trigger_by": t.trigger_by.as_str(),
        "trigger_value": t.trigger_value(),
        "uri": t.uri(),
        "usage_category": t.usage_category.as_str(),
        "usage_record_uri": t.usage_record_uri(),
    })
}

fn default_name(now: Timestamp) -> String {
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

fn account_json(r: &TenantRecord) -> Value {
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

/// A number as Twilio's IncomingPhoneNumbers resource shows it. `voice_url` and the other routing
/// fields are the customer's (where voxgate forwards the calls); `voxgate_voice_url` and
/// `voxgate_status_callback` are where the number must point at Twilio for voxgate to see them.
fn number_json(state: &AppState, n: &NumberRecord) -> Value {
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
async fn routing_params(
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
            crate::outbound::check_url(u, state.cfg.allow_private_callbacks).await.map_err(|e| {
                metrics::counter!("voxgate_outbound_refused_total", "reason" => "at_creation").increment(1);
                ApiError::invalid(field, e)
            })?;
            *slot = Some(u.to_owned());
        }
    }
    Ok(Some(r))
}

fn quota_json(state: &AppState, a: AccountSid) -> Value {
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

fn block_json(a: AccountSid, number: &str, reason: &str, since: Timestamp, until: Option<Timestamp>) -> Value {
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

/// Twilio's paging envelope over `items` (`Page`, `PageSize` from the query; default 50, max 1000).
fn page(items: Vec<Value>, key: &str, base: &str, params: &Params) -> Result<(StatusCode, Value), ApiError> {
    let size = params.u32("PageSize")?.unwrap_or(50).clamp(1, 1000) as usize;
    let page = params.u32("Page")?.unwrap_or(0) as usize;
    let start = page.saturating_mul(size);
    let total = items.len();
    let records: Vec<Value> = items.into_iter().skip(start).take(size).collect();
    let n = records.len();
    // The list's own filters travel with every page link.
    let filters: String = params
        .0
        .iter()
        .filter(|(k, _)| !matches!(k.as_str(), "Page" | "PageSize" | "PageToken"))
        .fold(form_urlencoded::Serializer::new(String::new()), |mut s, (k, v)| {
            s.append_pair(k, v);
            s
        })
        .finish();
    let uri = |p: usize| {
        if filters.is_empty() {
            format!("{base}?PageSize={size}&Page={p}")
        } else {
            format!("{base}?{filters}&PageSize={size}&Page={p}")
        }
    };
    let mut v = json!({
        "first_page_uri": uri(0),
        "next_page_uri": if start + n < total { Value::from(uri(page + 1)) } else { Value::Null },
        "previous_page_uri": if page > 0 { Value::from(uri(page - 1)) } else { Value::Null },
        "page": page,
        "page_size": size,
        "start": start,
        "end": if n == 0 { start } else { start + n - 1 },
        "uri": uri(page),
    });
    v[key] = Value::Array(records);
    Ok((StatusCode::OK, v))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_parse() {
        let a = "AC0123456789abcdef0123456789abcdef";
        assert_eq!(Resource::parse("/2010-04-01/Accounts.json"), Some(Resource::Accounts));
        assert!(matches!(Resource::parse(&format!("/2010-04-01/Accounts/{a}.json")), Some(Resource::Account(_))));
        assert!(matches!(
            Resource::parse(&format!("/2010-04-01/Accounts/{a}/IncomingPhoneNumbers.json")),
            Some(Resource::Numbers(_))
        ));
        assert!(matches!(
            Resource::parse(&format!("/2010-04-01/Accounts/{a}/BlockedNumbers/%2B15550001.json")),
            Some(Resource::Block(_, n)) if n == "+15550001"
        ));
        assert_eq!(Resource::parse("/2010-04-01/Accounts/ACnope.json"), None);
        assert_eq!(Resource::parse("/2010-04-01/Accounts/x/y/z/w.json"), None);
        assert_eq!(endpoint_of("/2010-04-01/Whatever"), "rest_other");
    }

    #[test]
    fn default_names_follow_twilio() {
        let t = Timestamp::parse_rfc2822("Tue, 07 Jan 2025 18:02:11 +0000").unwrap_or_default();
        assert_eq!(default_name(t), "SubAccount Created at 2025-01-07 6:02 pm");
    }
}
