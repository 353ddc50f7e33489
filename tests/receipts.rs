//! Push ids and receipts over real sockets: 4-item proxy frames, the ids
//! `POST /v1/push` answers, and what became of each push (real MQTT
//! devices, the local APNs server, a second instance sharing Redis).

#[path = "support/apns.rs"]
mod apns_server;
mod support;

use apns_server::{ApnsServer, Reply};
use pushbridge::push::Id;
use pushbridge::settings::{EventKind, Settings};
use rmpv::Value as Mp;
use rumqttc::v5::mqttbytes::v5 as mq5;
use serde_json::{json, Value};
use std::net::SocketAddr;
use support::http::{get, post_json, push_ok};
use support::mqtt::Device;
use support::proxy::Backend;
use support::redis::RedisServer;
use support::webhook::{Options, Receiver};
use support::{server, wait_until};

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
    let reply = push_ok(server.http_addr, &body).await;
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

fn with_receipts(mut settings: Settings) -> Settings {
    settings.receipts.enabled = true;
    settings
}

/// `GET /v1/pushes/{id}` once `done` holds for its answer (polled: the
/// outcome changes as devices and Apple answer).
async fn outcome_until(addr: SocketAddr, id: &str, done: impl Fn(&Value) -> bool) -> Value {
    let path = format!("/v1/pushes/{id}");
    let mut last = Value::Null;
    let found = tokio::time::timeout(support::WAIT, async {
        loop {
            let reply = get(addr, &path).await;
            if reply.status == 200 {
                last = reply.json();
                if done(&last) {
                    return last.clone();
                }
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
    })
    .await;
    found.unwrap_or_else(|_| panic!("{path} never got there; last answer: {last}"))
}

/// The topic's entry of an outcome.
fn topic<'a>(outcome: &'a Value, name: &str) -> &'a Value {
    outcome["mqtt"]
        .as_array()
        .and_then(|a| a.iter().find(|t| t["topic"] == name))
        .unwrap_or_else(|| panic!("no {name} in {outcome}"))
}

/// A device that acknowledges everything it gets: its event loop polled
/// on its own task (rumqttc sends the PUBACK on the next poll).
async fn acking_device(addr: SocketAddr, id: &str, topic: &str) -> tokio::task::JoinHandle<()> {
    let mut device = Device::connect(addr, id, true).await;
    device.subscribe(topic).await;
    tokio::spawn(async move { while device.events.poll().await.is_ok() {} })
}

/// A device that takes QoS 1 messages and never acknowledges them.
async fn silent_device(addr: SocketAddr, id: &str, topic: &str) -> Device {
    let mut opts = Device::options(addr, id, true);
    opts.set_manual_acks(true);
    let mut device = Device::connect_opts(opts).await;
    device.subscribe(topic).await;
    device
}

