"""The README's device commands: mosquitto_sub / mosquitto_pub over TLS
(mqtt.tls_listen, a self-signed certificate) with a JWT from
`pushbridge token` as the password and the user id as the user name."""

import queue
import subprocess
import threading

import pytest

from harness import WAIT, binary, free_port, wait_until
from pushbridge_client import Client


@pytest.fixture
def tls_server(make_server):
    """As docs/mqtt.md: paths relative to the server's working directory."""
    tls_port = free_port()
    server = make_server(
        mqtt={"tls_listen": f"127.0.0.1:{tls_port}", "tls_cert": "tls.pem", "tls_key": "tls.key"},
        auth={"mode": "jwt", "jwt_secret": "change-me"})
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
         "-nodes", "-days", "30", "-subj", "/CN=127.0.0.1",
         "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", "tls.key", "-out", "tls.pem"],
        cwd=server.dir, check=True, capture_output=True)
    server.start()
    server.cafile, server.tls_port = str(server.dir / "tls.pem"), tls_port
    return server


def token(server, user):
    out = subprocess.run([binary(), "token", "--user", str(user), "--config", str(server.config)],
                         capture_output=True, text=True, env={"RUST_BACKTRACE": "0"})
    assert out.returncode == 0, f"pushbridge token failed: {out.stderr}"
    return out.stdout.strip()


class Lines:
    """A process's output lines, read by a thread, waited for with a deadline."""

    def __init__(self, args, **kw):
        self.proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                     text=True, **kw)
        self.lines, self.seen = queue.Queue(), []
        threading.Thread(target=lambda: [self.lines.put(l.rstrip("\n")) for l in self.proc.stdout],
                         daemon=True).start()

    def until(self, pred, what):
        try:
            while True:
                line = self.lines.get(timeout=WAIT)
                self.seen.append(line)
                if pred(line):
                    return line
        except queue.Empty:
            raise AssertionError(f"no line {what} within {WAIT}s; output: {self.seen}") from None

    def end(self):
        if self.proc.poll() is None:
            self.proc.terminate()
        return self.proc.wait(timeout=WAIT)


def mosquitto(server, tool, user, password, *args):
    # stdbuf: mosquitto_sub's -d lines are block-buffered into a pipe.
    return ["stdbuf", "-oL", tool, "-h", "127.0.0.1", "-p", str(server.tls_port), "--cafile", server.cafile,
            "-u", str(user), "-P", password, *args]


def test_mosquitto_sub_over_tls_with_a_token_gets_a_push(tls_server):
    sub = Lines(mosquitto(tls_server, "mosquitto_sub", 42, token(tls_server, 42),
                          "-t", "push/user/42", "-q", "1", "-C", "1", "-d"))
    granted = sub.until(lambda l: l.startswith("Subscribed"), "'Subscribed (mid: 1): <qos>'")
    assert granted.endswith(": 1"), granted  # 128 would be a refusal
    with Client("127.0.0.1", tls_server.proxy_port) as push:
        push.to_user(42, {"n": 1})
    sub.until(lambda l: l == '{"n":1}', '{"n":1}')
    # -C 1: it leaves by itself. Not terminated: a SIGTERM while it is
    # disconnecting can deadlock mosquitto_sub's signal handler (2.0.11).
    assert sub.proc.wait(timeout=WAIT) == 0


@pytest.mark.parametrize("user, password, refusal", [
    (42, "wrong", "bad user name or password"),
    (43, None, "not authorised"),  # the token is user 42's
])
def test_mosquitto_sub_is_refused_without_its_own_token(tls_server, user, password, refusal):
    password = password or token(tls_server, 42)
    sub = Lines(mosquitto(tls_server, "mosquitto_sub", user, password, "-t", f"push/user/{user}"))
    sub.until(lambda l: refusal in l.lower(), repr(refusal))
    assert sub.end() != 0


def test_mosquitto_pub_reports_focus_over_tls(tls_server):
    presence = lambda: tls_server.get_json("/v1/users/42/presence")
    tls_server.put_json("/v1/users/42", {"version": "produce"})  # focus is kept in a record
    pub = subprocess.Popen(mosquitto(tls_server, "mosquitto_pub", 42, token(tls_server, 42),
                                     "-t", "push/app/status", "-q", "1", "-l"),
                           stdin=subprocess.PIPE, text=True)
    pub.stdin.write('{"user_id":42,"focus":true}\n')
    pub.stdin.flush()
    wait_until(lambda: presence()["focus"] is True, lambda: f"focus in {presence()}")
    pub.stdin.close()  # mosquitto_pub disconnects: the focus it set goes with it
    assert pub.wait(timeout=WAIT) == 0
    wait_until(lambda: presence()["focus"] is False, lambda: f"focus cleared in {presence()}")
