//! Messages for users who have no usable APNs token and no MQTT session
//! (typically Android devices that are offline): without this they would be
//! published to nobody and lost. They are kept per user, bounded and with an
//! expiry, and handed to the user's topic when a device of the user
//! subscribes to it, oldest first, then removed (at least once: removal
//! follows the hand-over, so a crash in between repeats, never loses).
//!
//! Kept in Redis when Redis is the registry (a list per user, newest at the
//! head, so it survives a restart and is shared by every instance), in
//! memory otherwise. Group messages are not kept: a group topic has no single
//! owner whose reconnect would replay it.

mod replay;

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures_util::future::try_join_all;

pub use self::replay::{run, Replay};
use crate::push::Id;
use crate::redis_conn::RedisConn;
use crate::registry::Registry;
use crate::settings::{OfflineSettings, RegistrySettings};

#[derive(Debug, thiserror::Error)]
pub enum OfflineError {
    #[error("offline store: redis: {0}")]
    Redis(#[from] redis::RedisError),
}

/// Where kept messages live; cheap to clone.
#[derive(Clone)]
pub struct OfflineStore {
    backend: Backend,
    max: usize,
    ttl: Duration,
}

#[derive(Clone)]
enum Backend {
    /// Oldest first.
    Memory(Arc<Mutex<HashMap<Id, VecDeque<Kept>>>>),
    /// `key` is the template with `{id}`; entries are `<expiry unix ms> <payload>`.
    Redis { conn: RedisConn, key: String },
}

#[derive(Clone)]
struct Kept {
    expires_ms: u64,
    payload: Bytes,
}

/// A user's kept messages, oldest first, unexpired.
#[derive(Debug, Default)]
pub struct Pending {
    /// Each message with how many of the oldest entries are consumed once
    /// it has been handed over (expired entries before it included).
    pub messages: Vec<(usize, Bytes)>,
    /// Entries read, including expired ones after the last message.
    pub read: usize,
    pub expired: usize,
}

impl OfflineStore {
    /// In the registry's Redis when it has one, in memory otherwise.
    pub fn new(registry: &Registry, keys: &RegistrySettings, settings: &OfflineSettings) -> Self {
        let backend = match registry {
            Registry::Redis(r) => Backend::Redis {
                conn: r.conn().clone(),
                key: keys.offline_key.clone(),
            },
            Registry::Memory(_) => Backend::Memory(Arc::default()),
        };
        OfflineStore {
            backend,
            max: settings.max_per_user,
            ttl: Duration::from_secs(settings.ttl_secs),
        }
    }

    pub fn enabled(&self) -> bool {
        self.max > 0
    }

    /// Keeps each (user, message), in order: a whole dispatch batch in one
    /// Redis round trip. Returns how many older messages were dropped to
    /// stay within the bound.
    pub async fn keep(&self, kept: &[(Id, Bytes)]) -> Result<usize, OfflineError> {
        if kept.is_empty() || !self.enabled() {
            return Ok(0);
        }
        let expires_ms = crate::utc::now_ms() + self.ttl.as_millis() as u64;
        match &self.backend {
            Backend::Memory(map) => {
                let mut map = map.lock().unwrap_or_else(|e| e.into_inner());
                let mut dropped = 0;
                for (user, payload) in kept {
                    let list = map.entry(user.clone()).or_default();
                    list.push_back(Kept {
                        expires_ms,
                        payload: payload.clone(),
                    });
                    while list.len() > self.max {
                        list.pop_front();
                        dropped += 1;
                    }
                }
                Ok(dropped)
            }
            Backend::Redis { conn, key } => {
                let add = |pipe: &mut redis::Pipeline, (user, payload): &(Id, Bytes)| {
                    let mut entry = format!("{expires_ms} ").into_bytes();
                    entry.extend_from_slice(payload);
                    let key = key.replace("{id}", user.as_str());
                    pipe.lpush(&key, entry)
                        .ltrim(&key, 0, self.max as isize - 1)
                        .ignore()
                        .expire(&key, self.ttl.as_secs() as i64)
                        .ignore();
                };
                // Only LPUSH answers (the new length). On a cluster one
                // pipeline per user (one key, one slot; its messages in
                // order); one for all otherwise.
                let lengths: Vec<usize> = if let RedisConn::Cluster(_) = conn {
                    let mut per_user: HashMap<&Id, redis::Pipeline> = HashMap::new();
                    for one in kept {
                        add(per_user.entry(&one.0).or_insert_with(redis::pipe), one);
                    }
                    let answers = try_join_all(per_user.into_values().map(|pipe| {
                        let mut conn = conn.clone();
                        async move { pipe.query_async::<Vec<usize>>(&mut conn).await }
                    }))
                    .await?;
                    answers.into_iter().flatten().collect()
                } else {
                    let mut pipe = redis::pipe();
                    for one in kept {
                        add(&mut pipe, one);
                    }
                    pipe.query_async(&mut conn.clone()).await?
                };
                Ok(lengths.iter().map(|n| n.saturating_sub(self.max)).sum())
            }
        }
    }

