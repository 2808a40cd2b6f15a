//! Bad input through the real binary: each gets a clear error, a metric, an event where it concerns
//! a call — and never touches another call.

use std::time::Duration;

use serde_json::Value;
use voxgate_protocol::twilio::{media, signature, Algorithm};
use voxgate_protocol::{AccountSid, CallSid, StreamSid};
use voxgate_scenarios::fixture::{config, replay_json, sim, NUMBER, PUBLIC, TOKEN};
use voxgate_scenarios::node::Node;
use voxgate_scenarios::speech::{script, Voice};
use voxgate_scenarios::twilio::{Pace, Simulator};

const OTHER: &str = "ACfedcba9876543210fedcba9876543210";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhooks_refuse_what_is_not_twilio_or_not_ours() {
    let mut node = Node::start(&config("")).unwrap();
    let sim = sim(&node);
    let call = CallSid::from_u128(1);
    let params = sim.inbound_params(call, "+14155550123", NUMBER);

    // Unsigned and wrongly signed: 403, Twilio-style JSON naming the URL that was checked.
    for sig in [None, Some("L/OH5YylLD5NRKLltdqwSvS0BnU=")] {
        let (status, body) = sim.post_form("/api/voice/twilio/inbound", &params, sig).await.unwrap();
        assert_eq!(status, 403, "{body}");
        let v: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v["code"], 20003);
        assert_eq!(v["status"], 403);
        assert!(v["more_info"].as_str().unwrap().contains("20003"));
        assert!(v["message"].as_str().unwrap().contains("https://voxgate.test/api/voice/twilio/inbound"), "{body}");
    }
    // Signed for another URL (public_url mismatch): refused too.
    let bad =
        signature::compute(Algorithm::Sha1, TOKEN.as_bytes(), "http://127.0.0.1/api/voice/twilio/inbound", &params);
    assert_eq!(sim.post_form("/api/voice/twilio/inbound", &params, Some(&bad)).await.unwrap().0, 403);

    // Malformed sids and fields: 400 naming the field.
    let mut p = params.clone();
    p.retain(|(k, _)| k != "AccountSid");
    p.push(("AccountSid".into(), "AC123".into()));
    let (status, body) = sim.post_signed("/api/voice/twilio/inbound", &p).await.unwrap();
    assert_eq!(status, 400);
    assert!(body.contains("AccountSid"), "{body}");
    let mut p = params.clone();
    p.retain(|(k, _)| k != "To");
    p.push(("To".into(), "x".repeat(5000)));
    let (status, body) = sim.post_signed("/api/voice/twilio/inbound", &p).await.unwrap();
    assert_eq!(status, 400);
    assert!(body.contains("To"), "{body}");

    // Unknown tenant and a number the tenant does not own: <Reject/> and an event.
    let stranger = Simulator::new(&node.url(), PUBLIC, AccountSid::parse(OTHER).unwrap(), TOKEN);
    let unknown_tenant_call = CallSid::from_u128(2);
    let a = stranger.inbound_call(unknown_tenant_call, "+14155550123", NUMBER).await.unwrap();
    assert_eq!(a.status, 200);
    assert!(a.body.contains("<Reject />") && a.stream_url.is_none(), "{}", a.body);
    let unknown_number_call = CallSid::from_u128(3);
    let a = sim.inbound_call(unknown_number_call, "+14155550123", "+14155559999").await.unwrap();
    assert!(a.body.contains("<Reject />"), "{}", a.body);

    // No Media Stream for calls that do not exist.
    assert!(sim
        .connect_stream("wss://voxgate.test/api/voice/twilio/stream/CA00000000000000000000000000000099")
        .await
        .is_err());
    assert!(sim.connect_stream("wss://voxgate.test/api/voice/twilio/stream/not-a-sid").await.is_err());

    let metrics = node.scrape().await.unwrap();
    assert!(
        metrics.contains("voxgate_webhook_rejected_total{endpoint=\"inbound\",reason=\"signature\"} 3"),
        "{metrics}"
    );
    assert!(metrics.contains("reason=\"unknown_tenant\"} 1"));
    assert!(metrics.contains("reason=\"unknown_number\"} 1"));

    node.wait_idle(Duration::from_secs(10)).await.unwrap();
    assert!(node.stop().unwrap().success());
    assert!(replay_json(&node, call).is_empty(), "refused webhooks leave no call behind");
    // Nobody authenticated the unknown tenant's webhook: it is counted, never written.
    assert!(replay_json(&node, unknown_tenant_call).is_empty(), "unauthenticated webhooks write nothing");
    let e = replay_json(&node, unknown_number_call);
    assert_eq!(e[0]["reason"], "unknown_number");
}

