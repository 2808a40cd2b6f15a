//! Tests of the whole per-stream core on synthetic phone audio.

use std::sync::OnceLock;

use proptest::prelude::*;

use super::synth::SignalBuilder;
use super::*;

const PRE_ROLL: i64 = 200;
/// Audio a segment keeps after its speech (`tail_ms`).
const TAIL: i64 = 120;

/// Feeds `bytes` in batches of `batch` bytes, `start_ms` = base + floor(offset / 8), then
/// finishes.
fn run(cfg: &TranscodeConfig, bytes: &[u8], base_ms: u64, batch: usize) -> Vec<Segment> {
    let mut tc = StreamTranscoder::new(cfg);
    let mut out = Vec::new();
    for (i, chunk) in bytes.chunks(batch).enumerate() {
        tc.push(base_ms + (i * batch / 8) as u64, chunk, &mut out);
    }
    tc.finish(&mut out);
    assert_eq!(tc.samples_in(), bytes.len() as u64);
    out
}

/// The 16 kHz audio of the whole stream, aligned: decode, upsample, drop the filter delay and
/// flush the tail. `reference16(b)[2 * k]` is stream sample `k`.
fn reference16(bytes: &[u8]) -> Vec<i16> {
    let mut dec = Vec::new();
    mulaw::decode_into(bytes, &mut dec);
    dec.extend([0; DELAY_SAMPLES_8K]);
    let mut up = Upsampler2x::new();
    let mut y = Vec::new();
    up.process(&dec, &mut y);
    y.drain(..DELAY_SAMPLES_16K);
    assert_eq!(y.len(), 2 * bytes.len());
    y
}

/// Indexes 0, 1, 2…, positive lengths, exact pcm length, ordered and non-overlapping.
fn check_invariants(segs: &[Segment]) {
    for (i, s) in segs.iter().enumerate() {
        assert_eq!(s.index as usize, i);
        assert!(s.end_ms > s.start_ms, "{i}: {}..{}", s.start_ms, s.end_ms);
        assert_eq!(s.pcm16.len() as u64, 16 * s.duration_ms(), "segment {i}");
        if i > 0 {
            assert!(s.start_ms >= segs[i - 1].end_ms, "segment {i} overlaps");
        }
    }
}

/// The segment's audio is exactly the stream's 16 kHz audio over its span.
fn assert_aligned(seg: &Segment, reference: &[i16], base_ms: u64) {
    let a = ((seg.start_ms - base_ms) * 16) as usize;
    let b = ((seg.end_ms - base_ms) * 16) as usize;
    assert!(seg.pcm16 == reference[a..b], "segment {} audio is not the stream's audio at its times", seg.index);
}

fn spans(segs: &[Segment]) -> Vec<(u64, u64)> {
    segs.iter().map(|s| (s.start_ms, s.end_ms)).collect()
}

/// One segment per speech piece, edges within ±60 ms of (onset − pre-roll, offset + tail).
fn assert_one_segment_per_burst(segs: &[Segment], bursts: &[(u64, u64)]) {
    assert_eq!(segs.len(), bursts.len(), "segments {:?} for bursts {bursts:?}", spans(segs));
    for (s, &(on, off)) in segs.iter().zip(bursts) {
        let ds = s.start_ms as i64 - (on as i64 - PRE_ROLL);
        let de = s.end_ms as i64 - (off as i64 + TAIL);
        assert!(ds.abs() <= 60, "start {} vs onset {on}", s.start_ms);
        assert!(de.abs() <= 60, "end {} vs offset {off}", s.end_ms);
    }
}

