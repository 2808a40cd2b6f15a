//! One actor per call: its state machine, its media stream's single writer, its deadline.
//!
//! Layout:
//! - [`CallCore`]: the pure state machine (queued/ringing → in-progress → a terminal status),
//!   fed [`CallInput`]s with their event time, answering [`Effect`]s. No runtime needed to test it.
//! - [`StreamQueue`]: the bounded hand-off between the WebSocket and the actor, bounded by memory
//!   and by how long audio may wait (event time), not by a span of audio: a burst is kept whole;
//!   audio beyond the bounds is shed oldest first and counted, and control items (start, stop,
//!   faults) are never shed.
//! - [`CallActor`]: the ractor shell. It applies inputs, appends the resulting events, pumps the
//!   stream queue into the media log in order, and stops at a terminal status or the deadline.
//! - [`CallSupervisor`]: spawns call actors linked to itself, keeps the active-call gauge, and
//!   survives their failures (ractor's default would stop the supervisor).

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort, SupervisionEvent};
use tokio::sync::Notify;
use voxgate_protocol::event::{
    AudioShed, CallStatus, CallStatusChanged, CallTimedOut, Event, HangupRequested, MediaBatch, SpeechHints,
    StatusSource, StopReason, StreamDropped, StreamReattachRequested, StreamResumed, StreamStopped, Track,
};
use voxgate_protocol::{AccountSid, CallSid, Clock, Envelope, EventId, StreamSid, Timestamp};
use voxgate_storage::{topics, Log};

/// Event-id kinds for events derived from a call's inputs (see [`EventId::derive`]).
pub mod id_kind {
    pub const CALL_RECEIVED: u64 = 1;
    pub const CALL_REJECTED: u64 = 2;
    pub const STATUS_CALLBACK: u64 = 3;
    pub const STATUS_INFERRED: u64 = 4;
    pub const STREAM_STARTED: u64 = 5;
    pub const MEDIA_BATCH: u64 = 6;
    pub const DTMF: u64 = 7;
    pub const MARK: u64 = 8;
    pub const STREAM_STOPPED: u64 = 9;
    pub const STREAM_FAULT: u64 = 10;
    pub const AUDIO_SHED: u64 = 11;
    pub const TIMED_OUT: u64 = 12;
    pub const SPEECH_SEGMENT: u64 = 13;
    pub const TRANSCRIPT: u64 = 14;
    pub const QUOTA_WARNING: u64 = 15;
    pub const FRAUD_VERDICT: u64 = 16;
    pub const FRAUD_ALERT: u64 = 17;
    pub const FRAUD_HANGUP: u64 = 18;
    pub const CALL_HANGUP: u64 = 19;
    pub const TRIGGER_FIRED: u64 = 20;
    pub const TRIGGER_ALERT: u64 = 21;
    pub const TRIGGER_CALLBACK: u64 = 22;
    pub const BUDGET_EXCEEDED: u64 = 23;
    pub const BUDGET_ALERT: u64 = 24;
    pub const STREAM_DROPPED: u64 = 25;
    pub const STREAM_REATTACH: u64 = 26;
    pub const STREAM_RESUMED: u64 = 27;
    pub const DURATION_IMPLAUSIBLE: u64 = 28;
    pub const SPEECH_ENDED: u64 = 29;
    pub const TRANSCRIPTS_ENDED: u64 = 30;
    pub const SPEECH_PROGRESS: u64 = 31;
    pub const PARTIAL_TRANSCRIPT: u64 = 32;
    pub const SPEECH_HINTS: u64 = 33;
}

/// Per-call limits.
#[derive(Debug, Clone)]
pub struct CallConfig {
    /// voxgate ends a call that lasts longer than this (default 5 minutes).
    pub max_duration: Duration,
    /// Frames (20 ms each) per media-log record: 5 ⇒ about 100 ms.
    pub batch_frames: u32,
    /// Bytes of audio a call's stream queue may hold (both tracks) before the oldest is shed: a
    /// memory bound, so a burst of late audio (Twilio catching up after a network stall) is kept
    /// whole while the node has room.
    pub queue_bytes: usize,
    /// Audio that has waited this long in the queue (the log could not take it) is stale and
    /// shed, whatever the room.
    pub stale_audio: Duration,
    /// How many times a call's dropped stream is re-attached (0: never).
    pub reattach_attempts: u32,
    /// How long a call that ended (its `completed` callback, a hang-up, its maximum duration)
    /// waits for its stream's reader to hand over what the socket still held: Twilio does not
    /// promise to send the stream's last frames and `stop` before the callback. What the reader
    /// queues after this is counted as lost.
    pub stream_end_grace: Duration,
}

impl Default for CallConfig {
    fn default() -> Self {
        Self {
            max_duration: Duration::from_secs(300),
            batch_frames: 5,
            queue_bytes: 4 << 20,
            stale_audio: Duration::from_secs(60),
            reattach_attempts: 3,
            stream_end_grace: Duration::from_secs(5),
        }
    }
}

/// What a call actor asks of Twilio's REST API. The node implements it; tests point it at a fake
/// Twilio. The actor never waits on it: the answer comes back as a message.
pub trait CallControl: Send + Sync {
    /// Asks Twilio to connect the call's Media Stream again, with fresh TwiML. Resolves to
    /// Twilio's final HTTP status, or why the request failed.
    fn reattach_stream(
        &self,
        tenant: AccountSid,
        call: CallSid,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<u16, ControlError>> + Send>>;
}

/// Why a request to Twilio's REST API got no answer the call can use (recorded as text in the
/// call's `stream_reattach_requested` event).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ControlError {
    /// Twilio answered with a client error (not 404 or 429): the request is not retried.
    #[error("Twilio refused the request: HTTP {0}")]
    Refused(u16),
    /// No usable answer: the retries ran out, or a request that must not be repeated timed out.
    #[error("Twilio did not answer: {0}")]
    Unanswered(String),
    /// The request was never sent (no REST adapter, an unknown tenant, no TwiML).
    #[error("not sent to Twilio: {0}")]
    NotSent(String),
}

/// Why a call actor could not do what it was asked (a status callback, a hang-up).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CallError {
    /// The event log refused the call's events.
    #[error("the event log did not take the call's events: {0}")]
    Log(String),
    /// The call's events are held in its outbox until the log can write again.
    #[error("{0} call events wait for the event log")]
    Waiting(usize),
    /// The call's actor could not be spawned.
    #[error("the call's actor did not start: {0}")]
    Start(String),
}

// ---------------------------------------------------------------------------------------------
// Pure core

/// What happens to a call, in event time.
#[derive(Debug, Clone, PartialEq)]
pub enum CallInput {
    /// A Twilio status callback.
    Status { status: CallStatus, sequence: Option<u32>, duration_secs: Option<u32> },
    /// The media stream delivered its first audio: the call is answered.
    MediaFlowing,
    /// The media stream ended. A stream that ends without Twilio's `stop`
    /// ([`StopReason::Disconnected`]) was dropped while the call goes on.
    StreamEnded { reason: StopReason, stream_sid: Option<StreamSid> },
    /// Twilio answered the request to re-attach the stream after drop `attempt`.
    ReattachAnswered { attempt: u32, result: Result<u16, ControlError> },
    /// Time passed (the actor's deadline timer).
    Tick,
    /// A stage asked for the call to end (fraud, budget).
    Hangup { source: String, reason: String },
}

/// What the core asks its shell to do. Mostly `Record`s, consumed at once: boxing the event
/// would cost an allocation per event for nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq)]
pub enum Effect {
    /// Append to the calls log.
    Record(Event),
    /// Close the media stream (its WebSocket) for this reason.
    CloseStream(StopReason),
    /// Ask Twilio (REST) to attach a fresh stream to the call after drop `attempt`.
    Reattach { attempt: u32 },
    /// The call is over: stop the actor.
    Finish,
}

/// The call's state machine. Decisions depend only on inputs and the times passed in.
#[derive(Debug, Clone)]
pub struct CallCore {
    status: CallStatus,
    received_at: Timestamp,
    max_duration: Duration,
    seen_sequences: Vec<u32>,
    finished: bool,
    max_reattach: u32,
    drops: u32,
    /// The drop not yet followed by a new stream.
    gap: Option<Gap>,
}

/// A stream dropped and not yet replaced.
#[derive(Debug, Clone, PartialEq)]
struct Gap {
    since: Timestamp,
    previous: Option<StreamSid>,
}

