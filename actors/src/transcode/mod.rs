//! Phone audio → speech segments: the per-stream pure core.
//!
//! Pipeline, per stream ([`StreamTranscoder`]):
//! 1. mu-law bytes (8 kHz) → linear PCM through a compile-time table ([`mulaw`]);
//! 2. 8 kHz → 16 kHz through a polyphase anti-imaging FIR ([`resample::Upsampler2x`]), whose
//!    constant delay (23 input samples) is removed so 16 kHz sample `2·k` *is* stream sample `k`;
//! 3. a VAD on 20 ms frames of that 16 kHz aligned signal ([`vad`]) opens segments (with
//!    pre-roll), keeps them over pauses (hangover), drops blips (min speech) and cuts very long
//!    ones (max segment);
//! 4. each closed segment is cut out of the 16 kHz buffer as a [`Segment`].
//!
//! Time: the stream clock counts 8 kHz samples (8 per ms) from the `start_ms` of the first push.
//! Gaps in `start_ms` up to [`MAX_GAP_MS`] are filled with silence, longer gaps close any open
//! segment and restart the clock there ("resync"), and audio that overlaps what was already
//! received (or goes backwards) is dropped. Differences under 1 ms are treated as contiguous, so
//! batches of any size (not only multiples of 160 bytes) may carry a rounded `start_ms`.
//!
//! Everything is a deterministic function of the pushed bytes and times: integer filtering, a
//! VAD whose only float math is IEEE add/mul/div on exactly computed energies, no clock, no I/O,
//! no randomness. Pushing the same audio in any batch split gives identical segments.
//!
//! Cost: after warm-up nothing is allocated per frame (scratch buffers are reused, the 16 kHz
//! buffer is trimmed lazily, amortised O(1) copy); each emitted segment allocates its `pcm16`.

pub mod endpoint;
pub mod mulaw;
pub mod resample;
pub mod stage;
pub mod synth;
pub mod vad;

mod cmath;
#[cfg(test)]
mod tests;

use serde::{Deserialize, Serialize};

pub use endpoint::EndpointWatch;
pub use resample::{Upsampler2x, DELAY_SAMPLES_16K, DELAY_SAMPLES_8K};
pub use vad::{Mark, Vad, VadConfig, SAMPLES_PER_MS};

/// Configuration errors.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TranscodeError {
    #[error("invalid transcode config: {field}: {message}")]
    InvalidConfig { field: &'static str, message: String },
}

/// Per-stream transcoding configuration (a `[transcode]` TOML table).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TranscodeConfig {
    pub vad: VadConfig,
}

impl TranscodeConfig {
    pub fn validate(&self) -> Result<(), TranscodeError> {
        self.vad.validate()
    }
}

/// One stretch of speech, ready for recognition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Segment {
    /// 0, 1, 2, … per stream.
    pub index: u32,
    /// Stream time of the first sample (pre-roll included), ms.
    pub start_ms: u64,
    /// Stream time just past the last sample (hangover included), ms.
    pub end_ms: u64,
    /// 16 kHz mono PCM of exactly `[start_ms, end_ms)`: `16 * (end_ms - start_ms)` samples.
    pub pcm16: Vec<i16>,
}

impl Segment {
    pub fn duration_ms(&self) -> u64 {
        self.end_ms - self.start_ms
    }
}

/// A piece of a segment still open (see [`VadConfig::progress`]): its pieces, in order, are
/// its audio so far; a segment that closes at a pause has exactly the audio of its pieces up to
/// that pause's.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Piece {
    /// The index the segment will have.
    pub index: u32,
    /// The segment's first sample (ms).
    pub start_ms: u64,
    /// This piece: `[from_ms, end_ms)`.
    pub from_ms: u64,
    pub end_ms: u64,
    pub paused: bool,
    /// 16 kHz mono PCM of `[from_ms, end_ms)`.
    pub pcm16: Vec<i16>,
}

/// Gaps in `start_ms` up to this long are filled with silence; longer ones resync.
pub const MAX_GAP_MS: u64 = 2_000;
/// `start_ms` values above this are clamped (keeps sample positions far from `u64::MAX`).
pub const MAX_START_MS: u64 = 1 << 56;

