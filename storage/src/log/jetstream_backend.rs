//! The JetStream backend's side of the log: JetStream is the log of record and the node's local
//! sled trees mirror it (the server side, streams, buckets, mirrors and claims, is
//! [`crate::jetstream`]).
//!
//! An append is published with its event id as `Nats-Msg-Id` (so a re-sent event is stored once)
//! and is durable once JetStream acknowledges it; the append then waits briefly for this node's
//! mirror to show it, so a node reads its own writes. Cursors and stage state are written to the
//! local trees (a cache) and marked for their key-value buckets, which [`Log::sync`] and the next
//! append write out. Ingress appends may spool ([`super::spool`]). A write failure of the local
//! mirror is reported as it happens; the mirror does not reopen itself.

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::watch;
use voxgate_protocol::Clock;

use super::backend::{AnyBackend, Backend};
use super::engine::{cursor_key, offset_of, state_key};
use super::spool::forward_spool;
use super::{partition_for, Inner, Log, Position, StorageError, TopicSpec};
use crate::jetstream::{cursor_kv_key, state_kv_key, Appended, Bucket, Cluster, ClusterOptions};
use crate::values::Values;

pub(crate) struct JetStreamBackend {
    cluster: Arc<Cluster>,
}

impl JetStreamBackend {
    /// Opens a node's view of the JetStream log ([`Log::open_cluster`]).
    pub(super) async fn open(
        dir: &Path,
        specs: &[TopicSpec],
        clock: Arc<dyn Clock>,
        cache_bytes: u64,
        opts: &ClusterOptions,
    ) -> Result<Log, StorageError> {
        let db = Log::open_db(dir, cache_bytes)?;
        Log::check_backend(&db, dir, "jetstream")?;
        let c = Arc::new(Cluster::connect(opts, specs, &db).await?);
        let backend = AnyBackend::JetStream(JetStreamBackend { cluster: c.clone() });
        let log = Log::with_db(db, dir, cache_bytes, specs, clock, backend)?;
        // Mirror what this node reads, from where its local copy ends.
        let mut heads = Vec::new();
        for (ti, t) in log.inner.topics.iter().enumerate() {
            if !c.replicated[ti] {
                continue;
            }
            for p in 0..t.spec.partitions {
                let (_, last) = c.bounds(&t.spec.name, p).await?;
                let part = &t.partitions[p as usize];
                if *part.durable.borrow() > last {
                    // The server's stream is younger than this copy (a new NATS store): start over.
                    let engine = log.engine()?;
                    let tree = &engine.trees[ti];
                    let mut batch = sled::Batch::default();
                    for kv in tree.scan_prefix(p.to_be_bytes()) {
                        batch.remove(kv?.0);
                    }
                    tree.apply_batch(batch)?;
                    drop(engine);
                    part.durable.send_replace(0);
                    *part.next.lock().map_err(|_| StorageError::Closed)? = 0;
                    tracing::warn!(topic = %t.spec.name, partition = p, "local mirror was ahead of JetStream; rebuilt from the server");
                }
                tokio::spawn(crate::jetstream::mirror(Arc::downgrade(&log.inner), Arc::downgrade(&c), ti, p));
                heads.push((ti, p, last));
            }
        }
        for (ti, p, last) in heads {
            let mut rx = log.inner.topics[ti].partitions[p as usize].durable.subscribe();
            let caught_up = tokio::time::timeout(Duration::from_secs(120), rx.wait_for(|d| *d >= last)).await;
            if !matches!(caught_up, Ok(Ok(_))) {
                return Err(StorageError::JetStream(format!(
                    "mirroring {} partition {p} did not reach offset {last} within 120 s",
                    log.inner.topics[ti].spec.name
                )));
            }
        }
        // The buckets are the truth for cursors and state; the local trees are their cache.
        for (k, v) in c.load(Bucket::Cursors, "").await? {
            log.cache_cursor(&k, &v)?;
        }
        for (k, v) in c.load(Bucket::State, "").await? {
            log.cache_state(&k, &v)?;
        }
        tokio::spawn(forward_spool(Arc::downgrade(&log.inner), Arc::downgrade(&c)));
        Ok(log)
    }

    /// The topic's name, as JetStream's subjects and metrics know it.
    fn topic(log: &Log, ti: usize) -> &str {
        &log.inner.topics[ti].spec.name
    }

