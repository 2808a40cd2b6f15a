//! The transcode stage: reads the media log from its durable cursor, runs a [`StreamTranscoder`]
//! per stream, and appends the speech segments it cuts to the speech log. It runs on the stage
//! harness ([`crate::stage`]), one round per media partition.
//!
//! Restart and replay: the cursor of a partition is committed no further than the first record of
//! the oldest stream still open there, so after a crash the open streams are rebuilt from their
//! start. Segments already appended are not appended again: the stage keeps, per open stream, the
//! number of segments it has emitted (`__state`, written after the segments are durable). A crash
//! between those two writes can repeat at most the last batch of segments, with identical event
//! ids, which consumers de-duplicate on.

use std::collections::HashMap;

use bytes::Bytes;
use voxgate_protocol::event::{Event, SpeechEnded, SpeechHints, SpeechProgress, SpeechSegment, Track};
use voxgate_protocol::{AccountSid, CallSid, Envelope, EventId, StreamSid, Timestamp};
use voxgate_storage::{topics, Log, StorageError};

use super::{Piece, Segment, StreamTranscoder, TranscodeConfig};
use crate::call::id_kind;
use crate::stage::{Batch, Durability, Outputs, Reading, Stage, StageError};

/// The stage's cursor name on the media log.
pub const CURSOR: &str = "transcode";
const STATE: &str = "transcode";
const READ_BATCH: usize = 256;

struct OpenStream {
    tenant: AccountSid,
    call: CallSid,
    transcoder: StreamTranscoder,
    /// Offset of the stream's first record: the cursor may not pass it while the stream is open.
    first_offset: u64,
    /// Segments already in the speech log (from before a restart).
    emitted: u32,
    /// `emitted` moved since its state was last stored.
    dirty: bool,
}

/// One track of one stream: each has its own transcoder and voice-activity detector.
type StreamTrack = (StreamSid, Track);

/// The stage's state key of a stream's track (the caller's track keeps the key it always had).
fn state_key(sid: StreamSid, track: Track) -> Vec<u8> {
    let mut k = sid.as_u128().to_be_bytes().to_vec();
    if track == Track::Outbound {
        k.push(1);
    }
    k
}

/// The tracks a stream's `start` announces (`inbound` when it names none).
fn tracks_of(names: &[String]) -> Vec<Track> {
    let mut out: Vec<Track> = names.iter().filter_map(|t| Track::parse(t)).collect();
    out.sort();
    out.dedup();
    if out.is_empty() {
        out.push(Track::Inbound);
    }
    out
}

/// The transcode stage: per media partition, the streams open there.
pub struct TranscodeStage {
    config: TranscodeConfig,
    partitions: Vec<HashMap<StreamTrack, OpenStream>>,
    /// The partition of the round under way, and the tracks it finished.
    round: u32,
    finished: Vec<StreamTrack>,
    segments: Vec<Segment>,
    pieces: Vec<Piece>,
}

impl Stage for TranscodeStage {
    type Args = TranscodeConfig;
    type Msg = std::convert::Infallible;
    const NAME: &'static str = "transcode";
    const CURSOR: &'static str = CURSOR;
    const INPUT: &'static str = topics::MEDIA;
    // The speech a round cut is durable already (appends wait for their flush), so the cursor
    // and state may reach the disk with a later flush: a restart before it only cuts the same
    // segments again, under the same ids. Waiting for a flush per batch while behind held the
    // stage to one batch per group commit; it syncs once it has caught up.
    const DURABILITY: Durability = Durability::WhenCaughtUp;

    fn reading(_: &TranscodeConfig, _owned: usize) -> Reading {
        Reading::PerPartition { batch: READ_BATCH }
    }

    async fn open(config: &TranscodeConfig, _: &Log, from: &[u64], _: crate::stage::Shard) -> Result<Self, StageError> {
        Ok(Self {
            config: config.clone(),
            partitions: from.iter().map(|_| HashMap::new()).collect(),
            round: 0,
            finished: Vec::new(),
            segments: Vec::new(),
            pieces: Vec::new(),
        })
    }