impl CallCore {
    pub fn new(initial: CallStatus, received_at: Timestamp, max_duration: Duration) -> Self {
        Self {
            status: initial,
            received_at,
            max_duration,
            seen_sequences: Vec::new(),
            finished: initial.is_terminal(),
            max_reattach: 0,
            drops: 0,
            gap: None,
        }
    }

    /// Re-attach a dropped stream up to `attempts` times in the call's life.
    pub fn with_reattach(mut self, attempts: u32) -> Self {
        self.max_reattach = attempts;
        self
    }

    /// A stream started at `at`: if it follows a drop, the gap it closes (for the media log,
    /// just before the start). Once that is written, [`CallCore::close_gap`].
    pub fn resumed(&self, stream_sid: StreamSid, at: Timestamp) -> Option<StreamResumed> {
        let gap = self.gap.as_ref()?;
        Some(StreamResumed {
            previous: gap.previous,
            stream_sid,
            attempt: self.drops,
            gap_ms: (at.micros_since(gap.since) / 1000).max(0) as u64,
        })
    }

    /// The gap after a drop is on the log: the next stream does not resume it again.
    pub fn close_gap(&mut self) {
        self.gap = None;
    }

    pub fn status(&self) -> CallStatus {
        self.status
    }

    pub fn is_finished(&self) -> bool {
        self.finished
    }

    /// When its webhook was received.
    pub fn received_at(&self) -> Timestamp {
        self.received_at
    }

    /// When the call must end at the latest.
    pub fn deadline(&self) -> Timestamp {
        self.received_at.add_millis(self.max_duration.as_millis() as i64)
    }

    /// Applies one input observed at `now`.
    pub fn apply(&mut self, input: CallInput, now: Timestamp) -> Vec<Effect> {
        let mut fx = Vec::new();
        if self.finished {
            // A late callback after the end is still recorded, never acted on.
            if let CallInput::Status { status, sequence, duration_secs } = input {
                if self.first_time(sequence) {
                    fx.push(Effect::Record(status_event(status, StatusSource::Callback, sequence, duration_secs)));
                }
            }
            return fx;
        }
        match input {
            CallInput::Status { status, sequence, duration_secs } => {
                if !self.first_time(sequence) {
                    return fx;
                }
                fx.push(Effect::Record(status_event(status, StatusSource::Callback, sequence, duration_secs)));
                if status.is_terminal() {
                    self.status = status;
                    self.end(StopReason::CallEnded, &mut fx);
                } else if rank(status) > rank(self.status) {
                    // Callbacks can arrive out of order: never step back.
                    self.status = status;
                }
            }
            CallInput::MediaFlowing => {
                if rank(self.status) < rank(CallStatus::InProgress) {
                    self.status = CallStatus::InProgress;
                    fx.push(Effect::Record(status_event(CallStatus::InProgress, StatusSource::Stream, None, None)));
                }
            }
            CallInput::StreamEnded { reason, stream_sid } => {
                // The stream can end before Twilio's completed callback; the call lives on until
                // the callback or the deadline. Twilio says `stop` when it ends a stream, so a
                // socket that closed without it was dropped: ask for a fresh one, a few times.
                if reason == StopReason::Disconnected {
                    self.drops += 1;
                    let reattach = self.drops <= self.max_reattach;
                    fx.push(Effect::Record(Event::StreamDropped(StreamDropped {
                        stream_sid,
                        attempt: self.drops,
                        reattach,
                    })));
                    if reattach {
                        // A stream that drops before its start keeps the gap open from the first drop.
                        let previous = self.gap.as_ref().map_or(stream_sid, |g| g.previous.or(stream_sid));
                        let since = self.gap.as_ref().map_or(now, |g| g.since);
                        self.gap = Some(Gap { since, previous });
                        fx.push(Effect::Reattach { attempt: self.drops });
                    }
                }
            }
            CallInput::ReattachAnswered { attempt, result } => {
                let (twilio_status, error) = match result {
                    Ok(status) => (Some(status), None),
                    Err(e) => (None, Some(e.to_string())),
                };
                fx.push(Effect::Record(Event::StreamReattachRequested(StreamReattachRequested {
                    attempt,
                    twilio_status,
                    error,
                })));
            }
            CallInput::Hangup { source, reason } => {
                fx.push(Effect::Record(Event::HangupRequested(HangupRequested { source, reason })));
                let secs = (now.micros_since(self.received_at) / 1_000_000).max(0) as u32;
                self.status = CallStatus::Completed;
                fx.push(Effect::Record(status_event(CallStatus::Completed, StatusSource::Voxgate, None, Some(secs))));
                self.end(StopReason::CallEnded, &mut fx);
            }
            CallInput::Tick => {
                if now >= self.deadline() {
                    fx.push(Effect::Record(Event::CallTimedOut(CallTimedOut {
                        max_duration_secs: self.max_duration.as_secs() as u32,
                    })));
                    let secs = (now.micros_since(self.received_at) / 1_000_000).max(0) as u32;
                    self.status = CallStatus::Completed;
                    fx.push(Effect::Record(status_event(
                        CallStatus::Completed,
                        StatusSource::Voxgate,
                        None,
                        Some(secs),
                    )));
                    self.end(StopReason::CallEnded, &mut fx);
                }
            }
        }
        fx
    }

    fn first_time(&mut self, sequence: Option<u32>) -> bool {
        match sequence {
            Some(s) if self.seen_sequences.contains(&s) => false,
            Some(s) => {
                self.seen_sequences.push(s);
                true
            }
            None => true,
        }
    }

    fn end(&mut self, reason: StopReason, fx: &mut Vec<Effect>) {
        self.finished = true;
        fx.push(Effect::CloseStream(reason));
        fx.push(Effect::Finish);
    }
}

fn rank(s: CallStatus) -> u8 {
    match s {
        CallStatus::Queued => 0,
        CallStatus::Initiated => 1,
        CallStatus::Ringing => 2,
        CallStatus::InProgress => 3,
        _ => 4,
    }
}

fn status_event(status: CallStatus, source: StatusSource, sequence: Option<u32>, duration_secs: Option<u32>) -> Event {
    Event::CallStatusChanged(CallStatusChanged { status, source, sequence, duration_secs })
}

// ---------------------------------------------------------------------------------------------
// Stream queue

/// One item for the media log, in stream order.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub enum StreamItem {
    /// Audio; may be shed when the writer falls behind.
    Audio(MediaBatch),
    /// Anything else on the stream (start, dtmf, mark, fault, stop); never shed.
    Control(Event),
}

#[derive(Default)]
struct QueueState {
    items: VecDeque<(Timestamp, StreamItem)>,
    audio_bytes: usize,
    shed_frames: u32,
    closed: Option<StopReason>,
    /// The call's actor stopped: nobody takes what is pushed now.
    retired: bool,
}

/// The bounded queue between a call's WebSocket and its actor: bounded by memory (bytes of
/// audio) and by staleness (how long audio has waited, in event time), never by a fixed span
/// of audio, so audio that arrives faster than real time is kept while there is room.
pub struct StreamQueue {
    state: Mutex<QueueState>,
    max_bytes: usize,
    stale_us: i64,
    ready: Notify,
    close: Notify,
}

impl StreamQueue {
    pub fn new(max_bytes: usize, stale: Duration) -> Arc<Self> {
        Arc::new(Self {
            state: Mutex::new(QueueState::default()),
            max_bytes: max_bytes.max(160),
            stale_us: i64::try_from(stale.as_micros()).unwrap_or(i64::MAX),
            ready: Notify::new(),
            close: Notify::new(),
        })
    }

    /// Queues an item observed at `at`. Audio beyond the bounds pushes out the oldest audio.
    /// Returns the frames shed by this push. An item pushed after the call's actor stopped is
    /// lost, and counted (`voxgate_stream_items_lost_total`).
    pub fn push(&self, at: Timestamp, item: StreamItem) -> u32 {
        let shed = {
            let Ok(mut s) = self.state.lock() else {
                return 0;
            };
            if s.retired {
                count_lost([&item]);
                return 0;
            }
            if let StreamItem::Audio(b) = &item {
                s.audio_bytes += b.payload.len();
            }
            s.items.push_back((at, item));
            self.keep_bound(&mut s, at)
        };
        self.ready.notify_one();
        shed
    }

