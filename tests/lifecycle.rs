//! Shutdown during a flood: every push answered 0x00 reaches its MQTT device
//! or the (local) APNs server before the server has stopped.

#[path = "support/apns.rs"]
mod apns_server;
mod support;

use std::collections::BTreeSet;
use std::time::Duration;

use apns_server::{ApnsServer, ServerOptions};
use pushbridge::push::{Id, UserRecord};
use pushbridge::registry::UserStore;
use pushbridge::wire::client::json_to_msgpack;
use pushbridge::wire::frame::encode;
use rmpv::Value as Mp;
use rumqttc::{Event, Packet};
use serde_json::json;
use support::mqtt::Device;
use support::{server, WAIT};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::watch;

const APP: &str = "com.example.app";
const MQTT_USERS: u64 = 4;
const IOS_USERS: u64 = 4;
/// Frames the backend pipelines; shutdown starts long before they are all answered.
const FRAMES: u64 = 200_000;
/// Accepted pushes before the shutdown starts.
const BEFORE_SHUTDOWN: u64 = 3_000;

/// User for frame `n`: 1..=4 are MQTT-only, 101..=104 iOS.
fn user_of(n: u64) -> u64 {
    let k = n % (MQTT_USERS + IOS_USERS);
    if k < MQTT_USERS {
        k + 1
    } else {
        101 + k - MQTT_USERS
    }
}

/// Collects the `n` of every message a device receives until its connection ends.
fn collect(mut device: Device) -> tokio::task::JoinHandle<BTreeSet<u64>> {
    tokio::spawn(async move {
        let mut seen = BTreeSet::new();
        while let Ok(event) = device.events.poll().await {
            if let Event::Incoming(Packet::Publish(p)) = event {
                let v: serde_json::Value = serde_json::from_slice(&p.payload).unwrap();
                seen.insert(v["n"].as_u64().unwrap());
            }
        }
        seen
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_during_a_flood_delivers_every_accepted_push() {
    let mut settings = server::settings(None);
    // A slow Apple and narrow MQTT windows: work is still queued at shutdown.
    let apple = ApnsServer::start_with(ServerOptions {
        max_concurrent_streams: Some(2),
        ..Default::default()
    })
    .await;
    let _creds = apple.serve_token_app(&mut settings, APP);
    settings.apns.max_connections = 1;
    settings.apns.max_in_flight = 2;
    settings.mqtt.max_inflight = 1;
    settings.mqtt.max_queued = FRAMES as usize;
    settings.intake.queue = 1024;
    settings.shutdown.drain_secs = 60;
    let server = server::start(settings).await;

    let mut devices = Vec::new();
    for u in 1..=MQTT_USERS {
        let mut d = Device::connect(server.mqtt_addr, &format!("dev-{u}"), true).await;
        d.subscribe(&format!("push/user/{u}")).await;
        devices.push((u, collect(d)));
    }
    for u in 101..101 + IOS_USERS {
        let record = UserRecord {
            app_token: Some(format!("{u:064x}")),
            app_ident: Some(APP.into()),
            app_version: Some("1.0".into()),
            app_focus: false,
        };
        server
            .registry
            .put_user(&Id::from(u.to_string().as_str()), &record)
            .await
            .unwrap();
    }

    let (reader, mut writer) = TcpStream::connect(server.proxy_addr)
        .await
        .unwrap()
        .into_split();
    tokio::spawn(async move {
        for n in 0..FRAMES {
            let data = json_to_msgpack(&json!({"alert": "hi", "n": n}));
            let frame = encode(2, &Mp::from(user_of(n)), &data);
            if writer.write_all(&frame).await.is_err() {
                break;
            }
        }
    });
    // Status bytes come back in frame order: the n-th byte answers frame n.
    let (count_tx, count_rx) = watch::channel(0u64);
    let statuses = tokio::spawn(async move {
        let mut reader = tokio::io::BufReader::new(reader);
        let (mut accepted, mut n, mut b) = (BTreeSet::new(), 0u64, [0u8; 1]);
        while reader.read_exact(&mut b).await.is_ok() {
            if b[0] == 0x00 {
                accepted.insert(n);
                count_tx.send_replace(accepted.len() as u64);
            }
            n += 1;
        }
        accepted
    });

    let mut count = count_rx.clone();
    tokio::time::timeout(WAIT, count.wait_for(|&c| c >= BEFORE_SHUTDOWN))
        .await
        .expect("pushes accepted")
        .unwrap();
    let stats = server.stats.clone();
    server.stop().await;

    let accepted = tokio::time::timeout(WAIT, statuses).await.unwrap().unwrap();
    assert!(accepted.len() as u64 >= BEFORE_SHUTDOWN);
    assert!(
        (accepted.len() as u64) < FRAMES,
        "the flood ended before the shutdown; nothing was tested"
    );
    for (u, handle) in devices {
        let seen = tokio::time::timeout(WAIT, handle).await.unwrap().unwrap();
        let want: BTreeSet<u64> = accepted
            .iter()
            .copied()
            .filter(|&n| user_of(n) == u)
            .collect();
        let lost: Vec<_> = want.difference(&seen).take(5).collect();
        assert!(
            lost.is_empty(),
            "user {u}: {} lost, e.g. {lost:?}",
            want.difference(&seen).count()
        );
    }
    let mut at_apple = BTreeSet::new();
    // Every request reached the server before it stopped: take what is there, no waiting.
    while let Some(req) = apple.try_next_request(Duration::ZERO).await {
        at_apple.insert(req.body["data"]["n"].as_u64().unwrap());
    }
    let want: BTreeSet<u64> = accepted
        .iter()
        .copied()
        .filter(|&n| user_of(n) > 100)
        .collect();
    let lost = want.difference(&at_apple).count();
    assert_eq!(
        lost,
        0,
        "{lost} of {} APNs notifications never reached Apple",
        want.len()
    );
    assert_eq!(stats.apns_failed.get(), 0);
    assert_eq!(stats.mqtt_dropped.get(), 0);
}

#[tokio::test]
async fn devices_disconnected_by_shutdown_leave_focus() {
    let server = server::start(server::settings(None)).await;
    support::register(&server, "7").await;
    let mut device = Device::connect(server.mqtt_addr, "dev-7", true).await;
    device
        .publish("push/app/status", br#"{"user_id":7,"focus":true}"#)
        .await;
    support::wait_for_focus(&server, "7", true).await;
    let registry = server.registry.clone();
    server.stop().await;
    let records = registry.users(&[Id::from("7")]).await.unwrap();
    assert!(!records[0].as_ref().unwrap().app_focus);
}

/// A device that takes a QoS 1 message and never acknowledges it holds the
/// shutdown only for the drain deadline (5 s), not for ever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_device_that_never_acknowledges_does_not_hold_the_shutdown() {
    let server = server::start(server::settings(None)).await;
    let mut opts = Device::options(server.mqtt_addr, "silent", true);
    opts.set_manual_acks(true);
    let mut device = Device::connect_opts(opts).await;
    device.subscribe("push/user/7").await;
    let mut backend = support::proxy::Backend::connect(server.proxy_addr).await;
    assert_eq!(backend.push(2, Mp::from(7), &json!({"n": 1})).await, 0x00);
    let (_, payload, _) = device.next_publish().await;
    assert_eq!(&payload[..], br#"{"n":1}"#);
    let events = tokio::spawn(async move { while device.events.poll().await.is_ok() {} });
    tokio::time::timeout(Duration::from_secs(30), server.stop())
        .await
        .expect("the server stopped within 30 s with an unacknowledged message in flight");
    events.abort();
}