const MAX_GAP: u64 = MAX_GAP_MS * SAMPLES_PER_MS;
/// Time differences below one ms are rounding, not gaps or overlaps.
const JITTER: u64 = SAMPLES_PER_MS;

/// How audio starting at stream position `at` (8 kHz samples) follows the audio before it,
/// `next` being the position just past that (`None`: nothing yet). The one reading of stream
/// time, shared by the transcoder and the ingress's [`EndpointWatch`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Placement {
    /// A new run starts here: the first audio, or (`resync`) after a gap over [`MAX_GAP_MS`].
    NewRun { resync: bool },
    /// It follows on (differences under 1 ms are rounding).
    Contiguous,
    /// It comes after a gap of this many samples, heard as silence.
    Gap(u64),
    /// Its first this many samples were heard already: they are dropped.
    Overlap(u64),
}

pub(crate) fn place(next: Option<u64>, at: u64) -> Placement {
    match next {
        None => Placement::NewRun { resync: false },
        Some(n) if at >= n + JITTER && at - n <= MAX_GAP => Placement::Gap(at - n),
        Some(n) if at >= n + JITTER => Placement::NewRun { resync: true },
        Some(n) if at + JITTER <= n => Placement::Overlap(n - at),
        Some(_) => Placement::Contiguous,
    }
}
/// Input processed per internal step (bounds the scratch buffers).
const CHUNK: usize = 4_096;
/// Dead 16 kHz samples tolerated at the front of the buffer before trimming.
const TRIM_MIN: usize = 16_384;

/// The per-stream transcoder: mu-law in, 16 kHz speech segments out.
#[derive(Debug, Clone)]
pub struct StreamTranscoder {
    vad: Vad,
    frame_len: u64,
    up: Upsampler2x,
    /// Decoded 8 kHz scratch.
    dec: Vec<i16>,
    /// Aligned 16 kHz audio; `buf16[2·i]` is stream sample `buf_start + i`.
    buf16: Vec<i16>,
    buf_start: u64,
    /// Filter outputs still to discard at the start of a run (they precede it).
    skip16: usize,
    started: bool,
    /// Stream position (8 kHz samples) of the next input sample.
    t_next: u64,
    /// Start of the next VAD frame.
    frame_pos: u64,
    /// Span of recent gap fill, `[lo, hi)`.
    fill: Option<(u64, u64)>,
    spans: Vec<vad::Span>,
    marks: Vec<Mark>,
    /// The open segment's start and where its last piece ended.
    piece: Option<(u64, u64)>,
    progress: Vec<Piece>,
    next_index: u32,
    samples_in: u64,
    samples_filled: u64,
    samples_dropped: u64,
    resyncs: u64,
}

impl StreamTranscoder {
    /// A transcoder for one stream. An invalid config is sanitised (see
    /// [`VadConfig::sanitized`]); use [`try_new`](Self::try_new) to reject it instead.
    pub fn new(cfg: &TranscodeConfig) -> Self {
        let vad = Vad::new(&cfg.vad);
        Self {
            frame_len: vad.frame_len(),
            vad,
            up: Upsampler2x::new(),
            dec: Vec::with_capacity(CHUNK),
            buf16: Vec::new(),
            buf_start: 0,
            skip16: DELAY_SAMPLES_16K,
            started: false,
            t_next: 0,
            frame_pos: 0,
            fill: None,
            spans: Vec::new(),
            marks: Vec::new(),
            piece: None,
            progress: Vec::new(),
            next_index: 0,
            samples_in: 0,
            samples_filled: 0,
            samples_dropped: 0,
            resyncs: 0,
        }
    }

    /// Like [`new`](Self::new), but an invalid config is an error.
    pub fn try_new(cfg: &TranscodeConfig) -> Result<Self, TranscodeError> {
        cfg.validate()?;
        Ok(Self::new(cfg))
    }

