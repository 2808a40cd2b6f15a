//! Energy voice-activity detector with an adaptive noise floor, onset debounce, hangover,
//! pre-roll, minimum length and a forced cut.
//!
//! The detector is fed one frame at a time ([`VadConfig::frame_ms`], 20 ms by default) with the
//! frame's mean-square energy; [`StreamTranscoder`](super::StreamTranscoder) computes it on the
//! 16 kHz upsampled, filter-aligned signal (320 samples per 20 ms frame, band-limited to
//! 3.75 kHz) — the very samples that end up in the segments. Positions are counted in 8 kHz
//! samples of stream time (8 per ms), so every boundary the detector produces is a whole ms.
//!
//! Energy is in "dBFS" relative to a full-scale square wave (mean square 32768²): a full-scale
//! sine is −3 dBFS.
//!
//! A frame is speech when its energy is above `min_energy_dbfs` **and** more than
//! `threshold_db` above the noise floor. The noise floor follows the minimum frame energy: it
//! drops at once to any quieter frame, and otherwise rises by [`NOISE_FLOOR_RISE_DB_PER_S`]
//! (5 dB/s) towards the current energy. It never goes below `min_energy_dbfs − threshold_db`
//! (lower would not change any decision but would make it slower to adapt) and starts at the
//! energy of the first frame of the stream. Consequences:
//! * steady noise present from the start of a stream is the floor from the first frame on, so it
//!   is never speech;
//! * a step of steady noise to a level `L` dB above the current floor is speech only until the
//!   floor has risen to within `threshold_db` of it: `(L − threshold_db) / 5` seconds. With the
//!   default config, −30 dBFS noise appearing after digital silence (floor at −62 dBFS) is
//!   absorbed after (32 − 12) / 5 = 4 s, plus about 1 s for the spread of frame energies;
//! * speech survives as long as its pauses reach within `threshold_db` of the noise: speech
//!   20 dB above the floor can run 1.6 s without any dip before the floor catches up (natural
//!   speech dips between words and syllables far more often).
//!
//! Frames that contain gap fill (audio missing from the stream) do not move the floor.

use serde::{Deserialize, Serialize};

use super::cmath;
use super::TranscodeError;

/// How fast the noise floor may rise, in dB per second (it falls instantly).
pub const NOISE_FLOOR_RISE_DB_PER_S: f64 = 5.0;

/// Samples per millisecond of the stream clock (8 kHz).
pub const SAMPLES_PER_MS: u64 = 8;

/// VAD tuning. All durations are in milliseconds of stream time.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct VadConfig {
    /// Analysis frame length (5..=100 ms; 20 by default).
    pub frame_ms: u32,
    /// Energy above the adaptive noise floor that counts as speech (dB, 1..=60; 12 by default).
    pub threshold_db: f32,
    /// Absolute floor below which nothing is speech (dBFS, −120..=0; −50 by default).
    pub min_energy_dbfs: f32,
    /// Consecutive speech frames that open a segment (1..=100; 3 by default).
    pub start_frames: u32,
    /// Silence after the last speech frame that ends a segment (0..=10 000; 300 by default).
    pub hangover_ms: u32,
    /// Audio a segment keeps after its last speech frame (0..=`hangover_ms`; 120 by default):
    /// the segment ends there, though its end is decided only after the hangover.
    pub tail_ms: u32,
    /// With `progress` on, silence after the last speech frame that counts as a pause
    /// (0..=`hangover_ms`, at least `tail_ms` in effect; 120 by default): the segment so far, up to `tail_ms` after the
    /// speech, goes to STT at once (a speculative final), and the segment, if the pause lasts
    /// the hangover, has exactly that audio. Shorter pauses, common inside a sentence, are not
    /// decoded in vain.
    pub pause_ms: u32,
    /// Hand the open segment's audio to STT while it is open: at pauses (see `pause_ms`), when
    /// speech resumes after one, and every `progress_ms` of speech (partial results). On by
    /// default: measured with bench_stt (with the 300 ms hangover), end of speech → final p50 /
    /// p95 369 / 450 ms at 1 call, 430 / 669 at 8, 623 / 1,167 at 12, against 638 / 748,
    /// 656 / 873 and 855 / 1,141 with it off and the 400 ms hangover, at the same word error rate.
    pub progress: bool,
    /// Interval of the pieces of an open segment (100..=10 000; 500 by default).
    pub progress_ms: u32,
    /// Audio kept before the first speech frame (0..=5 000; 200 by default).
    pub pre_roll_ms: u32,
    /// Segments whose speech (first to last speech frame) is shorter are dropped (200 by default).
    pub min_speech_ms: u32,
    /// Longer segments are cut here and continue in the next segment (1 000..=3 600 000; 15 000).
    pub max_segment_ms: u32,
}

