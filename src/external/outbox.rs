//! Every QoS 1 publish to the external broker, kept until its PUBACK.
//!
//! rumqttc forgets its unacknowledged publishes when a reconnect gets
//! `session_present = 0` (a broker restarted without persistence), so the
//! outbox, not rumqttc, is the record of what is still owed. rumqttc picks
//! the packet ids; it takes publishes from its queue in order and reports
//! each one's id as it writes it (`Outgoing::Publish(pkid)`), so ids are
//! matched to entries first in, first out.

use std::collections::{BTreeMap, HashMap, VecDeque};

use bytes::Bytes;
use tokio::sync::oneshot;

/// One publish still owed to the broker.
#[derive(Debug)]
pub(crate) struct Entry {
    pub topic: String,
    pub payload: Bytes,
    /// Times it was handed to rumqttc (more than one: a republish).
    pub sends: u32,
    /// Failed attempts: refused in a PUBACK, or the lone unanswered publish
    /// when the connection was lost (see `Link::on_error`).
    pub failures: u32,
    /// The connection of the last failure.
    failed_on: Option<u64>,
    /// Told when the PUBACK arrives, for callers that wait for it.
    pub ack: Option<oneshot::Sender<()>>,
}

#[derive(Debug, Default)]
pub(crate) struct Outbox {
    next: u64,
    /// By arrival: republishing in this order keeps each topic's order.
    entries: BTreeMap<u64, Entry>,
    /// Handed to rumqttc on this connection, packet id not yet known.
    awaiting_pkid: VecDeque<u64>,
    /// Written on this connection, PUBACK not yet received.
    inflight: HashMap<u16, u64>,
    /// Connections lost so far: the current connection's number.
    conn: u64,
}

impl Outbox {
    /// Keeps a new publish; returns its sequence number.
    pub fn add(&mut self, topic: String, payload: Bytes, ack: Option<oneshot::Sender<()>>) -> u64 {
        let seq = self.next;
        self.next += 1;
        self.entries.insert(
            seq,
            Entry {
                topic,
                payload,
                sends: 0,
                failures: 0,
                failed_on: None,
                ack,
            },
        );
        seq
    }

    pub fn peek(&self, seq: u64) -> Option<&Entry> {
        self.entries.get(&seq)
    }

    /// `seq` was handed to rumqttc on the current connection.
    pub fn queued(&mut self, seq: u64) -> Option<&Entry> {
        let entry = self.entries.get_mut(&seq)?;
        entry.sends += 1;
        self.awaiting_pkid.push_back(seq);
        Some(entry)
    }

    /// rumqttc wrote the next queued publish with `pkid`.
    pub fn written(&mut self, pkid: u16) -> bool {
        match self.awaiting_pkid.pop_front() {
            Some(seq) => {
                self.inflight.insert(pkid, seq);
                true
            }
            None => false,
        }
    }

    /// The broker answered `pkid`: its entry's sequence number, no longer
    /// in flight (`take` it when done). `None` for an id this connection
    /// has no publish under.
    pub fn answered(&mut self, pkid: u16) -> Option<u64> {
        self.inflight.remove(&pkid)
    }

    /// The broker acknowledged `pkid`: the entry is done and returned.
    #[cfg(test)]
    pub fn acked(&mut self, pkid: u16) -> Option<Entry> {
        let seq = self.answered(pkid)?;
        self.take(seq)
    }

    pub fn take(&mut self, seq: u64) -> Option<Entry> {
        self.entries.remove(&seq)
    }

    /// Counts a failed attempt against `seq`; returns its failures so far.
    /// A lost connection (`lost`) is not counted against a publish already
    /// refused on it: a broker that hangs up after refusing is one failure.
    pub fn failed(&mut self, seq: u64, lost: bool) -> u32 {
        let conn = self.conn;
        self.entries.get_mut(&seq).map_or(0, |e| {
            if !(lost && e.failed_on == Some(conn)) {
                e.failures += 1;
                e.failed_on = Some(conn);
            }
            e.failures
        })
    }

    /// The publish being written when the client gave up on it.
    pub fn being_written(&self) -> Option<u64> {
        self.awaiting_pkid.front().copied()
    }

