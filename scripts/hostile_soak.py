#!/usr/bin/env python3
"""Hostile soak (issue 14, "How it is checked"): well-behaved devices receive
pushes while attackers repeat issue 14's points 1-7; RSS must stay within a
bound derived from the settings, and delivery p99 within 2x of the baseline.

Starts `pushbridge serve` on free loopback ports (embedded broker on TCP and
WebSocket, auth.mode = "none", in-memory registry, or a redis-server on a free
port with --redis). Connects --devices MQTT 3.1.1 devices (clean session, QoS 1
subscription to push/user/<i>, PUBACK for every message; 500 per source
address 127.0.1.x so that a per-IP connection cap does not apply to them), and
one backend sending --rate pushes/s through the proxy to random connected
users, each carrying its send time; devices record the delivery latency.

Phase 1 (baseline, --duration s): that load alone. Phase 2 (--duration s): the
same load while a separate attacker process (so that its CPU does not slow the
load tool's event loop) repeats, each as a loop bounded in count and time,
from its own source address 127.0.2.<n>:

  1. clean=false CONNECTs with 60 kB client ids, dropped after the answer;
  2. WebSocket upgrades then one frame declaring 8 MiB, before any CONNECT;
  3. CONNECT keep-alive 0, then 250 kB of a 256 kB PUBLISH, then silence;
  4. one connection cycling SUBSCRIBE/UNSUBSCRIBE on distinct push/user/<x>;
  5. status messages with 50 kB user_ids and ids of users with no record;
  6. proxy frames near proxy.max_frame full of msgpack nils to offline users
     (alternating with ~200 kB frames whose JSON, ~1 MB, fits the per-user
     offline bound, so the total offline bound is exercised);
  7. half-sent HTTP requests (half a head; a whole head and half a body).

The server's RSS is sampled every second from /proc/<pid>/status.

The bound (printed with its terms):

    bound = R_base + N + O + S + C + H + P
    R_base  highest RSS during the baseline (devices connected, load running)
    N       noise: 5 % of R_base, at least 2 MiB (allocator, one-second samples)
    O       offline.max_bytes: the in-memory offline store, as stored
            (0 with --redis: the store is in Redis)
    S       sessions attack 1 may leave kept offline: mqtt.max_sessions_per_user
            per source address (auth "none") x (mqtt.max_client_id_len + 4 KiB)
    C       MQTT attacker connections open at once (attacks 1-5, the script's
            concurrency) x (mqtt.max_packet_size + 4 KiB + k), where
            k = (R_base - R_idle) / devices is the measured cost of a device
            connection; a WebSocket frame is refused beyond max_packet_size + 4 KiB
    H       attack-7 connections open at once x (2 MiB body limit + k)
    P       attack-6 frames the server holds at once (2: one being read by the
            proxy, one being routed; attack 6 waits for each status byte and
            is paced) x proxy.max_frame x 118: per 1-byte nil, a 40-byte
            rmpv::Value and a 72-byte serde_json::Value (preserve_order),
            alive together while the frame is converted, and 5 bytes of
            JSON, plus the frame itself

Verdict: PASS when max RSS <= bound and phase-2 p99 <= 2 x phase-1 p99.
Exit 0 on PASS, 2 on FAIL, 1 on an error. Standard library only.

    scripts/hostile_soak.py --bin target/release/pushbridge
    scripts/hostile_soak.py --devices 2000 --duration 30 --attacks 1,2,3
"""

import argparse
import asyncio
import base64
import json
import os
import random
import resource
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from pbwire import free_port, mp_uint, print_log_tail, wait_port  # noqa: E402

KIB, MIB = 1024, 1024 * 1024
CLK = os.sysconf("SC_CLK_TCK")
STOP = {"set": False}  # SIGINT/SIGTERM seen
DEVICES_PER_IP = 500

# Settings the bound reads, with the documented defaults (docs/settings.md on
# main); the script writes the ones it changes into setting.toml.
DEFAULTS = {
    "proxy.max_frame": 1048576,
    "mqtt.max_packet_size": 262144,
    "mqtt.max_sessions_per_user": 8,
    "mqtt.max_client_id_len": 256,
    "mqtt.packet_timeout_secs": 30,
    "mqtt.max_connections_per_ip": 1000,
    "offline.max_bytes": 268435456,
    "http.header_timeout_secs": 10,
}
HTTP_MAX_BODY = 2 * MIB

# Attacker concurrency (connections each attack holds at once).
CONC = {1: 2, 2: 4, 3: 40, 4: 1, 5: 1, 6: 1, 7: 32}


# --- encoding ---------------------------------------------------------------

def mp_s(s):
    b = s.encode() if isinstance(s, str) else s
    n = len(b)
    if n < 32:
        return bytes([0xA0 | n]) + b
    if n < 256:
        return b"\xd9" + bytes([n]) + b
    if n < 65536:
        return b"\xda" + struct.pack(">H", n) + b
    return b"\xdb" + struct.pack(">I", n) + b


def push_frame(uid, seq, t):
    """[2, uid, {"t": <send time>, "s": seq}] with its 4-byte length."""
    body = b"\x93\x02" + mp_uint(uid) + b"\x82" + mp_s("t") + b"\xcb" + struct.pack(">d", t) + mp_s("s") + mp_uint(seq)
    return struct.pack(">I", len(body)) + body


