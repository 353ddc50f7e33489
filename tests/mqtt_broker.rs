//! The embedded broker against real clients over real sockets: rumqttc (v3.1.1
//! and v5) and raw TCP where the test must control every byte.

use std::net::SocketAddr;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use pushbridge::lifecycle::{Lifecycle, Phase};
use pushbridge::mqtt::{Broker, BrokerEvent};
use pushbridge::settings::MqttSettings;
use rumqttc::mqttbytes::v4;
use rumqttc::v5::mqttbytes::v5;
use rumqttc::v5::mqttbytes::QoS as QoS5;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// Bounds a wait that should succeed; only reached when the test fails.
const WAIT: Duration = Duration::from_secs(10);

struct Server {
    addr: SocketAddr,
    broker: Broker,
    events: mpsc::Receiver<BrokerEvent>,
    devices: Phase,
}

async fn start(mut settings: MqttSettings) -> Server {
    settings.listen = "127.0.0.1:0".parse().unwrap();
    let (broker, events) = Broker::new(&settings);
    let devices = Lifecycle::new(CancellationToken::new()).devices;
    let addr = broker.listen(&devices).await.unwrap().tcp;
    Server {
        addr,
        broker,
        events,
        devices,
    }
}

async fn start_default() -> Server {
    start(MqttSettings::default()).await
}

impl Server {
    async fn event(&mut self) -> BrokerEvent {
        tokio::time::timeout(WAIT, self.events.recv())
            .await
            .expect("no broker event in time")
            .expect("event channel closed")
    }

    /// Waits for `client_id`'s Disconnected event (skipping others); returns its conn id.
    async fn disconnected(&mut self, client_id: &str) -> u64 {
        loop {
            if let BrokerEvent::Disconnected {
                conn,
                client_id: id,
            } = self.event().await
            {
                if &*id == client_id {
                    return conn;
                }
            }
        }
    }
}

/// A client speaking raw bytes, decoded with rumqttc's v3.1.1 or v5 codecs.
struct Raw {
    stream: TcpStream,
    buf: BytesMut,
}

impl Raw {
    async fn open(addr: SocketAddr) -> Raw {
        Raw {
            stream: TcpStream::connect(addr).await.unwrap(),
            buf: BytesMut::new(),
        }
    }

    /// Opens, sends a v3.1.1 CONNECT and returns the CONNACK.
    async fn connect(
        addr: SocketAddr,
        id: &str,
        clean: bool,
        keep_alive: u16,
    ) -> (Raw, v4::ConnAck) {
        let mut c = v4::Connect::new(id);
        c.clean_session = clean;
        c.keep_alive = keep_alive;
        Raw::connect_with(addr, c).await
    }

    async fn connect_with(addr: SocketAddr, c: v4::Connect) -> (Raw, v4::ConnAck) {
        let mut raw = Raw::open(addr).await;
        raw.send(v4::Packet::Connect(c)).await;
        match raw.recv().await {
            Some(v4::Packet::ConnAck(ack)) => (raw, ack),
            other => panic!("expected CONNACK, got {other:?}"),
        }
    }

    async fn send(&mut self, p: v4::Packet) {
        let mut b = BytesMut::new();
        p.write(&mut b, usize::MAX).unwrap();
        self.stream.write_all(&b).await.unwrap();
    }

    async fn send5(&mut self, p: v5::Packet) {
        let mut b = BytesMut::new();
        p.write(&mut b, None).unwrap();
        self.stream.write_all(&b).await.unwrap();
    }

    async fn fill(&mut self) -> bool {
        let n = tokio::time::timeout(WAIT, self.stream.read_buf(&mut self.buf))
            .await
            .expect("nothing received in time");
        matches!(n, Ok(n) if n > 0)
    }

    /// The next v3.1.1 packet, or None once the server closed the socket.
    async fn recv(&mut self) -> Option<v4::Packet> {
        loop {
            match v4::Packet::read(&mut self.buf, usize::MAX) {
                Ok(p) => return Some(p),
                Err(rumqttc::Error::InsufficientBytes(_)) => {}
                Err(e) => panic!("bad packet from server: {e}"),
            }
            if !self.fill().await {
                return None;
            }
        }
    }

    async fn recv5(&mut self) -> Option<v5::Packet> {
        loop {
            match v5::Packet::read(&mut self.buf, None) {
                Ok(p) => return Some(p),
                Err(rumqttc::v5::mqttbytes::Error::InsufficientBytes(_)) => {}
                Err(e) => panic!("bad packet from server: {e}"),
            }
            if !self.fill().await {
                return None;
            }
        }
    }

    async fn publish(&mut self) -> v4::Publish {
        match self.recv().await {
            Some(v4::Packet::Publish(p)) => p,
            other => panic!("expected PUBLISH, got {other:?}"),
        }
    }

    async fn subscribe(&mut self, filter: &str, qos: rumqttc::QoS) {
        let mut s = v4::Subscribe::new(filter, qos);
        s.pkid = 1;
        self.send(v4::Packet::Subscribe(s)).await;
        match self.recv().await {
            Some(v4::Packet::SubAck(_)) => {}
            other => panic!("expected SUBACK, got {other:?}"),
        }
    }

    /// True once the server has closed the connection (anything sent before is skipped).
    async fn closed(&mut self) -> bool {
        loop {
            self.buf.clear();
            if !self.fill().await {
                return true;
            }
        }
    }
}

fn v5_connect(id: &str, clean: bool, expiry: Option<u32>) -> v5::Packet {
    let mut props = v5::ConnectProperties::new();
    props.session_expiry_interval = expiry;
    v5::Packet::Connect(
        v5::Connect {
            keep_alive: 60,
            client_id: id.into(),
            clean_start: clean,
            properties: Some(props),
        },
        None,
        None,
    )
}

