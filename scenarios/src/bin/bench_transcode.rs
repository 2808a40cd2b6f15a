//! Throughput of the per-stream transcoder (mu-law decode + 8→16 kHz FIR + VAD + segment cut),
//! in seconds of audio per second of single-threaded CPU time, against a baseline of mu-law
//! table decoding alone over the same data.
//!
//! Input: 60 s of deterministic synthetic speech-like audio with pauses (digital silence and
//! low-level noise), pushed as 20 ms frames of 160 bytes like Twilio sends them. Each stage runs
//! 15 times (after one warm-up run); the table shows the median and the 10th/90th percentiles.
//!
//! `cargo run --release -p voxgate-scenarios --bin bench_transcode`

use std::hint::black_box;
use std::time::Instant;

use voxgate_actors::transcode::synth::{Rng, SignalBuilder};
use voxgate_actors::transcode::{mulaw, EndpointWatch, Segment, StreamTranscoder, TranscodeConfig, Upsampler2x};

const AUDIO_S: u64 = 60;
const RUNS: usize = 15;
const FRAME: usize = 160;

/// 60 s of utterances (1.5–4 s, −18…−26 dBFS) separated by 0.4–2 s pauses.
fn signal() -> (Vec<u8>, f64) {
    let mut rng = Rng::new(0x76_6f78_6761_7465);
    let mut sig = SignalBuilder::new(42).silence(500);
    let total_ms = AUDIO_S * 1_000;
    while sig.len_ms() < total_ms {
        let left = total_ms - sig.len_ms();
        let speech = (rng.range(1_500.0, 4_000.0) as u64).min(left);
        sig = sig.speech(speech, rng.range(-26.0, -18.0));
        let left = total_ms - sig.len_ms();
        let pause = (rng.range(400.0, 2_000.0) as u64).min(left);
        sig = if rng.uniform() < 0.5 { sig.silence(pause) } else { sig.noise(pause, -60.0) };
    }
    let speech_s = sig.speech.iter().map(|(a, b)| b - a).sum::<u64>() as f64 / 1_000.0;
    (sig.mulaw(), speech_s)
}

struct Stats {
    median: f64,
    p10: f64,
    p90: f64,
}

/// Runs `f` once to warm up, then `RUNS` times; returns audio-seconds per CPU-second.
fn measure(mut f: impl FnMut() -> u64) -> Stats {
    black_box(f());
    let mut xs: Vec<f64> = (0..RUNS)
        .map(|_| {
            let t = Instant::now();
            black_box(f());
            AUDIO_S as f64 / t.elapsed().as_secs_f64()
        })
        .collect();
    xs.sort_by(|a, b| a.total_cmp(b));
    let at = |q: f64| xs[((xs.len() - 1) as f64 * q).round() as usize];
    Stats { median: at(0.5), p10: at(0.1), p90: at(0.9) }
}

fn main() {
    let (bytes, speech_s) = signal();
    assert_eq!(bytes.len() as u64, AUDIO_S * 8_000);
    let frames: Vec<&[u8]> = bytes.chunks(FRAME).collect();
    let cfg = TranscodeConfig::default();

    // Baseline: table decode of every frame into a reused buffer.
    let mut pcm = Vec::with_capacity(FRAME);
    let baseline = measure(|| {
        let mut acc = 0u64;
        for f in &frames {
            pcm.clear();
            mulaw::decode_into(black_box(f), &mut pcm);
            acc = acc.wrapping_add(pcm[pcm.len() - 1] as u64);
        }
        acc
    });

    // Decode + upsampler only (no VAD, no buffering).
    let mut up16 = Vec::with_capacity(2 * FRAME);
    let upsample = measure(|| {
        let mut up = Upsampler2x::new();
        let mut acc = 0u64;
        for f in &frames {
            pcm.clear();
            mulaw::decode_into(black_box(f), &mut pcm);
            up16.clear();
            up.process(&pcm, &mut up16);
            acc = acc.wrapping_add(up16[up16.len() - 1] as u64);
        }
        acc
    });

    // The whole per-stream core, as the transcode stage drives it.
    let mut segs: Vec<Segment> = Vec::new();
    let mut seg_count = 0;
    let mut seg_ms = 0;
    let full = measure(|| {
        let mut tc = StreamTranscoder::new(&cfg);
        let mut n = 0u64;
        seg_ms = 0;
        for (i, f) in frames.iter().enumerate() {
            tc.push(i as u64 * 20, black_box(f), &mut segs);
            for s in segs.drain(..) {
                n += 1;
                seg_ms += s.end_ms - s.start_ms;
                black_box(&s.pcm16);
            }
        }
        tc.finish(&mut segs);
        for s in segs.drain(..) {
            n += 1;
            seg_ms += s.end_ms - s.start_ms;
        }
        seg_count = n;
        n
    });

    // The ingress's endpoint watch (STT on: the VAD over the µ-law frames, for early batches).
    let mut vad_cfg = cfg.vad;
    vad_cfg.progress = true;
    let mut handed = 0;
    let watch = measure(|| {
        let mut w = EndpointWatch::new(&vad_cfg);
        let mut n = 0u64;
        for (i, f) in frames.iter().enumerate() {
            n += u64::from(w.push(i as u64 * 20, black_box(f)));
        }
        handed = n;
        n
    });

    println!(
        "bench_transcode: {AUDIO_S} s of synthetic speech-like mu-law ({} frames of 20 ms, {speech_s:.1} s speech), \
         {RUNS} runs after a warm-up, single thread",
        frames.len()
    );
    println!("throughput in audio seconds per CPU second (x real time):");
    println!("{:<44} {:>12} {:>12} {:>12} {:>10}", "stage", "median", "p10", "p90", "ns/frame");
    let row = |name: &str, s: &Stats| {
        let ns_per_frame = 1e9 * 0.020 / s.median;
        println!("{name:<44} {:>12.0} {:>12.0} {:>12.0} {:>10.0}", s.median, s.p10, s.p90, ns_per_frame);
    };
    row("mu-law table decode (baseline)", &baseline);
    row("decode + 8->16 kHz FIR", &upsample);
    row("transcode: decode + FIR + VAD + segments", &full);
    row("ingress endpoint watch (decode + VAD)", &watch);
    println!(
        "cost ratio transcode / baseline: {:.1}x (median); decode + FIR / baseline: {:.1}x",
        baseline.median / full.median,
        baseline.median / upsample.median
    );
    println!(
        "endpoint watch / transcode: {:.2}x of the transcoder's CPU; {handed} early hand-overs per run",
        full.median / watch.median
    );
    println!(
        "one core keeps up with ~{:.0} concurrent calls; {seg_count} segments, {:.1} s of segment audio per run",
        full.median,
        seg_ms as f64 / 1_000.0
    );
}
