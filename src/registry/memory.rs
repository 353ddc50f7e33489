//! The embedded default's registry: records in a map, gone at exit.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, RwLock};

use super::{RegistryError, UserStore};
use crate::push::{Id, UserRecord};

#[derive(Clone, Default)]
pub struct MemoryRegistry {
    inner: Arc<RwLock<Inner>>,
}

#[derive(Default)]
struct Inner {
    users: HashMap<Id, UserRecord>,
    groups: HashMap<Id, BTreeSet<Id>>,
}

impl MemoryRegistry {
    fn read(&self) -> std::sync::RwLockReadGuard<'_, Inner> {
        self.inner.read().unwrap_or_else(|e| e.into_inner())
    }
    fn write(&self) -> std::sync::RwLockWriteGuard<'_, Inner> {
        self.inner.write().unwrap_or_else(|e| e.into_inner())
    }
}

impl UserStore for MemoryRegistry {
    async fn users(&self, ids: &[Id]) -> Result<Vec<Option<UserRecord>>, RegistryError> {
        let inner = self.read();
        Ok(ids.iter().map(|id| inner.users.get(id).cloned()).collect())
    }

    async fn group_apple_members(&self, groups: &[Id]) -> Result<Vec<Vec<Id>>, RegistryError> {
        let inner = self.read();
        Ok(groups
            .iter()
            .map(|g| {
                inner
                    .groups
                    .get(g)
                    .map(|m| m.iter().cloned().collect())
                    .unwrap_or_default()
            })
            .collect())
    }

    async fn set_focus(&self, id: &Id, focus: bool) -> Result<(), RegistryError> {
        let mut inner = self.write();
        if let Some(user) = inner.users.get_mut(id) {
            user.app_focus = focus;
        }
        Ok(())
    }

    async fn put_user(&self, id: &Id, record: &UserRecord) -> Result<(), RegistryError> {
        let mut inner = self.write();
        let user = inner.users.entry(id.clone()).or_default();
        let fields = [
            (&mut user.app_token, &record.app_token),
            (&mut user.app_ident, &record.app_ident),
            (&mut user.app_version, &record.app_version),
        ];
        for (old, new) in fields {
            if new.is_some() {
                old.clone_from(new);
            }
        }
        user.app_focus |= record.app_focus;
        Ok(())
    }

    async fn add_group_apple_member(&self, group: &Id, user: &Id) -> Result<(), RegistryError> {
        self.write()
            .groups
            .entry(group.clone())
            .or_default()
            .insert(user.clone());
        Ok(())
    }

    async fn remove_group_apple_member(&self, group: &Id, user: &Id) -> Result<(), RegistryError> {
        let mut inner = self.write();
        if let Some(members) = inner.groups.get_mut(group) {
            members.remove(user);
            if members.is_empty() {
                inner.groups.remove(group);
            }
        }
        Ok(())
    }

    async fn delete_token_if(&self, id: &Id, token: &str) -> Result<bool, RegistryError> {
        let mut inner = self.write();
        let Some(user) = inner.users.get_mut(id) else {
            return Ok(false);
        };
        if user.app_token.as_deref() != Some(token) {
            return Ok(false);
        }
        user.app_token = None;
        Ok(true)
    }

    async fn delete_user(&self, id: &Id) -> Result<bool, RegistryError> {
        Ok(self.write().users.remove(id).is_some())
    }

    async fn ping(&self) -> Result<(), RegistryError> {
        Ok(())
    }
}
