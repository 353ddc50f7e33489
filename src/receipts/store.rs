//! Where outcomes are kept: a hash of fields per push, in Redis (`HSET`,
//! `HINCRBY`, `EXPIRE` after every change) or in memory with the same
//! fields, bounded by count and bytes (the oldest pushes go first).
//!
//! Fields: `routed_at`, `route` (JSON: topics, APNs users, unknown users);
//! per topic `mqtt:<topic>:sessions`, `:written_at`, `:acks`, `:acked_at`;
//! per user `apns:<user>` and `offline:<user>` (JSON with `state` and `at`).
//!
//! Each user a push is for also keeps the ids of its last [`RECENT`]
//! pushes: in Redis a capped list (`LPUSH`, `LTRIM`, `EXPIRE`) at the
//! push key with `{id}` = `user/<user>` (no push id has a `/`); in memory
//! the records themselves say whom they are for.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};

use redis::Value as RedisValue;
use serde_json::{json, Map, Value};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::{store_failed, Change, Event, Outlets, ReceiptsError};
use crate::push::{Id, PushId};
use crate::redis_conn::RedisConn;
use crate::settings::ReceiptsSettings;
use crate::stats::Stats;

/// Changes applied together: one Redis round trip.
const BATCH: usize = 512;
/// What the in-memory store counts for a push (the record, its map and
/// order entries), an id in it and a per-user field, beyond their text.
const RECORD_COST: usize = 200;
const ID_COST: usize = 32;
const FIELD_COST: usize = 48;
/// How many of a user's last pushes are listed.
pub const RECENT: usize = 20;

/// One write to a push's hash.
enum Op {
    Set(String, String),
    Incr(String),
}

/// The writes an event makes.
fn ops(event: &Event, at: u64) -> Vec<Op> {
    let state = |s: Value| s.to_string();
    match event {
        Event::Routed {
            mqtt,
            apns,
            unknown_users,
            ..
        } => vec![
            Op::Set("routed_at".into(), at.to_string()),
            Op::Set(
                "route".into(),
                json!({"mqtt": mqtt, "apns": super::ids(apns),
                    "unknown_users": super::ids(unknown_users)})
                .to_string(),
            ),
        ],
        Event::MqttWritten { topic, sessions } => vec![
            Op::Set(format!("mqtt:{topic}:sessions"), sessions.to_string()),
            Op::Set(format!("mqtt:{topic}:written_at"), at.to_string()),
        ],
        Event::MqttAcked { topic, .. } => vec![
            Op::Incr(format!("mqtt:{topic}:acks")),
            Op::Set(format!("mqtt:{topic}:acked_at"), at.to_string()),
        ],
        Event::OfflineKept { user } => vec![Op::Set(
            format!("offline:{user}"),
            state(json!({"state": "kept", "at": at})),
        )],
        Event::OfflineReplayed { user } => vec![Op::Set(
            format!("offline:{user}"),
            state(json!({"state": "replayed", "at": at})),
        )],
        Event::OfflineExpired { user } => vec![Op::Set(
            format!("offline:{user}"),
            state(json!({"state": "expired", "at": at})),
        )],
        Event::ApnsAccepted { user, apns_id } => vec![Op::Set(
            format!("apns:{user}"),
            state(json!({"state": "accepted", "apns_id": apns_id, "at": at})),
        )],
        Event::ApnsRejected {
            user,
            status,
            reason,
        } => vec![Op::Set(
            format!("apns:{user}"),
            state(json!({"state": "rejected", "status": status, "reason": reason, "at": at})),
        )],
        Event::ApnsDeadToken { user, reason } => vec![Op::Set(
            format!("apns:{user}"),
            state(json!({"state": "dead_token", "reason": reason, "at": at})),
        )],
    }
}

#[derive(Clone)]
pub enum Store {
    Memory(Arc<Mutex<Memory>>),
    Redis {
        conn: RedisConn,
        key: String,
        ttl_secs: u64,
    },
}

