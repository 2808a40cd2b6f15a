//! Whisper's log-mel front end for 16 kHz mono `f32` audio.
//!
//! The same computation as `whisper.audio.log_mel_spectrogram` (and faster-whisper):
//! 1. reflect-pad the signal by `N_FFT / 2` at both ends (`torch.stft(center=True)`);
//! 2. frame it every [`HOP_LENGTH`] samples, multiply by a periodic Hann window of [`N_FFT`]
//!    samples (`torch.hann_window`), FFT, power spectrum (`|X|²`, [`N_FREQS`] bins);
//! 3. drop the last frame, as Whisper does, so `frames = samples / HOP_LENGTH`;
//! 4. project on an 80-band Slaney mel filter bank computed here ([`mel_filters`], the same
//!    values as librosa `mel(sr=16000, n_fft=400, n_mels=80, htk=False, norm="slaney")`);
//! 5. `log10(max(x, 1e-10))`, floor at `max - 8`, then `(x + 4) / 4`.
//!
//! The output is `(N_MELS, frames)` row-major: `out[mel * frames + frame]`.
//!
//! [`MelFrontend`] owns the FFT plan, the window, the filter bank and its scratch buffers: after
//! the first call of a given size nothing is allocated (the output `Vec` is reused), and nothing
//! runs on another thread.

use std::f64::consts::PI;
use std::sync::Arc;

use rustfft::num_complex::Complex;
use rustfft::{Fft, FftPlanner};

/// Sample rate the front end expects, in Hz.
pub const SAMPLE_RATE: usize = 16_000;
/// FFT size (and window length), in samples (25 ms).
pub const N_FFT: usize = 400;
/// Distance between frames, in samples (10 ms).
pub const HOP_LENGTH: usize = 160;
/// Number of mel bands.
pub const N_MELS: usize = 80;
/// Number of FFT bins kept (`N_FFT / 2 + 1`).
pub const N_FREQS: usize = N_FFT / 2 + 1;

/// Value of `log10` below which power is clamped (`log10(1e-10)`).
const LOG_FLOOR: f32 = -10.0;
/// Dynamic range kept below the maximum, in `log10` units (80 dB).
const DYNAMIC_RANGE: f32 = 8.0;

/// Errors of the mel helpers.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MelError {
    /// The mel buffer does not hold `N_MELS * frames` values.
    #[error("mel buffer holds {found} values, expected {expected} ({N_MELS} bands x {frames} frames)")]
    BadLength {
        /// Values found.
        found: usize,
        /// Values expected.
        expected: usize,
        /// Frames claimed by the caller.
        frames: usize,
    },
    /// Padding was asked to shrink the spectrogram.
    #[error("cannot pad {frames} frames to {target_frames} frames")]
    Shrink {
        /// Frames in the input.
        frames: usize,
        /// Requested frames.
        target_frames: usize,
    },
}

/// Number of mel frames Whisper produces for `samples` samples (the last STFT frame is dropped).
pub fn frames_for(samples: usize) -> usize {
    samples / HOP_LENGTH
}

/// The value a frame of pure digital silence takes after normalisation, given the maximum
/// normalised value of the spectrogram (`None` when it is empty).
fn silence_value(max_normalised: Option<f32>) -> f32 {
    let silence = (LOG_FLOOR + 4.0) / 4.0;
    match max_normalised {
        Some(max) => silence.max(max - DYNAMIC_RANGE / 4.0),
        None => silence,
    }
}

/// Slaney-style mel scale (librosa `hz_to_mel(htk=False)`): linear below 1 kHz, log above.
fn hz_to_mel(hz: f64) -> f64 {
    let f_sp = 200.0 / 3.0;
    let min_log_hz = 1000.0;
    let min_log_mel = min_log_hz / f_sp;
    let logstep = 6.4f64.ln() / 27.0;
    if hz >= min_log_hz {
        min_log_mel + (hz / min_log_hz).ln() / logstep
    } else {
        hz / f_sp
    }
}

