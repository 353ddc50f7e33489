//! Receipts: what became of a push sent with `receipt: true`, per target,
//! with timestamps: MQTT sessions written and device acknowledgements
//! (PUBACK), messages kept offline, Apple's answers, users with no record.
//!
//! The parts that see an outcome [`Receipts::record`] it without waiting:
//! the change goes on a bounded queue (full: dropped and counted) to one
//! writer task, which applies it to the store (`store`): a hash per push in
//! Redis when Redis is the registry (any instance answers), in memory
//! otherwise (bounded by count and bytes). Pushes without `receipt` cost a
//! boolean test. Once stored, the changes also go to the `outlets` (the
//! `webhook`, a Redis Stream), as do the `notices` (devices connecting and
//! disconnecting, dead tokens) that are not about one push.

mod memory;
mod notices;
mod outlets;
mod queue;
mod store;
mod webhook;

use std::sync::Arc;

use serde_json::{json, Value};
use tracing::warn;

use crate::lifecycle::Phase;
use crate::push::{Id, PushId};
use crate::redis_conn::RedisConn;
use crate::settings::{EventKind, ReceiptsSettings};
use crate::stats::Stats;

pub use notices::{DeadToken, Device, Notice, Notices};
pub use outlets::Outlets;
pub use store::{Store, RECENT};
pub use webhook::{signature, Webhook};

