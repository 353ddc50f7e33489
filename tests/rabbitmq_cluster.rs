//! A real clustered broker (issue 18): three RabbitMQ nodes (Debian's
//! rabbitmq-server 3.10, MQTT 3.1.1 only, no `$share`), pushbridge's
//! `mqtt.external_url` = [node A, node B], the device on node B. Node A is
//! stopped while pushes flow: pushbridge fails over to node B (MQTT 5
//! refused there too, so 3.1.1) and every accepted push arrives; a status
//! message on node B sets focus and the device's last will clears it.

mod support;

use std::collections::HashSet;
use std::sync::{Arc, Mutex};

use rmpv::Value as Mp;
use rumqttc::{AsyncClient, Event, LastWill, Packet, QoS};
use serde_json::json;
use support::mqtt::Device;
use support::proxy::Backend;
use support::rabbitmq::RabbitCluster;
use support::{server, wait_for, wait_until};

#[tokio::test]
async fn node_a_stops_while_pushes_flow_and_nothing_accepted_is_lost() {
    const N: usize = 2000;
    let mut cluster = tokio::task::spawn_blocking(RabbitCluster::start)
        .await
        .unwrap();
    let mut s = server::settings(None);
    s.mqtt.external_url = Some(vec![cluster.url(0), cluster.url(1)].into());
    s.mqtt.external_client_id = Some("pb-rabbit".into());
    s.mqtt.external_shared_group = String::new();
    let server = server::start(s).await;
    let stats = server.stats.clone();
    support::register(&server, "5").await;
    wait_for(&stats, |s| s.mqtt_external_subscribed.get() >= 1).await;

    // The device: persistent session on node B, last will on the status topic.
    let mut opts = Device::options(cluster.addr(1), "device-5", false);
    opts.set_last_will(LastWill::new(
        "push/app/status",
        r#"{"user_id": 5, "focus": false}"#,
        QoS::AtLeastOnce,
        false,
    ));
    let (device, mut events) = AsyncClient::new(opts, 64);
    let seen = Arc::new(Mutex::new(HashSet::new()));
    let subscribed = Arc::new(tokio::sync::Notify::new());
    let (s2, sub2) = (seen.clone(), subscribed.clone());
    let task = tokio::spawn(async move {
        loop {
            match events.poll().await {
                Ok(Event::Incoming(Packet::ConnAck(_))) => {
                    device
                        .try_subscribe("push/user/5", QoS::AtLeastOnce)
                        .unwrap();
                }
                Ok(Event::Incoming(Packet::SubAck(_))) => sub2.notify_one(),
                Ok(Event::Incoming(Packet::Publish(p))) if p.topic == "push/user/5" => {
                    s2.lock().unwrap().insert(p.payload);
                }
                Ok(_) => {}
                Err(e) => panic!("the device on node B lost its connection: {e}"),
            }
        }
    });
    tokio::time::timeout(support::WAIT, subscribed.notified())
        .await
        .expect("device subscribed on node B");

    let mut backend = Backend::connect(server.proxy_addr).await;
    let pusher = tokio::spawn(async move {
        for n in 0..N {
            assert_eq!(backend.push(2, Mp::from(5), &json!({"n": n})).await, 0);
        }
    });
    wait_for(&stats, |s| s.mqtt_external_acked.get() >= (N / 4) as u64).await;
    let cluster = tokio::task::spawn_blocking(move || {
        cluster.stop(0);
        cluster
    })
    .await
    .unwrap();
    pusher.await.unwrap();
    let all = seen.clone();
    wait_until(move || {
        let n = all.lock().unwrap().len();
        async move { n >= N }
    })
    .await;
    let expected: HashSet<_> = (0..N)
        .map(|n| bytes::Bytes::from(json!({"n": n}).to_string()))
        .collect();
    assert_eq!(*seen.lock().unwrap(), expected);
    assert!(
        stats.mqtt_external_connects.get() >= 2,
        "failed over to node B"
    );
    assert!(stats.mqtt_external_connects_v311.get() >= 2, "3.1.1 only");
    assert_eq!(stats.mqtt_external_connects_v5.get(), 0);

    // Status on node B reaches pushbridge (now on node B as well).
    let mut app = Device::connect(cluster.addr(1), "app-5", true).await;
    app.publish("push/app/status", br#"{"user_id": 5, "focus": true}"#)
        .await;
    support::wait_for_focus(&server, "5", true).await;
    // The device's connection ends without a DISCONNECT: its last will.
    task.abort();
    support::wait_for_focus(&server, "5", false).await;
    server.stop().await;
    drop(cluster);
}