/// The in-memory records, oldest first in `order`.
pub struct Memory {
    records: HashMap<PushId, Record>,
    order: VecDeque<PushId>,
    bytes: usize,
    max_records: usize,
    max_bytes: usize,
    ttl_ms: u64,
}

/// One push's outcome, typed (the Redis hash's fields are rendered from
/// it only when asked): a few hundred bytes, not one allocation a field.
struct Record {
    changed_ms: u64,
    routed_at: u64,
    topics: Vec<Topic>,
    apns: Vec<Id>,
    unknown: Vec<Id>,
    /// Every user the push is for.
    targets: Box<[Id]>,
    /// `apns:<user>` and `offline:<user>` with their JSON.
    users: Vec<(Box<str>, Box<str>)>,
    bytes: usize,
}

struct Topic {
    name: Box<str>,
    sessions: Option<usize>,
    written_at: u64,
    acks: u64,
    acked_at: u64,
}

impl Record {
    fn new(
        at: u64,
        mqtt: Vec<String>,
        apns: Vec<Id>,
        unknown: Vec<Id>,
        targets: Box<[Id]>,
    ) -> Record {
        let topics = mqtt
            .into_iter()
            .map(|t| Topic {
                name: t.into_boxed_str(),
                sessions: None,
                written_at: 0,
                acks: 0,
                acked_at: 0,
            })
            .collect();
        let mut r = Record {
            changed_ms: at,
            routed_at: at,
            topics,
            apns,
            unknown,
            targets,
            users: Vec::new(),
            bytes: 0,
        };
        r.bytes = r.cost();
        r
    }

    /// What the record counts against `receipts.max_bytes`.
    fn cost(&self) -> usize {
        let ids = |v: &[Id]| v.iter().map(|i| ID_COST + i.as_str().len()).sum::<usize>();
        RECORD_COST
            + self
                .topics
                .iter()
                .map(|t| std::mem::size_of::<Topic>() + t.name.len())
                .sum::<usize>()
            + ids(&self.apns)
            + ids(&self.unknown)
            + ids(&self.targets)
            + self
                .users
                .iter()
                .map(|(n, v)| FIELD_COST + n.len() + v.len())
                .sum::<usize>()
    }

    fn topic(&mut self, name: &str) -> Option<&mut Topic> {
        self.topics.iter_mut().find(|t| &*t.name == name)
    }

    fn apply(&mut self, at: u64, event: &Event) {
        self.changed_ms = at;
        match event {
            Event::Routed { .. } => {}
            Event::MqttWritten { topic, sessions } => {
                if let Some(t) = self.topic(topic) {
                    (t.sessions, t.written_at) = (Some(*sessions), at);
                }
            }
            Event::MqttAcked { topic, .. } => {
                if let Some(t) = self.topic(topic) {
                    (t.acks, t.acked_at) = (t.acks + 1, at);
                }
            }
            other => {
                for op in ops(other, at) {
                    let Op::Set(name, value) = op else { continue };
                    match self.users.iter_mut().find(|(n, _)| **n == *name) {
                        Some((_, v)) => *v = value.into(),
                        None => self.users.push((name.into(), value.into())),
                    }
                }
            }
        }
    }

    /// The fields the Redis hash would hold.
    fn fields(&self) -> Vec<(String, String)> {
        let mut f = ops(
            &Event::Routed {
                mqtt: self.topics.iter().map(|t| t.name.to_string()).collect(),
                apns: self.apns.clone(),
                unknown_users: self.unknown.clone(),
                users: Box::default(),
            },
            self.routed_at,
        )
        .into_iter()
        .filter_map(|op| match op {
            Op::Set(n, v) => Some((n, v)),
            Op::Incr(_) => None,
        })
        .collect::<Vec<_>>();
        for t in &self.topics {
            let name = &t.name;
            if let Some(n) = t.sessions {
                f.push((format!("mqtt:{name}:sessions"), n.to_string()));
                f.push((format!("mqtt:{name}:written_at"), t.written_at.to_string()));
            }
            if t.acks > 0 {
                f.push((format!("mqtt:{name}:acks"), t.acks.to_string()));
                f.push((format!("mqtt:{name}:acked_at"), t.acked_at.to_string()));
            }
        }
        f.extend(
            self.users
                .iter()
                .map(|(n, v)| (n.to_string(), v.to_string())),
        );
        f
    }
}

