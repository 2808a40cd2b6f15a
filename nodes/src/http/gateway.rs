//! Gateway mode: voxgate in front of a customer's Twilio app. For a number with a `VoiceUrl`,
//! the webhook Twilio sent voxgate (checked, gated, recorded) is forwarded to the app with the
//! same parameters, signed with the tenant's token for the app's URL exactly as Twilio signs; the
//! app's TwiML comes back with voxgate's both-track fork placed first ([`voxgate_protocol::twilio::gateway`]).
//! As Twilio does: a deadline, redirects followed (301, 302, 303, 307; at most 10), at most 64 kB,
//! `VoiceFallbackUrl` tried (with `ErrorCode` and `ErrorUrl`) when the voice URL fails, and when
//! both fail the caller hears Twilio's application-error message. Every request is an
//! `app_exchange` event, and `voxgate_app_webhook_seconds` times them.
//!
//! TwiML is cached the way Twilio caches it, under the app's control: `Cache-Control` (`max-age`,
//! `no-store`, `no-cache`), `Expires`, `ETag` and `Last-Modified` are honoured; a stale entry is
//! revalidated with `If-None-Match` / `If-Modified-Since` and a 304 reuses it. GET answers are
//! keyed by their full URL (query included); a POST answer only when the app marks it
//! `Cache-Control: public` with a lifetime (its TwiML does not depend on the call), keyed by URL.
//! Keys always include the tenant: one tenant's answer never serves another.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use voxgate_protocol::event::{AppExchange, AppPurpose, AppRequest, HttpMethod};
use voxgate_protocol::twilio::gateway::MAX_TWIML_BYTES;
use voxgate_protocol::twilio::{signature, Algorithm};
use voxgate_protocol::AccountSid;

/// `[gateway]`
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct GatewayFile {
    /// The app's voice URL must answer within this (Twilio gives voxgate 15 s in all).
    pub app_timeout_ms: u64,
    /// Then the fallback URL within this.
    pub fallback_timeout_ms: u64,
    /// TwiML answers cached at most.
    pub cache_entries: usize,
    /// Status and transcription callbacks to the app: attempts in all, backoff doubling from
    /// `callback_first_retry_ms`.
    pub callback_attempts: u32,
    pub callback_first_retry_ms: u64,
    pub callback_timeout_ms: u64,
}

impl Default for GatewayFile {
    fn default() -> Self {
        Self {
            app_timeout_ms: 7000,
            fallback_timeout_ms: 5000,
            cache_entries: 10_000,
            callback_attempts: 4,
            callback_first_retry_ms: 500,
            callback_timeout_ms: 5000,
        }
    }
}

impl GatewayFile {
    pub fn validate(&self) -> Result<(), voxgate_actors::InvalidSetting> {
        if !(100..=14_000).contains(&self.app_timeout_ms) || !(100..=14_000).contains(&self.fallback_timeout_ms) {
            return Err(voxgate_actors::InvalidSetting::new(
                "app_timeout_ms",
                "app_timeout_ms and fallback_timeout_ms must be between 100 and 14000",
            ));
        }
        if self.app_timeout_ms + self.fallback_timeout_ms > 14_500 {
            return Err(voxgate_actors::InvalidSetting::new(
                "fallback_timeout_ms",
                "app_timeout_ms + fallback_timeout_ms must stay under Twilio's 15 s",
            ));
        }
        if !(1..=20).contains(&self.callback_attempts) {
            return Err(voxgate_actors::InvalidSetting::new("callback_attempts", "must be between 1 and 20"));
        }
        if self.cache_entries > 1_000_000 {
            return Err(voxgate_actors::InvalidSetting::new("cache_entries", "must be at most 1000000"));
        }
        Ok(())
    }
}

/// What fetching TwiML gave.
#[derive(Debug, Clone)]
pub struct Fetched {
    /// The URL the answer came from (after redirects): relative URLs in it resolve against it.
    pub url: String,
    pub status: Option<u16>,
    pub body: Option<String>,
    /// (Twilio's code, what went wrong).
    pub error: Option<(u32, String)>,
    pub cache: &'static str,
    pub latency: Duration,
}

#[derive(Debug, Clone)]
struct Cached {
    body: String,
    final_url: String,
    etag: Option<String>,
    last_modified: Option<String>,
    fresh_until: Option<Instant>,
    stored: Instant,
}

type CacheKey = (AccountSid, HttpMethod, String);

/// The app side of gateway mode.
pub struct App {
    http: reqwest::Client,
    cfg: GatewayFile,
    allow_private: bool,
    cache: Mutex<HashMap<CacheKey, Cached>>,
}

