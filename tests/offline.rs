//! Offline delivery for users without APNs: kept while no session takes the
//! message, replayed in order when a device subscribes, then gone. Real MQTT
//! clients, both registries (and a Redis Cluster), a restart with Redis.

#[macro_use]
mod support;

use pushbridge::push::Id;
use pushbridge::settings::Settings;
use pushbridge::wire::client::json_to_msgpack;
use pushbridge::wire::frame::encode;
use pushbridge::Server;
use rmpv::Value as Mp;
use serde_json::json;
use support::mqtt::Device;
use support::proxy::Backend;
use support::server;

async fn wait_for(cond: impl Fn() -> bool) {
    support::wait_until(|| std::future::ready(cond())).await;
}

/// Subscribes a fresh device to `uid`'s topic and checks it receives exactly
/// `want` (in order): a marker pushed afterwards must come next, not a copy.
async fn expect_on_subscribe(server: &Server, uid: u64, client: &str, want: &[serde_json::Value]) {
    let mut device = Device::connect(server.mqtt_addr, client, true).await;
    device.subscribe(&format!("push/user/{uid}")).await;
    for w in want {
        assert_eq!(&device.next_json().await, w);
    }
    let mut backend = Backend::connect(server.proxy_addr).await;
    assert_eq!(
        backend
            .push(2, Mp::from(uid), &json!({"marker": client}))
            .await,
        0x00
    );
    assert_eq!(device.next_json().await, json!({"marker": client}));
    device.disconnect().await;
}

both_registries!(offline_user_gets_kept_messages_once, kept_in_order, cluster);
async fn kept_in_order(settings: Settings) {
    let server = server::start(settings).await;
    // A persistent session that is offline queues in the broker: not kept twice.
    let mut d = Device::connect(server.mqtt_addr, "persistent-78", false).await;
    d.subscribe("push/user/78").await;
    d.disconnect().await;

    // Written at once, so that they are usually routed as one batch.
    let mut frames = Vec::new();
    for n in 0..3 {
        frames.extend(encode(2, &Mp::from(77), &json_to_msgpack(&json!({"n": n}))));
    }
    frames.extend(encode(2, &Mp::from(78), &json_to_msgpack(&json!({"p": 1}))));
    // A group message is never kept.
    frames.extend(encode(1, &Mp::from(5), &json_to_msgpack(&json!({"g": 1}))));
    let mut backend = Backend::connect(server.proxy_addr).await;
    backend.write(&frames).await;
    for _ in 0..5 {
        assert_eq!(backend.status().await, Some(0x00));
    }
    wait_for(|| server.stats.offline_kept.get() == 3).await;
    // n = 1 and 2 are kept behind n = 0 without a publish (issue 18: order).
    assert_eq!(server.stats.mqtt_published.get(), 3);

    let want: Vec<_> = (0..3).map(|n| json!({"n": n})).collect();
    expect_on_subscribe(&server, 77, "phone-77", &want).await;
    wait_for(|| server.stats.offline_delivered.get() == 3).await;
    let left = server.offline.pending(&Id::from(77)).await.unwrap();
    assert!(left.messages.is_empty() && left.read == 0, "{left:?}");
    // A second device later gets nothing again.
    expect_on_subscribe(&server, 77, "tablet-77", &[]).await;
    assert_eq!(server.stats.offline_delivered.get(), 3);
    server.stop().await;
}

both_registries!(offline_bound_drops_oldest, bounded);
async fn bounded(mut settings: Settings) {
    settings.offline.max_per_user = 3;
    let server = server::start(settings).await;
    let mut backend = Backend::connect(server.proxy_addr).await;
    for n in 0..5 {
        assert_eq!(
            backend.push(3, Mp::from("12"), &json!({"n": n})).await,
            0x00
        );
    }
    wait_for(|| server.stats.offline_kept.get() == 5).await;
    assert_eq!(server.stats.offline_dropped.get(), 2);
    let want: Vec<_> = (2..5).map(|n| json!({"n": n})).collect();
    expect_on_subscribe(&server, 12, "phone-12", &want).await;
    server.stop().await;
}

