//! The webhook inspector: recent exchanges between voxgate and the customers' apps, newest first,
//! filtered by status, tenant or number; one exchange whole (the request's parameters, the
//! answer); and re-sending a recorded request to the app, signed with the tenant's token, with the
//! new answer shown beside the old.

use axum::body::Bytes;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use voxgate_protocol::EventId;

use super::index::ExchangeRow;
use super::{change, esc, may_see, page, page_error, viewer, when, Console, Viewer};
use crate::http::AppState;

#[derive(serde::Deserialize, Default)]
#[serde(default)]
pub(super) struct ListQuery {
    /// `ok` (2xx), `error` (an error code or no 2xx), or an HTTP status.
    status: String,
    tenant: String,
    /// Part of the call's From or To.
    number: String,
}

const SHOWN: usize = 200;

/// `GET /console/inspector`
pub(super) async fn list(State(state): State<AppState>, headers: HeaderMap, Query(lq): Query<ListQuery>) -> Response {
    let (c, v) = match viewer(&state, &headers, true) {
        Ok(x) => x,
        Err(r) => return r,
    };
    let tenant = match super::tenant_filter(&lq.tenant) {
        Ok(t) => t,
        Err(r) => return r,
    };
    let status = lq.status.trim().to_owned();
    let number: String = lq.number.chars().filter(|c| c.is_ascii_digit() || *c == '+').collect();
    let mut access = std::collections::HashMap::new();
    let rows = c.index.exchanges(SHOWN, |x, call| {
        if tenant.is_some_and(|t| t != x.tenant) {
            return false;
        }
        let ok = x.x.error_code.is_none() && x.x.status.is_some_and(|s| (200..300).contains(&s));
        let keep_status = match status.as_str() {
            "" => true,
            "ok" => ok,
            "error" => !ok,
            s => x.x.status.map(|st| st.to_string()).as_deref() == Some(s),
        };
        if !keep_status {
            return false;
        }
        if !number.is_empty() && !call.is_some_and(|r| r.from.contains(&number) || r.to.contains(&number)) {
            return false;
        }
        *access.entry(x.tenant).or_insert_with(|| state.tenancy.may_access(v.session.who, x.tenant))
    });
    let mut body = format!(
        "<h1>Inspector</h1><p class=\"meta\">The requests voxgate sent the apps and what they answered, newest first (the last {} kept).</p>\
<form method=\"get\" action=\"{}\" class=\"search\" id=\"filter\"><select name=\"status\"><option value=\"\">any status</option><option value=\"ok\"{}>answered 2xx</option><option value=\"error\"{}>failed</option></select>\
<input name=\"tenant\" value=\"{}\" placeholder=\"AC… (tenant)\" maxlength=\"34\"><input name=\"number\" value=\"{}\" placeholder=\"number\" maxlength=\"20\"><button>Filter</button></form>",
        SHOWN,
        esc(&c.link("/inspector")),
        if status == "ok" { " selected" } else { "" },
        if status == "error" { " selected" } else { "" },
        esc(&lq.tenant),
        esc(&lq.number),
    );
    body.push_str("<table class=\"exchanges\" id=\"exchanges\"><thead><tr><th>Time</th><th>Call</th><th>Purpose</th><th>Request</th><th>Answer</th><th>Latency</th><th>Signatures</th><th></th></tr></thead><tbody>");
    for x in &rows {
        body.push_str(&exchange_row(&c, x));
    }
    body.push_str("</tbody></table>");
    if rows.is_empty() {
        body.push_str("<p class=\"empty\">No exchanges match.</p>");
    }
    page(&c, Some(&v), "Inspector", "Inspector", &body)
}

fn answer_label(x: &ExchangeRow) -> String {
    let mut s = x.x.status.map(|s| format!("HTTP {s}")).unwrap_or_else(|| "no answer".into());
    if let Some(code) = x.x.error_code {
        s.push_str(&format!(" · error {code}"));
    }
    if let Some(cache) = &x.x.cache {
        s.push_str(&format!(" · cache {cache}"));
    }
    s
}

fn exchange_row(c: &Console, x: &ExchangeRow) -> String {
    let ok = x.x.error_code.is_none() && x.x.status.is_some_and(|s| (200..300).contains(&s));
    format!(
        "<tr class=\"{cls}\" data-id=\"{id}\"><td>{at}</td><td><a href=\"{call_href}\">{call}</a></td><td>{purpose}</td><td>{method} {url}</td><td>{answer}</td><td>{ms} ms</td><td>{sig}</td><td><a class=\"open\" href=\"{href}\">open</a></td></tr>",
        cls = if ok { "ok" } else { "failed" },
        id = x.id,
        at = esc(&when(x.at)),
        call_href = esc(&c.link(&format!("/calls/{}", x.call))),
        call = x.call,
        purpose = x.x.purpose.as_str(),
        method = x.x.method.as_str(),
        url = esc(&x.x.url),
        answer = esc(&answer_label(x)),
        ms = x.x.latency_ms,
        sig = signatures(x),
        href = esc(&c.link(&format!("/inspector/{}", x.id))),
    )
}

fn signatures(x: &ExchangeRow) -> &'static str {
    match (x.x.twilio_signature_valid, x.x.signed_for_app) {
        (true, true) => "Twilio's valid · signed for the app",
        (true, false) => "Twilio's valid · not signed",
        (false, _) => "Twilio's invalid",
    }
}

