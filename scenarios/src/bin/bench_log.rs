//! Event-log append throughput with group commit at 1, 16 and 256 concurrent writers, against a
//! baseline measured in the same run: the same sled database with one flush per append (what a
//! log without group commit does). Then audio-sized records (1 KB media batches, 64 KB speech
//! segments) on a bulk topic (payloads in value files) against the same records inline in sled's
//! tree. Each figure is the median of several runs.
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
    appends(writers, per_writer, PAYLOAD, false).await
}

/// Appends/s of `size`-byte records from `writers` tasks, on a bulk topic or inline.
async fn appends(writers: usize, per_writer: usize, size: usize, bulk: bool) -> f64 {
    let dir = tempfile::tempdir().unwrap();
    let spec = TopicSpec::new("bench", 4, Retention::default());
    let spec = if bulk { spec.bulk() } else { spec };
    let log = Log::open(dir.path(), &[spec], Arc::new(SystemClock)).unwrap();
    let payload = vec![7u8; size];
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
    println!();
    println!("audio records, 256 writers, group commit; median of {RUNS} runs");
    println!("{:>8} {:>10} {:>18} {:>18} {:>8}", "bytes", "events", "value files ev/s", "inline ev/s", "ratio");
    for (size, total) in [(1_000usize, 51_200usize), (64_000, 5_120)] {
        let (mut bulk, mut inline) = (Vec::new(), Vec::new());
        for _ in 0..RUNS {
            bulk.push(appends(256, total / 256, size, true).await);
            inline.push(appends(256, total / 256, size, false).await);
        }
        let (b, i) = (median(&mut bulk), median(&mut inline));
        println!("{size:>8} {total:>10} {b:>18.0} {i:>18.0} {:>7.1}×", b / i);
    }
    println!("(baseline: the same records inline in sled's tree; same disk, same run)");
}
