//! The perimeter of the Twilio-facing endpoints: an optional allowlist of networks (Twilio's
//! published ranges, or a proxy's address) checked before anything else is read.

use std::net::{IpAddr, SocketAddr};

use axum::extract::{ConnectInfo, Request, State};
use axum::http::StatusCode;
use axum::middleware::Next;
use axum::response::Response;

use crate::ingress::{twilio_error, AppState};

/// The client address: the peer, or the first `X-Forwarded-For` entry when configured to trust it.
pub fn client_ip(req: &Request, trust_forwarded_for: bool) -> Option<IpAddr> {
    if trust_forwarded_for {
        let fwd = req
            .headers()
            .get("x-forwarded-for")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split(',').next())
            .and_then(|v| v.trim().parse::<IpAddr>().ok());
        if fwd.is_some() {
            return fwd;
        }
    }
    req.extensions().get::<ConnectInfo<SocketAddr>>().map(|c| c.0.ip())
}

/// Middleware: refuses requests from outside `twilio_allow_cidrs` (when set) with 403.
pub async fn twilio_allowlist(State(state): State<AppState>, req: Request, next: Next) -> Response {
    let allow = &state.cfg.twilio_allow;
    if allow.is_empty() {
        return next.run(req).await;
    }
    let ip = client_ip(&req, state.cfg.trust_forwarded_for);
    let ip = ip.map(|ip| match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
        v4 => v4,
    });
    if ip.is_some_and(|ip| allow.iter().any(|n| n.contains(&ip))) {
        return next.run(req).await;
    }
    metrics::counter!("voxgate_perimeter_refused_total").increment(1);
    tracing::warn!(client = ?ip, path = req.uri().path(), "request from outside twilio_allow_cidrs refused");
    twilio_error(StatusCode::FORBIDDEN, 20403, "this address may not reach the Twilio-facing endpoints")
}
