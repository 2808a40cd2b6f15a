//! Calls: the live list and search, a call's timeline (its events from the logs, paged, with
//! its speech segments playable as WAV), and the server-sent events the live views follow.

use std::collections::HashMap;
use std::convert::Infallible;
use std::time::Duration;

use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use tokio::sync::broadcast::error::RecvError;
use voxgate_protocol::event::Event;
use voxgate_protocol::{AccountSid, CallSid, Timestamp};
use voxgate_storage::topics;

use super::index::{CallRow, FOLLOWED};
use super::{esc, may_see, page, page_error, q, viewer, when, Console};
use crate::cli::replay::{describe, Entry};
use crate::http::AppState;

/// Rows per page of the call list, and events per page of a timeline.
const LIST_PAGE: usize = 50;
const TIMELINE_PAGE: usize = 200;

#[derive(serde::Deserialize, Default)]
#[serde(default)]
pub(super) struct ListQuery {
    /// CallSid (or its start), a number (or part of it), or words of the transcripts.
    q: String,
    tenant: String,
    /// `live` (default when nothing is searched) or `all`.
    show: String,
    /// `YYYY-MM-DD` or `YYYY-MM-DDTHH:MM` (UTC).
    since: String,
    until: String,
    page: usize,
}

/// `GET /console/calls`
pub(super) async fn list(State(state): State<AppState>, headers: HeaderMap, Query(lq): Query<ListQuery>) -> Response {
    let (c, v) = match viewer(&state, &headers, true) {
        Ok(x) => x,
        Err(r) => return r,
    };
    let searching = !lq.q.trim().is_empty() || !lq.since.is_empty() || !lq.until.is_empty() || !lq.tenant.is_empty();
    let live_only = lq.show == "live" || (lq.show.is_empty() && !searching);
    let tenant_filter = match super::tenant_filter(&lq.tenant) {
        Ok(t) => t,
        Err(r) => return r,
    };
    let since = match parse_time(&lq.since) {
        Ok(t) => t,
        Err(e) => return page_error(StatusCode::BAD_REQUEST, &format!("since: {e}")),
    };
    let until = match parse_time(&lq.until) {
        Ok(t) => t,
        Err(e) => return page_error(StatusCode::BAD_REQUEST, &format!("until: {e}")),
    };
    let needle = lq.q.trim().to_lowercase();
    let mut access: HashMap<AccountSid, bool> = HashMap::new();
    let who = v.session.who;
    let tenancy = state.tenancy.clone();
    let (rows, total) = c.index.calls(lq.page.saturating_mul(LIST_PAGE), LIST_PAGE, |r| {
        if live_only && !r.live() {
            return false;
        }
        if tenant_filter.is_some_and(|t| t != r.tenant) {
            return false;
        }
        if since.is_some_and(|s| r.started < s) || until.is_some_and(|u| r.started > u) {
            return false;
        }
        if !needle.is_empty() && !matches_search(r, &needle) {
            return false;
        }
        *access.entry(r.tenant).or_insert_with(|| tenancy.may_access(who, r.tenant))
    });
    let now = state.clock.now();
    let mut body = String::new();
    body.push_str(&format!(
        "<h1>{}</h1><form method=\"get\" action=\"{}\" class=\"search\" id=\"search\">\
<input name=\"q\" id=\"q\" value=\"{}\" placeholder=\"CallSid, number or words said\" maxlength=\"200\">\
<input name=\"tenant\" value=\"{}\" placeholder=\"AC… (tenant)\" maxlength=\"34\">\
<label>from <input name=\"since\" type=\"datetime-local\" value=\"{}\"></label>\
<label>to <input name=\"until\" type=\"datetime-local\" value=\"{}\"></label>\
<select name=\"show\"><option value=\"all\"{}>all calls</option><option value=\"live\"{}>live only</option></select>\
<button>Search</button></form>",
        if live_only { "Live calls" } else { "Calls" },
        esc(&c.link("/calls")),
        esc(&lq.q),
        esc(&lq.tenant),
        esc(&lq.since),
        esc(&lq.until),
        if live_only { "" } else { " selected" },
        if live_only { " selected" } else { "" },
    ));
    body.push_str(&format!(
        "<p class=\"meta\"><span id=\"count\">{total}</span> {} · times in UTC</p>",
        if live_only { "live calls, updating as they come and go" } else { "calls found" }
    ));
    body.push_str(&format!(
        "<table class=\"calls\" id=\"calls\" data-live=\"{}\"><thead><tr><th>Call</th><th>Tenant</th><th>From</th><th>To</th><th>State</th><th>Started</th><th>Duration</th><th>Tracks</th><th>Fraud</th></tr></thead><tbody>",
        if live_only && lq.page == 0 { "1" } else { "0" }
    ));
    for r in &rows {
        body.push_str(&call_row_html(&c, r, now));
    }
    body.push_str("</tbody></table>");
    if rows.is_empty() {
        body.push_str(&format!(
            "<p class=\"empty\" id=\"no-calls\">{}</p>",
            if live_only { "No live calls right now." } else { "No calls match." }
        ));
    }
    body.push_str(&pager(&c, "/calls", &lq_query(&lq), lq.page, total, LIST_PAGE));
    page(&c, Some(&v), "Calls", "Calls", &body)
}

