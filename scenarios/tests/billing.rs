//! Usage through the real binary: calls billed per minute rounded up, numbers per month, served as
//! Twilio's Usage Records; a restart (the book rebuilt from the logs) gives the same totals to the
//! micro-dollar.

use reqwest::Method;
use serde_json::Value;
use voxgate_actors::billing::parse_micros;
use voxgate_protocol::CallSid;
use voxgate_scenarios::fixture::{config, sim, ACCOUNT, NUMBER, TOKEN};
use voxgate_scenarios::node::{binary, Node};

const ADMIN: &str = "admin-billing-test-token-0123456789";

/// `voxgate <args> --url <node>` with the admin token; stdout.
fn cli(node: &Node, args: &[&str]) -> String {
    let out = std::process::Command::new(binary().unwrap())
        .args(args)
        .args(["--url", &node.url()])
        .env("VOXGATE_ADMIN_TOKEN", ADMIN)
        .output()
        .unwrap();
    assert!(out.status.success(), "voxgate {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

async fn records(node: &Node, sub: &str, query: &str) -> Value {
    let url = format!("{}/2010-04-01/Accounts/{ACCOUNT}/Usage/Records{sub}.json?{query}", node.url());
    let r = reqwest::Client::new().request(Method::GET, url).basic_auth(ACCOUNT, Some(TOKEN)).send().await.unwrap();
    assert_eq!(r.status(), 200);
    serde_json::from_str(&r.text().await.unwrap()).unwrap()
}

fn micros(v: &Value) -> u64 {
    parse_micros(v.as_str().unwrap_or("x")).unwrap_or_else(|e| panic!("{v}: {e}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn calls_and_numbers_are_billed_and_a_restart_changes_nothing() {
    let node = Node::start(&config(&format!("admin_token = \"{ADMIN}\"\n[stt]\nenabled = false\n"))).unwrap();
    let s = sim(&node);
    // Two inbound calls: 61 s (2 minutes) and 30 s (1 minute); one outbound of 120 s (2 minutes).
    for n in [1u128, 2] {
        let a = s.inbound_call(CallSid::from_u128(n), &format!("+1415000000{n}"), NUMBER).await.unwrap();
        assert!(a.body.contains("<Stream"));
    }
    let out = CallSid::from_u128(3);
    let mut p = s.inbound_params(out, NUMBER, "+12125550100");
    for (k, v) in p.iter_mut() {
        if k == "Direction" {
            *v = "outbound-api".into();
        }
    }
    s.post_signed("/api/voice/twilio/inbound", &p).await.unwrap();
    // The calls last two minutes by the node's clock (a duration is believed up to what the node
    // saw of the call).
    node.advance_clock(std::time::Duration::from_secs(120)).await.unwrap();
    for (n, secs) in [(1u128, 61u32), (2, 30)] {
        s.status_callback(CallSid::from_u128(n), "completed", 1, Some(secs)).await.unwrap();
    }
    s.status_callback(out, "completed", 1, Some(120)).await.unwrap();

    let mut seen = None;
    for _ in 0..100 {
        let v = records(&node, "/Today", "Category=calls").await;
        if v["usage_records"][0]["count"] == "3" {
            seen = Some(v);
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    let calls = seen.expect("three calls billed");
    let r = &calls["usage_records"][0];
    assert_eq!(
        (r["usage"].as_str(), r["usage_unit"].as_str(), r["count_unit"].as_str()),
        (Some("5"), Some("minutes"), Some("calls"))
    );
    assert_eq!(micros(&r["price"]), 3 * 8_500 + 2 * 13_000);
    assert_eq!(r["price_unit"], "usd");
    assert_eq!(r["account_sid"], ACCOUNT);
    assert!(r["subresource_uris"]["daily"].as_str().unwrap().ends_with("/Usage/Records/Daily.json?Category=calls"));
    let inbound = records(&node, "/Today", "Category=calls-inbound").await;
    assert_eq!(inbound["usage_records"][0]["usage"], "3");
    assert_eq!(micros(&inbound["usage_records"][0]["price"]), 25_500);
    let numbers = records(&node, "/ThisMonth", "Category=phonenumbers").await;
    assert_eq!(numbers["usage_records"][0]["count"], "1");
    assert_eq!(micros(&numbers["usage_records"][0]["price"]), 1_000_000);
    let total = records(&node, "/ThisMonth", "Category=totalprice").await;
    let total_before = micros(&total["usage_records"][0]["price"]);
    assert_eq!(total_before, 25_500 + 26_000 + 1_000_000);
    let all_before = records(&node, "", "").await;
    assert_eq!(all_before["page"], 0);
    assert!(all_before["usage_records"].as_array().unwrap().len() >= 5);
    // The finance export: one CSV row per category, and the month's invoice.
    let csv = cli(&node, &["usage", "--tenant", ACCOUNT, "--period", "this-month", "--csv"]);
    let mut lines = csv.lines();
    assert_eq!(
        lines.next(),
        Some("account_sid,category,description,start_date,end_date,count,count_unit,usage,usage_unit,price,price_unit")
    );
    let rows: Vec<&str> = lines.collect();
    assert_eq!(rows.len(), all_before["usage_records"].as_array().unwrap().len(), "{csv}");
    let inbound_row = rows.iter().find(|r| r.split(',').nth(1) == Some("calls-inbound")).expect("calls-inbound row");
    assert!(inbound_row.ends_with(",2,calls,3,minutes,0.0255,usd"), "{inbound_row}");
    let invoice = cli(&node, &["usage", "--tenant", ACCOUNT, "--invoice", "this-month", "--csv"]);
    assert!(invoice.lines().last().unwrap().ends_with(",total,,,,,,,,,1.0515,usd"), "{invoice}");
    let table = cli(&node, &["usage", "--tenant", ACCOUNT, "--invoice", "this-month"]);
    assert!(table.contains("calls-outbound") && table.contains("1.0515"), "{table}");

    // Another tenant's credentials see nothing of it.
    let r = reqwest::Client::new()
        .get(format!("{}/2010-04-01/Accounts/{ACCOUNT}/Usage/Records.json", node.url()))
        .basic_auth("ACfedcba9876543210fedcba9876543210", Some("whatever-token"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);

    // Restart: the book is rebuilt from the logs and every record is the same.
    let mut node = node;
    node.stop().unwrap();
    let dir = std::mem::replace(&mut node.dir, tempfile::tempdir().unwrap());
    let node = Node::start_in(dir, node.config_path.clone(), &[]).unwrap();
    let total = records(&node, "/ThisMonth", "Category=totalprice").await;
    assert_eq!(micros(&total["usage_records"][0]["price"]), total_before);
    let mut all_after = records(&node, "", "").await;
    let mut all_before = all_before;
    for v in [&mut all_before, &mut all_after] {
        for r in v["usage_records"].as_array_mut().unwrap() {
            r.as_object_mut().unwrap().remove("as_of");
        }
    }
    assert_eq!(all_before["usage_records"], all_after["usage_records"]);
}
