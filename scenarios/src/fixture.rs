//! The tenant and helpers scenario tests share: one configured tenant behind a proxy URL.

use serde_json::Value;
use voxgate_protocol::{AccountSid, CallSid};

use crate::node::Node;
use crate::twilio::Simulator;

pub const ACCOUNT: &str = "AC0123456789abcdef0123456789abcdef";
pub const TOKEN: &str = "9f3c1b2a7d4e5f60718293a4b5c6d7e8";
pub const NUMBER: &str = "+14155550100";
/// Twilio believes it calls this (a proxy or tunnel in front of voxgate).
pub const PUBLIC: &str = "https://voxgate.test";
/// Every node of a test cluster seals and opens auth tokens with this key.
pub const SECRETS_KEY: &str = "5e0c7a1b9d2f4e6a8c0b1d3f5a7c9e0b2d4f6a8c0e1b3d5f7a9c0e2b4d6f8a0c";

/// The topics as a node configures them (`[log] partitions` applies to all but tenants), for a
/// reader of a cluster's log.
pub fn node_specs() -> Vec<voxgate_storage::TopicSpec> {
    let mut specs = voxgate_storage::topics::default_specs();
    for t in specs.iter_mut().filter(|t| t.name != voxgate_storage::topics::TENANTS) {
        t.partitions = voxgate_storage::topics::DEFAULT_PARTITIONS;
    }
    specs
}

/// A config with the tenant, plus `extra` TOML lines before the tenant table.
pub fn config(extra: &str) -> String {
    format!(
        "public_url = \"{PUBLIC}\"\n{extra}\n[[tenants]]\naccount_sid = \"{ACCOUNT}\"\nauth_token = \"{TOKEN}\"\nnumbers = [\"{NUMBER}\"]\n"
    )
}

/// The tenant's Twilio, pointed at `node`.
pub fn sim(node: &Node) -> Simulator {
    Simulator::new(&node.url(), PUBLIC, AccountSid::parse(ACCOUNT).expect("valid sid"), TOKEN)
}

/// A call whose `completed` callback overtakes its stream (Twilio does not wait for the stream
/// before it calls back): `before` frames sent at once, the callback (answered), `after` more
/// frames (sent before Twilio read voxgate's close), `stop`; returns once voxgate closed the
/// stream. The stream's sid is the call's ^ 0x5a5a; every frame is µ-law 0x30.
pub async fn callback_overtakes_stream(
    sim: &Simulator,
    call: CallSid,
    from: &str,
    before: u64,
    after: u64,
) -> anyhow::Result<()> {
    let answer = sim.inbound_call(call, from, NUMBER).await?;
    let url = answer.stream_url.ok_or_else(|| anyhow::anyhow!("no <Stream> in {}", answer.body))?;
    let mut ws = sim.connect_stream(&url).await?;
    let sid = voxgate_protocol::StreamSid::from_u128(call.as_u128() ^ 0x5a5a);
    ws.start(sid, sim.account(), call).await?;
    let frame = [0x30u8; 160];
    for k in 0..before {
        ws.send_frame(sid, k, &frame).await?;
    }
    let code = sim.status_callback(call, "completed", 1, Some(10)).await?;
    anyhow::ensure!(code / 100 == 2, "the completed callback answered {code}");
    for k in before..before + after {
        ws.send_frame(sid, k, &frame).await?;
    }
    ws.stop(sid, sim.account(), call).await?;
    anyhow::ensure!(ws.closed(std::time::Duration::from_secs(10)).await.is_some(), "voxgate did not close the stream");
    Ok(())
}

/// `voxgate replay --call … --json`, parsed (the node must be stopped).
pub fn replay_json(node: &Node, call: CallSid) -> Vec<Value> {
    let out = node.cli(&["replay", "--call", &call.to_string(), "--json"]).expect("run replay");
    assert!(out.status.success(), "replay failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).expect("utf-8").lines().map(|l| serde_json::from_str(l).expect("JSON line")).collect()
}

/// The tenant's calls usage this month as the node's Usage Records API reports it: count, usage
/// (minutes) and price.
pub async fn calls_usage(node: &Node) -> Value {
    let url = format!("{}/2010-04-01/Accounts/{ACCOUNT}/Usage/Records.json?Category=calls", node.url());
    let r = reqwest::Client::new().get(url).basic_auth(ACCOUNT, Some(TOKEN)).send().await.expect("usage request");
    assert_eq!(r.status().as_u16(), 200, "usage records");
    let v: Value = serde_json::from_str(&r.text().await.expect("usage body")).expect("usage JSON");
    let rec = &v["usage_records"][0];
    serde_json::json!({ "count": rec["count"], "usage": rec["usage"], "price": rec["price"] })
}

/// Every event of `topics` on `log`, decoded, in partition order; fails on any event stored twice.
pub fn each_event_once(log: &voxgate_storage::Log, topics: &[&str], mut f: impl FnMut(voxgate_protocol::Envelope)) {
    for topic in topics {
        let mut seen = std::collections::HashSet::new();
        for p in 0..log.partitions(topic).expect("topic") {
            let mut recs = Vec::new();
            log.read(topic, p, 0, usize::MAX, &mut recs).expect("read");
            for r in &recs {
                let env = voxgate_protocol::decode(r.payload()).expect("decodable");
                assert!(seen.insert(env.event_id), "{topic}: event {:?} stored twice", env.event_id);
                f(env);
            }
        }
    }
}

/// The Python interpreter with the twilio package (`bash .ci/run` makes it: target/py-twilio).
pub fn twilio_python() -> std::path::PathBuf {
    if let Ok(p) = std::env::var("VOXGATE_TWILIO_PYTHON") {
        return p.into();
    }
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).parent().unwrap().to_path_buf();
    let target =
        std::env::var("CARGO_TARGET_DIR").map(std::path::PathBuf::from).unwrap_or_else(|_| root.join("target"));
    let py = target.join("py-twilio/bin/python");
    assert!(
        py.exists(),
        "{} is missing: run `bash .ci/run` once (it installs the twilio helper library with pip), or set VOXGATE_TWILIO_PYTHON",
        py.display()
    );
    py
}

/// Runs `py/twilio_client.py` (the official twilio helper library pointed at `node`) as the
/// tenant; its JSON answer.
pub fn twilio_client(node: &crate::node::Node, account: &str, token: &str, args: &[&str]) -> serde_json::Value {
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("py/twilio_client.py");
    let out = std::process::Command::new(twilio_python())
        .arg(script)
        .args([node.url().as_str(), account, token])
        .args(args)
        .output()
        .unwrap();
    assert!(out.status.success(), "twilio_client.py {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}

/// A reader of our own on a cluster's log (its local mirror lives in the returned directory).
pub async fn cluster_reader(nats_url: &str) -> (tempfile::TempDir, voxgate_storage::Log) {
    let dir = tempfile::tempdir().expect("a temporary directory");
    let opts = voxgate_storage::ClusterOptions::new(nats_url);
    let clock = std::sync::Arc::new(voxgate_protocol::SystemClock);
    let log = voxgate_storage::Log::open_cluster(dir.path(), &node_specs(), clock, 64 << 20, &opts)
        .await
        .expect("a reader on the cluster's log");
    (dir, log)
}

/// The tenant's `calls` usage on `node` once it counts `count` calls (or as it stands after 30 s:
/// the caller's assertion says what is wrong).
pub async fn calls_usage_once(node: &Node, count: u128) -> Value {
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let u = calls_usage(node).await;
        if u["count"] == serde_json::json!(count.to_string()) || tokio::time::Instant::now() > deadline {
            return u;
        }
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
}
