//! Events and their envelope: everything voxgate knows is one of these, in a persisted log.
//!
//! Rules that keep old logs readable: variants of [`Event`] and fields of payload structs are only
//! ever added at the end; the envelope version in the codec changes when that rule must be broken.
//! Event ids are derived from their inputs (a Twilio retry of the same webhook, or a stage
//! replaying the same input, produces the same id), so consumers can de-duplicate.

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::ids::{AccountSid, CallSid, StreamSid};
use crate::time::Timestamp;

/// A 128-bit event id, derived deterministically from what caused the event. In JSON it is the
/// string `EV` + 32 hex digits (JSON numbers cannot carry 128 bits); in postcard a `u128`.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct EventId(pub u128);

impl Serialize for EventId {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        if s.is_human_readable() {
            s.collect_str(self)
        } else {
            s.serialize_u128(self.0)
        }
    }
}

impl<'de> Deserialize<'de> for EventId {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        if d.is_human_readable() {
            let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
            s.strip_prefix("EV")
                .filter(|h| h.len() == 32)
                .and_then(|h| u128::from_str_radix(h, 16).ok())
                .map(EventId)
                .ok_or_else(|| serde::de::Error::custom("event id must be EV followed by 32 hex digits"))
        } else {
            u128::deserialize(d).map(EventId)
        }
    }
}

impl EventId {
    /// Mixes a kind tag and up to a few 128-bit parts into an id (not cryptographic; stable
    /// across versions because it is written out here, not taken from std's hasher).
    /// An id of a text (its UTF-8 bytes, 16 at a time), for deriving ids from text.
    pub fn of_text(text: &str) -> Self {
        let parts: Vec<u128> = text
            .as_bytes()
            .chunks(16)
            .map(|c| {
                let mut b = [0u8; 16];
                b[..c.len()].copy_from_slice(c);
                u128::from_le_bytes(b)
            })
            .chain(std::iter::once(text.len() as u128))
            .collect();
        Self::derive(0x7e47, &parts)
    }

    pub fn derive(kind: u64, parts: &[u128]) -> Self {
        let mut a: u64 = 0x9e37_79b9_7f4a_7c15 ^ kind;
        let mut b: u64 = 0xc2b2_ae3d_27d4_eb4f ^ kind.rotate_left(32);
        for &p in parts {
            a = mix(a ^ (p as u64));
            b = mix(b ^ ((p >> 64) as u64) ^ a);
            a = mix(a ^ b);
        }
        Self((u128::from(a) << 64) | u128::from(b))
    }
}

fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

impl std::fmt::Display for EventId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "EV{:032x}", self.0)
    }
}

impl std::fmt::Debug for EventId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Display::fmt(self, f)
    }
}

/// What every log entry carries.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Envelope {
    pub event_id: EventId,
    pub tenant: AccountSid,
    pub call: Option<CallSid>,
    /// Event time: when it happened (ingress clock, or derived from the input's event time).
    pub occurred_at: Timestamp,
    pub payload: Event,
}

/// Call status as Twilio names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum CallStatus {
    Queued,
    Initiated,
    Ringing,
    InProgress,
    Completed,
    Busy,
    Failed,
    NoAnswer,
    Canceled,
}

impl CallStatus {
    /// Twilio's wire string.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Queued => "queued",
            Self::Initiated => "initiated",
            Self::Ringing => "ringing",
            Self::InProgress => "in-progress",
            Self::Completed => "completed",
            Self::Busy => "busy",
            Self::Failed => "failed",
            Self::NoAnswer => "no-answer",
            Self::Canceled => "canceled",
        }
    }

    /// Parses Twilio's wire string.
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "queued" => Self::Queued,
            "initiated" => Self::Initiated,
            "ringing" => Self::Ringing,
            "in-progress" => Self::InProgress,
            "completed" => Self::Completed,
            "busy" => Self::Busy,
            "failed" => Self::Failed,
            "no-answer" => Self::NoAnswer,
            "canceled" => Self::Canceled,
            _ => return None,
        })
    }

    /// A terminal status ends the call.
    pub fn is_terminal(self) -> bool {
        matches!(self, Self::Completed | Self::Busy | Self::Failed | Self::NoAnswer | Self::Canceled)
    }
}

impl std::fmt::Display for CallStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Call direction as Twilio names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Direction {
    Inbound,
    OutboundApi,
    OutboundDial,
    Other,
}

impl Direction {
    pub fn parse(s: &str) -> Self {
        match s {
            "inbound" => Self::Inbound,
            "outbound-api" => Self::OutboundApi,
            "outbound-dial" => Self::OutboundDial,
            _ => Self::Other,
        }
    }
}

