use super::*;

fn v4_bytes(p: v4::Packet) -> BytesMut {
    let mut b = BytesMut::new();
    p.write(&mut b, usize::MAX).unwrap();
    b
}

fn v5_bytes(p: v5::Packet) -> BytesMut {
    let mut b = BytesMut::new();
    p.write(&mut b, None).unwrap();
    b
}

fn parse_all(proto: Proto, mut buf: BytesMut, max: usize) -> Result<Vec<In>, CodecError> {
    let mut out = Vec::new();
    loop {
        match check(&buf, max)? {
            Check::Frame(n) => out.push(parse(proto, &mut buf, n)?),
            Check::Incomplete(_) => return Ok(out),
        }
    }
}

fn v4_connect() -> BytesMut {
    let mut c = v4::Connect::new("dev-1");
    c.clean_session = false;
    c.keep_alive = 30;
    c.last_will = Some(v4::LastWill::new(
        "push/will",
        "gone",
        QoS4::AtLeastOnce,
        false,
    ));
    v4_bytes(v4::Packet::Connect(c))
}

#[test]
fn v4_connect_is_checked_and_parsed() {
    let buf = v4_connect();
    assert_eq!(check(&buf, 1024), Ok(Check::Frame(buf.len())));
    assert_eq!(connect_level(&buf), Ok(4));
    let got = parse_all(Proto::V4, buf, 1024).unwrap();
    let In::Connect(c) = &got[0] else {
        panic!("{got:?}")
    };
    assert_eq!(c.client_id, "dev-1");
    assert!(!c.clean);
    assert_eq!(c.keep_alive, 30);
    assert_eq!(c.will.as_ref().unwrap().topic, "push/will");
}

#[test]
fn v5_connect_reads_properties() {
    let mut c = v5::Connect {
        keep_alive: 5,
        client_id: String::new(),
        clean_start: true,
        properties: None,
    };
    let mut props = v5::ConnectProperties::new();
    props.session_expiry_interval = Some(60);
    props.receive_maximum = Some(3);
    c.properties = Some(props);
    let buf = v5_bytes(v5::Packet::Connect(c, None, None));
    assert_eq!(connect_level(&buf), Ok(5));
    let got = parse_all(Proto::V5, buf, 1024).unwrap();
    let In::Connect(c) = &got[0] else {
        panic!("{got:?}")
    };
    assert_eq!(c.proto, Proto::V5);
    assert_eq!(c.session_expiry, Some(60));
    assert_eq!(c.receive_max, Some(3));
}

#[test]
fn partial_frames_ask_for_more() {
    let buf = v4_connect();
    for cut in 0..buf.len() {
        match check(&buf[..cut], 1024) {
            Ok(Check::Incomplete(n)) => assert!(n >= 1, "cut {cut}"),
            other => panic!("cut {cut}: {other:?}"),
        }
    }
    // The exact shortfall is known once the length is readable.
    assert_eq!(check(&buf[..2], 1024), Ok(Check::Incomplete(buf.len() - 2)));
}

#[test]
fn two_frames_in_one_buffer() {
    let mut buf = v4_bytes(v4::Packet::PingReq);
    buf.extend_from_slice(&v4_bytes(v4::Packet::PubAck(v4::PubAck::new(7))));
    let got = parse_all(Proto::V4, buf, 1024).unwrap();
    assert_eq!(got, vec![In::PingReq, In::PubAck(7)]);
}

#[test]
fn oversize_is_refused_from_the_header() {
    // PUBLISH claiming 2 MB with only the header present.
    let buf = [0x30, 0x80, 0x80, 0x80, 0x01];
    assert_eq!(check(&buf, 1024), Err(CodecError::TooLarge(1 << 21)));
}

#[test]
fn garbage_is_refused() {
    assert_eq!(check(&[0x00, 0x00], 1024), Err(CodecError::BadType(0)));
    assert_eq!(check(&[0xf0, 0x00], 1024), Err(CodecError::BadType(15)));
    assert_eq!(
        check(&[0x20, 0x02, 0, 0], 1024),
        Err(CodecError::BadType(2))
    );
    assert_eq!(
        check(&[0x82, 0xff, 0xff, 0xff, 0xff, 0x01], 1 << 30),
        Err(CodecError::BadLength)
    );
    assert_eq!(check(&[0x80, 0x00], 1024), Err(CodecError::BadFlags(0, 8)));
    assert_eq!(check(&[0x36, 0x00], 1024), Err(CodecError::BadFlags(6, 3)));
    // A whole frame whose body is nonsense.
    let mut buf = BytesMut::from(&[0x30, 0x03, 0xff, 0xff, 0x00][..]);
    assert!(parse(Proto::V4, &mut buf, 5).is_err());
    let mut buf = BytesMut::from(&[0x82, 0x01, 0x00][..]);
    assert!(parse(Proto::V5, &mut buf, 3).is_err());
}

