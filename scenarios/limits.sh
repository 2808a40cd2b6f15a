#!/usr/bin/env bash
# Finds how far one voxgate node goes on this machine: for each step, a fresh release
# `voxgate serve` (sled log in a temp dir, quotas and per-caller limits lifted) and `twilio-sim
# load` against it, open loop; prints each step's report and keeps its JSON.
#
#   scenarios/limits.sh webhooks 1000 2500 5000   # calls/s (webhook + status callback each), STT off
#   scenarios/limits.sh streams 100 500 1000      # concurrent real-time Media Streams, STT off
#   scenarios/limits.sh talking 1 2 4             # concurrent talking calls, STT on
#
# DURATION (default 30 s) sets each step's length; OUT (default target/limits) keeps the JSON;
# VOXGATE (default the release build) names another voxgate binary and SIM another twilio-sim, for
# A/B runs; CALLS adds lines to the node's [calls] table (e.g. CALLS='batch_ms = 200').
set -euo pipefail
cd "$(dirname "$0")/.."
mode=${1:?usage: scenarios/limits.sh webhooks|streams|talking N...}
shift
[ $# -gt 0 ] || { echo "give one or more steps" >&2; exit 2; }
duration=${DURATION:-30}
target=${CARGO_TARGET_DIR:-target}
out=${OUT:-$target/limits}
mkdir -p "$out"
cargo build -q --release --workspace --bins
bin=$target/release

account=AC0123456789abcdef0123456789abcdef
token=9f3c1b2a7d4e5f60718293a4b5c6d7e8
number=+14155550100
stt=false
[ "$mode" = talking ] && stt=true
[ "$stt" = true ] && bash nodes/deploy/fetch-model.sh >/dev/null

for n in "$@"; do
  # The previous step's writes (hundreds of MB at a thousand streams) are still going to disk in
  # the background and would slow this step's fsyncs: let them land first.
  sync
  sleep 2
  work=$(mktemp -d)
  cat >"$work/voxgate.toml" <<EOF
public_url = "https://load.voxgate.test"
[stt]
enabled = $stt
model_dir = "$PWD/models/whisper-tiny.en"
[calls]
${CALLS:-}
[quotas]
max_concurrent_calls = 100000
calls_per_second = 100000
[callers]
max_calls_per_window = 0
[fraud]
disabled_rules = ["velocity_from", "spend_velocity", "volume_anomaly", "short_call_burst"]
[[tenants]]
account_sid = "$account"
auth_token = "$token"
numbers = ["$number"]
EOF
  "${VOXGATE:-$bin/voxgate}" serve --config "$work/voxgate.toml" --data-dir "$work/data" \
    --listen 127.0.0.1:0 --metrics-listen 127.0.0.1:0 >"$work/ready" 2>"$work/node.log" &
  pid=$!
  for _ in $(seq 600); do grep -q "voxgate ready" "$work/ready" 2>/dev/null && break; sleep 0.1; done
  listen=$(sed -n 's/.*listen=\([^ ]*\).*/\1/p' "$work/ready")
  metrics=$(sed -n 's/.*metrics=\([^ ]*\).*/\1/p' "$work/ready")
  [ -n "$listen" ] || { cat "$work/node.log"; kill $pid; exit 1; }
  case $mode in
    webhooks) load=(--rate "$n" --hold-ms 1000) ;;
    streams | talking) load=(--streams "$n") ;;
    *) echo "unknown mode $mode" >&2; kill $pid; exit 2 ;;
  esac
  echo "== $mode $n"
  "${SIM:-$bin/twilio-sim}" --target "http://$listen" --public-url https://load.voxgate.test \
    --account "$account" --token "$token" load --to "$number" --duration "$duration" \
    --metrics "http://$metrics/metrics" --json "$out/$mode-$n.json" "${load[@]}"
  kill -TERM $pid
  wait $pid || true
  rm -rf "$work"
done
