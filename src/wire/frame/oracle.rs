//! The decoder `parse_with_status` had before it read msgpack directly:
//! an rmpv value tree, then JSON. Kept for tests as the oracle the new one
//! must match byte for byte, error for error.

use std::io::ErrorKind;
use std::sync::Arc;

use rmpv::Value as Mp;
use serde_json::{Map, Number, Value};

use super::{within_values, FrameError, Status, MAX_DEPTH, MAX_VALUES};
use crate::push::{Id, Push, PushId, Target};

/// Parses a non-empty frame body into a push and the byte that accepts it.
pub fn parse_with_status(body: &[u8]) -> Result<(Push, Status), FrameError> {
    // Every value takes at least a byte: only a long body needs counting.
    if body.len() > MAX_VALUES && !within_values(body, MAX_VALUES) {
        return Err(FrameError::TooManyValues);
    }
    let mut rd = body;
    let value = rmpv::decode::read_value_with_max_depth(&mut rd, MAX_DEPTH).map_err(|e| {
        use rmpv::decode::Error::*;
        match e {
            InvalidMarkerRead(io) | InvalidDataRead(io)
                if io.kind() == ErrorKind::UnexpectedEof =>
            {
                FrameError::Truncated
            }
            other => FrameError::Malformed(other.to_string()),
        }
    })?;
    if !rd.is_empty() {
        return Err(FrameError::Trailing(rd.len()));
    }
    let Mp::Array(items) = value else {
        return Err(FrameError::NotTriple(kind(&value).into()));
    };
    let n = items.len();
    let mut items = items.into_iter();
    let (Some(kind_v), Some(id), Some(data), options, None) = (
        items.next(),
        items.next(),
        items.next(),
        items.next(),
        items.next(),
    ) else {
        return Err(FrameError::NotTriple(format!("an array of {n}")));
    };
    let push_type = kind_v
        .as_u64()
        .filter(|t| (1..=3).contains(t))
        .ok_or_else(|| FrameError::UnknownType(kind_v.to_string()))?;
    let target = match (push_type, id) {
        (1, id) => Target::Group(scalar_id(&id)?),
        (_, Mp::Array(ids)) => {
            if ids.is_empty() {
                return Err(FrameError::BadId("empty list of users".into()));
            }
            Target::Users(ids.iter().map(scalar_id).collect::<Result<_, _>>()?)
        }
        (_, id) => Target::User(scalar_id(&id)?),
    };
    let Mp::Map(entries) = data else {
        return Err(FrameError::DataNotMap(kind(&data).into()));
    };
    let mut push = Push::new(target, Arc::new(to_json_map(entries)));
    let status = match options {
        None => Status::Accepted,
        Some(options) => {
            apply_options(&mut push, options)?;
            Status::AcceptedWithOptions
        }
    };
    Ok((push, status))
}

/// Reads the options map: `id` (a string, [`PushId::RULE`]), `receipt`
/// (a boolean) and `ttl` (seconds, 1 ..= [`Push::MAX_TTL`]). An unknown key
/// is an error, so a misspelt option is not silently ignored.
fn apply_options(push: &mut Push, options: Mp) -> Result<(), FrameError> {
    let bad = |m: String| FrameError::BadOptions(m);
    let Mp::Map(entries) = options else {
        return Err(bad(format!(
            "options must be a map, got {}",
            kind(&options)
        )));
    };
    for (k, v) in entries {
        match (k.as_str(), v) {
            (Some("id"), Mp::String(s)) => {
                push.id = s
                    .as_str()
                    .and_then(PushId::given)
                    .ok_or_else(|| bad(format!("id: {}", PushId::RULE)))?;
            }
            (Some("receipt"), Mp::Boolean(b)) => push.receipt = b,
            (Some("ttl"), Mp::Integer(n)) => {
                push.ttl = n.as_u64().and_then(Push::ttl_from);
                if push.ttl.is_none() {
                    return Err(bad(format!("ttl {n}: seconds from 1 to {}", Push::MAX_TTL)));
                }
            }
            (Some(key @ ("id" | "receipt" | "ttl")), v) => {
                let want = match key {
                    "id" => "a string",
                    "receipt" => "a boolean",
                    _ => "an integer",
                };
                return Err(bad(format!("{key} must be {want}, got {}", kind(&v))));
            }
            (_, _) => return Err(bad(format!("unknown option {k} (id, receipt, ttl)"))),
        }
    }
    Ok(())
}

fn scalar_id(v: &Mp) -> Result<Id, FrameError> {
    match v {
        Mp::Integer(n) => Ok(Id(Arc::from(n.to_string()))),
        Mp::String(s) => match s.as_str() {
            Some(s) => Id::parse(s).ok_or_else(|| FrameError::BadId(format!("{v}: {}", Id::RULE))),
            None => Err(FrameError::BadId("string is not UTF-8".into())),
        },
        other => Err(FrameError::BadId(format!(
            "{} is not a user or group id",
            kind(other)
        ))),
    }
}

