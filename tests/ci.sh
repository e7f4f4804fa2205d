#!/usr/bin/env bash
# The whole test suite, as README.md gives it and as CI (.ci/run) runs it:
# installs what it needs, then format check, clippy (-D warnings) and every test.
set -euo pipefail
cd "$(dirname "$0")/.."

need_pkgs=()
for cmd_pkg in mosquitto:mosquitto mosquitto_pub:mosquitto-clients mosquitto_sub:mosquitto-clients \
               socat:socat openssl:openssl g++:g++; do
  cmd=${cmd_pkg%%:*}; pkg=${cmd_pkg##*:}
  if ! command -v "$cmd" >/dev/null 2>&1 && [ ! -x "/usr/sbin/$cmd" ]; then need_pkgs+=("$pkg"); fi
done
if [ ${#need_pkgs[@]} -gt 0 ]; then
  echo "== installing: ${need_pkgs[*]}"
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need_pkgs[@]}"
fi
# paho-mqtt (PyPI): a third-party client for the MQTT front's interoperability test
# (tests/interop/paho_front.py, run by tests/front.rs).
if ! python3 -c "import paho.mqtt" >/dev/null 2>&1; then
  echo "== installing paho-mqtt (pip)"
  # A Debian system Python refuses pip installs (PEP 668) unless told.
  python3 -m pip install -q "paho-mqtt>=2,<3" \
    || python3 -m pip install -q --break-system-packages "paho-mqtt>=2,<3"
fi
# pymodbus (PyPI): a Modbus slave that is not our code, over RTU (pseudo-terminals) and TCP, for
# tests/modbus.rs (tests/interop/modbus_slave.py). The version the tests were written against.
if ! python3 -c "import pymodbus, serial" >/dev/null 2>&1; then
  echo "== installing pymodbus (pip)"
  python3 -m pip install -q "pymodbus==3.16.1" pyserial \
    || python3 -m pip install -q --break-system-packages "pymodbus==3.16.1" pyserial
fi
for comp in rustfmt clippy; do
  if ! rustup component list --installed 2>/dev/null | grep -q "^$comp"; then
    rustup component add "$comp"
  fi
done

echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== cargo clippy --all-targets -- -D warnings"
cargo clippy --all-targets --locked -- -D warnings
# fuzz/ is its own cargo workspace (libFuzzer needs nightly to run): compile its targets on stable
# so an API change in src/codec/ cannot leave them broken. Shares the main target dir's artifacts.
echo "== cargo check fuzz/ (stable)"
cargo check --manifest-path fuzz/Cargo.toml --locked --bins --target-dir "${CARGO_TARGET_DIR:-target}"
# ── dependency policy (deny.toml): licenses, duplicate versions, crates.io only ────────────────
# `advisories` is not run here: it clones the RustSec database from GitHub, which CI cannot
# reach. The known advisories and their justification are in deny.toml and README.md.
# Installing cargo-deny took 1m54s on the CI machine (2 cores), once.
if ! cargo deny --version >/dev/null 2>&1; then
  echo "== installing cargo-deny"
  cargo install --locked cargo-deny
fi
echo "== cargo deny check licenses bans sources"
cargo deny --locked check licenses bans sources
# ── end of dependency policy ──────────────────────────────────────────────────────────────────────
echo "== cargo test"
log=$(mktemp)
trap 'rm -f "$log"' EXIT
set +e
cargo test --locked --lib --bins --tests -- --test-threads=2 2>&1 | tee "$log"
status=${PIPESTATUS[0]}
set -e

# ── packaging checks (owned by packaging/; see docs/packaging.md) ─────────────────────────────────
# amd64 .deb: lintian, install/upgrade/remove/purge in a bookworm chroot, systemd-analyze.
if [ "$status" -eq 0 ]; then
  echo
  echo "== packaging/ci-checks"
  bash packaging/ci-checks || status=$?
fi
# ── end of packaging checks ───────────────────────────────────────────────────────────────────────

# Tests that could not run here (tests/common: `skip`) pass in cargo's count; list them apart.
skipped=$(grep -c '^SKIPPED: ' "$log" || true)
if [ "$skipped" -gt 0 ]; then
  echo
  echo "== $skipped skipped (counted as passed below):"
  grep '^SKIPPED: ' "$log"
fi

# Last line: the cargo tests' totals, in the plain form CI reads.
echo
awk '/^test result:/ { for (i = 2; i <= NF; i++) { if ($i == "passed;") p += $(i-1); if ($i == "failed;") f += $(i-1) } }
     END { printf "tests: %d passed, %d failed\n", p, f }' "$log"
exit "$status"
