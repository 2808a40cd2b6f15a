//! Write failures (the data disk full, an I/O error): sled marks itself failed after one, for
//! good. The log then refuses ingress appends at once ([`StorageError::Unavailable`]), holds the
//! stages' appends, cursors and state until it is writable again, and a recovery thread reopens
//! the database once the disk has room: sled recovers what reached the disk, each partition's
//! next offset is read back from it, and writes go on. Nothing acknowledged is lost, because an
//! append is acknowledged only after its flush succeeded.
//!
//! A cluster node's local mirror does not reopen itself: JetStream is its log of record.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use super::backend::Backend;
use super::engine::{describe, Engine};
use super::{Inner, Log, StorageError, TopicSpec};

/// A cursor or state write made while the log could not write; applied when it reopens.
pub(super) enum Held {
    Cursor(Vec<u8>, [u8; 8]),
    State(Vec<u8>, Option<Vec<u8>>),
}

impl Held {
    /// Which value it writes: cursor or state, and the key.
    pub(super) fn key(&self) -> (bool, Vec<u8>) {
        match self {
            Held::Cursor(k, _) => (true, k.clone()),
            Held::State(k, _) => (false, k.clone()),
        }
    }
}

/// Free space the data disk needs before a failed log tries to reopen.
pub(super) const REOPEN_FREE_BYTES: u64 = 4 * 1024 * 1024;

impl Inner {
    /// A local write failed: the backend decides what follows (on sled, [`Inner::start_recovery`];
    /// a cluster node's local mirror reports its errors as before).
    pub(super) fn fail(self: &Arc<Self>, reason: String) {
        self.backend.write_failed(self, reason);
    }

    /// Writes failed: refuse new ones and start reopening once the disk has room. Only the
    /// first failure counts.
    pub(super) fn start_recovery(self: &Arc<Self>, reason: String) {
        let first = self.failure.send_if_modified(|f| {
            if f.is_some() {
                return false;
            }
            *f = Some(reason.clone());
            true
        });
        if !first {
            return;
        }
        metrics::counter!("voxgate_log_write_failures_total").increment(1);
        metrics::gauge!("voxgate_log_writable").set(0.0);
        tracing::error!(dir = %self.dir.display(), error = %reason, "event log writes failed; new events are refused until the data disk takes writes again");
        let weak = Arc::downgrade(self);
        let spawned = std::thread::Builder::new().name("voxgate-log-recover".into()).spawn(move || recover(weak));
        if let Err(e) = spawned {
            tracing::error!(error = %e, "cannot start the log's recovery thread; restart the node once the disk has room");
        }
    }

    /// Closes the failed database and opens it again: sled recovers what reached the disk, each
    /// partition goes on from the last record on it, and the cursor and state writes held
    /// meanwhile are applied. Every other use of the log waits for the write lock.
    pub(super) fn reopen(&self) -> Result<(), StorageError> {
        let specs: Vec<TopicSpec> = self.topics.iter().map(|t| t.spec.clone()).collect();
        let mut g = self.engine.write().map_err(|_| StorageError::Closed)?;
        // sled holds a lock on its directory: the failed database goes first. Its I/O threads may
        // let go of the directory a moment later, which `open_db` waits for; any other error goes
        // back to the recovery thread, which tries again.
        drop(g.take());
        let (engine, nexts) = Log::open_db(&self.dir, self.cache_bytes)
            .and_then(|db| Engine::open(db, &specs, self.backend.values().is_some()))?;
        for (t, next) in self.topics.iter().zip(nexts) {
            for (p, (part, n)) in t.partitions.iter().zip(next).enumerate() {
                let mut at = part.next.lock().map_err(|_| StorageError::Closed)?;
                let durable = *part.durable.borrow();
                if n < durable {
                    // Never hand out an offset a reader has passed.
                    tracing::error!(topic = %t.spec.name, partition = p, durable, on_disk = n, "records acknowledged as durable are missing after the reopen");
                }
                // Records inserted but never flushed are gone; the offsets go on from the disk.
                let n = n.max(durable);
                *at = n;
                part.durable.send_replace(n);
            }
            t.generation.send_modify(|g| *g += 1);
        }
        let mut held = self.held.lock().map_err(|_| StorageError::Closed)?;
        // Writes the failed database took along (older), then those held since (newer).
        let lost = std::mem::take(&mut *self.unflushed.lock().map_err(|_| StorageError::Closed)?);
        for w in lost.into_values().chain(held.drain(..)) {
            match w {
                Held::Cursor(k, v) => {
                    engine.cursors.insert(k, &v)?;
                }
                Held::State(k, Some(v)) => {
                    engine.state.insert(k, v)?;
                }
                Held::State(k, None) => {
                    engine.state.remove(k)?;
                }
            }
        }
        if let Some(v) = self.backend.values() {
            // Nothing more goes after bytes whose sync may have failed.
            v.roll()?;
        }
        engine.db.flush()?;
        *g = Some(engine);
        drop(g);
        self.failure.send_replace(None);
        drop(held);
        metrics::counter!("voxgate_log_reopens_total").increment(1);
        metrics::gauge!("voxgate_log_writable").set(1.0);
        tracing::info!(dir = %self.dir.display(), "event log reopened; writes go on");
        Ok(())
    }
}

