//! The call actor over a real event log: stream items reach the media log in order, a writer that
//! falls behind sheds the oldest audio and records it, the supervisor outlives its calls, and a
//! dropped stream is re-attached through Twilio (a fake Twilio here) with the log going on, and a
//! call taken over drops its stream only if none attached to it.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use ractor::{Actor, RpcReplyPort};
use voxgate_actors::call::{
    media_batch, CallActor, CallArgs, CallConfig, CallControl, CallMsg, CallSupervisor, StreamItem, SupervisorMsg,
};
use voxgate_protocol::event::{CallStatus, Event, StopReason, StreamStarted, StreamStopped, Track};
use voxgate_protocol::{AccountSid, CallSid, Clock, StreamSid, SystemClock};
use voxgate_storage::{topics, Log};

fn events(log: &Log, topic: &str, call: CallSid) -> Vec<Event> {
    let p = log.partition_of(topic, call.partition_key()).unwrap();
    let mut recs = Vec::new();
    log.read(topic, p, 0, usize::MAX, &mut recs).unwrap();
    recs.iter()
        .map(|r| voxgate_protocol::decode(r.payload()).unwrap())
        .filter(|e| e.call == Some(call))
        .map(|e| e.payload)
        .collect()
}

/// A real log in a temporary directory (kept while the first value lives), the system clock and
/// a call supervisor.
async fn setup() -> (tempfile::TempDir, Arc<dyn Clock>, Log, ractor::ActorRef<SupervisorMsg>) {
    let dir = tempfile::tempdir().unwrap();
    let clock: Arc<dyn Clock> = Arc::new(SystemClock);
    let log = Log::open(dir.path(), &voxgate_storage::topics::default_specs(), clock.clone()).unwrap();
    let (sup, _) = Actor::spawn(None, CallSupervisor, ()).await.unwrap();
    (dir, clock, log, sup)
}

/// A call of tenant 1 received now, with the default settings, no quota place and no Twilio.
fn args(log: &Log, clock: &Arc<dyn Clock>, call: CallSid, status: CallStatus) -> CallArgs {
    CallArgs {
        tenant: AccountSid::from_u128(1),
        call,
        status,
        received_at: clock.now(),
        config: CallConfig::default(),
        log: log.clone(),
        clock: clock.clone(),
        quota_slot: None,
        control: None,
        hints: String::new(),
    }
}

/// The call's actor, started by `sup`.
async fn spawn(sup: &ractor::ActorRef<SupervisorMsg>, args: CallArgs) -> ractor::ActorRef<CallMsg> {
    ractor::call!(sup, |r: RpcReplyPort<_>| SupervisorMsg::Start(Box::new(args), r)).unwrap().unwrap()
}

/// Sets its flag when dropped (stands for a quota place).
struct Released(Arc<std::sync::atomic::AtomicBool>);

impl Drop for Released {
    fn drop(&mut self) {
        self.0.store(true, std::sync::atomic::Ordering::SeqCst);
    }
}

#[tokio::test(flavor = "current_thread")]
async fn a_writer_that_falls_behind_sheds_the_oldest_audio_and_says_so() {
    let (_dir, clock, log, sup) = setup().await;
    let call = CallSid::from_u128(42);
    let released = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let args = CallArgs {
        config: CallConfig { queue_bytes: 400 / 20 * 160, ..CallConfig::default() },
        quota_slot: Some(Box::new(Released(released.clone()))),
        ..args(&log, &clock, call, CallStatus::Ringing)
    };
    let actor = spawn(&sup, args).await;
    let queue = ractor::call!(actor, |reply| CallMsg::AttachStream { reply }).unwrap().unwrap();
    let sid = StreamSid::from_u128(9);
    start(&queue, clock.as_ref(), sid);
    // 2 s of audio arrives while the actor cannot run (this runtime has one thread and we do not
    // yield): the queue holds 400 ms, so 1.6 s must be shed, oldest first.
    for i in 0..20u64 {
        queue.push(
            clock.now(),
            StreamItem::Audio(media_batch(sid, Track::Inbound, i * 5 + 2, i * 100, 5, 0, Bytes::from(vec![0xFF; 800]))),
        );
    }
    stopped(&queue, clock.as_ref(), sid, StopReason::Twilio);
    actor.cast(CallMsg::StreamEnded { reason: StopReason::Twilio }).unwrap();
    complete(&actor).await;

    let media = events(&log, topics::MEDIA, call);
    let kinds: Vec<&str> = media.iter().map(|e| e.kind()).collect();
    assert_eq!(kinds[..2], ["stream_started", "audio_shed"], "{kinds:?}");
    let Event::AudioShed(shed) = &media[1] else { unreachable!() };
    assert_eq!((shed.frames, shed.audio_ms), (80, 1600));
    let kept: Vec<u64> = media
        .iter()
        .filter_map(|e| match e {
            Event::MediaBatch(b) => Some(b.start_ms),
            _ => None,
        })
        .collect();
    assert_eq!(kept, vec![1600, 1700, 1800, 1900], "the newest 400 ms are kept");
    let Some(Event::StreamStopped(stop)) = media.last() else { panic!("{kinds:?}") };
    assert_eq!(stop.frames, 20, "frames counted by the writer");
    assert_eq!(kinds.iter().filter(|k| **k == "stream_stopped").count(), 1);

    let calls = events(&log, topics::CALLS, call);
    assert!(matches!(calls.last(), Some(Event::CallStatusChanged(c)) if c.status == CallStatus::Completed));
    // The actor stopped; the supervisor did not.
    for _ in 0..100 {
        if CallActor::find(call).is_none() {
            break;
        }
        tokio::task::yield_now().await;
    }
    assert!(CallActor::find(call).is_none());
    assert!(released.load(std::sync::atomic::Ordering::SeqCst), "the quota place is freed when the actor ends");
    assert_eq!(ractor::call!(sup, SupervisorMsg::Active).unwrap(), 0);
}

