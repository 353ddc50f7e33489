//! Hot reload of the APNs credentials: on SIGHUP, and when config.json or a
//! file it names changes (polled), so a renewed certificate or key is used
//! without a restart and without dropping notifications in flight.

use std::sync::{Arc, RwLock};
use std::time::Duration;

use tokio::signal::unix::{signal, Signal, SignalKind};
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use super::endpoints::{Builder, Endpoints, Stamp};
use crate::stats::Stats;

/// The endpoints in use and how to rebuild them.
pub(crate) struct Credentials {
    builder: Builder,
    current: RwLock<Arc<Endpoints>>,
    stats: Arc<Stats>,
}

impl Credentials {
    pub fn new(builder: Builder, initial: Endpoints, stats: Arc<Stats>) -> Self {
        Credentials {
            builder,
            current: RwLock::new(Arc::new(initial)),
            stats,
        }
    }

    /// config.json's path.
    pub fn config(&self) -> &std::path::Path {
        self.builder.config()
    }

    /// The endpoints now; requests already sent keep the ones they started with.
    pub fn current(&self) -> Arc<Endpoints> {
        Arc::clone(&self.current.read().unwrap_or_else(|p| p.into_inner()))
    }

    /// Rebuilds the endpoints; what cannot be used is logged and the old
    /// credentials stay.
    pub fn reload(&self) {
        let old = self.current();
        match self.builder.build(&old) {
            Ok((next, refused)) => {
                self.stats.apns_reloads.inc();
                self.stats.apns_reloads_refused.add(refused as u64);
                info!(endpoints = next.len(), refused, "APNs credentials reloaded");
                *self.current.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(next);
            }
            Err(e) => {
                self.stats.apns_reloads_refused.inc();
                error!("APNs credentials not reloaded, keeping the old: {e}");
            }
        }
    }
}

/// Listens for SIGHUP from now on (a SIGHUP before would stop the process).
pub(crate) fn sighup() -> Option<Signal> {
    signal(SignalKind::hangup())
        .inspect_err(|e| warn!("no SIGHUP reload: {e}"))
        .ok()
}

/// Reloads on SIGHUP and, every `poll` (zero: never), when config.json or
/// one of its files has changed since `seen`; stops on `shutdown`.
pub(crate) async fn watch(
    creds: Arc<Credentials>,
    mut seen: Stamp,
    mut hup: Option<Signal>,
    poll: Duration,
    shutdown: CancellationToken,
) {
    let mut tick = (!poll.is_zero()).then(|| tokio::time::interval(poll));
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            Some(()) = async { hup.as_mut()?.recv().await } => {
                info!("SIGHUP: reloading APNs credentials");
            }
            Some(_) = async { Some(tick.as_mut()?.tick().await) } => {
                if creds.builder.stamp() == seen {
                    continue;
                }
                info!("{}: changed; reloading APNs credentials", creds.builder.config().display());
            }
        }
        seen = creds.builder.stamp();
        creds.reload();
    }
    debug!("APNs credential watch stopped");
}
