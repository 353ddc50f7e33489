#!/usr/bin/env python3
"""Fault runs: two pushbridge instances, nothing accepted may be lost.

Each scenario starts a fresh setup on loopback: a Redis Cluster of three
redis-server nodes (appendonly), Mosquitto as the external broker (with
persistence), nghttpd answering 200 as APNs for one device token, and two
`pushbridge serve` instances with durable intake reading one stream in one
consumer group. A backend floods both instances with pipelined frames; when a
third of them are accepted the fault is injected; then the run waits until
every accepted push is accounted for (or nothing moves for --settle seconds).

  redis   all three Redis nodes stop for 5 s, then restart (readyz must go 503)
  broker  Mosquitto stops for 3 s, then restarts (the outbox re-publishes)
  apns    the APNs server is down for 5 s (retries, then counted drops)
  kill    instance A is killed with SIGKILL; B claims its pending entries
  rabbitmq  the broker is a two-node RabbitMQ cluster (Debian's
          rabbitmq-server with its MQTT plugin; three nodes, see
          RabbitCluster) instead of Mosquitto; the
          subscriber is on node B, pushbridge's mqtt.external_url lists node
          A then node B; node A is stopped (rabbitmqctl stop) while pushes
          flow. Afterwards a status message on node B must set app_focus and
          a killed app's last will must clear it.

Counted: accepted (status 0x00), delivered (distinct pushes seen by an MQTT
subscriber on the broker, or APNs 200s), duplicates, counted final failures,
lost = accepted - delivered - failures. Exit status 1 if anything is lost.
Standard library only.

    scripts/faults.py --bin target/release/pushbridge --pushes 100000
"""

import argparse
import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

from pbwire import free_port, mp_str, mp_uint

APP = "com.example.app"
TOKEN = "ab" * 32
MQTT_USERS = 1000
IOS_USERS = 100


def cluster_port():
    """A free port whose cluster bus port (+10000) is free too."""
    import random
    while True:
        port = random.randint(20000, 55000)
        try:
            for p in (port, port + 10000):
                s = socket.socket()
                s.bind(("127.0.0.1", p))
                s.close()
            return port
        except OSError:
            continue


def wait_for(cond, what, timeout=30.0):
    deadline = time.time() + timeout
    while not cond():
        if time.time() > deadline:
            raise SystemExit(f"timed out waiting for {what}")
        time.sleep(0.05)


def port_open(port):
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
        return True
    except OSError:
        return False


# --- msgpack, by hand: [2, uid, {"n": i} | {"alert": "x", "n": i}] ------------

def frame(uid, n, alert):
    if alert:
        data = b"\x82" + mp_str("alert") + mp_str("x") + mp_str("n") + mp_uint(n)
    else:
        data = b"\x81" + mp_str("n") + mp_uint(n)
    body = b"\x93" + mp_uint(2) + mp_uint(uid) + data
    return struct.pack(">I", len(body)) + body


# --- the parts ------------------------------------------------------------------

