//! The embedded backend: the local sled database is the log of record, on one machine.
//!
//! An append inserts under its partition's lock (so offsets are dense and in order) and waits for
//! the group commit ([`super::committer`]); bulk topics' payloads go to the value files
//! ([`crate::values`]), written under the same lock so a partition's values are in offset order.
//! Cursors and stage state are the `__cursors` and `__state` trees, made durable by the next
//! flush. A stage's writes wait out a write failure while the log reopens itself
//! ([`super::recovery`]); ingress's appends fail at once instead. This node is alone: it owns
//! every work unit, and there is nothing to refresh, spool or purge elsewhere.

use std::path::Path;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{oneshot, watch};

use super::backend::Backend;
use super::committer::Waiter;
use super::engine::{cursor_key, describe, record_key, state_key};
use super::recovery::Held;
use super::{partition_for, Inner, Log, Position, StorageError};
use crate::jetstream::Appended;
use crate::values::Values;

pub(crate) struct SledBackend {
    /// The value files of bulk topics.
    values: Values,
}

/// An error after which a stage's write waits for the log to reopen, then goes again.
fn held_back(e: &StorageError) -> bool {
    matches!(e, StorageError::Flush(_) | StorageError::Unavailable(_))
}

impl SledBackend {
    /// Opens the value files in `dir`.
    pub(super) fn open(dir: &Path) -> Result<Self, StorageError> {
        Ok(Self { values: Values::open(&dir.join("values"))? })
    }

    /// One append, once: its offset when durable.
    async fn append_once(&self, log: &Log, ti: usize, partition: u32, payload: &[u8]) -> Result<u64, StorageError> {
        let (offset, rx) = self.insert(log, ti, partition, payload)?;
        Log::await_durable(rx).await?;
        Ok(offset)
    }

    /// Appends `items` with one flush, once.
    async fn append_many_once(
        &self,
        log: &Log,
        ti: usize,
        partitions: u32,
        items: &[(u64, &[u8])],
        out: &mut Vec<Position>,
    ) -> Result<(), StorageError> {
        out.clear();
        match self.insert_many(log, ti, partitions, items.iter().copied(), Some(out))? {
            Some(rx) => Log::await_durable(rx).await,
            None => Ok(()),
        }
    }

    /// Inserts `items`, each to its key's partition (their positions into `out`); the receiver of
    /// the last one covers them all, since one flush makes every earlier insert durable too.
    fn insert_many<'a>(
        &self,
        log: &Log,
        ti: usize,
        partitions: u32,
        items: impl Iterator<Item = (u64, &'a [u8])>,
        mut out: Option<&mut Vec<Position>>,
    ) -> Result<Option<oneshot::Receiver<Result<(), StorageError>>>, StorageError> {
        let mut last = None;
        for (key, payload) in items {
            let partition = partition_for(key, partitions);
            let (offset, rx) = self.insert(log, ti, partition, payload)?;
            if let Some(out) = out.as_deref_mut() {
                out.push(Position { partition, offset });
            }
            last = Some(rx);
        }
        Ok(last)
    }

    /// Inserts one record under its partition's lock and queues it for the committer: its
    /// offset, and a receiver answered once a flush covers it.
    fn insert(
        &self,
        log: &Log,
        ti: usize,
        partition: u32,
        payload: &[u8],
    ) -> Result<(u64, oneshot::Receiver<Result<(), StorageError>>), StorageError> {
        if log.inner.closed.load(Ordering::Acquire) {
            return Err(StorageError::Closed);
        }
        if let Some(why) = log.write_failure() {
            return Err(StorageError::Unavailable(why));
        }
        let t = &log.inner.topics[ti];
        let part = &t.partitions[partition as usize];
        let now = log.inner.clock.now();
        let bulk = t.spec.bulk.then_some(&self.values);
        let inline = || {
            let mut value = Vec::with_capacity(8 + payload.len());
            value.extend_from_slice(&now.as_micros().to_be_bytes());
            value.extend_from_slice(payload);
            sled::IVec::from(value)
        };
        let (tx, rx) = oneshot::channel();
        let offset = {
            // Engine before partition: the order a reopen takes them in.
            let engine = log.engine()?;
            let mut next = part.next.lock().map_err(|_| StorageError::Closed)?;
            let offset = *next;
            // Under the partition's lock, so a partition's values are in the file in offset order.
            let value = match bulk {
                Some(v) => match v.append(now.as_micros(), payload) {
                    Ok(ptr) => sled::IVec::from(&ptr.encode()[..]),
                    Err(StorageError::Unavailable(why)) => {
                        drop((next, engine));
                        log.inner.fail(why.clone());
                        return Err(StorageError::Unavailable(why));
                    }
                    Err(e) => return Err(e),
                },
                None => inline(),
            };
            if let Err(e) = engine.trees[ti].insert(record_key(partition, offset), value) {
                drop((next, engine));
                let why = describe(&e);
                log.inner.fail(why.clone());
                return Err(StorageError::Unavailable(why));
            }
            *next += 1;
            offset
        };
        log.inner.commits.push(Waiter { topic: Some((ti, partition, offset)), done: tx })?;
        Ok((offset, rx))
    }
}

