//! The runtime of the log followers: a ractor actor ([`FollowerActor`]) around a [`Follower`],
//! which folds whole logs into what a node keeps in memory (usage books, fraud blocks, what the
//! apps are owed) and acts on what arrives.
//!
//! A follower reads every partition of its topics from the first record kept: on start, what the
//! logs hold (the actor is spawned only once that is folded in, so a node answers nothing from a
//! half-built book); then each time one of its topics grows, and on its timer. A round: read each
//! topic's new records (batch by batch, the position moving only past a batch folded in whole),
//! hand each decoded event to [`Follower::apply`], then let the follower act
//! ([`Follower::settle`]), told whether the round is live or still the logs' past. A read that
//! fails is retried with backoff; the follower is never left half way through a record.
//!
//! Unlike a [`crate::stage`] it keeps no durable cursor: what it holds is rebuilt from the logs
//! on every start, and its folds are idempotent (by event id), so an event seen twice changes
//! nothing.
//!
//! Must not: decide anything (the follower's), or loop inside a message (a node's shutdown stops
//! the actor between messages).

use std::future::Future;
use std::marker::PhantomData;
use std::sync::Arc;
use std::time::Duration;

use ractor::{Actor, ActorProcessingErr, ActorRef};
use voxgate_protocol::Envelope;
use voxgate_storage::{Log, StorageError};

use crate::progress::Progress;

