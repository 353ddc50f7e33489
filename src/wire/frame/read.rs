//! msgpack read straight from a frame body, with no value tree in between:
//! a [`Reader`] takes the body apart into a push's parts and its JSON data,
//! failing where rmpv's decoder would (cut short, too deep); [`check`] walks
//! a whole body the same way, to tell which fault comes first.

use serde_json::{Map, Number, Value};

use super::{FrameError, MAX_DEPTH};

/// One value's marker and what follows it: a scalar, a string's or
/// binary's bytes, or a container's item count (its items come next).
pub(super) enum Head<'a> {
    Nil,
    Bool(bool),
    Int(i128),
    Float(f64),
    Str(&'a [u8]),
    Bin(&'a [u8]),
    Ext,
    Array(usize),
    Map(usize),
}

impl Head<'_> {
    pub(super) fn kind(&self) -> &'static str {
        match self {
            Head::Nil => "nil",
            Head::Bool(_) => "a boolean",
            Head::Int(_) => "an integer",
            Head::Float(_) => "a float",
            Head::Str(_) => "a string",
            Head::Bin(_) => "binary",
            Head::Ext => "an extension value",
            Head::Array(_) => "an array",
            Head::Map(_) => "a map",
        }
    }
}

/// Whether `body` is exactly one msgpack value no deeper than
/// [`MAX_DEPTH`], with the error rmpv's `read_value_with_max_depth` gives
/// for the same bytes: the first of cut short or too deep in reading order,
/// then bytes left over.
pub(super) fn check(body: &[u8]) -> Result<(), FrameError> {
    let mut rd = Reader::new(body);
    rd.skip(TOP)?;
    rd.end()
}

/// The depth the body's value is read at: rmpv's limit.
pub(super) const TOP: u16 = MAX_DEPTH as u16;

/// A cursor over a frame body.
#[derive(Clone, Copy)]
pub(super) struct Reader<'a> {
    rest: &'a [u8],
}

impl<'a> Reader<'a> {
    pub(super) fn new(body: &'a [u8]) -> Self {
        Reader { rest: body }
    }

    /// Nothing may follow the body's value.
    pub(super) fn end(&self) -> Result<(), FrameError> {
        match self.rest.len() {
            0 => Ok(()),
            n => Err(FrameError::Trailing(n)),
        }
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], FrameError> {
        if n > self.rest.len() {
            return Err(FrameError::Truncated);
        }
        let (head, rest) = self.rest.split_at(n);
        self.rest = rest;
        Ok(head)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], FrameError> {
        Ok(self.take(N)?.try_into().expect("N bytes"))
    }

    /// An `N`-byte big-endian length or unsigned integer.
    fn be<const N: usize>(&mut self) -> Result<u64, FrameError> {
        Ok(self
            .array::<N>()?
            .iter()
            .fold(0, |v, &b| (v << 8) | u64::from(b)))
    }

    /// The length after an 8-, 16- or 32-bit marker (`step` 0, 1, 2).
    fn sized(&mut self, step: u8) -> Result<u64, FrameError> {
        match step {
            0 => self.be::<1>(),
            1 => self.be::<2>(),
            _ => self.be::<4>(),
        }
    }