/// Twilio's User-Agent, so apps that look for it are not surprised.
const USER_AGENT: &str = "TwilioProxy/1.1 (voxgate)";

impl App {
    pub fn new(cfg: GatewayFile, allow_private: bool) -> anyhow::Result<Self> {
        // Per-request deadlines are set on each request; this bounds anything left over.
        let http = crate::http::outbound::client(Duration::from_secs(15), allow_private)
            .map_err(|e| anyhow::anyhow!("HTTP client for the app: {e}"))?;
        Ok(Self { http, cfg, allow_private, cache: Mutex::new(HashMap::new()) })
    }

    pub fn config(&self) -> GatewayFile {
        self.cfg
    }

    /// Fetches TwiML from `url` for the tenant (signed with `token`), following redirects, within
    /// `timeout`, through the cache.
    pub async fn fetch_twiml(
        &self,
        tenant: AccountSid,
        token: &str,
        method: HttpMethod,
        url: &str,
        params: &[(String, String)],
        timeout: Duration,
    ) -> Fetched {
        self.fetch(tenant, token, method, url, params, timeout, true).await
    }

    /// Sends a recorded request to the app again (the console's inspector): signed as Twilio
    /// signs, redirects followed, the same limits, but past the TwiML cache (neither read nor
    /// filled), so the answer is the app's own, now.
    pub async fn resend(
        &self,
        tenant: AccountSid,
        token: &str,
        method: HttpMethod,
        url: &str,
        params: &[(String, String)],
    ) -> Fetched {
        let timeout = Duration::from_millis(self.cfg.app_timeout_ms);
        self.fetch(tenant, token, method, url, params, timeout, false).await
    }

    #[allow(clippy::too_many_arguments)]
    async fn fetch(
        &self,
        tenant: AccountSid,
        token: &str,
        method: HttpMethod,
        url: &str,
        params: &[(String, String)],
        timeout: Duration,
        use_cache: bool,
    ) -> Fetched {
        let started = Instant::now();
        let deadline = started + timeout;
        let key: CacheKey = (tenant, method, cache_url(method, url, params));
        let cached = if use_cache { self.cache.lock().ok().and_then(|c| c.get(&key).cloned()) } else { None };
        if let Some(c) = &cached {
            if c.fresh_until.is_some_and(|f| Instant::now() < f) {
                metrics::counter!("voxgate_app_twiml_cache_total", "outcome" => "hit").increment(1);
                return Fetched {
                    url: c.final_url.clone(),
                    status: Some(200),
                    body: Some(c.body.clone()),
                    error: None,
                    cache: "hit",
                    latency: started.elapsed(),
                };
            }
        }
        let mut method = method;
        let mut url = url.to_owned();
        let mut params: Vec<(String, String)> = params.to_vec();
        for _hop in 0..=10 {
            if let Err(e) = crate::http::outbound::check_at_delivery(&url, self.allow_private) {
                return failed(&url, None, 11200, format!("the app's URL is refused: {e}"), started);
            }
            let mut req = self.request(token, method, &url, &params);
            if let Some(c) = &cached {
                if let Some(e) = &c.etag {
                    req = req.header("if-none-match", e);
                }
                if let Some(m) = &c.last_modified {
                    req = req.header("if-modified-since", m);
                }
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return failed(&url, None, 11205, "the app did not answer in time".into(), started);
            }
            let resp = match tokio::time::timeout(left, req.timeout(left).send()).await {
                Ok(Ok(r)) => r,
                Ok(Err(e)) if e.is_timeout() => {
                    return failed(&url, None, 11205, "the app did not answer in time".into(), started)
                }
                Ok(Err(e)) => {
                    return failed(&url, None, 11205, format!("the app could not be reached: {}", chain(&e)), started)
                }
                Err(_) => return failed(&url, None, 11205, "the app did not answer in time".into(), started),
            };
            let status = resp.status().as_u16();
            if matches!(status, 301 | 302 | 303 | 307) {
                let Some(loc) = resp.headers().get("location").and_then(|v| v.to_str().ok()) else {
                    return failed(&url, Some(status), 11216, "a redirect without a Location".into(), started);
                };
                let Some(next) = voxgate_protocol::twilio::gateway::resolve(&url, loc).or_else(|| Some(loc.to_owned()))
                else {
                    return failed(&url, Some(status), 11216, "an invalid redirect".into(), started);
                };
                if status != 307 && method == HttpMethod::Post {
                    // Like a browser, and Twilio: a GET follows, and the form is not sent again.
                    method = HttpMethod::Get;
                    params.clear();
                }
                url = next;
                continue;
            }
            if (300..400).contains(&status) && status != 304 {
                return failed(
                    &url,
                    Some(status),
                    11216,
                    format!("HTTP {status} is not a redirect Twilio follows"),
                    started,
                );
            }
            if status == 304 {
                if let Some(c) = cached {
                    metrics::counter!("voxgate_app_twiml_cache_total", "outcome" => "revalidated").increment(1);
                    self.store(key, &c.body, &c.final_url, resp.headers(), method);
                    return Fetched {
                        url: c.final_url,
                        status: Some(304),
                        body: Some(c.body),
                        error: None,
                        cache: "revalidated",
                        latency: started.elapsed(),
                    };
                }
                return failed(
                    &url,
                    Some(304),
                    11200,
                    "304 Not Modified to a request without validators".into(),
                    started,
                );
            }
            let headers = resp.headers().clone();
            let body = match read_limited(resp, deadline).await {
                Ok(b) => b,
                Err((code, why)) => return failed(&url, Some(status), code, why, started),
            };
            if !(200..300).contains(&status) {
                return Fetched {
                    url,
                    status: Some(status),
                    body: Some(body),
                    error: Some((11200, format!("the app answered HTTP {status}"))),
                    cache: "miss",
                    latency: started.elapsed(),
                };
            }
            if use_cache {
                metrics::counter!("voxgate_app_twiml_cache_total", "outcome" => "miss").increment(1);
                self.store(key, &body, &url, &headers, method);
            }
            return Fetched {
                url,
                status: Some(status),
                body: Some(body),
                error: None,
                cache: "miss",
                latency: started.elapsed(),
            };
        }
        failed(&url, None, 11215, "more than 10 redirects".into(), started)
    }

