//! Counters every part bumps and ops read (`/metrics`, `/v1/stats`, logs),
//! plus the gauges, histogram and per-minute series built beside them.

mod instruments;
pub mod series;

use std::sync::atomic::{AtomicU64, Ordering};

pub use instruments::{
    Gauge, Histogram, HistogramSnapshot, Listeners, Stages, Up, LATENCY_BOUNDS, STAGE_BOUNDS,
};
pub use series::{Bucket, Series, SeriesSnapshot, FAILURE_REASONS};

/// One monotonically increasing count.
#[derive(Debug, Default)]
pub struct Counter(AtomicU64);

impl Counter {
    pub fn inc(&self) {
        self.add(1);
    }
    pub fn add(&self, n: u64) {
        self.0.fetch_add(n, Ordering::Relaxed);
    }
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// One counter's name, help text (its doc comment) and value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sample {
    pub name: &'static str,
    pub help: &'static str,
    pub value: u64,
}

/// Declares the counters once: the struct fields and their listing.
macro_rules! counters {
    ($($(#[doc = $doc:literal])+ $name:ident,)+) => {
        /// Process-wide counters, shared as `Arc<Stats>`.
        #[derive(Debug, Default)]
        pub struct Stats {
            $($(#[doc = $doc])+ pub $name: Counter,)+
            /// MQTT connections whose CONNECT was accepted and that have not ended.
            pub mqtt_connections: Gauge,
            /// Events waiting for the webhook (`receipts.webhook_queue` at most).
            pub webhook_queued: Gauge,
            /// Seconds from sending an APNs request to reading Apple's answer.
            pub apns_latency: Histogram,
            /// Where pushes wait inside pushbridge.
            pub stages: Stages,
            /// Per-minute, per-hour and per-day counts (`/v1/stats`).
            pub series: Series,
            /// Which listeners are serving (`/readyz`).
            pub listeners: Listeners,
        }

        impl Stats {
            /// Every counter, in declaration order.
            pub fn samples(&self) -> Vec<Sample> {
                vec![$(Sample {
                    name: stringify!($name),
                    help: concat!($($doc),+).trim_ascii(),
                    value: self.$name.get(),
                },)+]
            }
        }
    };
}

counters! {
    /// Frames answered 0x00 and queued for routing.
    pushes_accepted,
    /// Frames answered with a non-zero status byte.
    frames_rejected,
    /// Pushes dropped because the registry could not be read.
    pushes_failed_registry,
    /// Durable intake: stream entries acknowledged after every delivery was final.
    intake_acked,
    /// Durable intake: idle entries taken over from another (or a crashed) consumer.
    intake_claimed,
    /// Durable intake: pending entries trimmed from the stream (over intake.max_len) before delivery: pushes lost.
    intake_trimmed,
    /// Durable intake: stream entries that were not a push frame (logged, dead-lettered).
    intake_undecodable,
    /// Durable intake: entries moved to the dead-letter stream (`<intake.stream>:dead`): not a push frame, or not delivered within `intake.max_deliveries`.
    intake_dead,
    /// Durable intake: pushes refused (proxy 0x09, HTTP 503) because the stream could not be written in time.
    intake_unavailable,
    /// Publishes handed to the MQTT broker by the router.
    mqtt_published,
    /// Notifications handed to the APNs sender.
    apns_queued,
    /// Notifications Apple answered 200.
    apns_delivered,
    /// Notifications that failed for good (any reason).
    apns_failed,
    /// Notifications refused locally: payload over 4096 bytes.
    apns_too_large,
    /// Notifications for an app or environment with no usable credentials.
    apns_no_credentials,
    /// Requests sent again after a 429, a 5xx or no answer (each retry counts).
    apns_retried,
    /// Notifications dropped after their last retry: attempts or time used up.
    apns_retries_exhausted,
    /// Answers saying the device token is dead (410, 400 BadDeviceToken or DeviceTokenNotForTopic).
    apns_dead_tokens,
    /// Dead tokens removed from the registry (only while still the user's token).
    apns_tokens_deleted,
    /// Provider tokens (JWTs) minted anew after a 403 Expired/InvalidProviderToken.
    apns_jwt_renewed,
    /// Notifications Apple refused for good (413, other 4xx, provider token refused again); not retried.
    apns_rejected,
    /// Notifications dropped because the sender's queue was full (apns.queue_full = "drop").
    apns_queue_dropped,
    /// Credential reloads applied (SIGHUP or a changed config.json or credential file).
    apns_reloads,
    /// Reloads refused, or apps whose new credentials were refused (the old ones stay).
    apns_reloads_refused,
    /// Feedback messages (dead tokens, final failures) published for backends.
    apns_feedback,
    /// Status messages applied to the registry.
    status_updates,
    /// Pushes accepted over HTTP.
    http_pushes,
    /// MQTT CONNECTs accepted.
    mqtt_connects,
    /// MQTT connections closed for a malformed or oversize packet, a protocol error, or a client id over `mqtt.max_client_id_len`.
    mqtt_malformed,
    /// MQTT connections closed for silence: no CONNECT in time, keep-alive expired, or a packet not completed within `mqtt.packet_timeout_secs`.
    mqtt_timeouts,
    /// MQTT messages dropped: a session's queue was full, too large for the client, or over `mqtt.max_queued_bytes`.
    mqtt_dropped,
    /// Persistent MQTT sessions removed because they expired offline.
    mqtt_sessions_expired,
    /// MQTT CONNECTs refused for missing, invalid or expired credentials.
    mqtt_auth_refused,
    /// MQTT subscriptions and publishes refused by the ACL.
    mqtt_denied,
    /// MQTT connections closed because their token expired.
    mqtt_tokens_expired,
    /// TLS or WebSocket handshakes that failed or timed out.
    mqtt_handshakes_failed,
    /// MQTT sessions removed because their user went over `mqtt.max_sessions_per_user`.
    mqtt_sessions_evicted,
    /// MQTT connections closed at accept: their IP address was at `mqtt.max_connections_per_ip`.
    mqtt_ip_refused,
    /// Registry (Redis) calls that failed: lookups, writes, pings.
    registry_errors,
    /// Connections to the external broker established (CONNACK received).
    mqtt_external_connects,
    /// Of those, connections that speak MQTT 5 (PUBACKs say when a publish reached nobody).
    mqtt_external_connects_v5,
    /// Of those, connections that speak MQTT 3.1.1 (the broker refused 5).
    mqtt_external_connects_v311,
    /// Status subscriptions the external broker granted (one per connection).
    mqtt_external_subscribed,
    /// Publishes the external broker acknowledged (PUBACK): taken out of the outbox.
    mqtt_external_acked,
    /// Publishes sent to the external broker again after a reconnect.
    mqtt_external_republished,
    /// User pushes the external broker acknowledged with 0x10 No matching subscribers (then kept offline).
    mqtt_external_unreached,
    /// PUBACKs from the external broker refusing a publish (reason 0x80 or more); each refusal counts.
    mqtt_external_refused,
    /// Publishes dropped after mqtt.external_max_attempts refusals.
    mqtt_external_dropped_refused,
    /// Publishes dropped after mqtt.external_max_attempts connections lost while each was the oldest unacknowledged.
    mqtt_external_dropped_disconnected,
    /// Feedback messages about publishes given up on, published for backends.
    mqtt_external_feedback,
    /// Publishes to the external broker dropped: outbox full (mqtt.outbox_full = "drop") or an unpublishable topic.
    mqtt_outbox_dropped,
    /// Messages kept for an offline user without APNs.
    offline_kept,
    /// Kept messages dropped: the user's list was full (oldest first), or the store failed.
    offline_dropped,
    /// Kept messages dropped unsent because they expired.
    offline_expired,
    /// Kept messages handed to a session of their user when it subscribed.
    offline_delivered,
    /// MQTT messages written to device sessions by the router (one per session a publish reached).
    mqtt_written,
    /// QoS 1 messages a device acknowledged (PUBACK) on the embedded broker.
    mqtt_acked,
    /// MQTT messages not sent because their push's TTL had passed while queued.
    mqtt_expired,
    /// Receipts: outcome changes written to the store.
    receipts_recorded,
    /// Receipts: outcome changes lost: the queue (receipts.queue) was full, or the store failed.
    receipts_dropped,
    /// Receipts: outcomes the in-memory store forgot early to stay within receipts.max_records and max_bytes.
    receipts_evicted,
    /// Receipts: events not added to receipts.stream (Redis refused or was unreachable).
    receipts_stream_dropped,
    /// Webhook: events the receiver acknowledged (2xx).
    webhook_sent,
    /// Webhook: POSTs that failed (connection, timeout, non-2xx); their events are sent again.
    webhook_failed,
    /// Webhook: events dropped unsent: the queue (receipts.webhook_queue) was full, or the server stopped.
    webhook_dropped,
    /// Device and token events (receipts.events) dropped before the webhook and stream: their queue of 4096 was full.
    events_dropped,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn samples_list_every_counter_with_its_doc() {
        let stats = Stats::default();
        stats.apns_failed.add(3);
        let samples = stats.samples();
        let failed = samples.iter().find(|s| s.name == "apns_failed").unwrap();
        assert_eq!(failed.value, 3);
        assert_eq!(
            failed.help,
            "Notifications that failed for good (any reason)."
        );
        assert!(samples.iter().all(|s| !s.help.is_empty()));
    }
}
