//! The in-memory store: one typed record per push, oldest first, found by
//! push id through an index of sequence numbers; bounded by count and
//! bytes (the oldest pushes go first) and by age (`receipts.ttl_secs`
//! after a push's last change). The Redis hash's fields are rendered from
//! a record only when it is asked for.

use std::collections::VecDeque;
use std::hash::BuildHasher;
use std::mem::size_of;
use std::sync::Arc;

use hashbrown::HashTable;

use super::{Change, Event};
use crate::push::{Id, PushId};

/// An `Arc`'s two counts, before its text.
const ARC_COUNTS: usize = 16;

/// The in-memory records.
pub struct Memory {
    /// Oldest first; `first` is the sequence number of `records[0]`.
    records: VecDeque<Box<Record>>,
    first: u64,
    /// Sequence numbers, hashed by their record's push id: 8 bytes a push.
    index: HashTable<u64>,
    hasher: foldhash::fast::RandomState,
    bytes: usize,
    max_records: usize,
    max_bytes: usize,
    ttl_ms: u64,
    /// `mqtt.prefix`: a user topic's name is derived, not kept.
    prefix: Box<str>,
}

/// One push's outcome. Most pushes go to one MQTT user, on its user
/// topic: that is kept inline, the topic's name derived from the user's id
/// when asked for; anything else is behind one pointer.
struct Record {
    id: PushId,
    routed_at: u64,
    route: Route,
}

enum Route {
    /// To `user` only, on `<prefix>/user/<user>`; `unknown`: no record.
    User {
        user: Id,
        unknown: bool,
        topic: Delivery,
    },
    Any(Box<Any>),
}

/// Every other push, and one of those once APNs or the offline store has
/// said something about it.
struct Any {
    changed_ms: u64,
    topics: Box<[(Arc<str>, Delivery)]>,
    /// Every user the push is for (`GET /v1/users/{id}/pushes`).
    users: Box<[Id]>,
    unknown: Box<[Id]>,
    apns: Box<[Id]>,
    /// `apns:<user>` and `offline:<user>` with their JSON.
    states: Vec<(Box<str>, Box<str>)>,
}

/// What became of the push on one topic.
#[derive(Default)]
struct Delivery {
    /// 0: not written yet.
    written_at: u64,
    acked_at: u64,
    sessions: u32,
    acks: u32,
}

impl Delivery {
    fn apply(&mut self, at: u64, event: &Event) {
        match event {
            Event::MqttWritten { sessions, .. } => {
                self.sessions = u32::try_from(*sessions).unwrap_or(u32::MAX);
                self.written_at = at;
            }
            Event::MqttAcked { .. } => {
                (self.acks, self.acked_at) = (self.acks.saturating_add(1), at);
            }
            _ => {}
        }
    }
}

/// Whether `topic` is `<prefix>/user/<user>`.
fn is_user_topic(prefix: &str, topic: &str, user: &Id) -> bool {
    topic
        .strip_prefix(prefix)
        .and_then(|t| t.strip_prefix("/user/"))
        == Some(user.as_str())
}

impl Record {
    fn new(prefix: &str, id: PushId, at: u64, routed: Event) -> Option<Box<Record>> {
        let Event::Routed {
            mqtt,
            apns,
            unknown_users,
            users,
        } = routed
        else {
            return None;
        };
        let route = match (&users[..], &mqtt[..], &unknown_users[..]) {
            ([user], [topic], unknown)
                if apns.is_empty()
                    && is_user_topic(prefix, topic, user)
                    && unknown.iter().all(|u| u == user) =>
            {
                Route::User {
                    user: user.clone(),
                    unknown: !unknown.is_empty(),
                    topic: Delivery::default(),
                }
            }
            _ => Route::Any(Box::new(Any {
                changed_ms: at,
                topics: mqtt
                    .iter()
                    .map(|name| (name.clone(), Delivery::default()))
                    .collect(),
                users,
                unknown: unknown_users.into(),
                apns: apns.into(),
                states: Vec::new(),
            })),
        };
        Some(Box::new(Record {
            id,
            routed_at: at,
            route,
        }))
    }

    /// Unix ms of its last change: inline, the latest of its times.
    fn changed_ms(&self) -> u64 {
        match &self.route {
            Route::User { topic, .. } => self.routed_at.max(topic.written_at).max(topic.acked_at),
            Route::Any(any) => any.changed_ms,
        }
    }

    fn users(&self) -> &[Id] {
        match &self.route {
            Route::User { user, .. } => std::slice::from_ref(user),
            Route::Any(any) => &any.users,
        }
    }

