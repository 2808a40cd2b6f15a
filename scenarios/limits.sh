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
# A/B runs; CALLS adds lines to the node's [calls] table (e.g. CALLS='batch_ms = 200'), and
# CONFIG whole tables at the end of its config (e.g. CONFIG=$'[console]\nenabled = false').
#
# NODES picks the deployment: `embedded` (the default: one node on its sled log), `cluster` (one
# node of every role on a JetStream log, its own `nats-server -js`), or `split` (an `ingress` node
# and a `call,transcode,stt,fraud,billing` node on a JetStream log: Twilio reaches the ingress
# node, whose calls run on the other). The node figures are the nodes' together; the NATS
# server's CPU is printed beside them.
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
nodes=${NODES:-embedded}
suffix=""
[ "$nodes" = embedded ] || suffix="-$nodes"
case $nodes in
  embedded | cluster | split) ;;
  *) echo "NODES is embedded, cluster or split, not $nodes" >&2; exit 2 ;;
esac
[ "$nodes" = embedded ] || command -v nats-server >/dev/null || { echo "NODES=$nodes needs nats-server" >&2; exit 2; }

# CPU seconds a process has used so far (user + system).
cpu_of() { awk -v t="$(getconf CLK_TCK)" '{ printf "%.2f", ($14 + $15) / t }' "/proc/$1/stat"; }

# Starts `voxgate serve` in $work with config $1 and data dir $2 (roles and cluster settings in
# the config); sets `started_pid`, `started_listen`, `started_metrics`.
start_node() {
  local ready="$2.ready"
  "${VOXGATE:-$bin/voxgate}" serve --config "$1" --data-dir "$2" \
    --listen 127.0.0.1:0 --metrics-listen 127.0.0.1:0 >"$ready" 2>"$2.log" &
  started_pid=$!
  for _ in $(seq 600); do grep -q "voxgate ready" "$ready" 2>/dev/null && break; sleep 0.1; done
  started_listen=$(sed -n 's/.*listen=\([^ ]*\).*/\1/p' "$ready")
  started_metrics=$(sed -n 's/.*metrics=\([^ ]*\).*/\1/p' "$ready")
  [ -n "$started_listen" ] || { cat "$2.log"; kill "$started_pid"; return 1; }
}

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
${CONFIG:-}
EOF
  pids=()
  nats_pid=
  if [ "$nodes" = embedded ]; then
    start_node "$work/voxgate.toml" "$work/data"
    pids+=("$started_pid")
    listen=$started_listen
    metrics_urls="http://$started_metrics/metrics"
  else
    port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
    nats-server -js -a 127.0.0.1 -p "$port" -sd "$work/nats" >"$work/nats.log" 2>&1 &
    nats_pid=$!
    for _ in $(seq 100); do (echo >"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break; sleep 0.1; done
    cluster() { # roles, node name
      printf 'secrets_key = "5e0c7a1b9d2f4e6a8c0b1d3f5a7c9e0b2d4f6a8c0e1b3d5f7a9c0e2b4d6f8a0c"\n'
      cat "$work/voxgate.toml"
      printf '[cluster]\nnats_url = "nats://127.0.0.1:%s"\nroles = "%s"\nnode = "%s"\n' "$port" "$1" "$2"
    }
    if [ "$nodes" = cluster ]; then
      cluster all one >"$work/one.toml"
      start_node "$work/one.toml" "$work/one"
      pids+=("$started_pid")
      listen=$started_listen
      metrics_urls="http://$started_metrics/metrics"
    else
      cluster call,transcode,stt,fraud,billing calls >"$work/calls.toml"
      start_node "$work/calls.toml" "$work/calls"
      pids+=("$started_pid")
      metrics_urls="http://$started_metrics/metrics"
      cluster ingress ingress >"$work/ingress.toml"
      start_node "$work/ingress.toml" "$work/ingress"
      pids+=("$started_pid")
      listen=$started_listen
      metrics_urls="$metrics_urls,http://$started_metrics/metrics"
    fi
  fi
  case $mode in
    webhooks) load=(--rate "$n" --hold-ms 1000) ;;
    streams | talking) load=(--streams "$n") ;;
    *) echo "unknown mode $mode" >&2; kill "${pids[@]}" $nats_pid; exit 2 ;;
  esac
  echo "== $mode $n ($nodes)"
  [ -n "$nats_pid" ] && nats_before=$(cpu_of "$nats_pid")
  "${SIM:-$bin/twilio-sim}" --target "http://$listen" --public-url https://load.voxgate.test \
    --account "$account" --token "$token" load --to "$number" --duration "$duration" \
    --metrics "$metrics_urls" --json "$out/$mode-$n$suffix.json" "${load[@]}"
  [ -n "$nats_pid" ] && echo "nats-server CPU during the run: $(awk -v a="$nats_before" -v b="$(cpu_of "$nats_pid")" 'BEGIN { printf "%.2f", b - a }') s"
  kill -TERM "${pids[@]}"
  for p in "${pids[@]}"; do wait "$p" || true; done
  if [ -n "$nats_pid" ]; then kill -TERM "$nats_pid"; wait "$nats_pid" || true; fi
  rm -rf "$work"
done
