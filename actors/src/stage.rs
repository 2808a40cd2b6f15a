//! The one runtime every log-to-log stage runs on: a ractor actor ([`StageActor`]) around a
//! [`Stage`], which says what it reads and decides what to append.
//!
//! A round: read a batch of the input topic from the stage's durable cursor (on the partitions it
//! owns), hand it to [`Stage::handle`], append what it decided ([`Outputs`], one group commit per
//! output topic), let the stage record what follows a durable append ([`Stage::appended`]), store
//! the cursor ([`Stage::commit_at`]: a stage may hold it back to rebuild state after a restart),
//! sync as [`Durability`] says, and report the stage's lag (`voxgate_stage_lag_events{stage}`,
//! `voxgate_stage_lag_seconds{stage}`). The actor wakes when its input grows and goes round again
//! while batches come back full.
//!
//! A round that fails on the log is not retried in place (the stage's state may have moved
//! halfway): the stage is dropped and opened again from its durable cursor, which is the path of
//! a restart after a crash (output ids derive from inputs, consumers de-duplicate). Reopening
//! waits, with backoff, while the log reports that it cannot write.
//!
//! A stage whose state is per tenant (fraud) can run as [`Shard`]s: each shard is an actor of its
//! own with its own cursor, reads every partition and decides for its share of the tenants, so
//! the tenants spread over the nodes of the role.
//!
//! Must not: decide anything (that is the stage's), read the wall clock except for lag metrics,
//! or loop inside a message (a node's shutdown stops the actor between messages).

use std::future::Future;
use std::marker::PhantomData;
use std::sync::Arc;
use std::time::Duration;

use ractor::{Actor, ActorProcessingErr, ActorRef};
use voxgate_protocol::AccountSid;
use voxgate_storage::{Log, Record, StorageError};

use crate::progress::{Progress, NOT_OURS};

/// Why a stage could not open or run a round.
#[derive(Debug, thiserror::Error)]
pub enum StageError {
    #[error(transparent)]
    Storage(#[from] StorageError),
    /// The stage's own settings refuse to build it (invalid rules).
    #[error("{0}")]
    Setup(String),
    /// What the stage hands its input to (outside the log) cannot take it now: the round is
    /// tried again from the cursor.
    #[error("{0}")]
    Unavailable(String),
}

/// How a stage reads its input.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reading {
    /// Each owned partition is a round of its own, of up to `batch` records (the stage's state
    /// is per partition).
    PerPartition { batch: usize },
    /// One round over every owned partition, up to `per_partition` records from each (the stage
    /// decides across partitions: event-time order, or a batch for its workers).
    Together { per_partition: usize },
}

/// When the harness waits for cursors and state to reach the disk (outputs always do before
/// their cursor is stored, as appends wait for their flush).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Durability {
    /// After every round.
    EachRound,
    /// When a partition's round came back short (caught up); while behind, a later flush takes
    /// the cursors along, and a restart before it only repeats outputs under the same ids.
    WhenCaughtUp,
}

/// A share of the tenants: shard `index` of `of` holds the tenants whose key falls in it. One
/// shard of one ([`Shard::ALL`]) holds every tenant.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Shard {
    pub index: u32,
    pub of: u32,
}

impl Shard {
    /// Every tenant: a stage that is not sharded.
    pub const ALL: Shard = Shard { index: 0, of: 1 };

    /// The shard of `of` that holds `tenant`.
    pub fn of_tenant(tenant: AccountSid, of: u32) -> u32 {
        voxgate_storage::log::partition_for(tenant.partition_key(), of)
    }

    /// Whether this shard holds `tenant`.
    pub fn holds(self, tenant: AccountSid) -> bool {
        self.of <= 1 || Self::of_tenant(tenant, self.of) == self.index
    }

    /// The cursor of a stage's shard: the stage's own name when there is one shard, so an
    /// unsharded stage keeps the cursor it always had.
    pub fn cursor(self, base: &str) -> String {
        if self.of <= 1 {
            base.to_owned()
        } else {
            format!("{base}.{}of{}", self.index, self.of)
        }
    }
}

