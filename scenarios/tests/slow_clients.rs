//! No connection can pin the node, through the real binary: 2,000 connections that send half a
//! request header and stall are closed at the header deadline while normal calls go on and the
//! node's memory stays bounded; a trickled body gets 408; an idle keep-alive connection is closed;
//! connections over the cap are refused at once; a Media Stream that goes silent is closed.
//! (`cargo run --release -p voxgate-scenarios --bin bench_slow_clients` measures the webhook
//! latency under the same attack against a quiet run.)

use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use voxgate_protocol::{CallSid, StreamSid};
use voxgate_scenarios::bench::{ms, quantile};
use voxgate_scenarios::fixture::{config, replay_json, sim, NUMBER};
use voxgate_scenarios::node::Node;
use voxgate_scenarios::slow::{rss_kib, stall, wait_closed};
use voxgate_scenarios::twilio::Simulator;

const LIMITS: &str = "[stt]\nenabled = false\n[quotas]\nmax_concurrent_calls = 100000\ncalls_per_second = 100000\n[callers]\nmax_calls_per_window = 0\n[fraud]\ndisabled_rules = [\"velocity_from\", \"spend_velocity\", \"short_call_burst\", \"volume_anomaly\"]\n[http]\nheader_read_timeout_ms = 2000\nbody_timeout_ms = 1000\nidle_timeout_secs = 2\nstream_idle_secs = 2\n";

/// `n` calls, one after another: webhook then completed callback; the webhook latencies in ms.
async fn calls(s: &Simulator, first: u128, n: u128) -> Vec<f64> {
    let mut lat = Vec::with_capacity(n as usize);
    for i in first..first + n {
        let call = CallSid::from_u128(i);
        let t = Instant::now();
        let a = s.inbound_call(call, "+14155550123", NUMBER).await.unwrap();
        lat.push(ms(t.elapsed()));
        assert!(a.body.contains("<Stream"), "{}", a.body);
        assert_eq!(s.status_callback(call, "completed", 1, None).await.unwrap(), 204);
    }
    lat
}

