//! One notification's way to Apple: send, read the answer, and act on it
//! as Apple documents (retry, renew the provider token, remove a dead
//! token, give up), counting and reporting each outcome.

use std::sync::{Arc, Mutex};
use std::time::Instant;

use bytes::Bytes;
use http::header::{HeaderName, InvalidHeaderValue, AUTHORIZATION, CONTENT_TYPE};
use http::{HeaderMap, HeaderValue, Method, Request, StatusCode};
use tracing::{debug, info, warn};

use super::endpoints::Endpoint;
use super::jwt::{unix_now, Bearer, Renewal};
use super::outcome::Outcome;
use super::payload::Payload;
use super::sender::Shared;
use super::{ApnsError, ApnsJob};
use crate::push::Id;
use crate::receipts::{DeadToken, Event, Notice};
use crate::registry::UserStore;
use crate::router::ApnsDelivery;
use crate::settings::EventKind;

/// What one attempt got back.
struct Answer {
    status: Option<StatusCode>,
    /// Apple's `apns-id`, kept as the header until a log or receipt reads it.
    apns_id: Option<HeaderValue>,
    /// The provider token the request carried.
    jwt: Option<Bearer>,
    outcome: Outcome,
}

impl Answer {
    fn apns_id(&self) -> &str {
        self.apns_id
            .as_ref()
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
    }

    fn status(&self) -> String {
        self.status
            .map_or_else(|| "none".to_owned(), |s| s.as_u16().to_string())
    }
}

