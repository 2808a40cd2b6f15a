//! Gateway mode, measured: a fake customer app (the IVR of `scenarios/tests/gateway.rs`: it
//! says, gathers, dials, validates signatures and asks for real-time transcription) behind a
//! release `voxgate serve`, and N two-track calls of synthesized speech (the caller in espeak-ng,
//! the agent in flite) streamed at real-time pace, C at a time.
//!
//! Figures:
//! - the passthrough's added latency: voxgate's answer time minus the app's. Baseline in the same
//!   run: the same signed webhook posted to the app directly. Reported both as the client sees it
//!   (through voxgate − direct, medians) and as voxgate records it per call (`gateway_answered`
//!   `added_us`: its answer time minus its wait for the app);
//! - end of speech → the app receiving the final transcript (`transcription-content`), per
//!   utterance: the utterance's last voiced frame is sent at a known instant of the real-time
//!   stream; the first transcript of that track the app receives after it is the utterance's.
//!
//! And checks: every request the app got validates as Twilio-signed; every session's callbacks
//! arrive once each, in order (`SequenceId` 1..n), started → content → stopped; both speakers
//! are heard on every call.
//!
//! `cargo run --release -p voxgate-scenarios --bin bench_gateway [CALLS [CONCURRENCY]]`

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use voxgate_protocol::{AccountSid, CallSid, StreamSid};
use voxgate_scenarios::app::{CustomerApp, Hit};
use voxgate_scenarios::bench::{ms, quantile};
use voxgate_scenarios::fixture::replay_json;
use voxgate_scenarios::node::Node;
use voxgate_scenarios::speech::Script;
use voxgate_scenarios::twilio::{extract_attr, Pace, Simulator};

const ACCOUNT: &str = "AC0123456789abcdef0123456789abcdef";
const TOKEN: &str = "9f3c1b2a7d4e5f60718293a4b5c6d7e8";
const NUMBER: &str = "+14155550170";
const PUBLIC: &str = "https://bench.voxgate.test";

