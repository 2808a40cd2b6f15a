//! An accuracy corpus: phone-call sentences, the voices that say them, and clips rendered the way
//! voxgate hears a call.
//!
//! [`render_clips`] synthesizes every sentence with every voice through [`speech::synthesize`]
//! (espeak-ng / flite → sox → 8 kHz µ-law, as Twilio sends it), pads it to whole 20 ms frames,
//! then does exactly what voxgate's transcoder does before the STT: G.711 µ-law decoding through
//! `voxgate_actors::transcode::mulaw` and the 8 → 16 kHz polyphase FIR
//! [`Upsampler2x`] with its group delay removed (16 kHz sample `2k` is 8 kHz sample `k`). The
//! clips are written as 16-bit 16 kHz mono WAV files `NNN_<voice slug>.wav` next to a `refs.json`
//! mapping clip name → reference text, which `scenarios/fw/baseline.py` (faster-whisper) reads.
//!
//! The sentences are written the way the TTS voices read them: numbers as words, no years or
//! hundreds (the WER normalizer in [`crate::wer`] maps 0–99 and digit strings only), no
//! abbreviations, no rare names, no words whose spelling differs between British and American.

use std::collections::BTreeMap;
use std::path::Path;

use anyhow::Context;
use voxgate_actors::transcode::{mulaw, Upsampler2x, DELAY_SAMPLES_16K, DELAY_SAMPLES_8K};

use crate::speech::{self, Voice, MULAW_SILENCE};
use crate::wer::WerByVoice;

/// Short English sentences typical of calls to a business.
pub const SENTENCES: &[&str] = &[
    "Hello, I would like to check the status of my order.",
    "My order number is four seven two nine one.",
    "Can I book an appointment for next Tuesday morning?",
    "Yes, that is correct.",
    "No, I do not want to renew my subscription.",
    "I live at twelve Maple Street, apartment five.",
    "Please send the invoice to my home address.",
    "The package arrived yesterday but the box was damaged.",
    "I have been waiting on hold for twenty minutes.",
    "Could you please transfer me to the billing department?",
    "My name is John Smith.",
    "I would like to cancel my appointment on Friday.",
    "The total came to forty five dollars.",
    "Can you call me back tomorrow afternoon?",
    "My phone number is five five five, two one three four.",
    "I was charged twice for the same order.",
    "The internet has been down since Monday.",
    "I need to change the delivery date to the third of June.",
    "Is the store open on Sunday?",
    "Thank you very much for your help.",
    "I would like to order two large pizzas for delivery.",
    "The heating in my apartment is not working.",
    "Can I pay with a credit card over the phone?",
    "I am calling about the letter I received last week.",
    "My flight was delayed and I missed my connection.",
    "We need a table for four people at seven tonight.",
    "The doctor can see you on Wednesday at nine thirty.",
    "Please do not call this number again.",
    "I forgot my password and I am locked out of my account.",
    "How much does the premium plan cost per month?",
    "My daughter is sick and she will not be at school today.",
    "There is a leak under the kitchen sink.",
    "I would like to speak to a manager, please.",
    "The driver left the parcel at the wrong house.",
    "Can you confirm my reservation for Saturday night?",
    "I have a question about my last bill.",
    "It has been three days and nobody has called me back.",
    "Sure, eight in the morning works for me.",
    "Sorry, could you repeat that more slowly?",
    "My zip code is nine four one zero seven.",
    "I can't hear you very well, the line is breaking up.",
    "That's fine, I'll wait.",
];

/// Voices installed by `.ci/run` (Debian's flite, espeak-ng and festival): four flite voices
/// (`slt` female and `rms`/`awb` male cluster-unit/diphone voices, `kal` the 8 kHz diphone one),
/// two espeak-ng formant voices (American and British English) and festival's American diphone
/// voice (`kal_diphone`, festvox-kallpc16k).
pub fn voices() -> Vec<Voice> {
    vec![
        Voice::Festival("kal_diphone".into()),
        Voice::Flite("slt".into()),
        Voice::Flite("rms".into()),
        Voice::Flite("awb".into()),
        Voice::Flite("kal".into()),
        Voice::Espeak("en-us".into()),
        Voice::Espeak("en-gb".into()),
    ]
}

