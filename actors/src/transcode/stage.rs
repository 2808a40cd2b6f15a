//! The transcode stage: reads the media log from its durable cursor, runs a [`StreamTranscoder`]
//! per stream, and appends the speech segments it cuts to the speech log.
//!
//! Restart and replay: the cursor of a partition is committed no further than the first record of
//! the oldest stream still open there, so after a crash the open streams are rebuilt from their
//! start. Segments already appended are not appended again: the stage keeps, per open stream, the
//! number of segments it has emitted (`__state`, written after the segments are durable). A crash
//! between those two writes can repeat at most the last batch of segments, with identical event
//! ids, which consumers de-duplicate on.

use std::collections::HashMap;
use std::sync::Arc;

use bytes::Bytes;
use ractor::{Actor, ActorProcessingErr, ActorRef};
use voxgate_protocol::event::{Event, SpeechEnded, SpeechHints, SpeechProgress, SpeechSegment, Track};
use voxgate_protocol::{AccountSid, CallSid, Envelope, EventId, StreamSid, Timestamp};
use voxgate_storage::{topics, Log, Record, StorageError};

use super::{Piece, Segment, StreamTranscoder, TranscodeConfig};
use crate::call::id_kind;
use crate::progress::Progress;

/// The stage's cursor name on the media log.
pub const CURSOR: &str = "transcode";
const STATE: &str = "transcode";
const READ_BATCH: usize = 256;

/// Messages the stage takes.
pub enum StageMsg {
    /// New media may be durable: read and process it.
    Poll,
}

/// What the stage needs.
pub struct TranscodeStageArgs {
    pub log: Log,
    pub config: TranscodeConfig,
    /// Where the stage reports how far it has read (health, lag metrics).
    pub progress: Arc<Progress>,
    /// The media partitions this instance works on (`None`: all; in a cluster, its claims).
    pub partitions: Option<Vec<u32>>,
}

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

struct PartitionState {
    next: u64,
    streams: HashMap<StreamTrack, OpenStream>,
}

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

/// The stage's state.
pub struct TranscodeState {
    log: Log,
    config: TranscodeConfig,
    progress: Arc<Progress>,
    partitions: Vec<PartitionState>,
    watcher: tokio::task::JoinHandle<()>,
    records: Vec<Record>,
    segments: Vec<Segment>,
    pieces: Vec<Piece>,
}

/// The transcode stage actor.
pub struct TranscodeStage;

impl Actor for TranscodeStage {
    type Msg = StageMsg;
    type State = TranscodeState;
    type Arguments = TranscodeStageArgs;

    async fn pre_start(
        &self,
        myself: ActorRef<StageMsg>,
        args: TranscodeStageArgs,
    ) -> Result<TranscodeState, ActorProcessingErr> {
        let cursor =
            crate::progress::starting_points(args.log.cursor(CURSOR, topics::MEDIA)?, args.partitions.as_deref());
        for (p, next) in cursor.iter().enumerate() {
            args.progress.set(p as u32, *next);
        }
        let partitions = cursor.into_iter().map(|next| PartitionState { next, streams: HashMap::new() }).collect();
        let watcher = crate::progress::wake_on_append(&args.log, topics::MEDIA, myself.clone(), || StageMsg::Poll)?;
        myself.cast(StageMsg::Poll)?;
        Ok(TranscodeState {
            log: args.log,
            config: args.config,
            progress: args.progress,
            partitions,
            watcher,
            records: Vec::new(),
            segments: Vec::new(),
            pieces: Vec::new(),
        })
    }

    async fn post_stop(&self, _: ActorRef<StageMsg>, s: &mut TranscodeState) -> Result<(), ActorProcessingErr> {
        s.watcher.abort();
        let _ = s.log.sync().await;
        Ok(())
    }

    async fn handle(
        &self,
        myself: ActorRef<StageMsg>,
        msg: StageMsg,
        s: &mut TranscodeState,
    ) -> Result<(), ActorProcessingErr> {
        match msg {
            StageMsg::Poll => {
                let mut more = false;
                for p in 0..s.partitions.len() {
                    more |= poll_partition(s, p as u32).await?;
                }
                let next: Vec<u64> = s.partitions.iter().map(|p| p.next).collect();
                crate::progress::report_lag(&s.log, "transcode", topics::MEDIA, &next);
                if more {
                    myself.cast(StageMsg::Poll)?;
                }
            }
        }
        Ok(())
    }
}

