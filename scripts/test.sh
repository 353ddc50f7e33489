#!/usr/bin/env bash
# Installs what the tests need (redis-server, mosquitto clients, openssl,
# h2load, chromium and chromedriver for the browser tests, node and npm for
# MQTT.js, python3-venv, rabbitmq-server for the clustered-broker test) when
# missing, then runs the whole test suite: cargo
# test, then the Python client's pytest suite. CI runs exactly this.
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
command -v redis-server >/dev/null 2>&1 || need+=(redis-server)
command -v mosquitto_sub >/dev/null 2>&1 || need+=(mosquitto-clients)
[ -x /usr/sbin/mosquitto ] || need+=(mosquitto)
command -v openssl >/dev/null 2>&1 || need+=(openssl)
command -v curl >/dev/null 2>&1 || need+=(curl)
[ -x /usr/bin/chromium ] || need+=(chromium)
[ -x /usr/bin/chromedriver ] || need+=(chromium-driver)
# h2load: the benchmark's smoke test compares the APNs sender with it.
command -v h2load >/dev/null 2>&1 || need+=(nghttp2-client)
# npm: fetches MQTT.js (tests/browser) for the browser MQTT test.
command -v npm >/dev/null 2>&1 || need+=(nodejs npm)
# A three-node RabbitMQ cluster as the external broker (tests/rabbitmq_cluster.rs).
[ -x /usr/lib/rabbitmq/bin/rabbitmq-server ] || need+=(rabbitmq-server)
# The Python client's tests run in a venv (target/pyenv).
python3 -c 'import venv, ensurepip' >/dev/null 2>&1 || need+=(python3 python3-venv)
if [ ${#need[@]} -gt 0 ]; then
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  echo "installing: ${need[*]}"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${need[@]}" >/dev/null
fi

# MQTT.js as pinned in tests/browser/package-lock.json; again when the lock is newer.
if [ tests/browser/package-lock.json -nt tests/browser/node_modules/.package-lock.json ]; then
  (cd tests/browser && npm ci --no-audit --no-fund)
fi

cargo test --locked --workspace --all-targets --all-features "$@"

# The Python backend client and the paho / mosquitto interop tests, against
# the debug binary (cargo test built it already; this is a no-op then).
cargo build --locked --bin pushbridge
python3 -m venv target/pyenv
target/pyenv/bin/pip install -q --disable-pip-version-check \
  ./clients/python "pytest>=7" "paho-mqtt>=2,<3"
PUSHBRIDGE_BIN="$PWD/target/debug/pushbridge" target/pyenv/bin/python -m pytest -q clients/python/tests