/// A file-name-safe form of [`Voice::label`]: `flite-slt`, `espeak-ng-en-us`.
pub fn voice_slug(voice: &Voice) -> String {
    voice.label().chars().map(|c| if c.is_ascii_alphanumeric() || c == '-' { c } else { '-' }).collect()
}

/// One sentence said by one voice.
#[derive(Debug, Clone)]
pub struct Clip {
    /// `NNN_<voice slug>`: the sentence's index in the list, then the voice (also the WAV's stem).
    pub name: String,
    /// [`Voice::label`] of the speaker.
    pub voice: String,
    /// What was said.
    pub reference: String,
    /// 16 kHz mono PCM as voxgate's transcoder hands it to the STT (`2 * mulaw.len()` samples).
    pub pcm16k: Vec<i16>,
    /// 8 kHz µ-law as a phone call carries it, padded with silence to whole 20 ms frames.
    pub mulaw: Vec<u8>,
}

impl Clip {
    /// Duration of the clip in seconds.
    pub fn seconds(&self) -> f64 {
        self.mulaw.len() as f64 / 8_000.0
    }
}

/// 8 kHz µ-law → 16 kHz PCM through voxgate's own decoder and upsampler, delay removed: the
/// output has `2 * mulaw.len()` samples and sample `2k` is input sample `k` (as in
/// `StreamTranscoder`, the filter is flushed with silence at the end).
pub fn phone_pcm16k(mulaw_bytes: &[u8]) -> Vec<i16> {
    let mut pcm8 = Vec::with_capacity(mulaw_bytes.len() + DELAY_SAMPLES_8K);
    mulaw::decode_into(mulaw_bytes, &mut pcm8);
    pcm8.extend(std::iter::repeat_n(mulaw::decode(MULAW_SILENCE), DELAY_SAMPLES_8K));
    let mut out = Vec::with_capacity(2 * pcm8.len());
    Upsampler2x::new().process(&pcm8, &mut out);
    out.drain(..DELAY_SAMPLES_16K);
    out.truncate(2 * mulaw_bytes.len());
    out
}

/// Writes 16-bit 16 kHz mono PCM as a WAV file.
pub fn write_wav_16k(path: &Path, pcm: &[i16]) -> anyhow::Result<()> {
    const RATE: u32 = 16_000;
    let data_len = u32::try_from(pcm.len() * 2).context("clip too long for a WAV file")?;
    let mut b = Vec::with_capacity(44 + pcm.len() * 2);
    b.extend_from_slice(b"RIFF");
    b.extend_from_slice(&(36 + data_len).to_le_bytes());
    b.extend_from_slice(b"WAVEfmt ");
    b.extend_from_slice(&16u32.to_le_bytes()); // fmt chunk size
    b.extend_from_slice(&1u16.to_le_bytes()); // PCM
    b.extend_from_slice(&1u16.to_le_bytes()); // mono
    b.extend_from_slice(&RATE.to_le_bytes());
    b.extend_from_slice(&(RATE * 2).to_le_bytes()); // byte rate
    b.extend_from_slice(&2u16.to_le_bytes()); // block align
    b.extend_from_slice(&16u16.to_le_bytes()); // bits per sample
    b.extend_from_slice(b"data");
    b.extend_from_slice(&data_len.to_le_bytes());
    for s in pcm {
        b.extend_from_slice(&s.to_le_bytes());
    }
    std::fs::write(path, b).with_context(|| format!("writing {}", path.display()))
}

