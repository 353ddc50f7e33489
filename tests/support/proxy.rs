//! A backend speaking raw frames, so tests control every byte.

use std::net::SocketAddr;

use rmpv::Value as Mp;
use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use pushbridge::wire::client::json_to_msgpack;
use pushbridge::wire::frame::{encode, encode_with};

pub struct Backend {
    pub socket: TcpStream,
}

impl Backend {
    pub async fn connect(addr: SocketAddr) -> Backend {
        Backend {
            socket: TcpStream::connect(addr).await.expect("connect to proxy"),
        }
    }

    /// Writes raw bytes (a whole frame, part of one, or garbage).
    pub async fn write(&mut self, bytes: &[u8]) {
        self.socket.write_all(bytes).await.expect("write to proxy");
    }

    /// Reads one status byte; `None` if the server closed the connection.
    pub async fn status(&mut self) -> Option<u8> {
        let mut b = [0u8; 1];
        match tokio::time::timeout(super::WAIT, self.socket.read(&mut b)).await {
            Ok(Ok(1)) => Some(b[0]),
            Ok(_) => None,
            Err(_) => panic!("no status byte within {:?}", super::WAIT),
        }
    }

    /// Sends `[type, id, data]` and returns the status byte.
    pub async fn push(&mut self, push_type: u8, id: Mp, data: &Value) -> u8 {
        self.write(&encode(push_type, &id, &json_to_msgpack(data)))
            .await;
        self.status().await.expect("status byte")
    }

    /// Sends `[type, id, data, options]` and returns the status byte.
    pub async fn push_with(&mut self, push_type: u8, id: Mp, data: &Value, options: &Value) -> u8 {
        let (data, options) = (json_to_msgpack(data), json_to_msgpack(options));
        self.write(&encode_with(push_type, &id, &data, Some(&options)))
            .await;
        self.status().await.expect("status byte")
    }
}

/// A frame around an arbitrary body.
pub fn frame(body: &[u8]) -> Vec<u8> {
    let mut out = (body.len() as u32).to_be_bytes().to_vec();
    out.extend_from_slice(body);
    out
}

/// msgpack bytes of a value.
pub fn msgpack(v: &Mp) -> Vec<u8> {
    let mut out = Vec::new();
    rmpv::encode::write_value(&mut out, v).unwrap();
    out
}