/// Processes one read batch of a partition; true when more may be waiting.
async fn poll_partition(s: &mut TranscodeState, p: u32) -> Result<bool, StorageError> {
    s.records.clear();
    let from = s.partitions[p as usize].next;
    let next = s.log.read(topics::MEDIA, p, from, READ_BATCH, &mut s.records)?;
    if s.records.is_empty() {
        return Ok(false);
    }
    let mut out: Vec<Vec<u8>> = Vec::new();
    let mut out_keys: Vec<u64> = Vec::new();
    let mut finished: Vec<StreamTrack> = Vec::new();
    let records = std::mem::take(&mut s.records);
    for r in &records {
        let env = match voxgate_protocol::decode(r.payload()) {
            Ok(e) => e,
            Err(e) => {
                metrics::counter!("twilio_transcoding_errors_total", "error_type" => "undecodable_record").increment(1);
                tracing::error!(stage = "transcode", partition = p, offset = r.offset, error = %e, "media record cannot be decoded; skipped");
                continue;
            }
        };
        let part = &mut s.partitions[p as usize];
        let Some(call) = env.call else { continue };
        match &env.payload {
            Event::StreamStarted(st) => {
                for track in tracks_of(&st.tracks) {
                    let emitted = match s.log.get_state(STATE, &state_key(st.stream_sid, track))? {
                        Some(v) => v.as_slice().try_into().map(u32::from_be_bytes).unwrap_or(0),
                        None => 0,
                    };
                    part.streams.insert(
                        (st.stream_sid, track),
                        OpenStream {
                            tenant: env.tenant,
                            call,
                            transcoder: StreamTranscoder::new(&s.config),
                            first_offset: r.offset,
                            emitted,
                            dirty: false,
                        },
                    );
                }
            }
            Event::MediaBatch(b) => {
                let key = (b.stream_sid, b.track);
                let Some(open) = part.streams.get_mut(&key) else {
                    continue;
                };
                s.segments.clear();
                open.transcoder.push(b.start_ms, &b.payload, &mut s.segments);
                open.transcoder.take_progress(&mut s.pieces);
                emit(open, key, env.occurred_at, &mut s.segments, &mut s.pieces, &mut out, &mut out_keys);
            }
            Event::SpeechHints(h) if h.track.is_none() => {
                // On to the speech log, once per open track, in order with its segments.
                for track in [Track::Inbound, Track::Outbound] {
                    let Some(open) = part.streams.get(&(h.stream_sid, track)) else { continue };
                    let hints = Envelope {
                        event_id: EventId::derive(id_kind::SPEECH_HINTS, &[env.event_id.0, track as u128]),
                        tenant: open.tenant,
                        call: Some(open.call),
                        occurred_at: env.occurred_at,
                        payload: Event::SpeechHints(SpeechHints { track: Some(track), ..h.clone() }),
                    };
                    out.push(voxgate_protocol::encode(&hints));
                    out_keys.push(open.call.partition_key());
                }
            }
            Event::StreamStopped(st) => {
                let Some(sid) = st.stream_sid else { continue };
                for track in [Track::Inbound, Track::Outbound] {
                    let Some(mut open) = part.streams.remove(&(sid, track)) else {
                        continue;
                    };
                    s.segments.clear();
                    open.transcoder.finish(&mut s.segments);
                    open.transcoder.take_progress(&mut s.pieces);
                    emit(
                        &mut open,
                        (sid, track),
                        env.occurred_at,
                        &mut s.segments,
                        &mut s.pieces,
                        &mut out,
                        &mut out_keys,
                    );
                    // After the track's last segment: every transcript of it follows the same way.
                    let ended = Envelope {
                        event_id: EventId::derive(id_kind::SPEECH_ENDED, &[sid.as_u128(), track as u128]),
                        tenant: open.tenant,
                        call: Some(open.call),
                        occurred_at: env.occurred_at,
                        payload: Event::SpeechEnded(SpeechEnded { stream_sid: sid, track, segments: open.emitted }),
                    };
                    out.push(voxgate_protocol::encode(&ended));
                    out_keys.push(open.call.partition_key());
                    finished.push((sid, track));
                }
            }
            _ => {}
        }
    }
    s.records = records;
    if !out.is_empty() {
        s.log.append_many(topics::SPEECH, out_keys.iter().copied().zip(out.iter().map(|b| b.as_slice()))).await?;
        metrics::counter!("voxgate_speech_segments_total").increment(out.len() as u64);
    }
    let part = &mut s.partitions[p as usize];
    // Only the streams that cut a segment in this batch (with a thousand open streams, storing
    // every one on each poll was most of the stage's writes).
    for (&(sid, track), open) in part.streams.iter_mut().filter(|(_, o)| o.dirty) {
        s.log.put_state(STATE, &state_key(sid, track), &open.emitted.to_be_bytes())?;
        open.dirty = false;
    }
    for &(sid, track) in &finished {
        s.log.delete_state(STATE, &state_key(sid, track))?;
    }
    part.next = next;
    s.progress.set(p, next);
    let commit = part.streams.values().map(|o| o.first_offset).min().unwrap_or(next).min(next);
    s.log.store_cursor(CURSOR, topics::MEDIA, p, commit)?;
    let more = s.records.len() == READ_BATCH;
    // The speech this batch cut is durable already (`append_many` waited for it), so the cursor
    // and state may reach the disk with a later flush: a restart before it only cuts the same
    // segments again, under the same ids. Waiting for a flush per batch while behind held the
    // stage to one batch per group commit; it syncs once it has caught up.
    if !more {
        s.log.sync().await?;
    }
    Ok(more)
}

/// Appends the segments and the pieces of open segments cut by one push, in the order they were
/// cut (a segment's pieces before it).
fn emit(
    open: &mut OpenStream,
    key: StreamTrack,
    at: Timestamp,
    segments: &mut Vec<Segment>,
    pieces: &mut Vec<Piece>,
    out: &mut Vec<Vec<u8>>,
    keys: &mut Vec<u64>,
) {
    let mut pieces = pieces.drain(..).peekable();
    for seg in segments.drain(..) {
        while let Some(p) = pieces.next_if(|p| p.index <= seg.index) {
            emit_piece(open, key, at, p, out, keys);
        }
        emit_segment(open, key, at, seg, out, keys);
    }
    for p in pieces {
        emit_piece(open, key, at, p, out, keys);
    }
}

fn emit_piece(
    open: &OpenStream,
    (stream_sid, track): StreamTrack,
    at: Timestamp,
    p: Piece,
    out: &mut Vec<Vec<u8>>,
    keys: &mut Vec<u64>,
) {
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
    out.push(voxgate_protocol::encode(&env));
    keys.push(open.call.partition_key());
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
    out: &mut Vec<Vec<u8>>,
    keys: &mut Vec<u64>,
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
        out.push(voxgate_protocol::encode(&env));
        keys.push(open.call.partition_key());
    }
}
