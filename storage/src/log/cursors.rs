//! Durable named cursors (the next offset a stage reads, per topic partition) and small pieces of
//! stage state. Both live in local sled trees (`__cursors`, `__state`; keys in
//! [`super::engine`]); on a cluster node those trees cache the JetStream buckets, which are
//! written by [`Log::sync`] and loaded by [`Log::refresh`].

use super::backend::Backend;
use super::engine::{cursor_key, state_key};
use super::{Log, StorageError};

impl Log {
    /// Reloads cursor `name` and the state of stage `name` from the cluster's buckets (a node
    /// taking over another node's work calls this first). Nothing to do on sled.
    pub async fn refresh(&self, name: &str) -> Result<(), StorageError> {
        self.inner.backend.refresh(self, name).await
    }

    /// Caches a cursor loaded from the bucket (`{name}.{topic}.{partition}`) in the local tree.
    pub(super) fn cache_cursor(&self, kv_key: &str, value: &[u8]) -> Result<(), StorageError> {
        let mut parts = kv_key.rsplitn(3, '.');
        let (Some(p), Some(topic), Some(name)) = (parts.next(), parts.next(), parts.next()) else {
            return Ok(());
        };
        let Ok(p) = p.parse::<u32>() else { return Ok(()) };
        if value.len() == 8 && self.topic(topic).is_ok() {
            self.engine()?.cursors.insert(cursor_key(name, topic, p), value)?;
        }
        Ok(())
    }

    /// Caches a piece of stage state loaded from the bucket (`{stage}.{hex key}`) locally.
    pub(super) fn cache_state(&self, kv_key: &str, value: &[u8]) -> Result<(), StorageError> {
        let Some((stage, hex)) = kv_key.split_once('.') else { return Ok(()) };
        let key: Option<Vec<u8>> =
            (0..hex.len() / 2).map(|i| u8::from_str_radix(hex.get(2 * i..2 * i + 2)?, 16).ok()).collect();
        if let Some(key) = key {
            self.engine()?.state.insert(state_key(stage, &key), value)?;
        }
        Ok(())
    }

    /// The committed position of cursor `name` on every partition of `topic` (0 when new).
    pub fn cursor(&self, name: &str, topic: &str) -> Result<Vec<u64>, StorageError> {
        let (_, t) = self.topic(topic)?;
        (0..t.spec.partitions)
            .map(|p| {
                let key = cursor_key(name, topic, p);
                if let Some(v) = self.held_cursor(&key) {
                    return Ok(u64::from_be_bytes(v));
                }
                Ok(match self.engine()?.cursors.get(key)? {
                    Some(v) => v.as_ref().try_into().map(u64::from_be_bytes).unwrap_or(0),
                    None => 0,
                })
            })
            .collect()
    }

    /// Durably records that cursor `name` will next read `offset` of `topic`/`partition`.
    pub async fn commit_cursor(
        &self,
        name: &str,
        topic: &str,
        partition: u32,
        offset: u64,
    ) -> Result<(), StorageError> {
        self.store_cursor(name, topic, partition, offset)?;
        self.sync().await
    }

    /// Records a cursor position without waiting for the disk (a later [`Log::sync`] or append
    /// makes it durable). Stages use this to batch cursor commits with their own appends.
    pub fn store_cursor(&self, name: &str, topic: &str, partition: u32, offset: u64) -> Result<(), StorageError> {
        let (_, t) = self.topic(topic)?;
        if partition >= t.spec.partitions {
            return Err(StorageError::NoPartition {
                topic: topic.to_owned(),
                partition,
                partitions: t.spec.partitions,
            });
        }
        self.inner.backend.store_cursor(self, name, topic, partition, offset)
    }

    /// Stores a small piece of a stage's state (made durable by the next flush, like
    /// [`Log::store_cursor`]). Keys are namespaced by `stage`.
    pub fn put_state(&self, stage: &str, key: &[u8], value: &[u8]) -> Result<(), StorageError> {
        self.inner.backend.store_state(self, stage, key, Some(value))
    }

    /// Reads a piece of stage state.
    pub fn get_state(&self, stage: &str, key: &[u8]) -> Result<Option<Vec<u8>>, StorageError> {
        let k = state_key(stage, key);
        if let Some(v) = self.held_state(&k) {
            return Ok(v);
        }
        Ok(self.engine()?.state.get(k)?.map(|v| v.to_vec()))
    }

    /// Removes a piece of stage state.
    pub fn delete_state(&self, stage: &str, key: &[u8]) -> Result<(), StorageError> {
        self.inner.backend.store_state(self, stage, key, None)
    }
}