def varlen(n):
    out = bytearray()
    while True:
        b = n % 128
        n //= 128
        out.append(b | 0x80 if n else b)
        if not n:
            return bytes(out)


def utf(s):
    b = s.encode() if isinstance(s, str) else s
    return struct.pack(">H", len(b)) + b


def pkt(first, body):
    return bytes([first]) + varlen(len(body)) + body


def connect_pkt(client_id, clean=True, keepalive=900):
    flags = 0x02 if clean else 0x00
    return pkt(0x10, utf("MQTT") + b"\x04" + bytes([flags]) + struct.pack(">H", keepalive) + utf(client_id))


def subscribe_pkt(pid, topic, qos=1):
    return pkt(0x82, struct.pack(">H", pid) + utf(topic) + bytes([qos]))


def unsubscribe_pkt(pid, topic):
    return pkt(0xA2, struct.pack(">H", pid) + utf(topic))


def publish_pkt(pid, topic, payload):
    return pkt(0x32, utf(topic) + struct.pack(">H", pid) + payload)


def split_packets(buf):
    """Yields (first byte, body) for every whole packet at the start of buf;
    returns how many bytes were consumed via the last StopIteration value."""
    pos = 0
    out = []
    n = len(buf)
    while pos + 2 <= n:
        mult, length, i = 1, 0, pos + 1
        while True:
            if i >= n:
                return out, pos
            b = buf[i]
            length += (b & 0x7F) * mult
            mult *= 128
            i += 1
            if not b & 0x80:
                break
        if i + length > n:
            break
        out.append((buf[pos], bytes(buf[i:i + length])))
        pos = i + length
    return out, pos


# --- /proc ------------------------------------------------------------------

def rss_kib(pid):
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def cpu_secs(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            rest = f.read().rsplit(")", 1)[1].split()
        return (int(rest[11]) + int(rest[12])) / CLK
    except OSError:
        return 0.0


def self_cpu():
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def raise_nofile():
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def pct(xs, p):
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(p * len(xs)))]


# --- the well-behaved devices -------------------------------------------------

class Device(asyncio.Protocol):
    def __init__(self, fleet, uid):
        self.fleet = fleet
        self.uid = uid
        self.buf = bytearray()
        self.tr = None
        self.ready = asyncio.get_running_loop().create_future()
        self.connected = False

    def connection_made(self, tr):
        self.tr = tr
        tr.write(connect_pkt(f"dev-{self.uid}", True, self.fleet.keepalive)
                 + subscribe_pkt(1, f"push/user/{self.uid}"))

    def data_received(self, data):
        self.buf += data
        pkts, used = split_packets(self.buf)
        if used:
            del self.buf[:used]
        now = time.time()
        acks = []
        for first, body in pkts:
            kind = first >> 4
            if kind == 3:
                tl = struct.unpack(">H", body[:2])[0]
                qos = (first >> 1) & 3
                off = 2 + tl
                if qos:
                    acks.append(b"\x40\x02" + body[off:off + 2])
                    off += 2
                self.fleet.delivered(self.uid, body[off:], now)
            elif kind == 9:
                if body[2:3] == b"\x01" and not self.ready.done():
                    self.connected = True
                    self.ready.set_result(True)
                elif not self.ready.done():
                    self.ready.set_result(False)
            elif kind == 2 and body[1:2] != b"\x00" and not self.ready.done():
                self.ready.set_result(False)
        if acks:
            self.tr.write(b"".join(acks))

    def connection_lost(self, exc):
        if self.connected and not self.fleet.closing:
            self.fleet.lost += 1
        self.connected = False
        if not self.ready.done():
            self.ready.set_result(False)


class Fleet:
    def __init__(self, n, keepalive):
        self.n = n
        self.keepalive = keepalive
        self.devices = []
        self.lat = {1: [], 2: []}  # phase -> latencies (s)
        self.phase_of = None  # send time -> phase
        self.got = 0
        self.dups = 0
        self.lost = 0
        self.seen = set()
        self.closing = False

    def delivered(self, uid, payload, now):
        try:
            d = json.loads(payload)
            t, s = d["t"], d["s"]
        except (ValueError, KeyError, TypeError):
            return
        if s in self.seen:
            self.dups += 1
            return
        self.seen.add(s)
        self.got += 1
        ph = self.phase_of(t)
        if ph:
            self.lat[ph].append(now - t)

    async def connect_all(self, port, rate):
        loop = asyncio.get_running_loop()
        sem = asyncio.Semaphore(200)

        async def one(uid):
            ip = f"127.0.1.{1 + (uid // DEVICES_PER_IP)}"
            async with sem:
                for attempt in range(5):
                    d = Device(self, uid)
                    try:
                        await loop.create_connection(lambda: d, "127.0.0.1", port, local_addr=(ip, 0))
                        ok = await asyncio.wait_for(d.ready, 30)
                    except (OSError, asyncio.TimeoutError):
                        ok = False
                    if ok:
                        return d
                    if d.tr:
                        d.tr.close()
                    await asyncio.sleep(0.5 * (attempt + 1))
                return None

        t0 = time.monotonic()
        res = await asyncio.gather(*(one(u) for u in range(self.n)))
        self.devices = [d for d in res if d]
        return time.monotonic() - t0

    async def pinger(self, stop_at):
        while time.monotonic() < stop_at:
            await asyncio.sleep(min(self.keepalive / 3, max(0.1, stop_at - time.monotonic())))
            for d in self.devices:
                if d.connected:
                    d.tr.write(b"\xc0\x00")


