//! Version 1 of the log format, read forever: the events as they were before media batches,
//! speech segments and transcripts carried their track (all version-1 audio is the caller's,
//! `inbound`). Frozen: nothing here changes again; a new version gets a module of its own.

use bytes::Bytes;
use serde::Deserialize;

use crate::event::{self as e, EventId, Track};
use crate::ids::{AccountSid, CallSid, StreamSid};
use crate::time::Timestamp;

#[derive(Deserialize)]
pub(crate) struct EnvelopeV1 {
    event_id: EventId,
    tenant: AccountSid,
    call: Option<CallSid>,
    occurred_at: Timestamp,
    payload: V1,
}

impl From<EnvelopeV1> for e::Envelope {
    fn from(v: EnvelopeV1) -> Self {
        e::Envelope {
            event_id: v.event_id,
            tenant: v.tenant,
            call: v.call,
            occurred_at: v.occurred_at,
            payload: v.payload.into(),
        }
    }
}

#[derive(Deserialize)]
enum V1 {
    CallReceived(e::CallReceived),
    CallRejected(e::CallRejected),
    CallStatusChanged(e::CallStatusChanged),
    StreamStarted(e::StreamStarted),
    MediaBatch(MediaBatchV1),
    Dtmf(e::Dtmf),
    StreamMark(e::StreamMark),
    StreamStopped(e::StreamStopped),
    StreamFault(e::StreamFault),
    AudioShed(e::AudioShed),
    CallTimedOut(e::CallTimedOut),
    SpeechSegment(SpeechSegmentV1),
    Transcript(TranscriptV1),
    TenantCreated(e::TenantCreated),
    TenantUpdated(e::TenantUpdated),
    NumberAssigned(e::NumberAssigned),
    NumberReleased(e::NumberReleased),
    QuotaSet(e::QuotaSet),
    CallerBlocked(e::CallerBlocked),
    CallerUnblocked(e::CallerUnblocked),
    QuotaWarning(e::QuotaWarning),
    FraudVerdict(e::FraudVerdict),
    HangupRequested(e::HangupRequested),
    AlertRaised(e::AlertRaised),
    UsageTriggerCreated(e::UsageTriggerCreated),
    UsageTriggerUpdated(e::UsageTriggerUpdated),
    UsageTriggerDeleted(e::UsageTriggerDeleted),
    UsageTriggerFired(e::UsageTriggerFired),
    TriggerCallbackAttempted(e::TriggerCallbackAttempted),
    BudgetExceeded(e::BudgetExceeded),
    StreamDropped(e::StreamDropped),
    StreamReattachRequested(e::StreamReattachRequested),
    StreamResumed(e::StreamResumed),
    CallDurationImplausible(e::CallDurationImplausible),
    OperatorStatusSet(e::OperatorStatusSet),
}