impl Default for VadConfig {
    fn default() -> Self {
        Self {
            frame_ms: 20,
            threshold_db: 12.0,
            min_energy_dbfs: -50.0,
            start_frames: 3,
            hangover_ms: 300,
            tail_ms: 120,
            pause_ms: 120,
            progress: true,
            progress_ms: 500,
            pre_roll_ms: 200,
            min_speech_ms: 200,
            max_segment_ms: 15_000,
        }
    }
}

const FRAME_MS: (u32, u32) = (5, 100);
const THRESHOLD_DB: (f32, f32) = (1.0, 60.0);
const MIN_ENERGY_DBFS: (f32, f32) = (-120.0, 0.0);
const START_FRAMES: (u32, u32) = (1, 100);
const HANGOVER_MS: (u32, u32) = (0, 10_000);
const PRE_ROLL_MS: (u32, u32) = (0, 5_000);
const PROGRESS_MS: (u32, u32) = (100, 10_000);
const MAX_SEGMENT_MS: (u32, u32) = (1_000, 3_600_000);

fn bad(field: &'static str, message: String) -> TranscodeError {
    TranscodeError::InvalidConfig { field, message }
}

fn check_u32(field: &'static str, v: u32, (lo, hi): (u32, u32)) -> Result<(), TranscodeError> {
    if v < lo || v > hi {
        return Err(bad(field, format!("{v} is outside {lo}..={hi}")));
    }
    Ok(())
}

fn check_f32(field: &'static str, v: f32, (lo, hi): (f32, f32)) -> Result<(), TranscodeError> {
    if !v.is_finite() || v < lo || v > hi {
        return Err(bad(field, format!("{v} is outside {lo}..={hi}")));
    }
    Ok(())
}

impl VadConfig {
    /// Checks every field's range and their consistency.
    pub fn validate(&self) -> Result<(), TranscodeError> {
        check_u32("frame_ms", self.frame_ms, FRAME_MS)?;
        check_f32("threshold_db", self.threshold_db, THRESHOLD_DB)?;
        check_f32("min_energy_dbfs", self.min_energy_dbfs, MIN_ENERGY_DBFS)?;
        check_u32("start_frames", self.start_frames, START_FRAMES)?;
        check_u32("hangover_ms", self.hangover_ms, HANGOVER_MS)?;
        check_u32("tail_ms", self.tail_ms, (0, self.hangover_ms))?;
        check_u32("pause_ms", self.pause_ms, (0, self.hangover_ms))?;
        check_u32("progress_ms", self.progress_ms, PROGRESS_MS)?;
        check_u32("pre_roll_ms", self.pre_roll_ms, PRE_ROLL_MS)?;
        check_u32("max_segment_ms", self.max_segment_ms, MAX_SEGMENT_MS)?;
        if self.min_speech_ms > self.max_segment_ms {
            return Err(bad(
                "min_speech_ms",
                format!("{} exceeds max_segment_ms {}", self.min_speech_ms, self.max_segment_ms),
            ));
        }
        let opening = self.pre_roll_ms as u64 + (self.start_frames as u64 + 1) * self.frame_ms as u64;
        if self.max_segment_ms as u64 <= opening {
            return Err(bad(
                "max_segment_ms",
                format!("{} must exceed pre_roll_ms + (start_frames + 1) * frame_ms = {opening}", self.max_segment_ms),
            ));
        }
        Ok(())
    }

