#!/usr/bin/env bash
# Every benchmark behind docs/benchmarks.md, edgegate and the Mosquitto bridge in one sitting.
# Raw results go to bench-results/ (JSON lines); the tables are printed at the end.
# Takes ~28 minutes on 2 cores; run it on a quiet machine (outside load is recorded per run).
# usage: tests/bench/run-all.sh      (needs python3, mosquitto; builds the release binaries)
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT=$PWD
SHARED=${SHARED_BENCH:-$ROOT/../shared/bench}
OUT=${OUT:-$ROOT/bench-results}
mkdir -p "$OUT"
cargo build --release --locked --bin edgegate --bin edgegate-loadgen
export GW_BIN=$ROOT/target/release/edgegate
date -u +%FT%TZ >"$OUT/started"

# 1. The shared harness (../shared/bench): a0 a b c-kill c-term d, 3 interleaved repeats each.
REPEATS=${REPEATS:-3} OUTDIR=$OUT "$SHARED/run_suite.sh" edgegate "$SHARED/edges/edgegate.sh" >"$OUT/suite-edgegate.log" 2>&1
REPEATS=${REPEATS:-3} OUTDIR=$OUT "$SHARED/run_suite.sh" mosquitto "$SHARED/edges/mosquitto.sh" >"$OUT/suite-mosquitto.log" 2>&1

# 2. The Rust load generator against both (beyond the harness's ceiling).
tests/bench/loadgen-compare.sh edgegate "$SHARED/edges/edgegate.sh" "${LG_REPEATS:-3}" >"$OUT/loadgen.jsonl"
tests/bench/loadgen-compare.sh mosquitto "$SHARED/edges/mosquitto.sh" "${LG_REPEATS:-3}" >>"$OUT/loadgen.jsonl"

# 3. Ingest-only and drain-only with a 300k backlog; 4. the PUBACK-before-commit window.
for _ in 1 2 3; do tests/bench/drain.sh 300000; done >"$OUT/drain.jsonl"
tests/bench/puback-window.sh 10 0 >"$OUT/window-fullspeed.txt"
tests/bench/puback-window.sh 10 1000 >"$OUT/window-1000.txt"

# 5. Idle cost (CPU, context switches as a proxy for wake-ups, threads, RSS), 60 s each.
tests/bench/idle.sh "${IDLE_S:-60}" >"$OUT/idle.txt"
# 6. RSS and disk as the backlog grows to 1M (CSV per edge and backlog-growth.svg in $OUT).
OUT_DIR=$OUT tests/bench/backlog-growth.sh "${BACKLOG_N:-1000000}" >"$OUT/backlog-growth.txt"
# 7. The MQTT front vs rumqttd's own listener: PUBACK rate and latency, CPU, 1 and 50 connections.
tests/bench/front-compare.sh "${FRONT_REPEATS:-3}" release >"$OUT/front-compare.jsonl"
# 8. Where the CPU goes end to end: the edge, the upstream mosquitto, the load generator.
tests/bench/cpu-budget.sh "${LG_REPEATS:-3}" 300000 >"$OUT/cpu-budget.jsonl"
date -u +%FT%TZ >"$OUT/done"

python3 tests/bench/report.py "$OUT/edgegate.jsonl" "$OUT/mosquitto.jsonl"
python3 tests/bench/loadgen-report.py "$OUT/loadgen.jsonl"
tail -n 1 "$OUT/window-fullspeed.txt" "$OUT/window-1000.txt"
cat "$OUT/drain.jsonl"
cat "$OUT/idle.txt" "$OUT/backlog-growth.txt" "$OUT/front-compare.jsonl" "$OUT/cpu-budget.jsonl"
