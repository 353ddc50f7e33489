//! The in-memory intake: a bounded queue the dispatcher drains, whose
//! admission is bounded by time rather than by count.
//!
//! A push answered `0x00` and left in a deep queue waits for everything ahead
//! of it: 65,536 pushes at 80k/s is most of a second. So the dispatcher
//! publishes its pace (time per push, and when it took the batch it is
//! routing), producers estimate how long a push queued now would wait, and
//! while that is over `intake.max_wait_ms` the proxy stops reading: backends
//! are held back by TCP instead of by a queue. The count bound
//! (`intake.queue`) stays, for memory and for riding out a registry outage.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::time::Instant;
use tracing::{debug, error};

use super::gate::{Gate, Ticket};
use crate::dispatch::{Dispatcher, BATCH};
use crate::push::Push;

/// A push with the time it was queued.
struct Queued {
    push: Push,
    at: Instant,
}

/// What the dispatcher tells the producers, so they can tell how long a
/// push queued now would wait.
#[derive(Debug)]
struct Pace {
    start: Instant,
    /// When the dispatcher took the batch it is routing (micros since
    /// `start`), `IDLE` while it waits for pushes.
    taken_at: AtomicU64,
    /// Recent wall time per push routed (nanos, a moving average).
    per_push_nanos: AtomicU64,
    /// Pushes queued and not yet routed: waiting, or in the batch being routed.
    unrouted: AtomicUsize,
    max_wait: Duration,
    /// Backends held back, in line for a turn as batches end.
    gate: Gate,
}

const IDLE: u64 = u64::MAX;
/// How often a held-back producer looks again without a batch ending.
const RECHECK: Duration = Duration::from_millis(50);

impl Pace {
    fn micros(&self, at: Instant) -> u64 {
        u64::try_from((at - self.start).as_micros()).unwrap_or(IDLE - 1)
    }

    /// How long a push queued now would wait: the routing of those ahead
    /// at the recent pace, plus how long the batch being routed has taken
    /// so far (a slow registry shows here).
    fn wait(&self) -> Duration {
        let queued = self.unrouted.load(Ordering::Relaxed);
        if queued == 0 {
            return Duration::ZERO;
        }
        let per_push = self.per_push_nanos.load(Ordering::Relaxed);
        let ahead = Duration::from_nanos(per_push.saturating_mul(queued as u64));
        let stuck = match self.taken_at.load(Ordering::Relaxed) {
            IDLE => Duration::ZERO,
            at => Duration::from_micros(self.micros(Instant::now()).saturating_sub(at)),
        };
        ahead + stuck
    }

    /// Returns once `ticket` may read: `wait()` is within the bound and no
    /// other backend is in line, or its turn came, or `outage()` (looked
    /// at every [`RECHECK`] while waiting).
    async fn admitted(&self, ticket: &Arc<Ticket>, outage: impl Fn() -> bool) {
        let _leave = Leave(&self.gate, ticket);
        loop {
            if outage() || self.gate.enter(ticket, || self.wait() <= self.max_wait) {
                return;
            }
            if tokio::time::timeout(RECHECK, ticket.woken()).await.is_err() {
                // No batch has ended for a while; room may have opened anyway.
                self.grant();
            }
        }
    }

    /// Gives turns for the room left under the bound.
    fn grant(&self) {
        let wait = self.wait();
        let Some(left) = self.max_wait.checked_sub(wait) else {
            return;
        };
        let per_push = self.per_push_nanos.load(Ordering::Relaxed).max(1);
        let room = u64::try_from(left.as_nanos()).unwrap_or(u64::MAX) / per_push;
        self.gate
            .grant(usize::try_from(room).unwrap_or(usize::MAX).max(1));
    }

    fn taken(&self, at: Instant) {
        self.taken_at.store(self.micros(at), Ordering::Relaxed);
    }

    /// A batch of `n` taken at `at` is routed.
    fn routed(&self, at: Instant, n: usize) {
        let nanos = u64::try_from(at.elapsed().as_nanos()).unwrap_or(u64::MAX) / n.max(1) as u64;
        let old = self.per_push_nanos.load(Ordering::Relaxed);
        self.per_push_nanos
            .store(old - old / 8 + nanos / 8, Ordering::Relaxed);
        self.taken_at.store(IDLE, Ordering::Relaxed);
        self.unrouted.fetch_sub(n, Ordering::Relaxed);
        self.grant();
    }
}

/// Takes a ticket out of line when its wait ends other than by its turn
/// (an outage, or shutdown dropping the wait).
struct Leave<'a>(&'a Gate, &'a Ticket);

impl Drop for Leave<'_> {
    fn drop(&mut self) {
        self.0.leave(self.1);
    }
}

/// The producers' side: cloned into every proxy connection.
#[derive(Clone)]
pub struct Queue {
    tx: mpsc::Sender<Queued>,
    pace: Arc<Pace>,
    dispatcher: Arc<Dispatcher>,
}

/// The push could not be queued: the queue is full (`Full`, with the push)
/// or its consumer is gone.
pub enum Refused {
    Full(Push),
    Closed,
}

impl Queue {
    /// A queue of at most `capacity` pushes for `dispatcher`, open while
    /// they wait at most `max_wait`; the receiver goes to [`run`].
    pub fn new(
        dispatcher: Arc<Dispatcher>,
        capacity: usize,
        max_wait: Duration,
    ) -> (Queue, Receiver) {
        let (tx, rx) = mpsc::channel(capacity);
        let pace = Arc::new(Pace {
            start: Instant::now(),
            taken_at: AtomicU64::new(IDLE),
            per_push_nanos: AtomicU64::new(0),
            unrouted: AtomicUsize::new(0),
            max_wait,
            gate: Gate::default(),
        });
        (
            Queue {
                tx,
                pace: pace.clone(),
                dispatcher: dispatcher.clone(),
            },
            Receiver {
                rx,
                pace,
                dispatcher,
            },
        )
    }

