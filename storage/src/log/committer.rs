//! Group commit: how a write becomes durable on the local disk.
//!
//! Durability: an append (on the sled backend, [`super::sled_backend`]) inserts under its
//! partition's lock (so offsets are dense and inserted in order), then waits for the committer. The committer takes every waiting append, issues one
//! `flush` (one fsync for all of them: group commit), then advances each partition's durable head
//! and wakes the waiters. Readers see only records below the durable head, so no stage ever acts
//! on an event that a crash could still take back.
//!
//! Bulk topics (audio, speech) keep their payloads in append-only value files beside sled, and
//! the tree a 29-byte pointer to each ([`crate::values`]): sled rewrites whole leaf pages, which
//! for kilobyte records wrote every byte several times. The committer syncs the value files
//! before each flush.
//!
//! A JetStream node's appends are durable once JetStream acknowledges them; its committer flushes
//! the local trees (the spool, the cursor and state cache) when [`Log::sync`] asks.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::oneshot;

use super::backend::Backend;
use super::engine::{describe, Engine, VALUES_SYNCED};
use super::{Inner, Log, StorageError};
use crate::values::Mark;

pub(super) struct Waiter {
    pub(super) topic: Option<(usize, u32, u64)>,
    pub(super) done: oneshot::Sender<Result<(), StorageError>>,
}

impl Inner {
    /// Syncs the value files, records how far, and flushes sled: one group commit. `recorded` is
    /// the mark the last successful flush made durable (the committer's; `None` after a failure):
    /// the mark is written again whenever it moved since.
    pub(super) fn flush(&self, engine: &Engine, recorded: &mut Option<Mark>) -> Result<(), StorageError> {
        let mark = match self.backend.values() {
            Some(values) => {
                let mark = values.sync()?;
                if *recorded != Some(mark) {
                    *recorded = None;
                    engine.meta.insert(VALUES_SYNCED, &mark.encode()).map_err(|e| StorageError::Flush(describe(&e)))?;
                }
                Some(mark)
            }
            None => None,
        };
        engine.db.flush().map_err(|e| StorageError::Flush(describe(&e)))?;
        *recorded = mark;
        Ok(())
    }
}

impl Log {
    /// Group commit's gathering time: while the log is busy (its last flush took more than one
    /// append, or more were waiting), appends that arrive within this long of the last flush's end
    /// wait until then, so a busy log flushes at most once per this time, one fsync for all of
    /// them (fewer fsyncs and wake-ups: less CPU per append, at up to this much more latency). An
    /// append to an idle log, or a lone writer's, is flushed at once. Zero: flush whenever appends
    /// wait.
    pub fn set_commit_gather(&self, gather: Duration) {
        self.inner.commits.gather_us.store(gather.as_micros() as u64, Ordering::Relaxed);
    }

    pub(super) async fn sync_local(&self) -> Result<(), StorageError> {
        let (tx, rx) = oneshot::channel();
        self.inner.commits.push(Waiter { topic: None, done: tx })?;
        Self::await_durable(rx).await
    }

    pub(super) async fn await_durable(rx: oneshot::Receiver<Result<(), StorageError>>) -> Result<(), StorageError> {
        rx.await.map_err(|_| StorageError::Closed)?
    }
}

/// How long a busy log gathers appends into one flush unless set otherwise
/// ([`Log::set_commit_gather`]): not at all. Gathering suits open-loop traffic (requests from
/// outside, which keep coming while a flush waits); writers that each await their append before
/// the next (`bench_log`'s) lose throughput to it.
pub const DEFAULT_COMMIT_GATHER: Duration = Duration::ZERO;

/// Appends waiting for the next flush.
pub(super) struct CommitQueue {
    state: Mutex<(Vec<Waiter>, bool)>,
    wake: std::sync::Condvar,
    /// How long a busy log gathers appends into one flush, µs.
    gather_us: AtomicU64,
}

impl Default for CommitQueue {
    fn default() -> Self {
        Self {
            state: Mutex::default(),
            wake: std::sync::Condvar::new(),
            gather_us: AtomicU64::new(DEFAULT_COMMIT_GATHER.as_micros() as u64),
        }
    }
}

impl CommitQueue {
    pub(super) fn push(&self, w: Waiter) -> Result<(), StorageError> {
        let mut g = self.state.lock().map_err(|_| StorageError::Closed)?;
        if g.1 {
            return Err(StorageError::Closed);
        }
        g.0.push(w);
        // The committer waits for the first append only; later ones join its batch.
        let first = g.0.len() == 1;
        drop(g);
        if first {
            self.wake.notify_one();
        }
        Ok(())
    }

