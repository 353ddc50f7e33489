"""A backend client for pushbridge's proxy: `Client(host, port)(type, id, data)`.

Fire-and-forget, as the old service's clients: a call queues one frame and
returns at once. A background thread connects (reconnecting with exponential
backoff), writes the frames, and a reader thread per connection matches each
status byte the server answers to the oldest frame still waiting for one.
Frames written but not answered when a connection dies are sent again on the
next connection (at least once: the server may see such a frame twice).
"""

import socket
import struct
import threading
from collections import deque
from dataclasses import dataclass, field

import msgpack

__all__ = ["Client", "Stats", "GROUP", "USER", "USERS"]

GROUP, USER, USERS = 1, 2, 3
ACCEPTED = 0x00
# Not accepted, but not the frame's fault: send it again.
_RETRY = (0x08, 0x09)  # shutting down; durable intake stream unreachable
_KEEPALIVE = b"\x00\x00\x00\x00"


@dataclass
class Stats:
    """A snapshot of the counters (`Client.stats()`)."""

    accepted: int = 0
    refused: dict = field(default_factory=dict)  # status byte -> frames
    dropped: int = 0  # oldest frames dropped from a full buffer
    resent: int = 0  # frames sent again (connection lost, 0x08, 0x09)
    reconnects: int = 0  # connections opened after the first
    pending: int = 0  # frames waiting to be written
    in_flight: int = 0  # frames written, status byte not yet read
    connected: bool = False


class Client:
    """Sends pushes to the proxy at (host, port) from a background thread.

    max_buffer: frames kept while they cannot be written (disconnected, or
      max_in_flight already waiting for their status); when it is full the
      oldest is dropped and counted in `dropped`.
    max_in_flight: frames written and not yet answered, per connection.
    backoff / backoff_max: first reconnect delay in seconds, doubled per
      failed attempt up to backoff_max; reset by an accepted frame.
    keepalive: seconds of silence before an empty keep-alive frame (None: off).
    """

    def __init__(self, host="127.0.0.1", port=7100, *, max_buffer=10000,
                 max_in_flight=1000, connect_timeout=5.0, backoff=0.1,
                 backoff_max=5.0, keepalive=60.0):
        self.addr = (host, port)
        self.max_buffer = max_buffer
        self.max_in_flight = max_in_flight
        self.connect_timeout = connect_timeout
        self.backoff, self.backoff_max = backoff, backoff_max
        self.keepalive = keepalive
        self._cond = threading.Condition()
        self._pending = deque()
        self._unacked = deque()
        self._stats = Stats()
        self._connections = 0
        self._gen = 0  # bumped when a connection dies; stale readers stop
        self._sock = None
        self._closed = False
        self._thread = threading.Thread(target=self._run, daemon=True,
                                        name=f"pushbridge-client-{host}:{port}")
        self._thread.start()

    # -- the caller's side ------------------------------------------------

    def __call__(self, type, id, data):
        """Queues `[type, id, data]`; never waits for the network."""
        body = msgpack.packb([type, id, data], use_bin_type=True)
        frame = struct.pack(">I", len(body)) + body
        with self._cond:
            if self._closed:
                raise RuntimeError("pushbridge client is closed")
            self._pending.append(frame)
            self._trim()
            self._cond.notify_all()

    def to_user(self, user_id, data):
        self(USER, user_id, data)

    def to_users(self, user_ids, data):
        self(USERS, list(user_ids), data)

    def to_group(self, group_id, data):
        self(GROUP, group_id, data)

    def stats(self):
        with self._cond:
            s = self._stats
            return Stats(s.accepted, dict(s.refused), s.dropped, s.resent,
                         s.reconnects, len(self._pending), len(self._unacked),
                         self._sock is not None)

    def flush(self, timeout=None):
        """Waits until every frame is answered; False if `timeout` ran out."""
        with self._cond:
            return self._cond.wait_for(
                lambda: not self._pending and not self._unacked, timeout)

    def close(self, timeout=5.0):
        """Flushes for at most `timeout` seconds, then stops; True if all
        frames were answered. Frames still held are lost (see stats())."""
        flushed = self.flush(timeout)
        with self._cond:
            self._closed = True
            self._drop_connection()
            self._cond.notify_all()
        self._thread.join()
        return flushed

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # -- the background side ----------------------------------------------

    def _trim(self):
        while len(self._pending) > self.max_buffer:
            self._pending.popleft()
            self._stats.dropped += 1

    def _drop_connection(self):
        """Under the lock: the connection is gone; unanswered frames go back
        to the front of the queue, oldest first."""
        if self._sock is None:
            return
        self._gen += 1
        try:  # wakes both threads; the writer closes it once the reader is out
            self._sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self._sock = None
        self._stats.resent += len(self._unacked)
        self._pending.extendleft(reversed(self._unacked))
        self._unacked.clear()
        self._trim()
        self._cond.notify_all()

    def _run(self):
        delay = self.backoff
        while True:
            with self._cond:
                if self._closed:
                    return
            try:
                sock = socket.create_connection(self.addr, self.connect_timeout)
            except OSError:
                with self._cond:
                    self._cond.wait_for(lambda: self._closed, delay)
                delay = min(delay * 2, self.backoff_max)
                continue
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.settimeout(None)
            with self._cond:
                if self._closed:
                    sock.close()
                    return
                self._sock, gen = sock, self._gen
                self._stats.reconnects += self._connections > 0
                self._connections += 1
            reader = threading.Thread(target=self._read, args=(sock, gen), daemon=True)
            reader.start()
            accepted = self._write(sock, gen)
            reader.join()
            sock.close()
            if accepted:  # the connection worked: reconnect at once
                delay = self.backoff
            else:
                with self._cond:
                    self._cond.wait_for(lambda: self._closed, delay)
                delay = min(delay * 2, self.backoff_max)

    def _write(self, sock, gen):
        """Writes frames until the connection dies or the client closes;
        True if any frame was accepted on it."""
        accepted_before = self._stats.accepted
        while True:
            with self._cond:
                ready = lambda: (self._gen != gen or self._closed or (
                    self._pending and len(self._unacked) < self.max_in_flight))
                if not self._cond.wait_for(ready, self.keepalive):
                    batch = [_KEEPALIVE]
                elif self._gen != gen or self._closed:
                    return self._stats.accepted > accepted_before
                else:
                    room = self.max_in_flight - len(self._unacked)
                    batch = [self._pending.popleft()
                             for _ in range(min(room, len(self._pending)))]
                    self._unacked.extend(batch)
            try:
                sock.sendall(b"".join(batch))
            except OSError:
                with self._cond:
                    if self._gen == gen:
                        self._drop_connection()

    def _read(self, sock, gen):
        while True:
            try:
                answer = sock.recv(4096)
            except OSError:
                answer = b""
            with self._cond:
                if self._gen != gen:
                    return
                if not answer:
                    self._drop_connection()
                    return
                for byte in answer:
                    frame = self._unacked.popleft() if self._unacked else None
                    if byte == ACCEPTED:
                        self._stats.accepted += 1
                        continue
                    self._stats.refused[byte] = self._stats.refused.get(byte, 0) + 1
                    if frame is None or byte not in _RETRY:
                        continue
                    if byte == 0x08:  # the server closes now: re-sent first, in order
                        self._unacked.appendleft(frame)
                    else:
                        self._pending.appendleft(frame)
                        self._stats.resent += 1
                self._cond.notify_all()