/// What a round read.
#[derive(Default)]
pub struct Batch {
    /// Per partition read this round (one in [`Reading::PerPartition`]), with its records.
    pub reads: Vec<(u32, Vec<Record>)>,
    /// Every partition's next offset once this round is done ([`NOT_OURS`] for the others).
    pub next: Vec<u64>,
}

impl Batch {
    /// Every record of the round, partition by partition.
    pub fn records(&self) -> impl Iterator<Item = (u32, &Record)> {
        self.reads.iter().flat_map(|(p, rs)| rs.iter().map(move |r| (*p, r)))
    }
}

/// What a round appends: encoded events with their partition keys, in order. Each output topic
/// gets one append of its events, topics in the order they first appear.
#[derive(Default)]
pub struct Outputs {
    items: Vec<(&'static str, u64, Vec<u8>)>,
}

impl Outputs {
    pub fn push(&mut self, topic: &'static str, key: u64, payload: Vec<u8>) {
        self.items.push((topic, key, payload));
    }

    pub fn len(&self) -> usize {
        self.items.len()
    }

    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    /// How many events go to `topic`.
    pub fn count(&self, topic: &str) -> usize {
        self.items.iter().filter(|o| o.0 == topic).count()
    }

    fn clear(&mut self) {
        self.items.clear();
    }

    async fn append(&self, log: &Log) -> Result<(), StorageError> {
        let mut topics: Vec<&'static str> = Vec::new();
        for (t, _, _) in &self.items {
            if !topics.contains(t) {
                topics.push(t);
            }
        }
        for topic in topics {
            let batch = self.items.iter().filter(|o| o.0 == topic).map(|o| (o.1, o.2.as_slice()));
            log.append_many(topic, batch).await?;
        }
        Ok(())
    }
}

/// A stage: what it reads, and the decision it makes on each round. The harness does the rest.
pub trait Stage: Sized + Send + 'static {
    /// What the stage is built from; kept by the harness to open the stage again after a failed
    /// round.
    type Args: Send + Sync + 'static;
    /// Messages of its own besides the harness's (a rules reload); `Infallible` when none.
    type Msg: Send + 'static;

    /// The `stage` label of its metrics and logs.
    const NAME: &'static str;
    /// Its cursor's name (and, by convention, its state's).
    const CURSOR: &'static str;
    /// The topic it reads.
    const INPUT: &'static str;
    const DURABILITY: Durability;

    /// How it reads, given how many partitions it owns.
    fn reading(args: &Self::Args, owned: usize) -> Reading;

    /// Builds the stage, which goes on from `from` (per partition, [`NOT_OURS`] for those it
    /// does not own) for the tenants of `shard`: rebuild what it keeps in memory (from the log
    /// up to there, or its state).
    fn open(
        args: &Self::Args,
        log: &Log,
        from: &[u64],
        shard: Shard,
    ) -> impl Future<Output = Result<Self, StageError>> + Send;

    /// Decides on a round's records: what to append.
    fn handle(
        &mut self,
        log: &Log,
        batch: &Batch,
        out: &mut Outputs,
    ) -> impl Future<Output = Result<(), StageError>> + Send;

    /// The round's outputs are durable (also called when there were none): state that must not
    /// run ahead of them, and their metrics.
    fn appended(&mut self, _log: &Log, _out: &Outputs) -> Result<(), StorageError> {
        Ok(())
    }

    /// The round's cursors are stored (and synced, with [`Durability::EachRound`]): what may go
    /// only once the input that asked for it will not be read again (deleting kept state).
    fn committed(&mut self, _log: &Log) -> Result<(), StorageError> {
        Ok(())
    }

    /// How far the cursor of `partition` may be committed once it reads on from `next`.
    fn commit_at(&self, _partition: u32, next: u64) -> u64 {
        next
    }