/// The payload of an event. Variants are only ever added at the end.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Event {
    CallReceived(CallReceived),
    CallRejected(CallRejected),
    CallStatusChanged(CallStatusChanged),
    StreamStarted(StreamStarted),
    MediaBatch(MediaBatch),
    Dtmf(Dtmf),
    StreamMark(StreamMark),
    StreamStopped(StreamStopped),
    StreamFault(StreamFault),
    AudioShed(AudioShed),
    CallTimedOut(CallTimedOut),
    SpeechSegment(SpeechSegment),
    Transcript(Transcript),
    TenantCreated(TenantCreated),
    TenantUpdated(TenantUpdated),
    NumberAssigned(NumberAssigned),
    NumberReleased(NumberReleased),
    QuotaSet(QuotaSet),
    CallerBlocked(CallerBlocked),
    CallerUnblocked(CallerUnblocked),
    QuotaWarning(QuotaWarning),
    FraudVerdict(FraudVerdict),
    HangupRequested(HangupRequested),
    AlertRaised(AlertRaised),
    UsageTriggerCreated(UsageTriggerCreated),
    UsageTriggerUpdated(UsageTriggerUpdated),
    UsageTriggerDeleted(UsageTriggerDeleted),
    UsageTriggerFired(UsageTriggerFired),
    TriggerCallbackAttempted(TriggerCallbackAttempted),
    BudgetExceeded(BudgetExceeded),
    StreamDropped(StreamDropped),
    StreamReattachRequested(StreamReattachRequested),
    StreamResumed(StreamResumed),
    CallDurationImplausible(CallDurationImplausible),
    OperatorStatusSet(OperatorStatusSet),
    NumberRouted(NumberRouted),
    AppExchange(AppExchange),
    GatewayAnswered(GatewayAnswered),
    TranscriptionStarted(TranscriptionStarted),
    TranscriptionStopped(TranscriptionStopped),
    SpeechEnded(SpeechEnded),
    SpeechProgress(SpeechProgress),
    PartialTranscript(PartialTranscript),
    AppRequest(AppRequest),
    SpeechHintsSet(SpeechHintsSet),
    SpeechHints(SpeechHints),
}

