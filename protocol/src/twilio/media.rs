//! Media Streams WebSocket messages (wire doc §4): parsing what Twilio sends, building what we
//! send back, and building Twilio's side for the test simulator.
//!
//! The hot path is `media`: [`parse_inbound`] borrows the track and base64 payload from the
//! frame's text, and [`decode_payload_into`] decodes into a reused buffer, so a frame costs no
//! allocation.

use std::borrow::Cow;
use std::fmt::{self, Write as _};

use base64::engine::general_purpose::STANDARD;
use base64::Engine as _;
use serde::de::{self, Deserializer, MapAccess, Visitor};
use serde::Deserialize;

use crate::event::FaultKind;
use crate::ids::{AccountSid, CallSid, StreamSid};

/// Largest decoded `media` payload accepted: 100 ms of 8 kHz µ-law (Twilio sends 160 bytes).
pub const MAX_FRAME_BYTES: usize = 1600;

/// Longest error detail kept, in characters (details can quote input).
const MAX_DETAIL_CHARS: usize = 160;

/// Why a Media Streams message was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MediaError {
    /// The text is not JSON (Twilio's 31950).
    #[error("malformed json: {0}")]
    MalformedJson(String),
    /// JSON, but not a message we understand: unknown event, missing or mistyped field (31951).
    #[error("invalid message: {0}")]
    InvalidMessage(String),
    /// The media payload is not padded standard base64.
    #[error("bad base64 in media payload")]
    BadBase64,
    /// The media payload would decode to more than `max` bytes.
    #[error("media frame of {len} bytes exceeds the {max}-byte limit")]
    OversizeFrame {
        /// Decoded length (an estimate when the base64 is also malformed).
        len: usize,
        /// [`MAX_FRAME_BYTES`].
        max: usize,
    },
    /// The stream's audio is not 8 kHz mono µ-law.
    #[error("unsupported media format: {0}")]
    UnsupportedFormat(String),
}

impl MediaError {
    /// The snake_case kind: `malformed_json`, `invalid_message`, `bad_base64`, `oversize_frame`
    /// or `unsupported_format`.
    pub fn kind_str(&self) -> &'static str {
        self.fault_kind().as_str()
    }

    /// The matching stream-fault kind for the event log.
    pub fn fault_kind(&self) -> FaultKind {
        match self {
            Self::MalformedJson(_) => FaultKind::MalformedJson,
            Self::InvalidMessage(_) => FaultKind::InvalidMessage,
            Self::BadBase64 => FaultKind::BadBase64,
            Self::OversizeFrame { .. } => FaultKind::OversizeFrame,
            Self::UnsupportedFormat(_) => FaultKind::UnsupportedFormat,
        }
    }
}

/// A message Twilio sent over the Media Streams WebSocket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Inbound<'a> {
    /// First message: `protocol` (`Call`) and `version` (`1.0.0`).
    Connected {
        /// `protocol`.
        protocol: Cow<'a, str>,
        /// `version`.
        version: Cow<'a, str>,
    },
    /// The stream's metadata, once, after `connected`.
    Start(Start),
    /// One frame of audio.
    Media(Media<'a>),
    /// A key press (bidirectional streams).
    Dtmf {
        /// `sequenceNumber`.
        sequence: u64,
        /// `streamSid`.
        stream_sid: StreamSid,
        /// `dtmf.digit`.
        digit: String,
    },
    /// Playback reached (or `clear` dropped) one of our marks.
    Mark {
        /// `sequenceNumber`.
        sequence: u64,
        /// `streamSid`.
        stream_sid: StreamSid,
        /// `mark.name`.
        name: String,
    },
    /// Last message: the stream stopped.
    Stop {
        /// `sequenceNumber`.
        sequence: u64,
        /// `streamSid`.
        stream_sid: StreamSid,
        /// `stop.accountSid`, if sent.
        account_sid: Option<AccountSid>,
        /// `stop.callSid`, if sent.
        call_sid: Option<CallSid>,
    },
}

impl Inbound<'_> {
    /// The event name, as on the wire (`connected`, `start`, `media`, `dtmf`, `mark`, `stop`).
    pub fn event(&self) -> &'static str {
        match self {
            Self::Connected { .. } => "connected",
            Self::Start(_) => "start",
            Self::Media(_) => "media",
            Self::Dtmf { .. } => "dtmf",
            Self::Mark { .. } => "mark",
            Self::Stop { .. } => "stop",
        }
    }

    /// `sequenceNumber` (every message but `connected`).
    pub fn sequence(&self) -> Option<u64> {
        match self {
            Self::Connected { .. } => None,
            Self::Start(s) => Some(s.sequence),
            Self::Media(m) => Some(m.sequence),
            Self::Dtmf { sequence, .. } | Self::Mark { sequence, .. } | Self::Stop { sequence, .. } => Some(*sequence),
        }
    }

    /// `streamSid` (every message but `connected`).
    pub fn stream_sid(&self) -> Option<StreamSid> {
        match self {
            Self::Connected { .. } => None,
            Self::Start(s) => Some(s.stream_sid),
            Self::Media(m) => Some(m.stream_sid),
            Self::Dtmf { stream_sid, .. } | Self::Mark { stream_sid, .. } | Self::Stop { stream_sid, .. } => {
                Some(*stream_sid)
            }
        }
    }
}

