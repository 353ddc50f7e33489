#!/usr/bin/env bash
# Fault runs (issue: nothing accepted is lost): builds the release binary,
# installs redis-server, mosquitto, mosquitto-clients, nghttpd and
# rabbitmq-server when missing, then runs scripts/faults.py (two instances
# with durable intake, Redis Cluster, Mosquitto or a two-node RabbitMQ
# cluster as the external broker, nghttpd as APNs).
#   scripts/faults.sh                         # every scenario, 100k pushes each
#   scripts/faults.sh --only kill --pushes 20000
#   scripts/faults.sh --only rabbitmq
#   FAULTS_NO_BUILD=1 scripts/faults.sh       # reuse target/release/pushbridge
set -euo pipefail
cd "$(dirname "$0")/.."
missing=()
command -v redis-server >/dev/null || missing+=(redis-server)
command -v mosquitto >/dev/null || [[ -x /usr/sbin/mosquitto ]] || missing+=(mosquitto)
command -v mosquitto_sub >/dev/null || missing+=(mosquitto-clients)
command -v nghttpd >/dev/null || [[ -x /usr/sbin/nghttpd ]] || missing+=(nghttp2-server)
command -v openssl >/dev/null || missing+=(openssl)
[[ -x /usr/lib/rabbitmq/bin/rabbitmq-server ]] || missing+=(rabbitmq-server)
if ((${#missing[@]})); then
    apt-get update
    DEBIAN_FRONTEND=noninteractive apt-get install -y "${missing[@]}"
fi
export PATH="$PATH:/usr/sbin"
if [[ -z "${FAULTS_NO_BUILD:-}" ]]; then
    cargo build --release --bin pushbridge
fi
exec python3 -u scripts/faults.py --bin target/release/pushbridge "$@"