    async fn handle(&mut self, log: &Log, batch: &Batch, out: &mut Outputs) -> Result<(), StageError> {
        self.finished.clear();
        self.round = batch.reads.first().map_or(0, |(p, _)| *p);
        for (p, r) in batch.records() {
            let env = match voxgate_protocol::decode(r.payload()) {
                Ok(e) => e,
                Err(e) => {
                    metrics::counter!("twilio_transcoding_errors_total", "error_type" => "undecodable_record")
                        .increment(1);
                    tracing::error!(stage = "transcode", partition = p, offset = r.offset, error = %e, "media record cannot be decoded; skipped");
                    continue;
                }
            };
            let Some(part) = self.partitions.get_mut(p as usize) else { continue };
            let Some(call) = env.call else { continue };
            match &env.payload {
                Event::StreamStarted(st) => {
                    for track in tracks_of(&st.tracks) {
                        let emitted = match log.get_state(STATE, &state_key(st.stream_sid, track))? {
                            Some(v) => v.as_slice().try_into().map(u32::from_be_bytes).unwrap_or(0),
                            None => 0,
                        };
                        part.insert(
                            (st.stream_sid, track),
                            OpenStream {
                                tenant: env.tenant,
                                call,
                                transcoder: StreamTranscoder::new(&self.config),
                                first_offset: r.offset,
                                emitted,
                                dirty: false,
                            },
                        );
                    }
                }
                Event::MediaBatch(b) => {
                    let key = (b.stream_sid, b.track);
                    let Some(open) = part.get_mut(&key) else {
                        continue;
                    };
                    self.segments.clear();
                    open.transcoder.push(b.start_ms, &b.payload, &mut self.segments);
                    open.transcoder.take_progress(&mut self.pieces);
                    emit(open, key, env.occurred_at, &mut self.segments, &mut self.pieces, out);
                }
                Event::SpeechHints(h) if h.track.is_none() => {
                    // On to the speech log, once per open track, in order with its segments.
                    for track in [Track::Inbound, Track::Outbound] {
                        let Some(open) = part.get(&(h.stream_sid, track)) else { continue };
                        let hints = Envelope {
                            event_id: EventId::derive(id_kind::SPEECH_HINTS, &[env.event_id.0, track as u128]),
                            tenant: open.tenant,
                            call: Some(open.call),
                            occurred_at: env.occurred_at,
                            payload: Event::SpeechHints(SpeechHints { track: Some(track), ..h.clone() }),
                        };
                        out.push(topics::SPEECH, open.call.partition_key(), voxgate_protocol::encode(&hints));
                    }
                }
                Event::StreamStopped(st) => {
                    let Some(sid) = st.stream_sid else { continue };
                    for track in [Track::Inbound, Track::Outbound] {
                        let Some(mut open) = part.remove(&(sid, track)) else {
                            continue;
                        };
                        self.segments.clear();
                        open.transcoder.finish(&mut self.segments);
                        open.transcoder.take_progress(&mut self.pieces);
                        emit(&mut open, (sid, track), env.occurred_at, &mut self.segments, &mut self.pieces, out);
                        // After the track's last segment: every transcript of it follows the same way.
                        let ended = Envelope {
                            event_id: EventId::derive(id_kind::SPEECH_ENDED, &[sid.as_u128(), track as u128]),
                            tenant: open.tenant,
                            call: Some(open.call),
                            occurred_at: env.occurred_at,
                            payload: Event::SpeechEnded(SpeechEnded { stream_sid: sid, track, segments: open.emitted }),
                        };
                        out.push(topics::SPEECH, open.call.partition_key(), voxgate_protocol::encode(&ended));
                        self.finished.push((sid, track));
                    }
                }
                _ => {}
            }
        }
        Ok(())
    }

    fn appended(&mut self, log: &Log, out: &Outputs) -> Result<(), StorageError> {
        if !out.is_empty() {
            metrics::counter!("voxgate_speech_segments_total").increment(out.len() as u64);
        }
        let Some(part) = self.partitions.get_mut(self.round as usize) else { return Ok(()) };
        // Only the streams that cut a segment in this batch (with a thousand open streams, storing
        // every one on each poll was most of the stage's writes).
        for (&(sid, track), open) in part.iter_mut().filter(|(_, o)| o.dirty) {
            log.put_state(STATE, &state_key(sid, track), &open.emitted.to_be_bytes())?;
            open.dirty = false;
        }
        for &(sid, track) in &self.finished {
            log.delete_state(STATE, &state_key(sid, track))?;
        }
        Ok(())
    }

