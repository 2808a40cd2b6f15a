//! Reads CTranslate2's `model.bin` and maps a Whisper model onto candle-transformers' names.
//!
//! # The `model.bin` format
//!
//! Little-endian, written by `ModelSpec._serialize` (`python/ctranslate2/specs/model_spec.py`)
//! and read by `Model::load` (`src/models/model.cc`):
//!
//! ```text
//! u32  binary_version                  1..=6 (6 today)
//! if binary_version >= 2:
//!     string spec_name                 e.g. "WhisperSpec"
//!     u32    spec_revision             e.g. 3
//! u32  num_variables
//! num_variables x:
//!     string name                      e.g. "encoder/conv1/weight"
//!     u8     rank
//!     u32    dims[rank]
//!     if binary_version >= 4:
//!         u8  dtype_id                 0 f32, 1 i8, 2 i16, 3 i32, 4 f16, 5 bf16
//!         u32 num_bytes
//!     else:
//!         u8  item_size                4 f32, 2 i16, 1 i8
//!         u32 num_items                (num_bytes = num_items * item_size)
//!     u8     data[num_bytes]           row-major
//! if binary_version >= 3:
//!     u32 num_aliases
//!     num_aliases x: string alias, string target
//! (end of file)
//!
//! string = u16 length (including the terminating NUL), then the bytes and a NUL.
//! ```
//!
//! Variables are sorted by name; scalars (rank 0) hold flags and small integers
//! (`encoder/num_heads` …). A variable equal to another is stored once and aliased (Whisper:
//! `decoder/projection/weight` → `decoder/embeddings/weight`).
//!
//! # Whisper in CTranslate2 → candle
//!
//! Every linear weight is `[out, in]`, as in candle. The self-attention `linear_0` fuses q, k and
//! v (rows `0..d`, `d..2d`, `2d..3d`); the cross-attention `linear_0` is the query and `linear_1`
//! fuses k and v. The key projection has no bias in Whisper (its slice of the fused bias is
//! zero, and a key bias would not change the attention anyway: it adds the same `q·b` to every
//! score of a row). Layer norms are `gamma`/`beta`. The encoder's sinusoids (also stored) are
//! recomputed by candle; the output projection is tied to the token embeddings.

use std::collections::HashMap;
use std::fs::File;
use std::io::{BufReader, Read};
use std::ops::Range;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use candle_transformers::models::whisper::Config;
use half::{bf16, f16};

/// Newest `model.bin` binary version this reader understands.
pub const MAX_BINARY_VERSION: u32 = 6;
/// Newest Whisper spec revision this mapping understands.
pub const MAX_WHISPER_REVISION: u32 = 3;
/// CTranslate2's name for the Whisper model specification.
pub const WHISPER_SPEC: &str = "WhisperSpec";
/// Whisper's encoder context (30 s of audio after the stride-2 convolution).
const DEFAULT_AUDIO_CTX: usize = 1500;
/// Head size of every Whisper model, used when the file does not store the head count.
const HEAD_DIM: usize = 64;

/// Errors reading a CTranslate2 model.
#[derive(Debug, thiserror::Error)]
pub enum WeightsError {
    /// A required file does not exist.
    #[error("missing file {path} (run nodes/deploy/fetch-model.sh to fetch the model)")]
    MissingFile {
        /// The file looked for.
        path: PathBuf,
    },
    /// The file could not be read.
    #[error("cannot read {path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The file ends before a field it announces.
    #[error("{path} is truncated: {what} at byte {offset} needs {needed} bytes, {available} left")]
    Truncated {
        /// The file.
        path: PathBuf,
        /// The field being read.
        what: String,
        /// Where the field starts.
        offset: u64,
        /// Bytes the field needs.
        needed: u64,
        /// Bytes left in the file.
        available: u64,
    },
    /// The binary version is not one this reader knows (or the file is not a CTranslate2 model).
    #[error("{path}: unsupported binary version {version} (this reader supports 1 to {MAX_BINARY_VERSION}); not a ctranslate2 model.bin?")]
    UnsupportedVersion {
        /// The file.
        path: PathBuf,
        /// The version found.
        version: u32,
    },
    /// The model is not a Whisper model, or a newer revision of it.
    #[error("{path}: expected a {WHISPER_SPEC} model up to revision {MAX_WHISPER_REVISION}, found spec {spec:?} revision {revision}")]
    WrongSpec {
        /// The file.
        path: PathBuf,
        /// The spec name found.
        spec: String,
        /// The spec revision found.
        revision: u32,
    },
    /// A variable has a dtype id (or item size) outside the known set.
    #[error("{path}: variable {name:?} has unknown dtype id {id}")]
    UnknownDtype {
        /// The file.
        path: PathBuf,
        /// The variable.
        name: String,
        /// The id found.
        id: u8,
    },
    /// The file is structurally wrong (bad string, sizes that disagree, duplicates …).
    #[error("{path}: malformed at byte {offset}: {message}")]
    Malformed {
        /// The file.
        path: PathBuf,
        /// Where the problem was found.
        offset: u64,
        /// What is wrong.
        message: String,
    },
    /// Bytes follow the last alias.
    #[error("{path}: {count} unexpected trailing bytes after byte {offset}")]
    TrailingBytes {
        /// The file.
        path: PathBuf,
        /// End of the parsed content.
        offset: u64,
        /// Bytes left over.
        count: u64,
    },
    /// A tensor the model needs is absent.
    #[error("{path}: missing tensor {name:?}")]
    MissingTensor {
        /// The file.
        path: PathBuf,
        /// The CTranslate2 variable name.
        name: String,
    },
    /// A tensor has another shape than the model needs.
    #[error("{path}: tensor {name:?} has shape {found:?}, expected {expected:?}")]
    ShapeMismatch {
        /// The file.
        path: PathBuf,
        /// The CTranslate2 variable name.
        name: String,
        /// The shape the model needs.
        expected: Vec<usize>,
        /// The shape in the file.
        found: Vec<usize>,
    },
    /// A tensor has a dtype the mapping cannot use (quantized weights, integer where a float is
    /// needed …), or a target dtype is not a float type.
    #[error("{path}: tensor {name:?}: unsupported dtype {dtype}")]
    UnsupportedDtype {
        /// The file.
        path: PathBuf,
        /// The CTranslate2 variable name (or the requested dtype).
        name: String,
        /// The dtype.
        dtype: String,
    },
    /// The model's dimensions are inconsistent or outside what candle's Whisper supports.
    #[error("{path}: unsupported model: {message}")]
    Unsupported {
        /// The file.
        path: PathBuf,
        /// What is unsupported.
        message: String,
    },
    /// `config.json` is not valid.
    #[error("{path}: invalid config: {message}")]
    Config {
        /// The file.
        path: PathBuf,
        /// The parse error.
        message: String,
    },
    /// candle refused to build a tensor.
    #[error("building tensor {name:?}: {source}")]
    Candle {
        /// The candle tensor name.
        name: String,
        /// candle's error.
        source: candle_core::Error,
    },
}

/// Element type of a CTranslate2 variable (`DataType` in `include/ctranslate2/types.h`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ct2Dtype {
    /// `float32` (id 0).
    F32,
    /// `int8` (id 1).
    I8,
    /// `int16` (id 2).
    I16,
    /// `int32` (id 3).
    I32,
    /// `float16` (id 4).
    F16,
    /// `bfloat16` (id 5).
    BF16,
}

impl Ct2Dtype {
    /// The dtype of an id as written by binary version 4 and later.
    pub fn from_id(id: u8) -> Option<Self> {
        Some(match id {
            0 => Self::F32,
            1 => Self::I8,
            2 => Self::I16,
            3 => Self::I32,
            4 => Self::F16,
            5 => Self::BF16,
            _ => return None,
        })
    }

    /// The dtype of an item size as written by binary versions 1 to 3.
    fn from_item_size(size: u8) -> Option<Self> {
        Some(match size {
            4 => Self::F32,
            2 => Self::I16,
            1 => Self::I8,
            _ => return None,
        })
    }

    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            Self::I8 => 1,
            Self::I16 | Self::F16 | Self::BF16 => 2,
            Self::F32 | Self::I32 => 4,
        }
    }
}

