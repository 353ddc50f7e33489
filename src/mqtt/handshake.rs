//! The CONNECT handshake: first packet, protocol version, client id,
//! session attach and CONNACK. Runs in the connection task, never in the
//! accept loop, and is bounded by `connect_timeout_secs`.

use std::io;
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info};

use super::codec::{self, Check, CodecError, ConnCode, Connect, In, Out, Proto};
use super::presence::{user_of_filter, Seen};
use super::session::Owner;
use super::session::Session;
use super::signal::Signal;
use super::transport::{Stream, FINAL_WRITE, READ_CHUNK, READ_MAX};
use super::Inner;
use crate::auth::{Identity, Refusal, Role};

/// A client past its CONNECT: what the connection loop starts from.
pub(super) struct Connected {
    pub stream: Stream,
    pub proto: Proto,
    pub session: Arc<Session>,
    /// What arrived after the CONNECT.
    pub rbuf: BytesMut,
    /// The CONNACK, not yet written.
    pub wbuf: BytesMut,
    /// Outbound QoS 1 messages allowed unacknowledged.
    pub window: usize,
    /// Largest packet the client accepts (v5).
    pub client_max: usize,
    /// The keep-alive held to (the client's, capped by `max_keepalive_secs`).
    pub keep_alive: u16,
    pub will: Option<codec::Will>,
    /// Notified when the session has messages, or was taken over.
    pub wake: Arc<Signal>,
    pub identity: Arc<Identity>,
    /// A device resuming a session: what it may read can have shrunk since
    /// messages were queued for it (a token that lost a group), so each is
    /// checked as it leaves. A fresh session only ever queued what this
    /// identity subscribed to.
    pub recheck: bool,
    /// When the token runs out; the connection is closed then.
    pub expires: Option<Instant>,
}

