//! Fraud and spend: blocked numbers (blocked and unblocked here with the admin token), recent
//! fraud verdicts with their evidence, and each account's usage this month against its budget,
//! with its invoice lines and usage triggers, drawn as inline SVG bars.

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::Response;
use voxgate_actors::billing::Month;
use voxgate_protocol::AccountSid;

use super::{change, esc, field, page, page_error, redirect, viewer, when, Viewer};
use crate::http::AppState;

/// The accounts the viewer may see, oldest first: every account for the operator, a tenant's
/// own and its subaccounts otherwise.
fn accounts(state: &AppState, v: &Viewer) -> Vec<(AccountSid, String)> {
    let who = v.session.who;
    let mut all: Vec<(AccountSid, String, voxgate_protocol::Timestamp)> =
        state.tenancy.read(|d| d.tenants().map(|t| (t.sid, t.friendly_name.clone(), t.created_at)).collect());
    all.sort_by_key(|(sid, _, at)| (*at, *sid));
    all.into_iter().filter(|(sid, _, _)| state.tenancy.may_access(who, *sid)).map(|(s, n, _)| (s, n)).collect()
}

/// `GET /console/fraud`
pub(super) async fn fraud(State(state): State<AppState>, headers: HeaderMap) -> Response {
    let (c, v) = match viewer(&state, &headers, true) {
        Ok(x) => x,
        Err(r) => return r,
    };
    let now = state.clock.now();
    let mine = accounts(&state, &v);
    let mut body = String::from("<h1>Fraud</h1><h2>Blocked numbers</h2>");
    body.push_str("<table class=\"blocks\" id=\"blocks\"><thead><tr><th>Tenant</th><th>Number</th><th>Reason</th><th>Since</th><th>Until</th><th></th></tr></thead><tbody>");
    let mut any = false;
    for (sid, _) in &mine {
        let blocks: Vec<(String, voxgate_actors::tenancy::directory::Block)> = state.tenancy.read(|d| {
            d.blocks_of(*sid)
                .filter(|(_, b)| b.until.is_none_or(|u| now < u))
                .map(|(n, b)| (n.clone(), b.clone()))
                .collect()
        });
        for (number, b) in blocks {
            any = true;
            let unblock = if v.admin() {
                format!(
                    "<form method=\"post\" action=\"{}\" class=\"inline\"><input type=\"hidden\" name=\"csrf\" value=\"{}\"><input type=\"hidden\" name=\"tenant\" value=\"{sid}\"><input type=\"hidden\" name=\"number\" value=\"{}\"><button class=\"unblock\">Unblock</button></form>",
                    esc(&c.link("/fraud/unblock")),
                    esc(&v.session.csrf),
                    esc(&number)
                )
            } else {
                String::new()
            };
            body.push_str(&format!(
                "<tr data-number=\"{n}\"><td>{sid}</td><td>{n}</td><td>{}</td><td>{}</td><td>{}</td><td>{unblock}</td></tr>",
                esc(&b.reason),
                esc(&when(b.since)),
                b.until.map(|u| esc(&when(u))).unwrap_or_else(|| "—".into()),
                n = esc(&number),
            ));
        }
    }
    body.push_str("</tbody></table>");
    if !any {
        body.push_str("<p class=\"empty\">No numbers are blocked.</p>");
    }
    if v.admin() {
        let options: String =
            mine.iter().map(|(s, n)| format!("<option value=\"{s}\">{} ({s})</option>", esc(n))).collect();
        body.push_str(&format!(
            "<form method=\"post\" action=\"{}\" class=\"search\" id=\"block\"><input type=\"hidden\" name=\"csrf\" value=\"{}\"><select name=\"tenant\">{options}</select>\
<input name=\"number\" placeholder=\"+15551234567\" maxlength=\"20\" required><input name=\"reason\" placeholder=\"reason\" maxlength=\"200\"><input name=\"hours\" type=\"number\" min=\"0\" max=\"8760\" placeholder=\"hours (empty: until unblocked)\"><button>Block</button></form>",
            esc(&c.link("/fraud/block")),
            esc(&v.session.csrf)
        ));
    } else {
        body.push_str("<p class=\"hint\">Blocking and unblocking numbers needs the admin token.</p>");
    }
    body.push_str("<h2>Recent verdicts</h2><table class=\"verdicts\" id=\"verdicts\"><thead><tr><th>Time</th><th>Tenant</th><th>Call</th><th>Severity</th><th>Evidence</th></tr></thead><tbody>");
    let verdicts = c.index.verdicts(200, |r| state.tenancy.may_access(v.session.who, r.tenant));
    for r in &verdicts {
        let evidence: String =
            r.hits.iter().map(|(rule, ev)| format!("<li><b>{}</b>: {}</li>", esc(rule), esc(ev))).collect();
        body.push_str(&format!(
            "<tr class=\"{sev}\"><td>{}</td><td>{}</td><td>{}</td><td>{sev}</td><td><ul>{evidence}</ul>{}</td></tr>",
            esc(&when(r.at)),
            r.tenant,
            r.call
                .map(|call| format!("<a href=\"{}\">{call}</a>", esc(&c.link(&format!("/calls/{call}")))))
                .unwrap_or_default(),
            r.blocked_number.as_ref().map(|n| format!("<p>blocked {}</p>", esc(n))).unwrap_or_default(),
            sev = esc(&r.severity),
        ));
    }
    body.push_str("</tbody></table>");
    if verdicts.is_empty() {
        body.push_str("<p class=\"empty\">No verdicts yet.</p>");
    }
    page(&c, Some(&v), "Fraud", "Fraud", &body)
}

