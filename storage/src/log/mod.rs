//! The event log: topics split into partitions, durable appends, reads from an offset, cursors,
//! stage state and retention, on one machine (sled) or in a cluster (NATS JetStream).
//!
//! This module holds the log's types and its public API. By concern:
//! - `engine`: the local sled database (layout, keys, opening, the backend a data dir holds);
//! - `committer`: group commit, how an append becomes durable on the local disk;
//! - `recovery`: what happens after a write failure (refusing, holding, reopening);
//! - `cursors`: durable named cursors and small stage state;
//! - `retention`: removing records past their topic's retention;
//! - `spool`: a cluster ingress node's appends kept locally while JetStream is unreachable;
//! - `backend`: what differs between the backends, one trait, with the embedded sled log in
//!   `sled_backend` and the JetStream node in `jetstream_backend`. [`Log`] holds one backend and
//!   forwards to it; everything else (the local trees readers read, durable heads, the commit
//!   queue) is shared.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use tokio::sync::watch;
use voxgate_protocol::{Clock, Timestamp};

use crate::jetstream::{Appended, ClusterOptions};
use crate::topics::Retention;
use crate::values::Pointer;

mod backend;
mod committer;
mod cursors;
mod engine;
mod jetstream_backend;
mod recovery;
mod retention;
mod sled_backend;
mod spool;

use backend::{AnyBackend, Backend};
pub use committer::DEFAULT_COMMIT_GATHER;
use committer::{committer, CommitQueue};
pub(crate) use engine::record_key;
use engine::{describe, offset_of, Engine};
use jetstream_backend::JetStreamBackend;
use recovery::Held;
pub use retention::RetentionReport;
use sled_backend::SledBackend;
pub(crate) use spool::Spool;

/// Errors at the storage boundary.
#[derive(Debug, Clone, thiserror::Error)]
pub enum StorageError {
    #[error("storage engine error: {0}")]
    Engine(String),
    #[error("unknown topic {0:?}")]
    UnknownTopic(String),
    #[error("partition {partition} out of range for topic {topic:?} ({partitions} partitions)")]
    NoPartition { topic: String, partition: u32, partitions: u32 },
    #[error("topic {topic:?} was created with {on_disk} partitions but is configured with {configured}")]
    PartitionMismatch { topic: String, on_disk: u32, configured: u32 },
    #[error("data directory {dir} is in use by another voxgate process (sled holds a lock on it)")]
    Locked { dir: String },
    #[error("flush to disk failed: {0}")]
    Flush(String),
    /// Writes fail (the data disk is full, or it failed) until the log has reopened.
    #[error("event log unavailable: {0}")]
    Unavailable(String),
    #[error("the log is shut down")]
    Closed,
    #[error("corrupt record key in topic {0:?}")]
    CorruptKey(String),
    #[error("corrupt log: {0}")]
    Corrupt(String),
    #[error("NATS JetStream: {0}")]
    JetStream(String),
    #[error("data directory {dir} holds a {found} log, not a {wanted} one; use another data directory")]
    WrongBackend { dir: String, found: String, wanted: String },
}

impl From<sled::Error> for StorageError {
    fn from(e: sled::Error) -> Self {
        StorageError::Engine(describe(&e))
    }
}

/// A topic's name, partition count and retention.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopicSpec {
    pub name: String,
    pub partitions: u32,
    pub retention: Retention,
    /// Payloads go to the value files, not into sled's tree (audio; on the sled backend).
    pub bulk: bool,
}

impl TopicSpec {
    pub fn new(name: &str, partitions: u32, retention: Retention) -> Self {
        Self { name: name.to_owned(), partitions: partitions.max(1), retention, bulk: false }
    }

    /// Marks the topic's payloads as bulk (see [`TopicSpec::bulk`]).
    pub fn bulk(mut self) -> Self {
        self.bulk = true;
        self
    }
}

/// Where an appended record landed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Position {
    pub partition: u32,
    pub offset: u64,
}

