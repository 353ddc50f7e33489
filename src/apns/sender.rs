//! The queue between the router and Apple, and the task that drains it.

use std::future::Future;
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use futures_util::stream::{FuturesUnordered, StreamExt};
use serde_json::{Map, Value};
use tokio::sync::mpsc;
use tokio::sync::mpsc::error::TrySendError;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn, Instrument};

use super::connection::{Driver, Transport};
use super::deliver::Expiration;
use super::endpoints::{Builder, Endpoint, LoadedApp};
use super::feedback::Feedback;
use super::log_budget::LogBudget;
use super::payload::{Payload, PayloadError};
use super::reload::{self, Credentials};
use super::retry::RetryPolicy;
use super::{ApnsError, ApnsJob};
use crate::lifecycle::Phase;
use crate::push::ApnsOptions;
use crate::receipts::{Notices, Receipts};
use crate::registry::Registry;
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
    /// Cancelled by `drain`: the queue task takes no new jobs, finishes the queued ones.
    draining: CancellationToken,
    /// The queue task, which drives every delivery it started.
    tasks: TaskTracker,
    /// Drops after the sender stopped (shutdown with a full intake): at
    /// most 10 warnings a second, `skipped` counting the rest.
    stopped_log: Arc<LogBudget>,
}

/// Where the sender reports besides its logs: counters, the registry
/// (dead tokens are removed) and the feedback topic.
#[derive(Clone)]
pub struct Sinks {
    pub stats: Arc<Stats>,
    pub registry: Registry,
    pub feedback: Feedback,
    /// Apple's answers for pushes that asked for a receipt.
    pub receipts: Receipts,
    /// Dead tokens, whatever the push (`token.dead`).
    pub notices: Notices,
}

/// What the queue task and every delivery share.
pub(super) struct Shared {
    pub credentials: Arc<Credentials>,
    pub sinks: Sinks,
    pub expiration_secs: u64,
    pub expiration: Expiration,
    pub retry: RetryPolicy,
    pub jwt_refresh_min: Duration,
    pub shutdown: CancellationToken,
    /// "not delivered" warnings: at most 10 a second (`skipped` counts the rest).
    pub failure_log: LogBudget,
}

impl ApnsSender {
    /// Loads config.json (a missing config.json: warn, start with no apps;
    /// an app whose files are broken: error log naming file and problem,
    /// the other apps still work) and starts the sender task on `rest`.
    pub fn start(
        settings: &ApnsSettings,
        sinks: Sinks,
        rest: &Phase,
    ) -> Result<ApnsSender, ApnsError> {
        let shutdown = rest.token();
        let (drivers, connections) = mpsc::unbounded_channel();
        let transport = Transport {
            drivers,
            shutdown: shutdown.clone(),
            timeout: Duration::from_secs(settings.request_timeout_secs.max(1)),
            max_connections: settings.max_connections,
        };
        let builder = Builder::new(settings, transport)?;
        // Taken first: a change made while loading still triggers a reload.
        let stamp = builder.stamp();
        let endpoints = builder.initial()?;
        info!(endpoints = endpoints.len(), feedback = %sinks.feedback.topic(), "APNs sender ready");
        let credentials = Arc::new(Credentials::new(
            builder,
            endpoints,
            Arc::clone(&sinks.stats),
        ));
        rest.spawn(reload::watch(
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
            expiration: Expiration::default(),
            retry: RetryPolicy::new(settings),
            jwt_refresh_min: Duration::from_secs(settings.jwt_refresh_min_secs),
            shutdown: shutdown.clone(),
            failure_log: LogBudget::new(10, Duration::from_secs(1)),
        });
        let in_flight = settings.max_in_flight.max(1);
        let (draining, tasks) = (CancellationToken::new(), TaskTracker::new());
        tasks.spawn(run(shared, rx, in_flight, draining.clone(), connections));
        Ok(ApnsSender {
            queue: tx,
            queue_full: settings.queue_full,
            stats,
            credentials,
            draining,
            tasks,
            stopped_log: Arc::new(LogBudget::new(10, Duration::from_secs(1))),
        })
    }

