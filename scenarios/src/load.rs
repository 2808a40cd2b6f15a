//! Twilio's traffic against a running voxgate at a fixed offered rate, open loop.
//!
//! - **Calls**: `rate` inbound webhooks per second, each on its schedule whether or not earlier
//!   ones were answered; the call's `completed` status callback follows `hold` later. Latency is
//!   measured from the moment a request was *due*, not from when it went out, so a server (or a
//!   client) that falls behind shows it in the figures instead of hiding it (coordinated
//!   omission).
//! - **Streams**: `streams` concurrent calls, each with a Media Stream playing real speech at
//!   real-time pace (a 20 ms frame every 20 ms, each on its schedule) for the whole run.
//! - **The node**: its stage lag sampled every second from health, and counters and histograms
//!   from its `/metrics` before and after: frames received and shed, media ingest latency, speech
//!   segments, transcripts and their delay.
//!
//! The report is a table and JSON ([`Report`]).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::Serialize;
use tokio::time::Instant;
use voxgate_protocol::{CallSid, StreamSid};

use crate::bench::quantile;
use crate::twilio::Simulator;

/// What to offer.
#[derive(Debug, Clone)]
pub struct Plan {
    /// Calls per second (each an inbound webhook, and a status callback `hold` later).
    pub rate: f64,
    pub duration: Duration,
    pub hold: Duration,
    /// Concurrent Media Streams for the whole run.
    pub streams: usize,
    /// What every stream plays (8 kHz µ-law), looped.
    pub audio: Arc<Vec<u8>>,
    /// The tenant's number being called.
    pub to: String,
    /// The node's health endpoint (`…/api/voice/health`), sampled every second.
    pub health_url: Option<String>,
    /// The node's Prometheus endpoint (`…/metrics`).
    pub metrics_url: Option<String>,
    /// How long to wait after the traffic for the node's stages to catch up.
    pub drain: Duration,
}

/// Latency and outcome of one kind of request.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Requests {
    pub sent: u64,
    pub ok: u64,
    pub failed: u64,
    /// Answered requests per second over the run.
    pub per_sec: f64,
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub p999_ms: f64,
    pub max_ms: f64,
    /// The first few failures, as the client saw them.
    pub errors: Vec<String>,
}

/// The streams as the client saw them.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Streams {
    pub streams: usize,
    pub connected: usize,
    pub failed: usize,
    pub frames_sent: u64,
    /// How late the client sent frames against their schedule: when this grows, the client (or
    /// the machine) could not keep real time, whatever the server did.
    pub send_late_p99_ms: f64,
    pub send_late_max_ms: f64,
    pub errors: Vec<String>,
}

/// What the node reported about the run (differences of its metrics before and after).
#[derive(Debug, Clone, Default, Serialize)]
pub struct NodeSide {
    pub frames_received: u64,
    pub frames_shed: u64,
    /// Sent by the client but neither received nor shed by the node.
    pub frames_lost: i64,
    /// From a batch of frames reaching the node to its record being durable (bucket bounds).
    pub media_ingest_p50_ms: Option<f64>,
    pub media_ingest_p99_ms: Option<f64>,
    /// The node's own time to answer an inbound webhook, from its router taking the request to
    /// the answer (`http_request_duration_seconds{endpoint="inbound"}`, bucket bounds). What the generator
    /// measures beyond this is the network, the kernel and the generator's own scheduling.
    pub webhook_answer_p50_ms: Option<f64>,
    pub webhook_answer_p99_ms: Option<f64>,
    pub speech_segments: u64,
    pub transcripts: u64,
    /// From the audio that closed a speech segment reaching the node (end of speech plus the
    /// VAD's hangover) to its transcript being durable (bucket bounds).
    pub transcript_delay_p50_ms: Option<f64>,
    pub transcript_delay_p95_ms: Option<f64>,
    /// Largest and final backlog of each stage, in events.
    pub stage_lag_max: BTreeMap<String, u64>,
    pub stage_lag_end: BTreeMap<String, u64>,
    /// CPU the node used between the two scrapes (traffic and drain), in seconds, and as cores.
    pub cpu_seconds: Option<f64>,
    pub cpu_cores: Option<f64>,
    /// Node CPU per answered request (webhook or status callback), in microseconds.
    pub cpu_us_per_request: Option<f64>,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct Report {
    pub offered_calls_per_sec: f64,
    pub duration_secs: f64,
    pub webhooks: Requests,
    pub status_callbacks: Requests,
    pub streams: Streams,
    pub node: Option<NodeSide>,
    /// CPU the generator itself used over the run, in cores (it shares the machine).
    pub generator_cpu_cores: Option<f64>,
}

#[derive(Default)]
struct Samples {
    ms: Vec<f64>,
    failed: u64,
    errors: Vec<String>,
}

impl Samples {
    fn fail(&mut self, e: String) {
        self.failed += 1;
        if self.errors.len() < 5 {
            self.errors.push(e);
        }
    }