#[test]
fn one_segment_per_burst_over_digital_silence_and_low_noise() {
    let cfg = TranscodeConfig::default();
    let sig = SignalBuilder::new(1)
        .silence(1_000)
        .speech(1_500, -20.0)
        .silence(1_200)
        .speech(2_000, -20.0)
        .noise(1_000, -60.0)
        .speech(750, -20.0)
        .noise(1_000, -60.0);
    let bytes = sig.mulaw();
    let reference = reference16(&bytes);
    for base in [0u64, 1_234_567] {
        let segs = run(&cfg, &bytes, base, 800); // 100 ms batches
        check_invariants(&segs);
        let bursts: Vec<_> = sig.speech.iter().map(|&(a, b)| (a + base, b + base)).collect();
        assert_one_segment_per_burst(&segs, &bursts);
        for s in &segs {
            assert_aligned(s, &reference, base);
        }
    }
}

#[test]
fn one_segment_per_burst_on_a_noisy_line() {
    let cfg = TranscodeConfig::default();
    let sig = SignalBuilder::new(2)
        .silence(1_500)
        .speech(1_200, -20.0)
        .silence(900)
        .speech(2_500, -24.0)
        .silence(1_500)
        .with_background(-55.0);
    let bytes = sig.mulaw();
    let segs = run(&cfg, &bytes, 0, 800);
    check_invariants(&segs);
    assert_one_segment_per_burst(&segs, &sig.speech);
    let reference = reference16(&bytes);
    for s in &segs {
        assert_aligned(s, &reference, 0);
    }
}

#[test]
fn a_150_ms_click_is_dropped() {
    let cfg = TranscodeConfig::default();
    let sig = SignalBuilder::new(3).silence(1_010).speech(150, -20.0).silence(1_000);
    assert!(run(&cfg, &sig.mulaw(), 0, 800).is_empty());

    // …and does not use up an index.
    let sig =
        SignalBuilder::new(4).silence(1_000).speech(150, -20.0).noise(1_000, -60.0).speech(1_000, -20.0).silence(1_000);
    let segs = run(&cfg, &sig.mulaw(), 0, 800);
    check_invariants(&segs);
    assert_one_segment_per_burst(&segs, &sig.speech[1..]);
}

#[test]
fn continuous_speech_longer_than_max_segment_is_cut() {
    let cfg = TranscodeConfig::default();
    let sig = SignalBuilder::new(5).silence(1_000).speech(20_000, -20.0).silence(1_000);
    let bytes = sig.mulaw();
    let segs = run(&cfg, &bytes, 0, 800);
    check_invariants(&segs);
    assert_eq!(segs.len(), 2, "{:?}", spans(&segs));
    assert!((segs[0].start_ms as i64 - 800).abs() <= 60);
    assert_eq!(segs[0].duration_ms(), cfg.vad.max_segment_ms as u64);
    assert_eq!(segs[1].start_ms, segs[0].end_ms, "the cut loses nothing");
    assert!((segs[1].end_ms as i64 - (21_000 + TAIL)).abs() <= 60);
    let reference = reference16(&bytes);
    for s in &segs {
        assert_aligned(s, &reference, 0);
    }
}

#[test]
fn steady_noise_is_not_speech() {
    let cfg = TranscodeConfig::default();
    // Present from the start: it is the floor from the first frame on.
    let sig = SignalBuilder::new(6).noise(10_000, -30.0);
    assert!(run(&cfg, &sig.mulaw(), 0, 800).is_empty());

    // Appearing after digital silence (floor at -62 dBFS): speech until the floor has risen
    // (32 - 12) dB at 5 dB/s, i.e. about 4 s (+ up to 1 s for the spread of frame energies);
    // nothing after that.
    let sig = SignalBuilder::new(7).silence(2_000).noise(20_000, -30.0);
    let segs = run(&cfg, &sig.mulaw(), 0, 800);
    assert_eq!(segs.len(), 1, "{:?}", spans(&segs));
    assert_eq!(segs[0].start_ms, 1_800);
    let adapted_after = segs[0].end_ms - TAIL as u64 - 2_000;
    assert!((3_800..=5_200).contains(&adapted_after), "floor adapted after {adapted_after} ms");
}

