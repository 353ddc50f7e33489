//! The queue between the router and Apple, and the task that drains it.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::Request;
use http_body_util::Full;
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, error, info, info_span, warn, Instrument};

use super::connection::{BaseUrl, Connection};
use super::credentials::{self, AppConfig};
use super::jwt::{unix_now, TokenSigner};
use super::outcome::Outcome;
use super::payload::{Payload, PayloadError};
use super::{tls, ApnsError, ApnsJob};
use crate::router::Environment;
use crate::settings::ApnsSettings;
use crate::stats::Stats;

/// Requests waiting for Apple's answer at once, over all connections.
/// HTTP/2 multiplexes them; this only bounds memory.
const MAX_IN_FLIGHT: usize = 1000;

/// Hands notifications to the sender task; cheap to clone.
#[derive(Clone)]
pub struct ApnsSender {
    queue: mpsc::Sender<ApnsJob>,
    stats: Arc<Stats>,
    configured: Arc<Vec<(String, Environment)>>,
}

/// One (app, environment) Apple can be reached for.
struct Endpoint {
    conn: Connection,
    /// Token auth; `None` means the TLS client certificate authenticates.
    token: Option<Arc<TokenSigner>>,
}

struct Shared {
    endpoints: HashMap<(String, Environment), Arc<Endpoint>>,
    stats: Arc<Stats>,
    expiration_secs: u64,
}

impl ApnsSender {
    /// Loads config.json (a missing config.json: warn, start with no apps;
    /// an app whose files are broken: error log naming file and problem,
    /// the other apps still work) and starts the sender task on `tracker`,
    /// which stops on `shutdown`.
    pub fn start(
        settings: &ApnsSettings,
        stats: Arc<Stats>,
        shutdown: CancellationToken,
        tracker: &TaskTracker,
    ) -> Result<ApnsSender, ApnsError> {
        let production = BaseUrl::parse("production_url", &settings.production_url)?;
        let sandbox = BaseUrl::parse("sandbox_url", &settings.sandbox_url)?;
        let roots = Arc::new(tls::root_store(settings.ca_file.as_deref())?);
        let timeout = Duration::from_secs(settings.request_timeout_secs.max(1));
        let apps = match credentials::read_config(&settings.config)? {
            Some(apps) => apps,
            None => {
                warn!(
                    "{}: not found; APNs starts with no apps",
                    settings.config.display()
                );
                Default::default()
            }
        };

        let mut endpoints = HashMap::new();
        for (app, config) in apps {
            let config = match config {
                Ok(c) => c,
                Err(e) => {
                    error!("APNs app {app} disabled: {e}");
                    continue;
                }
            };
            let token = match &config {
                AppConfig::Token {
                    key,
                    key_id,
                    team_id,
                } => match credentials::load_token(key, key_id, team_id) {
                    Ok(signer) => Some(Arc::new(signer)),
                    Err(e) => {
                        error!("APNs app {app} disabled: {e}");
                        continue;
                    }
                },
                AppConfig::Certificate { .. } => None,
            };
            for env in [Environment::Sandbox, Environment::Production] {
                let tls = match tls::for_app(&config, env, &roots) {
                    Ok(Some(tls)) => tls,
                    Ok(None) => continue,
                    Err(e) => {
                        error!("APNs app {app} ({env:?}) disabled: {e}");
                        continue;
                    }
                };
                let url = match env {
                    Environment::Sandbox => sandbox.clone(),
                    Environment::Production => production.clone(),
                };
                let span = info_span!("apns", app = %app, env = ?env, host = %url.host);
                let conn =
                    Connection::new(url, tls, span, tracker.clone(), shutdown.clone(), timeout);
                let token = token.clone();
                endpoints.insert((app.clone(), env), Arc::new(Endpoint { conn, token }));
            }
        }
        let mut configured: Vec<_> = endpoints.keys().cloned().collect();
        configured.sort_by_key(|(app, env)| (app.clone(), *env == Environment::Production));
        info!(endpoints = configured.len(), "APNs sender ready");

        let (tx, rx) = mpsc::channel(settings.queue.max(1));
        let shared = Arc::new(Shared {
            endpoints,
            stats: Arc::clone(&stats),
            expiration_secs: settings.expiration_secs,
        });
        tracker.spawn(run(shared, rx, shutdown, tracker.clone()));
        Ok(ApnsSender {
            queue: tx,
            stats,
            configured: Arc::new(configured),
        })
    }

    /// Queues a notification (bounded queue of `settings.queue`), waiting
    /// while the queue is full.
    pub async fn send(&self, job: ApnsJob) {
        match self.queue.send(job).await {
            Ok(()) => self.stats.apns_queued.inc(),
            Err(_) => debug!("APNs sender stopped; notification dropped"),
        }
    }

    /// The (app, environment) pairs with usable credentials, sorted by app.
    pub fn configured(&self) -> &[(String, Environment)] {
        &self.configured
    }
}

