"""The real pushbridge binary, redis-server and paho devices, on free
loopback ports, for the client and interop tests. Waits poll a condition
until a deadline that only bounds a failure."""

import json
import os
import queue
import random
import select
import signal
import socket
import struct
import subprocess
import time
import urllib.request
from pathlib import Path

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

REPO = Path(__file__).resolve().parents[3]
WAIT = 15.0


def binary():
    path = Path(os.environ.get("PUSHBRIDGE_BIN", REPO / "target/debug/pushbridge"))
    if not path.is_file():
        raise RuntimeError(f"{path} is missing: run `cargo build --bin pushbridge` "
                           "(or set PUSHBRIDGE_BIN)")
    return str(path)


def free_port():
    """A free port below the ephemeral range, so that no outgoing
    connection takes it between this check and the server's bind."""
    low = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    while True:
        port = random.randrange(10000, low)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
                return port
            except OSError:
                continue


def wait_until(cond, what, timeout=WAIT):
    deadline = time.monotonic() + timeout
    while True:
        value = cond()
        if value:
            return value
        if time.monotonic() > deadline:
            what = what() if callable(what) else what
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.02)


def _toml(sections):
    lines = []
    for name, keys in sections.items():
        lines.append(f"[{name}]")
        lines += [f"{k} = {json.dumps(v)}" for k, v in keys.items()]
    return "\n".join(lines) + "\n"


class Server:
    """`pushbridge serve` with a settings file in `workdir`; the same ports
    across restarts."""

    def __init__(self, workdir, **sections):
        self.dir = Path(workdir)
        self.proxy_port, self.mqtt_port, self.http_port = free_port(), free_port(), free_port()
        self.settings = {
            "proxy": {"listen": f"127.0.0.1:{self.proxy_port}", "drain_secs": 2},
            "mqtt": {"listen": f"127.0.0.1:{self.mqtt_port}"},
            "http": {"listen": f"127.0.0.1:{self.http_port}"},
        }
        for name, keys in sections.items():
            self.settings.setdefault(name, {}).update(keys)
        self.config = self.dir / "setting.toml"
        self.config.write_text(_toml(self.settings))
        self.log = self.dir / "server.log"
        self.proc = None

    def start(self):
        env = {k: v for k, v in os.environ.items() if not k.startswith("PUSHBRIDGE_")}
        with open(self.log, "a") as log:
            self.proc = subprocess.Popen([binary(), "serve", "--config", str(self.config)],
                                         cwd=self.dir, env=env, stdout=log, stderr=log)
        wait_until(self._ready, f"pushbridge to be ready (log: {self.log})")
        return self

    def _ready(self):
        if self.proc.poll() is not None:
            raise RuntimeError(f"pushbridge exited with {self.proc.returncode}:\n"
                               + self.log.read_text()[-3000:])
        try:
            with urllib.request.urlopen(self.url("/readyz"), timeout=2) as r:
                return r.status == 200
        except OSError:
            return False

    def url(self, path):
        return f"http://127.0.0.1:{self.http_port}{path}"

    def get_json(self, path):
        with urllib.request.urlopen(self.url(path), timeout=5) as r:
            return json.load(r)

    def put_json(self, path, body):
        req = urllib.request.Request(self.url(path), json.dumps(body).encode(), method="PUT",
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=5) as r:
            return r.status

    def pause(self):
        """SIGSTOP, and wait until every thread has stopped."""
        self.proc.send_signal(signal.SIGSTOP)
        tasks = Path(f"/proc/{self.proc.pid}/task")
        wait_until(lambda: all((t / "stat").read_text().rsplit(")", 1)[1].split()[0] == "T"
                               for t in tasks.iterdir()), "pushbridge to stop (SIGSTOP)")

    def wait_gone(self, user):
        """Until no connection that subscribed to the user's topic is open
        (its session has been released or detached by then)."""
        wait_until(lambda: not self.get_json(f"/v1/users/{user}/presence")["connected"],
                   f"user {user}'s connections to end")

    def stop(self, sig=signal.SIGTERM):
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.send_signal(signal.SIGCONT)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                raise
        return self.proc.returncode


