//! Sessions and the registry that owns them.
//!
//! A session outlives its connections when it is persistent: it keeps the
//! subscriptions, the queue of messages not yet sent and the QoS 1 messages
//! not yet acknowledged. Publishers only ever append to a session's bounded
//! queue and wake its connection, so a slow reader never blocks them.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::Notify;
use tokio::time::Instant;

use super::topics::Index;

/// One message on its way to one session; topic and payload are shared.
#[derive(Debug, Clone)]
pub struct Msg {
    pub topic: Arc<str>,
    pub payload: Bytes,
    pub qos: u8,
}

/// A QoS 1 message sent (or to be re-sent) and not yet acknowledged.
#[derive(Debug)]
pub struct Inflight {
    pub pkid: u16,
    pub msg: Msg,
    /// False after a reconnect: must be sent again with DUP set.
    pub sent: bool,
}

/// The connection a session is attached to, and how to wake it.
#[derive(Debug, Clone)]
pub struct Owner {
    pub conn: u64,
    pub wake: Arc<Notify>,
}

#[derive(Debug, Default)]
pub struct State {
    pub owner: Option<Owner>,
    pub queue: VecDeque<Msg>,
    pub inflight: VecDeque<Inflight>,
    next_pkid: u16,
    /// Inbound QoS 2 packet ids between PUBLISH and PUBREL (exactly-once).
    pub qos2_in: Vec<u16>,
    pub filters: Filters,
    /// Seconds the session survives its connection; 0 = ends with it.
    pub expiry: u32,
    expires_at: Option<Instant>,
    /// Removed from the registry: accepts nothing more.
    gone: bool,
}

/// A session's filters and their QoS. A device has one or two, so a
/// vector (one small allocation, scanned) instead of a hash table (a
/// 100-byte table per session): this is per connected device.
#[derive(Debug, Default)]
pub struct Filters(Vec<(Box<str>, u8)>);

impl Filters {
    pub fn len(&self) -> usize {
        self.0.len()
    }

    pub fn contains_key(&self, filter: &str) -> bool {
        self.0.iter().any(|(f, _)| &**f == filter)
    }

    /// Adds `filter`, or sets its QoS if it is there.
    pub fn insert(&mut self, filter: Box<str>, qos: u8) {
        match self.0.iter_mut().find(|(f, _)| *f == filter) {
            Some(entry) => entry.1 = qos,
            None => self.0.push((filter, qos)),
        }
    }

    pub fn remove(&mut self, filter: &str) {
        self.0.retain(|(f, _)| &**f != filter);
    }

    pub fn keys(&self) -> impl Iterator<Item = &Box<str>> {
        self.0.iter().map(|(f, _)| f)
    }

    pub fn into_keys(self) -> impl Iterator<Item = Box<str>> {
        self.0.into_iter().map(|(f, _)| f)
    }
}

impl State {
    /// A packet id not used by any inflight message.
    pub fn next_pkid(&mut self) -> u16 {
        loop {
            self.next_pkid = self.next_pkid.wrapping_add(1).max(1);
            let id = self.next_pkid;
            if !self.inflight.iter().any(|m| m.pkid == id) {
                return id;
            }
        }
    }

    /// Nothing left to send, nothing waiting for an acknowledgement.
    pub fn is_idle(&self) -> bool {
        self.queue.is_empty() && self.inflight.is_empty()
    }

    /// Is `conn` (still) the connection this session belongs to?
    pub fn owned_by(&self, conn: u64) -> bool {
        !self.gone && self.owner.as_ref().is_some_and(|o| o.conn == conn)
    }
}

#[derive(Debug)]
pub struct Session {
    pub id: u64,
    pub client_id: Arc<str>,
    state: Mutex<State>,
}

impl Session {
    pub fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Queues `msg` and wakes the connection; false if the queue is full or the session gone.
    pub fn push(&self, msg: Msg, max_queued: usize) -> bool {
        let mut st = self.lock();
        if st.gone || st.queue.len() >= max_queued {
            return false;
        }
        st.queue.push_back(msg);
        if let Some(o) = &st.owner {
            o.wake.notify_one();
        }
        true
    }
}