/// One record read back from the log: `appended_at ‖ payload`. An inline record holds sled's
/// buffer (reading does not copy it); a bulk one the bytes read from its value file.
#[derive(Clone)]
pub struct Record {
    pub partition: u32,
    pub offset: u64,
    value: Stored,
}

#[derive(Clone)]
enum Stored {
    Inline(sled::IVec),
    Bulk(bytes::Bytes),
}

impl Record {
    fn bytes(&self) -> &[u8] {
        match &self.value {
            Stored::Inline(v) => v,
            Stored::Bulk(b) => b,
        }
    }

    /// When the record was appended (the log's clock).
    pub fn appended_at(&self) -> Timestamp {
        let mut b = [0u8; 8];
        b.copy_from_slice(&self.bytes()[..8]);
        Timestamp(i64::from_be_bytes(b))
    }

    /// The record's bytes as appended.
    pub fn payload(&self) -> &[u8] {
        &self.bytes()[8..]
    }
}

impl std::fmt::Debug for Record {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Record")
            .field("partition", &self.partition)
            .field("offset", &self.offset)
            .field("len", &self.payload().len())
            .finish()
    }
}

pub(crate) struct Partition {
    /// Next offset to assign; held while inserting so offsets are dense and in order.
    pub(crate) next: Mutex<u64>,
    /// Next offset not yet durable (records below it are on disk; with JetStream, mirrored).
    pub(crate) durable: watch::Sender<u64>,
}

pub(crate) struct Topic {
    pub(crate) spec: TopicSpec,
    pub(crate) partitions: Vec<Partition>,
    /// Bumped whenever any partition's durable head moves: consumers wait on it.
    pub(crate) generation: watch::Sender<u64>,
}

pub(crate) struct Inner {
    /// `None` only if a reopen failed (everything answers `Unavailable` until one succeeds).
    engine: RwLock<Option<Engine>>,
    dir: PathBuf,
    cache_bytes: u64,
    /// Why writes fail, while they do (`None`: writable).
    failure: watch::Sender<Option<String>>,
    /// Cursor and state writes held while writes fail, in order.
    held: Mutex<Vec<Held>>,
    /// Cursor and state writes made on sled since the committer's last flush began, the latest
    /// per key: if that flush fails they are held too, since the failed database takes them along.
    unflushed: Mutex<HashMap<(bool, Vec<u8>), Held>>,
    /// The node is shutting down: nothing waits for the log to become writable any more.
    closing: watch::Sender<bool>,
    pub(crate) topics: Vec<Topic>,
    by_name: HashMap<String, usize>,
    clock: Arc<dyn Clock>,
    commits: Arc<CommitQueue>,
    closed: AtomicBool,
    /// What the log is backed by: sled on this machine, or a JetStream cluster.
    backend: AnyBackend,
}

impl Drop for Inner {
    fn drop(&mut self) {
        // Let the committer thread see that the log is gone.
        self.commits.shut_down();
    }
}

/// sled's page cache when the caller does not say (`[log] cache_mb`).
pub const DEFAULT_CACHE_BYTES: u64 = 512 * 1024 * 1024;

/// The event log: cheap to clone, shared by every stage of a node.
#[derive(Clone)]
pub struct Log {
    inner: Arc<Inner>,
}

/// Spreads keys over partitions (keys are often already hashes; this also covers small integers).
pub fn partition_for(key: u64, partitions: u32) -> u32 {
    let mut z = key.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^= z >> 31;
    (z % u64::from(partitions.max(1))) as u32
}

impl Log {
    /// Opens (or creates) the log in `dir` with these topics, and starts its commit thread.
    pub fn open(dir: &Path, specs: &[TopicSpec], clock: Arc<dyn Clock>) -> Result<Self, StorageError> {
        Self::open_with_cache(dir, specs, clock, DEFAULT_CACHE_BYTES)
    }

