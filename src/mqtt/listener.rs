//! Accept loop and the session-expiry sweeper.

use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, warn};

use tokio::time::Instant;

use super::rate::Bucket;
use super::{connection, Inner, MqttError};

/// Pause after a failed accept (EMFILE and friends) so the loop does not spin.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(100);
/// How often offline sessions are checked for expiry.
const SWEEP_EVERY: Duration = Duration::from_secs(1);

pub(super) async fn serve(
    inner: Arc<Inner>,
    listener: TcpListener,
    shutdown: CancellationToken,
    tracker: TaskTracker,
) -> Result<(), MqttError> {
    let limit = Arc::new(Semaphore::new(inner.settings.max_connections));
    let (rate, burst) = (inner.settings.connect_rate, inner.settings.connect_burst);
    let mut bucket = Bucket::new(rate, burst, Instant::now());
    tracker.spawn(sweep(inner.clone(), shutdown.clone()));
    loop {
        // Over the rate, connections wait in the kernel's backlog.
        while let Some(wait) = bucket.take(Instant::now()) {
            tokio::select! {
                _ = shutdown.cancelled() => return Ok(()),
                _ = tokio::time::sleep(wait) => {}
            }
        }
        // The permit is taken before accept, so over the cap nobody is accepted at all.
        let permit = tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            p = limit.clone().acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => return Ok(()),
            },
        };
        let accepted = tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            r = listener.accept() => r,
        };
        match accepted {
            Ok((stream, peer)) => {
                if let Err(e) = stream.set_nodelay(true) {
                    debug!(%peer, "set_nodelay: {e}");
                }
                let task = connection::run(inner.clone(), stream, peer, shutdown.clone(), permit);
                tracker.spawn(task);
            }
            Err(e) => {
                warn!("mqtt accept failed: {e}");
                tokio::select! {
                    _ = shutdown.cancelled() => return Ok(()),
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
