//! Durable intake against a real redis-server: a push is in the stream
//! before its `0x00`, acknowledged only after delivery, claimed from a
//! consumer that died holding it, and kept across a Redis restart.

#[path = "support/apns.rs"]
mod apns_server;
mod support;

use std::collections::{BTreeSet, HashMap};

use apns_server::{ApnsServer, Reply};
use pushbridge::push::Id;
use pushbridge::settings::Settings;
use pushbridge::wire::client::json_to_msgpack;
use pushbridge::wire::frame::encode;
use redis::Commands;
use rmpv::Value as Mp;
use serde_json::json;
use support::http::{get, post_json};
use support::mqtt::Device;
use support::proxy::Backend;
use support::redis::RedisServer;
use support::{server, wait_until};

const STREAM: &str = "pushbridge:intake";
const GROUP: &str = "pushbridge";
const DEAD: &str = "pushbridge:intake:dead";

fn durable(redis: &RedisServer) -> Settings {
    let mut s = server::settings(Some(&redis.url));
    s.intake.durable = true;
    s.intake.claim_idle_ms = 300;
    s
}

/// The frame body the proxy stores for a user push of `data` to `uid`.
fn body(uid: i64, data: &serde_json::Value) -> Vec<u8> {
    encode(2, &Mp::from(uid), &json_to_msgpack(data))[4..].to_vec()
}

fn entries_added(conn: &mut redis::Connection) -> i64 {
    let info: HashMap<String, redis::Value> = redis::cmd("XINFO")
        .arg("STREAM")
        .arg(STREAM)
        .query(conn)
        .expect("XINFO STREAM");
    redis::from_redis_value(&info["entries-added"]).unwrap()
}

fn pending(conn: &mut redis::Connection) -> i64 {
    let summary: (i64, redis::Value, redis::Value, redis::Value) = redis::cmd("XPENDING")
        .arg(STREAM)
        .arg(GROUP)
        .query(conn)
        .expect("XPENDING");
    summary.0
}

/// Waits until nothing is pending and the stream is empty (acked, deleted).
async fn wait_all_acked(redis: &RedisServer) {
    let url = redis.url.clone();
    wait_until(move || {
        let url = url.clone();
        async move {
            let mut conn = redis::Client::open(url).unwrap().get_connection().unwrap();
            let len: i64 = conn.xlen(STREAM).unwrap();
            pending(&mut conn) == 0 && len == 0
        }
    })
    .await;
}

/// Reads `n` user pushes `{"n": i}` into a set (claimed ones arrive out of order).
async fn receive_set(device: &mut Device, n: usize) -> BTreeSet<i64> {
    let mut seen = BTreeSet::new();
    while seen.len() < n {
        let v = device.next_json().await;
        seen.insert(v["n"].as_i64().expect("n"));
    }
    seen
}

#[tokio::test]
async fn accepted_pushes_are_in_the_stream_first_and_acked_after_delivery() {
    let redis = RedisServer::start();
    let server = server::start(durable(&redis)).await;
    let mut raw = redis.conn();
    let mut device = Device::connect(server.mqtt_addr, "d42", true).await;
    device.subscribe("push/user/42").await;
    let mut backend = Backend::connect(server.proxy_addr).await;

    for n in 0..20 {
        assert_eq!(backend.push(2, Mp::from(42), &json!({"n": n})).await, 0x00);
        assert_eq!(entries_added(&mut raw), n + 1, "in the stream before 0x00");
    }
    // A burst of frames in one write: all stored, then all answered.
    let frames: Vec<u8> = (20..70)
        .flat_map(|n| encode(2, &Mp::from(42), &json_to_msgpack(&json!({"n": n}))))
        .collect();
    backend.write(&frames).await;
    for _ in 20..70 {
        assert_eq!(backend.status().await, Some(0x00));
    }
    assert_eq!(entries_added(&mut raw), 70);
    for n in 0..70 {
        assert_eq!(device.next_json().await, json!({"n": n}));
    }

    // HTTP: answered with the routing once stored; delivered by the consumer.
    let reply = post_json(
        server.http_addr,
        "/v1/push",
        &json!({"notifications": [{"user": 42, "data": {"n": 70}}]}),
    )
    .await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(
        reply.json()["results"][0]["mqtt"],
        json!([{"topic": "push/user/42", "sessions": null}])
    );
    assert_eq!(entries_added(&mut raw), 71);
    assert_eq!(device.next_json().await, json!({"n": 70}));

    wait_all_acked(&redis).await;
    let stats = server.stats.clone();
    wait_until(move || {
        let stats = stats.clone();
        async move { stats.intake_acked.get() == 71 }
    })
    .await;
    assert_eq!(server.stats.pushes_accepted.get(), 70);
    server.stop().await;
}

