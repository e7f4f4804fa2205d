#!/usr/bin/env bash
# RSS and disk as the backlog grows from 0 to N messages, edgegate and a Mosquitto 2.0 bridge in
# the same sitting, one after the other. The upstream is down (never started: the edge points at
# a free port nobody listens on), so everything published stays queued in the edge. The Rust load
# generator publishes N QoS 1 messages of 100 B in chunks of CHUNK (50 000) on one connection;
# after each chunk (and at 0) the edge is sampled:
#   x_acked     messages PUBACKed to the publisher so far: the x axis ("queued messages"); empty
#               in a last row taken after the time limit stopped the publisher mid-chunk
#   queued      the edge's own count: edgegate `buffer stats` rows; Mosquitto
#               $SYS/broker/store/messages/count (all stored messages, a few $SYS ones included)
#   rss_kib, hwm_kib   VmRSS, VmHWM
#   disk_bytes  apparent size of every file in the edge's data dir (edgegate: buffer.db, -wal,
#               -shm; Mosquitto: its persistence file, written only at autosave or shutdown)
#   write_bytes /proc/PID/io write_bytes since the start (what reached the block layer)
#   files       name=bytes of each file in the data dir
# Mosquitto keeps a bridge's queue in RAM; its queue limits are lifted (max_queued_messages 0,
# max_queued_bytes 0) so it really buffers N, and sys_interval 1 keeps its $SYS count fresh.
# Before each sample the script waits PAUSE (1.2 s) so commits land and that count catches up.
# After the last sample the edge gets SIGTERM and its data dir is measured again.
#
# Output: OUT_DIR (docs/bench-results)/backlog-growth-<edge>.csv, backlog-growth.svg (plotted by
# tests/bench/backlog-plot.py, no matplotlib), one JSON summary line per edge on stdout.
#
# usage: tests/bench/backlog-growth.sh [N]        (default 1000000)
# env:   GW_BIN, LG_BIN (default target/release/edgegate, edgegate-loadgen), CHUNK (50000),
#        MAX_S (600: seconds per edge, pauses included; a slower edge stops there and the CSV
#        and summary say how far it got), PAUSE (1.2), OUT_DIR, SHARED_BENCH (../shared/bench)
# needs: python3, mosquitto, mosquitto_sub. Loopback only; every wait bounded; all stopped on exit.
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT=$PWD
N=${1:-1000000}
CHUNK=${CHUNK:-50000}
MAX_S=${MAX_S:-600}
PAUSE=${PAUSE:-1.2}
OUT_DIR=${OUT_DIR:-$ROOT/docs/bench-results}
SHARED=${SHARED_BENCH:-$ROOT/../shared/bench}
export GW_BIN=${GW_BIN:-$ROOT/target/release/edgegate}
LG_BIN=${LG_BIN:-$ROOT/target/release/edgegate-loadgen}
SAMPLE=$ROOT/tests/bench/proc_sample.py
for b in "$GW_BIN" "$LG_BIN"; do
  [ -x "$b" ] || { echo "no binary at $b (cargo build --release, or set GW_BIN / LG_BIN)" >&2; exit 2; }
done
for tool in python3 mosquitto mosquitto_sub; do
  command -v "$tool" >/dev/null || { echo "needs $tool" >&2; exit 2; }
done
for v in "$N" "$CHUNK" "$MAX_S"; do
  case "$v" in '' | *[!0-9]* | 0) echo "N, CHUNK and MAX_S must be positive integers" >&2; exit 2 ;; esac
done
mkdir -p "$OUT_DIR"

