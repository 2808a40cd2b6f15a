//! Where a call's actor runs, and how the HTTP side and the stages reach it.
//!
//! Embedded (sled), a call's actor runs on this node and is found in ractor's registry. In a
//! cluster the ingress is decoupled from the calls: a call's actor runs on the `call` node that
//! owns the call's partition of the calls log (claimed through the log's leases), and every other
//! node reaches it with NATS requests on `{prefix}.call.{partition}`: the call's start, its status
//! callbacks and hang-ups, its stream's attach, the stream's audio and control items (about
//! 100 ms batches, acknowledged once the call node has them in the media log) and the stream's
//! end.
//!
//! - A call node dies: its partitions move to the others. The new owner gives the open calls of
//!   those partitions their actors back from the calls log, and the ingress nodes send it what the
//!   dead node had not acknowledged (they hold it meanwhile, within the stream queue's bounds).
//! - An ingress node dies: its streams fall silent. An ingress node sends at least a heartbeat
//!   every [`HEARTBEAT`], so after [`REMOTE_IDLE`] without one the call node ends the stream as
//!   dropped; the call's actor records the drop and asks Twilio to re-attach the stream, which
//!   reaches a live ingress node (Twilio dials `public_url`, the cluster's load balancer).
//!
//! Must not: decide anything about a call (that is the actor's), or let one call's requests wait
//! behind another's (each request is handled on its own task; a call's audio stays in order
//! because its ingress node sends the next batch only once the last one is acknowledged).

use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use ractor::{ActorRef, RpcReplyPort};
use serde::{Deserialize, Serialize};
use tokio::sync::oneshot;
use voxgate_actors::call::{
    count_lost, CallActor, CallArgs, CallControl, CallIdentity, CallMsg, StreamItem, StreamQueue, SupervisorMsg,
};
use voxgate_protocol::event::{CallStatus, StopReason};
use voxgate_protocol::{AccountSid, CallSid, Clock, Timestamp};
use voxgate_storage::{topics, Log};

use crate::config::Config;
use crate::stages::cluster::Stop;
use crate::stages::tenancy::{QuotaSlot, Tenancy};

/// An ingress node sends a stream's call node something at least this often (a heartbeat when
/// Twilio sends nothing).
pub const HEARTBEAT: Duration = Duration::from_secs(1);
/// A remote stream that sent nothing (not even a heartbeat) for this long lost its ingress node.
pub const REMOTE_IDLE: Duration = Duration::from_secs(5);
/// How long one request waits for the call node's answer.
const ASK_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a request looks for an owner (a partition moving between nodes has none for a
/// moment: about the lease's time to live).
const FIND_OWNER: Duration = Duration::from_secs(8);

/// How long a node taking partitions over waits for the calls log to show all that was written
/// to them (its own spool forwarded, its mirror at the head) before it restores their calls.
const SETTLE: Duration = Duration::from_secs(15);

/// What a node asks of a call's node.
#[derive(Debug, Serialize, Deserialize)]
enum Request<'a> {
    /// Start the call's actor (the webhook appended `call_received`).
    Start {
        tenant: AccountSid,
        call: CallSid,
        status: CallStatus,
        received_at: Timestamp,
        hints: String,
    },
    Identity {
        call: CallSid,
    },
    /// A Media Streams WebSocket for the call opened on an ingress node (`link` names it).
    Attach {
        call: CallSid,
        link: u64,
    },
    /// The stream's items since the last request, the frames the ingress node shed, and, last,
    /// why the stream ended.
    Items {
        call: CallSid,
        link: u64,
        /// Numbers the stream's batches from 1: a batch sent again is taken once.
        seq: u64,
        items: Cow<'a, [(Timestamp, StreamItem)]>,
        shed: u32,
        ended: Option<StopReason>,
    },
    Status {
        call: CallSid,
        status: CallStatus,
        sequence: Option<u32>,
        duration_secs: Option<u32>,
    },
    Hangup {
        call: CallSid,
        source: String,
        reason: String,
    },
    AddHints {
        call: CallSid,
        hints: String,
    },
}

/// A call node's answer.
#[derive(Debug, Serialize, Deserialize)]
enum Reply {
    Done,
    /// No open call by that sid on the node that owns its partition.
    NotFound,
    Identity {
        tenant: AccountSid,
        received_at: Timestamp,
    },
    /// The call already has a stream, or has ended.
    Busy,
    /// The items are taken; the stream should close for this reason (the call ended, or a newer
    /// stream replaced it).
    Stream {
        closed: Option<StopReason>,
    },
    /// The call's partition moved to another node while this one had the request: not taken;
    /// send it again (to the new owner).
    Moved,
    Failed(String),
}