impl Event {
    /// The snake_case name users see (`voxgate replay --json` field `kind`).
    pub fn kind(&self) -> &'static str {
        match self {
            Self::CallReceived(_) => "call_received",
            Self::CallRejected(_) => "call_rejected",
            Self::CallStatusChanged(_) => "call_status_changed",
            Self::StreamStarted(_) => "stream_started",
            Self::MediaBatch(_) => "media_batch",
            Self::Dtmf(_) => "dtmf",
            Self::StreamMark(_) => "stream_mark",
            Self::StreamStopped(_) => "stream_stopped",
            Self::StreamFault(_) => "stream_fault",
            Self::AudioShed(_) => "audio_shed",
            Self::CallTimedOut(_) => "call_timed_out",
            Self::SpeechSegment(_) => "speech_segment",
            Self::Transcript(_) => "transcript",
            Self::TenantCreated(_) => "tenant_created",
            Self::TenantUpdated(_) => "tenant_updated",
            Self::NumberAssigned(_) => "number_assigned",
            Self::NumberReleased(_) => "number_released",
            Self::QuotaSet(_) => "quota_set",
            Self::CallerBlocked(_) => "caller_blocked",
            Self::CallerUnblocked(_) => "caller_unblocked",
            Self::QuotaWarning(_) => "quota_warning",
            Self::FraudVerdict(_) => "fraud_verdict",
            Self::HangupRequested(_) => "hangup_requested",
            Self::AlertRaised(_) => "alert_raised",
            Self::UsageTriggerCreated(_) => "usage_trigger_created",
            Self::UsageTriggerUpdated(_) => "usage_trigger_updated",
            Self::UsageTriggerDeleted(_) => "usage_trigger_deleted",
            Self::UsageTriggerFired(_) => "usage_trigger_fired",
            Self::TriggerCallbackAttempted(_) => "trigger_callback_attempted",
            Self::BudgetExceeded(_) => "budget_exceeded",
            Self::StreamDropped(_) => "stream_dropped",
            Self::StreamReattachRequested(_) => "stream_reattach_requested",
            Self::StreamResumed(_) => "stream_resumed",
            Self::CallDurationImplausible(_) => "call_duration_implausible",
            Self::OperatorStatusSet(_) => "operator_status_set",
            Self::NumberRouted(_) => "number_routed",
            Self::AppExchange(_) => "app_exchange",
            Self::GatewayAnswered(_) => "gateway_answered",
            Self::TranscriptionStarted(_) => "transcription_started",
            Self::TranscriptionStopped(_) => "transcription_stopped",
            Self::SpeechEnded(_) => "speech_ended",
            Self::SpeechProgress(_) => "speech_progress",
            Self::PartialTranscript(_) => "partial_transcript",
            Self::AppRequest(_) => "app_request",
            Self::SpeechHintsSet(_) => "speech_hints_set",
            Self::SpeechHints(_) => "speech_hints",
        }
    }

    /// The payload alone as JSON (bytes as base64), for the JSON views.
    pub fn payload_json(&self) -> serde_json::Value {
        let r = match self {
            Self::CallReceived(p) => serde_json::to_value(p),
            Self::CallRejected(p) => serde_json::to_value(p),
            Self::CallStatusChanged(p) => serde_json::to_value(p),
            Self::StreamStarted(p) => serde_json::to_value(p),
            Self::MediaBatch(p) => serde_json::to_value(p),
            Self::Dtmf(p) => serde_json::to_value(p),
            Self::StreamMark(p) => serde_json::to_value(p),
            Self::StreamStopped(p) => serde_json::to_value(p),
            Self::StreamFault(p) => serde_json::to_value(p),
            Self::AudioShed(p) => serde_json::to_value(p),
            Self::CallTimedOut(p) => serde_json::to_value(p),
            Self::SpeechSegment(p) => serde_json::to_value(p),
            Self::Transcript(p) => serde_json::to_value(p),
            Self::TenantCreated(p) => serde_json::to_value(p),
            Self::TenantUpdated(p) => serde_json::to_value(p),
            Self::NumberAssigned(p) => serde_json::to_value(p),
            Self::NumberReleased(p) => serde_json::to_value(p),
            Self::QuotaSet(p) => serde_json::to_value(p),
            Self::CallerBlocked(p) => serde_json::to_value(p),
            Self::CallerUnblocked(p) => serde_json::to_value(p),
            Self::QuotaWarning(p) => serde_json::to_value(p),
            Self::FraudVerdict(p) => serde_json::to_value(p),
            Self::HangupRequested(p) => serde_json::to_value(p),
            Self::AlertRaised(p) => serde_json::to_value(p),
            Self::UsageTriggerCreated(p) => serde_json::to_value(p),
            Self::UsageTriggerUpdated(p) => serde_json::to_value(p),
            Self::UsageTriggerDeleted(p) => serde_json::to_value(p),
            Self::UsageTriggerFired(p) => serde_json::to_value(p),
            Self::TriggerCallbackAttempted(p) => serde_json::to_value(p),
            Self::BudgetExceeded(p) => serde_json::to_value(p),
            Self::StreamDropped(p) => serde_json::to_value(p),
            Self::StreamReattachRequested(p) => serde_json::to_value(p),
            Self::StreamResumed(p) => serde_json::to_value(p),
            Self::CallDurationImplausible(p) => serde_json::to_value(p),
            Self::OperatorStatusSet(p) => serde_json::to_value(p),
            Self::NumberRouted(p) => serde_json::to_value(p),
            Self::AppExchange(p) => serde_json::to_value(p),
            Self::GatewayAnswered(p) => serde_json::to_value(p),
            Self::TranscriptionStarted(p) => serde_json::to_value(p),
            Self::TranscriptionStopped(p) => serde_json::to_value(p),
            Self::SpeechEnded(p) => serde_json::to_value(p),
            Self::SpeechProgress(p) => serde_json::to_value(p),
            Self::PartialTranscript(p) => serde_json::to_value(p),
            Self::AppRequest(p) => serde_json::to_value(p),
            Self::SpeechHintsSet(p) => serde_json::to_value(p),
            Self::SpeechHints(p) => serde_json::to_value(p),
        };
        r.unwrap_or_else(|e| serde_json::json!({ "payload_error": e.to_string() }))
    }
}

/// An inbound (or outbound) call webhook was accepted for a known tenant.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CallReceived {
    pub from: String,
    pub to: String,
    pub direction: Direction,
    pub status: CallStatus,
    pub from_country: Option<String>,
    pub to_country: Option<String>,
    /// The Media Streams session the TwiML answer pointed Twilio at.
    pub stream_session: String,
}

/// Why a call was refused at webhook time. Variants are only ever added at the end.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RejectReason {
    UnknownTenant,
    UnknownNumber,
    /// The tenant is suspended or closed (Twilio 10003).
    TenantInactive {
        status: TenantStatus,
    },
    /// The tenant's concurrent-call quota is full (53119-style).
    ConcurrencyQuota {
        active: u32,
        limit: u32,
    },
    /// The tenant's new-calls-per-second quota is spent.
    RateQuota {
        limit_per_sec: u32,
    },
    /// This caller called the tenant too often in the window.
    CallerRate {
        calls: u32,
        limit: u32,
        window_secs: u32,
    },
    /// The caller is on the tenant's (or the platform's) block list.
    BlockedCaller {
        number: String,
    },
    /// The caller's number starts with a premium-rate prefix.
    PremiumRate {
        prefix: String,
    },
    /// The tenant (or an account above it) has spent its monthly budget.
    BudgetExceeded {
        /// The account whose budget is spent: the tenant or one of its ancestors.
        account: AccountSid,
        budget_micros: u64,
    },
}

