//! Feedback for backends: dead tokens and final failures, published as JSON
//! on an MQTT topic, so the service that owns a token can forget or fix it.

use bytes::Bytes;
use serde::Serialize;
use serde_json::Value;
use tracing::debug;

use super::jwt::unix_now;
use crate::publisher::MqttOut;
use crate::router::ApnsDelivery;

/// Publishes on one topic of the embedded or external broker.
#[derive(Clone)]
pub struct Feedback {
    broker: MqttOut,
    topic: String,
}

/// One message: `{user_id, token, app_ident, reason, at}` (`at`: Unix seconds).
#[derive(Debug, Serialize)]
struct Message<'a> {
    user_id: Value,
    token: &'a str,
    app_ident: &'a str,
    reason: &'a str,
    at: u64,
}

impl Feedback {
    pub fn new(broker: impl Into<MqttOut>, topic: String) -> Self {
        Feedback {
            broker: broker.into(),
            topic,
        }
    }

    pub fn topic(&self) -> &str {
        &self.topic
    }

    /// Publishes what happened to `delivery`; returns the sessions reached
    /// (external broker: 1 if kept in the outbox; never waits for room).
    pub(crate) fn publish(&self, delivery: &ApnsDelivery, reason: &str) -> usize {
        let body = message(delivery, reason, unix_now());
        let reached = self.broker.try_publish(&self.topic, body);
        debug!(topic = %self.topic, reached, "feedback published");
        reached
    }
}

fn message(d: &ApnsDelivery, reason: &str, at: u64) -> Bytes {
    // Numeric ids go out as numbers, as apps send them in status messages.
    let user = d.user.as_str();
    let user_id = user
        .parse::<u64>()
        .map(Value::from)
        .unwrap_or_else(|_| Value::from(user));
    let msg = Message {
        user_id,
        token: &d.token,
        app_ident: &d.app_ident,
        reason,
        at,
    };
    serde_json::to_vec(&msg).unwrap_or_default().into()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::router::Environment;

    #[test]
    fn message_shape() {
        let mut d = ApnsDelivery {
            user: "42".into(),
            token: "aa11".into(),
            app_ident: "com.example.app".into(),
            env: Environment::Production,
        };
        let v: Value = serde_json::from_slice(&message(&d, "Unregistered", 7)).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"user_id": 42, "token": "aa11",
                "app_ident": "com.example.app", "reason": "Unregistered", "at": 7})
        );
        d.user = "u-7".into();
        let v: Value = serde_json::from_slice(&message(&d, "x", 7)).unwrap();
        assert_eq!(v["user_id"], "u-7");
    }
}
