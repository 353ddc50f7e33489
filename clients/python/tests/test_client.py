"""pushbridge_client against the real server: delivery, counters,
reconnect with re-sending, the bounded buffer, and the docs' snippet."""

import re
import signal

import pytest

from harness import REPO, Device, wait_until
from pushbridge_client import Client


def client_for(server, **kw):
    kw.setdefault("backoff_max", 0.2)
    return Client("127.0.0.1", server.proxy_port, **kw)


def test_a_push_reaches_the_users_mqtt_topic(server):
    app = Device(server.mqtt_port, "app-42")
    app.connect()
    app.subscribe("push/user/42")
    app.subscribe("push/group/7")
    with client_for(server) as push:
        push(2, 42, {"n": 1})  # the old backends' call
        push.to_users([42, "43"], {"n": 2})
        push.to_group(7, {"n": 3})
        push.to_user("42", {"alert": "hi"})
    got = app.expect(4)
    assert sorted(got, key=str) == sorted([
        ("push/user/42", {"n": 1}), ("push/user/42", {"n": 2}),
        ("push/group/7", {"n": 3}), ("push/user/42", {"alert": "hi"})], key=str)
    app.disconnect()


def test_counts_accepted_and_refused_per_status_byte(server):
    push = client_for(server)
    push(2, 42, {"n": 1})
    push(9, 42, {"n": 2})  # no such type: 0x04
    push(2, "a/b", {})  # bad id: 0x05
    push(2, 42, "not a map")  # 0x06
    push(9, 1, {})
    push.to_group(1, {})
    assert push.close(timeout=10), push.stats()
    s = push.stats()
    assert (s.accepted, s.refused) == (2, {0x04: 2, 0x05: 1, 0x06: 1})
    assert (s.dropped, s.reconnects, s.pending, s.in_flight) == (0, 0, 0, 0)


def test_an_oversized_frame_is_refused_once_and_the_rest_go_on_a_new_connection(make_server):
    server = make_server(proxy={"max_frame": 64}).start()
    push = client_for(server)
    push.to_user(1, {"big": "x" * 100})  # 0x07, then the server closes
    push.to_user(1, {"n": 1})
    assert push.close(10), push.stats()
    s = push.stats()
    assert (s.accepted, s.refused, s.reconnects) == (1, {0x07: 1}, 1), s


def test_frames_sent_while_the_server_is_down_arrive_after_restart(server):
    push = client_for(server)
    push.to_user(5, {"n": 0})
    assert push.flush(10)
    assert server.stop() == 0
    wait_until(lambda: not push.stats().connected, "the client to see the connection end")
    for n in range(1, 6):
        push.to_user(5, {"n": n})
    assert push.stats().pending == 5
    server.start()
    app = Device(server.mqtt_port, "app-5")
    app.connect()
    app.subscribe("push/user/5")  # live, or replayed from the offline store
    assert push.flush(15), push.stats()
    s = push.stats()
    assert (s.accepted, s.refused, s.dropped) == (6, {}, 0)
    assert s.reconnects >= 1
    assert sorted(m["n"] for _, m in app.expect(5)) == [1, 2, 3, 4, 5]
    push.close()
    app.disconnect()


def test_frames_written_but_unanswered_are_resent_on_the_next_connection(server):
    push = client_for(server)
    push.to_user(6, {"n": 0})
    assert push.flush(10)
    server.pause()  # the frames below wait in its socket
    for n in range(1, 4):
        push.to_user(6, {"n": n})
    wait_until(lambda: push.stats().in_flight == 3, lambda: f"3 frames in flight: {push.stats()}")
    server.stop(signal.SIGKILL)  # they were never read: not accepted
    # >= 3: a reconnect into the dying process's backlog re-sends them again
    wait_until(lambda: push.stats().resent >= 3, lambda: f"3 frames queued again: {push.stats()}")
    server.start()
    app = Device(server.mqtt_port, "app-6")
    app.connect()
    app.subscribe("push/user/6")
    assert push.close(15), push.stats()
    assert push.stats().accepted == 4
    assert sorted(m["n"] for _, m in app.expect(3)) == [1, 2, 3]
    app.disconnect()


def test_a_full_buffer_drops_the_oldest_frames_and_counts_them(make_server):
    server = make_server()  # not started: nothing to connect to
    push = client_for(server, max_buffer=3)
    for n in range(5):
        push.to_user(8, {"n": n})
    s = push.stats()
    assert (s.dropped, s.pending, s.accepted) == (2, 3, 0)
    server.start()
    app = Device(server.mqtt_port, "app-8")
    app.connect()
    app.subscribe("push/user/8")
    assert push.close(15), push.stats()
    assert (push.stats().accepted, push.stats().dropped) == (3, 2)
    assert sorted(m["n"] for _, m in app.expect(3)) == [2, 3, 4]
    app.disconnect()


@pytest.mark.parametrize("doc", ["README.md", "docs/http-api.md"])
def test_the_docs_python_snippet_works(server, doc):
    text = (REPO / doc).read_text()
    snippet = re.search(r"From Python.*?```python\n(.*?)```", text, re.S)
    assert snippet, f"{doc} has no 'From Python' snippet"
    code = snippet.group(1).replace("7100", str(server.proxy_port))
    app = Device(server.mqtt_port, "app-42")
    app.connect()
    app.subscribe("push/user/42")
    exec(code, {})
    assert app.expect(1) == [("push/user/42", {"alert": "hi"})]
    app.disconnect()


def test_keepalives_hold_the_connection_past_the_idle_timeout(make_server):
    server = make_server(proxy={"idle_timeout_secs": 1}).start()
    kept = client_for(server, keepalive=0.2)
    kept.to_user(9, {"n": 1})
    assert kept.flush(10)
    silent = client_for(server, keepalive=None)  # connected after `kept`
    silent.to_user(9, {"n": 2})
    assert silent.flush(10)
    wait_until(lambda: silent.stats().reconnects >= 1, "the server to close the idle connection")
    s = kept.stats()
    assert (s.reconnects, s.connected) == (0, True), s
    kept.close()
    silent.close()