#[tokio::test]
async fn an_entry_stays_pending_until_it_can_be_delivered() {
    let redis = RedisServer::start();
    let mut settings = durable(&redis);
    settings.registry.outage_wait_secs = 1;
    let server = server::start(settings).await;
    let mut raw = redis.conn();
    let mut device = Device::connect(server.mqtt_addr, "d42", true).await;
    device.subscribe("push/user/42").await;
    // The registry's reads are refused (NOPERM): every lookup fails, while
    // the stream's commands still work.
    let _: () = redis::cmd("ACL")
        .arg(&["SETUSER", "default", "-hgetall"][..])
        .query(&mut raw)
        .unwrap();

    let data = json!({"n": 1});
    let mut backend = Backend::connect(server.proxy_addr).await;
    assert_eq!(backend.push(2, Mp::from(42), &data).await, 0x00);
    let range: redis::streams::StreamRangeReply = raw.xrange_all(STREAM).unwrap();
    assert_eq!(range.ids.len(), 1);
    let stored: Vec<u8> = range.ids[0].get("f").expect("field f");
    assert_eq!(stored, body(42, &data), "the stream holds the frame body");

    // The consumer read it and could not route it: it stays pending.
    wait_until(|| async { pending(&mut redis.conn()) == 1 }).await;
    let stats = server.stats.clone();
    wait_until(move || {
        let stats = stats.clone();
        async move { stats.intake_claimed.get() >= 1 }
    })
    .await;
    assert_eq!(server.stats.mqtt_published.get(), 0);

    let _: () = redis::cmd("ACL")
        .arg(&["SETUSER", "default", "+hgetall"][..])
        .query(&mut raw)
        .unwrap();
    assert_eq!(device.next_json().await, data);
    wait_all_acked(&redis).await;
    server.stop().await;
}

/// Creates the group and `n` entries for user 42, all read by consumer
/// "dead", which will never acknowledge them.
fn taken_by_dead_consumer(raw: &mut redis::Connection, n: usize) {
    let _: () = redis::cmd("XGROUP")
        .arg(&["CREATE", STREAM, GROUP, "0", "MKSTREAM"][..])
        .query(raw)
        .unwrap();
    for n in 0..n {
        let _: String = raw
            .xadd(STREAM, "*", &[("f", body(42, &json!({"n": n})))])
            .unwrap();
    }
    let taken: redis::streams::StreamReadReply = raw
        .xread_options(
            &[STREAM],
            &[">"],
            &redis::streams::StreamReadOptions::default()
                .group(GROUP, "dead")
                .count(1000),
        )
        .unwrap();
    assert_eq!(taken.keys[0].ids.len(), n, "entries read by \"dead\"");
}

#[tokio::test]
async fn a_dead_consumers_entries_are_claimed_and_delivered() {
    let redis = RedisServer::start();
    let mut raw = redis.conn();
    // Consumer "dead" takes them all and never acknowledges: a crash.
    taken_by_dead_consumer(&mut raw, 50);
    assert_eq!(pending(&mut raw), 50);

    let server = server::start(durable(&redis)).await;
    let mut device = Device::connect(server.mqtt_addr, "d42", true).await;
    device.subscribe("push/user/42").await;
    let mut backend = Backend::connect(server.proxy_addr).await;
    for n in 50..100 {
        assert_eq!(backend.push(2, Mp::from(42), &json!({"n": n})).await, 0x00);
    }
    let seen = receive_set(&mut device, 100).await;
    assert_eq!(seen, (0..100).collect());
    wait_all_acked(&redis).await;
    assert_eq!(server.stats.intake_claimed.get(), 50);
    server.stop().await;
}