/// Inverse of [`hz_to_mel`] (librosa `mel_to_hz(htk=False)`).
fn mel_to_hz(mel: f64) -> f64 {
    let f_sp = 200.0 / 3.0;
    let min_log_hz = 1000.0;
    let min_log_mel = min_log_hz / f_sp;
    let logstep = 6.4f64.ln() / 27.0;
    if mel >= min_log_mel {
        min_log_hz * (logstep * (mel - min_log_mel)).exp()
    } else {
        f_sp * mel
    }
}

/// The Slaney mel filter bank, `(N_MELS, N_FREQS)` row-major.
///
/// Follows librosa `filters.mel(sr=16000, n_fft=400, n_mels=80, htk=False, norm="slaney")`
/// operation by operation in `f64` (including numpy's `linspace` and `rfftfreq`, and librosa's
/// rounding of the triangles to `f32` before the area normalisation), so the result is the
/// `mel_filters.npz` Whisper ships.
pub fn mel_filters() -> Vec<f32> {
    // Band edges: N_MELS + 2 points evenly spaced on the mel scale (numpy linspace).
    let min_mel = hz_to_mel(0.0);
    let max_mel = hz_to_mel(SAMPLE_RATE as f64 / 2.0);
    let points = N_MELS + 2;
    let step = (max_mel - min_mel) / (points - 1) as f64;
    let mel_f: Vec<f64> = (0..points)
        .map(|i| {
            let mel = if i == points - 1 { max_mel } else { i as f64 * step + min_mel };
            mel_to_hz(mel)
        })
        .collect();
    // FFT bin centres (numpy rfftfreq).
    let bin_hz = 1.0 / (N_FFT as f64 * (1.0 / SAMPLE_RATE as f64));
    let mut weights = vec![0f32; N_MELS * N_FREQS];
    for (band, row) in weights.chunks_exact_mut(N_FREQS).enumerate() {
        let (lo, centre, hi) = (mel_f[band], mel_f[band + 1], mel_f[band + 2]);
        let enorm = 2.0 / (hi - lo);
        for (bin, w) in row.iter_mut().enumerate() {
            let f = bin as f64 * bin_hz;
            let lower = -(lo - f) / (centre - lo);
            let upper = (hi - f) / (hi - centre);
            let triangle = 0f64.max(lower.min(upper)) as f32;
            *w = (f64::from(triangle) * enorm) as f32;
        }
    }
    weights
}

/// Periodic Hann window of `N_FFT` samples, computed like `torch.hann_window` (in `f32`).
fn hann_window() -> Vec<f32> {
    let step = (2.0 * PI / N_FFT as f64) as f32;
    (0..N_FFT).map(|n| (n as f32 * step).cos() * -0.5 + 0.5).collect()
}

/// What lies beyond the last sample.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum RightEdge {
    /// The signal is mirrored (`torch.stft(center=True)` on the audio itself).
    Reflect,
    /// The signal continues with zeros (Whisper's 30 s of zero padding).
    Zeros,
}

/// Sample at position `j` of the padded signal (`j` may be negative or past the end).
///
/// Left of the start the signal is mirrored without repeating the edge (`x[-j] = x[j]`); past
/// the end it is mirrored the same way or zero, per `right`. A signal shorter than the
/// padding (which torch rejects) is mirrored repeatedly.
fn sample_at(pcm: &[f32], j: isize, right: RightEdge) -> f32 {
    let len = pcm.len();
    if len == 0 {
        return 0.0;
    }
    if j >= 0 && (j as usize) < len {
        return pcm[j as usize];
    }
    if right == RightEdge::Zeros {
        // Whisper mirrors the zero-padded signal: left of the start it sees the audio, then zeros.
        let k = j.unsigned_abs();
        return if j < 0 && k < len { pcm[k] } else { 0.0 };
    }
    if len == 1 {
        return pcm[0];
    }
    let period = 2 * (len - 1);
    let m = j.rem_euclid(period as isize) as usize;
    let k = if m >= len { period - m } else { m };
    pcm.get(k).copied().unwrap_or(0.0)
}