pids=() dirs=()
cleanup() {
  local p d
  for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
  for p in "${pids[@]}"; do wait "$p" 2>/dev/null || true; done
  for d in "${dirs[@]}"; do rm -rf "$d"; done
}
trap cleanup EXIT
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_port() { # port: until something accepts on it, at most 5 s
  local _
  for _ in $(seq 1 100); do (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0; sleep 0.05; done
  echo "nothing listening on 127.0.0.1:$1 after 5 s" >&2
  return 1
}
now() { date +%s.%N; }

run_edge() { # label adapter
  local label=$1 adapter=$2 dir port dead epid datadir csv t0 acked=0 chunks i n got rc
  local complete=true q s t_stop
  dir=$(mktemp -d); dirs+=("$dir"); chmod 755 "$dir"   # Mosquitto drops to its own user
  port=$(free_port); dead=$(free_port)
  csv=$OUT_DIR/backlog-growth-$label.csv
  local extra=""
  [ "$label" = mosquitto ] && extra=$'max_queued_messages 0\nmax_queued_bytes 0\nsys_interval 1'
  EDGE_WORKDIR=$dir EDGE_HOST=127.0.0.1 EDGE_PORT=$port UPSTREAM_HOST=127.0.0.1 UPSTREAM_PORT=$dead \
    MOSQ_EDGE_EXTRA=$extra "$adapter" run >"$dir/edge.out" 2>&1 &
  epid=$!; pids+=("$epid")   # the adapter execs the edge: this is the edge's pid
  wait_port "$port"
  datadir=$(EDGE_WORKDIR=$dir EDGE_PORT=$port UPSTREAM_PORT=$dead "$adapter" datadir)

  queued_once() { # the edge's own backlog count, or empty when it cannot say
    case "$label" in
      edgegate) "$GW_BIN" buffer stats --config "$dir/edgegate.yaml" --json 2>/dev/null |
        python3 -c 'import json,sys; print(json.load(sys.stdin)["rows"])' 2>/dev/null || true ;;
      mosquitto) timeout 5 mosquitto_sub -h 127.0.0.1 -p "$port" -C 1 -W 3 \
        -t '$SYS/broker/store/messages/count' 2>/dev/null || true ;;
    esac
  }
  queued() { # x: the count once it has caught up with x ($SYS lags up to ~2 s), at most 5 tries
    local v _
    for _ in 1 2 3 4 5; do
      v=$(queued_once)
      [ -n "$v" ] && [ "$v" -ge "${1:-0}" ] 2>/dev/null && break
      sleep 0.5
    done
    echo "$v"
  }
  sample_row() { # x: appends one CSV row
    sleep "$PAUSE"
    q=$(queued "$1")
    s=$(python3 "$SAMPLE" "$epid" "$datadir" || true)
    python3 - "$label" "$1" "$q" "$s" "$t0" "$(now)" "$(getconf CLK_TCK)" "$w0" "$c0" >>"$csv" <<'PY'
import json, sys
label, x, q, s = sys.argv[1], sys.argv[2], sys.argv[3].strip(), json.loads(sys.argv[4])
t0, t, hz, w0, c0 = float(sys.argv[5]), float(sys.argv[6]), int(sys.argv[7]), int(sys.argv[8]), int(sys.argv[9])
if s.get("gone"):
    print(f"{label},{x},{q},{t - t0:.2f},,,,,,gone")
    sys.exit(0)
files = ";".join(f"{k}={v}" for k, v in s["files"].items())
print(f"{label},{x},{q},{t - t0:.2f},{s['rss_kib']},{s['hwm_kib']},{s['disk_bytes']},"
      f"{s['write_bytes'] - w0},{(s['cpu_ticks'] - c0) / hz:.2f},{files}")
PY
  }

  local s0 w0 c0
  s0=$(python3 "$SAMPLE" "$epid" "$datadir")
  w0=$(python3 -c 'import json,sys; print(json.loads(sys.argv[1])["write_bytes"])' "$s0")
  c0=$(python3 -c 'import json,sys; print(json.loads(sys.argv[1])["cpu_ticks"])' "$s0")
  t0=$(now)
  echo "edge,x_acked,queued,elapsed_s,rss_kib,hwm_kib,disk_bytes,write_bytes,cpu_s,files" >"$csv"
  sample_row 0
  chunks=$(((N + CHUNK - 1) / CHUNK))
  for i in $(seq 1 "$chunks"); do
    local left=$((MAX_S - $(python3 -c "print(int($(now) - $t0))")))
    if [ "$left" -le 0 ]; then
      echo "$label: ${MAX_S} s limit reached after $acked of $N" >&2
      complete=false; break
    fi
    n=$((N - acked < CHUNK ? N - acked : CHUNK))
    rc=0
    timeout -k 5 "$left" "$LG_BIN" --edge "127.0.0.1:$port" --messages "$n" --size 100 \
      --label "$label/backlog-$i" >"$dir/chunk.json" 2>>"$dir/lg.err" || rc=$?
    got=$(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["acked"])' "$dir/chunk.json" 2>/dev/null || echo "")
    if [ -z "$got" ]; then
      # The load generator was stopped at the time limit before it could report: how many of
      # this chunk were acknowledged is unknown, so this last row has no x (only the edge's count).
      sample_row ""
      echo "$label: chunk $i stopped at the ${MAX_S} s limit (loadgen exit $rc); last known x: $acked" >&2
      complete=false; break
    fi
    acked=$((acked + got))
    sample_row "$acked"
    if [ "$rc" != 0 ] || [ "$got" -lt "$n" ]; then
      echo "$label: chunk $i: $got of $n acked (loadgen exit $rc); stopping at $acked" >&2
      complete=false; break
    fi
  done
  local publish_s; publish_s=$(python3 -c "print(round($(now) - $t0, 2))")
  # SIGTERM: what is on disk once the edge has shut down (Mosquitto saves its queue now).
  t_stop=$(now)
  kill "$epid" 2>/dev/null || true
  local _
  for _ in $(seq 1 600); do kill -0 "$epid" 2>/dev/null || break; sleep 0.1; done
  kill -9 "$epid" 2>/dev/null || true
  wait "$epid" 2>/dev/null || true
  local shutdown_s; shutdown_s=$(python3 -c "print(round($(now) - $t_stop, 2))")
  local after
  after=$(python3 -c 'import os,sys; d=sys.argv[1]; print(sum(os.path.getsize(os.path.join(d,f)) for f in os.listdir(d) if os.path.isfile(os.path.join(d,f))))' "$datadir" 2>/dev/null || echo 0)
  python3 - "$label" "$N" "$csv" "$complete" "$publish_s" "$shutdown_s" "${after:-0}" <<'PY'