#[tokio::test]
async fn a_redis_restart_loses_no_accepted_push() {
    let mut redis = RedisServer::start_persistent();
    let server = server::start(durable(&redis)).await;
    let mut device = Device::connect(server.mqtt_addr, "d42", true).await;
    device.subscribe("push/user/42").await;
    let mut backend = Backend::connect(server.proxy_addr).await;
    for n in 0..100 {
        assert_eq!(backend.push(2, Mp::from(42), &json!({"n": n})).await, 0x00);
    }

    redis.stop();
    let ready = get(server.http_addr, "/readyz").await;
    assert_eq!(ready.status, 503, "{}", ready.text());
    // These wait for Redis: answered only once stored.
    let sender = tokio::spawn(async move {
        for n in 100..110 {
            assert_eq!(backend.push(2, Mp::from(42), &json!({"n": n})).await, 0x00);
        }
        backend
    });
    redis.restart();
    let mut backend = sender.await.unwrap();
    for n in 110..200 {
        assert_eq!(backend.push(2, Mp::from(42), &json!({"n": n})).await, 0x00);
    }
    let seen = receive_set(&mut device, 200).await;
    assert_eq!(seen, (0..200).collect());
    wait_all_acked(&redis).await;
    assert_eq!(server.stats.intake_unavailable.get(), 0);
    server.stop().await;
}

#[tokio::test]
async fn an_apns_entry_is_acked_only_when_apple_has_answered() {
    let redis = RedisServer::start();
    let mut settings = durable(&redis);
    let apple = ApnsServer::start().await;
    let app = "com.example.app";
    let _creds = apple.serve_token_app(&mut settings, app);
    let server = server::start(settings).await;
    for (uid, token) in [("6", "aa06"), ("7", "bb07"), ("8", "cc08")] {
        support::put_ios_user(&server, &Id::from(uid), token, app).await;
    }
    apple.hold_answers_until(2);
    apple.reply_to("cc08", Reply::BadDeviceToken);
    let mut raw = redis.conn();
    let mut backend = Backend::connect(server.proxy_addr).await;

    assert_eq!(
        backend.push(2, Mp::from(6), &json!({"alert": "a"})).await,
        0x00
    );
    let first = apple.next_request(support::WAIT).await;
    assert_eq!(first.path, "/3/device/aa06");
    // Apple has not answered: the entry is still pending.
    assert_eq!(pending(&mut raw), 1);
    assert_eq!(server.stats.intake_acked.get(), 0);

    // A second request releases both answers (200): both acknowledged.
    assert_eq!(
        backend.push(2, Mp::from(7), &json!({"alert": "b"})).await,
        0x00
    );
    wait_all_acked(&redis).await;
    // A final failure (dead token) is final too.
    assert_eq!(
        backend.push(2, Mp::from(8), &json!({"alert": "c"})).await,
        0x00
    );
    let stats = server.stats.clone();
    wait_until(move || {
        let stats = stats.clone();
        async move { stats.intake_acked.get() == 3 }
    })
    .await;
    wait_all_acked(&redis).await;
    assert_eq!(server.stats.apns_delivered.get(), 2);
    assert_eq!(server.stats.apns_dead_tokens.get(), 1);
    server.stop().await;
}

/// The stream on a Redis Cluster: accepted, delivered, acknowledged.
#[tokio::test]
async fn durable_intake_on_a_redis_cluster() {
    let cluster = support::redis_cluster::RedisCluster::start();
    let mut settings = server::settings(Some(&cluster.url));
    settings.intake.durable = true;
    let server = server::start(settings).await;
    let mut device = Device::connect(server.mqtt_addr, "dev-cluster", true).await;
    device.subscribe("push/user/42").await;
    let mut backend = Backend::connect(server.proxy_addr).await;
    for n in 0..20 {
        assert_eq!(backend.push(2, Mp::from(42), &json!({"n": n})).await, 0x00);
    }
    assert_eq!(receive_set(&mut device, 20).await, (0..20).collect());
    let mut conn = cluster.conn();
    wait_until(move || {
        let len: i64 = conn.xlen(STREAM).unwrap();
        std::future::ready(len == 0)
    })
    .await;
    server.stop().await;
}