impl Backend for SledBackend {
    fn describe(&self) -> (&'static str, Option<(String, bool)>) {
        ("sled", None)
    }

    fn values(&self) -> Option<&Values> {
        Some(&self.values)
    }

    async fn append(&self, log: &Log, ti: usize, partition: u32, payload: &[u8]) -> Result<u64, StorageError> {
        // A stage's append waits out a write failure (the log reopens) and goes again.
        loop {
            match self.append_once(log, ti, partition, payload).await {
                Err(e) if held_back(&e) => {
                    if !log.writable().await {
                        return Err(e);
                    }
                }
                r => return r,
            }
        }
    }

    async fn append_many<'a>(
        &self,
        log: &Log,
        ti: usize,
        items: impl IntoIterator<Item = (u64, &'a [u8])>,
    ) -> Result<Vec<Position>, StorageError> {
        let partitions = log.inner.topics[ti].spec.partitions;
        let items: Vec<(u64, &[u8])> = items.into_iter().collect();
        let mut out = Vec::with_capacity(items.len());
        // Like `append`, a stage's batch waits out a write failure and goes again, whole.
        loop {
            match self.append_many_once(log, ti, partitions, &items, &mut out).await {
                Err(e) if held_back(&e) => {
                    if !log.writable().await {
                        return Err(e);
                    }
                }
                r => break r?,
            }
        }
        Ok(out)
    }

    async fn append_or_spool(
        &self,
        log: &Log,
        ti: usize,
        partition: u32,
        payload: &[u8],
    ) -> Result<Appended, StorageError> {
        // Ingress answers Twilio now: a write failure is an error at once, not a wait.
        let started = Instant::now();
        let offset = self.append_once(log, ti, partition, payload).await?;
        log.record_append(ti, started);
        Ok(Appended::Logged(Position { partition, offset }))
    }

    async fn append_many_or_spool<'a>(
        &self,
        log: &Log,
        ti: usize,
        items: impl IntoIterator<Item = (u64, &'a [u8])>,
    ) -> Result<(), StorageError> {
        // As in `append_or_spool`: a write failure is an error at once.
        let started = Instant::now();
        let partitions = log.inner.topics[ti].spec.partitions;
        // Inserted before any wait, so nothing of `items` is held across it.
        if let Some(rx) = self.insert_many(log, ti, partitions, items.into_iter(), None)? {
            Log::await_durable(rx).await?;
        }
        log.record_append(ti, started);
        Ok(())
    }

    async fn sync(&self, log: &Log) -> Result<(), StorageError> {
        // While writes fail, until the log has reopened and everything is on disk.
        loop {
            match log.sync_local().await {
                Err(e) if held_back(&e) => {
                    if !log.writable().await {
                        return Err(e);
                    }
                }
                r => return r,
            }
        }
    }

    fn store_cursor(
        &self,
        log: &Log,
        name: &str,
        topic: &str,
        partition: u32,
        offset: u64,
    ) -> Result<(), StorageError> {
        let key = cursor_key(name, topic, partition);
        let value = offset.to_be_bytes();
        log.write_or_hold(|| Held::Cursor(key.clone(), value), |e| e.cursors.insert(&key, &value).map(|_| ()))
    }

    fn store_state(&self, log: &Log, stage: &str, key: &[u8], value: Option<&[u8]>) -> Result<(), StorageError> {
        let k = state_key(stage, key);
        match value {
            Some(value) => log.write_or_hold(
                || Held::State(k.clone(), Some(value.to_vec())),
                |e| e.state.insert(&k, value).map(|_| ()),
            ),
            None => log.write_or_hold(|| Held::State(k.clone(), None), |e| e.state.remove(&k).map(|_| ())),
        }
    }

    async fn refresh(&self, _log: &Log, _name: &str) -> Result<(), StorageError> {
        // Nothing shares this log's cursors and state.
        Ok(())
    }

    fn claim(&self, _group: &str, units: u32, _node: &str, tx: watch::Sender<Vec<u32>>) {
        tx.send_replace((0..units).collect());
        // Keep the sender alive as long as the receiver: nothing will change.
        tokio::spawn(async move { tx.closed().await });
    }

    fn spooled(&self) -> usize {
        0
    }

    async fn caught_up(
        &self,
        _log: &Log,
        _ti: usize,
        _partition: u32,
        _within: Duration,
    ) -> Result<bool, StorageError> {
        // The local tree is the log of record: a reader sees every durable record.
        Ok(true)
    }

    fn trimmed(&self, _topic: &str, _partition: u32, _tree: &sled::Tree, _head: u64) -> Result<(), StorageError> {
        // The local tree is the log of record: nothing else holds the records.
        Ok(())
    }

    fn write_failed(&self, inner: &Arc<Inner>, reason: String) {
        inner.start_recovery(reason);
    }
}
