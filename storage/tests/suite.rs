//! The storage test suite, run unchanged against both backends: the embedded sled log, and NATS
//! JetStream (each test starts its own `nats-server -js` on a free loopback port with a temp
//! store). Then what only a cluster has: de-duplication by event id, a second node sharing the
//! log, and the ingress spool across a NATS outage.

#[path = "../../scenarios/src/nats.rs"]
#[allow(dead_code)]
mod nats;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use nats::Nats;
use voxgate_protocol::{Clock, SystemClock, Timestamp};
use voxgate_storage::{Appended, ClusterOptions, Log, Retention, StorageError, TopicSpec};

/// Where a test's log lives.
struct Harness {
    nats: Option<Nats>,
}

impl Harness {
    fn sled() -> Self {
        Self { nats: None }
    }

    fn jetstream() -> Self {
        Self { nats: Some(Nats::fresh()) }
    }

    async fn open(&self, dir: &Path, specs: &[TopicSpec], clock: Arc<dyn Clock>) -> Result<Log, StorageError> {
        match &self.nats {
            None => Log::open(dir, specs, clock),
            Some(n) => Log::open_cluster(dir, specs, clock, 64 << 20, &ClusterOptions::new(&n.url())).await,
        }
    }
}

macro_rules! suite {
    ($($name:ident),* $(,)?) => {
        mod sled_backend {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name(super::Harness::sled()).await
                }
            )*
        }
        mod jetstream_backend {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $name() {
                    super::$name(super::Harness::jetstream()).await
                }
            )*
        }
    };
}

suite!(
    append_read_cursor_roundtrip,
    partition_count_mismatch_is_refused,
    concurrent_appends_stay_dense,
    retention_by_age_and_count,
    retention_keeps_what_a_stage_has_not_read,
    state_survives_reopen,
    watch_wakes_readers,
    bulk_topics_read_back_and_age_out,
);

fn specs() -> Vec<TopicSpec> {
    vec![TopicSpec::new("t", 3, Retention::default())]
}

async fn append_read_cursor_roundtrip(h: Harness) {
    let dir = tempfile::tempdir().unwrap();
    let log = h.open(dir.path(), &specs(), Arc::new(SystemClock)).await.unwrap();
    let mut positions = Vec::new();
    for i in 0..30u64 {
        positions.push(log.append("t", i, format!("rec{i}").as_bytes()).await.unwrap());
    }
    let mut total = 0;
    for p in 0..3 {
        // A lone writer's log: caught up at once, on either backend.
        assert!(log.caught_up("t", p, Duration::from_secs(5)).await.unwrap());
        let mut out = Vec::new();
        let next = log.read("t", p, 0, 1000, &mut out).unwrap();
        assert_eq!(next, out.len() as u64);
        for (i, r) in out.iter().enumerate() {
            assert_eq!(r.offset, i as u64);
            let at = positions.iter().position(|q| q.partition == p && q.offset == r.offset).unwrap();
            assert_eq!(r.payload(), format!("rec{at}").as_bytes());
        }
        total += out.len();
    }
    assert_eq!(total, 30);
    log.commit_cursor("c", "t", 1, 5).await.unwrap();
    assert_eq!(log.cursor("c", "t").unwrap(), vec![0, 5, 0]);
    assert!(matches!(log.append("nope", 0, b"x").await, Err(StorageError::UnknownTopic(_))));
    log.close().await.unwrap();
    drop(log);
    let log = h.open(dir.path(), &specs(), Arc::new(SystemClock)).await.unwrap();
    assert_eq!(log.cursor("c", "t").unwrap(), vec![0, 5, 0]);
    let p = log.append("t", 0, b"after").await.unwrap();
    let expected = positions.iter().filter(|q| q.partition == p.partition).count() as u64;
    assert_eq!(p.offset, expected);
}