class Procs:
    """Every process started, stopped at the end."""

    def __init__(self, tmp):
        self.tmp = tmp
        self.all = []

    def start(self, name, argv, **kw):
        log = open(os.path.join(self.tmp, f"{name}.log"), "ab")
        p = subprocess.Popen(argv, stdout=kw.pop("stdout", log), stderr=log,
                             start_new_session=True, **kw)
        self.all.append(p)
        return p

    def stop_all(self):
        for p in self.all:
            if p.poll() is None:
                p.terminate()
        for p in self.all:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                pass
            try:  # its own session: whatever it left behind too (a beam)
                os.killpg(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


class RedisCluster:
    def __init__(self, procs):
        self.procs = procs
        self.ports = [cluster_port() for _ in range(3)]
        self.nodes = {}
        for port in self.ports:
            d = os.path.join(procs.tmp, f"redis-{port}")
            os.makedirs(d)
        self.start()
        addrs = [f"127.0.0.1:{p}" for p in self.ports]
        subprocess.run(["redis-cli", "--cluster", "create", *addrs,
                        "--cluster-replicas", "0", "--cluster-yes"],
                       check=True, stdout=subprocess.DEVNULL)
        self.wait_ok()

    def start(self):
        for port in self.ports:
            d = os.path.join(self.procs.tmp, f"redis-{port}")
            self.nodes[port] = self.procs.start(f"redis-{port}", [
                "redis-server", "--port", str(port), "--bind", "127.0.0.1",
                "--dir", d, "--cluster-enabled", "yes",
                "--cluster-config-file", "nodes.conf", "--appendonly", "yes",
                "--save", ""])
        for port in self.ports:
            wait_for(lambda: port_open(port), f"redis {port}")

    def stop(self):
        for p in self.nodes.values():
            p.terminate()
        for p in self.nodes.values():
            p.wait(30)

    def wait_ok(self):
        def ok():
            out = subprocess.run(["redis-cli", "-p", str(self.ports[0]), "cluster", "info"],
                                 capture_output=True, text=True).stdout
            return "cluster_state:ok" in out
        wait_for(ok, "cluster_state:ok", 60)

    def url(self):
        return "redis+cluster://" + ",".join(f"127.0.0.1:{p}" for p in self.ports)

    def cli(self, *args):
        subprocess.run(["redis-cli", "-c", "-p", str(self.ports[0]), *args],
                       check=True, stdout=subprocess.DEVNULL)


class Mosquitto:
    def __init__(self, procs):
        self.procs = procs
        self.port = free_port()
        d = os.path.join(procs.tmp, "mosquitto")
        os.makedirs(d)
        os.chmod(d, 0o777)  # mosquitto started as root drops to its own user
        self.conf = os.path.join(d, "mosquitto.conf")
        with open(self.conf, "w") as f:
            f.write(f"listener {self.port} 127.0.0.1\nallow_anonymous true\n"
                    f"persistence true\npersistence_location {d}/\n"
                    "max_queued_messages 0\nmax_inflight_messages 100\n")
        self.start()

    def external_url(self):
        return f'"mqtt://127.0.0.1:{self.port}"'

    def start(self):
        self.proc = self.procs.start("mosquitto", ["mosquitto", "-c", self.conf])
        wait_for(lambda: port_open(self.port), "mosquitto")

    def stop(self):
        self.proc.terminate()
        self.proc.wait(30)


RABBITMQ = "/usr/lib/rabbitmq/bin"


class RabbitCluster:
    """RabbitMQ nodes a, b, c (MQTT plugin, anonymous logins as guest) joined
    in one cluster on loopback: distinct node names, ports, data and log
    directories, one Erlang cookie (a shared HOME), their own epmd. Three, not two: before
    3.12 the MQTT plugin registers client ids in a Raft cluster of the
    nodes, and two nodes without one have no majority, so node B would
    refuse MQTT connections once node A stops. Persistent sessions use
    quorum queues: a classic queue lives on the node where the client first
    connected, and reconnecting elsewhere while that node is down fails
    (pushbridge's own session included)."""

    def __init__(self, procs):
        self.procs = procs
        self.home = os.path.join(procs.tmp, "rabbitmq")
        self.nodes = {}
        # Its own epmd, up before the nodes (three starting it at once race),
        # stopped with the rest.
        epmd = free_port()
        procs.start("epmd", ["epmd", "-port", str(epmd)])
        wait_for(lambda: port_open(epmd), "epmd")
        for n in ("a", "b", "c"):
            d = os.path.join(self.home, n)
            os.makedirs(d)
            port, amqp, dist = free_port(), free_port(), free_port()
            with open(os.path.join(d, "rabbitmq.conf"), "w") as f:
                f.write(f"listeners.tcp.default = {amqp}\n"
                        f"mqtt.listeners.tcp.default = {port}\n"
                        "mqtt.allow_anonymous = true\nloopback_users = none\n"
                        # Persistent sessions (pushbridge's own) in queues
                        # replicated to every node, not homed on one.
                        "mqtt.durable_queue_type = quorum\n")
            with open(os.path.join(d, "enabled_plugins"), "w") as f:
                f.write("[rabbitmq_mqtt].\n")
            self.nodes[n] = dict(name=f"pbfaults{n}@localhost", port=port, dir=d, env=dict(
                os.environ, HOME=self.home, ERL_EPMD_PORT=str(epmd),
                RABBITMQ_NODENAME=f"pbfaults{n}@localhost",
                RABBITMQ_CONFIG_FILE=os.path.join(d, "rabbitmq.conf"),
                RABBITMQ_ENABLED_PLUGINS_FILE=os.path.join(d, "enabled_plugins"),
                RABBITMQ_MNESIA_BASE=os.path.join(d, "mnesia"),
                RABBITMQ_LOG_BASE=os.path.join(d, "log"),
                RABBITMQ_PID_FILE=os.path.join(d, "pid"),
                RABBITMQ_DIST_PORT=str(dist)))
        t0 = time.time()
        for n in self.nodes:
            self.start(n)
        for n in self.nodes:
            wait_for(lambda: self.ctl(n, "await_startup", check=False) == 0,
                     f"rabbitmq node {n}", 120)
        for n in ("b", "c"):
            self.ctl(n, "stop_app")
            self.ctl(n, "join_cluster", self.nodes["a"]["name"])
            self.ctl(n, "start_app")
        self.started_secs = round(time.time() - t0, 1)
        self.port = self.nodes["b"]["port"]  # where devices (the subscriber) connect

    def start(self, n):
        node = self.nodes[n]
        node["proc"] = self.procs.start(f"rabbitmq-{n}", [f"{RABBITMQ}/rabbitmq-server"],
                                        env=node["env"])

    def ctl(self, n, *args, check=True):
        return subprocess.run([f"{RABBITMQ}/rabbitmqctl", "-n", self.nodes[n]["name"], *args],
                              env=self.nodes[n]["env"], check=check, capture_output=True,
                              timeout=120).returncode

    def external_url(self):
        ports = [self.nodes[n]["port"] for n in ("a", "b")]
        return "[" + ", ".join(f'"mqtt://127.0.0.1:{p}"' for p in ports) + "]"

    def stop(self, n):
        self.ctl(n, "stop")
        self.nodes[n]["proc"].wait(60)



class Apns:
    def __init__(self, procs):
        self.procs = procs
        self.port = free_port()
        d = os.path.join(procs.tmp, "apns")
        os.makedirs(os.path.join(d, "htdocs", "3", "device"))
        open(os.path.join(d, "htdocs", "3", "device", TOKEN), "w").close()
        self.key, self.cert = os.path.join(d, "key.pem"), os.path.join(d, "cert.pem")
        self.ca = os.path.join(d, "ca.pem")
        ext = os.path.join(d, "leaf.ext")
        with open(ext, "w") as f:
            f.write("subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\n")
        ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
        for argv in (
            ["openssl", "req", "-x509", *ec, "-keyout", os.path.join(d, "ca.key"),
             "-out", self.ca, "-days", "2", "-subj", "/CN=faults-ca"],
            ["openssl", "req", *ec, "-keyout", self.key, "-out", os.path.join(d, "leaf.csr"),
             "-subj", "/CN=127.0.0.1"],
            ["openssl", "x509", "-req", "-in", os.path.join(d, "leaf.csr"), "-CA", self.ca,
             "-CAkey", os.path.join(d, "ca.key"), "-CAcreateserial", "-out", self.cert,
             "-days", "2", "-extfile", ext],
        ):
            subprocess.run(argv, check=True, capture_output=True)
        self.p8 = os.path.join(d, "AuthKey_KEY1.p8")
        ec = subprocess.run(["openssl", "ecparam", "-genkey", "-name", "prime256v1", "-noout"],
                            check=True, capture_output=True).stdout
        p8 = subprocess.run(["openssl", "pkcs8", "-topk8", "-nocrypt"], input=ec,
                            check=True, capture_output=True).stdout
        with open(self.p8, "wb") as f:
            f.write(p8)
        self.config = os.path.join(d, "config.json")
        with open(self.config, "w") as f:
            json.dump({APP: {"key": self.p8, "key_id": "KEY1", "team_id": "TEAM1"}}, f)
        self.htdocs = os.path.join(d, "htdocs")
        self.start()

    def start(self):
        self.proc = self.procs.start("nghttpd", [
            "nghttpd", f"--htdocs={self.htdocs}", str(self.port), self.key, self.cert])
        wait_for(lambda: port_open(self.port), "nghttpd")

    def stop(self):
        self.proc.kill()
        self.proc.wait(10)


class Instance:
    def __init__(self, procs, name, binary, redis, broker, apns):
        self.procs, self.name, self.binary = procs, name, binary
        self.proxy, self.http = free_port(), free_port()
        self.conf = os.path.join(procs.tmp, f"{name}.toml")
        with open(self.conf, "w") as f:
            f.write(f"""
[proxy]
listen = "127.0.0.1:{self.proxy}"
[mqtt]
listen = "127.0.0.1:{free_port()}"
external_url = {broker.external_url()}
external_client_id = "pushbridge-{name}"
external_shared_group = "{"" if isinstance(broker, RabbitCluster) else "pushbridge"}"
[http]
listen = "127.0.0.1:{self.http}"
[registry]
redis_url = "{redis.url()}"
[intake]
durable = true
consumer = "{name}"
claim_idle_ms = 3000
[apns]
config = "{apns.config}"
production_url = "https://127.0.0.1:{apns.port}"
sandbox_url = "https://127.0.0.1:{apns.port}"
ca_file = "{apns.ca}"
[log]
level = "warn"
""")
        self.start()

    def start(self):
        self.proc = self.procs.start(f"pushbridge-{self.name}",
                                     [self.binary, "serve", "--config", self.conf])
        wait_for(lambda: port_open(self.proxy) and port_open(self.http),
                 f"pushbridge {self.name}", 60)

    def get(self, path):
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.http}{path}", timeout=2) as r:
                return r.status, r.read()
        except urllib.error.HTTPError as e:
            return e.code, e.read()
        except OSError:
            return None, b""

    def totals(self):
        status, body = self.get("/v1/stats")
        return json.loads(body)["totals"] if status == 200 else None