/// A rumqttc v3.1.1 client whose incoming PUBLISHes arrive on a channel once subscribed.
async fn rumq4(
    addr: SocketAddr,
    id: &str,
    filter: &str,
) -> (rumqttc::AsyncClient, mpsc::Receiver<rumqttc::Publish>) {
    let mut opts = rumqttc::MqttOptions::new(id, addr.ip().to_string(), addr.port());
    opts.set_keep_alive(Duration::from_secs(30));
    let (client, mut eventloop) = rumqttc::AsyncClient::new(opts, 16);
    client
        .subscribe(filter, rumqttc::QoS::AtLeastOnce)
        .await
        .unwrap();
    let (tx, rx) = mpsc::channel(64);
    let (subscribed_tx, subscribed_rx) = tokio::sync::oneshot::channel();
    let mut subscribed_tx = Some(subscribed_tx);
    tokio::spawn(async move {
        while let Ok(ev) = eventloop.poll().await {
            match ev {
                rumqttc::Event::Incoming(rumqttc::Packet::SubAck(_)) => {
                    if let Some(t) = subscribed_tx.take() {
                        let _ = t.send(());
                    }
                }
                rumqttc::Event::Incoming(rumqttc::Packet::Publish(p)) => {
                    let forwarded = tx.send(p).await;
                    if forwarded.is_err() {
                        return;
                    }
                }
                _ => {}
            }
        }
    });
    tokio::time::timeout(WAIT, subscribed_rx)
        .await
        .expect("no SUBACK in time")
        .unwrap();
    (client, rx)
}

async fn next<T>(rx: &mut mpsc::Receiver<T>) -> T {
    tokio::time::timeout(WAIT, rx.recv())
        .await
        .expect("nothing received in time")
        .expect("client ended")
}

#[tokio::test]
async fn publish_reaches_a_rumqttc_subscriber_exactly_once() {
    let srv = start_default().await;
    let (_client, mut rx) = rumq4(srv.addr, "dev-1", "push/user/1").await;
    assert_eq!(
        srv.broker.publish("push/user/1", Bytes::from_static(b"hi")),
        1
    );
    assert_eq!(
        srv.broker
            .publish("push/user/2", Bytes::from_static(b"other")),
        0
    );
    let p = next(&mut rx).await;
    assert_eq!(
        (p.topic.as_str(), &p.payload[..]),
        ("push/user/1", &b"hi"[..])
    );
    assert_eq!(p.qos, rumqttc::QoS::AtLeastOnce);
    // A marker sent afterwards must be the very next message: no duplicate in between.
    srv.broker
        .publish("push/user/1", Bytes::from_static(b"end"));
    assert_eq!(&next(&mut rx).await.payload[..], b"end");
}

#[tokio::test]
async fn wildcard_subscribers_and_client_publishes_are_routed() {
    let srv = start_default().await;
    let (_a, mut rx) = rumq4(srv.addr, "watcher", "push/+/7").await;
    let (b, _brx) = rumq4(srv.addr, "sender", "unused").await;
    b.publish("push/group/7", rumqttc::QoS::AtLeastOnce, false, "g7")
        .await
        .unwrap();
    let p = next(&mut rx).await;
    assert_eq!(
        (p.topic.as_str(), &p.payload[..]),
        ("push/group/7", &b"g7"[..])
    );
    let (_c, mut crx) = rumq4(srv.addr, "exact", "push/group/7").await;
    assert_eq!(
        srv.broker
            .publish("push/group/7", Bytes::from_static(b"both")),
        2
    );
    assert_eq!(&next(&mut rx).await.payload[..], b"both");
    assert_eq!(&next(&mut crx).await.payload[..], b"both");
}

#[tokio::test]
async fn v5_client_subscribes_publishes_and_disconnects() {
    use rumqttc::v5::{mqttbytes::v5::Packet, AsyncClient, Event, MqttOptions};
    let mut srv = start_default().await;
    let mut opts = MqttOptions::new("", srv.addr.ip().to_string(), srv.addr.port());
    opts.set_keep_alive(Duration::from_secs(30));
    let (client, mut eventloop) = AsyncClient::new(opts, 16);
    client
        .subscribe("push/user/5", rumqttc::v5::mqttbytes::QoS::ExactlyOnce)
        .await
        .unwrap();
    let mut assigned = None;
    let mut granted = None;
    while granted.is_none() {
        match tokio::time::timeout(WAIT, eventloop.poll())
            .await
            .unwrap()
            .unwrap()
        {
            Event::Incoming(Packet::ConnAck(ack)) => {
                assigned = ack.properties.and_then(|p| p.assigned_client_identifier);
            }
            Event::Incoming(Packet::SubAck(ack)) => granted = Some(ack.return_codes),
            _ => {}
        }
    }
    let assigned = assigned.expect("server assigns a client id");
    assert!(!assigned.is_empty());
    assert_eq!(
        granted.unwrap(),
        vec![v5::SubscribeReasonCode::Success(
            rumqttc::v5::mqttbytes::QoS::AtLeastOnce
        )]
    );
    assert_eq!(
        srv.broker.publish("push/user/5", Bytes::from_static(b"v5")),
        1
    );
    loop {
        if let Event::Incoming(Packet::Publish(p)) = tokio::time::timeout(WAIT, eventloop.poll())
            .await
            .unwrap()
            .unwrap()
        {
            assert_eq!(&p.payload[..], b"v5");
            break;
        }
    }
    client
        .publish(
            "push/app/status",
            rumqttc::v5::mqttbytes::QoS::AtLeastOnce,
            false,
            "fg",
        )
        .await
        .unwrap();
    client.disconnect().await.unwrap();
    tokio::spawn(async move { while eventloop.poll().await.is_ok() {} });
    let subscribed = srv.event().await;
    assert!(
        matches!(&subscribed, BrokerEvent::Subscribed { topic } if &**topic == "push/user/5"),
        "{subscribed:?}"
    );
    match srv.event().await {
        BrokerEvent::Status {
            client_id, payload, ..
        } => {
            assert_eq!(&*client_id, assigned.as_str());
            assert_eq!(&payload[..], b"fg");
        }
        other => panic!("expected Status, got {other:?}"),
    }
    srv.disconnected(&assigned).await;
}

#[tokio::test]
async fn status_and_disconnected_events() {
    let mut srv = start_default().await;
    let (client, _rx) = rumq4(srv.addr, "phone-9", "push/user/9").await;
    client
        .publish(
            "push/app/status",
            rumqttc::QoS::AtLeastOnce,
            false,
            "background",
        )
        .await
        .unwrap();
    let subscribed = srv.event().await;
    assert!(
        matches!(&subscribed, BrokerEvent::Subscribed { topic } if &**topic == "push/user/9"),
        "{subscribed:?}"
    );
    let status_conn = match srv.event().await {
        BrokerEvent::Status {
            conn,
            client_id,
            payload,
        } => {
            assert_eq!(&*client_id, "phone-9");
            assert_eq!(&payload[..], b"background");
            conn
        }
        other => panic!("expected Status, got {other:?}"),
    };
    client.disconnect().await.unwrap();
    assert_eq!(srv.disconnected("phone-9").await, status_conn);
}