    /// Puts back, in front of anything queued since, items the log could not take (it cannot
    /// write just now). The bounds still hold: the oldest audio is shed first.
    pub fn requeue(&self, items: Vec<(Timestamp, StreamItem)>) {
        let Ok(mut s) = self.state.lock() else { return };
        let newest = items.iter().map(|(at, _)| *at).chain(s.items.iter().map(|(at, _)| *at)).max();
        for (at, item) in items.into_iter().rev() {
            if let StreamItem::Audio(b) = &item {
                s.audio_bytes += b.payload.len();
            }
            s.items.push_front((at, item));
        }
        if let Some(now) = newest {
            self.keep_bound(&mut s, now);
        }
    }

    /// Sheds the oldest audio while the queue holds more than its bytes, or audio older than the
    /// staleness bound at `now`; returns the frames shed.
    fn keep_bound(&self, s: &mut QueueState, now: Timestamp) -> u32 {
        let mut shed = 0;
        while let Some(i) = s.items.iter().position(|(_, it)| matches!(it, StreamItem::Audio(_))) {
            let stale = now.micros_since(s.items[i].0) > self.stale_us;
            if s.audio_bytes <= self.max_bytes && !stale {
                break;
            }
            if let Some((_, StreamItem::Audio(b))) = s.items.remove(i) {
                s.audio_bytes -= b.payload.len();
                shed += b.frames;
            }
        }
        s.shed_frames += shed;
        shed
    }

    /// Counts frames shed before the queue got them (by an ingress node that held them for a
    /// call node that did not answer); the next [`take`](Self::take) reports them.
    pub fn add_shed(&self, frames: u32) {
        if frames == 0 {
            return;
        }
        if let Ok(mut s) = self.state.lock() {
            s.shed_frames = s.shed_frames.saturating_add(frames);
        }
        self.ready.notify_one();
    }

    /// Takes everything queued, and the frames shed since the last take.
    pub fn take(&self, into: &mut Vec<(Timestamp, StreamItem)>) -> u32 {
        let Ok(mut s) = self.state.lock() else {
            return 0;
        };
        into.extend(s.items.drain(..));
        s.audio_bytes = 0;
        std::mem::take(&mut s.shed_frames)
    }

    /// Waits until something is queued.
    pub async fn ready(&self) {
        self.ready.notified().await
    }

    /// Asks the WebSocket side to close the stream.
    pub fn close(&self, reason: StopReason) {
        if let Ok(mut s) = self.state.lock() {
            s.closed.get_or_insert(reason);
        }
        self.close.notify_waiters();
        self.close.notify_one();
    }

    /// Queues an item behind everything waiting, even in a retired queue (the actor's own
    /// record, written by its next pump).
    fn push_behind(&self, at: Timestamp, item: StreamItem) {
        if let Ok(mut s) = self.state.lock() {
            s.items.push_back((at, item));
        }
    }

    /// Nobody reads the queue any more (its actor stopped, or the link to it is lost): what is
    /// pushed from now on is refused and counted as lost (the last [`take`](Self::take) after
    /// this gets everything pushed before it).
    pub fn retire(&self) {
        if let Ok(mut s) = self.state.lock() {
            s.retired = true;
        }
    }

    /// Why the actor closed the stream, if it did.
    pub fn closed(&self) -> Option<StopReason> {
        self.state.lock().ok().and_then(|s| s.closed.clone())
    }

    /// Resolves when the actor closes the stream.
    pub async fn wait_closed(&self) -> StopReason {
        loop {
            let n = self.close.notified();
            if let Some(r) = self.closed() {
                return r;
            }
            n.await;
        }
    }
}

/// Counts stream items that will never reach the media log (`voxgate_stream_items_lost_total`,
/// and their audio in `voxgate_stream_frames_lost_total`).
pub fn count_lost<'a>(items: impl IntoIterator<Item = &'a StreamItem>) {
    let (mut n, mut frames) = (0u64, 0u64);
    for i in items {
        n += 1;
        if let StreamItem::Audio(b) = i {
            frames += u64::from(b.frames);
        }
    }
    if n > 0 {
        metrics::counter!("voxgate_stream_items_lost_total").increment(n);
        metrics::counter!("voxgate_stream_frames_lost_total").increment(frames);
    }
}

// ---------------------------------------------------------------------------------------------
// Actor

/// Messages a call actor takes.
pub enum CallMsg {
    /// A status callback; replies once its event is durable.
    Status {
        status: CallStatus,
        sequence: Option<u32>,
        duration_secs: Option<u32>,
        reply: RpcReplyPort<Result<(), CallError>>,
    },
    /// Whose call this is and since when (for checking a stream's signature and a callback's
    /// tenant and duration).
    Identity(RpcReplyPort<CallIdentity>),
    /// The WebSocket for this call opened; the actor hands back the queue to feed.
    AttachStream { reply: RpcReplyPort<Option<Arc<StreamQueue>>> },
    /// Audio is flowing (first media frame).
    MediaFlowing,
    /// The WebSocket side is gone, for this reason; everything it queued is in the queue.
    StreamEnded { reason: StopReason },
    /// The node that took the call over heard of no stream for it for a while: the stream is
    /// dropped (as [`CallMsg::StreamEnded`], disconnected) unless one attached to this actor.
    StreamAbsent,
    /// Twilio answered the request to re-attach the stream after drop `attempt`.
    Reattached { attempt: u32, result: Result<u16, ControlError> },
    /// Work is waiting in the stream queue.
    Pump,
    /// The deadline timer.
    Tick,
    /// End the call now (a stage asked: fraud, budget); replies once it is recorded (or, while
    /// the log cannot write, waits in the call's outbox).
    Hangup { source: String, reason: String, reply: RpcReplyPort<Result<(), CallError>> },
    /// Try again what the log could not take (it could not write for a while).
    Retry,
    /// The call ended a while ago and its stream's reader has still not said it is done: stop
    /// waiting for it.
    StreamGraceOver,
    /// A real-time transcription of the call brought vocabulary hints: they join the call's, for
    /// its speech from now on.
    AddHints(String),
    /// Replies once everything queued on the stream before it is in the media log (or waits in
    /// the call for a log that cannot write): a call node acknowledges an ingress node's audio.
    Sync(RpcReplyPort<()>),
}

/// A call's owner and the time its webhook was received.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CallIdentity {
    pub tenant: AccountSid,
    pub received_at: Timestamp,
}

/// Everything a call actor needs.
pub struct CallArgs {
    pub tenant: AccountSid,
    pub call: CallSid,
    pub status: CallStatus,
    pub received_at: Timestamp,
    pub config: CallConfig,
    pub log: Log,
    pub clock: Arc<dyn Clock>,
    /// Held for the actor's life and dropped when it ends (the tenant's quota place of the call).
    pub quota_slot: Option<Box<dyn std::any::Any + Send + Sync>>,
    /// Twilio's REST API, for re-attaching a dropped stream (`None`: drops are recorded only).
    pub control: Option<Arc<dyn CallControl>>,
    /// The tenant's vocabulary hints for its calls' speech, when the call was accepted.
    pub hints: String,
}

/// A call actor's state.
pub struct CallActorState {
    tenant: AccountSid,
    call: CallSid,
    core: CallCore,
    log: Log,
    clock: Arc<dyn Clock>,
    queue: Option<Arc<StreamQueue>>,
    /// The stream behind `queue` has ended; another may attach.
    stream_ended: bool,
    control: Option<Arc<dyn CallControl>>,
    queue_bytes: usize,
    stale_audio: Duration,
    stream_sid: Option<StreamSid>,
    frames: u64,
    pump_task: Option<tokio::task::JoinHandle<()>>,
    drained: Vec<(Timestamp, StreamItem)>,
    encode_buf: Vec<u8>,
    /// Calls-log events the log could not take yet, in order (it could not write for a while).
    outbox: Vec<Vec<u8>>,
    /// A retry is scheduled.
    retrying: bool,
    /// The call is over; the actor stops once the outbox is empty, no media waits and the
    /// stream's reader handed over what it held (a call that ends with its stream open closes
    /// it and waits, at most `stream_end_grace`, for [`CallMsg::StreamEnded`]).
    finishing: bool,
    stream_end_grace: Duration,
    /// Media went back to the stream queue because the log could not take it.
    media_pending: bool,
    stream_stopped_recorded: bool,
    /// The vocabulary hints of the call's speech (the tenant's, then its transcriptions').
    hints: Hints,
    _quota_slot: Option<Box<dyn std::any::Any + Send + Sync>>,
}