impl RejectReason {
    /// The Twilio-style error code recorded with the refusal.
    pub fn code(&self) -> u32 {
        match self {
            Self::UnknownTenant => 20404,
            Self::UnknownNumber => 21217,
            Self::TenantInactive { .. } => 10003,
            Self::ConcurrencyQuota { .. } => 53119,
            Self::RateQuota { .. } => 20429,
            Self::CallerRate { .. } => 13225,
            Self::BlockedCaller { .. } => 13225,
            Self::PremiumRate { .. } => 13225,
            Self::BudgetExceeded { .. } => 10003,
        }
    }

    /// A short label for metrics.
    pub fn label(&self) -> &'static str {
        match self {
            Self::UnknownTenant => "unknown_tenant",
            Self::UnknownNumber => "unknown_number",
            Self::TenantInactive { .. } => "tenant_inactive",
            Self::ConcurrencyQuota { .. } => "concurrency_quota",
            Self::RateQuota { .. } => "rate_quota",
            Self::CallerRate { .. } => "caller_rate",
            Self::BlockedCaller { .. } => "blocked_caller",
            Self::PremiumRate { .. } => "premium_rate",
            Self::BudgetExceeded { .. } => "budget_exceeded",
        }
    }
}

/// A call was refused at webhook time (answered with `<Reject/>`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CallRejected {
    pub from: String,
    pub to: String,
    pub reason: RejectReason,
}

/// Who told us about a status change.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StatusSource {
    /// Twilio's status callback.
    Callback,
    /// Inferred from the media stream (first media ⇒ in-progress).
    Stream,
    /// voxgate ended the call itself (maximum duration).
    Voxgate,
}

/// The call's status changed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CallStatusChanged {
    pub status: CallStatus,
    pub source: StatusSource,
    /// Twilio's `SequenceNumber` on status callbacks.
    pub sequence: Option<u32>,
    /// `CallDuration` seconds on terminal callbacks.
    pub duration_secs: Option<u32>,
}

/// Twilio opened the Media Stream for the call.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StreamStarted {
    pub stream_sid: StreamSid,
    pub tracks: Vec<String>,
    pub custom_parameters: Vec<(String, String)>,
}

/// About 100 ms of one track's µ-law audio: consecutive 20 ms frames, concatenated.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MediaBatch {
    pub stream_sid: StreamSid,
    /// Media Streams `sequenceNumber` of the first frame.
    pub first_sequence: u64,
    /// Stream `timestamp` (ms since stream start) of the first frame.
    pub start_ms: u64,
    /// How many frames are in `payload`.
    pub frames: u32,
    /// Frames Twilio skipped before this batch (a gap in sequence numbers).
    pub gap_frames: u32,
    /// Raw µ-law, 8 kHz mono.
    #[serde(with = "crate::bytes_b64")]
    pub payload: Bytes,
    /// Whose audio: the caller's (`inbound`) or what the call sends them (`outbound`).
    pub track: Track,
}

/// A Media Streams track: `inbound` is the audio Twilio receives from the caller, `outbound`
/// what the call plays or says to them (the app, an agent on a `<Dial>`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Track {
    #[default]
    Inbound,
    Outbound,
}

impl Track {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Inbound => "inbound",
            Self::Outbound => "outbound",
        }
    }

    /// Media Streams' `media.track` value (`inbound`, `outbound`).
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "inbound" | "inbound_track" => Some(Self::Inbound),
            "outbound" | "outbound_track" => Some(Self::Outbound),
            _ => None,
        }
    }

    /// Who speaks on it in a two-party call: `caller` or `agent`.
    pub fn party(self) -> &'static str {
        match self {
            Self::Inbound => "caller",
            Self::Outbound => "agent",
        }
    }
}

/// A key press (bidirectional streams).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Dtmf {
    pub stream_sid: StreamSid,
    pub digit: String,
    pub sequence: u64,
}

/// Twilio echoed one of our marks.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StreamMark {
    pub stream_sid: StreamSid,
    pub name: String,
    pub sequence: u64,
}

/// Why a stream ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StopReason {
    /// Twilio sent `stop`.
    Twilio,
    /// The socket closed without `stop`.
    Disconnected,
    /// We closed it because of bad input (see the `stream_fault` before it).
    Fault,
    /// The call ended (status callback or maximum duration).
    CallEnded,
}

/// The Media Stream ended.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StreamStopped {
    pub stream_sid: Option<StreamSid>,
    pub reason: StopReason,
    /// Frames received over the stream's life.
    pub frames: u64,
}

/// The call's Media Stream closed without Twilio's `stop` while the call went on (calls log).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StreamDropped {
    /// The stream that dropped (`None` if it dropped before its `start`).
    pub stream_sid: Option<StreamSid>,
    /// The call's drops so far, this one included.
    pub attempt: u32,
    /// Whether voxgate asks Twilio to attach a fresh stream (false once the call's re-attach
    /// attempts are spent).
    pub reattach: bool,
}

/// What Twilio's REST API answered when voxgate asked it to re-attach the call's stream with
/// fresh TwiML (calls log).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StreamReattachRequested {
    /// The drop this answers ([`StreamDropped::attempt`]).
    pub attempt: u32,
    /// Twilio's final HTTP status, if it answered.
    pub twilio_status: Option<u16>,
    /// Why the request failed, if it did.
    pub error: Option<String>,
}