/// One variable of a `model.bin`.
#[derive(Debug, Clone, PartialEq)]
pub struct Ct2Tensor {
    /// Variable name, `/`-scoped (`decoder/layer_0/ffn/linear_0/weight`).
    pub name: String,
    /// Dimensions, outermost first (empty for a scalar).
    pub shape: Vec<usize>,
    /// Element type.
    pub dtype: Ct2Dtype,
    /// Raw little-endian row-major data, `numel * dtype.size()` bytes.
    pub data: Vec<u8>,
}

impl Ct2Tensor {
    /// Number of elements (1 for a scalar).
    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// The value of a single-element integer variable.
    pub fn scalar_int(&self) -> Option<i64> {
        if self.numel() != 1 {
            return None;
        }
        let d = &self.data;
        match self.dtype {
            Ct2Dtype::I8 => Some(i64::from(i8::from_le_bytes([*d.first()?]))),
            Ct2Dtype::I16 => Some(i64::from(i16::from_le_bytes([*d.first()?, *d.get(1)?]))),
            Ct2Dtype::I32 => {
                let b: [u8; 4] = d.get(..4)?.try_into().ok()?;
                Some(i64::from(i32::from_le_bytes(b)))
            }
            _ => None,
        }
    }
}

/// A parsed `model.bin`: all variables and aliases, validated.
#[derive(Debug, Clone)]
pub struct Ct2File {
    /// Where it was read from (for error messages).
    pub path: PathBuf,
    /// Binary format version.
    pub binary_version: u32,
    /// Model specification name (empty for binary version 1).
    pub spec: String,
    /// Model specification revision.
    pub spec_revision: u32,
    /// Variables in file order.
    pub tensors: Vec<Ct2Tensor>,
    /// `(alias, target)` pairs; every target is a variable of the file.
    pub aliases: Vec<(String, String)>,
    index: HashMap<String, usize>,
}

impl Ct2File {
    /// The variable called `name`, following an alias if `name` is one.
    pub fn get(&self, name: &str) -> Option<&Ct2Tensor> {
        let name = self.aliases.iter().find(|(alias, _)| alias == name).map_or(name, |(_, target)| target.as_str());
        self.index.get(name).and_then(|&i| self.tensors.get(i))
    }

    /// Whether `name` is an alias rather than a stored variable.
    pub fn is_alias(&self, name: &str) -> bool {
        self.aliases.iter().any(|(alias, _)| alias == name)
    }

    fn require(&self, name: &str) -> Result<&Ct2Tensor, WeightsError> {
        self.get(name).ok_or_else(|| WeightsError::MissingTensor { path: self.path.clone(), name: name.to_owned() })
    }

    fn require_shape(&self, name: &str, expected: &[usize]) -> Result<&Ct2Tensor, WeightsError> {
        let t = self.require(name)?;
        if t.shape != expected {
            return Err(WeightsError::ShapeMismatch {
                path: self.path.clone(),
                name: name.to_owned(),
                expected: expected.to_vec(),
                found: t.shape.clone(),
            });
        }
        Ok(t)
    }

    fn require_rank(&self, name: &str, rank: usize) -> Result<&[usize], WeightsError> {
        let t = self.require(name)?;
        if t.shape.len() != rank || t.shape.contains(&0) {
            return Err(WeightsError::Unsupported {
                path: self.path.clone(),
                message: format!("tensor {name:?} has shape {:?}, expected {rank} non-zero dimensions", t.shape),
            });
        }
        Ok(&t.shape)
    }
}

/// Reads and validates a CTranslate2 `model.bin`.
pub fn read_ct2(path: &Path) -> Result<Ct2File, WeightsError> {
    let file = File::open(path).map_err(|e| open_error(path, e))?;
    let len = file.metadata().map_err(|e| io_error(path, e))?.len();
    parse(BufReader::with_capacity(1 << 20, file), len, path)
}

fn open_error(path: &Path, e: std::io::Error) -> WeightsError {
    if e.kind() == std::io::ErrorKind::NotFound {
        WeightsError::MissingFile { path: path.to_owned() }
    } else {
        io_error(path, e)
    }
}

fn io_error(path: &Path, source: std::io::Error) -> WeightsError {
    WeightsError::Io { path: path.to_owned(), source }
}

/// A bounds-checked little-endian reader over `len` bytes.
struct Reader<'p, R> {
    inner: R,
    pos: u64,
    len: u64,
    path: &'p Path,
}

impl<R: Read> Reader<'_, R> {
    fn check(&self, needed: u64, what: &dyn Fn() -> String) -> Result<(), WeightsError> {
        let available = self.len.saturating_sub(self.pos);
        if needed > available {
            return Err(self.truncated(needed, what()));
        }
        Ok(())
    }

    fn truncated(&self, needed: u64, what: String) -> WeightsError {
        WeightsError::Truncated {
            path: self.path.to_owned(),
            what,
            offset: self.pos,
            needed,
            available: self.len.saturating_sub(self.pos),
        }
    }

    fn fill(&mut self, buf: &mut [u8], what: &dyn Fn() -> String) -> Result<(), WeightsError> {
        let needed = buf.len() as u64;
        self.check(needed, what)?;
        self.inner.read_exact(buf).map_err(|e| {
            if e.kind() == std::io::ErrorKind::UnexpectedEof {
                self.truncated(needed, what())
            } else {
                io_error(self.path, e)
            }
        })?;
        self.pos += needed;
        Ok(())
    }

    fn array<const N: usize>(&mut self, what: &dyn Fn() -> String) -> Result<[u8; N], WeightsError> {
        let mut b = [0u8; N];
        self.fill(&mut b, what)?;
        Ok(b)
    }

    fn u8(&mut self, what: &dyn Fn() -> String) -> Result<u8, WeightsError> {
        Ok(self.array::<1>(what)?[0])
    }

    fn u16(&mut self, what: &dyn Fn() -> String) -> Result<u16, WeightsError> {
        Ok(u16::from_le_bytes(self.array(what)?))
    }

    fn u32(&mut self, what: &dyn Fn() -> String) -> Result<u32, WeightsError> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }

    fn bytes(&mut self, n: u64, what: &dyn Fn() -> String) -> Result<Vec<u8>, WeightsError> {
        self.check(n, what)?;
        let size = usize::try_from(n).map_err(|_| self.malformed(format!("{} is too large", what())))?;
        let mut buf = vec![0u8; size];
        self.fill(&mut buf, what)?;
        Ok(buf)
    }

    fn string(&mut self, what: &dyn Fn() -> String) -> Result<String, WeightsError> {
        let start = self.pos;
        let n = self.u16(what)?;
        let raw = self.bytes(u64::from(n), what)?;
        let Some((&0, text)) = raw.split_last() else {
            return Err(self.malformed_at(start, format!("{} is not nul-terminated", what())));
        };
        if text.contains(&0) {
            return Err(self.malformed_at(start, format!("{} contains a nul byte", what())));
        }
        String::from_utf8(text.to_vec()).map_err(|_| self.malformed_at(start, format!("{} is not utf-8", what())))
    }

    fn malformed(&self, message: String) -> WeightsError {
        self.malformed_at(self.pos, message)
    }

    fn malformed_at(&self, offset: u64, message: String) -> WeightsError {
        WeightsError::Malformed { path: self.path.to_owned(), offset, message }
    }
}