impl Memory {
    /// Applies one change; returns how many records were evicted for it.
    /// Only `Routed` (always a push's first change) starts a record: a late
    /// change to a forgotten push does not bring back part of it.
    fn apply(&mut self, (push, at, event): Change) -> usize {
        let record = match (self.records.get_mut(&push), event) {
            (Some(r), event) => {
                let before = r.bytes;
                r.apply(at, &event);
                r.bytes = r.cost();
                self.bytes = self.bytes + r.bytes - before;
                r.changed_ms = at;
                return self.evict(at);
            }
            (
                None,
                Event::Routed {
                    mqtt,
                    apns,
                    unknown_users,
                    users,
                },
            ) => Record::new(at, mqtt, apns, unknown_users, users),
            (None, _) => return 0,
        };
        self.bytes += record.bytes;
        self.order.push_back(push.clone());
        self.records.insert(push, record);
        self.evict(at)
    }

    /// Forgets the oldest records while over a bound or expired (the
    /// newest is kept even alone over `max_bytes`: it is being written).
    fn evict(&mut self, now: u64) -> usize {
        let mut evicted = 0;
        while self.order.len() > 1 {
            let oldest = &self.order[0];
            let expired = self
                .records
                .get(oldest)
                .is_none_or(|r| r.changed_ms + self.ttl_ms <= now);
            let over = self.records.len() > self.max_records || self.bytes > self.max_bytes;
            if !expired && !over {
                break;
            }
            let id = self.order.pop_front().expect("not empty");
            if let Some(r) = self.records.remove(&id) {
                self.bytes -= r.bytes;
                evicted += usize::from(!expired);
            }
        }
        evicted
    }

    fn fields(&self, push: &PushId, now: u64) -> Option<Vec<(String, String)>> {
        let r = self.records.get(push)?;
        (r.changed_ms + self.ttl_ms > now).then(|| r.fields())
    }

    /// The last [`RECENT`] live pushes for `user`, newest first: a scan of
    /// the records, which `max_records` bounds.
    fn recent(&self, user: &Id, now: u64) -> Vec<PushId> {
        self.order
            .iter()
            .rev()
            .filter(|id| {
                self.records
                    .get(*id)
                    .is_some_and(|r| r.changed_ms + self.ttl_ms > now && r.targets.contains(user))
            })
            .take(RECENT)
            .cloned()
            .collect()
    }

    pub fn len(&self) -> usize {
        self.records.len()
    }

    pub fn bytes(&self) -> usize {
        self.bytes
    }
}

impl Store {
    pub fn new(settings: &ReceiptsSettings, redis: Option<RedisConn>) -> Store {
        match redis {
            Some(conn) => Store::Redis {
                conn,
                key: settings.key.clone(),
                ttl_secs: settings.ttl_secs,
            },
            None => Store::Memory(Arc::new(Mutex::new(Memory {
                records: HashMap::new(),
                order: VecDeque::new(),
                bytes: 0,
                max_records: settings.max_records,
                max_bytes: settings.max_bytes,
                ttl_ms: settings.ttl_secs.saturating_mul(1000),
            }))),
        }
    }

    fn memory(m: &Mutex<Memory>) -> std::sync::MutexGuard<'_, Memory> {
        m.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The writer: applies changes in batches until `stop`, then what is
    /// still queued; each batch, once stored, goes to `webhook`.
    pub(super) async fn write(
        self,
        mut rx: mpsc::Receiver<Change>,
        outlets: Outlets,
        stats: Arc<Stats>,
        stop: CancellationToken,
    ) {
        let mut batch = Vec::with_capacity(BATCH);
        loop {
            let n = tokio::select! {
                n = rx.recv_many(&mut batch, BATCH) => n,
                _ = stop.cancelled() => {
                    rx.close();
                    while rx.recv_many(&mut batch, BATCH).await > 0 {
                        self.apply(&mut batch, &outlets, &stats).await;
                    }
                    return;
                }
            };
            if n == 0 {
                return;
            }
            self.apply(&mut batch, &outlets, &stats).await;
        }
    }