type BlockChange = (std::sync::Arc<super::Console>, AccountSid, Vec<(String, String)>);

/// A block-list change: the operator's, with a valid CSRF token, naming an account.
fn block_change(state: &AppState, headers: &HeaderMap, body: &[u8], what: &str) -> Result<BlockChange, Response> {
    let (c, v, f) = change(state, headers, body)?;
    if !v.admin() {
        return Err(page_error(StatusCode::FORBIDDEN, &format!("{what} numbers needs the admin token.")));
    }
    let Some(tenant) = field(&f, "tenant").and_then(|t| AccountSid::parse(t).ok()) else {
        return Err(page_error(StatusCode::BAD_REQUEST, "tenant: not an AccountSid"));
    };
    Ok((c, tenant, f))
}

/// `POST /console/fraud/block` (admin)
pub(super) async fn block(State(state): State<AppState>, headers: HeaderMap, body: Bytes) -> Response {
    let (c, tenant, f) = match block_change(&state, &headers, &body, "Blocking") {
        Ok(x) => x,
        Err(r) => return r,
    };
    let number = field(&f, "number").unwrap_or_default().trim().to_owned();
    let reason = match field(&f, "reason").map(str::trim) {
        Some(r) if !r.is_empty() => r.to_owned(),
        _ => "blocked by the operator in the console".to_owned(),
    };
    let until = match field(&f, "hours").map(str::trim).filter(|h| !h.is_empty()) {
        None => None,
        Some(h) => match h.parse::<u32>() {
            Ok(h) if h <= 8760 => Some(state.clock.now().add_millis(i64::from(h) * 3_600_000)),
            _ => return page_error(StatusCode::BAD_REQUEST, "hours: a whole number up to 8760"),
        },
    };
    if let Err(e) = state.tenancy.command(tenant, |d| d.block_caller(tenant, &number, &reason, until)).await {
        return page_error(StatusCode::BAD_REQUEST, &e.to_string());
    }
    tracing::info!(tenant = %tenant, number = %number, "console: number blocked by the operator");
    redirect(&c.link("/fraud"))
}

/// `POST /console/fraud/unblock` (admin)
pub(super) async fn unblock(State(state): State<AppState>, headers: HeaderMap, body: Bytes) -> Response {
    let (c, tenant, f) = match block_change(&state, &headers, &body, "Unblocking") {
        Ok(x) => x,
        Err(r) => return r,
    };
    let number = field(&f, "number").unwrap_or_default().to_owned();
    if let Err(e) = state.tenancy.command(tenant, |d| d.unblock_caller(tenant, &number)).await {
        return page_error(StatusCode::BAD_REQUEST, &e.to_string());
    }
    tracing::info!(tenant = %tenant, number = %number, "console: number unblocked by the operator");
    redirect(&c.link("/fraud"))
}

/// Dollars and cents, or to the hundredth of a cent when cents would hide the amount.
fn dollars(micros: u64) -> String {
    if micros.is_multiple_of(10_000) || micros >= 100_000_000 {
        format!("${}.{:02}", micros / 1_000_000, (micros % 1_000_000) / 10_000)
    } else {
        format!("${}.{:04}", micros / 1_000_000, (micros % 1_000_000) / 100)
    }
}