    /// Queues `push` if there is room now.
    pub fn try_send(&self, push: Push) -> Result<(), Refused> {
        // Counted first: the dispatcher may route it before `try_send` returns.
        self.pace.unrouted.fetch_add(1, Ordering::Relaxed);
        let at = Instant::now();
        self.tx.try_send(Queued { push, at }).map_err(|e| {
            self.pace.unrouted.fetch_sub(1, Ordering::Relaxed);
            match e {
                mpsc::error::TrySendError::Full(q) => Refused::Full(q.push),
                mpsc::error::TrySendError::Closed(_) => Refused::Closed,
            }
        })
    }

    /// Queues `push`, waiting for room; false if the consumer is gone.
    pub async fn send(&self, push: Push) -> bool {
        self.pace.unrouted.fetch_add(1, Ordering::Relaxed);
        let at = Instant::now();
        let sent = self.tx.send(Queued { push, at }).await.is_ok();
        if !sent {
            self.pace.unrouted.fetch_sub(1, Ordering::Relaxed);
        }
        sent
    }

    /// Returns once a push queued now would wait no longer than
    /// `intake.max_wait_ms` (at once, usually) and it is `ticket`'s turn
    /// among the backends held back. While the registry fails the queue
    /// rides out the outage, bounded by `intake.queue` only.
    pub async fn admitted(&self, ticket: &Arc<Ticket>) {
        self.pace
            .admitted(ticket, || self.dispatcher.registry_failing())
            .await
    }

    /// Backends held back, waiting for a turn to read.
    pub fn held(&self) -> usize {
        self.pace.gate.len()
    }

    /// Pushes waiting now.
    pub fn len(&self) -> usize {
        self.tx.max_capacity() - self.tx.capacity()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// The dispatcher's side of a [`Queue`].
pub struct Receiver {
    rx: mpsc::Receiver<Queued>,
    pace: Arc<Pace>,
    dispatcher: Arc<Dispatcher>,
}

/// Routes what the queue holds, batch by batch, until every producer is
/// gone and the queue is drained.
pub async fn run(mut queue: Receiver) {
    let dispatcher = queue.dispatcher.clone();
    let mut taken = Vec::with_capacity(BATCH);
    let mut batch = Vec::with_capacity(BATCH);
    let stages = &dispatcher.stats.stages;
    while queue.rx.recv_many(&mut taken, BATCH).await > 0 {
        let now = Instant::now();
        queue.pace.taken(now);
        batch.extend(taken.drain(..).map(|q: Queued| {
            stages.intake.observe(now - q.at);
            q.push
        }));
        if let Err(e) = dispatcher
            .route_now(&batch, Vec::new(), dispatcher.outage_wait)
            .await
        {
            error!(error = %e, pushes = batch.len(), wait_secs = dispatcher.outage_wait.as_secs(),
                "registry unreachable for longer than registry.outage_wait_secs; \
                pushes not delivered (counted in pushes_failed_registry)");
            dispatcher
                .stats
                .pushes_failed_registry
                .add(batch.len() as u64);
        }
        stages.route.observe(now.elapsed());
        // Behind the connections this batch woke: they write before more is
        // routed, so pushes wait here, where admission sees them, and not
        // in the sessions' queues.
        tokio::task::yield_now().await;
        queue.pace.routed(now, batch.len());
        batch.clear();
    }
    debug!("intake closed and drained");
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pace() -> Arc<Pace> {
        Arc::new(Pace {
            start: Instant::now(),
            taken_at: AtomicU64::new(IDLE),
            per_push_nanos: AtomicU64::new(0),
            unrouted: AtomicUsize::new(0),
            max_wait: Duration::from_millis(5),
            gate: Gate::default(),
        })
    }

    #[tokio::test(start_paused = true)]
    async fn admission_closes_while_a_batch_is_stuck_and_reopens_after() {
        let pace = pace();
        let t = Arc::default();
        pace.admitted(&t, || false).await;
        pace.unrouted.store(1, Ordering::Relaxed);
        let taken = Instant::now();
        pace.taken(taken);
        pace.admitted(&t, || false).await;
        tokio::time::advance(Duration::from_millis(6)).await;
        let waiting = tokio::spawn({
            let pace = pace.clone();
            async move { pace.admitted(&Arc::default(), || false).await }
        });
        tokio::task::yield_now().await;
        assert!(
            !waiting.is_finished(),
            "admitted while the batch ahead had taken 6 ms"
        );
        pace.admitted(&t, || true).await;
        pace.routed(taken, 1);
        tokio::time::timeout(Duration::from_secs(5), waiting)
            .await
            .expect("admitted once the batch was routed")
            .unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn the_wait_grows_with_the_pushes_ahead() {
        let pace = pace();
        pace.unrouted.store(100, Ordering::Relaxed);
        assert_eq!(pace.wait(), Duration::ZERO, "no pace measured yet");
        for _ in 0..64 {
            pace.unrouted.fetch_add(100, Ordering::Relaxed);
            let at = Instant::now();
            tokio::time::advance(Duration::from_millis(1)).await;
            pace.routed(at, 100);
        }
        pace.unrouted.store(1000, Ordering::Relaxed);
        let w = pace.wait();
        assert!(
            w >= Duration::from_micros(9_000) && w <= Duration::from_millis(20),
            "1000 pushes at ~10 µs each: {w:?}"
        );
        pace.unrouted.store(0, Ordering::Relaxed);
        assert_eq!(pace.wait(), Duration::ZERO);
    }
}
