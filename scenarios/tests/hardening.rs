//! voxgate tried as an attacker would, through the real binary: a signed request proves only
//! "this tenant", so one tenant never touches another's call; nothing unauthenticated reaches the
//! log; guessing credentials is throttled per account and per address; `X-Forwarded-For` is
//! believed only from trusted proxies; tenant-given URLs cannot aim inside; the operator's
//! suspension holds; secrets carry `no-store`; unsafe configurations are refused at start.

use std::time::Duration;

use reqwest::Method;
use serde_json::Value;
use voxgate_protocol::twilio::media;
use voxgate_protocol::{AccountSid, CallSid, StreamSid};
use voxgate_scenarios::fixture::{config, replay_json, sim, ACCOUNT, NUMBER, PUBLIC, TOKEN};
use voxgate_scenarios::node::Node;
use voxgate_scenarios::twilio::{Pace, Simulator};

const ADMIN: &str = "admin-5d2e9a0c7b1f4e3a8c6d0b2f";
const B: &str = "ACb0b0b0b0b0b0b0b0b0b0b0b0b0b0b0b0";
const B_TOKEN: &str = "b7e1c9d3a5f20468b7e1c9d3a5f20468";
const B_NUMBER: &str = "+14155550199";

/// The fixture tenant A, `extra` settings, and a second configured tenant B.
fn two_tenants(extra: &str) -> String {
    format!(
        "{}[[tenants]]\naccount_sid = \"{B}\"\nauth_token = \"{B_TOKEN}\"\nnumbers = [\"{B_NUMBER}\"]\n",
        config(&format!("admin_token = \"{ADMIN}\"\n{extra}"))
    )
}

fn metric(scrape: &str, line_start: &str) -> Option<f64> {
    scrape.lines().find(|l| l.starts_with(line_start)).and_then(|l| l.rsplit(' ').next()).and_then(|v| v.parse().ok())
}

struct Reply {
    status: u16,
    json: Value,
    headers: reqwest::header::HeaderMap,
}