#[test]
fn any_batch_size_gives_the_same_segments() {
    let cfg = TranscodeConfig::default();
    let sig = SignalBuilder::new(8).silence(700).speech(1_300, -20.0).silence(800).speech(900, -26.0).silence(700);
    let bytes = sig.mulaw();
    let whole = run(&cfg, &bytes, 0, bytes.len());
    assert_eq!(whole.len(), 2);
    for batch in [1, 7, 100, 160, 333, 800, 4_095, 4_097, 10_000] {
        assert_eq!(run(&cfg, &bytes, 0, batch), whole, "batch {batch}");
    }
    // 12.5 ms batches whose start_ms is rounded to the nearest ms.
    let mut tc = StreamTranscoder::new(&cfg);
    let mut out = Vec::new();
    for (i, chunk) in bytes.chunks(100).enumerate() {
        tc.push((i as u64 * 100 + 4) / 8, chunk, &mut out);
    }
    tc.finish(&mut out);
    assert_eq!(out, whole);
    assert_eq!((tc.samples_filled(), tc.samples_dropped()), (0, 0));
}

/// Feeds like `run`, and also collects the pieces of open segments.
fn run_with_progress(cfg: &TranscodeConfig, bytes: &[u8], base_ms: u64, batch: usize) -> (Vec<Segment>, Vec<Piece>) {
    let mut tc = StreamTranscoder::new(cfg);
    let (mut out, mut pieces) = (Vec::new(), Vec::new());
    for (i, chunk) in bytes.chunks(batch).enumerate() {
        tc.push(base_ms + (i * batch / 8) as u64, chunk, &mut out);
        tc.take_progress(&mut pieces);
    }
    tc.finish(&mut out);
    tc.take_progress(&mut pieces);
    (out, pieces)
}

#[test]
fn the_pieces_of_a_segment_are_its_audio_and_a_pause_piece_ends_where_it_ends() {
    let mut cfg = TranscodeConfig::default();
    cfg.vad.progress = true;
    // Two utterances with a 250 ms pause inside the first (bridged by the hangover).
    let sig = SignalBuilder::new(9)
        .silence(700)
        .speech(1_300, -20.0)
        .silence(250)
        .speech(700, -20.0)
        .silence(800)
        .speech(900, -24.0)
        .silence(700);
    let bytes = sig.mulaw();
    let (segs, pieces) = run_with_progress(&cfg, &bytes, 0, bytes.len());
    assert_eq!(segs.len(), 2, "{:?}", spans(&segs));
    let reference = reference16(&bytes);
    for seg in &segs {
        let mine: Vec<&Piece> = pieces.iter().filter(|p| p.index == seg.index).collect();
        assert!(mine.len() >= 2, "segment {}: {} pieces", seg.index, mine.len());
        let mut at = seg.start_ms;
        for p in &mine {
            assert_eq!((p.start_ms, p.from_ms), (seg.start_ms, at), "pieces follow each other");
            let (a, b) = ((p.from_ms * 16) as usize, (p.end_ms * 16) as usize);
            assert!(p.pcm16 == reference[a..b], "a piece is the stream's audio at its times");
            at = p.end_ms;
        }
        let last = mine.last().unwrap();
        assert!(last.paused);
        assert_eq!(last.end_ms, seg.end_ms, "the segment ends where its last pause piece ends");
    }
    // The pause inside the first utterance made a paused piece that is not the end.
    assert!(pieces.iter().any(|p| p.index == 0 && p.paused && p.end_ms < segs[0].end_ms));
    // Any batching gives the same pieces.
    for batch in [160, 333, 800, 4_097] {
        assert_eq!(run_with_progress(&cfg, &bytes, 0, batch), (segs.clone(), pieces.clone()), "batch {batch}");
    }
}

/// 20 ms frames of `bytes` with their start times.
fn frames(bytes: &[u8]) -> Vec<(u64, &[u8])> {
    bytes.chunks(160).enumerate().map(|(i, f)| (i as u64 * 20, f)).collect()
}

