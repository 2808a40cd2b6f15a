//! The STT stage: speech segments in (speech log), transcripts out (transcripts log).
//!
//! Whisper runs off the async runtime on a small pool of worker threads, each owning a
//! [`Transcriber`]; the stage actor reads whatever segments are durable (across calls, up to a
//! batch), hands them to the workers, and appends one transcript per segment. While the workers
//! are busy, new segments queue in the log, so the next read batches them: throughput adapts to
//! load without a timer. Transcript ids derive from the segment (stream, index), so a restart that
//! repeats a segment produces an identical event.

use std::collections::{HashSet, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ractor::{Actor, ActorProcessingErr, ActorRef};
use tokio::sync::oneshot;
use voxgate_protocol::event::{Event, Track, Transcript};
use voxgate_protocol::{Clock, Envelope, EventId, StreamSid};
use voxgate_storage::{topics, Log, Record, StorageError};

use super::decode::{Transcriber, Transcription};
use crate::call::id_kind;
use crate::progress::Progress;

/// The stage's cursor name on the speech log.
pub const CURSOR: &str = "stt";

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

struct Job {
    clips: Vec<Vec<f32>>,
    reply: oneshot::Sender<Result<(Vec<Transcription>, Duration), String>>,
}

/// What transcripts record as their model: the model directory's name and the SHA-256 of the
/// weights actually loaded (`whisper-tiny.en@sha256:1a5afae06a4db91c`), so a transcript names the
/// exact file that produced it, whatever the directory is called later.
pub fn model_identity(dir: &Path) -> Result<String, String> {
    use sha2::Digest;
    use std::io::Read;
    let path = dir.join("model.bin");
    let mut f = std::fs::File::open(&path).map_err(|e| format!("{}: {e}", path.display()))?;
    let mut h = sha2::Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).map_err(|e| format!("{}: {e}", path.display()))?;
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
    jobs: SyncSender<Job>,
    workers: usize,
    model_id: String,
}

impl SttPool {
    /// Loads the model in `workers` threads (blocking; call from a blocking context) and waits until
    /// every worker is ready, so a bad model fails at start-up, not on the first call.
    pub fn start(model_dir: &Path, workers: usize) -> Result<Self, PoolError> {
        let workers = workers.max(1);
        let (tx, rx) = sync_channel::<Job>(workers * 2);
        let rx = Arc::new(Mutex::new(rx));
        let (ready_tx, ready_rx) = std::sync::mpsc::channel::<Result<(), String>>();
        for i in 0..workers {
            let rx = rx.clone();
            let ready = ready_tx.clone();
            let dir: PathBuf = model_dir.to_owned();
            std::thread::Builder::new()
                .name(format!("voxgate-stt-{i}"))
                .spawn(move || worker(dir, rx, ready))
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
            .map_err(|reason| PoolError::Model { dir: model_dir.display().to_string(), reason })?;
        Ok(Self { jobs: tx, workers, model_id })
    }

    /// How many workers run.
    pub fn workers(&self) -> usize {
        self.workers
    }

    /// The model's id as recorded in transcripts.
    pub fn model_id(&self) -> &str {
        &self.model_id
    }

    /// Transcribes clips (16 kHz mono f32) as one batch on a free worker.
    pub async fn transcribe(&self, clips: Vec<Vec<f32>>) -> Result<(Vec<Transcription>, Duration), String> {
        let (reply, rx) = oneshot::channel();
        let jobs = self.jobs.clone();
        // The queue is bounded: wait for room off the runtime.
        tokio::task::spawn_blocking(move || jobs.send(Job { clips, reply }))
            .await
            .map_err(|e| e.to_string())?
            .map_err(|_| "stt workers are gone".to_string())?;
        rx.await.map_err(|_| "stt worker dropped the job".to_string())?
    }
}

fn worker(dir: PathBuf, jobs: Arc<Mutex<Receiver<Job>>>, ready: std::sync::mpsc::Sender<Result<(), String>>) {
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
    loop {
        let job = match jobs.lock() {
            Ok(rx) => match rx.recv() {
                Ok(j) => j,
                Err(_) => return,
            },
            Err(_) => return,
        };
        let started = Instant::now();
        let refs: Vec<&[f32]> = job.clips.iter().map(|c| c.as_slice()).collect();
        let r = t.transcribe_batch(&refs).map(|v| (v, started.elapsed())).map_err(|e| e.to_string());
        let _ = job.reply.send(r);
    }
}

/// Messages the stage takes.
pub enum SttMsg {
    /// New speech may be durable.
    Poll,
}

/// What the stage needs.
pub struct SttStageArgs {
    pub log: Log,
    pub pool: Arc<SttPool>,
    pub progress: Arc<Progress>,
    /// Most segments sent to the workers at once (across calls).
    pub max_batch: usize,
    /// The speech partitions this instance works on (`None`: all; in a cluster, its claims).
    pub partitions: Option<Vec<u32>>,
    /// The node's clock (for the transcript delay metric only; no decision reads it).
    pub clock: Arc<dyn Clock>,
}

/// The stage's state.
pub struct SttState {
    log: Log,
    pool: Arc<SttPool>,
    progress: Arc<Progress>,
    max_batch: usize,
    next: Vec<u64>,
    watcher: tokio::task::JoinHandle<()>,
    recent: RecentIds,
    clock: Arc<dyn Clock>,
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

/// The STT stage actor.
pub struct SttStage;

impl Actor for SttStage {
    type Msg = SttMsg;
    type State = SttState;
    type Arguments = SttStageArgs;

