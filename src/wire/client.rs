//! A minimal proxy client: what `pushbridge send` and the tests use to talk
//! to the proxy as a backend would.

use rmpv::Value as Mp;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::frame::{self, Status};

/// Why a push could not be handed to the proxy.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("proxy connection: {0}")]
    Io(#[from] std::io::Error),
    #[error("connect to {addr}: {source}")]
    Connect {
        addr: String,
        source: std::io::Error,
    },
    #[error("{0}")]
    Frame(#[from] frame::FrameError),
    #[error("server closed the connection without a status byte")]
    NoReply,
    #[error("server answered unknown status byte 0x{0:02x}")]
    UnknownStatus(u8),
}

/// Whom `send` addresses, with the type number old clients use.
#[derive(Debug, Clone)]
pub enum Recipient {
    User(Mp),
    Users(Vec<Mp>),
    Group(Mp),
}

impl Recipient {
    fn frame_parts(&self) -> (u8, Mp) {
        match self {
            Recipient::Group(id) => (1, id.clone()),
            Recipient::User(id) => (2, id.clone()),
            Recipient::Users(ids) => (3, Mp::Array(ids.clone())),
        }
    }
}

/// An id as a backend would send it: an integer when it looks like one.
pub fn id_value(text: &str) -> Mp {
    match text.parse::<i64>() {
        Ok(n) => Mp::from(n),
        Err(_) => Mp::from(text),
    }
}

/// JSON `data` as the msgpack map a backend sends.
pub fn json_to_msgpack(v: &serde_json::Value) -> Mp {
    use serde_json::Value as J;
    match v {
        J::Null => Mp::Nil,
        J::Bool(b) => Mp::from(*b),
        J::Number(n) => match (n.as_i64(), n.as_u64()) {
            (Some(i), _) => Mp::from(i),
            (None, Some(u)) => Mp::from(u),
            _ => Mp::F64(n.as_f64().unwrap_or(0.0)),
        },
        J::String(s) => Mp::from(s.as_str()),
        J::Array(a) => Mp::Array(a.iter().map(json_to_msgpack).collect()),
        J::Object(o) => Mp::Map(
            o.iter()
                .map(|(k, v)| (Mp::from(k.as_str()), json_to_msgpack(v)))
                .collect(),
        ),
    }
}

/// Sends one push and returns the server's status byte.
pub async fn send(addr: &str, to: &Recipient, data: &Mp) -> Result<Status, ClientError> {
    let mut socket = TcpStream::connect(addr)
        .await
        .map_err(|source| ClientError::Connect {
            addr: addr.to_owned(),
            source,
        })?;
    let (push_type, id) = to.frame_parts();
    socket
        .write_all(&frame::encode(push_type, &id, data))
        .await?;
    let mut byte = [0u8; 1];
    match socket.read_exact(&mut byte).await {
        Ok(_) => Ok(Status::from_byte(byte[0]).ok_or(ClientError::UnknownStatus(byte[0]))?),
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => Err(ClientError::NoReply),
        Err(e) => Err(e.into()),
    }
}
