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
use std::sync::{Arc, Mutex};
use std::time::Instant;

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
    pub(super) async fn sync_local(&self) -> Result<(), StorageError> {
        let (tx, rx) = oneshot::channel();
        self.inner.commits.push(Waiter { topic: None, done: tx })?;
        Self::await_durable(rx).await
    }

    pub(super) async fn await_durable(rx: oneshot::Receiver<Result<(), StorageError>>) -> Result<(), StorageError> {
        rx.await.map_err(|_| StorageError::Closed)?
    }
}

/// Appends waiting for the next flush.
#[derive(Default)]
pub(super) struct CommitQueue {
    state: Mutex<(Vec<Waiter>, bool)>,
    wake: std::sync::Condvar,
}

impl CommitQueue {
    pub(super) fn push(&self, w: Waiter) -> Result<(), StorageError> {
        let mut g = self.state.lock().map_err(|_| StorageError::Closed)?;
        if g.1 {
            return Err(StorageError::Closed);
        }
        g.0.push(w);
        drop(g);
        self.wake.notify_one();
        Ok(())
    }

    pub(super) fn shut_down(&self) {
        if let Ok(mut g) = self.state.lock() {
            g.1 = true;
        }
        self.wake.notify_one();
    }

    /// Blocks until appends are waiting; `None` once shut down and drained.
    pub(super) fn take(&self) -> Option<Vec<Waiter>> {
        let mut g = self.state.lock().ok()?;
        while g.0.is_empty() {
            if g.1 {
                return None;
            }
            g = self.wake.wait(g).ok()?;
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
    while let Some(batch) = queue.take() {
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
        for w in batch {
            let _ = w.done.send(result.clone());
        }
    }
}