    /// Feeds mu-law 8 kHz audio whose first sample is at stream time `start_ms`; any finished
    /// segments are pushed to `out`.
    pub fn push(&mut self, start_ms: u64, mulaw: &[u8], out: &mut Vec<Segment>) {
        self.samples_in += mulaw.len() as u64;
        if mulaw.is_empty() {
            return;
        }
        let at = start_ms.min(MAX_START_MS) * SAMPLES_PER_MS;
        let mut data = mulaw;
        match place(self.started.then_some(self.t_next), at) {
            Placement::NewRun { resync } => {
                if resync {
                    self.flush_run(out);
                    self.resyncs += 1;
                }
                self.start_run(at);
            }
            Placement::Gap(gap) => self.feed_silence(gap, out),
            Placement::Overlap(heard) => {
                let skip = heard.min(data.len() as u64) as usize;
                self.samples_dropped += skip as u64;
                data = &data[skip..];
            }
            Placement::Contiguous => {}
        }
        while !data.is_empty() {
            let n = data.len().min(CHUNK);
            self.dec.clear();
            mulaw::decode_into(&data[..n], &mut self.dec);
            self.advance(n as u64, out);
            data = &data[n..];
        }
    }

    /// End of stream: flushes an open segment (if long enough). A later `push` starts afresh
    /// (as after a resync: indexes continue, the noise floor is kept).
    pub fn finish(&mut self, out: &mut Vec<Segment>) {
        self.flush_run(out);
        self.buf16.clear();
    }

    /// Moves the pieces of open segments cut since the last call to `into`, in order. A piece
    /// of segment `i` comes after segment `i − 1` and before segment `i` (order them by index,
    /// pieces first, to interleave them with the segments of the same pushes).
    pub fn take_progress(&mut self, into: &mut Vec<Piece>) {
        into.append(&mut self.progress);
    }

    /// mu-law samples received (including dropped overlaps), for metrics.
    pub fn samples_in(&self) -> u64 {
        self.samples_in
    }

    /// Silent samples inserted for gaps.
    pub fn samples_filled(&self) -> u64 {
        self.samples_filled
    }

    /// Received samples dropped as overlapping or late.
    pub fn samples_dropped(&self) -> u64 {
        self.samples_dropped
    }

    /// Gaps too long to fill (each closed the open segment and restarted the clock).
    pub fn resyncs(&self) -> u64 {
        self.resyncs
    }

    /// Segments emitted so far (= the next index).
    pub fn segments_emitted(&self) -> u32 {
        self.next_index
    }

    /// Whether a segment is open.
    pub fn in_segment(&self) -> bool {
        self.vad.is_active()
    }

    /// Current VAD noise floor (dBFS), for diagnostics.
    pub fn noise_floor_dbfs(&self) -> f64 {
        self.vad.noise_floor_dbfs()
    }

    fn start_run(&mut self, at: u64) {
        self.started = true;
        self.up.reset();
        self.skip16 = DELAY_SAMPLES_16K;
        self.buf16.clear();
        self.buf_start = at;
        self.t_next = at;
        self.frame_pos = at;
        self.fill = None;
        self.vad.start_run(at);
    }

    /// Ends the current run: drains the filter (its delay) and closes any open segment at the
    /// last received sample.
    fn flush_run(&mut self, out: &mut Vec<Segment>) {
        if !self.started {
            return;
        }
        self.started = false;
        self.dec.clear();
        self.dec.resize(DELAY_SAMPLES_8K, 0);
        self.upsample_dec();
        debug_assert_eq!(self.aligned_end(), self.t_next);
        self.run_vad(out);
        self.vad.flush(self.t_next, &mut self.spans);
        self.emit_spans(out);
    }

    fn feed_silence(&mut self, n: u64, out: &mut Vec<Segment>) {
        self.samples_filled += n;
        let (lo, hi) = (self.t_next, self.t_next + n);
        self.fill = match self.fill {
            Some((flo, fhi)) if fhi > self.frame_pos => Some((flo, hi)),
            _ => Some((lo, hi)),
        };
        let mut left = n;
        while left > 0 {
            let k = left.min(CHUNK as u64) as usize;
            self.dec.clear();
            self.dec.resize(k, 0);
            self.advance(k as u64, out);
            left -= k as u64;
        }
    }

