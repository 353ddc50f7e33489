//! APNs sender: turns routed deliveries into HTTP/2 requests to Apple.
//!
//! `credentials` reads config.json and the certificates or keys it names,
//! `endpoints` builds what each (app, environment) sends with and `reload`
//! rebuilds it on SIGHUP or when the files change,
//! `payload` builds the body and headers apps expect, `connection` keeps one
//! HTTP/2 connection per (app, environment) over `tls`, `sender` runs the
//! queue, `deliver` acts on each `outcome` (`retry` says when to try again,
//! `feedback` tells backends), and `check` backs `pushbridge check-config`.

mod check;
mod connection;
mod credentials;
mod deliver;
mod endpoints;
mod feedback;
mod jwt;
mod legacy;
mod log_budget;
mod outcome;
mod payload;
mod pem;
mod reload;
mod retry;
mod sender;
mod tls;

use std::sync::Arc;

use serde_json::{Map, Value};

use crate::push::Ack;
use crate::push::ApnsOptions;
use crate::push::PushId;
use crate::router::ApnsDelivery;

pub use check::{check_config, AppCheck, AppReport, CertReport, Credential, EXPIRY_WARNING_DAYS};
pub use endpoints::LoadedApp;
pub use feedback::Feedback;
pub use outcome::Outcome;
pub use payload::{Payload, PayloadError, PushType, MAX_PAYLOAD};
pub use sender::{ApnsSender, Sinks};

/// Everything that can go wrong in the APNs module; messages name the file,
/// app or host and the problem, since operators read them in logs.
#[derive(Debug, thiserror::Error)]
pub enum ApnsError {
    /// A credentials file (or config.json itself) that cannot be used.
    #[error("{path}: {problem}")]
    File { path: String, problem: String },
    /// An app entry in config.json that is malformed.
    #[error("{path}: app {app}: {problem}")]
    App {
        path: String,
        app: String,
        problem: String,
    },
    /// An `[apns]` setting that cannot be used.
    #[error("settings: apns.{key}: {problem}")]
    Setting { key: &'static str, problem: String },
    /// Reaching Apple failed: TCP, TLS or the HTTP/2 handshake.
    #[error("{host}: {problem}")]
    Connect { host: String, problem: String },
    /// A request that got no answer: connection lost, timeout, bad request.
    #[error("request: {0}")]
    Request(String),
}

impl ApnsError {
    pub(crate) fn file(path: &std::path::Path, problem: impl Into<String>) -> Self {
        ApnsError::File {
            path: path.display().to_string(),
            problem: problem.into(),
        }
    }
}

/// One notification waiting for Apple.
#[derive(Debug)]
pub struct ApnsJob {
    pub delivery: ApnsDelivery,
    pub data: Arc<Map<String, Value>>,
    /// Overrides from `POST /v1/push`; `None` on the proxy path.
    pub options: Option<Arc<ApnsOptions>>,
    /// Durable intake: settled when the notification's fate is final
    /// (200, or failed for good); dropped unsettled (shutdown) it leaves
    /// its stream entry pending for another instance.
    pub ack: Option<Ack>,
    /// The push's id when it asked for a receipt: Apple's answer is recorded.
    pub receipt: Option<PushId>,
}

impl ApnsJob {
    /// The notification will not be tried again: its entry may be acknowledged.
    pub(crate) fn settle(&mut self) {
        if let Some(ack) = self.ack.take() {
            ack.settle();
        }
    }
}
