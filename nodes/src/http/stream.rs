//! The Media Streams WebSocket: Twilio's audio in, batched into the call's stream queue.
//!
//! Per frame: parse the JSON (payload borrowed), base64 into a reused buffer, append to the batch
//! being built; every ~100 ms of contiguous audio becomes one `MediaBatch` for the media log, or
//! sooner at the frames where speech pauses or ends, when STT runs (an [`EndpointWatch`] per track:
//! the transcoder sees the pause at once instead of half a batch later). The
//! socket never waits on the log: the call actor drains the queue, and if it falls behind the queue
//! sheds the oldest audio and says so in the log. Bad input closes this stream only: a fault event,
//! a stop event, a metric and a close frame with the reason; other calls never notice.

use std::sync::Arc;

use axum::extract::ws::{CloseFrame, Message, WebSocket, WebSocketUpgrade};
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use voxgate_actors::call::{media_batch, StreamItem, StreamQueue};
use voxgate_actors::transcode::{EndpointWatch, VadConfig};
use voxgate_protocol::event::{
    Dtmf, Event, FaultKind, StopReason, StreamFault, StreamMark, StreamStarted, StreamStopped, Track,
};
use voxgate_protocol::twilio::twiml::{self, StreamTwiml, TwimlError};
use voxgate_protocol::twilio::{decode_payload_into, parse_inbound, signature, Inbound, MediaError, SignedBody};
use voxgate_protocol::{AccountSid, CallSid, Clock, StreamSid};

use crate::http::{twilio_error, AppState};
use crate::stages::calls::{AttachError, StreamSink};

/// Largest WebSocket message accepted (a 20 ms frame is ~400 bytes of JSON).
pub const MAX_MESSAGE_BYTES: usize = 16 * 1024;

/// The socket's read buffer. tungstenite zero-fills up to this much before every read, and a
/// read brings one or two ~400-byte frames: at its default (128 KiB) that memset was 12% of the
/// node's CPU at 1,000 streams. A longer message grows the buffer as it needs.
const READ_BUFFER_BYTES: usize = 4 * 1024;

/// The TwiML that points Twilio at the call's Media Stream: the webhook's answer, and the fresh
/// instructions that re-attach a dropped stream. The session in the URL is the call's sid.
pub fn answer(public_url: &str, tenant: AccountSid, call: CallSid) -> Result<String, TwimlError> {
    let session = call.to_string();
    let url = signature::websocket_url(public_url, &format!("/api/voice/twilio/stream/{session}"));
    let tenant = tenant.to_string();
    let params = [("tenant", tenant.as_str()), ("call_sid", session.as_str())];
    twiml::connect_stream(&StreamTwiml {
        url: &url,
        name: None,
        track: None,
        status_callback: None,
        status_callback_method: None,
        parameters: &params,
    })
}

/// How long sending a close frame may take: a peer that reads nothing (its receive window full)
/// must not hold the reader, and with it the stream's end, for ever.
const CLOSE_SEND: std::time::Duration = std::time::Duration::from_secs(1);

/// Sends our close frame, giving up after [`CLOSE_SEND`] (the socket is then dropped).
async fn send_close(socket: &mut WebSocket, code: u16, reason: &str) {
    let frame = Message::Close(Some(CloseFrame { code, reason: reason.into() }));
    if tokio::time::timeout(CLOSE_SEND, socket.send(frame)).await.is_err() {
        ws_error("close_send_timeout");
    }
}

fn ws_error(kind: &'static str) {
    metrics::counter!("twilio_websocket_errors_total", "error_type" => kind).increment(1);
}