    /// Applies (and empties) `batch`; then, if it was stored, sends it on
    /// to the outlets (stream, webhook), so an event a consumer got is
    /// stored (a crash in between loses the event, never the outcome).
    async fn apply(&self, batch: &mut Vec<Change>, outlets: &Outlets, stats: &Stats) {
        let events: Vec<Value> = match outlets.is_empty() {
            true => Vec::new(),
            false => batch.iter().map(|(id, at, e)| e.to_json(id, *at)).collect(),
        };
        if self.store(batch, stats).await {
            outlets.publish(events, stats).await;
        }
    }

    /// Stores (and empties) `batch`; false if Redis refused it.
    async fn store(&self, batch: &mut Vec<Change>, stats: &Stats) -> bool {
        let n = batch.len() as u64;
        match self {
            Store::Memory(m) => {
                let mut m = Store::memory(m);
                let evicted: usize = batch.drain(..).map(|c| m.apply(c)).sum();
                stats.receipts_evicted.add(evicted as u64);
                stats.receipts_recorded.add(n);
                true
            }
            Store::Redis {
                conn,
                key: key_template,
                ttl_secs,
            } => {
                let mut cmds = Vec::with_capacity(batch.len() * 3);
                for (push, at, event) in batch.drain(..) {
                    let key = key_template.replace("{id}", &push.to_string());
                    if let Event::Routed { users, .. } = &event {
                        for user in users {
                            let list = user_key(key_template, user);
                            cmds.push(redis::cmd("LPUSH").arg(&list).arg(push.to_string()).clone());
                            cmds.push(
                                redis::cmd("LTRIM")
                                    .arg(&list)
                                    .arg(0)
                                    .arg(RECENT - 1)
                                    .clone(),
                            );
                            cmds.push(redis::cmd("EXPIRE").arg(&list).arg(*ttl_secs).clone());
                        }
                    }
                    for op in ops(&event, at) {
                        cmds.push(match op {
                            Op::Set(f, v) => redis::cmd("HSET").arg(&key).arg(f).arg(v).clone(),
                            Op::Incr(f) => redis::cmd("HINCRBY").arg(&key).arg(f).arg(1).clone(),
                        });
                    }
                    cmds.push(redis::cmd("EXPIRE").arg(&key).arg(*ttl_secs).clone());
                }
                let failed = match conn.each::<RedisValue>(cmds).await {
                    Ok(results) => results.into_iter().find_map(Result::err).map(Into::into),
                    Err(e) => Some(e.into()),
                };
                match &failed {
                    None => stats.receipts_recorded.add(n),
                    Some(e) => {
                        store_failed(e, n as usize);
                        stats.receipts_dropped.add(n);
                    }
                }
                failed.is_none()
            }
        }
    }

    /// The outcome of `push` as the HTTP API answers it; `None` if unknown.
    /// A topic not acknowledged by all its sessions `ack_timeout_ms` after
    /// the write is `timeout` (decided when asked: nothing waits for it).
    pub async fn outcome(
        &self,
        push: &PushId,
        ack_timeout_ms: u64,
    ) -> Result<Option<Value>, ReceiptsError> {
        let mut found = self.outcomes(vec![push.clone()], ack_timeout_ms).await?;
        Ok(found.pop())
    }

    /// The outcomes of the last [`RECENT`] pushes for `user` still kept,
    /// newest first.
    pub async fn recent(
        &self,
        user: &Id,
        ack_timeout_ms: u64,
    ) -> Result<Vec<Value>, ReceiptsError> {
        let ids = match self {
            Store::Memory(m) => Store::memory(m).recent(user, crate::utc::now_ms()),
            Store::Redis { conn, key, .. } => {
                let cmd = redis::cmd("LRANGE")
                    .arg(user_key(key, user))
                    .arg(0)
                    .arg(RECENT - 1)
                    .clone();
                let mut got = conn.each::<Vec<String>>(vec![cmd]).await?;
                let ids = got.pop().expect("one answer")?;
                ids.iter().filter_map(|id| PushId::given(id)).collect()
            }
        };
        self.outcomes(ids, ack_timeout_ms).await
    }

