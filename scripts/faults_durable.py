#!/usr/bin/env python3
"""Fault: `kill -9` of one of two pushbridge instances during durable intake.

Starts a redis-server (append-only file, fsync per write), two
`pushbridge serve` processes A and B with `intake.durable = true` on it, and
one `mosquitto_sub` per instance on `push/user/1..50` (with the embedded broker a
push reaches the devices of the instance that consumed it). Two backends send
N pushes (half to each proxy, pipelined bursts); once A has accepted a quarter
of its share it is killed with SIGKILL, and its backend sends what A did not
answer to B instead, as a backend would. Then it waits until every accepted
push was seen by a subscriber (B claims A's pending entries after
intake.claim_idle_ms) and prints accepted vs delivered. Exit 0 when nothing
accepted is missing. Standard library only.

    scripts/faults_durable.py --bin target/debug/pushbridge --pushes 100000
"""

import argparse
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

# Users the pushes spread over; each subscriber subscribes to every user
# topic (the ACL refuses wildcards on user topics).
USERS = 50


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def frame(n):
    """4-byte BE length + msgpack [2, n % USERS + 1, {"n": n}]."""
    uid = n % USERS + 1
    body = b"\x93\x02" + bytes([uid]) + b"\x81\xa1n\xce" + struct.pack(">I", n)
    return struct.pack(">I", len(body)) + body


def http_get(port, path):
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=2) as r:
            return r.status, r.read()
    except OSError:
        return None, b""


def wait_for(what, cond, timeout):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(0.1)
    sys.exit(f"faults: {what} not reached within {timeout} s")


class Instance:
    def __init__(self, name, binary, redis_url, claim_idle_ms, logdir):
        self.name = name
        self.proxy, self.mqtt, self.http = free_port(), free_port(), free_port()
        env = dict(os.environ)
        env.update({
            "PUSHBRIDGE_PROXY__LISTEN": f"127.0.0.1:{self.proxy}",
            "PUSHBRIDGE_MQTT__LISTEN": f"127.0.0.1:{self.mqtt}",
            "PUSHBRIDGE_HTTP__LISTEN": f"127.0.0.1:{self.http}",
            "PUSHBRIDGE_REGISTRY__REDIS_URL": redis_url,
            "PUSHBRIDGE_INTAKE__DURABLE": "true",
            "PUSHBRIDGE_INTAKE__CONSUMER": name,
            "PUSHBRIDGE_INTAKE__CLAIM_IDLE_MS": str(claim_idle_ms),
            "PUSHBRIDGE_MQTT__MAX_QUEUED": "1000000",
            "PUSHBRIDGE_APNS__CONFIG": "/nonexistent/config.json",
            "PUSHBRIDGE_LOG__LEVEL": "warn",
        })
        self.log = open(os.path.join(logdir, f"{name}.log"), "w")
        self.proc = subprocess.Popen(
            [binary, "serve", "--config", "/nonexistent/setting.toml"],
            env=env, stdout=self.log, stderr=subprocess.STDOUT)
        wait_for(f"{name} ready", lambda: http_get(self.http, "/readyz")[0] == 200, 30)
        self.out = os.path.join(logdir, f"sub-{name}.txt")
        self.sub = subprocess.Popen(
            ["mosquitto_sub", "-h", "127.0.0.1", "-p", str(self.mqtt), "-q", "1",
             "-i", f"sub-{name}"]
            + [a for u in range(1, USERS + 1) for a in ("-t", f"push/user/{u}")],
            stdout=open(self.out, "w"), stderr=subprocess.DEVNULL)
        wait_for(f"{name} subscriber", lambda: self.stat("mqtt_connects") >= 1, 10)

    def stat(self, name):
        status, body = http_get(self.http, "/v1/stats")
        return json.loads(body)["totals"].get(name, 0) if status == 200 else -1

    def stop(self):
        for p in (self.sub, self.proc):
            if p.poll() is None:
                p.terminate()
                try:
                    p.wait(15)
                except subprocess.TimeoutExpired:
                    p.kill()


def send(port, numbers, burst, on_accept):
    """Sends `numbers` in pipelined bursts; returns those not answered 0x00
    (the connection died, or a non-zero status)."""
    sock = socket.create_connection(("127.0.0.1", port))
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    left = []
    i = 0
    try:
        while i < len(numbers):
            chunk = numbers[i:i + burst]
            sock.sendall(b"".join(frame(n) for n in chunk))
            got = b""
            while len(got) < len(chunk):
                data = sock.recv(len(chunk) - len(got))
                if not data:
                    raise OSError("connection closed")
                got += data
            for n, status in zip(chunk, got):
                if status == 0:
                    on_accept(n)
                else:
                    left.append(n)
            i += len(chunk)
    except OSError:
        left.extend(numbers[i:])
    finally:
        sock.close()
    return left


