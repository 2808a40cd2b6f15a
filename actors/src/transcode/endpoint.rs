//! The ingress's early look at the end of speech: which media frames should end a batch.
//!
//! The ingress hands a stream's audio to the call actor in batches of about 100 ms, and the
//! transcoder sees a pause (where a speculative final starts) or a segment's end only when the
//! batch holding that frame arrives: on average half a batch late. [`EndpointWatch`] runs the
//! same detector ([`Vad`], same config) over the µ-law frames as they come in, and says "hand the
//! batch over now" at the frames where the transcoder's VAD will find a pause, the speaker going
//! on after one, or a segment's end.
//! It decides nothing itself: the transcoder still cuts every segment, and a batch handed over
//! early only means one more, shorter media record.
//!
//! The transcoder reads its VAD frames from the 16 kHz signal, which lags the input by the
//! upsampler's delay (23 samples at 8 kHz): it judges a frame only once the next frame's audio
//! is in. And its energy is the upsampled signal's, a hair off this one's, so near the threshold
//! it may see the pause a frame later. So the watch hands over at the two frames after the one
//! where its own VAD found the pause or the end.
//!
//! Cost: a table lookup and a multiply-add per sample, no allocation after the first frame.

use super::vad::{frame_energy, Mark, Span, Vad, VadConfig, SAMPLES_PER_MS};
use super::{mulaw, place, Placement, MAX_START_MS};

/// Frames after the VAD's finding at which the batch is handed over.
const HAND_OVER_FRAMES: u8 = 2;

/// Watches one track for the frames that end a pause or a segment. Pure: a function of the audio
/// and times pushed.
#[derive(Debug, Clone)]
pub struct EndpointWatch {
    vad: Vad,
    frame_len: usize,
    /// Linear samples of the frame being filled.
    pcm: Vec<i16>,
    /// Stream position (8 kHz samples) of `pcm[0]`; `None` before the first audio.
    frame_pos: Option<u64>,
    /// The frame being filled holds gap fill (it leaves the noise floor alone, as in the
    /// transcoder).
    filled: bool,
    spans: Vec<Span>,
    marks: Vec<Mark>,
    /// Frames still to hand over after a finding.
    pending: u8,
    /// The open segment's last mark was a pause: its next mark is the speaker going on.
    after_pause: bool,
}

impl EndpointWatch {
    /// A watch with the transcoder's VAD config (sanitised, as the transcoder's is).
    pub fn new(cfg: &VadConfig) -> Self {
        let vad = Vad::new(cfg);
        let frame_len = vad.frame_len() as usize;
        Self {
            vad,
            frame_len,
            pcm: Vec::with_capacity(frame_len),
            frame_pos: None,
            filled: false,
            spans: Vec::new(),
            marks: Vec::new(),
            pending: 0,
            after_pause: false,
        }
    }

    /// Feeds µ-law audio whose first sample is at stream time `start_ms`. True: the batch that
    /// ends with this audio should be handed over now.
    ///
    /// Time is read as the transcoder reads it ([`Placement`]): a short gap is silence, audio
    /// already heard is dropped, a long gap starts a new run.
    pub fn push(&mut self, start_ms: u64, mulaw: &[u8]) -> bool {
        if mulaw.is_empty() {
            return false;
        }
        let at = start_ms.min(MAX_START_MS) * SAMPLES_PER_MS;
        let mut data = mulaw;
        let mut hand_over = false;
        let next = self.frame_pos.map(|p| p + self.pcm.len() as u64);
        match place(next, at) {
            Placement::Contiguous => {}
            Placement::Overlap(heard) => {
                let skip = heard.min(data.len() as u64) as usize;
                data = &data[skip..];
            }
            Placement::Gap(gap) => {
                let mut left = gap as usize;
                while left > 0 {
                    let k = (self.frame_len - self.pcm.len()).min(left);
                    self.pcm.resize(self.pcm.len() + k, 0);
                    self.filled = true;
                    left -= k;
                    hand_over |= self.frame_done();
                }
            }
            Placement::NewRun { .. } => {
                if let Some(n) = next {
                    self.vad.flush(n, &mut self.spans);
                    self.spans.clear();
                }
                self.vad.start_run(at);
                self.pcm.clear();
                self.filled = false;
                self.frame_pos = Some(at);
            }
        }
        while !data.is_empty() {
            let k = (self.frame_len - self.pcm.len()).min(data.len());
            mulaw::decode_into(&data[..k], &mut self.pcm);
            data = &data[k..];
            hand_over |= self.frame_done();
        }
        hand_over
    }