/// Synthesizes every sentence with every voice (sentence-major: all voices of sentence 0, then
/// sentence 1, …), writes each clip to `dir` as `NNN_<voice slug>.wav` and all references to
/// `dir/refs.json` (`{"000_flite-slt": "Hello, …", …}`), and returns the clips. `dir` is created
/// if needed; it also holds the TTS's temporary files.
pub fn render_clips(dir: &Path, sentences: &[&str], voices: &[Voice]) -> anyhow::Result<Vec<Clip>> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let mut clips = Vec::with_capacity(sentences.len() * voices.len());
    let mut refs = serde_json::Map::new();
    for (i, text) in sentences.iter().enumerate() {
        for voice in voices {
            let name = format!("{i:03}_{}", voice_slug(voice));
            let mut mulaw =
                speech::synthesize(text, voice, dir).with_context(|| format!("synthesizing clip {name}"))?;
            let frames = mulaw.len().div_ceil(160);
            mulaw.resize(frames * 160, MULAW_SILENCE);
            let pcm16k = phone_pcm16k(&mulaw);
            write_wav_16k(&dir.join(format!("{name}.wav")), &pcm16k)?;
            refs.insert(name.clone(), serde_json::Value::String((*text).to_owned()));
            clips.push(Clip { name, voice: voice.label(), reference: (*text).to_owned(), pcm16k, mulaw });
        }
    }
    let refs_path = dir.join("refs.json");
    std::fs::write(&refs_path, serde_json::to_vec_pretty(&refs)?)
        .with_context(|| format!("writing {}", refs_path.display()))?;
    Ok(clips)
}

/// Scores the JSON lines printed by `scenarios/fw/baseline.py` with [`crate::wer`]: one
/// [`WerByVoice`] per decoding mode present (`greedy`, `beam5`, `int8 greedy`, `int8 beam5`),
/// grouped by the clip's voice slug, with the audio and decoding seconds of each mode.
pub fn score_fw_jsonl(jsonl: &str) -> anyhow::Result<BTreeMap<String, FwMode>> {
    let mut modes: BTreeMap<String, FwMode> = BTreeMap::new();
    for (n, line) in jsonl.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
        let row: serde_json::Value = serde_json::from_str(line).with_context(|| format!("line {}: not JSON", n + 1))?;
        let field = |v: &serde_json::Value, k: &str| v.get(k).cloned();
        let text = |k: &str| {
            field(&row, k)
                .and_then(|v| v.as_str().map(str::to_owned))
                .with_context(|| format!("line {}: no {k}", n + 1))
        };
        let (voice, reference) = (text("voice")?, text("reference")?);
        let audio = field(&row, "audio_seconds").and_then(|v| v.as_f64()).unwrap_or(0.0);
        let nested = [("", Some(row.clone())), ("int8 ", field(&row, "int8"))];
        for (prefix, obj) in nested {
            let Some(obj) = obj else { continue };
            for (key, v) in obj.as_object().into_iter().flatten() {
                let Some(mode) = key.strip_prefix("text_") else { continue };
                let hyp = v.as_str().unwrap_or_default();
                let m = modes.entry(format!("{prefix}{mode}")).or_default();
                m.wer.score(&voice, &reference, hyp);
                m.audio_seconds += audio;
                m.decode_seconds += field(&obj, &format!("seconds_{mode}")).and_then(|v| v.as_f64()).unwrap_or(0.0);
            }
        }
    }
    Ok(modes)
}

/// One decoding mode of the faster-whisper baseline.
#[derive(Debug, Clone, Default)]
pub struct FwMode {
    pub wer: WerByVoice,
    pub audio_seconds: f64,
    pub decode_seconds: f64,
}

