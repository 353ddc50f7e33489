//! Accept loop and the session-expiry sweeper.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, warn};

use tokio::time::Instant;

use super::rate::Bucket;
use super::transport::Transport;
use super::{connection, Inner, MqttError};

/// Pause after a failed accept (EMFILE and friends) so the loop does not spin.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);
/// How often offline sessions are checked for expiry.
const SWEEP_EVERY: Duration = Duration::from_secs(1);

pub(super) async fn serve(
    inner: Arc<Inner>,
    listeners: Vec<(TcpListener, Transport)>,
    shutdown: CancellationToken,
    tracker: TaskTracker,
) -> Result<(), MqttError> {
    // One connection cap and one connect rate across all transports.
    let limit = Arc::new(Semaphore::new(inner.settings.max_connections));
    let (rate, burst) = (inner.settings.connect_rate, inner.settings.connect_burst);
    let bucket = Arc::new(Mutex::new(Bucket::new(rate, burst, Instant::now())));
    tracker.spawn(sweep(inner.clone(), shutdown.clone()));
    for (listener, transport) in listeners {
        let gate = Gate {
            limit: limit.clone(),
            bucket: bucket.clone(),
        };
        let (inner, shutdown, t) = (inner.clone(), shutdown.clone(), tracker.clone());
        let accept = accept_loop(inner, listener, transport, gate, shutdown, t);
        tracker.spawn(accept);
    }
    shutdown.cancelled().await;
    Ok(())
}

/// What a connection must pass before it is accepted.
struct Gate {
    limit: Arc<Semaphore>,
    bucket: Arc<Mutex<Bucket>>,
}

impl Gate {
    fn wait_time(&self) -> Option<Duration> {
        let mut bucket = self.bucket.lock().unwrap_or_else(|e| e.into_inner());
        bucket.take(Instant::now())
    }
}

async fn accept_loop(
    inner: Arc<Inner>,
    listener: TcpListener,
    transport: Transport,
    gate: Gate,
    shutdown: CancellationToken,
    tracker: TaskTracker,
) {
    let limit = gate.limit.clone();
    loop {
        // Over the rate, connections wait in the kernel's backlog.
        while let Some(wait) = gate.wait_time() {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(wait) => {}
            }
        }
        // The permit is taken before accept, so over the cap nobody is accepted at all.
        let permit = tokio::select! {
            _ = shutdown.cancelled() => return,
            p = limit.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => return,
            },
        };
        let accepted = tokio::select! {
            _ = shutdown.cancelled() => return,
            r = listener.accept() => r,
        };
        match accepted {
            Ok((stream, peer)) => {
                if let Err(e) = stream.set_nodelay(true) {
                    debug!(%peer, "set_nodelay: {e}");
                }
                let (inner, transport) = (inner.clone(), transport.clone());
                let task =
                    connection::run(inner, stream, peer, transport, shutdown.clone(), permit);
                tracker.spawn(task);
            }
            Err(e) => {
                warn!("mqtt accept failed: {e}");
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(ACCEPT_BACKOFF) => {}
                }
            }
        }
    }
}

/// Removes persistent sessions that stayed offline past their expiry.
async fn sweep(inner: Arc<Inner>, shutdown: CancellationToken) {
    let mut tick = tokio::time::interval(SWEEP_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            now = tick.tick() => {
                let n = inner.registry().sweep(now);
                if n > 0 {
                    inner.stats.mqtt_sessions_expired.add(n as u64);
                    debug!(expired = n, "mqtt sessions expired");
                }
            }
        }
    }
}