import csv, json, sys
label, n, path, complete, publish_s, shutdown_s, after = sys.argv[1:8]
every = [r for r in csv.DictReader(open(path)) if r["rss_kib"]]
rows = [r for r in every if r["x_acked"]]
first, last = rows[0], rows[-1]
# A last row without x: the publisher was stopped mid-chunk; show what the edge held then.
cut = every[-1] if not every[-1]["x_acked"] else None
x = int(last["x_acked"])
per = lambda key: round((int(last[key]) - int(first[key])) / x, 1) if x else None
print(json.dumps({
    "label": label, "n": int(n), "acked": x, "queued_end": last["queued"],
    "complete": complete == "true", "elapsed_s_incl_pauses": float(publish_s),
    "rss_mib_start": round(int(first["rss_kib"]) / 1024, 1),
    "rss_mib_end": round(int(last["rss_kib"]) / 1024, 1),
    "peak_rss_mib": round(int(last["hwm_kib"]) / 1024, 1),
    "rss_bytes_per_msg": round((int(last["rss_kib"]) - int(first["rss_kib"])) * 1024 / x, 1) if x else None,
    # The slope once fixed-size caches (SQLite's page cache, buffers) have filled: from the first
    # sample at >= 10 % of the run to the last. "Flat" means this, not the start-to-end ratio.
    "rss_bytes_per_msg_after_10pct": (lambda w: round((int(last["rss_kib"]) - int(w["rss_kib"])) * 1024 / (x - int(w["x_acked"])), 2) if w and x > int(w["x_acked"]) else None)(next((r for r in rows if int(r["x_acked"]) >= x / 10), None)),
    "disk_mib_end": round(int(last["disk_bytes"]) / 2**20, 1),
    "disk_bytes_per_msg": per("disk_bytes"),
    "write_bytes_per_msg": round(int(last["write_bytes"]) / x, 1) if x else None,
    "cpu_s": float(last["cpu_s"]),
    "shutdown_s": float(shutdown_s),
    "disk_mib_after_sigterm": round(int(after) / 2**20, 1),
    "stopped_mid_chunk": None if cut is None else {
        "queued": cut["queued"], "rss_mib": round(int(cut["rss_kib"]) / 1024, 1)},
    "csv": path,
}))
PY
}

date -u +"# backlog-growth.sh: %FT%TZ, N=$N, chunk $CHUNK, $(nproc) cores, $(uname -r)"
run_edge edgegate "$SHARED/edges/edgegate.sh"
run_edge mosquitto "$SHARED/edges/mosquitto.sh"
python3 "$ROOT/tests/bench/backlog-plot.py" "$OUT_DIR/backlog-growth.svg" \
  "$OUT_DIR/backlog-growth-edgegate.csv" "$OUT_DIR/backlog-growth-mosquitto.csv"
echo "plot: $OUT_DIR/backlog-growth.svg"
