#!/usr/bin/env bash
# Full comparison of pushbridge against Mosquitto on this machine, within
# about 15 minutes: builds release, installs mosquitto when missing, runs
# pushbridge-bench, and leaves the tables, CSV and SVG charts in
# target/bench-results/ (or $BENCH_OUT). Extra arguments go to the tool,
# e.g. `scripts/bench.sh --workloads ingest` or `scripts/bench.sh --smoke`.
# BENCH_REPEAT (default 3): interleaved runs; the tables show median runs.
set -euo pipefail
cd "$(dirname "$0")/.."

MOSQUITTO=${MOSQUITTO:-/usr/sbin/mosquitto}
if [ ! -x "$MOSQUITTO" ]; then
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  echo "installing: mosquitto"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq mosquitto >/dev/null
fi
# The Debian package starts a system broker on :1883; the benchmark starts
# its own on free ports, so that one is left alone (and unused).

cargo build --release --locked --bin pushbridge --bin pushbridge-bench

OUT=${BENCH_OUT:-target/bench-results}
mkdir -p "$OUT"
# Each device is a socket: take the hard open-file limit (the tool raises its
# soft limit itself too; sizes over the limit are skipped, not failed).
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true

# The hard 15-minute bound; every phase inside the tool is bounded as well.
timeout --signal=INT --kill-after=30 900 \
  target/release/pushbridge-bench \
    --pushbridge-bin target/release/pushbridge \
    --mosquitto-bin "$MOSQUITTO" \
    --out "$OUT" \
    --repeat "${BENCH_REPEAT:-3}" \
    "$@" | tee "$OUT/stdout.md"

echo "results: $OUT/results.md, $OUT/results.csv, $OUT/*.svg"