impl CallActorState {
    /// A stream is attached and its reader has not said it ended.
    fn stream_open(&self) -> bool {
        self.queue.is_some() && !self.stream_ended
    }
}

/// The actor shell around [`CallCore`].
pub struct CallActor;

impl CallActor {
    /// The registry name of a call's actor.
    pub fn name(call: CallSid) -> String {
        format!("call:{call}")
    }

    /// Finds a running call's actor.
    pub fn find(call: CallSid) -> Option<ActorRef<CallMsg>> {
        ractor::registry::where_is(Self::name(call)).map(ActorRef::from)
    }

    /// Every call whose actor runs in this process.
    pub fn running() -> Vec<CallSid> {
        ractor::registry::registered()
            .iter()
            .filter_map(|n| n.strip_prefix("call:").and_then(|s| CallSid::parse(s).ok()))
            .collect()
    }
}

impl Actor for CallActor {
    type Msg = CallMsg;
    type State = CallActorState;
    type Arguments = CallArgs;

    async fn pre_start(&self, myself: ActorRef<CallMsg>, a: CallArgs) -> Result<CallActorState, ActorProcessingErr> {
        let core =
            CallCore::new(a.status, a.received_at, a.config.max_duration).with_reattach(a.config.reattach_attempts);
        // The deadline runs on the runtime's timer; the decision is the core's, in event time.
        let remaining = core.deadline().micros_since(a.clock.now()).max(0) as u64;
        myself.send_after(Duration::from_micros(remaining) + Duration::from_millis(5), || CallMsg::Tick);
        metrics::gauge!("twilio_active_calls").increment(1.0);
        Ok(CallActorState {
            tenant: a.tenant,
            call: a.call,
            core,
            log: a.log,
            clock: a.clock,
            queue: None,
            stream_ended: false,
            control: a.control,
            queue_bytes: a.config.queue_bytes,
            stale_audio: a.config.stale_audio,
            stream_sid: None,
            frames: 0,
            pump_task: None,
            drained: Vec::new(),
            encode_buf: Vec::with_capacity(1024),
            outbox: Vec::new(),
            retrying: false,
            finishing: false,
            stream_end_grace: a.config.stream_end_grace,
            media_pending: false,
            stream_stopped_recorded: false,
            hints: Hints::new(&a.hints),
            _quota_slot: a.quota_slot,
        })
    }

    async fn post_stop(&self, _myself: ActorRef<CallMsg>, s: &mut CallActorState) -> Result<(), ActorProcessingErr> {
        // Whatever the WebSocket queued still reaches the log; anything later is counted lost.
        if let Some(q) = &s.queue {
            q.retire();
        }
        if let Err(e) = pump(&_myself, s).await {
            tracing::error!(stage = "call", call_sid = %s.call, tenant = %s.tenant, error = %e, "media lost at call end");
        }
        if s.media_pending || !s.outbox.is_empty() {
            metrics::counter!("voxgate_call_events_lost_total")
                .increment(s.outbox.len() as u64 + u64::from(s.media_pending));
            tracing::error!(stage = "call", call_sid = %s.call, tenant = %s.tenant, events = s.outbox.len(), media = s.media_pending, "the call stopped while the event log could not write; its last events are lost");
        }
        if let Some(q) = &s.queue {
            q.close(StopReason::CallEnded);
        }
        if let Some(t) = s.pump_task.take() {
            t.abort();
        }
        metrics::gauge!("twilio_active_calls").decrement(1.0);
        tracing::info!(stage = "call", call_sid = %s.call, tenant = %s.tenant, status = %s.core.status(), "call actor stopped");
        Ok(())
    }

    async fn handle(
        &self,
        myself: ActorRef<CallMsg>,
        msg: CallMsg,
        s: &mut CallActorState,
    ) -> Result<(), ActorProcessingErr> {
        let now = s.clock.now();
        match msg {
            CallMsg::Status { status, sequence, duration_secs, reply } => {
                let fx = s.core.apply(CallInput::Status { status, sequence, duration_secs }, now);
                let mut r =
                    run_effects(&myself, s, fx, now, Some(sequence)).await.map_err(|e| CallError::Log(e.to_string()));
                // Twilio's retry of this callback finds it applied; it is answered once durable.
                if r.is_ok() && !drain_outbox(&myself, s).await? {
                    r = Err(CallError::Waiting(s.outbox.len()));
                }
                let _ = reply.send(r);
            }
            CallMsg::Identity(reply) => {
                let _ = reply.send(CallIdentity { tenant: s.tenant, received_at: s.core.received_at() });
            }
            CallMsg::AttachStream { reply } => {
                if s.core.is_finished() || s.stream_open() {
                    let _ = reply.send(None);
                    return Ok(());
                }
                if s.queue.is_some() {
                    // A stream after the previous one ended (a re-attach after a drop): it starts
                    // afresh, with its own sid, frame count and stop. Not before the previous
                    // stream's media is in the log (it waits there while the log cannot write).
                    pump(&myself, s).await?;
                    if s.media_pending {
                        let _ = reply.send(None);
                        return Ok(());
                    }
                    if let Some(t) = s.pump_task.take() {
                        t.abort();
                    }
                    s.stream_sid = None;
                    s.frames = 0;
                    s.stream_stopped_recorded = false;
                }
                s.stream_ended = false;
                let q = StreamQueue::new(s.queue_bytes, s.stale_audio);
                let q2 = q.clone();
                let me = myself.clone();
                s.pump_task = Some(tokio::spawn(async move {
                    loop {
                        q2.ready().await;
                        if me.cast(CallMsg::Pump).is_err() {
                            return;
                        }
                    }
                }));
                s.queue = Some(q.clone());
                let _ = reply.send(Some(q));
            }
            CallMsg::MediaFlowing => {
                let fx = s.core.apply(CallInput::MediaFlowing, now);
                run_effects(&myself, s, fx, now, None).await?;
            }
            CallMsg::Pump => pump(&myself, s).await?,
            CallMsg::Sync(reply) => {
                pump(&myself, s).await?;
                let _ = reply.send(());
            }
            CallMsg::AddHints(h) => {
                if !s.hints.add(&h) {
                    return Ok(());
                }
                // On the media log in order with the audio: the stream's speech from here on.
                if let (Some(q), Some(sid), false) = (&s.queue, s.stream_sid, s.stream_ended) {
                    let ev =
                        Event::SpeechHints(SpeechHints { stream_sid: sid, track: None, hints: s.hints.text.clone() });
                    q.push(now, StreamItem::Control(ev));
                }
            }
            CallMsg::Retry => {
                s.retrying = false;
                if drain_outbox(&myself, s).await? {
                    pump(&myself, s).await?;
                    stop_if_done(&myself, s);
                }
            }
            CallMsg::StreamGraceOver => {
                let waiting = s.core.is_finished() && s.stream_open();
                if let (true, Some(q)) = (waiting, s.queue.clone()) {
                    // As the warning says: nothing the reader pushes from now on is written.
                    q.retire();
                    let reason = q.closed().unwrap_or(StopReason::CallEnded);
                    metrics::counter!("voxgate_stream_end_grace_expired_total").increment(1);
                    tracing::warn!(stage = "call", call_sid = %s.call, tenant = %s.tenant, grace = ?s.stream_end_grace, "the call ended but its stream's reader did not hand over the rest in time; what it queues from now on is lost");
                    stream_ended(&myself, s, reason, now).await?;
                }
            }
            CallMsg::StreamEnded { reason } => stream_ended(&myself, s, reason, now).await?,
            // A stream that attached here (on whichever path) ends on its own.
            CallMsg::StreamAbsent if s.queue.is_some() => {}
            CallMsg::StreamAbsent => stream_ended(&myself, s, StopReason::Disconnected, now).await?,
            CallMsg::Reattached { attempt, result } => {
                let outcome = if result.as_ref().is_ok_and(|st| (200..300).contains(st)) { "ok" } else { "failed" };
                metrics::counter!("voxgate_stream_reattach_total", "outcome" => outcome).increment(1);
                tracing::info!(stage = "call", call_sid = %s.call, tenant = %s.tenant, attempt, ?result, "Twilio answered the stream re-attach");
                let fx = s.core.apply(CallInput::ReattachAnswered { attempt, result }, now);
                run_effects(&myself, s, fx, now, None).await?;
            }
            CallMsg::Hangup { source, reason, reply } => {
                tracing::warn!(stage = "call", call_sid = %s.call, tenant = %s.tenant, %source, %reason, "ending the call");
                let fx = s.core.apply(CallInput::Hangup { source, reason }, now);
                let r = run_effects(&myself, s, fx, now, None).await;
                let _ = reply.send(r.as_ref().map(|_| ()).map_err(|e| CallError::Log(e.to_string())));
                r?;
            }
            CallMsg::Tick => {
                // The call ends at its deadline, even if the timer fires late (or the node was
                // down then and restored the call).
                let now = now.min(s.core.deadline());
                if s.core.is_finished() {
                    // Over already (its last events wait for the log): no deadline left to keep.
                    return Ok(());
                }
                let fx = s.core.apply(CallInput::Tick, now);
                if fx.is_empty() {
                    let remaining = s.core.deadline().micros_since(now).max(0) as u64;
                    myself.send_after(Duration::from_micros(remaining) + Duration::from_millis(5), || CallMsg::Tick);
                } else {
                    tracing::warn!(stage = "call", call_sid = %s.call, tenant = %s.tenant, "call reached its maximum duration");
                    run_effects(&myself, s, fx, now, None).await?;
                }
            }
        }
        Ok(())
    }
}

