//! Completion signals for stream entries: an entry is acknowledged only
//! when every delivery it turned into is final (handed to the broker's
//! session queues, or APNs answered 200 or failed for good). A delivery
//! that ends any other way (shutdown) leaves the entry pending, so another
//! instance claims it.

use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use tokio::sync::{mpsc, Notify};

/// What became of an entry once its last [`Ack`] is gone.
#[derive(Debug)]
pub(crate) enum Settled {
    /// Every delivery is final: XACK it.
    Done(String),
    /// Some delivery was not: leave it pending for a claim.
    Abandoned(String),
}

struct Entry {
    id: String,
    abandoned: AtomicBool,
    settled: mpsc::UnboundedSender<Settled>,
}

impl Drop for Entry {
    fn drop(&mut self) {
        let id = std::mem::take(&mut self.id);
        let msg = if self.abandoned.load(Ordering::Relaxed) {
            Settled::Abandoned(id)
        } else {
            Settled::Done(id)
        };
        let _ = self.settled.send(msg);
    }
}

/// One holder's share of a stream entry. Dropped without [`Ack::settle`],
/// it marks the entry abandoned.
pub struct Ack {
    entry: Arc<Entry>,
    settled: bool,
}

impl Ack {
    pub(crate) fn new(id: String, settled: mpsc::UnboundedSender<Settled>) -> Ack {
        Ack {
            entry: Arc::new(Entry {
                id,
                abandoned: AtomicBool::new(false),
                settled,
            }),
            settled: false,
        }
    }

    /// Another share, for one more delivery of the same entry.
    pub fn share(&self) -> Ack {
        Ack {
            entry: Arc::clone(&self.entry),
            settled: false,
        }
    }

    /// This share's delivery is final (delivered, or failed for good).
    pub fn settle(mut self) {
        self.settled = true;
    }
}

impl Drop for Ack {
    fn drop(&mut self) {
        if !self.settled {
            self.entry.abandoned.store(true, Ordering::Relaxed);
        }
    }
}

impl fmt::Debug for Ack {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Ack({})", self.entry.id)
    }
}

/// Entries this instance is delivering: not to be claimed from itself,
/// kept from idling into another instance's claim, and awaited at shutdown.
/// Each id is held by a count (the consumer while it works on the entry,
/// and each [`Ack`] made for it until it settles), so a settled attempt
/// does not release an entry another attempt is still delivering.
#[derive(Default)]
pub(crate) struct InFlight {
    ids: Mutex<HashMap<String, u32>>,
    emptied: Notify,
}

impl InFlight {
    fn ids(&self) -> MutexGuard<'_, HashMap<String, u32>> {
        self.ids.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Adds `id` held once; false if it is already being delivered here.
    pub fn insert(&self, id: &str) -> bool {
        let mut ids = self.ids();
        if ids.contains_key(id) {
            return false;
        }
        ids.insert(id.to_owned(), 1);
        true
    }

    /// Holds `id` once more (one more [`Ack`] for it).
    pub fn hold(&self, id: &str) {
        *self.ids().entry(id.to_owned()).or_default() += 1;
    }

    pub fn contains(&self, id: &str) -> bool {
        self.ids().contains_key(id)
    }

    /// Releases one hold of `id`; it is gone when none is left.
    pub fn remove(&self, id: &str) {
        let mut ids = self.ids();
        if let Some(n) = ids.get_mut(id) {
            *n -= 1;
            if *n == 0 {
                ids.remove(id);
            }
        }
        if ids.is_empty() {
            self.emptied.notify_waiters();
        }
    }

    pub fn snapshot(&self) -> Vec<String> {
        self.ids().keys().cloned().collect()
    }

    /// Returns once nothing is in flight.
    pub async fn wait_empty(&self) {
        loop {
            let emptied = self.emptied.notified();
            if self.ids().is_empty() {
                return;
            }
            emptied.await;
        }
    }
}

/// A shared in-flight set.
pub(crate) type InFlightRef = Arc<InFlight>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn done_only_when_every_share_settles() {
        let (tx, mut rx) = mpsc::unbounded_channel();
        let root = Ack::new("1-0".into(), tx.clone());
        let a = root.share();
        let b = root.share();
        root.settle();
        a.settle();
        assert!(rx.try_recv().is_err(), "b still out");
        b.settle();
        assert!(matches!(rx.try_recv(), Ok(Settled::Done(id)) if id == "1-0"));

        let root = Ack::new("2-0".into(), tx);
        let a = root.share();
        root.settle();
        drop(a);
        assert!(matches!(rx.try_recv(), Ok(Settled::Abandoned(id)) if id == "2-0"));
    }
}
