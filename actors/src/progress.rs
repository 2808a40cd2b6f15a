//! How far a stage has read its input: shared with health and metrics without asking the actor.

use std::sync::atomic::{AtomicU64, Ordering};

/// Per partition, the next input offset a stage will process (not only what it has committed:
/// a stage may hold its durable cursor back to rebuild open streams after a restart).
///
/// A stage run as tenant shards keeps one slot per shard (each shard reads every partition); the
/// node's position is the least of the slots of the shards it runs.
#[derive(Debug)]
pub struct Progress {
    /// `[slot][partition]`.
    slots: Vec<Vec<AtomicU64>>,
}

/// The "next offset" of a partition another node works on: reads from it return nothing, nothing
/// is committed for it, and it shows no lag.
pub const NOT_OURS: u64 = u64::MAX;

/// Per partition, where a stage that owns only `owned` (all when `None`) starts: its committed
/// cursor, or [`NOT_OURS`].
pub fn starting_points(cursor: Vec<u64>, owned: Option<&[u32]>) -> Vec<u64> {
    cursor
        .into_iter()
        .enumerate()
        .map(|(p, next)| match owned {
            Some(o) if !o.contains(&(p as u32)) => NOT_OURS,
            _ => next,
        })
        .collect()
}

impl Progress {
    pub fn new(partitions: usize) -> Self {
        Self { slots: vec![(0..partitions).map(|_| AtomicU64::new(0)).collect()] }
    }

    /// For a stage run as `shards` tenant shards: every slot starts as [`NOT_OURS`] until its
    /// shard runs here.
    pub fn sharded(partitions: usize, shards: u32) -> Self {
        let slot = || (0..partitions).map(|_| AtomicU64::new(NOT_OURS)).collect();
        Self { slots: (0..shards.max(1)).map(|_| slot()).collect() }
    }

    pub fn set(&self, partition: u32, next: u64) {
        self.set_in(0, partition, next);
    }

    /// Sets shard `slot`'s position (slot 0 when the progress is not sharded).
    pub fn set_in(&self, slot: u32, partition: u32, next: u64) {
        let slot = if self.slots.len() == 1 { 0 } else { slot as usize };
        if let Some(a) = self.slots.get(slot).and_then(|s| s.get(partition as usize)) {
            a.store(next, Ordering::Release);
        }
    }

    /// Shard `slot` stopped running here: it is no longer this node's to report. (Nothing
    /// changes when the progress is not sharded.)
    pub fn release(&self, slot: u32) {
        if self.slots.len() > 1 {
            for a in self.slots.get(slot as usize).into_iter().flatten() {
                a.store(NOT_OURS, Ordering::Release);
            }
        }
    }

    /// Next offsets, one per partition (the least over the shards).
    pub fn snapshot(&self) -> Vec<u64> {
        let parts = self.slots.first().map_or(0, Vec::len);
        (0..parts).map(|p| self.slots.iter().map(|s| s[p].load(Ordering::Acquire)).min().unwrap_or(NOT_OURS)).collect()
    }
}

/// Casts `msg()` to `actor` each time new records of `topic` become durable, so a stage wakes up
/// to read them. The task ends when the actor or the log is gone.
pub fn wake_on_append<M: ractor::Message>(
    log: &voxgate_storage::Log,
    topic: &str,
    actor: ractor::ActorRef<M>,
    msg: fn() -> M,
) -> Result<tokio::task::JoinHandle<()>, voxgate_storage::StorageError> {
    let mut rx = log.watch(topic)?;
    Ok(tokio::spawn(async move {
        while rx.changed().await.is_ok() {
            if actor.cast(msg()).is_err() {
                return;
            }
        }
    }))
}

/// Reports a stage's lag behind its input `topic` — events not yet processed, and the age in
/// seconds of the oldest of them (0 when caught up) — as `voxgate_stage_lag_events{stage}` and
/// `voxgate_stage_lag_seconds{stage}`. `next` is the stage's next offset per partition. (Metrics
/// only: wall time here decides nothing.)
pub fn report_lag(log: &voxgate_storage::Log, stage: &'static str, topic: &str, next: &[u64]) {
    let mut events = 0u64;
    let mut oldest: Option<voxgate_protocol::Timestamp> = None;
    let mut one = Vec::with_capacity(1);
    for (p, &n) in next.iter().enumerate() {
        let head = log.durable_head(topic, p as u32).unwrap_or(0);
        if head > n {
            events += head - n;
            one.clear();
            if log.read(topic, p as u32, n, 1, &mut one).is_ok() {
                if let Some(r) = one.first() {
                    let at = r.appended_at();
                    oldest = Some(oldest.map_or(at, |o| o.min(at)));
                }
            }
        }
    }
    let now =
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_micros() as i64).unwrap_or(0);
    let secs = oldest.map_or(0.0, |o| (now - o.as_micros()).max(0) as f64 / 1e6);
    metrics::gauge!("voxgate_stage_lag_events", "stage" => stage).set(events as f64);
    metrics::gauge!("voxgate_stage_lag_seconds", "stage" => stage).set(secs);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sharded_progress_is_the_least_of_the_shards_that_run_here() {
        let p = Progress::sharded(2, 4);
        assert_eq!(p.snapshot(), vec![NOT_OURS, NOT_OURS], "no shard runs here yet");
        p.set_in(1, 0, 10);
        p.set_in(1, 1, 7);
        p.set_in(3, 0, 4);
        p.set_in(3, 1, 9);
        assert_eq!(p.snapshot(), vec![4, 7]);
        p.release(3);
        assert_eq!(p.snapshot(), vec![10, 7], "a shard given away leaves the node's position");
    }

    #[test]
    fn an_unsharded_progress_keeps_its_one_slot() {
        let p = Progress::new(2);
        assert_eq!(p.snapshot(), vec![0, 0]);
        p.set_in(5, 1, 3);
        p.release(0);
        assert_eq!(p.snapshot(), vec![0, 3]);
    }
}
