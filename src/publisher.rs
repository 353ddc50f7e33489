//! Where pushbridge's own MQTT publishes (pushes, APNs feedback) go: the
//! embedded broker or an external one, chosen once at start by
//! `mqtt.external_url`.

use std::sync::Arc;

use bytes::Bytes;

use crate::external::ExternalBroker;
use crate::mqtt::{Broker, Meta};
use crate::push::Ack;

/// An enum, not a trait object: the embedded path stays a direct call that
/// never yields (its future is ready at the first poll).
#[derive(Clone)]
pub enum MqttOut {
    Embedded(Broker),
    External(ExternalBroker),
}

impl MqttOut {
    /// QoS 1 publish. Embedded: the sessions reached. External: 1 when kept
    /// in the outbox (a full one waits or drops per `mqtt.outbox_full`), 0
    /// when dropped.
    #[inline]
    pub async fn publish(&self, topic: &str, payload: Bytes) -> usize {
        match self {
            MqttOut::Embedded(broker) => broker.publish(topic, payload),
            MqttOut::External(external) => external.publish(topic, payload).await,
        }
    }

    /// `publish` for a durable-intake entry: its share of `ack` is settled
    /// once the message is delivered: at once for the embedded broker (it is
    /// in the sessions' queues), at the broker's PUBACK for an external one.
    /// A publish dropped or cut short by a stop leaves the entry pending.
    /// `meta` (a push with a receipt or a TTL) reports the devices' PUBACKs
    /// and expires the message; only the embedded broker sees devices.
    pub async fn publish_acked(
        &self,
        topic: &str,
        payload: Bytes,
        ack: Option<&Ack>,
        meta: Option<&Arc<Meta>>,
    ) -> usize {
        match (self, ack) {
            (MqttOut::Embedded(broker), _) => broker.publish_with(topic, payload, meta),
            (MqttOut::External(external), Some(ack)) => {
                let confirmed = external.publish_confirmed(topic, payload).await;
                let share = ack.share();
                tokio::spawn(async move {
                    if confirmed.await.is_ok() {
                        share.settle();
                    }
                });
                1
            }
            _ => self.publish(topic, payload).await,
        }
    }

    /// Like `publish`, but never waits: a full external outbox drops.
    pub fn try_publish(&self, topic: &str, payload: Bytes) -> usize {
        match self {
            MqttOut::Embedded(broker) => broker.publish(topic, payload),
            MqttOut::External(external) => external.try_publish(topic, payload),
        }
    }
}

impl MqttOut {
    /// The embedded broker, which knows who is connected; `None` with an
    /// external broker (presence lives there).
    pub fn embedded(&self) -> Option<&Broker> {
        match self {
            MqttOut::Embedded(broker) => Some(broker),
            MqttOut::External(_) => None,
        }
    }
}

impl From<Broker> for MqttOut {
    fn from(broker: Broker) -> Self {
        MqttOut::Embedded(broker)
    }
}
