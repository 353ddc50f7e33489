#!/usr/bin/env bash
# Hostile soak (issue 14): builds the release binary, then runs
# scripts/hostile_soak.py (10,000 MQTT devices receiving 2000 pushes/s, a
# baseline phase, then the same load while attackers repeat issue 14's points
# 1-7; RSS against a bound derived from the settings, p99 against 2x the
# baseline; PASS/FAIL). Needs nothing beyond Python 3 (and redis-server for
# --redis). Extra arguments go to hostile_soak.py, e.g.
#   scripts/hostile_soak.sh                                  # defaults: 10k devices, 2 x 120 s
#   scripts/hostile_soak.sh --devices 2000 --duration 30
#   scripts/hostile_soak.sh --attacks 3 --duration 60        # one attack alone
#   HOSTILE_NO_BUILD=1 scripts/hostile_soak.sh --redis       # reuse target/release/pushbridge
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ -z "${HOSTILE_NO_BUILD:-}" ]]; then
    cargo build --release --bin pushbridge
fi
exec python3 -u scripts/hostile_soak.py --bin target/release/pushbridge "$@"
