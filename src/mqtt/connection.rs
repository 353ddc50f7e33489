//! One task per client: the CONNECT handshake, then a single loop that
//! reads, writes, moves queued messages to the socket and watches keep-alive,
//! takeover and shutdown. One task (not one per direction), no futures kept
//! per direction, and buffers freed when empty keep an idle connection small.

use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use rumqttc::mqttbytes::valid_filter;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;
use tokio::sync::OwnedSemaphorePermit;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, Instrument};

use super::codec::{self, Check, CodecError, In, Out, Proto, SubCode};
use super::handshake::{self, Connected};
use super::presence::{user_of_filter, Seen};
use super::session::{Inflight, Msg, Session, SessionTable};
use super::signal::{Signal, Woken};
use super::transport::{Stream, Transport, FINAL_WRITE};
use super::{BrokerEvent, Inner};
use crate::auth::Identity;
use crate::lifecycle::Phase;
use crate::receipts::Device;

/// Stop producing output (and reading input) while this much waits for the socket.
const WRITE_HIGH: usize = 64 * 1024;
/// On shutdown, how long a connection keeps delivering its session's queue
/// (and waiting for the PUBACKs) before it says goodbye.
const SHUTDOWN_FLUSH: Duration = Duration::from_secs(5);

/// What woke the connection loop.
enum Event {
    Woken(Woken),
    Read(io::Result<usize>),
    Written(io::Result<()>),
}

/// The times a connection ends at, whichever comes first; the broker's
/// sweep wakes it once the earliest has passed (see `signal`).
#[derive(Debug, Default)]
struct Deadlines {
    /// Keep-alive: 1.5 × the keep-alive after the last whole packet.
    silence: Option<Instant>,
    /// A packet has started: it must be complete by then.
    packet: Option<Instant>,
    /// The token runs out.
    token: Option<Instant>,
    /// Shutdown: what is queued must be delivered by then.
    drain: Option<Instant>,
}

impl Deadlines {
    fn next(&self) -> Option<Instant> {
        [self.silence, self.packet, self.token, self.drain]
            .into_iter()
            .flatten()
            .min()
    }

    /// The end a deadline passed by `now` means.
    fn passed(&self, now: Instant) -> Option<End> {
        let past = |t: Option<Instant>| t.is_some_and(|t| t <= now);
        if past(self.drain) {
            Some(End::Shutdown)
        } else if past(self.token) {
            Some(End::TokenExpired)
        } else if past(self.packet) {
            Some(End::PacketTimeout)
        } else if past(self.silence) {
            Some(End::KeepAlive)
        } else {
            None
        }
    }
}

/// Why a connection ended; decides the v5 DISCONNECT reason and the last will.
#[derive(Debug)]
enum End {
    Shutdown,
    KeepAlive,
    /// A packet started but not completed within `packet_timeout_secs`.
    PacketTimeout,
    Disconnect {
        will: bool,
    },
    Closed,
    Io(io::Error),
    Malformed(CodecError),
    Protocol(&'static str),
    /// More QoS 2 messages awaiting PUBREL than `mqtt.max_inflight`.
    ReceiveMaximum,
    TakenOver,
    TokenExpired,
}

const RECEIVE_MAXIMUM: &str = "more QoS 2 messages awaiting PUBREL than mqtt.max_inflight";

impl End {
    /// The `reason` of a `device.disconnected` event, and the error's text.
    fn describe(&self) -> (&'static str, Option<String>) {
        match self {
            End::Shutdown => ("shutdown", None),
            End::KeepAlive => ("keepalive_timeout", None),
            End::PacketTimeout => ("packet_timeout", None),
            End::Disconnect { .. } => ("disconnect", None),
            End::Closed => ("closed", None),
            End::TakenOver => ("taken_over", None),
            End::TokenExpired => ("token_expired", None),
            End::Io(e) => ("error", Some(format!("io: {e}"))),
            End::Malformed(e) => ("error", Some(format!("malformed packet: {e}"))),
            End::Protocol(e) => ("error", Some(format!("protocol error: {e}"))),
            End::ReceiveMaximum => ("error", Some(RECEIVE_MAXIMUM.into())),
        }
    }

    fn sends_will(&self) -> bool {
        !matches!(self, End::Shutdown | End::Disconnect { will: false })
    }

