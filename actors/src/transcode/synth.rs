//! Deterministic synthetic phone audio (8 kHz, 16-bit) for tests, benches and the simulator.
//!
//! Speech-like utterances use a source–filter model: a glottal pulse train (or noise, for
//! unvoiced syllables) through three formant resonators, in syllables of 120–280 ms separated by
//! 30–90 ms pauses, with random pitch, glide, formants and loudness per syllable. Everything is
//! driven by a seeded [`Rng`], so the same seed gives the same samples (on a given machine).

use super::mulaw;

/// SplitMix64: tiny, fast, good enough for test signals.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Self(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `[0, 1)`.
    pub fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Uniform in `[lo, hi)`.
    pub fn range(&mut self, lo: f64, hi: f64) -> f64 {
        lo + (hi - lo) * self.uniform()
    }

    /// Approximately standard normal (Irwin–Hall with 4 terms).
    pub fn gauss(&mut self) -> f64 {
        let s = self.uniform() + self.uniform() + self.uniform() + self.uniform();
        (s - 2.0) * 3f64.sqrt()
    }
}

/// Sample rate of everything in this module.
pub const RATE: f64 = 8_000.0;

/// RMS amplitude (16-bit) of a level in dBFS (0 dBFS = RMS 32768).
pub fn dbfs_to_rms(dbfs: f64) -> f64 {
    32_768.0 * 10f64.powf(dbfs / 20.0)
}

fn to_i16(x: f64) -> i16 {
    x.round().clamp(i16::MIN as f64, i16::MAX as f64) as i16
}

fn scale_to(raw: &[f64], rms_dbfs: f64, out: &mut Vec<i16>) {
    let energy: f64 = raw.iter().map(|x| x * x).sum::<f64>() / raw.len().max(1) as f64;
    let gain = if energy > 0.0 { dbfs_to_rms(rms_dbfs) / energy.sqrt() } else { 0.0 };
    out.extend(raw.iter().map(|&x| to_i16(x * gain)));
}

/// Appends `n` samples of white Gaussian noise at `rms_dbfs`.
pub fn white_noise(rng: &mut Rng, n: usize, rms_dbfs: f64, out: &mut Vec<i16>) {
    let rms = dbfs_to_rms(rms_dbfs);
    out.extend((0..n).map(|_| to_i16(rng.gauss() * rms)));
}

/// Two-pole resonator at `freq` Hz with bandwidth `bw` Hz, unity gain at its peak (roughly).
#[derive(Clone, Copy)]
struct Resonator {
    a1: f64,
    a2: f64,
    g: f64,
    y1: f64,
    y2: f64,
}

impl Resonator {
    fn new(freq: f64, bw: f64) -> Self {
        let r = (-std::f64::consts::PI * bw / RATE).exp();
        let theta = 2.0 * std::f64::consts::PI * freq / RATE;
        Self { a1: 2.0 * r * theta.cos(), a2: -r * r, g: 1.0 - r, y1: 0.0, y2: 0.0 }
    }

    fn step(&mut self, x: f64) -> f64 {
        let y = self.g * x + self.a1 * self.y1 + self.a2 * self.y2;
        self.y2 = self.y1;
        self.y1 = y;
        y
    }
}