    /// One of its own messages; `args` is what the harness opens it from again (update it so a
    /// reopen keeps the change).
    fn message(&mut self, _args: &mut Self::Args, _msg: Self::Msg) {}
}

/// Messages a stage actor takes.
pub enum StageMsg<M> {
    /// New input may be durable: go round.
    Poll,
    /// Open the stage again after a failed round.
    Reopen,
    /// The stage's own message.
    Stage(M),
}

/// What the harness needs to run a stage.
pub struct StageArgs<S: Stage> {
    pub log: Log,
    /// Where the stage reports how far it has read (health, drain at shutdown).
    pub progress: Arc<Progress>,
    /// The input partitions this instance works on (`None`: all; in a cluster, its claims).
    pub partitions: Option<Vec<u32>>,
    /// The tenants it decides for ([`Shard::ALL`] unless the stage runs sharded).
    pub shard: Shard,
    pub stage: S::Args,
}

/// The harness's state around a stage.
pub struct StageState<S: Stage> {
    log: Log,
    progress: Arc<Progress>,
    partitions: Option<Vec<u32>>,
    shard: Shard,
    /// The cursor's name (the shard's).
    cursor: Arc<str>,
    args: S::Args,
    /// `None` while it waits to be opened again after a failed round.
    running: Option<Running<S>>,
    watcher: tokio::task::JoinHandle<()>,
    backoff: Duration,
    /// The stage's own messages that came while it was opening again, for it once it is open.
    held: Vec<S::Msg>,
}

struct Running<S> {
    stage: S,
    cursor: Arc<str>,
    /// Its slot in the shared [`Progress`] (the shard's index).
    slot: u32,
    next: Vec<u64>,
    batch: Batch,
    out: Outputs,
}

const FIRST_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// The actor that runs a [`Stage`].
pub struct StageActor<S>(PhantomData<fn() -> S>);

impl<S> Default for StageActor<S> {
    fn default() -> Self {
        Self(PhantomData)
    }
}

impl<S: Stage> StageState<S> {
    async fn open(&mut self) -> Result<(), StageError> {
        let mut cursor = self.log.cursor(&self.cursor, S::INPUT)?;
        if self.shard.of > 1 && cursor.contains(&0) {
            // A shard new to this cluster goes on from where the stage stopped before its shards
            // were laid out this way (its outputs' ids derive from the inputs, so what it repeats
            // is de-duplicated), not from the start of history.
            let before = earlier_layouts::<S>(&self.log, self.shard.of)?;
            for (c, b) in cursor.iter_mut().zip(before) {
                if *c == 0 {
                    *c = b;
                }
            }
        }
        let next = crate::progress::starting_points(cursor, self.partitions.as_deref());
        // Its position counts (and its lag shows) while it opens, or fails to.
        let slot = self.shard.index;
        for (p, n) in next.iter().enumerate() {
            self.progress.set_in(slot, p as u32, *n);
        }
        let stage = S::open(&self.args, &self.log, &next, self.shard).await?;
        let mut run = Running {
            stage,
            cursor: self.cursor.clone(),
            slot,
            next,
            batch: Batch::default(),
            out: Outputs::default(),
        };
        for m in self.held.drain(..) {
            run.stage.message(&mut self.args, m);
        }
        self.running = Some(run);
        Ok(())
    }
}

/// Per partition, where the stage had got to under its other layouts: the unsharded cursor, or
/// for a layout of `m` shards the least position any of its shards had reached (a shard that never
/// stored one aside); the furthest of those. 0 where there is none.
fn earlier_layouts<S: Stage>(log: &Log, of: u32) -> Result<Vec<u64>, StorageError> {
    let mut best = log.cursor(S::CURSOR, S::INPUT)?;
    for m in (2..=MAX_SHARDS).filter(|m| *m != of) {
        if log.cursor(&Shard { index: 0, of: m }.cursor(S::CURSOR), S::INPUT)?.iter().all(|c| *c == 0) {
            continue;
        }
        let mut least: Vec<Option<u64>> = vec![None; best.len()];
        for index in 0..m {
            let c = log.cursor(&Shard { index, of: m }.cursor(S::CURSOR), S::INPUT)?;
            for (l, v) in least.iter_mut().zip(c) {
                if v > 0 {
                    *l = Some(l.map_or(v, |l| l.min(v)));
                }
            }
        }
        for (b, l) in best.iter_mut().zip(least) {
            *b = (*b).max(l.unwrap_or(0));
        }
    }
    Ok(best)
}

