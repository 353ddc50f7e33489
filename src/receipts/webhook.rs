//! The webhook: events POSTed in batches to `receipts.webhook_url` (http,
//! or https verified against the web roots or `receipts.webhook_ca_file`)
//! as `{"events": [...]}`, signed, at least once: a batch leaves the queue
//! only when the receiver answers 2xx; otherwise it is sent again after a
//! backoff (100 ms doubling to 30 s). The queue is bounded
//! (`receipts.webhook_queue`): when full, the oldest events go (counted).
//!
//! Signature: `X-Pushbridge-Signature: sha256=<hex>`, the HMAC-SHA256 with
//! `receipts.webhook_secret` of `<X-Pushbridge-Timestamp>.<body>` (the
//! header's Unix seconds, a dot, the body's bytes).

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper_util::rt::TokioIo;
use serde_json::{json, Value};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::stats::Stats;

/// Events per POST.
const BATCH: usize = 100;
const FIRST_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(30);
/// Bounds one POST: connect, send, answer.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);

/// The queue in front of the sender; cheap to clone.
#[derive(Clone)]
pub struct Webhook {
    queue: Arc<Mutex<Queue>>,
    ready: Arc<Notify>,
    max: usize,
    stats: Arc<Stats>,
}

impl Webhook {
    pub fn new(max: usize, stats: Arc<Stats>) -> Webhook {
        Webhook {
            queue: Arc::default(),
            ready: Arc::default(),
            max,
            stats,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Queues events for sending, dropping the oldest beyond the bound.
    pub fn offer(&self, events: impl IntoIterator<Item = Value>) {
        let mut q = self.lock();
        for event in events {
            q.next += 1;
            let seq = q.next;
            q.events.push_back((seq, event));
        }
        let over = q.events.len().saturating_sub(self.max);
        if over > 0 {
            q.events.drain(..over);
            self.stats.webhook_dropped.add(over as u64);
        }
        self.stats.webhook_queued.set(q.events.len() as u64);
        drop(q);
        self.ready.notify_one();
    }

    /// Up to `BATCH` of the oldest events, and the last one's number.
    fn batch(&self) -> (Vec<Value>, u64) {
        let q = self.lock();
        let batch: Vec<Value> = q
            .events
            .iter()
            .take(BATCH)
            .map(|(_, e)| e.clone())
            .collect();
        let last = q
            .events
            .get(batch.len().saturating_sub(1))
            .map_or(0, |(s, _)| *s);
        (batch, last)
    }

    /// Removes the events up to number `last` (those dropped meanwhile are gone already).
    fn sent(&self, last: u64) {
        let mut q = self.lock();
        while q.events.front().is_some_and(|(s, _)| *s <= last) {
            q.events.pop_front();
        }
        self.stats.webhook_queued.set(q.events.len() as u64);
    }

    /// Sends until `stop`; what is queued then is lost (counted).
    pub(super) async fn run(self, target: Target, secret: String, stop: CancellationToken) {
        let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret.as_bytes());
        let mut backoff = FIRST_BACKOFF;
        loop {
            let (batch, last) = self.batch();
            if batch.is_empty() {
                tokio::select! {
                    _ = self.ready.notified() => continue,
                    _ = stop.cancelled() => return,
                }
            }
            let body = Bytes::from(json!({ "events": batch }).to_string());
            let sent = tokio::select! {
                sent = tokio::time::timeout(REQUEST_TIMEOUT, target.post(&key, body)) => {
                    sent.unwrap_or_else(|_| Err("no answer in 10 s".into()))
                }
                _ = stop.cancelled() => Err("shutting down".into()),
            };
            match sent {
                Ok(()) => {
                    self.sent(last);
                    self.stats.webhook_sent.add(batch.len() as u64);
                    backoff = FIRST_BACKOFF;
                }
                Err(e) if stop.is_cancelled() => {
                    let lost = std::mem::take(&mut self.lock().events).len() as u64;
                    self.stats.webhook_queued.set(0);
                    warn!(error = %e, lost, "webhook stopped; events not sent (webhook_dropped)");
                    self.stats.webhook_dropped.add(lost);
                    return;
                }
                Err(e) => {
                    self.stats.webhook_failed.inc();
                    warn!(error = %e, events = batch.len(), retry_in = ?backoff,
                        "webhook POST failed; sent again");
                    tokio::select! {
                        _ = tokio::time::sleep(backoff) => {}
                        _ = stop.cancelled() => {}
                    }
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                }
            }
        }
    }
}

/// Events numbered in the order offered, oldest first.
#[derive(Default)]
struct Queue {
    events: VecDeque<(u64, Value)>,
    next: u64,
}

/// The signature header's value for `body` sent at `timestamp`.
pub fn signature(key: &ring::hmac::Key, timestamp: u64, body: &[u8]) -> String {
    let mut ctx = ring::hmac::Context::with_key(key);
    ctx.update(format!("{timestamp}.").as_bytes());
    ctx.update(body);
    format!("sha256={}", super::hex(ctx.sign().as_ref()))
}

/// Where a webhook POST goes: the URL's parts, and TLS for `https://`.
pub(super) struct Target {
    url: String,
    uri: http::Uri,
    host: String,
    port: u16,
    tls: Option<tokio_rustls::TlsConnector>,
}

impl Target {
    /// `url` (checked by the settings), trusting `tls`'s CAs for https.
    pub(super) fn new(url: &str, tls: Arc<rustls::ClientConfig>) -> Result<Target, String> {
        let uri: http::Uri = url.parse().map_err(|e| format!("{url}: {e}"))?;
        let https = uri.scheme_str() == Some("https");
        let host = uri.host().ok_or_else(|| format!("{url}: no host"))?;
        let host = host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_owned();
        Ok(Target {
            url: url.to_owned(),
            port: uri.port_u16().unwrap_or(if https { 443 } else { 80 }),
            tls: https.then(|| tokio_rustls::TlsConnector::from(tls)),
            host,
            uri,
        })
    }