impl From<V1> for e::Event {
    fn from(v: V1) -> Self {
        match v {
            V1::CallReceived(p) => e::Event::CallReceived(p),
            V1::CallRejected(p) => e::Event::CallRejected(p),
            V1::CallStatusChanged(p) => e::Event::CallStatusChanged(p),
            V1::StreamStarted(p) => e::Event::StreamStarted(p),
            V1::MediaBatch(p) => e::Event::MediaBatch(p.into()),
            V1::Dtmf(p) => e::Event::Dtmf(p),
            V1::StreamMark(p) => e::Event::StreamMark(p),
            V1::StreamStopped(p) => e::Event::StreamStopped(p),
            V1::StreamFault(p) => e::Event::StreamFault(p),
            V1::AudioShed(p) => e::Event::AudioShed(p),
            V1::CallTimedOut(p) => e::Event::CallTimedOut(p),
            V1::SpeechSegment(p) => e::Event::SpeechSegment(p.into()),
            V1::Transcript(p) => e::Event::Transcript(p.into()),
            V1::TenantCreated(p) => e::Event::TenantCreated(p),
            V1::TenantUpdated(p) => e::Event::TenantUpdated(p),
            V1::NumberAssigned(p) => e::Event::NumberAssigned(p),
            V1::NumberReleased(p) => e::Event::NumberReleased(p),
            V1::QuotaSet(p) => e::Event::QuotaSet(p),
            V1::CallerBlocked(p) => e::Event::CallerBlocked(p),
            V1::CallerUnblocked(p) => e::Event::CallerUnblocked(p),
            V1::QuotaWarning(p) => e::Event::QuotaWarning(p),
            V1::FraudVerdict(p) => e::Event::FraudVerdict(p),
            V1::HangupRequested(p) => e::Event::HangupRequested(p),
            V1::AlertRaised(p) => e::Event::AlertRaised(p),
            V1::UsageTriggerCreated(p) => e::Event::UsageTriggerCreated(p),
            V1::UsageTriggerUpdated(p) => e::Event::UsageTriggerUpdated(p),
            V1::UsageTriggerDeleted(p) => e::Event::UsageTriggerDeleted(p),
            V1::UsageTriggerFired(p) => e::Event::UsageTriggerFired(p),
            V1::TriggerCallbackAttempted(p) => e::Event::TriggerCallbackAttempted(p),
            V1::BudgetExceeded(p) => e::Event::BudgetExceeded(p),
            V1::StreamDropped(p) => e::Event::StreamDropped(p),
            V1::StreamReattachRequested(p) => e::Event::StreamReattachRequested(p),
            V1::StreamResumed(p) => e::Event::StreamResumed(p),
            V1::CallDurationImplausible(p) => e::Event::CallDurationImplausible(p),
            V1::OperatorStatusSet(p) => e::Event::OperatorStatusSet(p),
        }
    }
}

#[derive(Deserialize)]
struct MediaBatchV1 {
    stream_sid: StreamSid,
    first_sequence: u64,
    start_ms: u64,
    frames: u32,
    gap_frames: u32,
    #[serde(with = "crate::bytes_b64")]
    payload: Bytes,
}

impl From<MediaBatchV1> for e::MediaBatch {
    fn from(v: MediaBatchV1) -> Self {
        e::MediaBatch {
            stream_sid: v.stream_sid,
            first_sequence: v.first_sequence,
            start_ms: v.start_ms,
            frames: v.frames,
            gap_frames: v.gap_frames,
            payload: v.payload,
            track: Track::Inbound,
        }
    }
}

#[derive(Deserialize)]
struct SpeechSegmentV1 {
    stream_sid: StreamSid,
    index: u32,
    start_ms: u64,
    end_ms: u64,
    sample_rate: u32,
    #[serde(with = "crate::bytes_b64")]
    pcm16le: Bytes,
}

impl From<SpeechSegmentV1> for e::SpeechSegment {
    fn from(v: SpeechSegmentV1) -> Self {
        e::SpeechSegment {
            stream_sid: v.stream_sid,
            index: v.index,
            start_ms: v.start_ms,
            end_ms: v.end_ms,
            sample_rate: v.sample_rate,
            pcm16le: v.pcm16le,
            track: Track::Inbound,
        }
    }
}

#[derive(Deserialize)]
struct TranscriptV1 {
    stream_sid: StreamSid,
    segment_index: u32,
    segment_event: EventId,
    start_ms: u64,
    end_ms: u64,
    text: String,
    model: String,
    processing_ms: u32,
    avg_logprob: f32,
    no_speech_prob: f32,
    rejected: Option<String>,
}

impl From<TranscriptV1> for e::Transcript {
    fn from(v: TranscriptV1) -> Self {
        e::Transcript {
            stream_sid: v.stream_sid,
            segment_index: v.segment_index,
            segment_event: v.segment_event,
            start_ms: v.start_ms,
            end_ms: v.end_ms,
            text: v.text,
            model: v.model,
            processing_ms: v.processing_ms,
            avg_logprob: v.avg_logprob,
            no_speech_prob: v.no_speech_prob,
            rejected: v.rejected,
            track: Track::Inbound,
            doubt: None,
        }
    }
}
