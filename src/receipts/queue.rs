//! The changes waiting for the writer: a vector behind a lock that the
//! writer takes whole, so queueing a change is a push under a lock (the
//! vector grows by doubling) and wakes the writer only when it goes into
//! an empty queue.
//! Bounded by `receipts.queue`: beyond it a change is refused (the caller
//! counts it).

use std::sync::{Mutex, MutexGuard};

use tokio::sync::Notify;

use super::Change;

pub(super) struct Queue {
    state: Mutex<State>,
    max: usize,
    /// Rung when a change goes into an empty queue.
    bell: Notify,
}

struct State {
    changes: Vec<Change>,
    closed: bool,
}

impl Queue {
    pub(super) fn new(max: usize) -> Queue {
        Queue {
            state: Mutex::new(State {
                changes: Vec::new(),
                closed: false,
            }),
            max,
            bell: Notify::new(),
        }
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Queues `change`; false if the queue is full or closed.
    pub(super) fn push(&self, change: Change) -> bool {
        let mut state = self.state();
        if state.closed || state.changes.len() >= self.max {
            return false;
        }
        let first = state.changes.is_empty();
        state.changes.push(change);
        drop(state);
        if first {
            self.bell.notify_one();
        }
        true
    }

    /// Waits until a change may have come.
    pub(super) async fn rung(&self) {
        self.bell.notified().await;
    }

    /// Takes what is queued, and with `close`, refuses every later change.
    pub(super) fn take(&self, close: bool) -> Vec<Change> {
        let mut state = self.state();
        state.closed |= close;
        std::mem::take(&mut state.changes)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::push::{Id, PushId};
    use crate::receipts::Event;

    fn change() -> Change {
        let user = Id::from(1u64);
        (PushId::generate(), 1, Event::OfflineKept { user })
    }

    #[test]
    fn bounded_and_closed() {
        let q = Queue::new(2);
        assert!(q.push(change()) && q.push(change()));
        assert!(!q.push(change()), "over the bound");
        assert_eq!(q.take(false).len(), 2);
        assert!(q.push(change()));
        assert_eq!(q.take(true).len(), 1);
        assert!(!q.push(change()), "closed");
    }
}
