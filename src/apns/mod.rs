//! APNs sender (stub: replaced by the APNs work).

use std::sync::Arc;

use serde_json::{Map, Value};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::router::ApnsDelivery;
use crate::settings::ApnsSettings;
use crate::stats::Stats;

#[derive(Debug, thiserror::Error)]
pub enum ApnsError {
    #[error("{path}: {problem}")]
    Config { path: String, problem: String },
}

/// One notification waiting for Apple.
#[derive(Debug, Clone)]
pub struct ApnsJob {
    pub delivery: ApnsDelivery,
    pub data: Arc<Map<String, Value>>,
}

#[derive(Clone)]
pub struct ApnsSender {}

impl ApnsSender {
    pub fn start(
        _settings: &ApnsSettings,
        _stats: Arc<Stats>,
        _shutdown: CancellationToken,
        _tracker: &TaskTracker,
    ) -> Result<ApnsSender, ApnsError> {
        Ok(ApnsSender {})
    }

    /// Queues a notification, waiting while the queue is full.
    pub async fn send(&self, _job: ApnsJob) {}
}

/// One app's credentials, as `check-config` reports them.
#[derive(Debug, Clone)]
pub struct AppReport(pub String);

impl std::fmt::Display for AppReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

pub fn check_config(_settings: &ApnsSettings) -> Result<Vec<AppReport>, ApnsError> {
    Ok(Vec::new())
}