    /// What the record counts against `receipts.max_bytes`: about what it
    /// holds on the heap (itself, its topics and ids with their text, its
    /// per-user states).
    fn cost(&self) -> usize {
        let ids = |v: &[Id]| {
            v.iter()
                .map(|i| size_of::<Id>() + ARC_COUNTS + i.as_str().len())
                .sum::<usize>()
        };
        size_of::<Record>()
            + match &self.route {
                Route::User { user, .. } => ARC_COUNTS + user.as_str().len(),
                Route::Any(any) => {
                    size_of::<Any>()
                        + any
                            .topics
                            .iter()
                            .map(|(name, _)| {
                                size_of::<(Arc<str>, Delivery)>() + ARC_COUNTS + name.len()
                            })
                            .sum::<usize>()
                        + ids(&any.users)
                        + ids(&any.unknown)
                        + ids(&any.apns)
                        + any
                            .states
                            .iter()
                            .map(|(n, v)| 2 * size_of::<Box<str>>() + n.len() + v.len())
                            .sum::<usize>()
                }
            }
    }

    /// The route behind a pointer (a user push that APNs or the offline
    /// store has something to say about).
    fn any(&mut self, prefix: &str) -> &mut Any {
        if let Route::User {
            user,
            unknown,
            topic,
        } = &mut self.route
        {
            let name = crate::router::user_topic(prefix, user).into();
            self.route = Route::Any(Box::new(Any {
                changed_ms: 0,
                topics: Box::new([(name, std::mem::take(topic))]),
                users: Box::new([user.clone()]),
                unknown: match unknown {
                    true => Box::new([user.clone()]),
                    false => Box::default(),
                },
                apns: Box::default(),
                states: Vec::new(),
            }));
        }
        match &mut self.route {
            Route::Any(any) => any,
            Route::User { .. } => unreachable!("made an Any above"),
        }
    }

    /// Applies a change to the push (only APNs and offline states change
    /// its cost).
    fn apply(&mut self, prefix: &str, at: u64, event: &Event) {
        let topic_name = match event {
            Event::Routed { .. } => None,
            Event::MqttWritten { topic, .. } | Event::MqttAcked { topic, .. } => Some(topic),
            other => {
                let Some((name, value)) = super::store::user_states(other, at) else {
                    return;
                };
                let any = self.any(prefix);
                any.changed_ms = at;
                match any.states.iter_mut().find(|(n, _)| **n == *name) {
                    Some((_, v)) => *v = value.into(),
                    None => any.states.push((name.into(), value.into())),
                }
                return;
            }
        };
        match &mut self.route {
            Route::User { user, topic, .. } => {
                if topic_name.is_some_and(|t| is_user_topic(prefix, t, user)) {
                    topic.apply(at, event);
                }
            }
            Route::Any(any) => {
                any.changed_ms = at;
                if let Some((_, d)) =
                    topic_name.and_then(|name| any.topics.iter_mut().find(|(n, _)| n == name))
                {
                    d.apply(at, event);
                }
            }
        }
    }

    /// The fields the Redis hash would hold.
    fn fields(&self, prefix: &str) -> Vec<(String, String)> {
        let user_topic;
        let one;
        let (topics, apns, unknown): (Vec<(&str, &Delivery)>, &[Id], &[Id]) = match &self.route {
            Route::User {
                user,
                unknown,
                topic,
            } => {
                user_topic = crate::router::user_topic(prefix, user);
                one = [user.clone()];
                let unknown: &[Id] = if *unknown { &one } else { &[] };
                (vec![(user_topic.as_str(), topic)], &[], unknown)
            }
            Route::Any(any) => (
                any.topics.iter().map(|(n, d)| (&**n, d)).collect(),
                &any.apns,
                &any.unknown,
            ),
        };
        let names: Vec<&str> = topics.iter().map(|(n, _)| *n).collect();
        let mut f = vec![
            ("routed_at".to_owned(), self.routed_at.to_string()),
            (
                "route".to_owned(),
                super::store::route_json(&names, apns, unknown),
            ),
        ];
        for (name, t) in topics {
            if t.written_at != 0 {
                f.push((format!("mqtt:{name}:sessions"), t.sessions.to_string()));
                f.push((format!("mqtt:{name}:written_at"), t.written_at.to_string()));
            }
            if t.acks > 0 {
                f.push((format!("mqtt:{name}:acks"), t.acks.to_string()));
                f.push((format!("mqtt:{name}:acked_at"), t.acked_at.to_string()));
            }
        }
        if let Route::Any(any) = &self.route {
            f.extend(
                any.states
                    .iter()
                    .map(|(n, v)| (n.to_string(), v.to_string())),
            );
        }
        f
    }
}