    /// No further than the first record of the oldest stream still open in the partition.
    fn commit_at(&self, partition: u32, next: u64) -> u64 {
        let open = self.partitions.get(partition as usize);
        open.and_then(|o| o.values().map(|o| o.first_offset).min()).unwrap_or(next).min(next)
    }
}

/// Appends the segments and the pieces of open segments cut by one push, in the order they were
/// cut (a segment's pieces before it).
fn emit(
    open: &mut OpenStream,
    key: StreamTrack,
    at: Timestamp,
    segments: &mut Vec<Segment>,
    pieces: &mut Vec<Piece>,
    out: &mut Outputs,
) {
    let mut pieces = pieces.drain(..).peekable();
    for seg in segments.drain(..) {
        while let Some(p) = pieces.next_if(|p| p.index <= seg.index) {
            emit_piece(open, key, at, p, out);
        }
        emit_segment(open, key, at, seg, out);
    }
    for p in pieces {
        emit_piece(open, key, at, p, out);
    }
}

fn emit_piece(open: &OpenStream, (stream_sid, track): StreamTrack, at: Timestamp, p: Piece, out: &mut Outputs) {
    if p.index < open.emitted {
        return; // its segment was in the speech log before a restart
    }
    let env = Envelope {
        event_id: EventId::derive(
            id_kind::SPEECH_PROGRESS,
            &[stream_sid.as_u128(), u128::from(p.index), u128::from(p.end_ms), track as u128],
        ),
        tenant: open.tenant,
        call: Some(open.call),
        occurred_at: at,
        payload: Event::SpeechProgress(SpeechProgress {
            stream_sid,
            track,
            index: p.index,
            start_ms: p.start_ms,
            from_ms: p.from_ms,
            end_ms: p.end_ms,
            paused: p.paused,
            pcm16le: pcm_bytes(&p.pcm16),
        }),
    };
    metrics::counter!("voxgate_speech_pieces_total", "paused" => if p.paused { "true" } else { "false" }).increment(1);
    out.push(topics::SPEECH, open.call.partition_key(), voxgate_protocol::encode(&env));
}

fn pcm_bytes(pcm16: &[i16]) -> Bytes {
    let mut pcm = Vec::with_capacity(pcm16.len() * 2);
    for x in pcm16 {
        pcm.extend_from_slice(&x.to_le_bytes());
    }
    Bytes::from(pcm)
}

fn emit_segment(
    open: &mut OpenStream,
    (stream_sid, track): StreamTrack,
    at: Timestamp,
    seg: Segment,
    out: &mut Outputs,
) {
    {
        if seg.index < open.emitted {
            return; // already in the speech log before a restart
        }
        open.emitted = seg.index + 1;
        open.dirty = true;
        metrics::histogram!("voxgate_speech_segment_seconds").record((seg.end_ms - seg.start_ms) as f64 / 1000.0);
        // The caller's track keeps the ids it always had; the other track's differ.
        let event_id = match track {
            Track::Inbound => EventId::derive(id_kind::SPEECH_SEGMENT, &[stream_sid.as_u128(), u128::from(seg.index)]),
            Track::Outbound => {
                EventId::derive(id_kind::SPEECH_SEGMENT, &[stream_sid.as_u128(), u128::from(seg.index), 1])
            }
        };
        let env = Envelope {
            event_id,
            tenant: open.tenant,
            call: Some(open.call),
            occurred_at: at,
            payload: Event::SpeechSegment(SpeechSegment {
                stream_sid,
                index: seg.index,
                start_ms: seg.start_ms,
                end_ms: seg.end_ms,
                sample_rate: 16_000,
                pcm16le: pcm_bytes(&seg.pcm16),
                track,
            }),
        };
        out.push(topics::SPEECH, open.call.partition_key(), voxgate_protocol::encode(&env));
    }
}
