//! MQTT framing on top of rumqttc's packet codecs.
//!
//! `check` decides from the fixed header alone whether a whole, legal frame
//! is buffered (so oversize bodies are refused before they are read);
//! `parse` turns exactly one such frame into a version-neutral [`In`], and
//! `encode` writes a version-neutral [`Out`]. The rest of the broker never
//! sees which protocol version a client speaks.

use bytes::{Buf, BufMut, Bytes, BytesMut};
use rumqttc::mqttbytes::v4;
use rumqttc::v5::mqttbytes::v5;
use rumqttc::v5::mqttbytes::QoS as QoS5;
use rumqttc::QoS as QoS4;

/// Why a byte stream is not acceptable MQTT.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CodecError {
    #[error("packet of {0} bytes exceeds the limit")]
    TooLarge(usize),
    #[error("malformed remaining length")]
    BadLength,
    #[error("packet type {0} not accepted from a client")]
    BadType(u8),
    #[error("reserved header flags {0:#x} for packet type {1}")]
    BadFlags(u8, u8),
    #[error("malformed packet: {0}")]
    Malformed(String),
}

/// Protocol version a connection speaks, chosen from its CONNECT.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Proto {
    V4,
    V5,
}

/// What `check` found at the start of the buffer.
#[derive(Debug, PartialEq, Eq)]
pub enum Check {
    /// At least this many more bytes are needed.
    Incomplete(usize),
    /// A whole frame of this many bytes (header included) is buffered.
    Frame(usize),
}

/// Is a whole, legal frame at the start of `buf`? Looks only at the fixed header.
pub fn check(buf: &[u8], max_packet: usize) -> Result<Check, CodecError> {
    let Some(&byte1) = buf.first() else {
        return Ok(Check::Incomplete(2));
    };
    let kind = byte1 >> 4;
    let flags = byte1 & 0x0f;
    match kind {
        3 => {
            if flags & 0b0110 == 0b0110 {
                return Err(CodecError::BadFlags(flags, kind));
            }
        }
        6 | 8 | 10 if flags != 0b0010 => return Err(CodecError::BadFlags(flags, kind)),
        6 | 8 | 10 => {}
        1 | 4 | 5 | 7 | 12 | 14 if flags != 0 => return Err(CodecError::BadFlags(flags, kind)),
        1 | 4 | 5 | 7 | 12 | 14 => {}
        _ => return Err(CodecError::BadType(kind)),
    }
    let mut len = 0usize;
    for i in 0..4 {
        let Some(&b) = buf.get(1 + i) else {
            return Ok(Check::Incomplete(1));
        };
        len |= ((b & 0x7f) as usize) << (7 * i);
        if b & 0x80 == 0 {
            if len > max_packet {
                return Err(CodecError::TooLarge(len));
            }
            let total = 2 + i + len;
            return Ok(if buf.len() >= total {
                Check::Frame(total)
            } else {
                Check::Incomplete(total - buf.len())
            });
        }
    }
    Err(CodecError::BadLength)
}

/// The protocol level byte of a CONNECT frame (as `check` accepted it).
pub fn connect_level(frame: &[u8]) -> Result<u8, CodecError> {
    let mut i = 1;
    while frame.get(i).is_some_and(|b| b & 0x80 != 0) {
        i += 1;
    }
    let name_at = i + 1;
    let malformed = || CodecError::Malformed("short CONNECT".into());
    let hi = *frame.get(name_at).ok_or_else(malformed)? as usize;
    let lo = *frame.get(name_at + 1).ok_or_else(malformed)? as usize;
    frame
        .get(name_at + 2 + (hi << 8 | lo))
        .copied()
        .ok_or_else(malformed)
}

/// A last will, published by the broker if the connection ends uncleanly.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Will {
    pub topic: String,
    pub payload: Bytes,
    pub qos: u8,
}

/// The parts of a CONNECT the broker acts on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Connect {
    pub proto: Proto,
    pub client_id: String,
    pub clean: bool,
    pub keep_alive: u16,
    pub will: Option<Will>,
    /// v5 only: Session Expiry Interval property.
    pub session_expiry: Option<u32>,
    /// v5 only: the client's Maximum Packet Size.
    pub max_packet: Option<u32>,
    /// v5 only: the client's Receive Maximum.
    pub receive_max: Option<u16>,
    pub username: Option<String>,
    pub password: Option<String>,
}

