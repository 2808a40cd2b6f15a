//! Downstream analytics through the real binary and a real `nats-server` (started here on a free
//! loopback port with a temp store, and stopped): a plain NATS client subscribed to
//! `voxgate.events.>` sees every public event of a call as JSON on `voxgate.events.{tenant}.{kind}`;
//! events made while NATS is down arrive once it is back.

use std::time::{Duration, Instant};

use futures_util::StreamExt;
use serde_json::Value;
use voxgate_protocol::CallSid;
use voxgate_scenarios::fixture::{config, sim, ACCOUNT, NUMBER};
use voxgate_scenarios::nats::Nats;
use voxgate_scenarios::node::Node;

/// Messages from `msgs` until `done` says the collection is complete (or `within` passes).
async fn collect(
    msgs: &mut async_nats::jetstream::consumer::pull::Stream,
    got: &mut Vec<(String, Value)>,
    within: Duration,
    done: impl Fn(&[(String, Value)]) -> bool,
) {
    let deadline = tokio::time::Instant::now() + within;
    while !done(got) {
        match tokio::time::timeout_at(deadline, msgs.next()).await {
            Ok(Some(Ok(m))) => {
                got.push((m.subject.to_string(), serde_json::from_slice(&m.payload).expect("JSON")));
                let _ = m.ack().await;
            }
            Ok(Some(Err(_))) => tokio::time::sleep(Duration::from_millis(50)).await,
            _ => break,
        }
    }
}

/// A plain NATS client's view of the subjects: a JetStream stream capturing `voxgate.events.>`
/// (kept in the server's store across its restart; duplicates dropped by `Nats-Msg-Id`).
async fn events_stream(url: &str, create: bool) -> async_nats::jetstream::stream::Stream {
    use async_nats::jetstream;
    let client = async_nats::ConnectOptions::new().retry_on_initial_connect().connect(url).await.unwrap();
    let js = jetstream::new(client);
    if create {
        let cfg = jetstream::stream::Config {
            name: "VOXGATE_EVENTS".into(),
            subjects: vec!["voxgate.events.>".into()],
            ..Default::default()
        };
        js.create_stream(cfg).await.unwrap()
    } else {
        js.get_stream("VOXGATE_EVENTS").await.unwrap()
    }
}

/// Reads the stream from its start (an ephemeral consumer: create it right before reading).
async fn reader(stream: &async_nats::jetstream::stream::Stream) -> async_nats::jetstream::consumer::pull::Stream {
    use async_nats::jetstream;
    let consumer = stream
        .create_consumer(jetstream::consumer::pull::Config {
            deliver_policy: jetstream::consumer::DeliverPolicy::All,
            ..Default::default()
        })
        .await
        .unwrap();
    consumer.messages().await.unwrap()
}

fn has(got: &[(String, Value)], call: CallSid, kind: &str) -> bool {
    got.iter().any(|(_, v)| v["kind"] == kind && v["call_sid"] == call.to_string())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_public_event_reaches_a_plain_nats_client_even_across_an_outage() {
    let nats = Nats::fresh();
    let events = events_stream(&nats.url(), true).await;
    let node =
        Node::start(&config(&format!("[stt]\nenabled = false\n[analytics]\nnats_url = \"{}\"\n", nats.url()))).unwrap();
    let s = sim(&node);

    let one = CallSid::from_u128(0xe1);
    assert!(s.inbound_call(one, "+14155550031", NUMBER).await.unwrap().body.contains("<Stream"));
    node.advance_clock(Duration::from_secs(42)).await.unwrap();
    s.status_callback(one, "completed", 1, Some(42)).await.unwrap();
    let mut msgs = reader(&events).await;
    let mut got = Vec::new();
    collect(&mut msgs, &mut got, Duration::from_secs(20), |g| {
        has(g, one, "call_received") && has(g, one, "call_status_changed")
    })
    .await;
    let (subject, received) = got
        .iter()
        .find(|(_, v)| v["kind"] == "call_received" && v["call_sid"] == one.to_string())
        .unwrap_or_else(|| panic!("call_received not published; got {got:?}; node log:\n{}", node.logs()));
    assert_eq!(subject, &format!("voxgate.events.{ACCOUNT}.call_received"));
    assert_eq!(received["tenant"], ACCOUNT);
    assert_eq!((received["from"].as_str(), received["to"].as_str()), (Some("+14155550031"), Some(NUMBER)));
    assert_eq!(received["log"], "calls");
    assert!(received["event_id"].as_str().is_some_and(|id| id.starts_with("EV")), "{received}");
    assert!(received["occurred_at"].as_str().is_some());
    let done = got
        .iter()
        .find(|(_, v)| v["kind"] == "call_status_changed" && v["call_sid"] == one.to_string())
        .map(|(_, v)| v)
        .unwrap();
    assert_eq!((done["status"].as_str(), done["duration_secs"].as_u64()), (Some("completed"), Some(42)));
    let (_, health) = node.get_json("/api/voice/health").await.unwrap();
    assert_eq!(health["nats"]["connected"], true, "{health}");
    // No audio on the analytics subjects.
    assert!(got
        .iter()
        .all(|(_, v)| v["kind"] != "media_batch" && v["kind"] != "speech_segment" && v["kind"] != "speech_progress"));

    // NATS goes away; calls go on; when it is back, the events made meanwhile arrive, once.
    drop((msgs, events));
    let (port, store) = nats.stop();
    let two = CallSid::from_u128(0xe2);
    assert!(s.inbound_call(two, "+14155550032", NUMBER).await.unwrap().body.contains("<Stream"));
    node.advance_clock(Duration::from_secs(7)).await.unwrap();
    s.status_callback(two, "completed", 1, Some(7)).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let (code, health) = node.get_json("/api/voice/health").await.unwrap();
        assert_eq!(code, 200, "analytics being away is not a failure: {health}");
        if health["nats"]["connected"] == false {
            break;
        }
        assert!(Instant::now() < deadline, "health never noticed NATS gone: {health}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let nats = Nats::start(port, store);
    let events = events_stream(&nats.url(), false).await;
    let mut msgs = reader(&events).await;
    let mut got = Vec::new();
    collect(&mut msgs, &mut got, Duration::from_secs(20), |g| {
        has(g, two, "call_received") && has(g, two, "call_status_changed")
    })
    .await;
    // Anything resent after the reconnect would show here; give it a moment.
    collect(&mut msgs, &mut got, Duration::from_secs(2), |_| false).await;
    assert!(has(&got, two, "call_received") && has(&got, two, "call_status_changed"), "{got:?}");
    let received: Vec<_> =
        got.iter().filter(|(_, v)| v["kind"] == "call_received" && v["call_sid"] == two.to_string()).collect();
    assert_eq!(received.len(), 1, "{got:?}");
}