    /// The nearest valid config (NaN becomes the default). `validate()` of the result is `Ok`.
    pub fn sanitized(&self) -> VadConfig {
        let d = VadConfig::default();
        let u = |v: u32, (lo, hi): (u32, u32)| v.clamp(lo, hi);
        let f = |v: f32, dv: f32, (lo, hi): (f32, f32)| if v.is_nan() { dv } else { v.clamp(lo, hi) };
        let mut c = VadConfig {
            frame_ms: u(self.frame_ms, FRAME_MS),
            threshold_db: f(self.threshold_db, d.threshold_db, THRESHOLD_DB),
            min_energy_dbfs: f(self.min_energy_dbfs, d.min_energy_dbfs, MIN_ENERGY_DBFS),
            start_frames: u(self.start_frames, START_FRAMES),
            hangover_ms: u(self.hangover_ms, HANGOVER_MS),
            tail_ms: self.tail_ms.min(u(self.hangover_ms, HANGOVER_MS)),
            pause_ms: self
                .pause_ms
                .clamp(self.tail_ms.min(u(self.hangover_ms, HANGOVER_MS)), u(self.hangover_ms, HANGOVER_MS)),
            progress: self.progress,
            progress_ms: u(self.progress_ms, PROGRESS_MS),
            pre_roll_ms: u(self.pre_roll_ms, PRE_ROLL_MS),
            min_speech_ms: self.min_speech_ms,
            max_segment_ms: u(self.max_segment_ms, MAX_SEGMENT_MS),
        };
        let opening = c.pre_roll_ms + (c.start_frames + 1) * c.frame_ms;
        c.max_segment_ms = c.max_segment_ms.max(opening + 1);
        c.min_speech_ms = c.min_speech_ms.min(c.max_segment_ms);
        c
    }

    /// Samples (8 kHz) per analysis frame.
    pub fn frame_samples(&self) -> u64 {
        self.frame_ms as u64 * SAMPLES_PER_MS
    }
}

/// A closed segment, in 8 kHz samples of stream time: `[start, end)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Span {
    pub start: u64,
    pub end: u64,
}

/// A point in an open segment where its audio so far goes to STT: `[seg_start, upto)` is the
/// segment's audio up to here (in 8 kHz samples of stream time).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Mark {
    pub seg_start: u64,
    pub upto: u64,
    /// The speaker paused: if the pause lasts the hangover, the segment ends at `upto`.
    pub paused: bool,
}

/// Frame mean-square energy of 16-bit samples, normalised to full scale (1.0 = 0 dBFS).
pub fn frame_energy(samples: &[i16]) -> f64 {
    if samples.is_empty() {
        return 0.0;
    }
    let sum: i64 = samples.iter().map(|&s| s as i64 * s as i64).sum();
    sum as f64 / (samples.len() as f64 * 32_768.0 * 32_768.0)
}

/// Energy (1.0 = 0 dBFS) → dBFS, for diagnostics (not used in decisions).
pub fn energy_dbfs(energy: f64) -> f64 {
    10.0 * energy.max(1e-20).log10()
}

/// The detector's state machine. Pure: a function of the frames fed to it.
#[derive(Debug, Clone)]
pub struct Vad {
    frame_len: u64,
    start_frames: u32,
    hangover: u64,
    tail: u64,
    pause: u64,
    progress_every: Option<u64>,
    pre_roll: u64,
    min_speech: u64,
    max_segment: u64,
    threshold: f64,
    abs_min: f64,
    floor_min: f64,
    rise: f64,

