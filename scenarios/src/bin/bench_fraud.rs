//! Fraud verdicts over a recorded calls log, on one core: call events per second through the
//! fraud engine (every rule on), against a baseline of decoding the same records alone (the work
//! any stage does to read the log). Goal: ≥ 100,000 call events/s.
//!
//! Input: a synthetic day of traffic for 50 tenants — received, in-progress and completed events
//! for ordinary calls from 20,000 callers, plus premium-rate pumping and wangiri bursts — encoded
//! as the log stores it (postcard envelopes), in event-time order. Each measurement runs 7 times
//! after a warm-up; medians and the 10th/90th percentiles are shown.
//!
//! `cargo run --release -p voxgate-scenarios --bin bench_fraud [CALLS]`

use std::hint::black_box;
use std::time::Instant;

use voxgate_actors::fraud::{FraudConfig, FraudEngine, PrefixTable};
use voxgate_actors::transcode::synth::Rng;
use voxgate_protocol::event::Direction;
use voxgate_protocol::{AccountSid, CallSid, Envelope};
use voxgate_scenarios::bench::{call_events, quantile};

const RUNS: usize = 7;

fn traffic(calls: usize) -> Vec<Vec<u8>> {
    let mut rng = Rng::new(0xf4a0d);
    let day_us = 86_400_000_000f64;
    let start = 1_763_856_000_000_000i64; // 2025-11-23T00:00:00Z
    let mut events: Vec<Envelope> = Vec::with_capacity(calls * 3);
    for i in 0..calls {
        let tenant = AccountSid::from_u128(1 + (i % 50) as u128);
        let call = CallSid::from_u128(i as u128 + 1);
        let at = start + (rng.uniform() * day_us) as i64;
        let attack = rng.uniform();
        let (from, direction, to) = if attack < 0.01 {
            ("+14155550100".to_owned(), Direction::OutboundApi, format!("+1900555{:04}", rng.range(0.0, 9999.0) as u32))
        } else if attack < 0.02 {
            (format!("+2348030{:06}", rng.range(0.0, 999.0) as u32), Direction::Inbound, "+14155550100".to_owned())
        } else {
            (format!("+1415{:07}", rng.range(0.0, 20_000.0) as u32), Direction::Inbound, "+14155550100".to_owned())
        };
        let secs = if (0.01..0.02).contains(&attack) { 1.0 } else { rng.range(5.0, 300.0) };
        events.extend(call_events(99, tenant, call, at, secs as u32, direction, from, to));
    }
    events.sort_by_key(|e| (e.occurred_at, e.event_id));
    events.iter().map(voxgate_protocol::encode).collect()
}

fn stats(xs: &mut [f64]) -> (f64, f64, f64) {
    (quantile(xs, 0.5), quantile(xs, 0.1), quantile(xs, 0.9))
}

fn main() -> anyhow::Result<()> {
    let calls: usize = std::env::args().nth(1).and_then(|a| a.parse().ok()).unwrap_or(200_000);
    let log = traffic(calls);
    let n = log.len() as f64;
    let mut base = Vec::new();
    let mut full = Vec::new();
    let mut verdicts = 0;
    for run in 0..=RUNS {
        let t = Instant::now();
        for r in &log {
            black_box(voxgate_protocol::decode(r)?);
        }
        let b = n / t.elapsed().as_secs_f64();
        let mut engine = FraudEngine::new(FraudConfig::default(), PrefixTable::builtin())?;
        let t = Instant::now();
        let mut v = 0;
        for r in &log {
            let env = voxgate_protocol::decode(r)?;
            v += usize::from(engine.apply(&env).is_some());
        }
        let f = n / t.elapsed().as_secs_f64();
        if run > 0 {
            base.push(b);
            full.push(f);
            verdicts = v;
        }
    }
    let (b50, b10, b90) = stats(&mut base);
    let (f50, f10, f90) = stats(&mut full);
    println!(
        "fraud verdicts over a recorded calls log, one core, release ({} events, {calls} calls, {verdicts} verdicts)",
        log.len()
    );
    println!("{:<42} {:>14} {:>12} {:>12}", "", "events/s p50", "p10", "p90");
    println!("{:<42} {:>14.0} {:>12.0} {:>12.0}", "baseline: decode records only", b50, b10, b90);
    println!("{:<42} {:>14.0} {:>12.0} {:>12.0}", "decode + fraud engine (all rules)", f50, f10, f90);
    println!(
        "cost ratio (engine+decode / decode): {:.1}×; goal ≥ 100000 events/s: {}",
        b50 / f50,
        if f50 >= 100_000.0 { "met" } else { "NOT met" }
    );
    Ok(())
}