/// Reads the CONNECT, attaches the session and queues the CONNACK.
pub(super) async fn handshake(
    inner: &Arc<Inner>,
    mut stream: Stream,
    conn: u64,
    shutdown: &CancellationToken,
) -> Option<Connected> {
    let mut rbuf = BytesMut::new();
    let max = inner.settings.max_packet_size;
    let limit = Duration::from_secs(inner.settings.connect_timeout_secs);
    let first = tokio::select! {
        _ = shutdown.cancelled() => return None,
        r = tokio::time::timeout(limit, read_connect(&mut stream, &mut rbuf, max)) => r,
    };
    let connect = match first {
        Ok(Ok(c)) => c,
        Err(_) => {
            inner.stats.mqtt_timeouts.inc();
            debug!("no CONNECT within {limit:?}");
            return None;
        }
        Ok(Err(Handshake::Level(level))) => {
            debug!("unsupported protocol level {level}");
            refuse(&mut stream, Proto::V4, ConnCode::BadProtocol, max).await;
            return None;
        }
        Ok(Err(Handshake::Io(e))) => {
            debug!("closed before CONNECT: {e}");
            return None;
        }
        Ok(Err(Handshake::Codec(e))) => {
            inner.stats.mqtt_malformed.inc();
            info!("bad CONNECT: {e}");
            return None;
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
        username,
        password,
    } = *connect;

    let identity = match inner.auth.login(username.as_deref(), password.as_deref()) {
        Ok(id) => id,
        Err(refusal) => {
            inner.stats.mqtt_auth_refused.inc();
            info!(?refusal, user = username.as_deref(), "CONNECT refused");
            let code = match refusal {
                Refusal::BadCredentials => ConnCode::BadCredentials,
                Refusal::NotAuthorized => ConnCode::NotAuthorized,
            };
            refuse(&mut stream, proto, code, max).await;
            return None;
        }
    };

    if client_id.len() > inner.settings.max_client_id_len {
        inner.stats.mqtt_malformed.inc();
        info!(len = client_id.len(), "CONNECT refused: client id too long");
        refuse(&mut stream, proto, ConnCode::BadClientId, max).await;
        return None;
    }
    let (client_id, assigned) = match client_id.is_empty() {
        false => (client_id, false),
        true if proto == Proto::V4 && !clean => {
            refuse(&mut stream, proto, ConnCode::BadClientId, max).await;
            return None;
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
    let wake = Arc::new(Signal::default());
    let owner = Owner {
        conn,
        wake: wake.clone(),
    };
    // Sessions are per user: another user reusing a client id never sees this one's messages.
    let key = match &identity.user {
        Some(user) => format!("{user}/{client_id}"),
        None => client_id.clone(),
    };
    // Without a token, a kept session's user topics say whose connection it is (presence).
    let prefix = inner.settings.prefix.as_str();
    let mut own_topics = Vec::new();
    let attached = {
        let mut sessions = inner.sessions();
        let attached = sessions.attach(&key, clean, expiry, owner);
        // A new token may carry fewer groups than the one that subscribed.
        let kept: Vec<Box<str>> = attached.session.lock().filters.keys().cloned().collect();
        for filter in kept {
            if !inner.auth.may_subscribe(&identity, &filter) {
                sessions.unsubscribe(&attached.session, &filter);
            } else if identity.user.is_none() && user_of_filter(prefix, &filter).is_some() {
                own_topics.push(filter);
            }
        }
        // Without a token, only sessions left offline count for their address.
        if identity.user.is_none() && attached.present {
            sessions.disown(&attached.session);
        }
        attached
    };
    // Service accounts (trusted monitors) are not capped.
    if let (Some(user), false) = (&identity.user, identity.role == Role::Service) {
        inner.own(&attached.session, user, true);
    }
    inner.stats.mqtt_connects.inc();
    inner.stats.mqtt_connections.up();
    let users = identity.user.as_deref().into_iter();
    let users = users.chain(own_topics.iter().filter_map(|f| user_of_filter(prefix, f)));
    let mut presence = None;
    for user in users {
        let (presence, seen) = presence.get_or_insert_with(|| {
            let seen = Seen {
                client_id: client_id.as_str().into(),
                since: crate::utc::now(),
            };
            (inner.presence(), seen)
        });
        presence.connect(conn, user, seen.clone());
    }
    drop(presence);
    debug!(proto = ?proto, clean, present = attached.present, "connected");

    let granted = (proto == Proto::V5 && session_expiry.unwrap_or(0) != expiry).then_some(expiry);
    // No keep-alive, or a longer one than allowed, is held to the maximum
    // (v3.1.1 clients cannot be told; v5 clients are).
    let max_ka = inner.settings.max_keepalive_secs;
    let held = match keep_alive {
        0 => max_ka,
        ka => ka.min(max_ka),
    };
    let server_ka = (proto == Proto::V5 && held != keep_alive).then_some(held);
    let ack = connack(
        ConnCode::Accepted,
        attached.present,
        assigned.then_some(client_id.as_str()),
        granted,
        server_ka,
        Some(inner.settings.max_inflight),
        max,
    );
    let mut wbuf = BytesMut::new();
    codec::encode(proto, &ack, &mut wbuf, usize::MAX);
    Some(Connected {
        window: inner
            .settings
            .max_inflight
            .min(receive_max.unwrap_or(u16::MAX).into())
            .max(1),
        client_max: max_packet.map_or(usize::MAX, |m| m as usize),
        stream,
        proto,
        session: attached.session,
        rbuf,
        wbuf,
        keep_alive: held,
        will,
        wake,
        // An expiry too far away to represent is no expiry.
        expires: identity.expires.and_then(|at| {
            Instant::now().checked_add(Duration::from_secs(at.saturating_sub(crate::utc::now())))
        }),
        recheck: attached.present && identity.role == Role::Device,
        identity: identity.into_shared(),
    })
}

/// Why no CONNECT was obtained.
enum Handshake {
    Io(io::Error),
    Codec(CodecError),
    Level(u8),
}

async fn read_connect(
    stream: &mut Stream,
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
                rbuf.reserve(n.clamp(READ_CHUNK, READ_MAX));
                if stream.read_buf(rbuf).await.map_err(Handshake::Io)? == 0 {
                    return Err(Handshake::Io(io::ErrorKind::UnexpectedEof.into()));
                }
            }
        }
    }
}

/// Answers a refused CONNECT with its code; the caller then closes.
async fn refuse(stream: &mut Stream, proto: Proto, code: ConnCode, max: usize) {
    let mut out = BytesMut::new();
    let ack = connack(code, false, None, None, None, None, max);
    codec::encode(proto, &ack, &mut out, usize::MAX);
    let goodbye = async {
        stream.write_all(&out).await?;
        stream.shutdown().await
    };
    let _ = tokio::time::timeout(FINAL_WRITE, goodbye).await;
}

fn connack<'a>(
    code: ConnCode,
    session_present: bool,
    assigned_id: Option<&'a str>,
    session_expiry: Option<u32>,
    server_keep_alive: Option<u16>,
    receive_max: Option<usize>,
    max: usize,
) -> Out<'a> {
    Out::ConnAck {
        code,
        session_present,
        assigned_id,
        session_expiry,
        max_packet: u32::try_from(max).unwrap_or(u32::MAX),
        server_keep_alive,
        receive_max: receive_max.map(|r| u16::try_from(r).unwrap_or(u16::MAX)),
    }
}
