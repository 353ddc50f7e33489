//! External broker mode against a real Mosquitto: pushes reach its
//! subscribers, status published there sets focus, nothing accepted is lost
//! to a broker restart, and a shared status subscription is handled once.

mod support;

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use pushbridge::settings::QueueFull;
use pushbridge::stats::Stats;
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};
use rmpv::Value as Mp;
use rumqttc::{AsyncClient, Event, Packet, QoS};
use serde_json::json;
use support::mosquitto::Mosquitto;
use support::mqtt::Device;
use support::proxy::Backend;
use support::{server, wait_for, wait_until};
use tokio_util::sync::CancellationToken;

fn settings(
    broker: &Mosquitto,
    client_id: &str,
    redis: Option<&str>,
) -> pushbridge::settings::Settings {
    let mut s = server::settings(redis);
    s.mqtt.external_url = Some(broker.url().into());
    s.mqtt.external_client_id = Some(client_id.into());
    s
}

#[tokio::test]
async fn push_reaches_a_client_of_the_external_broker() {
    let broker = Mosquitto::start();
    let mut s = settings(&broker, "pb-1", None);
    s.mqtt.max_packet_size = 1024;
    let server = server::start(s).await;
    let mut device = Device::connect(broker.addr(), "d42", true).await;
    device.subscribe("push/user/42").await;
    let mut group = Device::connect(broker.addr(), "g7", true).await;
    group.subscribe("push/group/7").await;

    let mut backend = Backend::connect(server.proxy_addr).await;
    // Too large for mqtt.max_packet_size: dropped and counted, and it does
    // not hold up what follows.
    let big = json!({"big": "x".repeat(2000)});
    assert_eq!(backend.push(2, Mp::from(42), &big).await, 0);
    assert_eq!(backend.push(2, Mp::from(42), &json!({"n": 1})).await, 0);
    assert_eq!(backend.push(1, Mp::from("7"), &json!({"g": 1})).await, 0);
    let (topic, payload, qos) = device.next_publish().await;
    assert_eq!((topic.as_str(), qos), ("push/user/42", QoS::AtLeastOnce));
    assert_eq!(
        serde_json::from_slice::<serde_json::Value>(&payload).unwrap(),
        json!({"n": 1})
    );
    assert_eq!(group.next_json().await, json!({"g": 1}));
    wait_for(&server.stats, |s| s.mqtt_external_acked.get() == 2).await;
    assert_eq!(server.stats.mqtt_outbox_dropped.get(), 1);
    server.stop().await;
}

#[tokio::test]
async fn status_on_the_external_broker_sets_focus() {
    let broker = Mosquitto::start();
    let server = server::start(settings(&broker, "pb-1", None)).await;
    wait_for(&server.stats, |s| s.mqtt_external_subscribed.get() >= 1).await;
    support::status_sets_and_clears_focus(&server, broker.addr()).await;
    server.stop().await;
}

#[tokio::test]
async fn mqtts_with_a_private_ca() {
    let dir = tempfile::tempdir().unwrap();
    let (ca, cert, key) = pki(dir.path());
    let tls_port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .unwrap()
        .port();
    let broker = Mosquitto::start_with(&format!(
        "listener {tls_port} 127.0.0.1\ncertfile {}\nkeyfile {}",
        cert.display(),
        key.display()
    ));
    let mut s = settings(&broker, "pb-tls", None);
    s.mqtt.external_url = Some(format!("mqtts://localhost:{tls_port}").into());
    s.mqtt.external_ca_file = Some(ca);
    let server = server::start(s).await;
    let mut device = Device::connect(broker.addr(), "d42", true).await;
    device.subscribe("push/user/42").await;
    let mut backend = Backend::connect(server.proxy_addr).await;
    assert_eq!(backend.push(2, Mp::from(42), &json!({"tls": 1})).await, 0);
    assert_eq!(device.next_json().await, json!({"tls": 1}));
    server.stop().await;
}

/// A CA, and a certificate for localhost it signed: PEM files in `dir`.
fn pki(dir: &Path) -> (PathBuf, PathBuf, PathBuf) {
    let ca_key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params
        .distinguished_name
        .push(DnType::CommonName, "test CA");
    let ca = params.self_signed(&ca_key).unwrap();
    let key = KeyPair::generate().unwrap();
    let params = CertificateParams::new(vec!["localhost".into()]).unwrap();
    let cert = params.signed_by(&key, &ca, &ca_key).unwrap();
    let paths = (
        dir.join("ca.pem"),
        dir.join("cert.pem"),
        dir.join("key.pem"),
    );
    std::fs::write(&paths.0, ca.pem()).unwrap();
    std::fs::write(&paths.1, cert.pem()).unwrap();
    std::fs::write(&paths.2, key.serialize_pem()).unwrap();
    paths
}