#[derive(Debug, thiserror::Error)]
pub enum ReceiptsError {
    #[error("receipts: redis: {0}")]
    Redis(#[from] redis::RedisError),
    #[error("settings: {0}: {1}")]
    Setting(&'static str, String),
    #[error("receipts.webhook_ca_file: {0}")]
    CaFile(#[from] crate::tls_client::CaFileError),
}

/// A tracked push's MQTT topics, shared by the changes recorded for it.
pub type Topics = Arc<[Arc<str>]>;

/// One change to a push's outcome.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    /// Routed: the MQTT topics, APNs users and unknown users it targets,
    /// and every user it is for (listed by `GET /v1/users/{id}/pushes`).
    Routed {
        mqtt: Topics,
        apns: Vec<Id>,
        unknown_users: Vec<Id>,
        users: Box<[Id]>,
    },
    /// Written to this many sessions' queues on `topic`.
    MqttWritten { topic: Arc<str>, sessions: usize },
    /// A device acknowledged it on `topic` (QoS 1 PUBACK).
    MqttAcked {
        topic: Arc<str>,
        client_id: Arc<str>,
    },
    /// Kept for `user`, offline, to be replayed when a device subscribes.
    OfflineKept { user: Id },
    /// Handed to a session of `user` that subscribed (kept before).
    OfflineReplayed { user: Id },
    /// Kept for `user`, and found expired when a device subscribed.
    OfflineExpired { user: Id },
    /// Apple answered 200.
    ApnsAccepted { user: Id, apns_id: String },
    /// Apple (or pushbridge, before sending) refused it for good.
    ApnsRejected {
        user: Id,
        status: Option<u16>,
        reason: String,
    },
    /// Apple says the user's device token is dead.
    ApnsDeadToken { user: Id, reason: String },
}

impl Event {
    /// The event as JSON: `{"push", "at", "event", ...}`.
    pub fn to_json(&self, push: &PushId, at: u64) -> Value {
        let id = push.to_string();
        match self {
            Event::Routed {
                mqtt,
                apns,
                unknown_users,
                ..
            } => json!({"push": id, "at": at, "event": "routed",
                "mqtt": mqtt.iter().map(|t| &**t).collect::<Vec<_>>(),
                "apns": ids(apns), "unknown_users": ids(unknown_users)}),
            Event::MqttWritten { topic, sessions } => json!({"push": id, "at": at,
                "event": "mqtt_written", "topic": &**topic, "sessions": sessions}),
            Event::MqttAcked { topic, client_id } => json!({"push": id, "at": at,
                "event": "mqtt_acked", "topic": &**topic, "client_id": &**client_id}),
            Event::OfflineKept { user } => json!({"push": id, "at": at,
                "event": "offline_kept", "user": user.as_str()}),
            Event::OfflineReplayed { user } => json!({"push": id, "at": at,
                "event": "offline_replayed", "user": user.as_str()}),
            Event::OfflineExpired { user } => json!({"push": id, "at": at,
                "event": "offline_expired", "user": user.as_str()}),
            Event::ApnsAccepted { user, apns_id } => json!({"push": id, "at": at,
                "event": "apns_accepted", "user": user.as_str(), "apns_id": apns_id}),
            Event::ApnsRejected {
                user,
                status,
                reason,
            } => json!({"push": id, "at": at, "event": "apns_rejected",
                "user": user.as_str(), "status": status, "reason": reason}),
            Event::ApnsDeadToken { user, reason } => json!({"push": id, "at": at,
                "event": "apns_dead_token", "user": user.as_str(), "reason": reason}),
        }
    }
}

/// Lower-case hex, as signatures and token hashes are written.
fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn ids(ids: &[Id]) -> Vec<&str> {
    ids.iter().map(Id::as_str).collect()
}

/// One recorded change: whose, when (Unix ms), what.
type Change = (PushId, u64, Event);

/// Where outcomes are recorded; cheap to clone. Off (`receipts.enabled =
/// false`), it records nothing and answers nothing.
#[derive(Clone, Default)]
pub struct Receipts(Option<Arc<Inner>>);

struct Inner {
    queue: Arc<queue::Queue>,
    store: Store,
    stats: Arc<Stats>,
    ack_timeout_ms: u64,
}

impl Receipts {
    /// Starts the writer on `rest`: in the registry's Redis (`redis`) when
    /// there is one, in memory otherwise; stored changes go on to
    /// `outlets` when `receipts.events` has `push`. Off unless
    /// `receipts.enabled`. `prefix` is `mqtt.prefix`.
    pub fn start(
        settings: &ReceiptsSettings,
        prefix: &str,
        redis: Option<RedisConn>,
        outlets: &Outlets,
        stats: Arc<Stats>,
        rest: &Phase,
    ) -> Receipts {
        if !settings.enabled {
            return Receipts(None);
        }
        let store = Store::new(settings, redis, prefix);
        let queue = Arc::new(queue::Queue::new(settings.queue));
        let outlets = match settings.events.contains(&EventKind::Push) {
            true => outlets.clone(),
            false => Outlets::default(),
        };
        let writer = store
            .clone()
            .write(queue.clone(), outlets, stats.clone(), rest.token());
        rest.spawn(writer);
        Receipts(Some(Arc::new(Inner {
            queue,
            store,
            stats,
            ack_timeout_ms: settings.ack_timeout_secs.saturating_mul(1000),
        })))
    }

    pub fn enabled(&self) -> bool {
        self.0.is_some()
    }

    /// Records `event` for `push` now, without waiting.
    pub fn record(&self, push: &PushId, event: Event) {
        let Some(inner) = &self.0 else { return };
        let change = (push.clone(), crate::utc::now_ms(), event);
        if !inner.queue.push(change) {
            inner.stats.receipts_dropped.inc();
        }
    }

    /// What `push`'s MQTT messages carry so that the broker can report
    /// their acknowledgements ([`Receipts::acked`]); `None` when off.
    pub fn tag(&self, push: &PushId) -> Option<Tag> {
        self.0.as_ref().map(|_| Tag(push.clone()))
    }

    /// The device behind `client_id` acknowledged the message tagged `tag`
    /// on `topic`.
    pub fn acked(&self, tag: &Tag, topic: &Arc<str>, client_id: &Arc<str>) {
        let event = Event::MqttAcked {
            topic: topic.clone(),
            client_id: client_id.clone(),
        };
        self.record(&tag.0, event);
    }

    /// The outcome of `push` so far; `Ok(None)` if unknown (never asked for,
    /// expired, evicted) or receipts are off.
    pub async fn outcome(&self, push: &PushId) -> Result<Option<Value>, ReceiptsError> {
        match &self.0 {
            None => Ok(None),
            Some(inner) => inner.store.outcome(push, inner.ack_timeout_ms).await,
        }
    }

    /// The outcomes of the last pushes (at most [`RECENT`]) for `user`,
    /// newest first; empty when off or none is still kept.
    pub async fn recent(&self, user: &Id) -> Result<Vec<Value>, ReceiptsError> {
        match &self.0 {
            None => Ok(Vec::new()),
            Some(inner) => inner.store.recent(user, inner.ack_timeout_ms).await,
        }
    }
}

/// Rides with a tracked push's MQTT message into the sessions' queues, so
/// a device's PUBACK can be reported against the push (by the broker,
/// which holds the `Receipts`: not one more pointer per push).
#[derive(Debug)]
pub struct Tag(PushId);

/// Logs a store failure (once per batch).
fn store_failed(e: &ReceiptsError, changes: usize) {
    warn!(error = %e, changes, "receipts not recorded (counted in receipts_dropped)");
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::mem::size_of;

    /// What a push with a receipt holds while in flight on the MQTT path:
    /// one `Meta` behind an `Arc`, shared by every session it reaches
    /// (every message pays 8 bytes for the pointer, receipt or not), and
    /// three changes on their way to the writer.
    #[test]
    fn in_flight_cost_is_small() {
        let meta = 16 + size_of::<crate::mqtt::Meta>();
        let changes = 3 * size_of::<Change>();
        println!("Arc<Meta> {meta} bytes, 3 queued changes {changes} bytes");
        assert!(meta <= 48, "Arc<Meta> grew to {meta} bytes");
        assert!(changes <= 336, "3 changes grew to {changes} bytes");
    }
}
