//! The data directory's disk fills up under a running `voxgate serve` (a 48 MB tmpfs, filled to
//! the last byte by another writer while a call streams). Webhooks are answered with a clear
//! Twilio-style failure and nothing is recorded for them; health says why. When space returns the
//! log reopens by itself: calls are taken again, the call that streamed through it closes out, the
//! stages catch up. After a restart every acknowledged event is there once, and usage agrees.
//!
//! Mounting the tmpfs needs root (CI runs as root); the test fails, saying so, without it.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use voxgate_protocol::{CallSid, StreamSid};
use voxgate_scenarios::fixture::{calls_usage, config, replay_json, sim, NUMBER};
use voxgate_scenarios::load::counter;
use voxgate_scenarios::node::Node;
use voxgate_scenarios::twilio::Pace;

const OPEN: &str = "[stt]\nenabled = false\n[callers]\nmax_calls_per_window = 0\n[fraud]\ndisabled_rules = [\"velocity_from\", \"short_call_burst\"]\n";

/// A tmpfs mounted for the test's life.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(at: &Path, size_mb: u32) -> Tmpfs {
        std::fs::create_dir_all(at).unwrap();
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size_mb}m"), "tmpfs"])
            .arg(at)
            .output()
            .expect("run mount");
        assert!(
            out.status.success(),
            "this test mounts a small tmpfs as the data disk and needs root: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Tmpfs(at.to_path_buf())
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// Writes 1 MB blocks to `path` until the disk refuses one; returns the bytes written.
fn fill(path: &Path) -> u64 {
    let mut f = std::fs::File::create(path).unwrap();
    let block = vec![0xa5u8; 1 << 20];
    let mut written = 0u64;
    loop {
        match f.write(&block) {
            Ok(0) => break,
            Ok(n) => written += n as u64,
            Err(e) if e.raw_os_error() == Some(28) => break,
            Err(e) => panic!("filling the disk: {e}"),
        }
    }
    // The last partial page too.
    let _ = f.write_all(&block[..4096]);
    let _ = f.sync_all();
    written
}

fn call(i: u128) -> CallSid {
    CallSid::from_u128(0xD15C_0000 + i)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_data_disk_refuses_calls_clearly_and_recovers_when_space_returns() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let _disk = Tmpfs::mount(&data, 48);
    let config_path = dir.path().join("voxgate.toml");
    std::fs::write(&config_path, config(OPEN)).unwrap();
    let mut node = Node::start_in(dir, config_path.clone(), &[]).unwrap();
    let s = sim(&node);

    // Before: a whole call, and one that stays on, streaming in real time through what follows.
    s.call(call(0), "+14155550101", NUMBER, &[0x30u8; 8000], Pace::Faster(10)).await.unwrap();
    let a = s.inbound_call(call(1), "+14155550102", NUMBER).await.unwrap();
    let mut ws = s.connect_stream(&a.stream_url.unwrap()).await.unwrap();
    let sid = StreamSid::from_u128(0x5151);
    ws.start(sid, s.account(), call(1)).await.unwrap();
    let streaming = tokio::spawn(async move {
        let frame = [0x30u8; 160];
        let mut tick = tokio::time::interval(Duration::from_millis(20));
        let mut sent = 0u64;
        // 12 s of audio: before, during and after the disk is full.
        for k in 0..600u64 {
            tick.tick().await;
            if ws.send_frame(sid, k, &frame).await.is_err() {
                break;
            }
            sent += 1;
        }
        (ws, sent)
    });
    // The stream is flowing: the node has taken half a second of it.
    let deadline = Instant::now() + Duration::from_secs(30);
    while counter(&node.scrape().await.unwrap(), "twilio_audio_chunks_received_total") < 25.0 {
        assert!(Instant::now() < deadline, "the stream's frames never reached the node");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }

    // Another writer takes the disk's last byte.
    let filler = data.join("filler");
    let filled = fill(&filler);
    println!("filled {} MB", filled >> 20);

    // Webhooks now: each is either recorded (and answered with TwiML) or refused with a clear
    // error; at least one is refused, and none is answered without its event.
    let mut acknowledged = vec![call(0), call(1)];
    let mut refused = Vec::new();
    for i in 2..40 {
        let a = s.inbound_call(call(i), "+14155550103", NUMBER).await.unwrap();
        match a.status {
            200 => {
                assert!(a.stream_url.is_some(), "{}", a.body);
                acknowledged.push(call(i));
            }
            503 => {
                let v: serde_json::Value = serde_json::from_str(&a.body).expect("a JSON error");
                assert_eq!(v["code"], 20503, "{v}");
                let msg = v["message"].as_str().unwrap();
                assert!(msg.contains("unavailable") || msg.contains("space"), "{msg}");
                refused.push(call(i));
            }
            other => panic!("webhook answered {other}: {}", a.body),
        }
        if refused.len() >= 3 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(!refused.is_empty(), "no webhook was refused with the disk full");
    let (code, health) = node.get_json("/api/voice/health").await.unwrap();
    assert_eq!(code, 503, "{health}");
    assert_eq!(health["log"]["writable"], false, "{health}");
    println!("while full: {}", health["log"]["write_failure"]);
    let scrape = node.scrape().await.unwrap();
    assert!(counter(&scrape, "voxgate_ingress_log_failures_total") >= 1.0);
    assert_eq!(counter(&scrape, "voxgate_log_writable"), 0.0);

    // Space returns: the log reopens by itself and calls are taken again.
    std::fs::remove_file(&filler).unwrap();
    let back = Instant::now();
    let mut i = 100;
    loop {
        let a = s.inbound_call(call(i), "+14155550104", NUMBER).await.unwrap();
        if a.status == 200 {
            acknowledged.push(call(i));
            break;
        }
        assert_eq!(a.status, 503, "{}", a.body);
        assert!(back.elapsed() < Duration::from_secs(60), "the log did not reopen after space returned");
        i += 1;
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    println!("taking calls again {} ms after space returned", back.elapsed().as_millis());
    // Calls placed by webhook alone are closed below; this one is whole (it closes itself).
    let open_calls = acknowledged[2..].to_vec();
    s.call(call(200), "+14155550105", NUMBER, &[0x30u8; 8000], Pace::Faster(10)).await.unwrap();
    acknowledged.push(call(200));

    // The call that streamed through it all ends; Twilio retries its callback until it is taken.
    let (mut ws, sent) = streaming.await.unwrap();
    assert_eq!(sent, 600, "the stream was cut");
    ws.stop(sid, s.account(), call(1)).await.unwrap();
    ws.close().await;
    let mut code = 0;
    for _ in 0..50 {
        code = s.status_callback(call(1), "completed", 2, Some(13)).await.unwrap();
        if code / 100 == 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(code / 100, 2);
    for c in &open_calls {
        assert_eq!(s.status_callback(*c, "completed", 2, Some(1)).await.unwrap() / 100, 2);
    }
    // The stages went on from where they stood.
    node.wait_idle(Duration::from_secs(60)).await.unwrap();
    let (code, health) = node.get_json("/api/voice/health").await.unwrap();
    assert_eq!(code, 200, "{health}");
    let usage = calls_usage(&node).await;
    assert!(node.stop().unwrap().success());

    // Nothing acknowledged is missing, nothing is there twice, and refused calls never started.
    for c in &acknowledged {
        let events = replay_json(&node, *c);
        let received = events.iter().filter(|e| e["kind"] == "call_received").count();
        assert_eq!(received, 1, "call {c}: {events:?}");
        let completed: std::collections::HashSet<&str> = events
            .iter()
            .filter(|e| e["kind"] == "call_status_changed" && e["status"] == "completed")
            .map(|e| e["event_id"].as_str().unwrap())
            .collect();
        assert_eq!(completed.len(), 1, "call {c}: {events:?}");
        let ids: Vec<&str> = events.iter().map(|e| e["event_id"].as_str().unwrap()).collect();
        let distinct: std::collections::HashSet<&&str> = ids.iter().collect();
        assert_eq!(ids.len(), distinct.len(), "call {c} has an event twice: {events:?}");
    }
    for c in &refused {
        let events = replay_json(&node, *c);
        assert!(!events.iter().any(|e| e["kind"] == "call_status_changed"), "refused call {c} went on: {events:?}");
    }
    // The call that streamed through: its audio is all accounted for, kept or shed.
    let events = replay_json(&node, call(1));
    let kept: u64 = events.iter().filter(|e| e["kind"] == "media_batch").map(|e| e["frames"].as_u64().unwrap()).sum();
    let shed: u64 = events.iter().filter(|e| e["kind"] == "audio_shed").map(|e| e["frames"].as_u64().unwrap()).sum();
    println!("streaming call: {kept} frames kept, {shed} shed");
    assert_eq!(kept + shed, 600, "{events:?}");

    // A restart reads the same log and rebuilds the same usage.
    let dir = std::mem::replace(&mut node.dir, tempfile::tempdir().unwrap());
    let mut node = Node::start_in(dir, config_path, &[]).unwrap();
    assert_eq!(calls_usage(&node).await, usage);
    assert_eq!(usage["count"], acknowledged.len().to_string(), "{usage}");
    assert!(node.stop().unwrap().success());
}