/// Whisper's log-mel front end with its FFT plan, window, filter bank and scratch buffers.
pub struct MelFrontend {
    fft: Arc<dyn Fft<f32>>,
    window: Vec<f32>,
    filters: Vec<f32>,
    /// Per band, the range of FFT bins with a non-zero weight.
    bands: Vec<(usize, usize)>,
    frame: Vec<Complex<f32>>,
    scratch: Vec<Complex<f32>>,
    power: Vec<f32>,
}

impl std::fmt::Debug for MelFrontend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MelFrontend")
            .field("n_fft", &N_FFT)
            .field("hop_length", &HOP_LENGTH)
            .field("n_mels", &N_MELS)
            .finish_non_exhaustive()
    }
}

impl Default for MelFrontend {
    fn default() -> Self {
        Self::new()
    }
}

impl MelFrontend {
    /// Plans the FFT and computes the window and the filter bank.
    pub fn new() -> Self {
        let fft = FftPlanner::<f32>::new().plan_fft_forward(N_FFT);
        let scratch = vec![Complex::new(0.0, 0.0); fft.get_inplace_scratch_len()];
        let filters = mel_filters();
        let bands = filters
            .chunks_exact(N_FREQS)
            .map(|row| {
                let first = row.iter().position(|&w| w != 0.0).unwrap_or(0);
                let end = row.iter().rposition(|&w| w != 0.0).map_or(first, |i| i + 1);
                (first, end)
            })
            .collect();
        Self {
            fft,
            window: hann_window(),
            filters,
            bands,
            frame: vec![Complex::new(0.0, 0.0); N_FFT],
            scratch,
            power: vec![0.0; N_FREQS],
        }
    }

    /// The filter bank in use, `(N_MELS, N_FREQS)` row-major.
    pub fn filters(&self) -> &[f32] {
        &self.filters
    }

    /// Log-mel spectrogram of `pcm` (16 kHz mono), as Whisper computes it on unpadded audio:
    /// reflect padding at both ends, `pcm.len() / HOP_LENGTH` frames. Writes `(N_MELS, frames)`
    /// row-major into `out` (cleared first) and returns the number of frames.
    pub fn compute(&mut self, pcm: &[f32], out: &mut Vec<f32>) -> usize {
        let frames = frames_for(pcm.len());
        self.run(pcm, frames, RightEdge::Reflect, out);
        frames
    }

    /// Log-mel spectrogram of `pcm` followed by zeros, exactly `target_frames` frames long.
    ///
    /// This is what Whisper computes when it pads the audio with 30 s of silence and keeps the
    /// first `target_frames` frames: frames past the audio see zeros (not a mirror of the
    /// audio), and audio past `target_frames * HOP_LENGTH` only contributes to the last frames'
    /// windows. The `max - 8` floor uses the maximum over the returned frames. Writes
    /// `(N_MELS, target_frames)` row-major into `out` (cleared first); returns `target_frames`.
    pub fn compute_padded(&mut self, pcm: &[f32], target_frames: usize, out: &mut Vec<f32>) -> usize {
        self.run(pcm, target_frames, RightEdge::Zeros, out);
        target_frames
    }

