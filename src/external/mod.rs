//! External broker mode (`mqtt.external_url`): devices connect to an existing
//! broker cluster and pushbridge is one more client of it, publishing pushes
//! with QoS 1 and subscribing to the app status topic.
//!
//! At least once: every publish stays in pushbridge's own [`outbox`] until
//! the broker's PUBACK, and after any reconnect everything not yet
//! acknowledged is published again, whether or not the broker kept the
//! session (rumqttc alone would drop it on `session_present = 0`), to the
//! next URL of the list when a connection is lost. MQTT 5 when the broker
//! speaks it (`client`): a user push its PUBACK says reached nobody
//! (0x10) is kept offline and replayed when the user is back
//! (`unreached`); one it refuses is dropped after
//! `mqtt.external_max_attempts`, with feedback.
//! The status subscription is shared (`$share/<group>/...`) so that several
//! pushbridge instances handle each status message once. There is no
//! disconnect event from an external broker: an app's focus is cleared by
//! the `focus: false` last will it registers on the status topic.

mod client;
mod endpoint;
mod link;
mod outbox;
mod unreached;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use crate::lifecycle::Phase;
use bytes::Bytes;
use tokio::sync::{mpsc, oneshot, Semaphore};
use tracing::{debug, warn};

use crate::mqtt::BrokerEvent;
use crate::offline::OfflineStore;
use crate::settings::{MqttSettings, QueueFull};
use crate::stats::Stats;

pub use endpoint::Endpoint;

#[derive(Debug, thiserror::Error)]
pub enum ExternalError {
    #[error("settings: {key}: {problem}")]
    Setting { key: &'static str, problem: String },
    #[error("{}: {problem}", path.display())]
    File { path: PathBuf, problem: String },
}

/// `pushbridge check-config`: the CA file for `mqtts://` loads.
pub fn check_ca_file(path: &std::path::Path) -> Result<(), ExternalError> {
    endpoint::tls_config(Some(path)).map(|_| ())
}

/// Handle for publishing to the external broker; cheap to clone.
#[derive(Clone)]
pub struct ExternalBroker {
    inner: Arc<Shared>,
}

struct Shared {
    to_link: mpsc::UnboundedSender<Message>,
    /// One permit per free outbox slot; the link gives it back at the PUBACK.
    room: Arc<Semaphore>,
    full: QueueFull,
    /// `mqtt.max_packet_size`: rumqttc fails the whole connection on a
    /// larger packet, which republishing would repeat forever.
    max_packet: usize,
    /// `<prefix>/user/`
    user_prefix: String,
    stats: Arc<Stats>,
}

/// A publish on its way to the link's outbox.
struct Message {
    topic: String,
    payload: Bytes,
    ack: Option<oneshot::Sender<()>>,
}

/// What `start` needs besides the settings.
pub struct Context {
    /// Where status messages go (the same handling as the embedded broker's).
    pub events: mpsc::Sender<BrokerEvent>,
    pub stats: Arc<Stats>,
    /// After `stop`, the outbox gets this long to empty before the link closes.
    pub drain: Duration,
    /// Where user pushes that reached nobody (PUBACK 0x10) are kept.
    pub offline: OfflineStore,
    /// Where publishes given up on are reported (`apns.feedback_topic`).
    pub feedback_topic: String,
}

impl ExternalBroker {
    /// Starts the connection task on `rest`; it connects (and reconnects)
    /// in the background, so a broker that is down at start is not an error.
    pub fn start(
        settings: &MqttSettings,
        cx: Context,
        rest: &Phase,
    ) -> Result<ExternalBroker, ExternalError> {
        let client_id = endpoint::client_id(settings);
        let logins = endpoint::logins(settings, &client_id)?;
        let (to_link, from_handles) = mpsc::unbounded_channel();
        let room = Arc::new(Semaphore::new(settings.outbox));
        let user_prefix = format!("{}/user/", settings.prefix);
        let broker = ExternalBroker {
            inner: Arc::new(Shared {
                to_link,
                room: room.clone(),
                full: settings.outbox_full,
                max_packet: settings.max_packet_size,
                user_prefix: user_prefix.clone(),
                stats: cx.stats.clone(),
            }),
        };
        let unreached = unreached::Unreached::start(cx.offline, broker.clone(), room.clone(), rest);
        let link = link::Link::new(
            logins,
            link::Config {
                outbox: settings.outbox,
                status_topic: format!("{}/app/status", settings.prefix),
                user_prefix,
                shared_group: settings.external_shared_group.clone(),
                subscribe_events: settings.external_subscribe_events.clone(),
                feedback_topic: cx.feedback_topic,
                max_attempts: settings.external_max_attempts,
                drain: cx.drain,
            },
            from_handles,
            room,
            unreached,
            cx.events,
            cx.stats,
        );
        rest.spawn(link.run(rest.token()));
        Ok(broker)
    }

