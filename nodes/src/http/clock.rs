//! The node's clock: the system clock, or — when the environment says `VOXGATE_TEST_CLOCK=manual`
//! — the system clock plus an offset that tests move forward (`POST /api/voice/test/clock` with
//! `AdvanceMs`), so a scenario can let a call last two minutes without waiting two minutes.
//! Decisions read event time from this clock only, so moving it is all a test needs. The route
//! exists only on a node started with that variable (the operator's environment, never a request).

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use voxgate_protocol::{Clock, SystemClock, Timestamp};

/// The system clock moved forward by an offset that only grows.
#[derive(Debug, Default)]
pub struct ManualClock {
    offset_us: AtomicI64,
}

impl ManualClock {
    /// Moves the clock forward by `ms` (never back).
    pub fn advance(&self, ms: i64) -> Timestamp {
        self.offset_us.fetch_add(ms.max(0).saturating_mul(1000), Ordering::AcqRel);
        self.now()
    }
}

impl Clock for ManualClock {
    fn now(&self) -> Timestamp {
        Timestamp(SystemClock.now().0.saturating_add(self.offset_us.load(Ordering::Acquire)))
    }
}

/// The clock the environment asks for, and the handle to move it when it is a manual one.
pub fn from_env() -> (Arc<dyn Clock>, Option<Arc<ManualClock>>) {
    match std::env::var("VOXGATE_TEST_CLOCK").as_deref() {
        Ok("manual") => {
            tracing::warn!("VOXGATE_TEST_CLOCK=manual: the clock can be moved forward over HTTP (tests only)");
            let c = Arc::new(ManualClock::default());
            (c.clone(), Some(c))
        }
        _ => (Arc::new(SystemClock), None),
    }
}

/// `POST /api/voice/test/clock` (`AdvanceMs=N`): moves the manual clock forward.
pub async fn advance(State(clock): State<Arc<ManualClock>>, body: axum::body::Bytes) -> Response {
    let ms = form_urlencoded::parse(&body).find(|(k, _)| k == "AdvanceMs").and_then(|(_, v)| v.parse::<i64>().ok());
    match ms {
        Some(ms) if ms >= 0 => {
            let now = clock.advance(ms);
            Json(serde_json::json!({ "now": now.to_string() })).into_response()
        }
        _ => crate::http::twilio_error(
            StatusCode::BAD_REQUEST,
            20422,
            "AdvanceMs: a whole number of milliseconds, at least 0",
        ),
    }
}