    fn report(mut self, secs: f64) -> Requests {
        let ok = self.ms.len() as u64;
        let mut q = |p| if self.ms.is_empty() { 0.0 } else { quantile(&mut self.ms, p) };
        Requests {
            sent: ok + self.failed,
            ok,
            failed: self.failed,
            per_sec: ok as f64 / secs.max(1e-9),
            p50_ms: q(0.5),
            p90_ms: q(0.9),
            p99_ms: q(0.99),
            p999_ms: q(0.999),
            max_ms: q(1.0),
            errors: self.errors,
        }
    }
}

/// A run's unique call ids: the high bits from the clock, the low from the call's number.
fn call_base() -> u128 {
    let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_nanos();
    (t << 40) ^ (u128::from(std::process::id()) << 96)
}

/// Runs the plan against the node `sim` points at.
pub async fn run(sim: Arc<Simulator>, plan: Plan) -> anyhow::Result<Report> {
    let http = reqwest::Client::builder().timeout(Duration::from_secs(10)).build()?;
    let before = match &plan.metrics_url {
        Some(u) => Some(scrape(&http, u).await?),
        None => None,
    };
    let (started, own_cpu) = (Instant::now(), voxgate_protocol::time::process_cpu_seconds(None));
    let base = call_base();
    let t0 = Instant::now() + Duration::from_millis(200);

    // The node's stage lag, every second until the traffic and the drain are over.
    let lag_max: Arc<Mutex<BTreeMap<String, u64>>> = Arc::default();
    let sampling = plan.health_url.clone().map(|url| {
        let (http, lag_max) = (http.clone(), lag_max.clone());
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            loop {
                tick.tick().await;
                if let Ok(lags) = stage_lags(&http, &url).await {
                    let mut m = lag_max.lock().unwrap_or_else(|e| e.into_inner());
                    for (k, v) in lags {
                        let e = m.entry(k).or_default();
                        *e = (*e).max(v);
                    }
                }
            }
        })
    });

    let streams = tokio::spawn(run_streams(sim.clone(), plan.clone(), base | (1 << 39), t0));
    let (hooks, callbacks) = run_calls(sim, &plan, base, t0).await;
    let streams = streams.await?;
    let secs = plan.duration.as_secs_f64();
    let mut report = Report {
        offered_calls_per_sec: plan.rate,
        duration_secs: secs,
        webhooks: hooks.report(secs),
        status_callbacks: callbacks.report(secs),
        streams,
        node: None,
        generator_cpu_cores: None,
    };

    // Let the stages catch up, then read what the node says.
    if let Some(url) = &plan.health_url {
        let until = Instant::now() + plan.drain;
        while Instant::now() < until {
            match stage_lags(&http, url).await {
                Ok(l) if l.values().all(|v| *v == 0) => break,
                _ => tokio::time::sleep(Duration::from_millis(250)).await,
            }
        }
    }
    if let Some(s) = sampling {
        s.abort();
    }
    let elapsed = started.elapsed().as_secs_f64().max(1e-9);
    report.generator_cpu_cores = own_cpu
        .zip(voxgate_protocol::time::process_cpu_seconds(None))
        .map(|(before, after)| (after - before) / elapsed);
    if let (Some(url), Some(before)) = (&plan.metrics_url, before) {
        // A failed scrape at the end loses the node's side, not the run's report.
        let after = match scrape(&http, url).await {
            Ok(a) => a,
            Err(e) => {
                report.streams.errors.push(format!("final metrics scrape: {e:#}"));
                return Ok(report);
            }
        };
        let d = |name: &str| (counter(&after, name) - counter(&before, name)).max(0.0) as u64;
        let cpu =
            (counter(&after, "voxgate_process_cpu_seconds") - counter(&before, "voxgate_process_cpu_seconds")).max(0.0);
        let cpu = (counter(&after, "voxgate_process_cpu_seconds") > 0.0).then_some(cpu);
        let requests = report.webhooks.ok + report.status_callbacks.ok;
        let (received, shed) = (d("twilio_audio_chunks_received_total"), d("voxgate_audio_shed_frames_total"));
        let hq_where = |name: &str, label: &str, q: f64| {
            histogram_quantile_where(&before, &after, name, label, q).map(|s| s * 1000.0)
        };
        let hq = |name: &str, q: f64| hq_where(name, "", q);
        const INBOUND: &str = "endpoint=\"inbound\"";
        let mut node = NodeSide {
            frames_received: received,
            frames_shed: shed,
            frames_lost: report.streams.frames_sent as i64 - received as i64,
            media_ingest_p50_ms: hq("voxgate_media_ingest_seconds", 0.5),
            media_ingest_p99_ms: hq("voxgate_media_ingest_seconds", 0.99),
            webhook_answer_p50_ms: hq_where("http_request_duration_seconds", INBOUND, 0.5),
            webhook_answer_p99_ms: hq_where("http_request_duration_seconds", INBOUND, 0.99),
            speech_segments: d("voxgate_speech_segments_total"),
            transcripts: d("voxgate_transcripts_total"),
            transcript_delay_p50_ms: hq("voxgate_transcript_delay_seconds", 0.5),
            transcript_delay_p95_ms: hq("voxgate_transcript_delay_seconds", 0.95),
            stage_lag_max: lag_max.lock().unwrap_or_else(|e| e.into_inner()).clone(),
            stage_lag_end: BTreeMap::new(),
            cpu_seconds: cpu,
            cpu_cores: cpu.map(|c| c / elapsed),
            cpu_us_per_request: cpu.filter(|_| requests > 0).map(|c| c * 1e6 / requests as f64),
        };
        if let Some(url) = &plan.health_url {
            node.stage_lag_end = stage_lags(&http, url).await.unwrap_or_default();
        }
        report.node = Some(node);
    }
    Ok(report)
}