    /// Keeps an answer when the app's caching headers allow it.
    fn store(&self, key: CacheKey, body: &str, final_url: &str, h: &reqwest::header::HeaderMap, method: HttpMethod) {
        if self.cfg.cache_entries == 0 {
            return;
        }
        let cc = h.get("cache-control").and_then(|v| v.to_str().ok()).unwrap_or("").to_ascii_lowercase();
        let directive = |d: &str| cc.split(',').map(str::trim).any(|x| x == d || x.starts_with(&format!("{d}=")));
        if directive("no-store") {
            self.forget(&key);
            return;
        }
        let max_age = cc
            .split(',')
            .map(str::trim)
            .find_map(|x| x.strip_prefix("s-maxage=").or_else(|| x.strip_prefix("max-age=")))
            .and_then(|v| v.parse::<u64>().ok());
        let expires =
            h.get("expires").and_then(|v| v.to_str().ok()).and_then(voxgate_protocol::Timestamp::parse_rfc2822).map(
                |t| {
                    let now = std::time::SystemTime::now()
                        .duration_since(std::time::UNIX_EPOCH)
                        .map(|d| d.as_secs() as i64)
                        .unwrap_or(0);
                    Duration::from_secs(u64::try_from(t.as_micros() / 1_000_000 - now).unwrap_or(0))
                },
            );
        let lifetime =
            if directive("no-cache") { Some(Duration::ZERO) } else { max_age.map(Duration::from_secs).or(expires) };
        let etag = h.get("etag").and_then(|v| v.to_str().ok()).map(str::to_owned);
        let last_modified = h.get("last-modified").and_then(|v| v.to_str().ok()).map(str::to_owned);
        // POST answers are cached only when the app says so outright.
        if method == HttpMethod::Post && !(directive("public") && lifetime.is_some_and(|l| !l.is_zero())) {
            return;
        }
        if lifetime.is_none() && etag.is_none() && last_modified.is_none() {
            return;
        }
        let Ok(mut c) = self.cache.lock() else { return };
        if c.len() >= self.cfg.cache_entries && !c.contains_key(&key) {
            // Full: drop the oldest tenth.
            let mut ages: Vec<(Instant, CacheKey)> = c.iter().map(|(k, v)| (v.stored, k.clone())).collect();
            ages.sort_by_key(|(t, _)| *t);
            for (_, k) in ages.into_iter().take((self.cfg.cache_entries / 10).max(1)) {
                c.remove(&k);
            }
        }
        let now = Instant::now();
        c.insert(
            key,
            Cached {
                body: body.to_owned(),
                final_url: final_url.to_owned(),
                etag,
                last_modified,
                fresh_until: lifetime.map(|l| now + l),
                stored: now,
            },
        );
    }

    fn forget(&self, key: &CacheKey) {
        if let Ok(mut c) = self.cache.lock() {
            c.remove(key);
        }
    }