async fn partition_count_mismatch_is_refused(h: Harness) {
    let dir = tempfile::tempdir().unwrap();
    let log = h.open(dir.path(), &specs(), Arc::new(SystemClock)).await.unwrap();
    log.close().await.unwrap();
    drop(log);
    let e = h.open(dir.path(), &[TopicSpec::new("t", 5, Retention::default())], Arc::new(SystemClock)).await;
    assert!(matches!(e, Err(StorageError::PartitionMismatch { on_disk: 3, configured: 5, .. })), "{:?}", e.err());
}

/// Also with group commit gathering appends (a busy node's setting): every append completes,
/// none is lost or stored twice.
async fn concurrent_appends_stay_dense(h: Harness) {
    for gather in [std::time::Duration::ZERO, std::time::Duration::from_millis(2)] {
        let dir = tempfile::tempdir().unwrap();
        let log =
            h.open(dir.path(), &[TopicSpec::new("t", 1, Retention::default())], Arc::new(SystemClock)).await.unwrap();
        log.set_commit_gather(gather);
        // On JetStream the server keeps the first round's records: this round's come after them.
        let mut before = Vec::new();
        let base = log.read("t", 0, 0, usize::MAX, &mut before).unwrap();
        let mut tasks = Vec::new();
        for w in 0..64u64 {
            let log = log.clone();
            tasks.push(tokio::spawn(async move {
                for i in 0..20u64 {
                    log.append("t", 0, &(w * 1000 + i).to_be_bytes()).await.unwrap();
                }
            }));
        }
        for t in tasks {
            t.await.unwrap();
        }
        let mut out = Vec::new();
        log.read("t", 0, base, usize::MAX, &mut out).unwrap();
        assert_eq!(out.len(), 64 * 20, "gathering {gather:?}");
        let mut seen: Vec<u64> = out.iter().map(|r| u64::from_be_bytes(r.payload().try_into().unwrap())).collect();
        seen.sort_unstable();
        seen.dedup();
        assert_eq!(seen.len(), 64 * 20);
        assert!(out.iter().enumerate().all(|(i, r)| r.offset == base + i as u64));
    }
}

struct Fixed(i64);
impl Clock for Fixed {
    fn now(&self) -> Timestamp {
        Timestamp(self.0)
    }
}

async fn retention_by_age_and_count(h: Harness) {
    let dir = tempfile::tempdir().unwrap();
    let specs = vec![
        TopicSpec::new(
            "aged",
            1,
            Retention { max_age: Some(Duration::from_secs(3600)), max_events_per_partition: None },
        ),
        TopicSpec::new("counted", 1, Retention { max_age: None, max_events_per_partition: Some(3) }),
    ];
    let log = h.open(dir.path(), &specs, Arc::new(Fixed(1_000_000))).await.unwrap();
    for i in 0..5u8 {
        log.append("aged", 0, &[i]).await.unwrap();
        log.append("counted", 0, &[i]).await.unwrap();
    }
    let mut out = Vec::new();
    log.read("aged", 0, 0, 10, &mut out).unwrap();
    assert_eq!(out[0].appended_at(), Timestamp(1_000_000), "the injected clock stamps records");
    // at t = 5 s nothing is an hour old
    let r = log.apply_retention(Timestamp(5_000_000)).unwrap();
    assert_eq!(r.removed.get("aged"), None);
    assert_eq!(r.removed.get("counted"), Some(&2));
    assert_eq!(log.first_offset("counted", 0).unwrap(), 2);
    let r = log.apply_retention(Timestamp(3_602_000_000)).unwrap();
    assert_eq!(r.removed.get("aged"), Some(&5));
    out.clear();
    assert_eq!(log.read("aged", 0, 0, 10, &mut out).unwrap(), 0);
    assert!(out.is_empty());
    // offsets keep growing after retention
    assert_eq!(log.append("aged", 0, b"x").await.unwrap().offset, 5);
}