    /// [`Log::open`] with sled's page cache capped at `cache_bytes`. A cache smaller than the
    /// log makes every full read (a stage's rebuild, a replay) go back to the file: on a
    /// 300 MB calls log, 64 MB of cache reads 0.29 M events/s, 1 GB reads 1.1 M/s.
    pub fn open_with_cache(
        dir: &Path,
        specs: &[TopicSpec],
        clock: Arc<dyn Clock>,
        cache_bytes: u64,
    ) -> Result<Self, StorageError> {
        let db = Self::open_db(dir, cache_bytes)?;
        Self::check_backend(&db, dir, "sled")?;
        let backend = AnyBackend::Sled(SledBackend::open(dir)?);
        Self::with_db(db, dir, cache_bytes, specs, clock, backend)
    }

    /// Opens a node's view of the JetStream log at `opts.url`: creates (or checks) the streams
    /// and buckets, mirrors the partitions this node reads into `dir` and waits until the mirror
    /// has caught up with what JetStream held at open, and loads cursors and state. Must run
    /// inside a tokio runtime (the mirrors and the spool forwarder are tasks).
    pub async fn open_cluster(
        dir: &Path,
        specs: &[TopicSpec],
        clock: Arc<dyn Clock>,
        cache_bytes: u64,
        opts: &ClusterOptions,
    ) -> Result<Self, StorageError> {
        JetStreamBackend::open(dir, specs, clock, cache_bytes, opts).await
    }

    /// Which backend holds the log: `("sled", None)` or `("jetstream", Some((url, connected)))`.
    pub fn backend(&self) -> (&'static str, Option<(String, bool)>) {
        self.inner.backend.describe()
    }

    /// The cluster's NATS connection and its subject prefix (`None` on sled): for requests
    /// between nodes beside the log, such as a call's inputs reaching the node that runs its actor.
    pub fn nats(&self) -> Option<(async_nats::Client, String)> {
        match &self.inner.backend {
            AnyBackend::JetStream(j) => Some(j.nats()),
            AnyBackend::Sled(_) => None,
        }
    }

    /// Claims this node's share of `units` work units of `group` (a stage's partitions, or one
    /// unit for a stage that runs once in the cluster). The receiver holds the units this node
    /// owns now, and changes when nodes join, leave or die; dropping it gives the units back. On
    /// sled this node is alone: it owns every unit.
    pub fn claim(&self, group: &str, units: u32, node: &str) -> watch::Receiver<Vec<u32>> {
        let (tx, rx) = watch::channel(Vec::new());
        self.inner.backend.claim(group, units, node, tx);
        rx
    }

    /// Records waiting in the ingress spool for JetStream to come back (0 on sled).
    pub fn spooled(&self) -> usize {
        self.inner.backend.spooled()
    }

    /// Waits, for at most `within`, until this node can read everything the log of record holds
    /// of `partition` of `topic` now: on JetStream, once this node's spool is forwarded and its
    /// mirror has reached the stream's last record; on sled, at once. False if not by then. A
    /// node taking over a partition reads it after this, so what another node (or its own
    /// spool) wrote last is not missed.
    pub async fn caught_up(&self, topic: &str, partition: u32, within: Duration) -> Result<bool, StorageError> {
        let (ti, _) = self.topic(topic)?;
        self.inner.backend.caught_up(self, ti, partition, within).await
    }

    /// The log over the opened database `db` in `dir`, backed by `backend`; starts the commit
    /// thread.
    pub(super) fn with_db(
        db: sled::Db,
        dir: &Path,
        cache_bytes: u64,
        specs: &[TopicSpec],
        clock: Arc<dyn Clock>,
        backend: AnyBackend,
    ) -> Result<Self, StorageError> {
        let (engine, nexts) = Engine::open(db, specs, backend.values().is_some())?;
        let mut topics = Vec::with_capacity(specs.len());
        let mut by_name = HashMap::new();
        for (spec, next) in specs.iter().zip(nexts) {
            let partitions =
                next.into_iter().map(|n| Partition { next: Mutex::new(n), durable: watch::channel(n).0 }).collect();
            by_name.insert(spec.name.clone(), topics.len());
            topics.push(Topic { spec: spec.clone(), partitions, generation: watch::channel(0).0 });
        }
        let inner = Arc::new(Inner {
            engine: RwLock::new(Some(engine)),
            dir: dir.to_path_buf(),
            cache_bytes,
            failure: watch::channel(None).0,
            held: Mutex::new(Vec::new()),
            unflushed: Mutex::new(HashMap::new()),
            closing: watch::channel(false).0,
            topics,
            by_name,
            clock,
            commits: Arc::new(CommitQueue::default()),
            closed: AtomicBool::new(false),
            backend,
        });
        let (weak, queue) = (Arc::downgrade(&inner), inner.commits.clone());
        std::thread::Builder::new()
            .name("voxgate-log-commit".into())
            .spawn(move || committer(weak, queue))
            .map_err(|e| StorageError::Engine(format!("starting the commit thread: {e}")))?;
        metrics::gauge!("voxgate_log_writable").set(1.0);
        Ok(Self { inner })
    }