    floor: f64,
    has_floor: bool,
    /// Segments never start before this (start of the current run of contiguous audio).
    min_start: u64,
    run_len: u32,
    run_start: u64,
    active: bool,
    /// The open segment is the continuation of a cut one.
    continued: bool,
    seg_start: u64,
    onset: u64,
    last_speech_end: u64,
    /// Where the open segment's last mark was.
    last_mark: u64,
    /// The current pause was marked.
    paused_marked: bool,
    /// A pause was marked and speech came back: mark the segment at once, so the decode made at
    /// the pause can be given up.
    resumed: bool,
    marks: Vec<Mark>,
}

impl Vad {
    /// A detector for `cfg` (sanitised first, so any config works).
    pub fn new(cfg: &VadConfig) -> Self {
        let c = cfg.sanitized();
        let ms = SAMPLES_PER_MS;
        let threshold = cmath::db_to_power(c.threshold_db as f64);
        let abs_min = cmath::db_to_power(c.min_energy_dbfs as f64);
        Self {
            frame_len: c.frame_samples(),
            start_frames: c.start_frames,
            hangover: c.hangover_ms as u64 * ms,
            tail: c.tail_ms as u64 * ms,
            pause: c.pause_ms as u64 * ms,
            progress_every: c.progress.then_some(c.progress_ms as u64 * ms),
            pre_roll: c.pre_roll_ms as u64 * ms,
            min_speech: c.min_speech_ms as u64 * ms,
            max_segment: c.max_segment_ms as u64 * ms,
            threshold,
            abs_min,
            floor_min: abs_min / threshold,
            rise: cmath::db_to_power(NOISE_FLOOR_RISE_DB_PER_S * c.frame_ms as f64 / 1_000.0),
            floor: abs_min / threshold,
            has_floor: false,
            min_start: 0,
            run_len: 0,
            run_start: 0,
            active: false,
            continued: false,
            seg_start: 0,
            onset: 0,
            last_speech_end: 0,
            last_mark: 0,
            paused_marked: false,
            resumed: false,
            marks: Vec::new(),
        }
    }

    /// Moves the marks made since the last call to `into` (none unless `progress` is on).
    pub fn take_marks(&mut self, into: &mut Vec<Mark>) {
        into.append(&mut self.marks);
    }

    /// Samples per frame.
    pub fn frame_len(&self) -> u64 {
        self.frame_len
    }

    /// Starts a run of contiguous audio at `pos` (no segment may start before it). Closes
    /// nothing: call [`flush`](Self::flush) first. The noise floor is kept.
    pub fn start_run(&mut self, pos: u64) {
        self.min_start = pos;
        self.run_len = 0;
        self.active = false;
        self.continued = false;
    }

    /// Whether a segment is open.
    pub fn is_active(&self) -> bool {
        self.active
    }

    /// Current noise floor in dBFS (diagnostics).
    pub fn noise_floor_dbfs(&self) -> f64 {
        energy_dbfs(self.floor)
    }

    /// Oldest position a future segment can still include, given the next frame starts at
    /// `next_frame`: audio before it may be discarded.
    pub fn retain_from(&self, next_frame: u64) -> u64 {
        if self.active {
            return self.seg_start;
        }
        let from = if self.run_len > 0 { self.run_start } else { next_frame };
        from.saturating_sub(self.pre_roll).max(self.min_start)
    }