fn kind(v: &Mp) -> &'static str {
    match v {
        Mp::Nil => "nil",
        Mp::Boolean(_) => "a boolean",
        Mp::Integer(_) => "an integer",
        Mp::F32(_) | Mp::F64(_) => "a float",
        Mp::String(_) => "a string",
        Mp::Binary(_) => "binary",
        Mp::Array(_) => "an array",
        Mp::Map(_) => "a map",
        Mp::Ext(..) => "an extension value",
    }
}

fn to_json_map(entries: Vec<(Mp, Mp)>) -> Map<String, Value> {
    entries
        .into_iter()
        .map(|(k, v)| (key_text(k), to_json(v)))
        .collect()
}

fn key_text(k: Mp) -> String {
    match k {
        Mp::String(s) => String::from_utf8_lossy(&s.into_bytes()).into_owned(),
        Mp::Binary(b) => String::from_utf8_lossy(&b).into_owned(),
        other => other.to_string(),
    }
}

/// msgpack → JSON as the old service's json.dumps did: binary as text,
/// non-finite floats as null.
fn to_json(v: Mp) -> Value {
    match v {
        Mp::Nil | Mp::Ext(..) => Value::Null,
        Mp::Boolean(b) => Value::Bool(b),
        Mp::Integer(n) => n
            .as_i64()
            .map(Value::from)
            .or_else(|| n.as_u64().map(Value::from))
            .unwrap_or(Value::Null),
        Mp::F32(f) => Number::from_f64(f as f64).map_or(Value::Null, Value::Number),
        Mp::F64(f) => Number::from_f64(f).map_or(Value::Null, Value::Number),
        Mp::String(s) => Value::String(String::from_utf8_lossy(&s.into_bytes()).into_owned()),
        Mp::Binary(b) => Value::String(String::from_utf8_lossy(&b).into_owned()),
        Mp::Array(a) => Value::Array(a.into_iter().map(to_json).collect()),
        Mp::Map(m) => Value::Object(to_json_map(m)),
    }
}

