//! Twilio-shaped REST for tenants under `/2010-04-01/`, one module per resource: Accounts
//! (`tenants`), IncomingPhoneNumbers (`numbers`), Usage records, triggers and invoices (`usage`),
//! call Transcriptions (`calls`), voxgate's own Quotas and BlockedNumbers (`restrictions`) and
//! SpeechHints (`speech`).
//! This module authenticates (HTTP Basic), throttles per tenant and checks account access once
//! for all of them, and holds Twilio's JSON shapes they share (snake_case fields, RFC 2822 dates,
//! the paging envelope, `{code, message, more_info, status}` errors).
//!
//! Who may do what: a tenant reads and changes its own data and its subaccounts'; creating
//! tenants, changing quotas, blocking numbers and reading an unrelated tenant's data need the
//! admin token.

mod calls;
mod numbers;
mod restrictions;
mod speech;
mod tenants;
mod usage;

use usage::USAGE_SUBRESOURCES;

use axum::body::Bytes;
use std::net::{IpAddr, SocketAddr};

use axum::extract::{ConnectInfo, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde_json::{json, Value};
use voxgate_actors::tenancy::directory::{check_len, TenancyError};
use voxgate_actors::tenancy::limits;
use voxgate_protocol::event::TenantStatus;
use voxgate_protocol::{AccountSid, CallSid, PhoneNumberSid};

use voxgate_actors::billing::{TriggerError, TriggerSid};

use crate::http::perimeter::LineLimit;
use crate::http::{twilio_error, AppState};
use crate::stages::billing::BillingCommandError;
use crate::stages::tenancy::{AuthError, CommandError, Principal, Tenancy};

static AUTH_LINES: LineLimit = LineLimit::per_second();

/// An authenticated request, its account access checked, as each resource's handler gets it.
struct Request<'a> {
    state: &'a AppState,
    who: Principal,
    admin: bool,
    params: Params,
    path: &'a str,
}

const API: &str = "/2010-04-01";

/// The resource a path names.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Resource {
    Accounts,
    Account(AccountSid),
    Numbers(AccountSid),
    Number(AccountSid, PhoneNumberSid),
    Quotas(AccountSid),
    /// `SpeechHints.json` (voxgate's own): the account's vocabulary hints.
    SpeechHints(AccountSid),
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
            Self::SpeechHints(_) => "speech_hints",
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
            ["Accounts", a, "SpeechHints.json"] => Self::SpeechHints(sid(a)?),
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
    fn method_not_allowed(m: &Method, path: &str) -> Self {
        Self::new(StatusCode::METHOD_NOT_ALLOWED, 20004, format!("method {m} not allowed on {path}"))
    }

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
    let client = crate::http::perimeter::client_addr(&headers, Some(peer.ip()), &state.cfg.trusted_proxies);
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
        | Resource::SpeechHints(a)
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
    let cx = Request { state, who, admin: who == Principal::Admin, params, path };
    match res {
        Resource::Accounts | Resource::Account(_) => tenants::handle(&cx, method, res).await,
        Resource::Numbers(_) | Resource::Number(..) => numbers::handle(&cx, method, res).await,
        Resource::Quotas(_) | Resource::Blocks(_) | Resource::Block(..) => restrictions::handle(&cx, method, res).await,
        Resource::SpeechHints(_) => speech::handle(&cx, method, res).await,
        Resource::UsageRecords(..) | Resource::Invoice(..) | Resource::Triggers(_) | Resource::Trigger(..) => {
            usage::handle(&cx, method, res).await
        }
        Resource::CallTranscriptions(..) | Resource::CallTranscription(..) => calls::handle(&cx, method, res).await,
    }
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
        use super::tenants::default_name;
        use voxgate_protocol::Timestamp;
        let t = Timestamp::parse_rfc2822("Tue, 07 Jan 2025 18:02:11 +0000").unwrap_or_default();
        assert_eq!(default_name(t), "SubAccount Created at 2025-01-07 6:02 pm");
    }
}