    async fn pre_start(&self, myself: ActorRef<SttMsg>, args: SttStageArgs) -> Result<SttState, ActorProcessingErr> {
        let next =
            crate::progress::starting_points(args.log.cursor(CURSOR, topics::SPEECH)?, args.partitions.as_deref());
        for (p, n) in next.iter().enumerate() {
            args.progress.set(p as u32, *n);
        }
        let watcher = crate::progress::wake_on_append(&args.log, topics::SPEECH, myself.clone(), || SttMsg::Poll)?;
        myself.cast(SttMsg::Poll)?;
        Ok(SttState {
            log: args.log,
            pool: args.pool,
            progress: args.progress,
            max_batch: args.max_batch.max(1),
            next,
            watcher,
            recent: RecentIds { set: HashSet::new(), order: VecDeque::new(), cap: 4096 },
            clock: args.clock,
        })
    }

    async fn post_stop(&self, _: ActorRef<SttMsg>, s: &mut SttState) -> Result<(), ActorProcessingErr> {
        s.watcher.abort();
        let _ = s.log.sync().await;
        Ok(())
    }

    async fn handle(&self, myself: ActorRef<SttMsg>, msg: SttMsg, s: &mut SttState) -> Result<(), ActorProcessingErr> {
        match msg {
            SttMsg::Poll => {
                if poll(s).await? {
                    myself.cast(SttMsg::Poll)?;
                }
                crate::progress::report_lag(&s.log, "stt", topics::SPEECH, &s.next);
            }
        }
        Ok(())
    }
}

struct Pending {
    env: Envelope,
    clip: Vec<f32>,
}

/// Reads a batch of segments from every partition, transcribes them, appends the transcripts.
async fn poll(s: &mut SttState) -> Result<bool, StorageError> {
    let partitions = s.next.len();
    let ours = s.next.iter().filter(|n| **n != crate::progress::NOT_OURS).count();
    let per_partition = s.max_batch.div_ceil(ours.max(1)).max(1);
    let mut pending: Vec<Pending> = Vec::new();
    let mut new_next = s.next.clone();
    let mut more = false;
    let mut records: Vec<Record> = Vec::new();
    let mut ended: Vec<Envelope> = Vec::new();
    for p in 0..partitions {
        if s.next[p] == crate::progress::NOT_OURS {
            continue;
        }
        records.clear();
        new_next[p] = s.log.read(topics::SPEECH, p as u32, s.next[p], per_partition, &mut records)?;
        more |= records.len() == per_partition;
        for r in &records {
            let env = match voxgate_protocol::decode(r.payload()) {
                Ok(e) => e,
                Err(e) => {
                    metrics::counter!("twilio_stt_errors_total", "error_type" => "undecodable_record").increment(1);
                    tracing::error!(stage = "stt", partition = p, offset = r.offset, error = %e, "speech record cannot be decoded; skipped");
                    continue;
                }
            };
            if let Event::SpeechEnded(e) = &env.payload {
                // Passed on after this batch's transcripts: the track's last one is in before it.
                let id = EventId::derive(id_kind::TRANSCRIPTS_ENDED, &[e.stream_sid.as_u128(), e.track as u128]);
                ended.push(Envelope { event_id: id, ..env.clone() });
                continue;
            }
            let Event::SpeechSegment(seg) = &env.payload else { continue };
            if !s.recent.insert(env.event_id) {
                continue;
            }
            let clip =
                seg.pcm16le.chunks_exact(2).map(|b| f32::from(i16::from_le_bytes([b[0], b[1]])) / 32768.0).collect();
            pending.push(Pending { env, clip });
        }
    }
    if pending.is_empty() {
        append_ended(s, &ended).await?;
        if new_next != s.next {
            commit(s, &new_next).await?;
        }
        return Ok(more);
    }

    // Split across the workers; each batch goes through the encoder together.
    let workers = s.pool.workers().min(pending.len()).max(1);
    let chunk = pending.len().div_ceil(workers);
    let mut clips: Vec<Vec<f32>> = pending.iter_mut().map(|p| std::mem::take(&mut p.clip)).collect();
    let mut jobs = Vec::new();
    while !clips.is_empty() {
        let rest = clips.split_off(chunk.min(clips.len()));
        let batch = std::mem::replace(&mut clips, rest);
        let n = batch.len();
        let pool = s.pool.clone();
        jobs.push((n, tokio::spawn(async move { pool.transcribe(batch).await })));
    }
    let mut results: Vec<Option<(Transcription, u32)>> = Vec::with_capacity(pending.len());
    for (n, job) in jobs {
        let outcome = match job.await {
            Ok(r) => r,
            Err(e) => Err(e.to_string()),
        };
        match outcome {
            Ok((ts, took)) => {
                let share = (took.as_millis() as u64 / n.max(1) as u64) as u32;
                results.extend(ts.into_iter().map(|t| Some((t, share))));
            }
            Err(why) => {
                metrics::counter!("twilio_stt_errors_total", "error_type" => "model").increment(n as u64);
                tracing::error!(stage = "stt", segments = n, error = %why, "transcription failed");
                results.extend((0..n).map(|_| None));
            }
        }
    }

    let model = s.pool.model_id().to_owned();
    let mut out: Vec<(u64, Vec<u8>)> = Vec::with_capacity(pending.len());
    let mut closed_at: Vec<i64> = Vec::with_capacity(pending.len());
    for (p, r) in pending.iter().zip(results) {
        let Event::SpeechSegment(seg) = &p.env.payload else { continue };
        let Some(call) = p.env.call else { continue };
        let (t, share) = match r {
            Some(x) => x,
            None => continue, // recorded as an error above; the segment stays in the speech log for replay
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
        out.push((call.partition_key(), voxgate_protocol::encode(&env)));
        closed_at.push(p.env.occurred_at.as_micros());
    }
    if !out.is_empty() {
        s.log.append_many(topics::TRANSCRIPTS, out.iter().map(|(k, b)| (*k, b.as_slice()))).await?;
        metrics::counter!("voxgate_transcripts_total").increment(out.len() as u64);
        // From the audio that closed each segment reaching voxgate (the end of speech plus the
        // VAD's hangover) to its transcript being durable.
        let now = s.clock.now().as_micros();
        let delay = metrics::histogram!("voxgate_transcript_delay_seconds");
        for at in closed_at {
            delay.record(now.saturating_sub(at).max(0) as f64 / 1e6);
        }
    }
    append_ended(s, &ended).await?;
    commit(s, &new_next).await?;
    Ok(more)
}

/// The tracks whose speech ended, on the transcripts log after their last transcript.
async fn append_ended(s: &SttState, ended: &[Envelope]) -> Result<(), StorageError> {
    if ended.is_empty() {
        return Ok(());
    }
    let out: Vec<(u64, Vec<u8>)> =
        ended.iter().filter_map(|e| e.call.map(|c| (c.partition_key(), voxgate_protocol::encode(e)))).collect();
    s.log.append_many(topics::TRANSCRIPTS, out.iter().map(|(k, b)| (*k, b.as_slice()))).await?;
    Ok(())
}

async fn commit(s: &mut SttState, next: &[u64]) -> Result<(), StorageError> {
    for (p, n) in next.iter().enumerate() {
        if *n == crate::progress::NOT_OURS {
            continue;
        }
        s.log.store_cursor(CURSOR, topics::SPEECH, p as u32, *n)?;
        s.progress.set(p as u32, *n);
    }
    s.next = next.to_vec();
    s.log.sync().await
}