    fn reason(&self) -> Option<u8> {
        match self {
            End::Shutdown => Some(0x8b),
            End::KeepAlive | End::PacketTimeout => Some(0x8d),
            End::Malformed(CodecError::TooLarge(_)) => Some(0x95),
            End::Malformed(_) => Some(0x81),
            End::Protocol(_) => Some(0x82),
            End::ReceiveMaximum => Some(0x93),
            End::TakenOver => Some(0x8e),
            End::TokenExpired => Some(0x87),
            _ => None,
        }
    }
}

/// The connection's first task: the handshake. A connected client gets a
/// task of its own, so an idle device's task holds neither the handshake's
/// state nor the arguments it started from (an `async fn` keeps those for
/// its whole life).
pub(super) async fn run(
    inner: Arc<Inner>,
    tcp: TcpStream,
    peer: SocketAddr,
    transport: Transport,
    phase: Phase,
    permit: OwnedSemaphorePermit,
) {
    let shutdown = phase.token();
    if let Some((conn, span)) = connect(inner, tcp, peer, transport, shutdown, permit).await {
        phase.spawn(conn.serve().instrument(span));
    }
}

/// Admits the peer, upgrades the transport and runs the CONNECT handshake;
/// the connection once it is up.
async fn connect(
    inner: Arc<Inner>,
    tcp: TcpStream,
    peer: SocketAddr,
    transport: Transport,
    shutdown: CancellationToken,
    permit: OwnedSemaphorePermit,
) -> Option<(Conn, tracing::Span)> {
    if !inner.ip_enter(peer.ip()) {
        inner.stats.mqtt_ip_refused.inc();
        debug!(%peer, "refused: mqtt.max_connections_per_ip reached");
        return None;
    }
    let conn = inner.next_conn.fetch_add(1, Ordering::Relaxed);
    let span = tracing::info_span!("mqtt", %peer, conn, client_id = tracing::field::Empty);
    let transport_name = transport.name();
    let connected = handshake_phase(&inner, tcp, transport, conn, &shutdown)
        .instrument(span.clone())
        .await;
    match connected {
        Some(c) => {
            let c = Conn::new(inner, conn, peer.ip(), c, permit);
            c.inner.notices.connected(conn, || Device {
                client_id: c.client_id.clone(),
                users: c.inner.presence().users(conn),
                protocol: match c.proto {
                    Proto::V4 => 4,
                    Proto::V5 => 5,
                },
                peer,
                transport: transport_name,
                connected_at: crate::utc::now_ms(),
            });
            Some((c, span))
        }
        None => {
            inner.ip_leave(peer.ip());
            None
        }
    }
}

async fn handshake_phase(
    inner: &Arc<Inner>,
    tcp: TcpStream,
    transport: Transport,
    conn: u64,
    shutdown: &CancellationToken,
) -> Option<Connected> {
    let limit = Duration::from_secs(inner.settings.connect_timeout_secs);
    let stream = tokio::select! {
        _ = shutdown.cancelled() => return None,
        s = transport.upgrade(tcp, limit, inner.settings.max_packet_size) => s,
    };
    let Some(stream) = stream else {
        inner.stats.mqtt_handshakes_failed.inc();
        return None;
    };
    handshake::handshake(inner, stream, conn, shutdown).await
}

/// A connected client.
struct Conn {
    inner: Arc<Inner>,
    stream: Stream,
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
    /// The keep-alive held to (the client's, capped by `max_keepalive_secs`).
    keep_alive: u16,
    /// Boxed: most devices have none, and every idle one would carry its size.
    will: Option<Box<codec::Will>>,
    /// Where the client connects from: without a token, a session kept
    /// offline counts as this address's (`max_sessions_per_user`).
    peer: IpAddr,
    /// Set when the session has messages, was taken over, the broker stops
    /// or a deadline has passed.
    wake: Arc<Signal>,
    /// The signal's key in the broker's clocks.
    clock: usize,
    identity: Arc<Identity>,
    /// Check read access as each message leaves (see `Connected::recheck`).
    recheck: bool,
    /// When the token runs out; the connection is closed then.
    expires: Option<Instant>,
    /// A slot of `mqtt.max_connections`, held while connected.
    _permit: OwnedSemaphorePermit,
}

impl Conn {
    fn new(
        inner: Arc<Inner>,
        conn: u64,
        peer: IpAddr,
        c: Connected,
        permit: OwnedSemaphorePermit,
    ) -> Conn {
        Conn {
            clock: inner.clocks.register(c.wake.clone()),
            inner,
            conn,
            peer,
            client_id: c.session.client_id.clone(),
            need: 0,
            stream: c.stream,
            proto: c.proto,
            session: c.session,
            rbuf: c.rbuf,
            wbuf: c.wbuf,
            window: c.window,
            client_max: c.client_max,
            keep_alive: c.keep_alive,
            // A copy: a slice of the CONNECT would keep its whole read
            // buffer (512 bytes at least) for the connection's life.
            will: c.will.map(|w| {
                Box::new(codec::Will {
                    payload: Bytes::copy_from_slice(&w.payload),
                    ..w
                })
            }),
            wake: c.wake,
            identity: c.identity,
            recheck: c.recheck,
            expires: c.expires,
            _permit: permit,
        }
    }