    /// The outcomes of `pushes` that are known, in order (one Redis round trip).
    async fn outcomes(
        &self,
        pushes: Vec<PushId>,
        ack_timeout_ms: u64,
    ) -> Result<Vec<Value>, ReceiptsError> {
        if pushes.is_empty() {
            return Ok(Vec::new()); // an empty pipeline would wait for nothing until its timeout
        }
        let now = crate::utc::now_ms();
        let fields: Vec<Vec<(String, String)>> = match self {
            Store::Memory(m) => {
                let m = Store::memory(m);
                pushes
                    .iter()
                    .map(|p| m.fields(p, now).unwrap_or_default())
                    .collect()
            }
            Store::Redis { conn, key, .. } => {
                let cmds = pushes
                    .iter()
                    .map(|p| {
                        redis::cmd("HGETALL")
                            .arg(key.replace("{id}", &p.to_string()))
                            .clone()
                    })
                    .collect();
                let got = conn.each::<Vec<(String, String)>>(cmds).await?;
                got.into_iter().collect::<Result<_, _>>()?
            }
        };
        let overdue = now.saturating_sub(ack_timeout_ms);
        Ok(pushes
            .iter()
            .zip(fields)
            .filter(|(_, f)| !f.is_empty())
            .map(|(p, f)| outcome(p, f, overdue))
            .collect())
    }

    /// The in-memory store's (records, bytes); `None` for Redis.
    pub fn memory_use(&self) -> Option<(usize, usize)> {
        match self {
            Store::Memory(m) => {
                let m = Store::memory(m);
                Some((m.len(), m.bytes()))
            }
            Store::Redis { .. } => None,
        }
    }
}

/// The Redis list of `user`'s last pushes.
fn user_key(template: &str, user: &Id) -> String {
    template.replace("{id}", &format!("user/{user}"))
}