/// The most shards a stage may run as (`tenant_shards`).
pub const MAX_SHARDS: u32 = 256;

impl<S: Stage> Running<S> {
    /// One round over every owned partition; true when more input waits.
    async fn round(&mut self, log: &Log, progress: &Progress, args: &S::Args) -> Result<bool, StageError> {
        let owned = self.next.iter().filter(|n| **n != NOT_OURS).count();
        match S::reading(args, owned) {
            Reading::PerPartition { batch } => {
                let mut more = false;
                for p in 0..self.next.len() as u32 {
                    if self.next[p as usize] == NOT_OURS {
                        continue;
                    }
                    more |= self.partition_round(log, progress, p, batch.max(1)).await?;
                }
                Ok(more)
            }
            Reading::Together { per_partition } => self.together_round(log, progress, per_partition.max(1)).await,
        }
    }

    async fn partition_round(
        &mut self,
        log: &Log,
        progress: &Progress,
        p: u32,
        batch: usize,
    ) -> Result<bool, StageError> {
        let mut records = match self.batch.reads.pop() {
            Some((_, mut r)) => {
                r.clear();
                r
            }
            None => Vec::with_capacity(batch),
        };
        self.batch.reads.clear();
        let from = self.next[p as usize];
        let to = log.read(S::INPUT, p, from, batch, &mut records)?;
        let full = records.len() == batch;
        let empty = records.is_empty();
        self.batch.reads.push((p, records));
        if empty {
            return Ok(false);
        }
        self.batch.next.clone_from(&self.next);
        self.batch.next[p as usize] = to;
        self.decide(log).await?;
        self.next[p as usize] = to;
        progress.set_in(self.slot, p, to);
        log.store_cursor(&self.cursor, S::INPUT, p, self.stage.commit_at(p, to))?;
        if S::DURABILITY == Durability::EachRound || !full {
            log.sync().await?;
        }
        self.stage.committed(log)?;
        Ok(full)
    }

    async fn together_round(&mut self, log: &Log, progress: &Progress, per: usize) -> Result<bool, StageError> {
        let mut spare: Vec<Vec<Record>> = self.batch.reads.drain(..).map(|(_, r)| r).collect();
        let mut next = self.next.clone();
        let mut more = false;
        for (p, n) in next.iter_mut().enumerate() {
            if *n == NOT_OURS {
                continue;
            }
            let mut records = spare.pop().unwrap_or_default();
            records.clear();
            *n = log.read(S::INPUT, p as u32, *n, per, &mut records)?;
            more |= records.len() == per;
            if !records.is_empty() {
                self.batch.reads.push((p as u32, records));
            }
        }
        if next == self.next {
            return Ok(false);
        }
        self.batch.next.clone_from(&next);
        if !self.batch.reads.is_empty() {
            self.decide(log).await?;
        }
        for (p, n) in next.iter().enumerate() {
            if *n == NOT_OURS {
                continue;
            }
            log.store_cursor(&self.cursor, S::INPUT, p as u32, self.stage.commit_at(p as u32, *n))?;
            progress.set_in(self.slot, p as u32, *n);
        }
        self.next = next;
        if S::DURABILITY == Durability::EachRound || !more {
            log.sync().await?;
        }
        self.stage.committed(log)?;
        Ok(more)
    }

