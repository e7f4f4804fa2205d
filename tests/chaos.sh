#!/usr/bin/env bash
# The long chaos run (tests/chaos.rs at full length): by default 12 kill rounds = 24 `kill -9`s in
# a row, plus every other chaos scenario, repeated CHAOS_RUNS times (default 1), each run with a
# fresh seed that is printed (replay one with EDGEGATE_CHAOS_SEED=<seed>).
#
#   tests/chaos.sh                                  # 24 kills, one run
#   EDGEGATE_CHAOS_ITERATIONS=50 CHAOS_RUNS=3 tests/chaos.sh
#
# Last line: `chaos: N passed, M failed` (tests, summed over the runs).
set -uo pipefail
cd "$(dirname "$0")/.."

export EDGEGATE_CHAOS_ITERATIONS="${EDGEGATE_CHAOS_ITERATIONS:-12}"
runs="${CHAOS_RUNS:-1}"
log=$(mktemp)
trap 'rm -f "$log"' EXIT

if ! cargo test --locked --test chaos --no-run >"$log" 2>&1; then
  cat "$log"
  echo "chaos: 0 passed, 1 failed (build)"
  exit 1
fi
status=0
for run in $(seq 1 "$runs"); do
  echo "== chaos run $run of $runs (EDGEGATE_CHAOS_ITERATIONS=$EDGEGATE_CHAOS_ITERATIONS)"
  # --nocapture: the seeds and per-kill figures are the point of this run.
  cargo test --locked --test chaos -- --test-threads=2 --nocapture 2>&1 | tee -a "$log"
  [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
done

awk '/^test result:/ { for (i = 2; i <= NF; i++) { if ($i == "passed;") p += $(i-1); if ($i == "failed;") f += $(i-1) } }
     END { printf "chaos: %d passed, %d failed\n", p, f }' "$log"
exit "$status"
