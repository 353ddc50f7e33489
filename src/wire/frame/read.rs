//! msgpack read straight from a frame body, with no value tree in between:
//! [`check`] walks the body as rmpv's decoder would and fails where it
//! would (cut short, too deep, bytes after the value), then a [`Reader`]
//! takes the checked body apart into a push's parts and its JSON data.

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
    let mut rd = Reader { rest: body };
    rd.skip(MAX_DEPTH as u16)?;
    match rd.rest.len() {
        0 => Ok(()),
        n => Err(FrameError::Trailing(n)),
    }
}

/// A cursor over a frame body. Past [`check`], reading cannot fail; its
/// errors stay for safety, never for control flow.
#[derive(Clone, Copy)]
pub(super) struct Reader<'a> {
    rest: &'a [u8],
}

impl<'a> Reader<'a> {
    pub(super) fn new(body: &'a [u8]) -> Self {
        Reader { rest: body }
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

    fn uint(&mut self, n: usize) -> Result<u64, FrameError> {
        Ok(self
            .take(n)?
            .iter()
            .fold(0, |v, &b| (v << 8) | u64::from(b)))
    }

    /// The next value's head, with no depth limit (the body is checked).
    pub(super) fn head(&mut self) -> Result<Head<'a>, FrameError> {
        self.head_within(u16::MAX)
    }

    /// The next value's head, `depth` levels from rmpv's limit. rmpv spends
    /// a level on every value, another on a container's, string's, binary's
    /// or extension's body and a third on a string's or extension's bytes,
    /// each checked after the bytes before it were read.
    fn head_within(&mut self, depth: u16) -> Result<Head<'a>, FrameError> {
        let need = |levels: u16| match depth >= levels {
            true => Ok(()),
            false => Err(FrameError::Malformed("depth limit exceeded".into())),
        };
        need(1)?;
        let m = self.take(1)?[0];
        let container = |n: u64| need(2).map(|()| n as usize);
        Ok(match m {
            0x00..=0x7f => Head::Int(m.into()),
            0xa0..=0xbf => {
                need(3)?;
                Head::Str(self.take((m & 0x1f).into())?)
            }
            0xd9..=0xdb => {
                let n = self.uint(1 << (m - 0xd9))?;
                need(3)?;
                Head::Str(self.take(n as usize)?)
            }
            0xc4..=0xc6 => {
                let n = self.uint(1 << (m - 0xc4))?;
                need(2)?;
                Head::Bin(self.take(n as usize)?)
            }
            0xc7..=0xc9 | 0xd4..=0xd8 => {
                let n = match m {
                    0xc7..=0xc9 => self.uint(1 << (m - 0xc7))?,
                    _ => 1 << (m - 0xd4),
                };
                need(2)?;
                self.take(1)?;
                need(3)?;
                self.take(n as usize)?;
                Head::Ext
            }
            0x80..=0x8f => Head::Map(container((m & 0x0f).into())?),
            0x90..=0x9f => Head::Array(container((m & 0x0f).into())?),
            0xc0 | 0xc1 => Head::Nil,
            0xc2 => Head::Bool(false),
            0xc3 => Head::Bool(true),
            0xca => Head::Float(f32::from_be_bytes(self.array()?).into()),
            0xcb => Head::Float(f64::from_be_bytes(self.array()?)),
            0xcc..=0xcf => Head::Int(self.uint(1 << (m - 0xcc))?.into()),
            0xd0 => Head::Int(i8::from_be_bytes(self.array()?).into()),
            0xd1 => Head::Int(i16::from_be_bytes(self.array()?).into()),
            0xd2 => Head::Int(i32::from_be_bytes(self.array()?).into()),
            0xd3 => Head::Int(i64::from_be_bytes(self.array()?).into()),
            0xdc | 0xdd => Head::Array(container(self.uint(2 << (m - 0xdc))?)?),
            0xde | 0xdf => Head::Map(container(self.uint(2 << (m - 0xde))?)?),
            // 0xe0..=0xff
            _ => Head::Int((m as i8).into()),
        })
    }

    fn skip(&mut self, depth: u16) -> Result<(), FrameError> {
        let items = match self.head_within(depth)? {
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
    pub(super) fn value(&mut self) -> Result<rmpv::Value, FrameError> {
        rmpv::decode::read_value(&mut self.rest).map_err(|e| FrameError::Malformed(e.to_string()))
    }

    /// A map of `n` entries as JSON, as the old service's json.dumps made
    /// it: binary as text, non-finite floats and extensions as null, other
    /// keys as rmpv shows them; a repeated key keeps its first place and its
    /// last value.
    pub(super) fn json_map(&mut self, n: usize) -> Result<Map<String, Value>, FrameError> {
        let mut map = Map::with_capacity(n);
        for _ in 0..n {
            let at = *self;
            let key = match self.head()? {
                Head::Str(b) | Head::Bin(b) => text(b),
                _ => {
                    *self = at;
                    self.value()?.to_string()
                }
            };
            map.insert(key, self.json()?);
        }
        Ok(map)
    }

    fn json(&mut self) -> Result<Value, FrameError> {
        Ok(match self.head()? {
            Head::Nil | Head::Ext => Value::Null,
            Head::Bool(b) => Value::Bool(b),
            Head::Int(n) => match i64::try_from(n) {
                Ok(n) => Value::from(n),
                Err(_) => Value::from(n as u64),
            },
            Head::Float(f) => Number::from_f64(f).map_or(Value::Null, Value::Number),
            Head::Str(b) | Head::Bin(b) => Value::String(text(b)),
            Head::Array(n) => {
                let mut items = Vec::with_capacity(n);
                for _ in 0..n {
                    items.push(self.json()?);
                }
                Value::Array(items)
            }
            Head::Map(n) => Value::Object(self.json_map(n)?),
        })
    }
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}