/// The `start` message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Start {
    /// `sequenceNumber` (`1`).
    pub sequence: u64,
    /// `streamSid`.
    pub stream_sid: StreamSid,
    /// `start.accountSid`.
    pub account_sid: AccountSid,
    /// `start.callSid`.
    pub call_sid: CallSid,
    /// `start.tracks` (`inbound`, `outbound`).
    pub tracks: Vec<String>,
    /// `start.customParameters`, in the order sent (our `<Parameter>`s).
    pub custom_parameters: Vec<(String, String)>,
    /// `start.mediaFormat.encoding`.
    pub encoding: String,
    /// `start.mediaFormat.sampleRate`.
    pub sample_rate: u32,
    /// `start.mediaFormat.channels`.
    pub channels: u32,
}

impl Start {
    /// Accepts only `audio/x-mulaw`, 8000 Hz, 1 channel.
    pub fn check_format(&self) -> Result<(), MediaError> {
        if self.encoding == "audio/x-mulaw" && self.sample_rate == 8000 && self.channels == 1 {
            Ok(())
        } else {
            Err(MediaError::UnsupportedFormat(clip(format!(
                "{:?} at {} hz with {} channel(s); only audio/x-mulaw at 8000 hz mono is supported",
                self.encoding, self.sample_rate, self.channels
            ))))
        }
    }
}

/// A `media` message. `track` and `payload_b64` borrow from the message text unless it used JSON
/// escapes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Media<'a> {
    /// `sequenceNumber`.
    pub sequence: u64,
    /// `streamSid`.
    pub stream_sid: StreamSid,
    /// `media.track` (`inbound` when absent).
    pub track: Cow<'a, str>,
    /// `media.chunk` (starts at 1).
    pub chunk: u64,
    /// `media.timestamp`: milliseconds since the stream started.
    pub timestamp_ms: u64,
    /// `media.payload`: base64 of raw µ-law; decode with [`decode_payload_into`].
    pub payload_b64: Cow<'a, str>,
}

// ---- parsing -------------------------------------------------------------------------------

/// A string that borrows from the input when it has no escapes.
struct BStr<'a>(Cow<'a, str>);

impl<'de: 'a, 'a> Deserialize<'de> for BStr<'a> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = BStr<'de>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a string")
            }
            fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Self::Value, E> {
                Ok(BStr(Cow::Borrowed(v)))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
                Ok(BStr(Cow::Owned(v.to_owned())))
            }
            fn visit_string<E: de::Error>(self, v: String) -> Result<Self::Value, E> {
                Ok(BStr(Cow::Owned(v)))
            }
        }
        d.deserialize_str(V)
    }
}

/// A non-negative integer sent as a decimal string (Twilio's way) or as a JSON number.
struct Num(u64);

impl<'de> Deserialize<'de> for Num {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = Num;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a non-negative integer or a string of decimal digits")
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<Num, E> {
                Ok(Num(v))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<Num, E> {
                u64::try_from(v).map(Num).map_err(|_| E::custom("negative number"))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<Num, E> {
                if v.is_empty() || !v.bytes().all(|b| b.is_ascii_digit()) {
                    return Err(E::custom("expected a string of decimal digits"));
                }
                v.parse().map(Num).map_err(|_| E::custom("number out of range"))
            }
        }
        d.deserialize_any(V)
    }
}

/// `customParameters`: a string→string object, order kept.
struct Params(Vec<(String, String)>);

impl<'de> Deserialize<'de> for Params {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Params;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an object of strings")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Params, A::Error> {
                let mut v = Vec::new();
                while let Some(entry) = map.next_entry::<String, String>()? {
                    v.push(entry);
                }
                Ok(Params(v))
            }
        }
        d.deserialize_map(V)
    }
}

#[derive(Deserialize)]
struct RawMessage<'a> {
    #[serde(borrow)]
    event: BStr<'a>,
    #[serde(rename = "sequenceNumber")]
    sequence_number: Option<Num>,
    #[serde(rename = "streamSid", borrow)]
    stream_sid: Option<BStr<'a>>,
    #[serde(borrow)]
    protocol: Option<BStr<'a>>,
    #[serde(borrow)]
    version: Option<BStr<'a>>,
    start: Option<RawStart>,
    #[serde(borrow)]
    media: Option<RawMedia<'a>>,
    dtmf: Option<RawDtmf>,
    mark: Option<RawMark>,
    stop: Option<RawStop>,
}

#[derive(Deserialize)]
struct RawStart {
    #[serde(rename = "streamSid")]
    stream_sid: Option<String>,
    #[serde(rename = "accountSid")]
    account_sid: String,
    #[serde(rename = "callSid")]
    call_sid: String,
    #[serde(default)]
    tracks: Vec<String>,
    #[serde(rename = "customParameters")]
    custom_parameters: Option<Params>,
    #[serde(rename = "mediaFormat")]
    media_format: RawFormat,
}