    /// Sends a callback (status, transcription) to the app, signed; retries with backoff. Calls
    /// `record` with each attempt's exchange.
    #[allow(clippy::too_many_arguments)]
    pub async fn callback(
        &self,
        purpose: AppPurpose,
        token: &str,
        method: HttpMethod,
        url: &str,
        params: &[(String, String)],
        idempotency: &str,
        mut record: impl FnMut(AppExchange),
    ) -> bool {
        let mut backoff = Duration::from_millis(self.cfg.callback_first_retry_ms);
        for attempt in 1..=self.cfg.callback_attempts {
            let started = Instant::now();
            let (status, error) = match crate::http::outbound::check_at_delivery(url, self.allow_private) {
                Err(e) => (None, Some((11200, format!("the callback URL is refused: {e}")))),
                Ok(()) => {
                    let req = self
                        .request(token, method, url, params)
                        .header("i-twilio-idempotency-token", idempotency)
                        .timeout(Duration::from_millis(self.cfg.callback_timeout_ms));
                    match req.send().await {
                        Ok(r) if r.status().is_success() => (Some(r.status().as_u16()), None),
                        Ok(r) => {
                            (Some(r.status().as_u16()), Some((11200, format!("the app answered HTTP {}", r.status()))))
                        }
                        Err(e) if e.is_timeout() => (None, Some((11205, "the app did not answer in time".into()))),
                        Err(e) => (None, Some((11205, format!("the app could not be reached: {}", chain(&e))))),
                    }
                }
            };
            let ok = error.is_none();
            metrics::histogram!("voxgate_app_webhook_seconds", "purpose" => purpose.as_str())
                .record(started.elapsed().as_secs_f64());
            if let Some((code, _)) = &error {
                metrics::counter!("voxgate_app_errors_total", "purpose" => purpose.as_str(), "code" => code.to_string())
                    .increment(1);
            }
            record(AppExchange {
                purpose,
                method,
                url: url.to_owned(),
                attempt,
                status,
                latency_ms: started.elapsed().as_millis().min(u128::from(u32::MAX)) as u32,
                error_code: error.as_ref().map(|e| e.0),
                error: error.map(|e| e.1),
                cache: None,
                answer: None,
                twilio_signature_valid: true,
                signed_for_app: true,
                reference: Some(idempotency.to_owned()),
            });
            if ok {
                return true;
            }
            if attempt < self.cfg.callback_attempts {
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(30));
            }
        }
        false
    }
}

/// The cache key's URL: a GET's full URL with its query; a POST's URL alone.
fn cache_url(method: HttpMethod, url: &str, params: &[(String, String)]) -> String {
    match method {
        HttpMethod::Get => with_query(url, params),
        HttpMethod::Post => url.to_owned(),
    }
}

/// `url` with `params` appended to its query (Twilio's GET requests).
fn with_query(url: &str, params: &[(String, String)]) -> String {
    if params.is_empty() {
        return url.to_owned();
    }
    let (base, frag) = match url.split_once('#') {
        Some((b, f)) => (b, Some(f)),
        None => (url, None),
    };
    let sep = if base.contains('?') { '&' } else { '?' };
    let mut out = format!("{base}{sep}{}", form(params));
    if let Some(f) = frag {
        out.push('#');
        out.push_str(f);
    }
    out
}

impl App {
    /// A request to the app as Twilio makes it: signed with the tenant's token for the URL it
    /// goes to, the parameters in the body (POST) or the query (GET).
    fn request(
        &self,
        token: &str,
        method: HttpMethod,
        url: &str,
        params: &[(String, String)],
    ) -> reqwest::RequestBuilder {
        let (req_url, sig) = signed(token, method, url, params);
        let req = match method {
            HttpMethod::Get => self.http.get(&req_url),
            HttpMethod::Post => self
                .http
                .post(&req_url)
                .header("content-type", "application/x-www-form-urlencoded; charset=UTF-8")
                .body(form(params)),
        };
        req.header("x-twilio-signature", sig).header("user-agent", USER_AGENT)
    }
}

fn form(params: &[(String, String)]) -> String {
    form_urlencoded::Serializer::new(String::new()).extend_pairs(params.iter()).finish()
}

/// The URL to request and its `X-Twilio-Signature`, as Twilio computes it: HMAC-SHA1 of the URL
/// and, for a POST, the sorted parameters; for a GET the parameters are in the URL.
fn signed(token: &str, method: HttpMethod, url: &str, params: &[(String, String)]) -> (String, String) {
    let url = url.split_once('#').map_or(url, |(b, _)| b);
    match method {
        HttpMethod::Get => {
            let full = with_query(url, params);
            let sig = signature::compute(Algorithm::Sha1, token.as_bytes(), &full, &[]);
            (full, sig)
        }
        HttpMethod::Post => (url.to_owned(), signature::compute(Algorithm::Sha1, token.as_bytes(), url, params)),
    }
}

