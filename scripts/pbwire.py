"""What the long-running scripts (faults.py, soak.py, hostile_soak.py)
share: a free loopback port, waiting for a server's port, and the bits of
msgpack a push frame needs, written by hand so the scripts need nothing
beyond Python."""

import socket
import struct
import time


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def wait_port(port, proc, timeout=20):
    """Until `port` on loopback accepts; raises if `proc` exits first."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"port {port} not listening after {timeout}s")


def print_log_tail(path, n=5):
    """The last `n` lines of a server's log, as report comments."""
    lines = open(path, "rb").read().decode(errors="replace").splitlines()
    if lines:
        print(f"# server log: {len(lines)} lines; last {n}:")
        for line in lines[-n:]:
            print(f"#  {line[:300]}")


def mp_uint(n):
    if n < 0x80:
        return bytes([n])
    if n < 0x100:
        return b"\xcc" + bytes([n])
    if n < 0x10000:
        return b"\xcd" + struct.pack(">H", n)
    if n < 0x100000000:
        return b"\xce" + struct.pack(">I", n)
    return b"\xcf" + struct.pack(">Q", n)


def mp_str(s):
    b = s.encode()
    assert len(b) < 32
    return bytes([0xA0 | len(b)]) + b