async fn retention_keeps_what_a_stage_has_not_read(h: Harness) {
    let dir = tempfile::tempdir().unwrap();
    let specs = vec![TopicSpec::new(
        "aged",
        2,
        Retention { max_age: Some(Duration::from_secs(60)), max_events_per_partition: Some(1) },
    )];
    let log = h.open(dir.path(), &specs, Arc::new(Fixed(1_000_000))).await.unwrap();
    // A key for each partition.
    let key = |p: u32| (0u64..).find(|k| log.partition_of("aged", *k).unwrap() == p).unwrap();
    for i in 0..6u8 {
        log.append("aged", key(0), &[i]).await.unwrap();
        log.append("aged", key(1), &[i]).await.unwrap();
    }
    // One stage has read partition 0 up to offset 2 and another up to 4; nobody has a cursor on
    // partition 1.
    log.commit_cursor("slow", "aged", 0, 2).await.unwrap();
    log.commit_cursor("fast", "aged", 0, 4).await.unwrap();
    let r = log.apply_retention(Timestamp(3_600_000_000)).unwrap();
    // Partition 0 keeps everything from the slowest stage's position; partition 1 is free.
    assert_eq!(log.first_offset("aged", 0).unwrap(), 2);
    assert_eq!(log.first_offset("aged", 1).unwrap(), 6);
    assert_eq!(r.removed.get("aged"), Some(&8));
    let mut out = Vec::new();
    log.read("aged", 0, 0, 10, &mut out).unwrap();
    assert_eq!(out.iter().map(|r| r.payload()[0]).collect::<Vec<_>>(), vec![2, 3, 4, 5]);
    // The slow stage moves on: the next pass removes what it has now read.
    log.commit_cursor("slow", "aged", 0, 5).await.unwrap();
    log.apply_retention(Timestamp(3_600_000_000)).unwrap();
    assert_eq!(log.first_offset("aged", 0).unwrap(), 4);
}

fn audio(i: u32) -> Vec<u8> {
    (0..800 + i * 37).map(|j| (i * 31 + j) as u8).collect()
}

/// A bulk topic (payloads in value files on sled; inline on JetStream) reads back what was
/// appended, across a reopen, and retention removes its records and, on sled, the value files no
/// record points into.
async fn bulk_topics_read_back_and_age_out(h: Harness) {
    let dir = tempfile::tempdir().unwrap();
    let hour = Some(Duration::from_secs(3600));
    let specs = vec![
        TopicSpec::new("audio", 2, Retention { max_age: hour, max_events_per_partition: None }).bulk(),
        TopicSpec::new("calls", 1, Retention::default()),
    ];
    let log = h.open(dir.path(), &specs, Arc::new(Fixed(1_000_000))).await.unwrap();
    for i in 0..20u32 {
        log.append("audio", u64::from(i % 2), &audio(i)).await.unwrap();
    }
    log.append("calls", 0, b"small").await.unwrap();
    log.close().await.unwrap();
    drop(log);

    let later = 2 * 3_600_000_000;
    let log = h.open(dir.path(), &specs, Arc::new(Fixed(later))).await.unwrap();
    for i in 20..24u32 {
        log.append("audio", u64::from(i % 2), &audio(i)).await.unwrap();
    }
    let mut seen = Vec::new();
    let mut heads = Vec::new();
    for p in 0..2 {
        let mut out = Vec::new();
        heads.push(log.read("audio", p, 0, 100, &mut out).unwrap());
        for r in &out {
            let i = u32::try_from(r.payload().len() - 800).unwrap() / 37;
            assert_eq!(r.payload(), audio(i).as_slice(), "record {p}/{} reads back as appended", r.offset);
            assert_eq!(r.appended_at(), Timestamp(if i < 20 { 1_000_000 } else { later }));
            seen.push(i);
        }
    }
    seen.sort_unstable();
    assert_eq!(seen, (0..24).collect::<Vec<_>>());
    let mut out = Vec::new();
    log.read("calls", 0, 0, 10, &mut out).unwrap();
    assert_eq!(out[0].payload(), b"small");

    let r = log.apply_retention(Timestamp(later)).unwrap();
    assert_eq!(r.removed.get("audio"), Some(&20));
    if h.nats.is_none() {
        assert_eq!(r.value_files_removed, 1, "the first run's value file has no record left");
    }
    let mut left = 0;
    for p in 0..2 {
        let mut out = Vec::new();
        assert_eq!(log.read("audio", p, 0, 100, &mut out).unwrap(), heads[p as usize]);
        assert!(out.iter().all(|r| r.appended_at() == Timestamp(later) && r.payload().len() >= 800 + 20 * 37));
        left += out.len();
    }
    assert_eq!(left, 4);
    let p = log.partition_of("audio", 0).unwrap();
    assert_eq!(log.append("audio", 0, &audio(99)).await.unwrap().offset, heads[p as usize]);
}