/// Parses a `model.bin` of `len` bytes from `input`; `path` names it in errors.
fn parse<R: Read>(input: R, len: u64, path: &Path) -> Result<Ct2File, WeightsError> {
    let mut r = Reader { inner: input, pos: 0, len, path };
    let binary_version = r.u32(&|| "binary version".into())?;
    if !(1..=MAX_BINARY_VERSION).contains(&binary_version) {
        return Err(WeightsError::UnsupportedVersion { path: path.to_owned(), version: binary_version });
    }
    let (spec, spec_revision) = if binary_version >= 2 {
        let spec = r.string(&|| "spec name".into())?;
        (spec, r.u32(&|| "spec revision".into())?)
    } else {
        (String::new(), 1)
    };
    let count = r.u32(&|| "variable count".into())?;
    let mut tensors: Vec<Ct2Tensor> = Vec::with_capacity(count.min(4096) as usize);
    let mut index = HashMap::with_capacity(count.min(4096) as usize);
    for i in 0..count {
        let start = r.pos;
        let name = r.string(&|| format!("name of variable {i}"))?;
        let what = |field: &str| format!("{field} of variable {name:?}");
        let rank = r.u8(&|| what("rank"))?;
        let mut shape = Vec::with_capacity(usize::from(rank));
        for _ in 0..rank {
            let dim = r.u32(&|| what("dimension"))?;
            shape.push(dim as usize);
        }
        let (dtype, num_bytes) = if binary_version >= 4 {
            let id = r.u8(&|| what("dtype"))?;
            let dtype = Ct2Dtype::from_id(id).ok_or_else(|| WeightsError::UnknownDtype {
                path: path.to_owned(),
                name: name.clone(),
                id,
            })?;
            (dtype, u64::from(r.u32(&|| what("byte count"))?))
        } else {
            let size = r.u8(&|| what("item size"))?;
            let dtype = Ct2Dtype::from_item_size(size).ok_or_else(|| WeightsError::UnknownDtype {
                path: path.to_owned(),
                name: name.clone(),
                id: size,
            })?;
            (dtype, u64::from(r.u32(&|| what("item count"))?) * u64::from(size))
        };
        let expected = shape.iter().try_fold(dtype.size() as u64, |acc, &d| acc.checked_mul(d as u64));
        if expected != Some(num_bytes) {
            return Err(r.malformed_at(
                start,
                format!(
                    "variable {name:?} holds {num_bytes} bytes but shape {shape:?} of {dtype:?} needs {}",
                    expected.map_or_else(|| "more than 2^64".to_owned(), |e| e.to_string())
                ),
            ));
        }
        let data = r.bytes(num_bytes, &|| what("data"))?;
        if index.insert(name.clone(), tensors.len()).is_some() {
            return Err(r.malformed_at(start, format!("variable {name:?} appears twice")));
        }
        tensors.push(Ct2Tensor { name, shape, dtype, data });
    }
    let mut aliases = Vec::new();
    if binary_version >= 3 {
        let count = r.u32(&|| "alias count".into())?;
        for i in 0..count {
            let start = r.pos;
            let alias = r.string(&|| format!("name of alias {i}"))?;
            let target = r.string(&|| format!("target of alias {alias:?}"))?;
            if !index.contains_key(&target) {
                return Err(r.malformed_at(start, format!("alias {alias:?} points to unknown variable {target:?}")));
            }
            if index.contains_key(&alias) || aliases.iter().any(|(a, _)| a == &alias) {
                return Err(r.malformed_at(start, format!("alias {alias:?} is already defined")));
            }
            aliases.push((alias, target));
        }
    }
    let mut probe = [0u8; 1];
    let extra = r.inner.read(&mut probe).map_err(|e| io_error(path, e))?;
    if r.pos < r.len || extra > 0 {
        return Err(WeightsError::TrailingBytes {
            path: path.to_owned(),
            offset: r.pos,
            count: (r.len.saturating_sub(r.pos)).max(extra as u64),
        });
    }
    Ok(Ct2File { path: path.to_owned(), binary_version, spec, spec_revision, tensors, aliases, index })
}

/// Whisper's dimensions (the names of openai/whisper's `ModelDimensions`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WhisperDims {
    /// Mel bands of the input (80).
    pub n_mels: usize,
    /// Encoder positions (1500 = 30 s).
    pub n_audio_ctx: usize,
    /// Encoder width.
    pub n_audio_state: usize,
    /// Encoder attention heads.
    pub n_audio_head: usize,
    /// Encoder layers.
    pub n_audio_layer: usize,
    /// Vocabulary size.
    pub n_vocab: usize,
    /// Decoder positions (448).
    pub n_text_ctx: usize,
    /// Decoder width.
    pub n_text_state: usize,
    /// Decoder attention heads.
    pub n_text_head: usize,
    /// Decoder layers.
    pub n_text_layer: usize,
}

impl WhisperDims {
    /// Derives the dimensions from the tensor shapes of a CTranslate2 Whisper model (heads from
    /// `encoder/num_heads` / `decoder/num_heads`, or width / 64 when absent).
    pub fn from_ct2(file: &Ct2File) -> Result<Self, WeightsError> {
        let unsupported = |message: String| WeightsError::Unsupported { path: file.path.clone(), message };
        let emb = file.require_rank("decoder/embeddings/weight", 2)?;
        let (n_vocab, n_text_state) = (emb[0], emb[1]);
        let n_text_ctx = file.require_rank("decoder/position_encodings/encodings", 2)?[0];
        let conv1 = file.require_rank("encoder/conv1/weight", 3)?;
        let (n_audio_state, n_mels) = (conv1[0], conv1[1]);
        let n_audio_ctx = match file.get("encoder/position_encodings/encodings") {
            Some(_) => file.require_rank("encoder/position_encodings/encodings", 2)?[0],
            None => DEFAULT_AUDIO_CTX,
        };
        let count_layers = |side: &str| {
            (0..).take_while(|i| file.get(&format!("{side}/layer_{i}/ffn/linear_0/weight")).is_some()).count()
        };
        let heads = |side: &str, width: usize| -> Result<usize, WeightsError> {
            let name = format!("{side}/num_heads");
            let heads = match file.get(&name) {
                Some(t) => {
                    let v = t.scalar_int().ok_or_else(|| unsupported(format!("{name} is not an integer scalar")))?;
                    usize::try_from(v).unwrap_or(0)
                }
                None => width / HEAD_DIM,
            };
            if width.checked_rem(heads) != Some(0) {
                return Err(unsupported(format!("{heads} {side} heads do not divide the width {width}")));
            }
            Ok(heads)
        };
        let dims = Self {
            n_mels,
            n_audio_ctx,
            n_audio_state,
            n_audio_head: heads("encoder", n_audio_state)?,
            n_audio_layer: count_layers("encoder"),
            n_vocab,
            n_text_ctx,
            n_text_state,
            n_text_head: heads("decoder", n_text_state)?,
            n_text_layer: count_layers("decoder"),
        };
        if dims.n_audio_layer == 0 {
            file.require("encoder/layer_0/ffn/linear_0/weight")?;
        }
        if dims.n_text_layer == 0 {
            file.require("decoder/layer_0/ffn/linear_0/weight")?;
        }
        if n_audio_state != n_text_state {
            return Err(unsupported(format!(
                "encoder width {n_audio_state} differs from decoder width {n_text_state}"
            )));
        }
        if n_text_state < 4 || n_text_state % 2 != 0 {
            return Err(unsupported(format!("width {n_text_state} is too small or odd")));
        }
        Ok(dims)
    }

    /// candle-transformers' Whisper configuration for these dimensions.
    pub fn to_config(&self, suppress_tokens: Vec<u32>) -> Config {
        Config {
            num_mel_bins: self.n_mels,
            max_source_positions: self.n_audio_ctx,
            d_model: self.n_audio_state,
            encoder_attention_heads: self.n_audio_head,
            encoder_layers: self.n_audio_layer,
            vocab_size: self.n_vocab,
            max_target_positions: self.n_text_ctx,
            decoder_attention_heads: self.n_text_head,
            decoder_layers: self.n_text_layer,
            suppress_tokens,
        }
    }
}

/// The decoding settings CTranslate2's Whisper converter stores in `config.json`.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Deserialize)]
pub struct Ct2WhisperConfig {
    /// Tokens suppressed at every step.
    #[serde(default)]
    pub suppress_ids: Vec<u32>,
    /// Tokens suppressed at the first sampled step.
    #[serde(default)]
    pub suppress_ids_begin: Vec<u32>,
    /// `(layer, head)` pairs of the cross-attention heads aligned with time.
    #[serde(default)]
    pub alignment_heads: Vec<(usize, usize)>,
    /// Language token ids (multilingual models).
    #[serde(default)]
    pub lang_ids: Vec<u32>,
}