    /// The oldest publish handed over on this connection and not yet answered.
    pub fn oldest_unanswered(&self) -> Option<u64> {
        let waiting = self.awaiting_pkid.iter().min();
        self.inflight.values().chain(waiting).min().copied()
    }

    /// The connection is gone, and rumqttc's queue with it: every entry is
    /// owed again, to be handed over anew on the next connection.
    pub fn connection_lost(&mut self) {
        self.conn += 1;
        self.awaiting_pkid.clear();
        self.inflight.clear();
    }

    /// Every entry, oldest first (after `connection_lost`: all to republish).
    pub fn pending(&self) -> Vec<u64> {
        self.entries.keys().copied().collect()
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn outbox(n: usize) -> (Outbox, Vec<u64>) {
        let mut o = Outbox::default();
        let seqs = (0..n)
            .map(|i| o.add(format!("t/{i}"), Bytes::from(i.to_string()), None))
            .collect();
        (o, seqs)
    }

    #[test]
    fn entries_stay_until_their_puback() {
        let (mut o, seqs) = outbox(3);
        for &s in &seqs {
            o.queued(s).unwrap();
        }
        assert!(o.written(7) && o.written(8) && o.written(9));
        assert!(!o.written(10), "nothing else was queued");
        assert_eq!(o.acked(8).unwrap().topic, "t/1");
        assert!(o.acked(8).is_none(), "a second PUBACK for the same id");
        assert!(o.acked(42).is_none(), "an id never used");
        assert_eq!(o.pending(), vec![seqs[0], seqs[2]]);
    }

    #[test]
    fn the_waiter_is_told_at_the_puback() {
        let mut o = Outbox::default();
        let (tx, mut rx) = oneshot::channel();
        let seq = o.add("t".into(), Bytes::new(), Some(tx));
        o.queued(seq);
        o.written(1);
        assert!(rx.try_recv().is_err(), "not before the PUBACK");
        o.acked(1).unwrap().ack.unwrap().send(()).unwrap();
        assert!(rx.try_recv().is_ok());
    }

    #[test]
    fn failures_are_counted_against_the_oldest_unanswered() {
        let (mut o, seqs) = outbox(3);
        for &s in &seqs {
            o.queued(s).unwrap();
        }
        assert_eq!(o.being_written(), Some(seqs[0]));
        o.written(5);
        o.written(6);
        assert_eq!(o.being_written(), Some(seqs[2]));
        assert_eq!(o.oldest_unanswered(), Some(seqs[0]));
        assert_eq!(o.answered(5), Some(seqs[0]));
        assert_eq!(o.oldest_unanswered(), Some(seqs[1]));
        // Refused, then the connection lost: one failure on this connection.
        assert_eq!((o.failed(seqs[1], false), o.failed(seqs[1], true)), (1, 1));
        assert_eq!(o.failed(seqs[1], false), 2, "refused again");
        o.connection_lost();
        assert_eq!(o.failed(seqs[1], true), 3, "a new connection");
        assert_eq!(o.take(seqs[1]).unwrap().failures, 3);
        assert_eq!(o.failed(seqs[1], false), 0, "gone");
    }

    #[test]
    fn a_lost_connection_owes_everything_not_acked_in_order() {
        let (mut o, seqs) = outbox(4);
        for &s in &seqs[..3] {
            o.queued(s).unwrap();
        }
        o.written(1);
        o.written(2);
        o.acked(1);
        o.connection_lost();
        // pkid 2 may be reused by the next connection for another publish.
        assert!(o.acked(2).is_none());
        assert_eq!(o.pending(), seqs[1..].to_vec());
        for s in o.pending() {
            o.queued(s).unwrap();
        }
        assert_eq!(o.entries[&seqs[1]].sends, 2);
        assert_eq!(o.entries[&seqs[3]].sends, 1);
        for pkid in 1..=3 {
            o.written(pkid);
        }
        for pkid in [3, 1, 2] {
            assert!(o.acked(pkid).is_some());
        }
        assert!(o.is_empty());
    }
}
