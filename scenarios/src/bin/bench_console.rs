//! The console under load: how long a transcript takes from its durable append to an open
//! browser, and what open consoles cost the node.
//!
//! A release `voxgate serve` takes `calls` (100) live calls at once, each streaming real-time
//! audio in which the caller speaks twice (staggered over the run, so the STT stage keeps up);
//! `viewers` (10) headless Chromiums, signed in as the operator, watch the live call list, which
//! receives every row change of every call. Each page records, for every row change caused by a
//! transcript, `Date.now()` minus the transcript's `appended_at` (one machine, one clock). Reports
//! p50/p99 of those delays, and the node's CPU per second of the same traffic on a node with the
//! console switched off (baseline), with it on and no one watching, and with the viewers open, so
//! the differences are what the console's index and its viewers cost.
//!
//! `cargo build --release --workspace && target/release/bench_console [calls] [viewers]`
//! (`BENCH_CONSOLE_STT=0` runs it without speech-to-text, to see the console's CPU apart)
//! (needs Debian's chromium and chromium-driver).

use std::time::{Duration, Instant};

use serde_json::json;
use voxgate_protocol::{AccountSid, CallSid};
use voxgate_scenarios::bench::quantile;
use voxgate_scenarios::browser::Browser;
use voxgate_scenarios::fixture::{ACCOUNT, NUMBER, TOKEN};
use voxgate_scenarios::node::Node;
use voxgate_scenarios::speech::{script, Voice};
use voxgate_scenarios::twilio::{Pace, Simulator};

const ADMIN: &str = "admin-bench-console-0123456789abcdef";
const PUBLIC: &str = "https://bench.voxgate.test";

struct Run {
    /// The node's CPU seconds for the run's work: from the first call to every stage caught up.
    cpu: f64,
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
    // The stages may finish the run's speech after its calls end (more so while browsers take
    // CPU): the work is counted until they have caught up.
    node.wait_idle(Duration::from_secs(300)).await?;
    let cpu = voxgate_protocol::time::process_cpu_seconds(pid).unwrap_or(0.0) - cpu0;
    let mut delays = Vec::new();
    let mut transcripts = 0;
    for b in &browsers {
        let d = b.eval("return window.voxgateDelays;", json!([])).await?;
        let d: Vec<f64> = d.as_array().map(|a| a.iter().filter_map(|x| x.as_f64()).collect()).unwrap_or_default();
        transcripts = transcripts.max(d.len());
        delays.extend(d);
    }
    Ok(Run { cpu, secs, delays, transcripts })
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let calls: usize = std::env::args().nth(1).and_then(|a| a.parse().ok()).unwrap_or(100);
    let viewers: usize = std::env::args().nth(2).and_then(|a| a.parse().ok()).unwrap_or(10);
    // `BENCH_CONSOLE_STT=0`: no speech-to-text, so the node's CPU is ingest, logging and the
    // console alone (Whisper's batching varies more than the console costs); no transcripts then.
    let stt =
        if std::env::var("BENCH_CONSOLE_STT").as_deref() == Ok("0") { "enabled = false" } else { "beam_size = 1" };
    let config = format!(
        "public_url = \"{PUBLIC}\"\nadmin_token = \"{ADMIN}\"\n[stt]\n{stt}\n[quotas]\nmax_concurrent_calls = 100000\ncalls_per_second = 100000\n[callers]\nmax_calls_per_window = 0\n[[tenants]]\naccount_sid = \"{ACCOUNT}\"\nauth_token = \"{TOKEN}\"\nnumbers = [\"{NUMBER}\"]\n"
    );
    let off = Node::start(&config.replacen("[stt]", "[console]\nenabled = false\n[stt]", 1))?;
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
    println!("bench_console: {calls} live calls, each speaking twice in 50 s of real-time audio");
    // Baseline: the same traffic on a node without the console (no index, no pages).
    let without = run(&off, calls, 0, &audio, 1).await?;
    drop(off);
    let node = Node::start(&config)?;
    let quiet = run(&node, calls, 0, &audio, 2).await?;
    let watched = run(&node, calls, viewers, &audio, 3).await?;
    let mut d = watched.delays.clone();
    let (p50, p99) = (quantile(&mut d, 0.5), quantile(&mut d, 0.99));
    println!("| node | transcripts seen per viewer | append → browser p50 | p99 | node CPU for the run's work | calls' run |");
    println!("|---|---|---|---|---|---|");
    println!("| console off | — | — | — | {:.1} s | {:.0} s |", without.cpu, without.secs);
    println!("| console on, no viewer | — | — | — | {:.1} s | {:.0} s |", quiet.cpu, quiet.secs);
    println!(
        "| console on, {viewers} viewers | {} | {p50:.1} ms | {p99:.1} ms | {:.1} s | {:.0} s |",
        watched.transcripts, watched.cpu, watched.secs
    );
    let pct = |a: f64, b: f64| 100.0 * (a - b) / b.max(1e-9);
    println!(
        "the console's index, no one watching: {:+.1} CPU s ({:+.1} %); {viewers} viewers on top: {:+.1} CPU s ({:+.1} %), {:.2} ms of node CPU per viewer-second; {} delay samples",
        quiet.cpu - without.cpu,
        pct(quiet.cpu, without.cpu),
        watched.cpu - quiet.cpu,
        pct(watched.cpu, quiet.cpu),
        1000.0 * (watched.cpu - quiet.cpu) / (viewers as f64 * watched.secs).max(1e-9),
        watched.delays.len()
    );
    Ok(())
}
