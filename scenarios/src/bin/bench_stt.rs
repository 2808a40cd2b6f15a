//! STT benchmark.
//!
//! Part 1, the model on the same clips as faster-whisper: phone-band clips of the corpus
//! (sentences × voices, rendered through voxgate's own µ-law decoder and upsampler), transcribed
//! by voxgate's Transcriber one at a time and in batches of 4, and — in the same run, when
//! `target/fw-venv` exists (see scenarios/fw/requirements.txt) — by faster-whisper on the same
//! weights in float32, greedy and beam 5. Reported: audio seconds per second, per-clip median,
//! WER, and the ratios. voxgate runs three ways in the same run: greedy with the text the checks
//! doubt dropped (the old policy), greedy with it kept, and the default (Whisper's temperature
//! fallback, the best attempt kept); with how many clips came back empty or doubted.
//!
//! Part 2, end to end through a release `voxgate serve`: C concurrent calls speak at real time;
//! for each transcript, the time from the end of the speech (known from the script) to the
//! transcript being durable in the log. p50 and p95 at each concurrency.
//!
//! Also in part 2: partial results (how many per final, the interval between a segment's
//! partials), and how many finals were decoded already at the pause where they ended.
//!
//! `cargo run --release -p voxgate-scenarios --bin bench_stt -- [e2e] [SENTENCES] [CONCURRENCY,…] [VOICES]`
//! (VOICES e.g. `flite:slt,espeak:en-us,espeak:en-gb-x-rp,flite:awb`; the default is the first two;
//! `e2e` runs part 2 alone). `BENCH_STT_VARIANTS` runs part 2 once per `;`-separated TOML
//! snippet added to the node's config (e.g. `[transcode.vad]\nhangover_ms = 300`); `base` is the
//! config as shipped.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::Context;
use voxgate_actors::stt::decode::{DecodeOptions, Timings, Transcriber};
use voxgate_protocol::{CallSid, StreamSid};
use voxgate_scenarios::bench::quantile;
use voxgate_scenarios::corpus::{render_clips, score_fw_jsonl, Clip, SENTENCES};
use voxgate_scenarios::fixture::{config, replay_json, sim, NUMBER};
use voxgate_scenarios::node::{model_dir, Node};
use voxgate_scenarios::speech::{script, Voice};
use voxgate_scenarios::twilio::Pace;
use voxgate_scenarios::wer::WerByVoice;

