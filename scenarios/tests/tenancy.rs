//! Tenants, numbers, quotas, throttles and caller protection through the real binary: the
//! Twilio-shaped REST API (HTTP Basic auth), the CLI, and signed voice webhooks.

use std::time::Duration;

use reqwest::Method;
use serde_json::Value;
use voxgate_protocol::{AccountSid, CallSid};
use voxgate_scenarios::fixture::{config, replay_json, sim, ACCOUNT, NUMBER, PUBLIC, TOKEN};
use voxgate_scenarios::node::{binary, Node};
use voxgate_scenarios::twilio::Simulator;

const ADMIN: &str = "admin-9c1f0e7a5b3d2c4e6f8a0b1c";

/// Top-level keys first, then tables (the fixture appends the tenant table).
fn node_config(extra_tables: &str) -> String {
    config(&format!(
        "admin_token = \"{ADMIN}\"\n[stt]\nenabled = false\n[callers]\nmax_calls_per_window = 3\n{extra_tables}"
    ))
}

enum Auth<'a> {
    None,
    Admin,
    Basic(&'a str, &'a str),
}

struct Reply {
    status: u16,
    json: Value,
    retry_after: Option<String>,
}

async fn rest(node: &Node, method: Method, path: &str, auth: Auth<'_>, params: &[(&str, &str)]) -> Reply {
    let client = reqwest::Client::new();
    let body: String = form_urlencoded::Serializer::new(String::new()).extend_pairs(params).finish();
    let url = if method == Method::GET && !params.is_empty() {
        format!("{}{path}?{body}", node.url())
    } else {
        format!("{}{path}", node.url())
    };
    let mut req = client.request(method.clone(), url);
    req = match auth {
        Auth::None => req,
        Auth::Admin => req.basic_auth("admin", Some(ADMIN)),
        Auth::Basic(u, p) => req.basic_auth(u, Some(p)),
    };
    if method != Method::GET {
        req = req.header("content-type", "application/x-www-form-urlencoded").body(body);
    }
    let resp = req.send().await.expect("request");
    let status = resp.status().as_u16();
    let retry_after = resp.headers().get("retry-after").and_then(|v| v.to_str().ok()).map(str::to_owned);
    let text = resp.text().await.expect("body");
    let json = if text.is_empty() { Value::Null } else { serde_json::from_str(&text).unwrap_or(Value::String(text)) };
    Reply { status, json, retry_after }
}

fn accounts(path_tail: &str, sid: &str) -> String {
    format!("/2010-04-01/Accounts/{sid}{path_tail}")
}

/// The TwiML verb voxgate answered with, and the reject reason when it is `<Reject>`.
async fn ring(sim: &Simulator, call: u128, from: &str, to: &str) -> (u16, String) {
    let a = sim.inbound_call(CallSid::from_u128(call), from, to).await.expect("webhook");
    (a.status, a.body)
}

fn rejected(body: &str) -> bool {
    body.contains("<Reject")
}

