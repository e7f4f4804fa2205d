#!/usr/bin/env bash
# Measures the one loss window edgegate still has: rumqttd PUBACKs a device before the intake has
# committed the message. A publisher sends QoS 1 messages to the gateway (uplink down, so every
# committed message stays in the store); the gateway is killed with SIGKILL mid-stream; then the
# rows in the store are compared with the PUBACKs the publisher received.
#
# usage: tests/bench/puback-window.sh [RUNS] [RATE]     (RATE msgs/s per run; 0 = full speed)
# needs: target/release/edgegate and target/release/edgegate-loadgen (cargo build --release)
# prints one line per run and a summary; loopback only, every wait bounded.
set -euo pipefail
cd "$(dirname "$0")/../.."
RUNS=${1:-10}
RATE=${2:-0}
GW=$PWD/target/release/edgegate
LG=$PWD/target/release/edgegate-loadgen
[ -x "$GW" ] && [ -x "$LG" ] || { echo "build first: cargo build --release" >&2; exit 2; }

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

losses=()
for run in $(seq 1 "$RUNS"); do
  dir=$(mktemp -d)
  port=$(free_port); dead=$(free_port)
  cat >"$dir/gw.yaml" <<YAML
gateway:
  id: window
broker:
  listen: 127.0.0.1:$port
store:
  path: $dir/buffer.db
uplink:
  url: mqtt://127.0.0.1:$dead
  forward:
    - local: "sensors/#"
YAML
  "$GW" run --config "$dir/gw.yaml" 2>"$dir/gw.log" &
  gw=$!
  for _ in $(seq 1 100); do
    (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break
    sleep 0.05
  done
  n=2000000
  "$LG" --edge "127.0.0.1:$port" --messages "$n" --rate "$RATE" --stop-on-error --timeout 5 \
    --label window >"$dir/lg.json" 2>"$dir/lg.err" &
  lg=$!
  # Kill at a random moment 0.5–1.5 s into the stream.
  sleep "$(python3 -c 'import random; print(round(random.uniform(0.5, 1.5), 3))')"
  kill -9 "$gw"
  wait "$gw" 2>/dev/null || true
  timeout 30 tail --pid="$lg" -f /dev/null || kill "$lg"
  wait "$lg" 2>/dev/null || true
  acked=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["acked"])' "$dir/lg.json")
  rows=$("$GW" buffer stats --config "$dir/gw.yaml" --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["rows"])')
  lost=$((acked > rows ? acked - rows : 0))
  losses+=("$lost")
  echo "run $run: rate=${RATE:-0} acked=$acked stored=$rows lost=$lost"
  rm -rf "$dir"
done
printf '%s\n' "${losses[@]}" | sort -n | awk -v runs="$RUNS" -v rate="$RATE" '
  { v[NR] = $1; s += $1 } END { printf "summary: rate=%s runs=%d lost min=%d median=%d max=%d mean=%.1f\n", rate, runs, v[1], v[int((NR+1)/2)], v[NR], s/NR }'
