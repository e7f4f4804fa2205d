#!/usr/bin/env bash
# Idle cost of edgegate and of a Mosquitto 2.0 bridge, in the same sitting, one after the other.
# Each edge runs with the shared harness's adapter (../shared/bench/edges/: edgegate's minimal
# configuration, Mosquitto's bridge configuration), a live upstream mosquitto and one connected,
# silent device client (mosquitto_sub on a topic nobody publishes to). After SETTLE seconds (5)
# the edge is measured over SECONDS (60):
#   CPU time    utime+stime of all threads (/proc/PID/stat, 10 ms ticks)
#   wake-ups/s  context switches of all threads (voluntary + nonvoluntary, summed over
#               /proc/PID/task/*/status), delta / seconds: a proxy for wake-ups, not a count of them
#   threads, RSS (VmRSS at the end)
# Prints one JSON line per edge, then a markdown table.
#
# usage: tests/bench/idle.sh [SECONDS]
# env:   GW_BIN (default target/release/edgegate), SETTLE (5), SHARED_BENCH (../shared/bench)
# needs: python3, mosquitto, mosquitto_sub. Loopback only; every wait bounded; all stopped on exit.
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT=$PWD
SECS=${1:-60}
SETTLE=${SETTLE:-5}
SHARED=${SHARED_BENCH:-$ROOT/../shared/bench}
export GW_BIN=${GW_BIN:-$ROOT/target/release/edgegate}
SAMPLE=$ROOT/tests/bench/proc_sample.py
[ -x "$GW_BIN" ] || { echo "no edgegate binary at $GW_BIN (cargo build --release, or set GW_BIN)" >&2; exit 2; }
for tool in python3 mosquitto mosquitto_sub; do
  command -v "$tool" >/dev/null || { echo "needs $tool" >&2; exit 2; }
done
case "$SECS" in '' | *[!0-9]* | 0) echo "SECONDS must be a positive integer" >&2; exit 2 ;; esac

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
# Established TCP connections from process $1 to local port $2 (the edge's link upstream).
conns_to() { ss -Htnp state established "( dport = :$2 )" 2>/dev/null | grep -c "pid=$1," || true; }
stop() { # pid: SIGTERM, then SIGKILL after 10 s
  local _
  kill "$1" 2>/dev/null || return 0
  for _ in $(seq 1 100); do kill -0 "$1" 2>/dev/null || break; sleep 0.1; done
  kill -9 "$1" 2>/dev/null || true
  wait "$1" 2>/dev/null || true
}