both_registries!(mqtt_outcomes_per_target, mqtt_outcomes);
async fn mqtt_outcomes(settings: Settings) {
    let server = server::start(with_receipts(settings)).await;
    let http = server.http_addr;
    let acking = acking_device(server.mqtt_addr, "acks", "push/user/1").await;
    let mut silent = silent_device(server.mqtt_addr, "silent", "push/user/2").await;
    let mut backend = Backend::connect(server.proxy_addr).await;

    // User 1 acknowledges, user 2 never does, user 3 is offline.
    let ids = Mp::Array(vec![Mp::from(1), Mp::from(2), Mp::from(3)]);
    let opts = json!({"id": "p1", "receipt": true});
    assert_eq!(
        backend.push_with(3, ids, &json!({"n": 1}), &opts).await,
        0x0b
    );
    let (_, payload, _) = silent.next_publish().await;
    assert_eq!(&payload[..], br#"{"n":1}"#);
    let got = outcome_until(http, "p1", |o| {
        topic(o, "push/user/1")["acks"] == 1
            && o["offline"].as_array().is_some_and(|a| !a.is_empty())
    })
    .await;
    assert_eq!(got["id"], "p1");
    assert!(got["routed_at"].as_u64().is_some(), "{got}");
    let one = topic(&got, "push/user/1");
    assert_eq!(one["sessions"], 1);
    assert!(
        one["acked_at"].as_u64() >= one["written_at"].as_u64(),
        "{got}"
    );
    let two = topic(&got, "push/user/2");
    assert_eq!(
        (two["sessions"].clone(), two["acks"].clone()),
        (json!(1), json!(0))
    );
    assert_eq!(two["acked_at"], Value::Null);
    let three = topic(&got, "push/user/3");
    assert_eq!(three["sessions"], 0);
    assert_eq!(got["offline"][0]["user"], "3");
    assert_eq!(got["offline"][0]["state"], "kept");
    assert_eq!(got["unknown_users"], json!(["1", "2", "3"]));

    // User 3 comes back: kept -> replayed -> acknowledged.
    let back = acking_device(server.mqtt_addr, "back", "push/user/3").await;
    let got = outcome_until(http, "p1", |o| topic(o, "push/user/3")["acks"] == 1).await;
    assert_eq!(got["offline"][0]["state"], "replayed", "{got}");
    assert_eq!(topic(&got, "push/user/3")["sessions"], 0);

    // A group push: per topic, sessions reached and acknowledgements.
    let g1 = acking_device(server.mqtt_addr, "g1", "push/group/7").await;
    let g2 = acking_device(server.mqtt_addr, "g2", "push/group/7").await;
    let opts = json!({"id": "g-7", "receipt": true});
    assert_eq!(
        backend
            .push_with(1, Mp::from(7), &json!({"g": 1}), &opts)
            .await,
        0x0b
    );
    let got = outcome_until(http, "g-7", |o| topic(o, "push/group/7")["acks"] == 2).await;
    assert_eq!(topic(&got, "push/group/7")["sessions"], 2);

    // Without `receipt`, nothing is recorded; a bad id is a 400.
    let opts = json!({"id": "p2"});
    assert_eq!(
        backend
            .push_with(2, Mp::from(1), &json!({"n": 2}), &opts)
            .await,
        0x0b
    );
    assert_eq!(
        backend.push(2, Mp::from(1), &json!({"sentinel": 1})).await,
        0x00
    );
    let reply = get(http, "/v1/pushes/p2").await;
    assert_eq!(reply.status, 404, "{}", reply.text());
    assert!(reply.json()["error"]
        .as_str()
        .unwrap()
        .contains("receipt: true"));
    assert_eq!(get(http, "/v1/pushes/a%20b").await.status, 400);
    for task in [acking, back, g1, g2] {
        task.abort();
    }
    server.stop().await;
}

#[tokio::test]
async fn receipts_off_answer_404_and_record_nothing() {
    let server = server::start(server::settings(None)).await;
    let body = json!({"user": 1, "data": {}, "id": "x1", "receipt": true});
    push_ok(server.http_addr, &body).await;
    let reply = get(server.http_addr, "/v1/pushes/x1").await;
    assert_eq!(reply.status, 404);
    assert!(
        reply.text().contains("receipts.enabled"),
        "{}",
        reply.text()
    );
    assert_eq!(server.stats.receipts_recorded.get(), 0);
    server.stop().await;
}

const APP: &str = "com.example.app";

both_registries!(apns_outcomes_per_user, apns_outcomes);
async fn apns_outcomes(mut settings: Settings) {
    let apple = ApnsServer::start().await;
    let _creds = apple.serve_token_app(&mut settings, APP);
    settings.apns.retry_attempts = 1;
    let server = server::start(with_receipts(settings)).await;
    for (uid, token, reply) in [
        (20u64, "aa20", Reply::Ok),
        (21, "aa21", Reply::Unregistered { timestamp: 1 }),
        (22, "aa22", Reply::InternalServerError),
    ] {
        support::put_ios_user(&server, &Id::from(uid), token, APP).await;
        apple.reply_to(token, reply);
    }
    let body =
        json!({"users": [20, 21, 22], "data": {"alert": "hi"}, "id": "apns-1", "receipt": true});
    push_ok(server.http_addr, &body).await;
    let got = outcome_until(server.http_addr, "apns-1", |o| {
        o["apns"]
            .as_array()
            .is_some_and(|a| a.iter().all(|u| u["state"] != "pending"))
    })
    .await;
    let user = |uid: &str| {
        got["apns"]
            .as_array()
            .unwrap()
            .iter()
            .find(|u| u["user"] == uid)
            .unwrap_or_else(|| panic!("no user {uid} in {got}"))
            .clone()
    };
    let ok = user("20");
    assert_eq!(ok["state"], "accepted");
    assert!(!ok["apns_id"].as_str().unwrap().is_empty(), "{ok}");
    assert_eq!(user("21")["state"], "dead_token");
    assert_eq!(user("21")["reason"], "Unregistered");
    let failed = user("22");
    assert_eq!(
        (failed["state"].clone(), failed["status"].clone()),
        (json!("rejected"), json!(500))
    );
    assert!(
        failed["reason"]
            .as_str()
            .unwrap()
            .contains("InternalServerError"),
        "{failed}"
    );
    server.stop().await;
}

/// Any instance answers for a push another delivered, when Redis is the registry.
#[tokio::test]
async fn a_second_instance_sharing_redis_answers() {
    let redis = RedisServer::start();
    let a = server::start(with_receipts(server::settings(Some(&redis.url)))).await;
    let b = server::start(with_receipts(server::settings(Some(&redis.url)))).await;
    let acking = acking_device(a.mqtt_addr, "d1", "push/user/1").await;
    let body = json!({"user": 1, "data": {"n": 1}, "receipt": true});
    let reply = push_ok(a.http_addr, &body).await;
    let id = reply.json()["results"][0]["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let got = outcome_until(b.http_addr, &id, |o| topic(o, "push/user/1")["acks"] == 1).await;
    assert_eq!(got["id"], id.as_str());
    let mut conn = redis.conn();
    let ttl: i64 = redis::cmd("TTL")
        .arg(format!("Receipt:{id}"))
        .query(&mut conn)
        .unwrap();
    assert!(ttl > 0 && ttl <= 86_400, "TTL {ttl}");
    // The user's last pushes: a list beside the hash, with the same TTL.
    let listed = get(b.http_addr, "/v1/users/1/pushes").await.json();
    assert_eq!(listed["pushes"][0]["id"], id.as_str());
    let ttl: i64 = redis::cmd("TTL")
        .arg("Receipt:user/1")
        .query(&mut conn)
        .unwrap();
    assert!(ttl > 0 && ttl <= 86_400, "TTL {ttl}");
    acking.abort();
    a.stop().await;
    b.stop().await;
}

/// More receipts than `receipts.max_records`: the oldest are forgotten
/// (counted), the newest answered.
#[tokio::test]
async fn the_memory_store_stays_within_its_bound() {
    let mut settings = with_receipts(server::settings(None));
    settings.receipts.max_records = 5;
    let server = server::start(settings).await;
    let notifications: Vec<Value> = (0..20)
        .map(|i| json!({"user": 1, "data": {}, "id": format!("b{i}"), "receipt": true}))
        .collect();
    let body = json!({ "notifications": notifications });
    push_ok(server.http_addr, &body).await;
    outcome_until(server.http_addr, "b19", |_| true).await;
    wait_until(|| async { server.stats.receipts_evicted.get() == 15 }).await;
    assert_eq!(get(server.http_addr, "/v1/pushes/b0").await.status, 404);
    assert_eq!(get(server.http_addr, "/v1/pushes/b14").await.status, 404);
    assert_eq!(get(server.http_addr, "/v1/pushes/b15").await.status, 200);
    server.stop().await;
}

/// A device that never acknowledges is reported `timeout` once
/// `receipts.ack_timeout_secs` has passed; one that does, `acked`.
#[tokio::test]
async fn unacknowledged_pushes_time_out() {
    let mut settings = with_receipts(server::settings(None));
    settings.receipts.ack_timeout_secs = 1;
    let server = server::start(settings).await;
    let acking = acking_device(server.mqtt_addr, "acks", "push/user/1").await;
    let mut silent = silent_device(server.mqtt_addr, "silent", "push/user/2").await;
    let body = json!({"users": [1, 2], "data": {"n": 1}, "id": "t1", "receipt": true});
    push_ok(server.http_addr, &body).await;
    silent.next_publish().await;
    let got = outcome_until(server.http_addr, "t1", |o| {
        topic(o, "push/user/2")["state"] == "timeout"
    })
    .await;
    assert_eq!(topic(&got, "push/user/1")["state"], "acked");
    assert_eq!(topic(&got, "push/user/2")["acks"], 0);
    acking.abort();
    server.stop().await;
}

/// A push's TTL: the MQTT 5 message expiry interval, not sent once expired
/// in a session's queue, kept offline no longer than it, and APNs's
/// `apns-expiration`.
#[tokio::test]
async fn ttl_reaches_every_channel() {
    let apple = ApnsServer::start().await;
    let mut settings = with_receipts(server::settings(None));
    let _creds = apple.serve_token_app(&mut settings, APP);
    let server = server::start(settings).await;
    let http = server.http_addr;

    // MQTT 5: the interval left.
    let mut opts = rumqttc::v5::MqttOptions::new("v5", "127.0.0.1", server.mqtt_addr.port());
    opts.set_keep_alive(std::time::Duration::from_secs(30));
    let (client, mut events) = rumqttc::v5::AsyncClient::new(opts, 8);
    client
        .subscribe("push/user/5", rumqttc::v5::mqttbytes::QoS::AtLeastOnce)
        .await
        .unwrap();
    v5_until(&mut events, |p| matches!(p, mq5::Packet::SubAck(..))).await;
    let body = json!({"user": 5, "data": {"n": 1}, "ttl": 3600});
    push_ok(http, &body).await;
    let mq5::Packet::Publish(p) =
        v5_until(&mut events, |p| matches!(p, mq5::Packet::Publish(..))).await
    else {
        unreachable!()
    };
    let expiry = p.properties.and_then(|p| p.message_expiry_interval);
    assert!(matches!(expiry, Some(3590..=3600)), "{expiry:?}");

    // Queued in an offline persistent session past its TTL: not sent.
    let mut d = Device::connect(server.mqtt_addr, "p6", false).await;
    d.subscribe("push/user/6").await;
    d.disconnect().await;
    let body = json!({"user": 6, "data": {"n": 1}, "ttl": 1});
    let sent_at = pushbridge::utc::now_ms();
    push_ok(http, &body).await;
    // Kept offline for user 7 with a receipt, for as long as its TTL.
    let body = json!({"user": 7, "data": {"n": 1}, "ttl": 1, "id": "off-7", "receipt": true});
    push_ok(http, &body).await;
    outcome_until(http, "off-7", |o| o["offline"][0]["state"] == "kept").await;
    wait_until(|| async { pushbridge::utc::now_ms() > sent_at + 1_100 }).await;
    let mut d = Device::connect(server.mqtt_addr, "p6", false).await;
    let body = json!({"user": 6, "data": {"sentinel": 1}});
    push_ok(http, &body).await;
    assert_eq!(d.next_json().await, json!({"sentinel": 1}));
    assert_eq!(server.stats.mqtt_expired.get(), 1);
    let back = acking_device(server.mqtt_addr, "d7", "push/user/7").await;
    let got = outcome_until(http, "off-7", |o| o["offline"][0]["state"] == "expired").await;
    assert_eq!(topic(&got, "push/user/7")["acks"], 0);

    // APNs: apns-expiration is now + TTL.
    support::put_ios_user(&server, &Id::from(8), "aa08", APP).await;
    let body = json!({"user": 8, "data": {"alert": "a"}, "ttl": 600});
    push_ok(http, &body).await;
    let req = apple.next_request(support::WAIT).await;
    let at: u64 = req.header("apns-expiration").unwrap().parse().unwrap();
    let now = pushbridge::utc::now();
    assert!(
        at > now + 590 && at <= now + 600,
        "apns-expiration {at}, now {now}"
    );
    back.abort();
    server.stop().await;
}

/// The next v5 packet matching `want`; panics after WAIT.
async fn v5_until(
    events: &mut rumqttc::v5::EventLoop,
    want: impl Fn(&mq5::Packet) -> bool,
) -> mq5::Packet {
    tokio::time::timeout(support::WAIT, async {
        loop {
            if let rumqttc::v5::Event::Incoming(p) = events.poll().await.expect("v5 connection") {
                if want(&p) {
                    return p;
                }
            }
        }
    })
    .await
    .expect("v5 packet in time")
}

/// Outcome changes reach the webhook signed, and a batch answered 500 is
/// sent again.
#[tokio::test]
async fn webhook_gets_signed_events_and_retries_after_a_500() {
    let options = Options {
        fail_first: 1,
        ..Options::default()
    };
    let mut receiver = Receiver::start("s3cret", options).await;
    let mut settings = with_receipts(server::settings(None));
    settings.receipts.events = vec![EventKind::Push];
    settings.receipts.webhook_url = Some(format!("http://{}/hook", receiver.addr));
    settings.receipts.webhook_secret = Some("s3cret".into());
    let server = server::start(settings).await;
    let acking = acking_device(server.mqtt_addr, "d1", "push/user/1").await;
    let body = json!({"user": 1, "data": {"n": 1}, "id": "w1", "receipt": true});
    push_ok(server.http_addr, &body).await;

    // Requests until an `mqtt_acked` arrived in an accepted (2nd or later) one.
    let mut requests = Vec::new();
    tokio::time::timeout(support::WAIT, async {
        while let Some((valid, events)) = receiver.requests.recv().await {
            assert!(valid, "bad signature on {events:?}");
            let acked = events.iter().any(|e| e["event"] == "mqtt_acked");
            requests.push(events);
            if acked && requests.len() > 1 {
                break;
            }
        }
    })
    .await
    .expect("webhook requests in time");
    // The first (answered 500) batch came again, in order, at the start of the next.
    let first = &requests[0];
    assert_eq!(&requests[1][..first.len()], &first[..]);
    assert_eq!(first[0]["event"], "routed");
    assert_eq!(first[0]["push"], "w1");
    let all: Vec<&Value> = requests[1..].iter().flatten().collect();
    let acked = all.iter().find(|e| e["event"] == "mqtt_acked").unwrap();
    assert_eq!(
        (acked["topic"].clone(), acked["client_id"].clone()),
        (json!("push/user/1"), json!("d1"))
    );
    assert!(acked["at"].as_u64().is_some());
    wait_until(|| async { server.stats.webhook_failed.get() == 1 }).await;
    acking.abort();
    server.stop().await;
}

/// `/v1/stats` and `/metrics`: messages written to sessions, acknowledged
/// by devices, and the arrival rate per minute, hour and day.
#[tokio::test]
async fn arrival_rate_in_stats_and_metrics() {
    let server = server::start(server::settings(None)).await;
    let http = server.http_addr;
    let acking = acking_device(server.mqtt_addr, "acks", "push/user/1").await;
    let mut silent = silent_device(server.mqtt_addr, "silent", "push/user/2").await;
    let body = json!({"notifications": [
        {"user": 1, "data": {"n": 1}}, {"user": 1, "data": {"n": 2}}, {"user": 2, "data": {"n": 3}},
    ]});
    push_ok(http, &body).await;
    silent.next_publish().await;
    let sum = |s: &Value, series: &str, field: &str| -> u64 {
        s[series]
            .as_array()
            .unwrap()
            .iter()
            .map(|b| b[field].as_u64().unwrap())
            .sum()
    };
    wait_until(|| async {
        let s = get(http, "/v1/stats").await.json();
        sum(&s, "per_day", "mqtt_acked") == 2
    })
    .await;
    let s = get(http, "/v1/stats").await.json();
    for series in ["per_minute", "per_hour", "per_day"] {
        assert_eq!(sum(&s, series, "mqtt_written"), 3, "{series}");
        assert_eq!(sum(&s, series, "mqtt_acked"), 2, "{series}");
        assert_eq!(sum(&s, series, "apns_sent"), 0, "{series}");
    }
    // Nothing sent in a bucket: no rate; otherwise acknowledged / sent.
    let days = s["per_day"].as_array().unwrap();
    assert_eq!(days[0]["arrival_rate"], Value::Null);
    let today = days.last().unwrap();
    let rate = today["arrival_rate"].as_f64().unwrap();
    let (w, a) = (
        today["mqtt_written"].as_f64().unwrap(),
        today["mqtt_acked"].as_f64().unwrap(),
    );
    assert!((rate - a / w).abs() < 1e-9, "{today}");
    let metrics = get(http, "/metrics").await.text();
    assert!(
        metrics.contains("pushbridge_mqtt_acked_total 2"),
        "{metrics}"
    );
    assert!(
        metrics.contains("pushbridge_mqtt_written_total 3"),
        "{metrics}"
    );
    assert!(
        metrics.contains(&format!("pushbridge_arrival_rate{{window=\"day\"}} {rate}")),
        "{metrics}"
    );
    acking.abort();
    server.stop().await;
}

/// With `receipts.stream`, every outcome change is in a Redis Stream a
/// backend reads with XREADGROUP, trimmed near `receipts.stream_max_len`.
#[tokio::test]
async fn events_go_to_a_bounded_redis_stream() {
    let redis = RedisServer::start();
    let mut conn = redis.conn();
    let _: () = redis::cmd("XGROUP")
        .arg(&["CREATE", "rcpt", "backend", "$", "MKSTREAM"][..])
        .query(&mut conn)
        .unwrap();
    let mut settings = with_receipts(server::settings(Some(&redis.url)));
    settings.receipts.stream = Some("rcpt".into());
    settings.receipts.stream_max_len = 10;
    settings.receipts.events = vec![EventKind::Push];
    let server = server::start(settings).await;
    let acking = acking_device(server.mqtt_addr, "d1", "push/user/1").await;
    let body = json!({"user": 1, "data": {"n": 1}, "id": "s1", "receipt": true});
    push_ok(server.http_addr, &body).await;

    let mut events: Vec<Value> = Vec::new();
    wait_until(|| {
        let reply: redis::streams::StreamReadReply = redis::cmd("XREADGROUP")
            .arg(
                &[
                    "GROUP", "backend", "c1", "COUNT", "100", "STREAMS", "rcpt", ">",
                ][..],
            )
            .query(&mut conn)
            .unwrap_or_default();
        for key in reply.keys {
            for entry in key.ids {
                let raw: String = entry.get("event").unwrap();
                events.push(serde_json::from_str(&raw).unwrap());
            }
        }
        let acked = events
            .iter()
            .any(|e| e["event"] == "mqtt_acked" && e["push"] == "s1");
        async move { acked }
    })
    .await;
    assert_eq!(events[0]["event"], "routed");

    // 600 more changes: the stream stays near its bound (MAXLEN ~ trims
    // whole nodes of 100 entries).
    for round in 0..2 {
        let many: Vec<Value> = (0..100)
            .map(|i| json!({"user": 1, "data": {}, "id": format!("m{round}-{i}"), "receipt": true}))
            .collect();
        let body = json!({ "notifications": many });
        push_ok(server.http_addr, &body).await;
    }
    wait_until(|| async { server.stats.mqtt_acked.get() >= 201 }).await;
    wait_until(|| async { server.stats.receipts_recorded.get() >= 603 }).await;
    let len: u64 = redis::cmd("XLEN")
        .arg("rcpt")
        .query(&mut redis.conn())
        .unwrap();
    assert!(len <= 110, "stream holds {len} entries");
    acking.abort();
    server.stop().await;
}

both_registries!(a_users_last_pushes_are_listed, users_last_pushes);
/// `GET /v1/users/{id}/pushes`: the newest receipts of pushes for that
/// user (a `users` push counts for each), at most 20 however many are sent.
async fn users_last_pushes(settings: Settings) {
    let server = server::start(with_receipts(settings)).await;
    let http = server.http_addr;
    let mut notifications: Vec<Value> = (0..25)
        .map(|i| json!({"user": 5, "data": {}, "id": format!("u{i}"), "receipt": true}))
        .collect();
    notifications.push(json!({"users": [5, 6], "data": {}, "id": "both", "receipt": true}));
    notifications.push(json!({"user": 7, "data": {}, "id": "untracked"}));
    let body = json!({ "notifications": notifications });
    push_ok(http, &body).await;
    outcome_until(http, "both", |_| true).await;
    let listed = |user: u32| async move {
        let reply = get(http, &format!("/v1/users/{user}/pushes")).await;
        assert_eq!(reply.status, 200, "{}", reply.text());
        let body = reply.json();
        assert_eq!(body["user"], user.to_string());
        body["pushes"]
            .as_array()
            .unwrap()
            .iter()
            .map(|o| o["id"].as_str().unwrap().to_owned())
            .collect::<Vec<_>>()
    };
    let five = listed(5).await;
    let mut want = vec!["both".to_string()];
    want.extend((6..25).rev().map(|i| format!("u{i}")));
    assert_eq!(five, want);
    assert_eq!(listed(6).await, ["both"]);
    assert!(listed(7).await.is_empty());
    let newest = get(http, "/v1/users/6/pushes").await.json();
    assert!(newest["pushes"][0]["mqtt"].is_array(), "{newest}");
    assert_eq!(get(http, "/v1/users/a+b/pushes").await.status, 400);
    server.stop().await;
}

#[tokio::test]
async fn users_last_pushes_404_when_receipts_are_off() {
    let server = server::start(server::settings(None)).await;
    let reply = get(server.http_addr, "/v1/users/5/pushes").await;
    assert_eq!(reply.status, 404);
    assert!(
        reply.text().contains("receipts.enabled"),
        "{}",
        reply.text()
    );
    server.stop().await;
}
