//! The console: voxgate in a browser, at `/console` on the main listener.
//!
//! Owns sign-in (the admin token, or a tenant's AccountSid and auth token), sessions and CSRF
//! tokens, and the pages: live calls and search (`calls`), a call's timeline with its audio and
//! live transcript (`calls`), the webhook inspector (`inspector`), fraud and spend (`money`).
//! Pages are rendered here as HTML with every value escaped; the one script (assets/console.js,
//! embedded) only follows the server-sent events and plays audio. No CDN, no build step.
//!
//! Must not: show a tenant anything of an account it may not access (every lookup checks the
//! owner, and a foreign call looks exactly like a missing one), change anything without a valid
//! session and CSRF token, or write to the logs except through the existing commands (blocks).

// Handlers and their checks return the response to send instead (a redirect, an error page): it
// is built once per refused request, not on a hot path.
#![allow(clippy::result_large_err)]

mod calls;
pub mod index;
mod inspector;
mod money;
mod session;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{ConnectInfo, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use voxgate_actors::tenancy::lockout::Key;
use voxgate_protocol::AccountSid;

use crate::http::AppState;
use crate::stages::tenancy::{AuthError, Principal};
pub use index::Index;
use session::{Session, Sessions};

/// `[console]`
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ConsoleFile {
    /// Serve `/console` (off: the paths answer 404 and nothing is indexed).
    pub enabled: bool,
    /// A session ends after this long without a request.
    pub session_idle_minutes: u64,
    /// And at the latest this long after sign-in.
    pub session_max_hours: u64,
    /// Calls the lists and search keep (the oldest ended calls go first; a call's page still
    /// reads any call from the logs).
    pub indexed_calls: usize,
    /// Recent webhook exchanges the inspector keeps.
    pub indexed_exchanges: usize,
}

impl Default for ConsoleFile {
    fn default() -> Self {
        Self {
            enabled: true,
            session_idle_minutes: 30,
            session_max_hours: 12,
            indexed_calls: 20_000,
            indexed_exchanges: 5_000,
        }
    }
}

impl ConsoleFile {
    pub fn validate(&self) -> Result<(), voxgate_actors::InvalidSetting> {
        if !(1..=24 * 60).contains(&self.session_idle_minutes) {
            return Err(voxgate_actors::InvalidSetting::new("session_idle_minutes", "must be between 1 and 1440"));
        }
        if !(1..=24 * 30).contains(&self.session_max_hours) {
            return Err(voxgate_actors::InvalidSetting::new("session_max_hours", "must be between 1 and 720"));
        }
        if !(100..=10_000_000).contains(&self.indexed_calls) || !(100..=1_000_000).contains(&self.indexed_exchanges) {
            return Err(voxgate_actors::InvalidSetting::new(
                "indexed_calls",
                "indexed_calls must be 100..=10000000 and indexed_exchanges 100..=1000000",
            ));
        }
        Ok(())
    }
}

/// What the console holds for the node's life.
pub struct Console {
    pub index: Arc<Index>,
    sessions: Sessions,
    /// The path `public_url` puts in front of ours (a proxy's prefix), e.g. `/voxgate`; empty
    /// when voxgate is at the root.
    prefix: String,
    /// Cookies only over TLS (the listener's own, or `public_url` is https behind a proxy).
    secure: bool,
}

impl Console {
    pub fn new(cfg: &crate::config::Config) -> Self {
        let c = cfg.console;
        let index = Arc::new(Index::new(index::Limits {
            calls: c.indexed_calls,
            exchanges: c.indexed_exchanges,
            verdicts: 1_000,
        }));
        let prefix = url_path(&cfg.public_url);
        Self {
            index,
            sessions: Sessions::new(
                Duration::from_secs(c.session_idle_minutes * 60),
                Duration::from_secs(c.session_max_hours * 3600),
                10_000,
            ),
            prefix,
            secure: cfg.tls.is_some() || cfg.public_url.starts_with("https://"),
        }
    }