async fn run_effects(
    myself: &ActorRef<CallMsg>,
    s: &mut CallActorState,
    fx: Vec<Effect>,
    now: Timestamp,
    callback_sequence: Option<Option<u32>>,
) -> Result<(), voxgate_storage::StorageError> {
    let mut n = 0u128;
    for e in fx {
        match e {
            Effect::Record(ev) => {
                let id = match (&ev, callback_sequence) {
                    (Event::CallStatusChanged(c), Some(Some(seq))) if c.source == StatusSource::Callback => {
                        EventId::derive(id_kind::STATUS_CALLBACK, &[s.call.as_u128(), u128::from(seq)])
                    }
                    (Event::CallTimedOut(_), _) => EventId::derive(id_kind::TIMED_OUT, &[s.call.as_u128()]),
                    (Event::HangupRequested(_), _) => EventId::derive(id_kind::CALL_HANGUP, &[s.call.as_u128()]),
                    // Attempts count from 1 again in a call restored after a restart.
                    (Event::StreamDropped(d), _) => EventId::derive(
                        id_kind::STREAM_DROPPED,
                        &[s.call.as_u128(), u128::from(d.attempt), stream_key(d.stream_sid, now)],
                    ),
                    (Event::StreamReattachRequested(r), _) => EventId::derive(
                        id_kind::STREAM_REATTACH,
                        &[s.call.as_u128(), u128::from(r.attempt), now.as_micros() as u128],
                    ),
                    (Event::CallStatusChanged(c), _) => EventId::derive(
                        id_kind::STATUS_INFERRED,
                        &[s.call.as_u128(), c.status as u128, now.as_micros() as u128, n],
                    ),
                    _ => EventId::derive(id_kind::STATUS_INFERRED, &[s.call.as_u128(), now.as_micros() as u128, n]),
                };
                n += 1;
                let env =
                    Envelope { event_id: id, tenant: s.tenant, call: Some(s.call), occurred_at: now, payload: ev };
                s.encode_buf.clear();
                voxgate_protocol::encode_into(&env, &mut s.encode_buf)
                    .map_err(|e| voxgate_storage::StorageError::Engine(e.to_string()))?;
                if !s.outbox.is_empty() {
                    // Behind events still waiting: in order, after them.
                    s.outbox.push(s.encode_buf.clone());
                    drain_outbox(myself, s).await?;
                    continue;
                }
                match s.log.append_or_spool(topics::CALLS, s.call.partition_key(), &s.encode_buf).await {
                    Ok(_) => {}
                    Err(e) if waits(&e) => {
                        tracing::warn!(stage = "call", call_sid = %s.call, tenant = %s.tenant, error = %e, "the event log cannot write; the call's events wait");
                        s.outbox.push(s.encode_buf.clone());
                        schedule_retry(myself, s);
                    }
                    Err(e) => return Err(e),
                }
            }
            Effect::CloseStream(reason) => {
                pump(myself, s).await?;
                if let Some(q) = &s.queue {
                    q.close(reason.clone());
                }
                if s.stream_open() {
                    // The reader may still hold frames the socket brought before it saw the
                    // close (Twilio sends the callback without waiting for the stream): the
                    // stop is recorded after them, when the reader says it is done.
                    myself.send_after(s.stream_end_grace, || CallMsg::StreamGraceOver);
                } else {
                    record_stream_stopped(myself, s, reason, now).await?;
                }
            }
            Effect::Reattach { attempt } => {
                let me = myself.clone();
                let request = s.control.as_ref().map(|c| c.reattach_stream(s.tenant, s.call));
                tokio::spawn(async move {
                    let result = match request {
                        Some(r) => r.await,
                        None => Err(ControlError::NotSent("no Twilio REST adapter configured".to_owned())),
                    };
                    // The call may have ended meanwhile; then nobody needs the answer.
                    let _ = me.cast(CallMsg::Reattached { attempt, result });
                });
            }
            Effect::Finish => {
                // Not before its last events are in the log and its stream's reader is done.
                s.finishing = true;
                stop_if_done(myself, s);
            }
        }
    }
    Ok(())
}

/// Stops a finished call once nothing of it waits: its outbox and media are in the log and its
/// stream's reader handed over what it held.
fn stop_if_done(myself: &ActorRef<CallMsg>, s: &CallActorState) {
    if s.finishing && s.outbox.is_empty() && !s.media_pending && !s.stream_open() {
        myself.stop(Some("call ended".into()));
    }
}

/// A log error the call waits out (the log cannot write for now) rather than fails on.
fn waits(e: &voxgate_storage::StorageError) -> bool {
    matches!(e, voxgate_storage::StorageError::Unavailable(_) | voxgate_storage::StorageError::Flush(_))
}

fn schedule_retry(myself: &ActorRef<CallMsg>, s: &mut CallActorState) {
    if !s.retrying {
        s.retrying = true;
        myself.send_after(Duration::from_millis(500), || CallMsg::Retry);
    }
}

/// Appends the events waiting in the outbox, in order; true once it is empty.
async fn drain_outbox(
    myself: &ActorRef<CallMsg>,
    s: &mut CallActorState,
) -> Result<bool, voxgate_storage::StorageError> {
    let mut done = 0;
    let mut result = Ok(());
    for ev in &s.outbox {
        match s.log.append_or_spool(topics::CALLS, s.call.partition_key(), ev).await {
            Ok(_) => done += 1,
            Err(e) => {
                result = Err(e);
                break;
            }
        }
    }
    s.outbox.drain(..done);
    match result {
        Ok(()) => Ok(true),
        Err(e) if waits(&e) => {
            schedule_retry(myself, s);
            Ok(false)
        }
        Err(e) => Err(e),
    }
}

/// The call's stream ended for `reason`: a drop (disconnected) is recorded, and the call asks
/// Twilio for a fresh stream while it goes on.
async fn stream_ended(
    myself: &ActorRef<CallMsg>,
    s: &mut CallActorState,
    reason: StopReason,
    now: Timestamp,
) -> Result<(), ActorProcessingErr> {
    // The call ended first and closed the stream (`Effect::CloseStream`), with this reason.
    let closed = if s.core.is_finished() && s.stream_open() { s.queue.as_ref().and_then(|q| q.closed()) } else { None };
    pump(myself, s).await?;
    // A stream whose reader could not say so itself (its ingress node died).
    if reason == StopReason::Disconnected {
        record_stream_stopped(myself, s, reason.clone(), now).await?;
    }
    s.stream_ended = true;
    if let Some(closed) = closed {
        // Everything the reader held is in now.
        record_stream_stopped(myself, s, closed, now).await?;
        stop_if_done(myself, s);
        return Ok(());
    }
    if reason == StopReason::Disconnected && !s.core.is_finished() {
        metrics::counter!("voxgate_stream_drops_total").increment(1);
        tracing::warn!(stage = "call", call_sid = %s.call, tenant = %s.tenant, stream_sid = ?s.stream_sid, "media stream dropped while the call goes on");
    }
    let fx = s.core.apply(CallInput::StreamEnded { reason, stream_sid: s.stream_sid }, now);
    run_effects(myself, s, fx, now, None).await?;
    Ok(())
}