/// A new stream started after a drop (media log, just before its `stream_started`): the gap in
/// the call's audio.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StreamResumed {
    /// The stream that dropped.
    pub previous: Option<StreamSid>,
    /// The stream that carries the call on.
    pub stream_sid: StreamSid,
    /// The drop this ends ([`StreamDropped::attempt`]).
    pub attempt: u32,
    /// From the drop to the new stream's `start`, in milliseconds.
    pub gap_ms: u64,
}

/// A status callback's `CallDuration` that voxgate does not believe (calls log, beside the
/// `call_status_changed` it came with): not a whole number of seconds, or longer than the call
/// can have lasted by what voxgate observed itself. The reported value is never billed; usage
/// uses the observed duration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CallDurationImplausible {
    /// `CallDuration` as sent (cut to 32 characters).
    pub reported: String,
    /// From the call's webhook to this callback, in whole seconds (rounded up).
    pub observed_secs: u32,
    /// The longest duration believed: the observed one or the maximum call duration, whichever
    /// is shorter, plus a little for rounding.
    pub bound_secs: u32,
}

/// What was wrong with a stream's input.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FaultKind {
    MalformedJson,
    InvalidMessage,
    BadBase64,
    UnsupportedFormat,
    OversizeFrame,
    UnknownCall,
    OutOfOrder,
    /// Nothing arrived on the stream for `[http] stream_idle_secs`.
    Idle,
}

impl FaultKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::MalformedJson => "malformed_json",
            Self::InvalidMessage => "invalid_message",
            Self::BadBase64 => "bad_base64",
            Self::UnsupportedFormat => "unsupported_format",
            Self::OversizeFrame => "oversize_frame",
            Self::UnknownCall => "unknown_call",
            Self::OutOfOrder => "out_of_order",
            Self::Idle => "idle",
        }
    }
}

/// A stream's input was rejected; the stream is closed and the call marked.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StreamFault {
    pub stream_sid: Option<StreamSid>,
    /// Named `fault` in JSON so it never shadows the event's `kind`.
    #[serde(rename = "fault")]
    pub kind: FaultKind,
    pub detail: String,
}

/// Stale audio was dropped because the call's consumer fell behind real time.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AudioShed {
    pub stream_sid: StreamSid,
    pub frames: u32,
    pub audio_ms: u32,
}

/// voxgate ended the call at its maximum duration.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CallTimedOut {
    pub max_duration_secs: u32,
}

/// A stretch of speech cut by the voice-activity detector: 16 kHz PCM16 little-endian.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SpeechSegment {
    pub stream_sid: StreamSid,
    /// 0, 1, 2 … per stream.
    pub index: u32,
    /// Span in stream time (ms since stream start), speech only (pre-roll included).
    pub start_ms: u64,
    pub end_ms: u64,
    pub sample_rate: u32,
    #[serde(with = "crate::bytes_b64")]
    pub pcm16le: Bytes,
    /// The track it was cut from.
    pub track: Track,
}

/// A stream's track has no more speech (speech log, after its last segment, from the
/// transcoder; and transcripts log, after its last transcript, from the STT stage): consumers
/// know every transcript of it is in.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SpeechEnded {
    pub stream_sid: StreamSid,
    pub track: Track,
    /// Speech segments the track had.
    pub segments: u32,
}

/// Audio of a speech segment that is still open (speech log, from the transcoder), so the STT
/// stage can decode before the segment closes: pieces of a segment follow each other
/// (`[from_ms, end_ms)`, the first from `start_ms`), then the segment itself. A segment that
/// closes at a pause ends exactly where that pause's piece ends, with the same audio.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SpeechProgress {
    pub stream_sid: StreamSid,
    pub track: Track,
    /// The index the segment will have when it closes.
    pub index: u32,
    /// The open segment's first sample (stream time, ms).
    pub start_ms: u64,
    /// This piece's span.
    pub from_ms: u64,
    pub end_ms: u64,
    /// The speaker paused here: if the pause lasts the VAD's hangover, the segment ends at
    /// `end_ms` (the STT stage decodes it now: a speculative final).
    pub paused: bool,
    /// 16 kHz PCM16 little-endian of `[from_ms, end_ms)`.
    #[serde(with = "crate::bytes_b64")]
    pub pcm16le: Bytes,
}

/// The envelope's tenant set the vocabulary hints of its calls' speech (tenants log): words and
/// phrases its callers are likely to say (names, products, jargon), given to Whisper as its
/// initial prompt, as Twilio's `hints`. Empty: none.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SpeechHintsSet {
    pub hints: String,
}