/// The result of attaching a connection to a session.
pub struct Attached {
    pub session: Arc<Session>,
    pub present: bool,
}

/// All sessions by client id, their subscriptions, and offline expiry.
#[derive(Default)]
pub struct Registry {
    pub index: Index<Arc<Session>>,
    sessions: HashMap<Arc<str>, Arc<Session>>,
    expiring: BTreeMap<(Instant, u64), Arc<Session>>,
    next_sid: u64,
}

impl Registry {
    /// Attaches connection `owner` to `client_id`'s session, taking it over from
    /// any connection holding it (that one is woken and finds itself evicted).
    pub fn attach(&mut self, client_id: &str, clean: bool, expiry: u32, owner: Owner) -> Attached {
        let now = Instant::now();
        if let Some(old) = self.sessions.get(client_id).cloned() {
            let expired = old.lock().expires_at.is_some_and(|t| t <= now);
            if clean || expired {
                self.remove(&old);
            } else {
                let mut st = old.lock();
                if let Some(t) = st.expires_at.take() {
                    self.expiring.remove(&(t, old.id));
                }
                if let Some(prev) = st.owner.replace(owner) {
                    prev.wake.notify_one();
                }
                st.expiry = expiry;
                for m in st.inflight.iter_mut() {
                    m.sent = false;
                }
                drop(st);
                return Attached {
                    session: old,
                    present: true,
                };
            }
        }
        self.next_sid += 1;
        let client_id: Arc<str> = client_id.into();
        let session = Arc::new(Session {
            id: self.next_sid,
            client_id: client_id.clone(),
            state: Mutex::new(State {
                owner: Some(owner),
                expiry,
                ..State::default()
            }),
        });
        self.sessions.insert(client_id, session.clone());
        Attached {
            session,
            present: false,
        }
    }

    /// Connection `conn` has ended: drop the session or start its expiry clock.
    pub fn detach(&mut self, session: &Arc<Session>, conn: u64) {
        let mut st = session.lock();
        if !st.owned_by(conn) {
            return;
        }
        st.owner = None;
        if st.expiry == 0 {
            drop(st);
            self.remove(session);
            return;
        }
        let at = Instant::now() + Duration::from_secs(st.expiry.into());
        st.expires_at = Some(at);
        drop(st);
        self.expiring.insert((at, session.id), session.clone());
    }

    /// Removes sessions whose expiry has passed; returns how many.
    pub fn sweep(&mut self, now: Instant) -> usize {
        let mut n = 0;
        while let Some(entry) = self.expiring.first_entry() {
            if entry.key().0 > now {
                break;
            }
            let s = entry.remove();
            self.remove(&s);
            n += 1;
        }
        n
    }

    pub fn subscribe(&mut self, session: &Arc<Session>, filter: &str, qos: u8) {
        let mut st = session.lock();
        if st.gone {
            return;
        }
        st.filters.insert(filter.into(), qos);
        self.index
            .subscribe(filter, session.id, session.clone(), qos);
    }

    pub fn unsubscribe(&mut self, session: &Arc<Session>, filter: &str) {
        session.lock().filters.remove(filter);
        self.index.unsubscribe(filter, session.id);
    }

    /// Sessions (connected or not) subscribed to `topic`, with their QoS.
    #[cfg(test)]
    pub fn route(&self, topic: &str) -> Vec<(u64, Arc<Session>, u8)> {
        let mut out = Vec::new();
        self.index.matches(topic, &mut out);
        out
    }

    /// `route` into a buffer the caller reuses; returns the index's shared
    /// copy of `topic` when an exact subscription has one.
    pub fn route_into(
        &self,
        topic: &str,
        out: &mut Vec<(u64, Arc<Session>, u8)>,
    ) -> Option<Arc<str>> {
        self.index.matches(topic, out)
    }

    pub fn len(&self) -> usize {
        self.sessions.len()
    }

    #[cfg(test)]
    pub fn is_empty(&self) -> bool {
        self.sessions.is_empty()
    }