/// Records read per partition per batch.
const BATCH: usize = 256;
const FIRST_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// A log follower: what it reads, how it folds an event in, and what it does after a round.
pub trait Follower: Sized + Send + 'static {
    /// Messages of its own (`Infallible` when none).
    type Msg: Send + 'static;

    /// The `stage` label of its metrics and logs.
    const NAME: &'static str;
    /// The topics it folds, in the order a round reads them.
    const TOPICS: &'static [&'static str];
    /// The topic its lag is reported behind (`voxgate_stage_lag_*{stage}`; health).
    const LAG: &'static str;
    /// How often [`Follower::tick`] runs, if at all.
    const TICK: Option<Duration> = None;

    /// Folds one event of `topic` in.
    fn apply(&mut self, topic: &'static str, env: Envelope);

    /// A round's events are folded in: act on them. `live` is false for the rounds that read
    /// what the logs held when the follower started.
    fn settle(&mut self, live: bool) -> impl Future<Output = ()> + Send;

    /// Everything of `topic`/`partition` before `next` is folded in (after each batch).
    fn reached(&mut self, _topic: &'static str, _partition: u32, _next: u64) {}

    /// The actor is stopping (the node shuts down, or the log closed).
    fn stopped(&mut self) {}

    /// Its timer.
    fn tick(&mut self) -> impl Future<Output = ()> + Send {
        async {}
    }

    /// One of its own messages.
    fn message(&mut self, _msg: Self::Msg) -> impl Future<Output = ()> + Send {
        async {}
    }
}

/// Messages a follower's actor takes.
pub enum FollowMsg<M> {
    /// A topic grew (or a failed read is retried): go round.
    Poll,
    /// The follower's timer.
    Tick,
    /// The follower's own message.
    Own(M),
}

/// What the actor runs: the follower, the log, and where its position is reported.
pub struct FollowerArgs<F> {
    pub log: Log,
    pub follower: F,
    /// Its position in [`Follower::LAG`]'s partitions (health).
    pub progress: Arc<Progress>,
    /// Where it starts, per topic and partition (`None`: each partition's first record kept),
    /// for a follower whose state was loaded up to there.
    pub from: Option<Vec<Vec<u64>>>,
}

/// The actor's state around a follower.
pub struct FollowerState<F> {
    log: Log,
    follower: F,
    progress: Arc<Progress>,
    /// Per topic (as in [`Follower::TOPICS`]), per partition, the next offset.
    next: Vec<Vec<u64>>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    ticker: Option<ractor::concurrency::JoinHandle<()>>,
    backoff: Duration,
    /// A retry is already scheduled (polls meanwhile wait for it).
    retrying: bool,
}

/// The actor that runs a [`Follower`].
pub struct FollowerActor<F>(PhantomData<fn() -> F>);

impl<F> Default for FollowerActor<F> {
    fn default() -> Self {
        Self(PhantomData)
    }
}

impl<F: Follower> FollowerState<F> {
    /// Reads every topic up to its durable head, folding each event in; then settles. Returns
    /// how many records it read.
    async fn round(&mut self, live: bool) -> Result<u64, StorageError> {
        let mut read = 0u64;
        let mut records = Vec::with_capacity(BATCH);
        for (t, topic) in F::TOPICS.iter().enumerate() {
            for p in 0..self.next[t].len() {
                loop {
                    records.clear();
                    let from = self.next[t][p];
                    let to = self.log.read(topic, p as u32, from, BATCH, &mut records)?;
                    if records.is_empty() {
                        break;
                    }
                    for r in &records {
                        match voxgate_protocol::decode(r.payload()) {
                            Ok(env) => self.follower.apply(topic, env),
                            Err(e) => {
                                metrics::counter!("voxgate_stage_undecodable_total", "stage" => F::NAME).increment(1);
                                tracing::error!(stage = F::NAME, topic, partition = p, offset = r.offset, error = %e, "record cannot be decoded; skipped");
                            }
                        }
                    }
                    read += to - from;
                    self.next[t][p] = to;
                    self.follower.reached(topic, p as u32, to);
                    if *topic == F::LAG {
                        self.progress.set(p as u32, to);
                    }
                }
            }
        }
        self.follower.settle(live).await;
        if let Some(t) = F::TOPICS.iter().position(|t| *t == F::LAG) {
            crate::progress::report_lag(&self.log, F::NAME, F::LAG, &self.next[t]);
        }
        Ok(read)
    }
}

impl<F: Follower> Actor for FollowerActor<F> {
    type Msg = FollowMsg<F::Msg>;
    type State = FollowerState<F>;
    type Arguments = FollowerArgs<F>;

    async fn pre_start(
        &self,
        myself: ActorRef<Self::Msg>,
        args: FollowerArgs<F>,
    ) -> Result<FollowerState<F>, ActorProcessingErr> {
        let log = args.log;
        let next = match args.from {
            Some(from) => from,
            None => {
                let mut next = Vec::with_capacity(F::TOPICS.len());
                for topic in F::TOPICS {
                    let parts = log.partitions(topic)?;
                    next.push((0..parts).map(|p| log.first_offset(topic, p).unwrap_or(0)).collect::<Vec<u64>>());
                }
                next
            }
        };
        let mut state = FollowerState {
            log,
            follower: args.follower,
            progress: args.progress,
            next,
            tasks: Vec::new(),
            ticker: None,
            backoff: FIRST_BACKOFF,
            retrying: false,
        };
        // What the logs hold now, before anyone is told the follower runs.
        let read = state.round(false).await?;
        tracing::info!(stage = F::NAME, events = read, "follower caught up with the logs");
        for topic in F::TOPICS {
            match crate::progress::wake_on_append(&state.log, topic, myself.clone(), || FollowMsg::Poll) {
                Ok(t) => state.tasks.push(t),
                Err(e) => {
                    state.tasks.iter().for_each(tokio::task::JoinHandle::abort);
                    return Err(e.into());
                }
            }
        }
        if let Some(every) = F::TICK {
            state.ticker = Some(myself.send_interval(every, || FollowMsg::Tick));
        }
        // What arrived between the first round and the watches.
        myself.cast(FollowMsg::Poll)?;
        Ok(state)
    }

    async fn post_stop(&self, _: ActorRef<Self::Msg>, s: &mut FollowerState<F>) -> Result<(), ActorProcessingErr> {
        s.tasks.iter().for_each(tokio::task::JoinHandle::abort);
        if let Some(t) = s.ticker.take() {
            t.abort();
        }
        s.follower.stopped();
        Ok(())
    }

    async fn handle(
        &self,
        myself: ActorRef<Self::Msg>,
        msg: Self::Msg,
        s: &mut FollowerState<F>,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            FollowMsg::Poll => match s.round(true).await {
                Ok(_) => {
                    s.backoff = FIRST_BACKOFF;
                    s.retrying = false;
                }
                Err(StorageError::Closed) => {
                    tracing::info!(stage = F::NAME, "the log is shut down; the follower stops");
                    myself.stop(None);
                }
                Err(e) => {
                    metrics::counter!("voxgate_stage_restarts_total", "stage" => F::NAME).increment(1);
                    tracing::error!(stage = F::NAME, error = %e, retry_ms = s.backoff.as_millis() as u64, "reading the logs failed; retrying");
                    if !s.retrying {
                        s.retrying = true;
                        myself.send_after(s.backoff, || FollowMsg::Poll);
                        s.backoff = (s.backoff * 2).min(MAX_BACKOFF);
                    }
                }
            },
            FollowMsg::Tick => {
                s.follower.tick().await;
                // A tick also picks up what a failed read left.
                if !s.retrying {
                    myself.cast(FollowMsg::Poll)?;
                }
            }
            FollowMsg::Own(m) => s.follower.message(m).await,
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;
    use voxgate_protocol::event::{AlertRaised, Event, Severity};
    use voxgate_protocol::time::SystemClock;
    use voxgate_protocol::{AccountSid, CallSid, EventId, Timestamp};
    use voxgate_storage::{topics, TopicSpec};

    /// Counts distinct calls (by event id) and records what each round saw.
    #[derive(Default)]
    struct Seen {
        ids: std::collections::BTreeSet<EventId>,
        settles: Vec<(bool, usize)>,
    }

    struct Counter(Arc<Mutex<Seen>>, usize);

    impl Follower for Counter {
        type Msg = std::convert::Infallible;
        const NAME: &'static str = "counter";
        const TOPICS: &'static [&'static str] = &[topics::CALLS];
        const LAG: &'static str = topics::CALLS;

        fn apply(&mut self, _: &'static str, env: Envelope) {
            if self.0.lock().unwrap().ids.insert(env.event_id) {
                self.1 += 1;
            }
        }

        async fn settle(&mut self, live: bool) {
            let n = std::mem::take(&mut self.1);
            self.0.lock().unwrap().settles.push((live, n));
        }
    }

    fn call(i: u128) -> Vec<u8> {
        voxgate_protocol::encode(&Envelope {
            event_id: EventId(i),
            tenant: AccountSid::from_u128(1),
            call: Some(CallSid::from_u128(i)),
            occurred_at: Timestamp(0),
            payload: Event::AlertRaised(AlertRaised {
                source: "test".into(),
                name: "n".into(),
                severity: Severity::Record,
                message: String::new(),
            }),
        })
    }

    #[tokio::test]
    async fn folds_the_past_before_it_runs_then_follows_live() {
        let dir = tempfile::tempdir().unwrap();
        let log = Log::open(dir.path(), &[TopicSpec::new(topics::CALLS, 2, Default::default())], Arc::new(SystemClock))
            .unwrap();
        for i in 0..5u128 {
            log.append(topics::CALLS, i as u64, &call(i)).await.unwrap();
        }
        // An event stored twice is folded once.
        log.append(topics::CALLS, 0, &call(0)).await.unwrap();
        let seen = Arc::new(Mutex::new(Seen::default()));
        let progress = Arc::new(Progress::new(2));
        let args = FollowerArgs {
            log: log.clone(),
            follower: Counter(seen.clone(), 0),
            progress: progress.clone(),
            from: None,
        };
        let (actor, done) = Actor::spawn(None, FollowerActor::<Counter>::default(), args).await.unwrap();
        assert_eq!(seen.lock().unwrap().settles.first(), Some(&(false, 5)), "the past, folded before spawn returned");
        for i in 5..8u128 {
            log.append(topics::CALLS, i as u64, &call(i)).await.unwrap();
        }
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while seen.lock().unwrap().ids.len() < 8 {
            assert!(std::time::Instant::now() < deadline, "live events never folded");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        actor.stop(None);
        done.await.unwrap();
        let s = seen.lock().unwrap();
        assert!(s.settles[1..].iter().all(|(live, _)| *live), "{:?}", s.settles);
        assert_eq!(s.settles.iter().map(|(_, n)| n).sum::<usize>(), 8);
        let heads: Vec<u64> = (0..2).map(|p| log.durable_head(topics::CALLS, p).unwrap()).collect();
        assert_eq!(progress.snapshot(), heads);
    }
}