/// Reads `config.json` of a CTranslate2 Whisper model directory.
pub fn read_whisper_config(model_dir: &Path) -> Result<Ct2WhisperConfig, WeightsError> {
    let path = model_dir.join("config.json");
    let text = std::fs::read_to_string(&path).map_err(|e| open_error(&path, e))?;
    serde_json::from_str(&text).map_err(|e| WeightsError::Config { path, message: e.to_string().to_lowercase() })
}

/// Loads a CTranslate2 Whisper model directory (`model.bin` + `config.json`) as the tensors
/// candle-transformers' `whisper::model::Whisper::load` asks for, in `dtype` on `device`.
///
/// Returns the tensors keyed by candle name (`model.encoder.conv1.weight` …), the dimensions,
/// and the candle configuration (with `suppress_tokens` from `config.json`'s `suppress_ids`).
pub fn load_whisper(
    model_dir: &Path,
    dtype: DType,
    device: &Device,
) -> Result<(HashMap<String, Tensor>, WhisperDims, Config), WeightsError> {
    let bin = model_dir.join("model.bin");
    if !matches!(dtype, DType::F32 | DType::F16 | DType::BF16 | DType::F64) {
        return Err(WeightsError::UnsupportedDtype {
            path: bin,
            name: "requested dtype".into(),
            dtype: format!("{dtype:?}").to_lowercase(),
        });
    }
    let config = read_whisper_config(model_dir)?;
    let file = read_ct2(&bin)?;
    if file.spec != WHISPER_SPEC || file.spec_revision > MAX_WHISPER_REVISION {
        return Err(WeightsError::WrongSpec { path: bin, spec: file.spec, revision: file.spec_revision });
    }
    let dims = WhisperDims::from_ct2(&file)?;
    let map = map_whisper(&file, &dims, dtype, device)?;
    Ok((map, dims, dims.to_config(config.suppress_ids)))
}

/// Collects candle tensors from CTranslate2 variables.
struct Mapper<'a> {
    file: &'a Ct2File,
    dtype: DType,
    device: &'a Device,
    map: HashMap<String, Tensor>,
}

impl Mapper<'_> {
    /// `dst` = rows `rows` of `src`, whose shape must be `src_shape`.
    fn rows(&mut self, dst: String, src: &str, src_shape: &[usize], rows: Range<usize>) -> Result<(), WeightsError> {
        let t = self.file.require_shape(src, src_shape)?;
        let row: usize = src_shape.iter().skip(1).product();
        let mut shape = src_shape.to_vec();
        if let Some(first) = shape.first_mut() {
            *first = rows.len();
        }
        let tensor = to_candle(self.file, t, rows.start * row..rows.end * row, &shape, self.dtype, self.device)
            .map_err(|e| e.named(&dst))?;
        self.map.insert(dst, tensor);
        Ok(())
    }

    fn whole(&mut self, dst: String, src: &str, shape: &[usize]) -> Result<(), WeightsError> {
        let rows = shape.first().copied().unwrap_or(1);
        self.rows(dst, src, shape, 0..rows)
    }

    fn linear(&mut self, dst: &str, src: &str, out: usize, inp: usize) -> Result<(), WeightsError> {
        self.whole(format!("{dst}.weight"), &format!("{src}/weight"), &[out, inp])?;
        self.whole(format!("{dst}.bias"), &format!("{src}/bias"), &[out])
    }

    fn layer_norm(&mut self, dst: &str, src: &str, d: usize) -> Result<(), WeightsError> {
        self.whole(format!("{dst}.weight"), &format!("{src}/gamma"), &[d])?;
        self.whole(format!("{dst}.bias"), &format!("{src}/beta"), &[d])
    }

    /// Fused projections: `names[i]` takes rows `i*d..(i+1)*d` of `src` (weight and bias; the
    /// key gets no bias).
    fn fused(&mut self, dst: &str, src: &str, names: &[&str], d: usize) -> Result<(), WeightsError> {
        let n = names.len() * d;
        for (i, name) in names.iter().enumerate() {
            let rows = i * d..(i + 1) * d;
            let weight = format!("{src}/weight");
            self.rows(format!("{dst}.{name}.weight"), &weight, &[n, d], rows.clone())?;
            let bias = format!("{src}/bias");
            if *name == "k_proj" {
                self.check_zero_key_bias(&bias, n, rows)?;
            } else {
                self.rows(format!("{dst}.{name}.bias"), &bias, &[n], rows)?;
            }
        }
        Ok(())
    }

    fn check_zero_key_bias(&self, src: &str, n: usize, rows: Range<usize>) -> Result<(), WeightsError> {
        let t = self.file.require_shape(src, &[n])?;
        let size = t.dtype.size();
        // Any bit set besides the sign bit (the last byte's top bit, little-endian).
        let nonzero = t.data.get(rows.start * size..rows.end * size).is_some_and(|b| {
            b.chunks_exact(size).any(|x| match x.split_last() {
                Some((last, rest)) => last & 0x7f != 0 || rest.iter().any(|&v| v != 0),
                None => false,
            })
        });
        if nonzero {
            // Harmless: a key bias shifts every score of a query row equally, and softmax
            // ignores that.
            tracing::debug!(tensor = src, "non-zero key bias ignored");
        }
        Ok(())
    }

    fn self_attention(&mut self, dst: &str, ln: &str, src: &str, d: usize) -> Result<(), WeightsError> {
        self.layer_norm(ln, &format!("{src}/layer_norm"), d)?;
        self.fused(dst, &format!("{src}/linear_0"), &["q_proj", "k_proj", "v_proj"], d)?;
        self.linear(&format!("{dst}.out_proj"), &format!("{src}/linear_1"), d, d)
    }

    fn cross_attention(&mut self, dst: &str, ln: &str, src: &str, d: usize) -> Result<(), WeightsError> {
        self.layer_norm(ln, &format!("{src}/layer_norm"), d)?;
        self.linear(&format!("{dst}.q_proj"), &format!("{src}/linear_0"), d, d)?;
        self.fused(dst, &format!("{src}/linear_1"), &["k_proj", "v_proj"], d)?;
        self.linear(&format!("{dst}.out_proj"), &format!("{src}/linear_2"), d, d)
    }

    fn ffn(&mut self, dst: &str, src: &str, d: usize) -> Result<(), WeightsError> {
        self.layer_norm(&format!("{dst}.final_layer_norm"), &format!("{src}/layer_norm"), d)?;
        self.linear(&format!("{dst}.fc1"), &format!("{src}/linear_0"), 4 * d, d)?;
        self.linear(&format!("{dst}.fc2"), &format!("{src}/linear_1"), d, 4 * d)
    }
}

