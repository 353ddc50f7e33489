//! End to end over real sockets: raw proxy frames in, real MQTT clients out,
//! with both registries.

#[macro_use]
mod support;

use rmpv::Value as Mp;
use rumqttc::QoS;
use serde_json::json;
use support::mqtt::Device;
use support::proxy::{frame, msgpack, Backend};
use support::server;

both_registries!(user_pushes_reach_user_topics, user_pushes, cluster);
async fn user_pushes(settings: pushbridge::settings::Settings) {
    let server = server::start(settings).await;
    let mut backend = Backend::connect(server.proxy_addr).await;
    let mut d42 = Device::connect(server.mqtt_addr, "d42", true).await;
    d42.subscribe("push/user/42").await;
    let mut d43 = Device::connect(server.mqtt_addr, "d43", true).await;
    d43.subscribe("push/user/43").await;

    // Types 2 and 3, ids as ints and strings, scalar and array.
    let cases = [
        (2, Mp::from(42), json!({"n": 1})),
        (2, Mp::from("42"), json!({"n": 2, "alert": "hi"})),
        (3, Mp::from(42), json!({"n": 3})),
        (3, Mp::from("42"), json!({"n": 4})),
        (2, Mp::Array(vec![Mp::from(42)]), json!({"n": 5})),
        (3, Mp::Array(vec![Mp::from("42")]), json!({"n": 6})),
    ];
    for (t, id, data) in cases {
        assert_eq!(backend.push(t, id, &data).await, 0x00);
        let (topic, payload, qos) = d42.next_publish().await;
        assert_eq!(topic, "push/user/42");
        assert_eq!(qos, QoS::AtLeastOnce);
        assert_eq!(
            serde_json::from_slice::<serde_json::Value>(&payload).unwrap(),
            data
        );
    }
    // A list reaches every listed user, each once: the next message after
    // it is the sentinel, not a duplicate.
    let ids = Mp::Array(vec![Mp::from(42), Mp::from("43"), Mp::from(42)]);
    assert_eq!(backend.push(3, ids, &json!({"list": true})).await, 0x00);
    assert_eq!(
        backend.push(2, Mp::from(42), &json!({"sentinel": 1})).await,
        0x00
    );
    assert_eq!(
        backend.push(2, Mp::from(43), &json!({"sentinel": 1})).await,
        0x00
    );
    for device in [&mut d42, &mut d43] {
        assert_eq!(device.next_json().await, json!({"list": true}));
        assert_eq!(device.next_json().await, json!({"sentinel": 1}));
    }
    assert_eq!(server.stats.pushes_accepted.get(), 9);
    server.stop().await;
}

both_registries!(group_push_is_one_publish, group_push);
async fn group_push(settings: pushbridge::settings::Settings) {
    let server = server::start(settings).await;
    let mut backend = Backend::connect(server.proxy_addr).await;
    let mut members = Vec::new();
    for i in 0..3 {
        let mut d = Device::connect(server.mqtt_addr, &format!("g{i}"), true).await;
        d.subscribe("push/group/7").await;
        members.push(d);
    }
    let mut other = Device::connect(server.mqtt_addr, "other", true).await;
    other.subscribe("push/group/8").await;

    assert_eq!(backend.push(1, Mp::from(7), &json!({"g": 7})).await, 0x00);
    assert_eq!(backend.push(1, Mp::from("8"), &json!({"g": 8})).await, 0x00);
    assert_eq!(
        backend.push(1, Mp::from(7), &json!({"sentinel": 1})).await,
        0x00
    );
    for d in &mut members {
        let (topic, _, _) = d.next_publish().await;
        assert_eq!(topic, "push/group/7");
        assert_eq!(d.next_json().await, json!({"sentinel": 1}));
    }
    assert_eq!(other.next_json().await, json!({"g": 8}));
    assert_eq!(server.stats.mqtt_published.get(), 3);
    server.stop().await;
}

/// `{"k": [nil, nil, ...]}`: one byte a value on the wire.
fn many_nils(n: usize) -> Mp {
    Mp::Map(vec![(Mp::from("k"), Mp::Array(vec![Mp::Nil; n]))])
}

