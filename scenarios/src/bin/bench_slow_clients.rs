//! Webhook answers while 2,000 connections hold half a request header (slowloris), against the
//! same node answering in quiet, in one run: the release node with its default `[http]` limits
//! (10 s header deadline, 10,000 connections). Each round measures 500 sequential calls (webhook
//! and completed callback) quiet, then 500 more with 2,000 stalled connections open; medians of
//! the rounds' p50 and p99, the ratio, and the node's memory with the stalled connections.
//!
//! `cargo run --release -p voxgate-scenarios --bin bench_slow_clients [ROUNDS]`

use std::time::Instant;

use voxgate_protocol::{AccountSid, CallSid};
use voxgate_scenarios::bench::{median, ms, quantile};
use voxgate_scenarios::node::Node;
use voxgate_scenarios::slow::{rss_kib, stall};
use voxgate_scenarios::twilio::Simulator;

const ACCOUNT: &str = "AC0123456789abcdef0123456789abcdef";
const TOKEN: &str = "9f3c1b2a7d4e5f60718293a4b5c6d7e8";
const NUMBER: &str = "+14155550100";
const STALLED: usize = 2000;
const CALLS: u128 = 500;

async fn calls(s: &Simulator, first: u128) -> anyhow::Result<(f64, f64)> {
    let mut lat = Vec::with_capacity(CALLS as usize);
    for i in first..first + CALLS {
        let call = CallSid::from_u128(i);
        let t = Instant::now();
        let a = s.inbound_call(call, "+14155550123", NUMBER).await?;
        lat.push(ms(t.elapsed()));
        anyhow::ensure!(a.stream_url.is_some(), "{}", a.body);
        anyhow::ensure!(s.status_callback(call, "completed", 1, None).await? == 204, "callback refused");
    }
    Ok((quantile(&mut lat, 0.5), quantile(&mut lat, 0.99)))
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let rounds: usize = std::env::args().nth(1).and_then(|a| a.parse().ok()).unwrap_or(3);
    let config = format!(
        "public_url = \"https://bench.voxgate.test\"\n[stt]\nenabled = false\n[quotas]\nmax_concurrent_calls = 1000000\ncalls_per_second = 100000\n[callers]\nmax_calls_per_window = 0\n[fraud]\ndisabled_rules = [\"velocity_from\", \"spend_velocity\", \"short_call_burst\", \"volume_anomaly\"]\n[[tenants]]\naccount_sid = \"{ACCOUNT}\"\nauth_token = \"{TOKEN}\"\nnumbers = [\"{NUMBER}\"]\n"
    );
    let node = Node::start(&config)?;
    let pid = node.pid().ok_or_else(|| anyhow::anyhow!("no pid"))?;
    let s = Simulator::new(&node.url(), "https://bench.voxgate.test", AccountSid::parse(ACCOUNT)?, TOKEN);
    calls(&s, 1 << 40).await?; // warm-up
    let (mut q50, mut q99, mut a50, mut a99, mut rss) = (vec![], vec![], vec![], vec![], vec![]);
    for r in 0..rounds as u128 {
        let (p50, p99) = calls(&s, (r + 1) << 32).await?;
        q50.push(p50);
        q99.push(p99);
        let before = rss_kib(pid).unwrap_or(0);
        let held = stall(node.addr, STALLED).await?;
        let (p50, p99) = calls(&s, (r + 1) << 32 | 1 << 20).await?;
        a50.push(p50);
        a99.push(p99);
        rss.push((rss_kib(pid).unwrap_or(0) as f64 - before as f64) / 1024.0);
        drop(held);
        println!(
            "round {}: quiet p50/p99 {:.3}/{:.3} ms, stalled {:.3}/{:.3} ms",
            r + 1,
            q50[r as usize],
            q99[r as usize],
            p50,
            p99
        );
    }
    let (q50, q99, a50, a99) = (median(&mut q50), median(&mut q99), median(&mut a50), median(&mut a99));
    println!("webhook answer, release build, {CALLS} sequential calls per run, medians of {rounds} rounds");
    println!("{:<44} {:>10} {:>10}", "", "p50 ms", "p99 ms");
    println!("{:<44} {:>10.3} {:>10.3}", "baseline: quiet", q50, q99);
    println!("{:<44} {:>10.3} {:>10.3}", &format!("with {STALLED} stalled half-header connections"), a50, a99);
    println!("{:<44} {:>9.2}× {:>9.2}×", "ratio", a50 / q50, a99 / q99);
    println!("node memory with them open: +{:.1} MiB (median)", median(&mut rss));
    Ok(())
}
