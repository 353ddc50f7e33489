//! Fuzz target bodies, shared by the `cargo fuzz` targets in `fuzz/` and a
//! libFuzzer-less loop (`cargo test`, and `scripts/fuzz.sh` without
//! cargo-fuzz). Each feeds untrusted bytes to a decoder and checks it
//! neither panics nor claims bytes it was not given.

use bytes::BytesMut;

use crate::mqtt::codec::{self, Check, Proto};
use crate::wire::frame;

/// A backend's byte stream through the proxy frame decoder.
pub fn proxy_frames(data: &[u8]) {
    let mut rest = data;
    while let Ok(Some(n)) = frame::check(rest, 1 << 20) {
        assert!(4 + n <= rest.len());
        if n > 0 {
            let _ = frame::parse(&rest[4..4 + n]);
        }
        rest = &rest[4 + n..];
    }
    let _ = frame::parse(data);
}

/// A client's byte stream through the MQTT decoder, as either version.
pub fn mqtt_packets(data: &[u8]) {
    let _ = codec::connect_level(data);
    for proto in [Proto::V4, Proto::V5] {
        let mut buf = BytesMut::from(data);
        while let Ok(Check::Frame(len)) = codec::check(&buf, 1 << 16) {
            assert!((2..=buf.len()).contains(&len));
            let before = buf.len();
            let _ = codec::parse(proto, &mut buf, len);
            assert_eq!(
                buf.len(),
                before - len,
                "parse consumed other than one frame"
            );
        }
    }
}

/// Random and mutated inputs for `secs` seconds, or `iterations` rounds.
pub fn run_loop(target: fn(&[u8]), seeds: &[&[u8]], iterations: u64, secs: u64) {
    use rand::{Rng, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(0x5eed);
    let until = std::time::Instant::now() + std::time::Duration::from_secs(secs);
    for i in 0..iterations {
        if secs > 0 && i % 1024 == 0 && std::time::Instant::now() >= until {
            break;
        }
        let mut input = seeds[rng.random_range(0..seeds.len())].to_vec();
        for _ in 0..rng.random_range(0..8) {
            let at = rng.random_range(0..=input.len());
            match rng.random_range(0..4) {
                0 if at < input.len() => input[at] = rng.random(),
                1 => input.insert(at, rng.random()),
                2 if at < input.len() => {
                    input.remove(at);
                }
                _ => input.truncate(at),
            }
        }
        target(&input);
    }
}

/// Seeds: a few whole, legal inputs for each decoder.
pub fn proxy_seeds() -> Vec<Vec<u8>> {
    use rmpv::Value as Mp;
    let data = Mp::Map(vec![(Mp::from("alert"), Mp::from("hi"))]);
    vec![
        frame::encode(2, &Mp::from(42), &data),
        frame::encode(1, &Mp::from("g"), &Mp::Map(vec![])),
        frame::encode(3, &Mp::Array(vec![Mp::from(1), Mp::from("2")]), &data),
        vec![0, 0, 0, 0],
    ]
}

pub fn mqtt_seeds() -> Vec<Vec<u8>> {
    vec![
        // v3.1.1 CONNECT with user name and password, SUBSCRIBE, PUBLISH QoS 1, PINGREQ.
        b"\x10\x18\x00\x04MQTT\x04\xc2\x00\x3c\x00\x02id\x00\x02ab\x00\x04pass".to_vec(),
        b"\x82\x11\x00\x01\x00\x0cpush/user/42\x01".to_vec(),
        b"\x32\x0c\x00\x06push/x\x00\x07{}".to_vec(),
        b"\xc0\x00\xe0\x00".to_vec(),
        // v5 CONNECT with properties, SUBSCRIBE with properties.
        b"\x10\x13\x00\x04MQTT\x05\x02\x00\x3c\x05\x11\x00\x00\x00\x0a\x00\x01c".to_vec(),
        b"\x82\x0c\x00\x01\x00\x00\x06push/#\x01".to_vec(),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seeds(v: &[Vec<u8>]) -> Vec<&[u8]> {
        v.iter().map(Vec::as_slice).collect()
    }

    #[test]
    fn mqtt_seeds_are_legal_packets() {
        for (i, seed) in mqtt_seeds().iter().enumerate() {
            let proto = if i < 4 { Proto::V4 } else { Proto::V5 };
            let mut buf = BytesMut::from(&seed[..]);
            while !buf.is_empty() {
                let Ok(Check::Frame(len)) = codec::check(&buf, 1 << 16) else {
                    panic!("seed {i} is not whole frames");
                };
                codec::parse(proto, &mut buf, len).unwrap_or_else(|e| panic!("seed {i}: {e}"));
            }
        }
    }

    #[test]
    fn decoders_survive_mutated_inputs() {
        run_loop(proxy_frames, &seeds(&proxy_seeds()), 20_000, 0);
        run_loop(mqtt_packets, &seeds(&mqtt_seeds()), 20_000, 0);
    }

    /// `scripts/fuzz.sh` runs this for FUZZ_SECS when cargo-fuzz is missing.
    #[test]
    #[ignore]
    fn fuzz_loop() {
        let secs = std::env::var("FUZZ_SECS").ok().and_then(|s| s.parse().ok());
        let secs = secs.unwrap_or(60);
        run_loop(proxy_frames, &seeds(&proxy_seeds()), u64::MAX, secs);
        run_loop(mqtt_packets, &seeds(&mqtt_seeds()), u64::MAX, secs);
    }
}