/// The vocabulary hints in force for a stream's speech from here on: the tenant's, then those of
/// the call's real-time transcriptions (`<Transcription hints=…>`, REST `Hints`), joined. On the
/// media log from the call actor (`track` None: every track of the stream), and on the speech log
/// from the transcoder, once per track, in order with the segments, so the STT stage and a replay
/// decode each segment with the same prompt.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SpeechHints {
    pub stream_sid: StreamSid,
    pub track: Option<Track>,
    pub hints: String,
}

/// What the STT stage has heard so far of a segment still open (transcripts log): interim, not
/// final, not billed; the segment's [`Transcript`] replaces it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PartialTranscript {
    pub stream_sid: StreamSid,
    pub track: Track,
    pub segment_index: u32,
    /// The audio heard so far (stream time, ms).
    pub start_ms: u64,
    pub end_ms: u64,
    pub text: String,
    /// The previous partial of this segment is a prefix of this one (the hypothesis only grew).
    pub stable: bool,
    /// 1, 2, … per segment.
    pub sequence: u32,
}

/// What the STT stage heard in one speech segment.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Transcript {
    pub stream_sid: StreamSid,
    /// The speech segment transcribed (its index in the stream, and its event id).
    pub segment_index: u32,
    pub segment_event: EventId,
    /// The segment's span in stream time (ms since stream start).
    pub start_ms: u64,
    pub end_ms: u64,
    /// Empty when the decoder's safeguards rejected the output (see `rejected`).
    pub text: String,
    /// Which model produced it: its directory's name and the SHA-256 of its weights, e.g.
    /// `whisper-tiny.en@sha256:1a5afae06a4db91c` (older logs: `whisper-tiny.en/ct2-f16`).
    pub model: String,
    /// Wall time the model spent on this segment (its share of a batch).
    pub processing_ms: u32,
    pub avg_logprob: f32,
    pub no_speech_prob: f32,
    /// Why the text was discarded: `no_speech` (silence or noise; older logs also
    /// `repetition`, `compression_ratio`, `low_logprob`, now kept with a `doubt`).
    pub rejected: Option<String>,
    /// The track the speech was on (`inbound`: the caller; `outbound`: the agent or the app).
    pub track: Track,
    /// Kept though no decoding attempt passed the checks (after the temperature fallback):
    /// `repetition`, `compression_ratio` or `low_logprob`.
    pub doubt: Option<String>,
}

/// A tenant's lifecycle state, as Twilio names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TenantStatus {
    Active,
    Suspended,
    /// Permanent: a closed tenant never reopens.
    Closed,
}

impl TenantStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Active => "active",
            Self::Suspended => "suspended",
            Self::Closed => "closed",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "active" => Self::Active,
            "suspended" => Self::Suspended,
            "closed" => Self::Closed,
            _ => return None,
        })
    }
}

/// A tenant (Twilio account or subaccount) was created. The envelope's tenant is the new one.
/// The auth token is sealed (authenticated encryption with the node's secrets key); the log never
/// holds it in the clear.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TenantCreated {
    pub friendly_name: String,
    /// The parent account, for a subaccount.
    pub parent: Option<AccountSid>,
    #[serde(with = "crate::bytes_b64")]
    pub sealed_auth_token: Bytes,
    pub status: TenantStatus,
}

/// A tenant's name, status or token changed (only the fields that are `Some`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TenantUpdated {
    pub friendly_name: Option<String>,
    pub status: Option<TenantStatus>,
    #[serde(with = "crate::bytes_b64::option")]
    pub sealed_auth_token: Option<Bytes>,
}

/// The operator set the envelope tenant's status (tenants log). While the operator holds a tenant
/// suspended or closed, its parent cannot reactivate it; only the operator can.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OperatorStatusSet {
    pub status: TenantStatus,
    /// A new name given in the same request.
    pub friendly_name: Option<String>,
}

/// A phone number now belongs to the envelope's tenant.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NumberAssigned {
    pub sid: crate::ids::PhoneNumberSid,
    /// E.164.
    pub number: String,
    pub friendly_name: String,
}

/// An HTTP method Twilio uses for a URL it calls (`VoiceMethod`, `StatusCallbackMethod`, …).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "UPPERCASE")]
pub enum HttpMethod {
    Get,
    #[default]
    Post,
}

impl HttpMethod {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Get => "GET",
            Self::Post => "POST",
        }
    }

    /// `GET` or `POST`, any case (Twilio's API accepts both).
    pub fn parse(s: &str) -> Option<Self> {
        if s.eq_ignore_ascii_case("GET") {
            Some(Self::Get)
        } else if s.eq_ignore_ascii_case("POST") {
            Some(Self::Post)
        } else {
            None
        }
    }
}

/// How a number's calls are answered, in the IncomingPhoneNumbers resource's terms. With a
/// `voice_url` the number is in gateway mode: voxgate forwards Twilio's webhook to the customer's
/// app and forks the call's audio; without one voxgate answers the call itself.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NumberRouting {
    pub voice_url: Option<String>,
    pub voice_method: HttpMethod,
    pub voice_fallback_url: Option<String>,
    pub voice_fallback_method: HttpMethod,
    pub status_callback: Option<String>,
    pub status_callback_method: HttpMethod,
}