/// The calls: each due at `t0 + i / rate`, sent then even if earlier ones are still waiting.
async fn run_calls(sim: Arc<Simulator>, plan: &Plan, base: u128, t0: Instant) -> (Samples, Samples) {
    let hooks: Arc<Mutex<Samples>> = Arc::default();
    let callbacks: Arc<Mutex<Samples>> = Arc::default();
    let n = (plan.rate * plan.duration.as_secs_f64()).round() as u64;
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..n {
        let due = t0 + Duration::from_secs_f64(i as f64 / plan.rate);
        tokio::time::sleep_until(due).await;
        let (sim, hooks, callbacks, to, hold) =
            (sim.clone(), hooks.clone(), callbacks.clone(), plan.to.clone(), plan.hold);
        tasks.spawn(async move {
            let call = CallSid::from_u128(base + u128::from(i));
            let from = format!("+1415{:07}", i % 10_000_000);
            match sim.inbound_call(call, &from, &to).await {
                Ok(a) if a.status == 200 && a.body.contains("<Response") && !a.body.contains("<Reject") => {
                    lock(&hooks).ms.push(crate::bench::ms(due.elapsed()));
                }
                Ok(a) => {
                    lock(&hooks).fail(format!("{}: {}", a.status, a.body.chars().take(200).collect::<String>()));
                    return;
                }
                Err(e) => {
                    lock(&hooks).fail(format!("{e:#}"));
                    return;
                }
            }
            let due = due + hold;
            tokio::time::sleep_until(due).await;
            match sim.status_callback(call, "completed", 2, Some(hold.as_secs().max(1) as u32)).await {
                Ok(code) if code / 100 == 2 => lock(&callbacks).ms.push(crate::bench::ms(due.elapsed())),
                Ok(code) => lock(&callbacks).fail(format!("status callback answered {code}")),
                Err(e) => lock(&callbacks).fail(format!("{e:#}")),
            }
        });
        // Reap what is done so the set stays as large as what is in flight.
        while tasks.try_join_next().is_some() {}
    }
    while tasks.join_next().await.is_some() {}
    let take = |s: Arc<Mutex<Samples>>| std::mem::take(&mut *lock(&s));
    (take(hooks), take(callbacks))
}

