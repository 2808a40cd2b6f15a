//! Usage triggers, budgets and exactly-once usage through the real binary: triggers managed over
//! Twilio's REST shape fire once per period with signed, retried callbacks (every attempt on the
//! billing log) and survive a restart without firing again; a spent budget refuses new calls and
//! ends active ones; a node killed mid-stream rebuilds usage exactly.

use std::time::{Duration, Instant};

use reqwest::Method;
use serde_json::Value;
use voxgate_actors::billing::parse_micros;
use voxgate_protocol::twilio::signature::{self, SignedBody};
use voxgate_protocol::CallSid;
use voxgate_scenarios::fixture::{config, replay_json, sim, ACCOUNT, NUMBER, TOKEN};
use voxgate_scenarios::node::Node;
use voxgate_scenarios::recorder::Recorder;
use voxgate_scenarios::twilio::Simulator;

/// A REST request as the tenant (HTTP Basic with its auth token).
async fn api(node: &Node, method: Method, path: &str, params: &[(&str, &str)]) -> (u16, Value) {
    let url = format!("{}/2010-04-01/Accounts/{ACCOUNT}{path}", node.url());
    let mut req = reqwest::Client::new().request(method.clone(), url).basic_auth(ACCOUNT, Some(TOKEN));
    if !params.is_empty() {
        let body = form_urlencoded::Serializer::new(String::new()).extend_pairs(params).finish();
        req = req.header("content-type", "application/x-www-form-urlencoded").body(body);
    }
    let r = req.send().await.unwrap();
    let status = r.status().as_u16();
    let text = r.text().await.unwrap();
    (status, if text.is_empty() { Value::Null } else { serde_json::from_str(&text).unwrap() })
}

fn micros(v: &Value) -> u64 {
    parse_micros(v.as_str().unwrap_or("x")).unwrap_or_else(|e| panic!("{v}: {e}"))
}

/// A metric's value in a scrape (sum over label sets containing `labels`), if present.
fn metric(scrape: &str, name: &str, labels: &str) -> Option<f64> {
    let mut found = None;
    for line in scrape.lines().filter(|l| !l.starts_with('#')) {
        let Some((series, value)) = line.rsplit_once(' ') else { continue };
        if (series == name || series.starts_with(&format!("{name}{{"))) && series.contains(labels) {
            *found.get_or_insert(0.0) += value.parse::<f64>().unwrap_or(0.0);
        }
    }
    found
}

