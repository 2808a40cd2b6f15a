//! The call actor over a real event log: stream items reach the media log in order, a writer that
//! falls behind sheds the oldest audio and records it, and the supervisor outlives its calls.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use ractor::{Actor, RpcReplyPort};
use voxgate_actors::call::{
    media_batch, CallActor, CallArgs, CallConfig, CallMsg, CallSupervisor, StreamItem, SupervisorMsg,
};
use voxgate_protocol::event::{CallStatus, Event, StopReason, StreamStarted, StreamStopped};
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

/// Sets its flag when dropped (stands for a quota place).
struct Released(Arc<std::sync::atomic::AtomicBool>);

impl Drop for Released {
    fn drop(&mut self) {
        self.0.store(true, std::sync::atomic::Ordering::SeqCst);
    }
}

#[tokio::test(flavor = "current_thread")]
async fn a_writer_that_falls_behind_sheds_the_oldest_audio_and_says_so() {
    let dir = tempfile::tempdir().unwrap();
    let clock: Arc<dyn Clock> = Arc::new(SystemClock);
    let log = Log::open(dir.path(), &voxgate_storage::topics::default_specs(), clock.clone()).unwrap();
    let (sup, _) = Actor::spawn(None, CallSupervisor, ()).await.unwrap();
    let call = CallSid::from_u128(42);
    let released = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let args = CallArgs {
        tenant: AccountSid::from_u128(1),
        call,
        status: CallStatus::Ringing,
        received_at: clock.now(),
        config: CallConfig { queue_audio: Duration::from_millis(400), ..CallConfig::default() },
        log: log.clone(),
        clock: clock.clone(),
        quota_slot: Some(Box::new(Released(released.clone()))),
    };
    let actor = ractor::call!(sup, |r: RpcReplyPort<_>| SupervisorMsg::Start(Box::new(args), r)).unwrap().unwrap();
    let queue = ractor::call!(actor, |reply| CallMsg::AttachStream { reply }).unwrap().unwrap();
    let sid = StreamSid::from_u128(9);
    queue.push(
        clock.now(),
        StreamItem::Control(Event::StreamStarted(StreamStarted {
            stream_sid: sid,
            tracks: vec!["inbound".into()],
            custom_parameters: vec![],
        })),
    );
    // 2 s of audio arrives while the actor cannot run (this runtime has one thread and we do not
    // yield): the queue holds 400 ms, so 1.6 s must be shed, oldest first.
    for i in 0..20u64 {
        queue.push(
            clock.now(),
            StreamItem::Audio(media_batch(sid, i * 5 + 2, i * 100, 5, 0, Bytes::from(vec![0xFF; 800]))),
        );
    }
    queue.push(
        clock.now(),
        StreamItem::Control(Event::StreamStopped(StreamStopped {
            stream_sid: Some(sid),
            reason: StopReason::Twilio,
            frames: 0,
        })),
    );
    actor.cast(CallMsg::StreamEnded).unwrap();
    let r = ractor::call!(actor, |reply| CallMsg::Status {
        status: CallStatus::Completed,
        sequence: Some(1),
        duration_secs: Some(2),
        reply
    });
    assert_eq!(r.unwrap(), Ok(()));

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
