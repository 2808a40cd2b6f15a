//! The same traffic through the embedded log (sled, one process) and the clustered one (NATS
//! JetStream, our own `nats-server -js` on loopback), in one run:
//!
//! 1. **A stage hop**: one event appended by a producer stage and seen by the consuming stage. On
//!    the embedded log the two share the process; in the cluster the producer is one node (its
//!    own `Log`, data directory and NATS connection) and the consumer another, so the hop is
//!    publish → JetStream ack → the consumer node's mirror. Sequential events: the producer's
//!    append latency and the latency until the consumer sees the event, p50 and p99.
//! 2. **Throughput**: 64 producers appending call events as fast as they are acknowledged, and
//!    the time until the consuming node has all of them.
//! 3. **Webhooks** through the real binary: a signed inbound webhook answered once its event is
//!    durable, against one embedded node, against an `ingress,call` node of a cluster, and against
//!    an `ingress` node whose calls run on a separate `call` node (p50, p99, throughput at 32
//!    connections).
//! 4. **The ingress → call hop** (an `ingress` node and a `call` node): a Media Streams batch's
//!    last frame sent to the ingress node → the batch in the media log, as a reader of the
//!    cluster sees it (the call node has acknowledged it by then).
//!
//! `cargo run --release -p voxgate-scenarios --bin bench_cluster [events]`

use std::sync::Arc;
use std::time::Instant;

use voxgate_protocol::event::Direction;
use voxgate_protocol::{encode, AccountSid, CallSid, SystemClock};
use voxgate_scenarios::bench::{call_events, ms, quantile, webhook_figures};
use voxgate_scenarios::fixture::SECRETS_KEY;
use voxgate_scenarios::nats::Nats;
use voxgate_scenarios::node::Node;
use voxgate_storage::{topics, ClusterOptions, Log, TopicSpec};

const ACCOUNT: &str = "AC0123456789abcdef0123456789abcdef";
const TOKEN: &str = "9f3c1b2a7d4e5f60718293a4b5c6d7e8";
const NUMBER: &str = "+14155550100";
const WRITERS: usize = 64;

fn specs() -> Vec<TopicSpec> {
    topics::default_specs()
}

/// Call events as the calls log holds them (about 150 bytes each).
fn payloads(n: usize) -> Vec<(u64, Vec<u8>)> {
    let tenant = AccountSid::parse(ACCOUNT).expect("sid");
    (0..n.div_ceil(3) as u128)
        .flat_map(|i| {
            let call = CallSid::from_u128(0xBE00_0000 + i);
            call_events(
                0xbe,
                tenant,
                call,
                1_700_000_000_000_000,
                60,
                Direction::Inbound,
                "+14155550123".into(),
                NUMBER.into(),
            )
            .map(|e| (call.partition_key(), encode(&e)))
        })
        .take(n)
        .collect()
}

/// Waits until `reader` holds `offset` of `topic`/`partition`.
async fn seen(reader: &Log, rx: &mut tokio::sync::watch::Receiver<u64>, topic: &str, partition: u32, offset: u64) {
    while reader.durable_head(topic, partition).expect("head") <= offset {
        if rx.changed().await.is_err() {
            panic!("the consumer's log closed");
        }
    }
}

struct Hop {
    append: (f64, f64),
    visible: (f64, f64),
    rate: f64,
    drained: f64,
}

/// Sequential hops, then `WRITERS` concurrent producers, from `writer` to `reader`.
async fn measure(writer: &Log, reader: &Log, events: &[(u64, Vec<u8>)], sequential: usize) -> Hop {
    let topic = topics::CALLS;
    let mut rx = reader.watch(topic).expect("watch");
    let (mut append, mut visible) = (Vec::new(), Vec::new());
    for (key, payload) in events.iter().take(sequential) {
        let t = Instant::now();
        let at = writer.append(topic, *key, payload).await.expect("append");
        append.push(ms(t.elapsed()));
        seen(reader, &mut rx, topic, at.partition, at.offset).await;
        visible.push(ms(t.elapsed()));
    }
    let parts = reader.partitions(topic).expect("partitions");
    let heads = |log: &Log| (0..parts).map(|p| log.durable_head(topic, p).expect("head")).sum::<u64>();
    let target = heads(reader) + (events.len() - sequential) as u64;
    let rest = Arc::new(events[sequential..].to_vec());
    let start = Instant::now();
    let mut tasks = Vec::new();
    for w in 0..WRITERS {
        let (log, rest) = (writer.clone(), rest.clone());
        tasks.push(tokio::spawn(async move {
            for (key, payload) in rest.iter().skip(w).step_by(WRITERS) {
                log.append(topic, *key, payload).await.expect("append");
            }
        }));
    }
    for t in tasks {
        t.await.expect("writer");
    }
    let rate = rest.len() as f64 / start.elapsed().as_secs_f64();
    while heads(reader) < target {
        let _ = rx.changed().await;
    }
    let drained = ms(start.elapsed());
    Hop {
        append: (quantile(&mut append, 0.5), quantile(&mut append, 0.99)),
        visible: (quantile(&mut visible, 0.5), quantile(&mut visible, 0.99)),
        rate,
        drained,
    }
}

