//! The ingress decoupled from the calls, through the real binary on our own `nats-server -js`:
//! five nodes — two ingress-only nodes, two `call,transcode,stt` nodes, one `fraud,billing` node.
//! Talking calls arrive on both ingress nodes; each says one sentence, pauses, and says another.
//!
//! - While the first sentences are still streaming, a call node is SIGKILLed: the other takes its
//!   partitions, gives its calls their actors back from the log, and the ingress nodes send it
//!   what the dead node had not acknowledged.
//! - Between the sentences an ingress node is SIGKILLed: its streams fall silent, the calls'
//!   actors record one drop each and ask Twilio (a fake here) to re-attach the stream, and the
//!   caller goes on through the live ingress node.
//!
//! Afterwards every call completed, every sentence was transcribed exactly once, the usage is
//! exact, and the transcripts and fraud verdicts equal an embedded node's over the same calls.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;
use voxgate_protocol::event::CallStatus;
use voxgate_protocol::{CallSid, Event, StreamSid, SystemClock};
use voxgate_scenarios::fixture::{
    callback_overtakes_stream, calls_usage, calls_usage_once, cluster_reader, config, each_event_once, node_specs, sim,
    ACCOUNT, NUMBER, SECRETS_KEY,
};
use voxgate_scenarios::nats::Nats;
use voxgate_scenarios::node::Node;
use voxgate_scenarios::recorder::Recorder;
use voxgate_scenarios::speech::{script, Voice};
use voxgate_scenarios::twilio::{extract_attr, MediaStream, Pace};
use voxgate_storage::{topics, Log};

const CALLS: u128 = 50;
/// Every call at once, on every node (the test is about the calls, not the quotas); greedy
/// decoding (the test is about the cluster, not accuracy: beam search's extra CPU, on two cores
/// shared by five debug-build nodes, only slows it down).
const SETTINGS: &str = "[quotas]\nmax_concurrent_calls = 1000\ncalls_per_second = 1000\n[stt]\nbeam_size = 1\n";

fn node_config(nats: &str, twilio: &str, roles: &str, node: &str) -> String {
    config(&format!(
        "twilio_api_url = \"{twilio}\"\nsecrets_key = \"{SECRETS_KEY}\"\n{SETTINGS}[cluster]\nnats_url = \"{nats}\"\nroles = \"{roles}\"\nnode = \"{node}\"\nlease_ttl_secs = 3\n"
    ))
}

fn call_sid(i: u128) -> CallSid {
    CallSid::from_u128(0xC2_0000 + i)
}

fn caller(i: u128) -> String {
    format!("+1415555{:04}", 3000 + i)
}

/// Per call: transcript texts (normalised), fraud verdicts' rules, drops, and whether it ended.
#[derive(Debug, Default, PartialEq)]
struct PerCall {
    transcripts: Vec<String>,
    verdicts: Vec<Vec<String>>,
    drops: usize,
    completed: bool,
}

fn normalise(t: &str) -> String {
    t.chars().filter(|c| c.is_alphanumeric() || c.is_whitespace()).collect::<String>().to_lowercase().trim().to_owned()
}

/// Fails on any event stored twice.
fn collect(log: &Log) -> BTreeMap<CallSid, PerCall> {
    let mut out: BTreeMap<CallSid, PerCall> = BTreeMap::new();
    each_event_once(log, &[topics::TRANSCRIPTS, topics::CALLS, topics::FRAUD], |env| {
        let Some(call) = env.call else { return };
        let c = out.entry(call).or_default();
        match env.payload {
            Event::Transcript(t) => c.transcripts.push(normalise(&t.text)),
            Event::FraudVerdict(v) => c.verdicts.push(v.hits.into_iter().map(|h| h.rule).collect()),
            Event::StreamDropped(_) => c.drops += 1,
            Event::CallStatusChanged(s) if s.status == CallStatus::Completed => c.completed = true,
            _ => {}
        }
    });
    for c in out.values_mut() {
        c.transcripts.sort();
        c.verdicts.sort();
    }
    out
}

/// Sends `audio` in 20 ms frames, twice real time, numbering on from `next`.
async fn send(ws: &mut MediaStream, sid: StreamSid, audio: &[u8], next: &mut u64) -> anyhow::Result<()> {
    let mut tick = tokio::time::interval(Duration::from_millis(10));
    for frame in audio.chunks(160) {
        tick.tick().await;
        ws.send_frame(sid, *next, frame).await?;
        *next += 1;
    }
    Ok(())
}

