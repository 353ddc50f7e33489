//! MQTT over WebSocket: path `/mqtt`, subprotocol `mqtt`, binary messages
//! carrying the MQTT byte stream (a packet may span messages and vice versa).

use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};

use bytes::{Buf, Bytes};
use futures_util::{Sink, Stream};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_tungstenite::tungstenite::handshake::server::{ErrorResponse, Request, Response};
use tokio_tungstenite::tungstenite::http::{HeaderValue, StatusCode};
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::{self, Message};
use tokio_tungstenite::WebSocketStream;

pub(super) const PATH: &str = "/mqtt";

/// Room for WebSocket framing around the largest MQTT packet.
const HEADROOM: usize = 4096;

/// The server side of the WebSocket handshake, over plain TCP (`ws_listen`)
/// or an accepted TLS stream (`wss_listen`). Frames and messages are capped
/// at `max_packet` (plus headroom) from their headers, before their payload
/// is buffered: tungstenite's own default would take 16 MiB.
pub(super) async fn accept<S>(io: S, max_packet: usize) -> Result<WsIo<S>, tungstenite::Error>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    let max = max_packet.saturating_add(HEADROOM);
    let config = WebSocketConfig::default()
        .max_frame_size(Some(max))
        .max_message_size(Some(max));
    let ws = tokio_tungstenite::accept_hdr_async_with_config(io, check, Some(config)).await?;
    Ok(WsIo {
        ws,
        pending: Bytes::new(),
    })
}

/// Only `/mqtt`; echoes the `mqtt` subprotocol when offered.
// The error type is tungstenite's callback signature.
#[allow(clippy::result_large_err)]
fn check(req: &Request, mut resp: Response) -> Result<Response, ErrorResponse> {
    if req.uri().path() != PATH {
        let mut err = ErrorResponse::new(Some("MQTT is served on /mqtt".into()));
        *err.status_mut() = StatusCode::NOT_FOUND;
        return Err(err);
    }
    let offered = req
        .headers()
        .get_all("Sec-WebSocket-Protocol")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .any(|p| p.trim() == "mqtt");
    if offered {
        resp.headers_mut()
            .insert("Sec-WebSocket-Protocol", HeaderValue::from_static("mqtt"));
    }
    Ok(resp)
}

/// A WebSocket as a byte stream.
pub(super) struct WsIo<S> {
    ws: WebSocketStream<S>,
    /// Rest of the last binary message not yet read.
    pending: Bytes,
}

fn to_io(e: tungstenite::Error) -> io::Error {
    match e {
        tungstenite::Error::Io(e) => e,
        e => io::Error::other(e),
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncRead for WsIo<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        while this.pending.is_empty() {
            match ready!(Pin::new(&mut this.ws).poll_next(cx)) {
                None | Some(Ok(Message::Close(_))) => return Poll::Ready(Ok(())),
                Some(Ok(Message::Binary(b))) => this.pending = b,
                // Pings are answered by tungstenite itself.
                Some(Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_))) => {}
                Some(Ok(Message::Text(_))) => {
                    let e = io::Error::new(io::ErrorKind::InvalidData, "text message on MQTT");
                    return Poll::Ready(Err(e));
                }
                Some(Err(e)) => return Poll::Ready(Err(to_io(e))),
            }
        }
        let n = this.pending.len().min(buf.remaining());
        buf.put_slice(&this.pending[..n]);
        this.pending.advance(n);
        Poll::Ready(Ok(()))
    }
}

impl<S: AsyncRead + AsyncWrite + Unpin> AsyncWrite for WsIo<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let ws = &mut self.get_mut().ws;
        ready!(Pin::new(&mut *ws).poll_ready(cx)).map_err(to_io)?;
        let msg = Message::Binary(Bytes::copy_from_slice(buf));
        Pin::new(ws).start_send(msg).map_err(to_io)?;
        Poll::Ready(Ok(buf.len()))
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().ws)
            .poll_flush(cx)
            .map_err(to_io)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().ws)
            .poll_close(cx)
            .map_err(to_io)
    }
}