/// A node's config: embedded, or in the cluster at `url` with `roles`.
fn node_config(cluster: Option<(&str, &str)>) -> String {
    let cluster = cluster
        .map(|(url, roles)| {
            let node = roles.replace(',', "-");
            format!("secrets_key = \"{SECRETS_KEY}\"\n[cluster]\nnats_url = \"{url}\"\nroles = \"{roles}\"\nnode = \"{node}\"\n")
        })
        .unwrap_or_default();
    format!(
        "public_url = \"https://bench.voxgate.test\"\n{cluster}[stt]\nenabled = false\n[quotas]\nmax_concurrent_calls = 1000000\ncalls_per_second = 100000\n[callers]\nmax_calls_per_window = 0\n[fraud]\ndisabled_rules = [\"velocity_from\", \"spend_velocity\"]\n[[tenants]]\naccount_sid = \"{ACCOUNT}\"\nauth_token = \"{TOKEN}\"\nnumbers = [\"{NUMBER}\"]\n"
    )
}

/// One call's stream through `ingress`: each 5-frame batch's last frame sent → the batch seen on
/// the media log by a reader of the cluster; p50 and p99 in ms.
async fn stream_hop(ingress: &Node, nats_url: &str, batches: usize) -> anyhow::Result<(f64, f64)> {
    // The nodes' topics (the fixture's partitions), not this bench's own.
    let (_dir, reader) = voxgate_scenarios::fixture::cluster_reader(nats_url).await;
    let account = AccountSid::parse(ACCOUNT)?;
    let sim = voxgate_scenarios::twilio::Simulator::new(&ingress.url(), "https://bench.voxgate.test", account, TOKEN);
    let call = CallSid::from_u128(0x40b0);
    let answer = sim.inbound_call(call, "+14155550123", NUMBER).await?;
    let url = answer.stream_url.ok_or_else(|| anyhow::anyhow!("no <Stream>: {}", answer.body))?;
    let mut ws = sim.connect_stream(&url).await?;
    let sid = voxgate_protocol::StreamSid::from_u128(0x40b0);
    ws.start(sid, account, call).await?;
    let partition = reader.partition_of(topics::MEDIA, call.partition_key())?;
    let mut rx = reader.watch(topics::MEDIA)?;
    let (mut next, mut seen_batches, mut recs) = (reader.first_offset(topics::MEDIA, partition)?, 0usize, Vec::new());
    let mut lat = Vec::with_capacity(batches);
    let frame = [0xffu8; 160];
    for b in 0..batches as u64 {
        for f in 0..5 {
            ws.send_frame(sid, b * 5 + f, &frame).await?;
        }
        let sent = Instant::now();
        while seen_batches <= b as usize {
            recs.clear();
            next = reader.read(topics::MEDIA, partition, next, 256, &mut recs)?;
            for r in &recs {
                let env = voxgate_protocol::decode(r.payload())?;
                if env.call == Some(call) && matches!(env.payload, voxgate_protocol::Event::MediaBatch(_)) {
                    seen_batches += 1;
                }
            }
            if recs.is_empty() {
                let _ = tokio::time::timeout(std::time::Duration::from_millis(50), rx.changed()).await;
            }
        }
        lat.push(ms(sent.elapsed()));
    }
    ws.stop(sid, account, call).await?;
    lat.sort_by(f64::total_cmp);
    Ok((quantile(&mut lat, 0.5), quantile(&mut lat, 0.99)))
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> anyhow::Result<()> {
    let n: usize = std::env::args().nth(1).and_then(|a| a.parse().ok()).unwrap_or(20_000);
    let sequential = 1000.min(n / 2);
    let events = payloads(n);
    let nats = Nats::fresh();
    let clock = Arc::new(SystemClock);

    // Embedded: producer and consumer stages share one sled log.
    let dir = tempfile::tempdir()?;
    let log = Log::open(dir.path(), &specs(), clock.clone())?;
    let embedded = measure(&log, &log, &events, sequential).await;
    log.close().await?;

    // Clustered: producer node and consumer node, each with its own log on the JetStream server.
    let (wdir, rdir) = (tempfile::tempdir()?, tempfile::tempdir()?);
    let opts = ClusterOptions::new(&nats.url());
    let writer = Log::open_cluster(wdir.path(), &specs(), clock.clone(), 64 << 20, &opts).await?;
    let reader = Log::open_cluster(rdir.path(), &specs(), clock.clone(), 64 << 20, &opts).await?;
    let clustered = measure(&writer, &reader, &events, sequential).await;
    writer.close().await?;
    reader.close().await?;

    let hooks = (n / 10).max(200);
    let node = Node::start(&node_config(None))?;
    let wh_embedded = webhook_figures(&node, ACCOUNT, TOKEN, NUMBER, hooks).await?;
    drop(node);
    let wh_nats = Nats::fresh();
    let node = Node::start(&node_config(Some((&wh_nats.url(), "ingress,call"))))?;
    let wh_cluster = webhook_figures(&node, ACCOUNT, TOKEN, NUMBER, hooks).await?;
    drop(node);
    let split_nats = Nats::fresh();
    let calls = Node::start(&node_config(Some((&split_nats.url(), "call"))))?;
    let ingress = Node::start(&node_config(Some((&split_nats.url(), "ingress"))))?;
    let wh_split = webhook_figures(&ingress, ACCOUNT, TOKEN, NUMBER, hooks).await?;
    let batches = 300;
    let hop = stream_hop(&ingress, &split_nats.url(), batches).await?;
    drop((ingress, calls));

    println!("one stage hop on loopback, release build: {sequential} sequential call events, then {} from {WRITERS} producers", n - sequential);
    println!("{:<40} {:>12} {:>12} {:>8}", "", "embedded", "JetStream", "ratio");
    let row = |name: &str, e: f64, c: f64, unit: &str| {
        println!("{:<40} {:>9.3} {unit} {:>9.3} {unit} {:>7.1}×", name, e, c, c / e);
    };
    row("producer append, p50", embedded.append.0, clustered.append.0, "ms");
    row("producer append, p99", embedded.append.1, clustered.append.1, "ms");
    row("append → seen by the consumer, p50", embedded.visible.0, clustered.visible.0, "ms");
    row("append → seen by the consumer, p99", embedded.visible.1, clustered.visible.1, "ms");
    println!(
        "{:<40} {:>12.0} {:>12.0} {:>7.2}×",
        "throughput, events/s acknowledged",
        embedded.rate,
        clustered.rate,
        clustered.rate / embedded.rate
    );
    row("all of them at the consumer", embedded.drained, clustered.drained, "ms");
    println!();
    println!(
        "inbound webhook → TwiML through voxgate serve ({hooks} sequential, then {} at 32 connections)",
        hooks * 2
    );
    println!("{:<40} {:>12} {:>12} {:>12}   ratios to embedded", "", "embedded", "ingress,call", "ingress|call");
    let row3 = |name: &str, e: f64, c: f64, d: f64, unit: &str| {
        println!("{:<40} {:>9.3} {unit} {:>9.3} {unit} {:>9.3} {unit}   {:.1}× {:.1}×", name, e, c, d, c / e, d / e);
    };
    row3("webhook answer, p50", wh_embedded.p50, wh_cluster.p50, wh_split.p50, "ms");
    row3("webhook answer, p99", wh_embedded.p99, wh_cluster.p99, wh_split.p99, "ms");
    println!(
        "{:<40} {:>12.0} {:>12.0} {:>12.0}   {:.2}× {:.2}×",
        "webhooks/s at 32 connections",
        wh_embedded.rate,
        wh_cluster.rate,
        wh_split.rate,
        wh_cluster.rate / wh_embedded.rate,
        wh_split.rate / wh_embedded.rate
    );
    println!();
    println!("ingress node → call node: {batches} Media Streams batches of 5 frames, one call, sent one at a time");
    println!("{:<40} {:>9.3} ms", "last frame sent → batch in the media log, p50", hop.0);
    println!("{:<40} {:>9.3} ms", "last frame sent → batch in the media log, p99", hop.1);
    drop((nats, wh_nats, split_nats));
    Ok(())
}
