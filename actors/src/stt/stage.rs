//! The STT stage: speech segments in (speech log), transcripts out (transcripts log). It runs on
//! the stage harness ([`crate::stage`]): a round is a batch across the partitions it owns, and
//! its decision is the decode, which waits for the workers (and may be cancelled, below).
//!
//! Whisper runs off the async runtime on a small pool of worker threads, each owning a
//! [`Transcriber`]; the stage actor reads whatever segments are durable (across calls, up to a
//! batch), hands them to the workers, and appends one transcript per segment. While the workers
//! are busy, new segments queue in the log, so the next read batches them: throughput adapts to
//! load without a timer. Transcript ids derive from the segment (stream, index), so a restart that
//! repeats a segment produces an identical event.
//!
//! Segments still open reach the stage as pieces ([`SpeechProgress`]). The stage keeps each
//! track's open segment so far and decodes it
//! * at a pause (a speculative final), unless finals wait: if the pause lasts, the segment that
//!   closes has exactly that audio and its transcript is the one already decoded, appended as soon
//!   as the segment is read, without waiting for Whisper; if speech resumes, the decode is dropped;
//! * at the other pieces, when partial results are on and no final is waiting: a
//!   [`PartialTranscript`] (interim, not final, not billed). A partial is dropped, never queued,
//!   when the workers have finals to do.
//!
//! Finals come first: open segments are decoded only in batches of their own, and a segment that
//! closes meanwhile (other than one being decoded at its pause) cancels that batch at the next
//! decoder step, so a final never waits behind work on open segments.
//!
//! What is kept of open segments lives in memory only: after a restart the stage decodes the
//! segments it did not see the start of when they close.
//!
//! Vocabulary hints ([`SpeechHints`], from the tenant and the call's transcriptions) reach the
//! stage on the speech log before the segments they apply to; each segment is decoded with the
//! node's `[stt] hints` and its track's hints as Whisper's prompt ([`prompt_hints`]), in batches of
//! one prompt. A track's hints are stage state too, so a restart decodes with them.

use std::collections::{HashMap, HashSet, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::oneshot;
use voxgate_protocol::event::{
    Event, PartialTranscript, SpeechHints, SpeechProgress, SpeechSegment, Track, Transcript,
};
use voxgate_protocol::{Clock, Envelope, EventId, StreamSid};
use voxgate_storage::{topics, Log, Record, StorageError};

use super::decode::{DecodeOptions, Transcriber, Transcription};
use crate::call::id_kind;
use crate::stage::{Batch, Durability, Outputs, Reading, Stage, StageError};

/// The stage's cursor name on the speech log (and the name of its state).
pub const CURSOR: &str = "stt";

/// The text of Whisper's prompt for a segment: the node's hints, then its track's (the prompt
/// keeps the last tokens, so the more specific hints come last).
pub fn prompt_hints(node: &str, track: &str) -> String {
    match (node.trim(), track.trim()) {
        ("", t) => t.to_owned(),
        (n, "") => n.to_owned(),
        (n, t) => format!("{n}, {t}"),
    }
}

/// A track's hints in the stage's state.
fn hints_key(stream: StreamSid, track: Track) -> [u8; 18] {
    let mut k = [0u8; 18];
    k[0] = b'h';
    k[1..17].copy_from_slice(&stream.as_u128().to_be_bytes());
    k[17] = track as u8;
    k
}

/// Why the STT pool could not start or run.
#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    #[error("whisper model not usable at {dir}: {reason} (run nodes/deploy/fetch-model.sh to fetch it)")]
    Model { dir: String, reason: String },
    #[error("stt worker thread could not start: {0}")]
    Thread(String),
    #[error("stt workers are gone")]
    Gone,
}

struct PoolJob {
    clips: Vec<Vec<f32>>,
    /// Set when the work became pointless (finals arrived while open segments decode).
    cancel: Option<Arc<AtomicBool>>,
    /// Decode greedily whatever the beam width (partial results: interim, and cheap).
    greedy: bool,
    /// Whisper's prompt text for every clip of the job.
    hints: Arc<str>,
    reply: oneshot::Sender<Result<(Vec<Transcription>, Duration), JobError>>,
}

/// Why a batch gave no transcripts.
#[derive(Debug, thiserror::Error)]
pub enum JobError {
    /// The caller cancelled it.
    #[error("cancelled")]
    Cancelled,
    /// The model failed, or the workers are gone.
    #[error("{0}")]
    Failed(String),
}