/// A number's routing was set (tenants log): the whole routing, replacing what it had.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NumberRouted {
    pub sid: crate::ids::PhoneNumberSid,
    /// E.164.
    pub number: String,
    pub routing: NumberRouting,
}

/// Why voxgate called the customer's app.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AppPurpose {
    /// The voice webhook, forwarded to the number's `VoiceUrl`.
    Voice,
    /// The same, to `VoiceFallbackUrl` after the voice URL failed.
    Fallback,
    /// Twilio's call status callback, forwarded to the number's `StatusCallback`.
    StatusCallback,
    /// A real-time transcription callback voxgate sends in Twilio's place.
    Transcription,
}

impl AppPurpose {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Voice => "voice",
            Self::Fallback => "fallback",
            Self::StatusCallback => "status_callback",
            Self::Transcription => "transcription",
        }
    }
}

/// One request voxgate sent the customer's app and what came back (calls log): the exchange
/// between Twilio, voxgate and the app is on the call's timeline.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AppExchange {
    pub purpose: AppPurpose,
    pub method: HttpMethod,
    pub url: String,
    /// 1 for the first try; retries count up.
    pub attempt: u32,
    /// The app's HTTP status, when it answered.
    pub status: Option<u16>,
    pub latency_ms: u32,
    /// Twilio's code for what went wrong (11200 HTTP error, 11205 timeout, 11215 too many
    /// redirects, 11750 too large, 12100 not XML, 12102 not `<Response>`, …).
    pub error_code: Option<u32>,
    pub error: Option<String>,
    /// TwiML fetches: `hit`, `revalidated` or `miss` in voxgate's TwiML cache.
    pub cache: Option<String>,
    /// The app's answer, cut to 4,000 characters.
    pub answer: Option<String>,
    /// Twilio's signature on the request voxgate received was valid (always, for a request that
    /// gets this far), and voxgate signed this one for the app with the tenant's token.
    pub twilio_signature_valid: bool,
    pub signed_for_app: bool,
    /// What the request delivered, for callbacks: `GT…#SequenceId` for a transcription callback,
    /// `CallStatus#SequenceNumber` for a status callback.
    pub reference: Option<String>,
}

/// The request voxgate is about to send the customer's app (calls log), before its
/// `app_exchange` attempts: the parameters as sent (Twilio's names), so the console's inspector
/// can show the exchange whole and send it again. Recorded for the voice webhook, its fallback
/// and status callbacks; the signature is not stored (it is computed again when re-sent).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AppRequest {
    pub purpose: AppPurpose,
    pub method: HttpMethod,
    pub url: String,
    pub params: Vec<(String, String)>,
    /// As the exchanges' `reference` (status callbacks: `CallStatus#SequenceNumber`'s token).
    pub reference: Option<String>,
}

/// What voxgate answered Twilio in gateway mode (calls log).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GatewayAnswered {
    /// The tracks voxgate forked (`both_tracks`, `inbound_track`), or none (no room, or the app
    /// failed and Twilio hears an error message).
    pub fork: Option<String>,
    /// Tracks the app streams itself.
    pub app_tracks: u32,
    /// Real-time transcriptions voxgate runs in Twilio's place (their `GT…` sids).
    pub transcriptions: Vec<String>,
    /// Relative URLs made absolute.
    pub absolutized: u32,
    /// What Twilio would warn about: (code, what).
    pub warnings: Vec<(u32, String)>,
    /// voxgate's time on top of the app's until the answer is ready, µs (the passthrough's
    /// cost, without the durable append of these events).
    pub added_us: u32,
    /// The TwiML Twilio got, cut to 4,000 characters.
    pub twiml: String,
}

/// A real-time transcription voxgate runs in Twilio's place started (calls log): from an app's
/// `<Start><Transcription>` or the REST `Calls/{CA}/Transcriptions.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TranscriptionStarted {
    /// `GT` and 32 hex digits.
    pub sid: String,
    pub name: Option<String>,
    pub status_callback_url: Option<String>,
    pub status_callback_method: HttpMethod,
    /// `inbound_track`, `outbound_track` or `both_tracks`.
    pub track: String,
    pub partial_results: bool,
    pub language_code: String,
    pub inbound_track_label: Option<String>,
    pub outbound_track_label: Option<String>,
    /// `twiml` or `rest`.
    pub source: String,
}

/// A real-time transcription ended (calls log): stopped by TwiML or REST, or the call ended.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TranscriptionStopped {
    pub sid: String,
    /// `twiml`, `rest` or `call_ended`.
    pub reason: String,
}

/// The envelope's tenant gave up a phone number.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NumberReleased {
    pub sid: crate::ids::PhoneNumberSid,
    pub number: String,
}

/// The envelope's tenant's call quotas were set.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct QuotaSet {
    pub max_concurrent_calls: u32,
    pub calls_per_second: u32,
}