#[tokio::test]
async fn unacknowledged_message_is_redelivered_with_dup_after_reconnect() {
    let mut srv = start_default().await;
    let (mut a, ack) = Raw::connect(srv.addr, "dup-1", false, 60).await;
    assert!(!ack.session_present);
    a.subscribe("push/user/1", rumqttc::QoS::AtLeastOnce).await;
    srv.broker.publish("push/user/1", Bytes::from_static(b"m1"));
    let first = a.publish().await;
    assert!(!first.dup);
    drop(a); // no PUBACK
    srv.disconnected("dup-1").await;

    let (mut b, ack) = Raw::connect(srv.addr, "dup-1", false, 60).await;
    assert!(ack.session_present);
    let again = b.publish().await;
    assert!(again.dup);
    assert_eq!((again.pkid, &again.payload[..]), (first.pkid, &b"m1"[..]));
    b.send(v4::Packet::PubAck(v4::PubAck::new(again.pkid)))
        .await;
    srv.broker.publish("push/user/1", Bytes::from_static(b"m2"));
    let next = b.publish().await;
    assert_eq!((&next.payload[..], next.dup), (&b"m2"[..], false));
}

#[tokio::test]
async fn offline_persistent_session_gets_queued_messages_in_order() {
    let mut srv = start_default().await;
    let (mut a, _) = Raw::connect(srv.addr, "off-1", false, 60).await;
    a.subscribe("push/user/3", rumqttc::QoS::AtLeastOnce).await;
    a.send(v4::Packet::Disconnect).await;
    assert!(a.closed().await);
    srv.disconnected("off-1").await;
    for i in 0..5 {
        let n = srv
            .broker
            .publish("push/user/3", Bytes::from(format!("m{i}")));
        assert_eq!(n, 1, "queued for the offline session");
    }
    let (mut b, ack) = Raw::connect(srv.addr, "off-1", false, 60).await;
    assert!(ack.session_present);
    for i in 0..5 {
        let p = b.publish().await;
        assert_eq!(p.payload, Bytes::from(format!("m{i}")));
        b.send(v4::Packet::PubAck(v4::PubAck::new(p.pkid))).await;
    }
}

#[tokio::test]
async fn clean_session_starts_empty() {
    let mut srv = start_default().await;
    let (mut a, _) = Raw::connect(srv.addr, "cl-1", false, 60).await;
    a.subscribe("push/user/4", rumqttc::QoS::AtLeastOnce).await;
    drop(a);
    srv.disconnected("cl-1").await;
    assert_eq!(
        srv.broker
            .publish("push/user/4", Bytes::from_static(b"old")),
        1
    );

    let (mut b, ack) = Raw::connect(srv.addr, "cl-1", true, 60).await;
    assert!(!ack.session_present);
    assert_eq!(
        srv.broker.publish("push/user/4", Bytes::from_static(b"x")),
        0
    );
    b.subscribe("push/user/4", rumqttc::QoS::AtLeastOnce).await;
    srv.broker
        .publish("push/user/4", Bytes::from_static(b"fresh"));
    assert_eq!(&b.publish().await.payload[..], b"fresh");
    drop(b);
    srv.disconnected("cl-1").await;
    assert_eq!(
        srv.broker.session_count(),
        0,
        "clean session ends with its connection"
    );
}

#[tokio::test]
async fn last_will_on_abrupt_close_but_not_on_disconnect() {
    let mut srv = start_default().await;
    let (mut watcher, _) = Raw::connect(srv.addr, "watcher", true, 60).await;
    watcher.subscribe("will/#", rumqttc::QoS::AtLeastOnce).await;
    let with_will = |id: &str| {
        let mut c = v4::Connect::new(id);
        c.last_will = Some(v4::LastWill::new(
            format!("will/{id}"),
            "gone",
            rumqttc::QoS::AtLeastOnce,
            false,
        ));
        c
    };
    let (a, _) = Raw::connect_with(srv.addr, with_will("a")).await;
    drop(a);
    srv.disconnected("a").await;
    let (mut b, _) = Raw::connect_with(srv.addr, with_will("b")).await;
    b.send(v4::Packet::Disconnect).await;
    srv.disconnected("b").await;
    let (c, _) = Raw::connect_with(srv.addr, with_will("c")).await;
    drop(c);
    srv.disconnected("c").await;
    // v5, short DISCONNECTs: reason 0x00 (no will), then 0x04 (will wanted).
    for (id, reason) in [("e", 0x00), ("d", 0x04)] {
        let mut v5c = Raw::open(srv.addr).await;
        let will = v5::LastWill::new(format!("will/{id}"), "x", QoS5::AtLeastOnce, false, None);
        let v5::Packet::Connect(connect, _, _) = v5_connect(id, true, None) else {
            unreachable!()
        };
        v5c.send5(v5::Packet::Connect(connect, Some(will), None))
            .await;
        assert!(matches!(v5c.recv5().await, Some(v5::Packet::ConnAck(_))));
        v5c.stream.write_all(&[0xe0, 0x01, reason]).await.unwrap();
        srv.disconnected(id).await;
    }
    assert_eq!(watcher.publish().await.topic, "will/a");
    let next = watcher.publish().await.topic;
    assert_eq!(next, "will/c", "no will after DISCONNECT");
    assert_eq!(watcher.publish().await.topic, "will/d");
}

#[tokio::test]
async fn full_queue_drops_and_counts() {
    let mut srv = start(MqttSettings {
        max_queued: 2,
        ..MqttSettings::default()
    })
    .await;
    let (mut a, _) = Raw::connect(srv.addr, "full", false, 60).await;
    a.subscribe("push/user/6", rumqttc::QoS::AtLeastOnce).await;
    drop(a);
    srv.disconnected("full").await;
    let sent: Vec<usize> = (0..3)
        .map(|i| {
            srv.broker
                .publish("push/user/6", Bytes::from(format!("m{i}")))
        })
        .collect();
    assert_eq!(sent, vec![1, 1, 0]);
    assert_eq!(srv.broker.stats().mqtt_dropped.get(), 1);
    let (mut b, _) = Raw::connect(srv.addr, "full", false, 60).await;
    assert_eq!(&b.publish().await.payload[..], b"m0");
    assert_eq!(&b.publish().await.payload[..], b"m1");
}

