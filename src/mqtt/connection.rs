//! One task per client: the CONNECT handshake, then a single `select!` loop
//! that reads, writes, moves queued messages to the socket and watches
//! keep-alive, takeover and shutdown. One task (not one per direction) and
//! buffers that are freed when empty keep an idle connection small.

use std::io;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Buf, Bytes, BytesMut};
use rumqttc::mqttbytes::valid_filter;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{Notify, OwnedSemaphorePermit};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, Instrument};

use super::codec::{self, Check, CodecError, ConnCode, Connect, In, Out, Proto};
use super::session::{Inflight, Msg, Owner, Session};
use super::{BrokerEvent, Inner};

/// Smallest read reservation; most MQTT packets of a push service are smaller.
const READ_CHUNK: usize = 512;
/// Stop producing output (and reading input) while this much waits for the socket.
const WRITE_HIGH: usize = 64 * 1024;
/// Bound on the last write (DISCONNECT, unflushed acks) of a closing connection.
const FINAL_WRITE: Duration = Duration::from_secs(1);

/// Why a connection ended; decides the v5 DISCONNECT reason and the last will.
#[derive(Debug)]
enum End {
    Shutdown,
    KeepAlive,
    Disconnect { will: bool },
    Closed,
    Io(io::Error),
    Malformed(CodecError),
    Protocol(&'static str),
    TakenOver,
}

impl End {
    fn sends_will(&self) -> bool {
        !matches!(self, End::Shutdown | End::Disconnect { will: false })
    }

    fn reason(&self) -> Option<u8> {
        match self {
            End::Shutdown => Some(0x8b),
            End::KeepAlive => Some(0x8d),
            End::Malformed(CodecError::TooLarge(_)) => Some(0x95),
            End::Malformed(_) => Some(0x81),
            End::Protocol(_) => Some(0x82),
            End::TakenOver => Some(0x8e),
            _ => None,
        }
    }
}

pub(super) async fn run(
    inner: Arc<Inner>,
    stream: TcpStream,
    peer: SocketAddr,
    shutdown: CancellationToken,
    permit: OwnedSemaphorePermit,
) {
    let conn = inner.next_conn.fetch_add(1, Ordering::Relaxed);
    let span = tracing::info_span!("mqtt", %peer, conn, client_id = tracing::field::Empty);
    handle(inner, stream, conn, shutdown).instrument(span).await;
    drop(permit);
}

async fn handle(inner: Arc<Inner>, mut stream: TcpStream, conn: u64, shutdown: CancellationToken) {
    let mut rbuf = BytesMut::new();
    let max = inner.settings.max_packet_size;
    let limit = Duration::from_secs(inner.settings.connect_timeout_secs);
    let first = tokio::select! {
        _ = shutdown.cancelled() => return,
        r = tokio::time::timeout(limit, read_connect(&mut stream, &mut rbuf, max)) => r,
    };
    let connect = match first {
        Ok(Ok(c)) => c,
        Err(_) => {
            inner.stats.mqtt_timeouts.inc();
            debug!("no CONNECT within {limit:?}");
            return;
        }
        Ok(Err(Handshake::Level(level))) => {
            debug!("unsupported protocol level {level}");
            let mut out = BytesMut::new();
            let ack = connack(ConnCode::BadProtocol, false, None, None, max);
            codec::encode(Proto::V4, &ack, &mut out, usize::MAX);
            let _ = tokio::time::timeout(FINAL_WRITE, stream.write_all(&out)).await;
            return;
        }
        Ok(Err(Handshake::Io(e))) => {
            debug!("closed before CONNECT: {e}");
            return;
        }
        Ok(Err(Handshake::Codec(e))) => {
            inner.stats.mqtt_malformed.inc();
            info!("bad CONNECT: {e}");
            return;
        }
    };
    let Connect {
        proto,
        client_id,
        clean,
        keep_alive,
        will,
        session_expiry,
        max_packet,
        receive_max,
    } = *connect;

    let (client_id, assigned) = match client_id.is_empty() {
        false => (client_id, false),
        true if proto == Proto::V4 && !clean => {
            let mut out = BytesMut::new();
            let ack = connack(ConnCode::BadClientId, false, None, None, max);
            codec::encode(proto, &ack, &mut out, usize::MAX);
            let _ = tokio::time::timeout(FINAL_WRITE, stream.write_all(&out)).await;
            return;
        }
        true => (format!("pb-{conn:x}-{:08x}", rand::random::<u32>()), true),
    };
    tracing::Span::current().record("client_id", client_id.as_str());

    let cap = u32::try_from(inner.settings.session_expiry_secs).unwrap_or(u32::MAX);
    let expiry = match proto {
        Proto::V4 if clean => 0,
        Proto::V4 => cap,
        Proto::V5 => session_expiry.unwrap_or(0).min(cap),
    };
    let wake = Arc::new(Notify::new());
    let owner = Owner {
        conn,
        wake: wake.clone(),
    };
    let attached = inner.registry().attach(&client_id, clean, expiry, owner);
    inner.stats.mqtt_connects.inc();
    debug!(proto = ?proto, clean, present = attached.present, "connected");

    let granted = (proto == Proto::V5 && session_expiry.unwrap_or(0) != expiry).then_some(expiry);
    let ack = connack(
        ConnCode::Accepted,
        attached.present,
        assigned.then_some(client_id.as_str()),
        granted,
        max,
    );
    let mut wbuf = BytesMut::new();
    codec::encode(proto, &ack, &mut wbuf, usize::MAX);
    let mut c = Conn {
        window: inner
            .settings
            .max_inflight
            .min(receive_max.unwrap_or(u16::MAX).into())
            .max(1),
        client_max: max_packet.map_or(usize::MAX, |m| m as usize),
        client_id: attached.session.client_id.clone(),
        inner,
        stream,
        proto,
        conn,
        session: attached.session,
        rbuf,
        wbuf,
        need: 0,
    };

    let end = c.run(&wake, keep_alive, &shutdown).await;
    c.finish(end, will).await;
}

/// Why no CONNECT was obtained.
enum Handshake {
    Io(io::Error),
    Codec(CodecError),
    Level(u8),
}

async fn read_connect(
    stream: &mut TcpStream,
    rbuf: &mut BytesMut,
    max: usize,
) -> Result<Box<Connect>, Handshake> {
    loop {
        match codec::check(rbuf, max).map_err(Handshake::Codec)? {
            Check::Frame(len) => {
                if rbuf[0] >> 4 != 1 {
                    return Err(Handshake::Codec(CodecError::Malformed(
                        "first packet is not CONNECT".into(),
                    )));
                }
                let proto = match codec::connect_level(&rbuf[..len]).map_err(Handshake::Codec)? {
                    4 => Proto::V4,
                    5 => Proto::V5,
                    level => return Err(Handshake::Level(level)),
                };
                return match codec::parse(proto, rbuf, len).map_err(Handshake::Codec)? {
                    In::Connect(c) => Ok(c),
                    _ => Err(Handshake::Codec(CodecError::Malformed(
                        "first packet is not CONNECT".into(),
                    ))),
                };
            }
            Check::Incomplete(n) => {
                rbuf.reserve(n.max(READ_CHUNK));
                if stream.read_buf(rbuf).await.map_err(Handshake::Io)? == 0 {
                    return Err(Handshake::Io(io::ErrorKind::UnexpectedEof.into()));
                }
            }
        }
    }
}

fn connack<'a>(
    code: ConnCode,
    session_present: bool,
    assigned_id: Option<&'a str>,
    session_expiry: Option<u32>,
    max: usize,
) -> Out<'a> {
    Out::ConnAck {
        code,
        session_present,
        assigned_id,
        session_expiry,
        max_packet: u32::try_from(max).unwrap_or(u32::MAX),
    }
}