class Backend:
    def __init__(self):
        self.sent = 0
        self.status = {}
        self.seq = 0

    async def run(self, port, rate, users, stop_at):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

        async def read():
            while True:
                data = await reader.read(65536)
                if not data:
                    return
                for b in data:
                    self.status[b] = self.status.get(b, 0) + 1

        rt = asyncio.create_task(read())
        tick = 0.005
        start = time.monotonic()
        sent = 0
        try:
            while True:
                now = time.monotonic()
                if STOP["set"]:
                    raise asyncio.CancelledError
                if now >= stop_at:
                    break
                due = int((now - start) * rate) - sent
                if due > 0:
                    t = time.time()
                    buf = bytearray()
                    for _ in range(due):
                        uid = random.choice(users)
                        buf += push_frame(uid, self.seq, t)
                        self.seq += 1
                    writer.write(buf)
                    sent += due
                    self.sent += due
                    if writer.transport.get_write_buffer_size() > 4 * MIB:
                        await writer.drain()
                await asyncio.sleep(tick)
        finally:
            await asyncio.sleep(1)
            rt.cancel()
            writer.close()


# --- the attackers (a child process) --------------------------------------------

class Counter:
    def __init__(self):
        self.c = {}
        self.notes = []

    def add(self, k, n=1):
        self.c[k] = self.c.get(k, 0) + n


async def open_from(ip, port, limit=2 ** 20):
    return await asyncio.wait_for(
        asyncio.open_connection("127.0.0.1", port, local_addr=(ip, 0), limit=limit), 10)


async def read_packet(reader, timeout):
    first = await asyncio.wait_for(reader.readexactly(1), timeout)
    mult, length = 1, 0
    while True:
        b = (await asyncio.wait_for(reader.readexactly(1), timeout))[0]
        length += (b & 0x7F) * mult
        mult *= 128
        if not b & 0x80:
            break
    body = await asyncio.wait_for(reader.readexactly(length), timeout)
    return first[0], body


async def wait_closed(reader, hold):
    """Seconds until the server closed the connection (None: still open after hold)."""
    t0 = time.monotonic()
    try:
        while True:
            left = hold - (time.monotonic() - t0)
            if left <= 0:
                return None, b""
            data = await asyncio.wait_for(reader.read(4096), left)
            if not data:
                return time.monotonic() - t0, b""
            return await _drain_rest(reader, t0, hold, data)
    except asyncio.TimeoutError:
        return None, b""
    except OSError:
        return time.monotonic() - t0, b""


async def _drain_rest(reader, t0, hold, first):
    got = first
    try:
        while True:
            left = hold - (time.monotonic() - t0)
            if left <= 0:
                return None, got
            data = await asyncio.wait_for(reader.read(4096), left)
            if not data:
                return time.monotonic() - t0, got
            got += data
    except asyncio.TimeoutError:
        return None, got
    except OSError:
        return time.monotonic() - t0, got


def close(writer):
    try:
        writer.transport.abort()
    except Exception:  # noqa: BLE001
        pass


async def bounded(name, cfg, worker):
    """Runs worker(i) CONC[name] at a time until the deadline or max count."""
    deadline = cfg["deadline"]
    max_count = cfg["max_count"]
    n = 0
    lock = asyncio.Lock()

    async def lane():
        nonlocal n
        while time.time() < deadline:
            async with lock:
                if n >= max_count:
                    return
                i = n
                n += 1
            try:
                await worker(i)
            except (OSError, asyncio.TimeoutError, asyncio.IncompleteReadError) as e:
                cfg["counters"][name].add(f"error {type(e).__name__}")

    await asyncio.gather(*(lane() for _ in range(CONC[name])))


async def pace(rate, t0, i):
    due = t0 + i / rate
    d = due - time.monotonic()
    if d > 0:
        await asyncio.sleep(d)


async def attack1(cfg):
    c = cfg["counters"][1]
    ip, port = "127.0.2.1", cfg["mqtt"]
    t0 = time.monotonic()

    async def one(i):
        await pace(cfg["rate1"], t0, i)
        r, w = await open_from(ip, port)
        cid = f"sess{i}-".encode() + b"x" * 60000
        w.write(connect_pkt(cid, clean=False, keepalive=60))
        try:
            first, body = await read_packet(r, 5)
            if first >> 4 == 2:
                c.add("accepted (CONNACK 0)" if body[1] == 0 else f"refused (CONNACK {body[1]})")
            else:
                c.add(f"answered packet type {first >> 4}")
        except asyncio.IncompleteReadError:
            c.add("closed without CONNACK")
        except asyncio.TimeoutError:
            c.add("no answer in 5 s")
        close(w)

    await bounded(1, cfg, one)