/// What transcripts record as their model: the model directory's name and the SHA-256 of the
/// weights actually loaded (`whisper-tiny.en@sha256:1a5afae06a4db91c`), so a transcript names the
/// exact file that produced it, whatever the directory is called later.
pub fn model_identity(dir: &Path) -> Result<String, std::io::Error> {
    use sha2::Digest;
    use std::io::Read;
    let path = dir.join("model.bin");
    let named = |e: std::io::Error| std::io::Error::new(e.kind(), format!("{}: {e}", path.display()));
    let mut f = std::fs::File::open(&path).map_err(named)?;
    let mut h = sha2::Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).map_err(named)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    let digest = h.finalize();
    let name = dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "whisper".into());
    let hex: String = digest[..8].iter().map(|b| format!("{b:02x}")).collect();
    Ok(format!("{name}@sha256:{hex}"))
}

/// A transcript's id: from its stream, track and segment (the caller's track keeps the ids it
/// always had).
pub fn transcript_id(stream_sid: StreamSid, track: Track, index: u32) -> EventId {
    match track {
        Track::Inbound => EventId::derive(id_kind::TRANSCRIPT, &[stream_sid.as_u128(), u128::from(index)]),
        Track::Outbound => EventId::derive(id_kind::TRANSCRIPT, &[stream_sid.as_u128(), u128::from(index), 1]),
    }
}

/// Whisper workers on dedicated threads, fed through a bounded queue.
pub struct SttPool {
    jobs: SyncSender<PoolJob>,
    workers: usize,
    model_id: String,
    /// The node's `[stt] hints`.
    hints: String,
}

impl SttPool {
    /// Loads the model in `workers` threads (blocking; call from a blocking context) and waits until
    /// every worker is ready, so a bad model fails at start-up, not on the first call.
    pub fn start(model_dir: &Path, workers: usize, options: DecodeOptions) -> Result<Self, PoolError> {
        let workers = workers.max(1);
        let hints = options.hints.clone();
        let (tx, rx) = sync_channel::<PoolJob>(workers * 2);
        let rx = Arc::new(Mutex::new(rx));
        let (ready_tx, ready_rx) = std::sync::mpsc::channel::<Result<(), String>>();
        for i in 0..workers {
            let rx = rx.clone();
            let ready = ready_tx.clone();
            let dir: PathBuf = model_dir.to_owned();
            let options = options.clone();
            std::thread::Builder::new()
                .name(format!("voxgate-stt-{i}"))
                .spawn(move || worker(dir, options, rx, ready))
                .map_err(|e| PoolError::Thread(e.to_string()))?;
        }
        drop(ready_tx);
        for _ in 0..workers {
            match ready_rx.recv() {
                Ok(Ok(())) => {}
                Ok(Err(reason)) => return Err(PoolError::Model { dir: model_dir.display().to_string(), reason }),
                Err(_) => return Err(PoolError::Gone),
            }
        }
        let model_id = model_identity(model_dir)
            .map_err(|e| PoolError::Model { dir: model_dir.display().to_string(), reason: e.to_string() })?;
        Ok(Self { jobs: tx, workers, model_id, hints })
    }

    /// The prompt text of a track with these hints (the node's first).
    pub fn prompt(&self, track_hints: &str) -> Arc<str> {
        prompt_hints(&self.hints, track_hints).into()
    }

    /// How many workers run.
    pub fn workers(&self) -> usize {
        self.workers
    }

    /// The model's id as recorded in transcripts.
    pub fn model_id(&self) -> &str {
        &self.model_id
    }

    /// Transcribes clips (16 kHz mono f32) as one batch on a free worker; gives up, as
    /// [`JobError::Cancelled`], once `cancel` is set. `greedy` decodes without beam search.
    pub async fn transcribe(
        &self,
        clips: Vec<Vec<f32>>,
        cancel: Option<Arc<AtomicBool>>,
        greedy: bool,
        hints: Arc<str>,
    ) -> Result<(Vec<Transcription>, Duration), JobError> {
        let (reply, rx) = oneshot::channel();
        let jobs = self.jobs.clone();
        // The queue is bounded: wait for room off the runtime.
        tokio::task::spawn_blocking(move || jobs.send(PoolJob { clips, cancel, greedy, hints, reply }))
            .await
            .map_err(|e| JobError::Failed(e.to_string()))?
            .map_err(|_| JobError::Failed("stt workers are gone".into()))?;
        rx.await.map_err(|_| JobError::Failed("stt worker dropped the job".into()))?
    }
}

