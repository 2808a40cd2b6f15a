//! The local sled database under the log: its trees, their keys, and opening it.
//!
//! Layout: one sled tree per topic. A record's key is `partition (u32 BE) ‖ offset (u64 BE)`, so a
//! range scan reads one partition in order; its value is `appended_at (i64 BE µs) ‖ payload`.
//! Cursors live in the `__cursors` tree under `name ‖ 0 ‖ topic ‖ 0 ‖ partition (u32 BE)` with
//! the next offset to read (u64 BE); stages keep small state in `__state` under `stage ‖ 0 ‖ key`.
//! Topic shapes live in `__meta`, so reopening a data dir with
//! another partition count fails loudly instead of scattering keys. `__meta` also names the
//! backend a data directory holds, so a sled log is never opened as a cluster mirror or back.

use std::path::Path;
use std::sync::RwLockReadGuard;
use std::time::Duration;

use super::{Inner, Log, StorageError, TopicSpec};
use crate::values::{Mark, Pointer};

/// In `__meta`: how far the value files were synced at the last good flush ([`Mark`]).
pub(super) const VALUES_SYNCED: &str = "values/synced";

/// sled's error in words an operator acts on.
pub(super) fn describe(e: &sled::Error) -> String {
    match e {
        sled::Error::Io(io) if io.kind() == std::io::ErrorKind::StorageFull => {
            format!("the data disk is full ({io})")
        }
        sled::Error::Io(io) => format!("I/O error: {io}"),
        other => other.to_string(),
    }
}

/// sled's handles, replaced together when the database is reopened after a write failure.
pub(crate) struct Engine {
    pub(crate) db: sled::Db,
    pub(crate) meta: sled::Tree,
    /// One per topic, in the order of `Inner::topics`.
    pub(crate) trees: Vec<sled::Tree>,
    pub(crate) cursors: sled::Tree,
    pub(crate) state: sled::Tree,
}

impl Engine {
    /// Opens the trees of `specs` on `db` (checking their partition counts), drops the records
    /// whose values were never synced (with value files), and reads each partition's next offset
    /// off the disk.
    pub(super) fn open(db: sled::Db, specs: &[TopicSpec], values: bool) -> Result<(Self, Vec<Vec<u64>>), StorageError> {
        let meta = db.open_tree("__meta")?;
        let cursors = db.open_tree("__cursors")?;
        let state = db.open_tree("__state")?;
        let mut trees = Vec::with_capacity(specs.len());
        let mut nexts = Vec::with_capacity(specs.len());
        // How far the value files were synced at the last good flush, read once for all topics.
        let synced = if values { Some(meta.get(VALUES_SYNCED)?.and_then(|v| Mark::decode(&v))) } else { None };
        for spec in specs {
            let meta_key = format!("partitions/{}", spec.name);
            match meta.get(&meta_key)? {
                Some(v) => {
                    let on_disk = v
                        .as_ref()
                        .try_into()
                        .map(u32::from_be_bytes)
                        .map_err(|_| StorageError::CorruptKey(spec.name.clone()))?;
                    if on_disk != spec.partitions {
                        return Err(StorageError::PartitionMismatch {
                            topic: spec.name.clone(),
                            on_disk,
                            configured: spec.partitions,
                        });
                    }
                }
                None => {
                    meta.insert(&meta_key, &spec.partitions.to_be_bytes())?;
                }
            }
            let tree = db.open_tree(format!("topic/{}", spec.name))?;
            if let Some(synced) = synced {
                truncate_unsynced(&tree, spec, synced)?;
            }
            let mut next = Vec::with_capacity(spec.partitions as usize);
            for p in 0..spec.partitions {
                next.push(match tree.scan_prefix(p.to_be_bytes()).next_back() {
                    Some(kv) => {
                        let (k, _) = kv?;
                        offset_of(&k).ok_or_else(|| StorageError::CorruptKey(spec.name.clone()))? + 1
                    }
                    None => 0,
                });
            }
            trees.push(tree);
            nexts.push(next);
        }
        Ok((Self { db, meta, trees, cursors, state }, nexts))
    }
}

/// Removes, from the end of each partition of `tree`, the records whose values lie past what the
/// value files were synced to (`synced`; `None`: never). Within a partition values are written
/// in offset order, so these are a suffix; none of them was acknowledged or shown to a reader (an
/// acknowledgement waits for a sync that covers it), so dropping them loses nothing and keeps the
/// offsets dense.
pub(super) fn truncate_unsynced(tree: &sled::Tree, spec: &TopicSpec, synced: Option<Mark>) -> Result<(), StorageError> {
    for p in 0..spec.partitions {
        let mut dropped = 0u64;
        for kv in tree.scan_prefix(p.to_be_bytes()).rev() {
            let (k, v) = kv?;
            match Pointer::decode(&v) {
                Some(Ok(ptr)) if synced.is_none_or(|m| ptr.end() > m) => {
                    tree.remove(k)?;
                    dropped += 1;
                }
                Some(Err(())) => {
                    return Err(StorageError::Corrupt(format!("bad value pointer in topic {:?}", spec.name)))
                }
                _ => break,
            }
        }
        if dropped > 0 {
            tracing::warn!(topic = %spec.name, partition = p, dropped, "dropped records written but never synced before the log was last closed");
        }
    }
    Ok(())
}

