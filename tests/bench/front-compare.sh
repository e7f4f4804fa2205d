#!/usr/bin/env bash
# The MQTT front vs rumqttd's own listener (broker.front: false): device PUBACK rate, PUBACK
# latency, end-to-end rate and latency, gateway CPU per message and RSS, with 1 and 50 publishing
# connections (QoS 1, 100-byte payloads, 100 in flight each), upstream a local mosquitto.
# One JSON line per run (edgegate-loadgen), label = front-on|front-off/<connections>.
#
# usage: [SYNC=full|normal] tests/bench/front-compare.sh [REPEATS] [PROFILE]
#   PROFILE: profiling (default) or release; SYNC: store.sync (default full)
# Loopback only; every process is started here and ended by its PID; every run is bounded.
set -euo pipefail
cd "$(dirname "$0")/../.."
REPEATS=${1:-3}; PROFILE=${2:-profiling}
GW=$PWD/target/$PROFILE/edgegate; LG=$PWD/target/$PROFILE/edgegate-loadgen
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

run_one() { # front(true|false) connections messages-per-connection
  local front=$1 conns=$2 msgs=$3
  local dir; dir=$(mktemp -d); chmod 755 "$dir"
  local port up; port=$(free_port); up=$(free_port)
  printf 'listener %s 127.0.0.1\nallow_anonymous true\nmax_queued_messages 0\nmax_inflight_messages 1000\nset_tcp_nodelay true\nuser root\n' "$up" >"$dir/up.conf"
  mosquitto -c "$dir/up.conf" >"$dir/up.log" 2>&1 &
  local upid=$!
  cat >"$dir/gw.yaml" <<YAML
gateway: {id: bench}
broker: {listen: 127.0.0.1:$port, front: $front, max_connections: 200}
store: {path: $dir/buffer.db, sync: ${SYNC:-full}}
log: {level: warn}
uplink:
  url: mqtt://127.0.0.1:$up
  max_inflight: 1000
  forward: [{local: "sensors/#"}]
YAML
  "$GW" run --config "$dir/gw.yaml" >"$dir/gw.log" 2>&1 &
  local gpid=$!
  for _ in $(seq 1 100); do (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break; sleep 0.05; done
  sleep 1.5 # the uplink connects
  local label="front-$([ "$front" = true ] && echo on || echo off)/$conns"
  timeout 300 "$LG" --edge "127.0.0.1:$port" --upstream "127.0.0.1:$up" --edge-pid "$gpid" \
    --label "$label" --connections "$conns" --messages "$msgs" --timeout 120 2>>"$dir/lg.err" \
    || echo "{\"label\":\"$label\",\"error\":\"loadgen failed\"}"
  kill "$gpid" "$upid" 2>/dev/null || true
  wait "$gpid" "$upid" 2>/dev/null || true
  rm -rf "$dir"
}

for _ in $(seq 1 "$REPEATS"); do
  for front in true false; do
    run_one "$front" 1 200000
    run_one "$front" 50 4000
  done
done
