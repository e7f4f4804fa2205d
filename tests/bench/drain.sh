#!/usr/bin/env bash
# Ingest-only and drain-only figures with the Rust load generator (beyond the Python harness's
# ceiling): N messages into a gateway whose upstream is down, then the upstream comes up and the
# backlog drains. Prints ingest msg/s and CPU/msg, drain msg/s and CPU/msg, bytes written per
# message, RSS. usage: tests/bench/drain.sh [N]   (needs cargo build --release; loopback only)
set -euo pipefail
cd "$(dirname "$0")/../.."
N=${1:-300000}
GW=$PWD/target/release/edgegate
LG=$PWD/target/release/edgegate-loadgen
dir=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$dir"' EXIT
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
port=$(free_port); up=$(free_port)
cat >"$dir/up.conf" <<CONF
listener $up 127.0.0.1
allow_anonymous true
max_queued_messages 0
set_tcp_nodelay true
user root
CONF
cat >"$dir/gw.yaml" <<YAML
gateway:
  id: drain
broker:
  listen: 127.0.0.1:$port
store:
  path: $dir/buffer.db
uplink:
  url: mqtt://127.0.0.1:$up
  forward:
    - local: "sensors/#"
log:
  level: warn
YAML
"$GW" run --config "$dir/gw.yaml" 2>"$dir/gw.log" &
gw=$!
for _ in $(seq 1 100); do (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break; sleep 0.05; done
cpu() { awk '{print $14+$15}' "/proc/$gw/stat"; }
wbytes() { awk '/^write_bytes/ {print $2}' "/proc/$gw/io"; }
"$LG" --edge "127.0.0.1:$port" --messages "$N" --edge-pid "$gw" --label ingest >"$dir/ingest.json" 2>/dev/null
sleep 0.5
c0=$(cpu); w0=$(wbytes); t0=$(date +%s.%N)
mosquitto -c "$dir/up.conf" >"$dir/up.log" 2>&1 &
for _ in $(seq 1 1200); do
  rows=$("$GW" buffer stats --config "$dir/gw.yaml" --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["rows"])')
  [ "$rows" = 0 ] && break
  sleep 0.1
done
t1=$(date +%s.%N); c1=$(cpu); w1=$(wbytes)
rss=$(awk '/VmHWM/ {print $2}' "/proc/$gw/status")
python3 - "$dir/ingest.json" "$N" "$t0" "$t1" "$c0" "$c1" "$w0" "$w1" "$rss" <<'PY'
import json, sys
ing = json.load(open(sys.argv[1]))
n = int(sys.argv[2]); t0, t1 = float(sys.argv[3]), float(sys.argv[4])
c0, c1, w0, w1, rss = (int(x) for x in sys.argv[5:10])
print(json.dumps({
    "n": n,
    "ingest_msgs_s": round(ing["ingest_msgs_s"]),
    "ingest_cpu_us_per_msg": round(ing["edge"]["cpu_us_per_msg"], 2),
    "ingest_write_bytes_per_msg": round(ing["edge"]["write_bytes_per_msg"]),
    "drain_s_incl_connect": round(t1 - t0, 2),
    "drain_msgs_s_incl_connect": round(n / (t1 - t0)),
    "drain_cpu_us_per_msg": round((c1 - c0) * 1e4 / n, 2),
    "drain_write_bytes_per_msg": round((w1 - w0) / n),
    "peak_rss_mib": round(rss / 1024, 1),
}))
PY