/// The dead-letter stream's entries, oldest first, as field maps.
fn dead_letters(conn: &mut redis::Connection) -> Vec<HashMap<String, redis::Value>> {
    let range: redis::streams::StreamRangeReply = conn.xrange_all(DEAD).unwrap();
    range.ids.into_iter().map(|e| e.map).collect()
}

fn field(entry: &HashMap<String, redis::Value>, name: &str) -> String {
    let bytes: Vec<u8> = redis::from_redis_value(&entry[name]).unwrap();
    String::from_utf8_lossy(&bytes).into_owned()
}

/// An entry whose routing keeps failing for real (Redis refuses to read its
/// user: NOPERM) is delivered `intake.max_deliveries` times, then moved to
/// the dead-letter stream with the reason and acknowledged; the push that
/// shared its batch is delivered; an entry that is not a push frame goes
/// there at once. Counted, and shown on `/readyz`.
#[tokio::test]
async fn undeliverable_entries_go_to_the_dead_letter_stream() {
    let redis = RedisServer::start();
    let mut raw = redis.conn();
    let _: () = redis::cmd("ACL")
        .arg(
            &[
                "SETUSER",
                "default",
                "resetkeys",
                "~pushbridge:*",
                "~User:4*",
                "~Offline:*",
            ][..],
        )
        .query(&mut raw)
        .unwrap();
    let mut settings = durable(&redis);
    settings.registry.outage_wait_secs = 1;
    settings.intake.max_deliveries = 2;
    let server = server::start(settings).await;
    let mut device = Device::connect(server.mqtt_addr, "d42", true).await;
    device.subscribe("push/user/42").await;

    let _: String = raw
        .xadd(STREAM, "*", &[("f", b"\x02not msgpack".to_vec())])
        .unwrap();
    // One write: the two frames are read as one batch.
    let mut backend = Backend::connect(server.proxy_addr).await;
    let frames: Vec<u8> = [(666, json!({"n": 666})), (42, json!({"n": 42}))]
        .iter()
        .flat_map(|(uid, data)| encode(2, &Mp::from(*uid), &json_to_msgpack(data)))
        .collect();
    backend.write(&frames).await;
    assert_eq!(backend.status().await, Some(0x00));
    assert_eq!(backend.status().await, Some(0x00));
    assert_eq!(device.next_json().await, json!({"n": 42}));

    wait_until(|| async { dead_letters(&mut redis.conn()).len() == 2 }).await;
    wait_all_acked(&redis).await;
    let dead = dead_letters(&mut raw);
    assert!(
        field(&dead[0], "reason").contains("not a push frame"),
        "{dead:?}"
    );
    assert_eq!(field(&dead[0], "deliveries"), "1");
    let refused = &dead[1];
    let reason = field(refused, "reason");
    assert!(
        reason.contains("routing failed") && reason.contains("NOPERM"),
        "{reason}"
    );
    assert_eq!(field(refused, "deliveries"), "2");
    let stored: Vec<u8> = redis::from_redis_value(&refused["f"]).unwrap();
    assert_eq!(
        stored,
        body(666, &json!({"n": 666})),
        "the original frame body"
    );
    assert!(field(refused, "id").contains('-'));
    assert!(field(refused, "time").parse::<u64>().unwrap() > 1_700_000_000_000);
    assert_eq!(server.stats.intake_dead.get(), 2);
    assert_eq!(server.stats.intake_undecodable.get(), 1);
    let ready = get(server.http_addr, "/readyz").await;
    assert!(
        ready.text().contains(
            "intake: ok, 2 entries dead-lettered since start (stream pushbridge:intake:dead)"
        ),
        "{}",
        ready.text()
    );
    assert_eq!(server.stats.mqtt_published.get(), 1);

    // The cause fixed, the documented commands replay them: the push is
    // delivered, the frame that is no push comes back with a new reason.
    let _: () = redis::cmd("ACL")
        .arg(&["SETUSER", "default", "allkeys"][..])
        .query(&mut raw)
        .unwrap();
    let mut device = Device::connect(server.mqtt_addr, "d666", true).await;
    device.subscribe("push/user/666").await;
    for line in documented_dead_letter_commands() {
        let with_port = line.replacen("redis-cli ", &format!("redis-cli -p {} ", redis.port()), 1);
        let out = std::process::Command::new("sh")
            .arg("-c")
            .arg(&with_port)
            .output()
            .unwrap();
        assert!(out.status.success(), "{line}: {out:?}");
    }
    assert_eq!(device.next_json().await, json!({"n": 666}));
    wait_until(|| async { server.stats.intake_dead.get() == 3 }).await;
    wait_all_acked(&redis).await;
    let dead = dead_letters(&mut raw);
    assert_eq!(dead.len(), 1, "{dead:?}");
    server.stop().await;
}

