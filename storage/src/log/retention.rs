//! Retention: removing records past their topic's age or count limit, never past what a stage
//! has not read yet, and deleting value files no record points into any more. On a cluster node
//! the partition's JetStream stream is purged below what is kept.

use std::collections::HashMap;

use voxgate_protocol::Timestamp;

use super::backend::Backend;
use super::engine::{offset_of, record_key, Engine};
use super::{Log, StorageError};
use crate::values::Pointer;

/// When a stored value (inline or pointer) was appended.
pub(super) fn stored_appended_at(v: &[u8]) -> Option<i64> {
    let b = match Pointer::decode(v) {
        Some(_) => v.get(1..9)?,
        None => v.get(..8)?,
    };
    Some(i64::from_be_bytes(b.try_into().ok()?))
}

/// What a retention pass removed.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct RetentionReport {
    pub removed: HashMap<String, u64>,
    /// Value files deleted because no record points into them any more.
    pub value_files_removed: usize,
}

impl Log {
    /// Removes records past their topic's retention, judged at `now`; returns what was removed.
    pub fn apply_retention(&self, now: Timestamp) -> Result<RetentionReport, StorageError> {
        let mut report = RetentionReport::default();
        if self.write_failure().is_some() {
            // Nothing is removed while writes fail; the next pass catches up.
            return Ok(report);
        }
        let engine = self.engine()?;
        let lowest = self.lowest_cursors(&engine)?;
        for (t, tree) in self.inner.topics.iter().zip(&engine.trees) {
            let r = t.spec.retention;
            if r.max_age.is_none() && r.max_events_per_partition.is_none() {
                continue;
            }
            let cutoff = r.max_age.map(|a| Timestamp(now.as_micros().saturating_sub(a.as_micros() as i64)));
            let mut removed = 0u64;
            for (p, part) in t.partitions.iter().enumerate() {
                let p = p as u32;
                let head = *part.durable.borrow();
                let keep_from = r.max_events_per_partition.map(|m| head.saturating_sub(m)).unwrap_or(0);
                // Never past a stage that has not read it yet (its cursor is the next offset it
                // reads): what a stage still needs is kept, however old.
                let needed_from = lowest.get(&(t.spec.name.clone(), p)).copied().unwrap_or(u64::MAX);
                let mut removed_here = false;
                for kv in tree.range(record_key(p, 0)..record_key(p, head.min(needed_from))) {
                    let (k, v) = kv?;
                    let offset = offset_of(&k).ok_or_else(|| StorageError::CorruptKey(t.spec.name.clone()))?;
                    let too_many = offset < keep_from;
                    let too_old = match (cutoff, stored_appended_at(&v)) {
                        (Some(c), Some(at)) => at < c.as_micros(),
                        _ => false,
                    };
                    if !(too_many || too_old) {
                        break;
                    }
                    tree.remove(k)?;
                    removed += 1;
                    removed_here = true;
                }
                if removed_here {
                    self.inner.backend.trimmed(&t.spec.name, p, tree, head)?;
                }
            }
            if removed > 0 {
                report.removed.insert(t.spec.name.clone(), removed);
            }
        }
        if let Some(values) = self.inner.backend.values() {
            // A value file goes once no record points into it: the oldest record still kept in
            // each partition points at the oldest file in use.
            let mut keep = values.current_file();
            for (t, tree) in self.inner.topics.iter().zip(&engine.trees).filter(|(t, _)| t.spec.bulk) {
                for p in 0..t.spec.partitions {
                    if let Some(kv) = tree.scan_prefix(p.to_be_bytes()).next() {
                        if let Some(Ok(ptr)) = Pointer::decode(&kv?.1) {
                            keep = keep.min(ptr.at.file);
                        }
                    }
                }
            }
            report.value_files_removed = values.remove_before(keep)?;
        }
        Ok(report)
    }

    /// The lowest durable cursor on each (topic, partition) that any stage keeps a cursor on.
    pub(super) fn lowest_cursors(&self, engine: &Engine) -> Result<HashMap<(String, u32), u64>, StorageError> {
        let mut lowest: HashMap<(String, u32), u64> = HashMap::new();
        for kv in engine.cursors.iter() {
            let (k, v) = kv?;
            let mut parts = k.splitn(3, |b| *b == 0);
            let (Some(_name), Some(topic), Some(p)) = (parts.next(), parts.next(), parts.next()) else { continue };
            let (Ok(topic), Ok(p), Ok(v)) =
                (std::str::from_utf8(topic), <[u8; 4]>::try_from(p), <[u8; 8]>::try_from(v.as_ref()))
            else {
                continue;
            };
            let e = lowest.entry((topic.to_owned(), u32::from_be_bytes(p))).or_insert(u64::MAX);
            *e = (*e).min(u64::from_be_bytes(v));
        }
        Ok(lowest)
    }
}
