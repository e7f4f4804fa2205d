#!/usr/bin/env bash
# The Rust load generator against any edge driven by a shared-harness adapter
# (../shared/bench/edges/*.sh): steady forwarding with 1 and 10 publishing connections, and
# 1000 connections at 1 msg/s each (latency). One JSON line per run, label first.
#
# usage: tests/bench/loadgen-compare.sh LABEL ADAPTER [REPEATS]
#   e.g. GW_BIN=$PWD/target/release/edgegate tests/bench/loadgen-compare.sh edgegate ../shared/bench/edges/edgegate.sh
#        tests/bench/loadgen-compare.sh mosquitto ../shared/bench/edges/mosquitto.sh
# Loopback only; every run bounded (loadgen --timeout, mosquitto killed on exit).
set -euo pipefail
cd "$(dirname "$0")/../.."
LABEL=${1:?label}; ADAPTER=$(realpath "${2:?adapter}"); REPEATS=${3:-3}
LG=$PWD/target/release/edgegate-loadgen
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

run_one() { # name, loadgen args...
  local name=$1; shift
  local dir; dir=$(mktemp -d); chmod 755 "$dir"
  local port up; port=$(free_port); up=$(free_port)
  printf 'listener %s 127.0.0.1\nallow_anonymous true\nmax_queued_messages 0\nmax_inflight_messages 1000\nset_tcp_nodelay true\nuser root\n' "$up" >"$dir/up.conf"
  mosquitto -c "$dir/up.conf" >"$dir/up.log" 2>&1 &
  local upid=$!
  EDGE_WORKDIR=$dir EDGE_HOST=127.0.0.1 EDGE_PORT=$port UPSTREAM_HOST=127.0.0.1 UPSTREAM_PORT=$up \
    "$ADAPTER" run >"$dir/edge.out" 2>&1 &
  local epid=$!
  for _ in $(seq 1 100); do (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break; sleep 0.05; done
  sleep 1.5   # let the bridge connect upstream
  "$LG" --edge "127.0.0.1:$port" --upstream "127.0.0.1:$up" --edge-pid "$epid" --label "$LABEL/$name" \
    --timeout 120 "$@" 2>>"$dir/lg.err" || echo "{\"label\":\"$LABEL/$name\",\"error\":\"loadgen failed\"}"
  kill "$epid" "$upid" 2>/dev/null || true
  wait "$epid" "$upid" 2>/dev/null || true
  rm -rf "$dir"
}

for _ in $(seq 1 "$REPEATS"); do
  run_one steady-1conn --connections 1 --messages 300000
  run_one steady-10conn --connections 10 --messages 30000
  run_one devices-1000x1hz --connections 1000 --messages 20 --rate 1
done