fn worker(
    dir: PathBuf,
    options: DecodeOptions,
    jobs: Arc<Mutex<Receiver<PoolJob>>>,
    ready: std::sync::mpsc::Sender<Result<(), String>>,
) {
    let greedy = DecodeOptions { beam_size: 1, ..options.clone() };
    let mut t = match Transcriber::load(&dir) {
        Ok(t) => {
            let _ = ready.send(Ok(()));
            t
        }
        Err(e) => {
            let _ = ready.send(Err(e.to_string()));
            return;
        }
    };
    drop(ready);
    // What the transcriber was last set to: (greedy, prompt); `None` before the first job.
    let mut applied: Option<(bool, Arc<str>)> = None;
    loop {
        let job = match jobs.lock() {
            Ok(rx) => match rx.recv() {
                Ok(j) => j,
                Err(_) => return,
            },
            Err(_) => return,
        };
        let started = Instant::now();
        if applied.as_ref().is_none_or(|(g, h)| *g != job.greedy || *h != job.hints) {
            let want = if job.greedy { &greedy } else { &options };
            t.set_options(DecodeOptions { hints: job.hints.to_string(), ..want.clone() });
            applied = Some((job.greedy, job.hints.clone()));
        }
        let refs: Vec<&[f32]> = job.clips.iter().map(|c| c.as_slice()).collect();
        let r =
            t.transcribe_batch_unless(&refs, job.cancel.as_deref()).map(|v| (v, started.elapsed())).map_err(
                |e| match e {
                    super::decode::DecodeError::Cancelled => JobError::Cancelled,
                    e => JobError::Failed(e.to_string()),
                },
            );
        let _ = job.reply.send(r);
    }
}

/// What the STT stage is built from.
#[derive(Clone)]
pub struct SttSettings {
    pub pool: Arc<SttPool>,
    /// Most segments sent to the workers at once (across calls).
    pub max_batch: usize,
    /// The node's clock (for the transcript delay metric only; no decision reads it).
    pub clock: Arc<dyn Clock>,
    /// Decode open segments for partial results while the workers are free.
    pub partials: bool,
}

/// The STT stage: what it keeps between rounds.
pub struct SttStage {
    pool: Arc<SttPool>,
    recent: RecentIds,
    clock: Arc<dyn Clock>,
    partials: bool,
    /// Each track's open segment, as its pieces told it.
    open: HashMap<(StreamSid, Track), Heard>,
    /// Each track's prompt text (the node's hints and the track's), as the speech log told it.
    hints: HashMap<(StreamSid, Track), Arc<str>>,
    /// Tracks whose speech ended this round: their kept hints are deleted once it is committed.
    hints_ended: Vec<(StreamSid, Track)>,
    /// The round's output, for its metrics once durable: partials, transcripts, and when each
    /// transcript's segment closed.
    partials_out: usize,
    closed_at: Vec<i64>,
}

/// What to do with an open segment at the end of a read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Want {
    Nothing,
    /// Its speaker paused: decode it now, it may be the final.
    Speculative,
    /// Decode it for a partial result if a worker is free.
    Partial,
}

/// A track's open segment so far.
struct Heard {
    tenant: voxgate_protocol::AccountSid,
    call: voxgate_protocol::CallSid,
    occurred_at: voxgate_protocol::Timestamp,
    index: u32,
    start_ms: u64,
    end_ms: u64,
    /// 16 kHz audio of `[start_ms, end_ms)`.
    pcm: Vec<f32>,
    /// The prompt it is decoded with.
    hints: Arc<str>,
    want: Want,
    /// A decode of the audio up to a pause.
    speculative: Option<Speculative>,
    partials: u32,
    last_partial: String,
}

struct Speculative {
    hints: Arc<str>,
    end_ms: u64,
    samples: usize,
    result: Transcription,
    took_ms: u32,
}

/// One clip sent to the workers.
enum Job {
    /// A closed segment: `pending[i]`.
    Final(usize),
    /// An open segment's audio up to `end_ms`.
    Open {
        key: (StreamSid, Track),
        index: u32,
        start_ms: u64,
        end_ms: u64,
        samples: usize,
        speculative: bool,
        hints: Arc<str>,
    },
}