    /// Queues a notification (bounded queue of `settings.queue`). When the
    /// queue is full it waits, or with `queue_full = "drop"` drops it (counted).
    pub async fn send(&self, job: ApnsJob) {
        let result = match self.queue_full {
            QueueFull::Wait => self.queue.send(job).await.map_err(|_| false),
            QueueFull::Drop => self.queue.try_send(job).map_err(|e| match e {
                // A counted drop is final: its stream entry may be acknowledged.
                TrySendError::Full(mut job) => {
                    job.settle();
                    true
                }
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
            Err(false) => {
                self.stats.apns_failed.inc();
                if let Some(skipped) = self.stopped_log.take(std::time::Instant::now()) {
                    warn!(skipped, "APNs sender stopped; notification dropped");
                }
            }
        }
    }

    /// For shutdown: stops taking notifications and returns once every queued
    /// one has been answered or has failed for good. Bound it with a timeout;
    /// the shutdown token then fails what is left (counted).
    pub async fn drain(&self) {
        self.draining.cancel();
        self.tasks.close();
        self.tasks.wait().await;
    }

    /// Notifications waiting in the queue now.
    pub fn queued(&self) -> usize {
        self.queue.max_capacity() - self.queue.capacity()
    }

    /// The (app, environment) pairs with usable credentials, sorted by app.
    pub fn configured(&self) -> Vec<(String, Environment)> {
        self.credentials.current().configured()
    }

    /// The credentials in use, with certificate expiry (`/v1/apps`).
    pub fn loaded(&self) -> Vec<LoadedApp> {
        self.credentials.current().loaded()
    }

    /// Ready when some app has usable credentials, or config.json lists
    /// none (APNs unused); otherwise why not.
    pub fn ready(&self) -> Result<(), String> {
        if !self.credentials.current().is_empty() {
            return Ok(());
        }
        let path = self.credentials.config();
        match super::credentials::read_config(path) {
            Ok(Some(apps)) if !apps.is_empty() => Err(format!(
                "{} lists {} app(s) but none has usable credentials",
                path.display(),
                apps.len()
            )),
            Ok(_) => Ok(()),
            Err(e) => Err(e.to_string()),
        }
    }

    /// Reloads the credentials now, as SIGHUP does.
    pub fn reload(&self) {
        self.credentials.reload();
    }
}

/// Drains the queue: checks each job and starts its delivery, up to
/// `max_in_flight` at once. This one task drives every delivery and every
/// connection (a task per notification cost more than the request itself):
/// each wake-up takes what is queued, lets the deliveries send their
/// requests, then lets the connections write them out together, as few
/// TLS records and system calls as the burst allows. Once `draining`, the
/// queue is closed and emptied; on shutdown what is still queued fails
/// (counted) and the deliveries under way end at once.
async fn run(
    shared: Arc<Shared>,
    mut rx: mpsc::Receiver<ApnsJob>,
    max_in_flight: usize,
    draining: CancellationToken,
    mut connections: mpsc::UnboundedReceiver<Driver>,
) {
    let mut under_way = FuturesUnordered::new();
    let mut last_body = LastBody::default();
    let mut drivers = FuturesUnordered::new();
    let (mut receiving, mut closed) = (true, false);
    let stop = shared.shutdown.clone();
    let (stop, drain) = (stop.cancelled(), draining.cancelled());
    tokio::pin!(stop, drain);
    std::future::poll_fn(|cx| {
        if receiving && stop.as_mut().poll(cx).is_ready() {
            receiving = false;
        }
        if receiving && !closed && drain.as_mut().poll(cx).is_ready() {
            rx.close();
            closed = true;
        }
        loop {
            while receiving && under_way.len() < max_in_flight {
                match rx.poll_recv(cx) {
                    Poll::Ready(Some(mut job)) => match shared.prepare(&job, &mut last_body) {
                        Some((endpoint, payload)) => {
                            let span = endpoint.conn.span().clone();
                            // Boxed: the set's own task around it then stays
                            // small, and the 992-byte delivery fits the
                            // allocator's fast path; together they were over
                            // it (1,056 bytes: a slow malloc and a
                            // consolidation per notification).
                            // Outside tokio's budget: once it is spent, each
                            // delivery's timer wakes it again at once and the
                            // set re-polls them all (the queue and the
                            // connections still count against it).
                            under_way.push(Box::pin(tokio::task::coop::unconstrained(
                                Arc::clone(&shared)
                                    .deliver(endpoint, job, payload)
                                    .instrument(span),
                            )));
                        }
                        None => job.settle(),
                    },
                    Poll::Ready(None) => receiving = false,
                    Poll::Pending => break,
                }
            }
            let mut finished = 0;
            while let Poll::Ready(Some(())) = under_way.poll_next_unpin(cx) {
                finished += 1;
            }
            while let Poll::Ready(Some(driver)) = connections.poll_recv(cx) {
                drivers.push(driver);
            }
            while let Poll::Ready(Some(())) = drivers.poll_next_unpin(cx) {}
            if !receiving && under_way.is_empty() {
                return Poll::Ready(());
            }
            // Room was made: take more from the queue before sleeping.
            if finished == 0 || !receiving {
                return Poll::Pending;
            }
        }
    })
    .await;
    rx.close();
    let mut left = 0;
    while rx.try_recv().is_ok() {
        left += 1;
    }
    if left > 0 {
        shared.sinks.stats.apns_failed.add(left);
        warn!(
            notifications = left,
            "APNs: still queued at shutdown; not delivered"
        );
    }
    debug!("APNs sender stopped");
}

impl Shared {
    /// The endpoint and payload for `job`, or `None` after counting why not.
    fn prepare(&self, job: &ApnsJob, last: &mut LastBody) -> Option<(Arc<Endpoint>, Payload)> {
        let d = &job.delivery;
        let stats = &self.sinks.stats;
        let endpoints = self.credentials.current();
        let Some(endpoint) = endpoints.get(&d.app_ident, d.env) else {
            stats.apns_no_credentials.inc();
            warn!(user = %d.user, app = %d.app_ident, env = ?d.env,
                "APNs: no credentials for this app and environment; notification dropped");
            self.refused(job, "no credentials for this app and environment".into());
            return None;
        };
        match last.payload(job) {
            Ok(p) => Some((Arc::clone(endpoint), p)),
            Err(PayloadError::TooLarge { size }) => {
                stats.apns_too_large.inc();
                warn!(user = %d.user, app = %d.app_ident, size,
                    "APNs: payload of {size} bytes is over 4096; notification dropped");
                self.refused(job, format!("payload of {size} bytes is over 4096"));
                None
            }
            Err(e) => {
                stats.apns_failed.inc();
                warn!(user = %d.user, app = %d.app_ident, "APNs: {e}");
                self.refused(job, e.to_string());
                None
            }
        }
    }

    /// Refused before it was sent: no answer from Apple to record.
    fn refused(&self, job: &ApnsJob, reason: String) {
        self.receipt(job, |user| crate::receipts::Event::ApnsRejected {
            user,
            status: None,
            reason,
        });
    }
}

/// The last payload built and the push it was built for: a push's
/// notifications to several devices arrive one after the other and share
/// one body instead of each encoding the same data again.
#[derive(Default)]
struct LastBody(Option<Built>);

struct Built {
    data: Arc<Map<String, Value>>,
    options: Option<Arc<ApnsOptions>>,
    payload: Payload,
}

impl LastBody {
    fn payload(&mut self, job: &ApnsJob) -> Result<Payload, PayloadError> {
        if let Some(last) = &self.0 {
            let same_options = match (&last.options, &job.options) {
                (Some(a), Some(b)) => Arc::ptr_eq(a, b),
                (a, b) => a.is_none() && b.is_none(),
            };
            if Arc::ptr_eq(&last.data, &job.data) && same_options {
                return Ok(last.payload.clone());
            }
        }
        let payload = Payload::with_options(&job.data, job.options.as_deref())?;
        self.0 = Some(Built {
            data: Arc::clone(&job.data),
            options: job.options.clone(),
            payload: payload.clone(),
        });
        Ok(payload)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::push::Id;
    use crate::router::ApnsDelivery;

    fn job(data: &Arc<Map<String, Value>>, options: Option<&Arc<ApnsOptions>>) -> ApnsJob {
        ApnsJob {
            delivery: ApnsDelivery {
                user: Id::from(1u64),
                token: "ab".into(),
                app_ident: "com.example".into(),
                env: Environment::Sandbox,
            },
            data: Arc::clone(data),
            options: options.cloned(),
            ack: None,
            receipt: None,
        }
    }

    #[test]
    fn one_body_per_push_and_options() {
        let data = Arc::new(serde_json::from_str(r#"{"alert":"hi","n":1}"#).unwrap());
        let mut last = LastBody::default();
        let first = last.payload(&job(&data, None)).unwrap();
        // The same push to another device: the same bytes, not a copy.
        let again = last.payload(&job(&data, None)).unwrap();
        assert_eq!(first.body.as_ptr(), again.body.as_ptr());

        let badge = Arc::new(ApnsOptions {
            badge: Some(7),
            ..ApnsOptions::default()
        });
        let with_badge = last.payload(&job(&data, Some(&badge))).unwrap();
        assert_ne!(with_badge.body, first.body);
        assert!(std::str::from_utf8(&with_badge.body)
            .unwrap()
            .contains(r#""badge":7"#));

        // Equal data in another push is encoded for that push.
        let other = Arc::new((*data).clone());
        let other_body = last.payload(&job(&other, None)).unwrap();
        assert_eq!(other_body.body, first.body);
        assert_ne!(other_body.body.as_ptr(), first.body.as_ptr());
    }
}