    /// `appended_at ‖ payload`, the stored form of a record (shared, so a spool fallback keeps a
    /// reference rather than a copy).
    fn stamp(log: &Log, payload: &[u8]) -> bytes::Bytes {
        let mut value = Vec::with_capacity(8 + payload.len());
        value.extend_from_slice(&log.inner.clock.now().as_micros().to_be_bytes());
        value.extend_from_slice(payload);
        value.into()
    }

    /// The NATS connection and subject prefix ([`Log::nats`]).
    pub(crate) fn nats(&self) -> (async_nats::Client, String) {
        self.cluster.nats()
    }

    /// After JetStream acked: wait (briefly) until this node's mirror shows the records, so a
    /// node reads its own writes, and write out cursors stored since the last append (as a sled
    /// flush would).
    async fn after_publish(&self, log: &Log, ti: usize, at: &[Position]) -> Result<(), StorageError> {
        let c = &self.cluster;
        if c.replicated[ti] {
            for pos in at {
                if !log.readable_within(ti, *pos, Duration::from_secs(2)).await {
                    // Acked by JetStream, so durable; the mirror will show it when it catches up.
                    break;
                }
            }
        }
        if c.has_dirty() {
            c.flush().await?;
        }
        Ok(())
    }
}

impl Backend for JetStreamBackend {
    fn describe(&self) -> (&'static str, Option<(String, bool)>) {
        ("jetstream", Some((self.cluster.url.clone(), self.cluster.connected())))
    }

    fn values(&self) -> Option<&Values> {
        // The local trees mirror JetStream inline.
        None
    }

    async fn append(&self, log: &Log, ti: usize, partition: u32, payload: &[u8]) -> Result<u64, StorageError> {
        let offset = self.cluster.publish(Self::topic(log, ti), partition, Self::stamp(log, payload)).await?;
        self.after_publish(log, ti, &[Position { partition, offset }]).await?;
        Ok(offset)
    }

    async fn append_many<'a>(
        &self,
        log: &Log,
        ti: usize,
        items: impl IntoIterator<Item = (u64, &'a [u8])>,
    ) -> Result<Vec<Position>, StorageError> {
        let partitions = log.inner.topics[ti].spec.partitions;
        let items: Vec<(u32, bytes::Bytes)> = items
            .into_iter()
            .map(|(key, payload)| (partition_for(key, partitions), Self::stamp(log, payload)))
            .collect();
        let out = self.cluster.publish_many(Self::topic(log, ti), items).await?;
        self.after_publish(log, ti, &out).await?;
        Ok(out)
    }

    async fn append_or_spool(
        &self,
        log: &Log,
        ti: usize,
        partition: u32,
        payload: &[u8],
    ) -> Result<Appended, StorageError> {
        let c = &self.cluster;
        let topic = Self::topic(log, ti);
        let value = Self::stamp(log, payload);
        if let Some(s) = &c.spool {
            if s.push_if_active(topic, partition, &value)? {
                log.sync_local().await?;
                return Ok(Appended::Spooled);
            }
        }
        match (c.publish(topic, partition, value.clone()).await, &c.spool) {
            (Ok(offset), _) => {
                let at = Position { partition, offset };
                // A failing cursor flush must not turn a logged event into an error here.
                if let Err(e) = self.after_publish(log, ti, &[at]).await {
                    tracing::warn!(error = %e, "cursor flush after append failed; retried on the next sync");
                }
                Ok(Appended::Logged(at))
            }
            (Err(StorageError::JetStream(reason)), Some(s)) => {
                tracing::warn!(topic, %reason, "JetStream unreachable; spooling to the local log");
                s.push(topic, partition, &value)?;
                log.sync_local().await?;
                Ok(Appended::Spooled)
            }
            (Err(e), _) => Err(e),
        }
    }

    async fn append_many_or_spool<'a>(
        &self,
        log: &Log,
        ti: usize,
        items: impl IntoIterator<Item = (u64, &'a [u8])>,
    ) -> Result<(), StorageError> {
        let c = &self.cluster;
        let Some(spool) = &c.spool else {
            let started = Instant::now();
            self.append_many(log, ti, items).await?;
            log.record_append(ti, started);
            return Ok(());
        };
        let topic = Self::topic(log, ti);
        let parts = log.inner.topics[ti].spec.partitions;
        let stamped: Vec<(u32, bytes::Bytes)> =
            items.into_iter().map(|(key, payload)| (partition_for(key, parts), Self::stamp(log, payload))).collect();
        if !spool.active() {
            match c.publish_many(topic, stamped.clone()).await {
                Ok(at) => {
                    if let Err(e) = self.after_publish(log, ti, &at).await {
                        tracing::warn!(error = %e, "cursor flush after append failed; retried on the next sync");
                    }
                    return Ok(());
                }
                Err(StorageError::JetStream(reason)) => {
                    tracing::warn!(topic, %reason, "JetStream unreachable; spooling to the local log");
                }
                Err(e) => return Err(e),
            }
        }
        for (partition, value) in &stamped {
            spool.push(topic, *partition, value)?;
        }
        log.sync_local().await
    }