async fn state_survives_reopen(h: Harness) {
    let dir = tempfile::tempdir().unwrap();
    let log = h.open(dir.path(), &specs(), Arc::new(SystemClock)).await.unwrap();
    log.put_state("stage", b"\x00\x01key", b"v1").unwrap();
    log.put_state("stage", b"gone", b"v").unwrap();
    log.put_state("other", b"k", b"o").unwrap();
    log.store_cursor("stage", "t", 2, 9).unwrap();
    log.sync().await.unwrap();
    log.delete_state("stage", b"gone").unwrap();
    log.put_state("stage", b"\x00\x01key", b"v2").unwrap();
    log.close().await.unwrap();
    drop(log);
    let log = h.open(dir.path(), &specs(), Arc::new(SystemClock)).await.unwrap();
    assert_eq!(log.get_state("stage", b"\x00\x01key").unwrap().as_deref(), Some(&b"v2"[..]));
    assert_eq!(log.get_state("stage", b"gone").unwrap(), None);
    assert_eq!(log.get_state("other", b"k").unwrap().as_deref(), Some(&b"o"[..]));
    assert_eq!(log.cursor("stage", "t").unwrap(), vec![0, 0, 9]);
}

async fn watch_wakes_readers(h: Harness) {
    let dir = tempfile::tempdir().unwrap();
    let log = h.open(dir.path(), &specs(), Arc::new(SystemClock)).await.unwrap();
    let mut rx = log.watch("t").unwrap();
    rx.borrow_and_update();
    let writer = log.clone();
    tokio::spawn(async move { writer.append("t", 7, b"wake").await.unwrap() });
    tokio::time::timeout(Duration::from_secs(10), rx.changed()).await.unwrap().unwrap();
    let p = log.partition_of("t", 7).unwrap();
    let mut out = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while out.is_empty() {
        log.read("t", p, 0, 10, &mut out).unwrap();
        assert!(tokio::time::Instant::now() < deadline);
        tokio::task::yield_now().await;
    }
    assert_eq!(out[0].payload(), b"wake");
}

// ---- what only the JetStream backend has ----

