//! The one accept loop every listener runs (the proxy, HTTP, MQTT on each
//! transport), so the rules hold alike everywhere: a connection slot is
//! taken before `accept` (over the cap nobody is accepted and new
//! connections wait in the kernel's backlog), a failed accept backs off
//! instead of spinning, and the connection, handshake included, runs on its
//! own task, never in the loop.

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tracing::{debug, warn};

use crate::lifecycle::Phase;
use crate::stats::Up;

/// Pause after a failed accept (EMFILE and friends).
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);

/// A listen address that could not be bound, named by its setting.
#[derive(Debug, thiserror::Error)]
#[error("cannot listen on {key} = {addr}: {source}")]
pub struct BindError {
    pub key: &'static str,
    pub addr: SocketAddr,
    pub source: std::io::Error,
}

/// Binds `addr`, the value of the setting `key`.
pub async fn bind(key: &'static str, addr: SocketAddr) -> Result<TcpListener, BindError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| BindError { key, addr, source })
}

/// A bound listener, the connection slots it shares, and its readiness
/// mark (`/readyz` reads it as down once the loop ends).
pub struct Acceptor {
    pub key: &'static str,
    pub listener: TcpListener,
    pub slots: Arc<Semaphore>,
    pub up: Up,
}

impl Acceptor {
    /// Accepts until `phase` stops. Before each accept it waits as long as
    /// `pace` asks (a connect rate), then for a slot; each connection, with
    /// its slot, is handed to `serve` and run on `phase`.
    pub async fn run<P, S, F>(self, mut pace: P, phase: Phase, mut serve: S)
    where
        P: FnMut() -> Option<Duration>,
        S: FnMut(TcpStream, SocketAddr, OwnedSemaphorePermit) -> F,
        F: Future<Output = ()> + Send + 'static,
    {
        let Acceptor {
            key,
            listener,
            slots,
            up: _up,
        } = self;
        let stop = phase.token();
        loop {
            while let Some(wait) = pace() {
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(wait) => {}
                }
            }
            let permit = tokio::select! {
                _ = stop.cancelled() => return,
                p = slots.clone().acquire_owned() => match p {
                    Ok(p) => p,
                    Err(_) => return,
                },
            };
            let accepted = tokio::select! {
                _ = stop.cancelled() => return,
                r = listener.accept() => r,
            };
            match accepted {
                Ok((stream, peer)) => {
                    // Replies are small (status bytes, PUBACKs, pushes): without
                    // this the last of a burst waits for a delayed ACK (~40 ms).
                    if let Err(e) = stream.set_nodelay(true) {
                        debug!(%peer, error = %e, "set_nodelay failed");
                    }
                    phase.spawn(serve(stream, peer, permit));
                }
                Err(e) => {
                    warn!(listener = key, error = %e, "accept failed");
                    tokio::select! {
                        _ = stop.cancelled() => return,
                        _ = tokio::time::sleep(ACCEPT_BACKOFF) => {}
                    }
                }
            }
        }
    }
}
