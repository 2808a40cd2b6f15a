//! The fraud-attack scenario: premium-rate pumping, a wangiri burst and an off-hours spike mixed
//! into ordinary traffic, through the real binary. It reports precision and recall against its
//! ground truth and how long each attack ran before it was stopped, and asserts the goals: every
//! attack pattern caught, no legitimate call touched, a block within 1 s of the evidence.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::routing::post;
use axum::Router;
use voxgate_protocol::{AccountSid, CallSid};
use voxgate_scenarios::fixture::{config, replay_json, sim, NUMBER, PUBLIC};
use voxgate_scenarios::node::Node;
use voxgate_scenarios::twilio::Simulator;

/// A second tenant whose business hours are never now.
const NIGHT: &str = "AC00000000000000000000000000000b0b";
const NIGHT_TOKEN: &str = "night-tenant-token-0123456789";
const NIGHT_NUMBER: &str = "+14155550200";

fn now_us() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_micros() as i64).unwrap_or(0)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Truth {
    Legit,
    Pumping,
    Wangiri,
    OffHours,
}

struct Sent {
    truth: Truth,
    /// Wall clock (µs) when the webhook went out.
    at: i64,
    /// Refused at the webhook.
    refused: bool,
}

async fn fake_twilio() -> (String, Arc<Mutex<Vec<String>>>) {
    let seen: Arc<Mutex<Vec<String>>> = Arc::default();
    let s = seen.clone();
    let app = Router::new().route(
        "/2010-04-01/Accounts/{account}/Calls/{call}",
        post(move |axum::extract::Path((_, call)): axum::extract::Path<(String, String)>| {
            let s = s.clone();
            async move {
                s.lock().unwrap_or_else(|e| e.into_inner()).push(call.trim_end_matches(".json").to_owned());
                "{}"
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move { axum::serve(listener, app).await });
    (format!("http://{addr}"), seen)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fraud_attack_is_caught_and_legitimate_traffic_is_not() {
    let (twilio, ended) = fake_twilio().await;
    let hour = ((now_us() / 3_600_000_000) % 24) as u8;
    let start = (hour + 2) % 24;
    let end = if start == 23 { 24 } else { start + 1 };
    let node = Node::start(&config(&format!(
        "twilio_api_url = \"{twilio}\"\n[stt]\nenabled = false\n[quotas]\ncalls_per_second = 1000\n\
         [fraud.tenants.{NIGHT}]\nbusiness_hours = {{ start_hour = {start}, end_hour = {end}, utc_offset_minutes = 0, days = [1, 2, 3, 4, 5, 6, 7] }}\n\
         [[tenants]]\naccount_sid = \"{NIGHT}\"\nauth_token = \"{NIGHT_TOKEN}\"\nnumbers = [\"{NIGHT_NUMBER}\"]\n"
    )))
    .unwrap();
    let day = sim(&node);
    let night = Simulator::new(&node.url(), PUBLIC, AccountSid::parse(NIGHT).unwrap(), NIGHT_TOKEN);
    let mut sent: BTreeMap<CallSid, Sent> = BTreeMap::new();
    let mut wangiri_evidence_at = None;

    // 60 rounds: an ordinary call every round; attacks woven in.
    for round in 0..60u128 {
        // Ordinary inbound call from a distinct number, completed after 20–80 s.
        let call = CallSid::from_u128(0x1000 + round);
        let a = day.inbound_call(call, &format!("+1415666{:04}", round), NUMBER).await.unwrap();
        sent.insert(call, Sent { truth: Truth::Legit, at: now_us(), refused: a.body.contains("<Reject") });
        day.status_callback(call, "completed", 1, Some(20 + (round as u32 % 60))).await.unwrap();
        // Ordinary outbound call to a US number every third round.
        if round % 3 == 0 {
            let call = CallSid::from_u128(0x2000 + round);
            let mut p = day.inbound_params(call, NUMBER, &format!("+1212777{:04}", round));
            set(&mut p, "Direction", "outbound-api");
            let (_, body) = day.post_signed("/api/voice/twilio/inbound", &p).await.unwrap();
            sent.insert(call, Sent { truth: Truth::Legit, at: now_us(), refused: body.contains("<Reject") });
        }
        // Premium-rate pumping: outbound calls to international-network numbers, rounds 10–19.
        if (10..20).contains(&round) {
            let call = CallSid::from_u128(0x3000 + round);
            let mut p = day.inbound_params(call, NUMBER, &format!("+88213{:06}", round * 7919 % 1_000_000));
            set(&mut p, "Direction", "outbound-api");
            set(&mut p, "ToCountry", "");
            let at = now_us();
            let (_, body) = day.post_signed("/api/voice/twilio/inbound", &p).await.unwrap();
            sent.insert(call, Sent { truth: Truth::Pumping, at, refused: body.contains("<Reject") });
        }
        // Wangiri: one foreign number rings and hangs up after a second, rounds 30–39.
        if (30..40).contains(&round) {
            let call = CallSid::from_u128(0x4000 + round);
            let mut p = day.inbound_params(call, "+2348035550000", NUMBER);
            set(&mut p, "FromCountry", "NG");
            let at = now_us();
            let (_, body) = day.post_signed("/api/voice/twilio/inbound", &p).await.unwrap();
            let refused = body.contains("<Reject");
            sent.insert(call, Sent { truth: Truth::Wangiri, at, refused });
            if !refused {
                // The 5th short call's end completes the evidence (short_call_count = 5).
                if round == 34 {
                    wangiri_evidence_at = Some(now_us());
                }
                day.status_callback(call, "no-answer", 1, Some(1)).await.unwrap();
            }
        }
        // Off-hours spike at the night tenant, rounds 45–54.
        if (45..55).contains(&round) {
            let call = CallSid::from_u128(0x5000 + round);
            let at = now_us();
            let a = night.inbound_call(call, &format!("+1415888{:04}", round), NIGHT_NUMBER).await.unwrap();
            sent.insert(call, Sent { truth: Truth::OffHours, at, refused: a.body.contains("<Reject") });
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Every verdict decided and every call it ended answered by (fake) Twilio.
    node.wait_caught_up(Duration::from_secs(60)).await.unwrap();
    let ended: Vec<String> = ended.lock().unwrap_or_else(|e| e.into_inner()).clone();

    let mut node = node;
    node.stop().unwrap();
    // What voxgate did to each call: refused at the webhook, or a fraud verdict (and when).
    struct Outcome {
        flagged: bool,
        verdict_at: Option<i64>,
        rules: Vec<String>,
    }
    let mut outcomes: BTreeMap<CallSid, Outcome> = BTreeMap::new();
    for (call, s) in &sent {
        let events = replay_json(&node, *call);
        let verdict = events.iter().find(|e| e["kind"] == "fraud_verdict");
        let rules = verdict
            .and_then(|v| v["hits"].as_array())
            .map(|h| h.iter().filter_map(|x| x["rule"].as_str().map(str::to_owned)).collect())
            .unwrap_or_default();
        let verdict_at = verdict.and_then(|v| v["appended_at_us"].as_i64());
        outcomes.insert(*call, Outcome { flagged: s.refused || verdict.is_some(), verdict_at, rules });
    }

    // Precision and recall per call, and per pattern.
    let (mut tp, mut fp, mut fneg) = (0, 0, 0);
    let mut by_pattern: BTreeMap<Truth, (usize, usize)> = BTreeMap::new();
    for (call, s) in &sent {
        let o = &outcomes[call];
        let e = by_pattern.entry(s.truth).or_default();
        e.0 += 1;
        e.1 += usize::from(o.flagged);
        match (s.truth != Truth::Legit, o.flagged) {
            (true, true) => tp += 1,
            (false, true) => {
                fp += 1;
                println!("legitimate call {call} flagged: {:?}", o.rules);
            }
            (true, false) => fneg += 1,
            _ => {}
        }
    }
    let precision = tp as f64 / (tp + fp).max(1) as f64;
    let recall = tp as f64 / (tp + fneg).max(1) as f64;
    println!("fraud-attack scenario: {} calls, precision {precision:.3}, recall {recall:.3} (per call)", sent.len());
    println!("| pattern | calls | flagged |");
    println!("|---|---:|---:|");
    for (t, (n, f)) in &by_pattern {
        println!("| {t:?} | {n} | {f} |");
    }
    // Time from the first fraudulent call (and from the evidence) to its block or verdict.
    let first = |t: Truth| sent.iter().filter(|(_, s)| s.truth == t).min_by_key(|(_, s)| s.at).map(|(c, s)| (*c, s.at));
    let first_verdict =
        |t: Truth| sent.iter().filter(|(_, s)| s.truth == t).filter_map(|(c, _)| outcomes[c].verdict_at).min();
    for t in [Truth::Pumping, Truth::Wangiri, Truth::OffHours] {
        let (c, at) = first(t).expect("attack calls");
        let v = first_verdict(t).expect("a verdict");
        println!("{t:?}: first call {c} → first verdict {:.1} ms", (v - at) as f64 / 1000.0);
    }
    let pump_ended = sent.iter().filter(|(c, s)| s.truth == Truth::Pumping && ended.contains(&c.to_string())).count();
    println!("pumping calls ended at Twilio: {pump_ended}");
    let evidence = wangiri_evidence_at.expect("the 5th wangiri call completed");
    let block = first_verdict(Truth::Wangiri).expect("wangiri verdict");
    println!("wangiri: evidence complete → block {:.1} ms", (block - evidence) as f64 / 1000.0);

    // The goals.
    assert_eq!(fp, 0, "no legitimate call is refused, blocked or ended");
    for t in [Truth::Pumping, Truth::Wangiri, Truth::OffHours] {
        assert!(by_pattern[&t].1 > 0, "{t:?} not caught");
    }
    assert_eq!(by_pattern[&Truth::Pumping].1, by_pattern[&Truth::Pumping].0, "every pumping call is stopped");
    assert_eq!(pump_ended, by_pattern[&Truth::Pumping].0, "every pumping call is ended at Twilio");
    assert!(block - evidence < 1_000_000, "wangiri blocked {} µs after the evidence", block - evidence);
    // After the block, every later wangiri call is refused at the webhook.
    let blocked_from = sent.iter().filter(|(_, s)| s.truth == Truth::Wangiri && s.at > block).count();
    let refused_after = sent.iter().filter(|(_, s)| s.truth == Truth::Wangiri && s.at > block && s.refused).count();
    assert_eq!(refused_after, blocked_from, "wangiri calls after the block are refused");
    assert!(blocked_from > 0);
}

fn set(p: &mut [(String, String)], key: &str, value: &str) {
    for (k, v) in p.iter_mut() {
        if k == key {
            *v = value.to_owned();
        }
    }
}