#[derive(Deserialize)]
struct RawFormat {
    encoding: String,
    #[serde(rename = "sampleRate")]
    sample_rate: Num,
    channels: Num,
}

#[derive(Deserialize)]
struct RawMedia<'a> {
    #[serde(borrow)]
    track: Option<BStr<'a>>,
    chunk: Num,
    timestamp: Num,
    #[serde(borrow)]
    payload: BStr<'a>,
}

#[derive(Deserialize)]
struct RawDtmf {
    digit: String,
}

#[derive(Deserialize)]
struct RawMark {
    name: String,
}

#[derive(Deserialize)]
struct RawStop {
    #[serde(rename = "accountSid")]
    account_sid: Option<String>,
    #[serde(rename = "callSid")]
    call_sid: Option<String>,
}

fn clip(mut s: String) -> String {
    if let Some((i, _)) = s.char_indices().nth(MAX_DETAIL_CHARS) {
        s.truncate(i);
        s.push('…');
    }
    s
}

fn invalid(detail: impl Into<String>) -> MediaError {
    MediaError::InvalidMessage(clip(detail.into()))
}

fn json_error(text: &str, e: &serde_json::Error) -> MediaError {
    use serde_json::error::Category;
    match e.classify() {
        Category::Data => {
            // A type error can be hit before a later syntax error; only call it an invalid
            // message if the whole text is JSON.
            if serde_json::from_str::<de::IgnoredAny>(text).is_ok() {
                invalid(e.to_string())
            } else {
                MediaError::MalformedJson(clip(e.to_string()))
            }
        }
        Category::Syntax | Category::Eof | Category::Io => MediaError::MalformedJson(clip(e.to_string())),
    }
}

fn need<T>(v: Option<T>, what: &str) -> Result<T, MediaError> {
    v.ok_or_else(|| invalid(format!("missing {what}")))
}

fn stream_sid(v: Option<&BStr<'_>>) -> Result<StreamSid, MediaError> {
    let s = need(v, "streamSid")?;
    StreamSid::parse(&s.0).map_err(|e| invalid(format!("streamSid: {e}")))
}

fn u32_field(n: Num, what: &str) -> Result<u32, MediaError> {
    u32::try_from(n.0).map_err(|_| invalid(format!("{what} out of range")))
}

/// Parses one text frame from Twilio. Key order does not matter and unknown fields are ignored.
pub fn parse_inbound(text: &str) -> Result<Inbound<'_>, MediaError> {
    let raw: RawMessage<'_> = serde_json::from_str(text).map_err(|e| json_error(text, &e))?;
    let seq = |n: Option<Num>| need(n, "sequenceNumber").map(|n| n.0);
    match raw.event.0.as_ref() {
        "media" => {
            let m = need(raw.media, "media")?;
            Ok(Inbound::Media(Media {
                sequence: seq(raw.sequence_number)?,
                stream_sid: stream_sid(raw.stream_sid.as_ref())?,
                track: m.track.map_or(Cow::Borrowed("inbound"), |t| t.0),
                chunk: m.chunk.0,
                timestamp_ms: m.timestamp.0,
                payload_b64: m.payload.0,
            }))
        }
        "connected" => Ok(Inbound::Connected {
            protocol: need(raw.protocol, "protocol")?.0,
            version: need(raw.version, "version")?.0,
        }),
        "start" => {
            let s = need(raw.start, "start")?;
            let sid = match (raw.stream_sid.as_ref(), s.stream_sid.as_deref()) {
                (Some(top), Some(inner)) => {
                    let sid = stream_sid(Some(top))?;
                    if StreamSid::parse(inner).ok() != Some(sid) {
                        return Err(invalid("start.streamSid differs from streamSid"));
                    }
                    sid
                }
                (Some(top), None) => stream_sid(Some(top))?,
                (None, Some(inner)) => StreamSid::parse(inner).map_err(|e| invalid(format!("start.streamSid: {e}")))?,
                (None, None) => return Err(invalid("missing streamSid")),
            };
            let start = Start {
                sequence: seq(raw.sequence_number)?,
                stream_sid: sid,
                account_sid: AccountSid::parse(&s.account_sid)
                    .map_err(|e| invalid(format!("start.accountSid: {e}")))?,
                call_sid: CallSid::parse(&s.call_sid).map_err(|e| invalid(format!("start.callSid: {e}")))?,
                tracks: s.tracks,
                custom_parameters: s.custom_parameters.map_or_else(Vec::new, |p| p.0),
                encoding: s.media_format.encoding,
                sample_rate: u32_field(s.media_format.sample_rate, "start.mediaFormat.sampleRate")?,
                channels: u32_field(s.media_format.channels, "start.mediaFormat.channels")?,
            };
            Ok(Inbound::Start(start))
        }
        "dtmf" => Ok(Inbound::Dtmf {
            sequence: seq(raw.sequence_number)?,
            stream_sid: stream_sid(raw.stream_sid.as_ref())?,
            digit: need(raw.dtmf, "dtmf")?.digit,
        }),
        "mark" => Ok(Inbound::Mark {
            sequence: seq(raw.sequence_number)?,
            stream_sid: stream_sid(raw.stream_sid.as_ref())?,
            name: need(raw.mark, "mark")?.name,
        }),
        "stop" => {
            let (account, call) = raw.stop.map_or((None, None), |s| (s.account_sid, s.call_sid));
            Ok(Inbound::Stop {
                sequence: seq(raw.sequence_number)?,
                stream_sid: stream_sid(raw.stream_sid.as_ref())?,
                account_sid: account
                    .map(|a| AccountSid::parse(&a))
                    .transpose()
                    .map_err(|e| invalid(format!("stop.accountSid: {e}")))?,
                call_sid: call
                    .map(|c| CallSid::parse(&c))
                    .transpose()
                    .map_err(|e| invalid(format!("stop.callSid: {e}")))?,
            })
        }
        other => {
            let mut shown = String::new();
            let _ = write!(shown, "unknown event {other:?}");
            Err(invalid(shown))
        }
    }
}