    fn remove(&mut self, session: &Arc<Session>) {
        if self
            .sessions
            .get(&session.client_id)
            .is_some_and(|s| Arc::ptr_eq(s, session))
        {
            self.sessions.remove(&session.client_id);
        }
        let mut st = session.lock();
        st.gone = true;
        if let Some(t) = st.expires_at.take() {
            self.expiring.remove(&(t, session.id));
        }
        for filter in std::mem::take(&mut st.filters).into_keys() {
            self.index.unsubscribe(&filter, session.id);
        }
        st.queue = VecDeque::new();
        st.inflight = VecDeque::new();
        if let Some(o) = st.owner.take() {
            o.wake.notify_one();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn owner(conn: u64) -> Owner {
        Owner {
            conn,
            wake: Arc::new(Notify::new()),
        }
    }

    fn msg(t: &str) -> Msg {
        Msg {
            topic: t.into(),
            payload: Bytes::from_static(b"x"),
            qos: 1,
        }
    }

    #[tokio::test]
    async fn clean_session_is_removed_with_its_subscriptions() {
        let mut r = Registry::default();
        let a = r.attach("c1", true, 0, owner(1));
        assert!(!a.present);
        r.subscribe(&a.session, "push/user/1", 1);
        r.subscribe(&a.session, "push/+/2", 1);
        assert_eq!(r.route("push/user/1").len(), 1);
        r.detach(&a.session, 1);
        assert!(r.is_empty());
        assert!(r.index.is_empty());
        assert!(!a.session.push(msg("push/user/1"), 10));
    }

    #[tokio::test]
    async fn persistent_session_queues_offline_and_resumes() {
        let mut r = Registry::default();
        let a = r.attach("c1", false, 60, owner(1));
        r.subscribe(&a.session, "push/user/1", 1);
        r.detach(&a.session, 1);
        assert_eq!(r.len(), 1);
        for (s, _) in r.route("push/user/1").iter().map(|(_, s, q)| (s, q)) {
            assert!(s.push(msg("push/user/1"), 1));
            assert!(!s.push(msg("push/user/1"), 1), "queue bound");
        }
        let b = r.attach("c1", false, 60, owner(2));
        assert!(b.present);
        assert!(Arc::ptr_eq(&a.session, &b.session));
        assert_eq!(b.session.lock().queue.len(), 1);
    }

    #[tokio::test]
    async fn takeover_wakes_the_old_owner() {
        let mut r = Registry::default();
        let o1 = owner(1);
        let a = r.attach("c1", false, 60, o1.clone());
        let b = r.attach("c1", false, 60, owner(2));
        assert!(Arc::ptr_eq(&a.session, &b.session));
        assert!(!a.session.lock().owned_by(1));
        tokio::time::timeout(Duration::from_secs(5), o1.wake.notified())
            .await
            .unwrap();
        r.detach(&a.session, 1);
        assert_eq!(r.len(), 1, "old owner's detach leaves the session alone");
        let c = r.attach("c1", true, 0, owner(3));
        assert!(!c.present);
        assert!(!Arc::ptr_eq(&a.session, &c.session));
        assert!(!a.session.lock().owned_by(2));
    }

    #[test]
    fn expired_sessions_are_swept() {
        let mut r = Registry::default();
        let a = r.attach("c1", false, 10, owner(1));
        r.subscribe(&a.session, "push/user/1", 1);
        r.detach(&a.session, 1);
        assert_eq!(r.sweep(Instant::now()), 0);
        assert_eq!(r.sweep(Instant::now() + Duration::from_secs(11)), 1);
        assert!(r.is_empty());
        assert!(r.index.is_empty());
    }

    #[test]
    fn pkids_skip_inflight_and_zero() {
        let mut st = State {
            next_pkid: u16::MAX - 1,
            ..State::default()
        };
        assert_eq!(st.next_pkid(), u16::MAX);
        st.inflight.push_back(Inflight {
            pkid: 1,
            msg: msg("t"),
            sent: true,
        });
        assert_eq!(st.next_pkid(), 2);
    }
}