/// Drains the queue: checks each job, then sends it on its own task so
/// requests share connections concurrently.
async fn run(
    shared: Arc<Shared>,
    mut rx: mpsc::Receiver<ApnsJob>,
    shutdown: CancellationToken,
    tracker: TaskTracker,
) {
    let in_flight = Arc::new(Semaphore::new(MAX_IN_FLIGHT));
    loop {
        let job = tokio::select! {
            biased;
            _ = shutdown.cancelled() => break,
            job = rx.recv() => match job {
                Some(job) => job,
                None => break,
            },
        };
        let Some((endpoint, payload)) = shared.prepare(&job) else {
            continue;
        };
        let permit = tokio::select! {
            _ = shutdown.cancelled() => break,
            p = Arc::clone(&in_flight).acquire_owned() => match p {
                Ok(p) => p,
                Err(_) => break,
            },
        };
        let span = endpoint.conn.span().clone();
        tracker.spawn(
            Arc::clone(&shared)
                .deliver(endpoint, job, payload, permit)
                .instrument(span),
        );
    }
    debug!("APNs sender stopped");
}

impl Shared {
    /// The endpoint and payload for `job`, or `None` after counting why not.
    fn prepare(&self, job: &ApnsJob) -> Option<(Arc<Endpoint>, Payload)> {
        let d = &job.delivery;
        let Some(endpoint) = self.endpoints.get(&(d.app_ident.clone(), d.env)) else {
            self.stats.apns_no_credentials.inc();
            warn!(user = %d.user, app = %d.app_ident, env = ?d.env,
                "APNs: no credentials for this app and environment; notification dropped");
            return None;
        };
        match Payload::build(&job.data) {
            Ok(p) => Some((Arc::clone(endpoint), p)),
            Err(PayloadError::TooLarge { size }) => {
                self.stats.apns_too_large.inc();
                warn!(user = %d.user, app = %d.app_ident, size,
                    "APNs: payload of {size} bytes is over 4096; notification dropped");
                None
            }
            Err(e) => {
                self.stats.apns_failed.inc();
                warn!(user = %d.user, app = %d.app_ident, "APNs: {e}");
                None
            }
        }
    }

    async fn deliver(
        self: Arc<Self>,
        endpoint: Arc<Endpoint>,
        job: ApnsJob,
        payload: Payload,
        _permit: OwnedSemaphorePermit,
    ) {
        let d = &job.delivery;
        let (status, apns_id, outcome) = match self.request(&endpoint, &job, payload) {
            Err(reason) => (None, None, Outcome::Rejected { reason }),
            Ok(req) => match endpoint.conn.send(req).await {
                Ok(resp) => {
                    let reason = apple_reason(resp.body());
                    let apns_id = resp
                        .headers()
                        .get("apns-id")
                        .and_then(|v| v.to_str().ok())
                        .map(str::to_owned);
                    let outcome = Outcome::classify(resp.status(), &reason);
                    (Some(resp.status()), apns_id, outcome)
                }
                Err(e) => {
                    let reason = e.to_string();
                    (None, None, Outcome::Retry { reason })
                }
            },
        };
        let status = status.map_or_else(|| "none".to_owned(), |s| s.as_u16().to_string());
        let apns_id = apns_id.unwrap_or_default();
        match outcome {
            Outcome::Delivered => {
                self.stats.apns_delivered.inc();
                debug!(user = %d.user, "APNs delivered");
            }
            Outcome::DeadToken { reason } => {
                self.stats.apns_failed.inc();
                info!(user = %d.user, app = %d.app_ident, status, reason, apns_id,
                    "APNs: device token no longer valid");
            }
            Outcome::ExpiredProviderToken { reason }
            | Outcome::Retry { reason }
            | Outcome::Rejected { reason } => {
                self.stats.apns_failed.inc();
                warn!(user = %d.user, app = %d.app_ident, status, reason, apns_id,
                    "APNs: not delivered");
            }
        }
    }

    /// The HTTP/2 request for `job`; `Err` for a token that cannot be a path.
    fn request(
        &self,
        endpoint: &Endpoint,
        job: &ApnsJob,
        payload: Payload,
    ) -> Result<Request<Full<Bytes>>, String> {
        let token = &job.delivery.token;
        if token.is_empty() || !token.bytes().all(|b| b.is_ascii_alphanumeric()) {
            return Err("malformed device token".into());
        }
        let expiration = match self.expiration_secs {
            0 => 0,
            secs => unix_now() + secs,
        };
        let mut req = Request::post(format!("{}/3/device/{token}", endpoint.conn.base()))
            .header("apns-topic", &job.delivery.app_ident)
            .header("apns-push-type", payload.push_type.header())
            .header("apns-priority", payload.push_type.priority())
            .header("apns-expiration", expiration.to_string())
            .header("content-type", "application/json");
        if let Some(signer) = &endpoint.token {
            req = req.header("authorization", format!("bearer {}", signer.token()));
        }
        req.body(Full::new(payload.body))
            .map_err(|e| format!("cannot build request: {e}"))
    }
}

/// Apple's `{"reason": "..."}`, or an empty reason.
fn apple_reason(body: &Bytes) -> String {
    #[derive(serde::Deserialize)]
    struct Answer {
        reason: String,
    }
    serde_json::from_slice::<Answer>(body)
        .map(|a| a.reason)
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reason_from_body() {
        assert_eq!(
            apple_reason(&Bytes::from_static(
                br#"{"reason":"Unregistered","timestamp":1}"#
            )),
            "Unregistered"
        );
        assert_eq!(apple_reason(&Bytes::new()), "");
    }
}