/// Decodes a `media.payload` into `out` (cleared first; its allocation is reused, so with
/// capacity of at least the decoded length nothing is allocated). Payloads that would decode to
/// more than [`MAX_FRAME_BYTES`] are refused from their length, before decoding.
pub fn decode_payload_into(b64: &str, out: &mut Vec<u8>) -> Result<(), MediaError> {
    out.clear();
    let bytes = b64.as_bytes();
    let groups = bytes.len() / 4;
    if !bytes.len().is_multiple_of(4) {
        let estimate = bytes.len().saturating_mul(3) / 4;
        if estimate > MAX_FRAME_BYTES {
            return Err(MediaError::OversizeFrame { len: estimate, max: MAX_FRAME_BYTES });
        }
        return Err(MediaError::BadBase64);
    }
    let padding = bytes.iter().rev().take(2).take_while(|&&b| b == b'=').count();
    let len = groups.saturating_mul(3).saturating_sub(padding);
    if len > MAX_FRAME_BYTES {
        return Err(MediaError::OversizeFrame { len, max: MAX_FRAME_BYTES });
    }
    out.resize(len, 0);
    match STANDARD.decode_slice(bytes, out.as_mut_slice()) {
        Ok(n) if n == len => Ok(()),
        _ => {
            out.clear();
            Err(MediaError::BadBase64)
        }
    }
}

// ---- building ------------------------------------------------------------------------------

/// Appends `s` as a JSON string literal (quotes included), escaping as serde_json does.
fn push_json_str(out: &mut String, s: &str) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{8}' => out.push_str("\\b"),
            '\u{c}' => out.push_str("\\f"),
            c if u32::from(c) < 0x20 => {
                let _ = write!(out, "\\u{:04x}", u32::from(c));
            }
            c => out.push(c),
        }
    }
    out.push('"');
}

fn head(out: &mut String, event: &str, stream_sid: StreamSid) {
    out.push_str("{\"event\":\"");
    out.push_str(event);
    out.push_str("\",\"streamSid\":\"");
    let _ = write!(out, "{stream_sid}");
    out.push('"');
}

fn head_seq(out: &mut String, event: &str, stream_sid: StreamSid, sequence: u64) {
    head(out, event, stream_sid);
    let _ = write!(out, ",\"sequenceNumber\":\"{sequence}\"");
}

/// Outbound audio: `{"event":"media","streamSid":"MZ…","media":{"payload":"<base64 µ-law>"}}`.
pub fn media_json(stream_sid: StreamSid, payload: &[u8]) -> String {
    let mut out = String::with_capacity(96 + payload.len().div_ceil(3) * 4);
    head(&mut out, "media", stream_sid);
    out.push_str(",\"media\":{\"payload\":\"");
    STANDARD.encode_string(payload, &mut out);
    out.push_str("\"}}");
    out
}

/// `{"event":"mark","streamSid":"MZ…","mark":{"name":"…"}}`.
pub fn mark_json(stream_sid: StreamSid, name: &str) -> String {
    let mut out = String::with_capacity(96 + name.len());
    head(&mut out, "mark", stream_sid);
    out.push_str(",\"mark\":{\"name\":");
    push_json_str(&mut out, name);
    out.push_str("}}");
    out
}

/// `{"event":"clear","streamSid":"MZ…"}`: flush Twilio's playback buffer.
pub fn clear_json(stream_sid: StreamSid) -> String {
    let mut out = String::with_capacity(72);
    head(&mut out, "clear", stream_sid);
    out.push('}');
    out
}

/// Simulator: Twilio's first message, `{"event":"connected","protocol":"Call","version":"1.0.0"}`.
pub fn connected_json() -> String {
    r#"{"event":"connected","protocol":"Call","version":"1.0.0"}"#.to_owned()
}

