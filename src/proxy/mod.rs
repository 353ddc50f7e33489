//! The msgpack proxy: backends fire `(type, id, data)` frames over TCP and get
//! one status byte per frame. Accepted pushes go to the intake (the
//! dispatcher's queue, or with durable intake the Redis Stream, one round
//! trip per read burst); the proxy knows nothing past it.

mod connection;

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tracing::{info_span, Instrument};

use crate::intake::Intake;
use crate::lifecycle::Phase;
use crate::net::{self, Acceptor, BindError};
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

/// Binds `proxy.listen` and accepts backends on `ingress` until it stops,
/// at most `proxy.max_connections` at once. Returns the bound address.
pub async fn start(
    settings: &ProxySettings,
    intake: Intake,
    stats: Arc<Stats>,
    ingress: &Phase,
) -> Result<SocketAddr, BindError> {
    let listener = net::bind("proxy.listen", settings.listen).await?;
    let addr = listener.local_addr().expect("bound");
    let acceptor = Acceptor {
        key: "proxy.listen",
        listener,
        slots: Arc::new(Semaphore::new(settings.max_connections)),
        up: stats.listeners.up("proxy.listen"),
    };
    let shared = Shared {
        settings: settings.clone(),
        intake,
        stats,
        shutdown: ingress.token(),
    };
    ingress.spawn(acceptor.run(
        || None,
        ingress.clone(),
        move |socket, peer, slot| {
            let shared = shared.clone();
            async move {
                connection::handle(socket, shared).await;
                drop(slot);
            }
            .instrument(info_span!("proxy", %peer))
        },
    ));
    Ok(addr)
}
