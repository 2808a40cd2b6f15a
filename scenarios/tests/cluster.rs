//! A voxgate cluster on NATS JetStream, through the real binary: one `nats-server -js` (our own,
//! on a free loopback port) and three nodes — ingress+call, transcode+stt, fraud+billing. Fifty
//! calls with speech; the transcode+stt node is SIGKILLed mid-run and started again beside a
//! second transcode+stt node, and the two split the partitions. Afterwards every call has its
//! speech segment, transcript and fraud verdicts exactly once, and they and the usage equal an
//! embedded (sled) node's over the same traffic.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use serde_json::Value;
use voxgate_protocol::{CallSid, Event, SystemClock};
use voxgate_scenarios::fixture::{
    calls_usage, calls_usage_once, cluster_reader, config, each_event_once, node_specs, sim, NUMBER, SECRETS_KEY,
};
use voxgate_scenarios::nats::Nats;
use voxgate_scenarios::node::Node;
use voxgate_scenarios::speech::{script, Voice};
use voxgate_scenarios::twilio::Pace;
use voxgate_storage::{topics, Log};

const CALLS: u128 = 50;

fn node_config(nats: &str, roles: &str, node: &str) -> String {
    config(&format!(
        "secrets_key = \"{SECRETS_KEY}\"\n[cluster]\nnats_url = \"{nats}\"\nroles = \"{roles}\"\nnode = \"{node}\"\nlease_ttl_secs = 3\n"
    ))
}

fn call_sid(i: u128) -> CallSid {
    CallSid::from_u128(0xC1_0000 + i)
}

/// Places calls `range` against `node`, four at a time.
async fn place(node: &Node, audio: &Arc<Vec<u8>>, range: std::ops::Range<u128>) {
    let ids: Vec<u128> = range.collect();
    for chunk in ids.chunks(4) {
        let mut tasks = Vec::new();
        for &i in chunk {
            let (s, audio) = (sim(node), audio.clone());
            tasks.push(tokio::spawn(async move {
                s.call(call_sid(i), &format!("+1415555{:04}", 2000 + i), NUMBER, &audio, Pace::Faster(4)).await
            }));
        }
        for t in tasks {
            t.await.unwrap().unwrap();
        }
    }
}

/// Per call: speech segments, transcript texts and the rules of its fraud verdicts. Fails on any
/// event stored twice.
#[derive(Debug, Default, PartialEq)]
struct PerCall {
    segments: usize,
    transcripts: Vec<String>,
    verdicts: Vec<Vec<String>>,
}

fn collect(log: &Log) -> BTreeMap<CallSid, PerCall> {
    let mut out: BTreeMap<CallSid, PerCall> = BTreeMap::new();
    each_event_once(log, &[topics::SPEECH, topics::TRANSCRIPTS, topics::CALLS, topics::FRAUD], |env| {
        let Some(call) = env.call else { return };
        match env.payload {
            Event::SpeechSegment(_) => out.entry(call).or_default().segments += 1,
            Event::Transcript(t) => out.entry(call).or_default().transcripts.push(t.text),
            Event::FraudVerdict(v) => {
                out.entry(call).or_default().verdicts.push(v.hits.into_iter().map(|h| h.rule).collect())
            }
            _ => {}
        }
    });
    for c in out.values_mut() {
        c.transcripts.sort();
        c.verdicts.sort();
    }
    out
}