// Issue 14 point 6: bounded in bytes as kept, per user: the oldest go, and
// a message larger than the bound is not kept at all.
both_registries!(offline_bound_in_bytes, bounded_in_bytes);
async fn bounded_in_bytes(mut settings: Settings) {
    // Room for two 100-byte messages (Redis adds "<expiry ms> " to each).
    settings.offline.max_bytes_per_user = 250;
    let server = server::start(settings).await;
    let mut backend = Backend::connect(server.proxy_addr).await;
    let msg = |n: u64| json!({"n": n, "pad": "x".repeat(84)});
    assert_eq!(msg(0).to_string().len(), 100);
    for n in 0..4 {
        assert_eq!(backend.push(2, Mp::from(13), &msg(n)).await, 0x00);
    }
    let big = json!({"pad": "y".repeat(300)});
    assert_eq!(backend.push(2, Mp::from(13), &big).await, 0x00);
    wait_for(|| server.stats.offline_kept.get() == 5).await;
    assert_eq!(server.stats.offline_dropped.get(), 3);
    expect_on_subscribe(&server, 13, "phone-13", &[msg(2), msg(3)]).await;
    server.stop().await;
}

both_registries!(offline_messages_expire, expiring);
async fn expiring(mut settings: Settings) {
    settings.offline.ttl_secs = 1;
    let redis_url = settings.registry.redis_url.clone();
    let server = server::start(settings).await;
    let mut backend = Backend::connect(server.proxy_addr).await;
    for n in 0..2 {
        assert_eq!(backend.push(2, Mp::from(31), &json!({"n": n})).await, 0x00);
    }
    wait_for(|| server.stats.offline_kept.get() == 2).await;
    if let Some(url) = &redis_url {
        // Redis drops the whole list too, once the last message expired.
        let mut raw = redis::Client::open(url.as_str())
            .unwrap()
            .get_connection()
            .unwrap();
        let ttl: i64 = redis::cmd("TTL").arg("Offline:31").query(&mut raw).unwrap();
        assert!((0..=1).contains(&ttl), "TTL {ttl}");
    }
    let offline = server.offline.clone();
    support::wait_until(|| {
        let offline = offline.clone();
        async move {
            let p = offline.pending(&Id::from(31)).await.unwrap();
            p.messages.is_empty()
        }
    })
    .await;
    expect_on_subscribe(&server, 31, "phone-31", &[]).await;
    // Gone: dropped by the replay (memory) or expired by Redis itself.
    support::wait_until(|| {
        let offline = offline.clone();
        async move { offline.pending(&Id::from(31)).await.unwrap().read == 0 }
    })
    .await;
    assert_eq!(server.stats.offline_delivered.get(), 0);
    if redis_url.is_none() {
        assert_eq!(server.stats.offline_expired.get(), 2);
    }
    server.stop().await;
}

/// Kept in Redis, the messages outlive the process that kept them.
#[tokio::test]
async fn offline_messages_survive_a_restart() {
    let redis = support::redis::RedisServer::start();
    let server = server::start(server::settings(Some(&redis.url))).await;
    let mut backend = Backend::connect(server.proxy_addr).await;
    for n in 0..3 {
        assert_eq!(backend.push(2, Mp::from(90), &json!({"n": n})).await, 0x00);
    }
    wait_for(|| server.stats.offline_kept.get() == 3).await;
    server.stop().await;
    let len: usize = redis::cmd("LLEN")
        .arg("Offline:90")
        .query(&mut redis.conn())
        .unwrap();
    assert_eq!(len, 3);

    let server = server::start(server::settings(Some(&redis.url))).await;
    let want: Vec<_> = (0..3).map(|n| json!({"n": n})).collect();
    expect_on_subscribe(&server, 90, "phone-90", &want).await;
    wait_for(|| server.stats.offline_delivered.get() == 3).await;
    let exists: bool = redis::cmd("EXISTS")
        .arg("Offline:90")
        .query(&mut redis.conn())
        .unwrap();
    assert!(!exists, "delivered messages are removed");
    server.stop().await;
}