fn envelope(id: u128) -> Vec<u8> {
    use voxgate_protocol::*;
    encode(&Envelope {
        event_id: EventId(id),
        tenant: AccountSid::from_u128(1),
        call: Some(CallSid::from_u128(id)),
        occurred_at: Timestamp(1),
        payload: Event::CallStatusChanged(voxgate_protocol::event::CallStatusChanged {
            status: voxgate_protocol::event::CallStatus::Ringing,
            source: voxgate_protocol::event::StatusSource::Callback,
            sequence: Some(1),
            duration_secs: None,
        }),
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jetstream_stores_an_event_once_however_often_it_is_sent() {
    let h = Harness::jetstream();
    let dir = tempfile::tempdir().unwrap();
    let log = h.open(dir.path(), &specs(), Arc::new(SystemClock)).await.unwrap();
    let first = log.append("t", 1, &envelope(42)).await.unwrap();
    let again = log.append("t", 1, &envelope(42)).await.unwrap();
    assert_eq!(first, again, "a re-sent event keeps its first position");
    let other = log.append("t", 1, &envelope(43)).await.unwrap();
    assert_eq!(other.offset, first.offset + 1);
    let mut out = Vec::new();
    log.read("t", first.partition, 0, 10, &mut out).unwrap();
    assert_eq!(out.len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jetstream_nodes_share_the_log_cursors_and_state() {
    let h = Harness::jetstream();
    let (a_dir, b_dir) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let a = h.open(a_dir.path(), &specs(), Arc::new(SystemClock)).await.unwrap();
    for i in 0..9u64 {
        a.append("t", i, &envelope(i as u128 + 100)).await.unwrap();
    }
    a.store_cursor("stage", "t", 0, 2).unwrap();
    a.put_state("stage", b"k", b"from-a").unwrap();
    a.sync().await.unwrap();
    // A second node sees what the first wrote, and the first sees the second's appends.
    let b = h.open(b_dir.path(), &specs(), Arc::new(SystemClock)).await.unwrap();
    let count = |log: &Log| (0..3).map(|p| log.durable_head("t", p).unwrap()).sum::<u64>();
    assert_eq!(count(&b), 9);
    assert_eq!(b.cursor("stage", "t").unwrap()[0], 2);
    assert_eq!(b.get_state("stage", b"k").unwrap().as_deref(), Some(&b"from-a"[..]));
    let at = b.append("t", 99, &envelope(999)).await.unwrap();
    // Node a catches up with the log of record: then it reads node b's append.
    assert!(a.caught_up("t", at.partition, Duration::from_secs(10)).await.unwrap(), "node a never caught up");
    assert_eq!(count(&a), 10);
    // Taking over: b moves the cursor on, a refreshes and continues from there.
    b.store_cursor("stage", "t", 0, 7).unwrap();
    b.delete_state("stage", b"k").unwrap();
    b.sync().await.unwrap();
    a.refresh("stage").await.unwrap();
    assert_eq!(a.cursor("stage", "t").unwrap()[0], 7);
    assert_eq!(a.get_state("stage", b"k").unwrap(), None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_jetstream_node_mirrors_only_the_topics_it_reads() {
    let h = Harness::jetstream();
    let url = h.nats.as_ref().unwrap().url();
    let specs = vec![TopicSpec::new("t", 2, Retention::default()), TopicSpec::new("audio", 2, Retention::default())];
    let (a_dir, b_dir) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let mut opts = ClusterOptions::new(&url);
    opts.replicate = Some(vec!["t".to_owned()]);
    let a = Log::open_cluster(a_dir.path(), &specs, Arc::new(SystemClock), 64 << 20, &opts).await.unwrap();
    let b = Log::open_cluster(b_dir.path(), &specs, Arc::new(SystemClock), 64 << 20, &ClusterOptions::new(&url))
        .await
        .unwrap();
    // Node a writes to a topic it does not mirror: JetStream has it, node b reads it, node a's
    // disk does not hold it.
    let at = a.append("audio", 3, &envelope(7)).await.unwrap();
    a.append("t", 3, &envelope(8)).await.unwrap();
    assert!(b.caught_up("audio", at.partition, Duration::from_secs(10)).await.unwrap());
    let mut out = Vec::new();
    b.read("audio", at.partition, at.offset, 10, &mut out).unwrap();
    assert_eq!(voxgate_protocol::peek_event_id(out[0].payload()).unwrap().0, 7);
    assert_eq!((0..2).map(|p| a.durable_head("audio", p).unwrap()).sum::<u64>(), 0);
    assert_eq!((0..2).map(|p| a.durable_head("t", p).unwrap()).sum::<u64>(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jetstream_mirror_follows_the_log_across_a_server_restart() {
    let mut h = Harness::jetstream();
    let (a_dir, b_dir) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let a = h.open(a_dir.path(), &specs(), Arc::new(SystemClock)).await.unwrap();
    let b = h.open(b_dir.path(), &specs(), Arc::new(SystemClock)).await.unwrap();
    let first = b.append("t", 7, &envelope(1)).await.unwrap();
    assert!(a.caught_up("t", first.partition, Duration::from_secs(10)).await.unwrap());
    // The server restarts (its store kept): the mirrors' consumers are gone with it. Node a's
    // mirror makes its consumer again on reconnecting, rather than at the client's 15 s
    // heartbeat, so what node b appends next is readable on node a well before that.
    h.nats.as_mut().unwrap().kill();
    h.nats.as_mut().unwrap().restart();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let second = loop {
        match b.append("t", 7, &envelope(2)).await {
            Ok(at) => break at,
            Err(e) => assert!(tokio::time::Instant::now() < deadline, "node b cannot append after the restart: {e}"),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert!(
        a.caught_up("t", second.partition, Duration::from_secs(8)).await.unwrap(),
        "node a's mirror did not resume after the restart"
    );
    let mut out = Vec::new();
    a.read("t", second.partition, second.offset, 10, &mut out).unwrap();
    assert_eq!(voxgate_protocol::peek_event_id(out[0].payload()).unwrap().0, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jetstream_spool_keeps_appends_through_an_outage_and_forwards_them_in_order() {
    let mut h = Harness::jetstream();
    let url = h.nats.as_ref().unwrap().url();
    let dir = tempfile::tempdir().unwrap();
    let mut opts = ClusterOptions::new(&url);
    opts.spool = true;
    opts.ack_timeout = Duration::from_millis(500);
    let specs = vec![TopicSpec::new("t", 2, Retention::default())];
    let log = Log::open_cluster(dir.path(), &specs, Arc::new(SystemClock), 64 << 20, &opts).await.unwrap();
    let mut id = 0u128;
    for _ in 0..20 {
        id += 1;
        assert!(matches!(log.append_or_spool("t", (id % 2) as u64, &envelope(id)).await.unwrap(), Appended::Logged(_)));
    }
    h.nats.as_mut().unwrap().kill();
    let mut spooled = 0;
    for _ in 0..40 {
        id += 1;
        if log.append_or_spool("t", (id % 2) as u64, &envelope(id)).await.unwrap() == Appended::Spooled {
            spooled += 1;
        }
    }
    assert!(spooled >= 39, "appends during the outage are spooled ({spooled})");
    // What waits in the spool is not in the log of record yet: this node has not caught up.
    assert!(!log.caught_up("t", 0, Duration::from_millis(200)).await.unwrap());
    h.nats.as_mut().unwrap().restart();
    for _ in 0..20 {
        id += 1;
        log.append_or_spool("t", (id % 2) as u64, &envelope(id)).await.unwrap();
    }
    // Caught up: the spool is forwarded and every record is readable here.
    for p in 0..2 {
        assert!(
            log.caught_up("t", p, Duration::from_secs(30)).await.unwrap(),
            "spool not forwarded: {} left",
            log.spooled()
        );
    }
    assert_eq!(log.spooled(), 0);
    // Every event exactly once, and each key's events in the order they were appended.
    for p in 0..2 {
        let mut out = Vec::new();
        log.read("t", p, 0, usize::MAX, &mut out).unwrap();
        let ids: Vec<u128> = out.iter().map(|r| voxgate_protocol::peek_event_id(r.payload()).unwrap().0).collect();
        let mut sorted = ids.clone();
        sorted.sort_unstable();
        assert_eq!(ids, sorted, "partition {p} out of order");
        sorted.dedup();
        assert_eq!(sorted.len(), ids.len(), "partition {p} has duplicates");
    }
    assert_eq!((0..2).map(|p| log.durable_head("t", p).unwrap()).sum::<u64>(), 80);
}

#[tokio::test]
async fn a_data_dir_keeps_its_backend() {
    let nats = Nats::fresh();
    let dir = tempfile::tempdir().unwrap();
    let log = Log::open(dir.path(), &specs(), Arc::new(SystemClock)).unwrap();
    log.append("t", 0, b"x").await.unwrap();
    log.close().await.unwrap();
    drop(log);
    let e = Log::open_cluster(dir.path(), &specs(), Arc::new(SystemClock), 64 << 20, &ClusterOptions::new(&nats.url()))
        .await;
    assert!(matches!(e, Err(StorageError::WrongBackend { .. })), "{:?}", e.err());
}
