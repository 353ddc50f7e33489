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
}

/// One push's outcome. Most pushes go to MQTT users only (with a record
/// or without: unknown): what APNs and the offline store add is behind
/// one pointer.
struct Record {
    id: PushId,
    changed_ms: u64,
    routed_at: u64,
    topics: Box<[Topic]>,
    /// Every user the push is for (`GET /v1/users/{id}/pushes`).
    users: Box<[Id]>,
    unknown: Box<[Id]>,
    more: Option<Box<More>>,
}

#[derive(Default)]
struct More {
    apns: Box<[Id]>,
    /// `apns:<user>` and `offline:<user>` with their JSON.
    states: Vec<(Box<str>, Box<str>)>,
}

struct Topic {
    name: Arc<str>,
    /// 0: not written yet.
    written_at: u64,
    acked_at: u64,
    sessions: u32,
    acks: u32,
}

impl Record {
    fn new(id: PushId, at: u64, routed: Event) -> Option<Box<Record>> {
        let Event::Routed {
            mqtt,
            apns,
            unknown_users,
            users,
        } = routed
        else {
            return None;
        };
        let topics = mqtt
            .iter()
            .map(|name| Topic {
                name: name.clone(),
                written_at: 0,
                acked_at: 0,
                sessions: 0,
                acks: 0,
            })
            .collect();
        let more = (!apns.is_empty()).then(|| {
            Box::new(More {
                apns: apns.into(),
                states: Vec::new(),
            })
        });
        Some(Box::new(Record {
            id,
            changed_ms: at,
            routed_at: at,
            topics,
            users,
            unknown: unknown_users.into(),
            more,
        }))
    }

    /// What the record counts against `receipts.max_bytes`: about what it
    /// holds on the heap (itself, its topics and ids with their text, its
    /// per-user states).
    fn cost(&self) -> usize {
        let ids = |v: &[Id]| {
            v.iter()
                .map(|i| size_of::<Id>() + i.as_str().len())
                .sum::<usize>()
        };
        let more = self.more.as_ref().map_or(0, |m| {
            size_of::<More>()
                + ids(&m.apns)
                + m.states
                    .iter()
                    .map(|(n, v)| 2 * size_of::<Box<str>>() + n.len() + v.len())
                    .sum::<usize>()
        });
        size_of::<Record>()
            + self
                .topics
                .iter()
                .map(|t| size_of::<Topic>() + ARC_COUNTS + t.name.len())
                .sum::<usize>()
            + ids(&self.users)
            + ids(&self.unknown)
            + more
    }

    fn topic(&mut self, name: &str) -> Option<&mut Topic> {
        self.topics.iter_mut().find(|t| &*t.name == name)
    }

    /// Applies a change to the push (only APNs and offline states change
    /// its cost).
    fn apply(&mut self, at: u64, event: &Event) {
        self.changed_ms = at;
        match event {
            Event::Routed { .. } => {}
            Event::MqttWritten { topic, sessions } => {
                if let Some(t) = self.topic(topic) {
                    t.sessions = u32::try_from(*sessions).unwrap_or(u32::MAX);
                    t.written_at = at;
                }
            }
            Event::MqttAcked { topic, .. } => {
                if let Some(t) = self.topic(topic) {
                    (t.acks, t.acked_at) = (t.acks.saturating_add(1), at);
                }
            }
            other => {
                let Some((name, value)) = super::store::user_states(other, at) else {
                    return;
                };
                let states = &mut self.more.get_or_insert_with(Box::default).states;
                match states.iter_mut().find(|(n, _)| **n == *name) {
                    Some((_, v)) => *v = value.into(),
                    None => states.push((name.into(), value.into())),
                }
            }
        }
    }

    /// The fields the Redis hash would hold.
    fn fields(&self) -> Vec<(String, String)> {
        let none: &[Id] = &[];
        let apns = self.more.as_ref().map_or(none, |m| &m.apns[..]);
        let topics: Vec<&str> = self.topics.iter().map(|t| &*t.name).collect();
        let mut f = vec![
            ("routed_at".to_owned(), self.routed_at.to_string()),
            (
                "route".to_owned(),
                super::store::route_json(&topics, apns, &self.unknown),
            ),
        ];
        for t in &self.topics {
            let name = &t.name;
            if t.written_at != 0 {
                f.push((format!("mqtt:{name}:sessions"), t.sessions.to_string()));
                f.push((format!("mqtt:{name}:written_at"), t.written_at.to_string()));
            }
            if t.acks > 0 {
                f.push((format!("mqtt:{name}:acks"), t.acks.to_string()));
                f.push((format!("mqtt:{name}:acked_at"), t.acked_at.to_string()));
            }
        }
        if let Some(m) = &self.more {
            f.extend(m.states.iter().map(|(n, v)| (n.to_string(), v.to_string())));
        }
        f
    }
}

impl Memory {
    pub fn new(max_records: usize, max_bytes: usize, ttl_ms: u64) -> Memory {
        Memory {
            records: VecDeque::new(),
            first: 0,
            index: HashTable::new(),
            hasher: Default::default(),
            bytes: 0,
            max_records,
            max_bytes,
            ttl_ms,
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
                        r.apply(at, &event)
                    }
                    _ => {
                        let before = r.cost();
                        r.apply(at, &event);
                        self.bytes = self.bytes + r.cost() - before;
                    }
                }
            }
            None => {
                let hash = self.hasher.hash_one(&push);
                let Some(record) = Record::new(push, at, event) else {
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
            let expired = self.records[0].changed_ms + self.ttl_ms <= now;
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
        (r.changed_ms + self.ttl_ms > now).then(|| r.fields())
    }

    /// The last [`super::RECENT`] live pushes for `user`, newest first: a
    /// scan of the records, which `max_records` bounds.
    pub fn recent(&self, user: &Id, now: u64) -> Vec<PushId> {
        self.records
            .iter()
            .rev()
            .filter(|r| r.changed_ms + self.ttl_ms > now && r.users.contains(user))
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
        Memory::new(max_records, max_bytes, 60_000)
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
