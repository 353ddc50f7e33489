//! The proxy wire format: a 4-byte big-endian length `N`, then `N` bytes of
//! msgpack `[type, id, data]`, or `[type, id, data, options]` (push id,
//! receipt, TTL). `check` says whether a whole, legal frame is buffered;
//! `parse` turns its body into a [`Push`].

mod read;

#[cfg(test)]
mod oracle;

use std::sync::Arc;

use rmpv::Value as Mp;

use crate::push::{Id, Push, PushId, Target};
use read::{Head, Reader};

/// Deepest nesting accepted in a frame; apps' data is shallow, and this keeps
/// recursion (here and in JSON encoding) far from the stack's end.
const MAX_DEPTH: usize = 64;

/// Most msgpack values one frame may hold. A 1 MiB frame of nils would
/// otherwise decode to ~72 MiB (72 bytes of JSON value per byte) in one go,
/// holding up every push behind it; apps' data is far smaller.
pub const MAX_VALUES: usize = 65_536;

/// The reply byte after each frame. `0x00` accepts a 3-item frame; every
/// error has its own byte so old clients (which never look) and new ones
/// both work. A 4-item frame (options) is accepted with `0x0b`, which
/// neither the old service (`0x00` for anything) nor a pushbridge without
/// options (`0x03`) answers: a client learns whether they were honoured.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Status {
    Accepted = 0x00,
    Malformed = 0x01,
    Truncated = 0x02,
    NotTriple = 0x03,
    UnknownType = 0x04,
    BadId = 0x05,
    DataNotMap = 0x06,
    TooLarge = 0x07,
    ShuttingDown = 0x08,
    Unavailable = 0x09,
    TooManyValues = 0x0a,
    AcceptedWithOptions = 0x0b,
    BadOptions = 0x0c,
}

impl Status {
    pub fn from_byte(b: u8) -> Option<Status> {
        use Status::*;
        [
            Accepted,
            Malformed,
            Truncated,
            NotTriple,
            UnknownType,
            BadId,
            DataNotMap,
            TooLarge,
            ShuttingDown,
            Unavailable,
            TooManyValues,
            AcceptedWithOptions,
            BadOptions,
        ]
        .into_iter()
        .find(|s| *s as u8 == b)
    }

    /// What the byte means, for people (`pushbridge send`, logs, README).
    pub fn meaning(self) -> &'static str {
        match self {
            Status::Accepted => "accepted: queued for delivery",
            Status::Malformed => "body is not valid msgpack (or has bytes after the value)",
            Status::Truncated => "msgpack value ends past the end of the frame",
            Status::NotTriple => {
                "body is not an array of 3 items [type, id, data] or 4 [type, id, data, options]"
            }
            Status::UnknownType => "type is not 1 (group), 2 or 3 (user/users)",
            Status::BadId => "id is not an integer, a non-empty string, or an array of those",
            Status::DataNotMap => "data is not a map",
            Status::TooLarge => "frame length over proxy.max_frame; connection closed",
            Status::ShuttingDown => "server is shutting down; push not accepted",
            Status::Unavailable => {
                "durable intake: the stream (Redis) stayed unreachable; push not accepted, send again"
            }
            Status::TooManyValues => "frame holds more than 65,536 msgpack values",
            Status::AcceptedWithOptions => {
                "accepted with its options (id, receipt, ttl): queued for delivery"
            }
            Status::BadOptions => {
                "options are not a map of id (string), receipt (boolean), ttl (seconds)"
            }
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    #[error("frame of {len} bytes is over the limit of {max}")]
    TooLarge { len: u32, max: u32 },
    #[error("body is not msgpack: {0}")]
    Malformed(String),
    #[error("msgpack value is cut short by the frame's end")]
    Truncated,
    #[error("{0} trailing bytes after the msgpack value")]
    Trailing(usize),
    #[error("expected [type, id, data] or [type, id, data, options], got {0}")]
    NotTriple(String),
    #[error("unknown push type {0}")]
    UnknownType(String),
    #[error("bad id: {0}")]
    BadId(String),
    #[error("data must be a map, got {0}")]
    DataNotMap(String),
    #[error("frame holds more than {MAX_VALUES} msgpack values")]
    TooManyValues,
    #[error("bad options: {0}")]
    BadOptions(String),
}

impl FrameError {
    pub fn status(&self) -> Status {
        match self {
            FrameError::TooLarge { .. } => Status::TooLarge,
            FrameError::Malformed(_) | FrameError::Trailing(_) => Status::Malformed,
            FrameError::Truncated => Status::Truncated,
            FrameError::NotTriple(_) => Status::NotTriple,
            FrameError::UnknownType(_) => Status::UnknownType,
            FrameError::BadId(_) => Status::BadId,
            FrameError::DataNotMap(_) => Status::DataNotMap,
            FrameError::TooManyValues => Status::TooManyValues,
            FrameError::BadOptions(_) => Status::BadOptions,
        }
    }