/// Builds the candle tensor map of a Whisper model.
fn map_whisper(
    file: &Ct2File,
    dims: &WhisperDims,
    dtype: DType,
    device: &Device,
) -> Result<HashMap<String, Tensor>, WeightsError> {
    let d = dims.n_audio_state;
    let mut m = Mapper { file, dtype, device, map: HashMap::new() };
    let enc = "model.encoder";
    m.whole(format!("{enc}.conv1.weight"), "encoder/conv1/weight", &[d, dims.n_mels, 3])?;
    m.whole(format!("{enc}.conv1.bias"), "encoder/conv1/bias", &[d])?;
    m.whole(format!("{enc}.conv2.weight"), "encoder/conv2/weight", &[d, d, 3])?;
    m.whole(format!("{enc}.conv2.bias"), "encoder/conv2/bias", &[d])?;
    if file.get("encoder/position_encodings/encodings").is_some() {
        // Not loaded (candle computes the sinusoids), but it must agree with the context.
        file.require_shape("encoder/position_encodings/encodings", &[dims.n_audio_ctx, d])?;
    }
    for i in 0..dims.n_audio_layer {
        let (dst, src) = (format!("{enc}.layers.{i}"), format!("encoder/layer_{i}"));
        m.self_attention(
            &format!("{dst}.self_attn"),
            &format!("{dst}.self_attn_layer_norm"),
            &format!("{src}/self_attention"),
            d,
        )?;
        m.ffn(&dst, &format!("{src}/ffn"), d)?;
    }
    m.layer_norm(&format!("{enc}.layer_norm"), "encoder/layer_norm", d)?;

    let dec = "model.decoder";
    let d = dims.n_text_state;
    m.whole(format!("{dec}.embed_tokens.weight"), "decoder/embeddings/weight", &[dims.n_vocab, d])?;
    m.whole(format!("{dec}.embed_positions.weight"), "decoder/position_encodings/encodings", &[dims.n_text_ctx, d])?;
    for i in 0..dims.n_text_layer {
        let (dst, src) = (format!("{dec}.layers.{i}"), format!("decoder/layer_{i}"));
        m.self_attention(
            &format!("{dst}.self_attn"),
            &format!("{dst}.self_attn_layer_norm"),
            &format!("{src}/self_attention"),
            d,
        )?;
        m.cross_attention(
            &format!("{dst}.encoder_attn"),
            &format!("{dst}.encoder_attn_layer_norm"),
            &format!("{src}/attention"),
            d,
        )?;
        m.ffn(&dst, &format!("{src}/ffn"), d)?;
    }
    m.layer_norm(&format!("{dec}.layer_norm"), "decoder/layer_norm", d)?;
    // candle ties the output projection to the token embeddings.
    if let Some(proj) = file.get("decoder/projection/weight") {
        let emb = file.require("decoder/embeddings/weight")?;
        if proj.shape != emb.shape || proj.data != emb.data {
            return Err(WeightsError::Unsupported {
                path: file.path.clone(),
                message: "decoder/projection/weight differs from the token embeddings".into(),
            });
        }
    }
    Ok(m.map)
}

/// Error of [`to_candle`] before the candle name is known.
enum ConvertError {
    Dtype(WeightsError),
    Candle(candle_core::Error),
}

impl ConvertError {
    fn named(self, name: &str) -> WeightsError {
        match self {
            Self::Dtype(e) => e,
            Self::Candle(source) => WeightsError::Candle { name: name.to_owned(), source },
        }
    }
}