    /// Bytes available to this process on the file system of the data directory.
    pub fn free_bytes(&self) -> Option<u64> {
        fs2::available_space(&self.inner.dir).ok()
    }

    fn topic(&self, name: &str) -> Result<(usize, &Topic), StorageError> {
        let i = *self.inner.by_name.get(name).ok_or_else(|| StorageError::UnknownTopic(name.to_owned()))?;
        Ok((i, &self.inner.topics[i]))
    }

    /// The topics this log was opened with.
    pub fn specs(&self) -> impl Iterator<Item = &TopicSpec> {
        self.inner.topics.iter().map(|t| &t.spec)
    }

    /// Number of partitions of `topic`.
    pub fn partitions(&self, topic: &str) -> Result<u32, StorageError> {
        Ok(self.topic(topic)?.1.spec.partitions)
    }

    /// The partition a key maps to.
    pub fn partition_of(&self, topic: &str, key: u64) -> Result<u32, StorageError> {
        Ok(partition_for(key, self.topic(topic)?.1.spec.partitions))
    }

    /// Appends one record to the partition `key` maps to; returns once it is on disk.
    pub async fn append(&self, topic: &str, key: u64, payload: &[u8]) -> Result<Position, StorageError> {
        let started = Instant::now();
        let (ti, t) = self.topic(topic)?;
        let partition = partition_for(key, t.spec.partitions);
        let offset = self.inner.backend.append(self, ti, partition, payload).await?;
        self.record_append(ti, started);
        Ok(Position { partition, offset })
    }

