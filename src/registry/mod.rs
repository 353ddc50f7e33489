//! Where user records live: Redis (production, the old service's schema) or
//! memory (the embedded default). Both implement [`UserStore`], and the same
//! tests run against both.

mod memory;
mod redis;

use std::future::Future;

pub use self::memory::MemoryRegistry;
pub use self::redis::RedisRegistry;
use crate::push::{Id, UserRecord};
pub use crate::redis_conn::RedisConn;
use crate::settings::RegistrySettings;

#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("redis {url}: {source}")]
    Connect {
        url: String,
        source: ::redis::RedisError,
    },
    #[error("redis: {0}")]
    Redis(#[from] ::redis::RedisError),
}

/// The registry operations pushbridge needs. Lookups take lists so that a
/// batch of pushes costs one round trip, not one per user.
pub trait UserStore: Send + Sync {
    /// Each user's record, in the order of `ids`; `None` where there is none.
    fn users(
        &self,
        ids: &[Id],
    ) -> impl Future<Output = Result<Vec<Option<UserRecord>>, RegistryError>> + Send;

    /// The iOS members of each group, in the order of `groups`.
    fn group_apple_members(
        &self,
        groups: &[Id],
    ) -> impl Future<Output = Result<Vec<Vec<Id>>, RegistryError>> + Send;

    /// Sets (`app_focus = 1`) or deletes `app_focus` in the user's record;
    /// a user with no record is left without one (a status message must not
    /// create records).
    fn set_focus(
        &self,
        id: &Id,
        focus: bool,
    ) -> impl Future<Output = Result<(), RegistryError>> + Send;

    /// Writes a user's record (the fields that are `Some`, and focus if set).
    fn put_user(
        &self,
        id: &Id,
        record: &UserRecord,
    ) -> impl Future<Output = Result<(), RegistryError>> + Send;

    /// Adds a user to a group's set of iOS members.
    fn add_group_apple_member(
        &self,
        group: &Id,
        user: &Id,
    ) -> impl Future<Output = Result<(), RegistryError>> + Send;

    /// Removes a user from a group's set of iOS members.
    fn remove_group_apple_member(
        &self,
        group: &Id,
        user: &Id,
    ) -> impl Future<Output = Result<(), RegistryError>> + Send;

    /// Deletes the user's `app_token` only if it is still `token`; true if
    /// it was deleted. Apple said `token` is dead, but the app may have
    /// registered a new one meanwhile, which must survive.
    fn delete_token_if(
        &self,
        id: &Id,
        token: &str,
    ) -> impl Future<Output = Result<bool, RegistryError>> + Send;

    /// Deletes a user's record; true if there was one.
    fn delete_user(&self, id: &Id) -> impl Future<Output = Result<bool, RegistryError>> + Send;

    /// Whether the store answers (readiness).
    fn ping(&self) -> impl Future<Output = Result<(), RegistryError>> + Send;
}

/// The configured registry.
#[derive(Clone)]
pub enum Registry {
    Memory(MemoryRegistry),
    Redis(RedisRegistry),
}

impl Registry {
    /// Redis when `redis_url` is set (connecting now, so a wrong URL fails at
    /// start with the URL named), memory otherwise.
    pub async fn open(settings: &RegistrySettings) -> Result<Registry, RegistryError> {
        Ok(match &settings.redis_url {
            Some(url) => Registry::Redis(RedisRegistry::connect(url, settings).await?),
            None => Registry::Memory(MemoryRegistry::default()),
        })
    }

    pub fn describe(&self) -> &'static str {
        match self {
            Registry::Memory(_) => "in-memory",
            Registry::Redis(r) => r.conn().kind(),
        }
    }
}

macro_rules! delegate {
    ($self:ident, $r:ident => $call:expr) => {
        match $self {
            Registry::Memory($r) => $call.await,
            Registry::Redis($r) => $call.await,
        }
    };
}

impl UserStore for Registry {
    async fn users(&self, ids: &[Id]) -> Result<Vec<Option<UserRecord>>, RegistryError> {
        delegate!(self, r => r.users(ids))
    }
    async fn group_apple_members(&self, groups: &[Id]) -> Result<Vec<Vec<Id>>, RegistryError> {
        delegate!(self, r => r.group_apple_members(groups))
    }
    async fn set_focus(&self, id: &Id, focus: bool) -> Result<(), RegistryError> {
        delegate!(self, r => r.set_focus(id, focus))
    }
    async fn put_user(&self, id: &Id, record: &UserRecord) -> Result<(), RegistryError> {
        delegate!(self, r => r.put_user(id, record))
    }
    async fn add_group_apple_member(&self, group: &Id, user: &Id) -> Result<(), RegistryError> {
        delegate!(self, r => r.add_group_apple_member(group, user))
    }
    async fn remove_group_apple_member(&self, group: &Id, user: &Id) -> Result<(), RegistryError> {
        delegate!(self, r => r.remove_group_apple_member(group, user))
    }
    async fn delete_token_if(&self, id: &Id, token: &str) -> Result<bool, RegistryError> {
        delegate!(self, r => r.delete_token_if(id, token))
    }
    async fn delete_user(&self, id: &Id) -> Result<bool, RegistryError> {
        delegate!(self, r => r.delete_user(id))
    }
    async fn ping(&self) -> Result<(), RegistryError> {
        delegate!(self, r => r.ping())
    }
}