/// A client-to-server packet, whichever version it came in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum In {
    Connect(Box<Connect>),
    Publish {
        topic: String,
        payload: Bytes,
        qos: u8,
        pkid: u16,
        /// v5 topic alias (we never allow aliases, so any is an error).
        alias: bool,
    },
    PubAck(u16),
    PubRec(u16),
    PubRel(u16),
    PubComp(u16),
    Subscribe {
        pkid: u16,
        filters: Vec<(String, u8)>,
    },
    Unsubscribe {
        pkid: u16,
        filters: Vec<String>,
    },
    PingReq,
    Disconnect {
        reason: u8,
        session_expiry: Option<u32>,
    },
}

/// Splits one whole frame of `len` bytes (as `check` reported) off `buf` and decodes it.
pub fn parse(proto: Proto, buf: &mut BytesMut, len: usize) -> Result<In, CodecError> {
    if let Some(pkid) = puback(buf, len) {
        buf.advance(len);
        return Ok(In::PubAck(pkid));
    }
    let mut frame = buf.split_to(len.min(buf.len()));
    let bad = |e: &dyn std::fmt::Display| CodecError::Malformed(e.to_string());
    match proto {
        Proto::V4 => {
            let p = v4::Packet::read(&mut frame, usize::MAX).map_err(|e| bad(&e))?;
            from_v4(p)
        }
        Proto::V5 => {
            // rumqttc refuses the legal short DISCONNECTs: no reason (0 implied),
            // or a reason without properties.
            if frame.len() <= 3 && frame.first() == Some(&0xe0) {
                return Ok(In::Disconnect {
                    reason: frame.get(2).copied().unwrap_or(0),
                    session_expiry: None,
                });
            }
            let p = v5::Packet::read(&mut frame, None).map_err(|e| bad(&e))?;
            from_v5(p)
        }
    }
}

/// The packet id of a plain PUBACK (the same bytes in both versions), one
/// per QoS 1 push, read in place: splitting it off would allocate.
fn puback(buf: &[u8], len: usize) -> Option<u16> {
    match buf.get(..len)? {
        &[0x40, 0x02, hi, lo] if (hi, lo) != (0, 0) => Some(u16::from_be_bytes([hi, lo])),
        _ => None,
    }
}

fn qos4(q: QoS4) -> u8 {
    q as u8
}

fn qos5(q: QoS5) -> u8 {
    q as u8
}

fn from_v4(p: v4::Packet) -> Result<In, CodecError> {
    Ok(match p {
        v4::Packet::Connect(c) => In::Connect(Box::new(Connect {
            proto: Proto::V4,
            client_id: c.client_id,
            clean: c.clean_session,
            keep_alive: c.keep_alive,
            will: c.last_will.map(|w| Will {
                topic: w.topic,
                payload: w.message,
                qos: qos4(w.qos),
            }),
            session_expiry: None,
            max_packet: None,
            receive_max: None,
            username: c.login.as_ref().map(|l| l.username.clone()),
            password: c.login.map(|l| l.password),
        })),
        v4::Packet::Publish(p) => In::Publish {
            topic: p.topic,
            payload: p.payload,
            qos: qos4(p.qos),
            pkid: p.pkid,
            alias: false,
        },
        v4::Packet::PubAck(a) => In::PubAck(a.pkid),
        v4::Packet::PubRec(a) => In::PubRec(a.pkid),
        v4::Packet::PubRel(a) => In::PubRel(a.pkid),
        v4::Packet::PubComp(a) => In::PubComp(a.pkid),
        v4::Packet::Subscribe(s) => In::Subscribe {
            pkid: s.pkid,
            filters: s
                .filters
                .into_iter()
                .map(|f| (f.path, qos4(f.qos)))
                .collect(),
        },
        v4::Packet::Unsubscribe(u) => In::Unsubscribe {
            pkid: u.pkid,
            filters: u.topics,
        },
        v4::Packet::PingReq => In::PingReq,
        v4::Packet::Disconnect => In::Disconnect {
            reason: 0,
            session_expiry: None,
        },
        other => return Err(CodecError::Malformed(format!("unexpected {other:?}"))),
    })
}

