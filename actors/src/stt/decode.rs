//! Greedy or beam-search decoding with Whisper's safeguards, and the tokenizer.
//!
//! [`Transcriber`] owns the model ([`super::model::Whisper`]), the tokenizer and the mel front
//! end, and turns 16 kHz mono `f32` clips into [`Transcription`]s:
//!
//! 1. clips longer than 30 s are cut into ≤ 30 s pieces at the quietest point of the last 10 s
//!    of each piece, decoded separately and joined;
//! 2. pieces are batched (up to [`DecodeOptions::max_batch`], similar lengths together), their
//!    log-mel computed with zeros after the audio to the encoder length chosen by
//!    [`DecodeOptions::encoder_frames`], and encoded on that length (not 30 s);
//! 3. the prompt is `<|startoftranscript|><|notimestamps|>` (English-only model: no language or
//!    task token); the no-speech probability is the softmax probability of `<|nocaptions|>`
//!    (`<|nospeech|>` in newer vocabularies) at the start-of-transcript position, as in Whisper;
//! 4. greedy decoding, or beam search ([`DecodeOptions::beam_size`]; Whisper's, patience 1, the
//!    hypotheses of a piece sharing its encoder output), with the token suppression of Whisper
//!    (`suppress_ids` of `config.json` at every step, `suppress_ids_begin` — blank and
//!    end-of-text — at the first step, and every special or timestamp token, i.e. every id after
//!    end-of-text), stopping at end-of-text, at a token loop, or at a token budget proportional
//!    to the audio length;
//! 5. silence is dropped (empty text, [`Transcription::rejected`] = `no_speech`) on Whisper's
//!    no-speech rule or a stricter one (no-speech probability above 0.7 alone), or on a text
//!    without a letter or digit: silence and noise give no text;
//! 6. speech is never dropped: a piece that loops, runs past its token budget, compresses
//!    (zlib) by more than 2.4 or averages a log-probability below −1 is decoded again with
//!    Whisper's temperature fallback (sampling at 0.2, 0.4, … 1.0, from a generator seeded by
//!    the audio itself, so a replay samples the same); the first attempt that passes is kept,
//!    else the best one (highest average log-probability), with a loop cut to one copy and the
//!    doubt named in [`Transcription::doubt`].
//!
//! [`Transcriber::load`] quantizes the decoder's weights to 8 bits
//! ([`DEFAULT_DECODER_QUANTIZATION`]); the encoder stays `f32`.
//!
//! Threads: candle runs matrix products on its own global pool sized to the physical cores
//! (`CANDLE_NUM_THREADS` / `RAYON_NUM_THREADS` override it). Run one `Transcriber` per machine
//! with few cores, on a dedicated thread (never on the async runtime): the calls block for tens
//! to hundreds of milliseconds, and two transcribers in parallel on 2 cores only contend.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use candle_core::quantized::GgmlDType;
use candle_core::{DType, Device, Tensor, D};
use candle_nn::VarBuilder;
use tokenizers::Tokenizer;

use super::mel::{self, MelFrontend, HOP_LENGTH, N_MELS, SAMPLE_RATE};
use super::model::{DecoderState, ModelError, Whisper};
use super::weights::{self, WeightsError};

/// The decoder weight format [`Transcriber::load`] uses: 8-bit blocks of 32 with an `f16` scale.
/// Decoding a token is memory-bound matrix–vector work, 3–4× faster than `f32` on the 2-core
/// target, with the same word error rate on the telephone corpus.
pub const DEFAULT_DECODER_QUANTIZATION: GgmlDType = GgmlDType::Q8_0;

/// Samples in Whisper's 30 s window.
const MAX_PIECE_SAMPLES: usize = 30 * SAMPLE_RATE;