    pub(super) fn shut_down(&self) {
        if let Ok(mut g) = self.state.lock() {
            g.1 = true;
        }
        self.wake.notify_one();
    }

    /// Whether appends are waiting.
    fn waiting(&self) -> bool {
        self.state.lock().is_ok_and(|g| !g.0.is_empty())
    }

    /// Blocks until appends are waiting, then (while the log is busy) until `gather_until`, so
    /// one flush takes what arrives meanwhile; `None` once shut down and drained.
    pub(super) fn take(&self, gather_until: Instant) -> Option<Vec<Waiter>> {
        let mut g = self.state.lock().ok()?;
        while g.0.is_empty() {
            if g.1 {
                return None;
            }
            g = self.wake.wait(g).ok()?;
        }
        loop {
            let now = Instant::now();
            if g.1 || now >= gather_until {
                break;
            }
            g = self.wake.wait_timeout(g, gather_until - now).ok()?.0;
        }
        Some(std::mem::take(&mut g.0))
    }
}

/// The group-commit loop, on its own thread: one flush for every append that arrived while the
/// previous flush ran. It holds the log only while flushing, so dropping the last handle closes
/// the database.
pub(super) fn committer(inner: std::sync::Weak<Inner>, queue: Arc<CommitQueue>) {
    // The value files' mark the last successful flush made durable.
    let mut recorded = None;
    // Appends that come within the gathering time of the last flush's end wait until then, while
    // the log is busy: the last flush took more than one append, or more were waiting when it
    // ended. A lone writer (each append awaited before the next) is never held back.
    let mut gather_until = Instant::now();
    while let Some(batch) = queue.take(gather_until) {
        let Some(strong) = inner.upgrade() else {
            for w in batch {
                let _ = w.done.send(Err(StorageError::Closed));
            }
            return;
        };
        let started = Instant::now();
        // Cursor and state writes this flush covers, kept until it succeeds.
        let covered = match strong.unflushed.lock() {
            Ok(mut u) => std::mem::take(&mut *u),
            Err(_) => HashMap::new(),
        };
        let result = match strong.engine() {
            Ok(engine) => strong.flush(&engine, &mut recorded),
            Err(e) => Err(e),
        };
        if result.is_err() {
            // A reopen may follow: write the mark again on the next good flush.
            recorded = None;
        }
        if let Err(StorageError::Flush(why)) = &result {
            strong.fail(why.clone());
            // They are gone with the failed database: hold them (oldest first) for the reopen.
            if strong.failure.borrow().is_some() {
                if let Ok(mut h) = strong.held.lock() {
                    h.splice(0..0, covered.into_values());
                }
            }
        } else if result.is_err() {
            if let Ok(mut u) = strong.unflushed.lock() {
                for (k, w) in covered {
                    // A newer write of the same key wins.
                    u.entry(k).or_insert(w);
                }
            }
        }
        metrics::histogram!("voxgate_log_flush_seconds").record(started.elapsed().as_secs_f64());
        metrics::histogram!("voxgate_log_group_commit_size").record(batch.len() as f64);
        if result.is_ok() {
            let mut moved = vec![false; strong.topics.len()];
            for w in &batch {
                if let Some((ti, p, offset)) = w.topic {
                    strong.topics[ti].partitions[p as usize].durable.send_if_modified(|d| {
                        if *d <= offset {
                            *d = offset + 1;
                            true
                        } else {
                            false
                        }
                    });
                    moved[ti] = true;
                }
            }
            for (ti, m) in moved.into_iter().enumerate() {
                if m {
                    strong.topics[ti].generation.send_modify(|g| *g += 1);
                }
            }
        } else {
            tracing::error!(error = ?result, "event log flush failed; appends are failing");
        }
        // Let go of the log before waking anyone: a waiter may drop the last handle and reopen.
        drop(strong);
        // Busy: more than one append in this flush, or more arrived while it ran (looked at
        // before the waiters wake, so a lone writer's next append is not taken for another's).
        let now = Instant::now();
        gather_until = if batch.len() > 1 || queue.waiting() {
            now + Duration::from_micros(queue.gather_us.load(Ordering::Relaxed))
        } else {
            now
        };
        for w in batch {
            let _ = w.done.send(result.clone());
        }
    }
}
