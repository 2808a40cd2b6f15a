//! voxgate in front of a real Twilio app (gateway mode), through the real binary: the app keeps
//! its call flow (its TwiML runs with voxgate's both-track fork first), every request it gets is
//! signed as Twilio signs, its status callbacks are forwarded, and its `<Start><Transcription>` is
//! served by voxgate: each transcript of both speakers reaches it once, in Twilio's callback
//! format. A misbehaving app is handled as Twilio would handle it.

use std::time::{Duration, Instant};

use serde_json::Value;
use voxgate_protocol::{AccountSid, CallSid, StreamSid};
use voxgate_scenarios::app::{Behaviour, CustomerApp};
use voxgate_scenarios::fixture::{replay_json, ACCOUNT, PUBLIC, TOKEN};
use voxgate_scenarios::node::Node;
use voxgate_scenarios::speech::{script, Voice};
use voxgate_scenarios::twilio::{extract_attr, Pace, Simulator};

const GW_NUMBER: &str = "+14155550170";

fn gateway_config(app: &CustomerApp, fallback: bool, extra: &str) -> String {
    let fb = if fallback { format!(", voice_fallback_url = \"{}/ivr/voice\"", app.url) } else { String::new() };
    format!(
        "public_url = \"{PUBLIC}\"\nallow_private_callbacks = true\n{extra}\n[gateway]\napp_timeout_ms = 1500\nfallback_timeout_ms = 3000\n[[tenants]]\naccount_sid = \"{ACCOUNT}\"\nauth_token = \"{TOKEN}\"\nnumbers = [{{ number = \"{GW_NUMBER}\", voice_url = \"{}/voice\", status_callback = \"{}/status\"{fb} }}]\n",
        app.url, app.url
    )
}