class Redis:
    def __init__(self, workdir):
        self.port = free_port()
        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1",
             "--save", "", "--appendonly", "no", "--dir", str(workdir)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_until(lambda: self.cli("PING") == "PONG", "redis-server to answer PING")
        self.url = f"redis://127.0.0.1:{self.port}/0"

    def cli(self, *args):
        r = subprocess.run(["redis-cli", "-p", str(self.port), *args],
                           capture_output=True, text=True, timeout=10)
        return r.stdout.strip()

    def stop(self):
        self.proc.terminate()
        self.proc.wait(timeout=10)


class Device:
    """A paho MQTT client as an app: CONNACK and SUBACK are waited for,
    messages collected in a queue."""

    def __init__(self, port, client_id, version=4, clean=True, expiry=None, will=None):
        self.port, self.version, self.clean, self.expiry = port, version, clean, expiry
        proto = mqtt.MQTTv5 if version == 5 else mqtt.MQTTv311
        self.c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id,
                             protocol=proto, clean_session=None if version == 5 else clean)
        if will:
            self.c.will_set(will[0], will[1], qos=1)
        self.events, self.messages = queue.Queue(), queue.Queue()
        self.c.on_connect = lambda c, u, flags, rc, p: self.events.put(("connack", flags, rc))
        self.c.on_subscribe = lambda c, u, mid, rcs, p: self.events.put(("suback", rcs))
        self.dups = []
        self.c.on_message = lambda c, u, m: (self.dups.append(m.dup),
                                             self.messages.put((m.topic, m.payload)))
        self.c.reconnect_delay_set(60, 60)  # a test reconnects explicitly

    def connect(self):
        """Connects; returns session_present."""
        kw = {}
        if self.version == 5:
            kw["clean_start"] = self.clean
            if self.expiry is not None:
                kw["properties"] = Properties(PacketTypes.CONNECT)
                kw["properties"].SessionExpiryInterval = self.expiry
        self.c.connect("127.0.0.1", self.port, keepalive=30, **kw)
        self.c.loop_start()
        _, flags, rc = self._event("connack")
        assert not rc.is_failure, f"CONNECT refused: {rc}"
        return flags.session_present

    def subscribe(self, topic, qos=1):
        self.c.subscribe(topic, qos)
        (_, rcs) = self._event("suback")
        assert all(not rc.is_failure for rc in rcs), f"SUBSCRIBE {topic} refused: {rcs}"

    def publish(self, topic, payload):
        self.c.publish(topic, payload, qos=1).wait_for_publish(WAIT)

    def _event(self, kind):
        try:
            event = self.events.get(timeout=WAIT)
        except queue.Empty:
            raise AssertionError(f"no {kind} within {WAIT}s") from None
        assert event[0] == kind, f"expected {kind}, got {event}"
        return event

    def expect(self, count, timeout=WAIT):
        """The next `count` messages as (topic, parsed JSON)."""
        got = []
        deadline = time.monotonic() + timeout
        while len(got) < count:
            try:
                topic, payload = self.messages.get(timeout=max(0, deadline - time.monotonic()))
            except queue.Empty:
                raise AssertionError(f"got {len(got)} of {count} messages: {got}") from None
            got.append((topic, json.loads(payload)))
        return got

    def stop_reading(self):
        """paho reads (and acknowledges) nothing more."""
        self.c.loop_stop()

    def wait_unread(self):
        """Until the broker has written something this client has not read."""
        ready, _, _ = select.select([self.c.socket()], [], [], WAIT)
        assert ready, f"nothing arrived on the socket within {WAIT}s"

    def disconnect(self):
        self.c.disconnect()
        self.c.loop_stop()

    def kill(self):
        """Drops the connection with a TCP reset: no DISCONNECT is sent."""
        self.c.loop_stop()
        sock = self.c.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()