async fn record_stream_stopped(
    myself: &ActorRef<CallMsg>,
    s: &mut CallActorState,
    reason: StopReason,
    now: Timestamp,
) -> Result<(), voxgate_storage::StorageError> {
    if s.stream_stopped_recorded || s.stream_sid.is_none() {
        return Ok(());
    }
    let ev = Event::StreamStopped(StreamStopped { stream_sid: s.stream_sid, reason, frames: s.frames });
    if let (true, Some(q)) = (s.media_pending, &s.queue) {
        // Audio waits in the queue for the log: the stop goes behind it, not in front.
        q.push_behind(now, StreamItem::Control(ev));
        return Ok(());
    }
    let mut items = vec![(now, StreamItem::Control(ev))];
    write_media(myself, s, &mut items).await
}

/// Moves everything the WebSocket queued into the media log, in order.
async fn pump(myself: &ActorRef<CallMsg>, s: &mut CallActorState) -> Result<(), voxgate_storage::StorageError> {
    let Some(q) = s.queue.clone() else {
        return Ok(());
    };
    let mut items = std::mem::take(&mut s.drained);
    let shed = q.take(&mut items);
    if shed > 0 {
        let sid = s.stream_sid.or_else(|| {
            items.iter().find_map(|(_, it)| match it {
                StreamItem::Audio(b) => Some(b.stream_sid),
                StreamItem::Control(Event::StreamStarted(st)) => Some(st.stream_sid),
                _ => None,
            })
        });
        if let Some(sid) = sid {
            // Just before the audio that survived, so the timeline reads in order.
            let pos = items.iter().position(|(_, it)| matches!(it, StreamItem::Audio(_))).unwrap_or(items.len());
            let at = items.get(pos).or(items.last()).map(|(t, _)| *t).unwrap_or_else(|| s.clock.now());
            metrics::counter!("voxgate_audio_shed_frames_total").increment(u64::from(shed));
            tracing::warn!(stage = "call", call_sid = %s.call, tenant = %s.tenant, frames = shed, "stream fell behind; shed stale audio");
            let ev = Event::AudioShed(AudioShed { stream_sid: sid, frames: shed, audio_ms: shed * 20 });
            items.insert(pos, (at, StreamItem::Control(ev)));
        }
    }
    if items.is_empty() {
        s.drained = items;
        return Ok(());
    }
    let r = write_media(myself, s, &mut items).await;
    // Empty again, with its capacity, for the next pump.
    s.drained = items;
    r
}

/// [`append_media_events`]; when the log cannot write for now, the items go back to the front
/// of the stream queue (which sheds the oldest audio, and says so, if they wait too long).
async fn write_media(
    myself: &ActorRef<CallMsg>,
    s: &mut CallActorState,
    items: &mut Vec<(Timestamp, StreamItem)>,
) -> Result<(), voxgate_storage::StorageError> {
    let Some(q) = s.queue.clone() else {
        let r = append_media_events(s, items).await;
        items.clear();
        return r;
    };
    let saved = (s.frames, s.stream_sid, s.stream_stopped_recorded);
    match append_media_events(s, items).await {
        Ok(()) => {
            items.clear();
            s.media_pending = false;
            Ok(())
        }
        Err(e) if waits(&e) => {
            // The batch is not acknowledged: undo what writing it counted and write it again
            // later (records of it that did reach the disk come again under the same ids).
            (s.frames, s.stream_sid, s.stream_stopped_recorded) = saved;
            q.requeue(std::mem::take(items));
            s.media_pending = true;
            schedule_retry(myself, s);
            Ok(())
        }
        Err(e) => Err(e),
    }
}

async fn append_media_events(
    s: &mut CallActorState,
    items: &[(Timestamp, StreamItem)],
) -> Result<(), voxgate_storage::StorageError> {
    let mut encoded: Vec<Vec<u8>> = Vec::with_capacity(items.len());
    // The gap this batch closes (a new stream after a drop), in ms.
    let mut closes_gap = None;
    // The oldest item's arrival: how long audio waits between the WebSocket and the durable log.
    let oldest = items.first().map(|(at, _)| *at);
    // The stream's hints, recorded just after its start.
    let mut after_start: Option<(EventId, Event)> = None;
    for (at, item) in items {
        let at = *at;
        // Items stay with the caller until the log has them; a batch's payload is shared, not copied.
        let (id, ev) = match item {
            StreamItem::Audio(b) => {
                s.frames += u64::from(b.frames);
                (
                    EventId::derive(id_kind::MEDIA_BATCH, &[b.stream_sid.as_u128(), u128::from(b.first_sequence)]),
                    Event::MediaBatch(b.clone()),
                )
            }
            StreamItem::Control(ev) => {
                let mut ev = ev.clone();
                match &mut ev {
                    Event::StreamStarted(st) => {
                        s.stream_sid = Some(st.stream_sid);
                        // The hints so far hold for the new stream's speech, right after its start.
                        if !s.hints.text.is_empty() {
                            let hints = Event::SpeechHints(SpeechHints {
                                stream_sid: st.stream_sid,
                                track: None,
                                hints: s.hints.text.clone(),
                            });
                            after_start = Some((control_id(s.call, &hints, at), hints));
                        }
                        // After a drop, the gap goes on the media log just before the new start.
                        if let Some(r) = s.core.resumed(st.stream_sid, at) {
                            closes_gap = Some(r.gap_ms);
                            let id =
                                EventId::derive(id_kind::STREAM_RESUMED, &[s.call.as_u128(), st.stream_sid.as_u128()]);
                            let env = Envelope {
                                event_id: id,
                                tenant: s.tenant,
                                call: Some(s.call),
                                occurred_at: at,
                                payload: Event::StreamResumed(r),
                            };
                            let mut buf = Vec::with_capacity(96);
                            voxgate_protocol::encode_into(&env, &mut buf)
                                .map_err(|e| voxgate_storage::StorageError::Engine(e.to_string()))?;
                            encoded.push(buf);
                        }
                    }
                    Event::StreamStopped(st) => {
                        if s.stream_stopped_recorded {
                            continue;
                        }
                        s.stream_stopped_recorded = true;
                        st.frames = s.frames;
                    }
                    _ => {}
                }
                (control_id(s.call, &ev, at), ev)
            }
        };
        // Room for the envelope's fields and the audio, so encoding does not grow the buffer.
        let audio = match &ev {
            Event::MediaBatch(b) => b.payload.len(),
            _ => 0,
        };
        let env = Envelope { event_id: id, tenant: s.tenant, call: Some(s.call), occurred_at: at, payload: ev };
        let mut buf = Vec::with_capacity(128 + audio);
        voxgate_protocol::encode_into(&env, &mut buf)
            .map_err(|e| voxgate_storage::StorageError::Engine(e.to_string()))?;
        encoded.push(buf);
        if let Some((id, ev)) = after_start.take() {
            let env = Envelope { event_id: id, tenant: s.tenant, call: Some(s.call), occurred_at: at, payload: ev };
            let mut buf = Vec::with_capacity(64);
            voxgate_protocol::encode_into(&env, &mut buf)
                .map_err(|e| voxgate_storage::StorageError::Engine(e.to_string()))?;
            encoded.push(buf);
        }
    }
    let key = s.call.partition_key();
    s.log.append_many_or_spool(topics::MEDIA, encoded.iter().map(|b| (key, b.as_slice()))).await?;
    if let Some(gap_ms) = closes_gap {
        s.core.close_gap();
        tracing::info!(stage = "call", call_sid = %s.call, tenant = %s.tenant, gap_ms, "media stream resumed after a drop");
        metrics::histogram!("voxgate_stream_gap_seconds").record(gap_ms as f64 / 1000.0);
    }
    if let Some(oldest) = oldest {
        let waited = s.clock.now().as_micros().saturating_sub(oldest.as_micros()).max(0);
        metrics::histogram!("voxgate_media_ingest_seconds").record(waited as f64 / 1e6);
    }
    Ok(())
}