    /// After these the stream position is unknown or the peer is hostile:
    /// reply, then close.
    pub fn is_fatal(&self) -> bool {
        matches!(self, FrameError::TooLarge { .. })
    }
}

/// Length of the frame body if `buf` starts with a whole frame
/// (`Ok(Some(n))`: `4 + n` bytes are there), `Ok(None)` if more bytes are
/// needed. The length is checked against `max` before any body is buffered.
pub fn check(buf: &[u8], max: u32) -> Result<Option<usize>, FrameError> {
    let Some(head) = buf.get(..4) else {
        return Ok(None);
    };
    let len = u32::from_be_bytes(head.try_into().expect("4 bytes"));
    if len > max {
        return Err(FrameError::TooLarge { len, max });
    }
    let len = len as usize;
    Ok((buf.len() >= 4 + len).then_some(len))
}

/// Parses a non-empty frame body into a push.
pub fn parse(body: &[u8]) -> Result<Push, FrameError> {
    parse_with_status(body).map(|(push, _)| push)
}

/// Parses a non-empty frame body into a push and the byte that accepts it.
pub fn parse_with_status(body: &[u8]) -> Result<(Push, Status), FrameError> {
    // Every value takes at least a byte: only a long body needs counting.
    if body.len() > MAX_VALUES && !within_values(body, MAX_VALUES) {
        return Err(FrameError::TooManyValues);
    }
    // A body cut short, too deep or with bytes after its value says so even
    // where its type or id is also wrong, as when it was decoded whole first.
    decode(body).map_err(|e| read::check(body).err().unwrap_or(e))
}

/// The push in `body`, in one pass: a fault is reported where it is met.
fn decode(body: &[u8]) -> Result<(Push, Status), FrameError> {
    let mut rd = Reader::new(body);
    let item = read::TOP - 2;
    let n = match rd.head(read::TOP)? {
        Head::Array(n @ 3..=4) => n,
        Head::Array(n) => return Err(FrameError::NotTriple(format!("an array of {n}"))),
        other => return Err(FrameError::NotTriple(other.kind().into())),
    };
    let at = rd;
    let push_type = match rd.head(item)? {
        Head::Int(t @ 1..=3) => t,
        _ => {
            rd = at;
            return Err(FrameError::UnknownType(rd.value(item)?.to_string()));
        }
    };
    let target = match (push_type, rd.head(item)?) {
        (1, id) => Target::Group(scalar_id(id)?),
        (_, Head::Array(0)) => return Err(FrameError::BadId("empty list of users".into())),
        (_, Head::Array(n)) => Target::Users(
            (0..n)
                .map(|_| scalar_id(rd.head(item - 2)?))
                .collect::<Result<_, _>>()?,
        ),
        (_, id) => Target::User(scalar_id(id)?),
    };
    let data = match rd.head(item)? {
        Head::Map(n) => rd.json_map(n, item - 2)?,
        other => return Err(FrameError::DataNotMap(other.kind().into())),
    };
    let mut push = Push::new(target, Arc::new(data));
    let status = match n {
        3 => Status::Accepted,
        _ => {
            apply_options(&mut push, &mut rd, item)?;
            Status::AcceptedWithOptions
        }
    };
    rd.end()?;
    Ok((push, status))
}

/// Reads the options map: `id` (a string, [`PushId::RULE`]), `receipt`
/// (a boolean) and `ttl` (seconds, 1 ..= [`Push::MAX_TTL`]). An unknown key
/// is an error, so a misspelt option is not silently ignored.
fn apply_options(push: &mut Push, rd: &mut Reader, depth: u16) -> Result<(), FrameError> {
    let bad = |m: String| FrameError::BadOptions(m);
    let n = match rd.head(depth)? {
        Head::Map(n) => n,
        other => return Err(bad(format!("options must be a map, got {}", other.kind()))),
    };
    let depth = depth - 2;
    for _ in 0..n {
        let at = *rd;
        let key = match rd.head(depth)? {
            Head::Str(b) => std::str::from_utf8(b).ok(),
            _ => None,
        };
        let Some(key @ ("id" | "receipt" | "ttl")) = key else {
            *rd = at;
            let k = rd.value(depth)?;
            return Err(bad(format!("unknown option {k} (id, receipt, ttl)")));
        };
        match (key, rd.head(depth)?) {
            ("id", Head::Str(s)) => {
                push.id = std::str::from_utf8(s)
                    .ok()
                    .and_then(PushId::given)
                    .ok_or_else(|| bad(format!("id: {}", PushId::RULE)))?;
            }
            ("receipt", Head::Bool(b)) => push.receipt = b,
            ("ttl", Head::Int(n)) => {
                push.ttl = u64::try_from(n).ok().and_then(Push::ttl_from);
                if push.ttl.is_none() {
                    return Err(bad(format!("ttl {n}: seconds from 1 to {}", Push::MAX_TTL)));
                }
            }
            (key, v) => {
                let want = match key {
                    "id" => "a string",
                    "receipt" => "a boolean",
                    _ => "an integer",
                };
                return Err(bad(format!("{key} must be {want}, got {}", v.kind())));
            }
        }
    }
    Ok(())
}

/// The options map that carries a push's id, receipt and TTL.
pub fn options(push: &Push) -> Mp {
    let mut entries = vec![(Mp::from("id"), Mp::from(push.id.to_string()))];
    if push.receipt {
        entries.push((Mp::from("receipt"), Mp::from(true)));
    }
    if let Some(ttl) = push.ttl {
        entries.push((Mp::from("ttl"), Mp::from(ttl)));
    }
    Mp::Map(entries)
}

/// Whether `body` holds at most `limit` msgpack values, counted from the
/// markers without decoding anything. A body cut short or malformed counts
/// as within: the decoder says what is wrong with it.
fn within_values(mut body: &[u8], limit: usize) -> bool {
    let mut take = |n: usize| match body.get(n..) {
        Some(rest) => {
            let head = &body[..n];
            body = rest;
            Some(head)
        }
        None => None,
    };
    let be = |b: &[u8]| b.iter().fold(0usize, |n, &x| (n << 8) | x as usize);
    let (mut pending, mut seen) = (1usize, 0usize);
    while pending > 0 {
        pending -= 1;
        seen += 1;
        if seen > limit {
            return false;
        }
        let Some(&[m]) = take(1) else { return true };
        // (bytes of length or count that follow, payload bytes, items that follow)
        let (len_bytes, fixed, items_per) = match m {
            0x80..=0x8f => {
                pending = pending.saturating_add(2 * (m & 0x0f) as usize);
                continue;
            }
            0x90..=0x9f => {
                pending = pending.saturating_add((m & 0x0f) as usize);
                continue;
            }
            0xa0..=0xbf => (0, (m & 0x1f) as usize, 0),
            0xc4 | 0xd9 => (1, 0, 0),
            0xc5 | 0xda => (2, 0, 0),
            0xc6 | 0xdb => (4, 0, 0),
            0xc7 => (1, 1, 0),
            0xc8 => (2, 1, 0),
            0xc9 => (4, 1, 0),
            0xca | 0xce | 0xd2 => (0, 4, 0),
            0xcb | 0xcf | 0xd3 => (0, 8, 0),
            0xcc | 0xd0 => (0, 1, 0),
            0xcd | 0xd1 => (0, 2, 0),
            0xd4..=0xd8 => (0, 1 + (1 << (m - 0xd4)), 0),
            0xdc => (2, 0, 1),
            0xdd => (4, 0, 1),
            0xde => (2, 0, 2),
            0xdf => (4, 0, 2),
            // fixints, nil, booleans, and 0xc1 (never used)
            _ => (0, 0, 0),
        };
        let Some(len) = take(len_bytes).map(be) else {
            return true;
        };
        match items_per {
            0 => {
                if take(fixed.saturating_add(len)).is_none() {
                    return true;
                }
            }
            per => pending = pending.saturating_add(len.saturating_mul(per)),
        }
    }
    true
}

fn scalar_id(v: Head) -> Result<Id, FrameError> {
    match v {
        Head::Int(n) => Ok(Id(Arc::from(n.to_string()))),
        Head::Str(b) => match std::str::from_utf8(b) {
            Ok(s) => Id::parse(s).ok_or_else(|| FrameError::BadId(format!("{s:?}: {}", Id::RULE))),
            Err(_) => Err(FrameError::BadId("string is not UTF-8".into())),
        },
        other => Err(FrameError::BadId(format!(
            "{} is not a user or group id",
            other.kind()
        ))),
    }
}

/// Encodes a request frame (length prefix included): the proxy client's half.
pub fn encode(push_type: u8, id: &Mp, data: &Mp) -> Vec<u8> {
    encode_with(push_type, id, data, None)
}

/// `encode`, with an options map as the 4th item when given.
pub fn encode_with(push_type: u8, id: &Mp, data: &Mp, options: Option<&Mp>) -> Vec<u8> {
    let mut items = vec![Mp::from(push_type), id.clone(), data.clone()];
    items.extend(options.cloned());
    let value = Mp::Array(items);
    let mut out = vec![0; 4];
    rmpv::encode::write_value(&mut out, &value).expect("writing to a Vec cannot fail");
    let len = (out.len() - 4) as u32;
    out[..4].copy_from_slice(&len.to_be_bytes());
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::{json, Value};

    fn body(v: Mp) -> Vec<u8> {
        let mut out = Vec::new();
        rmpv::encode::write_value(&mut out, &v).unwrap();
        out
    }

    fn triple(t: i64, id: Mp, data: Mp) -> Vec<u8> {
        body(Mp::Array(vec![Mp::from(t), id, data]))
    }

    fn count(v: &Mp) -> usize {
        1 + match v {
            Mp::Array(items) => items.iter().map(count).sum(),
            Mp::Map(entries) => entries.iter().map(|(k, v)| count(k) + count(v)).sum(),
            _ => 0,
        }
    }

    /// Every marker kind, each length form: the count from the markers is
    /// the decoded value's, to the one.
    #[test]
    fn values_are_counted_from_the_markers() {
        let long = |n: usize| "x".repeat(n);
        let mut items = vec![
            Mp::Nil,
            Mp::from(true),
            Mp::from(5),
            Mp::from(-5),
            Mp::from(200),
            Mp::from(-200),
            Mp::from(70_000),
            Mp::from(-70_000),
            Mp::from(5_000_000_000u64),
            Mp::from(-5_000_000_000i64),
            Mp::F32(1.5),
            Mp::F64(2.5),
            Mp::from(long(3)),
            Mp::from(long(40)),
            Mp::from(long(300)),
            Mp::from(long(70_000)),
            Mp::Binary(vec![1; 3]),
            Mp::Binary(vec![1; 300]),
            Mp::Binary(vec![1; 70_000]),
        ];
        for n in [1, 2, 4, 8, 16, 3, 300, 70_000] {
            items.push(Mp::Ext(7, vec![0; n]));
        }
        items.push(Mp::Array(vec![Mp::Nil; 20]));
        items.push(Mp::Array(vec![Mp::Nil; 70_000]));
        items.push(Mp::Map(vec![(
            Mp::from("a"),
            Mp::Map(vec![(Mp::from(1), Mp::Nil); 20]),
        )]));
        let map32: Vec<(Mp, Mp)> = (0..70_000).map(|i| (Mp::from(i), Mp::Nil)).collect();
        items.push(Mp::Map(map32));
        let v = Mp::Array(items);
        let (b, n) = (body(v.clone()), count(&v));
        assert!(within_values(&b, n), "{n} values");
        assert!(!within_values(&b, n - 1), "{n} values, limit {}", n - 1);
    }

    #[test]
    fn too_many_values_are_refused_before_decoding() {
        let nils = |n| Mp::Map(vec![(Mp::from("k"), Mp::Array(vec![Mp::Nil; n]))]);
        // [type, id, {k: [...]}]: 6 values besides the nils.
        let at = triple(2, Mp::from(1), nils(MAX_VALUES - 6));
        assert!(parse(&at).is_ok());
        let over = triple(2, Mp::from(1), nils(MAX_VALUES - 5));
        assert_eq!(parse(&over), Err(FrameError::TooManyValues));
        assert_eq!(FrameError::TooManyValues.status() as u8, 0x0a);
        // Cut short: the decoder's error, not a count.
        assert_eq!(parse(&at[..at.len() / 2]), Err(FrameError::Truncated));
    }

    fn data() -> Mp {
        Mp::Map(vec![(Mp::from("alert"), Mp::from("hi"))])
    }

    #[test]
    fn check_waits_for_whole_frame() {
        assert_eq!(check(&[], 10), Ok(None));
        assert_eq!(check(&[0, 0, 0], 10), Ok(None));
        assert_eq!(check(&[0, 0, 0, 0], 10), Ok(Some(0)));
        assert_eq!(check(&[0, 0, 0, 2, 1], 10), Ok(None));
        assert_eq!(check(&[0, 0, 0, 2, 1, 2, 3], 10), Ok(Some(2)));
    }

    #[test]
    fn check_refuses_length_over_max_before_body() {
        let err = check(&[0, 0, 1, 0], 255).unwrap_err();
        assert_eq!(err, FrameError::TooLarge { len: 256, max: 255 });
        assert_eq!(err.status(), Status::TooLarge);
        assert!(err.is_fatal());
        assert_eq!(
            check(&[0xff, 0xff, 0xff, 0xff], u32::MAX - 1)
                .unwrap_err()
                .status(),
            Status::TooLarge
        );
    }

    #[test]
    fn every_type_and_id_shape() {
        let p = parse(&triple(1, Mp::from(7), data())).unwrap();
        assert_eq!(p.target, Target::Group("7".into()));
        let p = parse(&triple(1, Mp::from("g7"), data())).unwrap();
        assert_eq!(p.target, Target::Group("g7".into()));
        for t in [2, 3] {
            let p = parse(&triple(t, Mp::from(42), data())).unwrap();
            assert_eq!(p.target, Target::User("42".into()));
            let p = parse(&triple(t, Mp::from("42"), data())).unwrap();
            assert_eq!(p.target, Target::User("42".into()));
            let ids = Mp::Array(vec![Mp::from(1), Mp::from("2"), Mp::from(3u64)]);
            let p = parse(&triple(t, ids, data())).unwrap();
            assert_eq!(
                p.target,
                Target::Users(["1", "2", "3"].map(Id::from).to_vec())
            );
        }
    }

    #[test]
    fn data_becomes_json() {
        let d = Mp::Map(vec![
            (Mp::from("alert"), Mp::from("hi")),
            (Mp::from("n"), Mp::from(-3)),
            (Mp::from("f"), Mp::F64(1.5)),
            (Mp::from("nan"), Mp::F64(f64::NAN)),
            (Mp::from("b"), Mp::Binary(b"raw".to_vec())),
            (Mp::from(5), Mp::Array(vec![Mp::Nil, Mp::from(true)])),
        ]);
        let p = parse(&triple(2, Mp::from(1), d)).unwrap();
        assert_eq!(
            Value::Object((*p.data).clone()),
            json!({"alert":"hi","n":-3,"f":1.5,"nan":null,"b":"raw","5":[null,true]})
        );
        assert!(p.is_alert());
    }

    #[test]
    fn each_error_has_its_status() {
        let cases: Vec<(Vec<u8>, Status)> = vec![
            (b"hello world".to_vec(), Status::Malformed),
            (vec![0xc1], Status::NotTriple),
            (vec![0x93, 0x02, 0x01], Status::Truncated),
            (
                {
                    let mut b = triple(2, Mp::from(1), data());
                    b.push(0);
                    b
                },
                Status::Malformed,
            ),
            (body(Mp::from(5)), Status::NotTriple),
            (
                body(Mp::Array(vec![Mp::from(2), Mp::from(1)])),
                Status::NotTriple,
            ),
            (triple(4, Mp::from(1), data()), Status::UnknownType),
            (triple(0, Mp::from(1), data()), Status::UnknownType),
            (
                body(Mp::Array(vec![Mp::from("2"), Mp::from(1), data()])),
                Status::UnknownType,
            ),
            (triple(2, Mp::Nil, data()), Status::BadId),
            (triple(2, Mp::F64(1.0), data()), Status::BadId),
            (triple(2, Mp::from(""), data()), Status::BadId),
            (triple(2, Mp::from("a/b"), data()), Status::BadId),
            (triple(2, Mp::from("#"), data()), Status::BadId),
            (triple(2, Mp::Array(vec![]), data()), Status::BadId),
            (
                triple(3, Mp::Array(vec![Mp::Array(vec![])]), data()),
                Status::BadId,
            ),
            (
                triple(1, Mp::Array(vec![Mp::from(1)]), data()),
                Status::BadId,
            ),
            (triple(2, Mp::from(1), Mp::from("text")), Status::DataNotMap),
            (
                triple(2, Mp::from(1), Mp::Array(vec![])),
                Status::DataNotMap,
            ),
        ];
        for (bytes, want) in cases {
            let got = parse(&bytes).map(|_| ()).unwrap_err();
            assert_eq!(got.status(), want, "{bytes:02x?}: {got}");
        }
    }

    fn with_options(options: Mp) -> Vec<u8> {
        body(Mp::Array(vec![Mp::from(2), Mp::from(1), data(), options]))
    }

    #[test]
    fn options_are_the_fourth_item() {
        let (p, status) = parse_with_status(&triple(2, Mp::from(1), data())).unwrap();
        assert_eq!((status, p.receipt, p.ttl), (Status::Accepted, false, None));
        assert!(matches!(p.id, PushId::Generated(_)));

        let options = Mp::Map(vec![
            (Mp::from("id"), Mp::from("order-1")),
            (Mp::from("receipt"), Mp::from(true)),
            (Mp::from("ttl"), Mp::from(3600)),
        ]);
        let (p, status) = parse_with_status(&with_options(options)).unwrap();
        assert_eq!(status, Status::AcceptedWithOptions);
        assert_eq!(p.id, PushId::Given("order-1".into()));
        assert_eq!((p.receipt, p.ttl), (true, Some(3600)));
        // An empty map still tells the client its options were understood.
        let (p, status) = parse_with_status(&with_options(Mp::Map(vec![]))).unwrap();
        assert_eq!((status, p.receipt), (Status::AcceptedWithOptions, false));
        // And they round-trip through `encode_with`.
        let frame = encode_with(2, &Mp::from(1), &data(), Some(&super::options(&p)));
        assert_eq!(parse(&frame[4..]).unwrap(), p);
    }

    #[test]
    fn bad_options_say_what_is_wrong() {
        let opt = |k: &str, v: Mp| with_options(Mp::Map(vec![(Mp::from(k), v)]));
        let cases = [
            (
                with_options(Mp::from(5)),
                "options must be a map, got an integer",
            ),
            (opt("id", Mp::from(5)), "id must be a string"),
            (opt("id", Mp::from("")), "id: 1 to 64"),
            (opt("id", Mp::from("x".repeat(65))), "id: 1 to 64"),
            (opt("id", Mp::from("a b")), "id: 1 to 64"),
            (opt("receipt", Mp::from(1)), "receipt must be a boolean"),
            (opt("ttl", Mp::from(0)), "ttl 0: seconds from 1 to 2592000"),
            (opt("ttl", Mp::from(-5)), "ttl -5"),
            (opt("ttl", Mp::from(2_592_001)), "ttl 2592001"),
            (opt("ttl", Mp::from("60")), "ttl must be an integer"),
            (opt("reciept", Mp::from(true)), "unknown option \"reciept\""),
        ];
        for (bytes, want) in cases {
            let err = parse(&bytes).unwrap_err();
            assert_eq!(err.status(), Status::BadOptions, "{err}");
            assert!(err.to_string().contains(want), "{err} lacks {want}");
        }
        let five = body(Mp::Array(vec![
            Mp::from(2),
            Mp::from(1),
            data(),
            Mp::Map(vec![]),
            Mp::Nil,
        ]));
        assert_eq!(parse(&five).unwrap_err().status(), Status::NotTriple);
    }

    #[test]
    fn deep_nesting_is_refused_not_overflowed() {
        let mut bytes = vec![0x93, 0x02, 0x01, 0x81, 0xa1, b'x'];
        bytes.extend(std::iter::repeat_n(0x91, 1_000));
        bytes.push(0x01);
        assert_eq!(parse(&bytes).unwrap_err().status(), Status::Malformed);
    }

    #[test]
    fn huge_declared_lengths_do_not_allocate() {
        // array32 claiming 4 billion items, in a 9-byte body.
        let bytes = [0x93, 0x02, 0x01, 0xdd, 0xff, 0xff, 0xff, 0xff, 0x00];
        assert_eq!(parse(&bytes).unwrap_err().status(), Status::Truncated);
        // The same in data: a map32, and an array32 as a value.
        let bytes = [0x93, 0x02, 0x01, 0xdf, 0xff, 0xff, 0xff, 0xff, 0xc0];
        assert_eq!(parse(&bytes).unwrap_err().status(), Status::Truncated);
        let bytes = [0x93, 0x02, 0x01, 0x81, 0xc0, 0xdd, 0xff, 0xff, 0xff, 0xff];
        assert_eq!(parse(&bytes).unwrap_err().status(), Status::Truncated);
    }

    #[test]
    fn encode_round_trips() {
        let frame = encode(3, &Mp::from(9), &data());
        let n = check(&frame, 1 << 20).unwrap().unwrap();
        let p = parse(&frame[4..4 + n]).unwrap();
        assert_eq!(p.target, Target::User("9".into()));
    }

    #[test]
    fn status_bytes_are_distinct_and_named() {
        for b in 0..=12u8 {
            let s = Status::from_byte(b).unwrap();
            assert_eq!(s as u8, b);
            assert!(!s.meaning().is_empty());
        }
        assert_eq!(Status::from_byte(13), None);
    }
}