/// Errors of loading the transcriber or transcribing.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    /// The weights or `config.json` could not be loaded.
    #[error(transparent)]
    Weights(#[from] WeightsError),
    /// `tokenizer.json` is missing.
    #[error("missing file {path} (run nodes/deploy/fetch-model.sh to fetch the model)")]
    MissingTokenizer {
        /// The file looked for.
        path: PathBuf,
    },
    /// `tokenizer.json` could not be parsed.
    #[error("{path}: not a usable tokenizers JSON file: {message}")]
    Tokenizer {
        /// The file.
        path: PathBuf,
        /// What the tokenizers crate reported.
        message: String,
    },
    /// A special token Whisper needs is not in the tokenizer, or does not fit the model.
    #[error("{path}: {message}")]
    Vocabulary {
        /// The tokenizer file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// The model could not be built or run.
    #[error(transparent)]
    Model(#[from] ModelError),
    /// The audio holds a sample that is not a finite number.
    #[error("clip {clip}: sample {sample} is not finite")]
    NonFinite {
        /// Index of the clip in the batch.
        clip: usize,
        /// Index of the sample in the clip.
        sample: usize,
    },
    /// The tokenizer could not turn the tokens back into text.
    #[error("detokenizing: {0}")]
    Detokenize(String),
    /// The caller cancelled the work ([`Transcriber::transcribe_batch_unless`]).
    #[error("cancelled")]
    Cancelled,
}

impl From<candle_core::Error> for DecodeError {
    fn from(e: candle_core::Error) -> Self {
        DecodeError::Model(ModelError::Tensor(e))
    }
}

/// Decoding settings. The defaults are Whisper's (thresholds) and measured choices (encoder
/// length, loop detection, budget, strict no-speech rule).
#[derive(Debug, Clone, PartialEq)]
pub struct DecodeOptions {
    /// Most tokens sampled for one ≤ 30 s piece (Whisper: 224, half the text context).
    pub max_tokens: usize,
    /// Token budget per second of audio; running past `min_tokens + tokens_per_second × seconds`
    /// without end-of-text is a runaway and rejected as `"repetition"`.
    pub tokens_per_second: f32,
    /// Token budget of a piece whatever its length (see `tokens_per_second`).
    pub min_tokens: usize,
    /// Whisper's no-speech rule: reject when the no-speech probability is above this **and** the
    /// average log-probability is below `logprob_threshold` (or that threshold is `None`).
    pub no_speech_threshold: Option<f32>,
    /// Reject when the no-speech probability is above this, whatever the log-probability.
    /// Whisper keeps a confident transcript of a window its no-speech token flags (the rule
    /// above), which lets its classic hallucination through: digital silence decodes as "you"
    /// with a no-speech probability of 0.99 and an average log-probability of −0.67. A segment
    /// from the voice-activity detector is short, so the flag concerns the whole of it.
    /// Measured on telephone-band audio: 252 synthetic utterances (6 voices) peak at 0.53;
    /// silence, white noise (−60 to −20 dBFS), a dial tone and a speech-like synthetic signal
    /// are all ≥ 0.79.
    pub no_speech_strict_threshold: Option<f32>,
    /// Reject when the average log-probability of the sampled tokens (end-of-text included) is
    /// below this.
    pub logprob_threshold: Option<f32>,
    /// Reject when the text compresses (zlib) by more than this ratio (repetitive text).
    pub compression_ratio_threshold: Option<f32>,
    /// Suppress blank and end-of-text as the first token (Whisper's `suppress_blank`).
    pub suppress_blank: bool,
    /// Longest token n-gram whose back-to-back repetition counts as a loop.
    pub loop_max_ngram: usize,
    /// Fewest back-to-back copies of an n-gram that make a loop.
    pub loop_min_repeats: usize,
    /// Fewest tokens a loop spans (so short n-grams must repeat more: 1-gram ×20, 2-gram ×10,
    /// 3-gram ×7, 4-gram ×5, longer ×4 with the defaults).
    pub loop_min_span: usize,
    /// Stop, and cut off the repeat, when the transcript starts over: its last
    /// `restart_min_tokens` tokens equal its first ones (0 disables). A decoder given less than
    /// 30 s of encoder context sometimes transcribes the clip again instead of ending.
    pub restart_min_tokens: usize,
    /// The encoder sees at least this many mel frames (10 ms each; 3000 = Whisper's 30 s).
    ///
    /// Measured on 84 telephone clips of 1.5–5 s (tiny.en, greedy): 30 s windows (3000) give a
    /// word error rate of 0.248 at 0.78 s per audio second; 1000 frames + 100 of padding 0.195
    /// at 0.22 s/s; the audio + 50 frames alone 0.203 at 0.095 s/s, but only with the restart
    /// cut-off (`restart_min_tokens`; without it, at audio + 100 frames, 29 of the 84 clips
    /// were transcribed over and over and rejected) and with lower confidence (average
    /// log-probability about 0.1 lower). Measured again with the restart cut-off on 72 clips of
    /// three engines (`bench_stt`, 2026-12-06): greedy on the audio + 100 frames 16.7 % at 10.8×
    /// real time against 16.0 % at 6.5× with the 10 s minimum; beam 3 12.5 % at 7.6× against
    /// 13.5 % at 4.7×. But end to end (segments with pre-roll and the VAD's hangover) the short
    /// window transcribed some segments over and over with a changed first word ("The total
    /// came to forty five dollars. the total came to …"), which neither the loop nor the restart
    /// check caught then: flite slt went from under 15 % to 21.9 % in `stt_accuracy`. The restart
    /// check now catches a restart after a sentence end with its first word or two changed, and
    /// with it `stt_accuracy` scores 12.4 % (flite slt 11.8 %) on the audio alone against 10.9 %
    /// with the 10 s minimum; end to end the audio alone makes finals faster at every load
    /// (BENCHMARKS.md, "Early-stopping beams"), so the default is 0: the audio and 1 s.
    pub min_encoder_frames: usize,
    /// Mel frames of silence appended after the audio before encoding.
    pub encoder_pad_frames: usize,
    /// The encoder length is rounded up to a multiple of this many frames (100 = 1 s). Pieces
    /// are batched only with pieces of the same encoder length, so a piece's transcript does not
    /// depend on what else was in its batch: a replay decoding it alone gets the same text.
    pub encoder_frames_step: usize,
    /// Most pieces encoded and decoded together.
    pub max_batch: usize,
    /// Whisper's temperature fallback: a piece that fails the checks (loop, budget, compression
    /// ratio, log-probability) is decoded again at each of these in turn (sampling); empty
    /// disables it.
    pub fallback_temperatures: Vec<f32>,
    /// Hypotheses kept by beam search at temperature 0 (Whisper's `beam_size`, patience 1:
    /// a piece ends when this many hypotheses reached end-of-text, and the one with the best
    /// average log-probability per token wins); 1 decodes greedily. The fallback temperatures
    /// sample, as in Whisper. On 72 clips of three engines (`bench_stt`, 2026-12-06), with the
    /// encoder on the audio: greedy 16.3 %, beam 3 13.5 % word error rate at 23.8× and 16.4× real
    /// time (faster-whisper beam 5 on the same weights: 14.5 %, at 4.7×). With early stopping
    /// ([`DecodeOptions::beam_early_stop`]) beam 3 is also fast end to end (one call's final
    /// 720 ms p50, 12 calls' 1,053 ms). Default 3.
    pub beam_size: usize,
    /// Beam search ends a piece as soon as its most likely continuation is end-of-text, instead
    /// of waiting for `beam_size` hypotheses to end (Whisper's patience 1): every live hypothesis then has a lower total log-probability than one
    /// that ended, and on a segment that ends in silence the others would otherwise run on
    /// through it to the token budget.
    pub beam_early_stop: bool,
    /// Vocabulary hints (Twilio's `hints`): words and phrases the speech is likely to hold,
    /// given to the decoder as Whisper's initial prompt (`<|startofprev|>` and the text before
    /// `<|startoftranscript|>`; its last 223 tokens). Empty: no prompt.
    pub hints: String,
    /// Write runs of three or more spoken digits as digits (`four seven two nine one` →
    /// `47291`; see [`super::numbers`]).
    pub digit_strings: bool,
}

impl Default for DecodeOptions {
    fn default() -> Self {
        Self {
            max_tokens: 224,
            tokens_per_second: 12.0,
            min_tokens: 12,
            no_speech_threshold: Some(0.6),
            no_speech_strict_threshold: Some(0.7),
            logprob_threshold: Some(-1.0),
            compression_ratio_threshold: Some(2.4),
            suppress_blank: true,
            loop_max_ngram: 32,
            loop_min_repeats: 4,
            loop_min_span: 20,
            restart_min_tokens: 6,
            min_encoder_frames: 0,
            encoder_pad_frames: 100,
            encoder_frames_step: 100,
            max_batch: 4,
            fallback_temperatures: vec![0.2, 0.4, 0.6, 0.8, 1.0],
            beam_size: 3,
            beam_early_stop: true,
            hints: String::new(),
            digit_strings: false,
        }
    }
}

impl DecodeOptions {
    /// Mel frames the encoder runs on for a piece of `frames` frames of audio: the audio plus
    /// `encoder_pad_frames`, rounded up to a multiple of `encoder_frames_step`, at least
    /// `min_encoder_frames`, even, at most `max_frames`.
    pub fn encoder_frames(&self, frames: usize, max_frames: usize) -> usize {
        let want = (frames + self.encoder_pad_frames).next_multiple_of(self.encoder_frames_step.max(1));
        let want = want.max(self.min_encoder_frames);
        let even = want + want % 2;
        even.clamp(2, max_frames.max(2))
    }

    /// Token budget of a piece of `samples` samples (16 kHz).
    pub fn token_budget(&self, samples: usize) -> usize {
        let secs = samples as f32 / SAMPLE_RATE as f32;
        let budget = self.min_tokens as f32 + self.tokens_per_second * secs;
        (budget.ceil() as usize).clamp(1, self.max_tokens.max(1))
    }
}

/// The transcript of one clip.
#[derive(Debug, Clone, PartialEq)]
pub struct Transcription {
    /// The text, trimmed; empty when rejected.
    pub text: String,
    /// The text tokens (no special tokens); empty when rejected.
    pub tokens: Vec<u32>,
    /// Average log-probability of the sampled tokens, end-of-text included (Whisper's
    /// `avg_logprob`); for a clip cut in pieces, over the pieces kept.
    pub avg_logprob: f32,
    /// Probability of the no-speech token at the start-of-transcript position; for a clip cut in
    /// pieces, the duration-weighted mean over the pieces kept.
    pub no_speech_prob: f32,
    /// zlib compression ratio of the decoded text (bytes / compressed bytes).
    pub compression_ratio: f32,
    /// Why the text was dropped: `"no_speech"` (silence or noise); `None` when kept.
    pub rejected: Option<&'static str>,
    /// Kept, but no attempt passed the checks: `"repetition"`, `"compression_ratio"` or
    /// `"low_logprob"` (the best attempt's reason).
    pub doubt: Option<&'static str>,
}

/// Why greedy decoding of a piece stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Stop {
    EndOfText,
    /// The transcript started over (a restart was cut off); the first copy is kept.
    Restart,
    Loop,
    Budget,
}

/// Raw decoding result of one ≤ 30 s piece.
#[derive(Debug, Clone)]
struct Piece {
    clip: usize,
    start: usize,
    samples: usize,
    tokens: Vec<u32>,
    /// Sum of the log-probabilities counted in `avg_logprob` and how many there are.
    sum_logprob: f32,
    n_logprob: usize,
    no_speech_prob: f32,
    stop: Stop,
}

/// A piece's verdict under the checks.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Verdict {
    Pass,
    /// Silence or noise: no text.
    NoSpeech,
    /// Speech the checks doubt: decoded again at a higher temperature, or kept flagged.
    Doubt(&'static str),
}

/// A decoded piece with its text and numbers.
struct Judged {
    piece: Piece,
    text: String,
    avg: f32,
    ratio: f32,
    verdict: Verdict,
}

/// Whisper's special token ids, from the tokenizer.
#[derive(Debug, Clone, Copy)]
struct Specials {
    sot: u32,
    eot: u32,
    no_speech: u32,
    /// `<|startofprev|>`, which opens a prompt.
    prev: u32,
}

/// Whisper tiny.en (or any English-only Whisper) with its tokenizer and mel front end.
pub struct Transcriber {
    model: Whisper,
    tokenizer: Tokenizer,
    mel: MelFrontend,
    options: DecodeOptions,
    specials: Specials,
    /// Added to the logits at every step: 0, or −∞ for a suppressed id; `(vocab,)`.
    suppress: Tensor,
    /// The same with blank and end-of-text also suppressed (first step, `suppress_blank`).
    suppress_begin: Tensor,
    /// Fed after start-of-transcript: `<|notimestamps|>`, after `<|en|><|transcribe|>` for a
    /// multilingual model (English forced).
    after_sot: Vec<u32>,
    /// Per token id: its text ends a sentence (`.`, `?`, `!`), for [`restart_at`].
    sentence_end: Vec<bool>,
    mel_scratch: Vec<f32>,
    timings: Timings,
    /// The first decoder step's tokens before `<|startoftranscript|>`: empty, or
    /// `<|startofprev|>` and the hints' tokens.
    prompt: Vec<u32>,
}

/// Where transcription time went, accumulated since load or [`Transcriber::take_timings`].
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Timings {
    /// Log-mel computation.
    pub mel: std::time::Duration,
    /// Audio encoder (including the padding chosen by [`DecodeOptions::encoder_frames`]).
    pub encoder: std::time::Duration,
    /// Decoder: cross-attention set-up and every step, with the token choice.
    pub decoder: std::time::Duration,
    /// Of `decoder`: the cross-attention keys and values of the encoder output (once per batch).
    pub decoder_setup: std::time::Duration,
    /// Of `decoder`: the model's steps (the rest is choosing tokens and the checks).
    pub decoder_model: std::time::Duration,
    /// Seconds of audio transcribed.
    pub audio_seconds: f64,
    /// Mel frames the encoder ran on, summed over batch rows.
    pub encoder_frames: usize,
    /// Decoder steps run (a step feeds one token to every row of a batch).
    pub decoder_steps: usize,
    /// Tokens decoded, summed over rows (prompt included).
    pub tokens: usize,
    /// Pieces (≤ 30 s) decoded.
    pub pieces: usize,
    /// Pieces decoded again by the temperature fallback (one per retry).
    pub fallbacks: usize,
}

impl std::fmt::Debug for Transcriber {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Transcriber")
            .field("config", self.model.config())
            .field("options", &self.options)
            .finish_non_exhaustive()
    }
}

impl Transcriber {
    /// Loads `model.bin`, `config.json` and `tokenizer.json` from a CTranslate2 Whisper
    /// directory (as fetched by `nodes/deploy/fetch-model.sh`) on the CPU: the encoder in `f32`,
    /// the decoder's weights quantized to 8 bits ([`DEFAULT_DECODER_QUANTIZATION`]).
    pub fn load(model_dir: &Path) -> Result<Self, DecodeError> {
        Self::load_with(model_dir, Some(DEFAULT_DECODER_QUANTIZATION))
    }

    /// Like [`Transcriber::load`], choosing the decoder's weight format: `None` keeps `f32`,
    /// `Some(dtype)` quantizes (see [`Whisper::quantize_decoder`]).
    pub fn load_with(model_dir: &Path, decoder_quantization: Option<GgmlDType>) -> Result<Self, DecodeError> {
        // The tokenizer first: it is quick to read, the weights are not.
        let path = model_dir.join("tokenizer.json");
        if !path.is_file() {
            return Err(DecodeError::MissingTokenizer { path });
        }
        let tokenizer = Tokenizer::from_file(&path)
            .map_err(|e| DecodeError::Tokenizer { path: path.clone(), message: e.to_string() })?;

        let device = Device::Cpu;
        let (tensors, _dims, config) = weights::load_whisper(model_dir, DType::F32, &device)?;
        let ct2 = weights::read_whisper_config(model_dir)?;
        let vb = VarBuilder::from_tensors(tensors, DType::F32, &device);
        let mut model = Whisper::load(vb, &config)?;
        if let Some(dtype) = decoder_quantization {
            model.quantize_decoder(dtype)?;
        }
        let vocab = config.vocab_size;
        let id = |names: &[&str]| -> Result<u32, DecodeError> {
            let found = names.iter().find_map(|n| tokenizer.token_to_id(n));
            match found {
                Some(id) if (id as usize) < vocab => Ok(id),
                Some(id) => Err(DecodeError::Vocabulary {
                    path: path.clone(),
                    message: format!("token {} has id {id}, outside the model's {vocab} ids", names[0]),
                }),
                None => Err(DecodeError::Vocabulary {
                    path: path.clone(),
                    message: format!("no token {} (not a Whisper tokenizer?)", names.join(" or ")),
                }),
            }
        };
        // A multilingual model (Whisper's test: at least 51,865 ids) is told the language and
        // the task; an English-only one has neither token in its prompt.
        let after_sot = if vocab >= 51_865 {
            vec![id(&["<|en|>"])?, id(&["<|transcribe|>"])?, id(&["<|notimestamps|>"])?]
        } else {
            vec![id(&["<|notimestamps|>"])?]
        };
        let specials = Specials {
            sot: id(&["<|startoftranscript|>"])?,
            eot: id(&["<|endoftext|>"])?,
            no_speech: id(&["<|nospeech|>", "<|nocaptions|>"])?,
            prev: id(&["<|startofprev|>"])?,
        };
        // Every step: config.json's suppress_ids, and every id after end-of-text (start of
        // transcript, language and task tokens, no-speech, no-timestamps, timestamps).
        let mut suppress = vec![false; vocab];
        for &t in &config.suppress_tokens {
            if let Some(s) = suppress.get_mut(t as usize) {
                *s = true;
            }
        }
        for s in suppress.iter_mut().skip(specials.eot as usize + 1) {
            *s = true;
        }
        let begin_ids = if ct2.suppress_ids_begin.is_empty() {
            let mut v = tokenizer.encode(" ", false).map(|e| e.get_ids().to_vec()).unwrap_or_default();
            v.push(specials.eot);
            v
        } else {
            ct2.suppress_ids_begin.clone()
        };
        let mut begin = suppress.clone();
        for &t in &begin_ids {
            if let Some(s) = begin.get_mut(t as usize) {
                *s = true;
            }
        }
        let bias = |mask: &[bool]| {
            let v: Vec<f32> = mask.iter().map(|&s| if s { f32::NEG_INFINITY } else { 0.0 }).collect();
            Tensor::from_vec(v, mask.len(), &device)
        };
        let suppress_begin = bias(&begin)?;
        let suppress = bias(&suppress)?;
        let sentence_end = (0..specials.eot)
            .map(|id| tokenizer.id_to_token(id).is_some_and(|t| t.ends_with(['.', '?', '!'])))
            .collect();
        Ok(Self {
            model,
            tokenizer,
            mel: MelFrontend::new(),
            options: DecodeOptions::default(),
            specials,
            suppress,
            suppress_begin,
            after_sot,
            sentence_end,
            mel_scratch: Vec::new(),
            timings: Timings::default(),
            prompt: Vec::new(),
        })
    }