/// Deterministic ids for stream control events.
pub fn control_id(call: CallSid, ev: &Event, at: Timestamp) -> EventId {
    let c = call.as_u128();
    match ev {
        Event::StreamStarted(s) => EventId::derive(id_kind::STREAM_STARTED, &[c, s.stream_sid.as_u128()]),
        // Sequence numbers start again on each stream of a call.
        Event::Dtmf(d) => EventId::derive(id_kind::DTMF, &[c, d.stream_sid.as_u128(), u128::from(d.sequence)]),
        Event::StreamMark(m) => EventId::derive(id_kind::MARK, &[c, m.stream_sid.as_u128(), u128::from(m.sequence)]),
        // A call can have several streams (re-attached after a drop): each stops once.
        Event::StreamStopped(st) => EventId::derive(id_kind::STREAM_STOPPED, &[c, stream_key(st.stream_sid, at)]),
        Event::StreamFault(f) => EventId::derive(id_kind::STREAM_FAULT, &[c, stream_key(f.stream_sid, at)]),
        Event::AudioShed(a) => EventId::derive(id_kind::AUDIO_SHED, &[c, u128::from(a.frames), at.as_micros() as u128]),
        // The text too: two changes in one instant are two events.
        Event::SpeechHints(h) => EventId::derive(
            id_kind::SPEECH_HINTS,
            &[c, h.stream_sid.as_u128(), at.as_micros() as u128, EventId::of_text(&h.hints).0],
        ),
        _ => EventId::derive(0, &[c]),
    }
}

/// Longest hints text a call keeps, as a tenant's (Whisper's prompt holds the last 223 tokens of
/// it anyway).
pub const MAX_HINTS_CHARS: usize = crate::tenancy::limits::HINTS;

/// A call's vocabulary hints: phrases joined with ", ", each once, in the order they came, at
/// most [`MAX_HINTS_CHARS`] (phrases that do not fit are left out).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Hints {
    pub text: String,
}

impl Hints {
    pub fn new(tenant: &str) -> Self {
        let mut h = Self::default();
        h.add(tenant);
        h
    }

    /// Adds the phrases of `hints` (comma-separated, as Twilio's); true when the text changed.
    /// Reads at most twice [`MAX_HINTS_CHARS`] of it: the rest could not fit anyway.
    pub fn add(&mut self, hints: &str) -> bool {
        let mut changed = false;
        let mut len = self.text.chars().count();
        let read = hints.char_indices().nth(2 * MAX_HINTS_CHARS).map_or(hints, |(i, _)| &hints[..i]);
        for phrase in read.split(',').map(|p| p.split_whitespace().collect::<Vec<_>>().join(" ")) {
            if phrase.is_empty() || phrase.chars().any(char::is_control) {
                continue;
            }
            let sep = if self.text.is_empty() { 0 } else { 2 };
            let n = phrase.chars().count();
            if len + sep + n > MAX_HINTS_CHARS {
                continue;
            }
            if self.text.split(", ").any(|p| p.eq_ignore_ascii_case(&phrase)) {
                continue;
            }
            len += sep + n;
            if sep > 0 {
                self.text.push_str(", ");
            }
            self.text.push_str(&phrase);
            changed = true;
        }
        changed
    }
}

/// A stream's part of an id: its sid, or (before its `start`) when it ended.
fn stream_key(sid: Option<StreamSid>, at: Timestamp) -> u128 {
    sid.map_or(at.as_micros() as u128, |s| s.as_u128())
}

/// Builds a media batch from one track's raw µ-law frames.
pub fn media_batch(
    stream_sid: StreamSid,
    track: Track,
    first_sequence: u64,
    start_ms: u64,
    frames: u32,
    gap_frames: u32,
    payload: Bytes,
) -> MediaBatch {
    MediaBatch { stream_sid, first_sequence, start_ms, frames, gap_frames, payload, track }
}

// ---------------------------------------------------------------------------------------------
// Supervisor

/// Messages the call supervisor takes.
pub enum SupervisorMsg {
    /// Start a call actor (or find the running one for a retried webhook).
    Start(Box<CallArgs>, RpcReplyPort<Result<ActorRef<CallMsg>, CallError>>),
    /// How many calls are running.
    Active(RpcReplyPort<usize>),
}

/// Supervises every call actor of a node.
pub struct CallSupervisor;

impl Actor for CallSupervisor {
    type Msg = SupervisorMsg;
    type State = usize;
    type Arguments = ();

    async fn pre_start(&self, _: ActorRef<SupervisorMsg>, _: ()) -> Result<usize, ActorProcessingErr> {
        Ok(0)
    }