    /// An absolute path under the console, e.g. `link("/calls")` → `/voxgate/console/calls`.
    pub fn link(&self, rest: &str) -> String {
        format!("{}/console{rest}", self.prefix)
    }
}

/// The path of a URL (`https://h/x/` → `/x`), without a trailing slash.
fn url_path(url: &str) -> String {
    let after_scheme = url.split_once("://").map_or(url, |(_, r)| r);
    match after_scheme.find('/') {
        Some(i) => after_scheme[i..].trim_end_matches('/').to_owned(),
        None => String::new(),
    }
}

const COOKIE: &str = "voxgate_console";

/// The console's routes (under `/console`).
pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/console", get(home))
        .route("/console/", get(home))
        .route("/console/login", get(login_form).post(login))
        .route("/console/logout", post(logout))
        .route("/console/assets/console.css", get(css))
        .route("/console/assets/console.js", get(js))
        .route("/console/calls", get(calls::list))
        .route("/console/calls/{call}", get(calls::timeline))
        .route("/console/calls/{call}/segments/{offset}", get(calls::segment_wav))
        .route("/console/events", get(calls::events))
        .route("/console/inspector", get(inspector::list))
        .route("/console/inspector/{id}", get(inspector::detail))
        .route("/console/inspector/{id}/resend", post(inspector::resend))
        .route("/console/fraud", get(money::fraud))
        .route("/console/fraud/block", post(money::block))
        .route("/console/fraud/unblock", post(money::unblock))
        .route("/console/spend", get(money::spend))
}

/// The console of a request, or 404 when it is switched off.
fn console(state: &AppState) -> Result<&Arc<Console>, Response> {
    state.console.as_ref().ok_or_else(|| (StatusCode::NOT_FOUND, "not found").into_response())
}

/// A signed-in request.
pub(super) struct Viewer {
    pub session: Session,
}

impl Viewer {
    pub fn admin(&self) -> bool {
        self.session.who == Principal::Admin
    }

    pub fn label(&self) -> String {
        match self.session.who {
            Principal::Admin => "operator".to_owned(),
            Principal::Tenant(sid) => sid.to_string(),
        }
    }
}

fn cookie_value(headers: &HeaderMap) -> Option<String> {
    headers.get_all(header::COOKIE).iter().filter_map(|v| v.to_str().ok()).flat_map(|v| v.split(';')).find_map(|c| {
        let (k, v) = c.trim().split_once('=')?;
        (k == COOKIE).then(|| v.to_owned())
    })
}

/// Why a browser is sent to sign in: the login page says it from this fixed list (a link cannot
/// make it show other text).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SignedOut {
    Missing,
    Expired,
    Inactive,
}

impl SignedOut {
    fn code(self) -> &'static str {
        match self {
            Self::Missing => "signin",
            Self::Expired => "expired",
            Self::Inactive => "inactive",
        }
    }

    fn from_code(code: &str) -> Option<Self> {
        [Self::Missing, Self::Expired, Self::Inactive].into_iter().find(|w| w.code() == code)
    }

    fn message(self) -> &'static str {
        match self {
            Self::Missing => "Sign in to continue.",
            Self::Expired => "Your session has expired; sign in again.",
            Self::Inactive => "This account is not active.",
        }
    }
}

/// The session of a request, or the answer to send instead (a redirect to sign-in for pages, 401
/// for the event stream and audio).
fn viewer(state: &AppState, headers: &HeaderMap, page: bool) -> Result<(Arc<Console>, Viewer), Response> {
    let c = console(state)?.clone();
    match c.sessions.get(cookie_value(headers).as_deref()) {
        Ok(session) => {
            // A tenant suspended or closed since sign-in sees nothing more.
            if let Principal::Tenant(sid) = session.who {
                let active = state.tenancy.read(|d| d.effective_status(sid))
                    == Some(voxgate_protocol::event::TenantStatus::Active);
                if !active {
                    return Err(signed_out(&c, page, SignedOut::Inactive));
                }
            }
            Ok((c, Viewer { session }))
        }
        Err(session::SessionError::Expired) => Err(signed_out(&c, page, SignedOut::Expired)),
        Err(session::SessionError::Missing) => Err(signed_out(&c, page, SignedOut::Missing)),
    }
}