    /// One POST over a new connection; `Ok` on a 2xx answer.
    async fn post(&self, key: &ring::hmac::Key, body: Bytes) -> Result<(), String> {
        let (url, host, port) = (&self.url, &self.host, self.port);
        let tcp = tokio::net::TcpStream::connect((host.as_str(), port))
            .await
            .map_err(|e| format!("{url}: connect to {host}:{port}: {e}"))?;
        let timestamp = crate::utc::now();
        let path = self.uri.path_and_query().map_or("/", |p| p.as_str());
        let authority = self.uri.authority().map_or(host.as_str(), |a| a.as_str());
        let req = http::Request::post(path)
            .header(http::header::HOST, authority)
            .header(http::header::CONTENT_TYPE, "application/json")
            .header("x-pushbridge-timestamp", timestamp)
            .header("x-pushbridge-signature", signature(key, timestamp, &body))
            .body(Full::new(body))
            .map_err(|e| e.to_string())?;
        let answer = match &self.tls {
            None => send(tcp, req).await,
            Some(tls) => {
                let name = rustls_pki_types::ServerName::try_from(host.clone())
                    .map_err(|e| format!("{url}: {host}: {e}"))?;
                let stream = tls
                    .connect(name, tcp)
                    .await
                    .map_err(|e| format!("{url}: TLS: {e}"))?;
                send(stream, req).await
            }
        };
        let status = answer.map_err(|e| format!("{url}: {e}"))?;
        match status.is_success() {
            true => Ok(()),
            false => Err(format!("{url} answered {status}")),
        }
    }
}

/// Sends `req` over `io` (HTTP/1.1) and returns the answer's status.
async fn send<I>(io: I, req: http::Request<Full<Bytes>>) -> Result<http::StatusCode, String>
where
    I: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io))
        .await
        .map_err(|e| e.to_string())?;
    tokio::spawn(async move {
        if let Err(e) = conn.await {
            debug!(error = %e, "webhook connection ended");
        }
    });
    let answer = sender.send_request(req).await.map_err(|e| e.to_string())?;
    Ok(answer.status())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_queue_drops_the_oldest() {
        let stats = Arc::new(Stats::default());
        let hook = Webhook::new(3, stats.clone());
        hook.offer((0..5).map(|i| json!(i)));
        assert_eq!(hook.batch(), (vec![json!(2), json!(3), json!(4)], 5));
        assert_eq!(stats.webhook_dropped.get(), 2);
        // Sent while more came and the oldest of them were dropped: only
        // what was sent leaves.
        let (_, last) = hook.batch();
        hook.offer((5..8).map(|i| json!(i)));
        hook.sent(last);
        assert_eq!(hook.batch(), (vec![json!(5), json!(6), json!(7)], 8));
    }

    #[test]
    fn signature_is_hmac_of_timestamp_dot_body() {
        let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, b"Jefe");
        let sig = signature(&key, 1, b"x");
        let want = ring::hmac::sign(&key, b"1.x");
        let hex: String = want.as_ref().iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(sig, format!("sha256={hex}"));
    }
}
