//! Who reads next while the intake's time bound holds backends back.
//!
//! When room opens after a batch, the first backend task tokio polls used
//! to take all of it, so some backends were passed over batch after batch
//! (16 backends: most pushes waited 6 ms, the unluckiest 194). Held
//! backends now queue for a turn, and the dispatcher hands out turns first
//! come, first served as room opens, each sized by what that backend read
//! last time. A turn is given, not taken: one backend slow to be polled
//! delays only itself, never the ones behind it.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::Notify;

/// One backend's place in line (one per proxy connection).
#[derive(Debug, Default)]
pub struct Ticket {
    granted: AtomicBool,
    /// In `Gate::held`; only changed with its lock held.
    queued: AtomicBool,
    /// Pushes it queued in its last turn: what its next one will likely add.
    last: AtomicUsize,
    wake: Notify,
}

impl Ticket {
    /// Records the pushes this turn queued.
    pub fn used(&self, pushes: usize) {
        self.last.store(pushes, Ordering::Relaxed);
    }

    /// Consumes a turn given to it, if any.
    fn take_grant(&self) -> bool {
        self.granted.swap(false, Ordering::AcqRel)
    }

    /// Waits until it is given a turn (or spuriously).
    pub(super) async fn woken(&self) {
        self.wake.notified().await
    }
}

/// The line of held backends.
#[derive(Debug, Default)]
pub struct Gate {
    held: Mutex<VecDeque<Arc<Ticket>>>,
}

impl Gate {
    /// Whether `ticket` may read now: it was given a turn, or nobody is
    /// waiting and `open()`. Otherwise it joins the line (once).
    pub fn enter(&self, ticket: &Arc<Ticket>, open: impl FnOnce() -> bool) -> bool {
        let mut held = self.held.lock().unwrap_or_else(|e| e.into_inner());
        if ticket.take_grant() {
            return true;
        }
        if held.is_empty() && open() {
            return true;
        }
        if !ticket.queued.swap(true, Ordering::Relaxed) {
            held.push_back(ticket.clone());
        }
        false
    }

    /// Gives turns from the front of the line until `room` pushes are spoken
    /// for (one turn at least, when there is room at all).
    pub fn grant(&self, mut room: usize) {
        let mut held = self.held.lock().unwrap_or_else(|e| e.into_inner());
        while room > 0 {
            let Some(ticket) = held.pop_front() else {
                break;
            };
            ticket.queued.store(false, Ordering::Relaxed);
            ticket.granted.store(true, Ordering::Release);
            ticket.wake.notify_one();
            room = room.saturating_sub(ticket.last.load(Ordering::Relaxed).max(1));
        }
    }

    /// Takes `ticket` out of the line (its backend stopped waiting).
    pub fn leave(&self, ticket: &Ticket) {
        if !ticket.queued.load(Ordering::Relaxed) {
            return;
        }
        let mut held = self.held.lock().unwrap_or_else(|e| e.into_inner());
        held.retain(|t| !std::ptr::eq(&**t, ticket));
        ticket.queued.store(false, Ordering::Relaxed);
    }

    /// Backends waiting for a turn.
    pub fn len(&self) -> usize {
        self.held.lock().unwrap_or_else(|e| e.into_inner()).len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ticket(last: usize) -> Arc<Ticket> {
        let t = Arc::new(Ticket::default());
        t.used(last);
        t
    }

    #[test]
    fn turns_go_first_come_first_served_and_by_size() {
        let gate = Gate::default();
        let (a, b, c) = (ticket(30), ticket(30), ticket(30));
        assert!(gate.enter(&a, || true), "nobody waiting and open");
        for t in [&a, &b, &c] {
            assert!(!gate.enter(t, || false));
        }
        assert!(!gate.enter(&a, || false), "joins once");
        assert_eq!(gate.len(), 3);
        assert!(
            !gate.enter(&ticket(1), || true),
            "others wait: no cutting in"
        );
        gate.grant(40);
        assert!(gate.enter(&a, || false) && gate.enter(&b, || false));
        assert!(
            !gate.enter(&c, || true),
            "40 pushes of room: two turns of 30"
        );
        gate.grant(1);
        assert!(gate.enter(&c, || false), "any room gives one turn");
        assert!(!gate.enter(&c, || false), "a turn is used once");
    }

    #[test]
    fn a_backend_that_leaves_gives_up_its_place() {
        let gate = Gate::default();
        let (a, b) = (ticket(10), ticket(10));
        assert!(!gate.enter(&a, || false));
        assert!(!gate.enter(&b, || false));
        gate.leave(&a);
        gate.grant(10);
        assert!(gate.enter(&b, || false), "b is first once a left");
        assert_eq!(gate.len(), 0);
    }
}