/// The `redis-cli` lines of the shell block under "### Dead letters" in
/// docs/reliability.md.
fn documented_dead_letter_commands() -> Vec<String> {
    let doc = include_str!("../docs/reliability.md");
    let section = &doc[doc.find("### Dead letters").expect("the section")..];
    let block = &section[section.find("```sh\n").expect("a sh block") + 6..];
    let block = &block[..block.find("```").unwrap()];
    let lines: Vec<String> = block.lines().map(str::to_owned).collect();
    assert!(
        lines.iter().all(|l| l.starts_with("redis-cli ")) && lines.len() == 3,
        "{lines:?}"
    );
    lines
}

fn consumers(conn: &mut redis::Connection) -> HashMap<String, i64> {
    let infos: Vec<HashMap<String, redis::Value>> = redis::cmd("XINFO")
        .arg(&["CONSUMERS", STREAM, GROUP][..])
        .query(conn)
        .unwrap();
    infos
        .iter()
        .map(|c| {
            let name: String = redis::from_redis_value(&c["name"]).unwrap();
            (name, redis::from_redis_value(&c["pending"]).unwrap())
        })
        .collect()
}

/// A consumer name idle beyond `intake.consumer_gone_ms` leaves the group
/// once nothing is pending with it: at once when it holds nothing, after a
/// live instance has claimed its entries otherwise; an instance that stopped
/// is forgotten the same way.
#[tokio::test]
async fn gone_consumers_leave_the_group_once_their_entries_are_claimed() {
    let redis = RedisServer::start();
    let mut raw = redis.conn();
    taken_by_dead_consumer(&mut raw, 10);
    let _: i64 = redis::cmd("XGROUP")
        .arg(&["CREATECONSUMER", STREAM, GROUP, "empty"][..])
        .query(&mut raw)
        .unwrap();

    // Claims only after a minute: "dead" keeps its entries, so its name stays.
    let mut settings = durable(&redis);
    settings.intake.claim_idle_ms = 60_000;
    settings.intake.consumer_gone_ms = 2000;
    settings.intake.consumer = Some("live-a".into());
    let a = server::start(settings.clone()).await;
    wait_until(|| async { !consumers(&mut redis.conn()).contains_key("empty") }).await;
    let left = consumers(&mut raw);
    assert_eq!(left.get("dead"), Some(&10), "{left:?}");
    a.stop().await;

    settings.intake.claim_idle_ms = 300;
    settings.intake.consumer = Some("live-b".into());
    let b = server::start(settings).await;
    let mut device = Device::connect(b.mqtt_addr, "d42", true).await;
    device.subscribe("push/user/42").await;
    assert_eq!(receive_set(&mut device, 10).await, (0..10).collect());
    wait_all_acked(&redis).await;
    wait_until(|| async {
        consumers(&mut redis.conn()).into_keys().collect::<Vec<_>>() == ["live-b"]
    })
    .await;
    b.stop().await;
}