/// The recovery thread: waits until the data disk has room, then reopens the log.
pub(super) fn recover(inner: std::sync::Weak<Inner>) {
    let mut wait = Duration::from_millis(200);
    loop {
        std::thread::sleep(wait);
        wait = (wait * 2).min(Duration::from_secs(2));
        let Some(strong) = inner.upgrade() else { return };
        if strong.closed.load(Ordering::Acquire) {
            return;
        }
        let free = fs2::available_space(&strong.dir).unwrap_or(0);
        if free < REOPEN_FREE_BYTES {
            continue;
        }
        match strong.reopen() {
            Ok(()) => return,
            Err(e) => {
                tracing::warn!(dir = %strong.dir.display(), error = %e, "reopening the event log failed; trying again")
            }
        }
    }
}

impl Log {
    /// Why writes fail, while they do.
    pub fn write_failure(&self) -> Option<String> {
        self.inner.failure.borrow().clone()
    }

    /// Waits until the log can write again; false if the node shuts down first.
    pub(super) async fn writable(&self) -> bool {
        let mut failure = self.inner.failure.subscribe();
        let mut closing = self.inner.closing.subscribe();
        tokio::select! {
            r = failure.wait_for(|f| f.is_none()) => r.is_ok(),
            _ = closing.wait_for(|c| *c) => self.inner.failure.borrow().is_none(),
        }
    }

    /// The node is shutting down: appends and syncs stop waiting for a failed log to reopen and
    /// return its error instead.
    pub fn begin_close(&self) {
        self.inner.closing.send_replace(true);
    }

    /// Holds a cursor or state write made while writes fail; true if it was held.
    pub(super) fn hold(&self, w: impl FnOnce() -> Held) -> bool {
        // Checked under the lock the reopen holds while it applies what was held.
        let Ok(mut h) = self.inner.held.lock() else { return false };
        if self.inner.failure.borrow().is_none() {
            return false;
        }
        h.push(w());
        true
    }

    /// The sled backend's cursor or state write: to sled, or held while writes fail. A sled error
    /// starts the failure (and the write is held). Until the committer's next flush covers it, it
    /// is also kept in `unflushed`, in case that flush fails.
    pub(super) fn write_or_hold(
        &self,
        held: impl Fn() -> Held,
        write: impl FnOnce(&Engine) -> Result<(), sled::Error>,
    ) -> Result<(), StorageError> {
        if self.hold(&held) {
            return Ok(());
        }
        let r = write(&*self.engine()?);
        match r {
            Ok(()) => {
                if let Ok(mut u) = self.inner.unflushed.lock() {
                    let w = held();
                    u.insert(w.key(), w);
                }
                Ok(())
            }
            Err(e) => {
                self.inner.fail(describe(&e));
                if self.hold(&held) {
                    return Ok(());
                }
                Err(e.into())
            }
        }
    }

    /// A held write for `key`, newest first: `Some(None)` if it deletes.
    pub(super) fn held_state(&self, key: &[u8]) -> Option<Option<Vec<u8>>> {
        let h = self.inner.held.lock().ok()?;
        h.iter().rev().find_map(|w| match w {
            Held::State(k, v) if k == key => Some(v.clone()),
            _ => None,
        })
    }

    pub(super) fn held_cursor(&self, key: &[u8]) -> Option<[u8; 8]> {
        let h = self.inner.held.lock().ok()?;
        h.iter().rev().find_map(|w| match w {
            Held::Cursor(k, v) if k == key => Some(*v),
            _ => None,
        })
    }
}