fn signed_out(c: &Console, page: bool, why: SignedOut) -> Response {
    metrics::counter!("voxgate_console_unauthenticated_total").increment(1);
    if page {
        redirect(&format!("{}?why={}", c.link("/login"), why.code()))
    } else {
        (StatusCode::UNAUTHORIZED, why.message()).into_response()
    }
}

/// May the viewer see this account's data?
fn may_see(state: &AppState, v: &Viewer, tenant: AccountSid) -> bool {
    state.tenancy.may_access(v.session.who, tenant)
}

/// A list's `tenant` filter: empty for none, else an AccountSid.
fn tenant_filter(v: &str) -> Result<Option<AccountSid>, Response> {
    match v.trim() {
        "" => Ok(None),
        t => AccountSid::parse(t)
            .map(Some)
            .map_err(|_| page_error(StatusCode::BAD_REQUEST, "tenant: not an AccountSid (AC and 32 hex digits)")),
    }
}

/// The form fields of a POST body.
fn form(body: &[u8]) -> Vec<(String, String)> {
    form_urlencoded::parse(body).map(|(k, v)| (k.into_owned(), v.into_owned())).collect()
}

fn field<'a>(f: &'a [(String, String)], name: &str) -> Option<&'a str> {
    f.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_str())
}

/// A change request: signed in, and the form's CSRF token is the session's.
type Changing = (Arc<Console>, Viewer, Vec<(String, String)>);

fn change(state: &AppState, headers: &HeaderMap, body: &[u8]) -> Result<Changing, Response> {
    let (c, v) = viewer(state, headers, true)?;
    let f = form(body);
    if !session::csrf_ok(&v.session, field(&f, "csrf")) {
        metrics::counter!("voxgate_console_csrf_refused_total").increment(1);
        return Err(page_error(
            StatusCode::FORBIDDEN,
            "This form has expired or did not come from the console. Go back, reload and try again.",
        ));
    }
    Ok((c, v, f))
}

/// Escapes text for HTML element content and attribute values.
pub fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 8);
    for ch in s.chars() {
        match ch {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// Percent-encodes a query value.
fn q(s: &str) -> String {
    form_urlencoded::byte_serialize(s.as_bytes()).collect()
}

/// A whole page: the navigation, `body`, the script. `active` marks the navigation entry.
fn page(c: &Console, v: Option<&Viewer>, title: &str, active: &str, body: &str) -> Response {
    let nav = match v {
        None => String::new(),
        Some(v) => {
            let item = |path: &str, name: &str| {
                let cls = if name == active { " class=\"active\"" } else { "" };
                format!("<a href=\"{}\"{cls}>{name}</a>", esc(&c.link(path)))
            };
            format!(
                "<nav>{}{}{}{}<span class=\"who\">{}</span><form method=\"post\" action=\"{}\" class=\"inline\"><input type=\"hidden\" name=\"csrf\" value=\"{}\"><button id=\"sign-out\">Sign out</button></form></nav>",
                item("/calls", "Calls"),
                item("/inspector", "Inspector"),
                item("/fraud", "Fraud"),
                item("/spend", "Spend"),
                esc(&v.label()),
                esc(&c.link("/logout")),
                esc(&v.session.csrf),
            )
        }
    };
    let html = format!(
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\"><meta name=\"viewport\" content=\"width=device-width, initial-scale=1\"><title>{} · voxgate</title><link rel=\"stylesheet\" href=\"{}\"><script src=\"{}\" defer></script></head><body data-base=\"{}\"><header><span class=\"brand\">voxgate</span>{nav}</header><main>{body}</main></body></html>",
        esc(title),
        esc(&c.link("/assets/console.css")),
        esc(&c.link("/assets/console.js")),
        esc(&c.link("")),
    );
    html_response(StatusCode::OK, html)
}

fn html_response(status: StatusCode, html: String) -> Response {
    let mut r = (status, html).into_response();
    let h = r.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static("text/html; charset=utf-8"));
    secure_headers(h);
    r
}

/// What every console answer carries: no caching of private pages, no framing, scripts and
/// styles from here only.
fn secure_headers(h: &mut HeaderMap) {
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(header::REFERRER_POLICY, HeaderValue::from_static("same-origin"));
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; media-src 'self'; connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
        ),
    );
}