/// Opens a call's stream and sends `bad` after some good audio; returns the close reason.
async fn stream_then(sim: &Simulator, call: CallSid, bad: impl Fn(StreamSid) -> String) -> Option<String> {
    let answer = sim.inbound_call(call, "+14155550123", NUMBER).await.unwrap();
    let mut s = sim.connect_stream(answer.stream_url.as_deref().unwrap()).await.unwrap();
    let sid = StreamSid::from_u128(call.as_u128() + 100);
    s.start(sid, sim.account, call).await.unwrap();
    s.send_audio(sid, &[0xFF; 1600], Pace::Faster(10)).await.unwrap();
    s.send_raw(&bad(sid)).await.unwrap();
    let reason = s.closed(Duration::from_secs(5)).await;
    sim.status_callback(call, "completed", 1, Some(1)).await.unwrap();
    reason
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn broken_streams_close_alone_and_other_calls_go_on() {
    let mut node = Node::start(&config("")).unwrap();
    let sim = sim(&node);

    // A healthy call talks while the broken ones come and go.
    let work = tempfile::tempdir().unwrap();
    let v = Voice::Flite("slt".into());
    let s = script(
        &[("Good morning, this call must not notice anything.", v.clone()), ("Not a thing.", v)],
        400,
        1200,
        work.path(),
    )
    .unwrap();
    let good_call = CallSid::from_u128(0x600d);
    let good = {
        let sim = sim.clone();
        let audio = s.mulaw.clone();
        tokio::spawn(async move { sim.call(good_call, "+14155550111", NUMBER, &audio, Pace::Faster(2)).await })
    };

    type Case<'a> = (u128, &'a str, Box<dyn Fn(StreamSid) -> String>);
    let cases: Vec<Case> = vec![
        (0xb1, "malformed_json", Box::new(|_| "{\"event\": \"media\", ".into())),
        (
            0xb2,
            "bad_base64",
            Box::new(|sid| {
                media::inbound_media_json(sid, 99, 99, 2000, b"x")
                    .replace("\"payload\":\"eA==\"", "\"payload\":\"!!!not base64!!!\"")
            }),
        ),
        (0xb3, "oversize_frame", Box::new(|sid| media::inbound_media_json(sid, 99, 99, 2000, &[0xFF; 4000]))),
        (0xb4, "invalid_message", Box::new(|_| "{\"event\":\"media\",\"sequenceNumber\":\"5\"}".into())),
    ];
    for (n, kind, bad) in &cases {
        let call = CallSid::from_u128(*n);
        let reason = stream_then(&sim, call, bad).await;
        assert_eq!(reason.as_deref(), Some(*kind), "close reason for {kind}");
    }

    // A start with another format is refused on its own.
    let call = CallSid::from_u128(0xb5);
    let answer = sim.inbound_call(call, "+14155550123", NUMBER).await.unwrap();
    let mut st = sim.connect_stream(answer.stream_url.as_deref().unwrap()).await.unwrap();
    let start =
        media::start_json(StreamSid::from_u128(5), sim.account, call, &[]).replace("audio/x-mulaw", "audio/x-alaw");
    st.send_raw(&media::connected_json()).await.unwrap();
    st.send_raw(&start).await.unwrap();
    assert_eq!(st.closed(Duration::from_secs(5)).await.as_deref(), Some("unsupported_format"));
    sim.status_callback(call, "completed", 1, Some(1)).await.unwrap();

    let report = good.await.unwrap().unwrap();
    assert!(report.closed_by_server.is_none());

    let metrics = node.scrape().await.unwrap();
    for (_, kind, _) in &cases {
        assert!(
            metrics.contains(&format!("twilio_websocket_errors_total{{error_type=\"{kind}\"}} 1")),
            "{kind}: {metrics}"
        );
    }
    node.wait_idle(Duration::from_secs(20)).await.unwrap();
    assert!(node.stop().unwrap().success());

    for (n, kind, _) in &cases {
        let e = replay_json(&node, CallSid::from_u128(*n));
        let fault =
            e.iter().find(|e| e["kind"] == "stream_fault").unwrap_or_else(|| panic!("no fault event for {kind}"));
        assert_eq!(fault["fault"], *kind);
        let stop = e.iter().find(|e| e["kind"] == "stream_stopped").unwrap();
        assert_eq!(stop["reason"], "fault");
        // the good audio before the fault is kept
        let frames: u64 = e.iter().filter(|e| e["kind"] == "media_batch").map(|b| b["frames"].as_u64().unwrap()).sum();
        assert_eq!(frames, 10, "{kind}");
    }
    let e = replay_json(&node, good_call);
    assert!(!e.iter().any(|e| e["kind"] == "stream_fault" || e["kind"] == "audio_shed"));
    assert_eq!(e.iter().filter(|e| e["kind"] == "speech_segment").count(), 2);
    let frames: u64 = e.iter().filter(|e| e["kind"] == "media_batch").map(|b| b["frames"].as_u64().unwrap()).sum();
    assert_eq!(frames as usize, s.mulaw.len() / 160);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_upgrade_must_be_signed_by_the_tenant() {
    let node = Node::start(&config("")).unwrap();
    let sim = sim(&node);
    let call = CallSid::from_u128(0x5167);
    let answer = sim.inbound_call(call, "+14155550123", NUMBER).await.unwrap();
    let url = answer.stream_url.unwrap();
    assert_eq!(url, format!("wss://voxgate.test/api/voice/twilio/stream/{call}"));
    // Signed with another token: the upgrade is refused.
    let forger = Simulator::new(&node.url(), PUBLIC, sim.account, "another-token-entirely");
    assert!(forger.connect_stream(&url).await.is_err());
    // The real one still connects afterwards.
    let s = sim.connect_stream(&url).await.unwrap();
    s.close().await;
    let metrics = node.scrape().await.unwrap();
    assert!(metrics.contains("twilio_websocket_errors_total{error_type=\"signature\"} 1"), "{metrics}");
}
