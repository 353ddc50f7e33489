//! The order pushbridge stops in, as named phases. Every task belongs to
//! one phase; a phase's tasks watch its token and the phase ends when they
//! are all gone:
//!
//! 1. `ingress`: the proxy and HTTP listeners and their connections; no new
//!    pushes once it ends (its token is the one `run` is given).
//! 2. the drain, between phases: queued pushes routed, queued APNs
//!    notifications answered, together within `proxy.drain_secs`.
//! 3. `devices`: the embedded broker's listeners and connections; devices
//!    are sent what their sessions hold, then disconnected.
//! 4. `rest`: the APNs sender, the external broker link, the status and
//!    offline handlers, the stats sampler, the intake acknowledger.

use std::future::Future;

use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// One phase: the token its tasks stop on and the tracker that waits for them.
#[derive(Clone)]
pub struct Phase {
    token: CancellationToken,
    tracker: TaskTracker,
}

impl Phase {
    fn new(token: CancellationToken) -> Phase {
        Phase {
            token,
            tracker: TaskTracker::new(),
        }
    }

    /// Cancelled when the phase is told to stop.
    pub fn token(&self) -> CancellationToken {
        self.token.clone()
    }

    /// Runs `task` as part of this phase.
    pub fn spawn<F>(&self, task: F) -> JoinHandle<F::Output>
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        self.tracker.spawn(task)
    }

    /// Waits until the phase is told to stop.
    pub async fn stopping(&self) {
        self.token.cancelled().await
    }

    /// Tells the phase's tasks to stop and waits until they have.
    pub async fn end(&self) {
        self.token.cancel();
        self.tracker.close();
        self.tracker.wait().await;
    }
}

/// The phases, in the order they end.
pub struct Lifecycle {
    pub ingress: Phase,
    pub devices: Phase,
    pub rest: Phase,
}

impl Lifecycle {
    /// Cancelling `shutdown` starts the stop.
    pub fn new(shutdown: CancellationToken) -> Lifecycle {
        Lifecycle {
            ingress: Phase::new(shutdown),
            devices: Phase::new(CancellationToken::new()),
            rest: Phase::new(CancellationToken::new()),
        }
    }
}