/// Fields → `{"id", "routed_at", "mqtt": [...], "apns": [...], "offline":
/// [...], "unknown_users": [...]}`, targets in the route's order. A topic
/// written before `overdue` (Unix ms) and not acknowledged by all its
/// sessions is `timeout`.
fn outcome(push: &PushId, fields: Vec<(String, String)>, overdue: u64) -> Value {
    let fields: HashMap<String, String> = fields.into_iter().collect();
    let num = |name: &str| fields.get(name).and_then(|v| v.parse::<u64>().ok());
    let obj = |name: &str| {
        fields
            .get(name)
            .and_then(|v| serde_json::from_str::<Map<String, Value>>(v).ok())
    };
    let route: Value = fields
        .get("route")
        .and_then(|r| serde_json::from_str(r).ok())
        .unwrap_or_else(|| json!({"mqtt": [], "apns": [], "unknown_users": []}));
    let list = |k: &str| -> Vec<String> {
        route[k]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter_map(|v| v.as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default()
    };
    let mqtt: Vec<Value> = list("mqtt")
        .iter()
        .map(|t| {
            let f = |s: &str| num(&format!("mqtt:{t}:{s}"));
            let (sessions, acks, written) =
                (f("sessions"), f("acks").unwrap_or(0), f("written_at"));
            let state = match (sessions, written) {
                (None, _) | (_, None) => "pending",
                (Some(n), _) if acks >= n && acks > 0 => "acked",
                (Some(0), _) => "no_session",
                (_, Some(at)) if at <= overdue => "timeout",
                _ => "waiting",
            };
            json!({"topic": t, "state": state, "sessions": sessions, "written_at": written,
                "acks": acks, "acked_at": f("acked_at")})
        })
        .collect();
    let per_user = |prefix: &str, users: Vec<String>| -> Vec<Value> {
        users
            .into_iter()
            .map(|u| {
                let mut o = obj(&format!("{prefix}:{u}")).unwrap_or_else(|| {
                    let mut m = Map::new();
                    m.insert("state".into(), "pending".into());
                    m
                });
                o.insert("user".into(), u.into());
                Value::Object(o)
            })
            .collect()
    };
    let mut offline_users: Vec<String> = fields
        .keys()
        .filter_map(|k| k.strip_prefix("offline:").map(str::to_owned))
        .collect();
    offline_users.sort();
    json!({
        "id": push.to_string(),
        "routed_at": num("routed_at"),
        "mqtt": mqtt,
        "apns": per_user("apns", list("apns")),
        "offline": per_user("offline", offline_users),
        "unknown_users": list("unknown_users"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn memory(max_records: usize, max_bytes: usize) -> Memory {
        Memory {
            records: HashMap::new(),
            order: VecDeque::new(),
            bytes: 0,
            max_records,
            max_bytes,
            ttl_ms: 60_000,
        }
    }

    fn routed(n: usize) -> Event {
        Event::Routed {
            mqtt: vec![format!("push/user/{n}")],
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
        let sum: usize = m.records.values().map(|r| r.cost()).sum();
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

    #[test]
    fn topic_states() {
        let state = |sessions: Option<usize>, acks: usize, overdue: u64| {
            let mut m = memory(10, usize::MAX);
            let id = PushId::generate();
            let topic = "push/user/1".to_string();
            let routed = Event::Routed {
                mqtt: vec![topic.clone()],
                apns: vec![],
                unknown_users: vec![],
                users: Box::default(),
            };
            m.apply((id.clone(), 1, routed));
            if let Some(sessions) = sessions {
                let written = Event::MqttWritten {
                    topic: topic.clone(),
                    sessions,
                };
                m.apply((id.clone(), 10, written));
            }
            for _ in 0..acks {
                let acked = Event::MqttAcked {
                    topic: topic.as_str().into(),
                    client_id: "c".into(),
                };
                m.apply((id.clone(), 11, acked));
            }
            outcome(&id, m.fields(&id, 11).unwrap(), overdue)["mqtt"][0]["state"].clone()
        };
        assert_eq!(state(None, 0, 100), "pending");
        assert_eq!(state(Some(0), 0, 100), "no_session");
        assert_eq!(state(Some(2), 1, 9), "waiting");
        assert_eq!(state(Some(2), 1, 10), "timeout");
        assert_eq!(state(Some(2), 2, 100), "acked");
        // Replayed from the offline store: acknowledged with no session at the write.
        assert_eq!(state(Some(0), 1, 100), "acked");
    }

    #[test]
    fn outcome_per_target() {
        let mut m = memory(10, usize::MAX);
        let id = PushId::generate();
        let topic: Arc<str> = "push/user/1".into();
        for (at, e) in [
            (
                1,
                Event::Routed {
                    mqtt: vec![topic.to_string()],
                    apns: vec![Id::from(2u64), Id::from(3u64)],
                    unknown_users: vec![Id::from(4u64)],
                    users: Box::default(),
                },
            ),
            (
                2,
                Event::MqttWritten {
                    topic: topic.to_string(),
                    sessions: 2,
                },
            ),
            (
                3,
                Event::MqttAcked {
                    topic: topic.clone(),
                    client_id: "a".into(),
                },
            ),
            (
                4,
                Event::MqttAcked {
                    topic: topic.clone(),
                    client_id: "b".into(),
                },
            ),
            (
                5,
                Event::ApnsAccepted {
                    user: Id::from(2u64),
                    apns_id: "X".into(),
                },
            ),
        ] {
            m.apply((id.clone(), at, e));
        }
        let got = outcome(&id, m.fields(&id, 5).unwrap(), 0);
        assert_eq!(
            got,
            json!({"id": id.to_string(), "routed_at": 1,
                "mqtt": [{"topic": "push/user/1", "state": "acked", "sessions": 2, "written_at": 2, "acks": 2, "acked_at": 4}],
                "apns": [{"user": "2", "state": "accepted", "apns_id": "X", "at": 5},
                         {"user": "3", "state": "pending"}],
                "offline": [], "unknown_users": ["4"]})
        );
    }
}
