//! The HTTP surface: what Twilio, tenants and operators reach on the main listener, and the
//! requests voxgate itself makes (to Twilio's REST API, to customers' apps and callbacks).
//!
//! - `server`: the listener (HTTP/1 and TLS, timeouts, connection caps, body reading).
//! - `ingress`: Twilio's voice webhook and status callback; `stream`: Media Streams WebSockets;
//!   `gateway`: gateway mode (the customer's app answers through voxgate).
//! - `accounts`: the Twilio-shaped REST API for tenants; `health`, `perimeter` (allow-lists, the
//!   limits on unauthenticated traffic), `clock` (the test clock's route).
//! - `console`: the web console at `/console` (sign-in, live calls, timelines, the inspector,
//!   fraud and spend).
//! - `twilio_rest`: voxgate's client of Twilio's REST API; `outbound`: where voxgate may send a
//!   request on a tenant's behalf.
//!
//! [`AppState`] is what every handler shares; [`router`] puts the routes together.

pub mod accounts;
pub mod clock;
pub mod console;
pub mod gateway;
pub mod health;
pub mod ingress;
pub mod outbound;
pub mod perimeter;
pub mod server;
pub mod stream;
pub mod twilio_rest;

use std::sync::Arc;
use std::time::Instant;

use axum::extract::Request;
use axum::http::{StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use ractor::ActorRef;
use serde_json::json;
use voxgate_actors::call::SupervisorMsg;
use voxgate_protocol::Clock;
use voxgate_storage::Log;

use crate::config::Config;
use crate::http::health::Health;
use crate::stages::tenancy::Tenancy;

/// Largest webhook body accepted (Twilio's are a few KB).
pub const MAX_WEBHOOK_BODY: usize = 64 * 1024;

/// What every handler shares.
#[derive(Clone)]
pub struct AppState {
    pub cfg: Arc<Config>,
    pub log: Log,
    pub clock: Arc<dyn Clock>,
    pub supervisor: ActorRef<SupervisorMsg>,
    pub health: Arc<Health>,
    pub tenancy: Arc<Tenancy>,
    pub billing: Arc<crate::stages::billing::Billing>,
    /// Where call actors run, and how to reach them.
    pub calls: crate::stages::calls::Calls,
    /// The clock tests move forward (`VOXGATE_TEST_CLOCK=manual` only).
    pub test_clock: Option<Arc<crate::http::clock::ManualClock>>,
    /// Gateway mode's side toward the customers' apps.
    pub app: Arc<crate::http::gateway::App>,
    /// The console (`None` when `[console] enabled = false`).
    pub console: Option<Arc<crate::http::console::Console>>,
}

/// The routes Twilio and operators reach on the main listener.
pub fn router(state: AppState) -> Router {
    let twilio = Router::new()
        .route("/api/voice/twilio/inbound", post(ingress::inbound))
        .route("/api/voice/twilio/status", post(ingress::status))
        .route("/api/voice/twilio/stream/{session}", get(crate::http::stream::upgrade))
        .layer(axum::middleware::from_fn_with_state(state.clone(), crate::http::perimeter::twilio_allowlist));
    let mut twilio = twilio;
    if let Some(c) = state.test_clock.clone() {
        twilio = twilio.route("/api/voice/test/clock", post(crate::http::clock::advance).with_state(c));
    }
    let console = if state.console.is_some() { crate::http::console::routes() } else { Router::new() };
    Router::new()
        .merge(twilio)
        .merge(console)
        .route("/api/voice/health", get(crate::http::health::health))
        .route("/2010-04-01/{*path}", axum::routing::any(crate::http::accounts::api))
        .fallback(not_found)
        .layer(axum::extract::DefaultBodyLimit::max(MAX_WEBHOOK_BODY))
        .layer(axum::middleware::from_fn_with_state(
            (state.cfg.http.body_timeout(), MAX_WEBHOOK_BODY),
            crate::http::server::read_body,
        ))
        .layer(axum::middleware::from_fn(observe))
        .with_state(state)
}

/// Records `http_request_duration_seconds{endpoint}` for every request.
async fn observe(req: Request, next: axum::middleware::Next) -> Response {
    let endpoint = endpoint_label(req.uri().path());
    let started = Instant::now();
    let resp = next.run(req).await;
    metrics::histogram!("http_request_duration_seconds", "endpoint" => endpoint, "status" => resp.status().as_str().to_owned())
        .record(started.elapsed().as_secs_f64());
    resp
}

fn endpoint_label(path: &str) -> &'static str {
    match path {
        "/api/voice/twilio/inbound" => "inbound",
        "/api/voice/twilio/status" => "status",
        "/api/voice/health" => "health",
        p if p.starts_with("/api/voice/twilio/stream/") => "stream",
        p if p.starts_with("/2010-04-01/") => crate::http::accounts::endpoint_of(p),
        p if p.starts_with("/console/events") => "console_events",
        p if p.starts_with("/console") => "console",
        _ => "other",
    }
}

/// A Twilio-shaped JSON error: `{code, message, more_info, status}`.
pub fn twilio_error(status: StatusCode, code: u32, message: impl Into<String>) -> Response {
    let body = json!({
        "code": code,
        "message": message.into(),
        "more_info": format!("https://www.twilio.com/docs/errors/{code}"),
        "status": status.as_u16(),
    });
    (status, Json(body)).into_response()
}

async fn not_found(uri: Uri) -> Response {
    twilio_error(StatusCode::NOT_FOUND, 20404, format!("the requested resource {} was not found", uri.path()))
}
