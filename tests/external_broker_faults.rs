//! Issue 18 against real Mosquitto processes: a push accepted while the
//! broker was down reaches an app that resubscribes after the restart
//! (clean session); one the broker refuses is dropped after
//! `mqtt.external_max_attempts`, with feedback; and a list of broker URLs
//! fails over to the next one while pushes flow.

mod support;

use std::collections::HashSet;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use pushbridge::settings::Settings;
use rmpv::Value as Mp;
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use serde_json::json;
use support::mosquitto::Mosquitto;
use support::proxy::Backend;
use support::redis::RedisServer;
use support::{server, wait_for, wait_until};

fn settings(urls: Vec<String>, client_id: &str, redis: Option<&str>) -> Settings {
    let mut s = server::settings(redis);
    s.mqtt.external_url = Some(match urls.len() {
        1 => urls[0].clone().into(),
        _ => urls.into(),
    });
    s.mqtt.external_client_id = Some(client_id.into());
    s
}

/// An app as the apps behave: a clean session to each broker in `brokers`,
/// reconnecting when it drops; on every CONNACK it subscribes to its user
/// topic, and once subscribed publishes `focus: true` on the status topic
/// (unless `status` is off). Records every distinct payload it receives.
struct App {
    seen: Arc<Mutex<HashSet<String>>>,
    subacks: Arc<AtomicU64>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl App {
    fn start(brokers: &[SocketAddr], user: u64, status: bool) -> App {
        let seen = Arc::new(Mutex::new(HashSet::new()));
        let subacks = Arc::new(AtomicU64::new(0));
        let tasks = brokers
            .iter()
            .enumerate()
            .map(|(i, addr)| {
                let mut opts = MqttOptions::new(
                    format!("app-{user}-{i}"),
                    addr.ip().to_string(),
                    addr.port(),
                );
                opts.set_clean_session(true);
                opts.set_keep_alive(Duration::from_secs(30));
                let (client, mut events) = AsyncClient::new(opts, 64);
                let (seen, acks) = (seen.clone(), subacks.clone());
                let topic = format!("push/user/{user}");
                let hello = json!({"user_id": user, "focus": true}).to_string();
                tokio::spawn(async move {
                    loop {
                        match events.poll().await {
                            Ok(Event::Incoming(Packet::ConnAck(_))) => {
                                client.try_subscribe(&topic, QoS::AtLeastOnce).unwrap();
                            }
                            Ok(Event::Incoming(Packet::SubAck(_))) => {
                                acks.fetch_add(1, Ordering::SeqCst);
                                if status {
                                    client
                                        .try_publish(
                                            "push/app/status",
                                            QoS::AtLeastOnce,
                                            false,
                                            hello.clone(),
                                        )
                                        .unwrap();
                                }
                            }
                            Ok(Event::Incoming(Packet::Publish(p))) if p.topic == topic => {
                                let text = String::from_utf8_lossy(&p.payload).into_owned();
                                seen.lock().unwrap().insert(text);
                            }
                            Ok(_) => {}
                            // Paces reconnect attempts while the broker is down.
                            Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
                        }
                    }
                })
            })
            .collect();
        App {
            seen,
            subacks,
            tasks,
        }
    }

    fn count(&self) -> usize {
        self.seen.lock().unwrap().len()
    }

    async fn wait_subscribed(&self, subacks: u64) {
        let acks = self.subacks.clone();
        wait_until(move || {
            let n = acks.load(Ordering::SeqCst);
            async move { n >= subacks }
        })
        .await;
    }

    async fn wait_seen(&self, n: usize) {
        let seen = self.seen.clone();
        wait_until(move || {
            let got = seen.lock().unwrap().len();
            async move { got >= n }
        })
        .await;
    }

    /// Waits (up to WAIT) until `n` distinct pushes are seen, without
    /// panicking, so a run that falls short still prints what it got;
    /// whether they were.
    async fn settle(&self, n: usize) -> bool {
        let seen = self.seen.clone();
        let all = tokio::time::timeout(support::WAIT, async move {
            while seen.lock().unwrap().len() < n {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        });
        all.await.is_ok()
    }

    fn assert_seen_all(&self, n: usize) {
        let expected: HashSet<String> = (0..n).map(|i| json!({"n": i}).to_string()).collect();
        let seen = self.seen.lock().unwrap();
        let missing: Vec<_> = expected.difference(&seen).collect();
        assert!(
            missing.is_empty(),
            "{} of {n} missing: {missing:?}",
            missing.len()
        );
    }
}

impl Drop for App {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// The scenario: Mosquitto without persistence, an app on
/// `push/user/8` (clean session), 500 pushes; the broker stops at push 200
/// and starts again at 300. pushbridge reconnects first and republishes the
/// pushes accepted meanwhile before the app has subscribed again (the
/// broker lets only pushbridge in until then): they reach nobody, which
/// MQTT 5's PUBACK says (0x10), so they are kept in Redis and replayed when
/// the app publishes its status. All 500 arrive.
#[tokio::test]
async fn pushes_accepted_while_the_broker_restarts_reach_the_app() {
    const N: usize = 500;
    let redis = RedisServer::start();
    let mut broker = Mosquitto::start();
    let mut s = settings(vec![broker.url()], "pb-8", Some(&redis.url));
    // Room for the 100 accepted while the broker was down, and those sent
    // after the restart before the app is back.
    s.offline.max_per_user = 1000;
    let server = server::start(s).await;
    let stats = server.stats.clone();
    support::register(&server, "8").await;
    wait_for(&stats, |s| s.mqtt_external_subscribed.get() >= 1).await;
    let app = App::start(&[broker.addr()], 8, true);
    app.wait_subscribed(1).await;

    let mut backend = Backend::connect(server.proxy_addr).await;
    for n in 0..N {
        if n == 200 {
            // What the broker acknowledged it wrote to the app before its
            // PUBACK: let the app read it before the broker dies with it.
            app.wait_seen(200).await;
            broker.kill();
        }
        if n == 300 {
            broker.restart("clientid_prefixes pb-");
            // pushbridge is back and has republished what it held.
            wait_for(&stats, |s| s.mqtt_external_acked.get() >= 300).await;
            broker.write_config("");
            broker.reload();
        }
        assert_eq!(backend.push(2, Mp::from(8), &json!({"n": n})).await, 0);
    }
    app.wait_subscribed(2).await;
    let all = app.settle(N).await;
    eprintln!(
        "restart run: sent {N}, accepted {}, received {} distinct, kept offline {}, replayed {}",
        stats.pushes_accepted.get(),
        app.count(),
        stats.offline_kept.get(),
        stats.offline_delivered.get()
    );
    app.assert_seen_all(N);
    assert!(all);
    assert_eq!(stats.pushes_accepted.get(), N as u64);
    assert!(
        stats.mqtt_external_connects_v5.get() >= 2,
        "MQTT 5 with Mosquitto"
    );
    assert!(
        stats.mqtt_external_unreached.get() >= 100,
        "the republished ones reached nobody"
    );
    server.stop().await;
}

/// No status message: the broker's subscribe event (Mosquitto's log topic
/// with `log_type subscribe`) is what says the user is back.
#[tokio::test]
async fn a_subscribe_event_replays_kept_pushes() {
    let broker = Mosquitto::start_with("log_dest topic\nlog_type subscribe");
    let mut s = settings(vec![broker.url()], "pb-events", None);
    s.mqtt.external_subscribe_events = "$SYS/broker/log/M/subscribe".into();
    let server = server::start(s).await;
    let stats = server.stats.clone();
    wait_for(&stats, |s| s.mqtt_external_subscribed.get() >= 2).await;
    let mut backend = Backend::connect(server.proxy_addr).await;
    for n in 0..5 {
        assert_eq!(backend.push(2, Mp::from(3), &json!({"n": n})).await, 0);
    }
    wait_for(&stats, |s| s.offline_kept.get() == 5).await;
    let app = App::start(&[broker.addr()], 3, false);
    app.wait_seen(5).await;
    app.assert_seen_all(5);
    assert_eq!(stats.mqtt_external_unreached.get(), 5);
    server.stop().await;
}

/// A broker that refuses a publish, by its ACL (PUBACK 0x87) or by its
/// packet size limit (the client may not send it): after
/// `external_max_attempts` it is dropped, counted by reason, and reported
/// on the feedback topic; the pushes around it still arrive.
#[tokio::test]
async fn a_refused_publish_is_dropped_after_its_attempts_with_feedback() {
    let dir = tempfile::tempdir().unwrap();
    let acl = dir.path().join("acl");
    std::fs::write(
        &acl,
        "topic read push/#\ntopic write push/app/status\n\
         user pushbridge\ntopic write push/user/1\ntopic write push/feedback\ntopic read push/app/status\n",
    )
    .unwrap();
    let cases = [
        (
            format!("acl_file {}", acl.display()),
            9,
            "0x87 Not authorized",
        ),
        ("max_packet_size 1000".to_string(), 1, "connection lost"),
    ];
    for (config, user, reason) in cases {
        let broker = Mosquitto::start_with(&config);
        let mut s = settings(vec![broker.url()], "pb-refused", None);
        s.mqtt.external_username = Some("pushbridge".into());
        s.mqtt.external_max_attempts = 2;
        let server = server::start(s).await;
        let stats = server.stats.clone();
        wait_for(&stats, |s| s.mqtt_external_subscribed.get() >= 1).await;
        let app = App::start(&[broker.addr()], 1, false);
        app.wait_subscribed(1).await;
        let mut ops = support::mqtt::Device::connect(broker.addr(), "ops", true).await;
        ops.subscribe("push/feedback").await;

        let mut backend = Backend::connect(server.proxy_addr).await;
        let big = "x".repeat(2000);
        assert_eq!(backend.push(2, Mp::from(1), &json!({"n": 0})).await, 0);
        let refused = json!({"n": "refused", "pad": if user == 1 { &big } else { "" }});
        assert_eq!(backend.push(2, Mp::from(user), &refused).await, 0);
        assert_eq!(backend.push(2, Mp::from(1), &json!({"n": 1})).await, 0);

        let feedback = ops.next_json().await;
        assert_eq!(feedback["topic"], format!("push/user/{user}"), "{config}");
        assert_eq!(feedback["user_id"], user, "{config}");
        let why = feedback["reason"].as_str().unwrap();
        assert!(
            why.contains(reason) && why.contains("after 2 attempts"),
            "{config}: {why}"
        );
        app.wait_seen(2).await;
        app.assert_seen_all(2);
        let by_reason = (
            stats.mqtt_external_dropped_refused.get(),
            stats.mqtt_external_dropped_disconnected.get(),
        );
        if user == 9 {
            // Mosquitto 2.0.11 answers 0x87 and then closes the connection:
            // one failure per connection, each a refusal.
            assert_eq!(by_reason, (1, 0));
            assert_eq!(stats.mqtt_external_refused.get(), 2);
        } else {
            assert_eq!(by_reason, (0, 1));
        }
        assert_eq!(stats.mqtt_external_feedback.get(), 1);
        server.stop().await;
    }
}

/// A TCP relay in front of a broker that can be frozen: the broker then
/// reads nothing more from pushbridge and pushbridge hears nothing more from
/// it, while it still delivers what it has to the app; the relay's
/// connection ends when the broker's does.
struct Relay {
    port: u16,
    frozen: tokio::sync::watch::Sender<bool>,
}

impl Relay {
    async fn start(broker: SocketAddr) -> Relay {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let (frozen, watch) = tokio::sync::watch::channel(false);
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let Ok(upstream) = tokio::net::TcpStream::connect(broker).await else {
                    continue;
                };
                let (mut from_client, mut to_client) = client.into_split();
                let (mut from_broker, mut to_broker) = upstream.into_split();
                let (mut watch, down_watch) = (watch.clone(), watch.clone());
                let up = tokio::spawn(async move {
                    let mut buf = vec![0u8; 16 * 1024];
                    loop {
                        let _ = watch.wait_for(|frozen| !*frozen).await;
                        let n =
                            match tokio::io::AsyncReadExt::read(&mut from_client, &mut buf).await {
                                Ok(0) | Err(_) => break,
                                Ok(n) => n,
                            };
                        let _ = watch.wait_for(|frozen| !*frozen).await;
                        if tokio::io::AsyncWriteExt::write_all(&mut to_broker, &buf[..n])
                            .await
                            .is_err()
                        {
                            break;
                        }
                    }
                });
                // Frozen, what the broker sends is dropped: a PUBACK still
                // on its way never reaches pushbridge, so the pushes counted
                // as acknowledged stop changing, and the rest are
                // republished to the second broker. Still read, so the
                // broker's end is seen.
                let mut watch = down_watch;
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 16 * 1024];
                    loop {
                        let n =
                            match tokio::io::AsyncReadExt::read(&mut from_broker, &mut buf).await {
                                Ok(0) | Err(_) => break,
                                Ok(n) => n,
                            };
                        if *watch.borrow_and_update() {
                            continue;
                        }
                        if tokio::io::AsyncWriteExt::write_all(&mut to_client, &buf[..n])
                            .await
                            .is_err()
                        {
                            break;
                        }
                    }
                    up.abort();
                });
            }
        });
        Relay { port, frozen }
    }

    fn url(&self) -> String {
        format!("mqtt://127.0.0.1:{}", self.port)
    }

    fn freeze(&self) {
        self.frozen.send_replace(true);
    }
}