both_registries!(bad_input_gets_distinct_status_bytes, bad_input);
async fn bad_input(mut settings: pushbridge::settings::Settings) {
    settings.proxy.max_frame = 1 << 20;
    let server = server::start(settings).await;
    let mut device = Device::connect(server.mqtt_addr, "d1", true).await;
    device.subscribe("push/user/1").await;
    let data = Mp::Map(vec![(Mp::from("k"), Mp::from(1))]);
    let triple = |t: i64, id: Mp, d: Mp| msgpack(&Mp::Array(vec![Mp::from(t), id, d]));

    let cases: Vec<(Vec<u8>, u8)> = vec![
        (b"\x01\x02garbage".to_vec(), 0x01),
        (vec![0x93, 0x02], 0x02),
        (msgpack(&Mp::Array(vec![Mp::from(2), Mp::from(1)])), 0x03),
        (triple(9, Mp::from(1), data.clone()), 0x04),
        (triple(2, Mp::Map(vec![]), data.clone()), 0x05),
        (triple(2, Mp::from("u".repeat(257)), data.clone()), 0x05),
        (triple(2, Mp::from(1), Mp::from("not a map")), 0x06),
        (triple(2, Mp::from(1), many_nils(65_537)), 0x0a),
    ];
    let mut backend = Backend::connect(server.proxy_addr).await;
    for (body, want) in &cases {
        backend.write(&frame(body)).await;
        assert_eq!(backend.status().await, Some(*want), "{body:02x?}");
    }
    // The connection is still usable after every one of them, and a
    // keep-alive (N = 0) gets no reply: the next byte answers the push.
    backend.write(&[0, 0, 0, 0]).await;
    assert_eq!(backend.push(2, Mp::from(1), &json!({"ok": 1})).await, 0x00);
    assert_eq!(device.next_json().await, json!({"ok": 1}));

    // Over max_frame: error byte, then the server closes.
    backend.write(&(2u32 << 20).to_be_bytes()).await;
    assert_eq!(backend.status().await, Some(0x07));
    assert_eq!(backend.status().await, None);

    // A frame cut short by the backend closing its side.
    let mut cut = Backend::connect(server.proxy_addr).await;
    cut.write(&[0, 0, 0, 10, 0x93]).await;
    cut.socket.shutdown().await.unwrap();
    assert_eq!(cut.status().await, Some(0x02));

    // A fresh connection delivers.
    let mut fresh = Backend::connect(server.proxy_addr).await;
    assert_eq!(fresh.push(3, Mp::from("1"), &json!({"ok": 2})).await, 0x00);
    assert_eq!(device.next_json().await, json!({"ok": 2}));
    assert_eq!(server.stats.frames_rejected.get(), 10);
    server.stop().await;
}

both_registries!(offline_persistent_session_gets_queued, persistent_session);
async fn persistent_session(settings: pushbridge::settings::Settings) {
    let server = server::start(settings).await;
    let mut d = Device::connect(server.mqtt_addr, "phone-5", false).await;
    d.subscribe("push/user/5").await;
    d.disconnect().await;

    let mut backend = Backend::connect(server.proxy_addr).await;
    for n in 0..3 {
        assert_eq!(backend.push(2, Mp::from(5), &json!({"n": n})).await, 0x00);
    }
    // Accepted means queued: wait until the dispatcher has published all three.
    wait_for(|| server.stats.mqtt_published.get() == 3).await;

    let mut d = Device::connect(server.mqtt_addr, "phone-5", false).await;
    for n in 0..3 {
        assert_eq!(d.next_json().await, json!({"n": n}));
    }
    server.stop().await;
}