fn from_v5(p: v5::Packet) -> Result<In, CodecError> {
    Ok(match p {
        v5::Packet::Connect(c, will, login) => {
            let props = c.properties.as_ref();
            let will = match will {
                Some(w) => Some(Will {
                    topic: String::from_utf8(w.topic.to_vec())
                        .map_err(|_| CodecError::Malformed("will topic not UTF-8".into()))?,
                    payload: w.message,
                    qos: qos5(w.qos),
                }),
                None => None,
            };
            In::Connect(Box::new(Connect {
                proto: Proto::V5,
                clean: c.clean_start,
                keep_alive: c.keep_alive,
                will,
                session_expiry: props.and_then(|p| p.session_expiry_interval),
                max_packet: props.and_then(|p| p.max_packet_size),
                receive_max: props.and_then(|p| p.receive_maximum),
                client_id: c.client_id,
                username: login.as_ref().map(|l| l.username.clone()),
                password: login.map(|l| l.password),
            }))
        }
        v5::Packet::Publish(p) => In::Publish {
            topic: String::from_utf8(p.topic.to_vec())
                .map_err(|_| CodecError::Malformed("topic not UTF-8".into()))?,
            alias: p
                .properties
                .as_ref()
                .is_some_and(|p| p.topic_alias.is_some()),
            payload: p.payload,
            qos: qos5(p.qos),
            pkid: p.pkid,
        },
        v5::Packet::PubAck(a) => In::PubAck(a.pkid),
        v5::Packet::PubRec(a) => In::PubRec(a.pkid),
        v5::Packet::PubRel(a) => In::PubRel(a.pkid),
        v5::Packet::PubComp(a) => In::PubComp(a.pkid),
        v5::Packet::Subscribe(s) => In::Subscribe {
            pkid: s.pkid,
            filters: s
                .filters
                .into_iter()
                .map(|f| (f.path, qos5(f.qos)))
                .collect(),
        },
        v5::Packet::Unsubscribe(u) => In::Unsubscribe {
            pkid: u.pkid,
            filters: u.filters,
        },
        v5::Packet::PingReq(_) => In::PingReq,
        v5::Packet::Disconnect(d) => In::Disconnect {
            reason: d.reason_code as u8,
            session_expiry: d.properties.and_then(|p| p.session_expiry_interval),
        },
        other => return Err(CodecError::Malformed(format!("unexpected {other:?}"))),
    })
}

/// CONNACK outcome, mapped to each version's code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnCode {
    Accepted,
    BadProtocol,
    BadClientId,
    /// Missing, malformed or wrongly signed credentials.
    BadCredentials,
    /// Credentials valid but not good enough (expired, user name not the token's subject).
    NotAuthorized,
}

/// One SUBACK entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SubCode {
    Granted(u8),
    Invalid,
    NotAuthorized,
    Quota,
}

/// A server-to-client packet.
#[derive(Debug, Clone)]
pub enum Out<'a> {
    ConnAck {
        code: ConnCode,
        session_present: bool,
        /// v5: the server-assigned client id, if the client sent none.
        assigned_id: Option<&'a str>,
        /// v5: the session expiry actually granted, when it differs from the request.
        session_expiry: Option<u32>,
        max_packet: u32,
        /// v5: the keep-alive the server holds the client to, when it differs from the request.
        server_keep_alive: Option<u16>,
        /// v5: QoS 2 messages the client may have awaiting PUBREL (`mqtt.max_inflight`).
        receive_max: Option<u16>,
    },
    Publish {
        topic: &'a str,
        payload: &'a Bytes,
        qos: u8,
        pkid: u16,
        dup: bool,
        /// v5: seconds the message stays worth delivering (message expiry interval).
        expiry: Option<u32>,
    },
    /// Packet id and whether the publish was accepted (v5 says 0x87 when not).
    PubAck(u16, bool),
    PubRec(u16, bool),
    PubComp(u16),
    SubAck(u16, Vec<SubCode>),
    UnsubAck(u16, usize),
    PingResp,
    /// v5 only (v3.1.1 has no server DISCONNECT): reason code.
    Disconnect(u8),
}