fn lq_query(lq: &ListQuery) -> String {
    format!(
        "q={}&tenant={}&show={}&since={}&until={}",
        q(&lq.q),
        q(&lq.tenant),
        q(&lq.show),
        q(&lq.since),
        q(&lq.until)
    )
}

fn matches_search(r: &CallRow, needle: &str) -> bool {
    let sid = r.sid.to_string().to_lowercase();
    if sid.starts_with(needle) {
        return true;
    }
    let digits: String = needle.chars().filter(|c| c.is_ascii_digit() || *c == '+').collect();
    let looks_like_number =
        !digits.is_empty() && digits.len() >= needle.chars().filter(|c| !c.is_whitespace() && *c != '-').count();
    if looks_like_number && (r.from.contains(&digits) || r.to.contains(&digits)) {
        return true;
    }
    r.text.to_lowercase().contains(needle)
}

/// One row of the call list (the script builds the same from a `call` event).
fn call_row_html(c: &Console, r: &CallRow, now: Timestamp) -> String {
    let mut tracks = if r.tracks.is_empty() { "—".to_owned() } else { r.tracks.join(", ") };
    // Track activity: when each party was last heard (a transcript or partial of its track).
    for (party, heard) in [("caller", r.heard[0]), ("agent", r.heard[1])] {
        if let Some(t) = heard {
            tracks.push_str(&format!(" · {party} heard {}", clock_time(t).get(..8).unwrap_or_default()));
        }
    }
    format!(
        "<tr id=\"call-{sid}\" data-call=\"{sid}\" class=\"{cls}\"><td><a href=\"{href}\">{sid}</a></td><td>{tenant}</td><td>{from}</td><td>{to}</td><td class=\"state\">{state}</td><td>{start}</td><td class=\"duration\" data-started=\"{start_us}\" data-live=\"{live}\">{dur} s</td><td class=\"tracks\">{tracks}</td><td>{fraud}</td></tr>",
        sid = r.sid,
        cls = if r.live() { "live" } else { "ended" },
        href = esc(&c.link(&format!("/calls/{}", r.sid))),
        tenant = r.tenant,
        from = esc(&r.from),
        to = esc(&r.to),
        state = esc(&match &r.rejected {
            Some(why) => format!("rejected: {why}"),
            None => r.status.clone(),
        }),
        start = esc(&when(r.started)),
        start_us = r.started.as_micros(),
        live = if r.live() { "1" } else { "0" },
        dur = r.duration_secs(now),
        tracks = esc(&tracks),
        fraud = esc(r.severity.as_deref().unwrap_or("")),
    )
}

fn pager(c: &Console, path: &str, query: &str, page: usize, total: usize, size: usize) -> String {
    let pages = total.div_ceil(size).max(1);
    if pages <= 1 {
        return String::new();
    }
    let mut s = format!("<p class=\"pager\">page {} of {pages} ", page + 1);
    if page > 0 {
        s.push_str(&format!(
            "<a href=\"{}\" id=\"prev\">← newer</a> ",
            esc(&format!("{}?{query}&page={}", c.link(path), page - 1))
        ));
    }
    if page + 1 < pages {
        s.push_str(&format!(
            "<a href=\"{}\" id=\"next\">older →</a>",
            esc(&format!("{}?{query}&page={}", c.link(path), page + 1))
        ));
    }
    s.push_str("</p>");
    s
}

