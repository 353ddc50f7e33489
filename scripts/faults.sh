#!/usr/bin/env bash
# Fault runs against real processes (not part of `cargo test`: they take
# minutes). Needs redis-server and mosquitto_sub (scripts/test.sh installs them).
#   scripts/faults.sh                      # every fault below, 100k pushes each
#   FAULTS_PUSHES=20000 scripts/faults.sh  # shorter
#   FAULTS_BIN=target/release/pushbridge scripts/faults.sh
set -euo pipefail
cd "$(dirname "$0")/.."
BIN="${FAULTS_BIN:-target/debug/pushbridge}"
PUSHES="${FAULTS_PUSHES:-100000}"
if [[ ! -x "$BIN" ]]; then
    cargo build --bin pushbridge
fi

echo "== durable intake: kill -9 of one of two instances during $PUSHES pushes"
python3 -u scripts/faults_durable.py --bin "$BIN" --pushes "$PUSHES"
