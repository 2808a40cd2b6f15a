//! A cluster's control plane and its NATS outages, through the real binary with our own
//! `nats-server -js` on a free loopback port:
//! - an ingress node keeps answering Twilio while NATS is down under traffic, spools
//!   what it records, and forwards it on reconnect: every event arrives exactly once;
//! - a tenant and number created over REST on one node take calls on another, and a budget stop
//!   recorded by the billing node holding the account's tenant shard (of two billing nodes)
//!   refuses calls and ends active ones on the ingress node.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use reqwest::Method;
use serde_json::Value;
use voxgate_protocol::{AccountSid, CallSid, Event};
use voxgate_scenarios::fixture::{cluster_reader, config, each_event_once, sim, ACCOUNT, NUMBER, PUBLIC, SECRETS_KEY};
use voxgate_scenarios::nats::Nats;
use voxgate_scenarios::node::Node;
use voxgate_scenarios::recorder::Recorder;
use voxgate_scenarios::twilio::{Pace, Simulator};
use voxgate_storage::{topics, Log};

const ADMIN: &str = "admin-3b7d1f9e5a2c4e6f8a0b1c2d";

/// Top-level keys (`top`), then the node's `[cluster]` table, then `tables`.
fn node_config(nats: &str, roles: &str, node: &str, top: &str, tables: &str) -> String {
    config(&format!(
        "secrets_key = \"{SECRETS_KEY}\"\nadmin_token = \"{ADMIN}\"\n{top}\n[cluster]\nnats_url = \"{nats}\"\nroles = \"{roles}\"\nnode = \"{node}\"\nlease_ttl_secs = 3\n{tables}"
    ))
}

/// What one call left on the log: the kinds of its call events (in order) and its media frames.
#[derive(Debug, Default, Clone, PartialEq)]
struct Trail {
    kinds: Vec<&'static str>,
    frames: u64,
}

