//! Sessions and the table that owns them.
//!
//! A session outlives its connections when it is persistent: it keeps the
//! subscriptions, the queue of messages not yet sent and the QoS 1 messages
//! not yet acknowledged. Publishers only ever append to a session's bounded
//! queue and wake its connection, so a slow reader never blocks them.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::num::NonZeroU64;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use bytes::Bytes;
use tokio::time::Instant;

use super::signal::Signal;
use super::topics::Index;
use crate::receipts::Tag;

/// One message on its way to one session; topic and payload are shared.
#[derive(Debug, Clone)]
pub struct Msg {
    pub topic: Arc<str>,
    pub payload: Bytes,
    pub qos: u8,
    /// When it was queued; once written, when it was written (the stage
    /// histograms).
    pub at: Instant,
    /// What only some pushes carry (a receipt, an expiry); one pointer,
    /// so a message without them stays as small as before.
    pub meta: Option<Arc<Meta>>,
}

/// A message's receipt tag and expiry.
#[derive(Debug, Default)]
pub struct Meta {
    /// The push asked for a receipt: each PUBACK is reported through it.
    pub tag: Option<Tag>,
    /// Unix ms after which the message is not sent (its TTL); non-zero,
    /// so the `Arc<Meta>` a receipt costs is 8 bytes smaller.
    pub expires_ms: Option<NonZeroU64>,
}

impl Msg {
    /// Whether its TTL has passed (the clock is read only for a message
    /// that has one).
    pub fn expired(&self) -> bool {
        self.expires_ms()
            .is_some_and(|at| at <= crate::utc::now_ms())
    }

    /// Whole seconds left of its TTL (at least 1): the v5 message expiry
    /// interval it is sent with.
    pub fn expiry_secs(&self) -> Option<u32> {
        let left = self.expires_ms()?.saturating_sub(crate::utc::now_ms());
        Some(u32::try_from(left.div_ceil(1000).max(1)).unwrap_or(u32::MAX))
    }

    fn expires_ms(&self) -> Option<u64> {
        self.meta.as_ref()?.expires_ms.map(NonZeroU64::get)
    }
}

impl Msg {
    /// What the message counts against the offline budget: its topic and
    /// payload as if they were its own (they are shared in fact), plus the
    /// queue entry.
    pub fn cost(&self) -> usize {
        self.topic.len() + self.payload.len() + 64
    }
}

/// Bytes queued in the sessions that have no connection, across the
/// broker (`mqtt.max_queued_bytes`).
#[derive(Debug)]
pub struct Budget {
    used: AtomicUsize,
    max: usize,
}

impl Default for Budget {
    fn default() -> Self {
        Budget::new(usize::MAX)
    }
}

impl Budget {
    pub fn new(max: usize) -> Budget {
        Budget {
            used: AtomicUsize::new(0),
            max,
        }
    }

    pub fn used(&self) -> usize {
        self.used.load(Ordering::Relaxed)
    }

    /// Adds `n`; returns the new total.
    fn add(&self, n: usize) -> usize {
        self.used.fetch_add(n, Ordering::Relaxed).saturating_add(n)
    }

    /// Takes `n` off; returns the new total. Saturating: a miscount must
    /// not wrap into a budget that refuses everything.
    fn sub(&self, n: usize) -> usize {
        let sub = |u: usize| Some(u.saturating_sub(n));
        let old = self
            .used
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, sub);
        old.unwrap_or(0).saturating_sub(n)
    }
}