/// Pushes accepted before and while the broker is paused, then killed and
/// started again with nothing remembered: each reaches a device (persistent
/// session, resubscribing after the restart) at least once.
#[tokio::test]
async fn broker_restart_loses_no_accepted_push() {
    const N: usize = 400;
    let mut broker = Mosquitto::start();
    let server = server::start(settings(&broker, "pb-restart", None)).await;
    let stats = server.stats.clone();
    wait_for(&stats, |s| s.mqtt_external_subscribed.get() >= 1).await;
    let device = Collector::start(&broker, "dev-5", "push/user/5");
    device.wait_subscribed(1).await;

    let mut backend = Backend::connect(server.proxy_addr).await;
    for n in 0..N / 2 {
        assert_eq!(backend.push(2, Mp::from(5), &json!({"n": n})).await, 0);
    }
    // Paused: it reads and acknowledges nothing more; the rest pile up
    // unacknowledged in pushbridge's outbox and rumqttc's socket.
    broker.pause();
    for n in N / 2..N {
        assert_eq!(backend.push(2, Mp::from(5), &json!({"n": n})).await, 0);
    }
    // Whatever it did acknowledge was written to the device before its
    // PUBACK (no inflight limit): let the device read it before the kill.
    let (seen, acked) = (device.seen.clone(), stats.clone());
    wait_until(|| {
        let n = seen.lock().unwrap().len() as u64;
        let acked = acked.mqtt_external_acked.get();
        async move { n >= acked }
    })
    .await;
    broker.kill();
    // Only the device may connect until it has subscribed again, so that
    // the republished pushes have a subscriber to reach.
    broker.restart("clientid_prefixes dev");
    device.wait_subscribed(2).await;
    broker.write_config("");
    broker.reload();

    let seen = device.seen.clone();
    wait_until(|| {
        let n = seen.lock().unwrap().len();
        async move { n == N }
    })
    .await;
    let expected: HashSet<String> = (0..N).map(|n| json!({"n": n}).to_string()).collect();
    assert_eq!(*device.seen.lock().unwrap(), expected);
    assert_eq!(stats.pushes_accepted.get(), N as u64);
    assert!(
        stats.mqtt_external_republished.get() > 0,
        "nothing was in flight"
    );
    assert!(stats.mqtt_external_connects.get() >= 2);
    wait_for(&stats, |s| s.mqtt_external_acked.get() >= N as u64).await;
    server.stop().await;
}

/// A full outbox (the broker acknowledges nothing while paused): `drop`
/// keeps the first `outbox` pushes and counts the rest; `wait` holds the
/// router until PUBACKs make room, losing none.
#[tokio::test]
async fn full_outbox_drops_or_waits() {
    for (full, delivered) in [(QueueFull::Drop, 5), (QueueFull::Wait, 10)] {
        let broker = Mosquitto::start();
        let mut s = settings(&broker, "pb-full", None);
        s.mqtt.outbox = 5;
        s.mqtt.outbox_full = full;
        let server = server::start(s).await;
        let stats = server.stats.clone();
        wait_for(&stats, |s| s.mqtt_external_subscribed.get() >= 1).await;
        let mut device = Device::connect(broker.addr(), "d42", true).await;
        device.subscribe("push/user/42").await;
        broker.pause();
        let mut backend = Backend::connect(server.proxy_addr).await;
        for n in 0..10 {
            assert_eq!(backend.push(2, Mp::from(42), &json!({"n": n})).await, 0);
        }
        if full == QueueFull::Drop {
            wait_for(&stats, |s| s.mqtt_outbox_dropped.get() == 5).await;
        } else {
            wait_for(&stats, |s| s.mqtt_published.get() == 5).await;
        }
        broker.resume();
        for n in 0..delivered {
            assert_eq!(device.next_json().await, json!({"n": n}), "{full:?}");
        }
        wait_for(&stats, move |s| s.mqtt_external_acked.get() == delivered).await;
        let dropped = if full == QueueFull::Drop { 5 } else { 0 };
        assert_eq!(stats.mqtt_outbox_dropped.get(), dropped);
        server.stop().await;
    }
}

/// For callers that acknowledge only delivered messages: the receiver
/// resolves at the PUBACK, and fails at once for a dropped message.
#[tokio::test]
async fn publish_confirmed_resolves_at_the_puback() {
    use pushbridge::external::{Context, ExternalBroker};
    let broker = Mosquitto::start();
    let mut s = settings(&broker, "pb-confirm", None);
    s.mqtt.outbox = 1;
    s.mqtt.outbox_full = QueueFull::Drop;
    let stats = Arc::new(Stats::default());
    let (events, _status) = tokio::sync::mpsc::channel(16);
    let cx = Context {
        events,
        stats: stats.clone(),
        drain: Duration::from_secs(1),
        offline: pushbridge::offline::OfflineStore::new(
            &pushbridge::registry::Registry::open(&s.registry)
                .await
                .unwrap(),
            &s.registry,
            &s.offline,
        ),
        feedback_topic: "push/feedback".into(),
    };
    let rest = pushbridge::lifecycle::Lifecycle::new(CancellationToken::new()).rest;
    let ext = ExternalBroker::start(&s.mqtt, cx, &rest).unwrap();
    wait_for(&stats, |s| s.mqtt_external_subscribed.get() >= 1).await;

    broker.pause();
    let mut kept = ext.publish_confirmed("push/user/1", "a".into()).await;
    let dropped = ext.publish_confirmed("push/user/1", "b".into()).await;
    assert!(dropped.await.is_err(), "the outbox had no room");
    assert!(kept.try_recv().is_err(), "no PUBACK from a paused broker");
    broker.resume();
    tokio::time::timeout(support::WAIT, kept)
        .await
        .expect("PUBACK in time")
        .expect("confirmed");
    assert_eq!(stats.mqtt_external_acked.get(), 1);
    rest.end().await;
}