    async fn sync(&self, log: &Log) -> Result<(), StorageError> {
        // The local trees (the spool, the cursor and state cache), then the buckets.
        log.sync_local().await?;
        self.cluster.flush().await
    }

    fn store_cursor(
        &self,
        log: &Log,
        name: &str,
        topic: &str,
        partition: u32,
        offset: u64,
    ) -> Result<(), StorageError> {
        log.engine()?.cursors.insert(cursor_key(name, topic, partition), &offset.to_be_bytes())?;
        self.cluster.mark(Bucket::Cursors, cursor_kv_key(name, topic, partition), Some(offset.to_be_bytes().to_vec()));
        Ok(())
    }

    fn store_state(&self, log: &Log, stage: &str, key: &[u8], value: Option<&[u8]>) -> Result<(), StorageError> {
        let k = state_key(stage, key);
        match value {
            Some(v) => {
                log.engine()?.state.insert(k, v)?;
            }
            None => {
                log.engine()?.state.remove(k)?;
            }
        }
        self.cluster.mark(Bucket::State, state_kv_key(stage, key), value.map(<[u8]>::to_vec));
        Ok(())
    }

    async fn refresh(&self, log: &Log, name: &str) -> Result<(), StorageError> {
        let c = &self.cluster;
        self.sync(log).await?;
        let prefix = format!("{name}.");
        for (k, v) in c.load(Bucket::Cursors, &prefix).await? {
            log.cache_cursor(&k, &v)?;
        }
        // State keys no longer in the bucket were deleted by the other node.
        let fresh = c.load(Bucket::State, &prefix).await?;
        let mut stale = Vec::new();
        {
            let engine = log.engine()?;
            for kv in engine.state.scan_prefix(state_key(name, b"")) {
                stale.push(kv?.0);
            }
            for k in stale {
                engine.state.remove(k)?;
            }
        }
        for (k, v) in fresh {
            log.cache_state(&k, &v)?;
        }
        Ok(())
    }

    fn claim(&self, group: &str, units: u32, node: &str, tx: watch::Sender<Vec<u32>>) {
        tokio::spawn(crate::jetstream::claim(self.cluster.clone(), group.to_owned(), units, node.to_owned(), tx));
    }

    fn spooled(&self) -> usize {
        self.cluster.spool.as_ref().map_or(0, |s| s.len())
    }

    async fn caught_up(&self, log: &Log, ti: usize, partition: u32, within: Duration) -> Result<bool, StorageError> {
        let until = tokio::time::Instant::now() + within;
        // What this node spooled belongs before anything it reads now: forwarded first (the
        // spool is drained in order by its forwarder, which has no signal to wait on).
        while self.spooled() > 0 {
            if tokio::time::Instant::now() >= until {
                return Ok(false);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        if !self.cluster.replicated[ti] {
            // Not mirrored here: this node does not read the topic.
            return Ok(true);
        }
        let Ok(bounds) = tokio::time::timeout_at(until, self.cluster.bounds(Self::topic(log, ti), partition)).await
        else {
            return Ok(false);
        };
        let (_, last) = bounds?;
        if last == 0 {
            return Ok(true);
        }
        // The stream's last record (sequence `last`) is the local offset `last - 1`.
        let within = until.saturating_duration_since(tokio::time::Instant::now());
        Ok(log.readable_within(ti, Position { partition, offset: last - 1 }, within).await)
    }

    fn trimmed(&self, topic: &str, partition: u32, tree: &sled::Tree, head: u64) -> Result<(), StorageError> {
        let first = tree.scan_prefix(partition.to_be_bytes()).next().transpose()?.and_then(|(k, _)| offset_of(&k));
        self.cluster.purge_below(topic, partition, first.unwrap_or(head));
        Ok(())
    }

    fn write_failed(&self, _inner: &Arc<Inner>, _reason: String) {
        // JetStream is the log of record: a failing local mirror reports its errors as they
        // happen and does not reopen itself.
    }
}