#[tokio::test]
async fn keep_alive_expiry_closes_a_silent_client() {
    let mut srv = start_default().await;
    let (mut a, _) = Raw::connect(srv.addr, "sleepy", true, 1).await;
    assert!(a.closed().await);
    srv.disconnected("sleepy").await;
}

#[tokio::test]
async fn connect_must_arrive_in_time() {
    let srv = start(MqttSettings {
        connect_timeout_secs: 1,
        ..MqttSettings::default()
    })
    .await;
    let mut silent = Raw::open(srv.addr).await;
    assert!(silent.closed().await);
}

#[tokio::test]
async fn duplicate_client_id_takes_over() {
    let mut srv = start_default().await;
    let (mut old, _) = Raw::connect(srv.addr, "twin", false, 60).await;
    old.subscribe("push/user/8", rumqttc::QoS::AtLeastOnce)
        .await;
    let (mut new, ack) = Raw::connect(srv.addr, "twin", false, 60).await;
    assert!(ack.session_present);
    assert!(old.closed().await);
    srv.disconnected("twin").await;
    srv.broker
        .publish("push/user/8", Bytes::from_static(b"to-new"));
    assert_eq!(&new.publish().await.payload[..], b"to-new");
}

#[tokio::test]
async fn v5_takeover_and_shutdown_send_reasons() {
    let srv = start_default().await;
    let mut old = Raw::open(srv.addr).await;
    old.send5(v5_connect("v5twin", true, None)).await;
    assert!(matches!(old.recv5().await, Some(v5::Packet::ConnAck(_))));
    let mut new = Raw::open(srv.addr).await;
    new.send5(v5_connect("v5twin", true, None)).await;
    assert!(matches!(new.recv5().await, Some(v5::Packet::ConnAck(_))));
    match old.recv5().await {
        Some(v5::Packet::Disconnect(d)) => {
            assert_eq!(d.reason_code, v5::DisconnectReasonCode::SessionTakenOver)
        }
        other => panic!("expected DISCONNECT, got {other:?}"),
    }
    srv.devices.token().cancel();
    match new.recv5().await {
        Some(v5::Packet::Disconnect(d)) => {
            assert_eq!(d.reason_code, v5::DisconnectReasonCode::ServerShuttingDown)
        }
        other => panic!("expected DISCONNECT, got {other:?}"),
    }
    tokio::time::timeout(WAIT, srv.devices.end()).await.unwrap();
}

#[tokio::test]
async fn malformed_packet_closes_only_the_offender() {
    let srv = start_default().await;
    let (_good, mut rx) = rumq4(srv.addr, "good", "push/user/1").await;
    let (mut bad, _) = Raw::connect(srv.addr, "bad", true, 60).await;
    bad.stream
        .write_all(&[0x30, 0x03, 0xff, 0xff, 0x00])
        .await
        .unwrap();
    assert!(bad.closed().await);

    let mut bad5 = Raw::open(srv.addr).await;
    bad5.send5(v5_connect("bad5", true, None)).await;
    assert!(matches!(bad5.recv5().await, Some(v5::Packet::ConnAck(_))));
    bad5.stream.write_all(&[0xf0, 0x00]).await.unwrap();
    match bad5.recv5().await {
        Some(v5::Packet::Disconnect(d)) => {
            assert_eq!(d.reason_code, v5::DisconnectReasonCode::MalformedPacket)
        }
        other => panic!("expected DISCONNECT, got {other:?}"),
    }
    assert!(bad5.closed().await);

    srv.broker
        .publish("push/user/1", Bytes::from_static(b"still here"));
    assert_eq!(&next(&mut rx).await.payload[..], b"still here");
}

#[tokio::test]
async fn oversize_packet_is_refused() {
    let srv = start(MqttSettings {
        max_packet_size: 1024,
        ..MqttSettings::default()
    })
    .await;
    let (mut a, _) = Raw::connect(srv.addr, "big", true, 60).await;
    // Only the header of a 1 MiB PUBLISH: refused before the body is read.
    a.stream.write_all(&[0x30, 0x80, 0x80, 0x40]).await.unwrap();
    assert!(a.closed().await);
}

#[tokio::test]
async fn max_connections_holds() {
    let srv = start(MqttSettings {
        max_connections: 2,
        ..MqttSettings::default()
    })
    .await;
    let (first, _) = Raw::connect(srv.addr, "c1", true, 60).await;
    let (mut second, _) = Raw::connect(srv.addr, "c2", true, 60).await;
    let mut third = Raw::open(srv.addr).await;
    third
        .send(v4::Packet::Connect(v4::Connect::new("c3")))
        .await;
    // The server is responsive, yet the third connection is not served.
    second.send(v4::Packet::PingReq).await;
    assert_eq!(second.recv().await, Some(v4::Packet::PingResp));
    let mut probe = [0u8; 1];
    let unserved = third.stream.try_read(&mut probe);
    assert!(
        matches!(&unserved, Err(e) if e.kind() == std::io::ErrorKind::WouldBlock),
        "{unserved:?}"
    );
    drop(first);
    assert!(matches!(third.recv().await, Some(v4::Packet::ConnAck(_))));
}

