//! Push ids and receipts over real sockets: 4-item proxy frames, the ids
//! `POST /v1/push` answers, and what became of each push.

mod support;

use rmpv::Value as Mp;
use serde_json::json;
use support::http::post_json;
use support::mqtt::Device;
use support::proxy::Backend;
use support::redis::RedisServer;
use support::server;

both_registries!(options_are_the_fourth_item, options_frames);
async fn options_frames(settings: pushbridge::settings::Settings) {
    let server = server::start(settings).await;
    options_answered(&server).await;
    server.stop().await;
}

/// The proxy's answers to frames with options, and that what they accept
/// is delivered (the server's intake decides where it waits).
async fn options_answered(server: &pushbridge::Server) {
    let mut device = Device::connect(server.mqtt_addr, "d1", true).await;
    device.subscribe("push/user/1").await;
    let mut backend = Backend::connect(server.proxy_addr).await;

    let opts = json!({"id": "order-1", "receipt": true, "ttl": 3600});
    assert_eq!(
        backend
            .push_with(2, Mp::from(1), &json!({"n": 1}), &opts)
            .await,
        0x0b
    );
    assert_eq!(device.next_json().await, json!({"n": 1}));
    assert_eq!(
        backend
            .push_with(2, Mp::from(1), &json!({"n": 2}), &json!({}))
            .await,
        0x0b
    );
    assert_eq!(device.next_json().await, json!({"n": 2}));

    // Bad options: 0x0c, nothing delivered, the connection stays usable.
    for bad in [
        json!({"ttl": 0}),
        json!({"id": "a b"}),
        json!({"receipt": "yes"}),
        json!({"reciept": true}),
        json!(["id"]),
    ] {
        assert_eq!(
            backend
                .push_with(2, Mp::from(1), &json!({"bad": 1}), &bad)
                .await,
            0x0c,
            "{bad}"
        );
    }
    // Three items: exactly as before.
    assert_eq!(backend.push(2, Mp::from(1), &json!({"n": 3})).await, 0x00);
    assert_eq!(device.next_json().await, json!({"n": 3}));
}

#[tokio::test]
async fn options_frames_with_durable_intake() {
    let redis = RedisServer::start();
    let mut settings = server::settings(Some(&redis.url));
    settings.intake.durable = true;
    let server = server::start(settings).await;
    options_answered(&server).await;
    server.stop().await;
}

both_registries!(http_answers_each_push_id, http_ids);
async fn http_ids(settings: pushbridge::settings::Settings) {
    let server = server::start(settings).await;
    let body = json!({"notifications": [
        {"user": 1, "data": {"n": 1}},
        {"user": 1, "data": {"n": 2}, "id": "mine-7", "receipt": true, "ttl": 60},
        {"user": 1, "data": {"n": 3}},
    ]});
    let reply = post_json(server.http_addr, "/v1/push", &body).await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    let results = reply.json()["results"].as_array().unwrap().clone();
    let ids: Vec<&str> = results.iter().map(|r| r["id"].as_str().unwrap()).collect();
    assert_eq!(ids[1], "mine-7");
    for generated in [ids[0], ids[2]] {
        assert_eq!(generated.len(), 26, "{generated}");
    }
    assert!(ids[0] < ids[2], "generated ids sort by time: {ids:?}");

    for (notification, want) in [
        (
            json!({"user": 1, "data": {}, "id": ""}),
            "notification.id \"\": 1 to 64",
        ),
        (
            json!({"user": 1, "data": {}, "ttl": 0}),
            "notification.ttl 0: seconds from 1",
        ),
        (
            json!({"user": 1, "data": {}, "ttl": "1"}),
            "notification.ttl \"1\"",
        ),
        (
            json!({"user": 1, "data": {}, "receipt": 1}),
            "notification.receipt 1: must be true or false",
        ),
    ] {
        let reply = post_json(server.http_addr, "/v1/push", &notification).await;
        assert_eq!(reply.status, 400, "{notification}");
        let error = reply.json()["error"].as_str().unwrap().to_owned();
        assert!(error.contains(want), "{error} lacks {want}");
    }
    server.stop().await;
}