/// Why a request found no answer.
#[derive(Debug, thiserror::Error)]
pub enum LinkError {
    #[error("no call node owns partition {0} of the calls (none runs the call role, or the partition is moving)")]
    NoOwner(u32),
    #[error("the call node did not answer within {0:?}")]
    Timeout(Duration),
    #[error("NATS: {0}")]
    Nats(String),
    #[error("malformed message between nodes: {0}")]
    Codec(#[from] postcard::Error),
    #[error("the call node answered {0}")]
    Unexpected(String),
    #[error("the call's actor failed: {0}")]
    Failed(String),
}

/// Why a stream could not attach to its call.
#[derive(Debug, thiserror::Error)]
pub enum AttachError {
    #[error("no active call")]
    NotFound,
    #[error("the call already has a media stream or has ended")]
    Busy,
    #[error(transparent)]
    Link(#[from] LinkError),
}

/// How the stream's reader tells the call about the stream (the queue carries its items).
pub enum StreamSink {
    Local(ActorRef<CallMsg>),
    /// The forwarder to the call's node; told once, with the reason the stream ended.
    Remote(Option<oneshot::Sender<StopReason>>),
}

impl StreamSink {
    /// The first audio frame arrived (a remote call node sees it in the items).
    pub fn media_flowing(&self) {
        if let StreamSink::Local(a) = self {
            let _ = a.cast(CallMsg::MediaFlowing);
        }
    }

    /// The WebSocket side is gone; everything it queued is in the queue.
    pub fn ended(&mut self, reason: StopReason) {
        match self {
            StreamSink::Local(a) => {
                let _ = a.cast(CallMsg::StreamEnded { reason });
            }
            StreamSink::Remote(tx) => {
                if let Some(tx) = tx.take() {
                    let _ = tx.send(reason);
                }
            }
        }
    }
}

/// Starts call actors on this node.
#[derive(Clone)]
struct Local {
    supervisor: ActorRef<SupervisorMsg>,
    cfg: Arc<Config>,
    log: Log,
    clock: Arc<dyn Clock>,
    control: Arc<dyn CallControl>,
    tenancy: Arc<Tenancy>,
}

impl Local {
    async fn start(
        &self,
        tenant: AccountSid,
        call: CallSid,
        status: CallStatus,
        received_at: Timestamp,
        slot: Option<QuotaSlot>,
        hints: Option<String>,
    ) -> Result<ActorRef<CallMsg>, LinkError> {
        let hints = hints
            .unwrap_or_else(|| self.tenancy.read(|d| d.tenant(tenant).map(|t| t.hints.clone())).unwrap_or_default());
        let args = CallArgs {
            tenant,
            call,
            status,
            received_at,
            config: self.cfg.calls.clone(),
            log: self.log.clone(),
            clock: self.clock.clone(),
            quota_slot: slot.map(|s| Box::new(s) as Box<dyn std::any::Any + Send + Sync>),
            control: Some(self.control.clone()),
            hints,
        };
        match ractor::call!(self.supervisor, |reply: RpcReplyPort<_>| SupervisorMsg::Start(Box::new(args), reply)) {
            Ok(Ok(a)) => Ok(a),
            Ok(Err(e)) => Err(LinkError::Failed(e.to_string())),
            Err(e) => Err(LinkError::Failed(e.to_string())),
        }
    }
}

/// The cluster's side of [`Calls`]: requests to the node that owns a call's partition.
#[derive(Clone)]
struct Remote {
    client: async_nats::Client,
    /// `{prefix}.call.{partition}`, by partition.
    subjects: Arc<[async_nats::Subject]>,
    partitions: u32,
    /// Quota places of the calls this ingress node accepted, until they end (a terminal status
    /// through this node, or their maximum duration).
    slots: Arc<Mutex<HashMap<CallSid, (QuotaSlot, Instant)>>>,
    max_duration: Duration,
    queue_bytes: usize,
    stale_audio: Duration,
}

impl Remote {
    fn partition(&self, call: CallSid) -> u32 {
        voxgate_storage::log::partition_for(call.partition_key(), self.partitions)
    }

    fn connected(&self) -> bool {
        self.client.connection_state() == async_nats::connection::State::Connected
    }

    async fn ask_once(&self, call: CallSid, payload: &bytes::Bytes) -> Result<Reply, LinkError> {
        let p = self.partition(call);
        let req = async_nats::Request::new().payload(payload.clone()).timeout(Some(ASK_TIMEOUT));
        match self.client.send_request(self.subjects[p as usize].clone(), req).await {
            Ok(m) => Ok(postcard::from_bytes(&m.payload)?),
            Err(e) => Err(match e.kind() {
                async_nats::RequestErrorKind::NoResponders => LinkError::NoOwner(p),
                async_nats::RequestErrorKind::TimedOut => LinkError::Timeout(ASK_TIMEOUT),
                _ => LinkError::Nats(e.to_string()),
            }),
        }
    }

    /// Asks, looking for an owner for up to `within` (none answers, or the old owner says the
    /// call moved, while a partition moves).
    async fn ask(&self, call: CallSid, req: &Request<'_>, within: Duration) -> Result<Reply, LinkError> {
        let payload = bytes::Bytes::from(postcard::to_allocvec(req)?);
        let until = Instant::now() + within;
        let mut pause = Duration::from_millis(50);
        loop {
            match self.ask_once(call, &payload).await {
                Err(LinkError::NoOwner(_)) | Ok(Reply::Moved) if Instant::now() + pause < until => {
                    tokio::time::sleep(pause).await;
                    pause = (pause * 2).min(Duration::from_millis(500));
                }
                r => return r,
            }
        }
    }