    /// The stage decides on the batch; its outputs are appended.
    async fn decide(&mut self, log: &Log) -> Result<(), StageError> {
        self.out.clear();
        self.stage.handle(log, &self.batch, &mut self.out).await?;
        if !self.out.is_empty() {
            self.out.append(log).await?;
        }
        Ok(self.stage.appended(log, &self.out)?)
    }
}

impl<S: Stage> Actor for StageActor<S> {
    type Msg = StageMsg<S::Msg>;
    type State = StageState<S>;
    type Arguments = StageArgs<S>;

    async fn pre_start(
        &self,
        myself: ActorRef<Self::Msg>,
        args: StageArgs<S>,
    ) -> Result<StageState<S>, ActorProcessingErr> {
        let watcher = crate::progress::wake_on_append(&args.log, S::INPUT, myself.clone(), || StageMsg::Poll)?;
        let mut state = StageState {
            log: args.log,
            progress: args.progress,
            partitions: args.partitions,
            shard: args.shard,
            cursor: args.shard.cursor(S::CURSOR).into(),
            args: args.stage,
            running: None,
            watcher,
            backoff: FIRST_BACKOFF,
            held: Vec::new(),
        };
        if let Err(e) = state.open().await {
            state.watcher.abort();
            return Err(e.into());
        }
        // Each start opens the stage's state from the logs (a shard's warm-up).
        metrics::counter!("voxgate_stage_starts_total", "stage" => S::NAME).increment(1);
        myself.cast(StageMsg::Poll)?;
        Ok(state)
    }

    async fn post_stop(&self, _: ActorRef<Self::Msg>, s: &mut StageState<S>) -> Result<(), ActorProcessingErr> {
        s.watcher.abort();
        // A shard another node takes over is no longer this node's lag.
        s.progress.release(s.shard.index);
        crate::progress::report_lag(&s.log, S::NAME, S::INPUT, &s.progress.snapshot());
        let _ = s.log.sync().await;
        Ok(())
    }

    async fn handle(
        &self,
        myself: ActorRef<Self::Msg>,
        msg: Self::Msg,
        s: &mut StageState<S>,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            StageMsg::Poll => {
                let Some(run) = s.running.as_mut() else { return Ok(()) };
                match run.round(&s.log, &s.progress, &s.args).await {
                    Ok(more) => {
                        s.backoff = FIRST_BACKOFF;
                        crate::progress::report_lag(&s.log, S::NAME, S::INPUT, &s.progress.snapshot());
                        if more {
                            myself.cast(StageMsg::Poll)?;
                        }
                    }
                    Err(StageError::Storage(StorageError::Closed)) => {
                        tracing::info!(stage = S::NAME, "the log is shut down; the stage stops");
                        myself.stop(None);
                    }
                    Err(e) => {
                        metrics::counter!("voxgate_stage_restarts_total", "stage" => S::NAME).increment(1);
                        tracing::error!(stage = S::NAME, error = %e, retry_ms = s.backoff.as_millis() as u64, "stage round failed; opening it again from its cursor");
                        s.running = None;
                        reopen_later(&myself, s);
                    }
                }
            }
            StageMsg::Reopen => {
                if s.running.is_some() {
                    return Ok(());
                }
                if let Some(why) = s.log.write_failure() {
                    tracing::warn!(stage = S::NAME, error = %why, "the log cannot write; the stage waits");
                    reopen_later(&myself, s);
                    return Ok(());
                }
                match s.open().await {
                    Ok(()) => {
                        tracing::info!(stage = S::NAME, "stage opened again from its cursor");
                        myself.cast(StageMsg::Poll)?;
                    }
                    Err(e) => {
                        tracing::error!(stage = S::NAME, error = %e, retry_ms = s.backoff.as_millis() as u64, "stage did not open again");
                        reopen_later(&myself, s);
                    }
                }
            }
            StageMsg::Stage(m) => match s.running.as_mut() {
                Some(run) => run.stage.message(&mut s.args, m),
                // Kept for the stage once it is open again (a rules reload must not be lost).
                None => s.held.push(m),
            },
        }
        Ok(())
    }
}

