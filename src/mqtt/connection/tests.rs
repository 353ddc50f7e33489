//! The connection task against a client on a real socket.

use super::*;
use crate::mqtt::Broker;
use crate::settings::MqttSettings;
use tokio::io::AsyncReadExt;

/// A v3.1.1 CONNECT: clean session, keep-alive 60 s, with a QoS 0 will if given.
fn connect_packet(client_id: &str, will: Option<(&str, &[u8])>) -> Vec<u8> {
    let field = |out: &mut Vec<u8>, s: &[u8]| {
        out.extend_from_slice(&(s.len() as u16).to_be_bytes());
        out.extend_from_slice(s);
    };
    let mut body = Vec::new();
    field(&mut body, b"MQTT");
    body.extend_from_slice(&[4, if will.is_some() { 0x06 } else { 0x02 }, 0, 60]);
    field(&mut body, client_id.as_bytes());
    if let Some((topic, payload)) = will {
        field(&mut body, topic.as_bytes());
        field(&mut body, payload);
    }
    let mut packet = vec![0x10, body.len() as u8];
    packet.extend_from_slice(&body);
    packet
}

/// A v3.1.1 client "c", connected: its socket and its connection (not yet served).
async fn connected(broker: &Broker) -> (TcpStream, Conn, tracing::Span) {
    connected_with(broker, &connect_packet("c", None)).await
}

async fn connected_with(
    broker: &Broker,
    connect_packet: &[u8],
) -> (TcpStream, Conn, tracing::Span) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let (client, accepted) = tokio::join!(
        TcpStream::connect(listener.local_addr().unwrap()),
        listener.accept()
    );
    let (mut client, (accepted, peer)) = (client.unwrap(), accepted.unwrap());
    client.write_all(connect_packet).await.unwrap();
    let permit = Arc::new(tokio::sync::Semaphore::new(1))
        .acquire_owned()
        .await
        .unwrap();
    let (conn, span) = connect(
        Arc::clone(&broker.inner),
        accepted,
        peer,
        Transport::Tcp,
        CancellationToken::new(),
        permit,
    )
    .await
    .expect("connected");
    (client, conn, span)
}

/// Reads packets until one starting with `first` has arrived.
async fn expect(client: &mut TcpStream, buf: &mut BytesMut, first: u8) -> BytesMut {
    loop {
        if let Some((byte, packet)) = take_packet(buf) {
            if byte == first {
                return packet;
            }
            continue;
        }
        let read = tokio::time::timeout(Duration::from_secs(10), client.read_buf(buf));
        assert!(read.await.expect("in time").unwrap() > 0, "closed");
    }
}

/// One whole v3.1.1 packet off `buf`: its first byte and its body.
fn take_packet(buf: &mut BytesMut) -> Option<(u8, BytesMut)> {
    let (mut len, mut shift, mut i) = (0usize, 0, 1);
    loop {
        let b = *buf.get(i)?;
        len |= usize::from(b & 0x7f) << shift;
        i += 1;
        if b & 0x80 == 0 {
            break;
        }
        shift += 7;
    }
    if buf.len() < i + len {
        return None;
    }
    let mut packet = buf.split_to(i + len);
    let first = packet[0];
    Some((first, packet.split_off(i)))
}

/// Mosquitto keeps nothing for an idle client; a device that was sent
/// a push keeps no message buffer once it has acknowledged it.
#[tokio::test]
async fn an_acknowledged_push_leaves_no_buffers() {
    let (broker, _rx) = Broker::new(&MqttSettings::default());
    let (mut client, conn, span) = connected(&broker).await;
    let session = Arc::clone(&conn.session);
    tokio::spawn(conn.serve().instrument(span));
    let mut buf = BytesMut::new();
    expect(&mut client, &mut buf, 0x20).await;
    // SUBSCRIBE id 1, push/user/1 at QoS 1.
    client
        .write_all(b"\x82\x10\0\x01\0\x0bpush/user/1\x01")
        .await
        .unwrap();
    expect(&mut client, &mut buf, 0x90).await;
    for round in 0..3 {
        assert_eq!(broker.publish("push/user/1", Bytes::from_static(b"{}")), 1);
        let publish = expect(&mut client, &mut buf, 0x32).await;
        let at = 2 + usize::from(u16::from_be_bytes([publish[0], publish[1]]));
        let pkid = [publish[at], publish[at + 1]];
        {
            let st = session.lock();
            assert!(
                st.queue.capacity() == 0,
                "round {round}: the queue was kept"
            );
            assert_eq!(st.inflight.len(), 1);
        }
        client
            .write_all(&[0x40, 2, pkid[0], pkid[1], 0xc0, 0])
            .await
            .unwrap();
        // PINGRESP: the PUBACK before it was handled.
        expect(&mut client, &mut buf, 0xd0).await;
        let st = session.lock();
        assert!(st.is_idle());
        assert_eq!(
            (st.queue.capacity(), st.inflight.capacity()),
            (0, 0),
            "round {round}: buffers kept by an idle session"
        );
    }
}

/// The will is kept for the connection's life: in a buffer of its own,
/// not as a slice of the read buffer the CONNECT arrived in.
#[tokio::test]
async fn a_will_keeps_no_read_buffer() {
    let (broker, _rx) = Broker::new(&MqttSettings::default());
    let packet = connect_packet("w", Some(("push/app/status", b"{}")));
    let (_client, conn, _span) = connected_with(&broker, &packet).await;
    let will = conn.will.as_ref().expect("a will");
    assert_eq!(&will.payload[..], b"{}");
    assert!(will.payload.is_unique(), "the will shares the read buffer");
}

/// What a device publishes may wait in sessions' queues, counted by its
/// size: it must not keep the device's read buffer alive with it.
#[tokio::test]
async fn a_queued_device_publish_keeps_no_read_buffer() {
    let (broker, _rx) = Broker::new(&MqttSettings::default());
    // The subscriber is never served: what reaches it stays queued.
    let (_a, subscriber, _span) = connected_with(&broker, &connect_packet("a", None)).await;
    broker
        .inner
        .sessions()
        .subscribe(&subscriber.session, "push/user/5", 0);
    let (mut b, publisher, span) = connected_with(&broker, &connect_packet("b", None)).await;
    tokio::spawn(publisher.serve().instrument(span));
    let mut buf = BytesMut::new();
    expect(&mut b, &mut buf, 0x20).await;
    // PUBLISH push/user/5 QoS 0 "hello", then PINGREQ.
    b.write_all(b"\x30\x12\0\x0bpush/user/5hello\xc0\0")
        .await
        .unwrap();
    expect(&mut b, &mut buf, 0xd0).await;
    let msg = subscriber.session.lock().queue.pop_front().expect("queued");
    assert_eq!(&msg.payload[..], b"hello");
    let held = msg.payload.try_into_mut().map(|m| m.capacity());
    assert_eq!(held.ok(), Some(5), "the payload keeps more than itself");
}

/// An idle connection is mostly its connected task (tokio adds ~170
/// bytes): every byte of this future is a byte per connected device.
#[tokio::test]
async fn the_connected_task_is_small() {
    let (broker, _rx) = Broker::new(&MqttSettings::default());
    let (_client, conn, span) = connected(&broker).await;
    let task = conn.serve().instrument(span);
    let size = std::mem::size_of_val(&task);
    println!("connected task's future: {size} bytes");
    assert!(
        size <= 512,
        "the connected task's future grew to {size} bytes"
    );
}