impl Memory {
    pub fn new(max_records: usize, max_bytes: usize, ttl_ms: u64, prefix: &str) -> Memory {
        Memory {
            records: VecDeque::new(),
            first: 0,
            index: HashTable::new(),
            hasher: Default::default(),
            bytes: 0,
            max_records,
            max_bytes,
            ttl_ms,
            prefix: prefix.into(),
        }
    }

    fn find(&self, push: &PushId) -> Option<usize> {
        let (records, first) = (&self.records, self.first);
        self.index
            .find(self.hasher.hash_one(push), |&seq| {
                records[(seq - first) as usize].id == *push
            })
            .map(|&seq| (seq - first) as usize)
    }

    /// Applies one change; returns how many records were evicted for it.
    /// Only `Routed` (always a push's first change) starts a record: a late
    /// change to a forgotten push does not bring back part of it.
    pub fn apply(&mut self, (push, at, event): Change) -> usize {
        match self.find(&push) {
            Some(i) => {
                let r = &mut self.records[i];
                match event {
                    Event::Routed { .. } | Event::MqttWritten { .. } | Event::MqttAcked { .. } => {
                        r.apply(&self.prefix, at, &event)
                    }
                    _ => {
                        let before = r.cost();
                        r.apply(&self.prefix, at, &event);
                        self.bytes = self.bytes + r.cost() - before;
                    }
                }
            }
            None => {
                let hash = self.hasher.hash_one(&push);
                let Some(record) = Record::new(&self.prefix, push, at, event) else {
                    return 0;
                };
                self.bytes += record.cost();
                let seq = self.first + self.records.len() as u64;
                self.records.push_back(record);
                let (records, first, hasher) = (&self.records, self.first, &self.hasher);
                self.index.insert_unique(hash, seq, |&s| {
                    hasher.hash_one(&records[(s - first) as usize].id)
                });
            }
        }
        self.evict(at)
    }

    /// Forgets the oldest records while over a bound or expired (the
    /// newest is kept even alone over `max_bytes`: it is being written).
    fn evict(&mut self, now: u64) -> usize {
        let mut evicted = 0;
        while self.records.len() > 1 {
            let expired = self.records[0].changed_ms() + self.ttl_ms <= now;
            let over = self.records.len() > self.max_records || self.bytes > self.max_bytes;
            if !expired && !over {
                break;
            }
            self.forget_oldest();
            evicted += usize::from(!expired);
        }
        evicted
    }

    fn forget_oldest(&mut self) {
        let oldest = self.records.pop_front().expect("not empty");
        let first = self.first;
        if let Ok(entry) = self
            .index
            .find_entry(self.hasher.hash_one(&oldest.id), |&seq| seq == first)
        {
            entry.remove();
        }
        self.first += 1;
        self.bytes -= oldest.cost();
    }

    pub fn fields(&self, push: &PushId, now: u64) -> Option<Vec<(String, String)>> {
        let r = &self.records[self.find(push)?];
        (r.changed_ms() + self.ttl_ms > now).then(|| r.fields(&self.prefix))
    }

    /// The last [`super::RECENT`] live pushes for `user`, newest first: a
    /// scan of the records, which `max_records` bounds.
    pub fn recent(&self, user: &Id, now: u64) -> Vec<PushId> {
        self.records
            .iter()
            .rev()
            .filter(|r| r.changed_ms() + self.ttl_ms > now && r.users().contains(user))
            .take(super::RECENT)
            .map(|r| r.id.clone())
            .collect()
    }

    pub fn len(&self) -> usize {
        self.records.len()
    }

    pub fn bytes(&self) -> usize {
        self.bytes
    }
}

#[cfg(test)]
mod tests {
    use super::super::RECENT;
    use super::*;

    fn memory(max_records: usize, max_bytes: usize) -> Memory {
        Memory::new(max_records, max_bytes, 60_000, "push")
    }

    fn routed(n: usize) -> Event {
        Event::Routed {
            mqtt: Arc::new([format!("push/user/{n}").into()]),
            apns: vec![],
            unknown_users: vec![Id::from(n as u64)],
            users: Box::new([Id::from(n as u64 % 2)]),
        }
    }