/// `YYYY-MM-DD` or `YYYY-MM-DDTHH:MM[:SS]`, UTC; empty is none.
fn parse_time(s: &str) -> Result<Option<Timestamp>, &'static str> {
    let s = s.trim();
    if s.is_empty() {
        return Ok(None);
    }
    const BAD: &str = "use YYYY-MM-DD or YYYY-MM-DDTHH:MM (UTC)";
    let (date, time) = s.split_once(['T', ' ']).unwrap_or((s, "00:00"));
    let d: Vec<i64> = date.split('-').map(|x| x.parse::<i64>().map_err(|_| BAD)).collect::<Result<_, _>>()?;
    let t: Vec<i64> = time.split(':').map(|x| x.parse::<i64>().map_err(|_| BAD)).collect::<Result<_, _>>()?;
    let [y, mo, day] = d[..] else { return Err(BAD) };
    let (h, mi, sec) = match t[..] {
        [h, m] => (h, m, 0),
        [h, m, s] => (h, m, s),
        _ => return Err(BAD),
    };
    if !(1970..=9999).contains(&y)
        || !(1..=12).contains(&mo)
        || !(1..=31).contains(&day)
        || !(0..24).contains(&h)
        || !(0..60).contains(&mi)
        || !(0..60).contains(&sec)
    {
        return Err(BAD);
    }
    let days = voxgate_protocol::time::days_from_civil(y, mo, day);
    Ok(Some(Timestamp::from_micros((days * 86_400 + h * 3600 + mi * 60 + sec) * 1_000_000)))
}

#[derive(serde::Deserialize, Default)]
#[serde(default)]
pub(super) struct TimelineQuery {
    page: usize,
}

/// The events of a call the viewer may see, each with its offset in its log: from the offsets
/// the index recorded (to the call's end and an hour past it), or for a call the index does not
/// hold, the whole of its partitions. `None` when the call is unknown or foreign (they look the
/// same).
fn call_events(
    state: &AppState,
    c: &Console,
    who: crate::stages::tenancy::Principal,
    call: CallSid,
) -> Result<Option<CallEvents>, voxgate_storage::StorageError> {
    let log = &state.log;
    let mut audio_batches = 0u64;
    let row = c.index.call(call);
    if let Some(r) = &row {
        if !state.tenancy.may_access(who, r.tenant) {
            return Ok(None);
        }
    }
    let mut out = Vec::new();
    let stop = row.as_ref().and_then(|r| r.ended).map(|e| e.add_millis(3_600_000));
    for (ti, topic) in FOLLOWED.iter().enumerate() {
        let p = log.partition_of(topic, call.partition_key())?;
        let from = match &row {
            Some(r) => match r.first[ti] {
                Some(o) => o,
                // The index follows this log too: none of this call's events are in it.
                None => continue,
            },
            None => log.first_offset(topic, p)?,
        };
        let mut batch = Vec::new();
        let mut next = from;
        'scan: loop {
            batch.clear();
            let to = log.read(topic, p, next, 1024, &mut batch)?;
            if batch.is_empty() {
                break;
            }
            for r in &batch {
                if stop.is_some_and(|s| r.appended_at() > s) {
                    break 'scan;
                }
                // Other calls' records and audio batches are read by their header only.
                if let Some(h) = voxgate_protocol::peek_header(r.payload()) {
                    if h.call != Some(call) {
                        continue;
                    }
                    if h.variant == voxgate_protocol::MEDIA_BATCH_VARIANT {
                        audio_batches += 1;
                        continue;
                    }
                }
                if let Ok(env) = voxgate_protocol::decode(r.payload()) {
                    // Audio pieces of open segments are in the segments themselves.
                    if env.call == Some(call) && !matches!(env.payload, Event::SpeechProgress(_)) {
                        out.push((r.offset, Entry { topic, env, appended_at: r.appended_at() }));
                    }
                }
            }
            next = to;
        }
    }
    let Some(tenant) = out.first().map(|(_, e)| e.env.tenant) else { return Ok(None) };
    // Every event of a call carries its tenant: the first decides (and the index agreed above).
    if !state.tenancy.may_access(who, tenant) {
        return Ok(None);
    }
    out.retain(|(_, e)| e.env.tenant == tenant);
    out.sort_by_key(|(_, e)| e.env.occurred_at);
    Ok(Some(CallEvents { events: out, audio_batches }))
}

/// A call's events (each with its offset in its own log) and how many audio batches it has.
struct CallEvents {
    events: Vec<(u64, Entry)>,
    audio_batches: u64,
}

