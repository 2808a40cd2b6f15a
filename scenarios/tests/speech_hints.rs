//! Vocabulary hints, through the real binary: a tenant's hints (REST `SpeechHints.json`) and an
//! app's `<Transcription hints=…>` reach Whisper as its prompt for that tenant's, or that call's,
//! speech only; they are on the call's record, so `voxgate replay --stage stt` decodes each
//! segment as the node did; bad hints are refused, and another tenant's cannot be read or set.

use std::time::Duration;

use serde_json::Value;
use voxgate_protocol::{AccountSid, CallSid, StreamSid};
use voxgate_scenarios::app::{Behaviour, CustomerApp};
use voxgate_scenarios::fixture::{replay_json, ACCOUNT, NUMBER, PUBLIC, TOKEN};
use voxgate_scenarios::node::Node;
use voxgate_scenarios::speech::{script, Voice};
use voxgate_scenarios::twilio::{extract_attr, Pace, Simulator};

/// A second tenant, whose number its own app answers (gateway mode).
const B_ACCOUNT: &str = "ACb0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0";
const B_TOKEN: &str = "0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b";
const B_NUMBER: &str = "+14155550190";

/// A REST request to `/2010-04-01/Accounts/{account}{path}` with these credentials.
async fn api(
    node: &Node,
    who: (&str, &str),
    account: &str,
    path: &str,
    params: Option<&[(&str, &str)]>,
) -> (u16, Value) {
    let url = format!("{}/2010-04-01/Accounts/{account}{path}", node.url());
    let c = reqwest::Client::new();
    let r = match params {
        None => c.get(url),
        Some(p) => c
            .post(url)
            .header("content-type", "application/x-www-form-urlencoded")
            .body(form_urlencoded::Serializer::new(String::new()).extend_pairs(p).finish()),
    };
    let r = r.basic_auth(who.0, Some(who.1)).send().await.unwrap();
    let status = r.status().as_u16();
    (status, serde_json::from_str(&r.text().await.unwrap_or_default()).unwrap_or(Value::Null))
}

