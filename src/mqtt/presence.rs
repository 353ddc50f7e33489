//! Which users are connected now, for `GET /v1/users/{id}/presence`.
//!
//! A connection belongs to a user through its token's subject (`auth.mode =
//! jwt`); without tokens, through subscribing to the user's own topic
//! `<prefix>/user/<uid>`, as the old service's apps do. Entries are removed
//! when the connection ends.

use std::collections::HashMap;
use std::sync::Arc;

/// One connection of a user.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Seen {
    pub client_id: Arc<str>,
    /// Unix seconds the connection was accepted.
    pub since: u64,
}

/// Users' connections, and each connection's users (to remove them at the end).
#[derive(Debug, Default)]
pub(super) struct Presence {
    by_user: HashMap<Arc<str>, Vec<(u64, Seen)>>,
    by_conn: HashMap<u64, Vec<Arc<str>>>,
}

impl Presence {
    /// Connection `conn` belongs to `user` (again: nothing changes).
    pub fn connect(&mut self, conn: u64, user: &str, seen: Seen) {
        // Room for one: nearly every connection is one user's, nearly
        // every user has one connection (an entry per idle device).
        let users = self
            .by_conn
            .entry(conn)
            .or_insert_with(|| Vec::with_capacity(1));
        if users.iter().any(|u| &**u == user) {
            return;
        }
        let user: Arc<str> = user.into();
        users.push(user.clone());
        self.by_user
            .entry(user)
            .or_insert_with(|| Vec::with_capacity(1))
            .push((conn, seen));
    }

    /// Connection `conn` has ended.
    pub fn disconnect(&mut self, conn: u64) {
        for user in self.by_conn.remove(&conn).unwrap_or_default() {
            if let Some(list) = self.by_user.get_mut(&user) {
                list.retain(|(c, _)| *c != conn);
                if list.is_empty() {
                    self.by_user.remove(&user);
                }
            }
        }
    }

    /// `user`'s connections, oldest first.
    pub fn of(&self, user: &str) -> Vec<Seen> {
        let mut seen: Vec<Seen> = self
            .by_user
            .get(user)
            .map(|l| l.iter().map(|(_, s)| s.clone()).collect())
            .unwrap_or_default();
        seen.sort_by_key(|s| s.since);
        seen
    }
}

/// The user whose own topic `filter` is (`<prefix>/user/<uid>`, no wildcards).
pub(super) fn user_of_filter<'a>(prefix: &str, filter: &'a str) -> Option<&'a str> {
    let uid = filter.strip_prefix(prefix)?.strip_prefix("/user/")?;
    (!uid.is_empty() && !uid.contains(['/', '+', '#'])).then_some(uid)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seen(id: &str, since: u64) -> Seen {
        Seen {
            client_id: id.into(),
            since,
        }
    }

    #[test]
    fn connections_come_and_go() {
        let mut p = Presence::default();
        p.connect(1, "42", seen("phone", 10));
        p.connect(1, "42", seen("phone", 11));
        p.connect(2, "42", seen("tablet", 5));
        p.connect(2, "7", seen("tablet", 5));
        assert_eq!(p.of("42"), [seen("tablet", 5), seen("phone", 10)]);
        p.disconnect(2);
        assert_eq!(p.of("42"), [seen("phone", 10)]);
        assert!(p.of("7").is_empty());
        p.disconnect(1);
        assert!(p.by_user.is_empty() && p.by_conn.is_empty());
    }

    #[test]
    fn own_topic_filters() {
        assert_eq!(user_of_filter("push", "push/user/42"), Some("42"));
        for other in [
            "push/user/+",
            "push/user/#",
            "push/user/",
            "push/group/1",
            "pushx/user/1",
            "push/user/1/x",
        ] {
            assert_eq!(user_of_filter("push", other), None, "{other}");
        }
    }
}
