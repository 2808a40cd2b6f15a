//! Fraud and billing spread over their nodes by tenant shard, through the real binary on our own
//! `nats-server -js`: one `ingress,call` node and two `fraud,billing` nodes, eight tenants (one in
//! each of the eight shards), each with a US-only fraud rule.
//!
//! - The two decisions nodes split the tenant shards of both stages between them (health shows
//!   each node's share; no shard twice, none missing).
//! - A call from Nigeria on every tenant is judged by the node holding that tenant's shard: each
//!   call is ended at (a fake) Twilio once, and both nodes judged some.
//! - One decisions node is SIGKILLed: the other takes every shard, and the dead node's tenants are
//!   screened again: their next foreign calls are ended too, each verdict once on the log.

use std::collections::BTreeSet;
use std::time::Duration;

use serde_json::Value;
use voxgate_protocol::{AccountSid, CallSid, Event};
use voxgate_scenarios::fixture::{cluster_reader, config, each_event_once, PUBLIC, SECRETS_KEY};
use voxgate_scenarios::nats::Nats;
use voxgate_scenarios::node::Node;
use voxgate_scenarios::recorder::Recorder;
use voxgate_scenarios::twilio::Simulator;
use voxgate_storage::topics;

const SHARDS: u32 = 8;

/// One tenant per shard: (account, auth token, number).
fn tenants() -> Vec<(AccountSid, String, String)> {
    let mut by_shard: Vec<Option<(AccountSid, String, String)>> = vec![None; SHARDS as usize];
    for i in 1u128.. {
        let sid = AccountSid::from_u128(0xac00 + i);
        let shard = voxgate_storage::log::partition_for(sid.partition_key(), SHARDS) as usize;
        if by_shard[shard].is_none() {
            by_shard[shard] = Some((sid, format!("{:032x}", 0x70c0 + i), format!("+1415555{:04}", 200 + i)));
        }
        if by_shard.iter().all(Option::is_some) {
            break;
        }
    }
    by_shard.into_iter().flatten().collect()
}

fn node_config(nats: &str, twilio: &str, roles: &str, node: &str) -> String {
    let mut extra = format!(
        "twilio_api_url = \"{twilio}\"\nsecrets_key = \"{SECRETS_KEY}\"\n[stt]\nenabled = false\n[cluster]\nnats_url = \"{nats}\"\nroles = \"{roles}\"\nnode = \"{node}\"\nlease_ttl_secs = 3\ntenant_shards = {SHARDS}\n"
    );
    for (sid, token, number) in tenants() {
        extra.push_str(&format!(
            "[fraud.tenants.{sid}]\nallowed_countries = [\"US\"]\n[[tenants]]\naccount_sid = \"{sid}\"\nauth_token = \"{token}\"\nnumbers = [\"{number}\"]\n"
        ));
    }
    config(&extra)
}

/// The tenant shards `stage` runs on at `node`, as its health shows them.
async fn shards(node: &Node, stage: &str) -> Vec<u32> {
    let (_, h) = node.get_json("/api/voice/health").await.unwrap();
    h["stages"][stage]["tenant_shards"]
        .as_array()
        .map(|a| a.iter().filter_map(Value::as_u64).map(|u| u as u32).collect())
        .unwrap_or_default()
}

