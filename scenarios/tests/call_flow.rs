//! End to end through the real binary: a call comes in over a signed webhook, speaks over Media
//! Streams, hangs up; its events are in the log, and its speech segments are cut where the speech is.

use std::time::Duration;

use serde_json::Value;
use voxgate_protocol::CallSid;
use voxgate_scenarios::fixture::{callback_overtakes_stream, config, replay_json, sim, NUMBER};
use voxgate_scenarios::node::Node;
use voxgate_scenarios::speech::{script, Voice};
use voxgate_scenarios::twilio::Pace;

fn kinds(events: &[Value]) -> Vec<&str> {
    events.iter().map(|e| e["kind"].as_str().unwrap()).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_flows_through_the_log_and_speech_is_cut_where_it_is() {
    let mut node = Node::start(&config("")).unwrap();
    let work = tempfile::tempdir().unwrap();
    let v = Voice::Espeak("en-us".into());
    let s = script(
        &[
            ("Hello, I would like to check the status of my order.", v.clone()),
            ("It was placed last Tuesday.", v.clone()),
            ("Thank you very much for your help.", v),
        ],
        600,
        1500,
        work.path(),
    )
    .unwrap();
    let call = CallSid::from_u128(0x1234_5678_9abc);
    let report = sim(&node).call(call, "+14155550123", NUMBER, &s.mulaw, Pace::Faster(4)).await.unwrap();
    assert_eq!(report.frames_sent as usize, s.mulaw.len() / 160);

    node.wait_idle(Duration::from_secs(30)).await.unwrap();
    assert!(node.stop().unwrap().success());

    let events = replay_json(&node, call);
    let k = kinds(&events);
    assert_eq!(k[0], "call_received", "{k:?}");
    for e in &events {
        assert_eq!(e["call_sid"], call.to_string());
        assert!(e["occurred_at"].as_str().unwrap().ends_with('Z'));
    }
    let pos = |kind: &str| k.iter().position(|x| *x == kind).unwrap_or_else(|| panic!("no {kind} in {k:?}"));
    assert!(pos("stream_started") < pos("media_batch"));
    assert!(k.iter().filter(|x| **x == "call_status_changed").count() >= 2);
    let statuses: Vec<&str> =
        events.iter().filter(|e| e["kind"] == "call_status_changed").map(|e| e["status"].as_str().unwrap()).collect();
    assert_eq!(statuses, vec!["in-progress", "completed"]);
    assert!(!k.contains(&"audio_shed"), "audio shed at 4× real time: {k:?}");
    let stopped = events.iter().find(|e| e["kind"] == "stream_stopped").unwrap();
    assert_eq!(stopped["reason"], "twilio");
    assert_eq!(stopped["frames"].as_u64().unwrap() as usize, s.mulaw.len() / 160);

    // Audio is batched (~100 ms per record), and nothing is lost. With STT on, a batch also ends
    // at the two frames after a pause, the speaker going on after one, or the end of speech (at
    // most two more records for each such piece and segment), so the transcoder sees them at once.
    let batches: Vec<&Value> = events.iter().filter(|e| e["kind"] == "media_batch").collect();
    let frames: u64 = batches.iter().map(|b| b["frames"].as_u64().unwrap()).sum();
    assert_eq!(frames as usize, s.mulaw.len() / 160);
    let endpoints =
        events.iter().filter(|e| e["kind"] == "speech_segment" || e["kind"] == "speech_progress").count() as u64;
    assert!(endpoints >= 3, "pieces and a segment per utterance: {k:?}");
    assert!(
        batches.len() as u64 <= frames / 5 + 2 + 2 * endpoints,
        "{} batches for {frames} frames and {endpoints} pieces and segments",
        batches.len()
    );
    // And they did end early: a batch shorter than 100 ms inside the stream.
    assert!(batches.iter().rev().skip(1).any(|b| b["frames"].as_u64().unwrap() < 5), "no batch was handed over early");
    assert!(batches.iter().all(|b| b["payload_bytes"].as_u64().unwrap() == b["frames"].as_u64().unwrap() * 160));

    // One segment per utterance, where the utterance is.
    let segs: Vec<(u64, u64)> = events
        .iter()
        .filter(|e| e["kind"] == "speech_segment")
        .map(|e| (e["start_ms"].as_u64().unwrap(), e["end_ms"].as_u64().unwrap()))
        .collect();
    assert_eq!(segs.len(), s.utterances.len(), "segments {segs:?} for utterances {:?}", s.utterances);
    for ((start, end), (a, b, text)) in segs.iter().zip(&s.utterances) {
        // Pre-roll (200 ms) before the onset, the tail (120 ms) after the end, a frame or two of slack.
        assert!(*start + 300 >= *a && *start <= a + 100, "segment {start}–{end} vs speech {a}–{b} ({text})");
        assert!(*end + 100 >= *b && *end <= b + 600, "segment {start}–{end} vs speech {a}–{b} ({text})");
    }
    for e in events.iter().filter(|e| e["kind"] == "speech_segment") {
        let dur = e["end_ms"].as_u64().unwrap() - e["start_ms"].as_u64().unwrap();
        assert_eq!(e["sample_rate"], 16000);
        assert_eq!(e["pcm_bytes"].as_u64().unwrap(), dur * 32, "16 kHz PCM16 for exactly the span");
    }

    // The person-readable timeline, and the transcoder replayed over the recorded audio.
    let human = node.cli(&["replay", "--call", &call.to_string()]).unwrap();
    let text = String::from_utf8(human.stdout).unwrap();
    assert!(
        text.contains("call_received") && text.contains("speech_segment") && text.contains("media_batch ×"),
        "{text}"
    );
    let again = node.cli(&["replay", "--call", &call.to_string(), "--stage", "transcode"]).unwrap();
    let again = String::from_utf8(again.stdout).unwrap();
    assert!(again.contains("3 recorded, 3 replayed, 0 differ"), "{again}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn maximum_duration_ends_the_call() {
    let mut node = Node::start(&config("[calls]\nmax_duration_secs = 1")).unwrap();
    let sim = sim(&node);
    let call = CallSid::from_u128(0xdead_beef);
    let answer = sim.inbound_call(call, "+14155550123", NUMBER).await.unwrap();
    let mut stream = sim.connect_stream(answer.stream_url.as_deref().unwrap()).await.unwrap();
    let sid = voxgate_protocol::StreamSid::from_u128(7);
    stream.start(sid, sim.account, call).await.unwrap();
    // 3 s of silence at real time: the call must be ended after 1 s.
    let audio = vec![0xFFu8; 8000 * 3];
    let report = stream.send_audio(sid, &audio, Pace::RealTime).await.unwrap();
    assert!(report.frames_sent < 150 || report.closed_by_server.is_some());
    let reason = stream.closed(Duration::from_secs(5)).await;
    assert!(reason.is_some(), "voxgate closes the stream at the deadline");
    node.wait_idle(Duration::from_secs(10)).await.unwrap();
    assert!(node.stop().unwrap().success());
    let events = replay_json(&node, call);
    let k = kinds(&events);
    assert!(k.contains(&"call_timed_out"), "{k:?}");
    let done = events.iter().find(|e| e["kind"] == "call_status_changed" && e["status"] == "completed").unwrap();
    assert_eq!(done["source"], "voxgate");
    let stopped = events.iter().find(|e| e["kind"] == "stream_stopped").unwrap();
    assert_eq!(stopped["reason"], "call_ended");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_completed_callback_that_overtakes_the_stream_loses_no_audio() {
    // Twilio does not wait for the stream before it calls back: `completed` can reach the node
    // while the stream's last frames and its `stop` are still on the socket.
    let mut node = Node::start(&config("[stt]\nenabled = false\n")).unwrap();
    let call = CallSid::from_u128(0xc0ffee);
    callback_overtakes_stream(&sim(&node), call, "+14155550123", 500, 50).await.unwrap();
    node.wait_idle(Duration::from_secs(30)).await.unwrap();
    assert!(node.stop().unwrap().success());

    let events = replay_json(&node, call);
    let frames: u64 = events.iter().filter(|e| e["kind"] == "media_batch").map(|e| e["frames"].as_u64().unwrap()).sum();
    assert_eq!(frames, 550, "frames on the socket when the callback came were lost");
    let stops: Vec<&Value> = events.iter().filter(|e| e["kind"] == "stream_stopped").collect();
    assert_eq!(stops.len(), 1, "{stops:?}");
    assert_eq!((stops[0]["reason"].as_str(), stops[0]["frames"].as_u64()), (Some("twilio"), Some(550)));
    // The stop comes after the audio; the call was not taken for a dropped stream.
    assert_eq!(
        kinds(&events).iter().rev().find(|k| k.starts_with("stream_") || **k == "media_batch"),
        Some(&"stream_stopped")
    );
    assert!(!events.iter().any(|e| e["kind"] == "stream_dropped"), "{:?}", kinds(&events));
}
