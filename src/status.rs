//! Apps report foreground/background on `<prefix>/app/status`; this keeps
//! `app_focus` in the registry in step, and clears it when the connection
//! that set it goes away (the old service left it set, so silent pushes
//! went to a device that was gone).

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use serde_json::Value;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::mqtt::BrokerEvent;
use crate::push::Id;
use crate::registry::{Registry, UserStore};
use crate::stats::Stats;

/// `{"user_id": <uid>, "focus": true|false}`; `None` for anything else.
pub fn parse(payload: &[u8]) -> Option<(Id, bool)> {
    let v: Value = serde_json::from_slice(payload).ok()?;
    let user = match v.get("user_id")? {
        Value::String(s) if !s.is_empty() => Id::from(s.as_str()),
        Value::Number(n) if n.is_u64() || n.is_i64() => Id::from(n.to_string().as_str()),
        _ => return None,
    };
    let focus = match v.get("focus")? {
        Value::Bool(b) => *b,
        Value::Number(n) => n.as_f64()? != 0.0,
        _ => return None,
    };
    Some((user, focus))
}

/// Applies status events until the broker is gone or `stop`.
pub async fn run(
    mut events: mpsc::Receiver<BrokerEvent>,
    registry: Registry,
    stats: Arc<Stats>,
    stop: CancellationToken,
) {
    // Users each connection has put in focus.
    let mut focused: HashMap<u64, HashSet<Id>> = HashMap::new();
    while let Some(event) = tokio::select! {
        event = events.recv() => event,
        _ = stop.cancelled() => None,
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
                let set = focused.entry(conn).or_default();
                if focus {
                    set.insert(user.clone());
                } else {
                    set.remove(&user);
                }
                apply(&registry, &stats, &user, focus).await;
            }
            BrokerEvent::Disconnected { conn, .. } => {
                for user in focused.remove(&conn).unwrap_or_default() {
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
        Err(e) => warn!(%user, focus, error = %e, "could not update focus"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
        for bad in [
            &br#"{"user_id":42}"#[..],
            br#"{"focus":true}"#,
            br#"{"user_id":"","focus":true}"#,
            br#"{"user_id":1.5,"focus":true}"#,
            br#"{"user_id":1,"focus":"yes"}"#,
            b"not json",
        ] {
            assert_eq!(parse(bad), None, "{}", String::from_utf8_lossy(bad));
        }
    }
}