/// A connected client.
struct Conn {
    inner: Arc<Inner>,
    stream: TcpStream,
    proto: Proto,
    conn: u64,
    client_id: Arc<str>,
    session: Arc<Session>,
    rbuf: BytesMut,
    wbuf: BytesMut,
    /// Bytes still missing for the next frame (from `check`).
    need: usize,
    /// Outbound QoS 1 messages allowed unacknowledged.
    window: usize,
    /// Largest packet the client accepts (v5).
    client_max: usize,
}

impl Conn {
    async fn run(&mut self, wake: &Notify, keep_alive: u16, shutdown: &CancellationToken) -> End {
        let ka = Duration::from_millis(u64::from(keep_alive) * 1500);
        let sleep = tokio::time::sleep(ka);
        tokio::pin!(sleep);
        if let Err(end) = self.process().await {
            return end;
        }
        loop {
            if let Err(end) = self.pump() {
                return end;
            }
            if let Err(e) = self.flush() {
                return End::Io(e);
            }
            let backlog = self.wbuf.len();
            tokio::select! {
                _ = shutdown.cancelled() => return End::Shutdown,
                _ = &mut sleep, if keep_alive > 0 => return End::KeepAlive,
                _ = wake.notified() => {}
                r = self.stream.readable(), if backlog < WRITE_HIGH => {
                    if let Err(e) = r {
                        return End::Io(e);
                    }
                    match self.read() {
                        Ok(0) => return End::Closed,
                        Ok(_) => {}
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                        Err(e) => return End::Io(e),
                    }
                    match self.process().await {
                        Ok(true) => sleep.as_mut().reset(Instant::now() + ka),
                        Ok(false) => {}
                        Err(end) => return end,
                    }
                }
                r = self.stream.writable(), if backlog > 0 => {
                    if let Err(e) = r {
                        return End::Io(e);
                    }
                }
            }
        }
    }

