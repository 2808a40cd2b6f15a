//! The node's billing stage: usage is a pure fold of the calls, transcripts and tenants logs into
//! a [`UsageBook`], applied idempotently (by event id), so the node rebuilds it from the start of
//! the logs on every start and then follows them: a restart, a crash mid-stream or a replay from
//! zero give the same totals to the micro-dollar. The REST API reads the book.

use std::sync::{Arc, Mutex, MutexGuard};

use voxgate_actors::billing::UsageBook;
use voxgate_protocol::Timestamp;
use voxgate_storage::{topics, Log, StorageError};

use crate::config::Config;

const TOPICS: [&str; 3] = [topics::TENANTS, topics::CALLS, topics::TRANSCRIPTS];

/// The book, shared by the follower and the REST API.
pub struct Billing {
    book: Mutex<UsageBook>,
}

impl Billing {
    /// An empty book with the configured prices; config-file numbers are held from `since`.
    pub fn new(cfg: &Config, since: Timestamp) -> anyhow::Result<Self> {
        let mut book =
            UsageBook::new(cfg.billing.prices.clone()).map_err(|e| anyhow::anyhow!("billing prices: {e}"))?;
        for t in &cfg.tenants {
            for n in &t.numbers {
                book.hold_number(t.account_sid, n, since);
            }
        }
        Ok(Self { book: Mutex::new(book) })
    }

    pub fn read(&self) -> MutexGuard<'_, UsageBook> {
        self.book.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Applies every durable record of the three logs from `next` on; returns how many.
    fn catch_up(&self, log: &Log, next: &mut [Vec<u64>]) -> Result<u64, StorageError> {
        let mut n = 0;
        let mut book = self.read();
        for (t, topic) in TOPICS.iter().enumerate() {
            for (p, from) in next[t].iter_mut().enumerate() {
                let to = log.scan(topic, p as u32, *from, |r| {
                    match voxgate_protocol::decode(r.payload()) {
                        Ok(env) => {
                            book.apply(&env);
                        }
                        Err(e) => {
                            metrics::counter!("voxgate_stage_undecodable_total", "stage" => "billing").increment(1);
                            tracing::error!(stage = "billing", topic, offset = r.offset, error = %e, "record cannot be decoded; skipped");
                        }
                    }
                    Ok::<_, StorageError>(())
                })?;
                n += to - *from;
                *from = to;
            }
        }
        Ok(n)
    }

    /// Rebuilds the book from the start of the logs, then follows them until the log closes.
    pub async fn follow(self: Arc<Self>, log: Log) -> Result<(), StorageError> {
        let mut next: Vec<Vec<u64>> = Vec::new();
        let mut watches = Vec::new();
        for topic in TOPICS {
            let parts = log.partitions(topic)?;
            next.push((0..parts).map(|p| log.first_offset(topic, p).unwrap_or(0)).collect());
            watches.push(log.watch(topic)?);
        }
        let n = self.catch_up(&log, &mut next)?;
        tracing::info!(stage = "billing", events = n, "usage rebuilt from the logs");
        let [mut a, mut b, mut c] = <[_; 3]>::try_from(watches).map_err(|_| StorageError::Engine("watches".into()))?;
        loop {
            tokio::select! {
                r = a.changed() => if r.is_err() { return Ok(()) },
                r = b.changed() => if r.is_err() { return Ok(()) },
                r = c.changed() => if r.is_err() { return Ok(()) },
            }
            self.catch_up(&log, &mut next)?;
        }
    }
}
