//! A Media Streams WebSocket that drops while the call goes on, through the real binary. The
//! call's actor notices and records the drop. It asks Twilio's REST API (a fake Twilio here, which
//! fails the first request) for fresh TwiML that attaches a new stream. The call's log goes on
//! across the gap: the gap itself, the audio, speech segments and transcripts from both streams.
//! A call beside it never notices.

use std::time::Duration;

use base64::Engine;
use serde_json::Value;
use voxgate_protocol::{CallSid, StreamSid};
use voxgate_scenarios::fixture::{config, replay_json, sim, ACCOUNT, NUMBER, TOKEN};
use voxgate_scenarios::load::counter;
use voxgate_scenarios::node::Node;
use voxgate_scenarios::recorder::Recorder;
use voxgate_scenarios::speech::{script, Voice};
use voxgate_scenarios::twilio::{extract_attr, Pace};

fn of_kind<'a>(events: &'a [Value], kind: &str) -> Vec<&'a Value> {
    events.iter().filter(|e| e["kind"] == kind).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_stream_is_reattached_and_the_call_goes_on() {
    let twilio = Recorder::start(1).await.unwrap();
    let mut node = Node::start(&config(&format!("twilio_api_url = \"{}\"\n", twilio.url))).unwrap();
    let work = tempfile::tempdir().unwrap();
    let v = Voice::Espeak("en-us".into());
    let before = script(&[("Please check the status of my order.", v.clone())], 400, 800, work.path()).unwrap();
    let after = script(&[("Thank you very much for your help.", v)], 400, 800, work.path()).unwrap();
    let s = sim(&node);

    let call = CallSid::from_u128(0xdd01);
    let answer = s.inbound_call(call, "+14155550123", NUMBER).await.unwrap();
    let url = answer.stream_url.unwrap();
    let mut ws = s.connect_stream(&url).await.unwrap();
    let first = StreamSid::from_u128(0xdd01_0001);
    ws.start(first, s.account(), call).await.unwrap();
    let sent = ws.send_audio(first, &before.mulaw, Pace::Faster(4)).await.unwrap();
    assert_eq!(sent.frames_sent as usize, before.mulaw.len() / 160);

    // A call beside it, from start to end while the other one drops and comes back.
    let other = CallSid::from_u128(0xdd02);
    let (s2, audio) = (sim(&node), before.mulaw.clone());
    let beside = tokio::spawn(async move { s2.call(other, "+14155550124", NUMBER, &audio, Pace::Faster(2)).await });

    // The socket drops: no `stop`, no closing handshake.
    drop(ws);

    // The node asks Twilio (as the tenant) to give the call fresh TwiML; the first request fails
    // and is retried.
    let path = format!("/2010-04-01/Accounts/{ACCOUNT}/Calls/{call}.json");
    let asked = twilio.wait_for(2, Duration::from_secs(30), |r| r.uri == path).await;
    assert_eq!(asked.len(), 2, "one failed request and its retry: {:?}", twilio.requests());
    let req = &asked[1];
    assert_eq!(req.method, "POST");
    let basic = base64::engine::general_purpose::STANDARD.encode(format!("{ACCOUNT}:{TOKEN}"));
    assert_eq!(req.authorization.as_deref(), Some(format!("Basic {basic}").as_str()));
    assert_eq!(req.param("Status"), None, "re-attaching must not end the call");
    let twiml = req.param("Twiml").expect("a Twiml parameter");
    assert!(twiml.contains("<Connect><Stream"), "{twiml}");
    let fresh = extract_attr(&twiml, "<Stream", "url").expect("a <Stream url>");
    assert_eq!(fresh, url, "the fresh TwiML points at the call's stream session");

    // Twilio attaches the new stream and the caller goes on talking.
    let mut ws = s.connect_stream(&fresh).await.unwrap();
    let second = StreamSid::from_u128(0xdd01_0002);
    ws.start(second, s.account(), call).await.unwrap();
    let sent = ws.send_audio(second, &after.mulaw, Pace::Faster(4)).await.unwrap();
    assert_eq!(sent.frames_sent as usize, after.mulaw.len() / 160);
    ws.stop(second, s.account(), call).await.unwrap();
    ws.close().await;
    let secs = ((before.mulaw.len() + after.mulaw.len()) / 8000) as u32 + 1;
    assert_eq!(s.status_callback(call, "completed", 2, Some(secs)).await.unwrap() / 100, 2);
    beside.await.unwrap().unwrap();

    node.wait_idle(Duration::from_secs(120)).await.unwrap();
    let scrape = node.scrape().await.unwrap();
    assert_eq!(counter(&scrape, "voxgate_stream_drops_total"), 1.0);
    assert!(node.stop().unwrap().success());

    let events = replay_json(&node, call);
    let kinds: Vec<&str> = events.iter().map(|e| e["kind"].as_str().unwrap()).collect();
    let pos = |kind: &str| kinds.iter().position(|k| *k == kind).unwrap_or_else(|| panic!("no {kind} in {kinds:?}"));
    // The drop, what Twilio answered, the gap, then the new stream.
    let dropped = of_kind(&events, "stream_dropped");
    assert_eq!(dropped.len(), 1, "{kinds:?}");
    assert_eq!(dropped[0]["stream_sid"], first.to_string());
    assert_eq!((dropped[0]["attempt"].as_u64(), dropped[0]["reattach"].as_bool()), (Some(1), Some(true)));
    let answered = of_kind(&events, "stream_reattach_requested");
    assert_eq!(answered.len(), 1, "{kinds:?}");
    assert_eq!(answered[0]["twilio_status"], 200);
    assert_eq!(answered[0]["error"], Value::Null);
    let resumed = of_kind(&events, "stream_resumed");
    assert_eq!(resumed.len(), 1, "{kinds:?}");
    assert_eq!(resumed[0]["previous"], first.to_string());
    assert_eq!(resumed[0]["stream_sid"], second.to_string());
    assert!(resumed[0]["gap_ms"].as_u64().unwrap() > 0, "{:?}", resumed[0]);
    assert!(pos("stream_dropped") < pos("stream_resumed"));
    let started: Vec<&str> =
        of_kind(&events, "stream_started").iter().map(|e| e["stream_sid"].as_str().unwrap()).collect();
    assert_eq!(started, [first.to_string(), second.to_string()]);
    assert_eq!(kinds[pos("stream_resumed") + 1], "stream_started", "{kinds:?}");

    // Each stream stopped once, for its reason, with its own frames; no audio was lost.
    let stops: Vec<(&str, &str, u64)> = of_kind(&events, "stream_stopped")
        .iter()
        .map(|e| (e["stream_sid"].as_str().unwrap(), e["reason"].as_str().unwrap(), e["frames"].as_u64().unwrap()))
        .collect();
    let (n1, n2) = ((before.mulaw.len() / 160) as u64, (after.mulaw.len() / 160) as u64);
    assert_eq!(
        stops,
        [(first.to_string().as_str(), "disconnected", n1), (second.to_string().as_str(), "twilio", n2)],
        "{kinds:?}"
    );
    let frames: u64 = of_kind(&events, "media_batch").iter().map(|b| b["frames"].as_u64().unwrap()).sum();
    assert_eq!(frames, n1 + n2);

    // Speech on both sides of the gap was cut and transcribed.
    for (sid, word) in [(first, "order"), (second, "thank")] {
        let segments =
            of_kind(&events, "speech_segment").into_iter().filter(|e| e["stream_sid"] == sid.to_string()).count();
        assert_eq!(segments, 1, "speech segments of {sid}: {kinds:?}");
        let texts: Vec<String> = of_kind(&events, "transcript")
            .iter()
            .filter(|e| e["stream_sid"] == sid.to_string())
            .map(|e| e["text"].as_str().unwrap().to_lowercase())
            .collect();
        assert!(texts.iter().any(|t| t.contains(word)), "transcripts of {sid}: {texts:?}");
    }
    let statuses: Vec<&str> =
        of_kind(&events, "call_status_changed").iter().map(|e| e["status"].as_str().unwrap()).collect();
    assert_eq!(statuses, ["in-progress", "completed"]);

    // The call beside it noticed nothing, and Twilio was never asked about it.
    let beside = replay_json(&node, other);
    for kind in ["stream_dropped", "stream_reattach_requested", "stream_resumed", "audio_shed"] {
        assert!(of_kind(&beside, kind).is_empty(), "{kind} on the other call");
    }
    assert_eq!(of_kind(&beside, "stream_stopped")[0]["reason"], "twilio");
    assert!(twilio.requests().iter().all(|r| !r.uri.contains(&other.to_string())));
}