    /// Drops expired messages of users who never came back (Redis expires
    /// its lists itself); returns how many.
    pub fn sweep(&self) -> usize {
        let Backend::Memory(map) = &self.backend else {
            return 0;
        };
        let now = crate::utc::now_ms();
        let mut dropped = 0;
        map.lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|_, list| {
                // Kept in order, so every expired message is at the front.
                while list.front().is_some_and(|k| k.expires_ms <= now) {
                    list.pop_front();
                    dropped += 1;
                }
                !list.is_empty()
            });
        dropped
    }

    /// The user's kept messages; `remove` them once handed over.
    pub async fn pending(&self, user: &Id) -> Result<Pending, OfflineError> {
        let now = crate::utc::now_ms();
        let entries: Vec<Kept> = match &self.backend {
            Backend::Memory(map) => {
                let map = map.lock().unwrap_or_else(|e| e.into_inner());
                map.get(user)
                    .map(|l| l.iter().cloned().collect())
                    .unwrap_or_default()
            }
            Backend::Redis { conn, key } => {
                let key = key.replace("{id}", user.as_str());
                let raw: Vec<Vec<u8>> = redis::cmd("LRANGE")
                    .arg(&key)
                    .arg(0)
                    .arg(-1)
                    .query_async(&mut conn.clone())
                    .await?;
                raw.into_iter().rev().map(parse_entry).collect()
            }
        };
        let mut pending = Pending {
            read: entries.len(),
            ..Pending::default()
        };
        for (i, kept) in entries.into_iter().enumerate() {
            if kept.expires_ms <= now {
                pending.expired += 1;
            } else {
                pending.messages.push((i + 1, kept.payload));
            }
        }
        Ok(pending)
    }

    /// Removes the user's `n` oldest entries (messages kept meanwhile stay).
    pub async fn remove(&self, user: &Id, n: usize) -> Result<(), OfflineError> {
        if n == 0 {
            return Ok(());
        }
        match &self.backend {
            Backend::Memory(map) => {
                let mut map = map.lock().unwrap_or_else(|e| e.into_inner());
                if let Some(list) = map.get_mut(user) {
                    list.drain(..n.min(list.len()));
                    if list.is_empty() {
                        map.remove(user);
                    }
                }
            }
            Backend::Redis { conn, key } => {
                let key = key.replace("{id}", user.as_str());
                let _: () = redis::cmd("LTRIM")
                    .arg(&key)
                    .arg(0)
                    .arg(-(n as i64) - 1)
                    .query_async(&mut conn.clone())
                    .await?;
            }
        }
        Ok(())
    }
}

/// `<expiry unix ms> <payload>`; an unreadable entry counts as expired.
fn parse_entry(raw: Vec<u8>) -> Kept {
    let split = raw.iter().position(|b| *b == b' ');
    let expires_ms = split
        .and_then(|i| std::str::from_utf8(&raw[..i]).ok()?.parse().ok())
        .unwrap_or(0);
    let payload = Bytes::from(raw).slice(split.map_or(0, |i| i + 1)..);
    Kept {
        expires_ms,
        payload,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn memory(max: usize) -> OfflineStore {
        OfflineStore {
            backend: Backend::Memory(Arc::default()),
            max,
            ttl: Duration::from_secs(60),
        }
    }

    #[tokio::test]
    async fn memory_store_keeps_bounded_in_order_and_removes_the_oldest() {
        let store = memory(2);
        let (a, b) = (Id::from("a"), Id::from("b"));
        for n in 0..3u8 {
            let dropped = store
                .keep(&[
                    (a.clone(), Bytes::from(vec![n])),
                    (b.clone(), Bytes::from(vec![n])),
                ])
                .await;
            assert_eq!(dropped.unwrap(), if n < 2 { 0 } else { 2 });
        }
        let p = store.pending(&a).await.unwrap();
        let got: Vec<_> = p.messages.iter().map(|(i, m)| (*i, m[0])).collect();
        assert_eq!((got, p.read, p.expired), (vec![(1, 1), (2, 2)], 2, 0));
        store.remove(&a, 1).await.unwrap();
        store
            .keep(&[(a.clone(), Bytes::from_static(&[9]))])
            .await
            .unwrap();
        let p = store.pending(&a).await.unwrap();
        assert_eq!(
            p.messages.iter().map(|(_, m)| m[0]).collect::<Vec<_>>(),
            [2, 9]
        );
        assert_eq!(store.pending(&b).await.unwrap().read, 2);
        assert_eq!(store.sweep(), 0);
    }

    #[tokio::test]
    async fn expired_messages_are_skipped_and_swept() {
        let mut store = memory(5);
        store.ttl = Duration::ZERO;
        let a = Id::from("a");
        store
            .keep(&[(a.clone(), Bytes::from_static(b"x"))])
            .await
            .unwrap();
        let p = store.pending(&a).await.unwrap();
        assert_eq!((p.messages.len(), p.read, p.expired), (0, 1, 1));
        assert_eq!(store.sweep(), 1);
        assert_eq!(store.pending(&a).await.unwrap().read, 0);
    }

    #[test]
    fn entries_parse_and_garbage_counts_as_expired() {
        let k = parse_entry(b"123 {\"a\": 1}".to_vec());
        assert_eq!((k.expires_ms, &k.payload[..]), (123, &b"{\"a\": 1}"[..]));
        assert_eq!(parse_entry(b"garbage".to_vec()).expires_ms, 0);
    }
}