/// A bare error page (no session needed).
fn page_error(status: StatusCode, message: &str) -> Response {
    let html = format!(
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>{} · voxgate</title></head><body><h1>{}</h1><p id=\"error\">{}</p></body></html>",
        status.as_u16(),
        esc(status.canonical_reason().unwrap_or("Error")),
        esc(message)
    );
    html_response(status, html)
}

fn redirect(to: &str) -> Response {
    let mut r = StatusCode::SEE_OTHER.into_response();
    if let Ok(v) = HeaderValue::from_str(to) {
        r.headers_mut().insert(header::LOCATION, v);
    }
    secure_headers(r.headers_mut());
    r
}

async fn home(State(state): State<AppState>, headers: HeaderMap) -> Response {
    let c = match console(&state) {
        Ok(c) => c.clone(),
        Err(r) => return r,
    };
    match viewer(&state, &headers, true) {
        Ok(_) => redirect(&c.link("/calls")),
        Err(_) => redirect(&c.link("/login")),
    }
}

#[derive(serde::Deserialize)]
struct LoginQuery {
    why: Option<String>,
}

async fn login_form(State(state): State<AppState>, q: axum::extract::Query<LoginQuery>) -> Response {
    let c = match console(&state) {
        Ok(c) => c.clone(),
        Err(r) => return r,
    };
    login_page(&c, StatusCode::OK, q.why.as_deref().and_then(SignedOut::from_code).map(SignedOut::message))
}

fn login_page(c: &Console, status: StatusCode, message: Option<&str>) -> Response {
    let msg = message
        .map(|m| format!("<p class=\"error\" id=\"login-error\">{}</p>", esc(&m.chars().take(200).collect::<String>())))
        .unwrap_or_default();
    let body = format!(
        "<section class=\"login\"><h1>Sign in</h1>{msg}<form method=\"post\" action=\"{}\" id=\"login\">\
<label>Account SID <input name=\"account\" id=\"account\" autocomplete=\"username\" placeholder=\"AC… (empty for the admin token)\" maxlength=\"64\"></label>\
<label>Auth token <input name=\"token\" id=\"token\" type=\"password\" autocomplete=\"current-password\" maxlength=\"256\" required></label>\
<button type=\"submit\" id=\"sign-in\">Sign in</button></form>\
<p class=\"hint\">Operators sign in with the admin token; a tenant with its AccountSid and auth token, and sees its own account and subaccounts.</p></section>",
        esc(&c.link("/login"))
    );
    let mut r = page(c, None, "Sign in", "", &body);
    *r.status_mut() = status;
    r
}