def delivered(instances):
    seen, lines = set(), 0
    for inst in instances:
        with open(inst.out) as f:
            for line in f:
                line = line.strip()
                if line.endswith("}"):
                    try:
                        seen.add(json.loads(line)["n"])
                        lines += 1
                    except ValueError:
                        pass
    return seen, lines


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bin", default="target/debug/pushbridge")
    ap.add_argument("--pushes", type=int, default=100_000)
    ap.add_argument("--burst", type=int, default=500)
    ap.add_argument("--claim-idle-ms", type=int, default=2000)
    ap.add_argument("--fsync", default="always", choices=["always", "everysec"])
    ap.add_argument("--wait", type=int, default=300, help="seconds to wait for delivery")
    args = ap.parse_args()

    tmp = tempfile.mkdtemp(prefix="pushbridge-faults-")
    rport = free_port()
    redis = subprocess.Popen(
        ["redis-server", "--port", str(rport), "--bind", "127.0.0.1", "--save", "",
         "--appendonly", "yes", "--appendfsync", args.fsync, "--dir", tmp],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"redis://127.0.0.1:{rport}/"
    instances = []
    try:
        time.sleep(0.3)
        a = Instance("a", args.bin, url, args.claim_idle_ms, tmp)
        b = Instance("b", args.bin, url, args.claim_idle_ms, tmp)
        instances = [a, b]
        accepted = set()
        lock = threading.Lock()

        def accept(n):
            with lock:
                accepted.add(n)

        share_a = list(range(0, args.pushes, 2))
        share_b = list(range(1, args.pushes, 2))
        a_accepted = [0]

        def accept_a(n):
            accept(n)
            a_accepted[0] += 1

        def killer():
            while a_accepted[0] < len(share_a) // 4:
                time.sleep(0.01)
            a.proc.send_signal(signal.SIGKILL)
            print(f"faults: kill -9 instance a after {a_accepted[0]} pushes accepted by it", flush=True)

        started = time.monotonic()
        kt = threading.Thread(target=killer, daemon=True)
        kt.start()
        rest = []
        ta = threading.Thread(target=lambda: rest.extend(send(a.proxy, share_a, args.burst, accept_a)))
        ta.start()
        left_b = send(b.proxy, share_b, args.burst, accept)
        ta.join()
        kt.join(5)
        left = send(b.proxy, rest + left_b, args.burst, accept)
        sent_for = time.monotonic() - started
        print(f"faults: {len(accepted)} of {args.pushes} pushes accepted in {sent_for:.1f} s "
              f"({len(rest)} resent to b, {len(left)} never accepted)", flush=True)

        deadline = time.monotonic() + args.wait
        while True:
            seen, lines = delivered(instances)
            missing = accepted - seen
            if not missing or time.monotonic() > deadline:
                break
            time.sleep(1)
        def redis_cli(*cmd):
            return subprocess.run(["redis-cli", "-p", str(rport), *cmd],
                                  capture_output=True, text=True).stdout.split()
        # Pending entries left, and undelivered entries left in the stream.
        pending = redis_cli("XPENDING", "pushbridge:intake", "pushbridge")[0]
        stream_len = redis_cli("XLEN", "pushbridge:intake")[0]
        print("| pushes sent | accepted (0x00) | delivered (distinct) | duplicates | missing "
              "| claimed by b | acked by b | left in stream / pending | time |")
        print("|---|---|---|---|---|---|---|---|---|")
        print(f"| {args.pushes} | {len(accepted)} | {len(seen & accepted)} | {lines - len(seen)} "
              f"| {len(missing)} | {b.stat('intake_claimed')} | {b.stat('intake_acked')} "
              f"| {stream_len} / {pending} | {time.monotonic() - started:.1f} s |")
        if missing:
            print(f"faults: missing, first ones: {sorted(missing)[:20]}")
            if stream_len == "0" and pending == "0":
                print("faults: every stream entry was acknowledged: the missing pushes were "
                      "handed to a's embedded broker (its session queues, in memory) and died "
                      "with it; with an external broker (mqtt.external_url) they are not lost")
            return 1
        return 0
    finally:
        for inst in instances:
            inst.stop()
        redis.terminate()
        redis.wait()


if __name__ == "__main__":
    sys.exit(main())