    /// Runs the VAD on the frame in `pcm` if it is complete; true if that frame is to be handed
    /// over.
    fn frame_done(&mut self) -> bool {
        if self.pcm.len() < self.frame_len {
            return false;
        }
        let pos = self.frame_pos.unwrap_or(0);
        let hand_over = self.pending > 0;
        self.pending = self.pending.saturating_sub(1);
        self.vad.frame(pos, frame_energy(&self.pcm), !self.filled, &mut self.spans);
        self.vad.take_marks(&mut self.marks);
        // A pause (the speculative final starts), the speaker going on after one (the decode
        // made at it is given up), the end of a segment.
        let paused = self.marks.iter().any(|m| m.paused);
        let resumed = self.after_pause && self.marks.iter().any(|m| !m.paused);
        let ended = !self.spans.is_empty();
        self.after_pause = paused || self.after_pause && !resumed && !ended;
        if paused || resumed || ended {
            self.pending = HAND_OVER_FRAMES;
        }
        self.spans.clear();
        self.marks.clear();
        self.pcm.clear();
        self.filled = false;
        self.frame_pos = Some(pos + self.frame_len as u64);
        hand_over
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::transcode::synth::SignalBuilder;
    use crate::transcode::{Piece, Segment, StreamTranscoder, TranscodeConfig};

    fn config() -> TranscodeConfig {
        let mut cfg = TranscodeConfig::default();
        cfg.vad.progress = true;
        cfg
    }

    /// Talk with pauses inside and between utterances, on a quiet line and on a noisy one.
    fn signals() -> Vec<Vec<u8>> {
        let talk = |seed, background: Option<f64>| {
            let mut s = SignalBuilder::new(seed)
                .silence(600)
                .speech(1_400, -20.0)
                .silence(180)
                .speech(900, -22.0)
                .silence(700)
                .speech(600, -26.0)
                .silence(260)
                .speech(1_100, -18.0)
                .silence(900);
            if let Some(db) = background {
                s = s.with_background(db);
            }
            s.mulaw()
        };
        vec![talk(3, None), talk(4, Some(-55.0)), talk(5, Some(-45.0))]
    }

    /// Frame by frame (20 ms, as Twilio sends): the frames at which the transcoder emitted a
    /// paused piece or a segment, and the frames at which the watch said to hand over.
    fn run(cfg: &TranscodeConfig, bytes: &[u8]) -> (Vec<usize>, Vec<usize>) {
        run_losing(cfg, bytes, &[])
    }

    /// [`run`], with the frames in `lost` never sent (Twilio's sequence gaps).
    fn run_losing(cfg: &TranscodeConfig, bytes: &[u8], lost: &[std::ops::Range<usize>]) -> (Vec<usize>, Vec<usize>) {
        let mut tc = StreamTranscoder::new(cfg);
        let mut watch = EndpointWatch::new(&cfg.vad);
        let (mut segs, mut pieces): (Vec<Segment>, Vec<Piece>) = (Vec::new(), Vec::new());
        let (mut found, mut handed) = (Vec::new(), Vec::new());
        let mut after_pause: Option<u32> = None;
        for (i, frame) in bytes.chunks(160).enumerate() {
            if lost.iter().any(|r| r.contains(&i)) {
                continue;
            }
            let t = i as u64 * 20;
            tc.push(t, frame, &mut segs);
            tc.take_progress(&mut pieces);
            // A paused piece, the piece after it in the same segment (the speaker went on), a
            // segment.
            let resumed = pieces.iter().any(|p| !p.paused && after_pause == Some(p.index));
            if let Some(p) = pieces.last() {
                after_pause = p.paused.then_some(p.index);
            }
            if !segs.is_empty() || resumed || pieces.iter().any(|p| p.paused) {
                found.push(i);
            }
            segs.clear();
            pieces.clear();
            if watch.push(t, frame) {
                handed.push(i);
            }
        }
        (found, handed)
    }

    #[test]
    fn hands_over_at_every_frame_where_the_transcoder_finds_a_pause_or_an_end() {
        let cfg = config();
        for (n, bytes) in signals().iter().enumerate() {
            let (found, handed) = run(&cfg, bytes);
            // Two segments, each with a pause inside (kept by the hangover), the speaker going
            // on after it, a pause at its end and its end.
            assert!(found.len() >= 8, "signal {n}: the transcoder found {found:?}");
            for f in &found {
                assert!(
                    handed.contains(f),
                    "signal {n}: the transcoder found frame {f}, the watch handed over {handed:?}"
                );
            }
            // Early hand-overs are few: two per finding at most.
            assert!(handed.len() <= 2 * found.len(), "signal {n}: {handed:?} for {found:?}");
        }
    }

    #[test]
    fn lost_frames_are_silence_to_both() {
        let cfg = config();
        for (n, bytes) in signals().iter().enumerate() {
            // 100 ms lost inside the first utterance, 60 ms in the pause after it, 40 ms at the
            // start of the last utterance.
            let (found, handed) = run_losing(&cfg, bytes, &[50..55, 102..105, 189..191]);
            assert!(found.len() >= 5, "signal {n}: the transcoder found {found:?}");
            for f in &found {
                assert!(
                    handed.contains(f),
                    "signal {n}: the transcoder found frame {f}, the watch handed over {handed:?}"
                );
            }
        }
    }

    #[test]
    fn batching_and_restarts_do_not_upset_it() {
        let cfg = config();
        let bytes = &signals()[0];
        // The same audio in 100 ms pushes hands over within the pushes that hold those frames.
        let mut watch = EndpointWatch::new(&cfg.vad);
        let early: Vec<usize> =
            bytes.chunks(800).enumerate().filter(|(i, c)| watch.push(*i as u64 * 100, c)).map(|(i, _)| i).collect();
        let (_, handed) = run(&cfg, bytes);
        let mut by_batch: Vec<usize> = handed.iter().map(|f| f / 5).collect();
        by_batch.dedup();
        assert_eq!(early, by_batch);
        // A jump in time (a new stream) starts over without a panic, and empty or odd-sized
        // pushes are fine.
        let mut watch = EndpointWatch::new(&cfg.vad);
        assert!(!watch.push(0, &[]));
        watch.push(0, &bytes[..4_001]);
        watch.push(u64::MAX, &bytes[..800]);
        watch.push(3, &bytes[4_001..]);
    }

    #[test]
    fn silence_and_steady_noise_never_hand_over() {
        let cfg = config();
        for sig in [SignalBuilder::new(1).silence(5_000), SignalBuilder::new(2).noise(5_000, -40.0)] {
            let (found, handed) = run(&cfg, &sig.mulaw());
            assert!(found.is_empty() && handed.is_empty(), "{found:?} {handed:?}");
        }
    }
}
