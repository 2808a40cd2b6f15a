//! Kill a writer with SIGKILL mid-stream: every acknowledged append and cursor commit survives.
//!
//! The test re-runs its own binary as the child (`crash_child`, active only with the env var),
//! reads the child's acknowledgements from its stdout, kills it, then reopens the log.

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::sync::Arc;

use voxgate_protocol::SystemClock;
use voxgate_storage::{Log, Retention, TopicSpec};

const CHILD_ENV: &str = "VOXGATE_CRASH_CHILD_DIR";

fn specs() -> Vec<TopicSpec> {
    // Bulk: payloads in value files, synced before each flush; truncated after the crash where
    // sled kept a pointer to bytes that were never synced.
    vec![TopicSpec::new("events", 4, Retention::default()).bulk()]
}

fn payload(writer: u64, i: u64) -> Vec<u8> {
    // Variable length, content derived from (writer, i) so corruption is detectable.
    let n = 16 + ((writer * 7 + i) % 200) as usize;
    let mut v = Vec::with_capacity(n + 16);
    v.extend_from_slice(&writer.to_be_bytes());
    v.extend_from_slice(&i.to_be_bytes());
    v.extend((0..n).map(|j| (writer as u8).wrapping_mul(31).wrapping_add(i as u8).wrapping_add(j as u8)));
    v
}

#[test]
fn crash_child() {
    let Ok(dir) = std::env::var(CHILD_ENV) else {
        return;
    };
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    rt.block_on(async move {
        let log = Log::open(std::path::Path::new(&dir), &specs(), Arc::new(SystemClock)).unwrap();
        let out = Arc::new(std::sync::Mutex::new(std::io::stdout()));
        let mut tasks = Vec::new();
        for w in 0..16u64 {
            let log = log.clone();
            let out = out.clone();
            tasks.push(tokio::spawn(async move {
                for i in 0.. {
                    let pos = log.append("events", w, &payload(w, i)).await.unwrap();
                    if i % 10 == 9 {
                        log.commit_cursor(&format!("w{w}"), "events", pos.partition, pos.offset + 1).await.unwrap();
                        let mut o = out.lock().unwrap();
                        writeln!(o, "cursor w{w} {} {}", pos.partition, pos.offset + 1).unwrap();
                    }
                    let mut o = out.lock().unwrap();
                    writeln!(o, "ack {w} {i} {} {}", pos.partition, pos.offset).unwrap();
                    o.flush().unwrap();
                }
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
    });
}

#[test]
fn kill_mid_write_loses_no_acknowledged_event() {
    let dir = tempfile::tempdir().unwrap();
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args(["--exact", "crash_child", "--nocapture", "--test-threads=1"])
        .env(CHILD_ENV, dir.path())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let mut acks: Vec<(u64, u64, u32, u64)> = Vec::new();
    let mut cursors: HashMap<String, (u32, u64)> = HashMap::new();
    for line in BufReader::new(stdout).lines() {
        let line = line.unwrap();
        let f: Vec<&str> = line.split_whitespace().collect();
        match f.first() {
            Some(&"ack") => {
                acks.push((f[1].parse().unwrap(), f[2].parse().unwrap(), f[3].parse().unwrap(), f[4].parse().unwrap()))
            }
            Some(&"cursor") => {
                cursors.insert(f[1].to_owned(), (f[2].parse().unwrap(), f[3].parse().unwrap()));
            }
            _ => {}
        }
        if acks.len() >= 3000 {
            break;
        }
    }
    // SIGKILL: no destructor, no flush, appends in flight.
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(acks.len() >= 3000);

    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async {
        let log = Log::open(dir.path(), &specs(), Arc::new(SystemClock)).unwrap();
        let mut by_pos = HashMap::new();
        for p in 0..4 {
            let mut out = Vec::new();
            log.read("events", p, 0, usize::MAX, &mut out).unwrap();
            for (i, r) in out.iter().enumerate() {
                assert_eq!(r.offset, i as u64, "offsets stay dense after recovery");
                by_pos.insert((p, r.offset), r.payload().to_vec());
            }
        }
        for (w, i, p, off) in &acks {
            let got =
                by_pos.get(&(*p, *off)).unwrap_or_else(|| panic!("acknowledged event w{w}#{i} at {p}/{off} lost"));
            assert_eq!(got, &payload(*w, *i), "event w{w}#{i} corrupted");
        }
        for (name, (p, off)) in &cursors {
            let c = log.cursor(name, "events").unwrap();
            assert!(c[*p as usize] >= *off, "cursor {name} went back: {} < {off}", c[*p as usize]);
        }
        // The log still takes appends after recovery.
        log.append("events", 1, b"after-crash").await.unwrap();
    });
}