/// Sends silence in real time until `go` (Twilio never stops sending while a call is up).
async fn silence_until(
    ws: &mut MediaStream,
    sid: StreamSid,
    next: &mut u64,
    go: &mut tokio::sync::watch::Receiver<bool>,
) -> anyhow::Result<()> {
    let mut tick = tokio::time::interval(Duration::from_millis(20));
    while !*go.borrow_and_update() {
        tokio::select! {
            _ = tick.tick() => {
                ws.send_frame(sid, *next, &[0xffu8; 160]).await?;
                *next += 1;
            }
            r = go.changed() => r?,
        }
    }
    Ok(())
}

async fn call_partitions(node: &Node) -> Vec<u64> {
    let Ok((_, h)) = node.get_json("/api/voice/health").await else { return Vec::new() };
    h["call_partitions"].as_array().map(|a| a.iter().filter_map(Value::as_u64).collect()).unwrap_or_default()
}

/// Waits until `nodes` hold every call partition between them, each at least one.
async fn wait_call_partitions(nodes: &[&Node], all: &[u64]) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let mut shares = Vec::new();
        for n in nodes {
            shares.push(call_partitions(n).await);
        }
        let mut union: Vec<u64> = shares.iter().flatten().copied().collect();
        union.sort();
        if union == all && shares.iter().all(|s| !s.is_empty()) {
            return;
        }
        assert!(tokio::time::Instant::now() < deadline, "the call nodes did not share the partitions: {shares:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn wait_until(
    diag: &dyn Fn() -> String,
    what: &str,
    within: Duration,
    failed: &std::sync::Mutex<Vec<String>>,
    mut f: impl FnMut() -> bool,
) {
    let deadline = tokio::time::Instant::now() + within;
    while !f() {
        let failed = failed.lock().unwrap().clone();
        assert!(failed.is_empty(), "calls failed while waiting for {what}: {failed:#?}\n{}", diag());
        assert!(tokio::time::Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ingress_and_call_nodes_die_mid_call_and_every_call_goes_on() {
    let work = tempfile::tempdir().unwrap();
    let v = Voice::Espeak("en-us".into());
    let first = script(&[("Please check the status of my order.", v.clone())], 400, 0, work.path()).unwrap();
    let second = script(&[("Thank you very much for your help.", v)], 400, 0, work.path()).unwrap();
    let tail = vec![0xffu8; 8 * 800];
    let part1: Arc<Vec<u8>> = Arc::new([first.mulaw.as_slice(), &tail].concat());
    let part2: Arc<Vec<u8>> = Arc::new([second.mulaw.as_slice(), &tail].concat());

    let nats = Nats::fresh();
    let url = nats.url();
    let twilio = Arc::new(Recorder::start(0).await.unwrap());
    let ingress1 = Node::start(&node_config(&url, &twilio.url, "ingress", "ingress1")).unwrap();
    let mut ingress2 = Node::start(&node_config(&url, &twilio.url, "ingress", "ingress2")).unwrap();
    let call_a = Node::start(&node_config(&url, &twilio.url, "call,transcode,stt", "calls-a")).unwrap();
    let mut call_b = Node::start(&node_config(&url, &twilio.url, "call,transcode,stt", "calls-b")).unwrap();
    let decisions = Node::start(&node_config(&url, &twilio.url, "fraud,billing", "decisions")).unwrap();
    let (_, h) = ingress1.get_json("/api/voice/health").await.unwrap();
    assert_eq!(h["roles"], serde_json::json!(["ingress"]), "{h}");
    assert_eq!(h["call_partitions"], Value::Null, "an ingress-only node runs no calls: {h}");
    let all: Vec<u64> = (0..node_specs().iter().find(|t| t.name == topics::CALLS).unwrap().partitions as u64).collect();
    wait_call_partitions(&[&call_a, &call_b], &all).await;

    // A reader of our own on the cluster's log.
    let (_reader_dir, reader) = cluster_reader(&url).await;

    let logs = [ingress1.log_path.clone(), call_a.log_path.clone()];
    let diag = move || {
        logs.iter().map(|p| std::fs::read_to_string(p).unwrap_or_default()).collect::<Vec<_>>().join("\n----\n")
    };
    let first_sent = Arc::new(AtomicUsize::new(0));
    let failed: Arc<std::sync::Mutex<Vec<String>>> = Arc::default();
    let (go, go_rx) = tokio::sync::watch::channel(false);
    let mut tasks = Vec::new();
    for i in 0..CALLS {
        let on_second = i % 2 == 1;
        let s = if on_second { sim(&ingress2) } else { sim(&ingress1) };
        let live = sim(&ingress1);
        let (part1, part2, first_sent, twilio) = (part1.clone(), part2.clone(), first_sent.clone(), twilio.clone());
        let mut go = go_rx.clone();
        let failed = failed.clone();
        tasks.push(tokio::spawn(async move {
            let r = async move {
                let call = call_sid(i);
                let answer = s.inbound_call(call, &caller(i), NUMBER).await?;
                let stream_url = answer.stream_url.ok_or_else(|| anyhow::anyhow!("no <Stream>: {}", answer.body))?;
                let mut ws = s.connect_stream(&stream_url).await?;
                let sid = StreamSid::from_u128(call.as_u128() ^ 0x5a5a);
                ws.start(sid, s.account(), call).await?;
                let mut next = 0;
                send(&mut ws, sid, &part1, &mut next).await?;
                first_sent.fetch_add(1, Ordering::SeqCst);
                if on_second {
                    // Its ingress node dies while the caller pauses.
                    let _ = silence_until(&mut ws, sid, &mut next, &mut go).await;
                    // Its ingress node is gone: the call's actor asks Twilio for a fresh stream,
                    // which Twilio opens through the live ingress node.
                    drop(ws);
                    let path = format!("/2010-04-01/Accounts/{ACCOUNT}/Calls/{call}.json");
                    let asked = twilio.wait_for(1, Duration::from_secs(60), |r| r.uri == path).await;
                    let twiml = asked
                        .first()
                        .and_then(|r| r.param("Twiml"))
                        .ok_or_else(|| anyhow::anyhow!("{call}: no re-attach asked"))?;
                    let fresh = extract_attr(&twiml, "<Stream", "url")
                        .ok_or_else(|| anyhow::anyhow!("no <Stream url> in {twiml}"))?;
                    let mut ws = live.connect_stream(&fresh).await?;
                    let sid2 = StreamSid::from_u128(call.as_u128() ^ 0xa5a5);
                    ws.start(sid2, s.account(), call).await?;
                    send(&mut ws, sid2, &part2, &mut 0).await?;
                    ws.stop(sid2, s.account(), call).await?;
                    ws.close().await;
                } else {
                    silence_until(&mut ws, sid, &mut next, &mut go).await?;
                    send(&mut ws, sid, &part2, &mut next).await?;
                    ws.stop(sid, s.account(), call).await?;
                    ws.close().await;
                }
                let secs = ((part1.len() + part2.len()) / 8000) as u32;
                let code = live.status_callback(call, "completed", 2, Some(secs)).await?;
                anyhow::ensure!(code / 100 == 2, "{call}: status callback answered {code}");
                anyhow::Ok(())
            }
            .await;
            if let Err(e) = &r {
                failed.lock().unwrap().push(format!("call {i}: {e:#}"));
            }
            r
        }));
    }

    // A call node dies while the first sentences stream; the other takes its partitions.
    let fs = first_sent.clone();
    wait_until(&diag, "half the first sentences", Duration::from_secs(120), &failed, || {
        fs.load(Ordering::SeqCst) >= CALLS as usize / 2
    })
    .await;
    call_b.kill();
    wait_call_partitions(&[&call_a], &all).await;
    wait_until(&diag, "every first sentence", Duration::from_secs(120), &failed, || {
        fs.load(Ordering::SeqCst) == CALLS as usize
    })
    .await;
    // Every first sentence transcribed before the ingress node dies (what it held is then lost
    // with it by design: one gap, recorded).
    wait_until(&diag, "the first sentences' transcripts", Duration::from_secs(420), &failed, || {
        let got = collect(&reader);
        got.values().filter(|c| !c.transcripts.is_empty()).count() == CALLS as usize
    })
    .await;
    ingress2.kill();
    go.send(true).unwrap();
    for t in tasks {
        t.await.unwrap().unwrap();
    }

    let deadline = tokio::time::Instant::now() + Duration::from_secs(240);
    let clustered = loop {
        let got = collect(&reader);
        let short: Vec<(&CallSid, &PerCall)> =
            got.iter().filter(|(_, c)| !c.completed || c.transcripts.len() != 2).collect();
        if got.len() == CALLS as usize && short.is_empty() {
            break got;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "calls not completed with both sentences ({} calls seen): {short:#?}\ncall node:\n{}\ningress:\n{}",
            got.len(),
            call_a.logs(),
            ingress1.logs()
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    for i in 0..CALLS {
        let c = &clustered[&call_sid(i)];
        assert_eq!(
            c.drops,
            usize::from(i % 2 == 1),
            "{}: one drop on the dead ingress node's calls only: {c:?}",
            call_sid(i)
        );
    }
    // Usage: kept on every node; exact.
    let usage = calls_usage_once(&ingress1, CALLS).await;
    assert_eq!(usage["count"], serde_json::json!(CALLS.to_string()), "{usage}");
    assert_eq!(calls_usage(&decisions).await, usage);
    let m = call_a.scrape().await.unwrap();
    assert!(m.contains("voxgate_calls_restored_total"), "the surviving call node restored the dead one's calls");
    drop((ingress1, ingress2, call_a, call_b, decisions, reader));

    // The same calls through one embedded node, on one stream each.
    let mut embedded = Node::start(&config(SETTINGS)).unwrap();
    let mut tasks = Vec::new();
    for i in 0..CALLS {
        let (s, audio) = (sim(&embedded), [part1.as_slice(), part2.as_slice()].concat());
        tasks.push(tokio::spawn(async move { s.call(call_sid(i), &caller(i), NUMBER, &audio, Pace::Faster(2)).await }));
    }
    for t in tasks {
        t.await.unwrap().unwrap();
    }
    embedded.wait_idle(Duration::from_secs(240)).await.unwrap();
    let embedded_usage = calls_usage(&embedded).await;
    embedded.stop().unwrap();
    let log = Log::open(&embedded.dir.path().join("data").join("log"), &node_specs(), Arc::new(SystemClock)).unwrap();
    let alone = collect(&log);
    for i in 0..CALLS {
        let (c, e) = (&clustered[&call_sid(i)], &alone[&call_sid(i)]);
        assert_eq!(c.transcripts, e.transcripts, "{}: transcripts differ from the embedded node's", call_sid(i));
        assert_eq!(c.verdicts, e.verdicts, "{}: fraud verdicts differ from the embedded node's", call_sid(i));
    }
    assert_eq!(usage, embedded_usage);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_completed_callback_that_overtakes_a_remote_stream_loses_no_audio() {
    // As in call_flow.rs, across the split: the callback reaches the ingress node while the
    // stream's last frames and `stop` are still on the socket; the call's actor (on the call
    // node) waits for them, through the ingress node's forwarder.
    let nats = Nats::fresh();
    let url = nats.url();
    let twilio = Recorder::start(0).await.unwrap();
    let settings = |roles: &str, node: &str| {
        config(&format!(
            "twilio_api_url = \"{}\"\nsecrets_key = \"{SECRETS_KEY}\"\n[stt]\nenabled = false\n[cluster]\nnats_url = \"{url}\"\nroles = \"{roles}\"\nnode = \"{node}\"\nlease_ttl_secs = 3\n",
            twilio.url
        ))
    };
    let ingress = Node::start(&settings("ingress", "ingress1")).unwrap();
    let calls = Node::start(&settings("call,transcode", "calls-a")).unwrap();
    let all: Vec<u64> = (0..node_specs().iter().find(|t| t.name == topics::CALLS).unwrap().partitions as u64).collect();
    wait_call_partitions(&[&calls], &all).await;

    let call = CallSid::from_u128(0xC3_0001);
    callback_overtakes_stream(&sim(&ingress), call, &caller(1), 500, 50).await.unwrap();

    // The media log, as a reader of our own sees it, until the stream's stop is on it.
    let (_dir, reader) = cluster_reader(&url).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let media = loop {
        let mut media = Vec::new();
        each_event_once(&reader, &[topics::MEDIA], |env| {
            if env.call == Some(call) {
                media.push(env.payload);
            }
        });
        if media.iter().any(|e| matches!(e, Event::StreamStopped(_))) {
            break media;
        }
        assert!(tokio::time::Instant::now() < deadline, "no stream_stopped on the media log: {} events", media.len());
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let frames: u64 = media
        .iter()
        .map(|e| match e {
            Event::MediaBatch(b) => u64::from(b.frames),
            _ => 0,
        })
        .sum();
    assert_eq!(frames, 550, "frames on the socket when the callback came were lost");
    let stops: Vec<_> = media
        .iter()
        .filter_map(|e| match e {
            Event::StreamStopped(st) => Some((st.reason.clone(), st.frames)),
            _ => None,
        })
        .collect();
    assert_eq!(stops, vec![(voxgate_protocol::event::StopReason::Twilio, 550)]);
    assert!(matches!(media.last(), Some(Event::StreamStopped(_))), "the stop comes after the audio");
}