/// Recently transcribed segment ids, to skip a segment that appears twice in the log.
struct RecentIds {
    set: HashSet<EventId>,
    order: VecDeque<EventId>,
    cap: usize,
}

impl RecentIds {
    fn insert(&mut self, id: EventId) -> bool {
        if !self.set.insert(id) {
            return false;
        }
        self.order.push_back(id);
        if self.order.len() > self.cap {
            if let Some(old) = self.order.pop_front() {
                self.set.remove(&old);
            }
        }
        true
    }
}

impl Stage for SttStage {
    type Args = SttSettings;
    type Msg = std::convert::Infallible;
    const NAME: &'static str = "stt";
    const CURSOR: &'static str = CURSOR;
    const INPUT: &'static str = topics::SPEECH;
    const DURABILITY: Durability = Durability::EachRound;

    /// A batch of segments across the partitions it owns, up to `max_batch` in all.
    fn reading(settings: &SttSettings, owned: usize) -> Reading {
        Reading::Together { per_partition: settings.max_batch.max(1).div_ceil(owned.max(1)).max(1) }
    }

    async fn open(settings: &SttSettings, _: &Log, _: &[u64], _: crate::stage::Shard) -> Result<Self, StageError> {
        Ok(Self {
            pool: settings.pool.clone(),
            recent: RecentIds { set: HashSet::new(), order: VecDeque::new(), cap: 4096 },
            clock: settings.clock.clone(),
            partials: settings.partials,
            open: HashMap::new(),
            hints: HashMap::new(),
            hints_ended: Vec::new(),
            partials_out: 0,
            closed_at: Vec::new(),
        })
    }

    async fn handle(&mut self, log: &Log, batch: &Batch, out: &mut Outputs) -> Result<(), StageError> {
        decode_round(self, log, batch, out).await
    }

    fn appended(&mut self, _: &Log, _: &Outputs) -> Result<(), StorageError> {
        if self.partials_out > 0 {
            metrics::counter!("voxgate_partial_transcripts_total").increment(self.partials_out as u64);
        }
        if !self.closed_at.is_empty() {
            metrics::counter!("voxgate_transcripts_total").increment(self.closed_at.len() as u64);
            // From the audio that closed each segment reaching voxgate (the end of speech plus the
            // VAD's hangover) to its transcript being durable.
            let now = self.clock.now().as_micros();
            let delay = metrics::histogram!("voxgate_transcript_delay_seconds");
            for at in self.closed_at.drain(..) {
                delay.record(now.saturating_sub(at).max(0) as f64 / 1e6);
            }
        }
        self.partials_out = 0;
        Ok(())
    }

    fn committed(&mut self, log: &Log) -> Result<(), StorageError> {
        for (stream, track) in self.hints_ended.drain(..) {
            log.delete_state(CURSOR, &hints_key(stream, track))?;
        }
        Ok(())
    }
}

struct Pending {
    env: Envelope,
    clip: Vec<f32>,
    hints: Arc<str>,
    /// Decoded already at the pause where it ended.
    ready: Option<(Transcription, u32)>,
}

/// Takes a piece of an open segment into what the stage has heard of it.
fn take_piece(
    open: &mut HashMap<(StreamSid, Track), Heard>,
    env: &Envelope,
    p: &SpeechProgress,
    partials: bool,
    hints: Arc<str>,
) {
    let Some(call) = env.call else { return };
    let key = (p.stream_sid, p.track);
    let same = |h: &Heard| h.index == p.index && h.start_ms == p.start_ms;
    match open.get_mut(&key) {
        Some(h) if same(h) && h.end_ms == p.from_ms => {
            h.pcm.extend(pcm_f32(&p.pcm16le));
            h.end_ms = p.end_ms;
        }
        Some(h) if same(h) && p.end_ms <= h.end_ms => return, // read again after a restart
        _ if p.from_ms == p.start_ms => {
            if let Some(old) = open.remove(&key) {
                wasted(&old);
            }
            open.insert(
                key,
                Heard {
                    tenant: env.tenant,
                    call,
                    occurred_at: env.occurred_at,
                    index: p.index,
                    start_ms: p.start_ms,
                    end_ms: p.end_ms,
                    pcm: pcm_f32(&p.pcm16le).collect(),
                    hints: hints.clone(),
                    want: Want::Nothing,
                    speculative: None,
                    partials: 0,
                    last_partial: String::new(),
                },
            );
        }
        _ => {
            // The segment's start was read before a restart: it is decoded when it closes.
            if let Some(old) = open.remove(&key) {
                wasted(&old);
            }
            return;
        }
    }
    if let Some(h) = open.get_mut(&key) {
        h.occurred_at = env.occurred_at;
        h.hints = hints;
        h.want = if p.paused {
            Want::Speculative
        } else if partials {
            Want::Partial
        } else {
            Want::Nothing
        };
    }
}