    /// The connected phase: the loop, then the goodbye. (An `async move`
    /// block, not an `async fn`: that would hold `self` twice, as its
    /// argument and as the binding its body moves it into.)
    #[allow(clippy::manual_async_fn)]
    fn serve(mut self) -> impl Future<Output = ()> + Send {
        async move {
            let end = self.run().await;
            Box::pin(self.finish(end)).await;
        }
    }
}

impl Conn {
    /// Keep-alive: when silence from `now` on ends the connection.
    fn silence_from(&self, now: Instant) -> Option<Instant> {
        (self.keep_alive > 0)
            .then(|| now + Duration::from_millis(u64::from(self.keep_alive) * 1500))
    }

    fn arm(&self, due: &Deadlines) {
        self.inner.clocks.arm(&self.wake, due.next());
    }

    async fn run(&mut self) -> End {
        let mut due = Deadlines {
            silence: self.silence_from(Instant::now()),
            token: self.expires,
            ..Deadlines::default()
        };
        self.arm(&due);
        // Shutdown comes as a wake (`Inner::stop_connections`), or before we started.
        let mut draining = false;
        if self.inner.stopping() {
            self.wake.wake();
        }
        if let Err(end) = Box::pin(self.process()).await {
            return end;
        }
        loop {
            // A packet has started: it gets `packet_timeout_secs` from its first bytes.
            if !draining && due.packet.is_none() && !self.rbuf.is_empty() {
                let limit = Duration::from_secs(self.inner.settings.packet_timeout_secs);
                due.packet = Some(Instant::now() + limit);
                self.arm(&due);
            }
            if let Err(end) = self.pump() {
                return end;
            }
            if let Err(e) = self.flush() {
                return End::Io(e);
            }
            if draining && self.wbuf.is_empty() && self.session.lock().is_idle() {
                return End::Shutdown;
            }
            let backlog = self.wbuf.len();
            let (stream, rbuf, wbuf, need) =
                (&mut self.stream, &mut self.rbuf, &mut self.wbuf, self.need);
            let wake = &*self.wake;
            // A hand-written select: the transport is polled in place, with no
            // per-direction futures stored in the (long-lived) task.
            let event = std::future::poll_fn(|cx| {
                if let Poll::Ready(w) = wake.poll_woken(cx) {
                    return Poll::Ready(Event::Woken(w));
                }
                if backlog < WRITE_HIGH {
                    if let Poll::Ready(r) = stream.poll_fill(cx, rbuf, need) {
                        return Poll::Ready(Event::Read(r));
                    }
                }
                if backlog > 0 || stream.dirty() {
                    if let Poll::Ready(r) = stream.poll_drain(cx, wbuf) {
                        return Poll::Ready(Event::Written(r));
                    }
                }
                Poll::Pending
            })
            .await;
            match event {
                Event::Woken(w) => {
                    if self.inner.stopping() && !draining {
                        draining = true;
                        due = Deadlines {
                            drain: Some(Instant::now() + SHUTDOWN_FLUSH),
                            ..Deadlines::default()
                        };
                        self.arm(&due);
                    }
                    if w.late {
                        if let Some(end) = due.passed(Instant::now()) {
                            return end;
                        }
                        self.arm(&due);
                    }
                }
                Event::Read(Err(e)) | Event::Written(Err(e)) => return End::Io(e),
                Event::Written(Ok(())) => {}
                Event::Read(Ok(0)) => return End::Closed,
                Event::Read(Ok(_)) => {
                    // Boxed: an idle connection does not carry the processing state.
                    match Box::pin(self.process()).await {
                        Ok(true) if !draining => {
                            // Whole packets arrived: the keep-alive restarts, and
                            // whatever follows is a new packet (checked above).
                            due.packet = None;
                            due.silence = self.silence_from(Instant::now());
                            self.arm(&due);
                        }
                        Ok(_) => {}
                        Err(end) => return end,
                    }
                }
            }
        }
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
                let Some(payload) = self.inner.auth.may_publish(&self.identity, &topic, payload)
                else {
                    self.inner.stats.mqtt_denied.inc();
                    debug!(%topic, "publish refused by the ACL");
                    match qos {
                        1 => self.send(&Out::PubAck(pkid, false)),
                        2 => self.send(&Out::PubRec(pkid, false)),
                        _ => {}
                    }
                    return Ok(());
                };
                let fresh = qos < 2 || {
                    let mut st = self.session.lock();
                    let fresh = !st.qos2_in.contains(&pkid);
                    if fresh {
                        // Each id is kept until its PUBREL: without a bound one
                        // client could make the session hold all 65,535.
                        if st.qos2_in.len() >= self.inner.settings.max_inflight {
                            return Err(End::ReceiveMaximum);
                        }
                        st.qos2_in.push(pkid);
                    }
                    fresh
                };
                if fresh {
                    self.deliver(&topic, payload, qos).await;
                }
                match qos {
                    1 => self.send(&Out::PubAck(pkid, true)),
                    2 => self.send(&Out::PubRec(pkid, true)),
                    _ => {}
                }
            }
            In::PubAck(pkid) => {
                let mut st = self.session.lock();
                let acked = match st.inflight.iter().position(|m| m.pkid == pkid) {
                    Some(i) => st.inflight.remove(i),
                    None => None,
                };
                st.free_empty();
                drop(st);
                if let Some(m) = acked {
                    self.inner.stats.mqtt_acked.inc();
                    if pkid % 8 == 0 {
                        self.inner.stats.stages.ack.observe(m.msg.at.elapsed());
                    }
                    if let Some(tag) = m.msg.meta.as_ref().and_then(|m| m.tag.as_ref()) {
                        self.inner
                            .receipts
                            .acked(tag, &m.msg.topic, &self.client_id);
                    }
                }
            }
            // The server never sends QoS 2, so these acknowledge nothing.
            In::PubRec(_) | In::PubComp(_) => {}
            In::PubRel(pkid) => {
                let mut st = self.session.lock();
                st.qos2_in.retain(|p| *p != pkid);
                st.free_empty();
                drop(st);
                self.send(&Out::PubComp(pkid));
            }
            In::Subscribe { pkid, filters } => {
                let (codes, user_topics) = self.subscribe(&filters);
                self.note_own_topic(&codes, &filters);
                self.send(&Out::SubAck(pkid, codes));
                for topic in user_topics {
                    let event = BrokerEvent::Subscribed {
                        topic: topic.into(),
                    };
                    let _ = self.inner.events.send(event).await;
                }
            }
            In::Unsubscribe { pkid, filters } => {
                let mut sessions = self.inner.sessions();
                for filter in &filters {
                    sessions.unsubscribe(&self.session, filter);
                }
                drop(sessions);
                self.left_own_topics(&filters);
                self.send(&Out::UnsubAck(pkid, filters.len()));
            }
            In::PingReq => self.send(&Out::PingResp),
            In::Disconnect {
                reason,
                session_expiry,
            } => {
                if let Some(e) = session_expiry {
                    let cap = u32::try_from(self.inner.settings.session_expiry_secs);
                    let mut st = self.session.lock();
                    // MQTT 5 §3.14.2.2.2: a session that was to end with its
                    // connection cannot be made to outlive it now.
                    if st.expiry == 0 && e > 0 {
                        return Err(End::Protocol("DISCONNECT sets a session expiry after 0"));
                    }
                    st.expiry = e.min(cap.unwrap_or(u32::MAX));
                }
                return Err(End::Disconnect {
                    will: reason == 0x04,
                });
            }
        }
        Ok(())
    }

    /// Without a token, subscribing to a user's own topic is what tells
    /// whose connection this is (presence).
    fn note_own_topic(&self, codes: &[SubCode], filters: &[(String, u8)]) {
        if self.identity.user.is_some() {
            return;
        }
        let prefix = &self.inner.settings.prefix;
        for (code, (filter, _)) in codes.iter().zip(filters) {
            if let (SubCode::Granted(_), Some(user)) = (code, user_of_filter(prefix, filter)) {
                let seen = Seen {
                    client_id: self.client_id.clone(),
                    since: crate::utc::now(),
                };
                self.inner.presence().connect(self.conn, user, seen);
            }
        }
    }

    /// Without a token: unsubscribing from a user's own topic ends being that user's connection.
    fn left_own_topics(&self, filters: &[String]) {
        if self.identity.user.is_some() {
            return;
        }
        let prefix = &self.inner.settings.prefix;
        let users = filters.iter().filter_map(|f| user_of_filter(prefix, f));
        let mut presence = None;
        for user in users {
            presence
                .get_or_insert_with(|| self.inner.presence())
                .leave(self.conn, user);
        }
    }

    /// Applies a SUBSCRIBE: the SUBACK codes, and the granted filters that
    /// are exactly one user's topic (their kept messages get replayed).
    fn subscribe(&self, filters: &[(String, u8)]) -> (Vec<SubCode>, Vec<String>) {
        let mut codes = Vec::with_capacity(filters.len());
        let mut user_topics = Vec::new();
        let max = self.inner.settings.max_subscriptions;
        let mut sessions = self.inner.sessions();
        for (filter, qos) in filters.iter().map(|(f, q)| (f.as_str(), *q)) {
            let code = if !valid_filter(filter) {
                SubCode::Invalid
            } else if !self.inner.auth.may_subscribe(&self.identity, filter) {
                self.inner.stats.mqtt_denied.inc();
                debug!(%filter, "subscription refused by the ACL");
                SubCode::NotAuthorized
            } else if self.over_quota(filter, max) {
                SubCode::Quota
            } else {
                sessions.subscribe(&self.session, filter, qos.min(1));
                if self.inner.is_user_topic(filter) {
                    user_topics.push(filter.to_string());
                }
                SubCode::Granted(qos.min(1))
            };
            codes.push(code);
        }
        (codes, user_topics)
    }

    /// Would subscribing to `filter` take the session past `max` filters?
    fn over_quota(&self, filter: &str, max: usize) -> bool {
        let st = self.session.lock();
        st.filters.len() >= max && !st.filters.contains_key(filter)
    }

    async fn deliver(&self, topic: &str, payload: Bytes, qos: u8) {
        // A copy: sessions may keep it for long, and a slice would keep the
        // whole read buffer (up to 64 KiB) while their budget counts only it.
        let payload = Bytes::copy_from_slice(&payload);
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
        let (auth, identity, recheck) = (&self.inner.auth, &*self.identity, self.recheck);
        let readable = |topic: &str| !recheck || auth.may_subscribe(identity, topic);
        let mut enc = Encoder {
            proto: self.proto,
            wbuf: &mut self.wbuf,
            max: self.client_max,
            inner: &self.inner,
        };
        // Read once, and only when something is written.
        let mut clock = None;
        let mut now = || *clock.get_or_insert_with(Instant::now);
        let mut i = 0;
        while i < st.inflight.len() && enc.wbuf.len() < WRITE_HIGH {
            let m = &mut st.inflight[i];
            if m.sent {
                i += 1;
            } else if !readable(&m.msg.topic) {
                self.inner.stats.mqtt_denied.inc();
                st.inflight.remove(i);
            } else if enc.publish(&m.msg, m.pkid, true) {
                m.sent = true;
                m.msg.at = now();
                i += 1;
            } else {
                st.inflight.remove(i);
            }
        }
        let mut first = true;
        while enc.wbuf.len() < WRITE_HIGH {
            match st.queue.front() {
                None => break,
                Some(m) if m.qos > 0 && st.inflight.len() >= self.window => break,
                Some(_) => {}
            }
            let Some(mut msg) = st.queue.pop_front() else {
                break;
            };
            if first {
                first = false;
                self.inner.stats.stages.session.observe(now() - msg.at);
            }
            msg.at = now();
            if !readable(&msg.topic) {
                self.inner.stats.mqtt_denied.inc();
                continue;
            }
            if msg.expired() {
                self.inner.stats.mqtt_expired.inc();
                continue;
            }
            let pkid = if msg.qos > 0 { st.next_pkid() } else { 0 };
            if enc.publish(&msg, pkid, false) && msg.qos > 0 {
                st.inflight.push_back(Inflight {
                    pkid,
                    msg,
                    sent: true,
                });
            }
        }
        st.free_empty();
        Ok(())
    }

    /// Writes what the transport takes now, without waiting; frees the buffer once empty.
    fn flush(&mut self) -> io::Result<()> {
        self.stream.drain_now(&mut self.wbuf)?;
        if self.wbuf.is_empty() {
            self.wbuf = BytesMut::new();
        }
        Ok(())
    }

    /// Releases the session, publishes the will, reports the end, says goodbye (v5).
    async fn finish(mut self, end: End) {
        match &end {
            End::Malformed(e) => {
                self.inner.stats.mqtt_malformed.inc();
                info!("closing: malformed packet: {e}");
            }
            End::Protocol(e) => {
                self.inner.stats.mqtt_malformed.inc();
                info!("closing: protocol error: {e}");
            }
            End::ReceiveMaximum => {
                self.inner.stats.mqtt_malformed.inc();
                let max_inflight = self.inner.settings.max_inflight;
                info!(max_inflight, "closing: {RECEIVE_MAXIMUM}");
            }
            End::KeepAlive => {
                self.inner.stats.mqtt_timeouts.inc();
                debug!("closing: keep-alive expired");
            }
            End::PacketTimeout => {
                self.inner.stats.mqtt_timeouts.inc();
                info!("closing: packet not completed within mqtt.packet_timeout_secs");
            }
            End::TokenExpired => {
                self.inner.stats.mqtt_tokens_expired.inc();
                info!("closing: token expired");
            }
            End::Io(e) => debug!("closing: io error: {e}"),
            other => debug!("closing: {other:?}"),
        }
        // Session, will and event first: a takeover or the status consumer
        // must not wait on a goodbye to a peer that may not be reading.
        let kept = self.inner.sessions().detach(&self.session, self.conn);
        // Without a token, a session kept offline is charged to the address
        // it came from; only offline ones are dropped for it (a shared NAT
        // address may have many devices connected at once).
        if kept && self.identity.user.is_none() && !SessionTable::is_owned(&self.session) {
            let ip = format!("ip:{}", super::origin(self.peer));
            self.inner.own(&self.session, &ip, false);
        }
        self.inner.stats.mqtt_connections.down();
        let users = self.inner.presence().disconnect(self.conn);
        let why = || end.describe();
        self.inner.notices.disconnected(self.conn, users, why);
        if let Some(w) = self.will.take().filter(|_| end.sends_will()).map(|w| *w) {
            let valid = !w.topic.is_empty() && !w.topic.contains(['+', '#']);
            let allowed = valid
                .then(|| {
                    self.inner
                        .auth
                        .may_publish(&self.identity, &w.topic, w.payload)
                })
                .flatten();
            match allowed {
                Some(payload) => {
                    let (conn, id) = (self.conn, &self.client_id);
                    publish_from(&self.inner, conn, id, &w.topic, payload, w.qos).await;
                }
                None if valid => self.inner.stats.mqtt_denied.inc(),
                None => {}
            }
        }
        let event = BrokerEvent::Disconnected {
            conn: self.conn,
            client_id: self.client_id.clone(),
        };
        let _ = self.inner.events.send(event).await;
        if !matches!(end, End::Io(_) | End::Closed) {
            if let (Proto::V5, Some(code)) = (self.proto, end.reason()) {
                self.send(&Out::Disconnect(code));
            }
            let (stream, wbuf) = (&mut self.stream, &self.wbuf);
            let goodbye = async {
                stream.write_all(wbuf).await?;
                stream.shutdown().await
            };
            let _ = tokio::time::timeout(FINAL_WRITE, goodbye).await;
        }
    }
}

impl Drop for Conn {
    fn drop(&mut self) {
        self.inner.clocks.remove(self.clock);
        self.inner.ip_leave(self.peer);
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
    inner.route(topic, payload, qos.min(1), None);
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
            expiry: msg.expiry_secs(),
        };
        let ok = codec::encode(self.proto, &out, self.wbuf, self.max);
        if !ok {
            self.inner.stats.mqtt_dropped.inc();
        }
        ok
    }
}

#[cfg(test)]
mod tests;
