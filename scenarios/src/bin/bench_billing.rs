//! Rebuilding every usage projection from a recorded calls log: the work billing does on every
//! start (and what a replay from zero is). Call events per second through read + decode + the
//! usage book, against a baseline of read + decode alone (what any stage pays to read the log).
//! Goal: ≥ 500,000 events/s.
//!
//! Input: CALLS calls (default one million) for 200 tenants over one month — received, in-progress
//! and completed events, inbound and outbound, 1 s to 20 min — appended to a real sled log in a
//! temp dir exactly as the node stores them. The rebuild then runs RUNS times over the durable
//! log; medians and the 10th/90th percentiles are shown. One core (the rebuild is one fold).
//!
//! `cargo run --release -p voxgate-scenarios --bin bench_billing [CALLS]`

use std::hint::black_box;
use std::sync::Arc;
use std::time::Instant;

use voxgate_actors::billing::{Category, Granularity, PriceTable, UsageBook};
use voxgate_actors::transcode::synth::Rng;
use voxgate_protocol::event::Direction;
use voxgate_protocol::{AccountSid, CallSid, Envelope, SystemClock, Timestamp};
use voxgate_scenarios::bench::{call_events, quantile};
use voxgate_storage::{topics, Log, StorageError};

const RUNS: usize = 5;
const TENANTS: u128 = 200;

fn traffic(calls: usize) -> Vec<(u64, Vec<u8>)> {
    let mut rng = Rng::new(0xb111);
    let month_us = 30.0 * 86_400_000_000f64;
    let start = 1_761_955_200_000_000i64; // 2025-11-01T00:00:00Z
    let mut events = Vec::with_capacity(calls * 3);
    for i in 0..calls {
        let tenant = AccountSid::from_u128(1 + (i as u128 % TENANTS));
        let call = CallSid::from_u128(i as u128 + 1);
        let at = start + (rng.uniform() * month_us) as i64;
        let outbound = rng.uniform() < 0.3;
        let secs = rng.range(1.0, 1200.0) as u32;
        let (from, to) = (format!("+1415{:07}", i % 9_999_999), "+14155550100".to_owned());
        let (direction, from, to) =
            if outbound { (Direction::OutboundApi, to, from) } else { (Direction::Inbound, from, to) };
        events.extend(call_events(98, tenant, call, at, secs, direction, from, to));
    }
    events.sort_by_key(|e| (e.occurred_at, e.event_id));
    events.iter().map(|e| (e.call.map_or(0, |c| c.partition_key()), voxgate_protocol::encode(e))).collect()
}

/// Reads every record of the calls log; `f` sees each decoded envelope. Returns the events read.
fn read_all(log: &Log, mut f: impl FnMut(&Envelope)) -> Result<u64, StorageError> {
    let mut n = 0;
    for p in 0..log.partitions(topics::CALLS)? {
        log.scan(topics::CALLS, p, 0, |r| {
            let env = voxgate_protocol::decode(r.payload()).map_err(|e| StorageError::Engine(e.to_string()))?;
            f(&env);
            n += 1;
            Ok::<_, StorageError>(())
        })?;
    }
    Ok(n)
}

fn main() -> anyhow::Result<()> {
    let calls: usize = std::env::args().nth(1).and_then(|a| a.parse().ok()).unwrap_or(1_000_000);
    let dir = tempfile::tempdir()?;
    let log = Log::open(dir.path(), &topics::default_specs(), Arc::new(SystemClock))?;
    let t = Instant::now();
    let records = traffic(calls);
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    rt.block_on(async {
        for chunk in records.chunks(4096) {
            log.append_many(topics::CALLS, chunk.iter().map(|(k, v)| (*k, v.as_slice()))).await?;
        }
        Ok::<_, StorageError>(())
    })?;
    let events = records.len() as f64;
    drop(records);
    eprintln!("wrote {events} events ({calls} calls) to a sled log in {:.1} s", t.elapsed().as_secs_f64());

    let (mut base, mut full) = (Vec::new(), Vec::new());
    let mut total = 0;
    for run in 0..=RUNS {
        let t = Instant::now();
        let n = read_all(&log, |e| {
            black_box(e);
        })?;
        let b = n as f64 / t.elapsed().as_secs_f64();
        let t = Instant::now();
        let mut book = UsageBook::new(PriceTable::default())?;
        let n = read_all(&log, |e| {
            black_box(book.apply(e));
        })?;
        let f = n as f64 / t.elapsed().as_secs_f64();
        // Every tenant's month, so the projection is used, not just built.
        let month = Granularity::Month.window_of(Timestamp(1_761_955_200_000_000));
        total = (1..=TENANTS)
            .map(|a| book.record(AccountSid::from_u128(a), false, Category::Totalprice, month).price_micros)
            .sum::<u64>();
        if run > 0 {
            base.push(b);
            full.push(f);
        }
    }
    let stats = |xs: &mut Vec<f64>| (quantile(xs, 0.5), quantile(xs, 0.1), quantile(xs, 0.9));
    let ((b50, b10, b90), (f50, f10, f90)) = (stats(&mut base), stats(&mut full));
    println!(
        "usage rebuild from a sled calls log, one core, release ({events} events, {calls} calls, {TENANTS} tenants)"
    );
    println!("{:<44} {:>14} {:>12} {:>12}", "", "events/s p50", "p10", "p90");
    println!("{:<44} {:>14.0} {:>12.0} {:>12.0}", "baseline: read + decode the log", b50, b10, b90);
    println!("{:<44} {:>14.0} {:>12.0} {:>12.0}", "read + decode + usage book (the rebuild)", f50, f10, f90);
    println!(
        "whole rebuild {:.2} s (p50); cost ratio rebuild / read: {:.2}×; total billed {} usd; goal ≥ 500000 events/s: {}",
        events / f50,
        b50 / f50,
        voxgate_actors::billing::format_micros(total),
        if f50 >= 500_000.0 { "met" } else { "NOT met" }
    );
    Ok(())
}