/// sled's handles, read-locked (see [`Log::engine`]).
pub(crate) struct EngineRef<'a>(RwLockReadGuard<'a, Option<Engine>>);

impl std::ops::Deref for EngineRef<'_> {
    type Target = Engine;
    fn deref(&self) -> &Engine {
        match self.0.as_ref() {
            Some(e) => e,
            None => unreachable!("an EngineRef is only made over an open engine"),
        }
    }
}

impl Inner {
    pub(crate) fn engine(&self) -> Result<EngineRef<'_>, StorageError> {
        let g = self.engine.read().map_err(|_| StorageError::Closed)?;
        if g.is_none() {
            let why = self.failure.borrow().clone().unwrap_or_else(|| "the database is reopening".into());
            return Err(StorageError::Unavailable(why));
        }
        Ok(EngineRef(g))
    }
}

pub(crate) fn record_key(partition: u32, offset: u64) -> [u8; 12] {
    let mut k = [0u8; 12];
    k[..4].copy_from_slice(&partition.to_be_bytes());
    k[4..].copy_from_slice(&offset.to_be_bytes());
    k
}

pub(super) fn offset_of(key: &[u8]) -> Option<u64> {
    let b: [u8; 8] = key.get(4..12)?.try_into().ok()?;
    Some(u64::from_be_bytes(b))
}

pub(super) fn cursor_key(name: &str, topic: &str, partition: u32) -> Vec<u8> {
    let mut k = Vec::with_capacity(name.len() + topic.len() + 6);
    k.extend_from_slice(name.as_bytes());
    k.push(0);
    k.extend_from_slice(topic.as_bytes());
    k.push(0);
    k.extend_from_slice(&partition.to_be_bytes());
    k
}

pub(super) fn state_key(stage: &str, key: &[u8]) -> Vec<u8> {
    let mut k = Vec::with_capacity(stage.len() + 1 + key.len());
    k.extend_from_slice(stage.as_bytes());
    k.push(0);
    k.extend_from_slice(key);
    k
}

impl Log {
    /// sled's handles, for the length of one synchronous operation (never across an await: a
    /// reopen waits for every holder).
    pub(crate) fn engine(&self) -> Result<EngineRef<'_>, StorageError> {
        self.inner.engine()
    }

    pub(super) fn check_backend(db: &sled::Db, dir: &Path, wanted: &str) -> Result<(), StorageError> {
        let meta = db.open_tree("__meta")?;
        let found = match meta.get("backend")? {
            Some(v) => String::from_utf8_lossy(&v).into_owned(),
            // Data dirs from before the JetStream backend hold sled logs.
            None if db.tree_names().iter().any(|n| n.starts_with(b"topic/")) => "sled".to_owned(),
            None => {
                meta.insert("backend", wanted.as_bytes())?;
                return Ok(());
            }
        };
        if found != wanted {
            return Err(StorageError::WrongBackend {
                dir: dir.display().to_string(),
                found,
                wanted: wanted.to_owned(),
            });
        }
        meta.insert("backend", wanted.as_bytes())?;
        Ok(())
    }

    /// Opens sled in `dir`. A lock still held by this process's previous handle (its background
    /// tasks let go of it a moment after the last handle is dropped) is waited for up to 1 s;
    /// another process's lock is reported as [`StorageError::Locked`].
    pub(super) fn open_db(dir: &Path, cache_bytes: u64) -> Result<sled::Db, StorageError> {
        let mut tries = 0;
        loop {
            match Self::open_db_once(dir, cache_bytes) {
                Err(StorageError::Locked { .. }) if tries < 10 => {
                    tries += 1;
                    std::thread::sleep(Duration::from_millis(100));
                }
                r => return r,
            }
        }
    }

    pub(super) fn open_db_once(dir: &Path, cache_bytes: u64) -> Result<sled::Db, StorageError> {
        sled::Config::new()
            .path(dir)
            .mode(sled::Mode::HighThroughput)
            .cache_capacity(cache_bytes)
            .flush_every_ms(Some(1000))
            .open()
            .map_err(|e| match e {
                sled::Error::Io(ref io) if io.kind() == std::io::ErrorKind::WouldBlock => {
                    StorageError::Locked { dir: dir.display().to_string() }
                }
                sled::Error::Io(ref io) if io.to_string().contains("lock") => {
                    StorageError::Locked { dir: dir.display().to_string() }
                }
                other => StorageError::from(other),
            })
    }
}