    fn read(&mut self) -> io::Result<usize> {
        self.rbuf.reserve(self.need.max(READ_CHUNK));
        self.stream.try_read_buf(&mut self.rbuf)
    }

    /// Handles every whole frame buffered; true if there was at least one.
    async fn process(&mut self) -> Result<bool, End> {
        let mut any = false;
        loop {
            match codec::check(&self.rbuf, self.inner.settings.max_packet_size) {
                Ok(Check::Incomplete(n)) => {
                    self.need = n;
                    break;
                }
                Ok(Check::Frame(len)) => {
                    let packet = codec::parse(self.proto, &mut self.rbuf, len);
                    any = true;
                    self.handle(packet.map_err(End::Malformed)?).await?;
                }
                Err(e) => return Err(End::Malformed(e)),
            }
        }
        if self.rbuf.is_empty() {
            self.rbuf = BytesMut::new();
        }
        Ok(any)
    }

    async fn handle(&mut self, packet: In) -> Result<(), End> {
        match packet {
            In::Connect(_) => return Err(End::Protocol("second CONNECT")),
            In::Publish {
                topic,
                payload,
                qos,
                pkid,
                alias,
            } => {
                if alias || topic.is_empty() || topic.contains(['+', '#']) {
                    return Err(End::Protocol("invalid topic name"));
                }
                let fresh = qos < 2 || {
                    let mut st = self.session.lock();
                    let fresh = !st.qos2_in.contains(&pkid);
                    if fresh {
                        st.qos2_in.push(pkid);
                    }
                    fresh
                };
                if fresh {
                    self.deliver(&topic, payload, qos).await;
                }
                match qos {
                    1 => self.send(&Out::PubAck(pkid)),
                    2 => self.send(&Out::PubRec(pkid)),
                    _ => {}
                }
            }
            In::PubAck(pkid) => {
                let mut st = self.session.lock();
                if let Some(i) = st.inflight.iter().position(|m| m.pkid == pkid) {
                    st.inflight.remove(i);
                }
                if st.inflight.is_empty() && st.inflight.capacity() > 4 {
                    st.inflight = Default::default();
                }
            }
            // The server never sends QoS 2, so these acknowledge nothing.
            In::PubRec(_) | In::PubComp(_) => {}
            In::PubRel(pkid) => {
                self.session.lock().qos2_in.retain(|p| *p != pkid);
                self.send(&Out::PubComp(pkid));
            }
            In::Subscribe { pkid, filters } => {
                let mut codes = Vec::with_capacity(filters.len());
                let mut registry = self.inner.registry();
                for (filter, qos) in filters {
                    if valid_filter(&filter) {
                        registry.subscribe(&self.session, &filter, qos.min(1));
                        codes.push(Some(qos.min(1)));
                    } else {
                        codes.push(None);
                    }
                }
                drop(registry);
                self.send(&Out::SubAck(pkid, codes));
            }
            In::Unsubscribe { pkid, filters } => {
                let mut registry = self.inner.registry();
                for filter in &filters {
                    registry.unsubscribe(&self.session, filter);
                }
                drop(registry);
                self.send(&Out::UnsubAck(pkid, filters.len()));
            }
            In::PingReq => self.send(&Out::PingResp),
            In::Disconnect {
                reason,
                session_expiry,
            } => {
                if let Some(e) = session_expiry {
                    let cap = u32::try_from(self.inner.settings.session_expiry_secs);
                    self.session.lock().expiry = e.min(cap.unwrap_or(u32::MAX));
                }
                return Err(End::Disconnect {
                    will: reason == 0x04,
                });
            }
        }
        Ok(())
    }

    async fn deliver(&self, topic: &str, payload: Bytes, qos: u8) {
        publish_from(&self.inner, self.conn, &self.client_id, topic, payload, qos).await;
    }

    fn send(&mut self, out: &Out<'_>) {
        codec::encode(self.proto, out, &mut self.wbuf, usize::MAX);
    }