/// Appends `out` to `buf`; returns false (writing nothing) if the frame would
/// exceed `max` bytes or the packet has no form in this version.
pub fn encode(proto: Proto, out: &Out<'_>, buf: &mut BytesMut, max: usize) -> bool {
    if let (Proto::V5, Out::Disconnect(code)) = (proto, out) {
        // rumqttc declares one byte too few for a reason code without properties.
        buf.extend_from_slice(&[0xe0, 0x02, *code, 0x00]);
        return true;
    }
    if let (
        Proto::V4,
        Out::Publish {
            topic,
            payload,
            qos,
            pkid,
            dup,
            ..
        },
    ) = (proto, out)
    {
        return publish_v4(buf, topic, payload, *qos, *pkid, *dup, max);
    }
    let res = match proto {
        Proto::V4 => match to_v4(out) {
            Some(p) => p.write(buf, max).map_err(|e| e.to_string()),
            None => return false,
        },
        Proto::V5 => to_v5(out)
            .write(buf, Some(max.min(u32::MAX as usize) as u32))
            .map_err(|e| e.to_string()),
    };
    res.is_ok()
}

/// A v3.1.1 PUBLISH written in place: every push to a device is one, and
/// rumqttc's writer would copy the topic into a `String` and grow `buf`
/// four times on the way. Writes nothing (false) past `max`, for a topic
/// too long for its length field, or for QoS 1 without a packet id.
fn publish_v4(
    buf: &mut BytesMut,
    topic: &str,
    payload: &[u8],
    qos: u8,
    pkid: u16,
    dup: bool,
    max: usize,
) -> bool {
    let qos = qos.min(1);
    let len = 2 + topic.len() + 2 * usize::from(qos) + payload.len();
    let size_bytes = match len {
        0..=127 => 1,
        128..=16_383 => 2,
        16_384..=2_097_151 => 3,
        2_097_152..=268_435_455 => 4,
        _ => return false,
    };
    if 1 + size_bytes + len > max || topic.len() > usize::from(u16::MAX) || (qos == 1 && pkid == 0)
    {
        return false;
    }
    buf.reserve(1 + size_bytes + len);
    buf.put_u8(0x30 | u8::from(dup) << 3 | qos << 1);
    let mut rest = len;
    loop {
        let byte = (rest % 128) as u8;
        rest /= 128;
        if rest == 0 {
            buf.put_u8(byte);
            break;
        }
        buf.put_u8(byte | 0x80);
    }
    buf.put_u16(topic.len() as u16);
    buf.put_slice(topic.as_bytes());
    if qos == 1 {
        buf.put_u16(pkid);
    }
    buf.put_slice(payload);
    true
}

fn to_v4(out: &Out<'_>) -> Option<v4::Packet> {
    let q = |q: u8| {
        if q == 0 {
            QoS4::AtMostOnce
        } else {
            QoS4::AtLeastOnce
        }
    };
    Some(match out {
        Out::ConnAck {
            code,
            session_present,
            ..
        } => v4::Packet::ConnAck(v4::ConnAck::new(
            match code {
                ConnCode::Accepted => v4::ConnectReturnCode::Success,
                ConnCode::BadProtocol => v4::ConnectReturnCode::RefusedProtocolVersion,
                ConnCode::BadClientId => v4::ConnectReturnCode::BadClientId,
                ConnCode::BadCredentials => v4::ConnectReturnCode::BadUserNamePassword,
                ConnCode::NotAuthorized => v4::ConnectReturnCode::NotAuthorized,
            },
            *session_present,
        )),
        // Written by `publish_v4`.
        Out::Publish { .. } => return None,
        Out::PubAck(id, _) => v4::Packet::PubAck(v4::PubAck::new(*id)),
        Out::PubRec(id, _) => v4::Packet::PubRec(v4::PubRec::new(*id)),
        Out::PubComp(id) => v4::Packet::PubComp(v4::PubComp::new(*id)),
        Out::SubAck(id, codes) => v4::Packet::SubAck(v4::SubAck::new(
            *id,
            codes
                .iter()
                .map(|c| match c {
                    SubCode::Granted(g) => v4::SubscribeReasonCode::Success(q(*g)),
                    _ => v4::SubscribeReasonCode::Failure,
                })
                .collect(),
        )),
        Out::UnsubAck(id, _) => v4::Packet::UnsubAck(v4::UnsubAck::new(*id)),
        Out::PingResp => v4::Packet::PingResp,
        Out::Disconnect(_) => return None,
    })
}