/// Calls from this number to the envelope's tenant are refused (until `until`, if set).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CallerBlocked {
    pub number: String,
    pub reason: String,
    pub until: Option<Timestamp>,
}

/// The block on this number was lifted.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CallerUnblocked {
    pub number: String,
}

/// A tenant's concurrent calls reached the warning share of its quota (53121-style).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct QuotaWarning {
    pub active: u32,
    pub limit: u32,
    /// The Twilio-style code: 53121.
    pub code: u32,
}

/// How serious a fraud verdict is; each level includes the actions of the ones below it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Severity {
    /// Recorded in the fraud log only.
    Record,
    /// Also an `alert_raised` event on the alerts log and a metric.
    Alert,
    /// Also the remote number blocked for the tenant for a period.
    Block,
    /// Also the active call ended (a `hangup_requested` event).
    EndCall,
}

impl Severity {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Record => "record",
            Self::Alert => "alert",
            Self::Block => "block",
            Self::EndCall => "end_call",
        }
    }
}

/// One fraud rule that fired, with the evidence that made it fire.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RuleHit {
    /// The rule's name, e.g. `premium_destination`, `velocity_from`.
    pub rule: String,
    pub severity: Severity,
    /// Human-readable evidence, e.g. `12 calls from +1555… in 60 s (limit 10)`.
    pub evidence: String,
}

/// The fraud stage's verdict on a call event: the rules that fired and what follows.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FraudVerdict {
    /// The highest severity of the hits.
    pub severity: Severity,
    pub hits: Vec<RuleHit>,
    /// The remote party's number, blocked for the tenant until `blocked_until` (severity ≥ block).
    pub blocked_number: Option<String>,
    pub blocked_until: Option<Timestamp>,
    /// The event the verdict was made on.
    pub cause: EventId,
}

/// voxgate asks for the call to be ended (the call actor closes its stream; the Twilio REST
/// adapter updates the call to `completed`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HangupRequested {
    /// Which stage asked: `fraud`, `billing`.
    pub source: String,
    pub reason: String,
}

/// Something an operator should look at (alerts log).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AlertRaised {
    pub source: String,
    /// A stable name, e.g. `fraud.velocity_from`, `usage_trigger`.
    pub name: String,
    pub severity: Severity,
    pub message: String,
}

/// A usage trigger was created (billing log): its whole definition, the threshold resolved to
/// micro-units (a relative `+N` already added to the value at creation). Strings are Twilio's
/// (`usage_category` `calls`, `trigger_by` `usage`, `recurring` `monthly` or `""`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UsageTriggerCreated {
    /// `UT…`
    pub sid: String,
    pub usage_category: String,
    pub trigger_by: String,
    pub trigger_value_micros: u64,
    pub recurring: String,
    pub callback_url: String,
    pub callback_method: String,
    pub friendly_name: String,
}

/// A usage trigger's callback or name changed (billing log); absent fields are unchanged.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UsageTriggerUpdated {
    pub sid: String,
    pub callback_url: Option<String>,
    pub callback_method: Option<String>,
    pub friendly_name: Option<String>,
}

/// A usage trigger was deleted (billing log).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UsageTriggerDeleted {
    pub sid: String,
}

/// A usage trigger fired for one period (billing log). Its event id is derived from the trigger
/// and the period, so it is recorded once per period however often the stage restarts.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UsageTriggerFired {
    pub sid: String,
    /// The start of the period it fired for (`i64::MIN` µs for all time).
    pub period_start: Timestamp,
    pub trigger_value_micros: u64,
    pub current_value_micros: u64,
    /// `UT…-YYYY-MM-DD` or `UT…-alltime`, sent as the callback's `IdempotencyToken`.
    pub idempotency_token: String,
    /// The callback's whole form, in Twilio's names and order.
    pub params: Vec<(String, String)>,
    pub callback_url: String,
    pub callback_method: String,
}

/// What became of one callback attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CallbackOutcome {
    /// The receiver answered 2xx: done.
    Delivered,
    /// Failed; another attempt follows.
    Retrying,
    /// Failed for the last time (attempts spent, or a 4xx other than 408/429).
    GaveUp,
}

/// One delivery attempt of a trigger's callback (billing log).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TriggerCallbackAttempted {
    pub sid: String,
    pub idempotency_token: String,
    /// 1-based.
    pub attempt: u32,
    /// The receiver's HTTP status, when it answered.
    pub status: Option<u16>,
    /// Why it failed, when it did.
    pub error: Option<String>,
    pub outcome: CallbackOutcome,
}

/// An account's monthly budget is spent (billing log): from now until the month ends its calls,
/// and its subaccounts', are refused and the active ones ended.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BudgetExceeded {
    /// `YYYY-MM`.
    pub month: String,
    /// The first instant of the next month: the stop lasts until then.
    pub until: Timestamp,
    pub budget_micros: u64,
    pub spent_micros: u64,
}
