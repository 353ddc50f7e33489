//! Where outcomes are kept: a hash of fields per push, in Redis (`HSET`,
//! `HINCRBY`, then one `EXPIRE` per push in each batch of changes) or in
//! memory (`memory`), typed, rendered as the same fields when asked.
//!
//! Fields: `routed_at`, `route` (JSON: topics, APNs users, unknown users);
//! per topic `mqtt:<topic>:sessions`, `:written_at`, `:acks`, `:acked_at`;
//! per user `apns:<user>` and `offline:<user>` (JSON with `state` and `at`).
//!
//! Each user a push is for also keeps the ids of its last [`RECENT`]
//! pushes: in Redis a capped list (`LPUSH`, `LTRIM`, `EXPIRE`) at the
//! push key with `{id}` = `user/<user>` (no push id has a `/`); in memory
//! the records themselves say whom they are for.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use redis::Value as RedisValue;
use serde_json::{json, Map, Value};
use tokio_util::sync::CancellationToken;

use super::memory::Memory;
use super::queue::Queue;
use super::{store_failed, Change, Event, Outlets, ReceiptsError};
use crate::push::{Id, PushId};
use crate::redis_conn::RedisConn;
use crate::settings::ReceiptsSettings;
use crate::stats::Stats;

/// Changes applied together: one Redis round trip.
const BATCH: usize = 512;
/// How long the writer lets a batch gather once a change has come.
const GATHER: std::time::Duration = std::time::Duration::from_millis(1);
/// How many of a user's last pushes are listed.
pub const RECENT: usize = 20;

/// One write to a push's hash.
enum Op {
    Set(String, String),
    Incr(String),
}

/// The writes an event makes.
fn ops(event: &Event, at: u64) -> Vec<Op> {
    match event {
        Event::Routed {
            mqtt,
            apns,
            unknown_users,
            ..
        } => {
            let topics: Vec<&str> = mqtt.iter().map(|t| &**t).collect();
            vec![
                Op::Set("routed_at".into(), at.to_string()),
                Op::Set("route".into(), route_json(&topics, apns, unknown_users)),
            ]
        }
        Event::MqttWritten { topic, sessions } => vec![
            Op::Set(format!("mqtt:{topic}:sessions"), sessions.to_string()),
            Op::Set(format!("mqtt:{topic}:written_at"), at.to_string()),
        ],
        Event::MqttAcked { topic, .. } => vec![
            Op::Incr(format!("mqtt:{topic}:acks")),
            Op::Set(format!("mqtt:{topic}:acked_at"), at.to_string()),
        ],
        other => user_states(other, at)
            .into_iter()
            .map(|(name, value)| Op::Set(name, value))
            .collect(),
    }
}

/// The `route` field: `{"mqtt": [...], "apns": [...], "unknown_users": [...]}`.
pub(super) fn route_json(topics: &[&str], apns: &[Id], unknown: &[Id]) -> String {
    json!({"mqtt": topics, "apns": super::ids(apns), "unknown_users": super::ids(unknown)})
        .to_string()
}

/// The per-user fields (`offline:<user>`, `apns:<user>`: JSON with
/// `state` and `at`) an event sets; none for the MQTT ones.
pub(super) fn user_states(event: &Event, at: u64) -> Option<(String, String)> {
    let state = |s: Value| s.to_string();
    Some(match event {
        Event::Routed { .. } | Event::MqttWritten { .. } | Event::MqttAcked { .. } => return None,
        Event::OfflineKept { user } => (
            format!("offline:{user}"),
            state(json!({"state": "kept", "at": at})),
        ),
        Event::OfflineReplayed { user } => (
            format!("offline:{user}"),
            state(json!({"state": "replayed", "at": at})),
        ),
        Event::OfflineExpired { user } => (
            format!("offline:{user}"),
            state(json!({"state": "expired", "at": at})),
        ),
        Event::ApnsAccepted { user, apns_id } => (
            format!("apns:{user}"),
            state(json!({"state": "accepted", "apns_id": apns_id, "at": at})),
        ),
        Event::ApnsRejected {
            user,
            status,
            reason,
        } => (
            format!("apns:{user}"),
            state(json!({"state": "rejected", "status": status, "reason": reason, "at": at})),
        ),
        Event::ApnsDeadToken { user, reason } => (
            format!("apns:{user}"),
            state(json!({"state": "dead_token", "reason": reason, "at": at})),
        ),
    })
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

impl Store {
    /// `prefix` is `mqtt.prefix` (the memory store derives user topics).
    pub fn new(settings: &ReceiptsSettings, redis: Option<RedisConn>, prefix: &str) -> Store {
        match redis {
            Some(conn) => Store::Redis {
                conn,
                key: settings.key.clone(),
                ttl_secs: settings.ttl_secs,
            },
            None => Store::Memory(Arc::new(Mutex::new(Memory::new(
                settings.max_records,
                settings.max_bytes,
                settings.ttl_secs.saturating_mul(1000),
                prefix,
            )))),
        }
    }

    fn memory(m: &Mutex<Memory>) -> std::sync::MutexGuard<'_, Memory> {
        m.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The writer: applies changes in batches (gathered for up to
    /// [`GATHER`]) until `stop`, then what is still queued; each batch,
    /// once stored, goes to `webhook`.
    pub(super) async fn write(
        self,
        queue: Arc<Queue>,
        outlets: Outlets,
        stats: Arc<Stats>,
        stop: CancellationToken,
    ) {
        let mut batch = Vec::with_capacity(BATCH);
        loop {
            let stopping = tokio::select! {
                _ = queue.rung() => false,
                _ = stop.cancelled() => true,
            };
            if !stopping {
                // Under load, one pass a millisecond rather than one per change.
                tokio::select! {
                    _ = tokio::time::sleep(GATHER) => {}
                    _ = stop.cancelled() => {}
                }
            }
            let mut taken = queue.take(stopping);
            while !taken.is_empty() {
                batch.extend(taken.drain(..taken.len().min(BATCH)));
                self.apply(&mut batch, &outlets, &stats).await;
            }
            if stopping {
                return;
            }
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
                // A push's changes mostly come in the same batch: one EXPIRE each.
                let mut touched = std::collections::HashSet::new();
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
                    touched.insert(key);
                }
                for key in touched {
                    cmds.push(redis::cmd("EXPIRE").arg(key).arg(*ttl_secs).clone());
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

    fn memory() -> Memory {
        Memory::new(10, usize::MAX, 60_000, "push")
    }

    #[test]
    fn topic_states() {
        let state = |sessions: Option<usize>, acks: usize, overdue: u64| {
            let mut m = memory();
            let id = PushId::generate();
            let topic = "push/user/1".to_string();
            let routed = Event::Routed {
                mqtt: Arc::new([topic.as_str().into()]),
                apns: vec![],
                unknown_users: vec![],
                users: Box::default(),
            };
            m.apply((id.clone(), 1, routed));
            if let Some(sessions) = sessions {
                let written = Event::MqttWritten {
                    topic: topic.as_str().into(),
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
        let mut m = memory();
        let id = PushId::generate();
        let topic: Arc<str> = "push/user/1".into();
        for (at, e) in [
            (
                1,
                Event::Routed {
                    mqtt: Arc::new([topic.clone()]),
                    apns: vec![Id::from(2u64), Id::from(3u64)],
                    unknown_users: vec![Id::from(4u64)],
                    users: Box::default(),
                },
            ),
            (
                2,
                Event::MqttWritten {
                    topic: topic.clone(),
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