class Subscriber:
    """mosquitto_sub on every user topic, persistent session; counts pushes seen."""

    def __init__(self, procs, broker):
        self.seen, self.lines = set(), 0
        self.lock = threading.Lock()
        self.proc = procs.start("mosquitto_sub", [
            "stdbuf", "-oL", "mosquitto_sub", "-p", str(broker.port), "-q", "1", "-c",
            "-i", "faults-sub", "-t", "push/user/#", "-F", "%p"], stdout=subprocess.PIPE)
        threading.Thread(target=self.read, daemon=True).start()

    def read(self):
        for line in self.proc.stdout:
            try:
                n = json.loads(line)["n"]
            except (ValueError, KeyError, TypeError):
                continue
            with self.lock:
                self.lines += 1
                self.seen.add(n)

    def counts(self):
        with self.lock:
            return len(self.seen), self.lines - len(self.seen)

    def seen_of(self, wanted):
        """How many of `wanted` were seen."""
        with self.lock:
            return len(wanted & self.seen)


class Backend:
    """One pipelined proxy connection: a writer and a status reader."""

    def __init__(self, port, frames):
        self.accepted, self.answered = [], 0
        self.sock = socket.create_connection(("127.0.0.1", port))
        self.frames = frames
        self.done = threading.Event()
        threading.Thread(target=self.write, daemon=True).start()
        threading.Thread(target=self.read, daemon=True).start()

    def write(self):
        try:
            for _, data in self.frames:
                self.sock.sendall(data)
        except OSError:
            pass

    def read(self):
        f = self.sock.makefile("rb")
        try:
            while self.answered < len(self.frames):
                b = f.read(1)
                if not b:
                    break
                if b == b"\x00":
                    self.accepted.append(self.frames[self.answered][0])
                self.answered += 1
        except OSError:
            pass
        self.done.set()


