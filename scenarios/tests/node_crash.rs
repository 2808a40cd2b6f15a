//! `voxgate serve` SIGKILLed with 100 calls in progress (each with a Media Stream sending audio),
//! then started again on the same data: every webhook it had acknowledged is on the log, Twilio's
//! closing callbacks close every call out, and usage is exactly the calls' — and stays so across
//! another restart. Calls whose Twilio never calls back are restored and closed at their deadline.

use std::sync::Arc;
use std::time::Duration;

use voxgate_protocol::{CallSid, StreamSid};
use voxgate_scenarios::fixture::{calls_usage, config, replay_json, sim, NUMBER};
use voxgate_scenarios::load::counter;
use voxgate_scenarios::node::Node;

const CALLS: u128 = 100;
const OPEN: &str = "[stt]\nenabled = false\n[quotas]\nmax_concurrent_calls = 100000\ncalls_per_second = 100000\n[callers]\nmax_calls_per_window = 0\n[fraud]\ndisabled_rules = [\"velocity_from\", \"spend_velocity\", \"volume_anomaly\", \"short_call_burst\"]\n";

fn call(i: u128) -> CallSid {
    CallSid::from_u128(0xC4A5_0000 + i)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_with_100_active_calls_loses_no_acknowledged_event() {
    let mut node = Node::start(&config(OPEN)).unwrap();
    let s = Arc::new(sim(&node));

    // 100 calls answered, in progress, each streaming audio in real time.
    let mut streams = Vec::new();
    for i in 0..CALLS {
        let a = s.inbound_call(call(i), &format!("+1415557{:04}", i), NUMBER).await.unwrap();
        let url = a.stream_url.unwrap_or_else(|| panic!("call {i} not answered with a stream: {}", a.body));
        assert_eq!(s.status_callback(call(i), "in-progress", 1, None).await.unwrap() / 100, 2);
        let mut ws = s.connect_stream(&url).await.unwrap();
        let sid = StreamSid::from_u128(call(i).as_u128() ^ 0x5a5a);
        ws.start(sid, s.account(), call(i)).await.unwrap();
        streams.push(tokio::spawn(async move {
            let frame = [0x30u8; 160];
            let mut tick = tokio::time::interval(Duration::from_millis(20));
            for k in 0.. {
                tick.tick().await;
                if ws.send_frame(sid, k, &frame).await.is_err() {
                    return k;
                }
            }
            unreachable!()
        }));
    }
    // Every call's audio is flowing: the node has taken a second of each (on average).
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while counter(&node.scrape().await.unwrap(), "twilio_audio_chunks_received_total") < (CALLS * 50) as f64 {
        assert!(std::time::Instant::now() < deadline, "the streams' frames never reached the node");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // No goodbye.
    node.kill();
    for t in streams {
        t.await.unwrap();
    }
    let dir = std::mem::replace(&mut node.dir, tempfile::tempdir().unwrap());
    let mut node = Node::start_in(dir, node.config_path.clone(), &[]).unwrap();
    let s = sim(&node);
    // Twilio closes the calls (its streams dropped with the node); a retried callback is the
    // same event.
    for i in 0..CALLS {
        assert_eq!(s.status_callback(call(i), "completed", 2, Some(30)).await.unwrap() / 100, 2);
    }
    assert_eq!(s.status_callback(call(0), "completed", 2, Some(30)).await.unwrap() / 100, 2);
    node.wait_idle(Duration::from_secs(60)).await.unwrap();
    let after_crash = calls_usage(&node).await;
    assert_eq!(after_crash["count"], "100", "{after_crash}");
    assert_eq!(after_crash["usage"], "100", "one minute per call: {after_crash}");

    node.stop().unwrap();
    for i in 0..CALLS {
        let events = replay_json(&node, call(i));
        // Distinct events (a retried callback is stored again under the same id, which every
        // reader recognises).
        let count = |kind: &str, status: Option<&str>| {
            let ids: std::collections::HashSet<&str> = events
                .iter()
                .filter(|e| e["kind"] == kind && status.is_none_or(|s| e["status"] == s))
                .filter_map(|e| e["event_id"].as_str())
                .collect();
            ids.len()
        };
        assert_eq!(count("call_received", None), 1, "call {i}: {events:?}");
        assert_eq!(count("call_status_changed", Some("in-progress")), 1, "call {i}: {events:?}");
        assert_eq!(count("call_status_changed", Some("completed")), 1, "call {i}: {events:?}");
    }
    // A second, clean restart rebuilds exactly the same usage.
    let dir = std::mem::replace(&mut node.dir, tempfile::tempdir().unwrap());
    let node = Node::start_in(dir, node.config_path.clone(), &[]).unwrap();
    assert_eq!(calls_usage(&node).await, after_crash);
}

/// Calls whose Twilio never calls back after a kill: the restarted node finds them open on the
/// log, gives them their actors (and quota places) back, and their maximum duration closes them
/// out — at the deadline, which passed while the node was down, not at the restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_left_open_by_a_kill_are_closed_out_after_the_restart() {
    let mut node = Node::start(&config(&format!("{OPEN}[calls]\nmax_duration_secs = 3\n"))).unwrap();
    let s = sim(&node);
    let open: Vec<CallSid> = (0..3).map(|i| call(1000 + i)).collect();
    for (i, c) in open.iter().enumerate() {
        let a = s.inbound_call(*c, &format!("+1415558{i:04}"), NUMBER).await.unwrap();
        assert_eq!(a.status, 200, "{}", a.body);
        assert_eq!(s.status_callback(*c, "in-progress", 1, None).await.unwrap() / 100, 2);
    }
    node.kill();
    // Down past the calls' deadline.
    tokio::time::sleep(Duration::from_secs(4)).await;
    let dir = std::mem::replace(&mut node.dir, tempfile::tempdir().unwrap());
    let mut node = Node::start_in(dir, node.config_path.clone(), &[]).unwrap();

    // Nobody calls back; the deadline does.
    node.wait_idle(Duration::from_secs(30)).await.unwrap();
    let usage = calls_usage(&node).await;
    assert_eq!(usage["count"], "3", "{usage}");
    assert_eq!(usage["usage"], "3", "three seconds each, a minute billed each: {usage}");
    node.stop().unwrap();
    for c in &open {
        let events = replay_json(&node, *c);
        let kinds: Vec<&str> = events.iter().map(|e| e["kind"].as_str().unwrap()).collect();
        assert_eq!(kinds.iter().filter(|k| **k == "call_timed_out").count(), 1, "{kinds:?}");
        let ends: Vec<&serde_json::Value> =
            events.iter().filter(|e| e["kind"] == "call_status_changed" && e["status"] == "completed").collect();
        assert_eq!(ends.len(), 1, "{kinds:?}");
        assert_eq!(ends[0]["source"], "voxgate");
        assert_eq!(ends[0]["duration_secs"], 3, "closed at its deadline, not at the restart: {:?}", ends[0]);
    }
}
