#!/usr/bin/env bash
# Full comparison of pushbridge against its peers on this machine, within
# 15 minutes: builds release, installs mosquitto, h2load and redis-server when
# missing, runs pushbridge-bench twice (the peers; then Redis vs in-memory
# registry), and leaves the tables, CSV and SVG charts in
# target/bench-results/, target/bench-results/redis/, .../receipts/ and .../one-thread/ (or $BENCH_OUT). Extra arguments go to the tool,
# e.g. `scripts/bench.sh --workloads ingest` or `scripts/bench.sh --smoke`.
# BENCH_REPEAT (default 3): interleaved runs; the tables show median runs.
set -euo pipefail
cd "$(dirname "$0")/.."

MOSQUITTO=${MOSQUITTO:-/usr/sbin/mosquitto}
# Peers and helpers, installed when missing: mosquitto (MQTT peer), h2load
# (nghttp2-client: the APNs workload's HTTP/2 peer), redis-server (the
# Redis-registry comparison).
missing=()
[ -x "$MOSQUITTO" ] || missing+=(mosquitto)
command -v h2load >/dev/null || missing+=(nghttp2-client)
command -v redis-server >/dev/null || missing+=(redis-server)
if [ "${#missing[@]}" -gt 0 ]; then
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  echo "installing: ${missing[*]}"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}" >/dev/null
fi
# The Debian package starts a system broker on :1883; the benchmark starts
# its own on free ports, so that one is left alone (and unused).

cargo build --release --locked --workspace --bin pushbridge --bin pushbridge-bench

OUT=${BENCH_OUT:-target/bench-results}
mkdir -p "$OUT"
# Each device is a socket: take the hard open-file limit (the tool raises its
# soft limit itself too; sizes over the limit are skipped, not failed).
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true

# The hard 15-minute bound over both runs; every phase inside the tool is bounded as well.
DEADLINE=$(( $(date +%s) + 900 ))
bench() {
  local left=$(( DEADLINE - $(date +%s) ))
  [ "$left" -gt 30 ] || { echo "bench.sh: out of time, skipping: $*" >&2; return 0; }
  timeout --signal=INT --kill-after=30 "$left" \
    target/release/pushbridge-bench \
      --pushbridge-bin target/release/pushbridge \
      --mosquitto-bin "$MOSQUITTO" \
      --repeat "${BENCH_REPEAT:-3}" \
      "$@"
}

# pushbridge against Mosquitto (idle, p2p, fanout), h2load (apns), and alone (ingest, core).
bench --out "$OUT" "$@" | tee "$OUT/stdout.md"

# Workload 4: the Redis registry against the in-memory one, both with a
# record for every user, half of them iOS (sent to the local APNs).
# Skipped when extra arguments were given (they select something else).
if [ "$#" -eq 0 ] || [ "$*" = "--smoke" ]; then
  mkdir -p "$OUT/redis"
  bench --out "$OUT/redis" --target pushbridge-ios,pushbridge-redis \
    --workloads p2p --p2p-rates 0 "$@" | tee "$OUT/redis/stdout.md"
fi

# Receipts: the same p2p run with every push sent with receipt: true
# (pushbridge-receipts) beside pushbridge with none, in one run.
if [ "$#" -eq 0 ] || [ "$*" = "--smoke" ]; then
  mkdir -p "$OUT/receipts"
  bench --out "$OUT/receipts" --target pushbridge,pushbridge-receipts \
    --workloads p2p --p2p-rates 0 "$@" | tee "$OUT/receipts/stdout.md"
fi

# One worker thread (runtime.worker_threads = 1), as Mosquitto runs on one:
# the closed loop again, both in one run.
if [ "$#" -eq 0 ] || [ "$*" = "--smoke" ]; then
  mkdir -p "$OUT/one-thread"
  bench --out "$OUT/one-thread" --target pushbridge-1t,mosquitto \
    --workloads p2p --p2p-rates 0 "$@" | tee "$OUT/one-thread/stdout.md"
fi

echo "results: $OUT/results.md (and $OUT/redis/, $OUT/receipts/, $OUT/one-thread/results.md), results.csv, *.svg"
