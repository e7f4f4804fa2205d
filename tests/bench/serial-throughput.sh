#!/usr/bin/env bash
# Lines per second one serial adapter sustains through a real pseudo-terminal (socat), and the CPU
# it costs: N `kv` lines are written into the PTY as fast as the kernel takes them; every reading
# goes to the store first (a forward rule matches; the uplink is down) and then to the local
# broker, where mosquitto_sub counts them. usage: tests/bench/serial-throughput.sh [N]
set -euo pipefail
cd "$(dirname "$0")/../.."
N=${1:-20000}
GW=$PWD/target/release/edgegate
dir=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null || true; rm -rf "$dir"' EXIT
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
port=$(free_port); dead=$(free_port)
socat "pty,raw,echo=0,link=$dir/dev" "pty,raw,echo=0,link=$dir/host" &
for _ in $(seq 1 50); do [ -e "$dir/dev" ] && [ -e "$dir/host" ] && break; sleep 0.1; done
cat >"$dir/gw.yaml" <<YAML
gateway:
  id: serial
broker:
  listen: 127.0.0.1:$port
store:
  path: $dir/buffer.db
uplink:
  url: mqtt://127.0.0.1:$dead
  forward:
    - local: "sensors/#"
serial:
  ports:
    - name: probe
      path: $dir/dev
      baud: 115200
      format: kv
log:
  level: warn
YAML
"$GW" run --config "$dir/gw.yaml" 2>"$dir/gw.log" &
gw=$!
for _ in $(seq 1 100); do (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null && break; sleep 0.05; done
sleep 0.5
mosquitto_sub -p "$port" -t 'sensors/probe' -C "$N" -W 120 >"$dir/got" &
sub=$!
sleep 0.3
c0=$(awk '{print $14+$15}' "/proc/$gw/stat")
t0=$(date +%s.%N)
python3 - "$dir/host" "$N" <<'PY'
import os, sys
fd = os.open(sys.argv[1], os.O_WRONLY)
n = int(sys.argv[2])
data = b"".join(b"T=%d.5 H=40 seq=%d\n" % (i % 40, i) for i in range(n))
view = memoryview(data)
while view:
    k = os.write(fd, view[:4096])
    view = view[k:]
os.close(fd)
PY
wait "$sub" || true
t1=$(date +%s.%N)
c1=$(awk '{print $14+$15}' "/proc/$gw/stat")
got=$(wc -l <"$dir/got")
rows=$("$GW" buffer stats --config "$dir/gw.yaml" --json | python3 -c 'import json,sys; print(json.load(sys.stdin)["rows"])')
python3 -c "
n, got, rows = $N, $got, $rows
t = $t1 - $t0; cpu = ($c1 - $c0) / 100
print({'lines': n, 'published_locally': got, 'stored': rows, 'seconds': round(t, 2),
       'lines_per_s': round(got / t), 'cpu_us_per_line': round(cpu * 1e6 / max(got, 1), 1)})"