#[test]
fn missing_frames_are_filled_with_silence() {
    let cfg = TranscodeConfig::default();
    let sig = SignalBuilder::new(9).silence(1_000).speech(2_000, -20.0).silence(1_000);
    let bytes = sig.mulaw();
    // Lose 100 ms (frames 60..65 = 1 200..1 300 ms) in the middle of the speech.
    let mut tc = StreamTranscoder::new(&cfg);
    let mut out = Vec::new();
    for (i, (t, f)) in frames(&bytes).into_iter().enumerate() {
        if !(60..65).contains(&i) {
            tc.push(t, f, &mut out);
        }
    }
    tc.finish(&mut out);
    assert_eq!(tc.samples_filled(), 800);
    check_invariants(&out);
    assert_one_segment_per_burst(&out, &sig.speech);
    // The segment's audio is the stream with the lost frames silent.
    let mut holed = bytes.clone();
    holed[60 * 160..65 * 160].fill(0xFF);
    assert_aligned(&out[0], &reference16(&holed), 0);
}

#[test]
fn a_long_gap_closes_the_segment_and_resyncs() {
    let cfg = TranscodeConfig::default();
    let sig = SignalBuilder::new(10).silence(1_000).speech(3_000, -20.0).silence(1_000);
    let bytes = sig.mulaw();
    let (before, after) = bytes.split_at(2_000 * 8); // cut in the middle of the speech
    let mut tc = StreamTranscoder::new(&cfg);
    let mut out = Vec::new();
    for (t, f) in frames(before) {
        tc.push(t, f, &mut out);
    }
    // The rest arrives 5 s later in stream time (a 3 s hole: too long to fill).
    for (t, f) in frames(after) {
        tc.push(5_000 + t, f, &mut out);
    }
    tc.finish(&mut out);
    assert_eq!(tc.resyncs(), 1);
    check_invariants(&out);
    assert_eq!(out.len(), 2, "{:?}", spans(&out));
    // Closed at the last received sample…
    assert!((out[0].start_ms as i64 - 800).abs() <= 60);
    assert_eq!(out[0].end_ms, 2_000);
    assert_aligned(&out[0], &reference16(before), 0);
    // …and the rest starts at the resync point (no audio before it to pre-roll).
    assert_eq!(out[1].start_ms, 5_000);
    assert!((out[1].end_ms as i64 - (5_000 + 2_000 + TAIL)).abs() <= 60);
    assert_aligned(&out[1], &reference16(after), 5_000);
}

#[test]
fn duplicated_and_late_audio_is_dropped() {
    let cfg = TranscodeConfig::default();
    let sig = SignalBuilder::new(11).silence(800).speech(1_500, -20.0).silence(1_000);
    let bytes = sig.mulaw();
    let clean = run(&cfg, &bytes, 0, 160);
    let mut tc = StreamTranscoder::new(&cfg);
    let mut out = Vec::new();
    let fs = frames(&bytes);
    for (i, &(t, f)) in fs.iter().enumerate() {
        tc.push(t, f, &mut out);
        if i % 10 == 9 {
            tc.push(t, f, &mut out); // resent
            let (t0, f0) = fs[i - 5];
            tc.push(t0, f0, &mut out); // late
            tc.push(0, f0, &mut out); // backwards to the start
        }
    }
    // A batch half overlapping the past: only its new half is used.
    let n = fs.len() as u64;
    let tail = sig.clone().silence(20).mulaw();
    tc.push(n * 20 - 10, &tail[tail.len() - 240..], &mut out);
    tc.finish(&mut out);
    let dups = (fs.len() / 10) as u64;
    assert_eq!(tc.samples_dropped(), dups * 3 * 160 + 80);
    assert_eq!(&out[..], &clean[..]);
}

#[test]
fn invalid_config_is_rejected_or_sanitised() {
    let mut cfg = TranscodeConfig::default();
    cfg.vad.frame_ms = 0;
    cfg.vad.threshold_db = f32::INFINITY;
    assert!(StreamTranscoder::try_new(&cfg).is_err());
    assert!(cfg.validate().is_err());
    // new() clamps instead, and works.
    let sig = SignalBuilder::new(12).silence(500).speech(1_000, -20.0).silence(800);
    let mut tc = StreamTranscoder::new(&cfg);
    let mut out = Vec::new();
    tc.push(0, &sig.mulaw(), &mut out);
    tc.finish(&mut out);
    check_invariants(&out);
    assert_eq!(out.len(), 1);
}

