//! Events beyond one push's outcome, and how events leave: devices
//! connecting and disconnecting, dead tokens, the choice of events
//! (`receipts.events`), bounded queues under a flood of connects, https
//! webhooks, and outcomes that survive a kill -9 once reported.

#[path = "support/apns.rs"]
mod apns_server;
mod support;

use std::collections::HashMap;
use std::net::SocketAddr;

use apns_server::{ApnsServer, Reply, TestCredentials};
use pushbridge::push::Id;
use pushbridge::registry::UserStore;
use pushbridge::settings::{EventKind, Settings};
use serde_json::{json, Value};
use support::binary::{settings_file, Running};
use support::http::{get, push_ok};
use support::mqtt::Device;
use support::redis::RedisServer;
use support::webhook::{Options, Receiver};
use support::{server, wait_for, wait_until};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const SECRET: &str = "s3cret";
const APP: &str = "com.example.app";

fn with_webhook(mut settings: Settings, receiver: &Receiver) -> Settings {
    settings.receipts.webhook_url = Some(format!("http://{}/hook", receiver.addr));
    settings.receipts.webhook_secret = Some(SECRET.into());
    settings
}

/// A raw MQTT 3.1.1 client, clean session, past its CONNACK.
async fn raw_connect(addr: SocketAddr, id: &str, keep_alive: u16) -> TcpStream {
    let mut body = vec![0, 4, b'M', b'Q', b'T', b'T', 4, 0x02];
    body.extend(keep_alive.to_be_bytes());
    body.extend((id.len() as u16).to_be_bytes());
    body.extend(id.as_bytes());
    let mut packet = vec![0x10, body.len() as u8];
    packet.extend(body);
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(&packet).await.unwrap();
    let mut ack = [0u8; 4];
    s.read_exact(&mut ack).await.unwrap();
    assert_eq!(ack, [0x20, 2, 0, 0], "CONNACK");
    s
}

fn is(event: &str, client_id: &str) -> impl Fn(&Value) -> bool {
    let (event, client_id) = (event.to_owned(), client_id.to_owned());
    move |e| e["event"] == event && e["client_id"] == client_id
}

/// `device.connected` and `device.disconnected` for every way a
/// connection ends, with receipts off (device events do not need them).
#[tokio::test]
async fn device_events_say_who_connected_and_why_they_left() {
    let mut hook = Receiver::start(SECRET, Options::default()).await;
    let server = server::start(with_webhook(server::settings(None), &hook)).await;
    let mqtt = server.mqtt_addr;

    // A clean DISCONNECT; the user learned from its own topic.
    let mut d1 = Device::connect(mqtt, "d1", true).await;
    let connected = hook.matching(is("device.connected", "d1")).await;
    assert_eq!(
        (
            &connected["users"],
            &connected["protocol"],
            &connected["transport"]
        ),
        (&json!([]), &json!("3.1.1"), &json!("tcp"))
    );
    let peer: SocketAddr = connected["peer"].as_str().unwrap().parse().unwrap();
    assert!(peer.ip().is_loopback() && peer.port() > 0, "{connected}");
    d1.subscribe("push/user/7").await;
    d1.disconnect().await;
    let gone = hook.matching(is("device.disconnected", "d1")).await;
    assert_eq!(
        (&gone["reason"], &gone["users"], &gone["peer"]),
        (&json!("disconnect"), &json!(["7"]), &connected["peer"])
    );
    assert_eq!(gone["connected_at"], connected["connected_at"]);
    assert!(gone["at"].as_u64() >= connected["at"].as_u64());

    // Taken over by a second connection with the same client id.
    let _first = raw_connect(mqtt, "same", 60).await;
    hook.until(is("device.connected", "same")).await;
    let _second = raw_connect(mqtt, "same", 60).await;
    let gone = hook.matching(is("device.disconnected", "same")).await;
    assert_eq!(gone["reason"], "taken_over");

    // Silent past its keep-alive (1 s, held to 1.5 s).
    let _silent = raw_connect(mqtt, "silent", 1).await;
    let gone = hook.matching(is("device.disconnected", "silent")).await;
    assert_eq!(gone["reason"], "keepalive_timeout");

    // A malformed packet, and a socket closed without DISCONNECT.
    let mut bad = raw_connect(mqtt, "bad", 60).await;
    bad.write_all(&[0x00, 0x00]).await.unwrap();
    let gone = hook.matching(is("device.disconnected", "bad")).await;
    assert_eq!(gone["reason"], "error");
    assert!(
        gone["error"].as_str().unwrap().contains("malformed"),
        "{gone}"
    );
    drop(raw_connect(mqtt, "dropped", 60).await);
    let gone = hook.matching(is("device.disconnected", "dropped")).await;
    assert_eq!(gone["reason"], "closed");

    // MQTT 5.
    let opts = rumqttc::v5::MqttOptions::new("v5", mqtt.ip().to_string(), mqtt.port());
    let (_v5, mut events) = rumqttc::v5::AsyncClient::new(opts, 8);
    let poll = tokio::spawn(async move { while events.poll().await.is_ok() {} });
    let v5 = hook.matching(is("device.connected", "v5")).await;
    assert_eq!(v5["protocol"], "5");
    poll.abort();
    server.stop().await;
}