fn wasted(h: &Heard) {
    if h.speculative.is_some() {
        metrics::counter!("voxgate_stt_speculative_total", "outcome" => "dropped").increment(1);
    }
}

fn pcm_f32(pcm16le: &[u8]) -> impl Iterator<Item = f32> + '_ {
    pcm16le.chunks_exact(2).map(|b| f32::from(i16::from_le_bytes([b[0], b[1]])) / 32768.0)
}

/// The decode of `seg` made at the pause where it ended, if the segment is exactly that audio.
fn speculated(
    open: &mut HashMap<(StreamSid, Track), Heard>,
    seg: &SpeechSegment,
    clip: &[f32],
    hints: &str,
) -> Option<(Transcription, u32)> {
    let key = (seg.stream_sid, seg.track);
    let h = open.remove(&key)?;
    if h.index > seg.index {
        open.insert(key, h); // a later segment's pieces (cannot happen in order; kept to be safe)
        return None;
    }
    let spec = h.speculative.as_ref()?;
    let fits = h.index == seg.index
        && *spec.hints == *hints
        && h.start_ms == seg.start_ms
        && spec.end_ms == seg.end_ms
        && spec.samples == clip.len()
        && h.pcm.get(..spec.samples) == Some(clip);
    if !fits {
        wasted(&h);
        return None;
    }
    metrics::counter!("voxgate_stt_speculative_total", "outcome" => "used").increment(1);
    let spec = h.speculative?;
    Some((spec.result, spec.took_ms))
}

