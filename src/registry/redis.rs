//! The old service's Redis schema: `User:<uid>` hashes and
//! `GroupAppleUser:<gid>` sets, read in pipelines (one round trip a batch;
//! on a cluster, one per node).

use std::collections::HashMap;

use redis::AsyncCommands;
use tracing::warn;

use super::{RegistryError, UserStore};
use crate::push::{Id, UserRecord};
use crate::redis_conn::{redact, RedisConn};
use crate::settings::RegistrySettings;

#[derive(Clone)]
pub struct RedisRegistry {
    conn: RedisConn,
    user_key: String,
    group_key: String,
}

impl RedisRegistry {
    /// Connects to `url`: one server, a cluster or a sentinel-managed master
    /// (see [`RedisConn`] for the URL forms).
    pub async fn connect(url: &str, settings: &RegistrySettings) -> Result<Self, RegistryError> {
        let conn = RedisConn::open(url, settings.redis_ca_file.as_deref())
            .await
            .map_err(|source| RegistryError::Connect {
                url: redact(url),
                source,
            })?;
        Ok(Self {
            conn,
            user_key: settings.user_key.clone(),
            group_key: settings.group_apple_key.clone(),
        })
    }

    /// The connection, shared with other Redis-backed stores (offline messages).
    pub fn conn(&self) -> &RedisConn {
        &self.conn
    }

    fn user_key(&self, id: &Id) -> String {
        self.user_key.replace("{id}", id.as_str())
    }

    fn group_key(&self, id: &Id) -> String {
        self.group_key.replace("{id}", id.as_str())
    }
}

/// Compare-and-delete in one step, so a token the app re-registered
/// between Apple's answer and this call is never removed.
fn delete_token_script() -> &'static redis::Script {
    static SCRIPT: std::sync::OnceLock<redis::Script> = std::sync::OnceLock::new();
    SCRIPT.get_or_init(|| {
        redis::Script::new(
            r"if redis.call('HGET', KEYS[1], 'app_token') == ARGV[1] then
                return redis.call('HDEL', KEYS[1], 'app_token')
            end
            return 0",
        )
    })
}

/// `HSET app_focus 1` only on a record that exists, in one step.
fn set_focus_script() -> &'static redis::Script {
    static SCRIPT: std::sync::OnceLock<redis::Script> = std::sync::OnceLock::new();
    SCRIPT.get_or_init(|| {
        redis::Script::new(
            r"if redis.call('EXISTS', KEYS[1]) == 1 then
                return redis.call('HSET', KEYS[1], 'app_focus', 1)
            end
            return 0",
        )
    })
}

/// A key of the wrong type (someone else's data, a manual mistake) is read
/// as missing, with a warning naming it, so that it costs its own user's
/// push and not the whole batch's; any other error is the lookup's.
fn wrong_type_is_none<T>(
    reply: redis::RedisResult<T>,
    key: impl FnOnce() -> String,
) -> Result<Option<T>, redis::RedisError> {
    match reply {
        Ok(v) => Ok(Some(v)),
        Err(e) if e.code() == Some("WRONGTYPE") => {
            warn!(key = %key(), "registry: key holds the wrong kind of value; read as missing");
            Ok(None)
        }
        Err(e) => Err(e),
    }
}

fn record(mut hash: HashMap<String, String>) -> Option<UserRecord> {
    if hash.is_empty() {
        return None;
    }
    Some(UserRecord {
        app_focus: UserRecord::focus_from(hash.get("app_focus").map(String::as_str)),
        app_token: hash.remove("app_token"),
        app_ident: hash.remove("app_ident"),
        app_version: hash.remove("app_version"),
    })
}

impl UserStore for RedisRegistry {
    async fn users(&self, ids: &[Id]) -> Result<Vec<Option<UserRecord>>, RegistryError> {
        if ids.is_empty() {
            return Ok(Vec::new());
        }
        let cmds = ids.iter().map(|id| redis::Cmd::hgetall(self.user_key(id)));
        let replies = self.conn.each(cmds.collect()).await?;
        let mut records = Vec::with_capacity(ids.len());
        for (id, reply) in ids.iter().zip(replies) {
            let hash = wrong_type_is_none(reply, || self.user_key(id))?;
            records.push(hash.and_then(record));
        }
        Ok(records)
    }

    async fn group_apple_members(&self, groups: &[Id]) -> Result<Vec<Vec<Id>>, RegistryError> {
        if groups.is_empty() {
            return Ok(Vec::new());
        }
        let cmds = groups
            .iter()
            .map(|g| redis::Cmd::smembers(self.group_key(g)));
        let replies = self.conn.each::<Vec<String>>(cmds.collect()).await?;
        let mut sets = Vec::with_capacity(groups.len());
        for (group, reply) in groups.iter().zip(replies) {
            let members = wrong_type_is_none(reply, || self.group_key(group))?.unwrap_or_default();
            sets.push(members.iter().map(|m| Id::from(m.as_str())).collect());
        }
        Ok(sets)
    }

    async fn set_focus(&self, id: &Id, focus: bool) -> Result<(), RegistryError> {
        let key = self.user_key(id);
        let mut conn = self.conn.clone();
        if focus {
            let _: i64 = set_focus_script().key(key).invoke_async(&mut conn).await?;
        } else {
            let _: () = conn.hdel(key, "app_focus").await?;
        }
        Ok(())
    }

    async fn put_user(&self, id: &Id, record: &UserRecord) -> Result<(), RegistryError> {
        let mut fields: Vec<(&str, &str)> = [
            ("app_token", &record.app_token),
            ("app_ident", &record.app_ident),
            ("app_version", &record.app_version),
        ]
        .into_iter()
        .filter_map(|(k, v)| v.as_deref().map(|v| (k, v)))
        .collect();
        if record.app_focus {
            fields.push(("app_focus", "1"));
        }
        if fields.is_empty() {
            return Ok(());
        }
        let _: () = self
            .conn
            .clone()
            .hset_multiple(self.user_key(id), &fields)
            .await?;
        Ok(())
    }

    async fn add_group_apple_member(&self, group: &Id, user: &Id) -> Result<(), RegistryError> {
        let _: () = self
            .conn
            .clone()
            .sadd(self.group_key(group), user.as_str())
            .await?;
        Ok(())
    }

    async fn remove_group_apple_member(&self, group: &Id, user: &Id) -> Result<(), RegistryError> {
        let _: () = self
            .conn
            .clone()
            .srem(self.group_key(group), user.as_str())
            .await?;
        Ok(())
    }

    async fn delete_token_if(&self, id: &Id, token: &str) -> Result<bool, RegistryError> {
        let deleted: i64 = delete_token_script()
            .key(self.user_key(id))
            .arg(token)
            .invoke_async(&mut self.conn.clone())
            .await?;
        Ok(deleted == 1)
    }

    async fn delete_user(&self, id: &Id) -> Result<bool, RegistryError> {
        let removed: u64 = self.conn.clone().del(self.user_key(id)).await?;
        Ok(removed > 0)
    }

    async fn ping(&self) -> Result<(), RegistryError> {
        let _: String = redis::cmd("PING")
            .query_async(&mut self.conn.clone())
            .await?;
        Ok(())
    }
}