/// Device events go to the Redis Stream too; stopping the server
/// disconnects devices with reason `shutdown`, still published.
#[tokio::test]
async fn device_events_reach_the_stream_and_shutdown_is_a_reason() {
    let redis = RedisServer::start();
    let mut settings = server::settings(Some(&redis.url));
    settings.receipts.stream = Some("events".into());
    let server = server::start(settings).await;
    let _device = raw_connect(server.mqtt_addr, "phone", 60).await;
    wait_for(&server.stats, |s| s.mqtt_connects.get() == 1).await;
    server.stop().await;
    let entries: Vec<(String, Vec<(String, String)>)> = redis::cmd("XRANGE")
        .arg(&["events", "-", "+"][..])
        .query(&mut redis.conn())
        .unwrap();
    let events: Vec<Value> = entries
        .iter()
        .map(|(_, fields)| serde_json::from_str(&fields[0].1).unwrap())
        .collect();
    let names: Vec<(&str, &str)> = events
        .iter()
        .map(|e| {
            (
                e["event"].as_str().unwrap(),
                e["reason"].as_str().unwrap_or(""),
            )
        })
        .collect();
    assert_eq!(
        names,
        [
            ("device.connected", ""),
            ("device.disconnected", "shutdown")
        ]
    );
}

/// A flood of connects against a webhook that never answers: at most
/// `receipts.webhook_queue` events wait; every other one is dropped and
/// counted, none piles up.
#[tokio::test]
async fn a_flood_of_connects_keeps_at_most_the_webhook_queue() {
    let hook = Receiver::start(
        SECRET,
        Options {
            hang: true,
            ..Options::default()
        },
    )
    .await;
    let mut settings = with_webhook(server::settings(None), &hook);
    settings.receipts.webhook_queue = 10;
    let server = server::start(settings).await;
    let flood = 300;
    for i in 0..flood {
        let mut s = raw_connect(server.mqtt_addr, &format!("f{i}"), 60).await;
        s.write_all(&[0xe0, 0x00]).await.unwrap();
    }
    // 2 events a connection; at most 10 waiting (the one request in
    // flight among them), every other one dropped and counted.
    wait_for(&server.stats, |s| {
        s.webhook_dropped.get() + s.events_dropped.get() >= 2 * flood - 10
    })
    .await;
    assert_eq!(server.stats.webhook_sent.get(), 0);
    server.stop().await;
}

/// A local Apple serving `APP` (token credentials, kept alive by the last
/// item), a webhook receiver, and settings with receipts on sending to it.
async fn apple_and_hook() -> (ApnsServer, Receiver, Settings, TestCredentials) {
    let apple = ApnsServer::start().await;
    let hook = Receiver::start(SECRET, Options::default()).await;
    let mut settings = with_webhook(server::settings(None), &hook);
    let creds = apple.serve_token_app(&mut settings, APP);
    settings.receipts.enabled = true;
    (apple, hook, settings, creds)
}