    /// The decoding options in use.
    pub fn options(&self) -> &DecodeOptions {
        &self.options
    }

    /// Replaces the decoding options.
    pub fn set_options(&mut self, options: DecodeOptions) {
        if options.hints != self.options.hints {
            self.prompt = self.prompt_for(&options.hints);
        }
        self.options = options;
    }

    /// `<|startofprev|>` and the last 223 tokens of `" " + hints` (Whisper's initial prompt);
    /// empty for empty hints.
    fn prompt_for(&self, hints: &str) -> Vec<u32> {
        let hints = hints.trim();
        if hints.is_empty() {
            return Vec::new();
        }
        let max = (self.model.config().max_target_positions / 2).saturating_sub(1);
        let ids = self.tokenizer.encode(format!(" {hints}"), false).map(|e| e.get_ids().to_vec()).unwrap_or_default();
        let vocab = self.model.config().vocab_size as u32;
        let ids: Vec<u32> = ids.into_iter().filter(|&t| t < self.specials.eot && t < vocab).collect();
        let tail = &ids[ids.len().saturating_sub(max)..];
        std::iter::once(self.specials.prev).chain(tail.iter().copied()).collect()
    }

    /// The model.
    pub fn model(&self) -> &Whisper {
        &self.model
    }

    /// Returns the accumulated [`Timings`] and resets them.
    pub fn take_timings(&mut self) -> Timings {
        std::mem::take(&mut self.timings)
    }

    /// Transcribes one clip of 16 kHz mono audio in [-1, 1].
    pub fn transcribe(&mut self, pcm_16k: &[f32]) -> Result<Transcription, DecodeError> {
        let mut v = self.transcribe_batch(&[pcm_16k])?;
        v.pop().ok_or_else(|| DecodeError::Detokenize("no result for the clip".into()))
    }

    /// Transcribes several clips; pieces of similar length are encoded and decoded together in
    /// batches of up to [`DecodeOptions::max_batch`]. Results are in the order of `clips`.
    pub fn transcribe_batch(&mut self, clips: &[&[f32]]) -> Result<Vec<Transcription>, DecodeError> {
        self.transcribe_batch_unless(clips, None)
    }

    /// Like [`Transcriber::transcribe_batch`], but gives up with [`DecodeError::Cancelled`] as
    /// soon as `cancel` is set (checked before the encoder and at every decoder step), so work
    /// that became pointless stops within one step.
    pub fn transcribe_batch_unless(
        &mut self,
        clips: &[&[f32]],
        cancel: Option<&AtomicBool>,
    ) -> Result<Vec<Transcription>, DecodeError> {
        for (c, clip) in clips.iter().enumerate() {
            if let Some(s) = clip.iter().position(|x| !x.is_finite()) {
                return Err(DecodeError::NonFinite { clip: c, sample: s });
            }
        }
        // Pieces of ≤ 30 s, longest first so batches hold similar lengths.
        let mut spans: Vec<(usize, std::ops::Range<usize>)> = Vec::new();
        for (c, clip) in clips.iter().enumerate() {
            for r in split_points(clip, MAX_PIECE_SAMPLES) {
                if mel::frames_for(r.len()) > 0 {
                    spans.push((c, r));
                }
            }
        }
        spans.sort_by_key(|s| std::cmp::Reverse(s.1.len()));
        let max_frames = self.model.max_frames();
        let mut pieces: Vec<Piece> = Vec::with_capacity(spans.len());
        for chunk in self.batches(&spans, |(_, r)| r.len(), max_frames) {
            let audio: Vec<(usize, usize, &[f32])> = chunk
                .iter()
                .map(|(c, r)| {
                    let a = clips.get(*c).and_then(|clip| clip.get(r.clone())).unwrap_or(&[]);
                    (*c, r.start, a)
                })
                .collect();
            pieces.extend(self.decode_pieces(&audio, 0.0, cancel)?);
        }
        let mut judged = pieces.into_iter().map(|p| self.judge(p)).collect::<Result<Vec<_>, _>>()?;
        // Whisper's temperature fallback for the pieces the checks doubt; the first attempt that
        // passes wins, else the best so far stays.
        let temperatures = self.options.fallback_temperatures.clone();
        for t in temperatures {
            let retry: Vec<usize> =
                (0..judged.len()).filter(|&i| matches!(judged[i].verdict, Verdict::Doubt(_))).collect();
            if retry.is_empty() {
                break;
            }
            for chunk in self.batches(&retry, |&i| judged[i].piece.samples, max_frames) {
                let audio: Vec<(usize, usize, &[f32])> = chunk
                    .iter()
                    .map(|&i| {
                        let p = &judged[i].piece;
                        let a = clips.get(p.clip).and_then(|c| c.get(p.start..p.start + p.samples)).unwrap_or(&[]);
                        (p.clip, p.start, a)
                    })
                    .collect();
                let again = self.decode_pieces(&audio, t, cancel)?;
                for (&i, p) in chunk.iter().zip(again) {
                    let j = self.judge(p)?;
                    let better = match j.verdict {
                        Verdict::Pass => true,
                        Verdict::Doubt(_) => j.avg > judged[i].avg,
                        // A re-sample that reads as silence does not make speech silent.
                        Verdict::NoSpeech => false,
                    };
                    if better {
                        judged[i] = j;
                    }
                }
            }
            self.timings.fallbacks += retry.len();
        }
        let mut per_clip: Vec<Vec<Judged>> = (0..clips.len()).map(|_| Vec::new()).collect();
        for j in judged {
            if let Some(v) = per_clip.get_mut(j.piece.clip) {
                v.push(j);
            }
        }
        let mut out = Vec::with_capacity(clips.len());
        for mut ps in per_clip {
            // Restore time order (spans were sorted by length).
            ps.sort_by_key(|j| j.piece.start);
            let mut t = finish(ps);
            if self.options.digit_strings {
                t.text = super::numbers::join_digit_runs(&t.text);
            }
            out.push(t);
        }
        Ok(out)
    }

    /// Encodes and decodes a batch of ≤ 30 s pieces `(clip index, start, audio)`: greedily at
    /// temperature 0, else sampling at `temperature` from a generator seeded by each piece's audio.
    fn decode_pieces(
        &mut self,
        audio: &[(usize, usize, &[f32])],
        temperature: f32,
        cancel: Option<&AtomicBool>,
    ) -> Result<Vec<Piece>, DecodeError> {
        let cancelled = || cancel.is_some_and(|c| c.load(Ordering::Relaxed));
        let b = audio.len();
        if b == 0 {
            return Ok(Vec::new());
        }
        if cancelled() {
            return Err(DecodeError::Cancelled);
        }
        let max_frames = self.model.max_frames();
        let t0 = std::time::Instant::now();
        let longest = audio.iter().map(|(_, _, a)| mel::frames_for(a.len())).max().unwrap_or(0);
        let frames = self.options.encoder_frames(longest, max_frames);
        let mut batch = Vec::with_capacity(b * N_MELS * frames);
        for (_, _, a) in audio {
            self.mel.compute_padded(a, frames, &mut self.mel_scratch);
            batch.extend_from_slice(&self.mel_scratch);
        }
        let mel = Tensor::from_vec(batch, (b, N_MELS, frames), self.model.device())?;
        let t1 = std::time::Instant::now();
        let enc = self.model.encode(&mel)?;
        let t2 = std::time::Instant::now();
        let mut st = self.model.decoder_start(&enc)?;
        self.timings.decoder_setup += t2.elapsed();
        let mut steps = 2usize;
        let mut fed = (2 + self.prompt.len()) * b;

        let sp = self.specials;
        // The prompt (hints) and start-of-transcript in one step; its last position's logits
        // give the no-speech probability.
        let row: Vec<u32> = self.prompt.iter().copied().chain(std::iter::once(sp.sot)).collect();
        let first = self.step(&mut st, &row.repeat(b))?;
        let no_speech = candle_nn::ops::softmax_last_dim(&first)?
            .narrow(1, sp.no_speech as usize, 1)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        let mut logits = self.step(&mut st, &self.after_sot.repeat(b))?;
        fed += (self.after_sot.len() - 1) * b;

        let budgets: Vec<usize> = audio.iter().map(|(_, _, a)| self.options.token_budget(a.len())).collect();
        let max_ctx = self.model.config().max_target_positions;
        if temperature <= 0.0 && self.options.beam_size > 1 {
            let (found, beam_steps, beam_fed) = self.beam_search(st, logits, &budgets, cancel)?;
            let t3 = std::time::Instant::now();
            self.account(audio, frames, t0, t1, t2, t3, steps + beam_steps, fed + beam_fed);
            return Ok(audio
                .iter()
                .zip(found)
                .zip(no_speech)
                .map(|(((clip, start, a), h), no_speech_prob)| Piece {
                    clip: *clip,
                    start: *start,
                    samples: a.len(),
                    sum_logprob: h.sum,
                    n_logprob: h.lps.len() + usize::from(h.stop == Stop::EndOfText),
                    tokens: h.tokens,
                    no_speech_prob,
                    stop: h.stop,
                })
                .collect());
        }
        let mut tokens: Vec<Vec<u32>> = vec![Vec::new(); b];
        let mut lps: Vec<Vec<f32>> = vec![Vec::new(); b];
        let mut eot_lp: Vec<Option<f32>> = vec![None; b];
        let mut stop = vec![Stop::Budget; b];
        let mut active: Vec<usize> = (0..b).collect();
        let mut rngs: Vec<SplitMix64> = if temperature > 0.0 {
            audio.iter().map(|(_, _, a)| SplitMix64::seeded(a, temperature)).collect()
        } else {
            Vec::new()
        };
        let mut step = 0usize;
        loop {
            let bias = if step == 0 && self.options.suppress_blank { &self.suppress_begin } else { &self.suppress };
            let picks = if temperature > 0.0 {
                sample_pick(&logits, bias, temperature, &mut rngs, &active)?
            } else {
                greedy_pick(&logits, bias)?
            };
            let mut keep = Vec::with_capacity(active.len());
            let mut next = Vec::with_capacity(active.len());
            for (i, (&(tok, lp), &p)) in picks.iter().zip(&active).enumerate() {
                if tok == sp.eot {
                    eot_lp[p] = Some(lp);
                    stop[p] = Stop::EndOfText;
                    continue;
                }
                tokens[p].push(tok);
                lps[p].push(lp);
                if let Some(cut) = restart_at(&tokens[p], self.options.restart_min_tokens, &self.sentence_end) {
                    tokens[p].truncate(cut);
                    lps[p].truncate(cut);
                    stop[p] = Stop::Restart;
                    continue;
                }
                if let Some((n, span)) = loop_at(&tokens[p], &self.options) {
                    // Keep one copy of the repeated n-gram.
                    let keep_len = tokens[p].len() - span + n;
                    tokens[p].truncate(keep_len);
                    lps[p].truncate(keep_len);
                    stop[p] = Stop::Loop;
                    continue;
                }
                if tokens[p].len() >= budgets[p] || st.len() + 1 > max_ctx {
                    stop[p] = Stop::Budget;
                    continue;
                }
                keep.push(i);
                next.push(tok);
            }
            if keep.is_empty() {
                break;
            }
            if cancelled() {
                return Err(DecodeError::Cancelled);
            }
            if keep.len() != active.len() {
                st.retain(&keep)?;
                active = keep.iter().map(|&i| active[i]).collect();
            }
            fed += next.len();
            steps += 1;
            logits = self.step(&mut st, &next)?;
            step += 1;
        }
        let t3 = std::time::Instant::now();
        self.account(audio, frames, t0, t1, t2, t3, steps, fed);
        Ok(audio
            .iter()
            .enumerate()
            .map(|(p, (clip, start, a))| Piece {
                clip: *clip,
                start: *start,
                samples: a.len(),
                tokens: std::mem::take(&mut tokens[p]),
                sum_logprob: lps[p].iter().sum::<f32>() + eot_lp[p].unwrap_or(0.0),
                n_logprob: lps[p].len() + usize::from(eot_lp[p].is_some()),
                no_speech_prob: no_speech[p],
                stop: stop[p],
            })
            .collect())
    }

