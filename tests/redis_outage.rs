//! Redis goes away under a running pushbridge: pushes wait (nothing is
//! dropped silently), readiness says why, and delivery resumes by itself
//! when Redis is back on the same port.

mod support;

use pushbridge::wire::client::json_to_msgpack;
use pushbridge::wire::frame::encode;
use rmpv::Value as Mp;
use serde_json::json;
use support::http::get;
use support::mqtt::Device;
use support::proxy::Backend;
use support::redis::RedisServer;
use support::{server, wait_until};

/// Waits until `/readyz` answers `status`; returns its body.
async fn readyz_becomes(addr: std::net::SocketAddr, status: u16) -> String {
    let body = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
    let seen = body.clone();
    wait_until(move || {
        let seen = seen.clone();
        async move {
            let reply = get(addr, "/readyz").await;
            *seen.lock().unwrap() = reply.text();
            reply.status == status
        }
    })
    .await;
    let text = body.lock().unwrap().clone();
    text
}

/// Waits until `/metrics` shows `value` for the gauge `name`.
async fn metric_becomes(addr: std::net::SocketAddr, name: &str, value: u64) {
    let line = format!("\n{name} {value}\n");
    wait_until(move || {
        let line = line.clone();
        async move { get(addr, "/metrics").await.text().contains(&line) }
    })
    .await;
}

#[tokio::test]
async fn pushes_wait_for_redis_and_are_all_delivered() {
    let mut redis = RedisServer::start();
    let server = server::start(server::settings(Some(&redis.url))).await;
    let mut device = Device::connect(server.mqtt_addr, "d42", true).await;
    device.subscribe("push/user/42").await;
    let mut backend = Backend::connect(server.proxy_addr).await;
    assert_eq!(backend.push(2, Mp::from(42), &json!({"n": -1})).await, 0x00);
    assert_eq!(device.next_json().await, json!({"n": -1}));

    redis.stop();
    let why = readyz_becomes(server.http_addr, 503).await;
    assert!(why.contains("redis"), "readyz names Redis: {why}");

    const N: i64 = 50;
    for n in 0..N {
        assert_eq!(backend.push(2, Mp::from(42), &json!({"n": n})).await, 0x00);
    }
    // Redis is down, so nothing could have been routed, and nothing was given up.
    assert_eq!(server.stats.mqtt_published.get(), 1);
    assert_eq!(server.stats.pushes_failed_registry.get(), 0);

    redis.restart();
    readyz_becomes(server.http_addr, 200).await;
    for n in 0..N {
        assert_eq!(device.next_json().await, json!({"n": n}));
    }
    assert_eq!(server.stats.pushes_failed_registry.get(), 0);
    assert_eq!(server.stats.pushes_accepted.get(), N as u64 + 1);
    server.stop().await;
}

#[tokio::test]
async fn pushes_past_the_outage_bound_are_counted_failures() {
    let mut redis = RedisServer::start();
    let mut settings = server::settings(Some(&redis.url));
    settings.registry.outage_wait_secs = 1;
    let server = server::start(settings).await;
    let mut backend = Backend::connect(server.proxy_addr).await;

    redis.stop();
    // One write, so the three usually make one batch (each batch waits its own bound).
    let frames: Vec<u8> = (0..3)
        .flat_map(|n| encode(2, &Mp::from(7), &json_to_msgpack(&json!({"n": n}))))
        .collect();
    backend.write(&frames).await;
    for _ in 0..3 {
        assert_eq!(backend.status().await, Some(0x00));
    }
    let stats = server.stats.clone();
    wait_until(|| {
        let stats = stats.clone();
        async move { stats.pushes_failed_registry.get() == 3 }
    })
    .await;
    assert_eq!(server.stats.mqtt_published.get(), 0);
    server.stop().await;
}

