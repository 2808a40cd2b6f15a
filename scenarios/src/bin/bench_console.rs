//! The console under load: how long a transcript takes from its durable append to an open
//! browser, and what open consoles cost the node.
//!
//! A release `voxgate serve` takes `calls` (100) live calls at once, each streaming real-time
//! audio in which the caller speaks twice (staggered over the run, so the STT stage keeps up);
//! `viewers` (10) headless Chromiums, signed in as the operator, watch the live call list, which
//! receives every row change of every call. Each page records, for every row change caused by a
//! transcript, `Date.now()` minus the transcript's `appended_at` (one machine, one clock). Reports
//! p50/p99 of those delays, and the node's CPU per second of the same traffic without viewers
//! (first run) and with them (second run), so the difference is the console's cost.
//!
//! `cargo build --release --workspace && target/release/bench_console [calls] [viewers]`
//! (needs Debian's chromium and chromium-driver).

use std::time::{Duration, Instant};

use serde_json::json;
use voxgate_protocol::{AccountSid, CallSid};
use voxgate_scenarios::bench::quantile;
use voxgate_scenarios::browser::Browser;
use voxgate_scenarios::node::Node;
use voxgate_scenarios::speech::{script, Voice};
use voxgate_scenarios::twilio::{Pace, Simulator};

const ACCOUNT: &str = "AC0123456789abcdef0123456789abcdef";
const TOKEN: &str = "9f3c1b2a7d4e5f60718293a4b5c6d7e8";
const NUMBER: &str = "+14155550100";
const ADMIN: &str = "admin-bench-console-0123456789abcdef";
const PUBLIC: &str = "https://bench.voxgate.test";

struct Run {
    cpu_per_sec: f64,
    secs: f64,
    delays: Vec<f64>,
    transcripts: usize,
}

async fn run(node: &Node, calls: usize, viewers: usize, audio: &[Vec<u8>], round: u128) -> anyhow::Result<Run> {
    let mut browsers = Vec::new();
    for _ in 0..viewers {
        let b = Browser::start().await?;
        b.goto(&format!("{}/console/login", node.url())).await?;
        let t = b.wait_for("#token", Duration::from_secs(10)).await?;
        b.type_into(&t, ADMIN).await?;
        let go = b.wait_for("#sign-in", Duration::from_secs(5)).await?;
        b.click(&go).await?;
        b.wait_for("table#calls[data-live='1']", Duration::from_secs(10)).await?;
        browsers.push(b);
    }
    let pid = node.pid();
    let cpu0 = voxgate_protocol::time::process_cpu_seconds(pid).unwrap_or(0.0);
    let t0 = Instant::now();
    let mut tasks = Vec::new();
    for i in 0..calls {
        let s = Simulator::new(&node.url(), PUBLIC, AccountSid::parse(ACCOUNT)?, TOKEN);
        let audio = audio[i % audio.len()].clone();
        let call = CallSid::from_u128((round << 32) + i as u128 + 1);
        let from = format!("+1415556{:04}", i);
        tasks.push(tokio::spawn(async move { s.call(call, &from, NUMBER, &audio, Pace::RealTime).await }));
    }
    for t in tasks {
        t.await??;
    }
    let secs = t0.elapsed().as_secs_f64();
    let cpu = voxgate_protocol::time::process_cpu_seconds(pid).unwrap_or(0.0) - cpu0;
    node.wait_idle(Duration::from_secs(300)).await?;
    let mut delays = Vec::new();
    let mut transcripts = 0;
    for b in &browsers {
        let d = b.eval("return window.voxgateDelays;", json!([])).await?;
        let d: Vec<f64> = d.as_array().map(|a| a.iter().filter_map(|x| x.as_f64()).collect()).unwrap_or_default();
        transcripts = transcripts.max(d.len());
        delays.extend(d);
    }
    Ok(Run { cpu_per_sec: cpu / secs, secs, delays, transcripts })
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let calls: usize = std::env::args().nth(1).and_then(|a| a.parse().ok()).unwrap_or(100);
    let viewers: usize = std::env::args().nth(2).and_then(|a| a.parse().ok()).unwrap_or(10);
    let config = format!(
        "public_url = \"{PUBLIC}\"\nadmin_token = \"{ADMIN}\"\n[stt]\nbeam_size = 1\n[quotas]\nmax_concurrent_calls = 100000\ncalls_per_second = 100000\n[callers]\nmax_calls_per_window = 0\n[[tenants]]\naccount_sid = \"{ACCOUNT}\"\nauth_token = \"{TOKEN}\"\nnumbers = [\"{NUMBER}\"]\n"
    );
    let node = Node::start(&config)?;
    // Twenty staggered scripts: each caller speaks twice in about 50 s of real-time audio.
    let work = tempfile::tempdir()?;
    let lines = ["I would like to check the status of my order.", "Can you tell me when the package will arrive?"];
    let mut audio = Vec::new();
    for k in 0..20u64 {
        let s = script(
            &[(lines[0], Voice::Espeak("en-us".into())), (lines[1], Voice::Flite("slt".into()))],
            500 + k * 1000,
            20_000,
            work.path(),
        )?;
        let mut m = s.mulaw;
        m.resize(50 * 8000, 0xff);
        audio.push(m);
    }
    println!("bench_console: {calls} live calls, each speaking twice in 50 s of real-time audio; node {}", node.url());
    let quiet = run(&node, calls, 0, &audio, 1).await?;
    let watched = run(&node, calls, viewers, &audio, 2).await?;
    let mut d = watched.delays.clone();
    let (p50, p99) = (quantile(&mut d, 0.5), quantile(&mut d, 0.99));
    println!(
        "| viewers | transcripts seen per viewer | append → browser p50 | p99 | node CPU (cores) | run |\n|---|---|---|---|---|---|"
    );
    println!("| 0 | — | — | — | {:.3} | {:.0} s |", quiet.cpu_per_sec, quiet.secs);
    println!(
        "| {viewers} | {} | {p50:.1} ms | {p99:.1} ms | {:.3} | {:.0} s |",
        watched.transcripts, watched.cpu_per_sec, watched.secs
    );
    println!(
        "console cost: {:.3} cores for {viewers} viewers ({:.1} % of the node's {:.3} without them); {} delay samples",
        watched.cpu_per_sec - quiet.cpu_per_sec,
        100.0 * (watched.cpu_per_sec - quiet.cpu_per_sec) / quiet.cpu_per_sec.max(1e-9),
        quiet.cpu_per_sec,
        watched.delays.len()
    );
    Ok(())
}