    #[test]
    fn count_bound_forgets_the_oldest() {
        let mut m = memory(3, usize::MAX);
        let ids: Vec<PushId> = (0..5).map(|_| PushId::generate()).collect();
        let evicted: usize = ids
            .iter()
            .enumerate()
            .map(|(i, id)| m.apply((id.clone(), 1000, routed(i))))
            .sum();
        assert_eq!((evicted, m.len()), (2, 3));
        assert!(m.fields(&ids[1], 1000).is_none());
        // A late change to a forgotten push does not bring part of it back.
        let late = Event::MqttAcked {
            topic: "push/user/0".into(),
            client_id: "c".into(),
        };
        assert_eq!(m.apply((ids[0].clone(), 1000, late)), 0);
        assert!(m.fields(&ids[0], 1000).is_none());
        assert!(m.fields(&ids[2], 1000).is_some());
    }

    #[test]
    fn a_users_recent_pushes_are_the_newest_live_ones_and_bounded() {
        let mut m = memory(100, usize::MAX);
        let ids: Vec<PushId> = (0..50).map(|_| PushId::generate()).collect();
        for (i, id) in ids.iter().enumerate() {
            m.apply((id.clone(), 1000 + i as u64, routed(i)));
        }
        // routed(i) is for user i % 2: the even pushes are user 0's.
        let even: Vec<PushId> = ids.iter().step_by(2).rev().take(RECENT).cloned().collect();
        assert_eq!(m.recent(&Id::from(0u64), 1050), even);
        assert!(m.recent(&Id::from(7u64), 1050).is_empty());
        // Expired records are not listed.
        assert!(m.recent(&Id::from(0u64), 1_000_000).is_empty());
    }

    #[test]
    fn byte_bound_holds_however_many_pushes_come() {
        let max = 10_000;
        let mut m = memory(usize::MAX, max);
        for i in 0..1_000 {
            let id = PushId::generate();
            m.apply((id.clone(), 1000, routed(i)));
            let acked = Event::MqttAcked {
                topic: format!("push/user/{i}").into(),
                client_id: "c".into(),
            };
            m.apply((id, 1000, acked));
            assert!(m.bytes() <= max, "{} bytes after {i} pushes", m.bytes());
        }
        // Each record is counted, and the sum is the store's.
        let sum: usize = m.records.iter().map(|r| r.cost()).sum();
        assert_eq!(sum, m.bytes());
        assert!(m.len() > 10 && m.len() < 100, "{} records", m.len());
    }

    /// A push to one user on its user topic is kept inline, its topic
    /// derived; it answers as the same push kept in full does (a store
    /// whose prefix does not match keeps it in full), also once the
    /// offline store has said something about it.
    #[test]
    fn an_inline_user_push_answers_as_a_full_one() {
        let (mut inline, mut full) = (
            memory(10, usize::MAX),
            Memory::new(10, usize::MAX, 60_000, "other"),
        );
        let id = PushId::generate();
        let user = Id::from(7u64);
        let topic: Arc<str> = "push/user/7".into();
        let changes = [
            Event::Routed {
                mqtt: Arc::new([topic.clone()]),
                apns: vec![],
                unknown_users: vec![user.clone()],
                users: Box::new([user.clone()]),
            },
            Event::MqttWritten {
                topic: topic.clone(),
                sessions: 2,
            },
            Event::MqttAcked {
                topic: topic.clone(),
                client_id: "c".into(),
            },
            Event::MqttAcked {
                topic: "push/user/8".into(),
                client_id: "c".into(),
            },
            Event::OfflineKept { user: user.clone() },
        ];
        for (at, e) in changes.into_iter().enumerate() {
            let at = 1000 + at as u64;
            let inlined = at < 1004;
            for m in [&mut inline, &mut full] {
                m.apply((id.clone(), at, e.clone()));
            }
            assert_eq!(
                matches!(inline.records[0].route, Route::User { .. }),
                inlined
            );
            assert!(matches!(full.records[0].route, Route::Any(_)));
            assert_eq!(inline.fields(&id, at), full.fields(&id, at));
            assert_eq!(inline.recent(&user, at), vec![id.clone()]);
            assert_eq!(inline.bytes(), inline.records[0].cost());
        }
        let fields = inline.fields(&id, 1004).unwrap();
        assert!(fields.contains(&("mqtt:push/user/7:acks".into(), "1".into())));
        assert!(fields.iter().any(|(n, _)| n == "offline:7"));
    }

    #[test]
    fn expired_records_are_not_answered_and_go_first() {
        let mut m = memory(10, usize::MAX);
        let old = PushId::generate();
        m.apply((old.clone(), 1000, routed(1)));
        assert!(m.fields(&old, 60_999).is_some());
        assert!(m.fields(&old, 61_000).is_none());
        m.apply((PushId::generate(), 61_000, routed(2)));
        assert_eq!(m.len(), 1);
    }
}