/// The exchange `id`, when the viewer may see it; `None` looks like a missing one.
fn visible(state: &AppState, c: &Console, v: &Viewer, id: &str) -> Option<ExchangeRow> {
    let id = id.strip_prefix("EV").filter(|h| h.len() == 32).and_then(|h| u128::from_str_radix(h, 16).ok())?;
    c.index.exchange(EventId(id)).filter(|x| may_see(state, v, x.tenant))
}

/// `GET /console/inspector/{EV…}`
pub(super) async fn detail(State(state): State<AppState>, headers: HeaderMap, Path(id): Path<String>) -> Response {
    let (c, v) = match viewer(&state, &headers, true) {
        Ok(x) => x,
        Err(r) => return r,
    };
    let Some(x) = visible(&state, &c, &v, &id) else {
        metrics::counter!("voxgate_console_not_found_total").increment(1);
        return page_error(StatusCode::NOT_FOUND, "There is no such exchange.");
    };
    let mut body = format!(
        "<h1>Exchange</h1><p class=\"meta\">{} UTC · call <a href=\"{}\">{}</a> · tenant {} · attempt {} · {} ms · {}</p>",
        esc(&when(x.at)),
        esc(&c.link(&format!("/calls/{}", x.call))),
        x.call,
        x.tenant,
        x.x.attempt,
        x.x.latency_ms,
        signatures(&x),
    );
    body.push_str(&request_html(&x));
    body.push_str(&format!(
        "<h2>Answer</h2><p id=\"old-status\">{}</p>{}<pre id=\"old-answer\">{}</pre>",
        esc(&answer_label(&x)),
        x.x.error.as_ref().map(|e| format!("<p class=\"error\">{}</p>", esc(e))).unwrap_or_default(),
        esc(x.x.answer.as_deref().unwrap_or("(not recorded)"))
    ));
    if x.request.is_some() {
        body.push_str(&format!(
            "<form method=\"post\" action=\"{}\" id=\"resend\"><input type=\"hidden\" name=\"csrf\" value=\"{}\"><button id=\"resend-button\">Send this request to the app again</button></form>",
            esc(&c.link(&format!("/inspector/{}/resend", x.id))),
            esc(&v.session.csrf)
        ));
    } else {
        body.push_str("<p class=\"hint\">This exchange's parameters were not recorded (transcription callbacks, or an exchange from before requests were kept), so it cannot be sent again.</p>");
    }
    page(&c, Some(&v), "Exchange", "Inspector", &body)
}

fn request_html(x: &ExchangeRow) -> String {
    match &x.request {
        Some(r) => {
            let params: String =
                r.params.iter().map(|(k, v)| format!("<tr><td>{}</td><td>{}</td></tr>", esc(k), esc(v))).collect();
            format!(
                "<h2>Request</h2><p><code>{} {}</code> ({})</p><table class=\"params\" id=\"params\"><tbody>{params}</tbody></table>",
                r.method.as_str(),
                esc(&r.url),
                r.purpose.as_str()
            )
        }
        None => format!("<h2>Request</h2><p><code>{} {}</code></p>", x.x.method.as_str(), esc(&x.x.url)),
    }
}

/// `POST /console/inspector/{EV…}/resend`
pub(super) async fn resend(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path(id): Path<String>,
    body: Bytes,
) -> Response {
    let (c, v, _) = match change(&state, &headers, &body) {
        Ok(x) => x,
        Err(r) => return r,
    };
    let Some(x) = visible(&state, &c, &v, &id) else {
        return page_error(StatusCode::NOT_FOUND, "There is no such exchange.");
    };
    let Some(req) = x.request.clone() else {
        return page_error(
            StatusCode::CONFLICT,
            "This exchange's parameters were not recorded; it cannot be sent again.",
        );
    };
    // Signed with the tenant's token now (a rotated token signs with the new one, as Twilio would).
    let Some(token) = state.tenancy.read(|d| d.tenant(x.tenant).map(|t| t.auth_token.clone())) else {
        return page_error(StatusCode::NOT_FOUND, "The tenant no longer exists.");
    };
    let f = state.app.resend(x.tenant, token.expose(), req.method, &req.url, &req.params).await;
    metrics::counter!("voxgate_console_resends_total", "outcome" => if f.error.is_none() { "answered" } else { "failed" }).increment(1);
    tracing::info!(call_sid = %x.call, tenant = %x.tenant, url = %req.url, status = ?f.status, who = %v.label(), "console re-sent a request to the app");
    let new_status = {
        let mut s = f.status.map(|s| format!("HTTP {s}")).unwrap_or_else(|| "no answer".into());
        if let Some((code, why)) = &f.error {
            s.push_str(&format!(" · error {code}: {why}"));
        }
        s
    };
    let mut body = format!(
        "<h1>Re-sent</h1><p class=\"meta\">call <a href=\"{}\">{}</a> · {} {} · {} ms</p>",
        esc(&c.link(&format!("/calls/{}", x.call))),
        x.call,
        req.method.as_str(),
        esc(&req.url),
        f.latency.as_millis()
    );
    body.push_str(&format!(
        "<div class=\"compare\"><section><h2>Then ({} UTC)</h2><p id=\"old-status\">{}</p><pre id=\"old-answer\">{}</pre></section><section><h2>Now</h2><p id=\"new-status\">{}</p><pre id=\"new-answer\">{}</pre></section></div>",
        esc(&when(x.at)),
        esc(&answer_label(&x)),
        esc(x.x.answer.as_deref().unwrap_or("(not recorded)")),
        esc(&new_status),
        esc(f.body.as_deref().unwrap_or("")),
    ));
    body.push_str(&request_html(&x));
    page(&c, Some(&v), "Re-sent", "Inspector", &body)
}
