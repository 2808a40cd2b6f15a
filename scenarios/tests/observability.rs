//! Operating voxgate: after one end-to-end call with speech, /metrics moved by exactly what
//! happened, /api/voice/health reports every stage, the model, the log and its free disk, JSON log
//! lines carry the call and tenant, and no secret ever reaches the logs.

use std::time::Duration;

use voxgate_protocol::CallSid;
use voxgate_scenarios::fixture::{config, replay_json, sim, ACCOUNT, NUMBER, TOKEN};
use voxgate_scenarios::node::Node;
use voxgate_scenarios::speech::{script, Voice};
use voxgate_scenarios::twilio::Pace;

const ADMIN: &str = "admin-7d1c0b9e8f6a5d4c3b2a1f0e";

/// The value of the sample `name{labels}` (labels as rendered, in order); `None` when absent, so
/// a metric that was never exported fails the assertions instead of reading as 0.
fn sample(metrics: &str, series: &str) -> Option<f64> {
    metrics
        .lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|l| l.strip_prefix(series).and_then(|rest| rest.strip_prefix(' ')))
        .and_then(|v| v.trim().parse().ok())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_health_and_logs_tell_the_truth() {
    let mut node = Node::start(&config(&format!("admin_token = \"{ADMIN}\"\nlog_format = \"json\"\n"))).unwrap();
    let work = tempfile::tempdir().unwrap();
    let v = Voice::Flite("slt".into());
    let s =
        script(&[("Good morning, I am calling about my bill.", v.clone()), ("Thank you.", v)], 500, 1200, work.path())
            .unwrap();
    let call = CallSid::from_u128(0x0b5e);
    let report = sim(&node).call(call, "+14155550123", NUMBER, &s.mulaw, Pace::Faster(2)).await.unwrap();
    let chunks = report.frames_sent;
    // Secrets travel on the API too: the tenant's and the operator's.
    let client = reqwest::Client::new();
    let r = client
        .get(format!("{}/2010-04-01/Accounts/{ACCOUNT}.json", node.url()))
        .basic_auth(ACCOUNT, Some(TOKEN))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let r = client
        .get(format!("{}/2010-04-01/Accounts.json", node.url()))
        .basic_auth("admin", Some(ADMIN))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let r = client
        .get(format!("{}/2010-04-01/Accounts.json", node.url()))
        .basic_auth(ACCOUNT, Some("wrong-token-wrong-token"))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);

    node.wait_idle(Duration::from_secs(60)).await.unwrap();
    let (code, health) = node.get_json("/api/voice/health").await.unwrap();
    assert_eq!(code, 200, "{health}");
    for stage in ["transcode", "stt", "fraud", "billing"] {
        assert_eq!(health["stages"][stage]["state"], "running", "{health}");
        assert_eq!(health["stages"][stage]["lag_events"], 0, "{health}");
    }
    assert!(health["stt_model"].as_str().is_some_and(|m| m.contains("whisper")), "{health}");
    assert_eq!(health["log"]["backend"], "sled");
    assert!(health["log"]["free_bytes"].as_u64().is_some_and(|b| b > 0), "{health}");

    let metrics = node.scrape().await.unwrap();
    node.stop().unwrap();
    let events = replay_json(&node, call);
    let transcripts = events.iter().filter(|e| e["kind"] == "transcript").count();
    assert!(transcripts >= 2, "one transcript per utterance at least: {transcripts}");

    // The counters moved by exactly what happened: one call, N chunks, M transcripts, one completion.
    assert_eq!(sample(&metrics, "twilio_calls_total{status=\"accepted\",from_country=\"US\"}"), Some(1.0), "{metrics}");
    assert_eq!(
        sample(&metrics, "twilio_calls_total{status=\"completed\",from_country=\"all\"}"),
        Some(1.0),
        "{metrics}"
    );
    assert_eq!(sample(&metrics, "twilio_audio_chunks_received_total"), Some(chunks as f64), "{metrics}");
    assert_eq!(sample(&metrics, "voxgate_transcripts_total"), Some(transcripts as f64), "{metrics}");
    // Each utterance's end went to the transcoder in a batch handed over at once, not when full.
    assert!(
        sample(&metrics, "voxgate_media_batches_early_total").is_some_and(|n| n >= transcripts as f64),
        "{metrics}"
    );
    assert_eq!(sample(&metrics, "twilio_active_calls"), Some(0.0), "{metrics}");
    assert_eq!(sample(&metrics, "twilio_websocket_connections"), Some(0.0), "{metrics}");
    assert_eq!(sample(&metrics, "voxgate_rest_auth_failures_total"), Some(1.0), "{metrics}");
    assert!(metrics.contains("twilio_stt_latency_seconds_bucket"), "STT latency is a histogram");
    for stage in ["transcode", "stt", "fraud", "billing"] {
        assert_eq!(sample(&metrics, &format!("voxgate_stage_lag_events{{stage=\"{stage}\"}}")), Some(0.0), "{metrics}");
        assert_eq!(
            sample(&metrics, &format!("voxgate_stage_lag_seconds{{stage=\"{stage}\"}}")),
            Some(0.0),
            "{metrics}"
        );
    }
    assert!(metrics.contains("http_request_duration_seconds_bucket{endpoint=\"inbound\""));

    // Logs: JSON lines; those about the call name it and its tenant; no secret anywhere.
    let logs = node.logs();
    let mut about_call = 0;
    for line in logs.lines().filter(|l| !l.trim().is_empty()) {
        let v: serde_json::Value = serde_json::from_str(line).unwrap_or_else(|e| panic!("not JSON ({e}): {line}"));
        let fields = &v["fields"];
        if line.contains(&call.to_string()) {
            about_call += 1;
            assert_eq!(fields["call_sid"], call.to_string(), "{line}");
            assert_eq!(fields["tenant"], ACCOUNT, "{line}");
            assert!(fields["stage"].as_str().is_some_and(|s| !s.is_empty()), "no stage: {line}");
        }
    }
    assert!(about_call >= 2, "log lines about the call: {about_call}\n{logs}");
    for secret in [TOKEN, ADMIN, "wrong-token-wrong-token"] {
        assert!(!logs.contains(secret), "a secret in the logs");
    }
}
