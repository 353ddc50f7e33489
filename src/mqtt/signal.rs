//! What wakes an idle connection's task, and when.
//!
//! Each connection has one small shared [`Signal`]: publishers set it when
//! they queue a message, a takeover or shutdown sets it, and the broker's
//! once-a-second sweep ([`Clocks::sweep`]) sets it when the connection's
//! next deadline (keep-alive, packet timeout, token expiry, shutdown drain)
//! has passed. A `Notify` plus the future waiting on it and a timer per
//! connection cost ~240 bytes of every idle device; this costs 48, plus
//! 16 in the sweep's list, and a deadline is noticed up to a second late.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll};

use futures_util::task::AtomicWaker;
use slab::Slab;
use tokio::sync::Notify;
use tokio::time::Instant;

/// Deadline never (the sweep skips it).
const NEVER: u64 = u64::MAX;

#[derive(Debug)]
pub struct Signal {
    waker: AtomicWaker,
    woken: AtomicBool,
    /// Set with `woken` by the sweep: a deadline may have passed.
    late: AtomicBool,
    /// The connection's next deadline, in ms after [`Clocks`]' epoch.
    due: AtomicU64,
}

impl Default for Signal {
    fn default() -> Self {
        Signal {
            waker: AtomicWaker::new(),
            woken: AtomicBool::new(false),
            late: AtomicBool::new(false),
            due: AtomicU64::new(NEVER),
        }
    }
}

/// What a woken connection is to look at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Woken {
    /// One of its deadlines may have passed: read the clock.
    pub late: bool,
}

impl Signal {
    /// Wakes the connection (messages queued, taken over, stopping).
    pub fn wake(&self) {
        self.woken.store(true, Ordering::Release);
        self.waker.wake();
    }

    fn wake_late(&self) {
        self.late.store(true, Ordering::Relaxed);
        self.wake();
    }

    /// Ready once after each wake (wakes before the poll are not lost).
    pub fn poll_woken(&self, cx: &mut Context<'_>) -> Poll<Woken> {
        if !self.woken.load(Ordering::Acquire) {
            self.waker.register(cx.waker());
            if !self.woken.load(Ordering::Acquire) {
                return Poll::Pending;
            }
        }
        self.woken.store(false, Ordering::Release);
        let late = self.late.swap(false, Ordering::Relaxed);
        Poll::Ready(Woken { late })
    }
}

/// The signals of every connected client, for the sweep and for shutdown.
#[derive(Debug)]
pub struct Clocks {
    epoch: Instant,
    live: Mutex<Slab<Arc<Signal>>>,
    /// The last connection has gone (a stop waits for it, not for a sweep).
    emptied: Notify,
}

impl Default for Clocks {
    fn default() -> Self {
        Clocks {
            epoch: Instant::now(),
            live: Mutex::default(),
            emptied: Notify::new(),
        }
    }
}

impl Clocks {
    fn live(&self) -> MutexGuard<'_, Slab<Arc<Signal>>> {
        self.live.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Adds a connection's signal; the key removes it.
    pub fn register(&self, signal: Arc<Signal>) -> usize {
        self.live().insert(signal)
    }

    pub fn remove(&self, key: usize) {
        let mut live = self.live();
        live.try_remove(key);
        if live.is_empty() {
            self.emptied.notify_waiters();
        }
    }

    /// Sets when the connection behind `signal` must next be woken to
    /// look at its deadlines (`None`: never).
    pub fn arm(&self, signal: &Signal, at: Option<Instant>) {
        let due = at.map_or(NEVER, |at| {
            let ms = at
                .saturating_duration_since(self.epoch)
                .as_nanos()
                .div_ceil(1_000_000);
            u64::try_from(ms).unwrap_or(NEVER)
        });
        signal.due.store(due, Ordering::Relaxed);
    }

    /// Wakes the connections whose deadline is at or before `now`; how many.
    pub fn sweep(&self, now: Instant) -> usize {
        let now = u64::try_from(now.saturating_duration_since(self.epoch).as_millis())
            .unwrap_or(NEVER - 1);
        let mut n = 0;
        for (_, s) in self.live().iter() {
            if s.due.load(Ordering::Relaxed) <= now {
                s.wake_late();
                n += 1;
            }
        }
        n
    }

    /// Wakes every connection (the broker is stopping).
    pub fn wake_all(&self) {
        for (_, s) in self.live().iter() {
            s.wake();
        }
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.live().len()
    }

    pub fn is_empty(&self) -> bool {
        self.live().is_empty()
    }

    /// Returns once no connection is left.
    pub async fn until_empty(&self) {
        loop {
            let emptied = self.emptied.notified();
            tokio::pin!(emptied);
            emptied.as_mut().enable();
            if self.is_empty() {
                return;
            }
            emptied.await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::task::Waker;
    use std::time::Duration;

    fn poll(s: &Signal) -> Poll<Woken> {
        s.poll_woken(&mut Context::from_waker(Waker::noop()))
    }

    #[test]
    fn a_wake_is_seen_once() {
        let s = Signal::default();
        assert_eq!(poll(&s), Poll::Pending);
        s.wake();
        s.wake();
        assert_eq!(poll(&s), Poll::Ready(Woken { late: false }));
        assert_eq!(poll(&s), Poll::Pending);
    }

    #[tokio::test(start_paused = true)]
    async fn the_sweep_wakes_only_connections_past_their_deadline() {
        let clocks = Clocks::default();
        let (soon, later, never) = (
            Arc::new(Signal::default()),
            Arc::new(Signal::default()),
            Arc::new(Signal::default()),
        );
        let now = Instant::now();
        clocks.arm(&soon, Some(now + Duration::from_millis(1500)));
        clocks.arm(&later, Some(now + Duration::from_secs(60)));
        clocks.arm(&never, None);
        let keys: Vec<usize> = [&soon, &later, &never]
            .into_iter()
            .map(|s| clocks.register(s.clone()))
            .collect();
        assert_eq!(clocks.sweep(now + Duration::from_secs(1)), 0);
        assert_eq!(poll(&soon), Poll::Pending);
        assert_eq!(clocks.sweep(now + Duration::from_secs(2)), 1);
        assert_eq!(poll(&soon), Poll::Ready(Woken { late: true }));
        assert_eq!(poll(&later), Poll::Pending);
        clocks.remove(keys[0]);
        assert_eq!(clocks.sweep(now + Duration::from_secs(3600)), 1);
        assert_eq!(poll(&later), Poll::Ready(Woken { late: true }));
        assert_eq!(poll(&never), Poll::Pending);
        assert_eq!(clocks.len(), 2);
    }
}