    /// Moves messages from the session to the write buffer, within the
    /// inflight window; re-sends (DUP) what a previous connection left unacknowledged.
    fn pump(&mut self) -> Result<(), End> {
        let mut guard = self.session.lock();
        if !guard.owned_by(self.conn) {
            return Err(End::TakenOver);
        }
        let st = &mut *guard;
        let mut enc = Encoder {
            proto: self.proto,
            wbuf: &mut self.wbuf,
            max: self.client_max,
            inner: &self.inner,
        };
        let mut i = 0;
        while i < st.inflight.len() && enc.wbuf.len() < WRITE_HIGH {
            let m = &mut st.inflight[i];
            if m.sent {
                i += 1;
            } else if enc.publish(&m.msg, m.pkid, true) {
                m.sent = true;
                i += 1;
            } else {
                st.inflight.remove(i);
            }
        }
        while enc.wbuf.len() < WRITE_HIGH {
            match st.queue.front() {
                None => break,
                Some(m) if m.qos > 0 && st.inflight.len() >= self.window => break,
                Some(_) => {}
            }
            let Some(msg) = st.queue.pop_front() else {
                break;
            };
            let pkid = if msg.qos > 0 { st.next_pkid() } else { 0 };
            if enc.publish(&msg, pkid, false) && msg.qos > 0 {
                st.inflight.push_back(Inflight {
                    pkid,
                    msg,
                    sent: true,
                });
            }
        }
        if st.queue.is_empty() && st.queue.capacity() > 4 {
            st.queue = Default::default();
        }
        Ok(())
    }

    /// Writes what the socket takes now, without waiting; frees the buffer once empty.
    fn flush(&mut self) -> io::Result<()> {
        while !self.wbuf.is_empty() {
            match self.stream.try_write(&self.wbuf) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => self.wbuf.advance(n),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) => return Err(e),
            }
        }
        self.wbuf = BytesMut::new();
        Ok(())
    }

    /// Says goodbye (v5), releases the session, publishes the will, reports the end.
    async fn finish(mut self, end: End, will: Option<codec::Will>) {
        match &end {
            End::Malformed(e) => {
                self.inner.stats.mqtt_malformed.inc();
                info!("closing: malformed packet: {e}");
            }
            End::Protocol(e) => {
                self.inner.stats.mqtt_malformed.inc();
                info!("closing: protocol error: {e}");
            }
            End::KeepAlive => {
                self.inner.stats.mqtt_timeouts.inc();
                debug!("closing: keep-alive expired");
            }
            End::Io(e) => debug!("closing: io error: {e}"),
            other => debug!("closing: {other:?}"),
        }
        if !matches!(end, End::Io(_) | End::Closed) {
            if let (Proto::V5, Some(code)) = (self.proto, end.reason()) {
                self.send(&Out::Disconnect(code));
            }
            let _ = tokio::time::timeout(FINAL_WRITE, self.stream.write_all(&self.wbuf)).await;
        }
        drop(self.stream);
        self.inner.registry().detach(&self.session, self.conn);
        if let Some(w) = will.filter(|_| end.sends_will()) {
            if !w.topic.is_empty() && !w.topic.contains(['+', '#']) {
                let (conn, id) = (self.conn, &self.client_id);
                publish_from(&self.inner, conn, id, &w.topic, w.payload, w.qos).await;
            }
        }
        let event = BrokerEvent::Disconnected {
            conn: self.conn,
            client_id: self.client_id,
        };
        let _ = self.inner.events.send(event).await;
    }
}

/// Routes a message a client published (or its will), reporting status messages.
async fn publish_from(
    inner: &Inner,
    conn: u64,
    client_id: &Arc<str>,
    topic: &str,
    payload: Bytes,
    qos: u8,
) {
    if topic == inner.status_topic {
        let event = BrokerEvent::Status {
            conn,
            client_id: client_id.clone(),
            payload: payload.clone(),
        };
        let _ = inner.events.send(event).await;
    }
    inner.route(topic, payload, qos.min(1));
}

/// Writes PUBLISH packets for `pump` while it holds the session lock.
struct Encoder<'a> {
    proto: Proto,
    wbuf: &'a mut BytesMut,
    max: usize,
    inner: &'a Inner,
}

impl Encoder<'_> {
    /// False (and counted as dropped) if the message is too large for the client.
    fn publish(&mut self, msg: &Msg, pkid: u16, dup: bool) -> bool {
        let out = Out::Publish {
            topic: &msg.topic,
            payload: &msg.payload,
            qos: msg.qos,
            pkid,
            dup,
        };
        let ok = codec::encode(self.proto, &out, self.wbuf, self.max);
        if !ok {
            self.inner.stats.mqtt_dropped.inc();
        }
        ok
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mqtt::Broker;
    use crate::settings::MqttSettings;

    /// An idle connection is mostly this future; keep it well under the 4 KiB budget.
    #[tokio::test]
    async fn connection_task_is_small() {
        let (broker, _rx) = Broker::new(&MqttSettings::default());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap());
        let (client, accepted) = tokio::join!(client, listener.accept());
        let (stream, peer) = accepted.unwrap();
        let permit = Arc::new(tokio::sync::Semaphore::new(1))
            .acquire_owned()
            .await
            .unwrap();
        let task = run(broker.inner, stream, peer, CancellationToken::new(), permit);
        let size = std::mem::size_of_val(&task);
        println!("connection future: {size} bytes");
        assert!(size < 2048, "connection future grew to {size} bytes");
        drop(client);
    }
}
