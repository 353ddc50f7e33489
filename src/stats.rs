//! Counters every part bumps and ops read (logs now; `/metrics` later).

use std::sync::atomic::{AtomicU64, Ordering};

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

/// Process-wide counters, shared as `Arc<Stats>`.
#[derive(Debug, Default)]
pub struct Stats {
    /// Frames answered 0x00 and queued for routing.
    pub pushes_accepted: Counter,
    /// Frames answered with a non-zero status byte.
    pub frames_rejected: Counter,
    /// Pushes dropped because the registry could not be read.
    pub pushes_failed_registry: Counter,
    /// Publishes handed to the MQTT broker by the router.
    pub mqtt_published: Counter,
    /// Notifications handed to the APNs sender.
    pub apns_queued: Counter,
    /// Notifications Apple answered 200.
    pub apns_delivered: Counter,
    /// Notifications that failed for good (any reason).
    pub apns_failed: Counter,
    /// Notifications refused locally: payload over 4096 bytes.
    pub apns_too_large: Counter,
    /// Notifications for an app or environment with no usable credentials.
    pub apns_no_credentials: Counter,
    /// Status messages applied to the registry.
    pub status_updates: Counter,
    /// MQTT CONNECTs accepted.
    pub mqtt_connects: Counter,
    /// MQTT connections closed for a malformed or oversize packet or a protocol error.
    pub mqtt_malformed: Counter,
    /// MQTT connections closed for silence: no CONNECT in time, or keep-alive expired.
    pub mqtt_timeouts: Counter,
    /// MQTT messages dropped: a session's queue was full, or too large for the client.
    pub mqtt_dropped: Counter,
    /// Persistent MQTT sessions removed because they expired offline.
    pub mqtt_sessions_expired: Counter,
}