#[test]
fn v5_short_disconnects_are_legal() {
    for (bytes, reason) in [(&[0xe0, 0x00][..], 0), (&[0xe0, 0x01, 0x04][..], 4)] {
        let got = parse_all(Proto::V5, BytesMut::from(bytes), 1024).unwrap();
        let want = In::Disconnect {
            reason,
            session_expiry: None,
        };
        assert_eq!(got, vec![want]);
    }
}

#[test]
fn v5_disconnect_with_reason_is_well_formed() {
    let mut buf = BytesMut::new();
    assert!(encode(
        Proto::V5,
        &Out::Disconnect(0x8e),
        &mut buf,
        usize::MAX
    ));
    assert_eq!(&buf[..], &[0xe0, 0x02, 0x8e, 0x00]);
    let p = v5::Packet::read(&mut buf, None).unwrap();
    let v5::Packet::Disconnect(d) = p else {
        panic!("{p:?}")
    };
    assert_eq!(d.reason_code, v5::DisconnectReasonCode::SessionTakenOver);
    assert!(buf.is_empty());
    assert!(!encode(
        Proto::V4,
        &Out::Disconnect(0x8e),
        &mut buf,
        usize::MAX
    ));
}

#[test]
fn publish_round_trips_in_both_versions() {
    let payload = Bytes::from_static(b"hello");
    for proto in [Proto::V4, Proto::V5] {
        let mut buf = BytesMut::new();
        let out = Out::Publish {
            topic: "push/user/1",
            payload: &payload,
            qos: 1,
            pkid: 9,
            dup: true,
            expiry: None,
        };
        assert!(encode(proto, &out, &mut buf, usize::MAX));
        assert_eq!(buf[0], 0x3a, "{proto:?}: QoS 1 + DUP");
        let got = parse_all(proto, buf, 1024).unwrap();
        assert_eq!(
            got,
            vec![In::Publish {
                topic: "push/user/1".into(),
                payload: payload.clone(),
                qos: 1,
                pkid: 9,
                alias: false
            }]
        );
        let mut small = BytesMut::new();
        assert!(
            !encode(proto, &out, &mut small, 8),
            "too large for the client"
        );
        assert!(small.is_empty());
    }
}

/// Deterministic xorshift, so a failure reproduces.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

fn samples() -> Vec<BytesMut> {
    let mut sub4 = v4::Subscribe::new("a/+/#", QoS4::AtLeastOnce);
    sub4.pkid = 3;
    let mut sub5 = v5::Subscribe::new(v5::Filter::new("a/b", QoS5::ExactlyOnce), None);
    sub5.pkid = 4;
    let mut pub5 = v5::Publish::new("t", QoS5::AtLeastOnce, "p", None);
    pub5.pkid = 2;
    pub5.properties = Some(v5::PublishProperties {
        user_properties: vec![("k".into(), "v".into())],
        content_type: Some("x".into()),
        ..Default::default()
    });
    let mut c5 = v5::ConnectProperties::new();
    c5.session_expiry_interval = Some(9);
    c5.user_properties = vec![("a".into(), "b".into())];
    vec![
        v4_connect(),
        v4_bytes(v4::Packet::Subscribe(sub4)),
        v4_bytes(v4::Packet::Unsubscribe(v4::Unsubscribe::new("a/b"))),
        v5_bytes(v5::Packet::Subscribe(sub5)),
        v5_bytes(v5::Packet::Publish(pub5)),
        v5_bytes(v5::Packet::Connect(
            v5::Connect {
                keep_alive: 1,
                client_id: "c".into(),
                clean_start: false,
                properties: Some(c5),
            },
            Some(v5::LastWill::new("w", "x", QoS5::AtLeastOnce, false, None)),
            Some(v5::Login::new("u", "p")),
        )),
        v5_bytes(v5::Packet::Disconnect(v5::Disconnect::new(
            v5::DisconnectReasonCode::DisconnectWithWillMessage,
        ))),
    ]
}