async def attack2(cfg):
    c = cfg["counters"][2]
    ip, port = "127.0.2.2", cfg["ws"]
    declared = 8 * MIB
    chunk = os.urandom(64 * KIB)

    t0 = time.monotonic()

    async def one(i):
        await pace(cfg["rate2"], t0, i)
        r, w = await open_from(ip, port)
        key = base64.b64encode(os.urandom(16)).decode()
        w.write((f"GET /mqtt HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                 f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Protocol: mqtt\r\n\r\n").encode())
        try:
            head = await asyncio.wait_for(r.readuntil(b"\r\n\r\n"), 5)
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            c.add("upgrade: closed")
            close(w)
            return
        if b" 101 " not in head.split(b"\r\n")[0]:
            c.add(f"upgrade refused: {head.split(chr(13).encode())[0].decode(errors='replace')}")
            close(w)
            return
        w.write(b"\x82\xff" + struct.pack(">Q", declared) + os.urandom(4))
        sent, ts, closed_at = 0, time.monotonic(), None
        try:
            while sent < declared and time.monotonic() - ts < 20:
                w.write(chunk)
                sent += len(chunk)
                await asyncio.wait_for(w.drain(), max(0.1, 20 - (time.monotonic() - ts)))
                if r.at_eof():
                    break
        except (OSError, asyncio.TimeoutError):
            pass
        got = b""
        dt, got = await wait_closed(r, 3 if sent >= declared else 1)
        if dt is not None or r.at_eof():
            closed_at = sent
        if closed_at is not None and sent < declared:
            c.add("closed before the 8 MiB were written")
        elif closed_at is not None:
            c.add("closed after the whole 8 MiB")
        else:
            c.add("stalled or held (server stopped reading or kept the frame)")
        c.add("bytes written (sum MiB)", sent / MIB)
        c.notes.append(sent)
        close(w)

    await bounded(2, cfg, one)


async def attack3(cfg):
    c = cfg["counters"][3]
    ip, port = "127.0.2.3", cfg["mqtt"]
    hold = cfg["hold3"]
    size = cfg["max_packet"] - 200

    async def one(i):
        r, w = await open_from(ip, port)
        w.write(connect_pkt(f"half{i}", True, keepalive=0))
        try:
            first, body = await read_packet(r, 5)
        except (asyncio.IncompleteReadError, asyncio.TimeoutError):
            c.add("no CONNACK")
            close(w)
            return
        if first >> 4 != 2 or body[1] != 0:
            c.add(f"refused (CONNACK {body[1] if len(body) > 1 else '?'})")
            close(w)
            return
        topic = utf("push/app/status")
        body_len = size
        head = b"\x30" + varlen(body_len) + topic
        w.write(head + b"x" * (250 * KIB - len(head)))
        try:
            await asyncio.wait_for(w.drain(), 10)
        except (OSError, asyncio.TimeoutError):
            pass
        dt, _ = await wait_closed(r, hold)
        if dt is None:
            c.add(f"held open {hold:.0f} s (we closed)")
        else:
            c.add("closed by server")
            c.notes.append(round(dt, 1))
        close(w)

    await bounded(3, cfg, one)


async def attack4(cfg):
    c = cfg["counters"][4]
    r, w = await open_from("127.0.2.4", cfg["mqtt"])
    w.write(connect_pkt("cycler", True, keepalive=60))
    first, body = await read_packet(r, 5)
    if first >> 4 != 2 or body[1] != 0:
        c.add("connect refused")
        close(w)
        return
    i, t0, batch = 0, time.monotonic(), 32
    try:
        while time.time() < cfg["deadline"] and i < cfg["max_count"]:
            await pace(cfg["rate4"], t0, i)
            topics = [f"push/user/cyc{i + k}" for k in range(batch)]
            w.write(b"".join(subscribe_pkt(1 + k, t) for k, t in enumerate(topics)))
            for _ in topics:
                first, body = await read_packet(r, 10)
                c.add("SUBACK granted" if body[2] < 0x80 else "SUBACK refused")
            w.write(b"".join(unsubscribe_pkt(1 + k, t) for k, t in enumerate(topics)))
            for _ in topics:
                first, body = await read_packet(r, 10)
                c.add("UNSUBACK" if first >> 4 == 11 else f"packet type {first >> 4}")
            i += batch
    except asyncio.IncompleteReadError:
        c.add("closed by server")
    except asyncio.TimeoutError:
        c.add("no answer in 10 s")
    c.add("topics cycled", i)
    close(w)


async def attack5(cfg):
    c = cfg["counters"][5]
    r, w = await open_from("127.0.2.5", cfg["mqtt"])
    w.write(connect_pkt("status", True, keepalive=60))
    first, body = await read_packet(r, 5)
    if first >> 4 != 2 or body[1] != 0:
        c.add("connect refused")
        close(w)
        return
    big = "g" * 50000
    i, t0 = 0, time.monotonic()
    try:
        while time.time() < cfg["deadline"] and i < cfg["max_count"]:
            await pace(cfg["rate5"], t0, i)
            uid = f"{big}{i}" if i % 2 == 0 else f"ghost-{i}"
            payload = json.dumps({"user_id": uid, "focus": True}).encode()
            w.write(publish_pkt(1 + i % 60000, "push/app/status", payload))
            first, body = await read_packet(r, 5)
            c.add(("PUBACK" if first >> 4 == 4 else f"packet type {first >> 4}")
                  + (" (50 kB id)" if i % 2 == 0 else " (no-record id)"))
            i += 1
    except asyncio.IncompleteReadError:
        c.add("closed by server")
    except asyncio.TimeoutError:
        c.add("no PUBACK in 5 s (dropped)")
    close(w)
    cfg["ghosts"] = [f"ghost-{k}" for k in range(1, i, 2)][:50]