/// Transcribes a round's segments (and open segments, while no final waits) and decides the
/// transcripts.
async fn decode_round(s: &mut SttStage, log: &Log, batch: &Batch, out: &mut Outputs) -> Result<(), StageError> {
    let mut pending: Vec<Pending> = Vec::new();
    let mut ended: Vec<Envelope> = Vec::new();
    s.partials_out = 0;
    s.closed_at.clear();
    for (p, r) in batch.records() {
        let env = match voxgate_protocol::decode(r.payload()) {
            Ok(e) => e,
            Err(e) => {
                metrics::counter!("twilio_stt_errors_total", "error_type" => "undecodable_record").increment(1);
                tracing::error!(stage = "stt", partition = p, offset = r.offset, error = %e, "speech record cannot be decoded; skipped");
                continue;
            }
        };
        match &env.payload {
            Event::SpeechEnded(e) => {
                if let Some(old) = s.open.remove(&(e.stream_sid, e.track)) {
                    wasted(&old);
                }
                // Its kept hints go once this round is committed (a crash before re-reads the
                // round with them).
                if s.hints.remove(&(e.stream_sid, e.track)).is_some() {
                    s.hints_ended.push((e.stream_sid, e.track));
                }
                // Passed on after this batch's transcripts: the track's last one is in before it.
                let id = EventId::derive(id_kind::TRANSCRIPTS_ENDED, &[e.stream_sid.as_u128(), e.track as u128]);
                ended.push(Envelope { event_id: id, ..env.clone() });
            }
            Event::SpeechHints(SpeechHints { stream_sid, track: Some(track), hints }) => {
                let key = (*stream_sid, *track);
                log.put_state(CURSOR, &hints_key(key.0, key.1), hints.as_bytes())?;
                s.hints.insert(key, s.pool.prompt(hints));
            }
            Event::SpeechProgress(piece) => {
                let hints = track_hints(s, log, piece.stream_sid, piece.track)?;
                take_piece(&mut s.open, &env, piece, s.partials, hints);
            }
            Event::SpeechSegment(seg) => {
                if !s.recent.insert(env.event_id) {
                    continue;
                }
                let hints = track_hints(s, log, seg.stream_sid, seg.track)?;
                let clip: Vec<f32> = pcm_f32(&seg.pcm16le).collect();
                let ready = speculated(&mut s.open, seg, &clip, &hints);
                pending.push(Pending { env, clip, hints, ready });
            }
            _ => {}
        }
    }

    // Finals alone when there are any (work on open segments would only delay them); else the
    // open segments whose speaker paused; partials only while a worker would be idle.
    let mut jobs: Vec<Job> = Vec::new();
    let mut clips: Vec<(Arc<str>, Vec<f32>)> = Vec::new();
    for (i, p) in pending.iter_mut().enumerate() {
        if p.ready.is_none() {
            jobs.push(Job::Final(i));
            clips.push((p.hints.clone(), std::mem::take(&mut p.clip)));
        }
    }
    let finals = jobs.len();
    let (mut partials_dropped, mut speculative_skipped) = (0u64, 0u64);
    for (key, h) in s.open.iter_mut() {
        let want = std::mem::replace(&mut h.want, Want::Nothing);
        let speculative = match want {
            Want::Nothing => continue,
            Want::Speculative if finals == 0 => true,
            Want::Speculative => {
                speculative_skipped += 1;
                continue;
            }
            Want::Partial if finals == 0 && jobs.len() < s.pool.workers() => false,
            Want::Partial => {
                partials_dropped += 1;
                continue;
            }
        };
        jobs.push(Job::Open {
            key: *key,
            index: h.index,
            start_ms: h.start_ms,
            end_ms: h.end_ms,
            samples: h.pcm.len(),
            speculative,
            hints: h.hints.clone(),
        });
        clips.push((h.hints.clone(), h.pcm.clone()));
    }
    if speculative_skipped > 0 {
        metrics::counter!("voxgate_stt_speculative_total", "outcome" => "skipped").increment(speculative_skipped);
    }
    if partials_dropped > 0 {
        metrics::counter!("voxgate_stt_partials_dropped_total").increment(partials_dropped);
    }

    // Open segments alone (no final waits): a final that arrives meanwhile cancels them, so it
    // waits at most one decoder step, unless it is the segment being decoded at its pause; and a
    // batch of pauses is cancelled as soon as every one of its speakers went on talking.
    let mut cancelled: Option<Cancelled> = None;
    let results = if clips.is_empty() {
        Vec::new()
    } else if finals == 0 {
        let cancel = Arc::new(AtomicBool::new(false));
        let expected: HashMap<(StreamSid, Track), (u32, u64)> = jobs
            .iter()
            .filter_map(|j| match j {
                Job::Open { key, index, end_ms, speculative: true, .. } => Some((*key, (*index, *end_ms))),
                _ => None,
            })
            .collect();
        let only_pauses = expected.len() == jobs.len();
        // Partials alone are interim: greedy; a speculative final decodes as the final would.
        let work = transcribe(&s.pool, clips, Some(cancel.clone()), expected.is_empty());
        tokio::pin!(work);
        let watch = cancel_on_finals(log, &batch.next, &expected, only_pauses, &cancel);
        tokio::pin!(watch);
        tokio::select! {
            r = &mut work => r,
            why = &mut watch => {
                cancelled = Some(why);
                work.await
            }
        }
    } else {
        transcribe(&s.pool, clips, None, false).await
    };

    for (job, r) in jobs.into_iter().zip(results) {
        match job {
            Job::Final(i) => pending[i].ready = r,
            Job::Open { key, index, start_ms, end_ms, samples, speculative, hints } => {
                let Some((t, took_ms)) = r else {
                    match cancelled {
                        Some(Cancelled::Finals) if speculative => {
                            metrics::counter!("voxgate_stt_speculative_total", "outcome" => "cancelled").increment(1);
                        }
                        Some(Cancelled::Resumed) => {
                            metrics::counter!("voxgate_stt_speculative_total", "outcome" => "resumed").increment(1);
                        }
                        Some(Cancelled::Finals) => {
                            metrics::counter!("voxgate_stt_partials_dropped_total").increment(1);
                        }
                        None => {}
                    }
                    continue;
                };
                let Some(h) = s.open.get_mut(&key) else { continue };
                if h.index != index || h.start_ms != start_ms {
                    continue;
                }
                if speculative {
                    if h.speculative.is_some() {
                        metrics::counter!("voxgate_stt_speculative_total", "outcome" => "dropped").increment(1);
                    }
                    h.speculative = Some(Speculative { hints, end_ms, samples, result: t.clone(), took_ms });
                }
                if s.partials && t.rejected.is_none() && !t.text.is_empty() && t.text != h.last_partial {
                    h.partials += 1;
                    let ev = PartialTranscript {
                        stream_sid: key.0,
                        track: key.1,
                        segment_index: index,
                        start_ms,
                        end_ms,
                        stable: t.text.starts_with(h.last_partial.as_str()),
                        text: t.text.clone(),
                        sequence: h.partials,
                    };
                    h.last_partial = t.text;
                    let env = Envelope {
                        event_id: EventId::derive(
                            id_kind::PARTIAL_TRANSCRIPT,
                            &[key.0.as_u128(), u128::from(index), u128::from(end_ms), key.1 as u128],
                        ),
                        tenant: h.tenant,
                        call: Some(h.call),
                        occurred_at: h.occurred_at,
                        payload: Event::PartialTranscript(ev),
                    };
                    out.push(topics::TRANSCRIPTS, h.call.partition_key(), voxgate_protocol::encode(&env));
                    s.partials_out += 1;
                }
            }
        }
    }
    let model = s.pool.model_id().to_owned();
    for p in pending {
        let Event::SpeechSegment(seg) = &p.env.payload else { continue };
        let Some(call) = p.env.call else { continue };
        let (t, share) = match p.ready {
            Some(x) => x,
            None => continue, // recorded as an error; the segment stays in the speech log for replay
        };
        metrics::histogram!("twilio_stt_latency_seconds").record(f64::from(share) / 1000.0);
        metrics::histogram!("twilio_stt_transcript_length_chars").record(t.text.chars().count() as f64);
        if let Some(why) = t.doubt {
            metrics::counter!("voxgate_stt_doubtful_total", "reason" => why).increment(1);
        }
        let ev = Transcript {
            stream_sid: seg.stream_sid,
            segment_index: seg.index,
            segment_event: p.env.event_id,
            start_ms: seg.start_ms,
            end_ms: seg.end_ms,
            text: t.text,
            model: model.clone(),
            processing_ms: share,
            // Finite for every reader (JSON has no NaN): an undefined log-prob (no tokens) is -inf → -100.
            avg_logprob: if t.avg_logprob.is_finite() { t.avg_logprob } else { -100.0 },
            no_speech_prob: if t.no_speech_prob.is_finite() { t.no_speech_prob } else { 0.0 },
            rejected: t.rejected.map(str::to_owned),
            track: seg.track,
            doubt: t.doubt.map(str::to_owned),
        };
        tracing::info!(call_sid = %call, tenant = %p.env.tenant, stage = "stt", segment = seg.index, text = %ev.text, rejected = ?ev.rejected, ms = share, "transcript");
        let env = Envelope {
            event_id: transcript_id(seg.stream_sid, seg.track, seg.index),
            tenant: p.env.tenant,
            call: Some(call),
            occurred_at: p.env.occurred_at,
            payload: Event::Transcript(ev),
        };
        out.push(topics::TRANSCRIPTS, call.partition_key(), voxgate_protocol::encode(&env));
        s.closed_at.push(p.env.occurred_at.as_micros());
    }
    // The tracks whose speech ended, after their last transcript.
    for e in &ended {
        if let Some(c) = e.call {
            out.push(topics::TRANSCRIPTS, c.partition_key(), voxgate_protocol::encode(e));
        }
    }
    Ok(())
}