impl FwMode {
    /// Audio seconds transcribed per wall-clock second.
    pub fn speed(&self) -> f64 {
        self.audio_seconds / self.decode_seconds
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wer::normalize;

    #[test]
    fn corpus_is_large_varied_and_normalizes_to_itself() {
        assert!(SENTENCES.len() >= 36);
        let mut seen = std::collections::BTreeSet::new();
        for s in SENTENCES {
            assert!(seen.insert(*s), "duplicate sentence {s:?}");
            // References are already in words: normalization only lowercases and strips.
            assert!(!s.contains(|c: char| c.is_ascii_digit()), "{s:?} has digits");
            let words = normalize(s);
            assert!((3..=14).contains(&words.len()), "{s:?}: {} words", words.len());
        }
        let v = voices();
        let flite = v.iter().filter(|v| matches!(v, Voice::Flite(_))).count();
        let espeak = v.iter().filter(|v| matches!(v, Voice::Espeak(_))).count();
        let festival = v.iter().filter(|v| matches!(v, Voice::Festival(_))).count();
        assert!(flite >= 2 && espeak >= 2 && festival >= 1);
        for x in &v {
            assert_eq!(Voice::parse(&x.label()).map(|p| p.label()), Some(x.label()));
        }
        assert!(Voice::parse("festival:../x").is_none() && Voice::parse("sam:x").is_none());
        let slugs: std::collections::BTreeSet<_> = v.iter().map(voice_slug).collect();
        assert_eq!(slugs.len(), v.len());
        assert_eq!(voice_slug(&Voice::Espeak("en-us".into())), "espeak-ng-en-us");
    }

    #[test]
    fn phone_path_keeps_timing_and_level() {
        // A 500 Hz tone through µ-law and the upsampler: same length ×2, aligned, same level.
        let pcm8: Vec<i16> = (0..800)
            .map(|k| (8000.0 * (2.0 * std::f64::consts::PI * 500.0 * k as f64 / 8000.0).sin()) as i16)
            .collect();
        let mut mu = Vec::new();
        mulaw::encode_into(&pcm8, &mut mu);
        let up = phone_pcm16k(&mu);
        assert_eq!(up.len(), 2 * mu.len());
        for k in 100..700 {
            let want = mulaw::decode(mu[k]);
            assert!((i32::from(up[2 * k]) - i32::from(want)).abs() < 400, "sample {k}");
        }
        assert_eq!(phone_pcm16k(&[]), Vec::<i16>::new());
    }

    #[test]
    fn wav_header_is_canonical() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("x.wav");
        write_wav_16k(&p, &[1, -2, 3]).unwrap();
        let b = std::fs::read(&p).unwrap();
        assert_eq!(b.len(), 44 + 6);
        assert_eq!(&b[0..4], b"RIFF");
        assert_eq!(u32::from_le_bytes(b[4..8].try_into().unwrap()), 42);
        assert_eq!(&b[8..16], b"WAVEfmt ");
        assert_eq!(u32::from_le_bytes(b[24..28].try_into().unwrap()), 16_000);
        assert_eq!(u16::from_le_bytes(b[34..36].try_into().unwrap()), 16);
        assert_eq!(&b[36..40], b"data");
        assert_eq!(u32::from_le_bytes(b[40..44].try_into().unwrap()), 6);
        assert_eq!(i16::from_le_bytes([b[46], b[47]]), -2);
    }

    #[test]
    fn renders_every_voice() {
        let dir = tempfile::tempdir().unwrap();
        let v = voices();
        let clips = render_clips(dir.path(), &SENTENCES[..1], &v).unwrap();
        assert_eq!(clips.len(), v.len());
        for (c, voice) in clips.iter().zip(&v) {
            assert_eq!(c.name, format!("000_{}", voice_slug(voice)));
            assert_eq!(c.voice, voice.label());
            assert_eq!(c.reference, SENTENCES[0]);
            assert_eq!(c.mulaw.len() % 160, 0);
            assert_eq!(c.pcm16k.len(), 2 * c.mulaw.len());
            let (a, b) = speech::voiced_span(&c.mulaw).expect("speech in clip");
            assert!(b - a > 1_000, "{}: only {} ms of sound", c.name, b - a);
            let wav = std::fs::metadata(dir.path().join(format!("{}.wav", c.name))).unwrap();
            assert_eq!(wav.len() as usize, 44 + 2 * c.pcm16k.len());
        }
        let refs: serde_json::Map<String, serde_json::Value> =
            serde_json::from_slice(&std::fs::read(dir.path().join("refs.json")).unwrap()).unwrap();
        assert_eq!(refs.len(), v.len());
        assert_eq!(refs["000_flite-slt"], SENTENCES[0]);
    }