/// `GET /console/calls/{CA}`
pub(super) async fn timeline(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path(call): Path<String>,
    Query(tq): Query<TimelineQuery>,
) -> Response {
    let (c, v) = match viewer(&state, &headers, true) {
        Ok(x) => x,
        Err(r) => return r,
    };
    let Ok(call) = CallSid::parse(&call) else {
        return page_error(StatusCode::NOT_FOUND, "There is no such call.");
    };
    // A call the index does not hold means reading its logs' partitions whole: that costs, so a
    // tenant's such reads count against its REST throttle (guessing CallSids cannot load the node).
    if c.index.call(call).is_none() {
        if let Err(th) = state.tenancy.throttle(v.session.who, "console_call_scan") {
            metrics::counter!("voxgate_console_throttled_total").increment(1);
            return page_error(
                StatusCode::TOO_MANY_REQUESTS,
                &format!("Too many look-ups of calls not in the recent list; retry in {} s.", th.retry_after_secs),
            );
        }
    }
    let (st, c2, who) = (state.clone(), c.clone(), v.session.who);
    let events = tokio::task::spawn_blocking(move || call_events(&st, &c2, who, call)).await;
    let CallEvents { events, audio_batches } = match events {
        Ok(Ok(Some(x))) => x,
        Ok(Ok(None)) => {
            metrics::counter!("voxgate_console_not_found_total").increment(1);
            return page_error(StatusCode::NOT_FOUND, "There is no such call.");
        }
        Ok(Err(e)) => {
            return page_error(StatusCode::SERVICE_UNAVAILABLE, &format!("The event log could not be read: {e}"))
        }
        Err(_) => return page_error(StatusCode::INTERNAL_SERVER_ERROR, "The timeline could not be built."),
    };
    let row = c.index.call(call);
    let now = state.clock.now();
    let first = &events[0].1.env;
    let mut body = String::new();
    let (from, to, status, live) = match &row {
        Some(r) => (
            r.from.clone(),
            r.to.clone(),
            r.rejected.clone().map(|w| format!("rejected: {w}")).unwrap_or(r.status.clone()),
            r.live(),
        ),
        None => (String::new(), String::new(), "(not in the recent list)".to_owned(), false),
    };
    body.push_str(&format!(
        "<h1>Call <span id=\"call-sid\">{call}</span></h1><p class=\"meta\">tenant {} · from {} to {} · <span id=\"call-state\">{}</span> · started {} UTC{}</p>",
        first.tenant,
        esc(&from),
        esc(&to),
        esc(&status),
        esc(&when(first.occurred_at)),
        row.as_ref().map(|r| format!(" · {} s", r.duration_secs(now))).unwrap_or_default(),
    ));
    // The conversation: final transcripts from the log, then whatever the live feed adds.
    body.push_str(&format!("<section class=\"conversation\"><h2>Conversation{}</h2><ol id=\"conversation\" data-call=\"{call}\" data-live=\"{}\">", if live { " (live)" } else { "" }, if live { "1" } else { "0" }));
    for (_, e) in &events {
        if let Event::Transcript(t) = &e.env.payload {
            if t.rejected.is_some() || t.text.is_empty() {
                continue;
            }
            body.push_str(&format!(
                "<li class=\"line {}\" data-track=\"{}\" data-segment=\"{}\"><span class=\"party\">{}</span> <span class=\"text\">{}</span></li>",
                t.track.as_str(),
                t.track.as_str(),
                t.segment_index,
                t.track.party(),
                esc(&t.text)
            ));
        }
    }
    body.push_str("</ol></section>");
    // Every event, paged.
    let total = events.len();
    let start = tq.page.saturating_mul(TIMELINE_PAGE).min(total);
    body.push_str(&format!("<h2>Timeline</h2><p class=\"meta\">{total} events, and {audio_batches} audio batches of about 100 ms (not listed; <code>voxgate replay --call {call}</code> lists them)</p><table class=\"timeline\" id=\"timeline\"><thead><tr><th>Event time (UTC)</th><th>Log</th><th>Event</th><th>What</th></tr></thead><tbody>"));
    for (off, e) in &events[start..(start + TIMELINE_PAGE).min(total)] {
        let mut what = esc(&describe(&e.env.payload));
        match &e.env.payload {
            Event::SpeechSegment(s) => {
                what.push_str(&format!(
                    " <audio controls preload=\"none\" class=\"segment\" data-index=\"{}\" data-track=\"{}\" src=\"{}\"></audio>",
                    s.index,
                    s.track.as_str(),
                    esc(&c.link(&format!("/calls/{call}/segments/{off}")))
                ));
            }
            Event::AppExchange(x) => {
                what.push_str(&format!(
                    " <span class=\"sig\">signature from Twilio {}, signed for the app {}</span>",
                    if x.twilio_signature_valid { "valid" } else { "invalid" },
                    if x.signed_for_app { "yes" } else { "no" }
                ));
                if let Some(a) = &x.answer {
                    what.push_str(&format!("<details><summary>answer</summary><pre>{}</pre></details>", esc(a)));
                }
            }
            Event::GatewayAnswered(g) => {
                what.push_str(&format!(
                    "<details><summary>TwiML sent to Twilio</summary><pre>{}</pre></details>",
                    esc(&g.twiml)
                ));
            }
            Event::AppRequest(r) => {
                let params: String = r.params.iter().map(|(k, v)| format!("{}={}\n", esc(k), esc(v))).collect();
                what.push_str(&format!("<details><summary>parameters</summary><pre>{params}</pre></details>"));
            }
            _ => {}
        }
        body.push_str(&format!(
            "<tr class=\"ev {kind}\"><td>{at}</td><td>{log}</td><td>{kind}</td><td>{what}</td></tr>",
            at = esc(&clock_time(e.env.occurred_at)),
            log = e.topic,
            kind = e.env.payload.kind(),
        ));
    }
    body.push_str("</tbody></table>");
    body.push_str(&pager(&c, &format!("/calls/{call}"), "", tq.page, total, TIMELINE_PAGE));
    page(&c, Some(&v), &format!("Call {call}"), "Calls", &body)
}