    fn hold_slot(&self, call: CallSid, slot: QuotaSlot) {
        let mut slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        // A place whose call this node never heard end is given back after the longest call.
        let keep = self.max_duration + Duration::from_secs(60);
        slots.retain(|_, (_, since)| since.elapsed() < keep);
        slots.insert(call, (slot, Instant::now()));
    }

    fn release_slot(&self, call: CallSid) {
        self.slots.lock().unwrap_or_else(|e| e.into_inner()).remove(&call);
    }
}

/// How this node reaches call actors: its own (embedded) or the cluster's call nodes.
#[derive(Clone)]
pub struct Calls {
    local: Local,
    remote: Option<Remote>,
    /// On a node of the call role: the partitions it runs now.
    here: Arc<std::sync::OnceLock<crate::stages::cluster::Share>>,
}

impl Calls {
    /// On a clustered log, calls run on `call` nodes; on sled, here.
    pub fn new(
        cfg: Arc<Config>,
        log: Log,
        clock: Arc<dyn Clock>,
        supervisor: ActorRef<SupervisorMsg>,
        control: Arc<dyn CallControl>,
        tenancy: Arc<Tenancy>,
    ) -> anyhow::Result<Self> {
        let remote = match log.nats() {
            Some((client, prefix)) => {
                let partitions = log.partitions(topics::CALLS)?;
                Some(Remote {
                    client,
                    subjects: (0..partitions)
                        .map(|p| async_nats::Subject::from(format!("{prefix}.call.{p}")))
                        .collect(),
                    partitions,
                    slots: Arc::default(),
                    max_duration: cfg.calls.max_duration,
                    queue_bytes: cfg.calls.queue_bytes,
                    stale_audio: cfg.calls.stale_audio,
                })
            }
            None => None,
        };
        Ok(Self { local: Local { supervisor, cfg, log, clock, control, tenancy }, remote, here: Arc::default() })
    }

    /// True in a cluster (call actors may run on other nodes).
    pub fn clustered(&self) -> bool {
        self.remote.is_some()
    }

    /// This node runs the call role on `share` of the calls log's partitions.
    pub fn runs_calls(&self, share: crate::stages::cluster::Share) {
        let _ = self.here.set(share);
    }

    /// Whether this node runs `call`'s actor: always on an embedded node; in a cluster, when
    /// it runs the call role on the call's partition.
    pub fn runs_here(&self, call: CallSid) -> bool {
        let Some(r) = &self.remote else { return true };
        self.here
            .get()
            .is_some_and(|share| share.lock().unwrap_or_else(|e| e.into_inner()).contains(&r.partition(call)))
    }

    /// Where `call`'s actor is reached: `None` for this node. A node of the call role runs the
    /// calls of its own partitions without a hop, and, while NATS is unreachable, every call it
    /// is given (an ingress node beside it keeps answering Twilio through the outage).
    fn route(&self, call: CallSid) -> Option<&Remote> {
        let r = self.remote.as_ref()?;
        if self.here.get().is_some() && (!r.connected() || self.runs_here(call)) {
            return None;
        }
        Some(r)
    }

    /// Starts the actor of an accepted call (or finds it running), holding its quota place.
    pub async fn start(
        &self,
        tenant: AccountSid,
        call: CallSid,
        status: CallStatus,
        received_at: Timestamp,
        slot: QuotaSlot,
    ) -> Result<(), LinkError> {
        let Some(r) = self.route(call) else {
            return self.local.start(tenant, call, status, received_at, Some(slot), None).await.map(drop);
        };
        let hints = self.local.tenancy.read(|d| d.tenant(tenant).map(|t| t.hints.clone())).unwrap_or_default();
        match r.ask(call, &Request::Start { tenant, call, status, received_at, hints }, FIND_OWNER).await? {
            Reply::Done => {
                r.hold_slot(call, slot);
                Ok(())
            }
            Reply::Failed(e) => Err(LinkError::Failed(e)),
            other => Err(LinkError::Unexpected(format!("{other:?}"))),
        }
    }

    /// `call` ended (its terminal status is on the calls log): the quota place this ingress
    /// node held for it, while its actor ran on another node, is given back.
    pub fn ended(&self, call: CallSid) {
        if let Some(r) = &self.remote {
            r.release_slot(call);
        }
    }

    /// Whose call `call` is, if its actor runs.
    pub async fn identity(&self, call: CallSid) -> Option<CallIdentity> {
        let Some(r) = self.route(call) else {
            let actor = CallActor::find(call)?;
            return ractor::call!(actor, CallMsg::Identity).ok();
        };
        match r.ask(call, &Request::Identity { call }, FIND_OWNER).await {
            Ok(Reply::Identity { tenant, received_at }) => Some(CallIdentity { tenant, received_at }),
            Ok(_) => None,
            Err(e) => {
                tracing::warn!(call_sid = %call, error = %e, "could not ask the call's node whose call it is");
                None
            }
        }
    }