both_registries!(status_topic_sets_and_clears_focus, status_focus, cluster);
async fn status_focus(settings: pushbridge::settings::Settings) {
    let server = server::start(settings).await;
    support::status_sets_and_clears_focus(&server, server.mqtt_addr).await;

    // Focus set, then the connection drops: focus is cleared.
    let mut app = Device::connect(server.mqtt_addr, "app-77", true).await;
    app.publish("push/app/status", br#"{"user_id": 77, "focus": true}"#)
        .await;
    support::wait_for_focus(&server, "77", true).await;
    drop(app);
    support::wait_for_focus(&server, "77", false).await;
    server.stop().await;
}

// Issue 14 points 5 and 12: a status message about a user with no record,
// with an id the proxy would refuse, or with `user_id` twice, changes
// nothing and creates no record.
both_registries!(status_creates_no_records, status_creates_nothing);
async fn status_creates_nothing(settings: pushbridge::settings::Settings) {
    use pushbridge::push::Id;
    use pushbridge::registry::UserStore;
    let server = server::start(settings).await;
    support::register(&server, "80").await;
    support::register(&server, "81").await;
    let long = "g".repeat(1000);
    let mut app = Device::connect(server.mqtt_addr, "app-80", true).await;
    for status in [
        json!({"user_id": "ghost-123", "focus": true}).to_string(),
        json!({"user_id": long, "focus": true}).to_string(),
        json!({"user_id": "80\n", "focus": true}).to_string(),
        r#"{"user_id": "ghost-124", "user_id": 80, "focus": true}"#.to_string(),
    ] {
        app.publish("push/app/status", status.as_bytes()).await;
    }
    // Status messages are applied in order: once 81's is, so are the others.
    app.publish("push/app/status", br#"{"user_id": 81, "focus": true}"#)
        .await;
    support::wait_for_focus(&server, "81", true).await;
    let ids = ["ghost-123", "ghost-124", &long, "80\n"].map(Id::from);
    let found = server.registry.users(&ids).await.unwrap();
    assert_eq!(
        found,
        vec![None; ids.len()],
        "status messages created records"
    );
    let rec = server.registry.users(&[Id::from(80)]).await.unwrap();
    assert!(
        !rec[0].as_ref().unwrap().app_focus,
        "duplicate user_id applied"
    );
    let ghost = support::http::get(server.http_addr, "/v1/users/ghost-123").await;
    assert_eq!(ghost.status, 404);
    server.stop().await;
}

// One user on two devices: focus stays while either holds it.
both_registries!(focus_held_by_two_devices, two_devices_focus);
async fn two_devices_focus(settings: pushbridge::settings::Settings) {
    let server = server::start(settings).await;
    support::register(&server, "78").await;
    support::register(&server, "79").await;
    let mut phone = Device::connect(server.mqtt_addr, "phone-78", true).await;
    let mut tablet = Device::connect(server.mqtt_addr, "tablet-78", true).await;
    let mut other = Device::connect(server.mqtt_addr, "app-79", true).await;
    for d in [&mut phone, &mut tablet] {
        d.publish("push/app/status", br#"{"user_id": 78, "focus": true}"#)
            .await;
    }
    support::wait_for_focus(&server, "78", true).await;
    phone.disconnect().await;
    // Status events are handled in order: once 79's is applied, so is the disconnect.
    other
        .publish("push/app/status", br#"{"user_id": 79, "focus": true}"#)
        .await;
    support::wait_for_focus(&server, "79", true).await;
    support::wait_for_focus(&server, "78", true).await;
    tablet.disconnect().await;
    support::wait_for_focus(&server, "78", false).await;
    server.stop().await;
}

both_registries!(idle_backend_is_closed, idle_backend);
async fn idle_backend(mut settings: pushbridge::settings::Settings) {
    settings.proxy.idle_timeout_secs = 1;
    let server = server::start(settings).await;
    let mut silent = Backend::connect(server.proxy_addr).await;
    // Trickling bytes of a frame does not keep it open either.
    silent.write(&[0, 0]).await;
    assert_eq!(silent.status().await, None);
    server.stop().await;
}

async fn wait_for(cond: impl Fn() -> bool) {
    support::wait_until(|| std::future::ready(cond())).await;
}

use tokio::io::AsyncWriteExt;

/// Many backends at once: every accepted push reaches its device, once.
#[tokio::test]
async fn many_concurrent_backends() {
    const BACKENDS: u64 = 20;
    const EACH: u64 = 25;
    const USERS: u64 = 5;
    let server = server::start(server::settings(None)).await;
    let mut devices = Vec::new();
    for u in 0..USERS {
        let mut d = Device::connect(server.mqtt_addr, &format!("c{u}"), true).await;
        d.subscribe(&format!("push/user/{u}")).await;
        devices.push(d);
    }
    let mut senders = tokio::task::JoinSet::new();
    for b in 0..BACKENDS {
        let addr = server.proxy_addr;
        senders.spawn(async move {
            let mut backend = Backend::connect(addr).await;
            for i in 0..EACH {
                let n = b * EACH + i;
                assert_eq!(
                    backend.push(2, Mp::from(n % USERS), &json!({"n": n})).await,
                    0
                );
            }
        });
    }
    senders.join_all().await;
    for (u, d) in devices.iter_mut().enumerate() {
        let mut got: Vec<u64> = Vec::new();
        for _ in 0..BACKENDS * EACH / USERS {
            got.push(d.next_json().await["n"].as_u64().unwrap());
        }
        got.sort();
        let want: Vec<u64> = (0..BACKENDS * EACH)
            .filter(|n| n % USERS == u as u64)
            .collect();
        assert_eq!(got, want, "device {u}");
    }
    server.stop().await;
}

/// A stopping server is not held by a backend waiting on a full queue: the
/// backend is told 0x08 and the stop completes (registry gone, so nothing drains).
#[tokio::test]
async fn stop_with_a_full_queue() {
    let redis = support::redis::RedisServer::start();
    let mut settings = server::settings(Some(&redis.url));
    settings.intake.queue = 1;
    settings.shutdown.drain_secs = 1;
    let server = server::start(settings).await;
    drop(redis);
    let mut backend = Backend::connect(server.proxy_addr).await;
    let mut frames = Vec::new();
    for n in 0..4 {
        let data = json!({"n": n});
        frames.extend(pushbridge::wire::frame::encode(
            2,
            &Mp::from(n),
            &pushbridge::wire::client::json_to_msgpack(&data),
        ));
    }
    backend.write(&frames).await;
    // The dispatcher holds one push retrying the registry and the queue holds
    // one more; the third waits for room.
    assert_eq!(backend.status().await, Some(0x00));
    assert_eq!(backend.status().await, Some(0x00));
    tokio::time::timeout(3 * support::WAIT, server.stop())
        .await
        .expect("stop completes");
    assert_eq!(backend.status().await, Some(0x08));
    assert_eq!(backend.status().await, None);
}