/// `GET /api/voice/twilio/stream/{session}`: checks the call and the signature, then upgrades.
pub async fn upgrade(
    State(state): State<AppState>,
    Path(session): Path<String>,
    uri: Uri,
    headers: HeaderMap,
    ws: WebSocketUpgrade,
) -> Response {
    let Ok(call) = CallSid::parse(&session) else {
        ws_error("unknown_call");
        return twilio_error(StatusCode::NOT_FOUND, 20404, "no such media stream session");
    };
    let Some(voxgate_actors::call::CallIdentity { tenant, .. }) = state.calls.identity(call).await else {
        ws_error("unknown_call");
        tracing::warn!(stage = "ingress", call_sid = %call, "media stream for a call that is not active");
        return twilio_error(StatusCode::NOT_FOUND, 20404, format!("no active call {call}"));
    };
    if state.cfg.validate_stream_signature {
        let Some(token) = state.tenancy.token(tenant) else {
            ws_error("unknown_tenant");
            return twilio_error(StatusCode::FORBIDDEN, 20003, "unknown tenant");
        };
        let pq = uri.path_and_query().map(|p| p.as_str()).unwrap_or("/");
        let url = signature::websocket_url(&state.cfg.public_url, pq);
        let sig = headers.get("x-twilio-signature").and_then(|v| v.to_str().ok()).unwrap_or("");
        let key = token.expose().as_bytes();
        // Twilio's hint: if the URL fails, try it with a trailing slash.
        let ok = signature::validate(key, &url, SignedBody::Empty, sig)
            || signature::validate(key, &format!("{url}/"), SignedBody::Empty, sig);
        if !ok {
            ws_error("signature");
            tracing::warn!(stage = "ingress", call_sid = %call, tenant = %tenant, url = %url, "invalid X-Twilio-Signature on the media stream upgrade (checked against this URL)");
            return twilio_error(
                StatusCode::FORBIDDEN,
                20003,
                format!("invalid X-Twilio-Signature for {url} (the URL voxgate checked)"),
            );
        }
    }
    let (queue, sink) = match state.calls.attach(call).await {
        Ok(a) => a,
        Err(AttachError::NotFound) => {
            ws_error("unknown_call");
            return twilio_error(StatusCode::NOT_FOUND, 20404, format!("no active call {call}"));
        }
        Err(AttachError::Busy) => {
            ws_error("duplicate_stream");
            return twilio_error(
                StatusCode::CONFLICT,
                31960,
                format!("call {call} already has a media stream or has ended"),
            );
        }
        Err(AttachError::Link(e)) => {
            ws_error("call_node");
            tracing::error!(stage = "ingress", call_sid = %call, error = %e, "the call's node did not take the stream");
            return twilio_error(StatusCode::SERVICE_UNAVAILABLE, 20503, "the call's node is unavailable; retry");
        }
    };
    let clock = state.clock.clone();
    let batch_frames = state.cfg.calls.batch_frames;
    // Pauses matter early only where the open segments' pieces are made (STT on).
    let vad = state.cfg.transcode.vad.progress.then_some(state.cfg.transcode.vad);
    let idle = state.cfg.http.stream_idle();
    // Half the call's wait for it: what the reader hands over reaches an actor still waiting.
    let drain = state.cfg.calls.stream_end_grace / 2;
    ws.read_buffer_size(READ_BUFFER_BYTES)
        .max_message_size(MAX_MESSAGE_BYTES)
        .max_frame_size(MAX_MESSAGE_BYTES)
        .on_upgrade(move |socket| async move {
            let mut ingest = Ingest::new(call, tenant, queue, sink, clock, batch_frames, vad);
            ingest.run(socket, idle, drain).await;
        })
        .into_response()
}

struct Ingest {
    call: CallSid,
    tenant: AccountSid,
    queue: Arc<StreamQueue>,
    sink: StreamSink,
    clock: Arc<dyn Clock>,
    batch_bytes: usize,
    stream: Option<StreamSid>,
    /// The tracks the stream's `start` announced (a fork of both tracks, or the caller's only).
    tracks: [bool; 2],
    scratch: Vec<u8>,
    /// The batch being built, per track (`inbound`, `outbound`).
    acc: [TrackBatch; 2],
    /// Per track, when STT runs: where speech pauses or ends, the batch goes at once.
    vad: Option<VadConfig>,
    watch: [Option<EndpointWatch>; 2],
    next_seq: Option<u64>,
    flowing: bool,
    chunks: metrics::Counter,
    early: metrics::Counter,
}