    /// Applies a status callback; `None` when no actor runs for the call (it ended, or never
    /// reached this cluster), `Some(Err)` when the actor could not record it.
    pub async fn status(
        &self,
        call: CallSid,
        status: CallStatus,
        sequence: Option<u32>,
        duration_secs: Option<u32>,
    ) -> Option<Result<(), String>> {
        let Some(r) = self.route(call) else {
            let actor = CallActor::find(call)?;
            let res = ractor::call!(actor, |reply: RpcReplyPort<_>| CallMsg::Status {
                status,
                sequence,
                duration_secs,
                reply
            });
            return match res {
                Ok(r) => Some(r.map_err(|e| e.to_string())),
                // The actor ended between lookup and call.
                Err(_) => None,
            };
        };
        let answer = r.ask(call, &Request::Status { call, status, sequence, duration_secs }, FIND_OWNER).await;
        if status.is_terminal() && matches!(answer, Ok(Reply::Done | Reply::NotFound)) {
            r.release_slot(call);
        }
        match answer {
            Ok(Reply::Done) => Some(Ok(())),
            Ok(Reply::NotFound) => None,
            Ok(Reply::Failed(e)) => Some(Err(e)),
            Ok(other) => Some(Err(format!("unexpected answer {other:?}"))),
            Err(e) => {
                // Twilio does not retry a status callback: the ingress records it itself.
                tracing::warn!(call_sid = %call, error = %e, "the call's node did not take a status callback; recording it here");
                None
            }
        }
    }

    /// Asks the call's actor to record a hang-up; `None` when no actor runs for the call.
    pub async fn hangup(&self, call: CallSid, source: &str, reason: &str) -> Option<Result<(), String>> {
        let Some(r) = self.route(call) else {
            let actor = CallActor::find(call)?;
            let res = ractor::call!(actor, |reply: RpcReplyPort<_>| CallMsg::Hangup {
                source: source.to_owned(),
                reason: reason.to_owned(),
                reply
            });
            return Some(match res {
                Ok(r) => r.map_err(|e| e.to_string()),
                Err(e) => Err(e.to_string()),
            });
        };
        let req = Request::Hangup { call, source: source.to_owned(), reason: reason.to_owned() };
        match r.ask(call, &req, FIND_OWNER).await {
            Ok(Reply::Done) => Some(Ok(())),
            Ok(Reply::NotFound) => None,
            Ok(Reply::Failed(e)) => Some(Err(e)),
            Ok(other) => Some(Err(format!("unexpected answer {other:?}"))),
            Err(e) => Some(Err(e.to_string())),
        }
    }

    /// A transcription's hints join the call's; false when no actor runs for the call.
    pub async fn add_hints(&self, call: CallSid, hints: String) -> bool {
        let Some(r) = self.route(call) else {
            return CallActor::find(call).is_some_and(|a| a.cast(CallMsg::AddHints(hints)).is_ok());
        };
        matches!(r.ask(call, &Request::AddHints { call, hints }, FIND_OWNER).await, Ok(Reply::Done))
    }