impl Shared {
    /// Sends `job` until Apple settles it: delivered, dead token, refused,
    /// or out of retries.
    pub(super) async fn deliver(
        self: Arc<Self>,
        endpoint: Arc<Endpoint>,
        mut job: ApnsJob,
        payload: Payload,
    ) {
        let d = &job.delivery;
        let stats = &self.sinks.stats;
        let started = Instant::now();
        let mut attempt = 1;
        let mut renewed = false;
        loop {
            let answer = self.attempt(&endpoint, &job, &payload).await;
            let reason = match &answer.outcome {
                Outcome::Delivered => {
                    stats.apns_delivered.inc();
                    self.receipt(&job, |user| Event::ApnsAccepted {
                        user,
                        apns_id: answer.apns_id().to_owned(),
                    });
                    debug!(user = %d.user, attempt, "APNs delivered");
                    job.settle();
                    return;
                }
                Outcome::DeadToken { reason } => {
                    // Boxed, as the rare path: it would enlarge every delivery.
                    Box::pin(self.dead_token(&job, &answer, reason)).await;
                    job.settle();
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
                Outcome::Retry { reason } if self.shutdown.is_cancelled() => {
                    // Not final: the job's stream entry stays pending.
                    self.fail(&job, &answer, &format!("{reason} (shutting down)"));
                    return;
                }
                Outcome::Retry { reason } => {
                    let Some(wait) = self.retry.delay(attempt + 1, started.elapsed()) else {
                        stats.apns_retries_exhausted.inc();
                        self.fail(
                            &job,
                            &answer,
                            &format!("{reason} (after {attempt} attempts)"),
                        );
                        job.settle();
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
            job.settle();
            return;
        }
    }

    /// One request and its classified answer.
    async fn attempt(&self, endpoint: &Endpoint, job: &ApnsJob, payload: &Payload) -> Answer {
        let (req, jwt) = match self.request(endpoint, job, payload) {
            Ok(r) => r,
            Err(reason) => {
                return Answer {
                    status: None,
                    apns_id: None,
                    jwt: None,
                    outcome: Outcome::Rejected { reason },
                }
            }
        };
        // The first attempt takes the request; a second one (the connection
        // never took the first) gets a new one.
        let mut first = Some(req);
        let again = || {
            first
                .take()
                .or_else(|| self.request(endpoint, job, payload).ok().map(|(r, _)| r))
        };
        let sent_at = Instant::now();
        let sent = tokio::select! {
            // Boxed apart: one allocation of each size stays on the
            // allocator's fast path (both small), one of their sum would not.
            r = Box::pin(endpoint.conn.send(again, payload.body.clone())) => r,
            // Stopping abandons requests Apple has not answered yet.
            _ = self.shutdown.cancelled() => Err(ApnsError::Request("shutting down".into())),
        };
        if sent.is_ok() {
            self.sinks.stats.apns_latency.observe(sent_at.elapsed());
        }
        match sent {
            Ok(mut resp) => {
                let reason = apple_reason(resp.body());
                let apns_id = resp.headers_mut().remove(APNS_ID);
                Answer {
                    status: Some(resp.status()),
                    apns_id,
                    jwt,
                    outcome: Outcome::classify(resp.status(), &reason),
                }
            }
            Err(e) => Answer {
                status: None,
                apns_id: None,
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
                stats.registry_errors.inc();
                warn!(user = %d.user, error = %e, "APNs: could not remove a dead token");
                false
            }
        };
        if deleted {
            stats.apns_tokens_deleted.inc();
        }
        info!(user = %d.user, app = %d.app_ident, status = answer.status(), reason,
            apns_id = answer.apns_id(), deleted, "APNs: device token no longer valid");
        self.receipt(job, |user| Event::ApnsDeadToken {
            user,
            reason: reason.to_owned(),
        });
        let notices = &self.sinks.notices;
        if notices.wants(EventKind::TokenDead) {
            notices.send(Notice::TokenDead(DeadToken {
                user: d.user.clone(),
                token: d.token.clone(),
                app: d.app_ident.clone(),
                env: d.env.name(),
                status: answer.status.map(|s| s.as_u16()),
                reason: reason.to_owned(),
                removed: deleted,
                push: job.receipt.clone(),
            }));
        }
        self.feedback(d, reason);
    }

    /// A notification that will not be delivered: counted, logged, reported.
    fn fail(&self, job: &ApnsJob, answer: &Answer, reason: &str) {
        let d = &job.delivery;
        self.sinks.stats.apns_failed.inc();
        if let Some(skipped) = self.failure_log.take(std::time::Instant::now()) {
            warn!(user = %d.user, app = %d.app_ident, status = answer.status(), reason,
                apns_id = answer.apns_id(), skipped, "APNs: not delivered");
        }
        self.feedback(d, reason);
        self.receipt(job, |user| Event::ApnsRejected {
            user,
            status: answer.status.map(|s| s.as_u16()),
            reason: reason.to_owned(),
        });
    }

    /// Records what became of `job` when its push asked for a receipt.
    pub(super) fn receipt(&self, job: &ApnsJob, event: impl FnOnce(Id) -> Event) {
        if let Some(push) = &job.receipt {
            let event = event(job.delivery.user.clone());
            self.sinks.receipts.record(push, event);
        }
    }

    fn feedback(&self, d: &ApnsDelivery, reason: &str) {
        self.sinks.feedback.publish(d, reason);
        self.sinks.stats.apns_feedback.inc();
    }

    /// The request for `job` without its body, and the provider token it
    /// carries; `Err` for a token that cannot be a path.
    fn request(
        &self,
        endpoint: &Endpoint,
        job: &ApnsJob,
        payload: &Payload,
    ) -> Result<(Request<()>, Option<Bearer>), String> {
        let token = &job.delivery.token;
        if token.is_empty() || !token.bytes().all(|b| b.is_ascii_alphanumeric()) {
            return Err("malformed device token".into());
        }
        let bad = |e: &dyn std::fmt::Display| format!("cannot build request: {e}");
        let options = job.options.as_deref();
        let expiration = match (options.and_then(|o| o.expiration), self.expiration_secs) {
            (Some(at), _) => HeaderValue::from(at),
            (None, 0) => HeaderValue::from_static("0"),
            (None, secs) => self.expiration.at(unix_now() + secs),
        };
        let push_type = match options.and_then(|o| o.push_type.as_deref()) {
            Some(custom) => HeaderValue::from_str(custom).map_err(|e| bad(&e))?,
            None => HeaderValue::from_static(payload.push_type.header()),
        };
        // Apple requires 5 for background pushes; 10 is immediate.
        let priority = match options.and_then(|o| o.priority) {
            Some(p) => HeaderValue::from(u16::from(p)),
            None if push_type == "background" => HeaderValue::from_static("5"),
            None => HeaderValue::from_static("10"),
        };
        let uri = endpoint.conn.device_uri(token).map_err(|e| bad(&e))?;
        let topic = endpoint.topic.clone();
        let topic = topic.ok_or_else(|| bad(&"the app id is not a header value"))?;
        // Room for six headers is under 1 KiB, where allocations are cheap;
        // the seventh (apns-collapse-id) is rare.
        let mut headers = HeaderMap::with_capacity(6);
        let mut put = |name: HeaderName, value: Result<HeaderValue, InvalidHeaderValue>| {
            value.map(|v| headers.insert(name, v)).map_err(|e| bad(&e))
        };
        put(TOPIC, Ok(topic))?;
        put(PUSH_TYPE, Ok(push_type))?;
        put(PRIORITY, Ok(priority))?;
        put(EXPIRATION, Ok(expiration))?;
        put(
            CONTENT_TYPE,
            Ok(HeaderValue::from_static("application/json")),
        )?;
        if let Some(id) = options.and_then(|o| o.collapse_id.as_deref()) {
            put(COLLAPSE_ID, HeaderValue::from_str(id))?;
        }
        let jwt = endpoint.token.as_ref().map(|s| s.token());
        if let Some(jwt) = &jwt {
            put(AUTHORIZATION, Ok(jwt.header()))?;
        }
        let mut req = Request::new(());
        *req.method_mut() = Method::POST;
        *req.uri_mut() = uri;
        *req.headers_mut() = headers;
        Ok((req, jwt))
    }
}

const TOPIC: HeaderName = HeaderName::from_static("apns-topic");
const PUSH_TYPE: HeaderName = HeaderName::from_static("apns-push-type");
const PRIORITY: HeaderName = HeaderName::from_static("apns-priority");
const EXPIRATION: HeaderName = HeaderName::from_static("apns-expiration");
const COLLAPSE_ID: HeaderName = HeaderName::from_static("apns-collapse-id");
const APNS_ID: HeaderName = HeaderName::from_static("apns-id");

/// `apns-expiration` for the default lifetime, made once a second rather
/// than once a request.
#[derive(Default)]
pub(super) struct Expiration(Mutex<Option<(u64, HeaderValue)>>);

impl Expiration {
    fn at(&self, at: u64) -> HeaderValue {
        let mut made = self.0.lock().unwrap_or_else(|p| p.into_inner());
        match &*made {
            Some((secs, value)) if *secs == at => value.clone(),
            _ => {
                let value = HeaderValue::from(at);
                *made = Some((at, value.clone()));
                value
            }
        }
    }
}

/// Apple's `{"reason": "..."}`, or an empty reason.
fn apple_reason(body: &Bytes) -> String {
    if body.is_empty() {
        // A 200's body: no error to build and drop.
        return String::new();
    }
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
