//! The load generator against the real binary, briefly: open-loop calls with status callbacks
//! and concurrent Media Streams of real speech at real-time pace. What it reports must agree with
//! what it offered and with what the node counted. (The figures themselves are BENCHMARKS.md's,
//! from release builds; nothing here is timed.)

use std::sync::Arc;
use std::time::Duration;

use voxgate_scenarios::fixture::{config, sim, NUMBER};
use voxgate_scenarios::load::{run, table, Plan};
use voxgate_scenarios::node::Node;
use voxgate_scenarios::speech::{script, Voice};

/// Quotas and per-caller limits lifted: one tenant calling as fast as the generator offers.
const OPEN: &str = "[stt]\nenabled = false\n[quotas]\nmax_concurrent_calls = 100000\ncalls_per_second = 100000\n[callers]\nmax_calls_per_window = 0\n[fraud]\ndisabled_rules = [\"velocity_from\", \"spend_velocity\", \"volume_anomaly\", \"short_call_burst\"]\n";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_load_generator_reports_what_it_offered_and_what_the_node_counted() {
    let node = Node::start(&config(OPEN)).unwrap();
    let work = tempfile::tempdir().unwrap();
    let speech =
        script(&[("Please check the status of my order.", Voice::Espeak("en-us".into()))], 300, 0, work.path())
            .unwrap();
    let plan = Plan {
        rate: 40.0,
        duration: Duration::from_secs(3),
        hold: Duration::from_millis(500),
        streams: 4,
        audio: Arc::new(speech.mulaw),
        to: NUMBER.into(),
        health_url: Some(format!("{}/api/voice/health", node.url())),
        metrics_url: Some(format!("http://{}/metrics", node.metrics)),
        drain: Duration::from_secs(30),
    };
    let r = run(Arc::new(sim(&node)), plan).await.unwrap();
    println!("{}", table(&r));
    assert_eq!((r.webhooks.ok, r.webhooks.failed), (120, 0), "{:?}", r.webhooks.errors);
    assert_eq!((r.status_callbacks.ok, r.status_callbacks.failed), (120, 0), "{:?}", r.status_callbacks.errors);
    assert!(
        r.webhooks.p50_ms > 0.0 && r.webhooks.p50_ms <= r.webhooks.p99_ms && r.webhooks.p99_ms <= r.webhooks.max_ms
    );
    assert_eq!((r.streams.connected, r.streams.failed), (4, 0), "{:?}", r.streams.errors);
    assert_eq!(r.streams.frames_sent, 4 * 150);
    let n = r.node.as_ref().expect("node figures");
    assert_eq!(n.frames_received, r.streams.frames_sent, "{n:?}");
    assert_eq!((n.frames_lost, n.frames_shed), (0, 0), "{n:?}");
    assert!(n.media_ingest_p99_ms.is_some(), "{n:?}");
    assert!(n.speech_segments >= 4, "each stream's speech was cut: {n:?}");
    assert!(n.stage_lag_end.values().all(|v| *v == 0), "{n:?}");
    assert!(n.stage_lag_end.contains_key("transcode"), "{n:?}");
    // The node's CPU over the run, and per request: what a limit is made of.
    let cpu = n.cpu_seconds.expect("the node reports its CPU");
    assert!(cpu > 0.0 && n.cpu_us_per_request.is_some_and(|u| u > 0.0), "{n:?}");
    assert!(r.generator_cpu_cores.is_some_and(|g| g > 0.0), "{r:?}");

    // The same through the CLI, with its JSON.
    let json = work.path().join("report.json");
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_twilio-sim"))
        .args(["--target", &node.url(), "--public-url", voxgate_scenarios::fixture::PUBLIC])
        .args(["--account", voxgate_scenarios::fixture::ACCOUNT, "--token", voxgate_scenarios::fixture::TOKEN])
        .args(["load", "--to", NUMBER, "--rate", "20", "--duration", "1", "--hold-ms", "100"])
        .arg("--json")
        .arg(&json)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("webhooks"), "{text}");
    let v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    assert_eq!(v["webhooks"]["ok"], 20, "{v}");
    assert_eq!(v["status_callbacks"]["failed"], 0, "{v}");
}
