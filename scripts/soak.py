#!/usr/bin/env python3
"""Memory soak: flood the proxy with pushes to iOS users while APNs is unreachable.

Starts `pushbridge serve` on loopback with APNs pointed at a port where nothing
listens, registers users 1..N as iOS (token auth, app com.example.app), floods
the proxy over several pipelined TCP connections for a fixed time, and every
few seconds samples the server's RSS/CPU and /v1/stats. Prints a table and a
verdict (RSS at minute 2 vs at the end). Standard library only.

    scripts/soak.py --bin target/release/pushbridge --duration 540
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

from pbwire import free_port, mp_str, mp_uint, print_log_tail, wait_port

COUNTERS = [
    "pushes_accepted",
    "apns_queued",
    "apns_retried",
    "apns_retries_exhausted",
    "apns_failed",
    "apns_queue_dropped",
    "apns_delivered",
    "frames_rejected",
]
SHORT = {
    "pushes_accepted": "accepted",
    "apns_queued": "queued",
    "apns_retried": "retried",
    "apns_retries_exhausted": "exhausted",
    "apns_failed": "failed",
    "apns_queue_dropped": "qdropped",
    "apns_delivered": "delivered",
    "frames_rejected": "rejected",
}


# --- msgpack, by hand -------------------------------------------------------

PREFIX_MAP = b"\x82" + mp_str("alert") + mp_str("hi") + mp_str("n")


def frame(uid, i):
    """4-byte BE length + msgpack [2, uid, {"alert": "hi", "n": i}]."""
    body = b"\x93\x02" + mp_uint(uid) + PREFIX_MAP + mp_uint(i)
    return struct.pack(">I", len(body)) + body


# --- the flood --------------------------------------------------------------

class Conn:
    """One proxy connection: a writer thread (pipelined, bounded window) and a
    reader thread counting status bytes."""

    def __init__(self, addr, idx, users, window, batch, deadline, max_count, stop):
        self.sock = socket.create_connection(addr)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.idx = idx
        self.users = users
        self.batch = batch
        self.deadline = deadline
        self.max_count = max_count
        self.stop = stop
        self.window = threading.Semaphore(window)
        self.sent = 0
        self.replies = 0
        self.accepted = 0
        self.other = {}  # status byte -> count
        self.error = None
        self.writer_done = threading.Event()
        self.last_reply = time.monotonic()
        self.max_gap = 0.0  # longest wait between two reply reads (stall detector)

    def write_loop(self):
        i = self.idx
        try:
            while not self.stop.is_set() and time.monotonic() < self.deadline and self.sent < self.max_count:
                n = min(self.batch, self.max_count - self.sent)
                got = 0
                while got < n:
                    if self.window.acquire(timeout=0.5):
                        got += 1
                    else:
                        break  # send what we have; re-check the deadline
                if got == 0:
                    continue
                buf = bytearray()
                for _ in range(got):
                    uid = (i % self.users) + 1
                    buf += frame(uid, i)
                    i += 4
                self.sock.sendall(buf)
                self.sent += got
        except OSError as e:
            self.error = f"write: {e}"
        finally:
            self.writer_done.set()

    def read_loop(self):
        self.sock.settimeout(1.0)
        try:
            while True:
                if self.writer_done.is_set() and self.replies >= self.sent:
                    break
                try:
                    data = self.sock.recv(65536)
                except socket.timeout:
                    now = time.monotonic()
                    self.max_gap = max(self.max_gap, now - self.last_reply)
                    if self.writer_done.is_set() and now - self.last_reply > 30:
                        self.error = f"no reply for 30 s with {self.sent - self.replies} outstanding"
                        break
                    continue
                if not data:
                    if self.replies < self.sent:
                        self.error = "server closed the connection"
                    break
                now = time.monotonic()
                self.max_gap = max(self.max_gap, now - self.last_reply)
                self.last_reply = now
                z = data.count(0)
                self.accepted += z
                if z != len(data):
                    for b in data:
                        if b:
                            self.other[b] = self.other.get(b, 0) + 1
                self.replies += len(data)
                self.window.release(len(data))
        except OSError as e:
            self.error = f"read: {e}"

    def start(self):
        self.tw = threading.Thread(target=self.write_loop, daemon=True)
        self.tr = threading.Thread(target=self.read_loop, daemon=True)
        self.tw.start()
        self.tr.start()

    def join(self, timeout):
        self.tw.join(timeout)
        self.tr.join(timeout)
        try:
            self.sock.close()
        except OSError:
            pass


# --- sampling ---------------------------------------------------------------

CLK = os.sysconf("SC_CLK_TCK")


def rss_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def cpu_ticks(pid):
    with open(f"/proc/{pid}/stat") as f:
        rest = f.read().rsplit(")", 1)[1].split()
    # fields after ")" start at field 3 (state); utime=14, stime=15
    return int(rest[11]) + int(rest[12])


def threads(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("Threads:"):
                return int(line.split()[1])
    return 0


def fds(pid):
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return -1


def get_stats(http):
    with urllib.request.urlopen(f"http://{http}/v1/stats", timeout=5) as r:
        return json.load(r)["totals"]


def http_put(url, body):
    req = urllib.request.Request(url, data=json.dumps(body).encode(), method="PUT",
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=5) as r:
        return r.status


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bin", default="target/release/pushbridge")
    ap.add_argument("--duration", type=float, default=540, help="flood seconds (default 540)")
    ap.add_argument("--max-count", type=int, default=50_000_000, help="most pushes in total")
    ap.add_argument("--conns", type=int, default=4)
    ap.add_argument("--users", type=int, default=1000)
    ap.add_argument("--window", type=int, default=4096, help="unanswered frames per connection")
    ap.add_argument("--batch", type=int, default=256, help="frames per write")
    ap.add_argument("--interval", type=float, default=10)
    ap.add_argument("--baseline-at", type=float, default=120, help="seconds: RSS baseline for the verdict")
    ap.add_argument("--tolerance", type=float, default=0.10)
    ap.add_argument("--queue-full", choices=["wait", "drop"], default=None,
                    help="apns.queue_full (default: the server's default)")
    ap.add_argument("--keep", action="store_true", help="keep the temp dir")
    args = ap.parse_args()

    binary = os.path.abspath(args.bin)
    tmp = tempfile.mkdtemp(prefix="pushbridge-soak-")
    proxy, mqtt, http_p, dead = free_port(), free_port(), free_port(), free_port()
    http = f"127.0.0.1:{http_p}"
    subprocess.run(["openssl", "genpkey", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256",
                    "-out", os.path.join(tmp, "AuthKey_K1.p8")], check=True, capture_output=True)
    with open(os.path.join(tmp, "config.json"), "w") as f:
        json.dump({"com.example.app": {"key": "AuthKey_K1.p8", "key_id": "K1", "team_id": "T1"}}, f)
    qf = f'queue_full = "{args.queue_full}"\n' if args.queue_full else ""
    with open(os.path.join(tmp, "setting.toml"), "w") as f:
        f.write(f"""[proxy]