/// The call's final transcripts, joined, lower case.
fn transcript(events: &[Value]) -> String {
    events
        .iter()
        .filter(|e| e["kind"] == "transcript")
        .filter_map(|e| e["text"].as_str())
        .collect::<Vec<_>>()
        .join(" ")
        .to_lowercase()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tenant_and_transcription_hints_steer_only_their_own_calls() {
    let app = CustomerApp::start(B_TOKEN).await.unwrap();
    app.set(Behaviour::Hints("Kathryn Smyth".into()));
    let config = format!(
        "public_url = \"{PUBLIC}\"\nallow_private_callbacks = true\n\
         [[tenants]]\naccount_sid = \"{ACCOUNT}\"\nauth_token = \"{TOKEN}\"\nnumbers = [\"{NUMBER}\"]\n\
         [[tenants]]\naccount_sid = \"{B_ACCOUNT}\"\nauth_token = \"{B_TOKEN}\"\n\
         numbers = [{{ number = \"{B_NUMBER}\", voice_url = \"{}/voice\" }}]\n",
        app.url
    );
    let mut node = Node::start(&config).unwrap();
    let work = tempfile::tempdir().unwrap();
    // Whisper tiny.en writes this name "Catherine Smites" unless told.
    let said = script(&[("My name is Kathryn Smyth.", Voice::Flite("slt".into()))], 400, 1500, work.path()).unwrap();
    let a = Simulator::new(&node.url(), PUBLIC, AccountSid::parse(ACCOUNT).unwrap(), TOKEN);
    let b = Simulator::new(&node.url(), PUBLIC, AccountSid::parse(B_ACCOUNT).unwrap(), B_TOKEN);
    let (a_creds, b_creds) = ((ACCOUNT, TOKEN), (B_ACCOUNT, B_TOKEN));

    // Before the tenant has hints.
    let plain = CallSid::from_u128(0x4_1a7e);
    a.call(plain, "+14155550123", NUMBER, &said.mulaw, Pace::Faster(2)).await.unwrap();

    // Bad hints are refused; another tenant's hints are not there for B to read or set.
    let long = "x".repeat(1001);
    let (st, v) = api(&node, a_creds, ACCOUNT, "/SpeechHints.json", Some(&[("Hints", long.as_str())])).await;
    assert_eq!((st, v["code"].as_u64()), (400, Some(20422)), "{v}");
    let (st, _) = api(&node, a_creds, ACCOUNT, "/SpeechHints.json", Some(&[("Hints", "a\u{1}b")])).await;
    assert_eq!(st, 400);
    let (st, _) = api(&node, b_creds, ACCOUNT, "/SpeechHints.json", None).await;
    assert_eq!(st, 404);
    let (st, _) = api(&node, b_creds, ACCOUNT, "/SpeechHints.json", Some(&[("Hints", "nonsense")])).await;
    assert_eq!(st, 404);
    let (_, v) = api(&node, a_creds, ACCOUNT, "/SpeechHints.json", None).await;
    assert_eq!(v["hints"].as_str(), Some(""), "B changed nothing of A's: {v}");
    let (st, v) = api(&node, a_creds, ACCOUNT, "/SpeechHints.json", Some(&[("Hints", " Kathryn Smyth ")])).await;
    assert_eq!((st, v["hints"].as_str()), (200, Some("Kathryn Smyth")), "{v}");
    let (st, v) = api(&node, a_creds, ACCOUNT, "/SpeechHints.json", None).await;
    assert_eq!((st, v["hints"].as_str()), (200, Some("Kathryn Smyth")), "{v}");
    let (_, v) = api(&node, b_creds, B_ACCOUNT, "/SpeechHints.json", None).await;
    assert_eq!(v["hints"].as_str(), Some(""), "B has none: {v}");

    // The tenant's hints.
    let hinted = CallSid::from_u128(0x4_1a7f);
    a.call(hinted, "+14155550124", NUMBER, &said.mulaw, Pace::Faster(2)).await.unwrap();

    // The other tenant's app asks for the hints in its TwiML.
    let gateway = CallSid::from_u128(0x4_1a80);
    let answer = b.inbound_call(gateway, "+14155550125", B_NUMBER).await.unwrap();
    assert_eq!(answer.status, 200, "{}", answer.body);
    assert!(!answer.body.contains("hints"), "the transcription is voxgate's to serve: {}", answer.body);
    let url = extract_attr(&answer.body, "<Stream ", "url").unwrap();
    let mut stream = b.connect_stream(&url).await.unwrap();
    let sid = StreamSid::from_u128(gateway.as_u128() ^ 0x5a5a);
    stream.start(sid, b.account(), gateway).await.unwrap();
    stream.send_audio(sid, &said.mulaw, Pace::Faster(2)).await.unwrap();
    stream.stop(sid, b.account(), gateway).await.unwrap();
    stream.closed(Duration::from_secs(10)).await;
    assert_eq!(b.status_callback(gateway, "completed", 2, Some(3)).await.unwrap(), 204);
    let hits = app
        .wait_until(Duration::from_secs(120), |h| {
            h.iter().any(|x| x.path == "/realtime" && x.param("TranscriptionEvent") == Some("transcription-stopped"))
        })
        .await;
    let heard: String = hits
        .iter()
        .filter(|h| h.path == "/realtime" && h.param("TranscriptionEvent") == Some("transcription-content"))
        .filter_map(|h| h.param("TranscriptionData"))
        .filter_map(|d| serde_json::from_str::<Value>(d).ok()?["transcript"].as_str().map(str::to_owned))
        .collect();
    assert!(heard.contains("Kathryn Smyth"), "the app's transcription callbacks: {heard:?}");

    node.wait_idle(Duration::from_secs(120)).await.unwrap();
    assert!(node.stop().unwrap().success());

    let plain_events = replay_json(&node, plain);
    let text = transcript(&plain_events);
    assert!(text.contains("my name is") && !text.contains("smyth"), "without hints: {text:?}");
    assert!(!plain_events.iter().any(|e| e["kind"] == "speech_hints"));
    for call in [hinted, gateway] {
        let events = replay_json(&node, call);
        let text = transcript(&events);
        assert!(text.contains("kathryn smyth"), "{call} with hints: {text:?}");
        // On the media log for the stream, then on the speech log for its track.
        let hints: Vec<(&str, Option<&str>)> = events
            .iter()
            .filter(|e| e["kind"] == "speech_hints")
            .map(|e| (e["log"].as_str().unwrap(), e["track"].as_str()))
            .collect();
        assert_eq!(hints, [("media", None), ("speech", Some("inbound"))], "{call}: {hints:?}");
        assert!(events.iter().filter(|e| e["kind"] == "speech_hints").all(|e| e["hints"] == "Kathryn Smyth"));
        // A replay decodes each segment with the hints it had.
        let out = node.cli(&["replay", "--call", &call.to_string(), "--stage", "stt"]).unwrap();
        let out = String::from_utf8_lossy(&out.stdout);
        assert!(out.contains(", 0 differ"), "{call}: {out}");
    }
}
