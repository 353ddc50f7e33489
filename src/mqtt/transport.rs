//! The byte streams MQTT runs over. Plain TCP is polled by readiness, so an
//! idle connection holds no buffers; TLS and WebSocket go through
//! `AsyncRead`/`AsyncWrite`. Their handshakes run in the connection task,
//! bounded by `connect_timeout_secs`.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll, Waker};
use std::time::Duration;

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::server::TlsStream;
use tracing::debug;

use super::tls::TlsConfig;
use super::ws;

/// Smallest read reservation; most MQTT packets of a push service are smaller.
pub(super) const READ_CHUNK: usize = 512;
/// Largest single read reservation, so a header claiming a big packet costs nothing until sent.
pub(super) const READ_MAX: usize = 64 * 1024;
/// Bound on the last write (DISCONNECT, unflushed acks) of a closing connection.
pub(super) const FINAL_WRITE: Duration = Duration::from_secs(1);

/// What a listener speaks.
#[derive(Clone)]
pub enum Transport {
    Tcp,
    Tls(Arc<TlsConfig>),
    WebSocket,
    /// WebSocket inside TLS (`wss://`), for browsers on HTTPS pages.
    WebSocketTls(Arc<TlsConfig>),
}

impl Transport {
    /// `tcp`, `tls`, `ws` or `wss`, as device events name it.
    pub fn name(&self) -> &'static str {
        match self {
            Transport::Tcp => "tcp",
            Transport::Tls(_) => "tls",
            Transport::WebSocket => "ws",
            Transport::WebSocketTls(_) => "wss",
        }
    }

    /// Turns an accepted socket into an MQTT byte stream; `None` if the
    /// handshake (TLS and WebSocket together, for `wss`) failed or took
    /// longer than `limit`. WebSocket frames are capped by `max_packet`.
    pub(super) async fn upgrade(
        &self,
        tcp: TcpStream,
        limit: Duration,
        max_packet: usize,
    ) -> Option<Stream> {
        let handshake = async {
            Ok(match self {
                Transport::Tcp => Stream::Tcp(tcp),
                Transport::Tls(config) => Stream::other(tls(config, tcp).await?),
                Transport::WebSocket => {
                    Stream::other(ws::accept(tcp, max_packet).await.map_err(err)?)
                }
                Transport::WebSocketTls(config) => {
                    let tls = tls(config, tcp).await?;
                    Stream::other(ws::accept(tls, max_packet).await.map_err(err)?)
                }
            })
        };
        let upgraded = match tokio::time::timeout(limit, handshake).await {
            Ok(r) => r,
            Err(_) => Err("timed out".into()),
        };
        upgraded
            .map_err(|e: String| debug!("handshake failed: {e}"))
            .ok()
    }
}

async fn tls(config: &TlsConfig, tcp: TcpStream) -> Result<TlsStream<TcpStream>, String> {
    let acceptor = tokio_rustls::TlsAcceptor::from(config.current());
    acceptor.accept(tcp).await.map_err(err)
}

fn err(e: impl std::fmt::Display) -> String {
    e.to_string()
}

pub(super) trait Io: AsyncRead + AsyncWrite + Send + Sync {}
impl<T: AsyncRead + AsyncWrite + Send + Sync> Io for T {}

pub(super) enum Stream {
    Tcp(TcpStream),
    Other {
        io: Pin<Box<dyn Io>>,
        /// Written but maybe not flushed (TLS records, WebSocket frames).
        dirty: bool,
    },
}

impl Stream {
    fn other(io: impl AsyncRead + AsyncWrite + Send + Sync + 'static) -> Stream {
        Stream::Other {
            io: Box::pin(io),
            dirty: false,
        }
    }

    /// Output is waiting inside the transport and needs flushing.
    pub(super) fn dirty(&self) -> bool {
        matches!(self, Stream::Other { dirty: true, .. })
    }

    /// Reads what has arrived into `rbuf`; `Ready(Ok(0))` is the end of the stream.
    pub(super) fn poll_fill(
        &mut self,
        cx: &mut Context<'_>,
        rbuf: &mut BytesMut,
        need: usize,
    ) -> Poll<io::Result<usize>> {
        match self {
            Stream::Tcp(s) => {
                // No buffer until the socket says something arrived.
                ready!(s.poll_read_ready(cx))?;
                // Grow with the data actually arriving, not with what a header claims.
                rbuf.reserve(need.clamp(READ_CHUNK, READ_MAX));
                // `poll_read`, not `try_read`: after a short read it knows the
                // socket is drained, which saves a read that would only say
                // "would block" (one per PUBACK).
                let read = tokio_util::io::poll_read_buf(Pin::new(s), cx, rbuf);
                if read.is_pending() && rbuf.is_empty() {
                    // Nothing came: an idle connection keeps no buffer.
                    *rbuf = BytesMut::new();
                }
                read
            }
            Stream::Other { io, .. } => {
                rbuf.reserve(need.clamp(READ_CHUNK, READ_MAX));
                tokio_util::io::poll_read_buf(io.as_mut(), cx, rbuf)
            }
        }
    }

    /// Writes `wbuf` out and flushes; `Pending` (with `cx` registered) while the peer is slow.
    pub(super) fn poll_drain(
        &mut self,
        cx: &mut Context<'_>,
        wbuf: &mut BytesMut,
    ) -> Poll<io::Result<()>> {
        while !wbuf.is_empty() {
            let n = match self {
                Stream::Tcp(s) => {
                    ready!(s.poll_write_ready(cx))?;
                    match s.try_write(wbuf) {
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                        r => r?,
                    }
                }
                Stream::Other { io, dirty } => {
                    let n = ready!(io.as_mut().poll_write(cx, wbuf))?;
                    *dirty = true;
                    n
                }
            };
            if n == 0 {
                return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
            }
            wbuf.advance(n);
        }
        if let Stream::Other {
            io,
            dirty: dirty @ true,
        } = self
        {
            ready!(io.as_mut().poll_flush(cx))?;
            *dirty = false;
        }
        Poll::Ready(Ok(()))
    }

    /// `poll_drain` without waiting: whatever the transport takes now.
    pub(super) fn drain_now(&mut self, wbuf: &mut BytesMut) -> io::Result<()> {
        match self.poll_drain(&mut Context::from_waker(Waker::noop()), wbuf) {
            Poll::Ready(r) => r,
            Poll::Pending => Ok(()),
        }
    }
}

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Tcp(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Other { io, .. } => io.as_mut().poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Tcp(s) => Pin::new(s).poll_write(cx, buf),
            Stream::Other { io, .. } => io.as_mut().poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Tcp(s) => Pin::new(s).poll_flush(cx),
            Stream::Other { io, .. } => io.as_mut().poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Tcp(s) => Pin::new(s).poll_shutdown(cx),
            Stream::Other { io, .. } => io.as_mut().poll_shutdown(cx),
        }
    }
}