async fn login(
    State(state): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let c = match console(&state) {
        Ok(c) => c.clone(),
        Err(r) => return r,
    };
    let f = form(&body);
    let account = field(&f, "account").unwrap_or_default().trim().to_owned();
    let token = field(&f, "token").unwrap_or_default().trim().to_owned();
    let client = crate::http::perimeter::client_addr(&headers, Some(peer.ip()), &state.cfg.trusted_proxies);
    // Attempts are counted per presented account and per client address, as the REST API's are.
    let mut keys = vec![Key::account(if account.is_empty() { "admin" } else { &account })];
    if let Some(ip) = client {
        keys.push(Key::Addr(ip));
    }
    let t = &state.tenancy;
    if let Err(locked) = t.check_lockout(&keys) {
        metrics::counter!("voxgate_console_sign_in_total", "outcome" => "locked_out").increment(1);
        let mut r = login_page(
            &c,
            StatusCode::TOO_MANY_REQUESTS,
            Some(&format!("Too many failed attempts; try again in {} s.", locked.retry_after_secs)),
        );
        if let Ok(v) = HeaderValue::from_str(&locked.retry_after_secs.to_string()) {
            r.headers_mut().insert(header::RETRY_AFTER, v);
        }
        return r;
    }
    // The admin token needs no account; a tenant's token needs its AccountSid.
    let user = if account.is_empty() { "admin" } else { account.as_str() };
    match t.sign_in(user, &token) {
        Ok(who) => {
            metrics::counter!("voxgate_console_sign_in_total", "outcome" => "ok").increment(1);
            tracing::info!(who = ?who, client = ?client, "console sign-in");
            let (id, _) = c.sessions.create(who);
            let mut r = redirect(&c.link("/calls"));
            let cookie = format!(
                "{COOKIE}={id}; Path={}; HttpOnly; SameSite=Strict{}",
                c.link(""),
                if c.secure { "; Secure" } else { "" }
            );
            if let Ok(v) = HeaderValue::from_str(&cookie) {
                r.headers_mut().insert(header::SET_COOKIE, v);
            }
            r
        }
        Err(e) => {
            if matches!(e, AuthError::Invalid | AuthError::Missing) {
                t.sign_in_failed(&keys);
            }
            metrics::counter!("voxgate_console_sign_in_total", "outcome" => "refused").increment(1);
            let msg = match e {
                AuthError::Inactive(_) => "This account is not active.",
                _ => "Those credentials were not accepted.",
            };
            login_page(&c, StatusCode::UNAUTHORIZED, Some(msg))
        }
    }
}

async fn logout(State(state): State<AppState>, headers: HeaderMap, body: Bytes) -> Response {
    let (c, _, _) = match change(&state, &headers, &body) {
        Ok(x) => x,
        Err(r) => return r,
    };
    if let Some(id) = cookie_value(&headers) {
        c.sessions.end(&id);
    }
    let mut r = redirect(&c.link("/login"));
    let cookie = format!("{COOKIE}=; Path={}; HttpOnly; SameSite=Strict; Max-Age=0", c.link(""));
    if let Ok(v) = HeaderValue::from_str(&cookie) {
        r.headers_mut().insert(header::SET_COOKIE, v);
    }
    r
}

const CSS: &str = include_str!("assets/console.css");
const JS: &str = include_str!("assets/console.js");

async fn css(State(state): State<AppState>) -> Response {
    asset(&state, CSS, "text/css; charset=utf-8")
}

async fn js(State(state): State<AppState>) -> Response {
    asset(&state, JS, "text/javascript; charset=utf-8")
}

fn asset(state: &AppState, body: &'static str, kind: &'static str) -> Response {
    if let Err(r) = console(state) {
        return r;
    }
    let mut r = body.into_response();
    r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static(kind));
    r.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("max-age=300"));
    r.headers_mut().insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    r
}

/// A time as `YYYY-MM-DD HH:MM:SS` UTC.
fn when(t: voxgate_protocol::Timestamp) -> String {
    let s = t.to_string();
    s.get(..19).map(|x| x.replace('T', " ")).unwrap_or(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn everything_a_page_shows_is_escaped() {
        assert_eq!(
            esc("<script>alert('x')</script> & \"q\""),
            "&lt;script&gt;alert(&#39;x&#39;)&lt;/script&gt; &amp; &quot;q&quot;"
        );
    }

    #[test]
    fn the_public_url_path_prefixes_links() {
        assert_eq!(url_path("https://voice.example.com"), "");
        assert_eq!(url_path("https://voice.example.com/"), "");
        assert_eq!(url_path("https://example.com/voxgate/"), "/voxgate");
        assert_eq!(url_path("http://127.0.0.1:8080"), "");
    }

    #[test]
    fn the_session_cookie_is_found_among_others() {
        let mut h = HeaderMap::new();
        h.insert(header::COOKIE, HeaderValue::from_static("a=1; voxgate_console=abc; b=2"));
        assert_eq!(cookie_value(&h).as_deref(), Some("abc"));
        h.insert(header::COOKIE, HeaderValue::from_static("voxgate_consolex=abc"));
        assert_eq!(cookie_value(&h), None);
    }
}