fn main() -> anyhow::Result<()> {
    let mut args: Vec<String> = std::env::args().collect();
    let e2e_only = args.get(1).is_some_and(|a| a == "e2e");
    if e2e_only {
        args.remove(1);
    }
    let n_sentences: usize = args.get(1).and_then(|a| a.parse().ok()).unwrap_or(24);
    let levels: Vec<usize> =
        args.get(2).map(|a| a.split(',').filter_map(|x| x.parse().ok()).collect()).unwrap_or_else(|| vec![1, 4, 8]);
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let voices: Vec<Voice> =
        args.get(3).map(|a| a.split(',').filter_map(Voice::parse).collect()).unwrap_or_else(|| {
            vec![Voice::Flite("slt".into()), Voice::Espeak("en-us".into()), Voice::Festival("kal_diphone".into())]
        });
    let sentences: Vec<&str> = SENTENCES.iter().copied().take(n_sentences).collect();
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    if e2e_only {
        return rt.block_on(end_to_end(&levels, &sentences));
    }

    // ---- Part 1: the model, side by side with faster-whisper.
    let clips_dir = root.join("target/bench-stt-clips");
    let _ = std::fs::remove_dir_all(&clips_dir);
    std::fs::create_dir_all(&clips_dir)?;
    let clips = render_clips(&clips_dir, &sentences, &voices)?;
    let audio: f64 = clips.iter().map(|c| c.seconds()).sum();
    let mut t = Transcriber::load(&model_dir()).map_err(|e| anyhow::anyhow!("{e}"))?;
    let pcm: Vec<Vec<f32>> = clips.iter().map(|c| c.pcm16k.iter().map(|&s| f32::from(s) / 32768.0).collect()).collect();
    t.transcribe(&pcm[0]).map_err(|e| anyhow::anyhow!("{e}"))?; // warm-up

    // The old policy and greedy-kept first, then the default (whose figures the rest compare).
    let defaults = t.options().clone();
    // Greedy (one hypothesis) without the fallback, as the old policy was: these rows were beam 3
    // once the default became beam 3, which made beam 3 look as cheap per step as greedy.
    let greedy = DecodeOptions { fallback_temperatures: Vec::new(), beam_size: 1, ..defaults.clone() };
    let mut policies = Vec::new();
    // Decoding policies to compare beside the default: BENCH_STT_POLICIES="beam=5;beam=3,min_frames=0"
    // (keys: beam, min_frames, pad_frames, early = 0 or 1); default "beam=5".
    let mut runs: Vec<(String, DecodeOptions, bool)> = vec![
        ("voxgate greedy, doubted text dropped".into(), greedy.clone(), true),
        ("voxgate greedy, doubted text kept".into(), greedy, false),
    ];
    for policy in std::env::var("BENCH_STT_POLICIES").unwrap_or_else(|_| "beam=5".into()).split(';') {
        let mut o = defaults.clone();
        for kv in policy.split(',').filter(|kv| !kv.trim().is_empty()) {
            let (k, v) = kv.split_once('=').with_context(|| format!("policy {policy:?}: {kv:?} is not key=value"))?;
            let v: usize = v.trim().parse().with_context(|| format!("policy {policy:?}: {v:?}"))?;
            match k.trim() {
                "beam" => o.beam_size = v,
                "min_frames" => o.min_encoder_frames = v,
                "pad_frames" => o.encoder_pad_frames = v,
                "early" => o.beam_early_stop = v != 0,
                other => anyhow::bail!("policy {policy:?}: unknown key {other:?}"),
            }
        }
        if !policy.trim().is_empty() {
            runs.push((format!("voxgate {}", policy.trim()), o, false));
        }
    }
    runs.push((format!("voxgate fallback, beam {} (default)", defaults.beam_size), defaults, false));
    for (name, options, drop_doubted) in runs {
        println!("{name}:");
        let (total, times, wer, empty, doubted) = run_policy(&mut t, &clips, &pcm, options, drop_doubted)?;
        policies.push((name, total, times, wer, empty, doubted));
    }
    let Some((_, single_total, mut single, wer_single, empty, doubted)) = policies.pop() else {
        anyhow::bail!("no run")
    };

    let mut wer_batch = WerByVoice::new();
    let start = Instant::now();
    for (cs, ps) in clips.chunks(4).zip(pcm.chunks(4)) {
        let refs: Vec<&[f32]> = ps.iter().map(|p| p.as_slice()).collect();
        let rs = t.transcribe_batch(&refs).map_err(|e| anyhow::anyhow!("{e}"))?;
        for (c, r) in cs.iter().zip(rs) {
            wer_batch.score(&c.voice, &c.reference, &r.text);
        }
    }
    let batch_total = start.elapsed().as_secs_f64();
    drop(t);

    println!(
        "STT model on {} phone-band clips ({audio:.1} s of audio, {} sentences × {} voices), 2 cores",
        clips.len(),
        sentences.len(),
        voices.len()
    );
    println!("{:<36} {:>12} {:>14} {:>8} {:>8}", "", "audio s / s", "median clip s", "WER", "numbers");
    for (name, total, mut times, wer, empty, doubted) in policies {
        row(
            &name,
            audio / total,
            Some(quantile(&mut times, 0.5)),
            &wer,
            &format!("({empty} empty, {doubted} doubted)"),
        );
    }
    let v_speed = audio / single_total;
    row(
        "voxgate fallback (default), 1 at a time",
        v_speed,
        Some(quantile(&mut single, 0.5)),
        &wer_single,
        &format!("({empty} empty, {doubted} doubted)"),
    );
    row("voxgate fallback (default), batches of 4", audio / batch_total, None, &wer_batch, "");

    faster_whisper(&root, &clips_dir, &model_dir(), "", v_speed)?;

    // The second model, multilingual Whisper base forced to English (`nodes/deploy/fetch-model.sh
    // base`), when BENCH_STT_BASE names its directory (or is 1: models/whisper-base).
    if let Ok(base) = std::env::var("BENCH_STT_BASE") {
        let dir = if base == "1" { root.join("models/whisper-base") } else { PathBuf::from(base) };
        let mut b = Transcriber::load(&dir).map_err(|e| anyhow::anyhow!("{}: {e}", dir.display()))?;
        b.transcribe(&pcm[0]).map_err(|e| anyhow::anyhow!("{e}"))?; // warm-up
        let defaults = b.options().clone();
        for (name, options) in [
            ("voxgate base, greedy", DecodeOptions { beam_size: 1, ..defaults.clone() }),
            ("voxgate base, default options", defaults),
        ] {
            let (total, mut times, wer, empty, doubted) = run_policy(&mut b, &clips, &pcm, options, false)?;
            let note = format!(
                "({empty} empty, {doubted} doubted; tiny.en default is {:.2}× its speed)",
                v_speed / (audio / total)
            );
            row(name, audio / total, Some(quantile(&mut times, 0.5)), &wer, &note);
        }
        drop(b);
        faster_whisper(&root, &clips_dir, &dir, "base ", v_speed)?;
    }
    println!("WER per voice, voxgate one at a time:\n{}", wer_single.table());

    // ---- Part 2: end to end, end of speech → transcript durable.
    rt.block_on(end_to_end(&levels, &sentences))
}