/// One call's timing: when voxgate answered, and when each track's utterances ended.
struct CallRun {
    call: CallSid,
    answer_ms: f64,
    /// (track name as Twilio's callbacks say it, instant the utterance's last voiced frame was sent).
    ends: Vec<(&'static str, Instant)>,
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let mut args = std::env::args().skip(1);
    let calls: u128 = args.next().and_then(|a| a.parse().ok()).unwrap_or(50);
    let concurrency: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(5);

    let app = CustomerApp::start(TOKEN).await?;
    let config = format!(
        "public_url = \"{PUBLIC}\"\nallow_private_callbacks = true\n[quotas]\nmax_concurrent_calls = 1000\ncalls_per_second = 1000\n[callers]\nmax_calls_per_window = 0\n[fraud]\ndisabled_rules = [\"velocity_from\", \"spend_velocity\", \"short_call_burst\", \"volume_anomaly\"]\n[[tenants]]\naccount_sid = \"{ACCOUNT}\"\nauth_token = \"{TOKEN}\"\nnumbers = [{{ number = \"{NUMBER}\", voice_url = \"{}/voice\", status_callback = \"{}/status\" }}]\n",
        app.url, app.url
    );
    let mut node = Node::start(&config)?;
    let account = AccountSid::parse(ACCOUNT)?;
    let sim = Simulator::new(&node.url(), PUBLIC, account, TOKEN);
    let direct = Simulator::new(&app.url, &app.url, account, TOKEN);

    let work = tempfile::tempdir()?;
    let (caller, agent) = voxgate_scenarios::app::conversation(work.path())?;
    let (caller, agent) = (Arc::new(caller), Arc::new(agent));

    // Warm-up (connections, the app's and voxgate's first request), then the baseline: the same
    // signed webhook straight to the app.
    for n in 0..20u128 {
        direct
            .post_signed("/voice", &direct.inbound_params(CallSid::from_u128(0xba5e_0000 + n), "+14155559999", NUMBER))
            .await?;
    }
    let mut base = Vec::new();
    for n in 0..200u128 {
        let p = direct.inbound_params(CallSid::from_u128(0xba5e_1000 + n), "+14155559999", NUMBER);
        let t = Instant::now();
        let (status, _) = direct.post_signed("/voice", &p).await?;
        base.push(ms(t.elapsed()));
        if status != 200 {
            bail!("the app answered {status}");
        }
    }
    let before = app.hits().len();

    // The calls, `concurrency` at a time.
    let started = Instant::now();
    let mut runs = Vec::new();
    let ids: Vec<CallSid> = (0..calls).map(|n| CallSid::from_u128(0x6a7e_b000 + n)).collect();
    for wave in ids.chunks(concurrency) {
        let mut tasks = Vec::new();
        for (i, &call) in wave.iter().enumerate() {
            let (sim, caller, agent) = (sim.clone(), caller.clone(), agent.clone());
            let from = format!("+1415556{:04}", call.as_u128() % 10_000);
            // Staggered a little, as calls arrive.
            let delay = Duration::from_millis(150 * i as u64);
            tasks.push(tokio::spawn(async move {
                tokio::time::sleep(delay).await;
                one_call(&sim, call, &from, &caller, &agent).await
            }));
        }
        for t in tasks {
            runs.push(t.await??);
        }
    }
    let streamed = started.elapsed();

    // Every session ends with transcription-stopped once its last transcript is in.
    let hits = app
        .wait_until(Duration::from_secs(600), |h| {
            h.iter()
                .filter(|x| x.path == "/realtime" && x.param("TranscriptionEvent") == Some("transcription-stopped"))
                .count()
                >= calls as usize
        })
        .await;
    let hits = &hits[before..];
    let stopped = hits.iter().filter(|x| x.param("TranscriptionEvent") == Some("transcription-stopped")).count();
    if stopped < calls as usize {
        bail!("only {stopped} of {calls} transcription sessions ended within 10 minutes");
    }
    node.wait_idle(Duration::from_secs(120)).await?;
    node.stop()?;

    // Checks.
    let unsigned = hits.iter().filter(|h| !h.signature_valid).count();
    let mut delays = Vec::new();
    let mut both_heard = 0;
    let mut contents = 0;
    for r in &runs {
        let cs = r.call.to_string();
        let rt: Vec<&Hit> = hits.iter().filter(|h| h.path == "/realtime" && h.param("CallSid") == Some(&cs)).collect();
        let seqs: Vec<u32> = rt.iter().filter_map(|h| h.param("SequenceId")?.parse().ok()).collect();
        if seqs != (1..=seqs.len() as u32).collect::<Vec<_>>() {
            bail!("{cs}: SequenceIds {seqs:?} are not 1..n once each, in order");
        }
        let content: Vec<&&Hit> =
            rt.iter().filter(|h| h.param("TranscriptionEvent") == Some("transcription-content")).collect();
        contents += content.len();
        let heard = |t: &str| content.iter().any(|h| h.param("Track") == Some(t));
        if heard("inbound_track") && heard("outbound_track") {
            both_heard += 1;
        }
        // Each utterance's transcript: the first of its track after the utterance ended.
        let mut used = BTreeMap::new();
        for (track, end) in &r.ends {
            let from = used.get(track).copied().unwrap_or(0);
            let next =
                content.iter().enumerate().skip(from).find(|(_, h)| h.param("Track") == Some(*track) && h.at >= *end);
            if let Some((i, h)) = next {
                delays.push(ms(h.at - *end));
                used.insert(*track, i + 1);
            }
        }
    }
    let mut added_rec: Vec<f64> = Vec::new();
    for r in &runs {
        let events = replay_json(&node, r.call);
        if let Some(g) = events.iter().find(|e| e["kind"] == "gateway_answered") {
            added_rec.push(g["added_us"].as_f64().unwrap_or(f64::NAN) / 1000.0);
        }
    }
    let mut through: Vec<f64> = runs.iter().map(|r| r.answer_ms).collect();
    let utterances: usize = runs.iter().map(|r| r.ends.len()).sum();

    let (b50, b99) = (quantile(&mut base, 0.5), quantile(&mut base, 0.99));
    let (t50, t99) = (quantile(&mut through, 0.5), quantile(&mut through, 0.99));
    let (a50, a99) = (quantile(&mut added_rec, 0.5), quantile(&mut added_rec, 0.99));
    let (d50, d99) = (quantile(&mut delays, 0.5), quantile(&mut delays, 0.99));
    println!(
        "gateway mode, release build: {calls} two-track calls of real speech, {concurrency} at a time, streamed in {:.0} s",
        streamed.as_secs_f64()
    );
    println!("{:<52} {:>10} {:>10}", "", "p50 ms", "p99 ms");
    println!("{:<52} {:>10.2} {:>10.2}", "baseline: webhook straight to the app (200 posts)", b50, b99);
    println!("{:<52} {:>10.2} {:>10.2}", "webhook through voxgate (gate, app, rewrite, append)", t50, t99);
    println!("{:<52} {:>9.2}× {:>9.2}×", "ratio", t50 / b50, t99 / b99);
    println!("{:<52} {:>10.2} {:>10}", "added by voxgate, as the client sees it (p50 − p50)", t50 - b50, "");
    println!("{:<52} {:>10.2} {:>10.2}", "added by voxgate, as it records it (added_us)", a50, a99);
    println!(
        "{:<52} {:>10.0} {:>10.0}",
        format!("end of speech → app has the final transcript ({}/{utterances})", delays.len()),
        d50,
        d99
    );
    println!(
        "checks: {} app requests, {unsigned} failed signature validation; {contents} transcripts delivered once each, in order; both speakers heard on {both_heard}/{calls} calls",
        hits.len()
    );
    if unsigned > 0 || both_heard < calls as usize {
        bail!("checks failed");
    }
    Ok(())
}

async fn one_call(
    sim: &Simulator,
    call: CallSid,
    from: &str,
    caller: &Script,
    agent: &Script,
) -> anyhow::Result<CallRun> {
    let t = Instant::now();
    let a = sim.inbound_call(call, from, NUMBER).await?;
    let answer_ms = ms(t.elapsed());
    if a.status != 200 || !a.body.contains("<Start><Stream") {
        bail!("{call}: answered {} {}", a.status, a.body);
    }
    let url = extract_attr(&a.body, "<Stream ", "url").context("no stream URL")?;
    let mut stream = sim.connect_stream(&url).await?;
    let sid = StreamSid::from_u128(call.as_u128() ^ 0x5a5a);
    stream.start_both(sid, sim.account(), call).await?;
    // Frame i goes out at t0 + i × 20 ms (real time); an utterance ending at e ms is over when
    // the frame holding e has been sent.
    let t0 = Instant::now();
    stream.send_two_tracks(sid, &caller.mulaw, &agent.mulaw, Pace::RealTime).await?;
    let mut ends = Vec::new();
    for (track, s) in [("inbound_track", caller), ("outbound_track", agent)] {
        for (_, end, _) in &s.utterances {
            ends.push((track, t0 + Duration::from_millis(end.div_ceil(20) * 20)));
        }
    }
    stream.stop(sid, sim.account(), call).await?;
    stream.closed(Duration::from_secs(10)).await;
    let status = sim.status_callback(call, "completed", 3, None).await?;
    if !(200..300).contains(&status) {
        bail!("{call}: completed callback answered {status}");
    }
    Ok(CallRun { call, answer_ms, ends })
}
