//! Fraud screening through the real binary: a verdict within moments of the evidence, the number
//! blocked at the webhook from then on, and an active call ended — by its actor and at (a fake)
//! Twilio's REST API.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::{Path, State};
use axum::routing::post;
use axum::Router;
use voxgate_protocol::CallSid;
use voxgate_scenarios::fixture::{config, replay_json, sim, ACCOUNT, NUMBER};
use voxgate_scenarios::node::Node;

/// A fake Twilio REST API that records `POST …/Calls/{CallSid}.json` bodies.
async fn fake_twilio() -> (String, Arc<Mutex<Vec<(String, String)>>>) {
    let seen: Arc<Mutex<Vec<(String, String)>>> = Arc::default();
    let app = Router::new()
        .route(
            "/2010-04-01/Accounts/{account}/Calls/{call}",
            post(|State(seen): State<Seen>, Path((_, call)): Path<(String, String)>, body: String| async move {
                seen.lock().unwrap_or_else(|e| e.into_inner()).push((call, body));
                "{}"
            }),
        )
        .with_state(seen.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move { axum::serve(listener, app).await });
    (format!("http://{addr}"), seen)
}

/// The requests the fake Twilio saw: (call, body).
type Seen = Arc<Mutex<Vec<(String, String)>>>;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fraud_blocks_numbers_and_ends_calls() {
    let (twilio, seen) = fake_twilio().await;
    let node = Node::start(&config(&format!(
        "twilio_api_url = \"{twilio}\"\n[stt]\nenabled = false\n[fraud.tenants.{ACCOUNT}]\nallowed_countries = [\"US\"]\nmax_calls_per_number = 3\n"
    )))
    .unwrap();
    let sim = sim(&node);

    // Geo permission: a call from Nigeria to a US-only tenant is taken at the webhook (the gate
    // knows nothing of countries), then ended by the fraud stage within moments.
    let foreign = CallSid::from_u128(0xf0);
    let mut p = sim.inbound_params(foreign, "+2348031234567", NUMBER);
    for (k, v) in p.iter_mut() {
        if k == "FromCountry" {
            *v = "NG".into();
        }
    }
    let t0 = Instant::now();
    let (st, body) = sim.post_signed("/api/voice/twilio/inbound", &p).await.unwrap();
    assert!(st == 200 && body.contains("<Stream"), "{body}");
    let mut ended_at = None;
    while t0.elapsed() < Duration::from_secs(10) {
        if seen.lock().unwrap().iter().any(|(c, _)| c == &format!("{foreign}.json")) {
            ended_at = Some(t0.elapsed());
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let ended_at = ended_at.expect("the call was ended at Twilio");
    println!("webhook → call ended at Twilio: {ended_at:?}");
    assert!(seen.lock().unwrap().iter().any(|(_, b)| b == "Status=completed"));
    // The number is blocked at the webhook from now on.
    let again = sim.inbound_call(CallSid::from_u128(0xf1), "+2348031234567", NUMBER).await.unwrap();
    assert!(again.body.contains("<Reject"), "{}", again.body);

    // Velocity: more than 3 calls from one number in a minute blocks it.
    let mut refused = None;
    for i in 0..8u128 {
        let a = sim.inbound_call(CallSid::from_u128(0x100 + i), "+14155550177", NUMBER).await.unwrap();
        if a.body.contains("<Reject") {
            refused = Some(i);
            break;
        }
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
    let refused = refused.expect("the caller was blocked");
    assert!(refused >= 4, "blocked after its 4th call, not before (refused at call {refused})");

    // A config reload (SIGHUP) applies new rules without a restart: 20 calls per number now.
    let cfg = std::fs::read_to_string(&node.config_path)
        .unwrap()
        .replace("max_calls_per_number = 3", "max_calls_per_number = 20");
    std::fs::write(&node.config_path, cfg).unwrap();
    let pid = node.pid().expect("running").to_string();
    assert!(std::process::Command::new("kill").args(["-HUP", &pid]).status().unwrap().success());
    let mut reloaded = false;
    for _ in 0..100 {
        if node.logs().contains("fraud rules reloaded") {
            reloaded = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(reloaded, "{}", node.logs());
    for i in 0..8u128 {
        let a = sim.inbound_call(CallSid::from_u128(0x200 + i), "+14155550178", NUMBER).await.unwrap();
        assert!(a.body.contains("<Stream"), "call {i} after the reload: {}", a.body);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let mut node = node;
    node.stop().unwrap();
    let events = replay_json(&node, foreign);
    let kinds: Vec<&str> = events.iter().filter_map(|e| e["kind"].as_str()).collect();
    assert!(kinds.contains(&"hangup_requested"), "{kinds:?}");
    let done =
        events.iter().find(|e| e["kind"] == "call_status_changed" && e["status"] == "completed").expect("completed");
    assert_eq!(done["source"], "voxgate");
    let blocked = replay_json(&node, CallSid::from_u128(0xf1));
    assert_eq!(blocked[0]["reason"]["blocked_caller"]["number"], "+2348031234567");

    // replay --stage fraud: the current rules (20 per number) would not block the 4th call of
    // +14155550177 that the rules of the time (3 per number) did.
    let fourth = CallSid::from_u128(0x100 + 3);
    let out = node.cli(&["replay", "--call", &fourth.to_string(), "--stage", "fraud"]).unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(text.contains("velocity_from") && text.contains("CHANGED") && text.contains("1 changed"), "{text}");
    // The geo verdict is the same under the current rules.
    let out = node.cli(&["replay", "--call", &foreign.to_string(), "--stage", "fraud"]).unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("geo_permission") && text.contains("0 changed"), "{text}");
}