async fn read_limited(mut resp: reqwest::Response, deadline: Instant) -> Result<String, (u32, String)> {
    let mut body = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, resp.chunk()).await {
            Ok(Ok(Some(c))) => {
                body.extend_from_slice(&c);
                if body.len() > MAX_TWIML_BYTES {
                    return Err((11750, format!("the app's answer is larger than {MAX_TWIML_BYTES} bytes")));
                }
            }
            Ok(Ok(None)) => break,
            Ok(Err(e)) => return Err((11200, format!("reading the app's answer: {e}"))),
            Err(_) => return Err((11205, "the app did not finish its answer in time".into())),
        }
    }
    String::from_utf8(body).map_err(|_| (12100, "the app's answer is not UTF-8".into()))
}

fn failed(url: &str, status: Option<u16>, code: u32, why: String, started: Instant) -> Fetched {
    Fetched {
        url: url.to_owned(),
        status,
        body: None,
        error: Some((code, why)),
        cache: "miss",
        latency: started.elapsed(),
    }
}

/// An error with its causes, for an event's message.
fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_are_signed_as_twilio_signs_them() {
        // The official vector: token 12345, this URL and these parameters.
        let params: Vec<(String, String)> = [
            ("CallSid", "CA1234567890ABCDE"),
            ("Caller", "+14158675310"),
            ("Digits", "1234"),
            ("From", "+14158675310"),
            ("To", "+18005551212"),
        ]
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
        let (url, sig) = signed("12345", HttpMethod::Post, "https://example.com/myapp.php?foo=1&bar=2", &params);
        assert_eq!(
            (url.as_str(), sig.as_str()),
            ("https://example.com/myapp.php?foo=1&bar=2", "L/OH5YylLD5NRKLltdqwSvS0BnU=")
        );
        // A GET carries the parameters in its query, and the signature covers that URL alone.
        let (url, sig) = signed("12345", HttpMethod::Get, "https://example.com/v#ct=1000", &params[..1]);
        assert_eq!(url, "https://example.com/v?CallSid=CA1234567890ABCDE");
        assert_eq!(sig, signature::compute(Algorithm::Sha1, b"12345", &url, &[]));
    }
}

// ---------------------------------------------------------------------------------------------
// The webhook side

use axum::response::Response;
use voxgate_protocol::event::{Event, GatewayAnswered, NumberRouting, TranscriptionStarted, TranscriptionStopped};
use voxgate_protocol::twilio::gateway::{rewrite, Fork, TranscriptionRequest};
use voxgate_protocol::{CallSid, EventId};

use crate::http::AppState;

/// What Twilio says when an app cannot be reached (and its fallback neither).
const APPLICATION_ERROR: &str = "<?xml version=\"1.0\" encoding=\"UTF-8\"?><Response><Say>We are sorry, an application error has occurred. Goodbye.</Say><Hangup /></Response>";

/// Event-id kinds of gateway events (beside the call's own in `voxgate_actors::call::id_kind`).
pub mod id_kind {
    pub const APP_EXCHANGE: u64 = 101;
    pub const GATEWAY_ANSWERED: u64 = 102;
    pub const TRANSCRIPTION_STARTED: u64 = 103;
    pub const TRANSCRIPTION_STOPPED: u64 = 104;
    pub const APP_REQUEST: u64 = 105;
}

/// Cuts `s` to at most `n` characters.
fn cut(s: &str, n: usize) -> String {
    s.chars().take(n).collect()
}

/// A transcription's sid: `GT` and 32 hex digits, derived from the call and its place, so a
/// Twilio retry of the webhook names the same one.
pub fn transcription_sid(call: CallSid, n: u128) -> String {
    format!("GT{:032x}", EventId::derive(id_kind::TRANSCRIPTION_STARTED, &[call.as_u128(), n]).0)
}