/// One track's audio not yet handed to the call actor.
struct TrackBatch {
    bytes: Vec<u8>,
    frames: u32,
    first_seq: u64,
    start_ms: u64,
    /// Frames Twilio skipped (sequence gaps) before this batch.
    pending_gap: u32,
}

impl TrackBatch {
    fn new(capacity: usize) -> Self {
        Self { bytes: Vec::with_capacity(capacity), frames: 0, first_seq: 0, start_ms: 0, pending_gap: 0 }
    }
}

fn track_index(t: Track) -> usize {
    match t {
        Track::Inbound => 0,
        Track::Outbound => 1,
    }
}

enum Flow {
    Continue,
    Stopped,
}

impl Ingest {
    fn new(
        call: CallSid,
        tenant: AccountSid,
        queue: Arc<StreamQueue>,
        sink: StreamSink,
        clock: Arc<dyn Clock>,
        batch_frames: u32,
        vad: Option<VadConfig>,
    ) -> Self {
        let batch_bytes = batch_frames as usize * 160;
        Self {
            call,
            tenant,
            queue,
            sink,
            clock,
            batch_bytes,
            stream: None,
            tracks: [true, false],
            scratch: Vec::with_capacity(1600),
            acc: [TrackBatch::new(batch_bytes + 1600), TrackBatch::new(0)],
            watch: [vad.as_ref().map(EndpointWatch::new), None],
            vad,
            next_seq: None,
            flowing: false,
            chunks: metrics::counter!("twilio_audio_chunks_received_total"),
            early: metrics::counter!("voxgate_media_batches_early_total"),
        }
    }

    /// Reads the stream until it stops, drops, faults or goes idle, or the call ends. When the call
    /// ends first, the reader closes its side and goes on reading (for at most `drain`) what
    /// Twilio sent before it saw the close, until Twilio's `stop` or close.
    async fn run(&mut self, mut socket: WebSocket, idle: std::time::Duration, drain: std::time::Duration) {
        let connections = metrics::gauge!("twilio_websocket_connections");
        connections.increment(1.0);
        tracing::info!(stage = "ingress", call_sid = %self.call, tenant = %self.tenant, "media stream connected");
        // Twilio sends a frame every 20 ms: a stream silent for `idle` is dead (or held open).
        let mut last_message = std::time::Instant::now();
        let mut idle_check = tokio::time::interval((idle / 4).max(std::time::Duration::from_millis(50)));
        idle_check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // The call ended: why, and until when the socket's remaining frames are read.
        let mut closing: Option<StopReason> = None;
        // Armed when the call ends (one timer for the stream, not one per frame).
        let drained = tokio::time::sleep(std::time::Duration::from_secs(86_400));
        tokio::pin!(drained);
        let end = loop {
            tokio::select! {
                _ = &mut drained, if closing.is_some() => {
                    // Twilio neither stopped nor closed: what it still sends is not read.
                    ws_error("close_timeout");
                    break closing.take();
                }
                _ = idle_check.tick() => {
                    if last_message.elapsed() > idle && closing.is_none() {
                        self.fault(FaultKind::Idle, format!("no message for {} s", idle.as_secs()));
                        send_close(&mut socket, 1001, "idle").await;
                        // The call goes on: like a drop, the call actor asks Twilio for a new stream.
                        break None;
                    }
                    continue;
                }
                reason = self.queue.wait_closed(), if closing.is_none() => {
                    // The call ended (status callback, maximum duration): close our side, then
                    // read what the socket still holds.
                    send_close(&mut socket, 1000, "call ended").await;
                    closing = Some(reason);
                    drained.as_mut().reset(tokio::time::Instant::now() + drain);
                }
                msg = socket.recv() => { last_message = std::time::Instant::now(); match msg {
                    Some(Ok(Message::Text(t))) => match self.on_text(t.as_str()) {
                        Ok(Flow::Continue) => {}
                        Ok(Flow::Stopped) => break Some(StopReason::Twilio),
                        Err(e) => {
                            self.fault(e.fault_kind(), e.to_string());
                            send_close(&mut socket, 1008, e.kind_str()).await;
                            break Some(StopReason::Fault);
                        }
                    },
                    Some(Ok(Message::Binary(_))) => {
                        self.fault(FaultKind::InvalidMessage, "binary frame (Media Streams sends text)".into());
                        send_close(&mut socket, 1003, "invalid_message").await;
                        break Some(StopReason::Fault);
                    }
                    Some(Ok(Message::Ping(_) | Message::Pong(_))) => {}
                    // Twilio's answer to our close is not a drop.
                    Some(Ok(Message::Close(_))) | None => break closing.take(),
                    Some(Err(_)) if closing.is_some() => break closing.take(),
                    Some(Err(e)) => {
                        let text = e.to_string();
                        if text.contains("too long") || text.contains("too big") || text.contains("Space limit") {
                            self.fault(FaultKind::OversizeFrame, text);
                            break Some(StopReason::Fault);
                        }
                        ws_error("transport");
                        tracing::warn!(stage = "ingress", call_sid = %self.call, tenant = %self.tenant, error = %text, "media stream transport error");
                        break None;
                    }
                }}
            }
        };
        self.flush_batch();
        // A socket that closed just as the call ended (both ready at once) was not dropped.
        let reason = end.or_else(|| self.queue.closed()).unwrap_or(StopReason::Disconnected);
        // The actor records the stop itself when it closed the stream.
        if (reason != StopReason::CallEnded || self.queue.closed().is_none())
            && (self.stream.is_some() || reason == StopReason::Fault)
        {
            self.push_control(Event::StreamStopped(StreamStopped {
                stream_sid: self.stream,
                reason: reason.clone(),
                frames: 0,
            }));
        }
        self.sink.ended(reason.clone());
        connections.decrement(1.0);
        tracing::info!(stage = "ingress", call_sid = %self.call, tenant = %self.tenant, ?reason, "media stream closed");
    }