/// `token.dead` whenever Apple says a token is dead, for pushes with and
/// without a receipt: who, which app, a hash and the tail of the token
/// (never the token), and whether pushbridge removed it.
#[tokio::test]
async fn dead_tokens_are_reported_for_every_push() {
    let (apple, mut hook, settings, _creds) = apple_and_hook().await;
    let server = server::start(settings).await;
    let gone = "aa30aa30aa30aa30aa30";
    let bad = "bb31bb31bb31bb31bb31";
    for (uid, token, reply) in [
        (30u64, gone, Reply::Unregistered { timestamp: 1 }),
        (31, bad, Reply::BadDeviceToken),
    ] {
        support::put_ios_user(&server, &Id::from(uid), token, APP).await;
        apple.reply_to(token, reply);
    }
    let plain = json!({"user": 30, "data": {"alert": "hi"}});
    push_ok(server.http_addr, &plain).await;
    let dead = hook.matching(|e| e["event"] == "token.dead").await;
    let sha = |t: &str| -> String {
        let d = ring::digest::digest(&ring::digest::SHA256, t.as_bytes());
        d.as_ref().iter().map(|b| format!("{b:02x}")).collect()
    };
    assert_eq!(
        dead,
        json!({"event": "token.dead", "at": dead["at"], "user": "30", "app": APP,
            "env": "production", "token_sha256": sha(gone), "token_suffix": "aa30aa30",
            "status": 410, "reason": "Unregistered", "removed": true, "push": null})
    );
    let record = server.registry.users(&[Id::from(30u64)]).await.unwrap();
    assert_eq!(record[0].as_ref().and_then(|r| r.app_token.clone()), None);

    let tracked = json!({"user": 31, "data": {"alert": "hi"}, "id": "r-31", "receipt": true});
    push_ok(server.http_addr, &tracked).await;
    let dead = hook.matching(|e| e["event"] == "token.dead").await;
    assert_eq!(
        (
            &dead["user"],
            &dead["status"],
            &dead["reason"],
            &dead["push"]
        ),
        (
            &json!("31"),
            &json!(400),
            &json!("BadDeviceToken"),
            &json!("r-31")
        )
    );
    assert_eq!(dead["token_sha256"], sha(bad));
    server.stop().await;
}

/// `receipts.events` chooses what goes out: with only `token.dead`, a
/// device connecting and a push with a receipt send nothing.
#[tokio::test]
async fn only_the_chosen_events_go_out() {
    let (apple, mut hook, mut settings, _creds) = apple_and_hook().await;
    settings.receipts.events = vec![EventKind::TokenDead];
    let server = server::start(settings).await;
    let mut device = Device::connect(server.mqtt_addr, "d1", true).await;
    device.subscribe("push/user/1").await;
    let tracked = json!({"user": 1, "data": {}, "id": "m1", "receipt": true});
    push_ok(server.http_addr, &tracked).await;
    device.next_publish().await;
    wait_for(&server.stats, |s| s.receipts_recorded.get() >= 2).await;
    for (uid, token) in [(40u64, "cc40"), (41, "cc41")] {
        support::put_ios_user(&server, &Id::from(uid), token, APP).await;
        apple.reply_to(token, Reply::Unregistered { timestamp: 1 });
        let push = json!({"user": uid, "data": {}});
        push_ok(server.http_addr, &push).await;
        // Events leave in order: anything sent before would come first.
        let got = hook.until(|e| e["event"] == "token.dead").await;
        assert_eq!(got.len(), 1, "{got:?}");
        assert_eq!(got[0]["user"], uid.to_string());
    }
    server.stop().await;
}

/// An https webhook, trusting only `receipts.webhook_ca_file`: events
/// arrive signed over TLS.
#[tokio::test]
async fn https_webhook_with_its_own_ca() {
    let dir = tempfile::tempdir().unwrap();
    let pki = support::pki::pki(dir.path(), "hook");
    let tls = Options {
        tls: Some(&pki),
        ..Options::default()
    };
    let mut hook = Receiver::start(SECRET, tls).await;
    let mut settings = server::settings(None);
    settings.receipts.webhook_url = Some(format!("https://localhost:{}/hook", hook.addr.port()));
    settings.receipts.webhook_secret = Some(SECRET.into());
    settings.receipts.webhook_ca_file = Some(pki.ca.clone());
    let server = server::start(settings).await;
    let _device = raw_connect(server.mqtt_addr, "tls-1", 60).await;
    hook.until(is("device.connected", "tls-1")).await;
    assert_eq!(server.stats.webhook_failed.get(), 0);
    server.stop().await;
}