/// `HH:MM:SS.mmm` (UTC) of an event: the page's header has the date.
fn clock_time(t: Timestamp) -> String {
    let s = t.to_string();
    s.get(11..23).map(str::to_owned).unwrap_or(s)
}

/// `GET /console/calls/{CA}/segments/{offset}`: one speech segment as a WAV file.
pub(super) async fn segment_wav(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path((call, offset)): Path<(String, String)>,
) -> Response {
    let (_, v) = match viewer(&state, &headers, false) {
        Ok(x) => x,
        Err(r) => return r,
    };
    let not_found = || (StatusCode::NOT_FOUND, "no such segment").into_response();
    let (Ok(call), Ok(offset)) = (CallSid::parse(&call), offset.trim_end_matches(".wav").parse::<u64>()) else {
        return not_found();
    };
    let log = state.log.clone();
    let read = tokio::task::spawn_blocking(move || {
        let p = log.partition_of(topics::SPEECH, call.partition_key())?;
        let mut out = Vec::new();
        log.read(topics::SPEECH, p, offset, 1, &mut out)?;
        Ok::<_, voxgate_storage::StorageError>(out.into_iter().next().filter(|r| r.offset == offset))
    })
    .await;
    let Ok(Ok(Some(rec))) = read else { return not_found() };
    let Ok(env) = voxgate_protocol::decode(rec.payload()) else { return not_found() };
    let Event::SpeechSegment(s) = &env.payload else { return not_found() };
    if env.call != Some(call) || !may_see(&state, &v, env.tenant) {
        metrics::counter!("voxgate_console_not_found_total").increment(1);
        return not_found();
    }
    let mut r = wav(s.sample_rate, &s.pcm16le).into_response();
    r.headers_mut().insert(header::CONTENT_TYPE, HeaderValue::from_static("audio/wav"));
    // Not even the browser keeps it: after sign-out, another account in the same browser must
    // not be served it from the cache.
    r.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    r
}

/// A mono 16-bit PCM WAV file.
pub(super) fn wav(rate: u32, pcm: &[u8]) -> Vec<u8> {
    let len = u32::try_from(pcm.len()).unwrap_or(u32::MAX) & !1;
    let mut out = Vec::with_capacity(44 + len as usize);
    out.extend_from_slice(b"RIFF");
    out.extend_from_slice(&(36 + len).to_le_bytes());
    out.extend_from_slice(b"WAVEfmt ");
    out.extend_from_slice(&16u32.to_le_bytes());
    out.extend_from_slice(&1u16.to_le_bytes());
    out.extend_from_slice(&1u16.to_le_bytes());
    out.extend_from_slice(&rate.to_le_bytes());
    out.extend_from_slice(&(rate * 2).to_le_bytes());
    out.extend_from_slice(&2u16.to_le_bytes());
    out.extend_from_slice(&16u16.to_le_bytes());
    out.extend_from_slice(b"data");
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(&pcm[..len as usize]);
    out
}

#[derive(serde::Deserialize, Default)]
#[serde(default)]
pub(super) struct EventsQuery {
    call: String,
}

