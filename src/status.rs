//! Apps report foreground/background on `<prefix>/app/status`; this keeps
//! `app_focus` in the registry in step, and clears it when the connection
//! that set it goes away (the old service left it set, so silent pushes
//! went to a device that was gone).

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use serde::Deserialize;
use serde_json::Value;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::mqtt::BrokerEvent;
use crate::push::Id;
use crate::registry::{Registry, UserStore};
use crate::stats::Stats;

/// The `conn` of status messages from an external broker: no connection to
/// follow, so nothing to clear when it ends (the app's last will does that).
/// The embedded broker numbers its connections from 1.
pub const UNTRACKED: u64 = 0;

/// A status message's fields; other keys are ignored. Derived, so a key
/// given twice is an error rather than last-one-wins.
#[derive(Deserialize)]
struct Status {
    user_id: Value,
    focus: Value,
}

/// `{"user_id": <uid>, "focus": true|false}`; `None` for anything else,
/// including an id the proxy would refuse and a key given twice.
pub fn parse(payload: &[u8]) -> Option<(Id, bool)> {
    // A derived struct also reads `[id, focus]`; only an object is a status.
    if payload.trim_ascii_start().first() != Some(&b'{') {
        return None;
    }
    let v: Status = serde_json::from_slice(payload).ok()?;
    let user = match &v.user_id {
        Value::String(s) => Id::parse(s)?,
        Value::Number(n) if n.is_u64() || n.is_i64() => Id::from(n.to_string().as_str()),
        _ => return None,
    };
    let focus = match &v.focus {
        Value::Bool(b) => *b,
        Value::Number(n) => n.as_f64()? != 0.0,
        _ => return None,
    };
    Some((user, focus))
}

/// Which connections hold each user in focus: the registry's flag stays true
/// while at least one does (one user, two devices).
#[derive(Debug, Default)]
struct Holders {
    by_conn: HashMap<u64, HashSet<Id>>,
    by_user: HashMap<Id, HashSet<u64>>,
}

impl Holders {
    /// Records `conn`'s report; the flag to write, if any.
    fn report(&mut self, conn: u64, user: &Id, focus: bool) -> Option<bool> {
        if focus {
            self.by_conn.entry(conn).or_default().insert(user.clone());
            self.by_user.entry(user.clone()).or_default().insert(conn);
            return Some(true);
        }
        if let Some(users) = self.by_conn.get_mut(&conn) {
            users.remove(user);
        }
        self.release(conn, user).then_some(false)
    }

    /// Forgets `conn`; the users no connection holds in focus any more.
    fn disconnected(&mut self, conn: u64) -> Vec<Id> {
        let users = self.by_conn.remove(&conn).unwrap_or_default();
        users
            .into_iter()
            .filter(|user| self.release(conn, user))
            .collect()
    }

    /// Drops `conn` from `user`'s holders; true if none is left.
    fn release(&mut self, conn: u64, user: &Id) -> bool {
        let Some(conns) = self.by_user.get_mut(user) else {
            return true;
        };
        conns.remove(&conn);
        if conns.is_empty() {
            self.by_user.remove(user);
            return true;
        }
        false
    }
}

/// Applies status events until the broker is gone, or `stop` and no event is
/// left (so devices disconnected by a shutdown still leave focus).
pub async fn run(
    mut events: mpsc::Receiver<BrokerEvent>,
    registry: Registry,
    stats: Arc<Stats>,
    stop: CancellationToken,
) {
    let mut holders = Holders::default();
    while let Some(event) = tokio::select! {
        biased;
        event = events.recv() => event,
        _ = stop.cancelled() => events.try_recv().ok(),
    } {
        match event {
            BrokerEvent::Status {
                conn,
                client_id,
                payload,
            } => {
                let Some((user, focus)) = parse(&payload) else {
                    debug!(%client_id, "ignored malformed status message");
                    continue;
                };
                // External broker: no disconnect events; the app's last will clears focus.
                let flag = if conn == UNTRACKED {
                    Some(focus)
                } else {
                    holders.report(conn, &user, focus)
                };
                match flag {
                    Some(flag) => apply(&registry, &stats, &user, flag).await,
                    None => debug!(%user, "focus kept: another connection holds it"),
                }
            }
            BrokerEvent::Disconnected { conn, .. } => {
                for user in holders.disconnected(conn) {
                    apply(&registry, &stats, &user, false).await;
                }
            }
            BrokerEvent::Subscribed { .. } => {}
        }
    }
}

async fn apply(registry: &Registry, stats: &Stats, user: &Id, focus: bool) {
    match registry.set_focus(user, focus).await {
        Ok(()) => {
            stats.status_updates.inc();
            debug!(%user, focus, "focus updated");
        }
        Err(e) => {
            stats.registry_errors.inc();
            warn!(%user, focus, error = %e, "could not update focus");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn focus_stays_while_any_connection_holds_it() {
        let mut h = Holders::default();
        let (u, v) = (Id::from("7"), Id::from("8"));
        assert_eq!(h.report(1, &u, true), Some(true));
        assert_eq!(h.report(2, &u, true), Some(true));
        assert_eq!(h.report(2, &v, true), Some(true));
        assert_eq!(h.disconnected(1), Vec::<Id>::new());
        assert_eq!(h.report(2, &u, false), Some(false));
        assert_eq!(h.report(3, &u, true), Some(true));
        assert_eq!(h.report(4, &u, false), None);
        assert_eq!(h.disconnected(2), vec![v.clone()]);
        assert_eq!(h.disconnected(3), vec![u.clone()]);
        assert_eq!(h.report(5, &u, false), Some(false), "nobody holds it");
        assert_eq!(h.disconnected(9), Vec::<Id>::new());
        assert!(h.by_conn.is_empty() && h.by_user.is_empty());
    }

    #[test]
    fn parses_status_messages() {
        assert_eq!(
            parse(br#"{"user_id":42,"focus":true}"#),
            Some(("42".into(), true))
        );
        assert_eq!(
            parse(br#"{"user_id":"42","focus":false}"#),
            Some(("42".into(), false))
        );
        assert_eq!(
            parse(br#"{"user_id":7,"focus":1}"#),
            Some(("7".into(), true))
        );
        let longest = format!(
            r#"{{"user_id":"{}","focus":true}}"#,
            "a".repeat(Id::MAX_LEN)
        );
        assert!(parse(longest.as_bytes()).is_some());
        let longer = format!(
            r#"{{"user_id":"{}","focus":true}}"#,
            "a".repeat(Id::MAX_LEN + 1)
        );
        assert_eq!(parse(longer.as_bytes()), None);
        for bad in [
            &br#"{"user_id":42}"#[..],
            br#"{"focus":true}"#,
            br#"{"user_id":"","focus":true}"#,
            br#"{"user_id":1.5,"focus":true}"#,
            br#"{"user_id":1,"focus":"yes"}"#,
            br#"{"user_id":"a/b","focus":true}"#,
            br#"{"user_id":"a#","focus":true}"#,
            br#"{"user_id":"a\u0000","focus":true}"#,
            br#"{"user_id":1,"user_id":2,"focus":true}"#,
            br#"{"user_id":1,"focus":true,"focus":false}"#,
            br#"[42,true]"#,
            b"not json",
        ] {
            assert_eq!(parse(bad), None, "{}", String::from_utf8_lossy(bad));
        }
    }
}