/// Two instances on one Redis and one broker: with the shared subscription
/// each status message is applied once, by one of them; without it, twice.
#[tokio::test]
async fn shared_status_subscription_is_handled_once() {
    assert_eq!(status_applications("pushbridge").await, (STATUSES, true));
}

#[tokio::test]
async fn plain_status_subscription_is_handled_by_every_instance() {
    assert_eq!(status_applications("").await, (2 * STATUSES, false));
}

const STATUSES: u64 = 10;

/// Status updates applied by two instances in all, once every user is in
/// focus; and whether each instance applied only some.
async fn status_applications(group: &str) -> (u64, bool) {
    let redis = support::redis::RedisServer::start();
    let broker = Mosquitto::start();
    let mut servers = Vec::new();
    for id in ["pb-a", "pb-b"] {
        let mut s = settings(&broker, id, Some(&redis.url));
        s.mqtt.external_shared_group = group.into();
        servers.push(server::start(s).await);
    }
    for s in &servers {
        wait_for(&s.stats, |s| s.mqtt_external_subscribed.get() >= 1).await;
    }
    for user in 1..=STATUSES {
        support::register(&servers[0], &user.to_string()).await;
    }
    let mut app = Device::connect(broker.addr(), "app", true).await;
    for user in 1..=STATUSES {
        let status = json!({"user_id": user, "focus": true}).to_string();
        app.publish("push/app/status", status.as_bytes()).await;
    }
    for user in 1..=STATUSES {
        support::wait_for_focus(&servers[0], &user.to_string(), true).await;
    }
    let (a, b) = (servers[0].stats.clone(), servers[1].stats.clone());
    let expected = if group.is_empty() { 2 } else { 1 } * STATUSES;
    wait_until(|| {
        let n = a.status_updates.get() + b.status_updates.get();
        async move { n >= expected }
    })
    .await;
    let (na, nb) = (a.status_updates.get(), b.status_updates.get());
    for s in servers {
        s.stop().await;
    }
    (na + nb, na < STATUSES && nb < STATUSES)
}

/// A device that keeps reconnecting (persistent session) and records every
/// distinct payload it receives on `topic`, subscribing whenever the broker
/// has no session for it.
struct Collector {
    seen: Arc<Mutex<HashSet<String>>>,
    subacks: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl Collector {
    fn start(broker: &Mosquitto, id: &str, topic: &str) -> Collector {
        let (client, mut events) = AsyncClient::new(Device::options(broker.addr(), id, false), 64);
        let seen = Arc::new(Mutex::new(HashSet::new()));
        let subacks = Arc::new(AtomicU64::new(0));
        let (s, acks, topic) = (seen.clone(), subacks.clone(), topic.to_string());
        let task = tokio::spawn(async move {
            loop {
                match events.poll().await {
                    Ok(Event::Incoming(Packet::ConnAck(ack))) if !ack.session_present => {
                        client.try_subscribe(&topic, QoS::AtLeastOnce).unwrap();
                    }
                    Ok(Event::Incoming(Packet::SubAck(_))) => {
                        acks.fetch_add(1, Ordering::SeqCst);
                    }
                    Ok(Event::Incoming(Packet::Publish(p))) => {
                        let text = String::from_utf8_lossy(&p.payload).into_owned();
                        s.lock().unwrap().insert(text);
                    }
                    Ok(_) => {}
                    // Paces reconnect attempts while the broker is down.
                    Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
                }
            }
        });
        Collector {
            seen,
            subacks,
            task,
        }
    }

    async fn wait_subscribed(&self, subacks: u64) {
        let acks = self.subacks.clone();
        wait_until(move || {
            let n = acks.load(Ordering::SeqCst);
            async move { n >= subacks }
        })
        .await;
    }
}

impl Drop for Collector {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// `/readyz` follows the link: down before the CONNACK and while the broker
/// is gone, up once connected again.
#[tokio::test]
async fn readiness_follows_the_external_broker_link() {
    let mut broker = Mosquitto::start();
    let server = server::start(settings(&broker, "pb-ready", None)).await;
    let addr = server.http_addr;
    let ready = move |want: u16| async move {
        let reply = support::http::get(addr, "/readyz").await;
        let line = if want == 200 {
            "mqtt.external_url: ok"
        } else {
            "mqtt.external_url: not serving"
        };
        reply.status == want && reply.text().contains(line)
    };
    wait_until(|| ready(200)).await;
    broker.kill();
    wait_until(|| ready(503)).await;
    broker.restart("");
    wait_until(|| ready(200)).await;
    server.stop().await;
}
