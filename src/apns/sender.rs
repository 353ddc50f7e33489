//! The queue between the router and Apple, and the task that drains it.

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, StatusCode};
use http_body_util::Full;
use tokio::sync::mpsc::error::TrySendError;
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn, Instrument};

use super::connection::Transport;
use super::endpoints::{Builder, Endpoint};
use super::feedback::Feedback;
use super::jwt::{unix_now, Renewal};
use super::outcome::Outcome;
use super::payload::{Payload, PayloadError};
use super::reload::{self, Credentials};
use super::retry::RetryPolicy;
use super::{ApnsError, ApnsJob};
use crate::registry::{Registry, UserStore};
use crate::router::Environment;
use crate::settings::{ApnsSettings, QueueFull};
use crate::stats::Stats;

/// Hands notifications to the sender task; cheap to clone.
#[derive(Clone)]
pub struct ApnsSender {
    queue: mpsc::Sender<ApnsJob>,
    queue_full: QueueFull,
    stats: Arc<Stats>,
    credentials: Arc<Credentials>,
}

/// Where the sender reports besides its logs: counters, the registry
/// (dead tokens are removed) and the feedback topic.
#[derive(Clone)]
pub struct Sinks {
    pub stats: Arc<Stats>,
    pub registry: Registry,
    pub feedback: Feedback,
}

struct Shared {
    credentials: Arc<Credentials>,
    sinks: Sinks,
    expiration_secs: u64,
    retry: RetryPolicy,
    jwt_refresh_min: Duration,
    shutdown: CancellationToken,
}

/// What one attempt got back.
struct Answer {
    status: Option<StatusCode>,
    apns_id: String,
    /// The provider token the request carried.
    jwt: Option<String>,
    outcome: Outcome,
}

impl Answer {
    fn status(&self) -> String {
        self.status
            .map_or_else(|| "none".to_owned(), |s| s.as_u16().to_string())
    }
}

impl ApnsSender {
    /// Loads config.json (a missing config.json: warn, start with no apps;
    /// an app whose files are broken: error log naming file and problem,
    /// the other apps still work) and starts the sender task on `tracker`,
    /// which stops on `shutdown`.
    pub fn start(
        settings: &ApnsSettings,
        sinks: Sinks,
        shutdown: CancellationToken,
        tracker: &TaskTracker,
    ) -> Result<ApnsSender, ApnsError> {
        let transport = Transport {
            tracker: tracker.clone(),
            shutdown: shutdown.clone(),
            timeout: Duration::from_secs(settings.request_timeout_secs.max(1)),
            max_connections: settings.max_connections,
        };
        let builder = Builder::new(settings, transport)?;
        // Taken first: a change made while loading still triggers a reload.
        let stamp = builder.stamp();
        let endpoints = builder.initial()?;
        info!(endpoints = endpoints.map.len(), feedback = %sinks.feedback.topic(), "APNs sender ready");
        let credentials = Arc::new(Credentials::new(
            builder,
            endpoints,
            Arc::clone(&sinks.stats),
        ));
        tracker.spawn(reload::watch(
            Arc::clone(&credentials),
            stamp,
            reload::sighup(),
            Duration::from_millis(settings.reload_poll_ms),
            shutdown.clone(),
        ));

        let (tx, rx) = mpsc::channel(settings.queue.max(1));
        let stats = Arc::clone(&sinks.stats);
        let shared = Arc::new(Shared {
            credentials: Arc::clone(&credentials),
            sinks,
            expiration_secs: settings.expiration_secs,
            retry: RetryPolicy::new(settings),
            jwt_refresh_min: Duration::from_secs(settings.jwt_refresh_min_secs),
            shutdown: shutdown.clone(),
        });
        let in_flight = settings.max_in_flight.max(1);
        tracker.spawn(run(shared, rx, in_flight, shutdown, tracker.clone()));
        Ok(ApnsSender {
            queue: tx,
            queue_full: settings.queue_full,
            stats,
            credentials,
        })
    }

