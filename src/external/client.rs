//! rumqttc's MQTT 5 and 3.1.1 clients behind one small surface, so the link
//! reads PUBACK reason codes (0x10 No matching subscribers, >= 0x80 refused)
//! from a broker that speaks 5 and works the same over 3.1.1, where every
//! PUBACK is a plain success.

use std::time::Duration;

use bytes::Bytes;
use rumqttc::v5::mqttbytes::v5::{
    ConnectReturnCode as ReturnV5, Packet as PacketV5, PubAckReason, SubscribeReasonCode as SubV5,
};
use rumqttc::v5::mqttbytes::QoS as QoSV5;
use rumqttc::{v5, Outgoing, TlsConfiguration, Transport};

use super::endpoint::Login;

/// Keep-alive towards the broker.
const KEEP_ALIVE: Duration = Duration::from_secs(30);
/// MQTT 5: how long the broker keeps the session (and the status
/// subscription in it) while pushbridge is away; 3.1.1 has no expiry.
const SESSION_EXPIRY_SECS: u32 = 24 * 3600;
/// Publishes in flight (MQTT 5: at most what the broker's Receive Maximum allows).
const INFLIGHT: u16 = 100;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Protocol {
    V5,
    V311,
}

impl Protocol {
    pub fn name(self) -> &'static str {
        match self {
            Protocol::V5 => "5",
            Protocol::V311 => "3.1.1",
        }
    }

    /// The other one: tried when a broker answers a CONNECT in a way that
    /// says it does not speak this one.
    pub fn other(self) -> Protocol {
        match self {
            Protocol::V5 => Protocol::V311,
            Protocol::V311 => Protocol::V5,
        }
    }
}

/// What the link needs from rumqttc's events.
#[derive(Debug)]
pub(super) enum Event {
    ConnAck {
        session_present: bool,
    },
    SubAck {
        granted: bool,
    },
    Publish {
        topic: String,
        payload: Bytes,
    },
    /// `reason`: 0x00 success, 0x10 no matching subscribers, >= 0x80
    /// refused; always 0x00 over 3.1.1.
    PubAck {
        pkid: u16,
        reason: u8,
    },
    /// rumqttc wrote a publish with this packet id.
    Written(u16),
    Other,
}

/// A failed poll: the connection is gone.
#[derive(Debug)]
pub(super) struct Error {
    pub text: String,
    /// The broker took the TCP connection but answered the CONNECT with
    /// something other than a CONNACK this version understands (or hung up).
    pub handshake: bool,
    /// The client itself refused the packet it was writing (larger than the
    /// broker's Maximum Packet Size): that publish is to blame.
    pub writing: bool,
}

pub(super) enum Client {
    V4(rumqttc::AsyncClient),
    V5(v5::AsyncClient),
}

/// Boxed: the two event loops differ in size, and one lives per link.
pub(super) enum Loop {
    V4(Box<rumqttc::EventLoop>),
    V5(Box<v5::EventLoop>),
}

/// A new client for `login` (connecting at the first poll), with room for
/// `queue` requests.
pub(super) fn new(login: &Login, protocol: Protocol, queue: usize) -> (Client, Loop) {
    let (host, port) = (login.endpoint.host.clone(), login.endpoint.port);
    let transport = login
        .tls
        .clone()
        .map(|config| Transport::Tls(TlsConfiguration::Rustls(config)));
    match protocol {
        Protocol::V311 => {
            let mut opts = rumqttc::MqttOptions::new(&login.client_id, host, port);
            opts.set_clean_session(false);
            opts.set_keep_alive(KEEP_ALIVE);
            opts.set_inflight(INFLIGHT);
            opts.set_max_packet_size(login.max_packet_size, login.max_packet_size);
            if let Some((user, password)) = &login.credentials {
                opts.set_credentials(user, password);
            }
            if let Some(t) = transport {
                opts.set_transport(t);
            }
            let (client, eventloop) = rumqttc::AsyncClient::new(opts, queue);
            (Client::V4(client), Loop::V4(Box::new(eventloop)))
        }
        Protocol::V5 => {
            let mut opts = v5::MqttOptions::new(&login.client_id, host, port);
            opts.set_clean_start(false);
            opts.set_session_expiry_interval(Some(SESSION_EXPIRY_SECS));
            opts.set_keep_alive(KEEP_ALIVE);
            opts.set_outgoing_inflight_upper_limit(INFLIGHT);
            opts.set_max_packet_size(Some(login.max_packet_size as u32));
            if let Some((user, password)) = &login.credentials {
                opts.set_credentials(user, password);
            }
            if let Some(t) = transport {
                opts.set_transport(t);
            }
            let (client, eventloop) = v5::AsyncClient::new(opts, queue);
            (Client::V5(client), Loop::V5(Box::new(eventloop)))
        }
    }
}

impl Client {
    /// Queues a QoS 1 publish; never waits (the queue has room for the outbox).
    pub fn try_publish(&self, topic: &str, payload: Bytes) -> Result<(), String> {
        match self {
            Client::V4(c) => c
                .try_publish(topic, rumqttc::QoS::AtLeastOnce, false, payload)
                .map_err(|e| e.to_string()),
            Client::V5(c) => c
                .try_publish(topic, QoSV5::AtLeastOnce, false, payload)
                .map_err(|e| e.to_string()),
        }
    }