/// Answers a gateway call: the app's TwiML (or its fallback's) with voxgate's fork first, every
/// exchange recorded; Twilio's application-error message when neither answers usable TwiML.
pub async fn answer(
    state: &AppState,
    tenant: AccountSid,
    call: CallSid,
    token: &crate::config::Secret,
    params: &[(String, String)],
    routing: &NumberRouting,
    started: Instant,
) -> Response {
    let app = &state.app;
    let cfg = app.config();
    let mut events: Vec<(EventId, Event)> = Vec::new();
    let mut app_time = Duration::ZERO;
    let stream_url = signature::websocket_url(&state.cfg.public_url, &format!("/api/voice/twilio/stream/{call}"));
    let (tenant_s, call_s) = (tenant.to_string(), call.to_string());
    let stream_params = [("tenant", tenant_s.as_str()), ("call_sid", call_s.as_str())];
    // (purpose, method, URL, form, time allowed) per attempt: the voice URL, then the fallback.
    type Attempt = (AppPurpose, HttpMethod, String, Vec<(String, String)>, Duration);
    let mut attempts: Vec<Attempt> = Vec::new();
    if let Some(u) = &routing.voice_url {
        attempts.push((
            AppPurpose::Voice,
            routing.voice_method,
            u.clone(),
            params.to_vec(),
            Duration::from_millis(cfg.app_timeout_ms),
        ));
    }
    let mut last_error: Option<(u32, String, String)> = None;
    let mut outcome = None;
    let mut i = 0;
    while i < attempts.len() {
        let (purpose, method, url, p, timeout) = attempts[i].clone();
        i += 1;
        events.push((
            EventId::derive(id_kind::APP_REQUEST, &[call.as_u128(), 0, i as u128]),
            Event::AppRequest(AppRequest { purpose, method, url: cut(&url, 4000), params: p.clone(), reference: None }),
        ));
        let f = app.fetch_twiml(tenant, token.expose(), method, &url, &p, timeout).await;
        app_time += f.latency;
        metrics::histogram!("voxgate_app_webhook_seconds", "purpose" => purpose.as_str())
            .record(f.latency.as_secs_f64());
        // A usable answer is TwiML; anything else is an error, as Twilio would see it.
        let rewritten = match (&f.error, &f.body) {
            (None, Some(body)) => {
                match rewrite(body, &Fork { stream_url: &stream_url, parameters: &stream_params, base_url: &f.url }) {
                    Ok(r) => Ok(r),
                    Err(e) => Err((e.code(), e.to_string())),
                }
            }
            (Some(e), _) => Err(e.clone()),
            (None, None) => Err((11200, "the app sent no answer".to_owned())),
        };
        let error = rewritten.as_ref().err().cloned();
        let attempt = u32::try_from(i).unwrap_or(u32::MAX);
        events.push((
            EventId::derive(id_kind::APP_EXCHANGE, &[call.as_u128(), 0, u128::from(attempt)]),
            Event::AppExchange(AppExchange {
                purpose,
                method,
                url: cut(&url, 4000),
                attempt,
                status: f.status,
                latency_ms: f.latency.as_millis().min(u128::from(u32::MAX)) as u32,
                error_code: error.as_ref().map(|e| e.0),
                error: error.as_ref().map(|e| cut(&e.1, 500)),
                cache: Some(f.cache.to_owned()),
                answer: f.body.as_deref().map(|b| cut(b, 4000)),
                twilio_signature_valid: true,
                signed_for_app: true,
                reference: None,
            }),
        ));
        match rewritten {
            Ok(r) => {
                outcome = Some((r, f.url.clone()));
                break;
            }
            Err((code, why)) => {
                metrics::counter!("voxgate_app_errors_total", "purpose" => purpose.as_str(), "code" => code.to_string())
                    .increment(1);
                tracing::warn!(stage = "gateway", call_sid = %call, tenant = %tenant, url = %url, code, error = %why, "the app's answer is unusable");
                last_error = Some((code, why, url.clone()));
                // Twilio's fallback: the same request, with what went wrong.
                if purpose == AppPurpose::Voice {
                    if let Some(fb) = &routing.voice_fallback_url {
                        let mut p = params.to_vec();
                        p.push(("ErrorCode".into(), code.to_string()));
                        p.push(("ErrorUrl".into(), url.clone()));
                        attempts.push((
                            AppPurpose::Fallback,
                            routing.voice_fallback_method,
                            fb.clone(),
                            p,
                            Duration::from_millis(cfg.fallback_timeout_ms),
                        ));
                    }
                }
            }
        }
    }
    let mut hints: Vec<String> = Vec::new();
    let (twiml, answered) = match outcome {
        Some((r, base)) => {
            hints.extend(r.transcriptions.iter().filter_map(|t| t.get("hints")).map(str::to_owned));
            let sids: Vec<String> = (0..r.transcriptions.len()).map(|n| transcription_sid(call, n as u128)).collect();
            for (n, (t, sid)) in r.transcriptions.iter().zip(&sids).enumerate() {
                events.push((
                    EventId::derive(id_kind::TRANSCRIPTION_STARTED, &[call.as_u128(), n as u128]),
                    Event::TranscriptionStarted(transcription_started(sid.clone(), t, Some(&base), "twiml")),
                ));
            }
            for (n, name) in r.transcription_stops.iter().enumerate() {
                events.push((
                    EventId::derive(id_kind::TRANSCRIPTION_STOPPED, &[call.as_u128(), n as u128]),
                    Event::TranscriptionStopped(TranscriptionStopped { sid: name.clone(), reason: "twiml".into() }),
                ));
            }
            for (code, w) in &r.warnings {
                tracing::info!(stage = "gateway", call_sid = %call, tenant = %tenant, code, warning = %w, "app TwiML warning");
            }
            let answered = GatewayAnswered {
                fork: r.fork.map(str::to_owned),
                app_tracks: r.app_tracks,
                transcriptions: sids,
                absolutized: r.absolutized,
                warnings: r.warnings.clone(),
                added_us: 0,
                twiml: cut(&r.twiml, 4000),
            };
            (r.twiml, answered)
        }
        None => {
            let (code, why, url) = last_error.unwrap_or((11200, "no VoiceUrl".into(), String::new()));
            let answered = GatewayAnswered {
                fork: None,
                app_tracks: 0,
                transcriptions: Vec::new(),
                absolutized: 0,
                warnings: vec![(code, format!("{url}: {why}"))],
                added_us: 0,
                twiml: APPLICATION_ERROR.to_owned(),
            };
            (APPLICATION_ERROR.to_owned(), answered)
        }
    };
    let mut answered = answered;
    let added = started.elapsed().saturating_sub(app_time);
    answered.added_us = added.as_micros().min(u128::from(u32::MAX)) as u32;
    events.push((EventId::derive(id_kind::GATEWAY_ANSWERED, &[call.as_u128()]), Event::GatewayAnswered(answered)));
    if let Err(r) = append_events(state, tenant, call, events).await {
        return r;
    }
    add_hints(state, call, hints.join(", ")).await;
    metrics::histogram!("voxgate_gateway_added_seconds")
        .record(started.elapsed().saturating_sub(app_time).as_secs_f64());
    crate::http::ingress::twiml_response(twiml)
}