/// Elements `elems` of `t` as a candle tensor of `shape` and `dtype`.
fn to_candle(
    file: &Ct2File,
    t: &Ct2Tensor,
    elems: Range<usize>,
    shape: &[usize],
    dtype: DType,
    device: &Device,
) -> Result<Tensor, ConvertError> {
    let size = t.dtype.size();
    let bytes = t.data.get(elems.start * size..elems.end * size).ok_or_else(|| {
        ConvertError::Dtype(WeightsError::Malformed {
            path: file.path.clone(),
            offset: 0,
            message: format!("variable {:?} is shorter than its shape", t.name),
        })
    })?;
    let f32s = |conv: fn(&[u8]) -> f32| -> Vec<f32> { bytes.chunks_exact(size).map(conv).collect() };
    let tensor = match (t.dtype, dtype) {
        (Ct2Dtype::F16, DType::F16) => {
            let v: Vec<f16> = bytes.chunks_exact(2).map(|b| f16::from_le_bytes([b[0], b[1]])).collect();
            Tensor::from_vec(v, shape, device)
        }
        (Ct2Dtype::F16, _) => Tensor::from_vec(f32s(|b| f16::from_le_bytes([b[0], b[1]]).to_f32()), shape, device),
        (Ct2Dtype::BF16, _) => Tensor::from_vec(f32s(|b| bf16::from_le_bytes([b[0], b[1]]).to_f32()), shape, device),
        (Ct2Dtype::F32, _) => Tensor::from_vec(f32s(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])), shape, device),
        (other, _) => {
            return Err(ConvertError::Dtype(WeightsError::UnsupportedDtype {
                path: file.path.clone(),
                name: t.name.clone(),
                dtype: format!("{other:?} (quantized models are not supported)").to_lowercase(),
            }))
        }
    }
    .and_then(|x| if x.dtype() == dtype { Ok(x) } else { x.to_dtype(dtype) })
    .map_err(ConvertError::Candle)?;
    Ok(tensor)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stt::mel::{MelFrontend, N_MELS};
    use candle_core::IndexOp;
    use candle_nn::VarBuilder;
    use candle_transformers::models::whisper::model::Whisper;
    use proptest::prelude::*;
    use std::io::Cursor;
    use std::sync::{Arc, Mutex};

    // ---- synthetic model.bin files -------------------------------------------------------

    #[derive(Debug, Clone)]
    struct Var {
        name: String,
        shape: Vec<u32>,
        dtype: u8,
        data: Vec<u8>,
    }

    fn put_string(out: &mut Vec<u8>, s: &str) {
        out.extend_from_slice(&((s.len() + 1) as u16).to_le_bytes());
        out.extend_from_slice(s.as_bytes());
        out.push(0);
    }

    fn dtype_size(id: u8) -> usize {
        Ct2Dtype::from_id(id).map_or(1, Ct2Dtype::size)
    }

    /// Serialises like `ModelSpec._serialize` (and its older versions).
    fn build(version: u32, spec: &str, revision: u32, vars: &[Var], aliases: &[(&str, &str)]) -> Vec<u8> {
        let mut out = Vec::new();
        out.extend_from_slice(&version.to_le_bytes());
        if version >= 2 {
            put_string(&mut out, spec);
            out.extend_from_slice(&revision.to_le_bytes());
        }
        out.extend_from_slice(&(vars.len() as u32).to_le_bytes());
        for v in vars {
            put_string(&mut out, &v.name);
            out.push(v.shape.len() as u8);
            for d in &v.shape {
                out.extend_from_slice(&d.to_le_bytes());
            }
            if version >= 4 {
                out.push(v.dtype);
                out.extend_from_slice(&(v.data.len() as u32).to_le_bytes());
            } else {
                let size = dtype_size(v.dtype);
                out.push(size as u8);
                out.extend_from_slice(&((v.data.len() / size) as u32).to_le_bytes());
            }
            out.extend_from_slice(&v.data);
        }
        if version >= 3 {
            out.extend_from_slice(&(aliases.len() as u32).to_le_bytes());
            for (a, t) in aliases {
                put_string(&mut out, a);
                put_string(&mut out, t);
            }
        }
        out
    }

    fn f16_var(name: &str, shape: &[usize], seed: &mut u32) -> Var {
        let n: usize = shape.iter().product();
        let mut data = Vec::with_capacity(2 * n);
        for _ in 0..n {
            *seed = seed.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
            let x = ((*seed >> 8) as f32 / (1u32 << 24) as f32 - 0.5) * 0.2;
            data.extend_from_slice(&f16::from_f32(x).to_le_bytes());
        }
        Var { name: name.to_owned(), shape: shape.iter().map(|&d| d as u32).collect(), dtype: 4, data }
    }

    fn int16_scalar(name: &str, v: i16) -> Var {
        Var { name: name.to_owned(), shape: Vec::new(), dtype: 2, data: v.to_le_bytes().to_vec() }
    }

    /// A Whisper model in CTranslate2's layout, with small dimensions, sorted like the
    /// converter writes it.
    fn tiny_whisper(d: usize, heads: i16, layers: usize, vocab: usize, mels: usize) -> Vec<Var> {
        let mut seed = 7;
        let mut vars = Vec::new();
        let mut v = |name: String, shape: &[usize]| vars.push(f16_var(&name, shape, &mut seed));
        let ln = |v: &mut dyn FnMut(String, &[usize]), p: &str| {
            v(format!("{p}/layer_norm/beta"), &[d]);
            v(format!("{p}/layer_norm/gamma"), &[d]);
        };
        let lin = |v: &mut dyn FnMut(String, &[usize]), p: String, out: usize, inp: usize| {
            v(format!("{p}/bias"), &[out]);
            v(format!("{p}/weight"), &[out, inp]);
        };
        v("decoder/embeddings/weight".into(), &[vocab, d]);
        for i in 0..layers {
            let p = format!("decoder/layer_{i}");
            ln(&mut v, &format!("{p}/attention"));
            lin(&mut v, format!("{p}/attention/linear_0"), d, d);
            lin(&mut v, format!("{p}/attention/linear_1"), 2 * d, d);
            lin(&mut v, format!("{p}/attention/linear_2"), d, d);
            ln(&mut v, &format!("{p}/ffn"));
            lin(&mut v, format!("{p}/ffn/linear_0"), 4 * d, d);
            lin(&mut v, format!("{p}/ffn/linear_1"), d, 4 * d);
            ln(&mut v, &format!("{p}/self_attention"));
            lin(&mut v, format!("{p}/self_attention/linear_0"), 3 * d, d);
            lin(&mut v, format!("{p}/self_attention/linear_1"), d, d);
        }
        v("decoder/layer_norm/beta".into(), &[d]);
        v("decoder/layer_norm/gamma".into(), &[d]);
        v("decoder/position_encodings/encodings".into(), &[16, d]);
        v("encoder/conv1/bias".into(), &[d]);
        v("encoder/conv1/weight".into(), &[d, mels, 3]);
        v("encoder/conv2/bias".into(), &[d]);
        v("encoder/conv2/weight".into(), &[d, d, 3]);
        for i in 0..layers {
            let p = format!("encoder/layer_{i}");
            ln(&mut v, &format!("{p}/ffn"));
            lin(&mut v, format!("{p}/ffn/linear_0"), 4 * d, d);
            lin(&mut v, format!("{p}/ffn/linear_1"), d, 4 * d);
            ln(&mut v, &format!("{p}/self_attention"));
            lin(&mut v, format!("{p}/self_attention/linear_0"), 3 * d, d);
            lin(&mut v, format!("{p}/self_attention/linear_1"), d, d);
        }
        v("encoder/layer_norm/beta".into(), &[d]);
        v("encoder/layer_norm/gamma".into(), &[d]);
        v("encoder/position_encodings/encodings".into(), &[30, d]);
        vars.push(int16_scalar("decoder/num_heads", heads));
        vars.push(int16_scalar("encoder/num_heads", heads));
        vars.sort_by(|a, b| a.name.cmp(&b.name));
        vars
    }

    const TINY_ALIAS: [(&str, &str); 1] = [("decoder/projection/weight", "decoder/embeddings/weight")];

    fn write_model(dir: &Path, bin: &[u8]) {
        std::fs::write(dir.join("model.bin"), bin).expect("write model.bin");
        std::fs::write(
            dir.join("config.json"),
            r#"{"suppress_ids": [1, 2], "suppress_ids_begin": [3], "alignment_heads": [[0, 1]], "lang_ids": []}"#,
        )
        .expect("write config.json");
    }

    fn parse_bytes(bytes: &[u8]) -> Result<Ct2File, WeightsError> {
        parse(Cursor::new(bytes), bytes.len() as u64, Path::new("mem/model.bin"))
    }

    fn small_file() -> Vec<u8> {
        let mut seed = 3;
        let vars = vec![
            f16_var("a/weight", &[3, 2], &mut seed),
            int16_scalar("a/flag", 1),
            Var {
                name: "b".into(),
                shape: vec![2],
                dtype: 0,
                data: [1.5f32.to_le_bytes(), (-2f32).to_le_bytes()].concat(),
            },
        ];
        build(6, "TestSpec", 1, &vars, &[("c", "b")])
    }

    #[test]
    fn parses_a_small_file() {
        let f = parse_bytes(&small_file()).expect("parse");
        assert_eq!(f.binary_version, 6);
        assert_eq!(f.spec, "TestSpec");
        assert_eq!(f.spec_revision, 1);
        assert_eq!(f.tensors.len(), 3);
        let a = f.get("a/weight").expect("a/weight");
        assert_eq!((a.shape.as_slice(), a.dtype, a.data.len()), (&[3, 2][..], Ct2Dtype::F16, 12));
        assert_eq!(f.get("a/flag").and_then(Ct2Tensor::scalar_int), Some(1));
        assert_eq!(f.get("c").map(|t| t.name.as_str()), Some("b"));
        assert!(f.is_alias("c") && !f.is_alias("b"));
        assert!(f.get("nope").is_none());
    }

    #[test]
    fn parses_older_binary_versions() {
        let vars = vec![
            Var { name: "x".into(), shape: vec![2], dtype: 0, data: vec![0; 8] },
            Var { name: "y".into(), shape: vec![3], dtype: 2, data: vec![0; 6] },
        ];
        for version in 1..=6 {
            let aliases: &[(&str, &str)] = if version >= 3 { &[("z", "x")] } else { &[] };
            let f = parse_bytes(&build(version, "S", 2, &vars, aliases))
                .unwrap_or_else(|e| panic!("version {version}: {e}"));
            assert_eq!(f.binary_version, version);
            assert_eq!(f.get("x").map(|t| t.dtype), Some(Ct2Dtype::F32));
            assert_eq!(f.get("y").map(|t| t.dtype), Some(Ct2Dtype::I16));
            assert_eq!(f.spec, if version >= 2 { "S" } else { "" });
            assert_eq!(f.aliases.len(), aliases.len());
        }
    }

    #[test]
    fn rejects_bad_files() {
        let good = small_file();
        // Truncated header and truncated data.
        for cut in [0, 2, 5, 10, 20] {
            let e = parse_bytes(&good[..cut]).expect_err("truncated header");
            assert!(matches!(e, WeightsError::Truncated { .. }), "cut {cut}: {e}");
        }
        let e = parse_bytes(&good[..good.len() - 20]).expect_err("truncated data");
        assert!(matches!(e, WeightsError::Truncated { .. }), "{e}");
        assert!(e.to_string().contains("truncated"), "{e}");
        // Versions.
        for version in [0u32, 7, 0xffff_ffff] {
            let mut bad = good.clone();
            bad[..4].copy_from_slice(&version.to_le_bytes());
            let e = parse_bytes(&bad).expect_err("bad version");
            assert!(matches!(e, WeightsError::UnsupportedVersion { version: v, .. } if v == version), "{e}");
        }
        // Garbage.
        let e = parse_bytes(b"PK\x03\x04 this is a zip file, not a model").expect_err("garbage");
        assert!(matches!(e, WeightsError::UnsupportedVersion { .. }), "{e}");
        // Trailing bytes.
        let mut long = good.clone();
        long.extend_from_slice(b"xx");
        let e = parse_bytes(&long).expect_err("trailing");
        assert!(matches!(e, WeightsError::TrailingBytes { count: 2, .. }), "{e}");
        // Unknown dtype, size mismatch, duplicates, dangling alias, bad strings.
        let var = |dtype: u8, data: usize| Var { name: "v".into(), shape: vec![2], dtype, data: vec![0; data] };
        let e = parse_bytes(&build(6, "S", 1, &[var(9, 2)], &[])).expect_err("dtype");
        assert!(matches!(e, WeightsError::UnknownDtype { id: 9, .. }), "{e}");
        let e = parse_bytes(&build(6, "S", 1, &[var(0, 4)], &[])).expect_err("size");
        assert!(matches!(e, WeightsError::Malformed { .. }), "{e}");
        let e = parse_bytes(&build(6, "S", 1, &[var(0, 8), var(0, 8)], &[])).expect_err("dup");
        assert!(e.to_string().contains("twice"), "{e}");
        let e = parse_bytes(&build(6, "S", 1, &[var(0, 8)], &[("a", "b")])).expect_err("alias");
        assert!(e.to_string().contains("unknown variable"), "{e}");
        let mut bad = build(6, "S", 1, &[], &[]);
        bad[7] = b'!'; // the spec name's terminating nul
        let e = parse_bytes(&bad).expect_err("string");
        assert!(matches!(e, WeightsError::Malformed { .. }), "{e}");
        // A huge byte count does not allocate: it is checked against the file size first.
        let mut huge =
            build(6, "S", 1, &[Var { name: "v".into(), shape: vec![0x4000_0000], dtype: 0, data: vec![] }], &[]);
        let n = huge.len();
        huge[n - 8..n - 4].copy_from_slice(&0u32.to_le_bytes());
        assert!(parse_bytes(&huge).is_err());
        // Error messages are lowercase at the start and name the file.
        let msg = parse_bytes(&good[..3]).expect_err("cut").to_string();
        assert!(msg.starts_with("mem/model.bin is truncated"), "{msg}");
    }

    #[test]
    fn files_on_disk() {
        let dir = tempfile::tempdir().expect("tempdir");
        let e = read_ct2(&dir.path().join("model.bin")).expect_err("missing");
        assert!(matches!(e, WeightsError::MissingFile { .. }), "{e}");
        assert!(e.to_string().contains("fetch-model.sh"), "{e}");
        let e = load_whisper(dir.path(), DType::F32, &Device::Cpu).expect_err("missing dir");
        assert!(matches!(e, WeightsError::MissingFile { .. }), "{e}");
        let good = small_file();
        std::fs::write(dir.path().join("model.bin"), &good[..good.len() - 3]).expect("write");
        let e = read_ct2(&dir.path().join("model.bin")).expect_err("truncated");
        assert!(matches!(e, WeightsError::Truncated { .. }), "{e}");
        std::fs::write(dir.path().join("model.bin"), &good).expect("write");
        assert!(read_ct2(&dir.path().join("model.bin")).is_ok());
        // Not a Whisper model.
        write_model(dir.path(), &good);
        let e = load_whisper(dir.path(), DType::F32, &Device::Cpu).expect_err("spec");
        assert!(matches!(e, WeightsError::WrongSpec { .. }), "{e}");
        // Bad config.json.
        std::fs::write(dir.path().join("config.json"), "{").expect("write");
        let e = load_whisper(dir.path(), DType::F32, &Device::Cpu).expect_err("config");
        assert!(matches!(e, WeightsError::Config { .. }), "{e}");
    }

    /// `(name, shape)` of the tensors candle asked for.
    type Requests = Arc<Mutex<Vec<(String, Vec<usize>)>>>;

    /// A candle backend that records every tensor the model asks for.
    struct Recorder {
        map: HashMap<String, Tensor>,
        seen: Requests,
    }

    impl candle_nn::var_builder::SimpleBackend for Recorder {
        fn get(
            &self,
            s: candle_core::Shape,
            name: &str,
            h: candle_nn::Init,
            dtype: DType,
            dev: &Device,
        ) -> candle_core::Result<Tensor> {
            if let Ok(mut seen) = self.seen.lock() {
                seen.push((name.to_owned(), s.dims().to_vec()));
            }
            candle_nn::var_builder::SimpleBackend::get(&self.map, s, name, h, dtype, dev)
        }

        fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
            candle_nn::var_builder::SimpleBackend::get_unchecked(&self.map, name, dtype, dev)
        }

        fn contains_tensor(&self, name: &str) -> bool {
            self.map.contains_key(name)
        }
    }

    /// Loads `map` into candle's Whisper; returns the model and the requested `(name, shape)`s.
    fn load_candle(
        map: &HashMap<String, Tensor>,
        config: &Config,
    ) -> (candle_core::Result<Whisper>, Vec<(String, Vec<usize>)>) {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let rec = Recorder { map: map.clone(), seen: Arc::clone(&seen) };
        let vb = VarBuilder::from_backend(Box::new(rec), DType::F32, Device::Cpu);
        let model = Whisper::load(&vb, config.clone());
        let seen = seen.lock().map(|s| s.clone()).unwrap_or_default();
        (model, seen)
    }

    fn assert_map_is_what_candle_asks(map: &HashMap<String, Tensor>, config: &Config) -> Whisper {
        let (model, seen) = load_candle(map, config);
        let model = model.unwrap_or_else(|e| panic!("candle whisper load: {e}"));
        for (name, shape) in &seen {
            let t = map.get(name).unwrap_or_else(|| panic!("candle asks for {name}, absent"));
            assert_eq!(t.dims(), shape.as_slice(), "{name}");
        }
        let mut requested: Vec<&str> = seen.iter().map(|(n, _)| n.as_str()).collect();
        requested.sort_unstable();
        requested.dedup();
        let mut provided: Vec<&str> = map.keys().map(String::as_str).collect();
        provided.sort_unstable();
        assert_eq!(requested, provided, "the map holds exactly what candle requests");
        // Also through the plain `VarBuilder::from_tensors` the callers will use.
        let vb = VarBuilder::from_tensors(map.clone(), DType::F32, &Device::Cpu);
        Whisper::load(&vb, config.clone()).unwrap_or_else(|e| panic!("from_tensors load: {e}"));
        model
    }

    #[test]
    fn synthetic_whisper_maps_onto_candle() {
        let dir = tempfile::tempdir().expect("tempdir");
        let vars = tiny_whisper(16, 2, 2, 40, 8);
        write_model(dir.path(), &build(6, WHISPER_SPEC, 3, &vars, &TINY_ALIAS));
        let (map, dims, config) = load_whisper(dir.path(), DType::F32, &Device::Cpu).expect("load tiny whisper");
        let expected = WhisperDims {
            n_mels: 8,
            n_audio_ctx: 30,
            n_audio_state: 16,
            n_audio_head: 2,
            n_audio_layer: 2,
            n_vocab: 40,
            n_text_ctx: 16,
            n_text_state: 16,
            n_text_head: 2,
            n_text_layer: 2,
        };
        assert_eq!(dims, expected);
        assert_eq!(config.suppress_tokens, vec![1, 2]);
        assert_eq!(read_whisper_config(dir.path()).map(|c| c.suppress_ids_begin).ok(), Some(vec![3]));
        assert_map_is_what_candle_asks(&map, &config);

        // The fused projections are split by rows: q, k, v.
        let fused = vars.iter().find(|v| v.name == "encoder/layer_1/self_attention/linear_0/weight").expect("fused");
        let value = |i: usize| f16::from_le_bytes([fused.data[2 * i], fused.data[2 * i + 1]]).to_f32();
        let get = |name: &str, r: usize, c: usize| -> f32 {
            map[name].i((r, c)).and_then(|x| x.to_scalar::<f32>()).expect("element")
        };
        let l = "model.encoder.layers.1.self_attn";
        assert_eq!(get(&format!("{l}.q_proj.weight"), 3, 5), value(3 * 16 + 5));
        assert_eq!(get(&format!("{l}.k_proj.weight"), 3, 5), value((16 + 3) * 16 + 5));
        assert_eq!(get(&format!("{l}.v_proj.weight"), 3, 5), value((32 + 3) * 16 + 5));

        // F16 is possible too.
        let (map16, _, _) = load_whisper(dir.path(), DType::F16, &Device::Cpu).expect("f16");
        assert!(map16.values().all(|t| t.dtype() == DType::F16));
        let e = load_whisper(dir.path(), DType::U8, &Device::Cpu).expect_err("u8");
        assert!(matches!(e, WeightsError::UnsupportedDtype { .. }), "{e}");
    }

    #[test]
    fn synthetic_whisper_missing_or_misshapen_tensors() {
        let dir = tempfile::tempdir().expect("tempdir");
        let vars = tiny_whisper(16, 2, 2, 40, 8);

        let missing: Vec<Var> =
            vars.iter().filter(|v| v.name != "decoder/layer_1/attention/linear_2/bias").cloned().collect();
        write_model(dir.path(), &build(6, WHISPER_SPEC, 3, &missing, &TINY_ALIAS));
        let e = load_whisper(dir.path(), DType::F32, &Device::Cpu).expect_err("missing");
        assert!(
            matches!(&e, WeightsError::MissingTensor { name, .. } if name == "decoder/layer_1/attention/linear_2/bias"),
            "{e}"
        );

        let mut seed = 1;
        let misshapen: Vec<Var> = vars
            .iter()
            .map(|v| {
                if v.name == "encoder/layer_0/ffn/linear_0/weight" {
                    f16_var(&v.name, &[32, 16], &mut seed)
                } else {
                    v.clone()
                }
            })
            .collect();
        write_model(dir.path(), &build(6, WHISPER_SPEC, 3, &misshapen, &TINY_ALIAS));
        let e = load_whisper(dir.path(), DType::F32, &Device::Cpu).expect_err("shape");
        assert!(
            matches!(&e, WeightsError::ShapeMismatch { name, expected, found, .. }
                if name == "encoder/layer_0/ffn/linear_0/weight" && expected == &[64, 16] && found == &[32, 16]),
            "{e}"
        );

        let quantized: Vec<Var> = vars
            .iter()
            .map(|v| {
                if v.name == "decoder/layer_0/ffn/linear_1/weight" {
                    Var { dtype: 1, data: vec![0; v.data.len() / 2], ..v.clone() }
                } else {
                    v.clone()
                }
            })
            .collect();
        write_model(dir.path(), &build(6, WHISPER_SPEC, 3, &quantized, &TINY_ALIAS));
        let e = load_whisper(dir.path(), DType::F32, &Device::Cpu).expect_err("int8");
        assert!(matches!(e, WeightsError::UnsupportedDtype { .. }), "{e}");

        write_model(dir.path(), &build(6, WHISPER_SPEC, 4, &vars, &TINY_ALIAS));
        let e = load_whisper(dir.path(), DType::F32, &Device::Cpu).expect_err("revision");
        assert!(matches!(e, WeightsError::WrongSpec { revision: 4, .. }), "{e}");
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(256))]

        #[test]
        fn random_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..256)) {
            let _ = parse_bytes(&bytes);
            let mut with_header = 6u32.to_le_bytes().to_vec();
            with_header.extend_from_slice(&bytes);
            let _ = parse_bytes(&with_header);
        }

        #[test]
        fn truncations_are_detected(cut in 0usize..1000) {
            let good = small_file();
            let cut = cut % good.len();
            let e = parse_bytes(&good[..cut]);
            prop_assert!(matches!(e, Err(WeightsError::Truncated { .. })), "cut {}: {:?}", cut, e.err());
        }

        #[test]
        fn corruptions_never_panic(pos in 0usize..1000, byte in any::<u8>(), cut in 0usize..1000) {
            let mut bad = small_file();
            let n = bad.len();
            bad[pos % n] = byte;
            let _ = parse_bytes(&bad);
            let _ = parse_bytes(&bad[..cut % n]);
        }
    }

    // ---- the real model --------------------------------------------------------------------

    fn real_model_dir() -> PathBuf {
        std::env::var_os("VOXGATE_STT__MODEL_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../models/whisper-tiny.en")))
    }

    fn require_real_model() -> PathBuf {
        let dir = real_model_dir();
        assert!(
            dir.join("model.bin").is_file() && dir.join("config.json").is_file(),
            "whisper tiny.en is missing from {}: run nodes/deploy/fetch-model.sh (or set VOXGATE_STT__MODEL_DIR)",
            dir.display()
        );
        dir
    }

    #[test]
    fn real_model_file_layout() {
        let dir = require_real_model();
        let f = read_ct2(&dir.join("model.bin")).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!((f.binary_version, f.spec.as_str(), f.spec_revision), (6, WHISPER_SPEC, 3));
        assert_eq!(f.tensors.len(), 148);
        assert_eq!(f.aliases, vec![("decoder/projection/weight".to_owned(), "decoder/embeddings/weight".to_owned())]);
        assert_eq!(f.get("encoder/num_heads").and_then(Ct2Tensor::scalar_int), Some(6));
        // The stored encoder sinusoids are the ones candle computes (to f16 precision).
        let pos = f.get("encoder/position_encodings/encodings").expect("encoder positions");
        let (len, ch) = (pos.shape[0], pos.shape[1]);
        let inc = 10000f32.ln() / (ch / 2 - 1) as f32;
        let mut max_diff = 0f32;
        for t in 0..len {
            for c in 0..ch {
                let i = c % (ch / 2);
                let x = t as f32 * (-(i as f32) * inc).exp();
                let expected = if c < ch / 2 { x.sin() } else { x.cos() };
                let k = 2 * (t * ch + c);
                let got = f16::from_le_bytes([pos.data[k], pos.data[k + 1]]).to_f32();
                max_diff = max_diff.max((got - expected).abs());
            }
        }
        assert!(max_diff < 2e-3, "encoder sinusoids differ by {max_diff}");
        // The key's slice of every fused bias is zero.
        for t in &f.tensors {
            let d = 384;
            let key = if t.name.ends_with("self_attention/linear_0/bias") {
                d..2 * d
            } else if t.name.ends_with("/attention/linear_1/bias") {
                0..d
            } else {
                continue;
            };
            let b = &t.data[2 * key.start..2 * key.end];
            assert!(b.chunks_exact(2).all(|x| f16::from_le_bytes([x[0], x[1]]).to_f32() == 0.0), "{}", t.name);
        }
    }

    #[test]
    fn real_model_runs_in_candle() {
        let dir = require_real_model();
        let (map, dims, config) = load_whisper(&dir, DType::F32, &Device::Cpu).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            dims,
            WhisperDims {
                n_mels: 80,
                n_audio_ctx: 1500,
                n_audio_state: 384,
                n_audio_head: 6,
                n_audio_layer: 4,
                n_vocab: 51864,
                n_text_ctx: 448,
                n_text_state: 384,
                n_text_head: 6,
                n_text_layer: 4,
            }
        );
        let cfg_json = read_whisper_config(&dir).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(config.suppress_tokens, cfg_json.suppress_ids);
        assert!(config.suppress_tokens.contains(&50257) && config.suppress_tokens.len() > 50);
        assert!(map.values().all(|t| t.dtype() == DType::F32));
        let mut model = assert_map_is_what_candle_asks(&map, &config);

        // 1 s of silence, the SOT prompt, one decoder step.
        let mut fe = MelFrontend::new();
        let mut mel = Vec::new();
        let frames = fe.compute_padded(&vec![0.0; 16_000], 100, &mut mel);
        let mel = Tensor::from_vec(mel, (1, N_MELS, frames), &Device::Cpu).expect("mel tensor");
        let audio = model.encoder.forward(&mel, true).expect("encoder");
        assert_eq!(audio.dims(), &[1, frames / 2, 384]);
        let tokenizer =
            tokenizers::Tokenizer::from_file(dir.join("tokenizer.json")).unwrap_or_else(|e| panic!("tokenizer: {e}"));
        let id = |t: &str| tokenizer.token_to_id(t).unwrap_or_else(|| panic!("no token {t}"));
        let (sot, no_ts, eot) = (id("<|startoftranscript|>"), id("<|notimestamps|>"), id("<|endoftext|>"));
        let tokens = Tensor::new(&[[sot, no_ts]], &Device::Cpu).expect("tokens");
        let ys = model.decoder.forward(&tokens, &audio, true).expect("decoder");
        let logits = model
            .decoder
            .final_linear(&ys.i((..1, 1..)).expect("last"))
            .and_then(|l| l.i((0, 0)))
            .and_then(|l| l.to_vec1::<f32>())
            .expect("logits");
        assert_eq!(logits.len(), 51864);
        assert!(logits.iter().all(|x| x.is_finite()));
        let mut order: Vec<usize> = (0..logits.len()).collect();
        order.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]));
        let show = |i: usize| {
            let text = tokenizer.id_to_token(i as u32).unwrap_or_default();
            format!("{i} {text:?} ({:.3})", logits[i])
        };
        println!(
            "silence, after <|startoftranscript|><|notimestamps|>: top 5 = {:?}",
            order.iter().take(5).map(|&i| show(i)).collect::<Vec<_>>()
        );
        let best = order[0] as u32;
        // Plausible for silence: end of text, or a text token (never another special token);
        // tiny.en famously says " you" to silence, with end of text close behind.
        assert!(best <= eot, "argmax {} is a special token", show(best as usize));
        let eot_rank = order.iter().position(|&i| i == eot as usize).unwrap_or(usize::MAX);
        assert!(eot_rank < 10, "end of text ranks {eot_rank} on silence");
    }
}