/// One row of part 1's table: audio seconds per second, median seconds per clip (if measured),
/// WER overall and on number words, and a note.
fn row(name: &str, speed: f64, median: Option<f64>, wer: &WerByVoice, note: &str) {
    let median = median.map_or_else(|| "-".to_string(), |m| format!("{m:.3}"));
    println!(
        "{name:<36} {speed:>12.2} {median:>14} {:>7.1}% {:>7.1}%   {note}",
        wer.total().counts.rate() * 100.0,
        wer.total().numbers.rate() * 100.0
    );
}

/// One decoding policy over every clip, one at a time: (seconds, per-clip seconds, WER, empty, doubted).
fn run_policy(
    t: &mut Transcriber,
    clips: &[Clip],
    pcm: &[Vec<f32>],
    options: DecodeOptions,
    drop_doubted: bool,
) -> anyhow::Result<(f64, Vec<f64>, WerByVoice, usize, usize)> {
    t.set_options(options);
    t.take_timings();
    let mut times = Vec::new();
    let mut wer = WerByVoice::new();
    let (mut empty, mut doubted) = (0, 0);
    let start = Instant::now();
    for (c, p) in clips.iter().zip(pcm) {
        let s = Instant::now();
        let r = t.transcribe(p).map_err(|e| anyhow::anyhow!("{e}"))?;
        times.push(s.elapsed().as_secs_f64());
        doubted += usize::from(r.doubt.is_some());
        let text = if drop_doubted && r.doubt.is_some() { "" } else { r.text.as_str() };
        empty += usize::from(text.is_empty());
        wer.score(&c.voice, &c.reference, text);
    }
    let total = start.elapsed().as_secs_f64();
    where_time_goes(&t.take_timings(), clips.len(), total);
    Ok((total, times, wer, empty, doubted))
}