    /// Feeds the frame `[pos, pos + frame_len)` with mean-square `energy` (1.0 = 0 dBFS).
    /// `update_floor = false` (frames with gap fill) leaves the noise floor alone. Finished
    /// segments are pushed to `out`. Returns whether the frame was speech.
    pub fn frame(&mut self, pos: u64, energy: f64, update_floor: bool, out: &mut Vec<Span>) -> bool {
        let end = pos + self.frame_len;
        if update_floor && !self.has_floor {
            self.floor = energy.max(self.floor_min);
            self.has_floor = true;
        }
        let speech = energy > self.abs_min && energy > self.floor * self.threshold;
        if update_floor {
            self.floor =
                if energy < self.floor { energy.max(self.floor_min) } else { energy.min(self.floor * self.rise) };
        }

        if self.active {
            if speech {
                self.last_speech_end = end;
                self.resumed |= self.paused_marked;
                self.paused_marked = false;
            }
            self.advance(end, false, out);
            if self.active {
                self.mark(end, speech);
            }
        } else if speech {
            if self.run_len == 0 {
                self.run_start = pos;
            }
            self.run_len += 1;
            if self.run_len >= self.start_frames {
                self.run_len = 0;
                self.active = true;
                self.continued = false;
                self.onset = self.run_start;
                self.seg_start = self.run_start.saturating_sub(self.pre_roll).max(self.min_start);
                self.last_speech_end = end;
                self.last_mark = self.seg_start;
                self.paused_marked = false;
                self.resumed = false;
                self.advance(end, false, out);
                if self.active {
                    self.mark(end, true);
                }
            }
        } else {
            self.run_len = 0;
        }
        speech
    }

    /// End of the run of audio at `pos` (end of stream, or before a resync): closes an open
    /// segment at `min(pos, last speech + hangover)`, rounded down to a whole ms, if it has
    /// enough speech. Resets the onset state; keeps the noise floor.
    pub fn flush(&mut self, pos: u64, out: &mut Vec<Span>) {
        self.advance(pos, true, out);
        self.active = false;
        self.run_len = 0;
    }

    /// Closes and/or cuts the open segment as of position `now`.
    fn advance(&mut self, now: u64, forced: bool, out: &mut Vec<Span>) {
        while self.active {
            let hang_end = self.last_speech_end.saturating_add(self.hangover);
            let tail_end = self.last_speech_end.saturating_add(self.tail);
            let close_at = if forced {
                let c = now.min(tail_end);
                Some(c - c % SAMPLES_PER_MS)
            } else if now >= hang_end {
                Some(tail_end)
            } else {
                None
            };
            let cut_at = self.seg_start.saturating_add(self.max_segment);
            match close_at {
                Some(c) if c <= cut_at => {
                    self.close(c, out);
                    self.active = false;
                    self.run_len = 0;
                }
                _ if now >= cut_at => {
                    self.close(cut_at, out);
                    self.seg_start = cut_at;
                    self.onset = self.onset.max(cut_at);
                    self.continued = true;
                }
                _ => break,
            }
        }
    }

    /// Whether the open segment, closed at `end`, would be kept.
    fn would_keep(&self, end: u64) -> bool {
        let speech = self.last_speech_end.min(end).saturating_sub(self.onset);
        // A continuation of a cut segment is kept if it has any speech at all.
        if self.continued {
            speech > 0
        } else {
            speech >= self.min_speech
        }
    }

    /// Marks the open segment at a pause (once per pause), when speech resumes after a marked
    /// pause, or every `progress_every` of audio, when it would be kept if it closed there.
    fn mark(&mut self, now: u64, speech: bool) {
        let Some(every) = self.progress_every else { return };
        if self.last_mark < self.seg_start {
            self.last_mark = self.seg_start; // cut: a new segment
            self.resumed = false;
        }
        if speech && std::mem::take(&mut self.resumed) && now > self.last_mark && self.would_keep(now) {
            self.marks.push(Mark { seg_start: self.seg_start, upto: now, paused: false });
            self.last_mark = now;
            return;
        }
        let tail_end = self.last_speech_end.saturating_add(self.tail);
        let pause_end = self.last_speech_end.saturating_add(self.pause);
        if !speech && !self.paused_marked && now >= pause_end && self.pause < self.hangover {
            self.paused_marked = true;
            if tail_end > self.last_mark && self.would_keep(tail_end) {
                self.marks.push(Mark { seg_start: self.seg_start, upto: tail_end, paused: true });
                self.last_mark = tail_end;
            }
            return;
        }
        // Nothing new to hear in silence past the tail (the pause mark, if it comes, ends there).
        if !speech && now > tail_end {
            return;
        }
        if !self.paused_marked && now >= self.last_mark.saturating_add(every) && self.would_keep(now) {
            self.marks.push(Mark { seg_start: self.seg_start, upto: now, paused: false });
            self.last_mark = now;
        }
    }