    /// Cuts `items` (longest first) into batches of at most `max_batch` whose pieces (of
    /// `samples(item)` samples) have the same encoder length: a piece decodes as it would alone.
    fn batches<'a, T>(&self, items: &'a [T], samples: impl Fn(&T) -> usize, max_frames: usize) -> Vec<&'a [T]> {
        let len = |t: &T| self.options.encoder_frames(mel::frames_for(samples(t)), max_frames);
        let mut out = Vec::new();
        let mut start = 0;
        for i in 1..=items.len() {
            let cut =
                i == items.len() || i - start >= self.options.max_batch.max(1) || len(&items[i]) != len(&items[start]);
            if cut {
                out.push(&items[start..i]);
                start = i;
            }
        }
        out
    }

    /// One decoder step, timed.
    fn step(&mut self, st: &mut DecoderState, tokens: &[u32]) -> Result<Tensor, DecodeError> {
        let t = std::time::Instant::now();
        let logits = self.model.decode_step(st, tokens)?;
        self.timings.decoder_model += t.elapsed();
        Ok(logits)
    }

    /// Adds one batch's work to the timings.
    #[allow(clippy::too_many_arguments)]
    fn account(
        &mut self,
        audio: &[(usize, usize, &[f32])],
        frames: usize,
        t0: std::time::Instant,
        t1: std::time::Instant,
        t2: std::time::Instant,
        t3: std::time::Instant,
        steps: usize,
        fed: usize,
    ) {
        let tm = &mut self.timings;
        tm.mel += t1 - t0;
        tm.encoder += t2 - t1;
        tm.decoder += t3 - t2;
        tm.audio_seconds += audio.iter().map(|(_, _, a)| a.len() as f64 / SAMPLE_RATE as f64).sum::<f64>();
        tm.encoder_frames += audio.len() * frames;
        tm.decoder_steps += steps;
        tm.tokens += fed;
        tm.pieces += audio.len();
    }

    /// Beam search (Whisper's, patience 1) from the logits after the prompt, one row per piece:
    /// each piece keeps [`DecodeOptions::beam_size`] hypotheses, every step extends each by its
    /// `beam + 1` most likely tokens and keeps the `beam` best continuations by summed
    /// log-probability; one that ends (end-of-text, or a loop or restart, cut as in greedy
    /// decoding) is set aside, and the piece is done when `beam` are, or at its token budget.
    /// The hypotheses of a piece share its encoder output ([`DecoderState::expand`]).
    /// Returns the chosen hypothesis per piece, the decoder steps and the tokens fed.
    fn beam_search(
        &mut self,
        mut st: super::model::DecoderState,
        first: Tensor,
        budgets: &[usize],
        cancel: Option<&AtomicBool>,
    ) -> Result<(Vec<Hyp>, usize, usize), DecodeError> {
        let cancelled = || cancel.is_some_and(|c| c.load(Ordering::Relaxed));
        let beam = self.options.beam_size.max(1);
        let sp = self.specials;
        let max_ctx = self.model.config().max_target_positions;
        let b = budgets.len();
        // Per piece: live hypotheses (slot → hypothesis; `None` pads a slot), ended ones.
        let mut live: Vec<Vec<Option<Hyp>>> = (0..b).map(|_| vec![Some(Hyp::default())]).collect();
        let mut ended: Vec<Vec<Hyp>> = vec![Vec::new(); b];
        // Pieces still decoding, in the state's group order.
        let mut groups: Vec<usize> = (0..b).collect();
        let mut logits = first;
        let (mut steps, mut fed) = (0usize, 0usize);
        let mut step = 0usize;
        loop {
            let bias = if step == 0 && self.options.suppress_blank { &self.suppress_begin } else { &self.suppress };
            let logp = candle_nn::ops::log_softmax(&logits.broadcast_add(bias)?, D::Minus1)?;
            let (rows, vocab) = logp.dims2()?;
            let logp = logp.flatten_all()?.to_vec1::<f32>()?;
            // Row of slot `j` of the piece in group `g`: one row per piece before the first expansion.
            let row_of = |g: usize, j: usize| if step == 0 { g } else { g * beam + j };
            let mut next_groups = Vec::with_capacity(groups.len());
            let mut keep_rows: Vec<usize> = Vec::with_capacity(groups.len() * beam);
            let mut next_tokens: Vec<u32> = Vec::with_capacity(groups.len() * beam);
            for (g, &p) in groups.iter().enumerate() {
                // Candidates: (score, slot, token, logprob), best first; ties by slot, token.
                let mut cands: Vec<(f32, usize, u32, f32)> = Vec::with_capacity(live[p].len() * (beam + 1));
                for (j, h) in live[p].iter().enumerate() {
                    let Some(h) = h else { continue };
                    let r = row_of(g, j);
                    let Some(row) = logp.get(r * vocab..(r + 1) * vocab) else {
                        return Err(DecodeError::Detokenize(format!("beam row {r} outside {rows} logits rows")));
                    };
                    for (tok, lp) in top_k(row, beam + 1) {
                        cands.push((h.sum + lp, j, tok, lp));
                    }
                }
                cands.sort_by(|a, b| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1)).then(a.2.cmp(&b.2)));
                let mut next: Vec<(usize, Hyp, u32)> = Vec::with_capacity(beam);
                // The most likely continuation of all is end-of-text.
                let mut best_ended = false;
                for (rank, (score, j, tok, lp)) in cands.into_iter().enumerate() {
                    if next.len() >= beam || ended[p].len() >= beam {
                        break;
                    }
                    let Some(parent) = live[p].get(j).and_then(Option::as_ref) else { continue };
                    let mut h = parent.clone();
                    h.sum = score;
                    if tok == sp.eot {
                        h.stop = Stop::EndOfText;
                        ended[p].push(h);
                        best_ended |= rank == 0;
                        continue;
                    }
                    h.tokens.push(tok);
                    h.lps.push(lp);
                    if let Some(cut) = restart_at(&h.tokens, self.options.restart_min_tokens, &self.sentence_end) {
                        h.cut(cut, Stop::Restart);
                        ended[p].push(h);
                        continue;
                    }
                    if let Some((n, span)) = loop_at(&h.tokens, &self.options) {
                        let keep_len = h.tokens.len() - span + n;
                        h.cut(keep_len, Stop::Loop);
                        ended[p].push(h);
                        continue;
                    }
                    next.push((j, h, tok));
                }
                // All live hypotheses have the same length: the budget ends them together.
                let full = next.first().is_some_and(|(_, h, _)| h.tokens.len() >= budgets[p]) || st.len() + 1 > max_ctx;
                let early = best_ended && self.options.beam_early_stop;
                if ended[p].len() >= beam || next.is_empty() || full || early {
                    if ended[p].is_empty() || full && ended[p].iter().all(|h| h.stop != Stop::EndOfText) {
                        ended[p].extend(next.into_iter().map(|(_, mut h, _)| {
                            h.stop = Stop::Budget;
                            h
                        }));
                    }
                    live[p].clear();
                    continue;
                }
                next_groups.push(p);
                let mut slots: Vec<Option<Hyp>> = Vec::with_capacity(beam);
                for k in 0..beam {
                    // Fewer continuations than slots (loops set aside): pad with a copy of the
                    // best, fed but never extended.
                    let (j, h, tok) = match next.get(k) {
                        Some((j, h, tok)) => (*j, Some(h.clone()), *tok),
                        None => (next[0].0, None, next[0].2),
                    };
                    keep_rows.push(g * beam + j);
                    next_tokens.push(tok);
                    slots.push(h);
                }
                live[p] = slots;
            }
            if next_groups.is_empty() {
                break;
            }
            if cancelled() {
                return Err(DecodeError::Cancelled);
            }
            if step == 0 {
                st.expand(beam)?;
            }
            st.retain(&keep_rows)?;
            groups = next_groups;
            fed += next_tokens.len();
            steps += 1;
            logits = self.step(&mut st, &next_tokens)?;
            step += 1;
        }
        // Whisper's ranking: the best average log-probability per token among the hypotheses
        // that ended at end-of-text (or a restart); any if none did.
        let chosen = ended
            .into_iter()
            .map(|hs| {
                let score = |h: &Hyp| h.sum / h.tokens.len().max(1) as f32;
                let clean = |h: &Hyp| matches!(h.stop, Stop::EndOfText | Stop::Restart);
                let pool: Vec<&Hyp> =
                    if hs.iter().any(clean) { hs.iter().filter(|h| clean(h)).collect() } else { hs.iter().collect() };
                pool.into_iter().max_by(|a, b| score(a).total_cmp(&score(b))).cloned().unwrap_or_default()
            })
            .collect();
        Ok((chosen, steps, fed))
    }

    /// A piece's text and its verdict under the checks.
    fn judge(&self, p: Piece) -> Result<Judged, DecodeError> {
        let o = &self.options;
        let text = self
            .tokenizer
            .decode(&p.tokens, true)
            .map_err(|e| DecodeError::Detokenize(e.to_string()))?
            .trim()
            .to_owned();
        let avg = p.sum_logprob / p.n_logprob.max(1) as f32;
        let ratio = compression_ratio(&text);
        let low_lp = o.logprob_threshold.is_some_and(|t| avg < t);
        let verdict = if !text.chars().any(char::is_alphanumeric)
            || o.no_speech_threshold.is_some_and(|t| p.no_speech_prob > t) && (o.logprob_threshold.is_none() || low_lp)
            || o.no_speech_strict_threshold.is_some_and(|t| p.no_speech_prob > t)
        {
            Verdict::NoSpeech
        } else if matches!(p.stop, Stop::Loop | Stop::Budget) {
            Verdict::Doubt("repetition")
        } else if o.compression_ratio_threshold.is_some_and(|t| ratio > t) {
            Verdict::Doubt("compression_ratio")
        } else if low_lp {
            Verdict::Doubt("low_logprob")
        } else {
            Verdict::Pass
        };
        Ok(Judged { piece: p, text, avg, ratio, verdict })
    }
}