listen = "127.0.0.1:{proxy}"

[mqtt]
listen = "127.0.0.1:{mqtt}"

[http]
listen = "{http}"

[apns]
config = "{tmp}/config.json"
production_url = "https://127.0.0.1:{dead}"
sandbox_url = "https://127.0.0.1:{dead}"
retry_base_ms = 50
retry_max_secs = 5
{qf}
[log]
level = "warn"
""")
    log = open(os.path.join(tmp, "server.log"), "wb")
    cmd = [binary, "serve", "--config", os.path.join(tmp, "setting.toml")]
    print(f"# tmp: {tmp}\n# server: {' '.join(cmd)}\n# apns -> https://127.0.0.1:{dead} (nothing listens)", flush=True)
    srv = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT)
    pid = srv.pid
    stop = threading.Event()
    conns = []
    rc = 1
    try:
        wait_port(http_p, srv)
        wait_port(proxy, srv)
        for uid in range(1, args.users + 1):
            token = f"{uid:064x}"
            st = http_put(f"http://{http}/v1/users/{uid}",
                          {"token": token, "ident": "com.example.app", "version": "produce"})
            if st != 204:
                raise RuntimeError(f"PUT /v1/users/{uid} -> {st}")
        print(f"# registered {args.users} iOS users; pid {pid}; rss {rss_kib(pid) / 1024:.1f} MiB", flush=True)

        t0 = time.monotonic()
        deadline = t0 + args.duration
        per = args.max_count // args.conns
        for k in range(args.conns):
            c = Conn(("127.0.0.1", proxy), k, args.users, args.window, args.batch, deadline, per, stop)
            conns.append(c)
        for c in conns:
            c.start()

        cols = ["t_s", "rss_MiB", "cpu%", "thr", "fds", "sent", "acc_flood", "rate/s"] + [SHORT[c] for c in COUNTERS]
        print("  ".join(f"{c:>10}" for c in cols), flush=True)
        samples = []
        last_t, last_ticks, last_acc = t0, cpu_ticks(pid), 0

        def sample():
            nonlocal last_t, last_ticks, last_acc
            now = time.monotonic()
            ticks = cpu_ticks(pid)
            cpu = 100.0 * (ticks - last_ticks) / CLK / max(now - last_t, 1e-6)
            acc = sum(c.accepted for c in conns)
            rate = (acc - last_acc) / max(now - last_t, 1e-6)
            last_t, last_ticks, last_acc = now, ticks, acc
            try:
                st = get_stats(http)
            except Exception as e:  # noqa: BLE001
                st = {}
                print(f"# stats error: {e}", flush=True)
            row = {"t": now - t0, "rss": rss_kib(pid) / 1024, "cpu": cpu, "thr": threads(pid), "fds": fds(pid),
                   "sent": sum(c.sent for c in conns), "acc": acc, "rate": rate, "stats": st}
            samples.append(row)
            vals = [f"{row['t']:.0f}", f"{row['rss']:.1f}", f"{cpu:.0f}", str(row["thr"]), str(row["fds"]),
                    str(row["sent"]), str(acc), f"{rate:.0f}"] + [str(st.get(c, "?")) for c in COUNTERS]
            print("  ".join(f"{v:>10}" for v in vals), flush=True)

        next_t = t0 + args.interval
        while time.monotonic() < deadline:
            if srv.poll() is not None:
                raise RuntimeError(f"server exited with {srv.returncode} during the flood")
            time.sleep(max(0.0, min(next_t, deadline) - time.monotonic()))
            if time.monotonic() >= next_t - 0.01:
                sample()
                next_t += args.interval
        stop.set()
        for c in conns:
            c.join(40)
        sample()
        # let retries drain: queues should empty within retry_max_secs plus slack
        time.sleep(8)
        sample()

        print("\n# per connection:")
        for c in conns:
            print(f"#  conn {c.idx}: sent {c.sent} replies {c.replies} accepted {c.accepted} "
                  f"other {c.other} longest reply gap {c.max_gap:.2f}s error {c.error}")
        print("# final /v1/stats totals (non-zero):")
        for k, v in sorted(samples[-1]["stats"].items()):
            if v:
                print(f"#  {k} = {v}")

        flood_rows = [r for r in samples if r["t"] <= args.duration + 0.5]
        if not flood_rows:
            sys.exit(f"no sample within the {args.duration} s flood: "
                     f"use a --duration of at least --interval ({args.interval} s)")
        # Within the flood, so a run shorter than --baseline-at still has a verdict.
        base = min(flood_rows, key=lambda r: abs(r["t"] - args.baseline_at))
        end = flood_rows[-1]
        peak = max(samples, key=lambda r: r["rss"])
        growth = (end["rss"] - base["rss"]) / base["rss"]
        later = [r for r in flood_rows if r["t"] >= base["t"]]
        # slope over the second half of the flood, MiB per minute
        half = [r for r in flood_rows if r["t"] >= args.duration / 2]
        slope = 0.0
        if len(half) >= 2:
            n = len(half)
            mt = sum(r["t"] for r in half) / n
            mr = sum(r["rss"] for r in half) / n
            den = sum((r["t"] - mt) ** 2 for r in half)
            slope = 60 * sum((r["t"] - mt) * (r["rss"] - mr) for r in half) / den if den else 0.0
        print(f"\n# RSS at t={base['t']:.0f}s: {base['rss']:.1f} MiB; at end of flood t={end['t']:.0f}s: "
              f"{end['rss']:.1f} MiB ({growth * 100:+.1f} %); range after baseline "
              f"{min(r['rss'] for r in later):.1f}..{max(r['rss'] for r in later):.1f} MiB; "
              f"peak {peak['rss']:.1f} MiB at t={peak['t']:.0f}s; second-half slope {slope:+.2f} MiB/min; "
              f"after drain {samples[-1]['rss']:.1f} MiB")
        flat = abs(growth) <= args.tolerance
        print(f"# VERDICT: {'FLAT' if flat else 'NOT FLAT'} (tolerance {args.tolerance * 100:.0f} %)", flush=True)
        rc = 0 if flat else 2
    finally:
        stop.set()
        for c in conns:
            try:
                c.sock.close()
            except OSError:
                pass
        if srv.poll() is None:
            os.kill(pid, signal.SIGTERM)
            try:
                srv.wait(20)
                print(f"# server stopped (SIGTERM), exit {srv.returncode}")
            except subprocess.TimeoutExpired:
                os.kill(pid, signal.SIGKILL)
                srv.wait()
                print("# server did not stop within 20 s of SIGTERM; killed")
        log.close()
        print_log_tail(os.path.join(tmp, "server.log"))
        if args.keep:
            print(f"# kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    return rc


if __name__ == "__main__":
    sys.exit(main())
