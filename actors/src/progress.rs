//! How far a stage has read its input: shared with health and metrics without asking the actor.

use std::sync::atomic::{AtomicU64, Ordering};

/// Per partition, the next input offset a stage will process (not only what it has committed:
/// a stage may hold its durable cursor back to rebuild open streams after a restart).
#[derive(Debug)]
pub struct Progress {
    next: Vec<AtomicU64>,
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
        Self { next: (0..partitions).map(|_| AtomicU64::new(0)).collect() }
    }

    pub fn set(&self, partition: u32, next: u64) {
        if let Some(a) = self.next.get(partition as usize) {
            a.store(next, Ordering::Release);
        }
    }

    /// Next offsets, one per partition.
    pub fn snapshot(&self) -> Vec<u64> {
        self.next.iter().map(|a| a.load(Ordering::Acquire)).collect()
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