/// Transcribes clips, each with its prompt, split across the workers: clips of one prompt go
/// through the encoder together, in batches of about `clips / workers`. One result per clip, in
/// order, with its share of its batch's time in ms (`None`: failed, counted and logged).
async fn transcribe(
    pool: &Arc<SttPool>,
    clips: Vec<(Arc<str>, Vec<f32>)>,
    cancel: Option<Arc<AtomicBool>>,
    greedy: bool,
) -> Vec<Option<(Transcription, u32)>> {
    let total = clips.len();
    let workers = pool.workers().min(total).max(1);
    let chunk = total.div_ceil(workers);
    // Clips by prompt, in first-seen order; each batch remembers where its clips came from.
    struct Group {
        hints: Arc<str>,
        at: Vec<usize>,
        clips: Vec<Vec<f32>>,
    }
    let mut groups: Vec<Group> = Vec::new();
    for (i, (hints, clip)) in clips.into_iter().enumerate() {
        match groups.iter_mut().find(|g| g.hints == hints && g.at.len() < chunk) {
            Some(g) => {
                g.at.push(i);
                g.clips.push(clip);
            }
            None => groups.push(Group { hints, at: vec![i], clips: vec![clip] }),
        }
    }
    let mut batches = Vec::with_capacity(groups.len());
    for Group { hints, at, clips: batch } in groups {
        let pool = pool.clone();
        let cancel = cancel.clone();
        batches.push((at, tokio::spawn(async move { pool.transcribe(batch, cancel, greedy, hints).await })));
    }
    let mut results: Vec<Option<(Transcription, u32)>> = (0..total).map(|_| None).collect();
    for (at, job) in batches {
        let n = at.len();
        let outcome = match job.await {
            Ok(r) => r,
            Err(e) => Err(JobError::Failed(e.to_string())),
        };
        match outcome {
            Ok((ts, took)) => {
                let share = (took.as_millis() as u64 / n.max(1) as u64) as u32;
                for (i, t) in at.into_iter().zip(ts) {
                    if let Some(r) = results.get_mut(i) {
                        *r = Some((t, share));
                    }
                }
            }
            Err(JobError::Cancelled) => {}
            Err(JobError::Failed(why)) => {
                metrics::counter!("twilio_stt_errors_total", "error_type" => "model").increment(n as u64);
                tracing::error!(stage = "stt", segments = n, error = %why, "transcription failed");
            }
        }
    }
    results
}