# --- one scenario -----------------------------------------------------------------

def run(kind, args):
    tmp = tempfile.mkdtemp(prefix=f"faults-{kind}-")
    os.chmod(tmp, 0o755)  # mosquitto started as root drops to its own user
    procs = Procs(tmp)
    try:
        redis = RedisCluster(procs)
        broker = RabbitCluster(procs) if kind == "rabbitmq" else Mosquitto(procs)
        apns = Apns(procs)
        alert = kind == "apns"
        if alert:
            for uid in range(1, IOS_USERS + 1):
                redis.cli("HSET", f"User:{uid}", "app_token", TOKEN, "app_ident", APP,
                          "app_version", "produce")
        sub = Subscriber(procs, broker)
        a = Instance(procs, "a", args.bin, redis, broker, apns)
        b = Instance(procs, "b", args.bin, redis, broker, apns)
        users = IOS_USERS if alert else MQTT_USERS
        # The subscriber is in once it sees a push sent before the flood.
        probe = Backend(b.proxy, [(10**9 - 1, frame(999_999, 10**9 - 1, False))])
        wait_for(lambda: sub.counts()[0] == 1, "the subscriber", 30)
        frames = [(n, frame(n % users + 1, n, alert)) for n in range(args.pushes)]
        t0 = time.time()
        backends = [Backend(a.proxy, frames[0::2]), Backend(b.proxy, frames[1::2])]
        accepted = lambda: sum(len(x.accepted) for x in backends)
        wait_for(lambda: accepted() >= args.pushes // 3, "a third accepted", 120)
        fault_at = accepted()
        note = inject(kind, redis, broker, apns, a, b)
        for x in backends:
            x.done.wait(args.settle * 4)
        ok = set()
        for x in backends:
            ok.update(x.accepted)
        live = [b] if kind == "kill" else [a, b]

        def tally():
            if alert:
                t = [i.totals() or {} for i in live]
                return (sum(x.get("apns_delivered", 0) for x in t),
                        sum(x.get("apns_failed", 0) for x in t), 0)
            # Only accepted pushes count: a push the killed instance delivered
            # but never answered is seen too, and must not end the wait early.
            return sub.seen_of(ok), 0, sub.counts()[1]

        last, still = None, time.time()
        while True:
            delivered, failed, dup = tally()
            if delivered + failed >= len(ok):
                break
            if (delivered, failed) != last:
                last, still = (delivered, failed), time.time()
            elif time.time() - still > args.settle:
                break
            time.sleep(0.2)
        if not alert:
            missing = ok - sub.seen
            delivered = len(ok) - len(missing)
        secs = time.time() - t0
        lost = max(0, len(ok) - delivered - failed)
        if kind == "rabbitmq":
            note += "; " + status_and_will(procs, redis, broker, a)
        return dict(scenario=kind, accepted=len(ok), fault_at=fault_at, delivered=delivered,
                    duplicates=dup, failed=failed, lost=lost, secs=round(secs, 1), note=note)
    finally:
        procs.stop_all()
        if not args.keep:
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            print(f"kept {tmp}", file=sys.stderr)


def inject(kind, redis, broker, apns, a, b):
    if kind == "redis":
        redis.stop()
        wait_for(lambda: a.get("/readyz")[0] == 503, "readyz 503 while Redis is down", 15)
        time.sleep(5)
        redis.start()
        redis.wait_ok()
        wait_for(lambda: a.get("/readyz")[0] == 200, "readyz 200 after Redis is back", 60)
        return "readyz 503 during the outage, 200 after"
    if kind == "broker":
        broker.stop()
        time.sleep(3)
        broker.start()
        return "Mosquitto down 3 s"
    if kind == "apns":
        apns.stop()
        time.sleep(5)
        apns.start()
        return "APNs down 5 s"
    if kind == "rabbitmq":
        broker.stop("a")
        return (f"cluster up in {broker.started_secs} s; node A stopped, pushbridge on "
                f"node B ({a.totals().get('mqtt_external_connects_v311', 0)} MQTT 3.1.1 "
                "connects on instance a)")
    if kind == "kill":
        a.proc.send_signal(signal.SIGKILL)
        a.proc.wait()
        return "instance a killed (SIGKILL)"
    raise SystemExit(f"unknown scenario {kind}")


def status_and_will(procs, redis, broker, a):
    """A status message on node B sets app_focus; an app killed with a last
    will registered on node B clears it again."""
    uid = 424242
    redis.cli("HSET", f"User:{uid}", "app_version", "produce")

    def focus():
        out = subprocess.run(["redis-cli", "-c", "-p", str(redis.ports[0]), "HGET",
                              f"User:{uid}", "app_focus"], capture_output=True, text=True)
        return out.stdout.strip() not in ("", "0")

    on = json.dumps({"user_id": uid, "focus": True})
    off = json.dumps({"user_id": uid, "focus": False})
    subprocess.run(["mosquitto_pub", "-p", str(broker.port), "-q", "1", "-t",
                    "push/app/status", "-m", on], check=True)
    wait_for(focus, "app_focus set by a status message on node B", 30)
    app = procs.start("app-with-will", [
        "stdbuf", "-oL", "mosquitto_sub", "-p", str(broker.port), "-i", "faults-app",
        "-t", f"push/user/{uid}", "--will-topic", "push/app/status",
        "--will-payload", off, "--will-qos", "1"], stdout=subprocess.PIPE)
    subscribed = threading.Event()
    threading.Thread(target=lambda: app.stdout.readline() and subscribed.set(),
                     daemon=True).start()

    def hello():
        subprocess.run(["mosquitto_pub", "-p", str(broker.port), "-q", "1", "-t",
                        f"push/user/{uid}", "-m", "hello"], check=True)
        return subscribed.wait(0.5)
    wait_for(hello, "the app subscribed on node B", 30)
    app.kill()
    wait_for(lambda: not focus(), "app_focus cleared by the last will", 30)
    return "status sets focus, last will clears it"


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--bin", default="target/release/pushbridge")
    p.add_argument("--pushes", type=int, default=100_000)
    p.add_argument("--only", default="redis,broker,apns,kill,rabbitmq")
    p.add_argument("--settle", type=float, default=30.0,
                   help="give up when nothing moved for this long (s)")
    p.add_argument("--keep", action="store_true", help="keep the logs' directory")
    args = p.parse_args()
    cols = ["scenario", "accepted", "fault_at", "delivered", "duplicates", "failed", "lost",
            "secs", "note"]
    print("| " + " | ".join(cols) + " |")
    print("|" + "---|" * len(cols))
    rows = []
    for kind in args.only.split(","):
        r = run(kind, args)
        rows.append(r)
        print("| " + " | ".join(str(r[c]) for c in cols) + " |", flush=True)
    sys.exit(1 if any(r["lost"] for r in rows) else 0)


if __name__ == "__main__":
    main()