    fn run(&mut self, pcm: &[f32], frames: usize, right: RightEdge, out: &mut Vec<f32>) {
        out.clear();
        out.resize(N_MELS * frames, 0.0);
        let half = (N_FFT / 2) as isize;
        let mut max = f32::NEG_INFINITY;
        for t in 0..frames {
            let start = (t * HOP_LENGTH) as isize - half;
            let inside = start >= 0 && (start as usize) + N_FFT <= pcm.len();
            if inside {
                let s = start as usize;
                for ((c, &x), &w) in self.frame.iter_mut().zip(&pcm[s..s + N_FFT]).zip(&self.window) {
                    *c = Complex::new(x * w, 0.0);
                }
            } else {
                for (n, (c, &w)) in self.frame.iter_mut().zip(&self.window).enumerate() {
                    *c = Complex::new(sample_at(pcm, start + n as isize, right) * w, 0.0);
                }
            }
            self.fft.process_with_scratch(&mut self.frame, &mut self.scratch);
            for (p, c) in self.power.iter_mut().zip(&self.frame) {
                *p = c.re * c.re + c.im * c.im;
            }
            for (band, (row, &(first, end))) in self.filters.chunks_exact(N_FREQS).zip(&self.bands).enumerate() {
                let energy: f32 = row[first..end].iter().zip(&self.power[first..end]).map(|(w, p)| w * p).sum();
                let v = energy.max(1e-10).log10();
                max = max.max(v);
                out[band * frames + t] = v;
            }
        }
        let floor = max - DYNAMIC_RANGE;
        for v in out.iter_mut() {
            *v = (v.max(floor) + 4.0) / 4.0;
        }
    }
}