#[tokio::test]
async fn qos2_publish_is_delivered_once() {
    let srv = start_default().await;
    let (_watch, mut rx) = rumq4(srv.addr, "w2", "push/user/2").await;
    let (mut p, _) = Raw::connect(srv.addr, "p2", true, 60).await;
    let mut publish = v4::Publish::new("push/user/2", rumqttc::QoS::ExactlyOnce, "once");
    publish.pkid = 11;
    p.send(v4::Packet::Publish(publish.clone())).await;
    assert_eq!(
        p.recv().await,
        Some(v4::Packet::PubRec(v4::PubRec::new(11)))
    );
    publish.dup = true;
    p.send(v4::Packet::Publish(publish)).await;
    assert_eq!(
        p.recv().await,
        Some(v4::Packet::PubRec(v4::PubRec::new(11)))
    );
    p.send(v4::Packet::PubRel(v4::PubRel::new(11))).await;
    assert_eq!(
        p.recv().await,
        Some(v4::Packet::PubComp(v4::PubComp::new(11)))
    );
    let marker = v4::Publish::new("push/user/2", rumqttc::QoS::AtMostOnce, "end");
    p.send(v4::Packet::Publish(marker)).await;
    assert_eq!(&next(&mut rx).await.payload[..], b"once");
    assert_eq!(&next(&mut rx).await.payload[..], b"end");
}

/// Each QoS 2 message is remembered until its PUBREL; a client that never
/// sends one may keep `mqtt.max_inflight` of them, and one more closes it
/// (v5: DISCONNECT 0x93, as announced in the CONNACK's Receive Maximum).
#[tokio::test]
async fn unreleased_qos2_messages_are_bounded() {
    let srv = start(MqttSettings {
        max_inflight: 4,
        ..MqttSettings::default()
    })
    .await;
    let publish = |pkid| {
        let mut p = v4::Publish::new("push/user/9", rumqttc::QoS::ExactlyOnce, "x");
        p.pkid = pkid;
        v4::Packet::Publish(p)
    };
    // Released as it goes: any number.
    let (mut polite, _) = Raw::connect(srv.addr, "polite", true, 60).await;
    for pkid in 1..=20 {
        polite.send(publish(pkid)).await;
        assert_eq!(
            polite.recv().await,
            Some(v4::Packet::PubRec(v4::PubRec::new(pkid)))
        );
        polite.send(v4::Packet::PubRel(v4::PubRel::new(pkid))).await;
        assert_eq!(
            polite.recv().await,
            Some(v4::Packet::PubComp(v4::PubComp::new(pkid)))
        );
    }
    // Never released: four are kept, the fifth closes the connection.
    let (mut hoarder, _) = Raw::connect(srv.addr, "hoarder", true, 60).await;
    for pkid in 1..=4 {
        hoarder.send(publish(pkid)).await;
        assert_eq!(
            hoarder.recv().await,
            Some(v4::Packet::PubRec(v4::PubRec::new(pkid)))
        );
    }
    // A duplicate of a kept one is not a new one.
    hoarder.send(publish(4)).await;
    assert_eq!(
        hoarder.recv().await,
        Some(v4::Packet::PubRec(v4::PubRec::new(4)))
    );
    hoarder.send(publish(5)).await;
    assert_eq!(hoarder.recv().await, None, "closed at the fifth");
    assert_eq!(srv.broker.stats().mqtt_malformed.get(), 1);

    let mut v5c = Raw::open(srv.addr).await;
    v5c.send5(v5_connect("hoarder5", true, None)).await;
    match v5c.recv5().await {
        Some(v5::Packet::ConnAck(a)) => {
            assert_eq!(a.properties.and_then(|p| p.receive_max), Some(4))
        }
        other => panic!("expected CONNACK, got {other:?}"),
    }
    for pkid in 1..=5 {
        let mut p = v5::Publish::new("push/user/9", QoS5::ExactlyOnce, "x", None);
        p.pkid = pkid;
        v5c.send5(v5::Packet::Publish(p)).await;
    }
    for pkid in 1..=4 {
        assert!(matches!(v5c.recv5().await, Some(v5::Packet::PubRec(r)) if r.pkid == pkid));
    }
    match v5c.recv5().await {
        Some(v5::Packet::Disconnect(d)) => {
            assert_eq!(
                d.reason_code,
                v5::DisconnectReasonCode::ReceiveMaximumExceeded
            )
        }
        other => panic!("expected DISCONNECT, got {other:?}"),
    }
}

#[tokio::test]
async fn client_id_rules() {
    let srv = start_default().await;
    let (_, ack) = Raw::connect(srv.addr, "", false, 60).await;
    assert_eq!(ack.code, v4::ConnectReturnCode::BadClientId);
    let (_, ack) = Raw::connect(srv.addr, "", true, 60).await;
    assert_eq!(ack.code, v4::ConnectReturnCode::Success);

    // Protocol level 3 (MQIsdp) is not spoken.
    let mut raw = Raw::open(srv.addr).await;
    let mut b = BytesMut::new();
    v4::Connect::new("old").write(&mut b).unwrap();
    b[8] = 3;
    raw.stream.write_all(&b).await.unwrap();
    match raw.recv().await {
        Some(v4::Packet::ConnAck(a)) => {
            assert_eq!(a.code, v4::ConnectReturnCode::RefusedProtocolVersion)
        }
        other => panic!("expected CONNACK, got {other:?}"),
    }
    assert!(raw.closed().await);
}

#[tokio::test]
async fn v5_session_expiry_zero_ends_with_the_connection() {
    let mut srv = start_default().await;
    let mut a = Raw::open(srv.addr).await;
    a.send5(v5_connect("exp0", false, Some(0))).await;
    assert!(matches!(a.recv5().await, Some(v5::Packet::ConnAck(_))));
    drop(a);
    srv.disconnected("exp0").await;
    assert_eq!(srv.broker.session_count(), 0);

    let mut b = Raw::open(srv.addr).await;
    b.send5(v5_connect("exp60", true, Some(60))).await;
    assert!(matches!(b.recv5().await, Some(v5::Packet::ConnAck(_))));
    drop(b);
    srv.disconnected("exp60").await;
    assert_eq!(srv.broker.session_count(), 1);
    let mut c = Raw::open(srv.addr).await;
    c.send5(v5_connect("exp60", false, Some(60))).await;
    match c.recv5().await {
        Some(v5::Packet::ConnAck(ack)) => assert!(ack.session_present),
        other => panic!("expected CONNACK, got {other:?}"),
    }
}