/// Waits until the nodes' shares of `stage` are disjoint and cover every shard; returns them.
async fn split(nodes: &[&Node], stage: &str) -> Vec<Vec<u32>> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let mut shares = Vec::new();
        for n in nodes {
            shares.push(shards(n, stage).await);
        }
        let all: BTreeSet<u32> = shares.iter().flatten().copied().collect();
        let count: usize = shares.iter().map(Vec::len).sum();
        if all.len() == SHARDS as usize && count == SHARDS as usize && shares.iter().all(|s| !s.is_empty()) {
            return shares;
        }
        assert!(tokio::time::Instant::now() < deadline, "{stage}'s shards never split over the nodes: {shares:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Places a call from Nigerian number `from` on every tenant (call sids `base + i`); returns them.
/// (A verdict may block the number for the tenant: each round calls from another.)
async fn foreign_calls(ingress: &Node, base: u128, from: &str) -> Vec<CallSid> {
    let mut calls = Vec::new();
    for (i, (sid, token, number)) in tenants().into_iter().enumerate() {
        let sim = Simulator::new(&ingress.url(), PUBLIC, sid, &token);
        let call = CallSid::from_u128(base + i as u128);
        let mut p = sim.inbound_params(call, from, &number);
        for (k, v) in p.iter_mut() {
            if k == "FromCountry" {
                *v = "NG".into();
            }
        }
        let (st, body) = sim.post_signed("/api/voice/twilio/inbound", &p).await.unwrap();
        assert!(st == 200 && body.contains("<Stream"), "{st} {body}");
        calls.push(call);
    }
    calls
}

/// How many rule hits `node`'s fraud verdicts had (its metrics).
async fn verdicts(node: &Node) -> f64 {
    let m = node.scrape().await.unwrap();
    m.lines()
        .filter(|l| l.starts_with("voxgate_fraud_verdicts_total"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// How many times `node` started a fraud shard (its metrics).
async fn fraud_starts(node: &Node) -> f64 {
    let m = node.scrape().await.unwrap();
    m.lines()
        .filter(|l| l.starts_with("voxgate_stage_starts_total") && l.contains("stage=\"fraud\""))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Waits until Twilio was asked to end each of `calls` once.
async fn ended_once(twilio: &Recorder, calls: &[CallSid]) {
    let want: Vec<String> = calls.iter().map(|c| format!("/Calls/{c}.json")).collect();
    let got = twilio.wait_for(calls.len(), Duration::from_secs(30), |r| want.iter().any(|w| r.uri.ends_with(w))).await;
    for w in &want {
        let n = got.iter().filter(|r| r.uri.ends_with(w)).count();
        assert_eq!(n, 1, "{w} ended {n} times: {:?}", twilio.requests());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fraud_and_billing_spread_over_their_nodes_by_tenant_shard() {
    let twilio = Recorder::start(0).await.unwrap();
    let nats = Nats::fresh();
    let url = nats.url();
    let ingress = Node::start(&node_config(&url, &twilio.url, "ingress,call", "ingress")).unwrap();
    let a = Node::start(&node_config(&url, &twilio.url, "fraud,billing", "decisions-a")).unwrap();
    let mut b = Node::start(&node_config(&url, &twilio.url, "fraud,billing", "decisions-b")).unwrap();

    let fraud = split(&[&a, &b], "fraud").await;
    split(&[&a, &b], "billing").await;

    // Every tenant's foreign call is judged where its shard is, and ended once.
    let first = foreign_calls(&ingress, 0x1000, "+2348031234567").await;
    ended_once(&twilio, &first).await;
    // Each node holds a shard, and each shard a tenant that called: both judged.
    let (va, vb) = (verdicts(&a).await, verdicts(&b).await);
    assert!(va > 0.0 && vb > 0.0, "node a ({:?}) judged {va}, node b ({:?}) {vb}", fraud[0], fraud[1]);

    // One decisions node dies: the other takes every shard and screens its tenants too. It
    // starts only the shards it gains: the ones it held run on.
    let held = shards(&a, "fraud").await;
    let starts_before = fraud_starts(&a).await;
    b.kill();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while shards(&a, "fraud").await.len() < SHARDS as usize || shards(&a, "billing").await.len() < SHARDS as usize {
        assert!(tokio::time::Instant::now() < deadline, "node a never took node b's shards");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        fraud_starts(&a).await - starts_before,
        (SHARDS as usize - held.len()) as f64,
        "node a held {held:?}: it should start only the other shards"
    );
    let second = foreign_calls(&ingress, 0x2000, "+2348031234568").await;
    ended_once(&twilio, &second).await;

    // Each call's verdict is on the log once, whichever node gave it.
    let (_dir, reader) = cluster_reader(&url).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let mut judged = BTreeSet::new();
        each_event_once(&reader, &[topics::FRAUD], |e| {
            if let (Event::FraudVerdict(_), Some(call)) = (&e.payload, e.call) {
                judged.insert(call);
            }
        });
        let want: BTreeSet<CallSid> = first.iter().chain(&second).copied().collect();
        if judged == want {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "verdicts on the log: {judged:?}, calls: {want:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
