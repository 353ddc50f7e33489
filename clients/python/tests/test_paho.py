"""paho-mqtt, as the old service's apps, against the embedded broker over
MQTT 3.1.1 and 5: persistent sessions, and the last will on the status
topic clearing focus in Redis."""

import json

import pytest

from harness import Device, wait_until
from pushbridge_client import Client

VERSIONS = [pytest.param(4, id="mqtt311"), pytest.param(5, id="mqtt5")]


def persistent(port, client_id, version):
    if version == 5:
        return Device(port, client_id, 5, clean=False, expiry=300)
    return Device(port, client_id, 4, clean=False)


@pytest.mark.parametrize("version", VERSIONS)
def test_a_persistent_session_gets_what_was_sent_while_away(server, version):
    user = 300 + version
    topic = f"push/user/{user}"
    app = persistent(server.mqtt_port, f"phone-{user}", version)
    assert not app.connect()
    app.subscribe(topic)
    app.disconnect()
    server.wait_gone(user)
    with Client("127.0.0.1", server.proxy_port) as push:
        for n in range(3):
            push.to_user(user, {"n": n})
    assert push.stats().accepted == 3
    back = persistent(server.mqtt_port, f"phone-{user}", version)
    assert back.connect(), "session_present = 0: the session was not kept"
    # No SUBSCRIBE: only the kept session can bring these.
    assert back.expect(3) == [(topic, {"n": n}) for n in range(3)]
    back.disconnect()


@pytest.mark.parametrize("version", VERSIONS)
def test_an_unacknowledged_push_is_sent_again_to_the_resumed_session(server, version):
    user = 600 + version
    topic = f"push/user/{user}"
    app = persistent(server.mqtt_port, f"phone-{user}", version)
    app.connect()
    app.subscribe(topic)
    app.stop_reading()
    with Client("127.0.0.1", server.proxy_port) as push:
        push.to_user(user, {"n": 1})
    app.wait_unread()  # the PUBLISH is there, never acknowledged
    app.kill()
    server.wait_gone(user)
    back = persistent(server.mqtt_port, f"phone-{user}", version)
    assert back.connect()
    assert back.expect(1) == [(topic, {"n": 1})]
    assert back.dups == [True], "a re-sent PUBLISH carries DUP = 1"
    back.disconnect()


def test_mqtt5_without_session_expiry_keeps_no_session(server):
    app = Device(server.mqtt_port, "phone-77", 5, clean=False)
    app.connect()
    app.subscribe("push/user/77")
    app.disconnect()
    server.wait_gone(77)  # else the reconnect may take the session over
    again = Device(server.mqtt_port, "phone-77", 5, clean=False)
    assert not again.connect()
    again.disconnect()


def focus(redis, user):
    return redis.cli("HGET", f"User:{user}", "app_focus")


def status(user, value):
    return json.dumps({"user_id": user, "focus": value})


@pytest.fixture
def redis_server(make_server, redis):
    return make_server(registry={"redis_url": redis.url}).start()


@pytest.mark.parametrize("version", VERSIONS)
def test_focus_set_by_the_app_is_cleared_when_its_socket_dies(redis_server, redis, version):
    user = 400 + version
    redis.cli("HSET", f"User:{user}", "app_version", "produce")  # focus is kept in a record
    app = Device(redis_server.mqtt_port, f"phone-{user}", version,
                 will=("push/app/status", status(user, False)))
    app.connect()
    app.publish("push/app/status", status(user, True))
    wait_until(lambda: focus(redis, user) == "1", f"app_focus in User:{user}")
    app.kill()
    wait_until(lambda: focus(redis, user) == "", f"app_focus gone from User:{user}")


@pytest.mark.parametrize("version", VERSIONS)
def test_the_last_will_on_the_status_topic_clears_focus(redis_server, redis, version):
    # Focus left by another instance or the old service: no connection here
    # holds it, so only the will can clear it.
    user = 500 + version
    redis.cli("HSET", f"User:{user}", "app_focus", "1")
    app = Device(redis_server.mqtt_port, f"phone-{user}", version,
                 will=("push/app/status", status(user, False)))
    app.connect()
    app.kill()
    wait_until(lambda: focus(redis, user) == "", f"the will to clear User:{user}")
