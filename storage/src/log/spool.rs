//! The ingress spool of a JetStream node: with `spool` on ([`crate::ClusterOptions::spool`]), an
//! append that cannot reach JetStream is written to the local `__spool` tree (fsynced) and
//! forwarded in order when NATS is back; while anything is spooled, later appends queue behind
//! it, so per-key order holds. Records JetStream took before the outage was noticed are
//! de-duplicated by event id when the spool is forwarded. (Which appends spool is decided by the
//! JetStream backend, [`super::jetstream_backend`]; the sled backend has no spool.)
//!
//! A spooled record is `topic length (u8) ‖ topic ‖ partition (u32 BE) ‖ appended_at ‖ payload`
//! under a sequence number (u64 BE).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use super::{Inner, StorageError};
use crate::jetstream::{js_err, Cluster};

pub(crate) struct Spool {
    tree: sled::Tree,
    /// Held while deciding "spool or publish" and while the forwarder empties the spool.
    gate: Mutex<SpoolGate>,
    wake: Arc<tokio::sync::Notify>,
    active: AtomicBool,
}

struct SpoolGate {
    next: u64,
}

impl Spool {
    /// Opens the spool in the local database; it is active if records wait in it.
    pub(crate) fn open(local: &sled::Db) -> Result<Self, StorageError> {
        let tree = local.open_tree("__spool")?;
        let next = match tree.last()? {
            Some((k, _)) => {
                u64::from_be_bytes(k.as_ref().try_into().map_err(|_| StorageError::CorruptKey("__spool".into()))?) + 1
            }
            None => 0,
        };
        let active = !tree.is_empty();
        Ok(Spool {
            tree,
            gate: Mutex::new(SpoolGate { next }),
            wake: Arc::new(tokio::sync::Notify::new()),
            active: AtomicBool::new(active),
        })
    }

    /// Appends to the local spool; the caller makes it durable (`Log::sync`).
    pub(crate) fn push(&self, topic: &str, partition: u32, value: &[u8]) -> Result<(), StorageError> {
        let mut gate = self.gate.lock().map_err(|_| StorageError::Closed)?;
        let mut v = Vec::with_capacity(1 + topic.len() + 4 + value.len());
        v.push(topic.len() as u8);
        v.extend_from_slice(topic.as_bytes());
        v.extend_from_slice(&partition.to_be_bytes());
        v.extend_from_slice(value);
        self.tree.insert(gate.next.to_be_bytes(), v)?;
        gate.next += 1;
        self.active.store(true, Ordering::Release);
        drop(gate);
        self.wake.notify_one();
        metrics::counter!("voxgate_log_spooled_total", "topic" => topic.to_owned()).increment(1);
        Ok(())
    }

    /// If it is spooling, spools and returns true; else false.
    pub(crate) fn push_if_active(&self, topic: &str, partition: u32, value: &[u8]) -> Result<bool, StorageError> {
        if self.active() {
            self.push(topic, partition, value)?;
            return Ok(true);
        }
        Ok(false)
    }

    /// Whether records wait in the spool (appends queue behind them).
    pub(crate) fn active(&self) -> bool {
        self.active.load(Ordering::Acquire)
    }

    /// Records waiting in the spool.
    pub(crate) fn len(&self) -> usize {
        self.tree.len()
    }

    /// Forwards the spool to `cluster` in order; returns how many records went. Stops at the
    /// first failure.
    async fn forward(&self, cluster: &Cluster) -> Result<usize, StorageError> {
        let mut sent = 0;
        loop {
            let batch: Vec<(sled::IVec, sled::IVec)> = self.tree.iter().take(256).collect::<Result<_, _>>()?;
            if batch.is_empty() {
                // Empty under the gate: appends publish directly again.
                let _gate = self.gate.lock().map_err(|_| StorageError::Closed)?;
                if self.tree.is_empty() {
                    self.active.store(false, Ordering::Release);
                    metrics::gauge!("voxgate_log_spool_records").set(0.0);
                    return Ok(sent);
                }
                continue;
            }
            let mut acks = Vec::with_capacity(batch.len());
            for (k, v) in &batch {
                let (topic, partition, value) =
                    parse_spooled(v).ok_or_else(|| StorageError::CorruptKey("__spool".into()))?;
                let id = voxgate_protocol::peek_event_id(value.get(8..).unwrap_or_default());
                acks.push((
                    k.clone(),
                    cluster.publish_ack(topic, partition, id, bytes::Bytes::copy_from_slice(value)).await?,
                ));
            }
            for (k, ack) in acks {
                tokio::time::timeout(cluster.ack_timeout, ack)
                    .await
                    .map_err(|_| StorageError::JetStream("no ack for a spooled record".into()))?
                    .map_err(js_err)?;
                self.tree.remove(k)?;
                sent += 1;
            }
            metrics::counter!("voxgate_log_spool_forwarded_total").increment(batch.len() as u64);
            metrics::gauge!("voxgate_log_spool_records").set(self.tree.len() as f64);
        }
    }
}

fn parse_spooled(v: &[u8]) -> Option<(&str, u32, &[u8])> {
    let (&n, rest) = v.split_first()?;
    let topic = std::str::from_utf8(rest.get(..n as usize)?).ok()?;
    let rest = &rest[n as usize..];
    let partition = u32::from_be_bytes(rest.get(..4)?.try_into().ok()?);
    Some((topic, partition, &rest[4..]))
}

/// Empties the spool whenever something is in it and NATS takes it. Ends when the log is gone.
pub(crate) async fn forward_spool(inner: Weak<Inner>, cluster: Weak<Cluster>) {
    let mut backoff = Duration::from_millis(100);
    loop {
        let Some(strong) = inner.upgrade() else { return };
        let Some(c) = cluster.upgrade() else { return };
        drop(strong);
        let Some(s) = &c.spool else { return };
        if !s.active() {
            // Woken by a spooled append, or re-check now and then. The wait holds no handle on
            // the database, so a closed log can be opened again at once.
            let wake = s.wake.clone();
            drop(c);
            let _ = tokio::time::timeout(Duration::from_millis(500), wake.notified()).await;
            continue;
        }
        match s.forward(&c).await {
            Ok(n) => {
                if n > 0 {
                    tracing::info!(records = n, "spooled events forwarded to JetStream");
                }
                backoff = Duration::from_millis(100);
            }
            Err(e) => {
                tracing::warn!(error = %e, spooled = s.len(), retry_ms = backoff.as_millis() as u64, "JetStream unreachable; events stay spooled");
                drop(c);
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(2));
            }
        }
    }
}
