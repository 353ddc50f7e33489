//! Embedded MQTT broker (stub: replaced by the broker work).

use bytes::Bytes;
use std::sync::Arc;
use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::settings::MqttSettings;

#[derive(Debug, thiserror::Error)]
pub enum MqttError {
    #[error("mqtt io: {0}")]
    Io(#[from] std::io::Error),
}

/// What the broker tells the rest of pushbridge.
#[derive(Debug, Clone)]
pub enum BrokerEvent {
    /// A client published on `<prefix>/app/status`.
    Status {
        conn: u64,
        client_id: Arc<str>,
        payload: Bytes,
    },
    /// A client's connection ended (any reason, including takeover).
    Disconnected { conn: u64, client_id: Arc<str> },
}

#[derive(Clone)]
pub struct Broker {}

impl Broker {
    pub fn new(_settings: &MqttSettings) -> (Broker, mpsc::Receiver<BrokerEvent>) {
        let (_tx, rx) = mpsc::channel(1024);
        (Broker {}, rx)
    }

    /// Publishes with QoS 1 to every matching session; never blocks.
    pub fn publish(&self, _topic: &str, _payload: Bytes) -> usize {
        0
    }

    pub async fn serve(
        self,
        _listener: TcpListener,
        shutdown: CancellationToken,
        _tracker: TaskTracker,
    ) -> Result<(), MqttError> {
        shutdown.cancelled().await;
        Ok(())
    }
}