    fn close(&mut self, end: u64, out: &mut Vec<Span>) {
        if end <= self.seg_start {
            return;
        }
        if self.would_keep(end) {
            out.push(Span { start: self.seg_start, end });
            // The next segment's pre-roll must not overlap this one.
            self.min_start = self.min_start.max(end);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn db(dbfs: f64) -> f64 {
        cmath::db_to_power(dbfs)
    }

    /// Feeds frames of the given levels (dBFS) from position 0; returns the segments in ms.
    fn run(cfg: &VadConfig, levels: &[f64]) -> Vec<(u64, u64)> {
        let mut vad = Vad::new(cfg);
        vad.start_run(0);
        let mut out = Vec::new();
        let fl = vad.frame_len();
        for (i, &l) in levels.iter().enumerate() {
            vad.frame(i as u64 * fl, db(l), true, &mut out);
        }
        vad.flush(levels.len() as u64 * fl, &mut out);
        out.iter().map(|s| (s.start / 8, s.end / 8)).collect()
    }

    fn levels(parts: &[(f64, usize)]) -> Vec<f64> {
        parts.iter().flat_map(|&(l, n)| std::iter::repeat_n(l, n)).collect()
    }

    #[test]
    fn default_is_valid_and_sanitize_is_identity_on_valid() {
        let d = VadConfig::default();
        d.validate().unwrap();
        assert_eq!(d.sanitized(), d);
    }

    #[test]
    fn validate_rejects_out_of_range() {
        let d = VadConfig::default();
        let bad_cfgs = [
            VadConfig { frame_ms: 0, ..d },
            VadConfig { frame_ms: 1_000, ..d },
            VadConfig { threshold_db: f32::NAN, ..d },
            VadConfig { threshold_db: 0.0, ..d },
            VadConfig { min_energy_dbfs: 3.0, ..d },
            VadConfig { start_frames: 0, ..d },
            VadConfig { hangover_ms: 60_000, ..d },
            VadConfig { pre_roll_ms: 9_000, ..d },
            VadConfig { max_segment_ms: 10, ..d },
            VadConfig { min_speech_ms: 20_000, ..d },
            VadConfig { pre_roll_ms: 1_000, start_frames: 100, frame_ms: 100, max_segment_ms: 5_000, ..d },
        ];
        for c in bad_cfgs {
            let err = c.validate().unwrap_err();
            assert!(matches!(err, TranscodeError::InvalidConfig { .. }), "{c:?}");
            c.sanitized().validate().unwrap();
        }
    }

    /// The defaults before open segments were on (hangover 400 ms, pause 200 ms, no marks): the
    /// timing tests below were written with these numbers.
    fn before() -> VadConfig {
        VadConfig { hangover_ms: 400, pause_ms: 200, progress: false, ..VadConfig::default() }
    }

    #[test]
    fn onset_preroll_hangover() {
        let cfg = before();
        // 1 s at -60, 1 s at -20, 2 s at -60.
        let segs = run(&cfg, &levels(&[(-60.0, 50), (-20.0, 50), (-60.0, 100)]));
        assert_eq!(segs, vec![(1_000 - 200, 2_000 + 120)], "the segment keeps tail_ms after the speech");
        let legacy = VadConfig { tail_ms: 400, ..cfg };
        assert_eq!(run(&legacy, &levels(&[(-60.0, 50), (-20.0, 50), (-60.0, 100)])), vec![(800, 2_400)]);
    }

    #[test]
    fn short_bursts_and_single_frames() {
        let cfg = VadConfig::default();
        // 2 frames of speech never open (start_frames = 3).
        assert!(run(&cfg, &levels(&[(-60.0, 50), (-20.0, 2), (-60.0, 50)])).is_empty());
        // 9 frames = 180 ms < min_speech.
        assert!(run(&cfg, &levels(&[(-60.0, 50), (-20.0, 9), (-60.0, 50)])).is_empty());
        // 10 frames = 200 ms is kept.
        assert_eq!(run(&cfg, &levels(&[(-60.0, 50), (-20.0, 10), (-60.0, 50)])).len(), 1);
    }

    #[test]
    fn hangover_bridges_pauses() {
        let cfg = VadConfig { tail_ms: 400, ..before() };
        let segs = run(&cfg, &levels(&[(-60.0, 50), (-20.0, 20), (-60.0, 15), (-20.0, 20), (-60.0, 50)]));
        assert_eq!(segs, vec![(800, 2_100 + 400)]);
        let segs = run(&cfg, &levels(&[(-60.0, 50), (-20.0, 20), (-60.0, 25), (-20.0, 20), (-60.0, 50)]));
        assert_eq!(segs.len(), 2);
        // The second onset's pre-roll (1 900 ms) is clipped to the end of the first segment.
        assert_eq!(segs, vec![(800, 1_800), (1_800, 2_300 + 400)]);
    }

    #[test]
    fn absolute_floor() {
        let cfg = VadConfig::default();
        // -55 dBFS "speech" over digital silence is below min_energy_dbfs.
        assert!(run(&cfg, &levels(&[(-200.0, 50), (-55.0, 50), (-200.0, 50)])).is_empty());
    }

    #[test]
    fn long_speech_is_cut_and_continued() {
        let cfg = VadConfig { max_segment_ms: 2_000, ..VadConfig::default() };
        // Speech with a dip every 200 ms keeps the floor down; 5 s in all.
        let mut l = levels(&[(-60.0, 50)]);
        for _ in 0..25 {
            l.extend(levels(&[(-20.0, 9), (-45.0, 1)]));
        }
        l.extend(levels(&[(-60.0, 50)]));
        let segs = run(&cfg, &l);
        assert_eq!(segs[0], (800, 2_800));
        assert_eq!(segs[1], (2_800, 4_800));
        assert_eq!(segs[2], (4_800, 5_980 + 120));
        assert_eq!(segs.len(), 3);
    }

    /// Feeds frames like `run`; returns the segments and marks in ms, in the order they came.
    fn run_marks(cfg: &VadConfig, levels: &[f64]) -> Vec<(char, u64, u64)> {
        let mut vad = Vad::new(cfg);
        vad.start_run(0);
        let (mut out, mut marks, mut all) = (Vec::new(), Vec::new(), Vec::new());
        let fl = vad.frame_len();
        for (i, &l) in levels.iter().enumerate() {
            vad.frame(i as u64 * fl, db(l), true, &mut out);
            all.extend(out.drain(..).map(|s: Span| ('S', s.start / 8, s.end / 8)));
            vad.take_marks(&mut marks);
            all.extend(marks.drain(..).map(|m: Mark| (if m.paused { 'P' } else { 'M' }, m.seg_start / 8, m.upto / 8)));
        }
        vad.flush(levels.len() as u64 * fl, &mut out);
        all.extend(out.drain(..).map(|s: Span| ('S', s.start / 8, s.end / 8)));
        all
    }

    #[test]
    fn a_pause_marks_the_segment_where_it_will_end() {
        let cfg = VadConfig { progress: true, ..before() };
        // 1 s of speech, a 300 ms pause (shorter than the hangover), 1 s of speech, silence.
        let got = run_marks(&cfg, &levels(&[(-60.0, 50), (-20.0, 50), (-60.0, 15), (-20.0, 50), (-60.0, 50)]));
        assert_eq!(
            got,
            vec![
                ('M', 800, 1_300),
                ('M', 800, 1_800),
                ('P', 800, 2_120), // the pause: speech resumes, so it is not the end
                ('M', 800, 2_320), // at once, with the first speech frame after the marked pause
                ('M', 800, 2_820),
                ('M', 800, 3_320),
                ('P', 800, 3_420), // the end: the segment below ends exactly here
                ('S', 800, 3_420),
            ]
        );
        // A blip too short to keep is never handed on.
        assert_eq!(run_marks(&cfg, &levels(&[(-60.0, 50), (-20.0, 5), (-60.0, 50)])), vec![]);
        // Off: no marks.
        let off = VadConfig { progress: false, ..cfg };
        assert_eq!(run_marks(&off, &levels(&[(-60.0, 50), (-20.0, 50), (-60.0, 50)])), vec![('S', 800, 2_120)]);
    }

    #[test]
    fn pauses_shorter_than_pause_ms_are_not_marked() {
        let cfg = VadConfig { progress: true, ..before() };
        // 1 s of speech, a 160 ms pause, 1 s of speech, silence.
        let input = levels(&[(-60.0, 50), (-20.0, 50), (-60.0, 8), (-20.0, 50), (-60.0, 50)]);
        let paused = |c: &VadConfig| run_marks(c, &input).into_iter().filter(|m| m.0 == 'P').collect::<Vec<_>>();
        // By default (200 ms) only the end is a pause; it still ends where the segment does.
        assert_eq!(paused(&cfg), vec![('P', 800, 2_000 + 160 + 1_000 + 120)]);
        // With pause_ms = tail_ms the short pause is marked too, at tail_ms after its speech.
        let eager = VadConfig { pause_ms: 120, ..cfg };
        assert_eq!(paused(&eager), vec![('P', 800, 2_120), ('P', 800, 3_280)]);
        // No periodic mark in the silence between tail_ms and pause_ms: the pieces stay contiguous
        // and the pause piece ends where the segment ends.
        let all = run_marks(&cfg, &input);
        assert_eq!(all.last(), Some(&('S', 800, 3_280)), "{all:?}");
        assert_eq!(paused(&VadConfig { pause_ms: 0, ..eager }), paused(&eager), "a pause is at least tail_ms");
        assert!(VadConfig { pause_ms: 401, ..before() }.validate().is_err(), "above the hangover");
    }

    #[test]
    fn tail_is_at_most_the_hangover() {
        let cfg = VadConfig { tail_ms: 500, ..before() };
        assert!(cfg.validate().is_err());
        assert_eq!(cfg.sanitized().tail_ms, 400);
    }

    #[test]
    fn flush_closes_open_segment() {
        let cfg = VadConfig::default();
        let segs = run(&cfg, &levels(&[(-60.0, 50), (-20.0, 50)]));
        assert_eq!(segs, vec![(800, 2_000)]);
    }

    #[test]
    fn noise_step_is_absorbed_at_the_rise_rate() {
        let cfg = VadConfig::default();
        // Digital silence then -30 dBFS steady noise: speech for (32 - 12) / 5 = 4 s.
        let segs = run(&cfg, &levels(&[(-200.0, 50), (-30.0, 500)]));
        assert_eq!(segs.len(), 1);
        let (s, e) = segs[0];
        assert_eq!(s, 800);
        let speech_end = e - 120;
        assert!((4_900..=5_100).contains(&speech_end), "{segs:?}");
        // Steady noise from the start: never speech.
        assert!(run(&cfg, &levels(&[(-30.0, 500)])).is_empty());
    }
}