    /// Takes the `n` samples in `dec` as the next input: upsample, advance the clock, run the
    /// VAD over the newly aligned frames, trim the buffer.
    fn advance(&mut self, n: u64, out: &mut Vec<Segment>) {
        self.upsample_dec();
        self.t_next += n;
        self.run_vad(out);
        self.trim();
    }

    fn upsample_dec(&mut self) {
        let old = self.buf16.len();
        self.up.process(&self.dec, &mut self.buf16);
        if self.skip16 > 0 {
            let k = self.skip16.min(self.buf16.len() - old);
            self.buf16.drain(old..old + k);
            self.skip16 -= k;
        }
    }

    /// Stream position just past the last aligned 16 kHz sample pair.
    fn aligned_end(&self) -> u64 {
        self.buf_start + (self.buf16.len() / 2) as u64
    }

    fn run_vad(&mut self, out: &mut Vec<Segment>) {
        let end = self.aligned_end();
        let len16 = (self.frame_len * 2) as usize;
        while self.frame_pos + self.frame_len <= end {
            let off = ((self.frame_pos - self.buf_start) * 2) as usize;
            let energy = vad::frame_energy(&self.buf16[off..off + len16]);
            let frame_end = self.frame_pos + self.frame_len;
            let filled = matches!(self.fill, Some((lo, hi)) if lo < frame_end && hi > self.frame_pos);
            self.vad.frame(self.frame_pos, energy, !filled, &mut self.spans);
            self.frame_pos = frame_end;
            if !self.spans.is_empty() {
                self.emit_spans(out);
            }
            self.vad.take_marks(&mut self.marks);
            if !self.marks.is_empty() {
                self.emit_marks();
            }
        }
    }

    fn emit_marks(&mut self) {
        let end = self.aligned_end();
        for m in self.marks.drain(..) {
            let from = match self.piece {
                Some((start, upto)) if start == m.seg_start => upto,
                _ => m.seg_start,
            };
            debug_assert!(from >= self.buf_start && m.upto <= end, "{m:?}");
            let (s, e) = (from.max(self.buf_start), m.upto.min(end));
            if e <= s {
                continue;
            }
            let a = ((s - self.buf_start) * 2) as usize;
            let b = ((e - self.buf_start) * 2) as usize;
            self.progress.push(Piece {
                index: self.next_index,
                start_ms: m.seg_start / SAMPLES_PER_MS,
                from_ms: s / SAMPLES_PER_MS,
                end_ms: e / SAMPLES_PER_MS,
                paused: m.paused,
                pcm16: self.buf16[a..b].to_vec(),
            });
            self.piece = Some((m.seg_start, e));
        }
    }

    fn emit_spans(&mut self, out: &mut Vec<Segment>) {
        let end = self.aligned_end();
        for span in self.spans.drain(..) {
            debug_assert!(span.start >= self.buf_start && span.end <= end, "{span:?}");
            debug_assert!(span.start % SAMPLES_PER_MS == 0 && span.end % SAMPLES_PER_MS == 0);
            let s = span.start.max(self.buf_start);
            let e = span.end.min(end);
            if e <= s {
                continue;
            }
            let a = ((s - self.buf_start) * 2) as usize;
            let b = ((e - self.buf_start) * 2) as usize;
            out.push(Segment {
                index: self.next_index,
                start_ms: s / SAMPLES_PER_MS,
                end_ms: e / SAMPLES_PER_MS,
                pcm16: self.buf16[a..b].to_vec(),
            });
            self.next_index = self.next_index.wrapping_add(1);
        }
    }

    /// Drops audio no future segment can include, once there is enough of it to be worth the
    /// copy (amortised: the kept part is never larger than the dropped part).
    fn trim(&mut self) {
        let keep = self.vad.retain_from(self.frame_pos).clamp(self.buf_start, self.aligned_end());
        let dead = ((keep - self.buf_start) * 2) as usize;
        if dead >= TRIM_MIN && dead >= self.buf16.len() - dead {
            self.buf16.drain(..dead);
            self.buf_start = keep;
        }
    }
}