    /// Puts a QoS 1 publish in the outbox. With a full outbox it waits for
    /// room or drops it (counted), per `mqtt.outbox_full`. Returns 1 when it
    /// was kept (the broker's subscribers are not known here), 0 when dropped.
    pub async fn publish(&self, topic: &str, payload: Bytes) -> usize {
        self.keep(topic, payload, None).await
    }

    /// Like `publish`; the receiver resolves when the broker's PUBACK
    /// arrives (for callers that acknowledge only what was delivered; for a
    /// push that reached nobody, once it is kept offline) or when the
    /// message is given up after `mqtt.external_max_attempts` (reported as
    /// feedback), and fails if it was dropped for want of room or
    /// pushbridge stopped first.
    pub async fn publish_confirmed(&self, topic: &str, payload: Bytes) -> oneshot::Receiver<()> {
        let (tx, rx) = oneshot::channel();
        self.keep(topic, payload, Some(tx)).await;
        rx
    }

    async fn keep(&self, topic: &str, payload: Bytes, ack: Option<oneshot::Sender<()>>) -> usize {
        let s = &self.inner;
        if s.full == QueueFull::Wait {
            match s.room.acquire().await {
                Ok(permit) => permit.forget(),
                Err(_) => return self.dropped(topic, "the link is closed"),
            }
            return self.hand_over(topic, payload, ack);
        }
        self.try_keep(topic, payload, ack)
    }

    /// Like `publish`, but never waits: a full outbox drops the message
    /// (for callers that cannot wait, such as APNs feedback).
    pub fn try_publish(&self, topic: &str, payload: Bytes) -> usize {
        self.try_keep(topic, payload, None)
    }

    fn try_keep(&self, topic: &str, payload: Bytes, ack: Option<oneshot::Sender<()>>) -> usize {
        match self.inner.room.try_acquire() {
            Ok(permit) => permit.forget(),
            Err(_) => return self.dropped(topic, "the outbox is full"),
        }
        self.hand_over(topic, payload, ack)
    }

    fn hand_over(&self, topic: &str, payload: Bytes, ack: Option<oneshot::Sender<()>>) -> usize {
        let s = &self.inner;
        if topic.is_empty() || topic.contains(['+', '#', '\0']) {
            s.room.add_permits(1);
            warn!(%topic, "external publish dropped: not a topic one can publish to");
            return self.dropped(topic, "bad topic");
        }
        // Fixed header (5), topic length (2), packet id (2).
        if topic.len() + payload.len() + 9 > s.max_packet {
            s.room.add_permits(1);
            warn!(%topic, bytes = payload.len(), "external publish dropped: larger than mqtt.max_packet_size");
            return self.dropped(topic, "too large");
        }
        let message = Message {
            topic: topic.to_string(),
            payload,
            ack,
        };
        if s.to_link.send(message).is_err() {
            return self.dropped(topic, "the link is closed");
        }
        1
    }

    fn dropped(&self, topic: &str, why: &str) -> usize {
        self.inner.stats.mqtt_outbox_dropped.inc();
        debug!(%topic, why, "external publish dropped");
        0
    }
}