/// Joins a clip's pieces that hold speech (in time order); silence only when none does.
fn finish(pieces: Vec<Judged>) -> Transcription {
    let kept: Vec<&Judged> = pieces.iter().filter(|j| j.verdict != Verdict::NoSpeech).collect();
    if kept.is_empty() {
        // Report the longest piece's numbers.
        let longest = pieces.iter().max_by_key(|j| j.piece.samples);
        return match longest {
            Some(j) => Transcription {
                text: String::new(),
                tokens: Vec::new(),
                avg_logprob: j.avg,
                no_speech_prob: j.piece.no_speech_prob,
                compression_ratio: j.ratio,
                rejected: Some("no_speech"),
                doubt: None,
            },
            None => Transcription {
                text: String::new(),
                tokens: Vec::new(),
                avg_logprob: 0.0,
                no_speech_prob: 1.0,
                compression_ratio: 0.0,
                rejected: Some("no_speech"),
                doubt: None,
            },
        };
    }
    let text = kept.iter().map(|j| j.text.as_str()).collect::<Vec<_>>().join(" ");
    let tokens: Vec<u32> = kept.iter().flat_map(|j| j.piece.tokens.iter().copied()).collect();
    let lp: f32 = kept.iter().map(|j| j.piece.sum_logprob).sum();
    let n: usize = kept.iter().map(|j| j.piece.n_logprob).sum();
    let dur: usize = kept.iter().map(|j| j.piece.samples).sum();
    let ns: f32 = kept.iter().map(|j| j.piece.no_speech_prob * j.piece.samples as f32).sum();
    let doubt = kept.iter().find_map(|j| match j.verdict {
        Verdict::Doubt(why) => Some(why),
        _ => None,
    });
    Transcription {
        compression_ratio: compression_ratio(&text),
        text,
        tokens,
        avg_logprob: lp / n.max(1) as f32,
        no_speech_prob: ns / dur.max(1) as f32,
        rejected: None,
        doubt,
    }
}

/// One beam-search hypothesis: its text tokens, their log-probabilities and their sum (with
/// end-of-text's when it ended there).
#[derive(Debug, Clone)]
struct Hyp {
    tokens: Vec<u32>,
    lps: Vec<f32>,
    sum: f32,
    stop: Stop,
}

impl Default for Hyp {
    fn default() -> Self {
        Self { tokens: Vec::new(), lps: Vec::new(), sum: 0.0, stop: Stop::Budget }
    }
}

impl Hyp {
    /// Cuts to the first `len` tokens (a loop or a restart).
    fn cut(&mut self, len: usize, stop: Stop) {
        self.tokens.truncate(len);
        self.lps.truncate(len);
        self.sum = self.lps.iter().sum();
        self.stop = stop;
    }
}

/// The `k` largest entries of `row` with their indices, best first (ties: lower index first).
fn top_k(row: &[f32], k: usize) -> Vec<(u32, f32)> {
    let mut best: Vec<(u32, f32)> = Vec::with_capacity(k + 1);
    for (i, &x) in row.iter().enumerate() {
        if best.len() == k && best.last().is_some_and(|&(_, w)| x <= w) || x == f32::NEG_INFINITY {
            continue;
        }
        let at = best.partition_point(|&(_, w)| w >= x);
        best.insert(at, (i as u32, x));
        best.truncate(k);
    }
    best
}

/// A small deterministic generator (SplitMix64) for the temperature fallback's sampling,
/// seeded by the audio's samples and the temperature: the same clip samples the same tokens.
struct SplitMix64(u64);