    /// Appends several records (each to its key's partition) and waits for one flush for all.
    pub async fn append_many<'a, I>(&self, topic: &str, items: I) -> Result<Vec<Position>, StorageError>
    where
        I: IntoIterator<Item = (u64, &'a [u8])>,
    {
        let started = Instant::now();
        let (ti, _) = self.topic(topic)?;
        let out = self.inner.backend.append_many(self, ti, items).await?;
        self.record_append(ti, started);
        Ok(out)
    }

    /// Appends like [`Log::append`], except that on a JetStream node with a spool an append that
    /// cannot reach JetStream is kept on local disk and forwarded in order later (ingress uses
    /// this: Twilio gets its answer once the event is durable somewhere). On sled it is
    /// [`Log::append`].
    pub async fn append_or_spool(&self, topic: &str, key: u64, payload: &[u8]) -> Result<Appended, StorageError> {
        let (ti, t) = self.topic(topic)?;
        let partition = partition_for(key, t.spec.partitions);
        self.inner.backend.append_or_spool(self, ti, partition, payload).await
    }

    /// [`Log::append_many`] with the spool of [`Log::append_or_spool`]: when JetStream cannot
    /// take the batch, all of it is spooled (records JetStream did take are de-duplicated by
    /// event id when the spool is forwarded).
    pub async fn append_many_or_spool<'a, I>(&self, topic: &str, items: I) -> Result<(), StorageError>
    where
        I: IntoIterator<Item = (u64, &'a [u8])>,
    {
        let (ti, _) = self.topic(topic)?;
        self.inner.backend.append_many_or_spool(self, ti, items).await
    }

    /// Records how long an append to topic `ti` took, from `started`.
    fn record_append(&self, ti: usize, started: Instant) {
        metrics::histogram!("voxgate_log_append_seconds", "topic" => self.inner.topics[ti].spec.name.clone())
            .record(started.elapsed().as_secs_f64());
    }

    /// Waits until the record at `at` of `topic` can be read on this node (on sled, at once after
    /// its append; on JetStream, once the local mirror has it), for at most `within`. False if it
    /// cannot be read by then.
    pub async fn wait_readable(&self, topic: &str, at: Position, within: Duration) -> Result<bool, StorageError> {
        let (ti, _) = self.topic(topic)?;
        Ok(self.readable_within(ti, at, within).await)
    }

    pub(super) async fn readable_within(&self, ti: usize, at: Position, within: Duration) -> bool {
        let Some(part) = self.inner.topics[ti].partitions.get(at.partition as usize) else {
            return false;
        };
        let mut rx = part.durable.subscribe();
        let seen = tokio::time::timeout(within, rx.wait_for(|d| *d > at.offset)).await;
        matches!(seen, Ok(Ok(_)))
    }

    /// Waits until everything written so far (records and cursors) is on disk; while writes
    /// fail, until the log has reopened and that is so.
    pub async fn sync(&self) -> Result<(), StorageError> {
        self.inner.backend.sync(self).await
    }

    /// The first offset not yet durable in a partition (the end of what readers can see).
    pub fn durable_head(&self, topic: &str, partition: u32) -> Result<u64, StorageError> {
        let (_, t) = self.topic(topic)?;
        let p = t.partitions.get(partition as usize).ok_or_else(|| StorageError::NoPartition {
            topic: topic.to_owned(),
            partition,
            partitions: t.spec.partitions,
        })?;
        Ok(*p.durable.borrow())
    }

    /// The oldest offset still kept in a partition (retention moves it forward).
    pub fn first_offset(&self, topic: &str, partition: u32) -> Result<u64, StorageError> {
        let (ti, _) = self.topic(topic)?;
        match self.engine()?.trees[ti].scan_prefix(partition.to_be_bytes()).next() {
            Some(kv) => {
                let (k, _) = kv?;
                offset_of(&k).ok_or_else(|| StorageError::CorruptKey(topic.to_owned()))
            }
            None => self.durable_head(topic, partition),
        }
    }

    /// A receiver that changes whenever new records of `topic` become durable.
    pub fn watch(&self, topic: &str) -> Result<watch::Receiver<u64>, StorageError> {
        Ok(self.topic(topic)?.1.generation.subscribe())
    }

    /// Reads up to `max` durable records of one partition starting at offset `from`, appending them
    /// to `out`. Returns the offset to read next.
    pub fn read(
        &self,
        topic: &str,
        partition: u32,
        from: u64,
        max: usize,
        out: &mut Vec<Record>,
    ) -> Result<u64, StorageError> {
        let head = self.durable_head(topic, partition)?;
        let (ti, _) = self.topic(topic)?;
        let mut next = from;
        if from >= head || max == 0 {
            return Ok(from);
        }
        let engine = match self.engine() {
            Ok(e) => e,
            // A failed reopen: nothing new to read until one succeeds.
            Err(StorageError::Unavailable(_)) => return Ok(from),
            Err(e) => return Err(e),
        };
        for kv in engine.trees[ti].range(record_key(partition, from)..record_key(partition, head)).take(max) {
            let (k, v) = kv?;
            let offset = offset_of(&k).ok_or_else(|| StorageError::CorruptKey(topic.to_owned()))?;
            let value = match Pointer::decode(&v) {
                None if v.len() >= 8 => Stored::Inline(v),
                Some(Ok(ptr)) => {
                    let values = self.inner.backend.values().ok_or_else(|| {
                        StorageError::Corrupt(format!("a record of {topic:?} points into value files this log lacks"))
                    })?;
                    let mut buf = Vec::with_capacity(8 + ptr.len as usize);
                    buf.extend_from_slice(&ptr.appended_at.to_be_bytes());
                    values.read(&ptr, &mut buf)?;
                    Stored::Bulk(bytes::Bytes::from(buf))
                }
                _ => return Err(StorageError::CorruptKey(topic.to_owned())),
            };
            out.push(Record { partition, offset, value });
            next = offset + 1;
        }
        Ok(next)
    }

    /// Calls `f` on every durable record of one partition from offset `from` to the durable head,
    /// reading in batches; stops at `f`'s first error. Returns the offset to read next.
    pub fn scan<E: From<StorageError>>(
        &self,
        topic: &str,
        partition: u32,
        from: u64,
        mut f: impl FnMut(&Record) -> Result<(), E>,
    ) -> Result<u64, E> {
        let mut next = from;
        let mut batch = Vec::with_capacity(1024);
        loop {
            batch.clear();
            let to = self.read(topic, partition, next, 1024, &mut batch)?;
            if batch.is_empty() {
                return Ok(next);
            }
            for r in &batch {
                f(r)?;
            }
            next = to;
        }
    }

    /// Bytes the log occupies on disk.
    pub fn size_on_disk(&self) -> Result<u64, StorageError> {
        let values = self.inner.backend.values().map_or(0, |v| v.size_on_disk());
        Ok(self.engine()?.db.size_on_disk()? + values)
    }

    /// Flushes and stops accepting appends.
    pub async fn close(&self) -> Result<(), StorageError> {
        // A log whose writes fail has nothing more it can make durable.
        let r = match self.write_failure() {
            Some(why) => Err(StorageError::Unavailable(why)),
            None => self.sync().await,
        };
        self.inner.closed.store(true, Ordering::Release);
        r
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // The API's behaviour is tested against both backends in tests/suite.rs.

    #[test]
    fn partitioning_spreads_keys() {
        let mut counts = [0u32; 4];
        for k in 0..4000u64 {
            counts[partition_for(k, 4) as usize] += 1;
        }
        assert!(counts.iter().all(|&c| c > 800), "{counts:?}");
    }

    /// Stages spawn their appends on tokio's multi-threaded runtime: the backend dispatch (static,
    /// through `AnyBackend`) must keep every write future `Send`.
    #[test]
    fn write_futures_are_send() {
        fn send<T: Send>(_: T) {}
        let dir = tempfile::tempdir().unwrap();
        let specs = vec![TopicSpec::new("t", 2, Retention::default())];
        let log = Log::open(dir.path(), &specs, Arc::new(voxgate_protocol::SystemClock)).unwrap();
        let payload = [1u8; 4];
        // Built, never polled.
        send(log.append("t", 1, &payload));
        send(log.append_many("t", [(1, &payload[..]), (2, &payload[..])]));
        send(log.append_or_spool("t", 1, &payload));
        send(log.append_many_or_spool("t", [(1, &payload[..])]));
        send(log.sync());
        send(log.commit_cursor("c", "t", 0, 1));
        send(log.refresh("c"));
        send(log.close());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_pointer_to_bytes_never_synced_is_dropped_at_open() {
        let dir = tempfile::tempdir().unwrap();
        let specs = vec![TopicSpec::new("audio", 1, Retention::default()).bulk()];
        let clock: Arc<dyn Clock> = Arc::new(voxgate_protocol::SystemClock);
        let log = Log::open(dir.path(), &specs, clock.clone()).unwrap();
        for i in 0..3u8 {
            log.append("audio", 0, &[i; 100]).await.unwrap();
        }
        {
            // What sled's own background flush can do: a pointer on disk whose bytes were never
            // synced (nor acknowledged).
            let engine = log.engine().unwrap();
            let ptr = log.inner.backend.values().unwrap().append(0, &[9; 100]).unwrap();
            engine.trees[0].insert(record_key(0, 3), &ptr.encode()[..]).unwrap();
            engine.db.flush().unwrap();
        }
        drop(log);
        let log = Log::open(dir.path(), &specs, clock).unwrap();
        let mut out = Vec::new();
        assert_eq!(log.read("audio", 0, 0, 10, &mut out).unwrap(), 3);
        assert_eq!(out.iter().map(|r| r.payload()[0]).collect::<Vec<_>>(), vec![0, 1, 2]);
        assert_eq!(log.append("audio", 0, b"next").await.unwrap().offset, 3, "offsets stay dense");
    }
}