    /// The next value's head, read `depth` levels from rmpv's limit (a
    /// container's items are 2 deeper). rmpv spends a level on every value,
    /// another on a container's, string's, binary's or extension's body and
    /// a third on a string's or extension's bytes, each checked after the
    /// bytes before it were read.
    pub(super) fn head(&mut self, depth: u16) -> Result<Head<'a>, FrameError> {
        let need = |levels: u16| match depth >= levels {
            true => Ok(()),
            false => Err(FrameError::Malformed("depth limit exceeded".into())),
        };
        need(1)?;
        let m = self.take(1)?[0];
        let str = |rd: &mut Self, n: u64| {
            need(3)?;
            rd.take(n as usize).map(Head::Str)
        };
        let bin = |rd: &mut Self, n: u64| {
            need(2)?;
            rd.take(n as usize).map(Head::Bin)
        };
        let ext = |rd: &mut Self, n: u64| {
            need(2)?;
            rd.take(1)?;
            need(3)?;
            rd.take(n as usize).map(|_| Head::Ext)
        };
        let container = |n: u64| need(2).map(|()| n as usize);
        Ok(match m {
            0x00..=0x7f => Head::Int(m.into()),
            0x80..=0x8f => Head::Map(container((m & 0x0f).into())?),
            0x90..=0x9f => Head::Array(container((m & 0x0f).into())?),
            0xa0..=0xbf => str(self, (m & 0x1f).into())?,
            0xc0 | 0xc1 => Head::Nil,
            0xc2 => Head::Bool(false),
            0xc3 => Head::Bool(true),
            0xc4..=0xc6 => {
                let n = self.sized(m - 0xc4)?;
                bin(self, n)?
            }
            0xc7..=0xc9 => {
                let n = self.sized(m - 0xc7)?;
                ext(self, n)?
            }
            0xca => Head::Float(f32::from_be_bytes(self.array()?).into()),
            0xcb => Head::Float(f64::from_be_bytes(self.array()?)),
            0xcc => Head::Int(self.be::<1>()?.into()),
            0xcd => Head::Int(self.be::<2>()?.into()),
            0xce => Head::Int(self.be::<4>()?.into()),
            0xcf => Head::Int(self.be::<8>()?.into()),
            0xd0 => Head::Int(i8::from_be_bytes(self.array()?).into()),
            0xd1 => Head::Int(i16::from_be_bytes(self.array()?).into()),
            0xd2 => Head::Int(i32::from_be_bytes(self.array()?).into()),
            0xd3 => Head::Int(i64::from_be_bytes(self.array()?).into()),
            0xd4..=0xd8 => ext(self, 1 << (m - 0xd4))?,
            0xd9..=0xdb => {
                let n = self.sized(m - 0xd9)?;
                str(self, n)?
            }
            0xdc => Head::Array(container(self.be::<2>()?)?),
            0xdd => Head::Array(container(self.be::<4>()?)?),
            0xde => Head::Map(container(self.be::<2>()?)?),
            0xdf => Head::Map(container(self.be::<4>()?)?),
            0xe0..=0xff => Head::Int((m as i8).into()),
        })
    }

    fn skip(&mut self, depth: u16) -> Result<(), FrameError> {
        let items = match self.head(depth)? {
            Head::Array(n) => n,
            Head::Map(n) => n.saturating_mul(2),
            _ => return Ok(()),
        };
        for _ in 0..items {
            self.skip(depth - 2)?;
        }
        Ok(())
    }

    /// The next value as rmpv decodes it, for messages that show it.
    #[cold]
    pub(super) fn value(&mut self, depth: u16) -> Result<rmpv::Value, FrameError> {
        let at = self.rest;
        self.skip(depth)?;
        rmpv::decode::read_value(&mut &at[..at.len() - self.rest.len()])
            .map_err(|e| FrameError::Malformed(e.to_string()))
    }

    /// A map of `n` entries, read at `depth`, as JSON the way the old
    /// service's json.dumps made it: binary as text, non-finite floats and
    /// extensions as null, other keys as rmpv shows them; a repeated key
    /// keeps its first place and its last value.
    pub(super) fn json_map(
        &mut self,
        n: usize,
        depth: u16,
    ) -> Result<Map<String, Value>, FrameError> {
        // A declared count is only believed as far as the bytes left hold it.
        let mut map = Map::with_capacity(n.min(self.rest.len() / 2));
        for _ in 0..n {
            let at = *self;
            let key = match self.head(depth)? {
                Head::Str(b) | Head::Bin(b) => text(b),
                _ => {
                    *self = at;
                    self.value(depth)?.to_string()
                }
            };
            map.insert(key, self.json(depth)?);
        }
        Ok(map)
    }

    fn json(&mut self, depth: u16) -> Result<Value, FrameError> {
        Ok(match self.head(depth)? {
            Head::Nil | Head::Ext => Value::Null,
            Head::Bool(b) => Value::Bool(b),
            Head::Int(n) => match i64::try_from(n) {
                Ok(n) => Value::from(n),
                Err(_) => Value::from(n as u64),
            },
            Head::Float(f) => Number::from_f64(f).map_or(Value::Null, Value::Number),
            Head::Str(b) | Head::Bin(b) => Value::String(text(b)),
            Head::Array(n) => {
                let mut items = Vec::with_capacity(n.min(self.rest.len()));
                for _ in 0..n {
                    items.push(self.json(depth - 2)?);
                }
                Value::Array(items)
            }
            Head::Map(n) => Value::Object(self.json_map(n, depth - 2)?),
        })
    }
}

fn text(b: &[u8]) -> String {
    match std::str::from_utf8(b) {
        Ok(s) => s.to_owned(),
        Err(_) => String::from_utf8_lossy(b).into_owned(),
    }
}