    pub fn try_subscribe(&self, filter: &str) -> Result<(), String> {
        match self {
            Client::V4(c) => c
                .try_subscribe(filter, rumqttc::QoS::AtLeastOnce)
                .map_err(|e| e.to_string()),
            Client::V5(c) => c
                .try_subscribe(filter, QoSV5::AtLeastOnce)
                .map_err(|e| e.to_string()),
        }
    }

    pub fn try_disconnect(&self) -> bool {
        match self {
            Client::V4(c) => c.try_disconnect().is_ok(),
            Client::V5(c) => c.try_disconnect().is_ok(),
        }
    }
}

impl Loop {
    /// The next event; connects first when not connected.
    pub async fn poll(&mut self) -> Result<Event, Error> {
        match self {
            Loop::V4(l) => l.poll().await.map(v4_event).map_err(v4_error),
            Loop::V5(l) => l.poll().await.map(v5_event).map_err(v5_error),
        }
    }

    /// Events rumqttc had read but not yet returned when the poll failed
    /// (a PUBACK in the same read as the connection's end).
    pub fn leftover(&mut self) -> Vec<Event> {
        match self {
            Loop::V4(l) => l.state.events.drain(..).map(v4_event).collect(),
            Loop::V5(l) => l.state.events.drain(..).map(v5_event).collect(),
        }
    }
}

fn v4_event(event: rumqttc::Event) -> Event {
    use rumqttc::{Event as E, Packet as P};
    match event {
        E::Incoming(P::ConnAck(a)) => Event::ConnAck {
            session_present: a.session_present,
        },
        E::Incoming(P::SubAck(a)) => Event::SubAck {
            granted: !a
                .return_codes
                .iter()
                .any(|c| matches!(c, rumqttc::SubscribeReasonCode::Failure)),
        },
        E::Incoming(P::Publish(p)) => Event::Publish {
            topic: p.topic,
            payload: p.payload,
        },
        E::Incoming(P::PubAck(a)) => Event::PubAck {
            pkid: a.pkid,
            reason: 0,
        },
        E::Outgoing(Outgoing::Publish(pkid)) => Event::Written(pkid),
        _ => Event::Other,
    }
}

fn v5_event(event: v5::Event) -> Event {
    use v5::Event as E;
    match event {
        E::Incoming(PacketV5::ConnAck(a)) => Event::ConnAck {
            session_present: a.session_present,
        },
        E::Incoming(PacketV5::SubAck(a)) => Event::SubAck {
            granted: a
                .return_codes
                .iter()
                .all(|c| matches!(c, SubV5::Success(_))),
        },
        E::Incoming(PacketV5::Publish(p)) => Event::Publish {
            topic: String::from_utf8_lossy(&p.topic).into_owned(),
            payload: p.payload,
        },
        E::Incoming(PacketV5::PubAck(a)) => Event::PubAck {
            pkid: a.pkid,
            reason: puback_code(a.reason),
        },
        E::Outgoing(Outgoing::Publish(pkid)) => Event::Written(pkid),
        _ => Event::Other,
    }
}

/// The reason's byte on the wire (MQTT 5, 3.4.2.1).
fn puback_code(reason: PubAckReason) -> u8 {
    match reason {
        PubAckReason::Success => 0x00,
        PubAckReason::NoMatchingSubscribers => 0x10,
        PubAckReason::UnspecifiedError => 0x80,
        PubAckReason::ImplementationSpecificError => 0x83,
        PubAckReason::NotAuthorized => 0x87,
        PubAckReason::TopicNameInvalid => 0x90,
        PubAckReason::PacketIdentifierInUse => 0x91,
        PubAckReason::QuotaExceeded => 0x97,
        PubAckReason::PayloadFormatInvalid => 0x99,
    }
}

/// What a refusing PUBACK's reason means, for logs and feedback.
pub(super) fn puback_reason(code: u8) -> &'static str {
    match code {
        0x80 => "Unspecified error",
        0x83 => "Implementation specific error",
        0x87 => "Not authorized",
        0x90 => "Topic Name invalid",
        0x91 => "Packet Identifier in use",
        0x97 => "Quota exceeded",
        0x99 => "Payload format invalid",
        _ => "refused",
    }
}

fn hung_up(e: &std::io::Error) -> bool {
    use std::io::ErrorKind as K;
    matches!(
        e.kind(),
        K::UnexpectedEof | K::ConnectionReset | K::ConnectionAborted | K::BrokenPipe
    )
}

fn v4_error(e: rumqttc::ConnectionError) -> Error {
    use rumqttc::{ConnectReturnCode as R, ConnectionError as C, StateError as S};
    let handshake = match &e {
        C::ConnectionRefused(R::RefusedProtocolVersion) | C::NotConnAck(_) => true,
        C::MqttState(S::Deserialization(_) | S::ConnectionAborted) => true,
        C::Io(io) => hung_up(io),
        _ => false,
    };
    Error {
        text: e.to_string(),
        handshake,
        writing: false,
    }
}

fn v5_error(e: v5::ConnectionError) -> Error {
    use v5::{ConnectionError as C, StateError as S};
    let handshake = match &e {
        C::ConnectionRefused(ReturnV5::UnsupportedProtocolVersion)
        | C::ConnectionRefused(ReturnV5::RefusedProtocolVersion)
        | C::NotConnAck(_) => true,
        C::MqttState(S::Deserialization(_) | S::ConnectionAborted) => true,
        C::Io(io) => hung_up(io),
        _ => false,
    };
    Error {
        text: e.to_string(),
        handshake,
        writing: matches!(e, C::MqttState(S::OutgoingPacketTooLarge { .. })),
    }
}
