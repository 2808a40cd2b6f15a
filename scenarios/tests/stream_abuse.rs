//! Media Streams clients that misbehave, through the real binary: one floods frames as fast as its
//! socket takes them, one connects and then stalls (sends nothing, reads nothing). The node's
//! memory stays bounded, each of them affects only its own call, and a call beside them keeps
//! every frame.

use std::time::Duration;

use voxgate_protocol::{CallSid, StreamSid};
use voxgate_scenarios::fixture::{config, replay_json, sim, NUMBER};
use voxgate_scenarios::node::Node;
use voxgate_scenarios::twilio::Pace;

/// The node's resident memory, from /proc (bytes).
fn rss(node: &Node) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{}/status", node.pid().unwrap())).unwrap();
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap();
    kb * 1024
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flooding_and_a_stalled_stream_stay_bounded_and_alone() {
    let mut node = Node::start(&config("[stt]\nenabled = false\n")).unwrap();
    let s = sim(&node);
    // Warm the node up (allocator arenas, first actors), then take the baseline.
    let warm = CallSid::from_u128(0xf0);
    s.call(warm, "+14155550100", NUMBER, &vec![0x7f; 8000], Pace::Faster(20)).await.unwrap();
    let baseline = rss(&node);

    // The stalled client: a started stream that then says nothing and reads nothing.
    let stalled = CallSid::from_u128(0xf1);
    let a = s.inbound_call(stalled, "+14155550111", NUMBER).await.unwrap();
    let mut stalled_ws = s.connect_stream(&a.stream_url.unwrap()).await.unwrap();
    stalled_ws.start(StreamSid::from_u128(0xf1 ^ 0x5a5a), s.account(), stalled).await.unwrap();

    // The flooder: 30,000 frames (10 minutes of audio) as fast as the socket takes them.
    let flood = CallSid::from_u128(0xf2);
    let a = s.inbound_call(flood, "+14155550112", NUMBER).await.unwrap();
    let mut flood_ws = s.connect_stream(&a.stream_url.unwrap()).await.unwrap();
    let flood_sid = StreamSid::from_u128(0xf2 ^ 0x5a5a);
    flood_ws.start(flood_sid, s.account(), flood).await.unwrap();
    let flooding = tokio::spawn(async move {
        let frame = [0x55u8; 160];
        let mut sent = 0u64;
        for k in 0..30_000u64 {
            if flood_ws.send_frame(flood_sid, k, &frame).await.is_err() {
                break;
            }
            sent += 1;
        }
        (flood_ws, sent)
    });

    // Meanwhile an ordinary call, at real-time pace.
    let good = CallSid::from_u128(0xf3);
    let audio = vec![0x30u8; 8000 * 4];
    let s2 = sim(&node);
    let ordinary = tokio::spawn(async move { s2.call(good, "+14155550113", NUMBER, &audio, Pace::RealTime).await });
    let mut peak = 0;
    while !ordinary.is_finished() || !flooding.is_finished() {
        peak = peak.max(rss(&node));
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let report = ordinary.await.unwrap().unwrap();
    assert_eq!(report.frames_sent, 200);
    let (mut flood_ws, flood_sent) = flooding.await.unwrap();
    assert_eq!(flood_sent, 30_000, "the node closed the flooding stream");
    flood_ws.stop(flood_sid, s.account(), flood).await.unwrap();
    flood_ws.close().await;
    assert_eq!(s.status_callback(flood, "completed", 2, Some(600)).await.unwrap() / 100, 2);
    // The stalled call ends when Twilio says so; the node closes its stream although the client
    // reads nothing.
    assert_eq!(s.status_callback(stalled, "completed", 2, Some(30)).await.unwrap() / 100, 2);
    let idle = node.wait_idle(Duration::from_secs(60)).await.unwrap();
    peak = peak.max(rss(&node));
    let grew = peak.saturating_sub(baseline);
    println!("rss baseline {} MB, peak {} MB", baseline >> 20, peak >> 20);
    assert!(grew < 128 << 20, "memory grew by {} MB under a flood: {idle}", grew >> 20);
    drop(stalled_ws);

    node.stop().unwrap();
    // The ordinary call kept every frame.
    let events = replay_json(&node, good);
    let frames: u64 = events.iter().filter(|e| e["kind"] == "media_batch").map(|e| e["frames"].as_u64().unwrap()).sum();
    assert_eq!(frames, 200, "the call beside the flood lost audio");
    assert!(!events.iter().any(|e| e["kind"] == "audio_shed"), "the call beside the flood shed audio");
    // The flood is accounted for: what was kept plus what was shed is what arrived, and the
    // shedding is on the flooder's own record.
    let events = replay_json(&node, flood);
    let kept: u64 = events.iter().filter(|e| e["kind"] == "media_batch").map(|e| e["frames"].as_u64().unwrap()).sum();
    let shed: u64 = events.iter().filter(|e| e["kind"] == "audio_shed").map(|e| e["frames"].as_u64().unwrap()).sum();
    println!("flood: {kept} frames kept, {shed} shed");
    assert_eq!(kept + shed, 30_000, "kept {kept}, shed {shed}");
    // The stalled call is closed out like any other.
    let events = replay_json(&node, stalled);
    assert!(events.iter().any(|e| e["kind"] == "call_status_changed" && e["status"] == "completed"), "{events:?}");
    assert!(events.iter().any(|e| e["kind"] == "stream_stopped"), "{events:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_of_late_audio_at_twenty_times_real_time_loses_nothing() {
    let mut node = Node::start(&config("[stt]\nenabled = false\n")).unwrap();
    let s = sim(&node);
    // Three minutes of both tracks, as Twilio delivers them after a network stall: 20× real time.
    let call = CallSid::from_u128(0xb0);
    let a = s.inbound_call(call, "+14155550130", NUMBER).await.unwrap();
    let mut ws = s.connect_stream(&a.stream_url.unwrap()).await.unwrap();
    let sid = StreamSid::from_u128(0xb0 ^ 0x5a5a);
    ws.start_both(sid, s.account(), call).await.unwrap();
    let caller: Vec<u8> = (0..180 * 8000).map(|i| (i % 251) as u8).collect();
    let agent: Vec<u8> = (0..180 * 8000).map(|i| (i % 241) as u8).collect();
    let report = ws.send_two_tracks(sid, &caller, &agent, Pace::Faster(20)).await.unwrap();
    assert_eq!(report.frames_sent, 2 * 9000);
    ws.stop(sid, s.account(), call).await.unwrap();
    ws.closed(Duration::from_secs(30)).await;
    assert_eq!(s.status_callback(call, "completed", 2, None).await.unwrap() / 100, 2);
    node.wait_idle(Duration::from_secs(60)).await.unwrap();
    assert!(node.stop().unwrap().success());
    let events = replay_json(&node, call);
    assert!(!events.iter().any(|e| e["kind"] == "audio_shed"), "a burst shed audio");
    let kept: u64 = events.iter().filter(|e| e["kind"] == "media_batch").map(|e| e["frames"].as_u64().unwrap()).sum();
    assert_eq!(kept, 18_000, "every frame of both tracks kept");
}