async def attack6(cfg):
    c = cfg["counters"][6]
    max_frame = cfg["max_frame"]
    r, w = await open_from("127.0.2.6", cfg["proxy"])

    def frame(uid, nils):
        head = b"\x93\x02" + mp_s(uid) + b"\x81" + mp_s("n") + b"\xdd" + struct.pack(">I", nils)
        body = head + b"\xc0" * nils
        return struct.pack(">I", len(body)) + body

    big_nils = max_frame - 64
    fit_nils = 200_000 - 2  # JSON ~1,000,000 bytes < offline.max_bytes_per_user (1 MiB)
    i, t0 = 0, time.monotonic()
    try:
        while time.time() < cfg["deadline"] and i < cfg["max_count"]:
            await pace(cfg["rate6"], t0, i)
            big = i % 2 == 0
            w.write(frame(f"offline-{i}", big_nils if big else fit_nils))
            st = (await asyncio.wait_for(r.readexactly(1), 30))[0]
            kind = "1 MiB frame" if big else "200 kB frame"
            c.add(f"status 0x{st:02x} ({kind})")
            i += 1
    except asyncio.IncompleteReadError:
        c.add("closed by server")
    except asyncio.TimeoutError:
        c.add("no status byte in 30 s")
    close(w)


async def attack7(cfg):
    c = cfg["counters"][7]
    ip, port = "127.0.2.7", cfg["http"]
    hold = cfg["hold7"]

    async def one(i):
        r, w = await open_from(ip, port)
        if i % 2 == 0:
            kind = "half head"
            w.write(b"POST /v1/push HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\nContent-Le")
        else:
            kind = "head + half body"
            w.write(b"POST /v1/push HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                    b"Content-Length: 1048576\r\n\r\n" + b" " * (512 * KIB))
        try:
            await asyncio.wait_for(w.drain(), 10)
        except (OSError, asyncio.TimeoutError):
            pass
        dt, got = await wait_closed(r, hold)
        status = got.split(b"\r\n", 1)[0].decode(errors="replace")[9:12] if got else ""
        if dt is None:
            c.add(f"{kind}: held open {hold:.0f} s (we closed)")
        else:
            c.add(f"{kind}: closed by server" + (f" with {status}" if status else ""))
            c.notes.append(round(dt, 1))
        close(w)

    await bounded(7, cfg, one)


ATTACKS = {1: attack1, 2: attack2, 3: attack3, 4: attack4, 5: attack5, 6: attack6, 7: attack7}
TITLES = {
    1: "clean=false sessions, 60 kB client ids",
    2: "WebSocket frame declaring 8 MiB before CONNECT",
    3: "keep-alive 0, 250 kB of a 256 kB PUBLISH, then silence",
    4: "SUBSCRIBE/UNSUBSCRIBE cycling on distinct user topics",
    5: "status with 50 kB user_ids and no-record ids",
    6: "proxy frames of msgpack nils to offline users",
    7: "half-sent HTTP requests",
}


def attacker_child(cfg):
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent stops this process (it also ends at its deadline)
    raise_nofile()
    cfg["counters"] = {k: Counter() for k in ATTACKS}
    t0 = time.time()

    async def run():
        tasks = []
        for k in cfg["attacks"]:
            async def guarded(k=k):
                try:
                    await ATTACKS[k](cfg)
                except Exception as e:  # noqa: BLE001 (reported, not hidden)
                    cfg["counters"][k].add(f"stopped: {type(e).__name__}: {e}")
            tasks.append(asyncio.create_task(guarded()))
        # everything bounded by the deadline; a last margin for the holds
        await asyncio.wait(tasks, timeout=cfg["deadline"] - time.time() + max(cfg["hold3"], cfg["hold7"]) + 15)
        for t in tasks:
            t.cancel()

    asyncio.run(run())
    ghosts = {}
    for g in cfg.get("ghosts", [])[:20]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{cfg['http']}/v1/users/{g}", timeout=5) as resp:
                ghosts[resp.status] = ghosts.get(resp.status, 0) + 1
        except urllib.error.HTTPError as e:
            ghosts[e.code] = ghosts.get(e.code, 0) + 1
        except OSError:
            ghosts["error"] = ghosts.get("error", 0) + 1
    for code, n in ghosts.items():
        cfg["counters"][5].add(f"GET /v1/users/<no-record id> afterwards -> {code}", n)
    out = {"cpu": self_cpu(), "wall": time.time() - t0, "counters": {}}
    for k, c in cfg["counters"].items():
        out["counters"][k] = {"c": c.c, "notes": c.notes[:100000]}
    print(json.dumps(out), flush=True)


# --- the server ---------------------------------------------------------------

_BIN = {}


def binary_knows(binary, key):
    """Whether the binary mentions a settings key (an older build lacks some)."""
    if binary not in _BIN:
        with open(binary, "rb") as f:
            _BIN[binary] = f.read()
    return key.split(".")[1].encode() in _BIN[binary]


def redis_used_memory(port):
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
            s.sendall(b"INFO memory\r\n")
            data = b""
            while b"used_memory:" not in data or not data.endswith(b"\r\n"):
                chunk = s.recv(65536)
                if not chunk:
                    break
                data += chunk
        for line in data.decode(errors="replace").splitlines():
            if line.startswith("used_memory:"):
                return int(line.split(":")[1])
    except (OSError, ValueError):
        pass
    return None


def stop_proc(proc, name, timeout=20):
    if proc is None or proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        print(f"# {name} did not stop within {timeout} s of SIGTERM; killed")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bin", default="target/release/pushbridge")
    ap.add_argument("--devices", type=int, default=10000)
    ap.add_argument("--rate", type=float, default=2000, help="pushes per second (default 2000)")
    ap.add_argument("--duration", type=float, default=120, help="seconds per phase (default 120)")
    ap.add_argument("--attacks", default="1,2,3,4,5,6,7", help="which of issue 14's points 1-7 (default all)")
    ap.add_argument("--redis", action="store_true", help="registry and offline store in a redis-server on a free port")
    ap.add_argument("--offline-max-bytes", type=int, default=64 * MIB,
                    help="offline.max_bytes for the run (default 64 MiB, to keep the bound tight)")
    ap.add_argument("--attack-max", type=int, default=200000, help="most iterations of each attack loop")
    ap.add_argument("--keep", action="store_true", help="keep the temp dir (settings, server log)")
    ap.add_argument("--attack-child", help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.attack_child:
        attacker_child(json.loads(args.attack_child))
        return 0

    nofile = raise_nofile()
    devices = min(args.devices, nofile - 500)
    if devices < args.devices:
        print(f"# RLIMIT_NOFILE {nofile}: {devices} devices instead of {args.devices}")
    attacks = sorted({int(x) for x in args.attacks.split(",") if x.strip()})
    binary = os.path.abspath(args.bin)
    tmp = tempfile.mkdtemp(prefix="pushbridge-hostile-")
    proxy, mqtt, ws, http = free_port(), free_port(), free_port(), free_port()
    settings = dict(DEFAULTS)
    settings["offline.max_bytes"] = args.offline_max_bytes
    missing = [k for k in ("mqtt.max_sessions_per_user", "mqtt.max_client_id_len", "mqtt.packet_timeout_secs",
                           "mqtt.max_connections_per_ip") if not binary_knows(binary, k)]
    srv = redis = child = None
    log = open(os.path.join(tmp, "server.log"), "wb")
    rc = 1

    def on_term(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    try:
        redis_line = ""
        if args.redis:
            rport = free_port()
            redis = subprocess.Popen(["redis-server", "--port", str(rport), "--bind", "127.0.0.1", "--save", "",
                                      "--appendonly", "no", "--dir", tmp], stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
            wait_port(rport, redis)
            redis_line = f'redis_url = "redis://127.0.0.1:{rport}/0"\n'
        with open(os.path.join(tmp, "config.json"), "w") as f:
            f.write("{}")
        with open(os.path.join(tmp, "setting.toml"), "w") as f:
            f.write(f"""[proxy]
listen = "127.0.0.1:{proxy}"

[mqtt]
listen = "127.0.0.1:{mqtt}"
ws_listen = "127.0.0.1:{ws}"

[http]
listen = "127.0.0.1:{http}"

[registry]
{redis_line}
[offline]
max_bytes = {args.offline_max_bytes}

[apns]
config = "{tmp}/config.json"

[auth]
mode = "none"

[log]
level = "warn"
""")
        cmd = [binary, "serve", "--config", os.path.join(tmp, "setting.toml")]
        print(f"# tmp: {tmp}\n# server: {' '.join(cmd)}\n# proxy {proxy}, mqtt {mqtt}, ws {ws}, http {http}"
              f"{', redis ' + str(rport) if args.redis else ''}; RLIMIT_NOFILE {nofile}", flush=True)
        if missing:
            print(f"# this binary has no {', '.join(missing)}: the bound still assumes the documented defaults")
        srv = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
        wait_port(proxy, srv)
        wait_port(mqtt, srv)
        wait_port(http, srv)
        rc = asyncio.run(drive(args, srv, devices, attacks, settings, proxy, mqtt, ws, http))
        if args.redis:
            used = redis_used_memory(rport)
            print(f"# redis-server used_memory at the end: {used / MIB if used else float('nan'):.1f} MiB "
                  "(the offline store lives there with --redis; not in the bound)")
    except (KeyboardInterrupt, asyncio.CancelledError):
        print("# interrupted", flush=True)
        rc = 130
    finally:
        stop_proc(srv, "server")
        stop_proc(redis, "redis-server")
        log.close()
        print_log_tail(os.path.join(tmp, "server.log"))
        if args.keep:
            print(f"# kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    return rc


async def drive(args, srv, ndev, attacks, settings, proxy, mqtt, ws, http):
    pid = srv.pid
    loop = asyncio.get_running_loop()
    me = asyncio.current_task()

    def on_signal():
        STOP["set"] = True  # also checked by the loops: a cancel can be lost while a subprocess starts
        me.cancel()

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_signal)
    samples = []  # (t, phase, rss_kib, server cpu s)
    phase = [0]
    stop_sampling = [False]

    async def sampler():
        while not stop_sampling[0]:
            samples.append((time.time(), phase[0], rss_kib(pid), cpu_secs(pid)))
            if srv.poll() is not None:
                return
            await asyncio.sleep(1)

    st = asyncio.create_task(sampler())
    await asyncio.sleep(1.5)
    r_idle = rss_kib(pid)
    fleet = Fleet(ndev, keepalive=900)
    bounds = {}
    fleet.phase_of = lambda t: next((p for p, (a, b) in bounds.items() if a <= t < b), 0)
    took = await fleet.connect_all(mqtt, 0)
    users = [d.uid for d in fleet.devices]
    print(f"# {len(users)}/{ndev} devices connected and subscribed in {took:.1f} s; server RSS idle "
          f"{r_idle / 1024:.1f} MiB, now {rss_kib(pid) / 1024:.1f} MiB", flush=True)
    if not users:
        raise RuntimeError("no device connected")
    ping_task = asyncio.create_task(fleet.pinger(time.monotonic() + 2 * args.duration + 120))
    backend = Backend()
    results = {}
    child = None
    try:
        for ph in (1, 2):
            if STOP["set"]:
                raise asyncio.CancelledError
            phase[0] = ph
            t_start = time.time()
            bounds[ph] = (t_start, float("inf"))
            cpu0, scpu0 = self_cpu(), cpu_secs(pid)
            sent0, got0 = backend.sent, fleet.got
            if ph == 2 and attacks:
                cfg = {"attacks": attacks, "deadline": t_start + args.duration, "max_count": args.attack_max,
                       "mqtt": mqtt, "ws": ws, "http": http, "proxy": proxy,
                       "max_packet": settings["mqtt.max_packet_size"], "max_frame": settings["proxy.max_frame"],
                       "hold3": settings["mqtt.packet_timeout_secs"] * 1.5 + 5,
                       "hold7": settings["http.header_timeout_secs"] * 2 + 2,
                       "rate1": 20, "rate2": 10, "rate4": 2000, "rate5": 50, "rate6": 4}
                child = await asyncio.create_subprocess_exec(
                    sys.executable, os.path.abspath(__file__), "--attack-child", json.dumps(cfg),
                    stdout=asyncio.subprocess.PIPE)
            print(f"# phase {ph} ({'baseline' if ph == 1 else 'under attack: ' + ','.join(map(str, attacks))}): "
                  f"{args.duration:.0f} s at {args.rate:.0f} pushes/s", flush=True)
            await backend.run(proxy, args.rate, users, time.monotonic() + args.duration)
            bounds[ph] = (t_start, time.time())
            await asyncio.sleep(2)  # last deliveries
            wall = time.time() - t_start
            child_cpu = cpu_secs(child.pid) if child else 0.0
            results[ph] = {"sent": backend.sent - sent0, "got": fleet.got - got0, "wall": wall,
                           "tool_cpu": (self_cpu() - cpu0) / wall, "server_cpu": (cpu_secs(pid) - scpu0) / wall}
            r = results[ph]
            lat = fleet.lat[ph]
            print(f"#   sent {r['sent']}, delivered {len(lat)} ({len(lat) / args.duration:.0f} msg/s), "
                  f"p50 {pct(lat, .5) * 1e3:.1f} ms, p99 {pct(lat, .99) * 1e3:.1f} ms, max {max(lat or [0]) * 1e3:.1f} ms; "
                  f"RSS max {max(s[2] for s in samples if s[1] == ph) / 1024:.1f} MiB; "
                  f"CPU: server {r['server_cpu'] * 100:.0f} %, load tool {r['tool_cpu'] * 100:.0f} %", flush=True)
        phase[0] = 3
        att = {"cpu": 0, "wall": 1, "counters": {}}
        if child:
            comm = asyncio.ensure_future(child.communicate())
            out = b""
            for _ in range(120):
                if STOP["set"]:
                    raise asyncio.CancelledError
                try:
                    out, _ = await asyncio.wait_for(asyncio.shield(comm), 1)
                    break
                except asyncio.TimeoutError:
                    pass
            try:
                att = json.loads(out.decode().strip().splitlines()[-1])
            except (ValueError, IndexError):
                print("# attacker process gave no results")
            child = None
        await asyncio.sleep(5)  # settle after the attackers stopped
    finally:
        ping_task.cancel()
        stop_sampling[0] = True
        if child and child.returncode is None:
            child.kill()
            await child.wait()
        fleet.closing = True
        for d in fleet.devices:
            if d.tr:
                d.tr.abort()
    await asyncio.sleep(1.2)
    samples.append((time.time(), 3, rss_kib(pid), cpu_secs(pid)))

    # --- report ---
    base_rows = [s for s in samples if s[1] == 1]
    r_base = max(s[2] for s in base_rows) * KIB
    k_conn = max(0.0, (r_base - r_idle * KIB) / max(1, len(users)))
    mqtt_conc = sum(CONC[a] for a in attacks if a in (1, 2, 3, 4, 5))
    terms = {
        "R_base": r_base,
        "N": max(2 * MIB, 0.05 * r_base),
        "O": 0 if args.redis or 6 not in attacks else settings["offline.max_bytes"],
        "S": (settings["mqtt.max_sessions_per_user"] * (settings["mqtt.max_client_id_len"] + 4 * KIB)
              if 1 in attacks else 0),
        "C": mqtt_conc * (settings["mqtt.max_packet_size"] + 4 * KIB + k_conn),
        "H": (CONC[7] * (HTTP_MAX_BODY + k_conn)) if 7 in attacks else 0,
        "P": (2 * settings["proxy.max_frame"] * 118) if 6 in attacks else 0,
    }
    bound = sum(terms.values())
    rss_all = [s[2] * KIB for s in samples]
    rss_max = max(rss_all)
    rss_end = samples[-1][2] * KIB
    print("\n# ---- results ----")
    print(f"# devices {len(users)}, rate {args.rate:.0f}/s, phases {args.duration:.0f} s; k (one device connection) "
          f"= {k_conn / KIB:.1f} KiB")
    for ph in (1, 2):
        lat = fleet.lat[ph]
        r = results[ph]
        print(f"# phase {ph} {'baseline    ' if ph == 1 else 'under attack'}: p50 {pct(lat, .5) * 1e3:7.1f} ms  "
              f"p99 {pct(lat, .99) * 1e3:7.1f} ms  max {max(lat or [0]) * 1e3:7.1f} ms  "
              f"{len(lat) / args.duration:6.0f} msg/s  (sent {r['sent']}, delivered {len(lat)}, "
              f"server CPU {r['server_cpu'] * 100:.0f} %, load tool CPU {r['tool_cpu'] * 100:.0f} %)")
    print(f"# proxy status bytes: {backend.status}; duplicates {fleet.dups}; device connections lost {fleet.lost}")
    print(f"# attacker process CPU {att['cpu'] / max(att['wall'], 1) * 100:.0f} % over {att['wall']:.0f} s")
    print(f"# RSS: idle {r_idle / 1024:.1f} MiB, baseline max {r_base / MIB:.1f} MiB, start of attack "
          f"{next((s[2] for s in samples if s[1] == 2), 0) / 1024:.1f} MiB, max {rss_max / MIB:.1f} MiB, "
          f"end (5 s after the attackers stopped) {rss_end / MIB:.1f} MiB")
    print("# RSS over phase 2 (MiB, every 5 s): " +
          " ".join(f"{s[2] / 1024:.0f}" for s in [x for x in samples if x[1] == 2][::5]))
    print("# bound = R_base + N + O + S + C + H + P = " + " + ".join(f"{terms[k] / MIB:.1f}" for k in terms) +
          f" = {bound / MIB:.1f} MiB")
    print(f"#   N = max(2 MiB, 5 % of R_base); O = offline.max_bytes; S = max_sessions_per_user {settings['mqtt.max_sessions_per_user']} x "
          f"(max_client_id_len {settings['mqtt.max_client_id_len']} + 4 KiB); C = {mqtt_conc} MQTT attacker "
          f"connections x (max_packet_size {settings['mqtt.max_packet_size']} + 4 KiB + k); H = {CONC[7]} HTTP "
          f"connections x (2 MiB + k); P = 2 x proxy.max_frame {settings['proxy.max_frame']} x 118")
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{http}/v1/stats", timeout=5) as resp:
            totals = json.load(resp)["totals"]
        print("# server counters (non-zero): " + ", ".join(f"{k} {v}" for k, v in sorted(totals.items()) if v))
    except (OSError, ValueError, KeyError) as e:
        print(f"# /v1/stats: {e}")
    print("# per attack (what the server did):")
    for a in attacks:
        c = att["counters"].get(str(a), {"c": {}, "notes": []})
        parts = [f"{k}: {v:.0f}" if isinstance(v, float) else f"{k}: {v}" for k, v in sorted(c["c"].items())]
        print(f"#  {a}. {TITLES[a]}: " + ("; ".join(parts) or "nothing"))
        notes = c["notes"]
        if a in (3, 7) and notes:
            print(f"#     closed after (s): min {min(notes)}, median {pct(notes, .5)}, max {max(notes)}")
    p99_1, p99_2 = pct(fleet.lat[1], .99), pct(fleet.lat[2], .99)
    ok_rss = rss_max <= bound
    ok_lat = p99_2 <= 2 * p99_1
    print(f"# RSS max {rss_max / MIB:.1f} MiB {'<=' if ok_rss else '>'} bound {bound / MIB:.1f} MiB: "
          f"{'ok' if ok_rss else 'FAIL'}")
    print(f"# p99 under attack {p99_2 * 1e3:.1f} ms {'<=' if ok_lat else '>'} 2 x baseline {2 * p99_1 * 1e3:.1f} ms: "
          f"{'ok' if ok_lat else 'FAIL'}")
    passed = ok_rss and ok_lat
    print(f"# VERDICT: {'PASS' if passed else 'FAIL'}", flush=True)
    st.cancel()
    return 0 if passed else 2


if __name__ == "__main__":
    sys.exit(main())