/// What the app asked for, its callback URL made absolute against the URL whose answer asked
/// (Twilio resolves a relative `statusCallbackUrl` against the document's URL).
fn transcription_started(
    sid: String,
    t: &TranscriptionRequest,
    base: Option<&str>,
    source: &str,
) -> TranscriptionStarted {
    let callback = t.get("statusCallbackUrl").and_then(|u| match (reqwest::Url::parse(u), base) {
        (Ok(abs), _) => Some(abs.to_string()),
        (Err(_), Some(base)) => reqwest::Url::parse(base).and_then(|b| b.join(u)).ok().map(|u| u.to_string()),
        (Err(_), None) => None,
    });
    TranscriptionStarted {
        sid,
        name: t.get("name").map(str::to_owned),
        status_callback_url: callback,
        status_callback_method: t.get("statusCallbackMethod").and_then(HttpMethod::parse).unwrap_or_default(),
        track: t.get("track").unwrap_or("both_tracks").to_owned(),
        partial_results: t.get("partialResults").is_some_and(|v| v.eq_ignore_ascii_case("true")),
        language_code: t.get("languageCode").unwrap_or("en-US").to_owned(),
        inbound_track_label: t.get("inboundTrackLabel").map(str::to_owned),
        outbound_track_label: t.get("outboundTrackLabel").map(str::to_owned),
        source: source.to_owned(),
    }
}

/// Appends the call's events in one write (one group commit for the whole exchange).
async fn append_events(
    state: &AppState,
    tenant: AccountSid,
    call: CallSid,
    events: Vec<(EventId, Event)>,
) -> Result<(), Response> {
    append(state, tenant, call, events).await.map_err(|e| {
        crate::http::twilio_error(axum::http::StatusCode::SERVICE_UNAVAILABLE, 20503, format!("{e}; retry"))
    })
}

/// Appends the call's events in one write; a failure is logged and counted.
async fn append(
    state: &AppState,
    tenant: AccountSid,
    call: CallSid,
    events: Vec<(EventId, Event)>,
) -> Result<(), voxgate_storage::StorageError> {
    let now = state.clock.now();
    let encoded: Vec<Vec<u8>> = events
        .into_iter()
        .map(|(event_id, payload)| {
            voxgate_protocol::encode(&voxgate_protocol::Envelope {
                event_id,
                tenant,
                call: Some(call),
                occurred_at: now,
                payload,
            })
        })
        .collect();
    let key = call.partition_key();
    state
        .log
        .append_many_or_spool(voxgate_storage::topics::CALLS, encoded.iter().map(|b| (key, b.as_slice())))
        .await
        .map(|_| ())
        .inspect_err(|e| {
            tracing::error!(stage = "gateway", call_sid = %call, tenant = %tenant, error = %e, "event log append failed");
            metrics::counter!("voxgate_ingress_log_failures_total").increment(1);
        })
}

