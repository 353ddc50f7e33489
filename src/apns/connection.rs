//! Long-lived HTTP/2 connections per (app, environment), shared by all
//! concurrent requests: one, plus more (up to `apns.max_connections`) while
//! every open one uses all the streams the server allows; re-opened when
//! they die.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use http_body_util::{BodyExt, Full, Limited};
use hyper::client::conn::http2::SendRequest;
use hyper_util::rt::{TokioIo, TokioTimer};
use rustls::ClientConfig;
use rustls_pki_types::ServerName;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, Instrument, Span};

use super::ApnsError;

/// Apple's error bodies are tiny; anything bigger is not Apple.
const MAX_RESPONSE_BODY: usize = 64 * 1024;

/// A parsed `production_url`/`sandbox_url`.
#[derive(Debug, Clone)]
pub(crate) struct BaseUrl {
    /// `https://host[:port]` without a trailing slash; requests append `/3/device/...`.
    pub base: String,
    pub host: String,
    pub port: u16,
}

impl BaseUrl {
    pub fn parse(key: &'static str, url: &str) -> Result<BaseUrl, ApnsError> {
        let bad = |problem: &str| ApnsError::Setting {
            key,
            problem: format!("{url}: {problem}"),
        };
        let uri: http::Uri = url.parse().map_err(|_| bad("not a URL"))?;
        if uri.scheme_str() != Some("https") {
            return Err(bad("must be an https:// URL"));
        }
        let host = uri.host().ok_or_else(|| bad("has no host"))?.to_owned();
        Ok(BaseUrl {
            base: url.trim_end_matches('/').to_owned(),
            port: uri.port_u16().unwrap_or(443),
            host,
        })
    }
}

/// Runs hyper's background tasks on the sender's tracker, so shutdown waits for them.
#[derive(Clone)]
struct TrackerExec(TaskTracker);

impl<F> hyper::rt::Executor<F> for TrackerExec
where
    F: std::future::Future + Send + 'static,
    F::Output: Send + 'static,
{
    fn execute(&self, fut: F) {
        self.0.spawn(fut);
    }
}

/// hyper's handle on one connection; it knows the server's settings.
type Driver = hyper::client::conn::http2::Connection<
    TokioIo<tokio_rustls::client::TlsStream<TcpStream>>,
    Full<Bytes>,
    TrackerExec,
>;

/// One open HTTP/2 connection and how busy it is.
#[derive(Clone)]
struct Link {
    sender: SendRequest<Full<Bytes>>,
    /// Requests sent on it and not yet fully answered.
    in_flight: Arc<AtomicUsize>,
    /// Set by the first answer: the server's SETTINGS precede it, so its
    /// stream limit is known from then on.
    settled: Arc<AtomicBool>,
    /// Shared with the task driving it, to read the server's current
    /// SETTINGS_MAX_CONCURRENT_STREAMS, which may change at any time;
    /// `None` once the connection has ended.
    driver: Arc<Mutex<Option<Pin<Box<Driver>>>>>,
}

impl Link {
    fn load(&self) -> usize {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// Whether every stream the server allows is taken. Before the first
    /// answer the limit is unknown: requests wait on this connection rather
    /// than open others in a burst the server may refuse.
    fn saturated(&self) -> bool {
        if !self.settled.load(Ordering::Relaxed) {
            return false;
        }
        let limit = lock(&self.driver)
            .as_ref()
            .map_or(0, |d| d.current_max_send_streams());
        self.load() >= limit.max(1)
    }

    fn is(&self, other: &Link) -> bool {
        Arc::ptr_eq(&self.in_flight, &other.in_flight)
    }

    fn lease(&self) -> (Link, SendRequest<Full<Bytes>>, Lease) {
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        let lease = Lease(Arc::clone(&self.in_flight));
        (self.clone(), self.sender.clone(), lease)
    }
}

/// A request's share of a link; dropped when its answer is read (or lost).
struct Lease(Arc<AtomicUsize>);

impl Drop for Lease {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Where and how to connect for one (app, environment).
pub(crate) struct Connection {
    url: BaseUrl,
    tls: TlsConnector,
    span: Span,
    tracker: TaskTracker,
    shutdown: CancellationToken,
    timeout: Duration,
    max_links: usize,
    links: tokio::sync::Mutex<Vec<Link>>,
}

/// How requests reach Apple, the same for every (app, environment).
#[derive(Clone)]
pub(crate) struct Transport {
    pub tracker: TaskTracker,
    pub shutdown: CancellationToken,
    pub timeout: Duration,
    /// Most connections per (app, environment).
    pub max_connections: usize,
}

impl Connection {
    pub fn new(url: BaseUrl, tls: Arc<ClientConfig>, span: Span, transport: Transport) -> Self {
        Connection {
            url,
            tls: TlsConnector::from(tls),
            span,
            tracker: transport.tracker,
            shutdown: transport.shutdown,
            timeout: transport.timeout,
            max_links: transport.max_connections.max(1),
            links: tokio::sync::Mutex::new(Vec::new()),
        }
    }

    pub fn base(&self) -> &str {
        &self.url.base
    }

    pub fn span(&self) -> &Span {
        &self.span
    }