/// Simulator: Twilio's `start` (sequence 1, track `inbound`, 8 kHz mono µ-law).
pub fn start_json(
    stream_sid: StreamSid,
    account_sid: AccountSid,
    call_sid: CallSid,
    custom_parameters: &[(&str, &str)],
) -> String {
    start_json_tracks(stream_sid, account_sid, call_sid, &["inbound"], custom_parameters)
}

/// Simulator: a `start` announcing `tracks` (`["inbound", "outbound"]` for a `both_tracks` fork).
pub fn start_json_tracks(
    stream_sid: StreamSid,
    account_sid: AccountSid,
    call_sid: CallSid,
    tracks: &[&str],
    custom_parameters: &[(&str, &str)],
) -> String {
    let mut out = String::with_capacity(400);
    head_seq(&mut out, "start", stream_sid, 1);
    let _ = write!(
        out,
        ",\"start\":{{\"streamSid\":\"{stream_sid}\",\"accountSid\":\"{account_sid}\",\"callSid\":\"{call_sid}\",\"tracks\":["
    );
    for (i, t) in tracks.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        push_json_str(&mut out, t);
    }
    out.push_str("],\"customParameters\":{");
    for (i, (k, v)) in custom_parameters.iter().enumerate() {
        if i > 0 {
            out.push(',');
        }
        push_json_str(&mut out, k);
        out.push(':');
        push_json_str(&mut out, v);
    }
    out.push_str("},\"mediaFormat\":{\"encoding\":\"audio/x-mulaw\",\"sampleRate\":8000,\"channels\":1}}}");
    out
}

/// Simulator: an inbound-track `media` frame.
pub fn inbound_media_json(
    stream_sid: StreamSid,
    sequence: u64,
    chunk: u64,
    timestamp_ms: u64,
    payload: &[u8],
) -> String {
    track_media_json(stream_sid, "inbound", sequence, chunk, timestamp_ms, payload)
}

/// Simulator: a `media` frame of `track` (`inbound` or `outbound`).
pub fn track_media_json(
    stream_sid: StreamSid,
    track: &str,
    sequence: u64,
    chunk: u64,
    timestamp_ms: u64,
    payload: &[u8],
) -> String {
    let mut out = String::with_capacity(160 + payload.len().div_ceil(3) * 4);
    head_seq(&mut out, "media", stream_sid, sequence);
    let _ = write!(
        out,
        ",\"media\":{{\"track\":\"{track}\",\"chunk\":\"{chunk}\",\"timestamp\":\"{timestamp_ms}\",\"payload\":\""
    );
    STANDARD.encode_string(payload, &mut out);
    out.push_str("\"}}");
    out
}

/// Simulator: a `dtmf` key press on the inbound track.
pub fn dtmf_json(stream_sid: StreamSid, sequence: u64, digit: &str) -> String {
    let mut out = String::with_capacity(128);
    head_seq(&mut out, "dtmf", stream_sid, sequence);
    out.push_str(",\"dtmf\":{\"track\":\"inbound_track\",\"digit\":");
    push_json_str(&mut out, digit);
    out.push_str("}}");
    out
}

/// Simulator: Twilio echoing one of our marks.
pub fn inbound_mark_json(stream_sid: StreamSid, sequence: u64, name: &str) -> String {
    let mut out = String::with_capacity(128 + name.len());
    head_seq(&mut out, "mark", stream_sid, sequence);
    out.push_str(",\"mark\":{\"name\":");
    push_json_str(&mut out, name);
    out.push_str("}}");
    out
}