/// An https receiver whose certificate another CA signed is refused: the
/// binary logs why, counts the failed POSTs and tries again; the receiver
/// never gets a request.
// Multi-threaded: the child process is read with blocking calls.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_webhook_with_the_wrong_ca_is_refused_and_retried() {
    let dir = tempfile::tempdir().unwrap();
    let theirs = support::pki::pki(dir.path(), "theirs");
    let ours = support::pki::pki(dir.path(), "ours");
    let tls = Options {
        tls: Some(&theirs),
        ..Options::default()
    };
    let mut hook = Receiver::start(SECRET, tls).await;
    let config = settings_file(
        dir.path(),
        &format!(
            "[receipts]\nwebhook_url = \"https://localhost:{}/hook\"\nwebhook_secret = \"{SECRET}\"\n\
             webhook_ca_file = \"{}\"\n",
            hook.addr.port(),
            ours.ca.display()
        ),
    );
    let server = Running::serve(&config);
    let _device = raw_connect(server.addr("mqtt"), "d1", 60).await;
    for _ in 0..2 {
        let line = server.log_line(&["webhook POST failed", "invalid peer certificate"]);
        assert!(line.contains("UnknownIssuer"), "{line}");
    }
    let metrics = get(server.addr("http"), "/metrics").await.text();
    let failed: u64 = metrics
        .lines()
        .find_map(|l| l.strip_prefix("pushbridge_webhook_failed_total "))
        .expect("webhook_failed in /metrics")
        .parse()
        .unwrap();
    assert!(failed >= 2, "{failed}");
    assert!(hook.requests.try_recv().is_err(), "a request got through");
}

/// Outcome changes Redis refused to store are not reported: the webhook
/// only says what `GET /v1/pushes/{id}` can answer.
#[tokio::test]
async fn changes_the_store_refused_are_not_reported() {
    let redis = RedisServer::start();
    let mut hook = Receiver::start(SECRET, Options::default()).await;
    let mut settings = with_webhook(server::settings(Some(&redis.url)), &hook);
    settings.receipts.enabled = true;
    settings.receipts.events = vec![EventKind::Push];
    let server = server::start(settings).await;
    let mut device = Device::connect(server.mqtt_addr, "d1", true).await;
    device.subscribe("push/user/1").await;
    let acking = tokio::spawn(async move { while device.events.poll().await.is_ok() {} });
    let full = |bytes: &str| {
        let _: () = redis::cmd("CONFIG")
            .arg(&["SET", "maxmemory", bytes][..])
            .query(&mut redis.conn())
            .unwrap();
    };
    full("1");
    let refused = json!({"user": 1, "data": {}, "id": "refused", "receipt": true});
    push_ok(server.http_addr, &refused).await;
    // Routed, written and acknowledged: all refused.
    wait_for(&server.stats, |s| s.receipts_dropped.get() >= 3).await;
    full("0");
    let stored = json!({"user": 1, "data": {}, "id": "stored", "receipt": true});
    push_ok(server.http_addr, &stored).await;
    let got = hook.until(|e| e["push"] == "stored").await;
    assert!(got.iter().all(|e| e["push"] == "stored"), "{got:?}");
    assert_eq!(
        get(server.http_addr, "/v1/pushes/refused").await.status,
        404
    );
    acking.abort();
    server.stop().await;
}