/// Where a policy's time went, per clip: the log-mel, the encoder, the decoder (per step).
fn where_time_goes(tm: &Timings, clips: usize, total: f64) {
    let per = |d: Duration| d.as_secs_f64() * 1000.0 / clips.max(1) as f64;
    println!(
        "  per clip: mel {:.1} ms, encoder {:.1} ms ({} frames), decoder {:.1} ms (cross-attention set-up {:.1}, {:.1} steps of {:.2} ms in the model, choosing tokens {:.1}), other {:.1} ms; {} fallbacks",
        per(tm.mel),
        per(tm.encoder),
        tm.encoder_frames / clips.max(1),
        per(tm.decoder),
        per(tm.decoder_setup),
        tm.decoder_steps as f64 / clips.max(1) as f64,
        tm.decoder_model.as_secs_f64() * 1000.0 / tm.decoder_steps.max(1) as f64,
        per(tm.decoder) - per(tm.decoder_setup) - per(tm.decoder_model),
        total * 1000.0 / clips.max(1) as f64 - per(tm.mel) - per(tm.encoder) - per(tm.decoder),
        tm.fallbacks,
    );
}

/// faster-whisper (scenarios/fw/baseline.py, target/fw-venv) on the same clips and model:
/// greedy and beam 5, float32 and int8; `label` prefixes the rows (e.g. "base ").
fn faster_whisper(root: &Path, clips_dir: &Path, model: &Path, label: &str, v_speed: f64) -> anyhow::Result<()> {
    let python = root.join("target/fw-venv/bin/python");
    if std::env::var("BENCH_STT_FW").is_ok_and(|v| v == "0") {
        println!("faster-whisper: skipped (BENCH_STT_FW=0)");
        return Ok(());
    }
    if !python.exists() {
        println!("faster-whisper: not installed (python3 -m venv target/fw-venv && target/fw-venv/bin/pip install -r scenarios/fw/requirements.txt)");
        return Ok(());
    }
    let out = Command::new(&python)
        .arg(root.join("scenarios/fw/baseline.py"))
        .arg(clips_dir)
        .arg(model)
        .args(["--threads", "2"])
        .output()
        .context("running faster-whisper")?;
    if !out.status.success() {
        println!("faster-whisper failed: {}", String::from_utf8_lossy(&out.stderr).lines().last().unwrap_or(""));
        return Ok(());
    }
    let modes = score_fw_jsonl(&String::from_utf8_lossy(&out.stdout))?;
    for (mode, m) in &modes {
        let speed = m.audio_seconds / m.decode_seconds.max(1e-9);
        let name = match mode.strip_prefix("int8 ") {
            Some(m) => format!("faster-whisper {label}int8, {m}"),
            None => format!("faster-whisper {label}f32, {mode}"),
        };
        let note = format!("(voxgate tiny.en one-at-a-time is {:.2}× its speed)", v_speed / speed);
        row(&name, speed, None, &m.wer, &note);
    }
    Ok(())
}

async fn end_to_end(levels: &[usize], sentences: &[&str]) -> anyhow::Result<()> {
    let work = tempfile::tempdir()?;
    let voices = [Voice::Flite("slt".into()), Voice::Espeak("en-us".into())];
    let per_call = 6.min(sentences.len());
    println!("end to end at real time, release voxgate, {per_call} sentences per call (1.5 s apart)");
    let variants: Vec<String> = std::env::var("BENCH_STT_VARIANTS")
        .map(|v| {
            v.split(';').map(|x| if x.trim() == "base" { String::new() } else { x.replace("\\n", "\n") }).collect()
        })
        .unwrap_or_else(|_| vec![String::new()]);
    for variant in &variants {
        println!("config: {}", if variant.is_empty() { "as shipped".to_string() } else { variant.replace('\n', " ") });
        one_config(levels, sentences, &voices, per_call, variant, work.path()).await?;
    }
    Ok(())
}