/// A track's prompt text: as the speech log told it, or (after a restart) as the stage's state
/// kept it.
fn track_hints(s: &mut SttStage, log: &Log, stream: StreamSid, track: Track) -> Result<Arc<str>, StorageError> {
    if let Some(h) = s.hints.get(&(stream, track)) {
        return Ok(h.clone());
    }
    let kept = log.get_state(CURSOR, &hints_key(stream, track))?;
    let hints = s.pool.prompt(&String::from_utf8_lossy(kept.as_deref().unwrap_or_default()));
    // Kept (a miss too) until the track's speech ends.
    s.hints.insert((stream, track), hints.clone());
    Ok(hints)
}

/// Why a batch of open segments was cancelled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Cancelled {
    /// A segment that needs a final arrived.
    Finals,
    /// Every segment of the batch was decoded at a pause, and every speaker went on talking: no
    /// result could be used.
    Resumed,
}

/// Returns (after setting `cancel`) once a segment that needs a final becomes durable past
/// `next` — any but one in `expected` ((stream, track) → (index, end)), the segments being
/// decoded at their pause — or, when the batch is `only_pauses`, once a later piece of each of
/// them shows its speaker went on; never returns otherwise.
async fn cancel_on_finals(
    log: &Log,
    next: &[u64],
    expected: &HashMap<(StreamSid, Track), (u32, u64)>,
    only_pauses: bool,
    cancel: &AtomicBool,
) -> Cancelled {
    let mut went_on: HashSet<(StreamSid, Track)> = HashSet::new();
    let Ok(mut rx) = log.watch(topics::SPEECH) else { return std::future::pending().await };
    let mut from = next.to_vec();
    let mut records: Vec<Record> = Vec::new();
    loop {
        rx.borrow_and_update();
        for (p, at) in from.iter_mut().enumerate() {
            if *at == crate::progress::NOT_OURS {
                continue;
            }
            loop {
                records.clear();
                let Ok(to) = log.read(topics::SPEECH, p as u32, *at, 64, &mut records) else { break };
                *at = to;
                for r in &records {
                    let Ok(env) = voxgate_protocol::decode(r.payload()) else { continue };
                    match &env.payload {
                        Event::SpeechSegment(seg)
                            if expected.get(&(seg.stream_sid, seg.track)) != Some(&(seg.index, seg.end_ms)) =>
                        {
                            cancel.store(true, Ordering::Relaxed);
                            return Cancelled::Finals;
                        }
                        Event::SpeechProgress(p) => {
                            let key = (p.stream_sid, p.track);
                            let moved =
                                expected.get(&key).is_some_and(|&(index, end)| p.index != index || p.end_ms > end);
                            if moved && went_on.insert(key) && only_pauses && went_on.len() == expected.len() {
                                cancel.store(true, Ordering::Relaxed);
                                return Cancelled::Resumed;
                            }
                        }
                        _ => {}
                    }
                }
                if records.len() < 64 {
                    break;
                }
            }
        }
        if rx.changed().await.is_err() {
            return std::future::pending().await;
        }
    }
}