    async fn handle(
        &self,
        myself: ActorRef<SupervisorMsg>,
        msg: SupervisorMsg,
        active: &mut usize,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            SupervisorMsg::Start(args, reply) => {
                if let Some(existing) = CallActor::find(args.call) {
                    let _ = reply.send(Ok(existing));
                    return Ok(());
                }
                let name = CallActor::name(args.call);
                let r = Actor::spawn_linked(Some(name), CallActor, *args, myself.get_cell()).await;
                let r = match r {
                    Ok((a, _)) => {
                        *active += 1;
                        Ok(a)
                    }
                    Err(e) => Err(CallError::Start(e.to_string())),
                };
                let _ = reply.send(r);
            }
            SupervisorMsg::Active(reply) => {
                let _ = reply.send(*active);
            }
        }
        Ok(())
    }

    async fn handle_supervisor_evt(
        &self,
        _: ActorRef<SupervisorMsg>,
        evt: SupervisionEvent,
        active: &mut usize,
    ) -> Result<(), ActorProcessingErr> {
        match evt {
            SupervisionEvent::ActorTerminated(cell, _, reason) => {
                *active = active.saturating_sub(1);
                tracing::debug!(actor = ?cell.get_name(), ?reason, "call actor ended");
            }
            SupervisionEvent::ActorFailed(cell, err) => {
                *active = active.saturating_sub(1);
                metrics::counter!("voxgate_call_actor_failures_total").increment(1);
                tracing::error!(actor = ?cell.get_name(), error = %err, "call actor failed");
            }
            _ => {}
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(s: i64) -> Timestamp {
        Timestamp(s * 1_000_000)
    }

    fn statuses(fx: &[Effect]) -> Vec<CallStatus> {
        fx.iter()
            .filter_map(|e| match e {
                Effect::Record(Event::CallStatusChanged(c)) => Some(c.status),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn ringing_media_completed() {
        let mut c = CallCore::new(CallStatus::Ringing, t(0), Duration::from_secs(300));
        let fx = c.apply(CallInput::MediaFlowing, t(1));
        assert_eq!(statuses(&fx), vec![CallStatus::InProgress]);
        assert!(c.apply(CallInput::MediaFlowing, t(2)).is_empty());
        let fx = c.apply(
            CallInput::Status { status: CallStatus::Completed, sequence: Some(3), duration_secs: Some(30) },
            t(31),
        );
        assert_eq!(statuses(&fx), vec![CallStatus::Completed]);
        assert!(fx.contains(&Effect::Finish));
        assert!(fx.contains(&Effect::CloseStream(StopReason::CallEnded)));
        assert!(c.is_finished());
    }

    #[test]
    fn terminal_statuses_end_the_call() {
        for st in [CallStatus::Busy, CallStatus::Failed, CallStatus::NoAnswer, CallStatus::Canceled] {
            let mut c = CallCore::new(CallStatus::Ringing, t(0), Duration::from_secs(300));
            let fx = c.apply(CallInput::Status { status: st, sequence: Some(1), duration_secs: None }, t(1));
            assert!(fx.contains(&Effect::Finish), "{st}");
            assert_eq!(c.status(), st);
        }
    }

    #[test]
    fn duplicates_and_out_of_order_callbacks() {
        let mut c = CallCore::new(CallStatus::Ringing, t(0), Duration::from_secs(300));
        let ans = CallInput::Status { status: CallStatus::InProgress, sequence: Some(1), duration_secs: None };
        assert_eq!(c.apply(ans.clone(), t(1)).len(), 1);
        assert!(c.apply(ans, t(1)).is_empty(), "same SequenceNumber is applied once");
        // ringing arriving late does not step back
        c.apply(CallInput::Status { status: CallStatus::Ringing, sequence: Some(0), duration_secs: None }, t(2));
        assert_eq!(c.status(), CallStatus::InProgress);
        c.apply(CallInput::Status { status: CallStatus::Completed, sequence: Some(2), duration_secs: Some(3) }, t(3));
        // a late callback after the end is recorded but changes nothing
        let fx =
            c.apply(CallInput::Status { status: CallStatus::InProgress, sequence: Some(9), duration_secs: None }, t(4));
        assert_eq!(fx.len(), 1);
        assert_eq!(c.status(), CallStatus::Completed);
    }

    #[test]
    fn a_hangup_request_ends_the_call_once() {
        let mut c = CallCore::new(CallStatus::InProgress, t(10), Duration::from_secs(60));
        let fx = c.apply(CallInput::Hangup { source: "fraud".into(), reason: "premium destination".into() }, t(20));
        assert!(matches!(&fx[0], Effect::Record(Event::HangupRequested(h)) if h.source == "fraud"));
        assert!(matches!(&fx[1], Effect::Record(Event::CallStatusChanged(s))
            if s.status == CallStatus::Completed && s.source == StatusSource::Voxgate));
        assert_eq!(&fx[2..], &[Effect::CloseStream(StopReason::CallEnded), Effect::Finish]);
        assert!(c.is_finished());
        assert!(c.apply(CallInput::Hangup { source: "fraud".into(), reason: "again".into() }, t(21)).is_empty());
    }

    #[test]
    fn maximum_duration_ends_the_call() {
        let mut c = CallCore::new(CallStatus::Ringing, t(10), Duration::from_secs(60));
        assert!(c.apply(CallInput::Tick, t(69)).is_empty());
        let fx = c.apply(CallInput::Tick, t(70));
        assert!(matches!(fx[0], Effect::Record(Event::CallTimedOut(CallTimedOut { max_duration_secs: 60 }))));
        assert_eq!(statuses(&fx), vec![CallStatus::Completed]);
        assert!(fx.contains(&Effect::Finish));
        assert!(c.apply(CallInput::Tick, t(80)).is_empty());
    }

    #[test]
    fn a_dropped_stream_is_reattached_a_few_times_then_only_recorded() {
        let mut c = CallCore::new(CallStatus::InProgress, t(0), Duration::from_secs(300)).with_reattach(2);
        let (s1, s2) = (StreamSid::from_u128(1), StreamSid::from_u128(2));
        // Twilio's stop is no drop.
        assert!(c.apply(CallInput::StreamEnded { reason: StopReason::Twilio, stream_sid: Some(s1) }, t(1)).is_empty());
        let fx = c.apply(CallInput::StreamEnded { reason: StopReason::Disconnected, stream_sid: Some(s1) }, t(10));
        assert_eq!(
            fx,
            vec![
                Effect::Record(Event::StreamDropped(StreamDropped {
                    stream_sid: Some(s1),
                    attempt: 1,
                    reattach: true
                })),
                Effect::Reattach { attempt: 1 }
            ]
        );
        let fx = c.apply(CallInput::ReattachAnswered { attempt: 1, result: Err(ControlError::Refused(403)) }, t(11));
        assert!(matches!(&fx[..], [Effect::Record(Event::StreamReattachRequested(r))]
            if r.attempt == 1 && r.twilio_status.is_none() && r.error.as_deref() == Some("Twilio refused the request: HTTP 403")));
        // The gap closes when the next stream starts, measured from the drop.
        let gap = c.resumed(s2, t(13)).unwrap();
        assert_eq!((gap.previous, gap.stream_sid, gap.attempt, gap.gap_ms), (Some(s1), s2, 1, 3000));
        c.close_gap();
        assert!(c.resumed(s2, t(14)).is_none());
        // A stream that drops before its start keeps the gap open from that drop.
        let fx = c.apply(CallInput::StreamEnded { reason: StopReason::Disconnected, stream_sid: None }, t(20));
        assert!(fx.contains(&Effect::Reattach { attempt: 2 }));
        let fx = c.apply(CallInput::StreamEnded { reason: StopReason::Disconnected, stream_sid: None }, t(25));
        assert_eq!(
            fx,
            vec![Effect::Record(Event::StreamDropped(StreamDropped { stream_sid: None, attempt: 3, reattach: false }))],
            "the attempts are spent"
        );
        // Nothing of this ends the call; after the end, drops are not acted on.
        assert!(!c.is_finished());
        c.apply(CallInput::Status { status: CallStatus::Completed, sequence: Some(1), duration_secs: Some(30) }, t(30));
        assert!(c
            .apply(CallInput::StreamEnded { reason: StopReason::Disconnected, stream_sid: None }, t(31))
            .is_empty());
    }

    #[test]
    fn hints_join_phrases_once_and_keep_their_bound() {
        let mut h = Hints::new(" Kathryn  Smyth, voxgate ,, ");
        assert_eq!(h.text, "Kathryn Smyth, voxgate");
        assert!(!h.add("VOXGATE, kathryn smyth"), "phrases already there change nothing");
        assert!(h.add("Zyxel\u{7}, Acme"), "a phrase with a control character is left out");
        assert_eq!(h.text, "Kathryn Smyth, voxgate, Acme");
        let long = "word ".repeat(300);
        assert!(!h.add(&long), "a phrase that does not fit is left out");
        assert!(h.text.chars().count() <= MAX_HINTS_CHARS);
    }

    #[test]
    fn control_ids_are_per_stream() {
        use voxgate_protocol::event::{Dtmf, StreamMark};
        let call = CallSid::from_u128(7);
        let (a, b) = (StreamSid::from_u128(1), StreamSid::from_u128(2));
        // Twilio numbers each stream's messages from 1: the second stream's must not look like
        // repeats of the first's.
        let dtmf = |s| Event::Dtmf(Dtmf { stream_sid: s, digit: "1".into(), sequence: 5 });
        let mark = |s| Event::StreamMark(StreamMark { stream_sid: s, name: "m".into(), sequence: 5 });
        let stop =
            |s| Event::StreamStopped(StreamStopped { stream_sid: Some(s), reason: StopReason::Twilio, frames: 0 });
        for ev in [dtmf, mark, stop] {
            assert_ne!(control_id(call, &ev(a), t(1)), control_id(call, &ev(b), t(1)));
            assert_eq!(control_id(call, &ev(a), t(1)), control_id(call, &ev(a), t(2)), "a retry is the same event");
        }
    }

    #[test]
    fn requeued_items_go_first_and_keep_the_bound() {
        let q = StreamQueue::new(20 * 160, Duration::from_secs(60)); // 20 frames
        q.push(t(0), batch(20, 5));
        q.requeue(vec![(t(0), batch(0, 5)), (t(0), batch(5, 5)), (t(0), batch(10, 5)), (t(0), batch(15, 5))]);
        let mut out = Vec::new();
        assert_eq!(q.take(&mut out), 5, "the oldest batch is shed");
        let seqs: Vec<u64> = out
            .iter()
            .filter_map(|(_, i)| match i {
                StreamItem::Audio(b) => Some(b.first_sequence),
                _ => None,
            })
            .collect();
        assert_eq!(seqs, vec![5, 10, 15, 20]);
    }

    fn batch(seq: u64, frames: u32) -> StreamItem {
        StreamItem::Audio(media_batch(
            StreamSid::from_u128(1),
            Track::Inbound,
            seq,
            seq * 20,
            frames,
            0,
            Bytes::from(vec![0xff; frames as usize * 160]),
        ))
    }

    #[test]
    fn queue_sheds_oldest_audio_never_control() {
        let q = StreamQueue::new(20 * 160, Duration::from_secs(60)); // 20 frames
        q.push(t(0), StreamItem::Control(Event::CallTimedOut(CallTimedOut { max_duration_secs: 1 })));
        let mut shed = 0;
        for i in 0..6 {
            shed += q.push(t(0), batch(i * 5, 5));
        }
        assert_eq!(shed, 10);
        let mut out = Vec::new();
        assert_eq!(q.take(&mut out), 10);
        assert!(matches!(out[0].1, StreamItem::Control(_)));
        let seqs: Vec<u64> = out
            .iter()
            .filter_map(|(_, i)| match i {
                StreamItem::Audio(b) => Some(b.first_sequence),
                _ => None,
            })
            .collect();
        assert_eq!(seqs, vec![10, 15, 20, 25], "the two oldest batches were shed");
        assert_eq!(q.take(&mut out), 0);
    }

    #[test]
    fn a_burst_is_kept_while_there_is_room_and_only_stale_audio_goes() {
        // Ten seconds of audio in one burst (a stalled network catching up): all kept.
        let q = StreamQueue::new(1 << 20, Duration::from_secs(60));
        let shed: u32 = (0..100).map(|i| q.push(t(0), batch(i * 5, 5))).sum();
        assert_eq!(shed, 0);
        let mut out = Vec::new();
        assert_eq!(q.take(&mut out), 0);
        assert_eq!(out.len(), 100);
        // Audio that waited past the staleness bound (the log could not take it) is shed when
        // newer audio arrives; what is fresh stays.
        q.push(t(0), batch(1000, 5));
        q.push(t(30), batch(1005, 5));
        assert_eq!(q.push(t(61), batch(1010, 5)), 5, "the batch from t=0 is stale at t=61");
        out.clear();
        q.take(&mut out);
        assert_eq!(out.len(), 2);
    }
}
