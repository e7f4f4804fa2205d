#!/usr/bin/env bash
# Where the CPU goes in an end-to-end run, per forwarded message: the edge, the upstream
# mosquitto and the load generator (publisher + subscriber), for edgegate and the Mosquitto
# bridge in the same sitting. On a machine where all three share the cores, the end-to-end rate
# cannot exceed cores / (sum of the three), whatever the edge does: this prints that bound.
#
# usage: tests/bench/cpu-budget.sh [REPEATS] [MESSAGES]     (release binaries must be built)
# Loopback only; each run bounded by the load generator's --timeout.
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT=$PWD
REPEATS=${1:-3}; N=${2:-300000}
SHARED=${SHARED_BENCH:-$ROOT/../shared/bench}
export GW_BIN=${GW_BIN:-$ROOT/target/release/edgegate}
LG=$ROOT/target/release/edgegate-loadgen
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
ticks() { awk '{print $14+$15}' "/proc/$1/stat"; }
run_one() { # label adapter
  local label=$1 adapter=$2 dir port up upid epid u0 u1
  dir=$(mktemp -d); chmod 755 "$dir"
  port=$(free_port); up=$(free_port)
  printf 'listener %s 127.0.0.1\nallow_anonymous true\nmax_queued_messages 0\nmax_inflight_messages 1000\nset_tcp_nodelay true\nuser root\n' "$up" >"$dir/up.conf"
  mosquitto -c "$dir/up.conf" >"$dir/up.log" 2>&1 &
  upid=$!
  EDGE_WORKDIR=$dir EDGE_HOST=127.0.0.1 EDGE_PORT=$port UPSTREAM_HOST=127.0.0.1 UPSTREAM_PORT=$up \
    "$adapter" run >"$dir/edge.out" 2>&1 &
  epid=$!
  for _ in $(seq 1 100); do (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break; sleep 0.05; done
  sleep 1.5
  u0=$(ticks "$upid")
  /usr/bin/time -f '%U %S' -o "$dir/lg.time" "$LG" --edge "127.0.0.1:$port" --upstream "127.0.0.1:$up" \
    --edge-pid "$epid" --label "$label" --timeout 120 --connections 1 --messages "$N" >"$dir/lg.json" 2>>"$dir/lg.err" || true
  u1=$(ticks "$upid")
  python3 - "$label" "$dir/lg.json" "$dir/lg.time" "$u0" "$u1" "$(nproc)" <<'PY'
import json, sys
label, lg, tf, u0, u1, cores = sys.argv[1:7]
try:
    d = json.load(open(lg))
except Exception as e:
    print(json.dumps({"label": label, "error": f"loadgen: {e}"})); sys.exit()
n = d["acked"] or 1
user, sys_ = (float(x) for x in open(tf).read().split()[-2:])
edge = d["edge"]["cpu_us_per_msg"] if d.get("edge") else None
upstream = (int(u1) - int(u0)) / 100 * 1e6 / n
loadgen = (user + sys_) * 1e6 / n
total = (edge or 0) + upstream + loadgen
print(json.dumps({
    "label": label, "messages": n, "e2e_msgs_s": round(d["e2e_msgs_s"] or 0),
    "edge_cpu_us_per_msg": edge, "upstream_cpu_us_per_msg": round(upstream, 2),
    "loadgen_cpu_us_per_msg": round(loadgen, 2), "total_cpu_us_per_msg": round(total, 2),
    "machine_bound_msgs_s": round(int(cores) / total * 1e6) if total else None,
    "bound_with_a_free_edge_msgs_s": round(int(cores) / (upstream + loadgen) * 1e6),
    "lost": d["lost"],
}))
PY
  kill "$epid" "$upid" 2>/dev/null || true
  wait "$epid" "$upid" 2>/dev/null || true
  rm -rf "$dir"
}
for _ in $(seq 1 "$REPEATS"); do
  run_one edgegate "$SHARED/edges/edgegate.sh"
  run_one mosquitto "$SHARED/edges/mosquitto.sh"
done