    /// Queues a notification (bounded queue of `settings.queue`). When the
    /// queue is full it waits, or with `queue_full = "drop"` drops it (counted).
    pub async fn send(&self, job: ApnsJob) {
        let result = match self.queue_full {
            QueueFull::Wait => self.queue.send(job).await.map_err(|_| false),
            QueueFull::Drop => self.queue.try_send(job).map_err(|e| match e {
                TrySendError::Full(_) => true,
                TrySendError::Closed(_) => false,
            }),
        };
        match result {
            Ok(()) => self.stats.apns_queued.inc(),
            Err(true) => {
                self.stats.apns_queue_dropped.inc();
                let dropped = self.stats.apns_queue_dropped.get();
                // Every drop is counted; the log says so at 1, 2, 4, 8, ...
                if dropped.is_power_of_two() {
                    warn!(dropped, "APNs queue full; notifications dropped");
                }
            }
            Err(false) => debug!("APNs sender stopped; notification dropped"),
        }
    }

    /// Notifications waiting in the queue now.
    pub fn queued(&self) -> usize {
        self.queue.max_capacity() - self.queue.capacity()
    }

    /// The (app, environment) pairs with usable credentials, sorted by app.
    pub fn configured(&self) -> Vec<(String, Environment)> {
        self.credentials.current().configured()
    }

    /// Reloads the credentials now, as SIGHUP does.
    pub fn reload(&self) {
        self.credentials.reload();
    }
}