/// The codec must never panic, whatever arrives: mutate valid frames and feed noise.
#[test]
fn never_panics_on_mutated_or_random_input() {
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let samples = samples();
    let mut parsed = 0;
    for round in 0..60_000 {
        let mut buf = if round % 3 == 0 {
            let len = (rng.next() % 40) as usize;
            (0..len).map(|_| rng.next() as u8).collect::<Vec<u8>>()
        } else {
            let mut b = samples[(rng.next() as usize) % samples.len()].to_vec();
            for _ in 0..=(rng.next() % 4) {
                let i = (rng.next() as usize) % b.len();
                match rng.next() % 3 {
                    0 => b[i] = rng.next() as u8,
                    1 => b.truncate(i.max(1)),
                    _ => b.insert(i, rng.next() as u8),
                }
            }
            b
        };
        if round % 2 == 0 && buf.len() > 1 {
            buf[0] = (buf[0] & 0xf0) | ((buf[0] & 0x0f) % 3);
        }
        // Usually make the length honest, so the body parsers see the damage.
        if round % 4 != 3 && (2..129).contains(&buf.len()) {
            buf[1] = (buf.len() - 2) as u8;
        }
        for proto in [Proto::V4, Proto::V5] {
            let _ = connect_level(&buf);
            if let Ok(v) = parse_all(proto, BytesMut::from(&buf[..]), 1 << 16) {
                parsed += v.len();
            }
        }
    }
    assert!(
        parsed > 1000,
        "the mutations should still parse sometimes: {parsed}"
    );
}

/// The hand-written v3.1.1 PUBLISH is byte for byte what rumqttc writes,
/// across topic and payload sizes that take 1 to 3 remaining-length bytes.
#[test]
fn the_v4_publish_writer_matches_rumqttc() {
    use rand::{Rng, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(16);
    let sizes = [0, 1, 100, 123, 124, 125, 16_380, 16_384, 20_000];
    for i in 0..3000 {
        let topic: String = (0..rng.random_range(0..300))
            .map(|_| char::from(rng.random_range(b'a'..=b'z')))
            .collect();
        let payload = Bytes::from(vec![b'x'; sizes[i % sizes.len()]]);
        let (qos, pkid, dup) = (
            rng.random_range(0..=2u8),
            rng.random_range(1..=u16::MAX),
            rng.random(),
        );
        let out = Out::Publish {
            topic: &topic,
            payload: &payload,
            qos,
            pkid,
            dup,
            expiry: None,
        };
        let mut mine = BytesMut::from(&b"before"[..]);
        assert!(encode(Proto::V4, &out, &mut mine, usize::MAX));
        let q = if qos == 0 {
            QoS4::AtMostOnce
        } else {
            QoS4::AtLeastOnce
        };
        let mut theirs = v4::Publish::from_bytes(topic.as_str(), q, payload.clone());
        (theirs.pkid, theirs.dup) = (pkid, dup);
        let theirs = v4_bytes(v4::Packet::Publish(theirs));
        assert_eq!(
            &mine[6..],
            &theirs[..],
            "topic {} bytes, payload {}, qos {qos}",
            topic.len(),
            payload.len()
        );

        // `max` is the whole frame: at it, written; one under, nothing.
        let mut at = BytesMut::new();
        assert!(encode(Proto::V4, &out, &mut at, theirs.len()));
        let mut under = BytesMut::new();
        assert!(!encode(Proto::V4, &out, &mut under, theirs.len() - 1));
        assert!(under.is_empty());
    }
    let no_id = Out::Publish {
        topic: "t",
        payload: &Bytes::new(),
        qos: 1,
        pkid: 0,
        dup: false,
        expiry: None,
    };
    let mut buf = BytesMut::new();
    assert!(!encode(Proto::V4, &no_id, &mut buf, usize::MAX) && buf.is_empty());
}

/// PUBACKs read in place give what rumqttc's reader gives, and leave the
/// packet after them in the buffer.
#[test]
fn pubacks_read_in_place_match_rumqttc() {
    for pkid in [1u16, 7, 255, 256, 4660, u16::MAX] {
        let one = v4_bytes(v4::Packet::PubAck(v4::PubAck::new(pkid)));
        assert_eq!(puback(&one, one.len()), Some(pkid));
        for proto in [Proto::V4, Proto::V5] {
            let mut buf = one.clone();
            buf.extend_from_slice(&v4_bytes(v4::Packet::PingReq));
            assert_eq!(
                parse_all(proto, buf, usize::MAX).unwrap(),
                vec![In::PubAck(pkid), In::PingReq]
            );
            let mut frame = one.clone();
            let slow = match proto {
                Proto::V4 => from_v4(v4::Packet::read(&mut frame, usize::MAX).unwrap()),
                Proto::V5 => from_v5(v5::Packet::read(&mut frame, None).unwrap()),
            };
            assert_eq!(slow.unwrap(), In::PubAck(pkid));
        }
    }
    // Anything else (a zero id, a v5 reason code, other flags) goes the long way.
    assert_eq!(puback(&[0x40, 0x02, 0, 0], 4), None);
    assert_eq!(puback(&[0x40, 0x03, 0, 1, 0x10], 5), None);
    assert_eq!(puback(&[0x42, 0x02, 0, 1], 4), None);
    assert_eq!(puback(&[0x40, 0x02, 0], 4), None);
}