/// The stt partitions a node holds now (health).
async fn stt_share(node: &Node) -> Vec<u64> {
    let (_, h) = node.get_json("/api/voice/health").await.unwrap();
    h["stages"]["stt"]["partitions"]
        .as_array()
        .map(|a| a.iter().filter_map(Value::as_u64).collect())
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_on_jetstream_survive_a_sigkill_and_match_an_embedded_node() {
    let work = tempfile::tempdir().unwrap();
    let s = script(&[("Please check the status of my order.", Voice::Espeak("en-us".into()))], 400, 0, work.path())
        .unwrap();
    let mut audio = s.mulaw.clone();
    audio.extend(std::iter::repeat_n(0xffu8, 8 * 600));
    let audio = Arc::new(audio);

    let nats = Nats::fresh();
    let url = nats.url();
    let ingress = Node::start(&node_config(&url, "ingress,call", "ingress")).unwrap();
    let mut speech = Node::start(&node_config(&url, "transcode,stt", "speech")).unwrap();
    let decisions = Node::start(&node_config(&url, "fraud,billing", "decisions")).unwrap();
    let (_, h) = speech.get_json("/api/voice/health").await.unwrap();
    assert_eq!(h["log"]["backend"], "jetstream", "{h}");
    assert_eq!(h["roles"], serde_json::json!(["transcode", "stt"]), "{h}");

    place(&ingress, &audio, 0..20).await;
    // The speech node dies mid-run (SIGKILL: no goodbye); calls go on; it comes back.
    speech.kill();
    place(&ingress, &audio, 20..35).await;
    let dir = std::mem::replace(&mut speech.dir, tempfile::tempdir().unwrap());
    let speech = Node::start_in(dir, speech.config_path.clone(), &[]).unwrap();
    // A second node of the same roles: the two split the partitions between them.
    let speech2 = Node::start(&node_config(&url, "transcode,stt", "speech2")).unwrap();
    // Normally a couple of seconds; the bound is for a loaded machine.
    let split = tokio::time::Instant::now();
    let deadline = split + Duration::from_secs(60);
    loop {
        let (a, b) = (stt_share(&speech).await, stt_share(&speech2).await);
        let mut all: Vec<u64> = a.iter().chain(&b).copied().collect();
        all.sort();
        if !a.is_empty() && !b.is_empty() && all == [0, 1, 2, 3] {
            println!("the speech nodes split the partitions in {:?}", split.elapsed());
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the speech nodes did not split the partitions: {a:?} {b:?}\nspeech:\n{}\nspeech2:\n{}",
            speech.logs(),
            speech2.logs()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    place(&ingress, &audio, 35..CALLS).await;

    // A reader of our own on the cluster's log: every call's transcript, once.
    let (_reader_dir, reader) = cluster_reader(&url).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(240);
    let clustered = loop {
        let got = collect(&reader);
        let done = got.values().filter(|c| !c.transcripts.is_empty()).count();
        if done == CALLS as usize {
            break got;
        }
        assert!(tokio::time::Instant::now() < deadline, "only {done} of {CALLS} calls transcribed:\n{}", speech.logs());
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    for (call, c) in &clustered {
        assert_eq!(c.segments, 1, "{call}: {c:?}");
        assert_eq!(c.transcripts.len(), 1, "{call}: {c:?}");
    }
    // Both speech nodes transcribed (each on its own partitions).
    for n in [&speech, &speech2] {
        let m = n.scrape().await.unwrap();
        let done = m
            .lines()
            .find(|l| l.starts_with("twilio_stt_latency_seconds_count"))
            .and_then(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .unwrap_or(0.0);
        assert!(done > 0.0, "a speech node transcribed nothing:\n{m}");
    }
    // Usage is kept on every node; the decisions node acts on it.
    let cluster_usage = calls_usage_once(&ingress, CALLS).await;
    assert_eq!(calls_usage(&decisions).await, cluster_usage);
    let (_, h) = decisions.get_json("/api/voice/health").await.unwrap();
    assert_eq!(h["stages"]["fraud"]["state"], "running", "{h}");
    drop((ingress, speech, speech2, decisions, reader));

    // The same traffic through one embedded node.
    let mut embedded = Node::start(&config("")).unwrap();
    place(&embedded, &audio, 0..CALLS).await;
    embedded.wait_idle(Duration::from_secs(240)).await.unwrap();
    let embedded_usage = calls_usage(&embedded).await;
    embedded.stop().unwrap();
    let log = Log::open(&embedded.dir.path().join("data").join("log"), &node_specs(), Arc::new(SystemClock)).unwrap();
    let alone = collect(&log);
    assert_eq!(clustered, alone, "the cluster and the embedded node disagree");
    assert_eq!(cluster_usage, embedded_usage);
    assert_eq!(cluster_usage["count"], serde_json::json!(CALLS.to_string()), "{cluster_usage}");
}