/// Drains the queue: checks each job, then sends it on its own task so
/// requests share connections concurrently.
async fn run(
    shared: Arc<Shared>,
    mut rx: mpsc::Receiver<ApnsJob>,
    max_in_flight: usize,
    shutdown: CancellationToken,
    tracker: TaskTracker,
) {
    let in_flight = Arc::new(Semaphore::new(max_in_flight));
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
        let stats = &self.sinks.stats;
        let endpoints = self.credentials.current();
        let Some(endpoint) = endpoints.map.get(&(d.app_ident.clone(), d.env)) else {
            stats.apns_no_credentials.inc();
            warn!(user = %d.user, app = %d.app_ident, env = ?d.env,
                "APNs: no credentials for this app and environment; notification dropped");
            return None;
        };
        match Payload::build(&job.data) {
            Ok(p) => Some((Arc::clone(endpoint), p)),
            Err(PayloadError::TooLarge { size }) => {
                stats.apns_too_large.inc();
                warn!(user = %d.user, app = %d.app_ident, size,
                    "APNs: payload of {size} bytes is over 4096; notification dropped");
                None
            }
            Err(e) => {
                stats.apns_failed.inc();
                warn!(user = %d.user, app = %d.app_ident, "APNs: {e}");
                None
            }
        }
    }

    /// Sends `job` until Apple settles it: delivered, dead token, refused,
    /// or out of retries.
    async fn deliver(
        self: Arc<Self>,
        endpoint: Arc<Endpoint>,
        job: ApnsJob,
        payload: Payload,
        _permit: OwnedSemaphorePermit,
    ) {
        let d = &job.delivery;
        let stats = &self.sinks.stats;
        let started = Instant::now();
        let mut attempt = 1;
        let mut renewed = false;
        loop {
            let answer = self.attempt(&endpoint, &job, payload.clone()).await;
            let reason = match &answer.outcome {
                Outcome::Delivered => {
                    stats.apns_delivered.inc();
                    debug!(user = %d.user, attempt, "APNs delivered");
                    return;
                }
                Outcome::DeadToken { reason } => {
                    self.dead_token(&job, &answer, reason).await;
                    return;
                }
                Outcome::ExpiredProviderToken { reason } => {
                    if !renewed && self.renew_jwt(&endpoint, &answer, reason) {
                        renewed = true;
                        continue;
                    }
                    stats.apns_rejected.inc();
                    format!("{reason}: provider token refused")
                }
                Outcome::Rejected { reason } => {
                    stats.apns_rejected.inc();
                    reason.clone()
                }
                Outcome::Retry { reason } => {
                    let Some(wait) = self.retry.delay(attempt + 1, started.elapsed()) else {
                        stats.apns_retries_exhausted.inc();
                        self.fail(
                            &job,
                            &answer,
                            &format!("{reason} (after {attempt} attempts)"),
                        );
                        return;
                    };
                    stats.apns_retried.inc();
                    debug!(user = %d.user, attempt, status = answer.status(), reason,
                        ?wait, "APNs: retrying");
                    tokio::select! {
                        _ = tokio::time::sleep(wait) => {}
                        _ = self.shutdown.cancelled() => {
                            self.fail(&job, &answer, &format!("{reason} (shutting down)"));
                            return;
                        }
                    }
                    attempt += 1;
                    continue;
                }
            };
            self.fail(&job, &answer, &reason);
            return;
        }
    }

    /// One request and its classified answer.
    async fn attempt(&self, endpoint: &Endpoint, job: &ApnsJob, payload: Payload) -> Answer {
        let (req, jwt) = match self.request(endpoint, job, payload) {
            Ok(r) => r,
            Err(reason) => {
                return Answer {
                    status: None,
                    apns_id: String::new(),
                    jwt: None,
                    outcome: Outcome::Rejected { reason },
                }
            }
        };
        let sent = tokio::select! {
            r = endpoint.conn.send(req) => r,
            // Stopping abandons requests Apple has not answered yet.
            _ = self.shutdown.cancelled() => Err(ApnsError::Request("shutting down".into())),
        };
        match sent {
            Ok(resp) => {
                let reason = apple_reason(resp.body());
                let apns_id = resp
                    .headers()
                    .get("apns-id")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or_default()
                    .to_owned();
                Answer {
                    status: Some(resp.status()),
                    apns_id,
                    jwt,
                    outcome: Outcome::classify(resp.status(), &reason),
                }
            }
            Err(e) => Answer {
                status: None,
                apns_id: String::new(),
                jwt,
                outcome: Outcome::Retry {
                    reason: e.to_string(),
                },
            },
        }
    }

    /// After a 403 on the provider token: whether to retry with a new one.
    fn renew_jwt(&self, endpoint: &Endpoint, answer: &Answer, reason: &str) -> bool {
        let (Some(signer), Some(jwt)) = (&endpoint.token, &answer.jwt) else {
            return false;
        };
        match signer.renew(jwt, self.jwt_refresh_min) {
            Renewal::Minted => {
                self.sinks.stats.apns_jwt_renewed.inc();
                info!(reason, "APNs: provider token refused; minted a new one");
                true
            }
            Renewal::AlreadyNew => true,
            Renewal::TooSoon => {
                warn!(
                    reason,
                    "APNs: provider token refused, but it is younger than \
                    apns.jwt_refresh_min_secs; not minting another"
                );
                false
            }
        }
    }

    /// Apple says the token is dead: remove it if the user still has it,
    /// tell the backends.
    async fn dead_token(&self, job: &ApnsJob, answer: &Answer, reason: &str) {
        let d = &job.delivery;
        let stats = &self.sinks.stats;
        stats.apns_dead_tokens.inc();
        stats.apns_failed.inc();
        let deleted = match self.sinks.registry.delete_token_if(&d.user, &d.token).await {
            Ok(deleted) => deleted,
            Err(e) => {
                warn!(user = %d.user, error = %e, "APNs: could not remove a dead token");
                false
            }
        };
        if deleted {
            stats.apns_tokens_deleted.inc();
        }
        info!(user = %d.user, app = %d.app_ident, status = answer.status(), reason,
            apns_id = answer.apns_id, deleted, "APNs: device token no longer valid");
        self.feedback(d, reason);
    }

    /// A notification that will not be delivered: counted, logged, reported.
    fn fail(&self, job: &ApnsJob, answer: &Answer, reason: &str) {
        let d = &job.delivery;
        self.sinks.stats.apns_failed.inc();
        warn!(user = %d.user, app = %d.app_ident, status = answer.status(), reason,
            apns_id = answer.apns_id, "APNs: not delivered");
        self.feedback(d, reason);
    }

    fn feedback(&self, d: &crate::router::ApnsDelivery, reason: &str) {
        self.sinks.feedback.publish(d, reason);
        self.sinks.stats.apns_feedback.inc();
    }

    /// The HTTP/2 request for `job` and the provider token it carries;
    /// `Err` for a token that cannot be a path.
    fn request(
        &self,
        endpoint: &Endpoint,
        job: &ApnsJob,
        payload: Payload,
    ) -> Result<(Request<Full<Bytes>>, Option<String>), String> {
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
        let jwt = endpoint.token.as_ref().map(|s| s.token());
        if let Some(jwt) = &jwt {
            req = req.header("authorization", format!("bearer {jwt}"));
        }
        req.body(Full::new(payload.body))
            .map(|r| (r, jwt))
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