    fn fault(&mut self, kind: FaultKind, detail: String) {
        ws_error(kind.as_str());
        tracing::warn!(stage = "ingress", call_sid = %self.call, tenant = %self.tenant, kind = kind.as_str(), %detail, "media stream closed on bad input");
        self.flush_batch();
        let detail: String = detail.chars().take(300).collect();
        self.push_control(Event::StreamFault(StreamFault { stream_sid: self.stream, kind, detail }));
    }

    fn push_control(&self, ev: Event) {
        self.queue.push(self.clock.now(), StreamItem::Control(ev));
    }

    fn on_text(&mut self, text: &str) -> Result<Flow, MediaError> {
        let msg = parse_inbound(text)?;
        // Sequence numbers count every message of the stream, both tracks together: a gap is
        // laid on the track of the message after it.
        let mut gap = 0u32;
        if let Some(seq) = msg.sequence() {
            if let Some(expected) = self.next_seq {
                if seq > expected {
                    gap = u32::try_from(seq - expected).unwrap_or(u32::MAX);
                }
            }
            self.next_seq = Some(seq.saturating_add(1));
        }
        match msg {
            Inbound::Connected { .. } => Ok(Flow::Continue),
            Inbound::Start(start) => {
                if self.stream.is_some() {
                    return Err(MediaError::InvalidMessage("second start on one stream".into()));
                }
                start.check_format()?;
                if start.call_sid != self.call || start.account_sid != self.tenant {
                    return Err(MediaError::InvalidMessage(format!(
                        "start names call {} of {}, but this stream belongs to {} of {}",
                        start.call_sid, start.account_sid, self.call, self.tenant
                    )));
                }
                self.stream = Some(start.stream_sid);
                let named: Vec<Track> = start.tracks.iter().filter_map(|t| Track::parse(t)).collect();
                self.tracks = [named.is_empty() || named.contains(&Track::Inbound), named.contains(&Track::Outbound)];
                if self.tracks[1] && self.acc[1].bytes.capacity() == 0 {
                    self.acc[1] = TrackBatch::new(self.batch_bytes + 1600);
                    self.watch[1] = self.vad.as_ref().map(EndpointWatch::new);
                }
                self.push_control(Event::StreamStarted(StreamStarted {
                    stream_sid: start.stream_sid,
                    tracks: start.tracks,
                    custom_parameters: start.custom_parameters,
                }));
                Ok(Flow::Continue)
            }
            Inbound::Media(m) => {
                let Some(sid) = self.stream else {
                    return Err(MediaError::InvalidMessage("media before start".into()));
                };
                if m.stream_sid != sid {
                    return Err(MediaError::InvalidMessage("media for another stream".into()));
                }
                let Some(track) = Track::parse(&m.track) else {
                    return Err(MediaError::InvalidMessage(format!("unknown track {:?}", shown(&m.track))));
                };
                let t = track_index(track);
                if !self.tracks[t] {
                    // A track the start did not announce is not this stream's to keep.
                    return Ok(Flow::Continue);
                }
                decode_payload_into(&m.payload_b64, &mut self.scratch)?;
                self.chunks.increment(1);
                let acc = &self.acc[t];
                // Checked: a timestamp near u64::MAX (any client can send one) must not wrap.
                let contiguous = acc.bytes.is_empty()
                    || acc.start_ms.checked_add((acc.bytes.len() as u64) / 8) == Some(m.timestamp_ms);
                if !contiguous || gap > 0 && !acc.bytes.is_empty() {
                    self.flush_track(t);
                }
                let acc = &mut self.acc[t];
                acc.pending_gap = acc.pending_gap.saturating_add(gap);
                if acc.bytes.is_empty() {
                    acc.first_seq = m.sequence;
                    acc.start_ms = m.timestamp_ms;
                }
                acc.bytes.extend_from_slice(&self.scratch);
                acc.frames += 1;
                let full = acc.bytes.len() >= self.batch_bytes;
                let early = self.watch[t].as_mut().is_some_and(|w| w.push(m.timestamp_ms, &self.scratch)) && !full;
                if early {
                    self.early.increment(1);
                }
                if !self.flowing {
                    self.flowing = true;
                    self.sink.media_flowing();
                }
                if full || early {
                    self.flush_track(t);
                }
                Ok(Flow::Continue)
            }
            Inbound::Dtmf { sequence, stream_sid, digit } => {
                self.flush_batch();
                self.push_control(Event::Dtmf(Dtmf { stream_sid, digit, sequence }));
                Ok(Flow::Continue)
            }
            Inbound::Mark { sequence, stream_sid, name } => {
                self.flush_batch();
                self.push_control(Event::StreamMark(StreamMark { stream_sid, name, sequence }));
                Ok(Flow::Continue)
            }
            Inbound::Stop { .. } => Ok(Flow::Stopped),
        }
    }

    /// Hands both tracks' batches to the call actor (before a control event, or at the end).
    fn flush_batch(&mut self) {
        self.flush_track(0);
        self.flush_track(1);
    }

    fn flush_track(&mut self, t: usize) {
        let Some(sid) = self.stream else { return };
        let track = if t == 0 { Track::Inbound } else { Track::Outbound };
        let acc = &mut self.acc[t];
        if acc.bytes.is_empty() {
            return;
        }
        let payload = Bytes::from(std::mem::replace(&mut acc.bytes, Vec::with_capacity(self.batch_bytes + 1600)));
        let batch = media_batch(sid, track, acc.first_seq, acc.start_ms, acc.frames, acc.pending_gap, payload);
        acc.frames = 0;
        acc.pending_gap = 0;
        self.queue.push(self.clock.now(), StreamItem::Audio(batch));
    }
}

/// At most 32 characters of client input, for messages.
fn shown(s: &str) -> String {
    s.chars().take(32).collect()
}