/// Schedules a [`StageMsg::Reopen`] after the current backoff, and doubles it.
fn reopen_later<S: Stage>(myself: &ActorRef<StageMsg<S::Msg>>, s: &mut StageState<S>) {
    myself.send_after(s.backoff, || StageMsg::Reopen);
    s.backoff = (s.backoff * 2).min(MAX_BACKOFF);
}

#[cfg(test)]
mod tests {
    use super::*;
    use voxgate_protocol::time::SystemClock;
    use voxgate_storage::{topics, TopicSpec};

    /// Copies each record of the calls log to the alerts log, and holds its cursor back by
    /// `hold` records.
    struct Copy {
        hold: u64,
    }

    impl Stage for Copy {
        type Args = u64;
        type Msg = std::convert::Infallible;
        const NAME: &'static str = "copy";
        const CURSOR: &'static str = "copy";
        const INPUT: &'static str = topics::CALLS;
        const DURABILITY: Durability = Durability::WhenCaughtUp;

        fn reading(_: &u64, _: usize) -> Reading {
            Reading::PerPartition { batch: 3 }
        }

        async fn open(hold: &u64, _: &Log, _: &[u64], _: Shard) -> Result<Self, StageError> {
            Ok(Copy { hold: *hold })
        }

        async fn handle(&mut self, _: &Log, batch: &Batch, out: &mut Outputs) -> Result<(), StageError> {
            for (_, r) in batch.records() {
                out.push(topics::ALERTS, 0, r.payload().to_vec());
            }
            Ok(())
        }

        fn commit_at(&self, _: u32, next: u64) -> u64 {
            next.saturating_sub(self.hold)
        }
    }

    fn open_log(dir: &std::path::Path) -> Log {
        let specs = vec![
            TopicSpec::new(topics::CALLS, 1, Default::default()),
            TopicSpec::new(topics::ALERTS, 1, Default::default()),
        ];
        Log::open(dir, &specs, Arc::new(SystemClock)).unwrap()
    }