/// Waits (bounded) until the trigger's `current_value` is `want`: billing has counted the calls
/// so far, so whatever they were going to fire has been decided.
async fn counted(node: &Node, sid: &str, want: &str) -> Value {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (st, t) = api(node, Method::GET, &format!("/Usage/Triggers/{sid}.json"), &[]).await;
        if st == 200 && t["current_value"] == want {
            return t;
        }
        assert!(Instant::now() < deadline, "the trigger never counted {want}: {st} {t}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// An inbound call from `from` that lasts `secs` (by the node's clock) and completes.
async fn completed_call(node: &Node, s: &Simulator, n: u128, from: &str, secs: u32) {
    let a = s.inbound_call(CallSid::from_u128(n), from, NUMBER).await.unwrap();
    assert!(a.body.contains("<Stream"), "call {n}: {}", a.body);
    node.advance_clock(Duration::from_secs(secs.into())).await.unwrap();
    let st = s.status_callback(CallSid::from_u128(n), "completed", 1, Some(secs)).await.unwrap();
    assert!((200..300).contains(&st), "call {n}: completed callback answered {st}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn usage_triggers_fire_once_per_period_with_signed_retried_callbacks() {
    // The customer's callback URL fails the first attempt.
    let receiver = Recorder::start(1).await.unwrap();
    // The receiver listens on loopback: the operator allows callbacks there (off by default).
    let node = Node::start(&config(
        "allow_private_callbacks = true\n[stt]\nenabled = false\n[billing.callbacks]\nfirst_retry_ms = 100\n",
    ))
    .unwrap();
    let cb = format!("{}/usage-alerts?source=voxgate", receiver.url);

    // Create: two calls a day.
    let (st, t) = api(
        &node,
        Method::POST,
        "/Usage/Triggers.json",
        &[
            ("UsageCategory", "calls"),
            ("TriggerBy", "count"),
            ("TriggerValue", "2"),
            ("Recurring", "daily"),
            ("CallbackUrl", &cb),
            ("FriendlyName", "two calls a day"),
        ],
    )
    .await;
    assert_eq!(st, 201, "{t}");
    let sid = t["sid"].as_str().unwrap().to_owned();
    assert!(sid.starts_with("UT") && sid.len() == 34, "{sid}");
    assert_eq!(t["account_sid"], ACCOUNT);
    assert_eq!(t["api_version"], "2010-04-01");
    assert_eq!((t["trigger_value"].as_str(), t["trigger_by"].as_str()), (Some("2"), Some("count")));
    assert_eq!((t["recurring"].as_str(), t["usage_category"].as_str()), (Some("daily"), Some("calls")));
    assert_eq!((t["callback_method"].as_str(), t["callback_url"].as_str()), (Some("POST"), Some(cb.as_str())));
    assert!(t["date_fired"].is_null());
    assert_eq!(t["uri"], format!("/2010-04-01/Accounts/{ACCOUNT}/Usage/Triggers/{sid}.json"));
    assert_eq!(
        t["usage_record_uri"],
        format!("/2010-04-01/Accounts/{ACCOUNT}/Usage/Records/Today.json?Category=calls")
    );

    // Refusals, each a Twilio-style error.
    for bad in [
        vec![("UsageCategory", "calls"), ("TriggerValue", "2")],
        vec![("UsageCategory", "bogus"), ("TriggerValue", "2"), ("CallbackUrl", cb.as_str())],
        vec![("UsageCategory", "calls"), ("TriggerValue", "-2"), ("CallbackUrl", cb.as_str())],
        vec![("UsageCategory", "calls"), ("TriggerValue", "2"), ("CallbackUrl", "ftp://x")],
        vec![
            ("UsageCategory", "totalprice"),
            ("TriggerBy", "count"),
            ("TriggerValue", "2"),
            ("CallbackUrl", cb.as_str()),
        ],
        vec![("UsageCategory", "calls"), ("TriggerValue", "2"), ("CallbackUrl", cb.as_str()), ("Recurring", "hourly")],
    ] {
        let (st, e) = api(&node, Method::POST, "/Usage/Triggers.json", &bad).await;
        assert_eq!(st, 400, "{bad:?}: {e}");
        assert!(e["code"].as_u64().is_some() && e["message"].as_str().is_some(), "{e}");
    }

    // List (with filters), fetch, update.
    let (_, list) = api(&node, Method::GET, "/Usage/Triggers.json", &[]).await;
    assert_eq!(list["usage_triggers"].as_array().unwrap().len(), 1);
    let (_, none) = api(&node, Method::GET, "/Usage/Triggers.json?Recurring=monthly", &[]).await;
    assert_eq!(none["usage_triggers"].as_array().unwrap().len(), 0);
    let (st, up) =
        api(&node, Method::POST, &format!("/Usage/Triggers/{sid}.json"), &[("FriendlyName", "calls per day")]).await;
    assert_eq!(st, 200);
    assert_eq!(up["friendly_name"], "calls per day");
    assert_eq!(up["trigger_value"], "2");
    let (st, _) = api(&node, Method::GET, "/Usage/Triggers/UT00000000000000000000000000000000.json", &[]).await;
    assert_eq!(st, 404);

    // One call: below the threshold.
    let s = sim(&node);
    completed_call(&node, &s, 1, "+14155550001", 30).await;
    counted(&node, &sid, "1").await;
    assert!(receiver.requests().is_empty());

    // The second call crosses it: the callback comes at once, fails, is retried.
    let a = s.inbound_call(CallSid::from_u128(2), "+14155550002", NUMBER).await.unwrap();
    assert!(a.body.contains("<Stream"));
    node.advance_clock(Duration::from_secs(45)).await.unwrap();
    let crossed = Instant::now();
    let st = s.status_callback(CallSid::from_u128(2), "completed", 1, Some(45)).await.unwrap();
    assert!((200..300).contains(&st));
    let got = receiver.wait_for(2, Duration::from_secs(10), |_| true).await;
    assert_eq!(got.len(), 2, "a failed attempt and its retry");
    println!(
        "completed callback acknowledged → trigger callback received: {:?} (retry {:?} later)",
        got[0].at.saturating_duration_since(crossed),
        got[1].at.saturating_duration_since(got[0].at)
    );
    let today = got[0].param("DateFired").unwrap();
    for r in &got {
        assert_eq!(r.method, "POST");
        assert_eq!(r.uri, "/usage-alerts?source=voxgate");
        let p = r.params();
        let get = |k: &str| p.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str());
        assert_eq!(get("AccountSid"), Some(ACCOUNT));
        assert_eq!(get("UsageTriggerSid"), Some(sid.as_str()));
        assert_eq!(
            (get("UsageCategory"), get("TriggerBy"), get("Recurring")),
            (Some("calls"), Some("count"), Some("daily"))
        );
        assert_eq!((get("TriggerValue"), get("CurrentValue")), (Some("2"), Some("2")));
        assert_eq!(get("DateFired"), Some(today.as_str()));
        assert_eq!(
            get("UsageRecordUri"),
            Some(format!("/2010-04-01/Accounts/{ACCOUNT}/Usage/Records/Today.json?Category=calls").as_str())
        );
        let token = get("IdempotencyToken").unwrap();
        assert!(token.starts_with(&format!("{sid}-20")), "{token}");
        // Signed as Twilio signs callbacks: the URL and the sorted form, with the auth token.
        let sig = r.signature.as_deref().expect("X-Twilio-Signature");
        assert!(signature::validate(TOKEN.as_bytes(), &cb, SignedBody::Form(&p), sig), "signature {sig}");
    }
    assert_eq!(got[0].param("IdempotencyToken"), got[1].param("IdempotencyToken"));

    // A third call the same day: the trigger does not fire again.
    completed_call(&node, &s, 3, "+14155550003", 20).await;
    let t = counted(&node, &sid, "3").await;
    assert_eq!(receiver.requests().len(), 2);
    let fired_at = t["date_fired"].as_str().expect("date_fired").to_owned();
    let m = node.scrape().await.unwrap();
    assert_eq!(metric(&m, "voxgate_usage_triggers_fired_total", ""), Some(1.0), "{m}");
    assert_eq!(metric(&m, "voxgate_usage_trigger_callbacks_total", "outcome=\"retrying\""), Some(1.0));
    assert_eq!(metric(&m, "voxgate_usage_trigger_callbacks_total", "outcome=\"delivered\""), Some(1.0));

    // Restart: the trigger and its firing come back from the billing log; nothing fires again.
    let mut node = node;
    node.stop().unwrap();
    let dir = std::mem::replace(&mut node.dir, tempfile::tempdir().unwrap());
    let node = Node::start_in(dir, node.config_path.clone(), &[]).unwrap();
    let t = counted(&node, &sid, "3").await;
    assert_eq!(receiver.requests().len(), 2);
    assert_eq!(
        (t["date_fired"].as_str(), t["friendly_name"].as_str()),
        (Some(fired_at.as_str()), Some("calls per day"))
    );

    // Delete.
    let (st, _) = api(&node, Method::DELETE, &format!("/Usage/Triggers/{sid}.json"), &[]).await;
    assert_eq!(st, 204);
    let (st, _) = api(&node, Method::GET, &format!("/Usage/Triggers/{sid}.json"), &[]).await;
    assert_eq!(st, 404);
    let (st, _) = api(&node, Method::DELETE, &format!("/Usage/Triggers/{sid}.json"), &[]).await;
    assert_eq!(st, 404);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_spent_budget_refuses_new_calls_and_ends_active_ones() {
    let twilio = Recorder::start(0).await.unwrap();
    // The number costs $1.00 this month; three inbound minutes ($0.0255) spend a $1.02 budget.
    let cfg = config(&format!(
        "twilio_api_url = \"{}\"\n[stt]\nenabled = false\n[billing.budgets.tenants]\n{ACCOUNT} = 1020000\n",
        twilio.url
    ));
    let node = Node::start(&cfg).unwrap();
    let s = sim(&node);
    let active = CallSid::from_u128(0xa1);
    assert!(s.inbound_call(active, "+14155550011", NUMBER).await.unwrap().body.contains("<Stream"));
    // One minute: $1.0085, under the budget.
    completed_call(&node, &s, 0xa2, "+14155550012", 60).await;
    // Two more: $1.0255, over it.
    completed_call(&node, &s, 0xa3, "+14155550013", 100).await;
    let ended =
        twilio.wait_for(1, Duration::from_secs(10), |r| r.uri.ends_with(&format!("/Calls/{active}.json"))).await;
    assert_eq!(ended.len(), 1, "the active call was ended at Twilio: {:?}", twilio.requests());
    assert_eq!(ended[0].param("Status").as_deref(), Some("completed"));
    let refused = CallSid::from_u128(0xa4);
    let a = s.inbound_call(refused, "+14155550014", NUMBER).await.unwrap();
    assert!(a.body.contains("<Reject"), "{}", a.body);
    let m = node.scrape().await.unwrap();
    assert_eq!(metric(&m, "voxgate_budget_stops_total", ""), Some(1.0), "{m}");

    // The stop is on the log: a restart keeps refusing.
    let mut node = node;
    node.stop().unwrap();
    let events = replay_json(&node, active);
    let hangup = events.iter().find(|e| e["kind"] == "hangup_requested").expect("hangup recorded");
    assert_eq!(hangup["source"], "billing");
    assert!(events.iter().any(|e| e["kind"] == "call_status_changed" && e["status"] == "completed"));
    let rejected = replay_json(&node, refused);
    assert_eq!(rejected[0]["reason"]["budget_exceeded"]["budget_micros"], 1_020_000);
    assert_eq!(rejected[0]["reason"]["budget_exceeded"]["account"], ACCOUNT);
    let dir = std::mem::replace(&mut node.dir, tempfile::tempdir().unwrap());
    let node = Node::start_in(dir, node.config_path.clone(), &[]).unwrap();
    let a = sim(&node).inbound_call(CallSid::from_u128(0xa5), "+14155550015", NUMBER).await.unwrap();
    assert!(a.body.contains("<Reject"), "{}", a.body);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn usage_killed_mid_stream_and_replayed_from_zero_is_exact() {
    const CALLS: u32 = 150;
    let cfg = config(
        "[stt]\nenabled = false\n[quotas]\nmax_concurrent_calls = 100000\ncalls_per_second = 100000\n[callers]\nmax_calls_per_window = 0\n[fraud]\ndisabled_rules = [\"velocity_from\", \"spend_velocity\", \"volume_anomaly\", \"short_call_burst\"]\n",
    );
    let secs = |i: u32| 1 + (i * 37) % 290;
    let minutes: u64 = (0..CALLS).map(|i| u64::from(secs(i).div_ceil(60))).sum();
    let mut node = Node::start(&cfg).unwrap();

    // Twilio sends calls; the node is SIGKILLed while they flow.
    let done = std::sync::Arc::new(std::sync::atomic::AtomicU32::new(0));
    // Each call lasts its seconds by the node's clock, moved forward between webhook and callback.
    let advance = |url: String, secs: u32| async move {
        reqwest::Client::new()
            .post(format!("{url}/api/voice/test/clock"))
            .header("content-type", "application/x-www-form-urlencoded")
            .body(format!("AdvanceMs={}", u64::from(secs) * 1000))
            .send()
            .await
            .is_ok_and(|r| r.status().is_success())
    };
    let send = move |s: Simulator, from: u32, done: std::sync::Arc<std::sync::atomic::AtomicU32>| async move {
        for i in from..CALLS {
            let call = CallSid::from_u128(0xb000 + u128::from(i));
            let ok = match s.inbound_call(call, &format!("+1415600{i:04}"), NUMBER).await {
                Ok(a) if a.status == 200 => {
                    advance(s.target.clone(), secs(i)).await
                        && matches!(s.status_callback(call, "completed", 1, Some(secs(i))).await, Ok(200..=299))
                }
                _ => false,
            };
            if !ok {
                return i;
            }
            done.store(i + 1, std::sync::atomic::Ordering::SeqCst);
        }
        CALLS
    };
    let sender = tokio::spawn(send(sim(&node), 0, done.clone()));
    while done.load(std::sync::atomic::Ordering::SeqCst) < CALLS / 3 {
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    node.kill();
    let reached = sender.await.unwrap();
    assert!(reached > 0 && reached < CALLS, "killed mid-stream (reached call {reached})");

    // Restart; Twilio retries what was not acknowledged and sends the rest.
    let dir = std::mem::replace(&mut node.dir, tempfile::tempdir().unwrap());
    let node = Node::start_in(dir, node.config_path.clone(), &[]).unwrap();
    // The restarted node's clock starts where the first one's had got to (it never runs back).
    let before_kill: u64 = (0..=reached).map(|i| u64::from(secs(i))).sum();
    node.advance_clock(Duration::from_secs(before_kill)).await.unwrap();
    assert_eq!(send(sim(&node), reached, done).await, CALLS);
    let mut inbound = Value::Null;
    for _ in 0..200 {
        let (_, v) = api(&node, Method::GET, "/Usage/Records/AllTime.json?Category=calls-inbound", &[]).await;
        inbound = v["usage_records"][0].clone();
        // Twilio writes counts as strings.
        if inbound["count"].as_str().and_then(|c| c.parse::<u32>().ok()) == Some(CALLS) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(inbound["count"], CALLS.to_string(), "{inbound}");
    assert_eq!(inbound["usage"], minutes.to_string());
    assert_eq!(micros(&inbound["price"]), minutes * 8_500);
    let (_, before) = api(&node, Method::GET, "/Usage/Records.json", &[]).await;

    // Replay from zero (a fresh start rebuilds every projection from the logs): the same records.
    let mut node = node;
    node.stop().unwrap();
    let dir = std::mem::replace(&mut node.dir, tempfile::tempdir().unwrap());
    let node = Node::start_in(dir, node.config_path.clone(), &[]).unwrap();
    // Its clock where the last one's was, so "today" is the same day.
    let total: u64 = before_kill + (reached..CALLS).map(|i| u64::from(secs(i))).sum::<u64>();
    node.advance_clock(Duration::from_secs(total)).await.unwrap();
    let (_, after) = api(&node, Method::GET, "/Usage/Records.json", &[]).await;
    let strip = |mut v: Value| {
        for r in v["usage_records"].as_array_mut().unwrap() {
            r.as_object_mut().unwrap().remove("as_of");
        }
        v["usage_records"].clone()
    };
    assert_eq!(strip(before), strip(after));
    println!("{CALLS} calls, {minutes} minutes; killed after call {reached}");
}

fn python(node: &Node, args: &[&str]) -> Value {
    voxgate_scenarios::fixture::twilio_client(node, ACCOUNT, TOKEN, args)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_official_twilio_python_library_reads_records_and_fires_a_trigger() {
    let receiver = Recorder::start(0).await.unwrap();
    let node = Node::start(&config("allow_private_callbacks = true\n[stt]\nenabled = false\n")).unwrap();
    let s = sim(&node);
    completed_call(&node, &s, 0xc1, "+14155550021", 61).await;

    let v = python(&node, &["records"]);
    let month = v["this_month"].as_array().unwrap();
    let calls = month.iter().find(|r| r["category"] == "calls").expect("calls record");
    assert_eq!((calls["count"].as_str(), calls["usage"].as_str()), (Some("1"), Some("2")));
    assert_eq!(calls["usage_unit"], "minutes");
    assert_eq!(calls["price"], "0.017");
    // Read two per page, following next_page_uri: every category once, in order.
    let cats: Vec<&str> = v["all_time_categories"].as_array().unwrap().iter().filter_map(Value::as_str).collect();
    let direct: Vec<String> = month.iter().filter_map(|r| r["category"].as_str().map(str::to_owned)).collect();
    assert_eq!(cats, direct);

    let t = python(&node, &["create", &format!("{}/hook", receiver.url)]);
    let sid = t["sid"].as_str().unwrap().to_owned();
    assert_eq!((t["recurring"].as_str(), t["usage_category"].as_str()), (Some("monthly"), Some("calls")));
    // One call this month already: the trigger fires at once.
    let got = receiver.wait_for(1, Duration::from_secs(10), |_| true).await;
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].param("UsageTriggerSid").as_deref(), Some(sid.as_str()));
    let f = python(&node, &["fetch", &sid]);
    assert!(f["date_fired"].as_str().is_some(), "{f}");
    assert_eq!(f["current_value"], "1");
    assert_eq!(f["listed"], serde_json::json!([sid]));
}