#[test]
fn finish_then_push_starts_a_new_run() {
    let cfg = TranscodeConfig::default();
    let sig = SignalBuilder::new(13).silence(500).speech(1_000, -20.0).silence(800);
    let bytes = sig.mulaw();
    let mut tc = StreamTranscoder::new(&cfg);
    let mut out = Vec::new();
    tc.push(0, &bytes, &mut out);
    tc.finish(&mut out);
    tc.finish(&mut out); // idempotent
    tc.push(100_000, &bytes, &mut out);
    tc.finish(&mut out);
    check_invariants(&out);
    assert_eq!(out.len(), 2);
    assert_eq!(out[1].start_ms, out[0].start_ms + 100_000);
    assert_eq!(out[1].pcm16, out[0].pcm16);
}

// ---- serde ----------------------------------------------------------------------------------

mod de {
    //! A minimal self-describing deserializer (the crate has no TOML/JSON dependency).
    use serde::de::value::{Error, MapDeserializer};
    use serde::de::{IntoDeserializer, Visitor};
    use serde::forward_to_deserialize_any;

    #[derive(Debug, Clone)]
    pub enum V {
        U(u64),
        F(f64),
        S(&'static str),
        M(Vec<(&'static str, V)>),
    }

    pub struct D(pub V);

    impl<'de> IntoDeserializer<'de, Error> for V {
        type Deserializer = D;
        fn into_deserializer(self) -> D {
            D(self)
        }
    }

    impl<'de> serde::Deserializer<'de> for D {
        type Error = Error;
        fn deserialize_any<W: Visitor<'de>>(self, v: W) -> Result<W::Value, Error> {
            match self.0 {
                V::U(x) => v.visit_u64(x),
                V::F(x) => v.visit_f64(x),
                V::S(x) => v.visit_str(x),
                V::M(m) => v.visit_map(MapDeserializer::new(m.into_iter())),
            }
        }
        forward_to_deserialize_any! {
            bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string bytes byte_buf
            option unit unit_struct newtype_struct seq tuple tuple_struct map struct enum
            identifier ignored_any
        }
    }
}

#[test]
fn config_deserializes_with_defaults_and_rejects_unknown_fields() {
    use de::{D, V};
    use serde::Deserialize;

    let cfg = TranscodeConfig::deserialize(D(V::M(vec![(
        "vad",
        V::M(vec![("hangover_ms", V::U(600)), ("threshold_db", V::F(9.5)), ("min_energy_dbfs", V::U(0))]),
    )])))
    .unwrap();
    let want = VadConfig { hangover_ms: 600, threshold_db: 9.5, min_energy_dbfs: 0.0, ..VadConfig::default() };
    assert_eq!(cfg.vad, want);

    assert_eq!(TranscodeConfig::deserialize(D(V::M(vec![]))).unwrap(), TranscodeConfig::default());

    let err = VadConfig::deserialize(D(V::M(vec![("hangover", V::U(600))]))).unwrap_err();
    assert!(err.to_string().contains("unknown field"), "{err}");
    let err = TranscodeConfig::deserialize(D(V::M(vec![("vda", V::M(vec![]))]))).unwrap_err();
    assert!(err.to_string().contains("unknown field"), "{err}");
    assert!(VadConfig::deserialize(D(V::M(vec![("frame_ms", V::S("20"))]))).is_err());

    fn serializable<T: serde::Serialize>() {}
    serializable::<TranscodeConfig>();
    serializable::<VadConfig>();
}

// ---- properties ------------------------------------------------------------------------------

/// ~4 s with two utterances, and its segments when pushed in one batch at time 0.
fn chunking_fixture() -> &'static (Vec<u8>, Vec<Segment>) {
    static FIXTURE: OnceLock<(Vec<u8>, Vec<Segment>)> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        let sig =
            SignalBuilder::new(14).silence(500).speech(1_200, -20.0).noise(600, -60.0).speech(900, -22.0).silence(800);
        let bytes = sig.mulaw();
        let segs = run(&TranscodeConfig::default(), &bytes, 0, bytes.len());
        assert_eq!(segs.len(), 2);
        (bytes, segs)
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(32))]

    #[test]
    fn segments_do_not_depend_on_batching_or_time_base(
        cuts in proptest::collection::vec(0usize..32_000, 0..24),
        base in 0u64..10_000_000,
    ) {
        let (bytes, want) = chunking_fixture();
        let mut cuts: Vec<usize> = cuts.into_iter().map(|c| c.min(bytes.len())).collect();
        cuts.sort_unstable();
        let mut tc = StreamTranscoder::new(&TranscodeConfig::default());
        let mut out = Vec::new();
        let mut prev = 0;
        for c in cuts.into_iter().chain(std::iter::once(bytes.len())) {
            tc.push(base + prev as u64 / 8, &bytes[prev..c], &mut out);
            prev = c;
        }
        tc.finish(&mut out);
        prop_assert_eq!(out.len(), want.len());
        for (got, w) in out.iter().zip(want) {
            prop_assert_eq!(got.index, w.index);
            prop_assert_eq!(got.start_ms, w.start_ms + base);
            prop_assert_eq!(got.end_ms, w.end_ms + base);
            prop_assert!(got.pcm16 == w.pcm16);
        }
    }

    #[test]
    fn never_panics_on_arbitrary_bytes_and_times(
        ops in proptest::collection::vec(
            (0u8..7, any::<u64>(), proptest::collection::vec(any::<u8>(), 0..1_200), any::<bool>()),
            0..16,
        ),
        vad_ms in (5u32..60, 0u32..800, 0u32..800, 1000u32..4000),
    ) {
        let mut cfg = TranscodeConfig::default();
        cfg.vad.frame_ms = vad_ms.0;
        cfg.vad.hangover_ms = vad_ms.1;
        cfg.vad.pre_roll_ms = vad_ms.2;
        cfg.vad.max_segment_ms = vad_ms.3;
        let mut tc = StreamTranscoder::new(&cfg);
        let mut out = Vec::new();
        let mut t: u64 = 0; // where the next contiguous batch would start, ms
        for (kind, x, bytes, loud) in ops {
            // Loud batches are speech-like in level; the others are arbitrary codes.
            let bytes: Vec<u8> = if loud { bytes.iter().map(|b| b | 0x30).collect() } else { bytes };
            let start = match kind {
                0 => t,
                1 => t + x % 2_500,                // fillable gap
                2 => t.saturating_sub(x % 5_000),  // overlap / backwards
                3 => x,                            // anything, up to u64::MAX
                4 => t + x % 200_000,              // long gap
                5 => (t + x % 2).saturating_sub(1), // sub-ms jitter
                _ => u64::MAX - x % 3,
            };
            tc.push(start, &bytes, &mut out);
            t = start.min(MAX_START_MS).max(t) + bytes.len() as u64 / 8;
            check_invariants(&out);
        }
        tc.finish(&mut out);
        check_invariants(&out);
    }
}

#[test]
fn stream_time_is_read_one_way() {
    assert_eq!(place(None, 80), Placement::NewRun { resync: false });
    assert_eq!(place(Some(800), 807), Placement::Contiguous, "under 1 ms late is rounding");
    assert_eq!(place(Some(800), 793), Placement::Contiguous, "under 1 ms early is rounding");
    assert_eq!(place(Some(800), 808), Placement::Gap(8));
    assert_eq!(place(Some(800), 800 + MAX_GAP_MS * 8), Placement::Gap(MAX_GAP_MS * 8));
    assert_eq!(place(Some(800), 801 + MAX_GAP_MS * 8), Placement::NewRun { resync: true });
    assert_eq!(place(Some(800), 792), Placement::Overlap(8));
    assert_eq!(place(Some(800), 0), Placement::Overlap(800));
}
