//! Which users are connected now, for `GET /v1/users/{id}/presence`.
//!
//! A connection belongs to a user through its token's subject (`auth.mode =
//! jwt`); without tokens, through subscribing to the user's own topic
//! `<prefix>/user/<uid>`, as the old service's apps do, until it
//! unsubscribes. Entries are removed when the connection ends.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

/// One connection of a user.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Seen {
    pub client_id: Arc<str>,
    /// Unix seconds the connection was accepted.
    pub since: u64,
}

/// Users' connections, ordered by (user, connection) so that a user's are
/// one range and every change is a tree lookup, however many connections
/// a user has; and each connection's users (to remove them at the end).
#[derive(Debug, Default)]
pub(super) struct Presence {
    by_user: BTreeMap<(Arc<str>, u64), Seen>,
    /// Nearly always one user per connection; at most one per subscription.
    by_conn: HashMap<u64, Vec<Arc<str>>>,
}

impl Presence {
    /// Connection `conn` belongs to `user` (again: nothing changes).
    pub fn connect(&mut self, conn: u64, user: &str, seen: Seen) {
        let key = (Arc::<str>::from(user), conn);
        if self.by_user.contains_key(&key) {
            return;
        }
        // Room for one: nearly every connection is one user's.
        self.by_conn
            .entry(conn)
            .or_insert_with(|| Vec::with_capacity(1))
            .push(key.0.clone());
        self.by_user.insert(key, seen);
    }

    /// Connection `conn` no longer belongs to `user` (it unsubscribed from the user's topic).
    pub fn leave(&mut self, conn: u64, user: &str) {
        let key = (Arc::<str>::from(user), conn);
        if self.by_user.remove(&key).is_none() {
            return;
        }
        if let Some(users) = self.by_conn.get_mut(&conn) {
            users.retain(|u| **u != *user);
            if users.is_empty() {
                self.by_conn.remove(&conn);
            }
        }
    }

    /// The users connection `conn` belongs to now.
    pub fn users(&self, conn: u64) -> Vec<Arc<str>> {
        self.by_conn.get(&conn).cloned().unwrap_or_default()
    }

    /// Connection `conn` has ended; returns the users it belonged to.
    pub fn disconnect(&mut self, conn: u64) -> Vec<Arc<str>> {
        let users = self.by_conn.remove(&conn).unwrap_or_default();
        for user in &users {
            self.by_user.remove(&(user.clone(), conn));
        }
        users
    }

    /// `user`'s connections, oldest first.
    pub fn of(&self, user: &str) -> Vec<Seen> {
        let user: Arc<str> = user.into();
        let mut seen: Vec<Seen> = self
            .by_user
            .range((user.clone(), 0)..=(user, u64::MAX))
            .map(|(_, s)| s.clone())
            .collect();
        seen.sort_by_key(|s| s.since);
        seen
    }

    #[cfg(test)]
    fn is_empty(&self) -> bool {
        self.by_user.is_empty() && self.by_conn.is_empty()
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
        assert_eq!(p.users(2), [Arc::from("42"), Arc::from("7")]);
        assert_eq!(p.disconnect(2), [Arc::from("42"), Arc::from("7")]);
        assert_eq!(p.of("42"), [seen("phone", 10)]);
        assert!(p.of("7").is_empty());
        p.disconnect(1);
        assert!(p.is_empty());
    }

    #[test]
    fn unsubscribing_leaves_and_cycles_do_not_grow() {
        let mut p = Presence::default();
        for round in 0..1000u64 {
            p.connect(1, &round.to_string(), seen("anon", 1));
            p.leave(1, &round.to_string());
        }
        assert!(p.is_empty());
        p.connect(1, "42", seen("anon", 1));
        p.connect(2, "42", seen("other", 2));
        p.leave(1, "42");
        p.leave(1, "7");
        assert_eq!(p.of("42"), [seen("other", 2)]);
        p.disconnect(1);
        p.disconnect(2);
        assert!(p.is_empty());
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
