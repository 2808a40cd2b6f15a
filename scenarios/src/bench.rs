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

/// A signed inbound webhook answered with TwiML: latency of `n` sequential ones (after a warm-up),
/// and throughput over `2n` at 32 concurrent connections.
pub struct Webhooks {
    pub p50: f64,
    pub p99: f64,
    pub rate: f64,
}

/// Measures [`Webhooks`] against `node` as `account`, calling `number`.
pub async fn webhook_figures(
    node: &crate::node::Node,
    account: &str,
    token: &str,
    number: &str,
    n: usize,
) -> anyhow::Result<Webhooks> {
    use std::sync::Arc;
    use std::time::Instant;
    let sim = Arc::new(crate::twilio::Simulator::new(
        &node.url(),
        "https://bench.voxgate.test",
        AccountSid::parse(account)?,
        token,
    ));
    for i in 0..50u128 {
        sim.inbound_call(CallSid::from_u128(1 << 100 | i), "+14155550123", number).await?;
    }
    let mut lat = Vec::with_capacity(n);
    for i in 0..n as u128 {
        let t = Instant::now();
        let a = sim.inbound_call(CallSid::from_u128(2 << 100 | i), "+14155550123", number).await?;
        lat.push(ms(t.elapsed()));
        anyhow::ensure!(a.stream_url.is_some(), "{}", a.body);
    }
    let (conc, total) = (32, n * 2);
    let start = Instant::now();
    let mut tasks = Vec::new();
    for c in 0..conc {
        let (sim, number) = (sim.clone(), number.to_owned());
        tasks.push(tokio::spawn(async move {
            let mut i = c;
            while i < total {
                let a = sim.inbound_call(CallSid::from_u128(3 << 100 | i as u128), "+14155550123", &number).await?;
                anyhow::ensure!(a.stream_url.is_some(), "{}", a.body);
                i += conc;
            }
            anyhow::Ok(())
        }));
    }
    for t in tasks {
        t.await??;
    }
    Ok(Webhooks {
        p50: quantile(&mut lat, 0.5),
        p99: quantile(&mut lat, 0.99),
        rate: total as f64 / start.elapsed().as_secs_f64(),
    })
}