/// `GET /console/events[?call=CA…]`: server-sent events. Without a call: `call` events (a row
/// of the list changed) of every account the viewer may see. With one: that call's `call`,
/// `transcript` and `partial` events. `resync` tells the page it missed some (reload).
pub(super) async fn events(
    State(state): State<AppState>,
    headers: HeaderMap,
    Query(eq): Query<EventsQuery>,
) -> Response {
    let (c, v) = match viewer(&state, &headers, false) {
        Ok(x) => x,
        Err(r) => return r,
    };
    let call = match eq.call.trim() {
        "" => None,
        s => match CallSid::parse(s) {
            Ok(c) => Some(c),
            Err(_) => return (StatusCode::BAD_REQUEST, "call: not a CallSid").into_response(),
        },
    };
    if let Some(call) = call {
        // Following a call needs access to it now; a call not indexed yet is refused.
        match c.index.call(call) {
            Some(r) if may_see(&state, &v, r.tenant) => {}
            _ => return (StatusCode::NOT_FOUND, "no such call").into_response(),
        }
    }
    metrics::gauge!("voxgate_console_streams").increment(1.0);
    let rx = c.index.subscribe();
    let who = v.session.who;
    let cookie = super::cookie_value(&headers);
    struct Follow {
        rx: tokio::sync::broadcast::Receiver<std::sync::Arc<super::index::Change>>,
        state: AppState,
        console: std::sync::Arc<Console>,
        cookie: Option<String>,
        who: crate::stages::tenancy::Principal,
        call: Option<CallSid>,
        access: HashMap<AccountSid, bool>,
        checked: std::time::Instant,
    }
    impl Drop for Follow {
        fn drop(&mut self) {
            metrics::gauge!("voxgate_console_streams").decrement(1.0);
        }
    }
    let f =
        Follow { rx, state, console: c, cookie, who, call, access: HashMap::new(), checked: std::time::Instant::now() };
    let stream = futures_util::stream::unfold(Some(f), |f| async move {
        let mut f = f?;
        loop {
            // A session that ended (sign-out, expiry) ends its streams.
            if f.checked.elapsed() > Duration::from_secs(10) {
                if f.console.sessions.get(f.cookie.as_deref()).is_err() {
                    return None;
                }
                f.checked = std::time::Instant::now();
            }
            match f.rx.recv().await {
                Ok(ch) => {
                    if let Some(call) = f.call {
                        if ch.call != call {
                            continue;
                        }
                    } else if ch.kind != "call" {
                        continue;
                    }
                    let (state, who) = (&f.state, f.who);
                    let ok = *f.access.entry(ch.tenant).or_insert_with(|| state.tenancy.may_access(who, ch.tenant));
                    if !ok {
                        continue;
                    }
                    let ev = SseEvent::default().event(ch.kind).data(ch.json.clone());
                    return Some((Ok::<_, Infallible>(ev), Some(f)));
                }
                Err(RecvError::Lagged(n)) => {
                    metrics::counter!("voxgate_console_stream_lagged_total").increment(n);
                    return Some((Ok(SseEvent::default().event("resync").data(n.to_string())), Some(f)));
                }
                Err(RecvError::Closed) => return None,
            }
        }
    });
    let mut r = Sse::new(stream).keep_alive(KeepAlive::new().interval(Duration::from_secs(15))).into_response();
    r.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    r.headers_mut().insert("x-accel-buffering", HeaderValue::from_static("no"));
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_parse_as_utc() {
        assert_eq!(parse_time(""), Ok(None));
        assert_eq!(parse_time("1970-01-02"), Ok(Some(Timestamp::from_micros(86_400_000_000))));
        assert_eq!(parse_time("1970-01-01T01:02"), Ok(Some(Timestamp::from_micros(3_720_000_000))));
        assert!(parse_time("yesterday").is_err());
        assert!(parse_time("2025-13-01").is_err());
        assert!(parse_time("2025-01-01T25:00").is_err());
    }

    #[test]
    fn a_wav_has_a_riff_header_and_the_samples() {
        let w = wav(16_000, &[1, 0, 2, 0]);
        assert_eq!(&w[..4], b"RIFF");
        assert_eq!(&w[8..16], b"WAVEfmt ");
        assert_eq!(u32::from_le_bytes([w[24], w[25], w[26], w[27]]), 16_000);
        assert_eq!(&w[44..], &[1, 0, 2, 0]);
    }
}
