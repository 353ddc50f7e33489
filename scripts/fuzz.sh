#!/usr/bin/env bash
# Fuzzes the proxy frame decoder and the MQTT packet decoder for a bounded
# time each (default 60 s; `scripts/fuzz.sh 300`). Not part of scripts/test.sh.
#
# With cargo-fuzz (`cargo install cargo-fuzz`) and a nightly toolchain it runs
# the libFuzzer targets in fuzz/, seeded from fuzz/seeds/<target>/; crashes
# land in fuzz/artifacts/. Without them it runs the same target bodies in a
# seeded mutation loop (`cargo test --release fuzzing::tests::fuzz_loop`).
set -euo pipefail
cd "$(dirname "$0")/.."
secs="${1:-60}"

if cargo fuzz --version >/dev/null 2>&1 && rustup toolchain list | grep -q '^nightly'; then
  for target in proxy_frame mqtt_packet; do
    corpus="fuzz/corpus/$target"
    mkdir -p "$corpus"
    echo "== $target for ${secs}s"
    cargo +nightly fuzz run "$target" "$corpus" "fuzz/seeds/$target" -- \
      -max_total_time="$secs" -max_len=4096 -rss_limit_mb=1024
  done
else
  echo "cargo-fuzz or nightly missing: running the libFuzzer-less loop (${secs}s per decoder)"
  FUZZ_SECS="$secs" cargo test --release --features fuzzing --lib fuzzing::tests::fuzz_loop -- --ignored --nocapture
fi
