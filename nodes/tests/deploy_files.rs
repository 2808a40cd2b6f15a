//! The files in nodes/deploy/ are checked like code: the Prometheus rules with promtool (syntax,
//! then unit tests that make every alert fire from synthetic series and stay quiet otherwise), the
//! Grafana dashboard as JSON whose every query names a metric voxgate exports.

use std::path::Path;
use std::process::Command;

fn deploy() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("deploy")
}

fn promtool(args: &[&str]) -> String {
    let out = Command::new("promtool")
        .args(args)
        .current_dir(deploy().join("prometheus"))
        .output()
        .expect("promtool (Debian package prometheus; .ci/run installs it)");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "promtool {args:?}:\n{text}");
    text
}

#[test]
fn prometheus_rules_check_and_their_unit_tests_pass() {
    let text = promtool(&["check", "rules", "voxgate.rules.yml"]);
    assert!(text.contains("SUCCESS"), "{text}");
    let text = promtool(&["test", "rules", "voxgate.rules.test.yml", "voxgate.volume.test.yml"]);
    assert_eq!(text.matches("SUCCESS").count(), 2, "{text}");
    // Every alert has a test that fires it.
    let rules = std::fs::read_to_string(deploy().join("prometheus/voxgate.rules.yml")).expect("rules");
    let tests = std::fs::read_to_string(deploy().join("prometheus/voxgate.rules.test.yml")).expect("tests")
        + &std::fs::read_to_string(deploy().join("prometheus/voxgate.volume.test.yml")).expect("tests");
    for line in rules.lines().filter_map(|l| l.trim().strip_prefix("- alert: ")) {
        assert!(tests.contains(&format!("alertname: {line}")), "no promtool test for {line}");
    }
}

#[test]
fn grafana_dashboard_is_valid_and_uses_exported_metrics() {
    let text = std::fs::read_to_string(deploy().join("grafana/voxgate.json")).expect("dashboard");
    let v: serde_json::Value = serde_json::from_str(&text).expect("dashboard JSON");
    let panels = v["panels"].as_array().expect("panels");
    assert!(panels.len() >= 8);
    let exported = [
        "twilio_calls_total",
        "twilio_active_calls",
        "twilio_websocket_connections",
        "http_request_duration_seconds",
        "twilio_stt_latency_seconds",
        "twilio_transcoding_errors_total",
        "twilio_websocket_errors_total",
        "twilio_stt_errors_total",
        "voxgate_webhook_rejected_total",
        "voxgate_stage_lag_events",
        "voxgate_stage_lag_seconds",
        "voxgate_log_append_seconds",
        "voxgate_fraud_verdicts_total",
        "voxgate_calls_refused_total",
        "voxgate_rest_throttled_total",
    ];
    for p in panels {
        for t in p["targets"].as_array().expect("targets") {
            let expr = t["expr"].as_str().expect("expr");
            assert!(exported.iter().any(|m| expr.contains(m)), "{} queries no voxgate metric: {expr}", p["title"]);
        }
    }
}