/// Pads a `(N_MELS, frames)` spectrogram to `(N_MELS, target_frames)` with the value digital
/// silence takes in it (`max(-1.5, max - 2)`), writing into `out` (cleared first).
///
/// Cheaper than [`MelFrontend::compute_padded`] but approximate at the junction: the last real
/// frames were computed with a mirrored (not zero) right edge.
pub fn pad_to(mel: &[f32], frames: usize, target_frames: usize, out: &mut Vec<f32>) -> Result<(), MelError> {
    let expected = N_MELS * frames;
    if mel.len() != expected {
        return Err(MelError::BadLength { found: mel.len(), expected, frames });
    }
    if target_frames < frames {
        return Err(MelError::Shrink { frames, target_frames });
    }
    let max = mel.iter().copied().reduce(f32::max);
    let fill = silence_value(max);
    out.clear();
    out.reserve(N_MELS * target_frames);
    if frames == 0 {
        out.resize(N_MELS * target_frames, fill);
        return Ok(());
    }
    for row in mel.chunks_exact(frames) {
        out.extend_from_slice(row);
        out.extend(std::iter::repeat_n(fill, target_frames - frames));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Reference values from librosa's algorithm (computed in `f64` with Python's `math`).
    const LIBROSA_SPOTS: [(usize, usize, f32); 14] = [
        (0, 1, 0.024_862_595),
        (1, 2, 0.022_871_772),
        (5, 5, 0.009_954_109),
        (5, 6, 0.014_908_484),
        (20, 19, 0.010_972_2),
        (20, 20, 0.013_890_394),
        (40, 42, 0.005_411_104_8),
        (40, 43, 0.014_735_566),
        (40, 44, 0.006_518_19),
        (41, 46, 0.003_967_812_8),
        (60, 90, 0.001_434_534_3),
        (60, 96, 0.000_797_849_15),
        (79, 187, 0.000_833_07),
        (79, 199, 0.000_448_759),
    ];

    fn sine(freq: f32, seconds: f32, amplitude: f32) -> Vec<f32> {
        let n = (seconds * SAMPLE_RATE as f32) as usize;
        (0..n).map(|i| amplitude * (2.0 * std::f32::consts::PI * freq * i as f32 / SAMPLE_RATE as f32).sin()).collect()
    }

    /// Deterministic speech-like test signal: a gliding harmonic tone, amplitude modulated,
    /// plus a little noise.
    fn speechy(samples: usize) -> Vec<f32> {
        let mut state: u32 = 0x1234_5678;
        (0..samples)
            .map(|i| {
                state = state.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
                let noise = (state >> 8) as f32 / (1u32 << 24) as f32 - 0.5;
                let t = i as f32 / SAMPLE_RATE as f32;
                let f0 = 120.0 + 60.0 * (2.0 * std::f32::consts::PI * 1.3 * t).sin();
                let phase = 2.0 * std::f32::consts::PI * f0 * t;
                let env = 0.5 + 0.5 * (2.0 * std::f32::consts::PI * 3.0 * t).sin();
                let voiced: f32 = (1..8).map(|h| (phase * h as f32).sin() / h as f32).sum();
                0.2 * env * voiced + 0.01 * noise
            })
            .collect()
    }

    #[test]
    fn filter_bank_matches_librosa() {
        let filters = mel_filters();
        assert_eq!(filters.len(), N_MELS * N_FREQS);
        for &(band, bin, expected) in &LIBROSA_SPOTS {
            let got = filters[band * N_FREQS + bin];
            let rel = ((got - expected) / expected).abs();
            assert!(rel < 1e-6, "filter[{band}][{bin}] = {got}, librosa {expected}");
        }
        // Zero outside the triangles.
        assert_eq!(filters[2], 0.0);
        assert_eq!(filters[79 * N_FREQS + 200], 0.0);
        assert_eq!(filters[40 * N_FREQS + 60], 0.0);
    }

    #[test]
    fn filter_bank_rows_are_sane() {
        let filters = mel_filters();
        let mut last_peak = 0;
        for (band, row) in filters.chunks_exact(N_FREQS).enumerate() {
            assert!(row.iter().all(|w| w.is_finite() && *w >= 0.0));
            let sum: f32 = row.iter().sum();
            // Slaney normalisation: area ≈ 1 / bandwidth-in-Hz * 2, so each row sums to about
            // 2 / (hi - lo) * (hi - lo) / 2 / bin_hz = 1 / 40 once the band spans several bins.
            assert!(sum > 0.0, "band {band} is empty");
            if band >= 20 {
                assert!((sum - 0.025).abs() < 0.003, "band {band} sums to {sum}");
            }
            let peak = row.iter().enumerate().fold((0, 0f32), |acc, (i, &w)| if w > acc.1 { (i, w) } else { acc }).0;
            assert!(peak >= last_peak, "band {band} peaks at {peak} before {last_peak}");
            last_peak = peak;
        }
        assert!(last_peak > 180);
    }

    #[test]
    fn hann_window_is_periodic() {
        let w = hann_window();
        assert_eq!(w.len(), N_FFT);
        assert_eq!(w[0], 0.0);
        assert!((w[N_FFT / 2] - 1.0).abs() < 1e-6);
        // Periodic: symmetric around N/2, w[k] == w[N - k].
        for k in 1..N_FFT / 2 {
            assert!((w[k] - w[N_FFT - k]).abs() < 1e-6);
        }
    }

    #[test]
    fn frames_and_layout() {
        let mut fe = MelFrontend::new();
        let mut out = Vec::new();
        assert_eq!(fe.compute(&[], &mut out), 0);
        assert!(out.is_empty());
        assert_eq!(fe.compute(&[0.1; 159], &mut out), 0);
        assert_eq!(fe.compute(&[0.1; 160], &mut out), 1);
        assert_eq!(out.len(), N_MELS);
        assert_eq!(fe.compute(&vec![0.0; 16_000], &mut out), 100);
        assert_eq!(out.len(), N_MELS * 100);
        // Very short signals (shorter than the reflect padding) do not panic.
        for len in [1, 2, 3, 150, 199, 200, 201, 320, 401] {
            let pcm = sine(440.0, len as f32 / SAMPLE_RATE as f32, 0.3);
            let pcm = if pcm.len() < len { vec![0.3; len] } else { pcm };
            let frames = fe.compute(&pcm, &mut out);
            assert_eq!(frames, len / HOP_LENGTH);
            assert!(out.iter().all(|v| v.is_finite()));
            let padded = fe.compute_padded(&pcm, 7, &mut out);
            assert_eq!(padded, 7);
            assert_eq!(out.len(), N_MELS * 7);
            assert!(out.iter().all(|v| v.is_finite()));
        }
    }

    #[test]
    fn silence_is_the_floor() {
        let mut fe = MelFrontend::new();
        let mut out = Vec::new();
        let frames = fe.compute(&vec![0.0; 16_000], &mut out);
        assert_eq!(frames, 100);
        assert!(out.iter().all(|&v| v == -1.5), "silence must be (-10 + 4) / 4");
        let frames = fe.compute_padded(&[], 10, &mut out);
        assert_eq!(frames, 10);
        assert!(out.iter().all(|&v| v == -1.5));
    }

    #[test]
    fn sine_peaks_in_expected_band() {
        let mut fe = MelFrontend::new();
        let mut out = Vec::new();
        let frames = fe.compute(&sine(1000.0, 1.0, 0.5), &mut out);
        assert_eq!(frames, 100);
        // 1 kHz is FFT bin 25 (40 Hz per bin); the band weighting it most is band 26.
        let filters = fe.filters();
        let expected =
            (0..N_MELS).max_by(|&a, &b| filters[a * N_FREQS + 25].total_cmp(&filters[b * N_FREQS + 25])).unwrap_or(0);
        assert_eq!(expected, 26);
        // Frames whose window lies inside the audio (the mirrored edges distort the tone).
        for t in 2..=98 {
            let peak = (0..N_MELS).max_by(|&a, &b| out[a * frames + t].total_cmp(&out[b * frames + t])).unwrap_or(0);
            assert_eq!(peak, expected, "frame {t}");
        }
        // The maximum of the spectrogram normalises to (log10(max) + 4) / 4 and the floor is
        // 2 below it.
        let max = out.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let min = out.iter().copied().fold(f32::INFINITY, f32::min);
        assert!((max - min - 2.0).abs() < 1e-5, "max {max} min {min}");
    }

    #[test]
    fn no_allocation_after_warm_up() {
        let mut fe = MelFrontend::new();
        let mut out = Vec::new();
        let pcm = speechy(32_000);
        fe.compute(&pcm, &mut out);
        let cap = out.capacity();
        let ptr = out.as_ptr();
        fe.compute(&pcm[..16_000], &mut out);
        fe.compute(&pcm, &mut out);
        assert_eq!(out.capacity(), cap);
        assert_eq!(out.as_ptr(), ptr);
    }

    #[test]
    fn padded_matches_unpadded_inside_and_whisper_padding() {
        let mut fe = MelFrontend::new();
        let pcm = speechy(16_000);
        let mut plain = Vec::new();
        let mut padded = Vec::new();
        let frames = fe.compute(&pcm, &mut plain);
        let target = 120;
        fe.compute_padded(&pcm, target, &mut padded);
        // Away from the right edge both see the same samples (and the same maximum, which is
        // reached inside the audio here).
        let mut max_inside = 0f32;
        for band in 0..N_MELS {
            for t in 0..frames - 2 {
                let d = (plain[band * frames + t] - padded[band * target + t]).abs();
                max_inside = max_inside.max(d);
            }
        }
        assert!(max_inside < 1e-6, "max diff inside {max_inside}");
        // Whisper's padding: the same as explicitly appending zeros.
        let mut explicit = pcm.clone();
        explicit.extend(std::iter::repeat_n(0.0, target * HOP_LENGTH + N_FFT));
        let mut reference = Vec::new();
        fe.compute_padded(&explicit, target, &mut reference);
        assert_eq!(reference, padded);
    }

    #[test]
    fn pad_to_fills_with_silence() {
        let mut fe = MelFrontend::new();
        let mut mel = Vec::new();
        let frames = fe.compute(&sine(1000.0, 0.5, 0.5), &mut mel);
        let max = mel.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let mut out = Vec::new();
        assert_eq!(pad_to(&mel, frames, frames + 6, &mut out), Ok(()));
        assert_eq!(out.len(), N_MELS * (frames + 6));
        for band in 0..N_MELS {
            let row = &out[band * (frames + 6)..(band + 1) * (frames + 6)];
            assert_eq!(&row[..frames], &mel[band * frames..(band + 1) * frames]);
            assert!(row[frames..].iter().all(|&v| v == (max - 2.0).max(-1.5)));
        }
        assert!(matches!(pad_to(&mel, frames + 1, frames + 6, &mut out), Err(MelError::BadLength { .. })));
        assert!(matches!(pad_to(&mel, frames, frames - 1, &mut out), Err(MelError::Shrink { .. })));
        assert_eq!(pad_to(&[], 0, 3, &mut out), Ok(()));
        assert_eq!(out, vec![-1.5; N_MELS * 3]);
    }

    /// candle's `pcm_to_mel` (after whisper.cpp) does not centre its frames: frame `i` starts at
    /// sample `i * HOP_LENGTH`, and it pads with zeros. Prepending the 200-sample reflection
    /// makes its frame `i` cover the same samples as our frame `i` with Whisper's padding.
    #[test]
    fn matches_candle_pcm_to_mel() {
        use candle_transformers::models::whisper::{audio::pcm_to_mel, Config};
        let cfg = Config {
            num_mel_bins: N_MELS,
            max_source_positions: 1500,
            d_model: 384,
            encoder_attention_heads: 6,
            encoder_layers: 4,
            vocab_size: 51864,
            max_target_positions: 448,
            decoder_attention_heads: 6,
            decoder_layers: 4,
            suppress_tokens: Vec::new(),
        };
        let mut fe = MelFrontend::new();
        let pcm = speechy(24_000);
        let mut shifted: Vec<f32> = (1..=N_FFT / 2).rev().map(|k| pcm[k]).collect();
        shifted.extend_from_slice(&pcm);
        let theirs = pcm_to_mel(&cfg, &shifted, fe.filters());
        let their_frames = theirs.len() / N_MELS;
        assert_eq!(theirs.len(), N_MELS * their_frames);
        let mut ours = Vec::new();
        fe.compute_padded(&pcm, their_frames, &mut ours);
        // candle adds each negative-frequency bin to its positive twin (bins 1..199, which are
        // all the filter bank uses), doubling every mel energy: its log-mel is ours plus
        // log10(2) / 4 everywhere, the -8 floor included.
        let offset = 2f32.log10() / 4.0;
        let (mut max_raw, mut max_diff, mut sum_diff) = (0f32, 0f32, 0f64);
        for (a, b) in ours.iter().zip(&theirs) {
            max_raw = max_raw.max((a - b).abs());
            let d = (a + offset - b).abs();
            max_diff = max_diff.max(d);
            sum_diff += f64::from(d);
        }
        let mean = sum_diff / ours.len() as f64;
        println!(
            "mel vs candle pcm_to_mel over {their_frames} frames: raw max |diff| {max_raw:e}; \
             after removing candle's log10(2)/4 offset: max {max_diff:e}, mean {mean:e}"
        );
        assert!((max_raw - offset).abs() < 1e-3, "raw max diff {max_raw}");
        assert!(max_diff < 1e-3, "max diff {max_diff}");
        // The real audio region alone (the padding is the floor on both sides).
        let frames = frames_for(pcm.len());
        let mut max_audio = 0f32;
        for band in 0..N_MELS {
            for t in 0..frames {
                let i = band * their_frames + t;
                max_audio = max_audio.max((ours[i] + offset - theirs[i]).abs());
            }
        }
        println!("mel vs candle pcm_to_mel over the {frames} audio frames: max |diff| {max_audio:e}");
    }
}