/// Two brokers in `mqtt.external_url`; the app is on both (as a device of
/// a cluster is reachable from every node). The first dies while pushes
/// flow: pushbridge moves to the second with its outbox, and every accepted
/// push arrives. (Before the kill the first stops reading from pushbridge,
/// through a relay, and delivers what it acknowledged: a push a broker
/// acknowledged is that broker's to deliver, and Mosquitto keeps nothing
/// across a kill.)
#[tokio::test]
async fn a_list_of_brokers_fails_over_while_pushes_flow() {
    const N: usize = 2000;
    let mut first = Mosquitto::start();
    let second = Mosquitto::start();
    let relay = Relay::start(first.addr()).await;
    let s = settings(vec![relay.url(), second.url()], "pb-failover", None);
    let server = server::start(s).await;
    let stats = server.stats.clone();
    wait_for(&stats, |s| s.mqtt_external_subscribed.get() >= 1).await;
    let app = App::start(&[first.addr(), second.addr()], 5, true);
    app.wait_subscribed(2).await;

    let mut backend = Backend::connect(server.proxy_addr).await;
    let pusher = tokio::spawn(async move {
        for n in 0..N {
            assert_eq!(backend.push(2, Mp::from(5), &json!({"n": n})).await, 0);
        }
    });
    wait_for(&stats, |s| s.mqtt_external_acked.get() >= (N / 4) as u64).await;
    relay.freeze();
    // Publishes are acknowledged in order: the first `acked` pushes.
    let (seen, acked) = (app.seen.clone(), stats.clone());
    wait_until(|| {
        let k = acked.mqtt_external_acked.get() as usize;
        let seen = seen.lock().unwrap();
        let all = (0..k).all(|n| seen.contains(&json!({"n": n}).to_string()));
        async move { all }
    })
    .await;
    let stopped_at = stats.pushes_accepted.get();
    first.kill();
    pusher.await.unwrap();
    app.settle(N).await;
    eprintln!(
        "failover run: sent {N}, accepted {}, first broker killed after {stopped_at} accepted, \
         received {} distinct, republished {}, dropped {}",
        stats.pushes_accepted.get(),
        app.count(),
        stats.mqtt_external_republished.get(),
        stats.mqtt_external_dropped_refused.get() + stats.mqtt_external_dropped_disconnected.get(),
    );
    app.assert_seen_all(N);
    assert!(stopped_at < N as u64, "pushes were still flowing");
    assert!(stats.mqtt_external_connects.get() >= 2);
    server.stop().await;
}
