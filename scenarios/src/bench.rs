//! Small helpers for the bench binaries: medians and percentiles, and recorded call traffic.

use std::time::Duration;

use voxgate_protocol::event::{CallReceived, CallStatus, CallStatusChanged, Direction, Event, StatusSource};
use voxgate_protocol::{AccountSid, CallSid, Envelope, EventId, Timestamp};

/// One recorded call as the calls log holds it: received at `at` (µs), in progress half a second
/// later, completed after `secs` — three envelopes with ids derived from `id_kind` and the call.
#[allow(clippy::too_many_arguments)]
pub fn call_events(
    id_kind: u64,
    tenant: AccountSid,
    call: CallSid,
    at: i64,
    secs: u32,
    direction: Direction,
    from: String,
    to: String,
) -> [Envelope; 3] {
    let env = |n: u128, t: i64, payload| Envelope {
        event_id: EventId::derive(id_kind, &[call.as_u128(), n]),
        tenant,
        call: Some(call),
        occurred_at: Timestamp(t),
        payload,
    };
    let status = |s, d| {
        Event::CallStatusChanged(CallStatusChanged {
            status: s,
            source: StatusSource::Callback,
            sequence: None,
            duration_secs: d,
        })
    };
    [
        env(
            0,
            at,
            Event::CallReceived(CallReceived {
                from,
                to,
                direction,
                status: CallStatus::Ringing,
                from_country: None,
                to_country: None,
                stream_session: call.to_string(),
            }),
        ),
        env(1, at + 500_000, status(CallStatus::InProgress, None)),
        env(2, at + i64::from(secs) * 1_000_000, status(CallStatus::Completed, Some(secs))),
    ]
}

/// The `q`-quantile (0..=1) of `xs` (sorted in place), nearest-rank.
pub fn quantile(xs: &mut [f64], q: f64) -> f64 {
    if xs.is_empty() {
        return f64::NAN;
    }
    xs.sort_by(|a, b| a.total_cmp(b));
    let i = ((q * xs.len() as f64).ceil() as usize).clamp(1, xs.len()) - 1;
    xs[i]
}

/// Median of `xs`.
pub fn median(xs: &mut [f64]) -> f64 {
    quantile(xs, 0.5)
}

/// Milliseconds of a duration as f64.
pub fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}