/// "A kill -9 during receipts loses no outcome already reported to the
/// webhook": the real binary, Redis as the registry, devices acknowledging
/// a steady flow of pushes with receipts. Then Redis holds every write
/// (`CLIENT PAUSE WRITE`): once the receipts writer waits on it and the
/// webhook has sent all it had, the binary is killed (SIGKILL) mid-write.
/// An event sent to the webhook before its change was stored would be
/// reported and lost. Every event the webhook received must be in the
/// outcome that a freshly started instance on the same Redis answers.
// Multi-threaded: the child process is read with blocking calls.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_loses_no_outcome_the_webhook_reported() {
    let redis = RedisServer::start();
    let mut hook = Receiver::start(SECRET, Options::default()).await;
    let dir = tempfile::tempdir().unwrap();
    let config = settings_file(
        dir.path(),
        &format!(
            "[registry]\nredis_url = \"{}\"\n[receipts]\nenabled = true\nevents = [\"push\"]\n\
             webhook_url = \"http://{}/hook\"\nwebhook_secret = \"{SECRET}\"\n",
            redis.url, hook.addr
        ),
    );
    let mut first = Running::serve(&config);
    let (mqtt, http) = (first.addr("mqtt"), first.addr("http"));
    let mut devices = Vec::new();
    for i in 0..10 {
        let mut d = Device::connect(mqtt, &format!("k{i}"), true).await;
        d.subscribe(&format!("push/user/{i}")).await;
        devices.push(tokio::spawn(async move {
            while d.events.poll().await.is_ok() {}
        }));
    }
    let pusher = tokio::spawn(async move {
        for round in 0.. {
            let many: Vec<Value> = (0..50)
                .map(|i| json!({"user": i % 10, "data": {"n": i}, "id": format!("k{round}-{i}"), "receipt": true}))
                .collect();
            push_ok(http, &json!({ "notifications": many })).await;
        }
    });

    let mut reported = Vec::new();
    while reported
        .iter()
        .filter(|e: &&Value| e["event"] == "mqtt_acked")
        .count()
        < 300
    {
        let (valid, events) = hook.next().await;
        assert!(valid);
        reported.extend(events);
    }
    let pause = |cmd: &[&str]| {
        let _: () = redis::cmd("CLIENT")
            .arg(cmd)
            .query(&mut redis.conn())
            .unwrap();
    };
    pause(&["PAUSE", "60000", "WRITE"]);
    wait_until(|| {
        let info: String = redis::cmd("INFO")
            .arg("clients")
            .query(&mut redis.conn())
            .unwrap();
        let blocked = !info.contains("blocked_clients:0");
        async move { blocked }
    })
    .await;
    wait_until(|| async {
        let metrics = get(http, "/metrics").await.text();
        metrics.lines().any(|l| l == "pushbridge_webhook_queued 0")
    })
    .await;
    pusher.abort();
    first.kill9();
    pause(&["UNPAUSE"]);
    devices.iter().for_each(|d| d.abort());
    let mut settings = server::settings(Some(&redis.url));
    settings.receipts.enabled = true;
    let fresh = server::start(settings).await;
    while let Ok((_, events)) = hook.requests.try_recv() {
        reported.extend(events);
    }
    // At least once: a batch may come twice.
    let mut once = std::collections::HashSet::new();
    reported.retain(|e| once.insert(e.to_string()));
    let mut acks: HashMap<(String, String), u64> = HashMap::new();
    let mut outcomes: HashMap<String, Value> = HashMap::new();
    for e in &reported {
        let push = e["push"].as_str().unwrap().to_owned();
        if !outcomes.contains_key(&push) {
            let reply = get(fresh.http_addr, &format!("/v1/pushes/{push}")).await;
            assert_eq!(
                reply.status, 200,
                "{push} was reported ({e}) but is not stored"
            );
            outcomes.insert(push.clone(), reply.json());
        }
        let outcome = &outcomes[&push];
        let topic = |name: &Value| {
            outcome["mqtt"]
                .as_array()
                .unwrap()
                .iter()
                .find(|t| t["topic"] == *name)
                .unwrap_or_else(|| panic!("{e} reported, not in {outcome}"))
                .clone()
        };
        match e["event"].as_str().unwrap() {
            "routed" => assert_eq!(outcome["routed_at"], e["at"], "{e} / {outcome}"),
            "mqtt_written" => {
                let t = topic(&e["topic"]);
                assert_eq!(
                    (&t["written_at"], &t["sessions"]),
                    (&e["at"], &e["sessions"])
                );
            }
            "mqtt_acked" => {
                let t = topic(&e["topic"]);
                let seen = acks.entry((push, e["topic"].to_string())).or_default();
                *seen += 1;
                assert!(t["acks"].as_u64().unwrap() >= *seen, "{e} / {outcome}");
                assert!(
                    t["acked_at"].as_u64() >= e["at"].as_u64(),
                    "{e} / {outcome}"
                );
            }
            other => panic!("unexpected event {other}: {e}"),
        }
    }
    assert!(outcomes.len() >= 30, "{} pushes checked", outcomes.len());
    fresh.stop().await;
}