/// mosquitto's own clients (another implementation than rumqttc) in both versions.
#[tokio::test]
async fn mosquitto_clients_work_in_both_versions() {
    use std::process::Stdio;
    use tokio::io::AsyncBufReadExt;
    use tokio::process::Command;
    let mut srv = start_default().await;
    let port = srv.addr.port().to_string();
    for (version, id) in [("mqttv311", "mosq-4"), ("mqttv5", "mosq-5")] {
        let topic = format!("push/user/{id}");
        // stdbuf: mosquitto_sub block-buffers a pipe, hiding the SUBACK line.
        let mut sub = Command::new("stdbuf")
            .args([
                "-oL",
                "mosquitto_sub",
                "-h",
                "127.0.0.1",
                "-p",
                &port,
                "-V",
                version,
                "-i",
                id,
            ])
            .args(["-q", "1", "-C", "1", "-d", "-t", &topic])
            .stdout(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("mosquitto_sub is installed");
        let mut lines = tokio::io::BufReader::new(sub.stdout.take().unwrap()).lines();
        loop {
            let line = tokio::time::timeout(WAIT, lines.next_line()).await.unwrap();
            if line
                .unwrap()
                .expect("mosquitto_sub ended")
                .contains("received SUBACK")
            {
                break;
            }
        }
        assert_eq!(srv.broker.publish(&topic, Bytes::from_static(b"hello")), 1);
        let mut got = false;
        while let Some(line) = tokio::time::timeout(WAIT, lines.next_line())
            .await
            .unwrap()
            .unwrap()
        {
            got |= line == "hello";
        }
        assert!(got, "{version}: payload printed");
        let status = tokio::time::timeout(WAIT, sub.wait())
            .await
            .unwrap()
            .unwrap();
        assert!(status.success(), "{version}: {status}");
        srv.disconnected(id).await;

        let status = Command::new("mosquitto_pub")
            .args(["-h", "127.0.0.1", "-p", &port, "-V", version, "-i", id])
            .args(["-q", "2", "-t", "push/app/status", "-m", "foreground"])
            .status();
        let status = tokio::time::timeout(WAIT, status).await.unwrap().unwrap();
        assert!(status.success(), "{version}: {status}");
        match srv.event().await {
            BrokerEvent::Status {
                client_id, payload, ..
            } => {
                assert_eq!((&*client_id, &payload[..]), (id, &b"foreground"[..]));
            }
            other => panic!("expected Status, got {other:?}"),
        }
        srv.disconnected(id).await;
    }
}

#[tokio::test]
async fn a_client_that_never_reads_stalls_nobody() {
    let srv = start(MqttSettings {
        max_queued: 8,
        ..MqttSettings::default()
    })
    .await;
    let (mut slow, _) = Raw::connect(srv.addr, "slow", true, 0).await;
    slow.subscribe("push/group/1", rumqttc::QoS::AtMostOnce)
        .await;
    let (_good, mut rx) = rumq4(srv.addr, "good", "push/user/1").await;
    // 64 MiB for the slow client: far beyond what socket buffers can absorb.
    let big = Bytes::from(vec![7u8; 64 * 1024]);
    for i in 0..1000u32 {
        srv.broker.publish("push/group/1", big.clone());
        srv.broker
            .publish("push/user/1", Bytes::from(i.to_string()));
        assert_eq!(next(&mut rx).await.payload, Bytes::from(i.to_string()));
    }
    assert!(
        srv.broker.stats().mqtt_dropped.get() > 0,
        "the slow session overflowed"
    );
    drop(slow);
}

#[tokio::test]
async fn v5_keep_alive_expiry_says_why() {
    let srv = start_default().await;
    let mut a = Raw::open(srv.addr).await;
    let v5::Packet::Connect(mut connect, _, _) = v5_connect("sleepy5", true, None) else {
        unreachable!()
    };
    connect.keep_alive = 1;
    a.send5(v5::Packet::Connect(connect, None, None)).await;
    assert!(matches!(a.recv5().await, Some(v5::Packet::ConnAck(_))));
    match a.recv5().await {
        Some(v5::Packet::Disconnect(d)) => {
            assert_eq!(d.reason_code, v5::DisconnectReasonCode::KeepAliveTimeout)
        }
        other => panic!("expected DISCONNECT, got {other:?}"),
    }
}

#[tokio::test]
async fn offline_sessions_expire() {
    let mut srv = start(MqttSettings {
        session_expiry_secs: 1,
        ..MqttSettings::default()
    })
    .await;
    let (mut a, _) = Raw::connect(srv.addr, "brief", false, 60).await;
    a.subscribe("push/user/1", rumqttc::QoS::AtLeastOnce).await;
    drop(a);
    srv.disconnected("brief").await;
    assert_eq!(srv.broker.session_count(), 1);
    // Polls the sweeper's effect; the timeout only bounds a failure.
    tokio::time::timeout(WAIT, async {
        while srv.broker.session_count() > 0 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("session expired");
    assert_eq!(
        srv.broker.publish("push/user/1", Bytes::from_static(b"x")),
        0
    );
    assert_eq!(srv.broker.stats().mqtt_sessions_expired.get(), 1);
}

#[tokio::test]
async fn inflight_window_holds_back_until_acknowledged() {
    let srv = start(MqttSettings {
        max_inflight: 2,
        ..MqttSettings::default()
    })
    .await;
    let (mut a, _) = Raw::connect(srv.addr, "win", true, 60).await;
    a.subscribe("push/user/1", rumqttc::QoS::AtLeastOnce).await;
    // Queued together (no await in between), so one pass would send all three.
    for i in 0..3 {
        srv.broker
            .publish("push/user/1", Bytes::from(format!("m{i}")));
    }
    let first = a.publish().await;
    assert_eq!(&first.payload[..], b"m0");
    assert_eq!(&a.publish().await.payload[..], b"m1");
    a.send(v4::Packet::PingReq).await;
    assert_eq!(a.recv().await, Some(v4::Packet::PingResp), "m2 waits");
    a.send(v4::Packet::PubAck(v4::PubAck::new(first.pkid)))
        .await;
    assert_eq!(&a.publish().await.payload[..], b"m2");
}

/// Many clients sending garbage at once: each is closed and counted, and a
/// well-behaved subscriber gets every message, in order, meanwhile.
#[tokio::test]
async fn malformed_storm_leaves_other_deliveries_alone() {
    let srv = start_default().await;
    let (mut good, _) = Raw::connect(srv.addr, "good", true, 60).await;
    good.subscribe("push/user/1", rumqttc::QoS::AtLeastOnce)
        .await;
    let mut connect = BytesMut::new();
    v4::Packet::Connect(v4::Connect::new("junk"))
        .write(&mut connect, usize::MAX)
        .unwrap();
    let attacks: Vec<Vec<u8>> = vec![
        vec![0xff; 64],                                           // not MQTT at all
        vec![0x10, 0xff, 0xff, 0xff, 0xff, 0x7f],                 // bad remaining length
        [&connect[..], &[0xf0, 0x00]].concat(),                   // AUTH from a v3.1.1 client
        [&connect[..], &[0x30, 0x03, 0xff, 0xff, 0x00]].concat(), // topic length past the end
        [&connect[..], &[0x82, 0x02, 0x00, 0x01]].concat(),       // SUBSCRIBE without filters
    ];
    let rounds = 40;
    let addr = srv.addr;
    let storm: Vec<_> = (0..rounds)
        .flat_map(|_| attacks.clone())
        .map(|junk| {
            tokio::spawn(async move {
                let mut s = TcpStream::connect(addr).await.unwrap();
                s.write_all(&junk).await.unwrap();
                // Until the server closes it.
                let mut sink = Vec::new();
                let _ = tokio::time::timeout(WAIT, s.read_to_end(&mut sink)).await;
            })
        })
        .collect();
    for n in 0..100u32 {
        srv.broker.publish("push/user/1", n.to_string().into());
        let p = good.publish().await;
        assert_eq!(p.payload, n.to_string().as_bytes());
        good.send(v4::Packet::PubAck(v4::PubAck::new(p.pkid))).await;
    }
    for attacker in storm {
        attacker.await.unwrap();
    }
    let malformed = srv.broker.stats().mqtt_malformed.get();
    assert_eq!(malformed, (rounds * attacks.len()) as u64);
}

/// Issue 14: without tokens there is no user, so sessions kept offline are
/// capped per client address (`max_sessions_per_user`), the oldest offline
/// first; connected ones are never dropped for it (a NAT may hide many).
#[tokio::test]
async fn offline_sessions_per_address_are_capped() {
    let mut srv = start(MqttSettings {
        max_sessions_per_user: 2,
        ..MqttSettings::default()
    })
    .await;
    let mut open = Vec::new();
    for id in ["s1", "s2", "s3"] {
        let (mut c, _) = Raw::connect(srv.addr, id, false, 60).await;
        c.subscribe("push/user/1", rumqttc::QoS::AtLeastOnce).await;
        open.push(c);
    }
    assert_eq!(
        srv.broker.publish("push/user/1", Bytes::from_static(b"x")),
        3
    );
    for (c, id) in open.into_iter().zip(["s1", "s2", "s3"]) {
        drop(c);
        srv.disconnected(id).await;
    }
    assert_eq!(srv.broker.session_count(), 2);
    assert_eq!(srv.broker.stats().mqtt_sessions_evicted.get(), 1);
    assert_eq!(
        srv.broker.publish("push/user/1", Bytes::from_static(b"y")),
        2
    );
    let (_s1, ack) = Raw::connect(srv.addr, "s1", false, 60).await;
    assert!(!ack.session_present, "the oldest was dropped");
    let (_s2, ack) = Raw::connect(srv.addr, "s2", false, 60).await;
    assert!(ack.session_present);
    let (_s3, ack) = Raw::connect(srv.addr, "s3", false, 60).await;
    assert!(ack.session_present);
    // Connected again, s2 and s3 no longer count: s4 alone is offline.
    let (s4, _) = Raw::connect(srv.addr, "s4", false, 60).await;
    drop(s4);
    srv.disconnected("s4").await;
    assert_eq!(srv.broker.session_count(), 4);
    assert_eq!(srv.broker.stats().mqtt_sessions_evicted.get(), 1);
}

/// Issue 14: client ids longer than `max_client_id_len` are refused with
/// each version's code (3.1.1: 0x02 identifier rejected; 5: 0x85).
#[tokio::test]
async fn long_client_ids_are_refused() {
    let srv = start_default().await;
    let long = "x".repeat(257);
    let (mut a, ack) = Raw::connect(srv.addr, &long, true, 60).await;
    assert_eq!(ack.code, v4::ConnectReturnCode::BadClientId);
    assert!(a.closed().await);
    let mut b = Raw::open(srv.addr).await;
    b.send5(v5_connect(&long, true, None)).await;
    match b.recv5().await {
        Some(v5::Packet::ConnAck(ack)) => {
            assert_eq!(ack.code, v5::ConnectReturnCode::ClientIdentifierNotValid)
        }
        other => panic!("expected CONNACK, got {other:?}"),
    }
    let (_, ack) = Raw::connect(srv.addr, &"x".repeat(256), true, 60).await;
    assert_eq!(ack.code, v4::ConnectReturnCode::Success);
    assert_eq!(srv.broker.session_count(), 1);
}

/// Issue 14: what offline sessions queue is bounded in bytes across the
/// broker; a session's oldest messages make room for its new ones.
#[tokio::test]
async fn offline_queues_are_bounded_in_bytes() {
    // Each message counts topic (11) + payload (2) + 64 bytes.
    let mut srv = start(MqttSettings {
        max_queued_bytes: 3 * 77,
        ..MqttSettings::default()
    })
    .await;
    for (id, topic) in [("a", "push/user/1"), ("b", "push/user/2")] {
        let (mut c, _) = Raw::connect(srv.addr, id, false, 60).await;
        c.subscribe(topic, rumqttc::QoS::AtLeastOnce).await;
        drop(c);
        srv.disconnected(id).await;
    }
    for i in 0..5 {
        let n = srv.broker.publish("push/user/1", format!("a{i}").into());
        assert_eq!(n, 1);
    }
    assert_eq!(srv.broker.offline_bytes(), 3 * 77);
    assert_eq!(srv.broker.stats().mqtt_dropped.get(), 2);
    // b has nothing older to give up: refused.
    assert_eq!(srv.broker.publish("push/user/2", "b0".into()), 0);
    assert_eq!(srv.broker.stats().mqtt_dropped.get(), 3);
    let (mut a, ack) = Raw::connect(srv.addr, "a", false, 60).await;
    assert!(ack.session_present);
    for want in ["a2", "a3", "a4"] {
        assert_eq!(&a.publish().await.payload[..], want.as_bytes());
    }
    assert_eq!(srv.broker.offline_bytes(), 0);
}

/// Issue 14: a packet that has started must be complete within
/// `packet_timeout_secs`, even with keep-alive 0.
#[tokio::test]
async fn half_sent_packet_is_not_held_forever() {
    let srv = start(MqttSettings {
        packet_timeout_secs: 1,
        ..MqttSettings::default()
    })
    .await;
    let (mut a, ack) = Raw::connect(srv.addr, "trickle", true, 0).await;
    assert_eq!(ack.code, v4::ConnectReturnCode::Success);
    // The header and part of a 1000-byte PUBLISH, then nothing.
    a.stream
        .write_all(&[0x30, 0xe8, 0x07, 0x00, 0x04, b't'])
        .await
        .unwrap();
    assert!(a.closed().await);
    assert_eq!(srv.broker.stats().mqtt_timeouts.get(), 1);
}

/// Issue 14: keep-alive 0 (or over the maximum) is held to
/// `max_keepalive_secs`; v5 clients are told in the CONNACK.
#[tokio::test]
async fn keep_alive_is_capped() {
    let srv = start(MqttSettings {
        max_keepalive_secs: 1,
        ..MqttSettings::default()
    })
    .await;
    let (mut a, _) = Raw::connect(srv.addr, "forever", true, 0).await;
    assert!(a.closed().await);

    let mut b = Raw::open(srv.addr).await;
    let v5::Packet::Connect(mut connect, _, _) = v5_connect("forever5", true, None) else {
        unreachable!()
    };
    connect.keep_alive = 0;
    b.send5(v5::Packet::Connect(connect, None, None)).await;
    match b.recv5().await {
        Some(v5::Packet::ConnAck(ack)) => {
            let props = ack.properties.expect("CONNACK properties");
            assert_eq!(props.server_keep_alive, Some(1));
        }
        other => panic!("expected CONNACK, got {other:?}"),
    }
    match b.recv5().await {
        Some(v5::Packet::Disconnect(d)) => {
            assert_eq!(d.reason_code, v5::DisconnectReasonCode::KeepAliveTimeout)
        }
        other => panic!("expected DISCONNECT, got {other:?}"),
    }
}

/// Issue 14: at most `max_connections_per_ip` connections from one address.
#[tokio::test]
async fn connections_per_ip_are_capped() {
    let mut srv = start(MqttSettings {
        max_connections_per_ip: 2,
        ..MqttSettings::default()
    })
    .await;
    let (first, _) = Raw::connect(srv.addr, "ip1", true, 60).await;
    let (_second, _) = Raw::connect(srv.addr, "ip2", true, 60).await;
    let mut third = Raw::open(srv.addr).await;
    third
        .send(v4::Packet::Connect(v4::Connect::new("ip3")))
        .await;
    assert_eq!(third.recv().await, None, "closed without a CONNACK");
    assert_eq!(srv.broker.stats().mqtt_ip_refused.get(), 1);
    drop(first);
    srv.disconnected("ip1").await;
    // The slot is given back once the connection's task has ended.
    tokio::time::timeout(WAIT, async {
        loop {
            let mut again = Raw::open(srv.addr).await;
            again
                .send(v4::Packet::Connect(v4::Connect::new("ip4")))
                .await;
            if let Some(v4::Packet::ConnAck(_)) = again.recv().await {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
    .expect("a slot came free");
}

/// Issue 14: without tokens, a connection stops counting for a user once it
/// unsubscribes from the user's topic; cycles leave nothing behind.
#[tokio::test]
async fn presence_follows_unsubscribe() {
    let srv = start_default().await;
    let (mut a, _) = Raw::connect(srv.addr, "cycler", true, 60).await;
    for i in 0..50u16 {
        let topic = format!("push/user/{i}");
        a.subscribe(&topic, rumqttc::QoS::AtLeastOnce).await;
        assert_eq!(srv.broker.presence(&i.to_string()).len(), 1);
        let mut u = v4::Unsubscribe::new(&topic);
        u.pkid = i + 2;
        a.send(v4::Packet::Unsubscribe(u)).await;
        assert!(matches!(a.recv().await, Some(v4::Packet::UnsubAck(_))));
        assert!(srv.broker.presence(&i.to_string()).is_empty(), "{topic}");
    }
}

/// Issue 14 (MQTT 5 §3.14.2.2.2): a DISCONNECT may not give a session
/// expiry to a session that had none.
#[tokio::test]
async fn v5_disconnect_cannot_make_a_session_persistent() {
    let mut srv = start_default().await;
    let mut a = Raw::open(srv.addr).await;
    a.send5(v5_connect("late", false, Some(0))).await;
    assert!(matches!(a.recv5().await, Some(v5::Packet::ConnAck(_))));
    let props = v5::DisconnectProperties {
        session_expiry_interval: Some(3600),
        reason_string: None,
        user_properties: Vec::new(),
        server_reference: None,
    };
    let mut d = v5::Disconnect::new(v5::DisconnectReasonCode::NormalDisconnection);
    d.properties = Some(props);
    a.send5(v5::Packet::Disconnect(d)).await;
    match a.recv5().await {
        Some(v5::Packet::Disconnect(d)) => {
            assert_eq!(d.reason_code, v5::DisconnectReasonCode::ProtocolError)
        }
        other => panic!("expected DISCONNECT, got {other:?}"),
    }
    srv.disconnected("late").await;
    assert_eq!(srv.broker.session_count(), 0);
}

/// Without tokens, a persistent session that connects again (its
/// subscriptions kept) is its user's connection again, without a SUBSCRIBE.
#[tokio::test]
async fn presence_of_a_resumed_session() {
    let mut srv = start_default().await;
    let (mut a, _) = Raw::connect(srv.addr, "resumer", false, 60).await;
    a.subscribe("push/user/12", rumqttc::QoS::AtLeastOnce).await;
    drop(a);
    srv.disconnected("resumer").await;
    assert!(srv.broker.presence("12").is_empty());
    let (_a, ack) = Raw::connect(srv.addr, "resumer", false, 60).await;
    assert!(ack.session_present);
    let seen = srv.broker.presence("12");
    assert_eq!(seen.len(), 1);
    assert_eq!(&*seen[0].client_id, "resumer");
}