fn sim(node: &Node) -> Simulator {
    Simulator::new(&node.url(), PUBLIC, AccountSid::parse(ACCOUNT).unwrap(), TOKEN)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_twilio_app_keeps_its_flow_and_hears_both_sides() {
    let calls: u128 = std::env::var("GATEWAY_CALLS").ok().and_then(|v| v.parse().ok()).unwrap_or(4);
    let app = CustomerApp::start(TOKEN).await.unwrap();
    let mut node = Node::start(&gateway_config(&app, false, "")).unwrap();
    let s = sim(&node);
    let work = tempfile::tempdir().unwrap();
    let (caller, agent) = voxgate_scenarios::app::conversation(work.path()).unwrap();

    let mut ids = Vec::new();
    for n in 0..calls {
        let call = CallSid::from_u128(0x6a7e_0000 + n);
        ids.push(call);
        let a = s.inbound_call(call, &format!("+1415555{:04}", 1000 + n), GW_NUMBER).await.unwrap();
        assert_eq!(a.status, 200, "{}", a.body);
        // The app's flow, with voxgate's fork first and the transcription taken out.
        let fork = a.body.find("<Start><Stream").expect("fork");
        assert!(fork < a.body.find("<Say").unwrap(), "{}", a.body);
        assert!(a.body.contains("track=\"both_tracks\""), "{}", a.body);
        assert!(
            a.body.contains(&format!("action=\"{}/ivr/menu\"", app.url)),
            "relative URLs point at the app: {}",
            a.body
        );
        assert!(a.body.contains("<Dial") && !a.body.contains("Transcription"), "{}", a.body);
        // Twilio opens the fork: both parties' audio.
        let url = extract_attr(&a.body, "<Stream ", "url").unwrap();
        let mut stream = s.connect_stream(&url).await.unwrap();
        let sid = StreamSid::from_u128(call.as_u128() ^ 0x5a5a);
        stream.start_both(sid, s.account(), call).await.unwrap();
        stream.send_two_tracks(sid, &caller.mulaw, &agent.mulaw, Pace::Faster(3)).await.unwrap();
        stream.stop(sid, s.account(), call).await.unwrap();
        stream.closed(Duration::from_secs(10)).await;
        node.advance_clock(Duration::from_secs(30)).await.unwrap();
        assert_eq!(s.status_callback(call, "completed", 3, Some(25)).await.unwrap(), 204);
    }

    // Every session ends with transcription-stopped once the last transcript is in; every status
    // callback is forwarded (on its own task: it may come after the last transcription event).
    let hits = app
        .wait_until(Duration::from_secs(180), |h| {
            h.iter()
                .filter(|x| x.path == "/realtime" && x.param("TranscriptionEvent") == Some("transcription-stopped"))
                .count()
                == calls as usize
                && h.iter().filter(|x| x.path == "/status").count() == calls as usize
        })
        .await;
    assert!(hits.iter().all(|h| h.signature_valid), "every request the app got is signed as Twilio signs");
    assert_eq!(hits.iter().filter(|h| h.path == "/voice").count(), calls as usize);
    let statuses: Vec<_> = hits.iter().filter(|h| h.path == "/status").collect();
    assert_eq!(statuses.len(), calls as usize, "status callbacks forwarded");
    assert!(statuses.iter().all(|h| h.param("CallStatus") == Some("completed") && h.idempotency.is_some()));
    for call in &ids {
        let rt: Vec<_> =
            hits.iter().filter(|h| h.path == "/realtime" && h.param("CallSid") == Some(&call.to_string())).collect();
        let events: Vec<&str> = rt.iter().map(|h| h.param("TranscriptionEvent").unwrap()).collect();
        assert_eq!(events.first(), Some(&"transcription-started"), "{events:?}");
        assert_eq!(events.last(), Some(&"transcription-stopped"), "{events:?}");
        // Once each, in order.
        let seqs: Vec<u32> = rt.iter().map(|h| h.param("SequenceId").unwrap().parse().unwrap()).collect();
        assert_eq!(seqs, (1..=seqs.len() as u32).collect::<Vec<_>>(), "{seqs:?}");
        let said = |track: &str| -> String {
            rt.iter()
                .filter(|h| h.param("Track") == Some(track))
                .filter_map(|h| h.param("TranscriptionData"))
                .map(|d| serde_json::from_str::<Value>(d).unwrap()["transcript"].as_str().unwrap().to_lowercase())
                .collect::<Vec<_>>()
                .join(" ")
        };
        let (c, a) = (said("inbound_track"), said("outbound_track"));
        assert!(c.contains("order") && c.contains("thank"), "caller: {c}");
        assert!(a.contains("shipped"), "agent: {a}");
        assert!(rt
            .iter()
            .filter(|h| h.param("TranscriptionEvent") == Some("transcription-content"))
            .all(|h| h.param("Final") == Some("true")));
    }
    node.wait_idle(Duration::from_secs(60)).await.unwrap();
    assert!(node.stop().unwrap().success());
    // The exchange is on the call's record.
    let events = replay_json(&node, ids[0]);
    let kinds: Vec<&str> = events.iter().map(|e| e["kind"].as_str().unwrap()).collect();
    for k in
        ["call_received", "app_exchange", "gateway_answered", "transcription_started", "stream_started", "transcript"]
    {
        assert!(kinds.contains(&k), "{k} missing: {kinds:?}");
    }
    let voice = events.iter().find(|e| e["kind"] == "app_exchange" && e["purpose"] == "voice").unwrap();
    assert_eq!((voice["status"].as_u64(), voice["signed_for_app"].as_bool()), (Some(200), Some(true)));
    assert!(events.iter().any(|e| e["kind"] == "app_exchange" && e["purpose"] == "transcription"));
    assert!(events.iter().any(|e| e["kind"] == "app_exchange" && e["purpose"] == "status_callback"));
    let out = node.cli(&["replay", "--call", &ids[0].to_string()]).unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("caller: ") && text.contains("agent: ") && text.contains("app_exchange"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_misbehaving_app_is_handled_as_twilio_would() {
    let app = CustomerApp::start(TOKEN).await.unwrap();
    let mut node = Node::start(&gateway_config(&app, true, "[stt]\nenabled = false\n")).unwrap();
    let s = sim(&node);
    let ring = |n: u128| {
        let s = s.clone();
        async move { s.inbound_call(CallSid::from_u128(0xbad_0000 + n), "+14155550111", GW_NUMBER).await.unwrap() }
    };
    // Too slow: the fallback URL answers (with Twilio's ErrorCode and ErrorUrl).
    app.set(Behaviour::Slow(Duration::from_secs(3)));
    let a = ring(1).await;
    assert!(a.body.contains("<Start><Stream") && a.body.contains("<Dial"), "{}", a.body);
    let fb = app.wait_until(Duration::from_secs(5), |h| h.iter().any(|x| x.path == "/ivr/voice")).await;
    let fb = fb.iter().find(|x| x.path == "/ivr/voice").unwrap();
    assert_eq!(fb.param("ErrorCode"), Some("11205"));
    // A 500: the fallback again; not XML: the fallback with 12100.
    app.set(Behaviour::Error);
    let a = ring(2).await;
    assert!(a.body.contains("<Dial"), "{}", a.body);
    app.set(Behaviour::NotXml);
    let a = ring(3).await;
    assert!(a.body.contains("<Dial"), "{}", a.body);
    // A redirect is followed, the app's answer comes from where it points.
    app.set(Behaviour::Redirect);
    let a = ring(4).await;
    assert!(a.body.contains("<Dial"), "{}", a.body);
    // Unknown verbs pass (Twilio warns with 12200); the app's own three tracks leave room for the
    // caller's only; a voice bot's <Connect><Stream> gets the fork beside it.
    app.set(Behaviour::UnknownVerb);
    let a = ring(5).await;
    assert!(a.body.contains("<Sayy>"), "{}", a.body);
    app.set(Behaviour::OwnStreams);
    let a = ring(6).await;
    assert!(
        a.body.contains("track=\"inbound_track\"") && a.body.contains("wss://recorder.example.com/a"),
        "{}",
        a.body
    );
    app.set(Behaviour::VoiceBot);
    let a = ring(7).await;
    assert!(a.body.contains("<Start><Stream") && a.body.contains("<Connect><Stream"), "{}", a.body);
    // TwiML the app marks cacheable is served from the cache the second time.
    app.set(Behaviour::Cacheable);
    let before = app.hits_to("/voice").len();
    ring(8).await;
    let t = Instant::now();
    let a = ring(9).await;
    let hit_ms = t.elapsed().as_secs_f64() * 1000.0;
    assert!(a.body.contains("<Dial"), "{}", a.body);
    assert_eq!(app.hits_to("/voice").len(), before + 1, "the second call was answered from the cache");
    println!("a cached answer: {hit_ms:.1} ms");
    assert!(node.scrape().await.unwrap().contains("voxgate_app_twiml_cache_total{outcome=\"hit\"} 1"));
    assert!(app.hits().iter().all(|h| h.signature_valid));

    node.wait_idle(Duration::from_secs(30)).await.ok();
    assert!(node.stop().unwrap().success());
    let events = replay_json(&node, CallSid::from_u128(0xbad_0001));
    let x: Vec<&Value> = events.iter().filter(|e| e["kind"] == "app_exchange").collect();
    assert_eq!((x[0]["purpose"].as_str(), x[0]["error_code"].as_u64()), (Some("voice"), Some(11205)));
    assert_eq!((x[1]["purpose"].as_str(), x[1]["status"].as_u64()), (Some("fallback"), Some(200)));
    let e = replay_json(&node, CallSid::from_u128(0xbad_0003));
    let x = e.iter().find(|e| e["kind"] == "app_exchange").unwrap();
    assert_eq!(x["error_code"], 12100);
    let e = replay_json(&node, CallSid::from_u128(0xbad_0005));
    let g = e.iter().find(|e| e["kind"] == "gateway_answered").unwrap();
    assert_eq!(g["warnings"][0][0], 12200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn when_app_and_fallback_fail_the_caller_hears_twilios_error() {
    let app = CustomerApp::start(TOKEN).await.unwrap();
    app.set(Behaviour::Error);
    let node = Node::start(&gateway_config(&app, false, "[stt]\nenabled = false\n")).unwrap();
    let a = sim(&node).inbound_call(CallSid::from_u128(0xe), "+14155550111", GW_NUMBER).await.unwrap();
    assert!(a.body.contains("an application error has occurred") && a.body.contains("<Hangup"), "{}", a.body);
    let m = node.scrape().await.unwrap();
    assert!(m.contains("voxgate_app_errors_total{purpose=\"voice\",code=\"11200\"} 1"), "{m}");
}

/// A REST request as the tenant (HTTP Basic with its auth token).
async fn api(node: &Node, path: &str, params: &[(&str, &str)]) -> (u16, Value) {
    let body = form_urlencoded::Serializer::new(String::new()).extend_pairs(params).finish();
    let r = reqwest::Client::new()
        .post(format!("{}/2010-04-01/Accounts/{ACCOUNT}{path}", node.url()))
        .basic_auth(ACCOUNT, Some(TOKEN))
        .header("content-type", "application/x-www-form-urlencoded")
        .body(body)
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    (status, serde_json::from_str(&r.text().await.unwrap_or_default()).unwrap_or(Value::Null))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_official_twilio_client_routes_a_number_and_transcribes_a_running_call() {
    let app = CustomerApp::start(TOKEN).await.unwrap();
    let mut node = Node::start(&gateway_config(&app, false, "")).unwrap();
    let s = sim(&node);
    // twilio-python sets the number's routing fields; the gateway routes by them.
    let number = "+14155550180";
    let (voice, status, fallback) =
        (format!("{}/voice", app.url), format!("{}/status", app.url), format!("{}/ivr/voice", app.url));
    let n = voxgate_scenarios::fixture::twilio_client(
        &node,
        ACCOUNT,
        TOKEN,
        &["number", number, &voice, &status, &fallback],
    );
    assert_eq!(
        (n["voice_url"].as_str(), n["status_callback"].as_str()),
        (Some(voice.as_str()), Some(status.as_str())),
        "{n}"
    );
    assert_eq!(
        (n["voice_fallback_url"].as_str(), n["voice_method"].as_str()),
        (Some(fallback.as_str()), Some("POST")),
        "{n}"
    );
    let call = CallSid::from_u128(0x7e57_0001);
    let a = s.inbound_call(call, "+14155550199", number).await.unwrap();
    assert!(a.body.contains("<Start><Stream") && a.body.contains("<Dial"), "{}", a.body);
    assert_eq!(app.hits_to("/voice").len(), 1);

    // Real-time transcription started over REST on the running call, stopped by its name.
    let t = voxgate_scenarios::fixture::twilio_client(
        &node,
        ACCOUNT,
        TOKEN,
        &["transcribe", &call.to_string(), &format!("{}/rest-realtime", app.url), "by-rest"],
    );
    assert_eq!((t["status"].as_str(), t["name"].as_str()), (Some("in-progress"), Some("by-rest")), "{t}");
    let gt = t["sid"].as_str().unwrap().to_owned();
    assert!(gt.starts_with("GT") && gt.len() == 34, "{t}");
    let work = tempfile::tempdir().unwrap();
    let caller = script(
        &[("Hello, I would like to check the status of my order.", Voice::Espeak("en-us".into()))],
        400,
        1500,
        work.path(),
    )
    .unwrap();
    let mut stream = s.connect_stream(&extract_attr(&a.body, "<Stream ", "url").unwrap()).await.unwrap();
    let sid = StreamSid::from_u128(0x7e57_5a5a);
    stream.start_both(sid, s.account(), call).await.unwrap();
    stream.send_two_tracks(sid, &caller.mulaw, &vec![0xff; caller.mulaw.len()], Pace::Faster(3)).await.unwrap();
    let rest = |h: &[voxgate_scenarios::app::Hit], event: &str| {
        h.iter().filter(|x| x.path == "/rest-realtime" && x.param("TranscriptionEvent") == Some(event)).count()
    };
    let hits = app.wait_until(Duration::from_secs(120), |h| rest(h, "transcription-content") >= 1).await;
    let content: Vec<_> = hits
        .iter()
        .filter(|x| x.path == "/rest-realtime" && x.param("TranscriptionEvent") == Some("transcription-content"))
        .collect();
    assert!(!content.is_empty(), "no transcript reached the REST session");
    assert!(content.iter().all(|h| h.param("TranscriptionSid") == Some(gt.as_str()) && h.signature_valid));
    let stopped =
        voxgate_scenarios::fixture::twilio_client(&node, ACCOUNT, TOKEN, &["stop", &call.to_string(), "by-rest"]);
    assert_eq!(stopped["status"], "stopped", "{stopped}");
    let hits = app.wait_until(Duration::from_secs(30), |h| rest(h, "transcription-stopped") == 1).await;
    let events: Vec<&str> =
        hits.iter().filter(|x| x.path == "/rest-realtime").filter_map(|x| x.param("TranscriptionEvent")).collect();
    assert_eq!(events.first(), Some(&"transcription-started"), "{events:?}");
    assert_eq!(events.last(), Some(&"transcription-stopped"), "{events:?}");
    // The app's own <Transcription> (from its TwiML) runs on, untouched by the REST stop.
    assert!(!hits
        .iter()
        .any(|x| x.path == "/realtime" && x.param("TranscriptionEvent") == Some("transcription-stopped")));

    stream.stop(sid, s.account(), call).await.unwrap();
    stream.closed(Duration::from_secs(10)).await;
    node.advance_clock(Duration::from_secs(10)).await.unwrap();
    assert_eq!(s.status_callback(call, "completed", 1, Some(10)).await.unwrap(), 204);
    // An ended call, an unknown call, a bad status: Twilio's errors, nothing written.
    let path = format!("/Calls/{call}/Transcriptions.json");
    let (st, v) = api(&node, &path, &[("StatusCallbackUrl", "https://example.com/t")]).await;
    assert_eq!((st, v["code"].as_u64()), (400, Some(21220)), "{v}");
    let (st, _) = api(&node, &format!("/Calls/{}/Transcriptions.json", CallSid::from_u128(0xdead)), &[]).await;
    assert_eq!(st, 404);
    let (st, v) = api(&node, &format!("/Calls/{call}/Transcriptions/by-rest.json"), &[("Status", "paused")]).await;
    assert!(st == 400 || v["code"] == 21220, "{st} {v}");
    node.wait_idle(Duration::from_secs(60)).await.unwrap();
    assert!(node.stop().unwrap().success());
    let events = replay_json(&node, call);
    assert!(events.iter().any(|e| e["kind"] == "transcription_started" && e["source"] == "rest"));
    assert!(events.iter().any(|e| e["kind"] == "transcription_stopped" && e["reason"] == "rest"));
}
