//! Both sides of a call, through the real binary: a Media Stream forking both tracks (as
//! `<Start><Stream track="both_tracks">` sends them) is kept per track, cut into speech segments
//! per track and transcribed per track, labelled `inbound` (the caller) and `outbound` (the
//! agent), and `voxgate replay` reads it back as a two-party conversation.

use std::time::Duration;

use serde_json::Value;
use voxgate_protocol::{CallSid, StreamSid};
use voxgate_scenarios::fixture::{config, replay_json, sim, NUMBER};
use voxgate_scenarios::node::Node;
use voxgate_scenarios::speech::{script, Voice};
use voxgate_scenarios::twilio::Pace;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn both_tracks_are_kept_cut_and_transcribed_apart() {
    let mut node = Node::start(&config("")).unwrap();
    let work = tempfile::tempdir().unwrap();
    // The caller speaks first; the agent answers in the caller's silence.
    let caller = script(
        &[
            ("Hello, I would like to check the status of my order.", Voice::Espeak("en-us".into())),
            ("Thank you very much.", Voice::Espeak("en-us".into())),
        ],
        400,
        5000,
        work.path(),
    )
    .unwrap();
    let agent = script(
        &[
            ("Certainly. Your order was shipped yesterday.", Voice::Flite("slt".into())),
            ("You are welcome. Goodbye.", Voice::Flite("slt".into())),
        ],
        3600,
        4200,
        work.path(),
    )
    .unwrap();

    let s = sim(&node);
    let call = CallSid::from_u128(0x2_7ac4);
    let answer = s.inbound_call(call, "+14155550123", NUMBER).await.unwrap();
    let mut stream = s.connect_stream(answer.stream_url.as_deref().unwrap()).await.unwrap();
    let sid = StreamSid::from_u128(0x2_7ac4);
    stream.start_both(sid, s.account(), call).await.unwrap();
    let report = stream.send_two_tracks(sid, &caller.mulaw, &agent.mulaw, Pace::Faster(2)).await.unwrap();
    let frames = caller.mulaw.len().max(agent.mulaw.len()) / 160;
    assert_eq!(report.frames_sent as usize, 2 * frames);
    stream.stop(sid, s.account(), call).await.unwrap();
    stream.closed(Duration::from_secs(10)).await;
    assert_eq!(s.status_callback(call, "completed", 2, None).await.unwrap(), 204);
    node.wait_idle(Duration::from_secs(120)).await.unwrap();
    assert!(node.stop().unwrap().success());

    let events = replay_json(&node, call);
    // Every frame of both tracks is on the media log, each batch labelled.
    let kept = |track: &str| -> u64 {
        events
            .iter()
            .filter(|e| e["kind"] == "media_batch" && e["track"] == track)
            .map(|e| e["frames"].as_u64().unwrap())
            .sum()
    };
    assert_eq!((kept("inbound"), kept("outbound")), (frames as u64, frames as u64));
    // Speech cut per track: two utterances each.
    let segments = |track: &str| events.iter().filter(|e| e["kind"] == "speech_segment" && e["track"] == track).count();
    assert_eq!((segments("inbound"), segments("outbound")), (2, 2), "{events:?}");
    // Transcribed per track, each with its own words.
    let said = |track: &str| -> String {
        events
            .iter()
            .filter(|e| e["kind"] == "transcript" && e["track"] == track)
            .map(|e| e["text"].as_str().unwrap().to_lowercase())
            .collect::<Vec<_>>()
            .join(" ")
    };
    let (heard_caller, heard_agent) = (said("inbound"), said("outbound"));
    assert!(heard_caller.contains("order") && heard_caller.contains("thank"), "caller: {heard_caller}");
    assert!(heard_agent.contains("shipped") && heard_agent.contains("goodbye"), "agent: {heard_agent}");
    assert!(!heard_caller.contains("shipped") && !heard_agent.contains("status"), "{heard_caller} | {heard_agent}");
    // In time order the transcripts alternate: caller, agent, caller, agent.
    let mut turns: Vec<(u64, &str)> = events
        .iter()
        .filter(|e| e["kind"] == "transcript")
        .map(|e| (e["start_ms"].as_u64().unwrap(), e["track"].as_str().unwrap()))
        .collect();
    turns.sort();
    let order: Vec<&str> = turns.iter().map(|t| t.1).collect();
    assert_eq!(order, ["inbound", "outbound", "inbound", "outbound"]);

    // The human timeline reads as a conversation.
    let out = node.cli(&["replay", "--call", &call.to_string()]).unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("caller: ") && text.contains("agent: "), "{text}");
    assert!(text.contains("inbound") && text.contains("outbound"), "{text}");
    // Re-cutting the recorded audio gives the same segments, track by track.
    let out = node.cli(&["replay", "--call", &call.to_string(), "--stage", "transcode", "--json"]).unwrap();
    let rows: Vec<Value> =
        String::from_utf8_lossy(&out.stdout).lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(rows.len(), 4, "{rows:?}");
    assert!(rows.iter().all(|r| r["same"] == true), "{rows:?}");
}