async fn one_config(
    levels: &[usize],
    sentences: &[&str],
    voices: &[Voice],
    per_call: usize,
    variant: &str,
    work: &Path,
) -> anyhow::Result<()> {
    println!(
        "{:>6} {:>12} {:>10} {:>10} {:>10} {:>16} {:>16} {:>8}",
        "calls", "sentences", "p50 ms", "p95 ms", "max ms", "partials/final", "partial gap p50", "WER"
    );
    for &calls in levels {
        // Calls start at once: the tenant's quota (10 new calls a second) must not refuse them.
        let quotas = if variant.contains("[quotas]") { "" } else { "[quotas]\ncalls_per_second = 1000\n" };
        let mut node = Node::start(&config(&format!("{quotas}{variant}")))?;
        let mut tasks = Vec::new();
        for c in 0..calls {
            let v = voices[c % voices.len()].clone();
            let lines: Vec<(&str, Voice)> =
                (0..per_call).map(|i| (sentences[(c + i) % sentences.len()], v.clone())).collect();
            let s = script(&lines, 500, 1500, work)?;
            let sim = sim(&node);
            let call = CallSid::from_u128(0xbe_0000 + (calls * 1000 + c) as u128);
            // One caller per call: the fraud screen's velocity rule refuses one number calling
            // a dozen times at once.
            let caller = format!("+1415555{:04}", 100 + c);
            tasks.push(tokio::spawn(async move {
                let answer = sim.inbound_call(call, &caller, NUMBER).await?;
                let url = answer.stream_url.context("no stream")?;
                let mut st = sim.connect_stream(&url).await?;
                let sid = StreamSid::from_u128(call.as_u128());
                st.start(sid, sim.account, call).await?;
                let t0 = SystemTime::now().duration_since(UNIX_EPOCH)?.as_micros() as i64;
                st.send_audio(sid, &s.mulaw, Pace::RealTime).await?;
                st.stop(sid, sim.account, call).await?;
                st.close().await;
                sim.status_callback(call, "completed", 1, Some(1)).await?;
                anyhow::Ok((call, t0, s.utterances))
            }));
        }
        let mut done = Vec::new();
        for t in tasks {
            done.push(t.await??);
        }
        node.wait_idle(Duration::from_secs(600)).await?;
        let metrics = node.scrape().await.unwrap_or_default();
        node.stop()?;
        let mut lat = Vec::new();
        let (mut partials, mut gaps) = (0usize, Vec::new());
        let (mut segments, mut sentences_heard) = (0usize, 0usize);
        let mut wer = WerByVoice::new();
        // Where the time goes, per final: the sentence's audio end → its segment on the speech
        // log (the VAD's hangover, media batches, the transcoder), → its transcript on the
        // transcripts log (STT); and how far before the audio's end the segment's audio ends.
        let (mut closed, mut transcribed, mut cut_before_end) = (Vec::new(), Vec::new(), Vec::new());
        // The STT stage's own decode time per transcript (`processing_ms`).
        let mut processing = Vec::new();
        for (call, t0, utterances) in &done {
            let events = replay_json(&node, *call);
            let mut last: std::collections::HashMap<(String, u64), i64> = Default::default();
            for e in events.iter().filter(|e| e["kind"] == "partial_transcript") {
                partials += 1;
                let key = (e["track"].to_string(), e["segment_index"].as_u64().unwrap_or(0));
                let at = e["appended_at_us"].as_i64().unwrap_or(0);
                if let Some(prev) = last.insert(key, at) {
                    gaps.push((at - prev) as f64 / 1000.0);
                }
            }
            processing.extend(
                events.iter().filter(|e| e["kind"] == "transcript").filter_map(|e| e["processing_ms"].as_f64()),
            );
            // Each transcript: (start ms, end ms, appended at µs, text).
            let transcripts: Vec<(u64, u64, i64, &str)> = events
                .iter()
                .filter(|e| e["kind"] == "transcript")
                .map(|e| {
                    let (s0, s1) = (e["start_ms"].as_u64().unwrap_or(0), e["end_ms"].as_u64().unwrap_or(0));
                    (s0, s1, e["appended_at_us"].as_i64().unwrap_or(0), e["text"].as_str().unwrap_or(""))
                })
                .collect();
            let finals: Vec<(u64, u64, i64)> = transcripts.iter().map(|&(s0, s1, at, _)| (s0, s1, at)).collect();
            // Word errors, as `stt_accuracy` scores them: each sentence gets the text of the
            // segments whose middle lies in its span.
            for (a, b, reference) in utterances {
                let heard: Vec<&str> = transcripts
                    .iter()
                    .filter(|(s0, s1, _, _)| {
                        let mid = (s0 + s1) / 2;
                        mid + 600 >= *a && mid <= b + 900
                    })
                    .map(|(_, _, _, t)| *t)
                    .collect();
                wer.score("all", reference, &heard.join(" "));
            }
            // Each sentence's final: the transcript of the last segment it overlaps (a sentence
            // split at a pause inside it is heard in full only then).
            // When each segment was appended to the speech log, by its end (one track per call).
            let segment_at: std::collections::HashMap<u64, i64> = events
                .iter()
                .filter(|e| e["kind"] == "speech_segment")
                .filter_map(|e| Some((e["end_ms"].as_u64()?, e["appended_at_us"].as_i64()?)))
                .collect();
            for (a, b, _) in utterances {
                let over: Vec<&(u64, u64, i64)> = finals.iter().filter(|(s0, s1, _)| *a < *s1 && *b > *s0).collect();
                segments += over.len();
                sentences_heard += usize::from(!over.is_empty());
                if let Some((_, s1, appended)) = over.iter().max_by_key(|(_, s1, _)| *s1) {
                    let spoken_end = t0 + *b as i64 * 1000;
                    lat.push((appended - spoken_end) as f64 / 1000.0);
                    if let Some(seg) = segment_at.get(s1) {
                        closed.push((seg - spoken_end) as f64 / 1000.0);
                        transcribed.push((appended - seg) as f64 / 1000.0);
                        cut_before_end.push(*b as f64 - *s1 as f64);
                    }
                }
            }
        }
        let finals = lat.len();
        println!(
            "{calls:>6} {finals:>12} {:>10.0} {:>10.0} {:>10.0} {:>16.2} {:>16.0} {:>7.1}%",
            quantile(&mut lat, 0.5),
            quantile(&mut lat, 0.95),
            quantile(&mut lat, 1.0),
            partials as f64 / finals.max(1) as f64,
            if gaps.is_empty() { f64::NAN } else { quantile(&mut gaps, 0.5) },
            wer.total().counts.rate() * 100.0
        );
        let counter = |name: &str| -> f64 {
            metrics
                .lines()
                .filter(|l| l.starts_with(name))
                .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
                .fold(0.0, |a, b| a + b)
        };
        println!(
            "       segments per sentence {:.2}; speculative finals used {} / dropped {} / given up as speech resumed {} / cancelled {} / skipped {}; partials dropped for finals {}",
            segments as f64 / sentences_heard.max(1) as f64,
            counter("voxgate_stt_speculative_total{outcome=\"used\"}"),
            counter("voxgate_stt_speculative_total{outcome=\"dropped\"}"),
            counter("voxgate_stt_speculative_total{outcome=\"resumed\"}"),
            counter("voxgate_stt_speculative_total{outcome=\"cancelled\"}"),
            counter("voxgate_stt_speculative_total{outcome=\"skipped\"}"),
            counter("voxgate_stt_partials_dropped_total")
        );
        if !closed.is_empty() {
            println!(
                "       where the time goes (p50): segment on the speech log {:.0} ms after the audio's end, transcript {:.0} ms after that (of which decoding {:.0} ms); the segment's audio ends {:.0} ms before the audio's end",
                quantile(&mut closed, 0.5),
                quantile(&mut transcribed, 0.5),
                if processing.is_empty() { f64::NAN } else { quantile(&mut processing, 0.5) },
                quantile(&mut cut_before_end, 0.5)
            );
        }
    }
    println!("(end of speech is the end of each sentence's audio; the segment's end is decided after [transcode.vad] hangover_ms of silence)");
    Ok(())
}