    /// Sends `req` and reads the whole answer, within the request timeout.
    /// A request the connection never took (it had died) is sent once more
    /// on a fresh connection: Apple cannot have seen it.
    pub async fn send(&self, req: Request<Full<Bytes>>) -> Result<Response<Bytes>, ApnsError> {
        let work = async {
            let mut req = req;
            for attempt in 0..2 {
                let (link, mut sender, _lease) = self.sender().await?;
                match sender.try_send_request(req).await {
                    Ok(resp) => {
                        link.settled.store(true, Ordering::Relaxed);
                        let (parts, body) = resp.into_parts();
                        let body = Limited::new(body, MAX_RESPONSE_BODY)
                            .collect()
                            .await
                            .map_err(|e| ApnsError::Request(format!("reading the answer: {e}")))?
                            .to_bytes();
                        return Ok(Response::from_parts(parts, body));
                    }
                    Err(mut e) => match e.take_message() {
                        Some(unsent) if attempt == 0 => {
                            debug!("connection was gone before sending: {}", e.error());
                            self.forget(&link).await;
                            req = unsent;
                        }
                        _ => {
                            self.forget(&link).await;
                            return Err(ApnsError::Request(e.into_error().to_string()));
                        }
                    },
                }
            }
            Err(ApnsError::Request("connection lost twice".into()))
        };
        tokio::time::timeout(self.timeout, work)
            .await
            .map_err(|_| ApnsError::Request(format!("no answer within {:?}", self.timeout)))?
    }

    /// The least busy live connection with a free stream; a new one when
    /// all are saturated and there is room for another; else the least busy
    /// (hyper queues the request until a stream frees).
    async fn sender(&self) -> Result<(Link, SendRequest<Full<Bytes>>, Lease), ApnsError> {
        let mut links = self.links.lock().await;
        links.retain(|l| !l.sender.is_closed());
        let least = |links: &[Link]| links.iter().min_by_key(|l| l.load()).cloned();
        if let Some(link) = least(&links).filter(|l| !l.saturated()) {
            return Ok(link.lease());
        }
        if links.len() < self.max_links {
            let link = self.connect().instrument(self.span.clone()).await?;
            links.push(link.clone());
            if links.len() > 1 {
                debug!(
                    connections = links.len(),
                    "all connections busy; opened another"
                );
            }
            return Ok(link.lease());
        }
        let link = least(&links).expect("max_links is at least 1");
        Ok(link.lease())
    }

    /// Stops using a connection a request failed on (it may be going away
    /// without having closed yet), so the next request opens a new one.
    /// Requests still on it finish there.
    async fn forget(&self, failed: &Link) {
        self.links
            .lock()
            .await
            .retain(|l| !l.is(failed) && !l.sender.is_closed());
    }

    async fn connect(&self) -> Result<Link, ApnsError> {
        let url = &self.url;
        let fail = |problem: String| ApnsError::Connect {
            host: format!("{}:{}", url.host, url.port),
            problem,
        };
        let tcp = TcpStream::connect((url.host.as_str(), url.port))
            .await
            .map_err(|e| fail(format!("TCP connect: {e}")))?;
        let _ = tcp.set_nodelay(true);
        let name = ServerName::try_from(url.host.clone())
            .map_err(|e| fail(format!("bad server name: {e}")))?;
        let tls = self
            .tls
            .connect(name, tcp)
            .await
            .map_err(|e| fail(format!("TLS handshake: {e}")))?;
        if tls.get_ref().1.alpn_protocol() != Some(b"h2") {
            return Err(fail("server did not agree to HTTP/2 (ALPN h2)".into()));
        }
        let (sender, conn) =
            hyper::client::conn::http2::Builder::new(TrackerExec(self.tracker.clone()))
                .timer(TokioTimer::new())
                // One stream until the server's SETTINGS say more: a burst
                // sent before them may be refused (Apple starts low, too).
                .initial_max_send_streams(1)
                .keep_alive_interval(Duration::from_secs(60))
                .keep_alive_timeout(Duration::from_secs(20))
                .keep_alive_while_idle(true)
                .handshake(TokioIo::new(tls))
                .await
                .map_err(|e| fail(format!("HTTP/2 handshake: {e}")))?;
        info!("connected");
        let driver = Arc::new(Mutex::new(Some(Box::pin(conn))));
        let driven = Arc::clone(&driver);
        let conn = std::future::poll_fn(move |cx| {
            let mut slot = lock(&driven);
            let Some(conn) = slot.as_mut() else {
                return std::task::Poll::Ready(Ok(()));
            };
            let r = conn.as_mut().poll(cx);
            if r.is_ready() {
                // Dropping hyper's half closes the senders (`is_closed`).
                *slot = None;
            }
            r
        });
        let shutdown = self.shutdown.clone();
        let ended = Arc::clone(&driver);
        self.tracker.spawn(
            async move {
                tokio::select! {
                    r = conn => match r {
                        Ok(()) => info!("connection closed"),
                        Err(e) => info!("connection lost: {e}"),
                    },
                    _ = shutdown.cancelled() => debug!("connection closed for shutdown"),
                }
                // Requests still waiting on it fail now, not at their timeout.
                *lock(&ended) = None;
            }
            .instrument(self.span.clone()),
        );
        Ok(Link {
            sender,
            in_flight: Arc::default(),
            settled: Arc::default(),
            driver,
        })
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base_urls() {
        let u = BaseUrl::parse("production_url", "https://api.push.apple.com").unwrap();
        assert_eq!((u.host.as_str(), u.port), ("api.push.apple.com", 443));
        let u = BaseUrl::parse("sandbox_url", "https://localhost:8443/").unwrap();
        assert_eq!((u.base.as_str(), u.port), ("https://localhost:8443", 8443));
        assert!(BaseUrl::parse("sandbox_url", "http://x").is_err());
        assert!(BaseUrl::parse("sandbox_url", "not a url").is_err());
    }
}