// Issue 18: the replay of kept messages and live pushes to the same user
// keep their order: pushes sent right after the device subscribed (while
// the replay reads the store) come after every kept message, not among them.
both_registries!(
    offline_replay_and_live_pushes_keep_their_order,
    replay_then_live
);
async fn replay_then_live(settings: Settings) {
    let server = server::start(settings).await;
    let mut backend = Backend::connect(server.proxy_addr).await;
    let msg = |n: u64| json!({"n": n, "pad": "x".repeat(200)});
    let frames: Vec<u8> = (0..100)
        .flat_map(|n| encode(2, &Mp::from(55), &json_to_msgpack(&msg(n))))
        .collect();
    backend.write(&frames).await;
    for _ in 0..100 {
        assert_eq!(backend.status().await, Some(0x00));
    }
    wait_for(|| server.stats.offline_kept.get() == 100).await;

    let mut device = Device::connect(server.mqtt_addr, "phone-55", true).await;
    device.subscribe("push/user/55").await;
    let live: Vec<u8> = (100..110)
        .flat_map(|n| encode(2, &Mp::from(55), &json_to_msgpack(&msg(n))))
        .collect();
    backend.write(&live).await;
    for _ in 100..110 {
        assert_eq!(backend.status().await, Some(0x00));
    }
    let mut got = Vec::new();
    for _ in 0..110 {
        got.push(device.next_json().await["n"].as_u64().unwrap());
    }
    assert_eq!(got, (0..110).collect::<Vec<_>>());
    device.disconnect().await;
    server.stop().await;
}

/// How often Redis refused LRANGE (ACL), from INFO commandstats.
fn lrange_refused(conn: &mut redis::Connection) -> u64 {
    let info: String = redis::cmd("INFO").arg("commandstats").query(conn).unwrap();
    info.lines()
        .find_map(|l| l.strip_prefix("cmdstat_lrange:"))
        .and_then(|l| l.split(',').find_map(|f| f.strip_prefix("rejected_calls=")))
        .map_or(0, |n| n.parse().unwrap())
}

/// A replay that could not read the store (Redis refused LRANGE) leaves the
/// kept messages in it. Live pushes must not overtake them: they are kept
/// behind, and once the store can be read everything arrives in order.
/// (Before, the live pushes went straight to the device and the kept ones
/// waited for the next subscribe.)
#[tokio::test]
async fn live_pushes_wait_behind_kept_messages_a_replay_could_not_hand_over() {
    let redis = support::redis::RedisServer::start();
    let mut settings = server::settings(Some(&redis.url));
    // Unbounded in bytes: keeping then reads no list (no LRANGE).
    settings.offline.max_bytes_per_user = 0;
    let server = server::start(settings).await;
    let mut backend = Backend::connect(server.proxy_addr).await;
    for n in 0..3 {
        assert_eq!(backend.push(2, Mp::from(56), &json!({"n": n})).await, 0x00);
    }
    wait_for(|| server.stats.offline_kept.get() == 3).await;

    let mut raw = redis.conn();
    let acl = |conn: &mut redis::Connection, rule: &str| {
        let _: () = redis::cmd("ACL")
            .arg(&["SETUSER", "default", rule][..])
            .query(conn)
            .unwrap();
    };
    acl(&mut raw, "-lrange");
    let mut device = Device::connect(server.mqtt_addr, "phone-56", true).await;
    device.subscribe("push/user/56").await;
    support::wait_until(|| std::future::ready(lrange_refused(&mut redis.conn()) >= 1)).await;
    for n in 3..6 {
        assert_eq!(backend.push(2, Mp::from(56), &json!({"n": n})).await, 0x00);
    }
    wait_for(|| server.stats.offline_kept.get() == 6).await;
    acl(&mut raw, "+lrange");
    assert_eq!(backend.push(2, Mp::from(56), &json!({"n": 6})).await, 0x00);
    for n in 0..7 {
        assert_eq!(device.next_json().await, json!({"n": n}));
    }
    wait_for(|| server.stats.offline_delivered.get() == 7).await;
    let left = server.offline.pending(&Id::from(56)).await.unwrap();
    assert!(left.messages.is_empty(), "{left:?}");
    server.stop().await;
}