    async fn copied(log: &Log, want: u64) -> u64 {
        for _ in 0..500 {
            if log.durable_head(topics::ALERTS, 0).unwrap() >= want {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        log.durable_head(topics::ALERTS, 0).unwrap()
    }

    #[tokio::test]
    async fn copies_in_batches_and_commits_where_the_stage_says() {
        let dir = tempfile::tempdir().unwrap();
        let log = open_log(dir.path());
        for i in 0..7u8 {
            log.append(topics::CALLS, 0, &[i]).await.unwrap();
        }
        let progress = Arc::new(Progress::new(1));
        let args = StageArgs::<Copy> {
            log: log.clone(),
            progress: progress.clone(),
            partitions: None,
            shard: Shard::ALL,
            stage: 2,
        };
        let (actor, done) = Actor::spawn(None, StageActor::<Copy>::default(), args).await.unwrap();
        assert_eq!(copied(&log, 7).await, 7);
        log.append(topics::CALLS, 0, &[7]).await.unwrap();
        assert_eq!(copied(&log, 8).await, 8);
        actor.stop(None);
        done.await.unwrap();
        assert_eq!(progress.snapshot(), vec![8]);
        assert_eq!(log.cursor("copy", topics::CALLS).unwrap(), vec![6]);
        let mut out = Vec::new();
        log.read(topics::ALERTS, 0, 0, 100, &mut out).unwrap();
        let bytes: Vec<u8> = out.iter().map(|r| r.payload()[0]).collect();
        assert_eq!(bytes, (0..8).collect::<Vec<u8>>());
    }

    #[tokio::test]
    async fn a_restart_goes_on_from_the_committed_cursor() {
        let dir = tempfile::tempdir().unwrap();
        let log = open_log(dir.path());
        for i in 0..4u8 {
            log.append(topics::CALLS, 0, &[i]).await.unwrap();
        }
        let progress = Arc::new(Progress::new(1));
        let args = StageArgs::<Copy> {
            log: log.clone(),
            progress: progress.clone(),
            partitions: None,
            shard: Shard::ALL,
            stage: 1,
        };
        let (actor, done) = Actor::spawn(None, StageActor::<Copy>::default(), args).await.unwrap();
        assert_eq!(copied(&log, 4).await, 4);
        actor.stop(None);
        done.await.unwrap();
        // Committed at 3: the last record is read (and copied) again.
        let args = StageArgs::<Copy> {
            log: log.clone(),
            progress: progress.clone(),
            partitions: None,
            shard: Shard::ALL,
            stage: 0,
        };
        let (actor, done) = Actor::spawn(None, StageActor::<Copy>::default(), args).await.unwrap();
        assert_eq!(copied(&log, 5).await, 5);
        actor.stop(None);
        done.await.unwrap();
        assert_eq!(log.cursor("copy", topics::CALLS).unwrap(), vec![4]);
    }

    /// Fails its first round; copies each record as the tag its last message set; counts the
    /// rounds committed.
    struct Flaky {
        tag: u8,
        shared: Arc<FlakyShared>,
    }

    struct FlakyShared {
        failures_left: std::sync::atomic::AtomicU32,
        committed: std::sync::atomic::AtomicU32,
    }

    struct FlakyArgs {
        tag: u8,
        shared: Arc<FlakyShared>,
    }

    impl Stage for Flaky {
        type Args = FlakyArgs;
        type Msg = u8;
        const NAME: &'static str = "flaky";
        const CURSOR: &'static str = "flaky";
        const INPUT: &'static str = topics::CALLS;
        const DURABILITY: Durability = Durability::EachRound;

        fn reading(_: &FlakyArgs, _: usize) -> Reading {
            Reading::Together { per_partition: 10 }
        }

        async fn open(args: &FlakyArgs, _: &Log, _: &[u64], _: Shard) -> Result<Self, StageError> {
            Ok(Flaky { tag: args.tag, shared: args.shared.clone() })
        }

        async fn handle(&mut self, _: &Log, batch: &Batch, out: &mut Outputs) -> Result<(), StageError> {
            use std::sync::atomic::Ordering;
            let left = self.shared.failures_left.load(Ordering::SeqCst);
            if left > 0 {
                self.shared.failures_left.store(left - 1, Ordering::SeqCst);
                return Err(StorageError::Engine("a failed round".into()).into());
            }
            for _ in batch.records() {
                out.push(topics::ALERTS, 0, vec![self.tag]);
            }
            Ok(())
        }

        fn committed(&mut self, _: &Log) -> Result<(), StorageError> {
            self.shared.committed.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            Ok(())
        }

        fn message(&mut self, args: &mut FlakyArgs, tag: u8) {
            self.tag = tag;
            args.tag = tag;
        }
    }

    #[tokio::test]
    async fn a_failed_round_reopens_from_the_cursor_and_keeps_messages_that_came_meanwhile() {
        use std::sync::atomic::{AtomicU32, Ordering};
        let dir = tempfile::tempdir().unwrap();
        let log = open_log(dir.path());
        log.append(topics::CALLS, 0, &[0]).await.unwrap();
        let shared = Arc::new(FlakyShared { failures_left: AtomicU32::new(1), committed: AtomicU32::new(0) });
        let args = StageArgs::<Flaky> {
            log: log.clone(),
            progress: Arc::new(Progress::new(1)),
            partitions: None,
            shard: Shard::ALL,
            stage: FlakyArgs { tag: 1, shared: shared.clone() },
        };
        let (actor, done) = Actor::spawn(None, StageActor::<Flaky>::default(), args).await.unwrap();
        // Behind the first round (which fails) in the mailbox: it arrives while the stage waits
        // to open again, and must reach it once it has.
        actor.cast(StageMsg::Stage(9)).unwrap();
        assert_eq!(copied(&log, 1).await, 1);
        actor.stop(None);
        done.await.unwrap();
        let mut out = Vec::new();
        log.read(topics::ALERTS, 0, 0, 100, &mut out).unwrap();
        assert_eq!(out.iter().map(|r| r.payload()[0]).collect::<Vec<u8>>(), vec![9], "copied once, after the reload");
        assert_eq!(log.cursor("flaky", topics::CALLS).unwrap(), vec![1]);
        assert!(shared.committed.load(Ordering::SeqCst) >= 1, "committed after the cursor was stored");
    }

    #[test]
    fn every_tenant_is_in_exactly_one_shard_and_one_shard_is_the_unsharded_stage() {
        for i in 0..200u128 {
            let t = AccountSid::from_u128(i * 7919);
            let holders: Vec<u32> = (0..8).filter(|&index| Shard { index, of: 8 }.holds(t)).collect();
            assert_eq!(holders, vec![Shard::of_tenant(t, 8)]);
            assert!(Shard::ALL.holds(t));
        }
        assert_eq!(Shard::ALL.cursor("fraud"), "fraud");
        assert_eq!(Shard { index: 3, of: 8 }.cursor("fraud"), "fraud.3of8");
    }

    #[tokio::test]
    async fn a_new_shard_layout_goes_on_from_where_the_last_one_stopped() {
        let dir = tempfile::tempdir().unwrap();
        let log = open_log(dir.path());
        for i in 0..7u8 {
            log.append(topics::CALLS, 0, &[i]).await.unwrap();
        }
        // The stage ran unsharded up to 2, then as two shards, the slower at 4.
        log.store_cursor("copy", topics::CALLS, 0, 2).unwrap();
        log.store_cursor("copy.0of2", topics::CALLS, 0, 6).unwrap();
        log.store_cursor("copy.1of2", topics::CALLS, 0, 4).unwrap();
        let progress = Arc::new(Progress::sharded(1, 4));
        let args = StageArgs::<Copy> {
            log: log.clone(),
            progress: progress.clone(),
            partitions: None,
            shard: Shard { index: 3, of: 4 },
            stage: 0,
        };
        let (actor, done) = Actor::spawn(None, StageActor::<Copy>::default(), args).await.unwrap();
        assert_eq!(copied(&log, 3).await, 3, "records 4, 5 and 6");
        actor.stop(None);
        done.await.unwrap();
        assert_eq!(log.cursor("copy.3of4", topics::CALLS).unwrap(), vec![7]);
        assert_eq!(progress.snapshot(), vec![NOT_OURS], "the stopped shard left the node's position");
    }

    #[tokio::test]
    async fn partitions_it_does_not_own_are_left_alone() {
        let dir = tempfile::tempdir().unwrap();
        let specs = vec![
            TopicSpec::new(topics::CALLS, 2, Default::default()),
            TopicSpec::new(topics::ALERTS, 1, Default::default()),
        ];
        let log = Log::open(dir.path(), &specs, Arc::new(SystemClock)).unwrap();
        let key_in = |p: u32| (0u64..1000).find(|k| log.partition_of(topics::CALLS, *k).unwrap() == p).unwrap();
        log.append(topics::CALLS, key_in(0), &[0]).await.unwrap();
        log.append(topics::CALLS, key_in(1), &[1]).await.unwrap();
        let progress = Arc::new(Progress::new(2));
        let args = StageArgs::<Copy> {
            log: log.clone(),
            progress: progress.clone(),
            partitions: Some(vec![1]),
            shard: Shard::ALL,
            stage: 0,
        };
        let (actor, done) = Actor::spawn(None, StageActor::<Copy>::default(), args).await.unwrap();
        assert_eq!(copied(&log, 1).await, 1);
        actor.stop(None);
        done.await.unwrap();
        assert_eq!(progress.snapshot(), vec![NOT_OURS, 1]);
        let mut out = Vec::new();
        log.read(topics::ALERTS, 0, 0, 100, &mut out).unwrap();
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].payload(), &[1]);
    }
}
