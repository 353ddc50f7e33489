//! The broker's listeners, one per transport set (TCP, TLS, WebSocket,
//! WebSocket over TLS), sharing one connection cap and one connect rate;
//! and the session-expiry sweeper.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::debug;

use super::rate::Bucket;
use super::tls::TlsConfig;
use super::transport::Transport;
use super::{connection, Inner, MqttError};
use crate::lifecycle::Phase;
use crate::net::{self, Acceptor};
use crate::settings::MqttSettings;

/// How often offline sessions are checked for expiry.
const SWEEP_EVERY: Duration = Duration::from_secs(1);

/// Where the broker listens; `None` where a listener is not set.
#[derive(Debug, Clone, Copy)]
pub struct Addrs {
    pub tcp: SocketAddr,
    pub tls: Option<SocketAddr>,
    pub ws: Option<SocketAddr>,
    pub wss: Option<SocketAddr>,
}

/// The set listeners that serve `mqtt.tls_cert`, for `check-config` and
/// so the certificate is loaded once for all of them.
pub fn tls_listeners(m: &MqttSettings) -> Vec<&'static str> {
    [
        ("mqtt.tls_listen", m.tls_listen),
        ("mqtt.wss_listen", m.wss_listen),
    ]
    .into_iter()
    .filter_map(|(key, addr)| addr.map(|_| key))
    .collect()
}

/// Binds every set listener, then accepts devices on `devices` until it
/// stops.
pub(super) async fn start(inner: Arc<Inner>, devices: &Phase) -> Result<Addrs, MqttError> {
    let m = &inner.settings;
    // One certificate (and its reloads) for every TLS listener.
    let tls = match (&m.tls_cert, &m.tls_key) {
        (Some(cert), Some(key)) if !tls_listeners(m).is_empty() => {
            Some(Arc::new(TlsConfig::load(cert, key)?))
        }
        _ => None,
    };
    let wanted = [
        ("mqtt.listen", Some(m.listen), Some(Transport::Tcp)),
        (
            "mqtt.tls_listen",
            m.tls_listen,
            tls.clone().map(Transport::Tls),
        ),
        ("mqtt.ws_listen", m.ws_listen, Some(Transport::WebSocket)),
        (
            "mqtt.wss_listen",
            m.wss_listen,
            tls.map(Transport::WebSocketTls),
        ),
    ];
    let mut bound: Vec<(&'static str, TcpListener, Transport)> = Vec::new();
    let mut addrs = [None; 4];
    for (i, (key, addr, transport)) in wanted.into_iter().enumerate() {
        if let (Some(addr), Some(transport)) = (addr, transport) {
            let listener = net::bind(key, addr).await?;
            addrs[i] = Some(listener.local_addr().expect("bound"));
            bound.push((key, listener, transport));
        }
    }
    let slots = Arc::new(Semaphore::new(m.max_connections));
    let bucket = Arc::new(Mutex::new(Bucket::new(
        m.connect_rate,
        m.connect_burst,
        Instant::now(),
    )));
    devices.spawn(sweep(inner.clone(), devices.token()));
    for (key, listener, transport) in bound {
        let acceptor = Acceptor {
            key,
            listener,
            slots: slots.clone(),
            up: inner.stats.listeners.up(key),
        };
        // Over the rate, connections wait in the kernel's backlog.
        let bucket = bucket.clone();
        let pace = move || {
            let mut bucket = bucket.lock().unwrap_or_else(|e| e.into_inner());
            bucket.take(Instant::now())
        };
        let (inner, phase) = (inner.clone(), devices.clone());
        devices.spawn(
            acceptor.run(pace, devices.clone(), move |stream, peer, slot| {
                let (inner, transport) = (inner.clone(), transport.clone());
                connection::run(inner, stream, peer, transport, phase.clone(), slot)
            }),
        );
    }
    Ok(Addrs {
        tcp: addrs[0].expect("mqtt.listen is always bound"),
        tls: addrs[1],
        ws: addrs[2],
        wss: addrs[3],
    })
}

/// Wakes connections whose deadline has passed and removes persistent
/// sessions that stayed offline past their expiry. On shutdown it tells the
/// connections to drain and goes on waking them until the last has ended
/// (their drain deadline is one of the deadlines it watches), returning as
/// soon as it has, not at the next sweep.
async fn sweep(inner: Arc<Inner>, shutdown: CancellationToken) {
    let mut tick = tokio::time::interval(SWEEP_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => {
                inner.stop_connections();
                let gone = inner.clocks.until_empty();
                tokio::pin!(gone);
                loop {
                    tokio::select! {
                        _ = &mut gone => return,
                        now = tick.tick() => { inner.clocks.sweep(now); }
                    }
                }
            }
            now = tick.tick() => {
                inner.clocks.sweep(now);
                let n = inner.sessions().sweep(now);
                if n > 0 {
                    inner.stats.mqtt_sessions_expired.add(n as u64);
                    debug!(expired = n, "mqtt sessions expired");
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::super::signal::Signal;
    use super::super::Broker;
    use super::*;

    /// A stop ends the sweep when the last connection goes, not at the
    /// next whole second (it held every shutdown up to a second).
    #[tokio::test(start_paused = true)]
    async fn the_sweep_ends_when_the_last_connection_does() {
        let (broker, _rx) = Broker::new(&MqttSettings::default());
        let inner = broker.inner.clone();
        let key = inner.clocks.register(Arc::new(Signal::default()));
        let shutdown = CancellationToken::new();
        let sweeping = tokio::spawn(sweep(inner.clone(), shutdown.clone()));
        tokio::task::yield_now().await;
        shutdown.cancel();
        tokio::task::yield_now().await;
        assert!(!sweeping.is_finished(), "a connection is still there");
        let started = Instant::now();
        inner.clocks.remove(key);
        sweeping.await.unwrap();
        // Paused time moves only when every task waits for a timer.
        assert!(
            started.elapsed() < SWEEP_EVERY,
            "the sweep waited {:?} for its next tick",
            started.elapsed()
        );
    }
}