    /// Renders the whole corpus into `$VOXGATE_CLIPS_DIR` (for `scenarios/fw/baseline.py`):
    /// `VOXGATE_CLIPS_DIR=target/clips cargo test -p voxgate-scenarios --lib render_corpus -- --ignored`
    #[test]
    #[ignore = "writes the corpus to $VOXGATE_CLIPS_DIR"]
    fn render_corpus() {
        let dir = std::env::var_os("VOXGATE_CLIPS_DIR").expect("set VOXGATE_CLIPS_DIR");
        let clips = render_clips(Path::new(&dir), SENTENCES, &voices()).unwrap();
        let secs: f64 = clips.iter().map(Clip::seconds).sum();
        eprintln!("{} clips, {secs:.1} s of audio in {:?}", clips.len(), dir);
    }

    #[test]
    fn scores_baseline_lines() {
        let jsonl = r#"{"clip": "000_flite-slt", "voice": "flite-slt", "reference": "Yes, that is correct.", "text_greedy": "Yes, that's correct.", "text_beam5": "Yes, that is direct.", "seconds_greedy": 0.5, "seconds_beam5": 1.0, "audio_seconds": 2.0, "int8": {"text_greedy": "Yes that is correct", "text_beam5": "yes", "seconds_greedy": 0.25, "seconds_beam5": 0.5}}
{"clip": "001_espeak-ng-en-us", "voice": "espeak-ng-en-us", "reference": "My zip code is nine four one zero seven.", "text_greedy": "My zip code is 94107.", "text_beam5": "My zip code is 94107.", "seconds_greedy": 0.5, "seconds_beam5": 1.0, "audio_seconds": 2.0}
"#;
        let m = score_fw_jsonl(jsonl).unwrap();
        assert_eq!(m.keys().collect::<Vec<_>>(), ["beam5", "greedy", "int8 beam5", "int8 greedy"]);
        assert_eq!(m["greedy"].wer.total().counts.errors(), 0);
        assert_eq!(m["greedy"].wer.total().counts.ref_words, 13);
        assert_eq!(m["beam5"].wer.get("flite-slt").unwrap().counts.subs, 1);
        assert_eq!(m["int8 beam5"].wer.total().counts.dels, 3);
        assert_eq!(m["greedy"].speed(), 4.0);
        assert_eq!(m["int8 greedy"].speed(), 8.0);
    }

    /// Scores `$VOXGATE_FW_JSONL` (baseline.py's output) and prints a table per mode.
    #[test]
    #[ignore = "reads $VOXGATE_FW_JSONL"]
    fn score_fw_baseline() {
        let path = std::env::var_os("VOXGATE_FW_JSONL").expect("set VOXGATE_FW_JSONL");
        let jsonl = std::fs::read_to_string(path).unwrap();
        // Every greedy error, to check that the normalizer counts only real mistakes.
        for line in jsonl.lines().filter(|l| !l.trim().is_empty()) {
            let row: serde_json::Value = serde_json::from_str(line).unwrap();
            let (r, h) = (row["reference"].as_str().unwrap(), row["text_greedy"].as_str().unwrap_or(""));
            if crate::wer::wer(r, h).errors() > 0 {
                eprintln!("{}: {}", row["clip"].as_str().unwrap(), crate::wer::diff(r, h));
            }
        }
        let modes = score_fw_jsonl(&jsonl).unwrap();
        for (name, m) in &modes {
            eprintln!("## faster-whisper {name}: {:.1} audio s/s\n{}", m.speed(), m.wer.table());
        }
    }
}