fn metric(scrape: &str, line_start: &str) -> f64 {
    scrape
        .lines()
        .find(|l| l.starts_with(line_start))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stalled_connections_are_closed_while_calls_go_on() {
    let node = Node::start(&config(LIMITS)).unwrap();
    let s = sim(&node);
    let pid = node.pid().unwrap();
    let mut quiet = calls(&s, 1, 100).await;
    let rss_before = rss_kib(pid).unwrap();

    let stalled = stall(node.addr, 2000).await.unwrap();
    let mut attacked = calls(&s, 1000, 100).await;
    let rss_during = rss_kib(pid).unwrap();
    println!(
        "webhook p50/p99: quiet {:.2}/{:.2} ms; with 2,000 stalled connections {:.2}/{:.2} ms; RSS {} → {} KiB",
        quantile(&mut quiet, 0.5),
        quantile(&mut quiet, 0.99),
        quantile(&mut attacked, 0.5),
        quantile(&mut attacked, 0.99),
        rss_before,
        rss_during
    );
    // Every stalled connection is closed once its header deadline (2 s) has passed.
    let (closed, last) = wait_closed(stalled, Duration::from_secs(30)).await;
    assert_eq!(closed, 2000, "every stalled connection closed by the node");
    println!("the last stalled connection was closed {:.1} s after the stall began", last.as_secs_f64());
    // 2,000 half-open requests cost the node little memory (a few KiB each).
    assert!(rss_during < rss_before + 100 * 1024, "RSS grew from {rss_before} to {rss_during} KiB");
    let m = node.scrape().await.unwrap();
    let timeouts = metric(&m, "voxgate_http_timeouts_total{phase=\"header\"}")
        + metric(&m, "voxgate_http_timeouts_total{phase=\"idle\"}");
    assert!(timeouts >= 2000.0, "{m}");
    // And the node serves as before.
    calls(&s, 5000, 5).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn trickled_bodies_and_idle_connections_are_closed() {
    // The idle deadline shorter than the header one: the idle watchdog, not hyper's header
    // timer, closes the quiet keep-alive connection.
    let node = Node::start(&config(
        &LIMITS
            .replace("idle_timeout_secs = 2", "idle_timeout_secs = 1")
            .replace("header_read_timeout_ms = 2000", "header_read_timeout_ms = 10000"),
    ))
    .unwrap();
    // A complete header announcing 100 bytes of body, then 10 of them: 408 at the body deadline.
    let mut c = TcpStream::connect(node.addr).await.unwrap();
    c.write_all(
        b"POST /api/voice/twilio/inbound HTTP/1.1\r\nHost: voxgate.test\r\nContent-Type: application/x-www-form-urlencoded\r\nContent-Length: 100\r\n\r\nAccountSid",
    )
    .await
    .unwrap();
    let mut answer = String::new();
    tokio::time::timeout(Duration::from_secs(20), c.read_to_string(&mut answer)).await.unwrap().unwrap();
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains("20408"), "{answer}");

    // A keep-alive connection that made one request and then idles is closed.
    let mut c = TcpStream::connect(node.addr).await.unwrap();
    c.write_all(b"GET /api/voice/health HTTP/1.1\r\nHost: voxgate.test\r\n\r\n").await.unwrap();
    let mut buf = vec![0u8; 64 * 1024];
    let n = c.read(&mut buf).await.unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
    let (closed, _) = wait_closed(vec![c], Duration::from_secs(20)).await;
    assert_eq!(closed, 1, "the idle keep-alive connection was closed");
    let m = node.scrape().await.unwrap();
    assert!(metric(&m, "voxgate_http_refused_total{reason=\"body_timeout\"}") >= 1.0, "{m}");
    assert!(metric(&m, "voxgate_http_timeouts_total{phase=\"idle\"}") >= 1.0, "{m}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_over_the_cap_are_refused_at_once() {
    let node = Node::start(&config(&format!("{LIMITS}max_connections = 20\n"))).unwrap();
    let held = stall(node.addr, 20).await.unwrap();
    // The node holds its maximum: the next connection is accepted and closed without an answer.
    let over = stall(node.addr, 5).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let m = node.scrape().await.unwrap();
        if metric(&m, "voxgate_http_refused_total{reason=\"max_connections\"}") >= 5.0 {
            break;
        }
        assert!(Instant::now() < deadline, "connections over the cap were not refused:\n{m}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let (closed, _) = wait_closed(over, Duration::from_secs(10)).await;
    assert_eq!(closed, 5);
    // Once the held ones reach their deadline, the node takes calls again.
    let (closed, _) = wait_closed(held, Duration::from_secs(30)).await;
    assert_eq!(closed, 20);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Ok((200, _)) = node.get_json("/api/voice/health").await {
            break;
        }
        assert!(Instant::now() < deadline, "the node did not take connections again");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_media_stream_is_closed() {
    let mut node = Node::start(&config(LIMITS)).unwrap();
    let s = sim(&node);
    let call = CallSid::from_u128(0x5e1);
    let a = s.inbound_call(call, "+14155550123", NUMBER).await.unwrap();
    let mut stream = s.connect_stream(a.stream_url.as_deref().unwrap()).await.unwrap();
    stream.start(StreamSid::from_u128(0x5e1), s.account(), call).await.unwrap();
    // Nothing more: Twilio would send a frame every 20 ms.
    let reason = stream.closed(Duration::from_secs(20)).await;
    assert_eq!(reason.as_deref(), Some("idle"));
    assert_eq!(s.status_callback(call, "completed", 2, None).await.unwrap(), 204);
    node.wait_idle(Duration::from_secs(10)).await.unwrap();
    assert!(node.stop().unwrap().success());
    let events = replay_json(&node, call);
    let fault = events.iter().find(|e| e["kind"] == "stream_fault").unwrap_or_else(|| panic!("{events:?}"));
    assert_eq!(fault["fault"], "idle");
    // The call went on: the silent stream counts as dropped (voxgate asks Twilio for a new one).
    assert!(events.iter().any(|e| e["kind"] == "stream_dropped"), "{events:?}");
}
