//! Event-log append throughput with group commit at 1, 16 and 256 concurrent writers, against a
//! baseline measured in the same run: the same sled database with one flush per append (what a
//! log without group commit does). Each figure is the median of several runs.
//!
//! `cargo run --release -p voxgate-scenarios --bin bench_log`

use std::sync::Arc;
use std::time::Instant;

use voxgate_protocol::SystemClock;
use voxgate_scenarios::bench::median;
use voxgate_storage::{Log, Retention, TopicSpec};

const PAYLOAD: usize = 200;
const RUNS: usize = 5;

async fn group_commit(writers: usize, per_writer: usize) -> f64 {
    let dir = tempfile::tempdir().unwrap();
    let log =
        Log::open(dir.path(), &[TopicSpec::new("bench", 4, Retention::default())], Arc::new(SystemClock)).unwrap();
    let payload = vec![7u8; PAYLOAD];
    let start = Instant::now();
    let mut tasks = Vec::new();
    for w in 0..writers {
        let log = log.clone();
        let payload = payload.clone();
        tasks.push(tokio::spawn(async move {
            for i in 0..per_writer {
                log.append("bench", (w * 1_000_003 + i) as u64, &payload).await.unwrap();
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let secs = start.elapsed().as_secs_f64();
    log.close().await.unwrap();
    (writers * per_writer) as f64 / secs
}

async fn flush_per_append(writers: usize, per_writer: usize) -> f64 {
    let dir = tempfile::tempdir().unwrap();
    let db = sled::Config::new().path(dir.path()).mode(sled::Mode::HighThroughput).open().unwrap();
    let tree = db.open_tree("bench").unwrap();
    let counter = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let payload = vec![7u8; PAYLOAD];
    let start = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..writers {
        let tree = tree.clone();
        let db = db.clone();
        let counter = counter.clone();
        let payload = payload.clone();
        tasks.push(tokio::task::spawn_blocking(move || {
            for _ in 0..per_writer {
                let k = counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                tree.insert(k.to_be_bytes(), payload.as_slice()).unwrap();
                db.flush().unwrap();
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    (writers * per_writer) as f64 / start.elapsed().as_secs_f64()
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    println!("event log append, {PAYLOAD}-byte events, durable before ack; median of {RUNS} runs");
    println!(
        "{:>8} {:>10} {:>18} {:>22} {:>8}",
        "writers", "events", "group commit ev/s", "flush per append ev/s", "ratio"
    );
    for (writers, total) in [(1usize, 2_000usize), (16, 20_000), (256, 51_200)] {
        let per = total / writers;
        let mut gc = Vec::new();
        let mut base = Vec::new();
        for _ in 0..RUNS {
            gc.push(group_commit(writers, per).await);
            base.push(flush_per_append(writers.min(64), (total / writers.min(64)).min(2_000)).await);
        }
        let (g, b) = (median(&mut gc), median(&mut base));
        println!("{writers:>8} {total:>10} {g:>18.0} {b:>22.0} {:>7.1}×", g / b);
    }
    println!("(baseline: one sled flush per append from min(writers, 64) threads; same disk, same run)");
}
