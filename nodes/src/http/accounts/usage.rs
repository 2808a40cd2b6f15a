//! `Usage/Records`, `Usage/Triggers` and voxgate's `Invoices`: what an account used and spent,
//! and the triggers that call back when it crosses a threshold.

use axum::http::{Method, StatusCode};
use serde_json::{json, Value};
use voxgate_actors::billing::{
    CallbackMethod, Category, NewTrigger, Recurring, Trigger, TriggerBy, TriggerError, TriggerSid,
};
use voxgate_protocol::event::{UsageTriggerDeleted, UsageTriggerUpdated};
use voxgate_protocol::Event;
use voxgate_protocol::{AccountSid, EventId};

use super::{page, ApiError, Params, Request, Resource, API};
use crate::http::AppState;
use crate::stages::tenancy::random_u128;

pub(super) async fn handle(cx: &Request<'_>, method: &Method, res: Resource) -> Result<(StatusCode, Value), ApiError> {
    let (state, _t, params, _admin, _who, path) = (cx.state, &cx.state.tenancy, &cx.params, cx.admin, cx.who, cx.path);
    match (method.clone(), res) {
        (Method::GET, Resource::UsageRecords(a, sub)) => usage_records(state, a, sub, params),
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
            page(items, "usage_triggers", &format!("{API}/Accounts/{a}/Usage/Triggers.json"), params)
        }
        (Method::POST, Resource::Triggers(a)) => {
            let new = new_trigger(a, params)?;
            check_callback_url(state, &new.callback_url).await?;
            let sid = new.sid;
            state
                .billing
                .command(a, EventId(random_u128()), |b, now| {
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
                .command(a, EventId(random_u128()), |b, _| {
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
                .command(a, EventId(random_u128()), |b, _| {
                    b.triggers.get(a, sid).ok_or(TriggerError::NotFound(sid))?;
                    Ok(Event::UsageTriggerDeleted(UsageTriggerDeleted { sid: sid.to_string() }))
                })
                .await?;
            Ok((StatusCode::NO_CONTENT, Value::Null))
        }
        (m, _) => Err(ApiError::method_not_allowed(&m, path)),
    }
}

/// Usage record sub-resources: path name and `subresource_uris` key.
pub(super) const USAGE_SUBRESOURCES: [(&str, &str); 8] = [
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
pub(super) fn usage_records(
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
pub(super) async fn check_callback_url(state: &AppState, url: &str) -> Result<(), ApiError> {
    crate::http::outbound::check_url(url, state.cfg.allow_private_callbacks).await.map_err(|e| {
        metrics::counter!("voxgate_outbound_refused_total", "reason" => "at_creation").increment(1);
        ApiError::invalid("CallbackUrl", e)
    })
}

/// `POST …/Usage/Triggers.json`'s parameters as a trigger to create.
pub(super) fn new_trigger(a: AccountSid, params: &Params) -> Result<NewTrigger, ApiError> {
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
pub(super) fn invoice_json(inv: &voxgate_actors::billing::Invoice) -> Value {
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
pub(super) fn trigger_json(t: &Trigger) -> Value {
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