/// Every call's trail; fails on any event stored twice.
fn trails(log: &Log) -> BTreeMap<CallSid, Trail> {
    let mut out: BTreeMap<CallSid, Trail> = BTreeMap::new();
    each_event_once(log, &[topics::CALLS, topics::MEDIA], |env| {
        let Some(call) = env.call else { return };
        let t = out.entry(call).or_default();
        match &env.payload {
            Event::MediaBatch(b) => t.frames += u64::from(b.frames),
            e => t.kinds.push(e.kind()),
        }
    });
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ingress_answers_through_a_nats_outage_and_forwards_every_event_once() {
    let nats = Nats::fresh();
    let url = nats.url();
    // Quotas and caller limits lifted: the traffic is one tenant calling as fast as it can.
    let tables = "[stt]\nenabled = false\n[quotas]\nmax_concurrent_calls = 100000\ncalls_per_second = 100000\n[callers]\nmax_calls_per_window = 0\n[fraud]\ndisabled_rules = [\"velocity_from\", \"spend_velocity\", \"volume_anomaly\", \"short_call_burst\"]\n";
    let ingress = Node::start(&node_config(&url, "ingress,call", "ingress", "", tables)).unwrap();
    // One second of a tone per call (50 frames), sent faster than real time.
    let audio: Arc<Vec<u8>> = Arc::new((0..8000u32).map(|i| if (i / 20) % 2 == 0 { 0x10 } else { 0x90 }).collect());

    // Twilio's traffic: four callers, one call after another, until told to stop.
    let stop = Arc::new(AtomicBool::new(false));
    let next = Arc::new(AtomicU64::new(0));
    let slowest = Arc::new(AtomicU64::new(0));
    let mut callers = Vec::new();
    for _ in 0..4 {
        let (s, audio, stop, next, slowest) =
            (sim(&ingress), audio.clone(), stop.clone(), next.clone(), slowest.clone());
        callers.push(tokio::spawn(async move {
            let mut placed = Vec::new();
            while !stop.load(Ordering::Acquire) {
                let i = next.fetch_add(1, Ordering::AcqRel);
                let call = CallSid::from_u128(0x5900_0000 + u128::from(i));
                let started = Instant::now();
                s.call(call, &format!("+1415556{:04}", i % 10_000), NUMBER, &audio, Pace::Faster(10))
                    .await
                    .unwrap_or_else(|e| panic!("call {i} failed during the run: {e:#}"));
                slowest.fetch_max(started.elapsed().as_millis() as u64, Ordering::AcqRel);
                placed.push(call);
            }
            placed
        }));
    }
    // Each phase lasts until what it is about has happened (bounded), not for a fixed time.
    let placed_at_least = |n: u64, what: &'static str| {
        let next = next.clone();
        async move {
            let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
            while next.load(Ordering::Acquire) < n {
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "{what}: only {} calls placed",
                    next.load(Ordering::Acquire)
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    };
    placed_at_least(8, "before the outage").await;
    let before_outage = next.load(Ordering::Acquire);
    // NATS goes away; Twilio keeps calling until the ingress node has noticed, spooled, and
    // answered more calls.
    let (port, store) = nats.stop();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let spooled = loop {
        let (_, h) = ingress.get_json("/api/voice/health").await.unwrap();
        let spooled = h["log"]["jetstream"]["spooled"].as_u64().unwrap_or(0);
        if h["log"]["jetstream"]["connected"] == false && spooled > 0 {
            break spooled;
        }
        assert!(tokio::time::Instant::now() < deadline, "nothing was spooled during the outage: {h}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let noticed = next.load(Ordering::Acquire);
    placed_at_least(noticed + 4, "during the outage").await;
    let during_outage = next.load(Ordering::Acquire) - before_outage;
    let nats = Nats::start(port, store);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let (_, h) = ingress.get_json("/api/voice/health").await.unwrap();
        if h["log"]["jetstream"]["connected"] == true {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "the ingress node did not reconnect: {h}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let back = next.load(Ordering::Acquire);
    placed_at_least(back + 4, "after the outage").await;
    stop.store(true, Ordering::Release);
    let mut placed = Vec::new();
    for c in callers {
        placed.extend(c.await.unwrap());
    }
    assert!(during_outage >= 4, "calls went on during the outage ({during_outage})");

    // The spool drains into JetStream.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let (_, h) = ingress.get_json("/api/voice/health").await.unwrap();
        if h["log"]["jetstream"]["spooled"] == 0 && h["log"]["jetstream"]["connected"] == true {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "the spool did not drain: {h}\n{}", ingress.logs());
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let (_dir, log) = cluster_reader(&nats.url()).await;
    let got = trails(&log);
    // Every call answered during the run has all of its events on the cluster's log, once: the
    // same trail as every other call.
    let expected = Trail { kinds: got.get(&placed[0]).map(|t| t.kinds.clone()).unwrap_or_default(), frames: 50 };
    assert!(expected.kinds.contains(&"call_received"), "{expected:?}");
    for call in &placed {
        assert_eq!(got.get(call), Some(&expected), "{call}");
    }
    assert_eq!(got.len(), placed.len(), "calls on the log that were never placed");
    println!(
        "{} calls ({} during the outage, {spooled} events spooled when it was noticed), slowest call {} ms",
        placed.len(),
        during_outage,
        slowest.load(Ordering::Acquire)
    );
}

struct Reply {
    status: u16,
    json: Value,
}

async fn rest(node: &Node, method: Method, path: &str, user: &str, pass: &str, params: &[(&str, &str)]) -> Reply {
    let body: String = form_urlencoded::Serializer::new(String::new()).extend_pairs(params).finish();
    let mut req =
        reqwest::Client::new().request(method.clone(), format!("{}{path}", node.url())).basic_auth(user, Some(pass));
    if method != Method::GET {
        req = req.header("content-type", "application/x-www-form-urlencoded").body(body);
    }
    let resp = req.send().await.unwrap();
    let status = resp.status().as_u16();
    let json = serde_json::from_str(&resp.text().await.unwrap()).unwrap_or(Value::Null);
    Reply { status, json }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tenants_and_budget_stops_recorded_on_one_node_act_on_another() {
    let twilio = Recorder::start(0).await.unwrap();
    let nats = Nats::fresh();
    let url = nats.url();
    // The number costs $1.00 this month; three inbound minutes ($0.0255) spend a $1.02 budget.
    let top = format!("twilio_api_url = \"{}\"", twilio.url);
    let tables = format!("[stt]\nenabled = false\n[billing.budgets.tenants]\n{ACCOUNT} = 1020000\n");
    let ingress = Node::start(&node_config(&url, "ingress,call", "ingress", &top, &tables)).unwrap();
    let decisions = Node::start(&node_config(&url, "fraud,billing", "decisions", &top, &tables)).unwrap();
    // A second billing node: the tenants' shards spread over the two, and only the node holding
    // the account's shard acts on its budget.
    let decisions2 = Node::start(&node_config(&url, "fraud,billing", "decisions2", &top, &tables)).unwrap();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let mut held = Vec::new();
        for n in [&decisions, &decisions2] {
            let (_, h) = n.get_json("/api/voice/health").await.unwrap();
            held.push(h["stages"]["billing"]["tenant_shards"].as_array().map_or(0, Vec::len));
        }
        if held == [4, 4] {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "billing's tenant shards never split: {held:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // A tenant and its number, created on the decisions node, answer on the ingress node.
    let r = rest(&decisions, Method::POST, "/2010-04-01/Accounts.json", "admin", ADMIN, &[("FriendlyName", "B")]).await;
    assert_eq!(r.status, 201, "{}", r.json);
    let b = r.json["sid"].as_str().unwrap().to_owned();
    let b_token = r.json["auth_token"].as_str().unwrap().to_owned();
    let b_number = "+14155550777";
    let r = rest(
        &decisions,
        Method::POST,
        &format!("/2010-04-01/Accounts/{b}/IncomingPhoneNumbers.json"),
        &b,
        &b_token,
        &[("PhoneNumber", b_number)],
    )
    .await;
    assert_eq!(r.status, 201, "{}", r.json);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while rest(&ingress, Method::GET, &format!("/2010-04-01/Accounts/{b}/IncomingPhoneNumbers.json"), &b, &b_token, &[])
        .await
        .json["incoming_phone_numbers"]
        .as_array()
        .is_none_or(|a| a.is_empty())
    {
        assert!(tokio::time::Instant::now() < deadline, "the ingress node never learnt of {b}'s number");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let sim_b = Simulator::new(&ingress.url(), PUBLIC, AccountSid::parse(&b).unwrap(), &b_token);
    let a = sim_b.inbound_call(CallSid::from_u128(0xb1), "+14155550031", b_number).await.unwrap();
    assert!(a.body.contains("<Stream"), "{}", a.body);

    // The account spends its budget through the ingress node; the billing node judges it.
    let s = sim(&ingress);
    let active = CallSid::from_u128(0xa1);
    assert!(s.inbound_call(active, "+14155550011", NUMBER).await.unwrap().body.contains("<Stream"));
    for (call, from, secs) in [(0xa2, "+14155550012", 60), (0xa3, "+14155550013", 100)] {
        let call = CallSid::from_u128(call);
        assert!(s.inbound_call(call, from, NUMBER).await.unwrap().body.contains("<Stream"));
        ingress.advance_clock(Duration::from_secs(secs.into())).await.unwrap();
        assert_eq!(s.status_callback(call, "completed", 1, Some(secs)).await.unwrap() / 100, 2);
    }
    // The ingress node holds the active call: it is ended at Twilio from there.
    let ended =
        twilio.wait_for(1, Duration::from_secs(15), |r| r.uri.ends_with(&format!("/Calls/{active}.json"))).await;
    assert_eq!(ended.len(), 1, "the active call was ended at Twilio: {:?}", twilio.requests());
    assert_eq!(ended[0].param("Status").as_deref(), Some("completed"));
    let a = s.inbound_call(CallSid::from_u128(0xa4), "+14155550014", NUMBER).await.unwrap();
    assert!(a.body.contains("<Reject"), "the ingress node still admits the account: {}", a.body);
    // The stop is the account's: the other tenant still calls.
    let a = sim_b.inbound_call(CallSid::from_u128(0xb2), "+14155550032", b_number).await.unwrap();
    assert!(a.body.contains("<Stream"), "{}", a.body);
    let shard = voxgate_storage::log::partition_for(AccountSid::parse(ACCOUNT).unwrap().partition_key(), 8);
    // The billing node acts on the stop first and counts it once it and its alert are recorded:
    // wait for a count (bounded), then see whose it is.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    loop {
        let (one, two) = (decisions.scrape().await.unwrap(), decisions2.scrape().await.unwrap());
        if one.contains("voxgate_budget_stops_total") || two.contains("voxgate_budget_stops_total") {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "no billing node counted the budget stop");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let mut acting = Vec::new();
    for (name, n) in [("decisions", &decisions), ("decisions2", &decisions2)] {
        let (_, h) = n.get_json("/api/voice/health").await.unwrap();
        let held = h["stages"]["billing"]["tenant_shards"].as_array().is_some_and(|a| a.contains(&shard.into()));
        let stopped = n.scrape().await.unwrap().contains("voxgate_budget_stops_total");
        assert_eq!(
            held, stopped,
            "{name} holds the account's shard {shard}: {held}; recorded the stop: {stopped}; {h}"
        );
        acting.extend(stopped.then_some(name));
    }
    assert_eq!(acting.len(), 1, "one billing node acts for the account: {acting:?}");
    let m = ingress.scrape().await.unwrap();
    assert!(!m.contains("voxgate_budget_stops_total"), "only the acting billing node records a stop:\n{m}");
}
