//! What keeps the consumer group tidy across instances: delivery counts of
//! claimed entries, the dead-letter stream for entries that cannot be
//! delivered, and removing the names of consumers that are gone.

use redis::streams::{StreamId, StreamPendingCountReply};

use super::stream::FIELD;
use crate::redis_conn::RedisConn;

/// Where entries that will not be delivered go, with why.
pub(crate) struct DeadLetters {
    /// `<intake.stream>:dead`
    pub key: String,
    /// `intake.dead_max_len` (XADD MAXLEN ~).
    pub max_len: u64,
}

/// An entry given up on, and why.
pub(crate) struct Dead<'a> {
    pub entry: &'a StreamId,
    pub reason: String,
    pub deliveries: u64,
}

impl DeadLetters {
    /// Appends the entries (the frame body unchanged in `f`, the original
    /// id, the reason, the delivery count, the time in unix ms) in one round
    /// trip. The caller acknowledges them only after this succeeded: a crash
    /// in between leaves them pending, to be dead-lettered again (twice,
    /// never lost).
    pub async fn add(&self, conn: &mut RedisConn, dead: &[Dead<'_>]) -> redis::RedisResult<()> {
        let now = crate::utc::now_ms();
        let mut pipe = redis::pipe();
        for d in dead {
            let body: Vec<u8> = d.entry.get(FIELD).unwrap_or_default();
            pipe.cmd("XADD")
                .arg(&self.key)
                .arg("MAXLEN")
                .arg("~")
                .arg(self.max_len)
                .arg("*")
                .arg(FIELD)
                .arg(body)
                .arg("id")
                .arg(&d.entry.id)
                .arg("reason")
                .arg(&d.reason)
                .arg("deliveries")
                .arg(d.deliveries)
                .arg("time")
                .arg(now)
                .ignore();
        }
        pipe.query_async(conn).await
    }
}

/// How often each of `ids` (this consumer's pending entries) has been
/// delivered, XPENDING's count; 1 for an id no longer pending.
pub(crate) async fn delivery_counts(
    conn: &mut RedisConn,
    key: &str,
    group: &str,
    ids: &[&str],
) -> redis::RedisResult<Vec<u64>> {
    let mut pipe = redis::pipe();
    for id in ids {
        pipe.cmd("XPENDING")
            .arg(key)
            .arg(group)
            .arg(id)
            .arg(id)
            .arg(1);
    }
    let replies: Vec<StreamPendingCountReply> = pipe.query_async(conn).await?;
    Ok(replies
        .iter()
        .map(|r| r.ids.first().map_or(1, |p| p.times_delivered as u64))
        .collect())
}

/// Removes, in one step, every consumer of the group but `me` that holds no
/// pending entry and has been idle (XINFO CONSUMERS) longer than `gone_ms`;
/// returns their names. Atomic, so an entry cannot be handed to a consumer
/// between the check and its removal (which would orphan the entry).
pub(crate) async fn forget_gone_consumers(
    conn: &mut RedisConn,
    key: &str,
    group: &str,
    me: &str,
    gone_ms: u64,
) -> redis::RedisResult<Vec<String>> {
    static SCRIPT: std::sync::OnceLock<redis::Script> = std::sync::OnceLock::new();
    SCRIPT
        .get_or_init(|| {
            redis::Script::new(
                r"local gone = {}
                for _, c in ipairs(redis.call('XINFO', 'CONSUMERS', KEYS[1], ARGV[1])) do
                    local f = {}
                    for i = 1, #c, 2 do f[c[i]] = c[i + 1] end
                    if f['name'] ~= ARGV[2] and f['pending'] == 0
                        and f['idle'] > tonumber(ARGV[3]) then
                        redis.call('XGROUP', 'DELCONSUMER', KEYS[1], ARGV[1], f['name'])
                        table.insert(gone, f['name'])
                    end
                end
                return gone",
            )
        })
        .key(key)
        .arg(group)
        .arg(me)
        .arg(gone_ms)
        .invoke_async(conn)
        .await
}
