#!/usr/bin/env bash
# Memory soak against an unreachable APNs: builds the release binary, then runs
# scripts/soak.py (server setup, 1000 iOS users, 4-connection proxy flood,
# RSS/CPU + /v1/stats every 10 s, verdict). Extra arguments go to soak.py, e.g.
#   scripts/soak.sh --duration 540
#   scripts/soak.sh --queue-full drop --duration 300
#   SOAK_NO_BUILD=1 scripts/soak.sh      # reuse target/release/pushbridge
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ -z "${SOAK_NO_BUILD:-}" ]]; then
    cargo build --release --bin pushbridge
fi
exec python3 -u scripts/soak.py --bin target/release/pushbridge "$@"