/// The new decoder against this one over generated frames: whole, cut
/// short, corrupted, too deep at every level around the limit, too many
/// values, every marker in every length form.
#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use rand::rngs::StdRng;
    use rand::{Rng, SeedableRng};

    use super::*;

    /// Writes a random value, its markers in any length form (not only the
    /// shortest, as encoders write them).
    fn value(rng: &mut StdRng, out: &mut Vec<u8>, nest: u32) {
        match rng.random_range(0..12) {
            0 => out.push([0xc0, 0xc1, 0xc2, 0xc3][rng.random_range(0..4)]),
            1..=3 => int(rng, out),
            4 => float(rng, out),
            5 | 6 => any_string(rng, out),
            7 => {
                let b = text(rng);
                bytes(rng, out, [0xc4, 0xc5, 0xc6], &b)
            }
            8 => ext(rng, out),
            9 if nest > 0 => {
                let n = rng.random_range(0..4);
                header(rng, out, 0x90, [0xdc, 0xdd], n);
                (0..n).for_each(|_| value(rng, out, nest - 1));
            }
            10 | 11 if nest > 0 => {
                let n = rng.random_range(0..4);
                header(rng, out, 0x80, [0xde, 0xdf], n);
                for _ in 0..n {
                    value(rng, out, nest - 1);
                    value(rng, out, nest - 1);
                }
            }
            _ => out.push(rng.random_range(0..=0x7f)),
        }
    }

    fn int(rng: &mut StdRng, out: &mut Vec<u8>) {
        let n = match rng.random_range(0..6) {
            0 => rng.random_range(-40..140),
            1 => rng.random_range(1..=3),
            2 => rng.random::<u64>().into(),
            3 => rng.random::<i64>().into(),
            4 => [0, 1, 3600, 2_592_000, 2_592_001, -1].map(i128::from)[rng.random_range(0..6)],
            _ => rng.random::<i32>().into(),
        };
        int_as(rng, out, n)
    }

    fn int_as(rng: &mut StdRng, out: &mut Vec<u8>, n: i128) {
        // Every form the value fits, the fixints included.
        let mut forms: Vec<(u8, usize)> = vec![];
        if (0..=0x7f).contains(&n) || (-32..0).contains(&n) {
            forms.push((n as u8, 0));
        }
        for (i, w) in [1usize, 2, 4, 8].into_iter().enumerate() {
            let bits = 8 * w as u32;
            if n >= 0 && n < (1i128 << bits) {
                forms.push((0xcc + i as u8, w));
            }
            if n >= -(1i128 << (bits - 1)) && n < (1i128 << (bits - 1)) {
                forms.push((0xd0 + i as u8, w));
            }
        }
        let (m, w) = forms[rng.random_range(0..forms.len())];
        out.push(m);
        out.extend_from_slice(&n.to_be_bytes()[16 - w..]);
    }

    fn float(rng: &mut StdRng, out: &mut Vec<u8>) {
        let f = [
            f64::NAN,
            f64::INFINITY,
            -0.0,
            1.5,
            1e300,
            rng.random::<f64>() * 1e6,
        ][rng.random_range(0..6)];
        if rng.random() {
            out.push(0xca);
            out.extend_from_slice(&(f as f32).to_be_bytes());
        } else {
            out.push(0xcb);
            out.extend_from_slice(&f.to_be_bytes());
        }
    }

    fn text(rng: &mut StdRng) -> Vec<u8> {
        const WORDS: [&[u8]; 12] = [
            b"alert",
            b"id",
            b"receipt",
            b"ttl",
            b"42",
            b"a/b",
            b"#",
            b"",
            b"order-1",
            b"\xff\xfe",
            b"caf\xc3\xa9",
            b"x y",
        ];
        match rng.random_range(0..10) {
            0 => vec![b'u'; rng.random_range(60..300)],
            1 => (0..rng.random_range(0..8)).map(|_| rng.random()).collect(),
            _ => WORDS[rng.random_range(0..WORDS.len())].to_vec(),
        }
    }

    fn any_string(rng: &mut StdRng, out: &mut Vec<u8>) {
        let s = text(rng);
        string(rng, out, &s)
    }

    fn string(rng: &mut StdRng, out: &mut Vec<u8>, s: &[u8]) {
        if s.len() < 32 && rng.random() {
            out.push(0xa0 | s.len() as u8);
            out.extend_from_slice(s);
        } else {
            bytes(rng, out, [0xd9, 0xda, 0xdb], s)
        }
    }

    /// A string or binary with a 1-, 2- or 4-byte length.
    fn bytes(rng: &mut StdRng, out: &mut Vec<u8>, markers: [u8; 3], b: &[u8]) {
        let i = rng.random_range(usize::from(b.len() > 255)..3);
        out.push(markers[i]);
        out.extend_from_slice(&(b.len() as u32).to_be_bytes()[4 - (1 << i)..]);
        out.extend_from_slice(b);
    }

    fn ext(rng: &mut StdRng, out: &mut Vec<u8>) {
        let i = rng.random_range(0..8);
        let n = match i {
            0..5 => {
                out.push(0xd4 + i as u8);
                1 << i
            }
            _ => {
                let n = rng.random_range(0..20);
                out.push(0xc7 + (i - 5) as u8);
                out.extend_from_slice(&(n as u32).to_be_bytes()[4 - (1 << (i - 5))..]);
                n
            }
        };
        out.push(rng.random());
        out.extend((0..n).map(|_| rng.random::<u8>()));
    }

    /// An array's or map's head: the fix form when `n` fits, or 16, 32 bits.
    fn header(rng: &mut StdRng, out: &mut Vec<u8>, fix: u8, long: [u8; 2], n: usize) {
        match rng.random_range(0..4) {
            0 => {
                out.push(long[0]);
                out.extend_from_slice(&(n as u16).to_be_bytes());
            }
            1 => {
                out.push(long[1]);
                out.extend_from_slice(&(n as u32).to_be_bytes());
            }
            _ => out.push(fix | n as u8),
        }
    }

    /// `[type, id, data]` or with options, each part usually what a
    /// backend sends and sometimes anything.
    fn frame(rng: &mut StdRng) -> Vec<u8> {
        let mut out = vec![];
        let n = [3, 3, 3, 4, 4, 4, 2, 5, 0][rng.random_range(0..9)];
        header(rng, &mut out, 0x90, [0xdc, 0xdd], n);
        let odd = |rng: &mut StdRng| rng.random_range(0..12) == 0;
        for item in 0..n {
            match item {
                _ if odd(rng) => value(rng, &mut out, 2),
                0 => {
                    let t = [1, 2, 3, 2, 3, 0, 4][rng.random_range(0..7)];
                    int_as(rng, &mut out, t)
                }
                1 if rng.random() => {
                    let ids = rng.random_range(0..4);
                    header(rng, &mut out, 0x90, [0xdc, 0xdd], ids);
                    (0..ids).for_each(|_| id(rng, &mut out));
                }
                1 => id(rng, &mut out),
                2 => {
                    let n = rng.random_range(0..6);
                    header(rng, &mut out, 0x80, [0xde, 0xdf], n);
                    for _ in 0..n {
                        match rng.random_range(0..4) {
                            0 => value(rng, &mut out, 1),
                            _ => any_string(rng, &mut out),
                        }
                        match rng.random_range(0..8) {
                            0 => deep(rng, &mut out),
                            _ => value(rng, &mut out, 3),
                        }
                    }
                }
                3 => {
                    let n = rng.random_range(0..4);
                    header(rng, &mut out, 0x80, [0xde, 0xdf], n);
                    for _ in 0..n {
                        let key =
                            [&b"id"[..], b"receipt", b"ttl", b"reciept"][rng.random_range(0..4)];
                        string(rng, &mut out, key);
                        match (key, rng.random_range(0..3)) {
                            (_, 0) => value(rng, &mut out, 1),
                            (b"receipt", _) => out.push(0xc2 + rng.random::<bool>() as u8),
                            (b"ttl", _) => int(rng, &mut out),
                            _ => any_string(rng, &mut out),
                        }
                    }
                }
                _ => value(rng, &mut out, 2),
            }
        }
        out
    }

    fn id(rng: &mut StdRng, out: &mut Vec<u8>) {
        match rng.random_range(0..3) {
            0 => int(rng, out),
            _ => any_string(rng, out),
        }
    }

    /// Containers nested around the depth limit, something at the bottom.
    fn deep(rng: &mut StdRng, out: &mut Vec<u8>) {
        for _ in 0..rng.random_range(27..33) {
            match rng.random() {
                true => out.push(0x91),
                false => out.extend_from_slice(&[0x81, 0xa1, b'k']),
            }
        }
        value(rng, out, 1);
    }

    fn corrupt(rng: &mut StdRng, b: &mut Vec<u8>) {
        for _ in 0..rng.random_range(1..3) {
            let at = rng.random_range(0..=b.len());
            match rng.random_range(0..5) {
                0 if at < b.len() => b[at] = rng.random(),
                1 => b.insert(at, rng.random()),
                2 if at < b.len() => {
                    b.remove(at);
                }
                3 => b.push(rng.random()),
                _ => b.truncate(at),
            }
        }
    }

    /// The result, with a generated push id made comparable and the data's
    /// JSON text beside it (map equality ignores key order; the text does not).
    type Outcome = Result<(Push, Status, String), FrameError>;

    fn outcome(r: Result<(Push, Status), FrameError>) -> Outcome {
        r.map(|(mut p, s)| {
            if matches!(p.id, PushId::Generated(_)) {
                p.id = PushId::Given("generated".into());
            }
            let json = serde_json::to_string(&*p.data).unwrap();
            (p, s, json)
        })
    }

    fn same(body: &[u8], seen: &mut BTreeMap<String, usize>) {
        let new = outcome(super::super::parse_with_status(body));
        let old = outcome(parse_with_status(body));
        assert_eq!(new, old, "body {body:02x?}");
        let key = match &new {
            Ok((_, s, _)) => format!("{s:?}"),
            Err(FrameError::Malformed(m)) => format!("Malformed({m})"),
            Err(FrameError::Trailing(_)) => "Malformed(trailing)".into(),
            Err(e) => format!("{:?}", e.status()),
        };
        *seen.entry(key).or_default() += 1;
    }

    #[test]
    fn the_direct_decoder_matches_the_value_tree_one() {
        let mut rng = StdRng::seed_from_u64(16);
        let mut seen = BTreeMap::new();
        for i in 0..40_000 {
            let mut body = match i % 10 {
                0 => {
                    let mut b = vec![];
                    value(&mut rng, &mut b, 3);
                    b
                }
                _ => frame(&mut rng),
            };
            if rng.random_range(0..4) == 0 {
                corrupt(&mut rng, &mut body);
            }
            if !body.is_empty() {
                same(&body, &mut seen);
            }
        }
        // Too many values, alone or with another fault before or after the limit.
        for (n, cut) in [
            (70_000, None),
            (70_000, Some(100)),
            (65_530, None),
            (65_531, Some(0)),
        ] {
            let mut b = vec![0x93, 0x02, 0x01, 0x81, 0xa1, b'k', 0xdd];
            b.extend_from_slice(&(n as u32).to_be_bytes());
            b.extend(std::iter::repeat_n(0xc0, n));
            match cut {
                Some(at) => b.truncate(b.len() - at),
                None => b.push(0x01),
            }
            same(&b, &mut seen);
        }
        let want = [
            "Accepted",
            "AcceptedWithOptions",
            "BadId",
            "BadOptions",
            "DataNotMap",
            "Malformed(depth limit exceeded)",
            "Malformed(trailing)",
            "NotTriple",
            "TooManyValues",
            "Truncated",
            "UnknownType",
        ];
        for w in want {
            assert!(
                seen.get(w).is_some_and(|&n| n >= 3),
                "{w} too rare: {seen:?}"
            );
        }
    }
}