work=$(mktemp -d); dirs+=("$work")
measure() { # label adapter: appends one JSON line to $work/results.jsonl and prints it
  local label=$1 adapter=$2 dir port up upid epid subpid s0 s1 up0 up1 dev1
  dir=$(mktemp -d); dirs+=("$dir"); chmod 755 "$dir"
  port=$(free_port); up=$(free_port)
  printf 'listener %s 127.0.0.1\nallow_anonymous true\nmax_queued_messages 0\nset_tcp_nodelay true\nuser root\n' "$up" >"$dir/up.conf"
  mosquitto -c "$dir/up.conf" >"$dir/up.log" 2>&1 &
  upid=$!; pids+=("$upid")
  wait_port "$up"
  EDGE_WORKDIR=$dir EDGE_HOST=127.0.0.1 EDGE_PORT=$port UPSTREAM_HOST=127.0.0.1 UPSTREAM_PORT=$up \
    "$adapter" run >"$dir/edge.out" 2>&1 &
  epid=$!; pids+=("$epid")   # the adapter execs the edge: this is the edge's pid
  wait_port "$port"
  # The idle device: connected, subscribed, silent. -W bounds it even if we were killed.
  mosquitto_sub -h 127.0.0.1 -p "$port" -i idle-device -t 'devices/idle/cmd' \
    -W $((SETTLE + SECS + 60)) >/dev/null 2>"$dir/sub.err" &
  subpid=$!; pids+=("$subpid")
  sleep "$SETTLE"
  up0=$(conns_to "$epid" "$up")
  s0=$(python3 "$SAMPLE" "$epid" || true)
  sleep "$SECS"
  s1=$(python3 "$SAMPLE" "$epid" || true)
  up1=$(conns_to "$epid" "$up")
  dev1=$(conns_to "$subpid" "$port")
  stop "$subpid"; stop "$epid"; stop "$upid"
  python3 - "$label" "$SECS" "$SETTLE" "$s0" "$s1" "$up0" "$up1" "$dev1" "$(getconf CLK_TCK)" \
    <<'PY' | tee -a "$work/results.jsonl"
import json, sys
label, secs, settle = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
a, b = json.loads(sys.argv[4]), json.loads(sys.argv[5])
up0, up1, dev1, hz = (int(x) for x in sys.argv[6:10])
if a.get("gone") or b.get("gone"):
    print(json.dumps({"label": label, "error": "edge exited during the measurement"}))
    sys.exit(0)
dt = b["t"] - a["t"]
cpu_ticks = b["cpu_ticks"] - a["cpu_ticks"]
vol = b["ctxt_voluntary"] - a["ctxt_voluntary"]
nonvol = b["ctxt_nonvoluntary"] - a["ctxt_nonvoluntary"]
sys_busy, sys_total = b["sys_busy"] - a["sys_busy"], b["sys_total"] - a["sys_total"]
print(json.dumps({
    "label": label,
    "seconds": round(dt, 2),
    "settle_s": settle,
    "cpu_ms": round(cpu_ticks * 1000 / hz, 1),
    "cpu_pct": round(cpu_ticks / hz / dt * 100, 3),
    "cpu_resolution_ms": round(1000 / hz, 1),
    # Context switches, not wake-ups: every wake-up of a thread ends in one (voluntary when it goes
    # back to sleep, nonvoluntary when preempted), so this is an upper-bound proxy.
    "wakeups_per_s_ctxt_proxy": round((vol + nonvol) / dt, 2),
    "ctxt_voluntary_per_s": round(vol / dt, 2),
    "ctxt_nonvoluntary_per_s": round(nonvol / dt, 2),
    "threads_start": a["threads"],
    "threads_end": b["threads"],
    "rss_mib": round(b["rss_kib"] / 1024, 2),
    "peak_rss_mib": round(b["hwm_kib"] / 1024, 2),
    "write_bytes": b["write_bytes"] - a["write_bytes"],
    "upstream_links_start_end": [up0, up1],
    "device_connected_end": dev1 > 0,
    # Everything else the machine did in the window, in % of all its CPUs.
    "ext_cpu_pct": round(max(0, sys_busy - cpu_ticks) * 100 / max(1, sys_total), 1),
}))
PY
}

date -u +"# idle.sh: %FT%TZ, ${SECS} s after ${SETTLE} s settle, $(nproc) cores, $(uname -r)"
# In this shell, not a subshell, so the EXIT trap knows every process to stop.
measure edgegate "$SHARED/edges/edgegate.sh"
measure mosquitto "$SHARED/edges/mosquitto.sh"

python3 - "$work/results.jsonl" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
ok = [r for r in rows if "error" not in r]
for r in rows:
    if "error" in r:
        print(f"{r['label']}: {r['error']}")
figures = [
    ("CPU time, ms (10 ms ticks)", "cpu_ms"),
    ("CPU, % of one core", "cpu_pct"),
    ("wake-ups/s (context switches, proxy)", "wakeups_per_s_ctxt_proxy"),
    ("  of which voluntary/s", "ctxt_voluntary_per_s"),
    ("  of which nonvoluntary/s", "ctxt_nonvoluntary_per_s"),
    ("threads (end)", "threads_end"),
    ("RSS, MiB", "rss_mib"),
    ("bytes written", "write_bytes"),
    ("links to the upstream (start, end)", "upstream_links_start_end"),
    ("outside CPU load, %", "ext_cpu_pct"),
]
if ok:
    print()
    print(f"Idle: one silent device connected, live upstream, {ok[0]['seconds']:.0f} s "
          f"after {ok[0]['settle_s']} s settle. Wake-ups are context switches (a proxy).")
    print()
    print("| figure | " + " | ".join(r["label"] for r in ok) + " |")
    print("|---" * (len(ok) + 1) + "|")
    for name, key in figures:
        print(f"| {name} | " + " | ".join(str(r[key]) for r in ok) + " |")
PY
