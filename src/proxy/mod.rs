//! The msgpack proxy: backends fire `(type, id, data)` frames over TCP and get
//! one status byte per frame. Accepted pushes go to the dispatcher's queue,
//! or with durable intake to the Redis Stream (one round trip per read burst).

mod connection;

use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info_span, warn, Instrument};

use crate::intake::Intake;
use crate::settings::ProxySettings;
use crate::stats::Stats;

/// What every backend connection needs.
#[derive(Clone)]
pub(crate) struct Shared {
    pub settings: ProxySettings,
    pub intake: Intake,
    pub stats: Arc<Stats>,
    pub shutdown: CancellationToken,
}

/// Accepts backend connections until `shutdown`; each runs on `tracker`.
/// A connection slot is taken before `accept`, so at most
/// `max_connections` backends are served at once.
pub async fn serve(
    listener: TcpListener,
    settings: ProxySettings,
    intake: Intake,
    stats: Arc<Stats>,
    shutdown: CancellationToken,
    tracker: TaskTracker,
) {
    let slots = Arc::new(Semaphore::new(settings.max_connections));
    let shared = Shared {
        settings,
        intake,
        stats,
        shutdown: shutdown.clone(),
    };
    loop {
        let permit = tokio::select! {
            _ = shutdown.cancelled() => return,
            permit = slots.clone().acquire_owned() => permit.expect("never closed"),
        };
        let (socket, peer) = tokio::select! {
            _ = shutdown.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    warn!(error = %e, "proxy accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        // Status bytes are tiny replies: without this, the last ones of a
        // burst wait for the backend's delayed ACK (~40 ms).
        if let Err(e) = socket.set_nodelay(true) {
            debug!(%peer, error = %e, "set_nodelay failed");
        }
        let shared = shared.clone();
        tracker.spawn(
            async move {
                connection::handle(socket, shared).await;
                drop(permit);
            }
            .instrument(info_span!("proxy", %peer)),
        );
    }
}
