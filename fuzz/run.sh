#!/usr/bin/env bash
# Runs every fuzz target for a bounded time and reports executions and findings per target.
#
#   fuzz/run.sh            # 30 s per target
#   fuzz/run.sh 300        # 5 min per target
#
# Needs nightly and cargo-fuzz (`rustup toolchain install nightly; cargo install cargo-fuzz`).
# The corpus grows in fuzz/corpus/<target> (kept between runs, not committed); the config target
# also starts from the shipped configs in config/. A crash leaves its input in
# fuzz/artifacts/<target>/ and counts as a finding; replay it with
#   cd fuzz && cargo +nightly fuzz run <target> artifacts/<target>/<file>
# Last line: `fuzz: N targets, E executions, F findings`; exit 1 when anything was found.
set -uo pipefail
cd "$(dirname "$0")"

seconds="${1:-30}"
case "$seconds" in
  ''|*[!0-9]*) echo "usage: $0 [seconds per target]" >&2; exit 2 ;;
esac
targets=$(cargo +nightly fuzz list)
if [ -z "$targets" ]; then
  echo "no fuzz targets (is cargo-fuzz installed?)" >&2
  exit 2
fi
cargo +nightly fuzz build >/dev/null 2>&1 || { cargo +nightly fuzz build; exit 2; }

log_dir=$(mktemp -d)
trap 'rm -rf "$log_dir"' EXIT
total_execs=0
total_findings=0
count=0
printf '%-10s %14s %10s %9s\n' target executions exec/s findings
for t in $targets; do
  mkdir -p "corpus/$t" "artifacts/$t"
  seeds=()
  [ "$t" = config ] && seeds=(../config)
  before=$(find "artifacts/$t" -type f | wc -l)
  # -max_total_time bounds the run; the outer timeout catches a hang in libFuzzer itself.
  timeout $((seconds + 120)) cargo +nightly fuzz run "$t" "corpus/$t" "${seeds[@]}" -- \
    -max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048 -print_final_stats=1 \
    >"$log_dir/$t.log" 2>&1
  status=$?
  after=$(find "artifacts/$t" -type f | wc -l)
  findings=$((after - before))
  # A non-zero exit without a new artifact (a libFuzzer or build failure) is a finding too.
  if [ "$status" -ne 0 ] && [ "$findings" -eq 0 ]; then
    findings=1
    echo "---- $t exited $status; last lines:"; tail -20 "$log_dir/$t.log"
  fi
  execs=$(awk '/stat::number_of_executed_units:/ {print $2}' "$log_dir/$t.log" | tail -1)
  rate=$(awk '/stat::average_exec_per_sec:/ {print $2}' "$log_dir/$t.log" | tail -1)
  printf '%-10s %14s %10s %9s\n' "$t" "${execs:-?}" "${rate:-?}" "$findings"
  total_execs=$((total_execs + ${execs:-0}))
  total_findings=$((total_findings + findings))
  count=$((count + 1))
done
echo "fuzz: $count targets, $total_execs executions, $total_findings findings"
[ "$total_findings" -eq 0 ]
