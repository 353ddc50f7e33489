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
//!
//! Order: while a user has kept messages, new messages for the user are
//! kept behind them rather than published (the dispatcher asks
//! [`OfflineStore::backlogged`]), and the replay runs again once they are
//! kept ([`OfflineStore::kick`]), so a live push never overtakes a kept one.
//!
//! Bounded in bytes as kept (the JSON payload; in Redis the whole list
//! entry): per user, the oldest messages go first; in total (memory only),
//! a message that does not fit is not kept.

mod replay;

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use futures_util::future::try_join_all;

pub use self::replay::{run, start, Replay};
use crate::push::{Id, PushId};
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
    /// Per user, in bytes as kept; 0: no bound.
    max_bytes_per_user: usize,
    /// All users together, in memory; 0: no bound.
    max_bytes: usize,
    ttl: Duration,
    /// To the replayer (set by [`start`]): users whose messages were just
    /// kept, to replay if a device of theirs is connected.
    kicks: Arc<OnceLock<tokio::sync::mpsc::Sender<Id>>>,
}

#[derive(Clone)]
enum Backend {
    Memory(Arc<Mutex<Memory>>),
    /// `key` is the template with `{id}`; entries are `<expiry unix ms> <payload>`.
    Redis {
        conn: RedisConn,
        key: String,
    },
}

#[derive(Clone)]
struct Kept {
    expires_ms: u64,
    payload: Bytes,
    receipt: Option<PushId>,
}

/// A message to keep for a user: the push's id when it asked for a
/// receipt, and its TTL when shorter than `offline.ttl_secs`.
#[derive(Debug, Clone)]
pub struct Message {
    pub user: Id,
    pub payload: Bytes,
    pub receipt: Option<PushId>,
    pub ttl: Option<Duration>,
}

impl From<(Id, Bytes)> for Message {
    fn from((user, payload): (Id, Bytes)) -> Message {
        Message {
            user,
            payload,
            receipt: None,
            ttl: None,
        }
    }
}

/// The in-memory store with its byte counts.
#[derive(Default)]
struct Memory {
    users: HashMap<Id, UserList>,
    /// Payload bytes over all users.
    bytes: usize,
}

/// One user's messages, oldest first.
#[derive(Default)]
struct UserList {
    list: VecDeque<Kept>,
    bytes: usize,
}

impl Memory {
    fn lock(m: &Mutex<Memory>) -> std::sync::MutexGuard<'_, Memory> {
        m.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Drops `user`'s oldest `n` entries (all if fewer), and the user once empty.
    fn pop_front(&mut self, user: &Id, n: usize) {
        let Some(u) = self.users.get_mut(user) else {
            return;
        };
        for k in u.list.drain(..n.min(u.list.len())) {
            u.bytes -= k.payload.len();
            self.bytes -= k.payload.len();
        }
        if u.list.is_empty() {
            self.users.remove(user);
        }
    }
}