/// Appends `n` samples of a speech-like utterance whose overall RMS is `rms_dbfs`. It starts
/// with a syllable and ends with one (the pauses are inside), so its edges are the speech edges.
pub fn speech_like(rng: &mut Rng, n: usize, rms_dbfs: f64, out: &mut Vec<i16>) {
    let mut raw = vec![0.0f64; n];
    let ramp = (0.010 * RATE) as usize;
    let mut t = 0usize;
    while t < n {
        let mut end = (t + (rng.range(0.12, 0.28) * RATE) as usize).min(n);
        let gap = (rng.range(0.03, 0.09) * RATE) as usize;
        // Never leave a tail too short for a pause plus a syllable: stretch the last syllable.
        if n - end < gap + (0.12 * RATE) as usize {
            end = n;
        }
        let f0 = rng.range(100.0, 220.0);
        let glide = rng.range(-0.25, 0.25);
        let voiced = rng.uniform() < 0.85;
        let amp = rng.range(0.5, 1.0);
        let mut formants = [
            Resonator::new(rng.range(300.0, 900.0), 90.0),
            Resonator::new(rng.range(900.0, 2_400.0), 130.0),
            Resonator::new(rng.range(2_400.0, 3_300.0), 200.0),
        ];
        let weights = [1.0, 0.6, 0.25];
        let dur = end - t;
        let mut phase = rng.uniform();
        for (i, slot) in raw[t..end].iter_mut().enumerate() {
            let excitation = if voiced {
                phase += f0 * (1.0 + glide * i as f64 / dur as f64) / RATE;
                if phase >= 1.0 {
                    phase -= 1.0;
                    1.0
                } else {
                    0.02 * rng.gauss()
                }
            } else {
                0.3 * rng.gauss()
            };
            let mut y = 0.0;
            for (f, w) in formants.iter_mut().zip(weights) {
                y += w * f.step(excitation);
            }
            let env = (i.min(dur - 1 - i) as f64 / ramp as f64).clamp(0.05, 1.0);
            *slot = amp * env * y;
        }
        t = end + gap;
    }
    scale_to(&raw, rms_dbfs, out);
}

/// A test/bench signal built piece by piece, remembering where the speech is.
#[derive(Debug, Clone)]
pub struct SignalBuilder {
    rng: Rng,
    /// The samples so far (8 kHz).
    pub pcm: Vec<i16>,
    /// `(start_ms, end_ms)` of each speech piece.
    pub speech: Vec<(u64, u64)>,
}

impl SignalBuilder {
    pub fn new(seed: u64) -> Self {
        Self { rng: Rng::new(seed), pcm: Vec::new(), speech: Vec::new() }
    }

    fn samples(ms: u64) -> usize {
        (ms * 8) as usize
    }

    /// Current length in ms.
    pub fn len_ms(&self) -> u64 {
        self.pcm.len() as u64 / 8
    }

    /// Digital silence.
    pub fn silence(mut self, ms: u64) -> Self {
        self.pcm.resize(self.pcm.len() + Self::samples(ms), 0);
        self
    }

    /// Steady white noise.
    pub fn noise(mut self, ms: u64, rms_dbfs: f64) -> Self {
        white_noise(&mut self.rng, Self::samples(ms), rms_dbfs, &mut self.pcm);
        self
    }

    /// A speech-like utterance.
    pub fn speech(mut self, ms: u64, rms_dbfs: f64) -> Self {
        let start = self.len_ms();
        speech_like(&mut self.rng, Self::samples(ms), rms_dbfs, &mut self.pcm);
        self.speech.push((start, start + ms));
        self
    }

    /// Adds white noise at `rms_dbfs` under everything so far (a noisy line).
    pub fn with_background(mut self, rms_dbfs: f64) -> Self {
        let rms = dbfs_to_rms(rms_dbfs);
        for s in self.pcm.iter_mut() {
            *s = to_i16(*s as f64 + self.rng.gauss() * rms);
        }
        self
    }

    /// The signal as mu-law bytes.
    pub fn mulaw(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.pcm.len());
        mulaw::encode_into(&self.pcm, &mut out);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rms_dbfs(x: &[i16]) -> f64 {
        let e: f64 = x.iter().map(|&v| (v as f64).powi(2)).sum::<f64>() / x.len() as f64;
        10.0 * (e / (32_768.0f64 * 32_768.0)).log10()
    }

    #[test]
    fn levels_and_determinism() {
        let a = SignalBuilder::new(7).speech(1_000, -20.0).noise(500, -40.0);
        let b = SignalBuilder::new(7).speech(1_000, -20.0).noise(500, -40.0);
        assert_eq!(a.pcm, b.pcm);
        assert_eq!(a.pcm.len(), 12_000);
        assert_eq!(a.speech, vec![(0, 1_000)]);
        assert!((rms_dbfs(&a.pcm[..8_000]) + 20.0).abs() < 0.1);
        assert!((rms_dbfs(&a.pcm[8_000..]) + 40.0).abs() < 0.5);
        // Speech edges are loud: the first and last 20 ms carry real energy.
        assert!(rms_dbfs(&a.pcm[..160]) > -40.0);
        assert!(rms_dbfs(&a.pcm[8_000 - 160..8_000]) > -40.0);
    }
}
