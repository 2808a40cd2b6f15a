//! voxgate's own `SpeechHints`: the words and phrases an account's callers are likely to say
//! (names, products, jargon), given to Whisper as its initial prompt for every call of the
//! account from then on, as Twilio's `hints` does for one transcription. The account itself, its
//! parent or the operator sets them; `Hints` empty clears them.

use axum::http::{Method, StatusCode};
use serde_json::{json, Value};
use voxgate_protocol::AccountSid;

use super::{ApiError, Request, Resource, API};
use crate::http::AppState;

pub(super) async fn handle(cx: &Request<'_>, method: &Method, res: Resource) -> Result<(StatusCode, Value), ApiError> {
    let Resource::SpeechHints(a) = res else {
        return Err(ApiError::not_found(cx.path));
    };
    match *method {
        Method::GET => Ok((StatusCode::OK, hints_json(cx.state, a))),
        Method::POST => {
            let hints = cx.params.get("Hints").ok_or_else(|| ApiError::invalid("Hints", "is required"))?;
            cx.state.tenancy.command(a, |d| d.set_hints(a, hints)).await?;
            Ok((StatusCode::OK, hints_json(cx.state, a)))
        }
        ref m => Err(ApiError::method_not_allowed(m, cx.path)),
    }
}

fn hints_json(state: &AppState, a: AccountSid) -> Value {
    let hints = state.tenancy.read(|d| d.tenant(a).map(|t| t.hints.clone())).unwrap_or_default();
    json!({
        "account_sid": a.to_string(),
        "hints": hints,
        "uri": format!("{API}/Accounts/{a}/SpeechHints.json"),
    })
}