/// A horizontal bar: `value` of `max`, with a budget mark when there is one.
fn bar(value: u64, max: u64, budget: Option<u64>) -> String {
    const W: u64 = 300;
    let scale = |x: u64| (x.min(max) * W).checked_div(max).unwrap_or(0);
    let over = budget.is_some_and(|b| value >= b);
    let mark = budget
        .map(|b| format!("<line x1=\"{x}\" x2=\"{x}\" y1=\"0\" y2=\"18\" class=\"budget\"/>", x = scale(b)))
        .unwrap_or_default();
    format!(
        "<svg class=\"bar\" width=\"{W}\" height=\"18\" role=\"img\" aria-label=\"{} of {}\"><rect x=\"0\" y=\"3\" width=\"{W}\" height=\"12\" class=\"track\"/><rect x=\"0\" y=\"3\" width=\"{}\" height=\"12\" class=\"{}\"/>{mark}</svg>",
        dollars(value),
        budget.map(dollars).unwrap_or_else(|| "no budget".into()),
        scale(value),
        if over { "fill over" } else { "fill" },
    )
}

/// `GET /console/spend`
pub(super) async fn spend(State(state): State<AppState>, headers: HeaderMap) -> Response {
    let (c, v) = match viewer(&state, &headers, true) {
        Ok(x) => x,
        Err(r) => return r,
    };
    let month = Month::of(state.clock.now());
    let mine = accounts(&state, &v);
    let rows: Vec<_> = {
        let books = state.billing.read();
        mine.iter()
            .map(|(sid, name)| {
                let inv = books.usage.invoice(*sid, month);
                let budget = books.triggers.budget(*sid);
                let triggers: Vec<String> = books
                    .triggers
                    .list(*sid)
                    .into_iter()
                    .map(|t| {
                        format!(
                            "<li>{} {} {} ≥ {} (now {}){}</li>",
                            esc(&t.friendly_name),
                            t.usage_category.as_str(),
                            t.trigger_by.as_str(),
                            esc(&t.trigger_value()),
                            esc(&t.current_value()),
                            t.date_fired.map(|d| format!(", fired {}", esc(&when(d)))).unwrap_or_default()
                        )
                    })
                    .collect();
                (*sid, name.clone(), inv, budget, triggers)
            })
            .collect()
    };
    let max = rows.iter().map(|(_, _, inv, b, _)| inv.total_micros.max(b.unwrap_or(0))).max().unwrap_or(0).max(1);
    let mut body = format!("<h1>Spend</h1><p class=\"meta\">Usage this month ({month}), priced, against each account's monthly budget (the line).</p>");
    body.push_str("<table class=\"spend\" id=\"spend\"><thead><tr><th>Account</th><th>Spent</th><th>Budget</th><th></th><th>Lines</th><th>Triggers</th></tr></thead><tbody>");
    for (sid, name, inv, budget, triggers) in &rows {
        let line_max = inv.lines.iter().map(|l| l.price_micros).max().unwrap_or(0).max(1);
        let lines: String = inv
            .lines
            .iter()
            .filter(|l| l.count > 0 || l.price_micros > 0)
            .map(|l| {
                format!(
                    "<li>{} · {} {} · {} {}</li>",
                    esc(l.description),
                    l.usage,
                    l.usage_unit,
                    dollars(l.price_micros),
                    bar(l.price_micros, line_max, None)
                )
            })
            .collect();
        body.push_str(&format!(
            "<tr data-account=\"{sid}\"><td>{} <small>{sid}</small></td><td class=\"spent\">{}</td><td>{}</td><td>{}</td><td><ul>{lines}</ul></td><td><ul>{}</ul></td></tr>",
            esc(name),
            dollars(inv.total_micros),
            budget.map(dollars).unwrap_or_else(|| "—".into()),
            bar(inv.total_micros, max, *budget),
            triggers.join(""),
        ));
    }
    body.push_str("</tbody></table>");
    page(&c, Some(&v), "Spend", "Spend", &body)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn money_reads_as_dollars_and_cents() {
        assert_eq!(dollars(0), "$0.00");
        assert_eq!(dollars(12_340_000), "$12.34");
        assert_eq!(dollars(12_345_678), "$12.3456");
        assert_eq!(dollars(8_500), "$0.0085");
    }

    #[test]
    fn a_bar_over_budget_is_marked() {
        assert!(bar(10, 10, Some(5)).contains("fill over"));
        assert!(!bar(1, 10, Some(5)).contains("over"));
        assert!(bar(0, 0, None).contains("width=\"0\""));
    }
}
