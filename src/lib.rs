//! pushbridge: push delivery from backends to apps, over APNs or MQTT.

pub mod apns;
pub mod mqtt;
pub mod push;
pub mod router;
pub mod settings;
pub mod stats;