/// What `Session::push` did with a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pushed {
    /// Queued, after dropping this many older messages of the session to
    /// stay within the offline budget.
    Queued(usize),
    /// Not queued: the session's queue is full, the offline budget is spent
    /// (and the session had nothing older to give up), or it is gone.
    Refused,
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
    pub wake: Arc<Signal>,
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
    /// Whose session this is, for `mqtt.max_sessions_per_user` (shared
    /// with the table's per-user list).
    user: Option<Arc<str>>,
    expires_at: Option<Instant>,
    /// Removed from the table: accepts nothing more.
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
            None => {
                // Grown one at a time (a first push would make room for four).
                self.0.reserve_exact(1);
                self.0.push((filter, qos));
            }
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

    /// What the queue counts against the offline budget.
    fn queue_cost(&self) -> usize {
        self.queue.iter().map(Msg::cost).sum()
    }

    /// Frees the message buffers that are empty: a session holds them only
    /// while messages wait (each kept room for four after its first use).
    pub fn free_empty(&mut self) {
        if self.queue.is_empty() {
            self.queue = VecDeque::new();
        }
        if self.inflight.is_empty() {
            self.inflight = VecDeque::new();
        }
        if self.qos2_in.is_empty() {
            self.qos2_in = Vec::new();
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

    /// Queues `msg` and wakes the connection. A session without a
    /// connection counts its queue against `budget`; over it, the session's
    /// oldest messages make room, and with none left the message is refused.
    pub fn push(&self, msg: Msg, max_queued: usize, budget: &Budget) -> Pushed {
        let mut st = self.lock();
        if st.gone || st.queue.len() >= max_queued {
            return Pushed::Refused;
        }
        let mut dropped = 0;
        if st.owner.is_none() {
            let cost = msg.cost();
            let mut used = budget.add(cost);
            while used > budget.max {
                match st.queue.pop_front() {
                    Some(old) => {
                        used = budget.sub(old.cost());
                        dropped += 1;
                    }
                    None => {
                        budget.sub(cost);
                        return Pushed::Refused;
                    }
                }
            }
        }
        st.queue.push_back(msg);
        if let Some(o) = &st.owner {
            o.wake.wake();
        }
        Pushed::Queued(dropped)
    }

    /// Takes every queued message (a connection-less consumer, benchmarks).
    #[cfg(any(test, feature = "bench"))]
    pub fn drain_offline(&self, budget: &Budget) -> usize {
        let mut st = self.lock();
        if st.owner.is_none() {
            budget.sub(st.queue_cost());
        }
        let n = st.queue.len();
        st.queue.clear();
        n
    }
}

/// The result of attaching a connection to a session.
pub struct Attached {
    pub session: Arc<Session>,
    pub present: bool,
}

/// A user's sessions, oldest first. Nearly every user has one device, so
/// one is kept inline: no allocation besides the map's slot.
enum Owned {
    One(Arc<Session>),
    Many(Vec<Arc<Session>>),
}

impl Owned {
    fn many(&mut self) -> &mut Vec<Arc<Session>> {
        if let Owned::One(s) = self {
            *self = Owned::Many(vec![s.clone()]);
        }
        match self {
            Owned::Many(v) => v,
            Owned::One(_) => unreachable!(),
        }
    }

    /// Removes `session`; true if nothing is left.
    fn remove(&mut self, session: &Arc<Session>) -> bool {
        match self {
            Owned::One(s) => Arc::ptr_eq(s, session),
            Owned::Many(v) => {
                v.retain(|s| !Arc::ptr_eq(s, session));
                if v.len() == 1 {
                    *self = Owned::One(v[0].clone());
                    return false;
                }
                v.is_empty()
            }
        }
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        match self {
            Owned::One(_) => 1,
            Owned::Many(v) => v.len(),
        }
    }
}

/// All sessions by client id, their subscriptions, offline expiry, and
/// each user's sessions (oldest first).
pub struct SessionTable {
    pub index: Index<Arc<Session>>,
    sessions: HashMap<Arc<str>, Arc<Session>>,
    expiring: BTreeMap<(Instant, u64), Arc<Session>>,
    users: HashMap<Arc<str>, Owned>,
    max_per_user: usize,
    pub budget: Arc<Budget>,
    next_sid: u64,
}

impl Default for SessionTable {
    fn default() -> Self {
        SessionTable::new(usize::MAX, Arc::default())
    }
}

impl SessionTable {
    pub fn new(max_per_user: usize, budget: Arc<Budget>) -> SessionTable {
        SessionTable {
            index: Index::default(),
            sessions: HashMap::new(),
            expiring: BTreeMap::new(),
            users: HashMap::new(),
            max_per_user: max_per_user.max(1),
            budget,
            next_sid: 0,
        }
    }

    /// Charges `session` to `user` (a session keeps its first user), then
    /// removes that user's sessions beyond `max_per_user`: the oldest
    /// without a connection first, else (with `connected`) the oldest.
    /// Returns how many.
    pub fn own(&mut self, session: &Arc<Session>, user: &str, connected: bool) -> usize {
        let key = match self.users.get_key_value(user) {
            Some((k, _)) => k.clone(),
            None => Arc::from(user),
        };
        {
            let mut st = session.lock();
            if st.gone || st.user.is_some() {
                return 0;
            }
            st.user = Some(key.clone());
        }
        let owned = match self.users.entry(key) {
            std::collections::hash_map::Entry::Vacant(e) => {
                e.insert(Owned::One(session.clone()));
                return 0;
            }
            std::collections::hash_map::Entry::Occupied(e) => e.into_mut(),
        };
        let list = owned.many();
        list.push(session.clone());
        let mut victims = Vec::new();
        while list.len() > self.max_per_user {
            let offline = list.iter().position(|s| s.lock().owner.is_none());
            match offline.or(connected.then_some(0)) {
                Some(i) => victims.push(list.remove(i)),
                None => break,
            }
        }
        if list.len() == 1 {
            *owned = Owned::One(list[0].clone());
        }
        for v in &victims {
            self.remove(v);
        }
        victims.len()
    }

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
                match st.owner.replace(owner) {
                    Some(prev) => prev.wake.wake(),
                    None => {
                        self.budget.sub(st.queue_cost());
                    }
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

    /// Connection `conn` has ended: drop the session or start its expiry
    /// clock; true if it is kept (offline).
    pub fn detach(&mut self, session: &Arc<Session>, conn: u64) -> bool {
        let mut st = session.lock();
        if !st.owned_by(conn) {
            return false;
        }
        if st.expiry == 0 {
            drop(st);
            self.remove(session);
            return false;
        }
        st.owner = None;
        self.budget.add(st.queue_cost());
        let at = Instant::now() + Duration::from_secs(st.expiry.into());
        st.expires_at = Some(at);
        drop(st);
        self.expiring.insert((at, session.id), session.clone());
        true
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

    /// `route` into a buffer the caller reuses, exact subscribers first;
    /// returns the index's shared copy of `topic` when an exact
    /// subscription has one, and the number of exact subscribers.
    pub fn route_into(
        &self,
        topic: &str,
        out: &mut Vec<(u64, Arc<Session>, u8)>,
    ) -> (Option<Arc<str>>, usize) {
        self.index.matches(topic, out)
    }

    pub fn len(&self) -> usize {
        self.sessions.len()
    }

    /// Stops charging `session` to its user (without tokens: a session
    /// connected again no longer counts as its address's offline one).
    pub fn disown(&mut self, session: &Arc<Session>) {
        let user = session.lock().user.take();
        if let Some(user) = user {
            self.unlist(&user, session);
        }
    }

    fn unlist(&mut self, user: &Arc<str>, session: &Arc<Session>) {
        if let Some(owned) = self.users.get_mut(user) {
            if owned.remove(session) {
                self.users.remove(user);
            }
        }
    }

    /// Whether `session` is charged to a user yet.
    pub fn is_owned(session: &Session) -> bool {
        session.lock().user.is_some()
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
        if st.gone {
            return;
        }
        st.gone = true;
        if st.owner.is_none() {
            self.budget.sub(st.queue_cost());
        }
        if let Some(user) = st.user.take() {
            self.unlist(&user, session);
        }
        if let Some(t) = st.expires_at.take() {
            self.expiring.remove(&(t, session.id));
        }
        for filter in std::mem::take(&mut st.filters).into_keys() {
            self.index.unsubscribe(&filter, session.id);
        }
        st.queue = VecDeque::new();
        st.inflight = VecDeque::new();
        if let Some(o) = st.owner.take() {
            o.wake.wake();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn owner(conn: u64) -> Owner {
        Owner {
            conn,
            wake: Arc::default(),
        }
    }

    fn msg(t: &str) -> Msg {
        Msg {
            meta: None,
            at: Instant::now(),
            topic: t.into(),
            payload: Bytes::from_static(b"x"),
            qos: 1,
        }
    }

    #[tokio::test]
    async fn clean_session_is_removed_with_its_subscriptions() {
        let mut r = SessionTable::default();
        let a = r.attach("c1", true, 0, owner(1));
        assert!(!a.present);
        r.subscribe(&a.session, "push/user/1", 1);
        r.subscribe(&a.session, "push/+/2", 1);
        assert_eq!(r.route("push/user/1").len(), 1);
        r.detach(&a.session, 1);
        assert!(r.is_empty());
        assert!(r.index.is_empty());
        let budget = Budget::default();
        assert_eq!(
            a.session.push(msg("push/user/1"), 10, &budget),
            Pushed::Refused
        );
    }

    #[tokio::test]
    async fn persistent_session_queues_offline_and_resumes() {
        let mut r = SessionTable::default();
        let a = r.attach("c1", false, 60, owner(1));
        r.subscribe(&a.session, "push/user/1", 1);
        r.detach(&a.session, 1);
        assert_eq!(r.len(), 1);
        for (s, _) in r.route("push/user/1").iter().map(|(_, s, q)| (s, q)) {
            let b = &r.budget;
            assert_eq!(s.push(msg("push/user/1"), 1, b), Pushed::Queued(0));
            assert_eq!(
                s.push(msg("push/user/1"), 1, b),
                Pushed::Refused,
                "queue bound"
            );
        }
        let b = r.attach("c1", false, 60, owner(2));
        assert!(b.present);
        assert!(Arc::ptr_eq(&a.session, &b.session));
        assert_eq!(b.session.lock().queue.len(), 1);
    }

    #[tokio::test]
    async fn takeover_wakes_the_old_owner() {
        let mut r = SessionTable::default();
        let o1 = owner(1);
        let a = r.attach("c1", false, 60, o1.clone());
        let b = r.attach("c1", false, 60, owner(2));
        assert!(Arc::ptr_eq(&a.session, &b.session));
        assert!(!a.session.lock().owned_by(1));
        let woken = std::future::poll_fn(|cx| o1.wake.poll_woken(cx));
        tokio::time::timeout(Duration::from_secs(5), woken)
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
        let mut r = SessionTable::default();
        let a = r.attach("c1", false, 10, owner(1));
        r.subscribe(&a.session, "push/user/1", 1);
        r.detach(&a.session, 1);
        assert_eq!(r.sweep(Instant::now()), 0);
        assert_eq!(r.sweep(Instant::now() + Duration::from_secs(11)), 1);
        assert!(r.is_empty());
        assert!(r.index.is_empty());
    }

    #[tokio::test]
    async fn a_user_keeps_at_most_max_sessions_oldest_offline_dropped_first() {
        let mut r = SessionTable::new(2, Arc::default());
        let a = r.attach("u/a", false, 60, owner(1)).session;
        assert_eq!(r.own(&a, "u", true), 0);
        let b = r.attach("u/b", false, 60, owner(2)).session;
        assert_eq!(r.own(&b, "u", true), 0);
        r.detach(&b, 2);
        // Another user's sessions do not count.
        let other = r.attach("v/a", false, 60, owner(3)).session;
        assert_eq!(r.own(&other, "v", true), 0);
        let c = r.attach("u/c", false, 60, owner(4)).session;
        assert_eq!(r.own(&c, "u", true), 1);
        assert!(b.lock().gone, "the offline one goes first, though younger");
        assert!(!a.lock().gone);
        let d = r.attach("u/d", false, 60, owner(5)).session;
        assert_eq!(r.own(&d, "u", true), 1);
        assert!(a.lock().gone, "then the oldest");
        assert_eq!(r.len(), 3);
        assert_eq!(r.users["u"].len(), 2);
        r.detach(&c, 4);
        r.detach(&d, 5);
        r.sweep(Instant::now() + Duration::from_secs(61));
        assert!(!r.users.contains_key("u"));
        assert_eq!(r.len(), 1);

        // Without `connected`, only sessions with no connection are dropped.
        let e = r.attach("ip/e", false, 60, owner(6)).session;
        let f = r.attach("ip/f", false, 60, owner(7)).session;
        let g = r.attach("ip/g", false, 60, owner(8)).session;
        for s in [&e, &f, &g] {
            assert_eq!(r.own(s, "ip", false), 0);
        }
        r.detach(&f, 7);
        assert_eq!(r.own(&f, "ip", false), 0, "charged once");
        let h = r.attach("ip/h", false, 60, owner(9)).session;
        assert_eq!(r.own(&h, "ip", false), 1);
        assert!(f.lock().gone && !e.lock().gone && !g.lock().gone);
        r.disown(&e);
        r.disown(&g);
        assert_eq!(r.users["ip"].len(), 1);
        assert!(!SessionTable::is_owned(&e));
    }

    #[tokio::test]
    async fn offline_queues_share_one_byte_budget() {
        let one = msg("t").cost();
        let mut r = SessionTable::new(8, Arc::new(Budget::new(3 * one)));
        let a = r.attach("a", false, 60, owner(1)).session;
        let b = r.attach("b", false, 60, owner(2)).session;
        let budget = r.budget.clone();
        // Connected: not counted.
        for _ in 0..5 {
            assert_eq!(a.push(msg("t"), 100, &budget), Pushed::Queued(0));
        }
        assert_eq!(budget.used(), 0);
        r.detach(&a, 1);
        assert_eq!(budget.used(), 5 * one, "a detached queue counts at once");
        r.detach(&b, 2);
        // Over the budget: b has nothing older to give up.
        assert_eq!(b.push(msg("t"), 100, &budget), Pushed::Refused);
        // a gives up its oldest for each new one.
        assert_eq!(a.push(msg("t"), 100, &budget), Pushed::Queued(3));
        assert_eq!(a.lock().queue.len(), 3);
        assert_eq!(budget.used(), 3 * one);
        let a2 = r.attach("a", false, 60, owner(3));
        assert!(a2.present);
        assert_eq!(budget.used(), 0, "reconnected: no longer offline");
        r.detach(&a2.session, 3);
        assert_eq!(budget.used(), 3 * one);
        r.sweep(Instant::now() + Duration::from_secs(61));
        assert_eq!(budget.used(), 0);
        assert!(r.is_empty());
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