/// A slow (not failing) Redis holds the batch being routed; the next push
/// waits in the backend's socket, not in pushbridge's queue: it is read and
/// answered only once the batch ahead of it has been routed.
#[tokio::test]
async fn a_slow_lookup_holds_backends_back_instead_of_queueing() {
    let redis = RedisServer::start();
    let mut settings = server::settings(Some(&redis.url));
    // Admit nothing while anything is ahead.
    settings.intake.max_wait_ms = 0;
    let server = server::start(settings).await;
    let mut device = Device::connect(server.mqtt_addr, "d42", true).await;
    device.subscribe("push/user/42").await;
    let mut backend = Backend::connect(server.proxy_addr).await;
    assert_eq!(backend.push(2, Mp::from(42), &json!({"n": 0})).await, 0x00);
    assert_eq!(device.next_json().await, json!({"n": 0}));
    let published = server.stats.mqtt_published.get();

    // Every command now waits 2 s (under the 5 s response timeout): slow, not failing.
    let _: () = ::redis::cmd("CLIENT")
        .arg("PAUSE")
        .arg(2000)
        .query(&mut redis.conn())
        .expect("CLIENT PAUSE");
    assert_eq!(backend.push(2, Mp::from(42), &json!({"n": 1})).await, 0x00);
    assert_eq!(backend.push(2, Mp::from(42), &json!({"n": 2})).await, 0x00);
    assert!(
        server.stats.mqtt_published.get() > published,
        "the second push was answered while the first still waited for Redis"
    );
    assert_eq!(device.next_json().await, json!({"n": 1}));
    assert_eq!(device.next_json().await, json!({"n": 2}));
    // The backend was held back while Redis was paused for 2 s, and it shows.
    let held = server.stats.stages.admission.snapshot().max_secs;
    assert!(held >= 0.5, "admission stage max {held} s");
    server.stop().await;
}

/// Backends held back take turns: when room opens, the one that has waited
/// longest reads next, so none is passed over batch after batch while
/// another drains its whole backlog.
#[tokio::test]
async fn held_backends_take_turns() {
    const BACKENDS: usize = 4;
    const EACH: usize = 600;
    let redis = RedisServer::start();
    let mut settings = server::settings(Some(&redis.url));
    settings.intake.max_wait_ms = 0;
    settings.mqtt.max_queued = BACKENDS * EACH;
    let server = server::start(settings).await;
    let mut device = Device::connect(server.mqtt_addr, "d42", true).await;
    device.subscribe("push/user/42").await;
    let mut backends = Vec::new();
    for _ in 0..BACKENDS {
        backends.push(Backend::connect(server.proxy_addr).await);
    }
    let mut first = Backend::connect(server.proxy_addr).await;
    assert_eq!(
        first.push(2, Mp::from(42), &json!({"b": 99, "n": 0})).await,
        0x00
    );
    assert_eq!(device.next_json().await, json!({"b": 99, "n": 0}));

    // A slow lookup holds everyone back while every backend's whole burst
    // (~70 KB, several reads) waits in its socket.
    let _: () = ::redis::cmd("CLIENT")
        .arg("PAUSE")
        .arg(2000)
        .query(&mut redis.conn())
        .expect("CLIENT PAUSE");
    assert_eq!(
        first.push(2, Mp::from(42), &json!({"b": 99, "n": 1})).await,
        0x00
    );
    let pad = "x".repeat(80);
    for (b, backend) in backends.iter_mut().enumerate() {
        let mut burst = Vec::new();
        for n in 0..EACH {
            let data = json_to_msgpack(&json!({"b": b, "n": n, "pad": pad}));
            burst.extend(encode(2, &Mp::from(42), &data));
        }
        backend.write(&burst).await;
    }
    // All five wait in line, and /metrics says so.
    metric_becomes(server.http_addr, "pushbridge_backends_held", 5).await;
    assert_eq!(device.next_json().await, json!({"b": 99, "n": 1}));

    // Delivered in the order routed: at any point while every backend
    // still has pushes to come, none is more than two turns (a read of at
    // most 16 KB each, ~150 of these pushes) ahead of another.
    let mut got = [0usize; BACKENDS];
    let mut widest = 0;
    for _ in 0..BACKENDS * EACH {
        let msg = device.next_json().await;
        let b = msg["b"].as_u64().expect("backend index") as usize;
        assert_eq!(msg["n"], got[b], "backend {b}'s pushes in order");
        got[b] += 1;
        if got.iter().all(|&n| n < EACH) {
            widest = widest.max(got.iter().max().unwrap() - got.iter().min().unwrap());
        }
    }
    assert!(
        widest <= 300,
        "one backend got {widest} pushes ahead of another: {got:?}"
    );
    // Nobody is left waiting for a turn once the pushes are through.
    metric_becomes(server.http_addr, "pushbridge_backends_held", 0).await;
    server.stop().await;
}