impl SplitMix64 {
    fn seeded(audio: &[f32], temperature: f32) -> Self {
        // FNV-1a over the samples' bits.
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for x in audio.iter().chain(std::iter::once(&temperature)) {
            for b in x.to_bits().to_le_bytes() {
                h = (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
            }
        }
        Self(h)
    }

    fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    fn unit(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// Sampling per row of `logits` `(batch, vocab)` after adding `bias`, at `temperature`; row `i`
/// draws from `rngs[rows[i]]` (its piece's generator); each pick with its log-probability under `log_softmax(logits + bias)`
/// (Whisper scores the sampled token without the temperature).
fn sample_pick(
    logits: &Tensor,
    bias: &Tensor,
    temperature: f32,
    rngs: &mut [SplitMix64],
    rows: &[usize],
) -> candle_core::Result<Vec<(u32, f32)>> {
    let masked = logits.broadcast_add(bias)?;
    let logp = candle_nn::ops::log_softmax(&masked, D::Minus1)?.to_vec2::<f32>()?;
    let mut out = Vec::with_capacity(logp.len());
    for (row, &r) in logp.iter().zip(rows) {
        let Some(rng) = rngs.get_mut(r) else { break };
        let inv_t = 1.0 / f64::from(temperature.max(1e-3));
        let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let weights: Vec<f64> = row.iter().map(|&l| (f64::from(l - max) * inv_t).exp()).collect();
        let total: f64 = weights.iter().sum();
        let mut u = rng.unit() * total;
        let mut pick = weights.len().saturating_sub(1);
        for (i, w) in weights.iter().enumerate() {
            if u < *w {
                pick = i;
                break;
            }
            u -= w;
        }
        out.push((pick as u32, row.get(pick).copied().unwrap_or(f32::NEG_INFINITY)));
    }
    Ok(out)
}

/// Greedy choice per row of `logits` `(batch, vocab)` after adding `bias` `(vocab,)`: the
/// arg-max and its log-probability under `log_softmax(logits + bias)` (Whisper applies the
/// suppression before the log-softmax). Runs as tensor ops (optimised even in debug builds).
fn greedy_pick(logits: &Tensor, bias: &Tensor) -> candle_core::Result<Vec<(u32, f32)>> {
    let masked = logits.broadcast_add(bias)?;
    let max = masked.max_keepdim(D::Minus1)?;
    let lse = masked.broadcast_sub(&max)?.exp()?.sum_keepdim(D::Minus1)?.log()?;
    let ids = masked.argmax(D::Minus1)?.to_vec1::<u32>()?;
    // The arg-max's logit is the max, so its log-probability is −log Σ exp(x − max).
    let lps = lse.flatten_all()?.to_vec1::<f32>()?;
    Ok(ids.into_iter().zip(lps).map(|(t, l)| (t, -l)).collect())
}

/// Whether `tokens` ends with an n-gram (n ≤ `loop_max_ngram`) repeated back to back at least
/// `max(loop_min_repeats, ceil(loop_min_span / n))` times: `Some((n, span))`, the n-gram's
/// length and the tokens the repeats take.
fn loop_at(tokens: &[u32], o: &DecodeOptions) -> Option<(usize, usize)> {
    (1..=o.loop_max_ngram).find_map(|n| {
        let repeats = o.loop_min_repeats.max(o.loop_min_span.div_ceil(n)).max(2);
        let span = n * repeats;
        if tokens.len() < span {
            return None;
        }
        let tail = &tokens[tokens.len() - span..];
        let gram = &tail[..n];
        tail.chunks_exact(n).all(|c| c == gram).then_some((n, span))
    })
}

/// Where the transcript started over, as the length to cut it to (`m = 0` disables):
/// - the last `m` tokens equal the first `m` (and do not overlap them): cut before the copy;
/// - or, after a sentence end, the transcript started over with its first word or two changed
///   ("until came to forty five dollars. The total came to forty five dollars."): the last `m`
///   tokens equal the `m` from position `i` (1 ≤ `i` ≤ [`RESTART_DRIFT`]), and 1 to
///   `RESTART_DRIFT + 1` tokens before them follow a token that ends a sentence
///   (`sentence_end[token]`): cut after that sentence end.
fn restart_at(tokens: &[u32], m: usize, sentence_end: &[bool]) -> Option<usize> {
    let n = tokens.len();
    if m == 0 || n < 2 * m {
        return None;
    }
    let tail = &tokens[n - m..];
    if tokens[..m] == *tail {
        return Some(n - m);
    }
    let ends = |t: u32| sentence_end.get(t as usize).copied().unwrap_or(false);
    (1..=RESTART_DRIFT).filter(|&i| tokens.get(i..i + m) == Some(tail)).find_map(|i| {
        // The changed first words take `changed` tokens, after a sentence end at `cut - 1`.
        (1..=RESTART_DRIFT + 1).find_map(|changed| {
            let cut = n.checked_sub(m + changed)?;
            (cut >= i + m && ends(tokens[cut - 1])).then_some(cut)
        })
    })
}

/// Leading tokens a restart may change (see [`restart_at`]).
const RESTART_DRIFT: usize = 2;

/// Whisper's compression ratio: UTF-8 bytes of `text` over its zlib-compressed size.
pub fn compression_ratio(text: &str) -> f32 {
    let bytes = text.as_bytes();
    let mut enc = flate2::write::ZlibEncoder::new(Vec::new(), flate2::Compression::default());
    let compressed = enc.write_all(bytes).and_then(|_| enc.finish());
    match compressed {
        Ok(c) if !c.is_empty() => bytes.len() as f32 / c.len() as f32,
        _ => 0.0,
    }
}

/// Cuts `pcm` into pieces of at most `max_len` samples, each cut at the quietest 20 ms of the
/// last third of the piece (so words are rarely split). Returns the sample ranges, in order.
pub fn split_points(pcm: &[f32], max_len: usize) -> Vec<std::ops::Range<usize>> {
    let max_len = max_len.max(HOP_LENGTH * 2);
    let mut out = Vec::new();
    let mut start = 0usize;
    while pcm.len() - start > max_len {
        let lo = start + max_len * 2 / 3;
        let hi = start + max_len;
        let win = 320usize; // 20 ms
        let mut best = hi;
        let mut best_e = f32::INFINITY;
        let mut t = lo;
        while t + win <= hi {
            let e: f32 = pcm[t..t + win].iter().map(|x| x * x).sum();
            if e < best_e {
                best_e = e;
                best = t + win / 2;
            }
            t += win / 2;
        }
        out.push(start..best);
        start = best;
    }
    out.push(start..pcm.len());
    out
}

/// Helpers shared by the tests that need the real model and telephone-band speech.
#[cfg(test)]
pub(crate) mod test_support {
    use std::path::PathBuf;
    use std::process::Command;

    use crate::transcode::{mulaw, resample::Upsampler2x};

    /// The Whisper tiny.en directory: `$VOXGATE_STT__MODEL_DIR` or `models/whisper-tiny.en`.
    /// Panics (failing the test) with the command that fetches it when it is missing.
    pub fn model_dir() -> PathBuf {
        fetched_model("VOXGATE_STT__MODEL_DIR", "whisper-tiny.en", "nodes/deploy/fetch-model.sh")
    }

    /// The multilingual Whisper base directory (`nodes/deploy/fetch-model.sh base`):
    /// `$VOXGATE_STT__BASE_MODEL_DIR` or `models/whisper-base`; panics when it is missing.
    pub fn base_model_dir() -> PathBuf {
        fetched_model("VOXGATE_STT__BASE_MODEL_DIR", "whisper-base", "nodes/deploy/fetch-model.sh base")
    }

    /// `$var`, else `models/{name}`, holding the three files a model needs; panics (failing the
    /// test) naming `fetch`, the command that fetches it, when one is missing.
    fn fetched_model(var: &str, name: &str, fetch: &str) -> PathBuf {
        let dir = std::env::var_os(var)
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../models")).join(name));
        for f in ["model.bin", "config.json", "tokenizer.json"] {
            assert!(
                dir.join(f).is_file(),
                "Whisper model missing: {} not found; run {fetch} (or set {var})",
                dir.join(f).display()
            );
        }
        dir
    }

    /// Text-to-speech engine used to make test audio.
    #[derive(Debug, Clone, Copy, PartialEq, Eq)]
    pub enum Voice {
        /// `espeak-ng -v en-us`.
        Espeak,
        /// `flite -voice slt`.
        Flite,
    }

    /// Speech for `text` as the product sees it: synthesized, converted by sox to 8 kHz µ-law,
    /// decoded and upsampled to 16 kHz by the transcoder's own code, as f32 in [-1, 1].
    pub fn telephone_speech(voice: Voice, text: &str) -> Vec<f32> {
        let dir = tempfile::tempdir().expect("tempdir");
        let wav = dir.path().join("x.wav");
        let status = match voice {
            Voice::Espeak => Command::new("espeak-ng").args(["-v", "en-us", "-w"]).arg(&wav).arg(text).status(),
            Voice::Flite => Command::new("flite").args(["-voice", "slt", "-t", text, "-o"]).arg(&wav).status(),
        }
        .expect("running the speech synthesizer (espeak-ng / flite)");
        assert!(status.success(), "{voice:?} failed on {text:?}");
        let out = Command::new("sox")
            .arg(&wav)
            .args(["-r", "8000", "-c", "1", "-e", "mu-law", "-t", "raw", "-"])
            .output()
            .expect("running sox");
        assert!(out.status.success(), "sox failed: {}", String::from_utf8_lossy(&out.stderr));
        telephone_from_mulaw(&out.stdout)
    }

    /// 8 kHz µ-law bytes → 16 kHz f32 through the transcoder.
    pub fn telephone_from_mulaw(bytes: &[u8]) -> Vec<f32> {
        let mut pcm8 = Vec::new();
        mulaw::decode_into(bytes, &mut pcm8);
        let mut pcm16 = Vec::new();
        Upsampler2x::new().process(&pcm8, &mut pcm16);
        pcm16.iter().map(|&s| f32::from(s) / 32768.0).collect()
    }

    /// Lower case, punctuation removed (apostrophes kept), split on whitespace.
    pub fn words(text: &str) -> Vec<String> {
        text.to_lowercase()
            .chars()
            .map(|c| if c.is_alphanumeric() || c == '\'' { c } else { ' ' })
            .collect::<String>()
            .split_whitespace()
            .map(str::to_owned)
            .collect()
    }

    /// Word error rate of `hyp` against `reference`, after [`words`].
    pub fn wer(reference: &str, hyp: &str) -> f32 {
        let r = words(reference);
        let h = words(hyp);
        let mut prev: Vec<usize> = (0..=h.len()).collect();
        for (i, rw) in r.iter().enumerate() {
            let mut cur = vec![i + 1; h.len() + 1];
            for (j, hw) in h.iter().enumerate() {
                let sub = prev[j] + usize::from(rw != hw);
                cur[j + 1] = sub.min(prev[j + 1] + 1).min(cur[j] + 1);
            }
            prev = cur;
        }
        prev[h.len()] as f32 / r.len().max(1) as f32
    }
}

#[cfg(test)]
mod tests {
    use super::test_support::*;
    use super::*;
    use std::time::Instant;

    const SENTENCES: [&str; 5] = [
        "My credit card was charged twice this month.",
        "Can you call me back tomorrow afternoon?",
        "I would like to schedule an appointment for next week.",
        "Thank you for calling, how can I help you today?",
        "My flight was delayed and I missed my connection.",
    ];

    fn opts() -> DecodeOptions {
        DecodeOptions::default()
    }

    #[test]
    fn loops_need_more_copies_of_shorter_ngrams() {
        let o = opts();
        assert!(loop_at(&[7; 19], &o).is_none());
        assert!(loop_at(&[7; 20], &o).is_some());
        let two: Vec<u32> = [1, 2].repeat(9);
        assert!(loop_at(&two, &o).is_none());
        assert!(loop_at(&[1, 2].repeat(10), &o).is_some());
        let five: Vec<u32> = [3, 1, 4, 1, 5].repeat(3);
        assert!(loop_at(&five, &o).is_none());
        let mut five4 = vec![9, 9];
        five4.extend([3, 1, 4, 1, 5].repeat(4));
        assert_eq!(loop_at(&five4, &o), Some((5, 20)), "the n-gram and the span its copies take");
        // "no no no no" and "thank you. thank you. thank you." are speech, not loops.
        assert!(loop_at(&[8, 8, 8, 8], &o).is_none());
        assert!(loop_at(&[5, 6, 7].repeat(3), &o).is_none());
        assert!(loop_at(&[], &o).is_none());
        let off = DecodeOptions { loop_max_ngram: 0, ..opts() };
        assert!(loop_at(&[7; 100], &off).is_none());
    }

    #[test]
    fn restart_is_the_prefix_coming_back() {
        let none: &[bool] = &[];
        let t = [1, 2, 3, 4, 5, 6, 7, 8, 1, 2, 3, 4, 5, 6];
        assert_eq!(restart_at(&t, 6, none), Some(8));
        assert_eq!(restart_at(&t[..13], 6, none), None);
        assert_eq!(restart_at(&[1, 2, 3, 1, 2, 3], 3, none), Some(3));
        assert_eq!(restart_at(&[1, 2, 3, 1, 2], 3, none), None);
        assert_eq!(restart_at(&t, 0, none), None);
        // After a sentence end, the first word changed: "until came to five dollars. The total
        // came to five dollars." is cut after the first copy.
        let (until, dot, the, total) = (90, 91, 92, 93);
        let mut ends = vec![false; 100];
        ends[dot as usize] = true;
        let body = [10, 11, 12, 13, 14, dot];
        let mut drift: Vec<u32> = vec![until];
        drift.extend(body);
        drift.extend([the, total]);
        drift.extend(body);
        assert_eq!(restart_at(&drift, 6, &ends), Some(7));
        assert_eq!(restart_at(&drift[..drift.len() - 1], 6, &ends), None, "not yet a whole copy");
        // Without the sentence end before it, a repeat is speech ("call me at five, call me at five").
        assert_eq!(restart_at(&drift, 6, none), None);
        // More than two changed leading tokens is not a restart.
        let mut far: Vec<u32> = vec![1, 2, 3];
        far.extend(body);
        far.extend([4, 5]);
        far.extend(body);
        assert_eq!(restart_at(&far, 6, &ends), None);
        // Nor more than three new tokens before the copy.
        let mut long: Vec<u32> = vec![until];
        long.extend(body);
        long.extend([4, 5, 6, 7]);
        long.extend(body);
        assert_eq!(restart_at(&long, 6, &ends), None);
    }

    #[test]
    fn compression_ratio_flags_repetitive_text() {
        assert!(compression_ratio("Hello.") < 1.0);
        let normal = "Thank you for calling, how can I help you today? I would like to check my order.";
        assert!(compression_ratio(normal) < 2.4, "{}", compression_ratio(normal));
        let looped = "I'm going to go to the store. ".repeat(8);
        assert!(compression_ratio(&looped) > 2.4, "{}", compression_ratio(&looped));
        assert_eq!(compression_ratio(""), 0.0);
    }

    #[test]
    fn long_audio_is_cut_in_quiet_places() {
        // 75 s of "speech" (a tone) with 200 ms gaps at 24 s and 50 s.
        let n = 75 * SAMPLE_RATE;
        let gap = |i: usize| {
            (24 * 16_000..24 * 16_000 + 3_200).contains(&i) || (50 * 16_000..50 * 16_000 + 3_200).contains(&i)
        };
        let pcm: Vec<f32> = (0..n).map(|i| if gap(i) { 0.0 } else { (i as f32 * 0.3).sin() * 0.3 }).collect();
        let pieces = split_points(&pcm, MAX_PIECE_SAMPLES);
        assert_eq!(pieces.len(), 3, "{pieces:?}");
        assert_eq!(pieces[0].start, 0);
        assert_eq!(pieces[2].end, n);
        for w in pieces.windows(2) {
            assert_eq!(w[0].end, w[1].start);
        }
        for p in &pieces {
            assert!(p.len() <= MAX_PIECE_SAMPLES, "{p:?}");
        }
        assert!(gap(pieces[0].end) && gap(pieces[1].end), "{pieces:?}");
        assert_eq!(split_points(&pcm[..MAX_PIECE_SAMPLES], MAX_PIECE_SAMPLES), vec![0..MAX_PIECE_SAMPLES]);
        assert_eq!(split_points(&[], MAX_PIECE_SAMPLES), vec![0..0]);
    }

    #[test]
    fn encoder_length_and_token_budget() {
        let o = opts();
        let o = DecodeOptions { min_encoder_frames: 0, encoder_pad_frames: 100, encoder_frames_step: 100, ..o };
        assert_eq!(o.encoder_frames(0, 3000), 100);
        assert_eq!(o.encoder_frames(2999, 3000), 3000);
        assert_eq!(o.encoder_frames(2000, 3000), 2100);
        assert_eq!(o.encoder_frames(2001, 3000), 2200, "rounded up to whole steps");
        let ten = DecodeOptions { min_encoder_frames: 1000, ..o.clone() };
        assert_eq!(ten.encoder_frames(250, 3000), 1000);
        let exact = DecodeOptions { min_encoder_frames: 0, encoder_pad_frames: 0, encoder_frames_step: 1, ..opts() };
        assert_eq!(exact.encoder_frames(301, 3000), 302);
        assert_eq!(exact.encoder_frames(0, 3000), 2);
        assert_eq!(o.token_budget(0), o.min_tokens);
        assert_eq!(o.token_budget(SAMPLE_RATE), o.min_tokens + 12);
        assert_eq!(o.token_budget(30 * SAMPLE_RATE), 224);
    }

    #[test]
    fn greedy_pick_applies_the_suppression_before_the_log_softmax() -> candle_core::Result<()> {
        let dev = Device::Cpu;
        let logits = Tensor::new(&[[0.0f32, 1.0f32.ln(), 3.0f32.ln(), 9.0], [5.0, 0.0, 0.0, 0.0]], &dev)?;
        let bias = Tensor::new(&[0.0f32, 0.0, 0.0, f32::NEG_INFINITY], &dev)?;
        let picks = greedy_pick(&logits, &bias)?;
        assert_eq!(picks[0].0, 2);
        assert!((picks[0].1 - (3.0f32 / 5.0).ln()).abs() < 1e-6, "{picks:?}");
        assert_eq!(picks[1].0, 0);
        let p = (5.0f32.exp() / (5.0f32.exp() + 2.0)).ln();
        assert!((picks[1].1 - p).abs() < 1e-6, "{picks:?}");
        Ok(())
    }

    #[test]
    fn sampling_is_seeded_by_the_audio_and_never_picks_a_suppressed_token() -> candle_core::Result<()> {
        let dev = Device::Cpu;
        // Row 0: tokens 1 and 2 likely, 3 suppressed though its logit is the highest.
        let logits = Tensor::new(&[[0.0f32, 2.0, 2.0, 9.0], [0.0, 0.0, 0.0, 0.0]], &dev)?;
        let bias = Tensor::new(&[0.0f32, 0.0, 0.0, f32::NEG_INFINITY], &dev)?;
        let audio = [0.1f32, -0.2, 0.3];
        let draw = |audio: &[f32], t: f32| -> candle_core::Result<Vec<u32>> {
            let mut rngs = vec![SplitMix64::seeded(audio, t), SplitMix64::seeded(&[0.5], t)];
            (0..200).map(|_| Ok(sample_pick(&logits, &bias, t, &mut rngs, &[0, 1])?[0].0)).collect()
        };
        let a = draw(&audio, 1.0)?;
        assert_eq!(a, draw(&audio, 1.0)?, "the same audio samples the same tokens");
        assert_ne!(a, draw(&[0.1, -0.2, 0.31], 1.0)?, "other audio, other draws");
        assert!(!a.contains(&3), "a suppressed token is never drawn");
        assert!(a.contains(&0) && a.contains(&1) && a.contains(&2), "{a:?}");
        // Near zero temperature it is the arg-max (token 1 or 2, tied), scored without it.
        let cold = sample_pick(&logits, &bias, 1e-3, &mut [SplitMix64::seeded(&audio, 0.0)], &[0])?;
        assert!(matches!(cold[0].0, 1 | 2), "{cold:?}");
        let lp = (2.0f32.exp() / (1.0 + 2.0 * 2.0f32.exp())).ln();
        assert!((cold[0].1 - lp).abs() < 1e-5, "{cold:?}");
        Ok(())
    }

    #[test]
    fn text_normalisation_for_wer() {
        assert_eq!(wer("Thank you, how can I help?", "thank you how can i help"), 0.0);
        assert!((wer("a b c d", "a x c") - 0.5).abs() < 1e-6);
    }

    /// One model for all the tests that need it (loading is slow and the tests would only
    /// contend for the 2 cores); each test sets the options it wants.
    fn transcriber() -> std::sync::MutexGuard<'static, Transcriber> {
        static T: std::sync::OnceLock<std::sync::Mutex<Transcriber>> = std::sync::OnceLock::new();
        let m = T.get_or_init(|| {
            let t = Transcriber::load(&model_dir()).unwrap_or_else(|e| panic!("loading the model: {e}"));
            std::sync::Mutex::new(t)
        });
        let mut g = m.lock().unwrap_or_else(|e| e.into_inner());
        g.set_options(DecodeOptions::default());
        g
    }

    fn seconds(clips: &[&[f32]]) -> f32 {
        clips.iter().map(|c| c.len() as f32 / SAMPLE_RATE as f32).sum()
    }

    fn silence(secs: f32) -> Vec<f32> {
        telephone_from_mulaw(&vec![0xFF; (secs * 8000.0) as usize])
    }

    fn noise(secs: f32, dbfs: f64) -> Vec<f32> {
        use crate::transcode::{mulaw, synth};
        let mut pcm = Vec::new();
        synth::white_noise(&mut synth::Rng::new(7), (secs * 8000.0) as usize, dbfs, &mut pcm);
        let mut codes = Vec::new();
        mulaw::encode_into(&pcm, &mut codes);
        telephone_from_mulaw(&codes)
    }

    #[test]
    fn transcribes_telephone_speech() {
        let mut t = transcriber();
        let mut total = 0.0;
        let mut n = 0;
        for voice in [Voice::Flite, Voice::Espeak] {
            for s in SENTENCES {
                let pcm = telephone_speech(voice, s);
                let r = t.transcribe(&pcm).unwrap_or_else(|e| panic!("{e}"));
                let w = wer(s, &r.text);
                println!(
                    "{voice:?} wer {w:.2} lp {:.2} no-speech {:.2} cr {:.2} {:?} ← {s:?}",
                    r.avg_logprob, r.no_speech_prob, r.compression_ratio, r.text
                );
                assert_eq!(r.rejected, None, "{voice:?} {s:?} rejected: {r:?}");
                // espeak-ng's robotic voice costs the model words on some sentences (a whole
                // phrase, "the lazy dog", at worst); the mean below is the real bar.
                let bound = if voice == Voice::Flite { 0.34 } else { 0.5 };
                assert!(w <= bound, "{voice:?} {s:?} → {:?} (wer {w})", r.text);
                assert!(!r.tokens.is_empty());
                total += w;
                n += 1;
            }
        }
        let mean = total / n as f32;
        println!("mean wer {mean:.3}");
        assert!(mean <= 0.12, "mean wer {mean}");
    }

    /// The second model: multilingual base, told English and transcription (`<|en|><|transcribe|>`),
    /// transcribes phone speech in English, alone and batched, and keeps silence silent.
    #[test]
    fn multilingual_base_transcribes_english() {
        let mut t = Transcriber::load(&base_model_dir()).unwrap_or_else(|e| panic!("loading whisper base: {e}"));
        assert_eq!(t.after_sot.len(), 3, "language and task tokens in the prompt");
        let clips: Vec<Vec<f32>> = SENTENCES.iter().take(3).map(|s| telephone_speech(Voice::Flite, s)).collect();
        let refs: Vec<&[f32]> = clips.iter().map(Vec::as_slice).collect();
        let batched = t.transcribe_batch(&refs).unwrap_or_else(|e| panic!("{e}"));
        let mut total = 0.0;
        for ((s, r), pcm) in SENTENCES.iter().zip(&batched).zip(&clips) {
            let w = wer(s, &r.text);
            println!("base wer {w:.2} lp {:.2} no-speech {:.2} {:?} ← {s:?}", r.avg_logprob, r.no_speech_prob, r.text);
            assert_eq!(r.rejected, None, "{s:?}: {r:?}");
            assert!(r.text.is_ascii(), "English text, not another language: {:?}", r.text);
            assert_eq!(t.transcribe(pcm).unwrap_or_else(|e| panic!("{e}")).text, r.text, "alone as in a batch");
            total += w;
        }
        let mean = total / batched.len() as f32;
        assert!(mean <= 0.15, "mean wer {mean}");
        let quiet = t.transcribe(&silence(3.0)).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!((quiet.text.as_str(), quiet.rejected), ("", Some("no_speech")), "{quiet:?}");
    }

    #[test]
    fn silence_and_noise_give_no_text() {
        let mut t = transcriber();
        let speech = telephone_speech(Voice::Flite, SENTENCES[3]);
        let quiet = silence(3.0);
        let hiss = noise(3.0, -30.0);
        for (name, pcm) in [("silence", &quiet), ("noise", &hiss)] {
            let r = t.transcribe(pcm).unwrap_or_else(|e| panic!("{e}"));
            println!("{name}: {r:?}");
            assert_eq!(r.text, "", "{name} gave text: {r:?}");
            assert!(r.tokens.is_empty());
            assert!(r.rejected.is_some(), "{name} not rejected: {r:?}");
        }
        // The same inside a batch with speech: only the speech has text.
        let rs = t.transcribe_batch(&[&quiet, &speech, &hiss]).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!((rs[0].text.as_str(), rs[2].text.as_str()), ("", ""), "{rs:?}");
        assert!(rs[0].rejected.is_some() && rs[2].rejected.is_some(), "{rs:?}");
        assert!(wer(SENTENCES[3], &rs[1].text) <= 0.2, "{rs:?}");
        // No audio at all, or less than one frame.
        let rs = t.transcribe_batch(&[&[], &[0.0; 100]]).unwrap_or_else(|e| panic!("{e}"));
        for r in rs {
            assert_eq!((r.text.as_str(), r.rejected), ("", Some("no_speech")));
        }
        assert!(t.transcribe_batch(&[]).is_ok_and(|v| v.is_empty()));
    }

    #[test]
    fn batched_decoding_agrees_and_timing() {
        let mut t = transcriber();
        let clips: Vec<(&str, Vec<f32>)> = [
            (Voice::Flite, SENTENCES[1]),
            (Voice::Espeak, SENTENCES[2]),
            (Voice::Flite, SENTENCES[3]),
            (Voice::Espeak, SENTENCES[4]),
        ]
        .into_iter()
        .map(|(v, s)| (s, telephone_speech(v, s)))
        .collect();
        let refs: Vec<&[f32]> = clips.iter().map(|c| c.1.as_slice()).collect();
        let audio = seconds(&refs);
        let _ = t.transcribe(refs[0]); // warm-up
        let start = Instant::now();
        let single: Vec<Transcription> =
            refs.iter().map(|c| t.transcribe(c).unwrap_or_else(|e| panic!("{e}"))).collect();
        let one = start.elapsed().as_secs_f32() / audio;
        for b in [2usize, 4] {
            t.set_options(DecodeOptions { max_batch: b, ..DecodeOptions::default() });
            let start = Instant::now();
            let batched = t.transcribe_batch(&refs).unwrap_or_else(|e| panic!("{e}"));
            let per = start.elapsed().as_secs_f32() / audio;
            println!("{audio:.1} s of audio: one at a time {one:.3} s/s, batches of {b} {per:.3} s/s");
            for ((s, _), (a, b)) in clips.iter().zip(single.iter().zip(&batched)) {
                println!("  single {:?} | batched {:?}", a.text, b.text);
                assert!(wer(s, &b.text) <= wer(s, &a.text) + 0.2, "{s:?}: {a:?} vs {b:?}");
            }
        }
    }

    #[test]
    fn beam_search_transcribes_alone_and_in_batches() {
        let mut t = transcriber();
        let clips: Vec<(&str, Vec<f32>)> = [
            (Voice::Espeak, SENTENCES[0]),
            (Voice::Flite, SENTENCES[2]),
            (Voice::Espeak, SENTENCES[3]),
            (Voice::Flite, SENTENCES[4]),
        ]
        .into_iter()
        .map(|(v, s)| (s, telephone_speech(v, s)))
        .collect();
        let refs: Vec<&[f32]> = clips.iter().map(|c| c.1.as_slice()).collect();
        let greedy = t.transcribe_batch(&refs).unwrap_or_else(|e| panic!("{e}"));
        t.set_options(DecodeOptions { beam_size: 4, max_batch: 1, ..DecodeOptions::default() });
        let alone = t.transcribe_batch(&refs).unwrap_or_else(|e| panic!("{e}"));
        t.take_timings();
        t.set_options(DecodeOptions { beam_size: 4, max_batch: 4, ..DecodeOptions::default() });
        let batched = t.transcribe_batch(&refs).unwrap_or_else(|e| panic!("{e}"));
        let tm = t.take_timings();
        let (mut w_greedy, mut w_beam) = (0.0, 0.0);
        for (((s, _), g), (a, b)) in clips.iter().zip(&greedy).zip(alone.iter().zip(&batched)) {
            println!("{s:?}\n  greedy {:?} {:.2}\n  beam   {:?} {:.2}", g.text, g.avg_logprob, a.text, a.avg_logprob);
            assert_eq!(a.rejected, None, "{a:?}");
            assert!(!a.tokens.is_empty());
            // Hypotheses of four pieces in one batch decode as they do alone.
            assert!(wer(s, &b.text) <= wer(s, &a.text) + 0.1, "{s:?}: alone {a:?} vs batched {b:?}");
            w_greedy += wer(s, &g.text);
            w_beam += wer(s, &a.text);
        }
        println!("wer greedy {w_greedy:.2} beam {w_beam:.2}; batched {tm:?}");
        assert!(w_beam <= w_greedy + 0.15, "beam search lost words: {w_beam} vs greedy {w_greedy}");
        assert!(tm.tokens > tm.decoder_steps, "the hypotheses decode together");
    }

    #[test]
    fn hints_prompt_the_decoder_and_silence_stays_silent() {
        let mut t = transcriber();
        // A spelling the model does not guess: the hint spells it.
        let said = "My name is Kathryn Smyth.";
        let pcm = telephone_speech(Voice::Flite, said);
        let plain = t.transcribe(&pcm).unwrap_or_else(|e| panic!("{e}"));
        t.take_timings();
        t.set_options(DecodeOptions { hints: "Kathryn Smyth".into(), ..DecodeOptions::default() });
        let hinted = t.transcribe(&pcm).unwrap_or_else(|e| panic!("{e}"));
        let fed = t.take_timings().tokens;
        println!("plain  {:?}\nhinted {:?}", plain.text, hinted.text);
        assert!(!plain.text.contains("Kathryn Smyth"), "{plain:?}");
        assert!(hinted.text.contains("Kathryn Smyth"), "{hinted:?}");
        assert!(wer(said, &hinted.text) <= wer(said, &plain.text), "{plain:?} vs {hinted:?}");
        // <|startofprev|>, the hint's tokens, then the transcript's and its two openers.
        assert!(t.prompt.len() >= 3 && t.prompt[0] == t.specials.prev, "{:?}", t.prompt);
        assert!(fed >= t.prompt.len() + 2 + hinted.tokens.len(), "the prompt is fed: {fed} tokens");
        // A prompt must not make silence or noise speak.
        for quiet in [silence(2.0), noise(2.0, -50.0)] {
            let r = t.transcribe(&quiet).unwrap_or_else(|e| panic!("{e}"));
            assert_eq!((r.text.as_str(), r.rejected), ("", Some("no_speech")), "{r:?}");
        }
        // Hints longer than the prompt keep their end.
        t.set_options(DecodeOptions { hints: "word ".repeat(400), ..DecodeOptions::default() });
        assert_eq!(t.prompt.len(), 224);
        t.set_options(DecodeOptions::default());
        assert!(t.prompt.is_empty());
    }

    #[test]
    fn long_clips_are_split_and_joined() {
        let mut t = transcriber();
        let mut pcm = Vec::new();
        let mut reference = String::new();
        for s in SENTENCES.iter().cycle().skip(1) {
            if pcm.len() > 34 * SAMPLE_RATE {
                break;
            }
            pcm.extend(telephone_speech(Voice::Flite, s));
            pcm.extend(silence(0.6));
            reference.push_str(s);
            reference.push(' ');
        }
        let r = t.transcribe(&pcm).unwrap_or_else(|e| panic!("{e}"));
        let w = wer(&reference, &r.text);
        println!("{:.1} s: wer {w:.2} {:?}", pcm.len() as f32 / 16_000.0, r.text);
        assert_eq!(r.rejected, None);
        assert!(w <= 0.15, "wer {w}: {:?}", r.text);
    }

    #[test]
    fn cancelled_work_stops_and_uncancelled_work_is_unchanged() {
        let mut t = transcriber();
        let pcm = telephone_speech(Voice::Flite, SENTENCES[0]);
        let plain = t.transcribe_batch(&[&pcm]).unwrap_or_else(|e| panic!("{e}"));
        let flag = AtomicBool::new(false);
        let same = t.transcribe_batch_unless(&[&pcm], Some(&flag)).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(same[0].tokens, plain[0].tokens);
        t.take_timings();
        flag.store(true, Ordering::Relaxed);
        let e = t.transcribe_batch_unless(&[&pcm], Some(&flag)).err();
        assert!(matches!(e, Some(DecodeError::Cancelled)), "{e:?}");
        assert_eq!(t.take_timings().decoder_steps, 0, "nothing decoded once cancelled");
    }

    #[test]
    fn bad_input_is_an_error_not_a_panic() {
        let mut t = transcriber();
        let mut pcm = vec![0.0f32; 16_000];
        pcm[123] = f32::NAN;
        let e = t.transcribe_batch(&[&[0.0; 10], &pcm]).err();
        assert!(matches!(e, Some(DecodeError::NonFinite { clip: 1, sample: 123 })), "{e:?}");
    }

    #[test]
    fn load_errors_name_the_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let shown = dir.path().display().to_string();
        let err = |dir: &Path| Transcriber::load(dir).err().map(|e| e.to_string()).unwrap_or_default();
        // Nothing there: the tokenizer is looked for first.
        let e = Transcriber::load(dir.path()).err();
        assert!(matches!(&e, Some(DecodeError::MissingTokenizer { .. })), "{e:?}");
        let msg = err(dir.path());
        assert!(msg.contains(&shown) && msg.contains("tokenizer.json") && msg.contains("fetch-model.sh"), "{msg}");
        // A tokenizer that is not JSON.
        std::fs::write(dir.path().join("tokenizer.json"), "{ not json").expect("write");
        let msg = err(dir.path());
        assert!(msg.contains("tokenizer.json") && msg.contains("not a usable tokenizers JSON"), "{msg}");
        // A good tokenizer, no weights: weights.rs names model.bin or config.json.
        std::fs::copy(model_dir().join("tokenizer.json"), dir.path().join("tokenizer.json")).expect("copy");
        let msg = err(dir.path());
        assert!(msg.contains(&shown) && msg.contains("fetch-model.sh"), "{msg}");
        // A tokenizer without Whisper's special tokens (config and weights symlinked).
        for f in ["model.bin", "config.json"] {
            std::os::unix::fs::symlink(model_dir().join(f), dir.path().join(f)).expect("symlink");
        }
        let json = std::fs::read_to_string(model_dir().join("tokenizer.json")).expect("read");
        std::fs::write(dir.path().join("tokenizer.json"), json.replace("<|notimestamps|>", "<|other|>"))
            .expect("write");
        let msg = err(dir.path());
        assert!(msg.contains("tokenizer.json") && msg.contains("<|notimestamps|>"), "{msg}");
    }

    /// The encoder-length policy and the decoder weight format against word error rate and
    /// speed, on the telephone-band test sentences.
    #[test]
    #[ignore = "experiment: cargo test -p voxgate-actors --lib stt::decode::tests::experiment -- --ignored --nocapture"]
    fn experiment_encoder_length_policy() {
        let mut clips = Vec::new();
        for s in SENTENCES {
            clips.push((s, telephone_speech(Voice::Espeak, s)));
            clips.push((s, telephone_speech(Voice::Flite, s)));
        }
        let audio: Vec<&[f32]> = clips.iter().map(|c| c.1.as_slice()).collect();
        let total = seconds(&audio);
        // (min frames, pad frames, restart cut-off, quantized decoder)
        let runs = [
            (3000, 0, 6, true),
            (1000, 100, 6, true),
            (1000, 100, 6, false),
            (500, 50, 6, true),
            (0, 50, 6, true),
            (0, 100, 6, true),
            (0, 100, 0, true),
        ];
        let mut models = [
            Transcriber::load_with(&model_dir(), None).unwrap_or_else(|e| panic!("{e}")),
            Transcriber::load(&model_dir()).unwrap_or_else(|e| panic!("{e}")),
        ];
        for (min, pad, restart, q8) in runs {
            let t = &mut models[usize::from(q8)];
            t.set_options(DecodeOptions {
                min_encoder_frames: min,
                encoder_pad_frames: pad,
                restart_min_tokens: restart,
                max_batch: 1,
                ..DecodeOptions::default()
            });
            let _ = t.take_timings();
            let start = Instant::now();
            let rs = t.transcribe_batch(&audio).unwrap_or_else(|e| panic!("{e}"));
            let secs = start.elapsed().as_secs_f32();
            let tm = t.take_timings();
            let wers: Vec<f32> = clips.iter().zip(&rs).map(|((s, _), r)| wer(s, &r.text)).collect();
            let rejected = rs.iter().filter(|r| r.rejected.is_some()).count();
            let lp = rs.iter().map(|r| r.avg_logprob).sum::<f32>() / rs.len() as f32;
            println!(
                "min {min:4} pad {pad:3} restart {restart} {}: wer {:.3}, {rejected} rejected, avg logprob {lp:.3}, \
                 {:.3} s/s (mel {:.3} encoder {:.3} decoder {:.3})",
                if q8 { "q8_0" } else { "f32 " },
                wers.iter().sum::<f32>() / wers.len() as f32,
                secs / total,
                tm.mel.as_secs_f32() / total,
                tm.encoder.as_secs_f32() / total,
                tm.decoder.as_secs_f32() / total,
            );
        }
    }
}