/// The `call_rejected` reason recorded for a call (the node must be stopped).
fn reject_reason(node: &Node, call: u128) -> Value {
    let events = replay_json(node, CallSid::from_u128(call));
    events.iter().find(|e| e["kind"] == "call_rejected").map(|e| e["reason"].clone()).unwrap_or(Value::Null)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tenants_are_separated_over_rest_and_webhooks() {
    let mut node = Node::start(&node_config("")).unwrap();
    let a = ACCOUNT;

    // ---- Accounts: create needs the admin token.
    let r =
        rest(&node, Method::POST, "/2010-04-01/Accounts.json", Auth::Basic(a, TOKEN), &[("FriendlyName", "B")]).await;
    assert_eq!((r.status, r.json["code"].as_u64()), (403, Some(20403)), "{}", r.json);
    let r = rest(&node, Method::POST, "/2010-04-01/Accounts.json", Auth::None, &[]).await;
    assert_eq!((r.status, r.json["code"].as_u64()), (401, Some(20003)));
    let r = rest(
        &node,
        Method::POST,
        "/2010-04-01/Accounts.json",
        Auth::Basic("admin", "admin-wrongwrongwrongwrongwrong"),
        &[],
    )
    .await;
    assert_eq!(r.status, 401);
    let r = rest(&node, Method::POST, "/2010-04-01/Accounts.json", Auth::Admin, &[("FriendlyName", "Tenant B")]).await;
    assert_eq!(r.status, 201, "{}", r.json);
    let b = r.json["sid"].as_str().unwrap().to_owned();
    let b_token = r.json["auth_token"].as_str().unwrap().to_owned();
    assert_eq!(r.json["owner_account_sid"], b.as_str());
    assert_eq!(r.json["status"], "active");
    assert!(r.json["date_created"].as_str().unwrap().ends_with("+0000"));
    assert_eq!(r.json["uri"], format!("/2010-04-01/Accounts/{b}.json"));
    // A subaccount of A, created by the operator.
    let r = rest(&node, Method::POST, "/2010-04-01/Accounts.json", Auth::Admin, &[("ParentAccountSid", a)]).await;
    assert_eq!(r.status, 201, "{}", r.json);
    let sub = r.json["sid"].as_str().unwrap().to_owned();
    let sub_token = r.json["auth_token"].as_str().unwrap().to_owned();
    assert_eq!(r.json["owner_account_sid"], a);
    assert!(r.json["friendly_name"].as_str().unwrap().starts_with("SubAccount Created at "));
    // Subaccounts cannot have subaccounts.
    let r = rest(&node, Method::POST, "/2010-04-01/Accounts.json", Auth::Admin, &[("ParentAccountSid", &sub)]).await;
    assert_eq!((r.status, r.json["code"].as_u64()), (400, Some(21101)));

    // ---- Lists and fetches: each tenant sees itself and its subaccounts only.
    let r = rest(&node, Method::GET, "/2010-04-01/Accounts.json", Auth::Admin, &[]).await;
    assert_eq!(r.json["accounts"].as_array().unwrap().len(), 3);
    assert_eq!(r.json["page"], 0);
    assert_eq!(r.json["next_page_uri"], Value::Null);
    let r = rest(&node, Method::GET, "/2010-04-01/Accounts.json", Auth::Basic(a, TOKEN), &[]).await;
    let mut seen: Vec<&str> =
        r.json["accounts"].as_array().unwrap().iter().map(|x| x["sid"].as_str().unwrap()).collect();
    seen.sort();
    let mut want = vec![a, sub.as_str()];
    want.sort();
    assert_eq!(seen, want);
    let r =
        rest(&node, Method::GET, "/2010-04-01/Accounts.json", Auth::Admin, &[("PageSize", "2"), ("Page", "1")]).await;
    assert_eq!(r.json["accounts"].as_array().unwrap().len(), 1);
    assert_eq!(r.json["start"], 2);
    assert!(r.json["previous_page_uri"].as_str().is_some());
    // A's credentials never read or change B's data: B does not even exist for A.
    let r = rest(&node, Method::GET, &accounts(".json", &b), Auth::Basic(a, TOKEN), &[]).await;
    assert_eq!((r.status, r.json["code"].as_u64()), (404, Some(20404)));
    let r =
        rest(&node, Method::POST, &accounts(".json", &b), Auth::Basic(a, TOKEN), &[("FriendlyName", "mine now")]).await;
    assert_eq!(r.status, 404);
    let r = rest(&node, Method::GET, &accounts(".json", a), Auth::Basic(&b, &b_token), &[]).await;
    assert_eq!(r.status, 404);
    // The parent reaches its subaccount; the subaccount does not reach its parent.
    let r = rest(&node, Method::GET, &accounts(".json", &sub), Auth::Basic(a, TOKEN), &[]).await;
    assert_eq!(r.status, 200);
    let r = rest(&node, Method::GET, &accounts(".json", a), Auth::Basic(&sub, &sub_token), &[]).await;
    assert_eq!(r.status, 404);
    // B renames itself; it cannot change its own status.
    let r = rest(&node, Method::POST, &accounts(".json", &b), Auth::Basic(&b, &b_token), &[("FriendlyName", "B Corp")])
        .await;
    assert_eq!((r.status, r.json["friendly_name"].as_str()), (200, Some("B Corp")));
    let r = rest(&node, Method::POST, &accounts(".json", &b), Auth::Basic(&b, &b_token), &[("Status", "closed")]).await;
    assert_eq!(r.status, 403);

    // ---- Length limits name the field.
    let long = "x".repeat(256);
    let r =
        rest(&node, Method::POST, &accounts(".json", &b), Auth::Basic(&b, &b_token), &[("FriendlyName", &long)]).await;
    assert_eq!(r.status, 400);
    assert!(r.json["message"].as_str().unwrap().contains("FriendlyName"), "{}", r.json);
    let url = format!("https://example.com/{}", "u".repeat(4000));
    let r = rest(
        &node,
        Method::POST,
        &accounts("/IncomingPhoneNumbers.json", &b),
        Auth::Basic(&b, &b_token),
        &[("PhoneNumber", "+14155550201"), ("VoiceUrl", &url)],
    )
    .await;
    assert_eq!(r.status, 400);
    assert!(r.json["message"].as_str().unwrap().contains("VoiceUrl"), "{}", r.json);
    let r = rest(
        &node,
        Method::POST,
        &accounts("/IncomingPhoneNumbers.json", &b),
        Auth::Basic(&b, &b_token),
        &[("PhoneNumber", "+14155550201"), ("UniqueName", &"n".repeat(192))],
    )
    .await;
    assert!(r.status == 400 && r.json["message"].as_str().unwrap().contains("UniqueName"), "{}", r.json);

    // ---- IncomingPhoneNumbers: a number belongs to exactly one tenant.
    let r = rest(
        &node,
        Method::POST,
        &accounts("/IncomingPhoneNumbers.json", &b),
        Auth::Basic(&b, &b_token),
        &[("PhoneNumber", "+14155550201"), ("FriendlyName", "B main")],
    )
    .await;
    assert_eq!(r.status, 201, "{}", r.json);
    let pn = r.json["sid"].as_str().unwrap().to_owned();
    assert!(pn.starts_with("PN"));
    assert_eq!(r.json["account_sid"], b.as_str());
    // No app behind it: voxgate answers its calls; Twilio must point the number at voxgate.
    assert_eq!(r.json["voice_url"], Value::Null);
    assert_eq!(r.json["voxgate_voice_url"], format!("{PUBLIC}/api/voice/twilio/inbound"));
    assert_eq!(r.json["voxgate_status_callback"], format!("{PUBLIC}/api/voice/twilio/status"));
    // The customer's app behind it (gateway mode): Twilio's routing fields, validated.
    let number = accounts(&format!("/IncomingPhoneNumbers/{pn}.json"), &b);
    for (field, bad) in
        [("VoiceUrl", "ftp://app.example.com/voice"), ("VoiceUrl", "http://127.0.0.1/voice"), ("VoiceMethod", "PUT")]
    {
        let r = rest(&node, Method::POST, &number, Auth::Basic(&b, &b_token), &[(field, bad)]).await;
        assert_eq!(r.status, 400, "{field}={bad}: {}", r.json);
        assert!(r.json["message"].as_str().unwrap().starts_with(field), "{}", r.json);
    }
    let r = rest(
        &node,
        Method::POST,
        &number,
        Auth::Basic(&b, &b_token),
        &[
            ("VoiceUrl", "https://54.172.60.1/voice"),
            ("VoiceMethod", "GET"),
            ("StatusCallback", "https://54.172.60.1/status"),
        ],
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.json);
    assert_eq!(
        (r.json["voice_url"].as_str(), r.json["voice_method"].as_str()),
        (Some("https://54.172.60.1/voice"), Some("GET"))
    );
    assert_eq!(r.json["status_callback"], "https://54.172.60.1/status");
    assert_eq!(r.json["voice_fallback_method"], "POST");
    // A fallback alone is refused as Twilio refuses it; clearing the app returns the number to voxgate.
    let r = rest(
        &node,
        Method::POST,
        &number,
        Auth::Basic(&b, &b_token),
        &[("VoiceUrl", ""), ("VoiceFallbackUrl", "https://54.172.60.1/f")],
    )
    .await;
    assert_eq!(r.status, 400, "{}", r.json);
    let r = rest(&node, Method::POST, &number, Auth::Basic(&b, &b_token), &[("VoiceUrl", "")]).await;
    assert_eq!((r.status, &r.json["voice_url"]), (200, &Value::Null), "{}", r.json);
    // A's credentials do not reach B's number.
    let r = rest(&node, Method::POST, &number, Auth::Basic(a, TOKEN), &[("VoiceUrl", "https://54.172.60.1/x")]).await;
    assert_eq!(r.status, 404);
    for (who, tok) in [(a, TOKEN), (b.as_str(), b_token.as_str())] {
        let r = rest(
            &node,
            Method::POST,
            &accounts("/IncomingPhoneNumbers.json", who),
            Auth::Basic(who, tok),
            &[("PhoneNumber", "+14155550201")],
        )
        .await;
        assert_eq!((r.status, r.json["code"].as_u64()), (409, Some(21422)), "{}", r.json);
    }
    let r = rest(
        &node,
        Method::POST,
        &accounts("/IncomingPhoneNumbers.json", &b),
        Auth::Basic(&b, &b_token),
        &[("PhoneNumber", "4155550202")],
    )
    .await;
    assert_eq!(r.status, 400, "E.164 only");
    let r = rest(&node, Method::GET, &accounts("/IncomingPhoneNumbers.json", &b), Auth::Basic(a, TOKEN), &[]).await;
    assert_eq!(r.status, 404, "A cannot list B's numbers");
    let r = rest(&node, Method::GET, &accounts("/IncomingPhoneNumbers.json", &b), Auth::Basic(&b, &b_token), &[]).await;
    assert_eq!(r.json["incoming_phone_numbers"].as_array().unwrap().len(), 1);
    let r = rest(
        &node,
        Method::GET,
        &accounts(&format!("/IncomingPhoneNumbers/{pn}.json"), &b),
        Auth::Basic(&b, &b_token),
        &[],
    )
    .await;
    assert_eq!(r.json["phone_number"], "+14155550201");
    let r = rest(
        &node,
        Method::DELETE,
        &accounts(&format!("/IncomingPhoneNumbers/{pn}.json"), a),
        Auth::Basic(a, TOKEN),
        &[],
    )
    .await;
    assert_eq!(r.status, 404, "A cannot release B's number");

    // ---- Webhooks: tenant A's token cannot take B's number, nor sign for B.
    let sim_a = sim(&node);
    let sim_b = Simulator::new(&node.url(), PUBLIC, AccountSid::parse(&b).unwrap(), &b_token);
    let (st, body) = ring(&sim_b, 1, "+15550000001", "+14155550201").await;
    assert!(st == 200 && body.contains("<Stream"), "{body}");
    let (st, body) = ring(&sim_a, 2, "+15550000002", "+14155550201").await;
    assert!(st == 200 && rejected(&body), "A's call to B's number: {body}");
    let forged = Simulator::new(&node.url(), PUBLIC, AccountSid::parse(&b).unwrap(), TOKEN);
    let (st, _) = ring(&forged, 3, "+15550000003", "+14155550201").await;
    assert_eq!(st, 403, "B's AccountSid signed with A's token");

    // ---- Suspension: B's calls and API requests are refused; reactivation restores them.
    let r = rest(&node, Method::POST, &accounts(".json", &b), Auth::Admin, &[("Status", "suspended")]).await;
    assert_eq!(r.json["status"], "suspended");
    let (_, body) = ring(&sim_b, 4, "+15550000004", "+14155550201").await;
    assert!(rejected(&body), "{body}");
    let r = rest(&node, Method::GET, &accounts(".json", &b), Auth::Basic(&b, &b_token), &[]).await;
    assert_eq!((r.status, r.json["code"].as_u64()), (403, Some(20005)));
    let r = rest(&node, Method::POST, &accounts(".json", &b), Auth::Admin, &[("Status", "active")]).await;
    assert_eq!(r.json["status"], "active");
    let (_, body) = ring(&sim_b, 5, "+15550000005", "+14155550201").await;
    assert!(body.contains("<Stream"), "{body}");

    // ---- Restart: the directory is rebuilt from the log; tokens are sealed at rest.
    node.stop().unwrap();
    assert_eq!(reject_reason(&node, 2), "unknown_number");
    assert_eq!(reject_reason(&node, 4)["tenant_inactive"]["status"], "suspended");
    let mut found = Vec::new();
    for entry in walk(&node.dir.path().join("data")) {
        let bytes = std::fs::read(&entry).unwrap_or_default();
        if bytes.windows(b_token.len()).any(|w| w == b_token.as_bytes()) {
            found.push(entry);
        }
    }
    assert!(found.is_empty(), "auth token in the clear in {found:?}");
    let dir = std::mem::replace(&mut node.dir, tempfile::tempdir().unwrap());
    let node = Node::start_in(dir, node.config_path.clone(), &[]).unwrap();
    let r = rest(&node, Method::GET, &accounts(".json", &b), Auth::Basic(&b, &b_token), &[]).await;
    assert_eq!((r.status, r.json["friendly_name"].as_str()), (200, Some("B Corp")), "{}", r.json);
    let sim_b = Simulator::new(&node.url(), PUBLIC, AccountSid::parse(&b).unwrap(), &b_token);
    let (_, body) = ring(&sim_b, 6, "+15550000006", "+14155550201").await;
    assert!(body.contains("<Stream"), "{body}");
}

fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = e.path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quotas_and_caller_protection_refuse_with_reasons() {
    let mut node = Node::start(&node_config("")).unwrap();
    let a = ACCOUNT;
    let sim_a = sim(&node);
    // Quotas are the operator's: a tenant cannot raise its own.
    let r = rest(
        &node,
        Method::POST,
        &accounts("/Quotas.json", a),
        Auth::Basic(a, TOKEN),
        &[("MaxConcurrentCalls", "1000")],
    )
    .await;
    assert_eq!(r.status, 403);
    let r = rest(&node, Method::GET, &accounts("/Quotas.json", a), Auth::Basic(a, TOKEN), &[]).await;
    assert_eq!((r.json["max_concurrent_calls"].as_u64(), r.json["calls_per_second"].as_u64()), (Some(100), Some(10)));
    let r = rest(&node, Method::POST, &accounts("/Quotas.json", a), Auth::Admin, &[("MaxConcurrentCalls", "3")]).await;
    assert_eq!(r.json["max_concurrent_calls"], 3, "{}", r.json);

    // Three calls fit (a warning at the third: 70 % of 3 rounds up to 3); the fourth is refused.
    for (i, from) in ["+15550000011", "+15550000012", "+15550000013"].iter().enumerate() {
        let (_, body) = ring(&sim_a, 10 + i as u128, from, NUMBER).await;
        assert!(body.contains("<Stream"), "{body}");
    }
    let (_, body) = ring(&sim_a, 13, "+15550000014", NUMBER).await;
    assert!(body.contains("<Reject reason=\"busy\""), "{body}");
    let r = rest(&node, Method::GET, &accounts("/Quotas.json", a), Auth::Basic(a, TOKEN), &[]).await;
    assert_eq!(r.json["active_calls"], 3);

    // A subaccount has its own quota: unaffected by the parent's full one.
    let r = rest(&node, Method::POST, "/2010-04-01/Accounts.json", Auth::Admin, &[("ParentAccountSid", a)]).await;
    let sub = r.json["sid"].as_str().unwrap().to_owned();
    let sub_token = r.json["auth_token"].as_str().unwrap().to_owned();
    rest(
        &node,
        Method::POST,
        &accounts("/IncomingPhoneNumbers.json", &sub),
        Auth::Basic(a, TOKEN),
        &[("PhoneNumber", "+14155550300")],
    )
    .await;
    let sim_sub = Simulator::new(&node.url(), PUBLIC, AccountSid::parse(&sub).unwrap(), &sub_token);
    let (_, body) = ring(&sim_sub, 20, "+15550000020", "+14155550300").await;
    assert!(body.contains("<Stream"), "{body}");

    // Ending a call frees its place.
    let st = sim_a.status_callback(CallSid::from_u128(10), "completed", 1, Some(3)).await.unwrap();
    assert!(st < 300, "status {st}");
    let mut freed = false;
    for _ in 0..100 {
        let r = rest(&node, Method::GET, &accounts("/Quotas.json", a), Auth::Admin, &[]).await;
        if r.json["active_calls"] == 2 {
            freed = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(freed, "the ended call still counts");
    let (_, body) = ring(&sim_a, 14, "+15550000015", NUMBER).await;
    assert!(body.contains("<Stream"), "{body}");

    // Caller protection: premium-rate caller, blocked caller, too many calls from one number.
    let (_, body) = ring(&sim_sub, 21, "+19005550100", "+14155550300").await;
    assert!(rejected(&body), "{body}");
    let r = rest(
        &node,
        Method::POST,
        &accounts("/BlockedNumbers.json", &sub),
        Auth::Basic(a, TOKEN),
        &[("PhoneNumber", "+15550000666")],
    )
    .await;
    assert_eq!(r.status, 403, "blocking needs the admin token");
    let r = rest(
        &node,
        Method::POST,
        &accounts("/BlockedNumbers.json", &sub),
        Auth::Admin,
        &[("PhoneNumber", "+15550000666"), ("Reason", "robocaller")],
    )
    .await;
    assert_eq!(r.status, 201, "{}", r.json);
    let (_, body) = ring(&sim_sub, 22, "+15550000666", "+14155550300").await;
    assert!(rejected(&body), "{body}");
    let r = rest(&node, Method::GET, &accounts("/BlockedNumbers.json", &sub), Auth::Basic(&sub, &sub_token), &[]).await;
    assert_eq!(r.json["blocked_numbers"][0]["reason"], "robocaller");
    let r = rest(&node, Method::DELETE, &accounts("/BlockedNumbers/%2B15550000666.json", &sub), Auth::Admin, &[]).await;
    assert_eq!(r.status, 204);
    let (_, body) = ring(&sim_sub, 23, "+15550000666", "+14155550300").await;
    assert!(body.contains("<Stream"), "unblocked: {body}");
    // Limit 3 per hour: 23, 24 and 25 pass, 26 is refused.
    for i in 0..3 {
        let (_, body) = ring(&sim_sub, 24 + i, "+15550000666", "+14155550300").await;
        assert_eq!(rejected(&body), i == 2, "call {i} from the same caller: {body}");
    }

    // The rate quota: one new call per second for the subaccount.
    rest(&node, Method::POST, &accounts("/Quotas.json", &sub), Auth::Admin, &[("CallsPerSecond", "1")]).await;
    let mut refused = Vec::new();
    for i in 0..4u128 {
        let (_, body) = ring(&sim_sub, 40 + i, &format!("+1555000004{i}"), "+14155550300").await;
        if rejected(&body) {
            refused.push(40 + i);
        }
    }
    assert!(!refused.is_empty() && refused.len() < 4, "refused {refused:?}");

    node.stop().unwrap();
    assert_eq!(reject_reason(&node, 13)["concurrency_quota"], serde_json::json!({"active": 3, "limit": 3}));
    let warned = replay_json(&node, CallSid::from_u128(12));
    let w = warned.iter().find(|e| e["kind"] == "quota_warning").expect("a quota warning at the third call");
    assert_eq!((w["active"].as_u64(), w["code"].as_u64()), (Some(3), Some(53121)));
    assert_eq!(reject_reason(&node, 21)["premium_rate"]["prefix"], "+1900");
    assert_eq!(reject_reason(&node, 22)["blocked_caller"]["number"], "+15550000666");
    assert_eq!(
        reject_reason(&node, 26)["caller_rate"],
        serde_json::json!({"calls": 3, "limit": 3, "window_secs": 3600})
    );
    assert_eq!(reject_reason(&node, refused[0])["rate_quota"]["limit_per_sec"], 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn throttles_are_per_tenant_and_the_cli_manages_tenants() {
    let node =
        Node::start(&node_config("[throttle]\nrequests_per_second = 2\nburst_multiplier = 5\nwindow_secs = 5\n"))
            .unwrap();
    let a = ACCOUNT;
    // Tenant B through the CLI.
    let cli = |args: &[&str]| {
        let out = std::process::Command::new(binary().unwrap())
            .args(args)
            .args(["--url", &node.url(), "--json"])
            .env("VOXGATE_ADMIN_TOKEN", ADMIN)
            .output()
            .unwrap();
        assert!(out.status.success(), "voxgate {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        serde_json::from_slice::<Value>(&out.stdout).unwrap_or(Value::Null)
    };
    let v = cli(&["tenants", "create", "--friendly-name", "From the CLI"]);
    let b = v["sid"].as_str().unwrap().to_owned();
    let b_token = v["auth_token"].as_str().unwrap().to_owned();
    let v = cli(&["numbers", "add", "--tenant", &b, "+14155550400"]);
    assert_eq!(v["phone_number"], "+14155550400");
    let v = cli(&["tenants", "quota", &b, "--max-concurrent-calls", "7"]);
    assert_eq!(v["max_concurrent_calls"], 7);
    let v = cli(&["tenants", "list"]);
    assert_eq!(v["accounts"].as_array().unwrap().len(), 2);
    let v = cli(&["numbers", "list", "--tenant", &b]);
    assert_eq!(v["incoming_phone_numbers"][0]["phone_number"], "+14155550400");
    // A refusal is an error with the API's message.
    let out = std::process::Command::new(binary().unwrap())
        .args(["numbers", "add", "--tenant", a, "+14155550400", "--url", &node.url()])
        .env("VOXGATE_ADMIN_TOKEN", ADMIN)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("already belongs"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    // Throttle: 2/s baseline, bursts to 10 within the 5 s window. A's burst is cut at 10 with
    // 429 + Retry-After; B's requests meanwhile all pass.
    let mut codes = Vec::new();
    let mut retry = None;
    for _ in 0..15 {
        let r = rest(&node, Method::GET, &accounts("/IncomingPhoneNumbers.json", a), Auth::Basic(a, TOKEN), &[]).await;
        if r.status == 429 {
            assert_eq!(r.json["code"], 20429);
            retry = r.retry_after.clone();
        }
        codes.push(r.status);
    }
    assert_eq!(codes.iter().filter(|c| **c == 200).count(), 10, "{codes:?}");
    assert!(retry.as_deref().and_then(|s| s.parse::<u32>().ok()).is_some_and(|s| (1..=5).contains(&s)), "{retry:?}");
    for _ in 0..5 {
        let r =
            rest(&node, Method::GET, &accounts("/IncomingPhoneNumbers.json", &b), Auth::Basic(&b, &b_token), &[]).await;
        assert_eq!(r.status, 200);
    }
    // Another endpoint of A has its own window.
    let r = rest(&node, Method::GET, &accounts(".json", a), Auth::Basic(a, TOKEN), &[]).await;
    assert_eq!(r.status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_twilio_endpoints_can_be_limited_to_networks() {
    let cfg =
        config(&format!("admin_token = \"{ADMIN}\"\ntwilio_allow_cidrs = [\"10.0.0.0/8\"]\n[stt]\nenabled = false\n"));
    let node = Node::start(&cfg).unwrap();
    let (st, _) = ring(&sim(&node), 1, "+15550000001", NUMBER).await;
    assert_eq!(st, 403, "loopback is outside 10.0.0.0/8");
    // The REST API and health are not Twilio-facing.
    let r = rest(&node, Method::GET, &accounts(".json", ACCOUNT), Auth::Basic(ACCOUNT, TOKEN), &[]).await;
    assert_eq!(r.status, 200);
    let cfg = config("twilio_allow_cidrs = [\"10.0.0.0/8\", \"127.0.0.1/32\"]\n[stt]\nenabled = false\n");
    let node2 = Node::start(&cfg).unwrap();
    let (st, body) = ring(&sim(&node2), 1, "+15550000001", NUMBER).await;
    assert!(st == 200 && body.contains("<Stream"), "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_serves_webhooks_and_the_api_when_a_certificate_is_configured() {
    use voxgate_protocol::twilio::{signature, Algorithm};
    let certs = tempfile::tempdir().unwrap();
    let dir = certs.path();
    let (cert, key, ca) = (dir.join("cert.pem"), dir.join("key.pem"), dir.join("ca.pem"));
    std::fs::write(dir.join("ext.cnf"), "subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\n").unwrap();
    // A test CA, and a server certificate for 127.0.0.1 signed by it (Debian's openssl CLI).
    let ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"];
    for args in [
        vec![
            "req",
            "-x509",
            ec[0],
            ec[1],
            ec[2],
            ec[3],
            ec[4],
            "-days",
            "1",
            "-subj",
            "/CN=voxgate test CA",
            "-keyout",
            "ca.key",
            "-out",
            "ca.pem",
        ],
        vec![
            "req",
            ec[0],
            ec[1],
            ec[2],
            ec[3],
            ec[4],
            "-subj",
            "/CN=127.0.0.1",
            "-keyout",
            "key.pem",
            "-out",
            "leaf.csr",
        ],
        vec![
            "x509",
            "-req",
            "-in",
            "leaf.csr",
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-days",
            "1",
            "-extfile",
            "ext.cnf",
            "-out",
            "cert.pem",
        ],
    ] {
        let out = std::process::Command::new("openssl").args(&args).current_dir(dir).output().expect("openssl CLI");
        assert!(out.status.success(), "openssl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    }
    let cfg = config(&format!(
        "admin_token = \"{ADMIN}\"\n[stt]\nenabled = false\n[tls]\ncert_file = \"{}\"\nkey_file = \"{}\"\n",
        cert.display(),
        key.display()
    ));
    let node = Node::start(&cfg).unwrap();
    let base = format!("https://127.0.0.1:{}", node.addr.port());
    let root = reqwest::Certificate::from_pem(&std::fs::read(&ca).unwrap()).unwrap();
    let client = reqwest::Client::builder().add_root_certificate(root).build().unwrap();
    // Plain HTTP is not served on a TLS listener.
    let plain = reqwest::Client::builder().timeout(Duration::from_secs(3)).build().unwrap();
    let r = plain.get(format!("http://127.0.0.1:{}/api/voice/health", node.addr.port())).send().await;
    assert!(!r.is_ok_and(|r| r.status().is_success()));
    // The REST API over HTTPS.
    let r = client
        .get(format!("{base}/2010-04-01/Accounts/{ACCOUNT}.json"))
        .basic_auth(ACCOUNT, Some(TOKEN))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    // A signed webhook over HTTPS (Twilio signs the public URL, unchanged by TLS at our end).
    let params = sim(&node).inbound_params(CallSid::from_u128(7), "+15550000007", NUMBER);
    let sig =
        signature::compute(Algorithm::Sha1, TOKEN.as_bytes(), &format!("{PUBLIC}/api/voice/twilio/inbound"), &params);
    let r = client
        .post(format!("{base}/api/voice/twilio/inbound"))
        .header("x-twilio-signature", sig)
        .form(&params)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert!(r.text().await.unwrap().contains("<Stream"));
}
