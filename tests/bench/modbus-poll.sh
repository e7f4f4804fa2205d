#!/usr/bin/env bash
# Modbus RTU polling: 32 slaves x 10 input registers on one 19200-baud line, every slave due all
# the time (interval 10ms), for SECONDS. Two slaves:
#   sim      the gateway's in-process simulated line (`sim: {delay: 0ms}`): no other process, so
#            what is left is the gateway's own cost and the RTU waits it keeps;
#   pymodbus tests/interop/modbus_slave.py --bench 32 over a socat pseudo-terminal pair (a slave
#            that is not our code; it answers in 1-3 ms of Python per request).
# Prints, per slave: polls/s, the gateway's CPU per poll (utime+stime from /proc), the bytes and
# frames it exchanged (edgegate_modbus_line_*), the time the same exchange takes on a real
# 19200-baud line (bytes x 11 bits / 19200 + one t3.5 silence, 3.5 x 11 bits, per frame), and the
# gateway's own time per poll.
# A pseudo-terminal has no baud rate: bytes arrive at once. The gateway still keeps the RTU
# timing it would keep on a line: its request occupies the wire for bytes x 11 / baud, and the
# next request waits t3.5 after the last byte. Not a timed test: figures go to docs/benchmarks.md.
# usage: tests/bench/modbus-poll.sh [SECONDS] [sim|pymodbus|both]
set -euo pipefail
cd "$(dirname "$0")/../.."
SECONDS_RUN=${1:-20}
WHICH=${2:-both}
GW=${GW:-$PWD/target/release/edgegate}
SLAVES=32
dir=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$dir"' EXIT
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

bus_yaml() { # $1: the bus's line source (path: … or sim: …)
  local sim=""; case $1 in sim:*) sim=yes ;; esac
  echo "modbus:"
  echo "  buses:"
  echo "    - name: line"
  echo "      $1"
  echo "      baud: 19200"
  echo "      parity: none"
  echo "      slaves:"
  for i in $(seq 0 $((SLAVES - 1))); do
    unit=$((10 + i))
    echo "        - name: s$unit"
    echo "          unit: $unit"
    echo "          interval: 10ms"
    echo "          timeout: 200ms"
    echo "          points:"
    for r in $(seq 0 9); do
      if [ -n "$sim" ]; then
        echo "            - {name: r$r, function: input_register, address: $r, sim_value: $((100 * i + r))}"
      else
        echo "            - {name: r$r, function: input_register, address: $r}"
      fi
    done
  done
}

metrics() { # $1: port → "polls frames bytes_in bytes_out"
  python3 - "$1" <<'PY'
import sys, urllib.request
text = urllib.request.urlopen(f"http://127.0.0.1:{sys.argv[1]}/metrics", timeout=10).read().decode()
def total(prefix):
    return sum(float(l.rsplit(" ", 1)[1]) for l in text.splitlines() if l.startswith(prefix))
print(int(total("edgegate_modbus_polls_total{")),
      int(total("edgegate_modbus_line_frames_total{")),
      int(total('edgegate_modbus_line_bytes_total{bus="line",direction="in"}')),
      int(total('edgegate_modbus_line_bytes_total{bus="line",direction="out"}')))
PY
}

run() { # $1: name, $2: bus source line
  local name=$1 port mport gw
  port=$(free_port); mport=$(free_port)
  {
    echo "gateway: {id: bench}"
    echo "broker: {listen: 127.0.0.1:$port}"
    echo "store: {path: $dir/$name.db}"
    echo "status: {socket: null}"
    echo "metrics: {enabled: true, listen: 127.0.0.1:$mport}"
    echo "log: {level: warn}"
    bus_yaml "$2"
  } >"$dir/$name.yaml"
  "$GW" run --config "$dir/$name.yaml" 2>"$dir/$name.log" &
  gw=$!
  for _ in $(seq 1 100); do (exec 3<>"/dev/tcp/127.0.0.1/$mport") 2>/dev/null && break; sleep 0.05; done
  sleep 2 # warm up: the first round of polls
  read -r p0 f0 i0 o0 < <(metrics "$mport")
  c0=$(awk '{print $14+$15}' "/proc/$gw/stat")
  t0=$(date +%s.%N)
  sleep "$SECONDS_RUN"
  read -r p1 f1 i1 o1 < <(metrics "$mport")
  c1=$(awk '{print $14+$15}' "/proc/$gw/stat")
  t1=$(date +%s.%N)
  kill "$gw"; wait "$gw" 2>/dev/null || true
  python3 - <<PY
polls, frames, bin_, bout = $p1 - $p0, $f1 - $f0, $i1 - $i0, $o1 - $o0
t = $t1 - $t0
cpu = ($c1 - $c0) / $(getconf CLK_TCK)
bits = 11  # start + 8 data + parity or second stop + stop
line_s = (bin_ + bout) * bits / 19200 + frames * 3.5 * bits / 19200
print({
    "slave": "$name", "slaves": $SLAVES, "points_per_slave": 10, "seconds": round(t, 1),
    "polls_per_s": round(polls / t, 1),
    "cpu_us_per_poll": round(cpu * 1e6 / max(polls, 1), 1),
    "cpu_percent": round(100 * cpu / t, 1),
    "bytes_per_poll": round((bin_ + bout) / max(polls, 1), 1),
    "frames_per_poll": round(frames / max(polls, 1), 2),
    "line_ms_per_poll_at_19200": round(1000 * line_s / max(polls, 1), 2),
    "gateway_ms_per_poll": round(1000 * t / max(polls, 1), 2),
    "line_polls_per_s_at_19200": round(polls / line_s, 1) if line_s else None,
})
PY
}

if [ "$WHICH" = sim ] || [ "$WHICH" = both ]; then
  run sim "sim: {delay: 0ms, jitter: 0}"
fi
if [ "$WHICH" = pymodbus ] || [ "$WHICH" = both ]; then
  socat "pty,raw,echo=0,link=$dir/gw-port" "pty,raw,echo=0,link=$dir/slave-port" &
  for _ in $(seq 1 50); do [ -e "$dir/gw-port" ] && [ -e "$dir/slave-port" ] && break; sleep 0.1; done
  python3 -u tests/interop/modbus_slave.py --rtu "$dir/slave-port" --bench "$SLAVES" >"$dir/slave.out" 2>&1 &
  slave=$!
  for _ in $(seq 1 100); do grep -q ready "$dir/slave.out" 2>/dev/null && break; sleep 0.1; done
  s0=$(awk '{print $14+$15}' "/proc/$slave/stat")
  run pymodbus "path: $dir/gw-port"
  s1=$(awk '{print $14+$15}' "/proc/$slave/stat")
  echo "pymodbus slave CPU over the run: $(python3 -c "print(round(($s1 - $s0) / $(getconf CLK_TCK), 1))") s"
fi