/// The streams: started over the first second, each sending a frame every 20 ms until the end.
async fn run_streams(sim: Arc<Simulator>, plan: Plan, base: u128, t0: Instant) -> Streams {
    let frames = (plan.duration.as_millis() / 20) as u64;
    let late: Arc<Mutex<Vec<f64>>> = Arc::default();
    let mut tasks = tokio::task::JoinSet::new();
    for s in 0..plan.streams {
        let (sim, audio, late, to) = (sim.clone(), plan.audio.clone(), late.clone(), plan.to.clone());
        let start = t0 + Duration::from_secs_f64(s as f64 / plan.streams as f64);
        tasks.spawn(async move {
            tokio::time::sleep_until(start).await;
            let mut sent = 0;
            let r =
                one_stream(&sim, CallSid::from_u128(base + s as u128), s, &to, &audio, frames, &late, &mut sent).await;
            // Frames a stream sent before it failed were still sent (the node counts them).
            (sent, r)
        });
    }
    let mut out = Streams { streams: plan.streams, ..Default::default() };
    while let Some(r) = tasks.join_next().await {
        match r {
            Ok((sent, Ok(()))) => {
                out.connected += 1;
                out.frames_sent += sent;
            }
            Ok((sent, Err(e))) => {
                out.frames_sent += sent;
                out.failed += 1;
                if out.errors.len() < 5 {
                    out.errors.push(format!("{e:#}"));
                }
            }
            Err(e) => {
                out.failed += 1;
                out.errors.push(e.to_string());
            }
        }
    }
    let mut late = std::mem::take(&mut *lock(&late));
    if !late.is_empty() {
        out.send_late_p99_ms = quantile(&mut late, 0.99);
        out.send_late_max_ms = quantile(&mut late, 1.0);
    }
    out
}