/// A user's kept messages, oldest first, unexpired.
#[derive(Debug, Default)]
pub struct Pending {
    /// Each message with how many of the oldest entries are consumed once
    /// it has been handed over (expired entries before it included), and
    /// its push's id when it asked for a receipt.
    pub messages: Vec<(usize, Bytes, Option<PushId>)>,
    /// Pushes with a receipt among the expired entries.
    pub expired_receipts: Vec<PushId>,
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
            max_bytes_per_user: settings.max_bytes_per_user,
            max_bytes: settings.max_bytes,
            ttl: Duration::from_secs(settings.ttl_secs),
            kicks: Arc::default(),
        }
    }

    /// Which of `users` have kept messages (expired ones included): new
    /// messages for them must be kept behind those, not published. One
    /// round trip (LLEN each; on a cluster, concurrent per node). The
    /// dispatcher asks only for users without APNs (only they are kept).
    pub async fn backlogged(&self, users: &[Id]) -> Result<HashSet<Id>, OfflineError> {
        if users.is_empty() || !self.enabled() {
            return Ok(HashSet::new());
        }
        let lens: Vec<usize> = match &self.backend {
            Backend::Memory(m) => {
                let m = Memory::lock(m);
                users
                    .iter()
                    .map(|u| usize::from(m.users.contains_key(u)))
                    .collect()
            }
            Backend::Redis { conn, key } => {
                let cmds = users
                    .iter()
                    .map(|u| redis::Cmd::llen(key.replace("{id}", u.as_str())));
                let replies = conn.each::<usize>(cmds.collect()).await?;
                // A key of another type is not a backlog.
                replies.into_iter().map(|r| r.unwrap_or(0)).collect()
            }
        };
        Ok(users
            .iter()
            .zip(lens)
            .filter(|(_, n)| *n > 0)
            .map(|(u, _)| u.clone())
            .collect())
    }

    /// Asks the replayer to hand `users`' kept messages over now if a
    /// device of theirs is connected (messages kept after its subscribe,
    /// or behind a replay). A full queue drops the ask: the next subscribe
    /// replays.
    pub fn kick<'a>(&self, users: impl IntoIterator<Item = &'a Id>) {
        if let Some(tx) = self.kicks.get() {
            for user in users {
                let _ = tx.try_send(user.clone());
            }
        }
    }

    pub fn enabled(&self) -> bool {
        self.max > 0
    }

    /// Keeps each (user, message), in order: a whole dispatch batch in one
    /// Redis round trip. Returns how many messages were dropped to stay
    /// within the bounds (older ones, or a new one that does not fit).
    pub async fn keep(&self, kept: &[Message]) -> Result<usize, OfflineError> {
        if kept.is_empty() || !self.enabled() {
            return Ok(0);
        }
        let now = crate::utc::now_ms();
        let expires =
            |m: &Message| now + m.ttl.map_or(self.ttl, |t| t.min(self.ttl)).as_millis() as u64;
        match &self.backend {
            Backend::Memory(m) => {
                let per_user = match self.max_bytes_per_user {
                    0 => usize::MAX,
                    n => n,
                };
                let total = match self.max_bytes {
                    0 => usize::MAX,
                    n => n,
                };
                let mut m = Memory::lock(m);
                let mut dropped = 0;
                for message in kept {
                    let (user, payload) = (&message.user, &message.payload);
                    let size = payload.len();
                    if size > per_user || m.bytes + size > total {
                        dropped += 1;
                        continue;
                    }
                    let u = m.users.entry(user.clone()).or_default();
                    u.list.push_back(Kept {
                        expires_ms: expires(message),
                        payload: payload.clone(),
                        receipt: message.receipt.clone(),
                    });
                    u.bytes += size;
                    // The oldest go until both bounds hold (never the new one:
                    // it fits alone).
                    let (mut over, mut bytes) = (0, u.bytes);
                    for k in &u.list {
                        if u.list.len() - over <= self.max && bytes <= per_user {
                            break;
                        }
                        bytes -= k.payload.len();
                        over += 1;
                    }
                    m.bytes += size;
                    m.pop_front(user, over);
                    dropped += over;
                }
                Ok(dropped)
            }
            Backend::Redis { conn, key } => {
                let add = |pipe: &mut redis::Pipeline, m: &Message| {
                    let mut entry = match &m.receipt {
                        None => format!("{} ", expires(m)),
                        Some(id) => format!("{}:{id} ", expires(m)),
                    }
                    .into_bytes();
                    entry.extend_from_slice(&m.payload);
                    pipe.cmd("EVAL")
                        .arg(KEEP_SCRIPT)
                        .arg(1)
                        .arg(key.replace("{id}", m.user.as_str()))
                        .arg(entry)
                        .arg(self.max)
                        .arg(self.max_bytes_per_user)
                        .arg(self.ttl.as_secs());
                };
                // Each answers how many it dropped. On a cluster one
                // pipeline per user (one key, one slot; its messages in
                // order); one for all otherwise.
                let dropped: Vec<usize> = if let RedisConn::Cluster(_) = conn {
                    let mut per_user: HashMap<&Id, redis::Pipeline> = HashMap::new();
                    for one in kept {
                        add(per_user.entry(&one.user).or_insert_with(redis::pipe), one);
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
                Ok(dropped.iter().sum())
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
        let mut m = Memory::lock(map);
        let mut freed = 0;
        m.users.retain(|_, u| {
            // Kept in order, so every expired message is at the front.
            while u.list.front().is_some_and(|k| k.expires_ms <= now) {
                let k = u.list.pop_front().expect("checked");
                u.bytes -= k.payload.len();
                freed += k.payload.len();
                dropped += 1;
            }
            !u.list.is_empty()
        });
        m.bytes -= freed;
        dropped
    }

    /// The user's kept messages; `remove` them once handed over.
    pub async fn pending(&self, user: &Id) -> Result<Pending, OfflineError> {
        let now = crate::utc::now_ms();
        let entries: Vec<Kept> = match &self.backend {
            Backend::Memory(m) => Memory::lock(m)
                .users
                .get(user)
                .map(|u| u.list.iter().cloned().collect())
                .unwrap_or_default(),
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
                pending.expired_receipts.extend(kept.receipt);
            } else {
                pending.messages.push((i + 1, kept.payload, kept.receipt));
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
            Backend::Memory(m) => Memory::lock(m).pop_front(user, n),
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

/// Keeps one entry at the head of a user's list, then trims the list to
/// `max` entries and, when `max_bytes` > 0, to the newest entries that fit
/// in it (a new entry larger than that is not kept: then the newest, which
/// fits, stops the scan at `i` > 1); sets the list's
/// expiry. Answers how many entries it dropped. The bytes are counted by
/// reading the list, at most `max` entries.
const KEEP_SCRIPT: &str = r"
local max, max_bytes = tonumber(ARGV[2]), tonumber(ARGV[3])
if max_bytes > 0 and #ARGV[1] > max_bytes then
  return 1
end
local n = redis.call('LPUSH', KEYS[1], ARGV[1])
local dropped = 0
if n > max then
  redis.call('LTRIM', KEYS[1], 0, max - 1)
  dropped = n - max
  n = max
end
if max_bytes > 0 then
  local total = 0
  for i, v in ipairs(redis.call('LRANGE', KEYS[1], 0, -1)) do
    total = total + #v
    if total > max_bytes then
      redis.call('LTRIM', KEYS[1], 0, i - 2)
      dropped = dropped + n - (i - 1)
      break
    end
  end
end
redis.call('EXPIRE', KEYS[1], ARGV[4])
return dropped
";

/// `<expiry unix ms> <payload>`, or `<expiry unix ms>:<push id> <payload>`
/// for a push with a receipt; an unreadable entry counts as expired.
fn parse_entry(raw: Vec<u8>) -> Kept {
    let split = raw.iter().position(|b| *b == b' ');
    let head = split.and_then(|i| std::str::from_utf8(&raw[..i]).ok());
    let (expiry, receipt) = match head.map(|h| h.split_once(':')) {
        Some(Some((expiry, id))) => (Some(expiry), PushId::given(id)),
        Some(None) => (head, None),
        None => (None, None),
    };
    let expires_ms = expiry.and_then(|e| e.parse().ok()).unwrap_or(0);
    let payload = Bytes::from(raw).slice(split.map_or(0, |i| i + 1)..);
    Kept {
        expires_ms,
        payload,
        receipt,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn memory(max: usize) -> OfflineStore {
        OfflineStore {
            backend: Backend::Memory(Arc::default()),
            max,
            max_bytes_per_user: 0,
            max_bytes: 0,
            ttl: Duration::from_secs(60),
            kicks: Arc::default(),
        }
    }

    fn bytes_of(store: &OfflineStore) -> usize {
        let Backend::Memory(m) = &store.backend else {
            unreachable!()
        };
        let m = Memory::lock(m);
        let sum: usize = m.users.values().map(|u| u.bytes).sum();
        assert_eq!(sum, m.bytes, "per-user counts add up to the total");
        m.bytes
    }

    /// Issue 14 point 6: bytes as kept, per user (oldest dropped, a message
    /// too big for the bound not kept) and in total (the new one not kept).
    #[tokio::test]
    async fn count_and_byte_bounds_together() {
        let mut store = memory(2);
        store.max_bytes_per_user = 10;
        let a = Id::from("a");
        let msg = |n: usize| Bytes::from(vec![b'x'; n]);
        store
            .keep(&[(a.clone(), msg(6)).into(), (a.clone(), msg(1)).into()])
            .await
            .unwrap();
        // Count drops the 6; then 1 + 9 fits.
        assert_eq!(store.keep(&[(a.clone(), msg(9)).into()]).await.unwrap(), 1);
        assert_eq!(bytes_of(&store), 10);
    }

    #[tokio::test]
    async fn memory_store_is_bounded_in_bytes() {
        let mut store = memory(100);
        store.max_bytes_per_user = 10;
        store.max_bytes = 25;
        let (a, b, c) = (Id::from("a"), Id::from("b"), Id::from("c"));
        let msg = |n: usize| Bytes::from(vec![b'x'; n]);
        assert_eq!(
            store
                .keep(&[(a.clone(), msg(4)).into(), (a.clone(), msg(4)).into()])
                .await
                .unwrap(),
            0
        );
        // 4 + 4 + 4 > 10: the oldest goes.
        assert_eq!(store.keep(&[(a.clone(), msg(4)).into()]).await.unwrap(), 1);
        assert_eq!(bytes_of(&store), 8);
        // Larger than a user may keep: not kept, nothing else dropped.
        assert_eq!(store.keep(&[(a.clone(), msg(11)).into()]).await.unwrap(), 1);
        assert_eq!(store.pending(&a).await.unwrap().read, 2);
        // 10 for a: the two 4s go.
        assert_eq!(store.keep(&[(a.clone(), msg(10)).into()]).await.unwrap(), 2);
        assert_eq!(store.keep(&[(b.clone(), msg(10)).into()]).await.unwrap(), 0);
        assert_eq!(bytes_of(&store), 20);
        // The total (25) is full for c beyond 5 bytes.
        assert_eq!(store.keep(&[(c.clone(), msg(6)).into()]).await.unwrap(), 1);
        assert_eq!(store.keep(&[(c.clone(), msg(5)).into()]).await.unwrap(), 0);
        assert_eq!(bytes_of(&store), 25);
        // Handed over and removed: room again.
        store.remove(&a, 1).await.unwrap();
        assert_eq!(bytes_of(&store), 15);
        assert_eq!(store.keep(&[(c.clone(), msg(5)).into()]).await.unwrap(), 0);
        store.ttl = Duration::ZERO;
        store.keep(&[(a.clone(), msg(1)).into()]).await.unwrap();
        store.remove(&b, 1).await.unwrap();
        store.remove(&c, 2).await.unwrap();
        assert_eq!(store.sweep(), 1);
        assert_eq!(bytes_of(&store), 0);
    }

    #[tokio::test]
    async fn memory_store_keeps_bounded_in_order_and_removes_the_oldest() {
        let store = memory(2);
        let (a, b) = (Id::from("a"), Id::from("b"));
        for n in 0..3u8 {
            let dropped = store
                .keep(&[
                    (a.clone(), Bytes::from(vec![n])).into(),
                    (b.clone(), Bytes::from(vec![n])).into(),
                ])
                .await;
            assert_eq!(dropped.unwrap(), if n < 2 { 0 } else { 2 });
        }
        let p = store.pending(&a).await.unwrap();
        let got: Vec<_> = p.messages.iter().map(|(i, m, _)| (*i, m[0])).collect();
        assert_eq!((got, p.read, p.expired), (vec![(1, 1), (2, 2)], 2, 0));
        store.remove(&a, 1).await.unwrap();
        store
            .keep(&[(a.clone(), Bytes::from_static(&[9])).into()])
            .await
            .unwrap();
        let p = store.pending(&a).await.unwrap();
        assert_eq!(
            p.messages.iter().map(|(_, m, _)| m[0]).collect::<Vec<_>>(),
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
            .keep(&[(a.clone(), Bytes::from_static(b"x")).into()])
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
        let k = parse_entry(b"123:order:7 {}".to_vec());
        assert_eq!(k.expires_ms, 123);
        assert_eq!(k.receipt, Some(PushId::Given("order:7".into())));
        assert_eq!(&k.payload[..], b"{}");
    }
}