/// A REST request as `user:pass`, from `client` (an `X-Forwarded-For` a trusted proxy adds).
async fn rest(
    node: &Node,
    method: Method,
    path: &str,
    user: &str,
    pass: &str,
    forwarded_for: Option<&str>,
    params: &[(&str, &str)],
) -> Reply {
    let body: String = form_urlencoded::Serializer::new(String::new()).extend_pairs(params).finish();
    let mut req = reqwest::Client::new().request(method, format!("{}{path}", node.url())).basic_auth(user, Some(pass));
    if let Some(f) = forwarded_for {
        req = req.header("x-forwarded-for", f);
    }
    if !params.is_empty() {
        req = req.header("content-type", "application/x-www-form-urlencoded").body(body);
    }
    let r = req.send().await.expect("request");
    let status = r.status().as_u16();
    let headers = r.headers().clone();
    let text = r.text().await.expect("body");
    Reply { status, json: serde_json::from_str(&text).unwrap_or(Value::String(text)), headers }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tenant_cannot_end_or_bill_another_tenants_call() {
    let mut node = Node::start(&two_tenants("[stt]\nenabled = false\n")).unwrap();
    let a = sim(&node);
    let b = Simulator::new(&node.url(), PUBLIC, AccountSid::parse(B).unwrap(), B_TOKEN);

    // A's call is streaming.
    let call = CallSid::from_u128(0xa11);
    let answer = a.inbound_call(call, "+14155550123", NUMBER).await.unwrap();
    let mut stream = a.connect_stream(answer.stream_url.as_deref().unwrap()).await.unwrap();
    let sid = StreamSid::from_u128(0x5a11);
    stream.start(sid, a.account(), call).await.unwrap();
    stream.send_audio(sid, &[0xFF; 1600], Pace::Faster(10)).await.unwrap();

    // B knows the CallSid and signs a "completed" for it, an hour long: the same answer as for a
    // call nobody knows, and nothing changes.
    let forged = b.status_callback(call, "completed", 5, Some(3600)).await.unwrap();
    let nobody = b.status_callback(CallSid::from_u128(0xdead), "completed", 5, Some(3600)).await.unwrap();
    assert_eq!((forged, nobody), (404, 404));
    let (_, forged_body) = b
        .post_signed(
            "/api/voice/twilio/status",
            &[
                ("AccountSid".to_owned(), B.to_owned()),
                ("CallSid".to_owned(), call.to_string()),
                ("CallStatus".to_owned(), "completed".to_owned()),
            ],
        )
        .await
        .unwrap();
    let v: Value = serde_json::from_str(&forged_body).unwrap();
    assert_eq!(v["code"], 20404, "{v}");
    // A's stream goes on and the call is still active.
    stream.send_audio(sid, &[0xFF; 1600], Pace::Faster(10)).await.unwrap();
    let (_, h) = node.get_json("/api/voice/health").await.unwrap();
    assert_eq!(h["active_calls"], 1, "{h}");
    let m = node.scrape().await.unwrap();
    assert_eq!(metric(&m, "voxgate_webhook_rejected_total{endpoint=\"status\",reason=\"foreign_call\"}"), Some(2.0));
    assert_eq!(metric(&m, "voxgate_webhook_rejected_total{endpoint=\"status\",reason=\"unknown_call\"}"), Some(1.0));

    // A's own callback, 30 s into the call (by the node's clock), claims an hour: recorded as
    // implausible, billed as observed (one minute).
    node.advance_clock(Duration::from_secs(30)).await.unwrap();
    stream.stop(sid, a.account(), call).await.unwrap();
    assert_eq!(a.status_callback(call, "completed", 6, Some(3600)).await.unwrap(), 204);
    // A duration that is no number: the status counts, the duration is recorded as such.
    let other = CallSid::from_u128(0xa12);
    assert!(a.inbound_call(other, "+14155550124", NUMBER).await.unwrap().body.contains("<Stream"));
    node.advance_clock(Duration::from_secs(61)).await.unwrap();
    let mut p = vec![
        ("AccountSid".to_owned(), ACCOUNT.to_owned()),
        ("CallSid".to_owned(), other.to_string()),
        ("CallStatus".to_owned(), "completed".to_owned()),
        ("SequenceNumber".to_owned(), "3".to_owned()),
    ];
    p.push(("CallDuration".to_owned(), "-5".to_owned()));
    assert_eq!(a.post_signed("/api/voice/twilio/status", &p).await.unwrap().0, 204);

    // Usage: 1 + 2 minutes (observed), not 60 + anything.
    let url = format!("{}/2010-04-01/Accounts/{ACCOUNT}/Usage/Records/Today.json?Category=calls", node.url());
    let mut usage = Value::Null;
    for _ in 0..200 {
        let r = reqwest::Client::new().get(&url).basic_auth(ACCOUNT, Some(TOKEN)).send().await.unwrap();
        usage = serde_json::from_str::<Value>(&r.text().await.unwrap()).unwrap()["usage_records"][0].clone();
        if usage["count"] == "2" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!((usage["count"].as_str(), usage["usage"].as_str()), (Some("2"), Some("3")), "{usage}");

    node.wait_idle(Duration::from_secs(10)).await.unwrap();
    assert!(node.stop().unwrap().success());
    let events = replay_json(&node, call);
    assert!(events.iter().all(|e| e["tenant"] == ACCOUNT), "nothing of B's in A's call: {events:?}");
    let implausible: Vec<&Value> = events.iter().filter(|e| e["kind"] == "call_duration_implausible").collect();
    assert_eq!(implausible.len(), 1, "{events:?}");
    assert_eq!(implausible[0]["reported"], "3600");
    let observed = implausible[0]["observed_secs"].as_u64().unwrap();
    assert!((30..=31).contains(&observed), "{observed}");
    let completed = events.iter().find(|e| e["kind"] == "call_status_changed" && e["status"] == "completed").unwrap();
    assert_eq!(completed["duration_secs"], Value::Null, "the claimed duration is not billed: {completed}");
    let events = replay_json(&node, other);
    let bad = events.iter().find(|e| e["kind"] == "call_duration_implausible").expect("recorded as such");
    assert_eq!(bad["reported"], "-5");
    assert!(events.iter().any(|e| e["kind"] == "call_status_changed" && e["status"] == "completed"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_unauthenticated_is_written_and_guessing_is_throttled() {
    let node = Node::start(&two_tenants(
        "trusted_proxies = [\"127.0.0.1/32\"]\n[stt]\nenabled = false\n[throttle]\nauth_failures = 5\nauth_window_secs = 60\n",
    ))
    .unwrap();

    // 300 webhooks for accounts voxgate does not know, each with a fresh CallSid: refused,
    // counted, and not one record on the calls log.
    for i in 0..300u128 {
        let stranger = Simulator::new(&node.url(), PUBLIC, AccountSid::from_u128(0xbad0_0000 + i), TOKEN);
        let r = stranger.inbound_call(CallSid::from_u128(0xf00d_0000 + i), "+14155550123", NUMBER).await.unwrap();
        assert!(r.body.contains("<Reject"), "{}", r.body);
    }
    let m = node.scrape().await.unwrap();
    assert_eq!(
        metric(&m, "voxgate_webhook_rejected_total{endpoint=\"inbound\",reason=\"unknown_tenant\"}"),
        Some(300.0)
    );
    assert_eq!(metric(&m, "voxgate_log_append_seconds_count{topic=\"calls\"}").unwrap_or(0.0), 0.0, "{m}");

    let me = format!("/2010-04-01/Accounts/{ACCOUNT}.json");
    // One address guesses five accounts: that address is refused for any account, before any
    // secret is compared, with Retry-After …
    for i in 0..5u128 {
        let guess = AccountSid::from_u128(0x9e55 + i).to_string();
        let r = rest(&node, Method::GET, &me, &guess, "guess", Some("198.51.100.9"), &[]).await;
        assert_eq!(r.status, 401);
    }
    let r = rest(&node, Method::GET, &me, ACCOUNT, TOKEN, Some("198.51.100.9"), &[]).await;
    assert_eq!((r.status, r.json["code"].as_u64()), (429, Some(20429)), "{}", r.json);
    let wait: u64 = r.headers["retry-after"].to_str().unwrap().parse().unwrap();
    assert!((1..=60).contains(&wait), "{wait}");
    // … also when the client puts another address at the left of the chain (the proxy appended
    // the one it saw at the right) …
    let r = rest(&node, Method::GET, &me, ACCOUNT, TOKEN, Some("198.51.100.10, 198.51.100.9"), &[]).await;
    assert_eq!(r.status, 429);
    // … while the tenant, from its own address, is served.
    let r = rest(&node, Method::GET, &me, ACCOUNT, TOKEN, Some("198.51.100.10"), &[]).await;
    assert_eq!(r.status, 200, "{}", r.json);
    assert_eq!(r.headers["cache-control"], "no-store", "an account carries its auth token");

    // Five guesses at B's token from five addresses: B's name is refused from anywhere; A is not.
    for i in 0..5 {
        let from = format!("203.0.113.{}", 20 + i);
        let r = rest(&node, Method::GET, &format!("/2010-04-01/Accounts/{B}.json"), B, "guess", Some(&from), &[]).await;
        assert_eq!(r.status, 401);
    }
    let r = rest(&node, Method::GET, &format!("/2010-04-01/Accounts/{B}.json"), B, B_TOKEN, Some("203.0.113.99"), &[])
        .await;
    assert_eq!(r.status, 429);
    let r = rest(&node, Method::GET, &me, ACCOUNT, TOKEN, Some("203.0.113.99"), &[]).await;
    assert_eq!(r.status, 200);
    let m = node.scrape().await.unwrap();
    assert!(metric(&m, "voxgate_rest_auth_locked_out_total").unwrap_or(0.0) >= 3.0, "{m}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forwarded_for_counts_only_from_trusted_proxies() {
    let allow = "twilio_allow_cidrs = [\"203.0.113.0/24\"]\n";
    let behind =
        Node::start(&config(&format!("{allow}trusted_proxies = [\"127.0.0.1/32\"]\n[stt]\nenabled = false\n")))
            .unwrap();
    let exposed = Node::start(&config(&format!("{allow}[stt]\nenabled = false\n"))).unwrap();
    let post = |node: &Node, fwd: &str| {
        let url = format!("{}/api/voice/twilio/inbound", node.url());
        let fwd = fwd.to_owned();
        async move {
            let s = reqwest::Client::new()
                .post(url)
                .header("x-forwarded-for", fwd)
                .header("content-type", "application/x-www-form-urlencoded")
                .body("AccountSid=x")
                .send()
                .await
                .unwrap()
                .status()
                .as_u16();
            s
        }
    };
    // Through the trusted proxy, a Twilio address passes the perimeter (and fails later, 400, on
    // its form); a client that writes Twilio's address at the left of the chain does not.
    assert_eq!(post(&behind, "203.0.113.5").await, 400);
    assert_eq!(post(&behind, "203.0.113.5, 198.51.100.9").await, 403);
    // Without trusted proxies the header is the client's say and changes nothing.
    assert_eq!(post(&exposed, "203.0.113.5").await, 403);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn callback_urls_cannot_aim_inside() {
    let node = Node::start(&two_tenants("[stt]\nenabled = false\n")).unwrap();
    let trigger = |value: &'static str, url: &'static str| {
        let node = &node;
        async move {
            let path = format!("/2010-04-01/Accounts/{ACCOUNT}/Usage/Triggers.json");
            let params = [("UsageCategory", "calls"), ("TriggerValue", value), ("CallbackUrl", url)];
            rest(node, Method::POST, &path, ACCOUNT, TOKEN, None, &params).await
        }
    };
    for url in [
        "http://127.0.0.1:9/hook",
        "http://localhost:9/hook",
        "http://169.254.169.254/latest/meta-data/",
        "http://[::1]:9/hook",
        "http://10.0.0.7/hook",
        "http://user:pass@192.168.1.1/hook",
    ] {
        let r = trigger("1", url).await;
        assert_eq!(r.status, 400, "{url}: {}", r.json);
        assert!(r.json["message"].as_str().unwrap().starts_with("CallbackUrl"), "{url}: {}", r.json);
    }
    // A public address is taken (nothing is sent until the trigger fires) …
    let r = trigger("1000", "https://54.172.60.1/hook").await;
    assert_eq!(r.status, 201, "{}", r.json);
    // … and cannot be moved inside afterwards.
    let sid = r.json["sid"].as_str().unwrap();
    let r = rest(
        &node,
        Method::POST,
        &format!("/2010-04-01/Accounts/{ACCOUNT}/Usage/Triggers/{sid}.json"),
        ACCOUNT,
        TOKEN,
        None,
        &[("CallbackUrl", "http://127.0.0.1:9/")],
    )
    .await;
    assert_eq!(r.status, 400, "{}", r.json);
    let m = node.scrape().await.unwrap();
    assert_eq!(metric(&m, "voxgate_outbound_refused_total{reason=\"at_creation\"}"), Some(7.0), "{m}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_operators_suspension_holds_against_the_parent() {
    let node = Node::start(&two_tenants("[stt]\nenabled = false\n")).unwrap();
    let r =
        rest(&node, Method::POST, "/2010-04-01/Accounts.json", "admin", ADMIN, None, &[("ParentAccountSid", ACCOUNT)])
            .await;
    assert_eq!(r.status, 201, "{}", r.json);
    assert_eq!(r.headers["cache-control"], "no-store");
    let sub = r.json["sid"].as_str().unwrap().to_owned();
    let path = format!("/2010-04-01/Accounts/{sub}.json");
    // The operator suspends the subaccount; its parent cannot lift that.
    let r = rest(&node, Method::POST, &path, "admin", ADMIN, None, &[("Status", "suspended")]).await;
    assert_eq!((r.status, r.json["status"].as_str()), (200, Some("suspended")), "{}", r.json);
    let r = rest(&node, Method::POST, &path, ACCOUNT, TOKEN, None, &[("Status", "active")]).await;
    assert_eq!((r.status, r.json["code"].as_u64()), (403, Some(20403)), "{}", r.json);
    // The parent may still rename it; the operator lifts the suspension.
    let r = rest(&node, Method::POST, &path, ACCOUNT, TOKEN, None, &[("FriendlyName", "held")]).await;
    assert_eq!(r.status, 200, "{}", r.json);
    let r = rest(&node, Method::POST, &path, "admin", ADMIN, None, &[("Status", "active")]).await;
    assert_eq!((r.status, r.json["status"].as_str()), (200, Some("active")));
    // A suspension of the parent's own making it lifts itself.
    let r = rest(&node, Method::POST, &path, ACCOUNT, TOKEN, None, &[("Status", "suspended")]).await;
    assert_eq!(r.status, 200);
    let r = rest(&node, Method::POST, &path, ACCOUNT, TOKEN, None, &[("Status", "active")]).await;
    assert_eq!((r.status, r.json["status"].as_str()), (200, Some("active")), "{}", r.json);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unsafe_configurations_are_refused_at_start() {
    let short = "[[tenants]]\naccount_sid = \"AC0123456789abcdef0123456789abcdef\"\nauth_token = \"demo-auth-token-change-me\"\n";
    // A short token on a node reachable beyond loopback.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("voxgate.toml");
    std::fs::write(&path, format!("listen = \"0.0.0.0:0\"\n{short}")).unwrap();
    let out = std::process::Command::new(voxgate_scenarios::node::binary().unwrap())
        .args(["serve", "--config"])
        .arg(&path)
        .args(["--listen", "0.0.0.0:0", "--data-dir"])
        .arg(dir.path().join("data"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && err.contains("tenants[0].auth_token") && err.contains("32"), "{err}");
    // The same token on loopback (the demo) starts.
    Node::start(&format!("public_url = \"{PUBLIC}\"\n[stt]\nenabled = false\n{short}")).unwrap();
    // Retention on a log the node rebuilds its state from; the replaced forwarded-for switch.
    for (extra, named) in [
        ("[log.retention.calls]\nmax_age_secs = 3600\n", "log.retention.calls"),
        ("trust_forwarded_for = true\n", "trusted_proxies"),
    ] {
        let e = Node::start(&config(extra)).err().expect("refused").to_string();
        assert!(e.contains(named), "{e}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_timestamp_at_the_end_of_time_does_not_break_the_stream() {
    let node = Node::start(&config("[stt]\nenabled = false\n")).unwrap();
    let a = sim(&node);
    let call = CallSid::from_u128(0x7e);
    let answer = a.inbound_call(call, "+14155550123", NUMBER).await.unwrap();
    let mut stream = a.connect_stream(answer.stream_url.as_deref().unwrap()).await.unwrap();
    let sid = StreamSid::from_u128(0x57e);
    stream.start(sid, a.account(), call).await.unwrap();
    stream.send_audio(sid, &[0xFF; 800], Pace::Faster(10)).await.unwrap();
    // Any client can send a timestamp near u64::MAX; the batching arithmetic must not wrap.
    for (i, ts) in [u64::MAX - 10, u64::MAX, 0].into_iter().enumerate() {
        let frame = media::inbound_media_json(sid, 100 + i as u64, 100 + i as u64, ts, &[0xFF; 160]);
        stream.send_raw(&frame).await.unwrap();
    }
    stream.send_audio(sid, &[0xFF; 800], Pace::Faster(10)).await.unwrap();
    stream.stop(sid, a.account(), call).await.unwrap();
    // voxgate closes the socket once it has taken the stop (everything before it is queued).
    stream.closed(Duration::from_secs(10)).await;
    assert_eq!(a.status_callback(call, "completed", 2, None).await.unwrap(), 204);
    node.wait_idle(Duration::from_secs(10)).await.unwrap();
    let mut node = node;
    assert!(node.stop().unwrap().success());
    let events = replay_json(&node, call);
    assert!(events.iter().all(|e| e["kind"] != "stream_fault"), "{events:?}");
    let stopped = events.iter().find(|e| e["kind"] == "stream_stopped").unwrap_or_else(|| panic!("{events:#?}"));
    assert_eq!(stopped["reason"], "twilio", "Twilio's stop ended the stream: {stopped}");
    let frames: u64 =
        events.iter().filter(|e| e["kind"] == "media_batch").map(|e| e["frames"].as_u64().unwrap_or(0)).sum();
    assert_eq!(frames, 13, "every frame kept: {events:?}");
}