/// One call with a Media Stream playing `audio` (looped) for `frames` frames, each on its
/// schedule; `sent` counts the frames that went out, whatever happens after.
#[allow(clippy::too_many_arguments)]
async fn one_stream(
    sim: &Simulator,
    call: CallSid,
    s: usize,
    to: &str,
    audio: &[u8],
    frames: u64,
    late: &Mutex<Vec<f64>>,
    sent: &mut u64,
) -> anyhow::Result<()> {
    let answer = sim.inbound_call(call, &format!("+1628{s:07}"), to).await?;
    let Some(url) = answer.stream_url else {
        anyhow::bail!("no <Stream> in the answer ({}): {}", answer.status, answer.body)
    };
    let mut ws = sim.connect_stream(&url).await?;
    let sid = StreamSid::from_u128(call.as_u128() ^ 0x5a5a);
    ws.start(sid, sim.account(), call).await?;
    let chunks: Vec<&[u8]> = audio.chunks_exact(160).collect();
    anyhow::ensure!(!chunks.is_empty(), "no audio to send");
    let mut mine = Vec::with_capacity(frames as usize);
    let t = Instant::now();
    for k in 0..frames {
        let due = t + Duration::from_millis(20 * k);
        tokio::time::sleep_until(due).await;
        mine.push(crate::bench::ms(due.elapsed()));
        ws.send_frame(sid, k, chunks[(k as usize) % chunks.len()]).await?;
        *sent += 1;
    }
    ws.stop(sid, sim.account(), call).await?;
    ws.close().await;
    let code = sim.status_callback(call, "completed", 2, Some((frames / 50).max(1) as u32)).await?;
    anyhow::ensure!(code / 100 == 2, "status callback answered {code}");
    lock(late).extend(mine);
    Ok(())
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The metrics of every node in `urls` (comma-separated), one text: counters and histogram
/// buckets add up over the nodes (a split deployment's CPU is its nodes' CPU).
async fn scrape(http: &reqwest::Client, urls: &str) -> anyhow::Result<String> {
    let mut text = String::new();
    for url in urls.split(',').map(str::trim).filter(|u| !u.is_empty()) {
        text.push_str(&http.get(url).send().await?.error_for_status()?.text().await?);
        text.push('\n');
    }
    Ok(text)
}

/// Each stage's `lag_events` from the node's health.
async fn stage_lags(http: &reqwest::Client, url: &str) -> anyhow::Result<BTreeMap<String, u64>> {
    let v: serde_json::Value = serde_json::from_str(&http.get(url).send().await?.text().await?)?;
    let mut out = BTreeMap::new();
    if let Some(stages) = v["stages"].as_object() {
        for (name, s) in stages {
            out.insert(name.clone(), s["lag_events"].as_u64().unwrap_or(0));
        }
    }
    Ok(out)
}

/// The sum of a counter over all its label sets, in Prometheus text format.
pub fn counter(text: &str, name: &str) -> f64 {
    text.lines()
        .filter(|l| l.strip_prefix(name).is_some_and(|r| r.starts_with(' ') || r.starts_with('{')))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// The cumulative bucket counts of a histogram, by upper bound, summed over the label sets whose
/// labels contain `label` (every set when it is empty).
fn buckets(text: &str, name: &str, label: &str) -> Vec<(f64, f64)> {
    let prefix = format!("{name}_bucket{{");
    let mut by: BTreeMap<u64, (f64, f64)> = BTreeMap::new();
    for l in text.lines().filter(|l| l.starts_with(&prefix) && l.contains(label)) {
        let Some(le) = l.split("le=\"").nth(1).and_then(|r| r.split('"').next()) else { continue };
        let le = if le == "+Inf" { f64::INFINITY } else { le.parse().unwrap_or(f64::INFINITY) };
        let Some(n) = l.rsplit(' ').next().and_then(|v| v.parse::<f64>().ok()) else { continue };
        by.entry(le.to_bits()).or_insert((le, 0.0)).1 += n;
    }
    let mut v: Vec<(f64, f64)> = by.into_values().collect();
    v.sort_by(|a, b| a.0.total_cmp(&b.0));
    v
}

/// The `q`-quantile of what a histogram recorded between two scrapes, as the upper bound of the
/// bucket it falls in (`None` when nothing was recorded or it falls past the last bound).
pub fn histogram_quantile(before: &str, after: &str, name: &str, q: f64) -> Option<f64> {
    histogram_quantile_where(before, after, name, "", q)
}

/// [`histogram_quantile`] over the label sets that contain `label` (e.g. `endpoint="inbound"`).
pub fn histogram_quantile_where(before: &str, after: &str, name: &str, label: &str, q: f64) -> Option<f64> {
    let (b, a) = (buckets(before, name, label), buckets(after, name, label));
    let count = |v: &[(f64, f64)], le: f64| v.iter().find(|(l, _)| *l == le).map_or(0.0, |(_, n)| *n);
    let total = a.last().map(|(le, n)| n - count(&b, *le))?;
    if total <= 0.0 {
        return None;
    }
    a.iter()
        .map(|(le, n)| (*le, n - count(&b, *le)))
        .find(|(_, n)| *n >= q * total)
        .map(|(le, _)| le)
        .filter(|le| le.is_finite())
}

/// The report as a table.
pub fn table(r: &Report) -> String {
    use std::fmt::Write;
    let mut s = String::new();
    let _ = writeln!(
        s,
        "offered {:.0} calls/s for {:.0} s, {} concurrent streams",
        r.offered_calls_per_sec, r.duration_secs, r.streams.streams
    );
    let _ = writeln!(
        s,
        "{:<18} {:>8} {:>7} {:>9} {:>8} {:>8} {:>8} {:>8} {:>8}",
        "", "ok", "failed", "per s", "p50 ms", "p90 ms", "p99 ms", "p99.9", "max ms"
    );
    for (name, q) in [("webhooks", &r.webhooks), ("status callbacks", &r.status_callbacks)] {
        let _ = writeln!(
            s,
            "{:<18} {:>8} {:>7} {:>9.0} {:>8.2} {:>8.2} {:>8.2} {:>8.2} {:>8.2}",
            name, q.ok, q.failed, q.per_sec, q.p50_ms, q.p90_ms, q.p99_ms, q.p999_ms, q.max_ms
        );
    }
    let st = &r.streams;
    let _ = writeln!(
        s,
        "streams: {} connected, {} failed, {} frames sent; client send lateness p99 {:.1} ms, max {:.1} ms",
        st.connected, st.failed, st.frames_sent, st.send_late_p99_ms, st.send_late_max_ms
    );
    if let Some(n) = &r.node {
        let b = |v: Option<f64>| v.map_or("-".to_owned(), |v| format!("≤ {v:.1}"));
        let _ = writeln!(
            s,
            "node: {} frames received, {} shed, {} lost; media ingest p50 {} ms, p99 {} ms",
            n.frames_received,
            n.frames_shed,
            n.frames_lost,
            b(n.media_ingest_p50_ms),
            b(n.media_ingest_p99_ms)
        );
        if r.webhooks.sent > 0 {
            let _ = writeln!(
                s,
                "node: inbound webhook answered (its own histogram) p50 {} ms, p99 {} ms",
                b(n.webhook_answer_p50_ms),
                b(n.webhook_answer_p99_ms)
            );
        }
        let _ = writeln!(
            s,
            "node: {} speech segments, {} transcripts; segment closed → transcript p50 {} ms, p95 {} ms",
            n.speech_segments,
            n.transcripts,
            b(n.transcript_delay_p50_ms),
            b(n.transcript_delay_p95_ms)
        );
        let lags: Vec<String> = n
            .stage_lag_max
            .iter()
            .map(|(k, v)| format!("{k} {v} (end {})", n.stage_lag_end.get(k).copied().unwrap_or(0)))
            .collect();
        let _ = writeln!(s, "stage lag, max events: {}", lags.join(", "));
        if let (Some(cpu), Some(cores)) = (n.cpu_seconds, n.cpu_cores) {
            let per = n.cpu_us_per_request.map_or(String::new(), |u| format!(", {u:.0} µs per request"));
            let _ = writeln!(s, "node CPU: {cpu:.1} s, {cores:.2} cores{per}");
        }
    }
    if let Some(g) = r.generator_cpu_cores {
        let _ = writeln!(s, "generator CPU: {g:.2} cores (on the same machine)");
    }
    for e in r.webhooks.errors.iter().chain(&r.status_callbacks.errors).chain(&r.streams.errors) {
        let _ = writeln!(s, "error: {e}");
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    const BEFORE: &str = "x_bucket{le=\"0.01\"} 1\nx_bucket{le=\"0.1\"} 2\nx_bucket{le=\"+Inf\"} 2\nc_total 3\n";
    const AFTER: &str = "x_bucket{le=\"0.01\"} 91\nx_bucket{le=\"0.1\"} 101\nx_bucket{le=\"+Inf\"} 102\nc_total{a=\"1\"} 5\nc_total{a=\"2\"} 4\nc_total_other 7\n";

    #[test]
    fn histogram_quantiles_are_of_the_difference() {
        // 100 recorded between the scrapes: 90 ≤ 10 ms, 9 more ≤ 100 ms, 1 beyond.
        assert_eq!(histogram_quantile(BEFORE, AFTER, "x", 0.5), Some(0.01));
        assert_eq!(histogram_quantile(BEFORE, AFTER, "x", 0.95), Some(0.1));
        assert_eq!(histogram_quantile(BEFORE, AFTER, "x", 0.999), None);
        assert_eq!(histogram_quantile(AFTER, AFTER, "x", 0.5), None);
    }

    #[test]
    fn a_label_picks_its_own_sets_of_a_histogram() {
        let before = "h_bucket{endpoint=\"inbound\",le=\"0.01\"} 0\nh_bucket{endpoint=\"inbound\",le=\"+Inf\"} 0\n\
                      h_bucket{endpoint=\"status\",le=\"0.01\"} 0\nh_bucket{endpoint=\"status\",le=\"+Inf\"} 0\n";
        // 10 inbound answers, all within 10 ms; 10 status answers, all slower.
        let after = "h_bucket{endpoint=\"inbound\",le=\"0.01\"} 10\nh_bucket{endpoint=\"inbound\",le=\"+Inf\"} 10\n\
                     h_bucket{endpoint=\"status\",le=\"0.01\"} 0\nh_bucket{endpoint=\"status\",le=\"+Inf\"} 10\n";
        assert_eq!(histogram_quantile_where(before, after, "h", "endpoint=\"inbound\"", 0.99), Some(0.01));
        assert_eq!(histogram_quantile_where(before, after, "h", "endpoint=\"status\"", 0.5), None);
        assert_eq!(histogram_quantile(before, after, "h", 0.4), Some(0.01));
        assert_eq!(histogram_quantile(before, after, "h", 0.9), None);
    }

    #[test]
    fn counters_sum_label_sets_and_only_their_own_name() {
        assert_eq!(counter(AFTER, "c_total"), 9.0);
        assert_eq!(counter(BEFORE, "c_total"), 3.0);
    }
}