/// Simulator: Twilio's last message, `stop`.
pub fn stop_json(stream_sid: StreamSid, sequence: u64, account_sid: AccountSid, call_sid: CallSid) -> String {
    let mut out = String::with_capacity(192);
    head_seq(&mut out, "stop", stream_sid, sequence);
    let _ = write!(out, ",\"stop\":{{\"accountSid\":\"{account_sid}\",\"callSid\":\"{call_sid}\"}}}}");
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const MZ: &str = "MZ0f1e2d3c0f1e2d3c0f1e2d3c0f1e2d3c";
    const AC: &str = "AC3f1c2b4a3f1c2b4a3f1c2b4a3f1c2b4a";
    const CA: &str = "CA7e6d5c4b7e6d5c4b7e6d5c4b7e6d5c4b";

    fn sids() -> (StreamSid, AccountSid, CallSid) {
        (StreamSid::parse(MZ).unwrap(), AccountSid::parse(AC).unwrap(), CallSid::parse(CA).unwrap())
    }

    const DOC_START: &str = r#"{"event":"start","sequenceNumber":"1","streamSid":"MZ0f1e2d3c0f1e2d3c0f1e2d3c0f1e2d3c",
 "start":{"streamSid":"MZ0f1e2d3c0f1e2d3c0f1e2d3c0f1e2d3c","accountSid":"AC3f1c2b4a3f1c2b4a3f1c2b4a3f1c2b4a",
  "callSid":"CA7e6d5c4b7e6d5c4b7e6d5c4b7e6d5c4b","tracks":["inbound"],
  "customParameters":{"tenant":"acme"},
  "mediaFormat":{"encoding":"audio/x-mulaw","sampleRate":8000,"channels":1}}}"#;

    #[test]
    fn doc_start_parses() {
        let Inbound::Start(s) = parse_inbound(DOC_START).unwrap() else { panic!() };
        let (mz, ac, ca) = sids();
        assert_eq!((s.sequence, s.stream_sid, s.account_sid, s.call_sid), (1, mz, ac, ca));
        assert_eq!(s.tracks, vec!["inbound".to_owned()]);
        assert_eq!(s.custom_parameters, vec![("tenant".to_owned(), "acme".to_owned())]);
        assert_eq!((s.encoding.as_str(), s.sample_rate, s.channels), ("audio/x-mulaw", 8000, 1));
        assert!(s.check_format().is_ok());
    }

    #[test]
    fn doc_media_parses_borrowed() {
        let payload = "/".repeat(216);
        let text = format!(
            r#"{{"event":"media","sequenceNumber":"2","streamSid":"{MZ}","media":{{"track":"inbound","chunk":"1","timestamp":"20","payload":"{payload}"}}}}"#
        );
        let Inbound::Media(m) = parse_inbound(&text).unwrap() else { panic!() };
        assert_eq!((m.sequence, m.chunk, m.timestamp_ms), (2, 1, 20));
        assert_eq!(m.stream_sid, sids().0);
        assert!(matches!(m.track, Cow::Borrowed("inbound")));
        assert!(matches!(m.payload_b64, Cow::Borrowed(_)));
        let mut buf = Vec::with_capacity(MAX_FRAME_BYTES);
        decode_payload_into(&m.payload_b64, &mut buf).unwrap();
        assert_eq!(buf, vec![0xFF; 162]);
    }

    #[test]
    fn numbers_keys_and_extras_tolerated() {
        let text = format!(
            r#"{{"media":{{"payload":"AAEC","timestamp":40,"extra":{{"x":[1,2]}},"chunk":2}},"streamSid":"{MZ}","sequenceNumber":3,"new":null,"event":"media"}}"#
        );
        let Inbound::Media(m) = parse_inbound(&text).unwrap() else { panic!() };
        assert_eq!((m.sequence, m.chunk, m.timestamp_ms, m.track.as_ref()), (3, 2, 40, "inbound"));
        // an escaped payload still parses (owned)
        let text = format!(
            r#"{{"event":"media","sequenceNumber":"3","streamSid":"{MZ}","media":{{"track":"inbound","chunk":"1","timestamp":"0","payload":"AA\/C"}}}}"#
        );
        let Inbound::Media(m) = parse_inbound(&text).unwrap() else { panic!() };
        assert_eq!(m.payload_b64, "AA/C");
        assert!(matches!(m.payload_b64, Cow::Owned(_)));
    }

    #[test]
    fn builders_round_trip() {
        let (mz, ac, ca) = sids();
        match parse_inbound(&connected_json()).unwrap() {
            Inbound::Connected { protocol, version } => {
                assert_eq!((&*protocol, &*version), ("Call", "1.0.0"))
            }
            other => panic!("{other:?}"),
        }
        let params = [("tenant", "acme"), ("token", "a\"b\\c\nd")];
        let Inbound::Start(s) = parse_inbound(&start_json(mz, ac, ca, &params)).unwrap() else { panic!() };
        assert_eq!((s.sequence, s.stream_sid, s.account_sid, s.call_sid), (1, mz, ac, ca));
        assert_eq!(
            s.custom_parameters,
            params.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect::<Vec<_>>()
        );
        assert!(s.check_format().is_ok());
        let Inbound::Start(s) = parse_inbound(&start_json(mz, ac, ca, &[])).unwrap() else { panic!() };
        assert!(s.custom_parameters.is_empty());

        let audio: Vec<u8> = (0..=255).cycle().take(160).collect();
        let text = inbound_media_json(mz, 7, 6, 100, &audio);
        let Inbound::Media(m) = parse_inbound(&text).unwrap() else { panic!() };
        assert_eq!((m.sequence, m.stream_sid, m.chunk, m.timestamp_ms, m.track.as_ref()), (7, mz, 6, 100, "inbound"));
        let mut buf = Vec::new();
        decode_payload_into(&m.payload_b64, &mut buf).unwrap();
        assert_eq!(buf, audio);

        assert_eq!(
            parse_inbound(&dtmf_json(mz, 8, "#")).unwrap(),
            Inbound::Dtmf { sequence: 8, stream_sid: mz, digit: "#".to_owned() }
        );
        assert_eq!(
            parse_inbound(&inbound_mark_json(mz, 9, "seg-1 \"x\"")).unwrap(),
            Inbound::Mark { sequence: 9, stream_sid: mz, name: "seg-1 \"x\"".to_owned() }
        );
        let stop_text = stop_json(mz, 10, ac, ca);
        let stop = parse_inbound(&stop_text).unwrap();
        assert_eq!(stop, Inbound::Stop { sequence: 10, stream_sid: mz, account_sid: Some(ac), call_sid: Some(ca) });
        assert_eq!((stop.event(), stop.sequence(), stop.stream_sid()), ("stop", Some(10), Some(mz)));
        let bare = format!(r#"{{"event":"stop","sequenceNumber":"4","streamSid":"{MZ}"}}"#);
        assert_eq!(
            parse_inbound(&bare).unwrap(),
            Inbound::Stop { sequence: 4, stream_sid: mz, account_sid: None, call_sid: None }
        );
    }

    #[test]
    fn outbound_shapes() {
        let mz = sids().0;
        assert_eq!(
            media_json(mz, &[0xFF, 0xFF, 0xFF]),
            format!(r#"{{"event":"media","streamSid":"{MZ}","media":{{"payload":"////"}}}}"#)
        );
        assert_eq!(mark_json(mz, "m\"1"), format!(r#"{{"event":"mark","streamSid":"{MZ}","mark":{{"name":"m\"1"}}}}"#));
        assert_eq!(clear_json(mz), format!(r#"{{"event":"clear","streamSid":"{MZ}"}}"#));
        // all are valid JSON with the documented structure
        for text in [media_json(mz, b"abc"), mark_json(mz, "\u{1}\t"), clear_json(mz)] {
            let v: serde_json::Value = serde_json::from_str(&text).unwrap();
            assert_eq!(v["streamSid"], MZ);
        }
        let v: serde_json::Value = serde_json::from_str(&mark_json(mz, "\u{1}\t")).unwrap();
        assert_eq!(v["mark"]["name"], "\u{1}\t");
    }

    #[test]
    fn error_kinds() {
        let cases: &[(&str, &str)] = &[
            ("", "malformed_json"),
            ("{", "malformed_json"),
            ("not json", "malformed_json"),
            (r#"{"event":"media"} trailing"#, "malformed_json"),
            (r#"{"event":5,"#, "malformed_json"),
            ("[]", "invalid_message"),
            ("\"media\"", "invalid_message"),
            ("{}", "invalid_message"),
            (r#"{"event":"bogus"}"#, "invalid_message"),
            (r#"{"event":5}"#, "invalid_message"),
            (r#"{"event":"media"}"#, "invalid_message"),
            (
                r#"{"event":"mark","sequenceNumber":"1","streamSid":"MZ0f1e2d3c0f1e2d3c0f1e2d3c0f1e2d3c"}"#,
                "invalid_message",
            ),
            (
                r#"{"event":"media","sequenceNumber":"x","streamSid":"MZ0f1e2d3c0f1e2d3c0f1e2d3c0f1e2d3c","media":{"chunk":"1","timestamp":"0","payload":""}}"#,
                "invalid_message",
            ),
            (
                r#"{"event":"media","sequenceNumber":"-1","streamSid":"MZ0f1e2d3c0f1e2d3c0f1e2d3c0f1e2d3c","media":{"chunk":"1","timestamp":"0","payload":""}}"#,
                "invalid_message",
            ),
            (
                r#"{"event":"media","sequenceNumber":1.5,"streamSid":"MZ0f1e2d3c0f1e2d3c0f1e2d3c0f1e2d3c","media":{"chunk":"1","timestamp":"0","payload":""}}"#,
                "invalid_message",
            ),
            (
                r#"{"event":"media","sequenceNumber":"1","streamSid":"CA7e6d5c4b7e6d5c4b7e6d5c4b7e6d5c4b","media":{"chunk":"1","timestamp":"0","payload":""}}"#,
                "invalid_message",
            ),
            (
                r#"{"event":"media","sequenceNumber":"1","streamSid":"MZ0f1e2d3c0f1e2d3c0f1e2d3c0f1e2d3c","media":{"chunk":"1","timestamp":"0"}}"#,
                "invalid_message",
            ),
            (
                r#"{"event":"media","sequenceNumber":"99999999999999999999999","streamSid":"MZ0f1e2d3c0f1e2d3c0f1e2d3c0f1e2d3c","media":{"chunk":"1","timestamp":"0","payload":""}}"#,
                "invalid_message",
            ),
            (r#"{"event":"connected","protocol":"Call"}"#, "invalid_message"),
            (
                r#"{"event":"start","sequenceNumber":"1","streamSid":"MZ0f1e2d3c0f1e2d3c0f1e2d3c0f1e2d3c","start":{"accountSid":"AC3f1c2b4a3f1c2b4a3f1c2b4a3f1c2b4a","callSid":"CA7e6d5c4b7e6d5c4b7e6d5c4b7e6d5c4b","customParameters":{"a":1},"mediaFormat":{"encoding":"audio/x-mulaw","sampleRate":8000,"channels":1}}}"#,
                "invalid_message",
            ),
            (
                r#"{"event":"start","sequenceNumber":"1","streamSid":"MZ0f1e2d3c0f1e2d3c0f1e2d3c0f1e2d3c","start":{"streamSid":"MZ1f1e2d3c0f1e2d3c0f1e2d3c0f1e2d3c","accountSid":"AC3f1c2b4a3f1c2b4a3f1c2b4a3f1c2b4a","callSid":"CA7e6d5c4b7e6d5c4b7e6d5c4b7e6d5c4b","mediaFormat":{"encoding":"audio/x-mulaw","sampleRate":8000,"channels":1}}}"#,
                "invalid_message",
            ),
            (
                r#"{"event":"start","sequenceNumber":"1","streamSid":"MZ0f1e2d3c0f1e2d3c0f1e2d3c0f1e2d3c","start":{"accountSid":"AC3f1c2b4a3f1c2b4a3f1c2b4a3f1c2b4a","callSid":"CA7e6d5c4b7e6d5c4b7e6d5c4b7e6d5c4b","mediaFormat":{"encoding":"audio/x-mulaw","sampleRate":8000,"channels":4294967296}}}"#,
                "invalid_message",
            ),
        ];
        for (text, kind) in cases {
            let e = parse_inbound(text).unwrap_err();
            assert_eq!(e.kind_str(), *kind, "{text}: {e}");
        }
    }

    #[test]
    fn format_check() {
        let (mz, ac, ca) = sids();
        let Inbound::Start(mut s) = parse_inbound(&start_json(mz, ac, ca, &[])).unwrap() else { panic!() };
        s.sample_rate = 16000;
        let e = s.check_format().unwrap_err();
        assert_eq!(e.kind_str(), "unsupported_format");
        assert!(e.to_string().starts_with("unsupported media format: "), "{e}");
        s.sample_rate = 8000;
        s.encoding = "audio/l16".to_owned();
        assert!(s.check_format().is_err());
        s.encoding = "audio/x-mulaw".to_owned();
        s.channels = 2;
        assert!(s.check_format().is_err());
    }

    #[test]
    fn payload_decoding() {
        let mut buf = Vec::with_capacity(MAX_FRAME_BYTES);
        let ptr = buf.as_ptr();
        decode_payload_into("", &mut buf).unwrap();
        assert!(buf.is_empty());
        decode_payload_into("AAE=", &mut buf).unwrap();
        assert_eq!(buf, [0, 1]);
        decode_payload_into("AA==", &mut buf).unwrap();
        assert_eq!(buf, [0]);
        let max = STANDARD.encode(vec![7u8; MAX_FRAME_BYTES]);
        decode_payload_into(&max, &mut buf).unwrap();
        assert_eq!(buf.len(), MAX_FRAME_BYTES);
        assert_eq!(buf.as_ptr(), ptr, "buffer reused without reallocating");
        let over = STANDARD.encode(vec![7u8; MAX_FRAME_BYTES + 1]);
        assert_eq!(
            decode_payload_into(&over, &mut buf),
            Err(MediaError::OversizeFrame { len: MAX_FRAME_BYTES + 1, max: MAX_FRAME_BYTES })
        );
        assert!(buf.is_empty());
        let huge = "A".repeat(1_000_001);
        assert_eq!(decode_payload_into(&huge, &mut buf).unwrap_err().kind_str(), "oversize_frame");
        for bad in ["A", "AAA", "AA=A", "====", "AAAA====", "AA\nA", "AB==", "é===", "AA-_"] {
            assert_eq!(decode_payload_into(bad, &mut buf), Err(MediaError::BadBase64), "{bad:?}");
            assert!(buf.is_empty());
        }
        let e = MediaError::BadBase64;
        assert_eq!((e.kind_str(), e.fault_kind()), ("bad_base64", FaultKind::BadBase64));
    }

    fn valid_messages() -> Vec<String> {
        let (mz, ac, ca) = sids();
        vec![
            connected_json(),
            start_json(mz, ac, ca, &[("tenant", "acme")]),
            DOC_START.to_owned(),
            inbound_media_json(mz, 2, 1, 20, &[0xFF; 160]),
            dtmf_json(mz, 3, "5"),
            inbound_mark_json(mz, 4, "m"),
            stop_json(mz, 5, ac, ca),
        ]
    }

    proptest! {
        #[test]
        fn never_panics_on_arbitrary_text(text in ".{0,300}") {
            let _ = parse_inbound(&text);
        }

        #[test]
        fn never_panics_on_mutated_messages(
            which in 0usize..7,
            edits in proptest::collection::vec((any::<prop::sample::Index>(), 0u8..3, any::<char>()), 1..6),
        ) {
            let msgs = valid_messages();
            let mut chars: Vec<char> = msgs.get(which).map(|s| s.chars().collect()).unwrap_or_default();
            for (at, op, c) in edits {
                if chars.is_empty() { break; }
                let i = at.index(chars.len());
                match op {
                    0 => { chars.remove(i); }
                    1 => chars.insert(i, c),
                    _ => chars[i] = c,
                }
            }
            let text: String = chars.into_iter().collect();
            if let Ok(Inbound::Media(m)) = parse_inbound(&text) {
                let mut buf = Vec::new();
                let _ = decode_payload_into(&m.payload_b64, &mut buf);
            }
        }

        #[test]
        fn decode_never_panics(s in "[A-Za-z0-9+/=]{0,40}|.{0,40}") {
            let mut buf = Vec::new();
            let _ = decode_payload_into(&s, &mut buf);
        }
    }
}