/// Twilio's REST API as the actor sees it: answers every re-attach request with `status`.
struct FakeTwilio {
    asked: std::sync::Mutex<Vec<CallSid>>,
    status: u16,
}

impl CallControl for FakeTwilio {
    fn reattach_stream(
        &self,
        _tenant: AccountSid,
        call: CallSid,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<u16, voxgate_actors::call::ControlError>> + Send>>
    {
        self.asked.lock().unwrap().push(call);
        let status = self.status;
        Box::pin(async move { Ok(status) })
    }
}

fn start(queue: &voxgate_actors::call::StreamQueue, clock: &dyn Clock, sid: StreamSid) {
    queue.push(
        clock.now(),
        StreamItem::Control(Event::StreamStarted(StreamStarted {
            stream_sid: sid,
            tracks: vec!["inbound".into()],
            custom_parameters: vec![],
        })),
    );
}

/// Twilio's `completed` callback; the call's events are durable when it returns.
async fn complete(actor: &ractor::ActorRef<CallMsg>) {
    let r = ractor::call!(actor, |reply| CallMsg::Status {
        status: CallStatus::Completed,
        sequence: Some(1),
        duration_secs: Some(2),
        reply
    });
    assert_eq!(r.unwrap(), Ok(()));
}

fn stopped(queue: &voxgate_actors::call::StreamQueue, clock: &dyn Clock, sid: StreamSid, reason: StopReason) {
    queue.push(
        clock.now(),
        StreamItem::Control(Event::StreamStopped(StreamStopped { stream_sid: Some(sid), reason, frames: 0 })),
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dropped_stream_is_reattached_and_the_log_goes_on() {
    let (_dir, clock, log, sup) = setup().await;
    let call = CallSid::from_u128(43);
    let twilio = Arc::new(FakeTwilio { asked: Default::default(), status: 200 });
    let args = CallArgs {
        config: CallConfig { reattach_attempts: 1, ..CallConfig::default() },
        control: Some(twilio.clone()),
        ..args(&log, &clock, call, CallStatus::InProgress)
    };
    let actor = spawn(&sup, args).await;

    // The first stream carries 10 frames, then its socket drops (no `stop`).
    let q1 = ractor::call!(actor, |reply| CallMsg::AttachStream { reply }).unwrap().unwrap();
    let (s1, s2, s3) = (StreamSid::from_u128(1), StreamSid::from_u128(2), StreamSid::from_u128(3));
    start(&q1, clock.as_ref(), s1);
    q1.push(
        clock.now(),
        StreamItem::Audio(media_batch(s1, Track::Inbound, 2, 0, 10, 0, Bytes::from(vec![0x55; 1600]))),
    );
    stopped(&q1, clock.as_ref(), s1, StopReason::Disconnected);
    // While the first stream is still attached, a second is refused.
    assert!(ractor::call!(actor, |reply| CallMsg::AttachStream { reply }).unwrap().is_none());
    actor.cast(CallMsg::StreamEnded { reason: StopReason::Disconnected }).unwrap();
    // Twilio is asked, and its answer recorded, by the time the fresh stream comes (bounded).
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !events(&log, topics::CALLS, call).iter().any(|e| matches!(e, Event::StreamReattachRequested(_))) {
        assert!(tokio::time::Instant::now() < deadline, "Twilio's answer to the re-attach was not recorded");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }

    // Twilio was asked once; the fresh stream attaches and carries the call on.
    let q2 = ractor::call!(actor, |reply| CallMsg::AttachStream { reply }).unwrap().unwrap();
    start(&q2, clock.as_ref(), s2);
    q2.push(clock.now(), StreamItem::Audio(media_batch(s2, Track::Inbound, 2, 0, 5, 0, Bytes::from(vec![0x55; 800]))));
    stopped(&q2, clock.as_ref(), s2, StopReason::Disconnected);
    actor.cast(CallMsg::StreamEnded { reason: StopReason::Disconnected }).unwrap();
    // The actor takes its messages in order: once it answers this, it has taken the drop.
    ractor::call!(actor, CallMsg::Sync).unwrap();
    // The attempts are spent: the drop is recorded, Twilio is not asked again, but a stream that
    // Twilio attaches on its own is still taken.
    let q3 = ractor::call!(actor, |reply| CallMsg::AttachStream { reply }).unwrap().unwrap();
    start(&q3, clock.as_ref(), s3);
    stopped(&q3, clock.as_ref(), s3, StopReason::Twilio);
    actor.cast(CallMsg::StreamEnded { reason: StopReason::Twilio }).unwrap();
    complete(&actor).await;
    assert_eq!(*twilio.asked.lock().unwrap(), vec![call]);

    let calls = events(&log, topics::CALLS, call);
    let drops: Vec<(u32, bool)> = calls
        .iter()
        .filter_map(|e| match e {
            Event::StreamDropped(d) => Some((d.attempt, d.reattach)),
            _ => None,
        })
        .collect();
    assert_eq!(drops, vec![(1, true), (2, false)]);
    let answers: Vec<_> = calls
        .iter()
        .filter_map(|e| match e {
            Event::StreamReattachRequested(r) => Some((r.attempt, r.twilio_status, r.error.clone())),
            _ => None,
        })
        .collect();
    assert_eq!(answers, vec![(1, Some(200), None)]);

    let media = events(&log, topics::MEDIA, call);
    let kinds: Vec<&str> = media.iter().map(|e| e.kind()).collect();
    assert_eq!(
        kinds,
        [
            "stream_started",
            "media_batch",
            "stream_stopped",
            "stream_resumed",
            "stream_started",
            "media_batch",
            "stream_stopped",
            "stream_started",
            "stream_stopped"
        ],
        "{kinds:?}"
    );
    let Event::StreamResumed(gap) = &media[3] else { unreachable!() };
    assert_eq!((gap.previous, gap.stream_sid, gap.attempt), (Some(s1), s2, 1));
    assert!(gap.gap_ms < 10_000, "{gap:?}");
    // Each stream's stop counts its own frames.
    let stops: Vec<(Option<StreamSid>, StopReason, u64)> = media
        .iter()
        .filter_map(|e| match e {
            Event::StreamStopped(s) => Some((s.stream_sid, s.reason.clone(), s.frames)),
            _ => None,
        })
        .collect();
    assert_eq!(
        stops,
        vec![
            (Some(s1), StopReason::Disconnected, 10),
            (Some(s2), StopReason::Disconnected, 5),
            (Some(s3), StopReason::Twilio, 0)
        ]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_taken_over_drops_its_stream_only_if_none_attached() {
    let (_dir, clock, log, sup) = setup().await;
    let twilio = Arc::new(FakeTwilio { asked: Default::default(), status: 200 });
    let drops = |call: CallSid| {
        events(&log, topics::CALLS, call).iter().filter(|e| matches!(e, Event::StreamDropped(_))).count()
    };

    // No stream reached the actor since the node took the call over: the stream is dropped and
    // Twilio is asked for a fresh one.
    let (lost, kept) = (CallSid::from_u128(44), CallSid::from_u128(45));
    let actor =
        spawn(&sup, CallArgs { control: Some(twilio.clone()), ..args(&log, &clock, lost, CallStatus::InProgress) })
            .await;
    actor.cast(CallMsg::StreamAbsent).unwrap();
    complete(&actor).await;
    assert_eq!(drops(lost), 1);

    // A stream attached on a path the node's sweep does not see (its own ingress, directly): the
    // same notice leaves it alone, and it ends as Twilio ends it.
    let actor =
        spawn(&sup, CallArgs { control: Some(twilio.clone()), ..args(&log, &clock, kept, CallStatus::InProgress) })
            .await;
    let q = ractor::call!(actor, |reply| CallMsg::AttachStream { reply }).unwrap().unwrap();
    let sid = StreamSid::from_u128(7);
    start(&q, clock.as_ref(), sid);
    actor.cast(CallMsg::StreamAbsent).unwrap();
    stopped(&q, clock.as_ref(), sid, StopReason::Twilio);
    actor.cast(CallMsg::StreamEnded { reason: StopReason::Twilio }).unwrap();
    complete(&actor).await;
    assert_eq!(drops(kept), 0);
    let media: Vec<&str> = events(&log, topics::MEDIA, kept).iter().map(|e| e.kind()).collect();
    assert_eq!(media, ["stream_started", "stream_stopped"]);
}

/// Waits (bounded) until the call's actor has stopped.
async fn gone(call: CallSid) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while CallActor::find(call).is_some() {
        assert!(tokio::time::Instant::now() < deadline, "the call's actor did not stop");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

fn audio(sid: StreamSid, k: u64) -> StreamItem {
    StreamItem::Audio(media_batch(sid, Track::Inbound, k * 5 + 2, k * 100, 5, 0, Bytes::from(vec![0x55; 800])))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_call_that_ends_first_keeps_what_its_stream_still_hands_over() {
    let (_dir, clock, log, sup) = setup().await;
    let call = CallSid::from_u128(46);
    let actor = spawn(&sup, args(&log, &clock, call, CallStatus::InProgress)).await;
    let q = ractor::call!(actor, |reply| CallMsg::AttachStream { reply }).unwrap().unwrap();
    let sid = StreamSid::from_u128(8);
    start(&q, clock.as_ref(), sid);
    q.push(clock.now(), audio(sid, 0));
    // Twilio's `completed` comes before the reader has read the stream's last frames and stop
    // (Twilio does not wait for the stream): the call asks the reader to close...
    complete(&actor).await;
    assert_eq!(q.closed(), Some(StopReason::CallEnded));
    // ... and waits for what the reader still held, and its stop.
    for k in 1..10 {
        q.push(clock.now(), audio(sid, k));
    }
    stopped(&q, clock.as_ref(), sid, StopReason::Twilio);
    actor.cast(CallMsg::StreamEnded { reason: StopReason::Twilio }).unwrap();
    gone(call).await;

    let media = events(&log, topics::MEDIA, call);
    let kinds: Vec<&str> = media.iter().map(|e| e.kind()).collect();
    let mut want = vec!["stream_started"];
    want.extend(["media_batch"; 10]);
    want.push("stream_stopped");
    assert_eq!(kinds, want, "every frame, then one stop");
    let Some(Event::StreamStopped(stop)) = media.last() else { unreachable!() };
    assert_eq!((stop.reason.clone(), stop.frames), (StopReason::Twilio, 50));
    assert_eq!(ractor::call!(sup, SupervisorMsg::Active).unwrap(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reader_that_never_finishes_holds_the_call_only_for_its_grace() {
    let (_dir, clock, log, sup) = setup().await;
    let call = CallSid::from_u128(47);
    let args = CallArgs {
        config: CallConfig { stream_end_grace: Duration::from_millis(200), ..CallConfig::default() },
        ..args(&log, &clock, call, CallStatus::InProgress)
    };
    let actor = spawn(&sup, args).await;
    let q = ractor::call!(actor, |reply| CallMsg::AttachStream { reply }).unwrap().unwrap();
    let sid = StreamSid::from_u128(9);
    start(&q, clock.as_ref(), sid);
    q.push(clock.now(), audio(sid, 0));
    complete(&actor).await;
    q.push(clock.now(), audio(sid, 1));
    // The reader never says it is done: the call stops after its grace, with what was queued.
    gone(call).await;
    // The reader's late audio reaches nobody; it is refused, not written.
    q.push(clock.now(), audio(sid, 2));

    let media = events(&log, topics::MEDIA, call);
    let kinds: Vec<&str> = media.iter().map(|e| e.kind()).collect();
    assert_eq!(kinds, ["stream_started", "media_batch", "media_batch", "stream_stopped"], "{kinds:?}");
    let Some(Event::StreamStopped(stop)) = media.last() else { unreachable!() };
    assert_eq!((stop.reason.clone(), stop.frames), (StopReason::CallEnded, 10));
}