    /// A Media Streams WebSocket for `call` opened here: the queue the stream's reader fills and
    /// how it tells the call about the stream. Remote, a forwarder takes the queue to the call's
    /// node.
    pub async fn attach(&self, call: CallSid) -> Result<(Arc<StreamQueue>, StreamSink), AttachError> {
        // A stream whose call runs here (or any, while NATS is away) feeds the actor directly:
        // its audio must not wait on NATS. (Such a stream ends if the call's partition moves to
        // another node while it runs; a remote one goes on with the new owner.)
        let Some(r) = self.route(call) else {
            let actor = CallActor::find(call).ok_or(AttachError::NotFound)?;
            return match ractor::call!(actor, |reply: RpcReplyPort<_>| CallMsg::AttachStream { reply }) {
                Ok(Some(q)) => Ok((q, StreamSink::Local(actor))),
                _ => Err(AttachError::Busy),
            };
        };
        let link = crate::stages::tenancy::random_u128() as u64;
        match r.ask(call, &Request::Attach { call, link }, FIND_OWNER).await? {
            Reply::Done => {}
            Reply::NotFound => return Err(AttachError::NotFound),
            Reply::Busy => return Err(AttachError::Busy),
            other => return Err(LinkError::Unexpected(format!("{other:?}")).into()),
        }
        let queue = StreamQueue::new(r.queue_bytes, r.stale_audio);
        let (tx, rx) = oneshot::channel();
        tokio::spawn(forward(r.clone(), call, link, queue.clone(), rx));
        Ok((queue, StreamSink::Remote(Some(tx))))
    }
}

/// Takes a stream's queue to the call's node, in order, each batch until it is acknowledged;
/// a heartbeat when the stream is quiet; the end last. While the call's node does not answer
/// (it died and its partition is moving) the items wait in the queue, whose bounds shed the
/// oldest audio (counted, and recorded by the call when it takes them).
async fn forward(
    r: Remote,
    call: CallSid,
    link: u64,
    queue: Arc<StreamQueue>,
    mut ended: oneshot::Receiver<StopReason>,
) {
    let mut items: Vec<(Timestamp, StreamItem)> = Vec::new();
    let mut end: Option<StopReason> = None;
    // The batch in hand (numbered `seq`) until the call's node acknowledges it; a batch sent
    // again after a lost answer has the same number, so the call's node takes it once.
    let (mut seq, mut pending, mut shed, mut batch_end) = (0u64, false, 0u32, None::<StopReason>);
    let mut failing_since: Option<Instant> = None;
    let mut pause = Duration::from_millis(50);
    loop {
        if !pending {
            if end.is_none() {
                tokio::select! {
                    _ = queue.ready() => {}
                    e = &mut ended => end = Some(e.unwrap_or(StopReason::Disconnected)),
                    _ = tokio::time::sleep(HEARTBEAT) => {}
                }
            }
            // The stream's reader queues everything before it says the stream ended: a batch
            // taken after that is the last.
            batch_end = end.clone();
            shed = queue.take(&mut items);
            seq += 1;
            pending = true;
        }
        let req = Request::Items { call, link, seq, items: Cow::Borrowed(&items), shed, ended: batch_end.clone() };
        let answer = match postcard::to_allocvec(&req) {
            Ok(p) => r.ask_once(call, &bytes::Bytes::from(p)).await,
            Err(e) => Err(e.into()),
        };
        match answer {
            Ok(Reply::Stream { closed }) => {
                items.clear();
                pending = false;
                failing_since = None;
                pause = Duration::from_millis(50);
                if let Some(reason) = closed {
                    queue.close(reason);
                }
                if batch_end.is_some() {
                    return;
                }
            }
            other => {
                let since = *failing_since.get_or_insert_with(Instant::now);
                if since.elapsed() > r.stale_audio {
                    metrics::counter!("voxgate_call_link_lost_total").increment(1);
                    tracing::error!(stage = "ingress", call_sid = %call, answer = ?other, "the call's node has not taken the stream's items for too long; they are lost");
                    // Nobody takes the queue now: what it holds, and what the reader still
                    // pushes, is counted lost with the batch in hand.
                    queue.retire();
                    queue.close(StopReason::Disconnected);
                    let shed_since = queue.take(&mut items);
                    count_lost(items.iter().map(|(_, i)| i));
                    // Frames shed while they waited were never recorded as shed either.
                    metrics::counter!("voxgate_stream_frames_lost_total")
                        .increment(u64::from(shed) + u64::from(shed_since));
                    return;
                }
                if since.elapsed() < pause {
                    tracing::warn!(stage = "ingress", call_sid = %call, answer = ?other, "the call's node did not take the stream's items; holding them");
                }
                metrics::counter!("voxgate_call_link_retries_total").increment(1);
                // The batch stays in hand; what comes meanwhile waits in the queue, whose
                // bounds shed the oldest audio.
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_millis(500));
                if end.is_none() {
                    if let Ok(e) = ended.try_recv() {
                        end = Some(e);
                    }
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The call node's side

/// A remote stream feeding a local call actor.
struct Feed {
    link: u64,
    queue: Arc<StreamQueue>,
    actor: ActorRef<CallMsg>,
    /// When its ingress node last sent, or a request of its was last answered.
    last: Instant,
    /// Requests of its being handled (this node being slow is not its ingress node dying).
    busy: u32,
    /// The last batch taken.
    seq: u64,
    flowing: bool,
}

/// What the call node keeps across changes of its share.
#[derive(Default)]
struct Served {
    feeds: HashMap<CallSid, Feed>,
    /// The stream each call last lost to silence (its ingress node died): its late items are
    /// refused.
    detached: HashMap<CallSid, u64>,
    /// Calls in progress this node took over, since when: their stream may have been on an
    /// ingress node that died too; if none sends for them, their stream is dropped.
    adopted: HashMap<CallSid, Instant>,
    /// NATS was away since the last sweep: this node may have started other nodes' calls.
    after_outage: bool,
}

/// Runs the actors of the calls in this node's share of the calls log's partitions and answers
/// the requests for them.
#[derive(Clone)]
pub struct CallNode {
    calls: Calls,
    served: Arc<Mutex<Served>>,
    /// The partitions it answers for now (empty between two shares).
    share: Arc<Mutex<Vec<u32>>>,
}

impl CallNode {
    pub fn new(calls: Calls) -> Self {
        Self { calls, served: Arc::default(), share: Arc::default() }
    }

    fn served(&self) -> std::sync::MutexGuard<'_, Served> {
        self.served.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Takes `share`: ends the actors of calls whose partition moved away (quietly: they go on
    /// elsewhere), answers the share's requests, and gives the open calls of the share their
    /// actors from the calls log, until stopped.
    pub async fn run(&self, share: Vec<u32>) -> anyhow::Result<Stop> {
        let remote = self.calls.remote.clone().ok_or_else(|| anyhow::anyhow!("the call role needs a cluster"))?;
        share.clone_into(&mut self.share.lock().unwrap_or_else(|e| e.into_inner()));
        // Every call actor of this node, whoever started it (a request, or this node's ingress).
        for c in CallActor::running().into_iter().filter(|c| !share.contains(&remote.partition(*c))) {
            {
                let mut s = self.served();
                s.feeds.remove(&c);
                s.adopted.remove(&c);
            }
            if let Some(a) = CallActor::find(c) {
                tracing::info!(stage = "call", call_sid = %c, "the call's partition moved to another node; its actor goes on there");
                a.stop(Some("its partition moved to another node".into()));
            }
        }
        let mut tasks = Vec::new();
        for &p in &share {
            let mut sub = remote.client.subscribe(remote.subjects[p as usize].clone()).await?;
            let me = self.clone();
            let client = remote.client.clone();
            tasks.push(tokio::spawn(async move {
                while let Some(msg) = sub.next().await {
                    let (me, client) = (me.clone(), client.clone());
                    tokio::spawn(async move {
                        let Some(to) = msg.reply.clone() else { return };
                        let reply = match postcard::from_bytes::<Request>(&msg.payload) {
                            Ok(req) => me.handle(p, req).await,
                            Err(e) => {
                                metrics::counter!("voxgate_call_link_malformed_total").increment(1);
                                Reply::Failed(format!("malformed request: {e}"))
                            }
                        };
                        match postcard::to_allocvec(&reply) {
                            Ok(b) => {
                                if let Err(e) = client.publish(to, b.into()).await {
                                    tracing::warn!(error = %e, "answer to an ingress node not sent");
                                }
                            }
                            Err(e) => tracing::error!(error = %e, "answer not encoded"),
                        }
                    });
                }
            }));
        }
        // Requests are answered from here on; a call not restored yet is restored on demand.
        let mut restored = 0usize;
        // Read after the log of record: a call whose end this node still had in its spool (it
        // ended while NATS was away), or whose end the mirror had not brought yet, would
        // otherwise come back as open and record a drop after its end.
        let settle = tokio::time::Instant::now() + SETTLE;
        for &p in &share {
            let log = self.calls.local.log.clone();
            let within = settle.saturating_duration_since(tokio::time::Instant::now());
            match log.caught_up(topics::CALLS, p, within).await {
                Ok(true) => {}
                r => {
                    // Restored on demand instead, when their requests come.
                    tracing::error!(partition = p, result = ?r, spooled = log.spooled(), "the calls log did not catch up; open calls of a partition taken over not read");
                    continue;
                }
            }
            let open = match tokio::task::spawn_blocking(move || crate::stages::recovery::open_calls_in(&log, p, None))
                .await
            {
                Ok(Ok(open)) => open,
                r => {
                    // Restored on demand instead, when their requests come.
                    tracing::error!(partition = p, result = ?r.map(|r| r.map(|o| o.len())), "open calls of a partition taken over not read");
                    continue;
                }
            };
            for (call, o) in open {
                let new = CallActor::find(call).is_none();
                restored += usize::from(new);
                match self.calls.local.start(o.tenant, call, o.status, o.received_at, None, None).await {
                    Ok(_) => {
                        // Not a gateway call: a fresh stream's TwiML would replace the app's.
                        if new && o.status == CallStatus::InProgress && !o.gateway {
                            self.served().adopted.insert(call, Instant::now());
                        }
                    }
                    Err(e) => tracing::error!(call_sid = %call, tenant = %o.tenant, error = %e, "call not restored"),
                }
            }
        }
        if restored > 0 {
            metrics::counter!("voxgate_calls_restored_total").increment(restored as u64);
            tracing::warn!(calls = restored, partitions = ?share, "calls in progress on the partitions this node took over have their actors back");
        }
        let me = self.clone();
        tasks.push(tokio::spawn(async move {
            let mut tick = tokio::time::interval(REMOTE_IDLE / 5);
            loop {
                tick.tick().await;
                me.sweep();
            }
        }));
        let current = self.share.clone();
        Ok(Box::new(move || {
            Box::pin(async move {
                // Requests still in hand are answered "moved": their senders try again.
                current.lock().unwrap_or_else(|e| e.into_inner()).clear();
                for t in tasks {
                    t.abort();
                }
            })
        }))
    }

    /// The call's partition is (still) this node's.
    fn ours(&self, call: CallSid) -> bool {
        match &self.calls.remote {
            Some(r) => self.share.lock().unwrap_or_else(|e| e.into_inner()).contains(&r.partition(call)),
            None => true,
        }
    }

    /// Ends the streams whose ingress node went silent, stops actors of calls another node
    /// owns, and forgets calls whose actor ended.
    fn sweep(&self) {
        let connected = self.calls.remote.as_ref().is_none_or(Remote::connected);
        let mut s = self.served();
        if !connected {
            // Nobody can send while NATS is away: silence means nothing until it is back.
            s.after_outage = true;
            let now = Instant::now();
            s.feeds.values_mut().for_each(|f| f.last = now);
            s.adopted.values_mut().for_each(|since| *since = now);
            return;
        }
        let silent: Vec<CallSid> =
            s.feeds.iter().filter(|(_, f)| f.busy == 0 && f.last.elapsed() > REMOTE_IDLE).map(|(c, _)| *c).collect();
        for c in silent {
            if let Some(f) = s.feeds.remove(&c) {
                metrics::counter!("voxgate_call_link_silent_total").increment(1);
                tracing::warn!(stage = "call", call_sid = %c, "the stream's ingress node went silent; the stream is dropped");
                s.detached.insert(c, f.link);
                let _ = f.actor.cast(CallMsg::StreamEnded { reason: StopReason::Disconnected });
            }
        }
        let quiet: Vec<CallSid> =
            s.adopted.iter().filter(|(_, since)| since.elapsed() > REMOTE_IDLE).map(|(c, _)| *c).collect();
        for c in quiet {
            s.adopted.remove(&c);
            if let Some(a) = CallActor::find(c) {
                tracing::warn!(stage = "call", call_sid = %c, "no ingress node sends the stream of a call taken over; the stream is dropped unless one attached here");
                let _ = a.cast(CallMsg::StreamAbsent);
            }
        }
        s.detached.retain(|c, _| CallActor::find(*c).is_some());
        // Once NATS is back: actors of calls another node owns, which this node's ingress
        // started while it was away. (A share change stops them in `run`; an empty share is a
        // moment between two shares: no verdict.)
        let held = !self.share.lock().unwrap_or_else(|e| e.into_inner()).is_empty();
        if !(held && std::mem::take(&mut s.after_outage)) {
            return;
        }
        drop(s);
        for c in CallActor::running().into_iter().filter(|c| !self.ours(*c)) {
            if let Some(a) = CallActor::find(c) {
                tracing::info!(stage = "call", call_sid = %c, "another node runs this call now; its actor here stops");
                a.stop(Some("its partition is another node's".into()));
            }
        }
    }

    /// The call's actor, given back from the calls log if this node owns the call but has not
    /// started it (the partition came here a moment ago, before the call's start reached it).
    async fn actor(&self, partition: u32, call: CallSid) -> Option<ActorRef<CallMsg>> {
        if let Some(a) = CallActor::find(call) {
            return Some(a);
        }
        let log = self.calls.local.log.clone();
        // As in `run`: read after the log of record, though a request waits for it only briefly
        // (a stale read is still better than no actor).
        if !matches!(log.caught_up(topics::CALLS, partition, Duration::from_secs(2)).await, Ok(true)) {
            tracing::warn!(call_sid = %call, partition, "the calls log has not caught up; restoring the call from what it shows");
        }
        let open =
            tokio::task::spawn_blocking(move || crate::stages::recovery::open_calls_in(&log, partition, Some(call)))
                .await
                .ok()?
                .ok()?;
        let (_, o) = open.into_iter().next()?;
        self.calls.local.start(o.tenant, call, o.status, o.received_at, None, None).await.ok()
    }

    async fn handle(&self, partition: u32, req: Request<'_>) -> Reply {
        match req {
            Request::Start { tenant, call, status, received_at, hints } => {
                if !self.ours(call) {
                    return Reply::Moved;
                }
                match self.calls.local.start(tenant, call, status, received_at, None, Some(hints)).await {
                    Ok(_) => Reply::Done,
                    Err(e) => Reply::Failed(e.to_string()),
                }
            }
            Request::Identity { call } => {
                // Unauthenticated callers reach this (any WebSocket upgrade): no log scan for them.
                let Some(a) = CallActor::find(call) else { return Reply::NotFound };
                match ractor::call!(a, CallMsg::Identity) {
                    Ok(id) => Reply::Identity { tenant: id.tenant, received_at: id.received_at },
                    Err(_) => Reply::NotFound,
                }
            }
            Request::Attach { call, link } => {
                if !self.ours(call) {
                    return Reply::Moved;
                }
                if self.served().feeds.get(&call).is_some_and(|f| f.link == link) {
                    return Reply::Done;
                }
                let Some(a) = self.actor(partition, call).await else { return Reply::NotFound };
                self.attach(call, link, a).await.map_or(Reply::Busy, |_| Reply::Done)
            }
            Request::Items { call, link, seq, items, shed, ended } => {
                self.items(partition, call, (link, seq), items, shed, ended).await
            }
            Request::Status { call, status, sequence, duration_secs } => {
                // A terminal status may come before the stream's last items from its ingress
                // node: the call's actor waits for them itself (as with one node's queue).
                let Some(a) = CallActor::find(call) else { return Reply::NotFound };
                match ractor::call!(a, |reply: RpcReplyPort<_>| CallMsg::Status {
                    status,
                    sequence,
                    duration_secs,
                    reply
                }) {
                    Ok(Ok(())) => Reply::Done,
                    Ok(Err(e)) => Reply::Failed(e.to_string()),
                    Err(_) => Reply::NotFound,
                }
            }
            Request::Hangup { call, source, reason } => {
                let Some(a) = CallActor::find(call) else { return Reply::NotFound };
                match ractor::call!(a, |reply: RpcReplyPort<_>| CallMsg::Hangup { source, reason, reply }) {
                    Ok(Ok(())) => Reply::Done,
                    Ok(Err(e)) => Reply::Failed(e.to_string()),
                    Err(_) => Reply::NotFound,
                }
            }
            Request::AddHints { call, hints } => match CallActor::find(call) {
                Some(a) if a.cast(CallMsg::AddHints(hints)).is_ok() => Reply::Done,
                _ => Reply::NotFound,
            },
        }
    }

    /// Attaches a remote stream to the call's actor; `None` if the call has a stream or ended.
    async fn attach(&self, call: CallSid, link: u64, actor: ActorRef<CallMsg>) -> Option<Arc<StreamQueue>> {
        let q = ractor::call!(actor, |reply: RpcReplyPort<_>| CallMsg::AttachStream { reply }).ok()??;
        let mut s = self.served();
        s.detached.remove(&call);
        s.adopted.remove(&call);
        s.feeds.insert(
            call,
            Feed { link, queue: q.clone(), actor, last: Instant::now(), busy: 0, seq: 0, flowing: false },
        );
        Some(q)
    }

    async fn items(
        &self,
        partition: u32,
        call: CallSid,
        (link, seq): (u64, u64),
        items: Cow<'_, [(Timestamp, StreamItem)]>,
        shed: u32,
        ended: Option<StopReason>,
    ) -> Reply {
        if !self.ours(call) {
            return Reply::Moved;
        }
        let audio = items.iter().any(|(_, i)| matches!(i, StreamItem::Audio(_)));
        let found = {
            let mut s = self.served();
            let Served { feeds, detached, .. } = &mut *s;
            match feeds.get_mut(&call) {
                // A batch sent again after its answer was lost: taken already.
                Some(f) if f.link == link && seq <= f.seq => {
                    f.last = Instant::now();
                    return Reply::Stream { closed: f.queue.closed() };
                }
                Some(f) if f.link == link => {
                    f.last = Instant::now();
                    f.seq = seq;
                    f.busy += 1;
                    let first_audio = !f.flowing && audio;
                    f.flowing |= first_audio;
                    Some((f.queue.clone(), f.actor.clone(), first_audio))
                }
                // A newer stream of the call took its place.
                Some(_) => {
                    count_lost(items.iter().map(|(_, i)| i));
                    return Reply::Stream { closed: Some(StopReason::Disconnected) };
                }
                None if detached.get(&call) == Some(&link) => {
                    count_lost(items.iter().map(|(_, i)| i));
                    return Reply::Stream { closed: Some(StopReason::Disconnected) };
                }
                None => None,
            }
        };
        let (queue, actor, first_audio) = match found {
            Some(f) => f,
            None => {
                // This node took the call's partition over mid-stream: the stream goes on here.
                let Some(a) = self.actor(partition, call).await else {
                    count_lost(items.iter().map(|(_, i)| i));
                    return Reply::Stream { closed: Some(StopReason::CallEnded) };
                };
                let Some(q) = self.attach(call, link, a.clone()).await else {
                    count_lost(items.iter().map(|(_, i)| i));
                    return Reply::Stream { closed: Some(StopReason::CallEnded) };
                };
                if let Some(f) = self.served().feeds.get_mut(&call) {
                    f.flowing = true;
                    f.busy += 1;
                    f.seq = seq;
                }
                (q, a, true)
            }
        };
        for (at, item) in items.into_owned() {
            queue.push(at, item);
        }
        queue.add_shed(shed);
        if first_audio && audio {
            let _ = actor.cast(CallMsg::MediaFlowing);
        }
        // Acknowledged once in the media log: a node that dies after this loses nothing.
        let synced = ractor::call!(actor, CallMsg::Sync).is_ok();
        if let Some(f) = self.served().feeds.get_mut(&call).filter(|f| f.link == link) {
            f.busy = f.busy.saturating_sub(1);
            f.last = Instant::now();
        }
        if !synced {
            // The call ended, or its actor stopped because its partition moved on.
            self.served().feeds.remove(&call);
            if !self.ours(call) {
                return Reply::Moved;
            }
            return Reply::Stream { closed: Some(StopReason::CallEnded) };
        }
        if let Some(reason) = ended {
            // Told before the feed goes, so a waiting end of the call comes after the stream's.
            let _ = actor.cast(CallMsg::StreamEnded { reason });
            self.served().feeds.remove(&call);
        }
        match queue.closed() {
            Some(_) if !self.ours(call) => Reply::Moved,
            closed => Reply::Stream { closed },
        }
    }
}