/// `POST …/Calls/{CA}/Transcriptions.json`: starts real-time transcription of a running call
/// (REST parameter names are the TwiML attribute names with a capital first letter).
pub async fn start_transcription(
    state: &AppState,
    tenant: AccountSid,
    call: CallSid,
    params: &[(String, String)],
) -> Result<TranscriptionStarted, voxgate_storage::StorageError> {
    let attributes = params
        .iter()
        .map(|(k, v)| {
            let mut c = k.chars();
            let k = c.next().map(|f| f.to_ascii_lowercase().to_string() + c.as_str()).unwrap_or_default();
            (k, v.clone())
        })
        .collect();
    let request = TranscriptionRequest { attributes };
    let n = crate::stages::tenancy::random_u128();
    let sid = transcription_sid(call, n);
    let started = transcription_started(sid, &request, None, "rest");
    let id = EventId::derive(id_kind::TRANSCRIPTION_STARTED, &[call.as_u128(), n, 1]);
    append(state, tenant, call, vec![(id, Event::TranscriptionStarted(started.clone()))]).await?;
    if let Some(h) = request.get("hints") {
        add_hints(state, call, h.to_owned()).await;
    }
    Ok(started)
}

/// A transcription's `hints` join the call's vocabulary hints (its actor records them on the
/// media log, in order with the audio they apply to).
async fn add_hints(state: &AppState, call: CallSid, hints: String) {
    if hints.trim().is_empty() {
        return;
    }
    if !state.calls.add_hints(call, hints).await {
        tracing::warn!(stage = "gateway", call_sid = %call, "the call ended before its transcription's hints reached it");
    }
}

/// `POST …/Calls/{CA}/Transcriptions/{GT…|name}.json` with `Status=stopped`.
pub async fn stop_transcription(
    state: &AppState,
    tenant: AccountSid,
    call: CallSid,
    which: &str,
) -> Result<(), voxgate_storage::StorageError> {
    let id = EventId::derive(id_kind::TRANSCRIPTION_STOPPED, &[call.as_u128(), crate::stages::tenancy::random_u128()]);
    let ev = Event::TranscriptionStopped(TranscriptionStopped { sid: which.to_owned(), reason: "rest".into() });
    append(state, tenant, call, vec![(id, ev)]).await
}

/// Forwards Twilio's status callback, re-signed, to the number's `StatusCallback` (if it has
/// one), in the background with retries; every attempt is an `app_exchange` event.
pub fn forward_status(
    state: &AppState,
    tenant: AccountSid,
    call: CallSid,
    token: &crate::config::Secret,
    params: &[(String, String)],
) {
    let to = params.iter().find(|(k, _)| k == "To").map(|(_, v)| v.as_str()).unwrap_or_default();
    let routing = state.tenancy.read(|d| d.owner_of(to).filter(|n| n.tenant == tenant).map(|n| n.routing.clone()));
    let Some(url) = routing.as_ref().and_then(|r| r.status_callback.clone()) else { return };
    let method = routing.map(|r| r.status_callback_method).unwrap_or_default();
    let seq = params.iter().find(|(k, _)| k == "SequenceNumber").and_then(|(_, v)| v.parse::<u128>().ok()).unwrap_or(0);
    let status = params.iter().find(|(k, _)| k == "CallStatus").map(|(_, v)| v.clone()).unwrap_or_default();
    let (state, token, params) = (state.clone(), token.clone(), params.to_vec());
    let idempotency = format!("{call}-{status}-{seq}");
    tokio::spawn(async move {
        let mut exchanges = Vec::new();
        let request = AppRequest {
            purpose: AppPurpose::StatusCallback,
            method,
            url: cut(&url, 4000),
            params: params.clone(),
            reference: Some(idempotency.clone()),
        };
        state
            .app
            .callback(AppPurpose::StatusCallback, token.expose(), method, &url, &params, &idempotency, |x| {
                exchanges.push(x)
            })
            .await;
        let request_id = EventId::derive(id_kind::APP_REQUEST, &[call.as_u128(), 1, seq]);
        let events: Vec<(EventId, Event)> = std::iter::once((request_id, Event::AppRequest(request)))
            .chain(exchanges.into_iter().map(|x| {
                let id = EventId::derive(id_kind::APP_EXCHANGE, &[call.as_u128(), 1, seq, u128::from(x.attempt)]);
                (id, Event::AppExchange(x))
            }))
            .collect();
        if append_events(&state, tenant, call, events).await.is_err() {
            tracing::warn!(stage = "gateway", call_sid = %call, "status callback attempts not recorded (the log cannot write)");
        }
    });
}
