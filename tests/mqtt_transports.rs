//! MQTT over TLS (a standard client: mosquitto_sub --cafile), over
//! WebSocket and over WebSocket inside TLS (a raw WebSocket client speaking
//! MQTT bytes), and their handshakes failing without harm.

mod support;

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};

use bytes::BytesMut;
use futures_util::{SinkExt, StreamExt};
use rmpv::Value as Mp;
use rumqttc::mqttbytes::v4;
use rumqttc::QoS;
use serde_json::json;
use support::pki::{pki, tls_client};
use support::proxy::Backend;
use support::{server, wait_until, WAIT};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::handshake::client::Request;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test]
async fn mosquitto_sub_over_tls_receives_a_push() {
    let dir = tempfile::tempdir().unwrap();
    let pki = pki(dir.path(), "a");
    let mut settings = server::settings(None);
    settings.mqtt.tls_listen = Some("127.0.0.1:0".parse().unwrap());
    settings.mqtt.tls_cert = Some(pki.cert.clone());
    settings.mqtt.tls_key = Some(pki.key.clone());
    let server = server::start(settings).await;
    let port = server.mqtt_tls_addr.unwrap().port().to_string();

    // stdbuf: mosquitto_sub block-buffers a pipe, hiding its SUBACK line.
    let mut sub = Running(
        Command::new("stdbuf")
            .args(["-oL", "mosquitto_sub", "-h", "127.0.0.1", "-p", &port])
            .arg("--cafile")
            .arg(&pki.ca)
            .args(["-t", "push/user/42", "-q", "1", "-C", "1", "-W", "30", "-d"])
            .stdout(Stdio::piped())
            .spawn()
            .expect("mosquitto_sub (scripts/test.sh installs mosquitto-clients)"),
    );
    let mut lines = BufReader::new(sub.0.stdout.take().unwrap()).lines();
    let subscribed = tokio::task::spawn_blocking(move || {
        let found = lines
            .by_ref()
            .map(|l| l.unwrap())
            .any(|l| l.contains("SUBACK"));
        (found, lines)
    });
    let (found, lines) = subscribed.await.unwrap();
    assert!(found, "mosquitto_sub subscribed over TLS");
    assert_eq!(
        server.broker.publish("push/user/42", r#"{"tls":1}"#.into()),
        1
    );
    let payload =
        tokio::task::spawn_blocking(move || lines.map(|l| l.unwrap()).find(|l| l.starts_with('{')));
    assert_eq!(payload.await.unwrap().as_deref(), Some(r#"{"tls":1}"#));
    assert!(sub.0.wait().unwrap().success());
}

#[tokio::test]
async fn tls_certificate_is_reloaded_and_silent_handshakes_time_out() {
    let dir = tempfile::tempdir().unwrap();
    let (old, new) = (pki(dir.path(), "old"), pki(dir.path(), "new"));
    let (cert, key) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    std::fs::copy(&old.cert, &cert).unwrap();
    std::fs::copy(&old.key, &key).unwrap();
    let mut settings = server::settings(None);
    settings.mqtt.tls_listen = Some("127.0.0.1:0".parse().unwrap());
    settings.mqtt.tls_cert = Some(cert.clone());
    settings.mqtt.tls_key = Some(key.clone());
    settings.mqtt.connect_timeout_secs = 1;
    let server = server::start(settings).await;
    let addr = server.mqtt_tls_addr.unwrap();
    let name = rustls_pki_types::ServerName::try_from("127.0.0.1").unwrap();
    let handshake = |ca: &Path| {
        let connector = tls_client(ca);
        let name = name.clone();
        async move {
            let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
            connector.connect(name, tcp).await.is_ok()
        }
    };
    assert!(handshake(&old.ca).await);
    assert!(!handshake(&new.ca).await);

    // A client that never starts TLS is dropped after connect_timeout_secs.
    let mut silent = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut byte = [0u8; 1];
    let read = tokio::time::timeout(WAIT, silent.read(&mut byte)).await;
    assert!(matches!(read, Ok(Ok(0)) | Ok(Err(_))), "{read:?}");

    std::fs::copy(&new.key, &key).unwrap();
    std::fs::copy(&new.cert, &cert).unwrap();
    let new_ca = new.ca.clone();
    wait_until(|| handshake(&new_ca)).await;
    assert!(server.stats.mqtt_handshakes_failed.get() >= 2);
}

/// A WebSocket handshake request offering the `mqtt` subprotocol.
fn mqtt_request(url: &str) -> Request {
    let mut req = url.into_client_request().unwrap();
    req.headers_mut()
        .insert("Sec-WebSocket-Protocol", "mqtt".parse().unwrap());
    req
}

/// MQTT 3.1.1 packets over a WebSocket (`ws://` or `wss://`), by hand.
struct WsMqtt<S> {
    ws: WebSocketStream<S>,
    buf: BytesMut,
}

impl<S: AsyncRead + AsyncWrite + Unpin> WsMqtt<S> {
    fn new(ws: WebSocketStream<S>) -> Self {
        WsMqtt {
            ws,
            buf: BytesMut::new(),
        }
    }

    /// CONNECT and SUBSCRIBE in one message (the stream is bytes, not
    /// packets), then their CONNACK and SUBACK.
    async fn subscribe(&mut self, client_id: &str, topic: &str) {
        let mut bytes = v4_bytes(v4::Packet::Connect(v4::Connect::new(client_id)));
        let mut s = v4::Subscribe::new(topic, QoS::AtLeastOnce);
        s.pkid = 1;
        bytes.extend(v4_bytes(v4::Packet::Subscribe(s)));
        self.ws.send(Message::Binary(bytes.into())).await.unwrap();
        assert!(matches!(self.next().await, v4::Packet::ConnAck(_)));
        match self.next().await {
            v4::Packet::SubAck(a) => assert_eq!(
                a.return_codes,
                [v4::SubscribeReasonCode::Success(QoS::AtLeastOnce)]
            ),
            other => panic!("expected SUBACK, got {other:?}"),
        }
    }

    async fn next(&mut self) -> v4::Packet {
        loop {
            match v4::Packet::read(&mut self.buf, usize::MAX) {
                Ok(p) => return p,
                Err(rumqttc::Error::InsufficientBytes(_)) => {}
                Err(e) => panic!("bad packet: {e}"),
            }
            match tokio::time::timeout(WAIT, self.ws.next())
                .await
                .expect("in time")
            {
                Some(Ok(Message::Binary(b))) => self.buf.extend_from_slice(&b),
                Some(Ok(_)) => {}
                other => panic!("websocket ended: {other:?}"),
            }
        }
    }

    async fn next_payload(&mut self) -> Vec<u8> {
        match self.next().await {
            v4::Packet::Publish(p) => p.payload.to_vec(),
            other => panic!("expected PUBLISH, got {other:?}"),
        }
    }
}

fn v4_bytes(p: v4::Packet) -> Vec<u8> {
    let mut b = BytesMut::new();
    p.write(&mut b, usize::MAX).unwrap();
    b.to_vec()
}

#[tokio::test]
async fn websocket_client_receives_a_push() {
    let mut settings = server::settings(None);
    settings.mqtt.ws_listen = Some("127.0.0.1:0".parse().unwrap());
    let server = server::start(settings).await;
    let addr = server.mqtt_ws_addr.unwrap();

    let mut wrong = format!("ws://{addr}/other").into_client_request().unwrap();
    wrong
        .headers_mut()
        .insert("Sec-WebSocket-Protocol", "mqtt".parse().unwrap());
    assert!(tokio_tungstenite::connect_async(wrong).await.is_err());

    let req = mqtt_request(&format!("ws://{addr}/mqtt"));
    let (ws, resp) = tokio_tungstenite::connect_async(req).await.unwrap();
    assert_eq!(resp.headers()["Sec-WebSocket-Protocol"], "mqtt");

    let mut ws = WsMqtt::new(ws);
    ws.subscribe("ws-42", "push/user/42").await;
    assert_eq!(server.broker.publish("push/user/42", "ws".into()), 1);
    assert_eq!(ws.next_payload().await, b"ws");
    let mut ws = ws.ws;
    let _ = ws.close(None).await;

    // A plain TCP client on the WebSocket port gets no MQTT.
    let mut raw = tokio::net::TcpStream::connect(addr).await.unwrap();
    raw.write_all(&v4_bytes(v4::Packet::Connect(v4::Connect::new("raw"))))
        .await
        .unwrap();
    let mut out = Vec::new();
    let _ = tokio::time::timeout(WAIT, raw.read_to_end(&mut out)).await;
    assert!(!out.starts_with(&[0x20]), "CONNACK over a non-WebSocket");
}

#[tokio::test]
async fn websocket_over_tls_client_receives_a_push() {
    let dir = tempfile::tempdir().unwrap();
    let pki = pki(dir.path(), "wss");
    let mut settings = server::settings(None);
    settings.mqtt.wss_listen = Some("127.0.0.1:0".parse().unwrap());
    settings.mqtt.tls_cert = Some(pki.cert.clone());
    settings.mqtt.tls_key = Some(pki.key.clone());
    let server = server::start(settings).await;
    let addr = server.mqtt_wss_addr.expect("wss listener");
    assert_eq!(server.mqtt_tls_addr, None, "tls_listen was not set");
    let ready = support::http::get(server.http_addr, "/readyz").await;
    assert!(
        ready.text().contains("mqtt.wss_listen: ok"),
        "{}",
        ready.text()
    );

    // A WebSocket without TLS gets no upgrade.
    let plain = tokio_tungstenite::connect_async(mqtt_request(&format!("ws://{addr}/mqtt")));
    assert!(plain.await.is_err());

    let connect = async |path: &str| {
        let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
        let name = rustls_pki_types::ServerName::try_from("127.0.0.1").unwrap();
        let tls = tls_client(&pki.ca).connect(name, tcp).await.unwrap();
        tokio_tungstenite::client_async(mqtt_request(&format!("wss://{addr}{path}")), tls).await
    };
    assert!(connect("/other").await.is_err(), "only /mqtt is served");
    let (ws, resp) = connect("/mqtt").await.unwrap();
    assert_eq!(resp.headers()["Sec-WebSocket-Protocol"], "mqtt");
    let mut ws = WsMqtt::new(ws);
    ws.subscribe("wss-42", "push/user/42").await;
    let mut backend = Backend::connect(server.proxy_addr).await;
    assert_eq!(backend.push(2, Mp::from(42), &json!({"wss": 1})).await, 0);
    assert_eq!(ws.next_payload().await, br#"{"wss":1}"#);
}

/// `mqtt.max_connections` is one cap across transports.
#[tokio::test]
async fn connection_cap_is_shared_by_transports() {
    let mut settings = server::settings(None);
    settings.mqtt.ws_listen = Some("127.0.0.1:0".parse().unwrap());
    settings.mqtt.max_connections = 1;
    let server = server::start(settings).await;
    let mut tcp = support::mqtt::Device::connect(server.mqtt_addr, "tcp", true).await;
    let req = mqtt_request(&format!("ws://{}/mqtt", server.mqtt_ws_addr.unwrap()));
    let ws = tokio::spawn(tokio_tungstenite::connect_async(req));
    // The server is responsive, yet the WebSocket is not served.
    tcp.subscribe("push/user/1").await;
    assert!(!ws.is_finished());
    tcp.disconnect().await;
    let upgraded = tokio::time::timeout(WAIT, ws)
        .await
        .expect("served once a slot is free");
    assert!(upgraded.unwrap().is_ok());
}

/// Issue 14: a WebSocket frame larger than `mqtt.max_packet_size` (plus
/// framing headroom) is refused from its header, before any CONNECT and
/// before its payload is buffered, over `ws` and `wss` (raw bytes: a client
/// library would not stop half-way through a frame).
#[tokio::test]
async fn websocket_frame_over_the_packet_size_is_refused_from_its_header() {
    let dir = tempfile::tempdir().unwrap();
    let pki = pki(dir.path(), "big");
    let mut settings = server::settings(None);
    settings.mqtt.ws_listen = Some("127.0.0.1:0".parse().unwrap());
    settings.mqtt.wss_listen = Some("127.0.0.1:0".parse().unwrap());
    settings.mqtt.tls_cert = Some(pki.cert.clone());
    settings.mqtt.tls_key = Some(pki.key.clone());
    // Longer than WAIT: only the frame cap can end the connection in time.
    settings.mqtt.connect_timeout_secs = 60;
    let server = server::start(settings).await;
    let ws = tokio::net::TcpStream::connect(server.mqtt_ws_addr.unwrap());
    oversize_frame_is_refused(ws.await.unwrap()).await;
    let tcp = tokio::net::TcpStream::connect(server.mqtt_wss_addr.unwrap());
    let name = rustls_pki_types::ServerName::try_from("127.0.0.1").unwrap();
    let tls = tls_client(&pki.ca).connect(name, tcp.await.unwrap());
    oversize_frame_is_refused(tls.await.unwrap()).await;
}

/// Upgrades by hand, then sends the header of a 600 kB binary frame (under
/// the old 1 MiB message cap, over the 256 KiB packet size) and a few bytes:
/// the server must close the connection.
async fn oversize_frame_is_refused<S>(mut raw: S)
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    raw.write_all(
        b"GET /mqtt HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n\
          Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
          Sec-WebSocket-Version: 13\r\nSec-WebSocket-Protocol: mqtt\r\n\r\n",
    )
    .await
    .unwrap();
    let mut head = Vec::new();
    while !head.ends_with(b"\r\n\r\n") {
        let mut b = [0u8; 1];
        let n = tokio::time::timeout(WAIT, raw.read(&mut b))
            .await
            .expect("handshake answer in time")
            .unwrap();
        assert_eq!(n, 1, "closed during the handshake");
        head.push(b[0]);
    }
    assert!(
        head.starts_with(b"HTTP/1.1 101"),
        "{}",
        String::from_utf8_lossy(&head)
    );
    // Masked, as from a client.
    let mut frame = vec![0x82, 0x80 | 127];
    frame.extend_from_slice(&600_000u64.to_be_bytes());
    frame.extend_from_slice(&[1, 2, 3, 4]);
    frame.extend_from_slice(&[0u8; 16]);
    raw.write_all(&frame).await.unwrap();
    raw.flush().await.unwrap();
    let mut rest = Vec::new();
    let ended = tokio::time::timeout(WAIT, raw.read_to_end(&mut rest)).await;
    assert!(ended.is_ok(), "the oversize frame's connection stayed open");
}
