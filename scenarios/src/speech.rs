//! Speech for tests, made the way a phone would send it: synthesized with espeak-ng, flite or
//! festival, resampled by sox to 8 kHz mono µ-law.

use std::path::Path;
use std::process::Command;

use anyhow::{bail, Context};

/// A text-to-speech voice from Debian's packages.
#[derive(Debug, Clone)]
pub enum Voice {
    /// `espeak-ng -v NAME` (e.g. `en-us`, `en`).
    Espeak(String),
    /// `flite -voice NAME` (e.g. `slt`, `kal`, `rms`, `awb`).
    Flite(String),
    /// festival's `text2wave` with `(voice_NAME)` (e.g. `kal_diphone` from Debian's
    /// festvox-kallpc16k, `cmu_us_slt_arctic_hts` from festvox-us-slt-hts).
    Festival(String),
}

impl Voice {
    pub fn label(&self) -> String {
        match self {
            Voice::Espeak(v) => format!("espeak-ng:{v}"),
            Voice::Flite(v) => format!("flite:{v}"),
            Voice::Festival(v) => format!("festival:{v}"),
        }
    }

    /// Parses [`Voice::label`]'s form (`flite:slt`, `espeak-ng:en-us` or `espeak:en-us`,
    /// `festival:kal_diphone`).
    pub fn parse(label: &str) -> Option<Voice> {
        let (engine, name) = label.split_once(':')?;
        if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_') {
            return None;
        }
        match engine {
            "flite" => Some(Voice::Flite(name.into())),
            "espeak" | "espeak-ng" => Some(Voice::Espeak(name.into())),
            "festival" => Some(Voice::Festival(name.into())),
            _ => None,
        }
    }
}

/// µ-law silence.
pub const MULAW_SILENCE: u8 = 0xFF;

/// Synthesizes `text` and returns 8 kHz mono µ-law bytes.
pub fn synthesize(text: &str, voice: &Voice, work: &Path) -> anyhow::Result<Vec<u8>> {
    let wav = work.join(format!("tts-{}.wav", std::process::id() as u64 * 1_000_003 + fxhash(text)));
    let status = match voice {
        Voice::Espeak(v) => Command::new("espeak-ng").args(["-v", v, "-s", "160", "-w"]).arg(&wav).arg(text).status(),
        Voice::Flite(v) => Command::new("flite").args(["-voice", v, "-t", text, "-o"]).arg(&wav).status(),
        Voice::Festival(v) => {
            let txt = wav.with_extension("txt");
            std::fs::write(&txt, text).with_context(|| format!("writing {}", txt.display()))?;
            let status = Command::new("text2wave")
                .arg(&txt)
                .arg("-o")
                .arg(&wav)
                .args(["-eval", &format!("(voice_{v})")])
                .status();
            let _ = std::fs::remove_file(&txt);
            status
        }
    }
    .with_context(|| format!("running {} (install espeak-ng / flite / festival)", voice.label()))?;
    if !status.success() {
        bail!("{} failed with {status}", voice.label());
    }
    let out = Command::new("sox")
        .arg(&wav)
        .args(["-r", "8000", "-c", "1", "-e", "mu-law", "-b", "8", "-t", "raw", "-"])
        .output()
        .context("running sox (install sox)")?;
    let _ = std::fs::remove_file(&wav);
    if !out.status.success() {
        bail!("sox failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(out.stdout)
}

fn fxhash(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ u64::from(b)).wrapping_mul(0x100_0000_01b3))
}

/// Decodes one µ-law byte (G.711), for measuring synthesized audio.
pub fn mulaw_to_linear(u: u8) -> i16 {
    let u = !u;
    let sign = u & 0x80;
    let exponent = (u >> 4) & 0x07;
    let mantissa = u & 0x0F;
    let magnitude = ((i32::from(mantissa) << 3) + 0x84) << exponent;
    let v = magnitude - 0x84;
    (if sign != 0 { -v } else { v }) as i16
}

/// Where the sound is in a µ-law clip: first and last 10 ms window above -45 dBFS, in ms.
pub fn voiced_span(mulaw: &[u8]) -> Option<(u64, u64)> {
    let win = 80;
    let loud: Vec<bool> = mulaw
        .chunks(win)
        .map(|c| {
            let e: f64 = c.iter().map(|&u| f64::from(mulaw_to_linear(u)).powi(2)).sum::<f64>() / c.len() as f64;
            10.0 * (e.max(1e-9) / (32768.0f64 * 32768.0)).log10() > -45.0
        })
        .collect();
    let first = loud.iter().position(|&l| l)?;
    let last = loud.iter().rposition(|&l| l)?;
    Some((first as u64 * 10, (last as u64 + 1) * 10))
}

/// A phone call's worth of audio with known speech spans.
pub struct Script {
    pub mulaw: Vec<u8>,
    /// (start_ms, end_ms, text) of each utterance's voiced part.
    pub utterances: Vec<(u64, u64, String)>,
}

/// Lays out utterances with `gap_ms` of silence between them (and `lead_ms` before the first).
pub fn script(lines: &[(&str, Voice)], lead_ms: u64, gap_ms: u64, work: &Path) -> anyhow::Result<Script> {
    let mut mulaw = vec![MULAW_SILENCE; (lead_ms * 8) as usize];
    let mut utterances = Vec::new();
    for (i, (text, voice)) in lines.iter().enumerate() {
        if i > 0 {
            mulaw.extend(std::iter::repeat_n(MULAW_SILENCE, (gap_ms * 8) as usize));
        }
        let clip = synthesize(text, voice, work)?;
        let (a, b) = voiced_span(&clip).with_context(|| format!("no sound synthesized for {text:?}"))?;
        let offset = mulaw.len() as u64 / 8;
        utterances.push((offset + a, offset + b, (*text).to_owned()));
        mulaw.extend_from_slice(&clip);
    }
    mulaw.extend(std::iter::repeat_n(MULAW_SILENCE, (gap_ms * 8) as usize));
    // Whole 20 ms frames.
    let frames = mulaw.len().div_ceil(160);
    mulaw.resize(frames * 160, MULAW_SILENCE);
    Ok(Script { mulaw, utterances })
}
