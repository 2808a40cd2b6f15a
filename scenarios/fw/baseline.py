#!/usr/bin/env python3
"""faster-whisper baseline for voxgate's accuracy corpus.

Transcribes every clip of a directory rendered by `voxgate_scenarios::corpus::render_clips`
(16-bit 16 kHz mono WAV files `NNN_<voice>.wav` plus `refs.json`, clip name -> reference text)
with faster-whisper on the same CTranslate2 weights voxgate uses, greedy and with beam 5, and
prints one JSON line per clip on stdout:

    {"clip", "voice", "reference", "text_greedy", "text_beam5", "seconds_greedy",
     "seconds_beam5", "audio_seconds", "int8": {same four fields}}

`int8` is there only with --int8 (the default; --no-int8 skips it). A summary (wall seconds and
audio seconds per second for each mode) goes to stderr as one JSON line. Scoring (WER) is done on
the Rust side with `voxgate_scenarios::wer`, so both systems share one normalizer.

Decoding settings mirror voxgate's: temperature 0 only (no fallback), no timestamps, no VAD, no
conditioning on previous text, English; everything else is faster-whisper's default.

Setup (optional dependency; the Rust tests never need it):

    python3 -m venv target/fw-venv
    target/fw-venv/bin/pip install -r scenarios/fw/requirements.txt
    target/fw-venv/bin/python scenarios/fw/baseline.py target/fw-clips models/whisper-tiny.en
"""

import argparse
import json
import sys
import time
import wave
from pathlib import Path

import numpy as np
from faster_whisper import WhisperModel


def read_wav(path):
    with wave.open(str(path), "rb") as w:
        if (w.getnchannels(), w.getsampwidth(), w.getframerate()) != (1, 2, 16000):
            raise SystemExit(f"{path}: expected 16-bit 16 kHz mono")
        pcm = np.frombuffer(w.readframes(w.getnframes()), dtype="<i2")
    return pcm.astype(np.float32) / 32768.0


def transcribe(model, audio, beam_size):
    t0 = time.perf_counter()
    segments, _info = model.transcribe(
        audio,
        language="en",
        task="transcribe",
        beam_size=beam_size,
        best_of=1,
        temperature=0.0,
        without_timestamps=True,
        vad_filter=False,
        condition_on_previous_text=False,
    )
    # `segments` is lazy: the decoding happens while iterating.
    text = "".join(s.text for s in segments).strip()
    return text, time.perf_counter() - t0


def load(model_dir, compute_type, threads):
    return WhisperModel(
        str(model_dir), device="cpu", compute_type=compute_type, cpu_threads=threads, num_workers=1
    )


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("clips", type=Path, help="directory with NNN_voice.wav files and refs.json")
    ap.add_argument("model", type=Path, help="CTranslate2 Whisper model directory")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--beam", type=int, default=5, help="beam size of the second pass")
    ap.add_argument("--int8", dest="int8", action="store_true", default=True)
    ap.add_argument("--no-int8", dest="int8", action="store_false")
    ap.add_argument("--limit", type=int, default=0, help="only the first N clips (0: all)")
    args = ap.parse_args()

    refs = json.loads((args.clips / "refs.json").read_text())
    names = sorted(refs)
    if args.limit:
        names = names[: args.limit]
    clips = []
    for name in names:
        ref = refs[name]
        if isinstance(ref, dict):
            ref = ref["text"]
        clips.append((name, ref, read_wav(args.clips / f"{name}.wav")))

    models = {"float32": load(args.model, "float32", args.threads)}
    if args.int8:
        models["int8"] = load(args.model, "int8", args.threads)
    # Warm-up (allocations, kernel selection) outside the timings.
    for m in models.values():
        transcribe(m, clips[0][2], 1)
        transcribe(m, clips[0][2], args.beam)

    totals = {f"{ct}_{mode}": 0.0 for ct in models for mode in ("greedy", f"beam{args.beam}")}
    audio_total = 0.0
    for name, ref, audio in clips:
        secs = len(audio) / 16000.0
        audio_total += secs
        row = {
            "clip": name,
            "voice": name.split("_", 1)[1] if "_" in name else "",
            "reference": ref,
        }
        for ct, m in models.items():
            g, tg = transcribe(m, audio, 1)
            b, tb = transcribe(m, audio, args.beam)
            totals[f"{ct}_greedy"] += tg
            totals[f"{ct}_beam{args.beam}"] += tb
            fields = {
                "text_greedy": g,
                f"text_beam{args.beam}": b,
                "seconds_greedy": round(tg, 4),
                f"seconds_beam{args.beam}": round(tb, 4),
            }
            if ct == "float32":
                row.update(fields)
                row["audio_seconds"] = round(secs, 4)
            else:
                row[ct] = fields
        print(json.dumps(row), flush=True)

    summary = {
        "clips": len(clips),
        "audio_seconds": round(audio_total, 2),
        "threads": args.threads,
        "wall_seconds": {k: round(v, 2) for k, v in totals.items()},
        "audio_seconds_per_second": {k: round(audio_total / v, 1) for k, v in totals.items() if v > 0},
    }
    print(json.dumps(summary), file=sys.stderr, flush=True)


if __name__ == "__main__":
    main()