fn to_v5(out: &Out<'_>) -> v5::Packet {
    let q = |q: u8| {
        if q == 0 {
            QoS5::AtMostOnce
        } else {
            QoS5::AtLeastOnce
        }
    };
    match out {
        Out::ConnAck {
            code,
            session_present,
            assigned_id,
            session_expiry,
            max_packet,
            server_keep_alive,
            receive_max,
        } => v5::Packet::ConnAck(v5::ConnAck {
            session_present: *session_present,
            code: match code {
                ConnCode::Accepted => v5::ConnectReturnCode::Success,
                ConnCode::BadProtocol => v5::ConnectReturnCode::UnsupportedProtocolVersion,
                ConnCode::BadClientId => v5::ConnectReturnCode::ClientIdentifierNotValid,
                ConnCode::BadCredentials => v5::ConnectReturnCode::BadUserNamePassword,
                ConnCode::NotAuthorized => v5::ConnectReturnCode::NotAuthorized,
            },
            properties: Some(v5::ConnAckProperties {
                session_expiry_interval: *session_expiry,
                receive_max: *receive_max,
                // Inbound QoS 2 is accepted; only subscriptions are capped (in SUBACK).
                max_qos: None,
                retain_available: Some(0),
                max_packet_size: Some(*max_packet),
                assigned_client_identifier: assigned_id.map(str::to_owned),
                topic_alias_max: None,
                reason_string: None,
                user_properties: Vec::new(),
                wildcard_subscription_available: None,
                subscription_identifiers_available: Some(0),
                shared_subscription_available: Some(0),
                server_keep_alive: *server_keep_alive,
                response_information: None,
                server_reference: None,
                authentication_method: None,
                authentication_data: None,
            }),
        }),
        Out::Publish {
            topic,
            payload,
            qos,
            pkid,
            dup,
            expiry,
        } => v5::Packet::Publish(v5::Publish {
            dup: *dup,
            qos: q(*qos),
            retain: false,
            topic: Bytes::copy_from_slice(topic.as_bytes()),
            pkid: *pkid,
            payload: (*payload).clone(),
            properties: expiry.map(|secs| v5::PublishProperties {
                message_expiry_interval: Some(secs),
                ..Default::default()
            }),
        }),
        Out::PubAck(id, ok) => {
            let mut a = v5::PubAck::new(*id, None);
            if !ok {
                a.reason = v5::PubAckReason::NotAuthorized;
            }
            v5::Packet::PubAck(a)
        }
        Out::PubRec(id, ok) => {
            let mut r = v5::PubRec::new(*id, None);
            if !ok {
                r.reason = v5::PubRecReason::NotAuthorized;
            }
            v5::Packet::PubRec(r)
        }
        Out::PubComp(id) => v5::Packet::PubComp(v5::PubComp::new(*id, None)),
        Out::SubAck(id, codes) => v5::Packet::SubAck(v5::SubAck {
            pkid: *id,
            return_codes: codes
                .iter()
                .map(|c| match c {
                    SubCode::Granted(g) => v5::SubscribeReasonCode::Success(q(*g)),
                    SubCode::Invalid => v5::SubscribeReasonCode::TopicFilterInvalid,
                    SubCode::NotAuthorized => v5::SubscribeReasonCode::NotAuthorized,
                    SubCode::Quota => v5::SubscribeReasonCode::QuotaExceeded,
                })
                .collect(),
            properties: None,
        }),
        Out::UnsubAck(id, n) => v5::Packet::UnsubAck(v5::UnsubAck {
            pkid: *id,
            reasons: vec![v5::UnsubAckReason::Success; *n],
            properties: None,
        }),
        Out::PingResp => v5::Packet::PingResp(v5::PingResp),
        Out::Disconnect(_) => v5::Packet::Disconnect(v5::Disconnect::new(
            v5::DisconnectReasonCode::NormalDisconnection,
        )),
    }
}

#[cfg(test)]
mod tests;
