//! Long-lived HTTP/2 connections per (app, environment), shared by all
//! concurrent requests: one, plus more (up to `apns.max_connections`) while
//! every open one uses all the streams the server allows; re-opened when
//! they die.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use h2::client::SendRequest;
use h2::{Ping, PingPong, Reason, RecvStream};
use http::uri::{self, Authority, PathAndQuery, Scheme};
use http::{Request, Response, Uri};
use rustls::ClientConfig;
use rustls_pki_types::ServerName;
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio_rustls::TlsConnector;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, Instrument, Span};

use super::ApnsError;

/// Apple's error bodies are tiny; anything bigger is not Apple.
const MAX_RESPONSE_BODY: usize = 64 * 1024;

/// A parsed `production_url`/`sandbox_url`.
#[derive(Debug, Clone)]
pub(crate) struct BaseUrl {
    pub host: String,
    pub port: u16,
    /// `host[:port]`, shared by every request's URI.
    authority: Authority,
    /// The URL's path without a trailing slash, then `/3/device/`; the
    /// device token follows.
    device_path: String,
}

impl BaseUrl {
    pub fn parse(key: &'static str, url: &str) -> Result<BaseUrl, ApnsError> {
        let bad = |problem: &str| ApnsError::Setting {
            key,
            problem: format!("{url}: {problem}"),
        };
        let uri: Uri = url.parse().map_err(|_| bad("not a URL"))?;
        if uri.scheme_str() != Some("https") {
            return Err(bad("must be an https:// URL"));
        }
        let host = uri.host().ok_or_else(|| bad("has no host"))?.to_owned();
        let authority = uri.authority().cloned().ok_or_else(|| bad("has no host"))?;
        Ok(BaseUrl {
            port: uri.port_u16().unwrap_or(443),
            host,
            authority,
            device_path: format!("{}/3/device/", uri.path().trim_end_matches('/')),
        })
    }

    /// `https://host[:port][/path]/3/device/<token>`, built from parts made
    /// once rather than parsed from a string per request.
    pub fn device_uri(&self, token: &str) -> Result<Uri, http::Error> {
        let mut path = BytesMut::with_capacity(self.device_path.len() + token.len());
        path.extend_from_slice(self.device_path.as_bytes());
        path.extend_from_slice(token.as_bytes());
        let mut parts = uri::Parts::default();
        parts.scheme = Some(Scheme::HTTPS);
        parts.authority = Some(self.authority.clone());
        parts.path_and_query = Some(PathAndQuery::from_maybe_shared(path.freeze())?);
        Ok(Uri::from_parts(parts)?)
    }
}

/// What a link's users and the task driving it share.
#[derive(Default)]
struct LinkState {
    /// Requests sent on it and not yet fully answered.
    in_flight: AtomicUsize,
    /// Set by the first answer: the server's SETTINGS precede it, so its
    /// stream limit is known from then on.
    settled: AtomicBool,
    /// The server's SETTINGS_MAX_CONCURRENT_STREAMS as the driving task
    /// last saw it (it may change at any time).
    max_streams: AtomicUsize,
    /// The connection has ended; requests on it fail.
    closed: AtomicBool,
}

/// One open HTTP/2 connection and how busy it is.
#[derive(Clone)]
struct Link {
    sender: SendRequest<Bytes>,
    state: Arc<LinkState>,
}

/// Why a request failed, and whether the server can have acted on it.
enum Failure {
    /// Never reached the server, or refused unprocessed (REFUSED_STREAM):
    /// safe to send again.
    Unsent(h2::Error),
    Sent(h2::Error),
    /// The request could not be made again for a second attempt.
    Unbuilt,
}

impl Link {
    fn load(&self) -> usize {
        self.state.in_flight.load(Ordering::Relaxed)
    }

    fn is_closed(&self) -> bool {
        self.state.closed.load(Ordering::Relaxed)
    }

    /// Whether every stream the server allows is taken. Before the first
    /// answer the limit is unknown: requests wait on this connection rather
    /// than open others in a burst the server may refuse.
    fn saturated(&self) -> bool {
        if !self.state.settled.load(Ordering::Relaxed) {
            return false;
        }
        let limit = self.state.max_streams.load(Ordering::Relaxed);
        self.load() >= limit.max(1)
    }

    fn is(&self, other: &Link) -> bool {
        Arc::ptr_eq(&self.state, &other.state)
    }

    fn lease(&self) -> (Link, Lease) {
        self.state.in_flight.fetch_add(1, Ordering::Relaxed);
        (self.clone(), Lease(Arc::clone(&self.state)))
    }

    /// Sends one request with its whole body and waits for the headers of
    /// the answer. h2 queues a request beyond the server's stream limit
    /// until a stream frees.
    async fn request(
        &self,
        build: &mut impl FnMut() -> Option<Request<()>>,
        body: &Bytes,
    ) -> Result<Response<RecvStream>, Failure> {
        let mut sender = self.sender.clone();
        std::future::poll_fn(|cx| sender.poll_ready(cx))
            .await
            .map_err(Failure::Unsent)?;
        // Taken only now, so that a request waiting for a stream is small.
        let req = build().ok_or(Failure::Unbuilt)?;
        let (answer, mut stream) = sender
            .send_request(req, body.is_empty())
            .map_err(Failure::Unsent)?;
        if !body.is_empty() {
            stream
                .send_data(body.clone(), true)
                .map_err(Failure::Sent)?;
        }
        answer.await.map_err(|e| match e.reason() {
            Some(Reason::REFUSED_STREAM) if e.is_reset() => Failure::Unsent(e),
            _ => Failure::Sent(e),
        })
    }
}

/// A request's share of a link; dropped when its answer is read (or lost).
struct Lease(Arc<LinkState>);

impl Drop for Lease {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Where and how to connect for one (app, environment).
pub(crate) struct Connection {
    url: BaseUrl,
    tls: TlsConnector,
    span: Span,
    drivers: mpsc::UnboundedSender<Driver>,
    shutdown: CancellationToken,
    timeout: Duration,
    max_links: usize,
    links: tokio::sync::Mutex<Vec<Link>>,
}

/// A connection's I/O, handed to the sender's task to drive (see `sender::run`).
pub(crate) type Driver = Pin<Box<dyn Future<Output = ()> + Send>>;

/// How requests reach Apple, the same for every (app, environment).
#[derive(Clone)]
pub(crate) struct Transport {
    /// Where new connections' drivers go.
    pub drivers: mpsc::UnboundedSender<Driver>,
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
            drivers: transport.drivers,
            shutdown: transport.shutdown,
            timeout: transport.timeout,
            max_links: transport.max_connections.max(1),
            links: tokio::sync::Mutex::new(Vec::new()),
        }
    }

    pub fn device_uri(&self, token: &str) -> Result<Uri, http::Error> {
        self.url.device_uri(token)
    }

    pub fn span(&self) -> &Span {
        &self.span
    }

    /// Sends the request `build` gives, with `body`, and reads the whole
    /// answer, within the request timeout. A request the server cannot have
    /// acted on (the connection had died, or the stream was refused) is
    /// sent once more (`build` is asked again), on a fresh connection if
    /// the old one is gone.
    pub async fn send(
        &self,
        mut build: impl FnMut() -> Option<Request<()>>,
        body: Bytes,
    ) -> Result<Response<Bytes>, ApnsError> {
        let work = async {
            for attempt in 0..2 {
                let (link, _lease) = self.sender().await?;
                match link.request(&mut build, &body).await {
                    Ok(resp) => {
                        link.state.settled.store(true, Ordering::Relaxed);
                        return read_body(resp).await;
                    }
                    Err(Failure::Unsent(e)) if attempt == 0 => {
                        debug!("request not taken, sending again: {e}");
                        if !e.is_reset() || e.is_go_away() {
                            self.forget(&link).await;
                        }
                    }
                    Err(Failure::Unsent(e) | Failure::Sent(e)) => {
                        // A reset stream leaves the connection usable.
                        if !e.is_reset() || e.is_go_away() {
                            self.forget(&link).await;
                        }
                        return Err(ApnsError::Request(e.to_string()));
                    }
                    Err(Failure::Unbuilt) => {
                        return Err(ApnsError::Request("request could not be made again".into()))
                    }
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
    /// (h2 queues the request until a stream frees).
    async fn sender(&self) -> Result<(Link, Lease), ApnsError> {
        let mut links = self.links.lock().await;
        links.retain(|l| !l.is_closed());
        let least = |links: &[Link]| links.iter().min_by_key(|l| l.load()).cloned();
        if let Some(link) = least(&links).filter(|l| !l.saturated()) {
            return Ok(link.lease());
        }
        if links.len() < self.max_links {
            // Boxed: the handshake's large future would otherwise be part
            // of every request's.
            let link = Box::pin(self.connect().instrument(self.span.clone())).await?;
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
            .retain(|l| !l.is(failed) && !l.is_closed());
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
        let (sender, mut conn) = h2::client::Builder::new()
            // One stream until the server's SETTINGS say more: a burst
            // sent before them may be refused (Apple starts low, too).
            .initial_max_send_streams(1)
            .handshake::<_, Bytes>(tls)
            .await
            .map_err(|e| fail(format!("HTTP/2 handshake: {e}")))?;
        info!("connected");
        let state = Arc::new(LinkState::default());
        let pings = conn.ping_pong();
        let seen = Arc::clone(&state);
        let driven = std::future::poll_fn(move |cx| {
            let r = Pin::new(&mut conn).poll(cx);
            seen.max_streams
                .store(conn.max_concurrent_send_streams(), Ordering::Relaxed);
            r
        });
        let shutdown = self.shutdown.clone();
        let ended = Arc::clone(&state);
        let driver = async move {
            tokio::select! {
                r = driven => match r {
                    Ok(()) => info!("connection closed"),
                    Err(e) => info!("connection lost: {e}"),
                },
                _ = keep_alive(pings) => info!("connection lost: no answer to a PING"),
                _ = shutdown.cancelled() => debug!("connection closed for shutdown"),
            }
            // Dropping the connection fails the requests still on it
            // now, not at their timeout.
            ended.closed.store(true, Ordering::Relaxed);
        };
        // The sender's task is gone only when nothing is sent any more.
        let _ = self
            .drivers
            .send(Box::pin(driver.instrument(self.span.clone())));
        Ok(Link { sender, state })
    }
}

/// Pings every minute, idle or not; returns when a PING goes unanswered
/// for 20 s (a connection a middlebox dropped silently).
async fn keep_alive(pings: Option<PingPong>) {
    let Some(mut pings) = pings else {
        return std::future::pending().await;
    };
    loop {
        tokio::time::sleep(Duration::from_secs(60)).await;
        let answered = tokio::time::timeout(Duration::from_secs(20), pings.ping(Ping::opaque()));
        if !matches!(answered.await, Ok(Ok(_))) {
            return;
        }
    }
}

/// The answer's headers and its whole body (Apple's error bodies are tiny).
async fn read_body(resp: Response<RecvStream>) -> Result<Response<Bytes>, ApnsError> {
    let (parts, mut body) = resp.into_parts();
    let mut read = BytesMut::new();
    while let Some(chunk) = body.data().await {
        let chunk = chunk.map_err(|e| ApnsError::Request(format!("reading the answer: {e}")))?;
        let _ = body.flow_control().release_capacity(chunk.len());
        if read.len() + chunk.len() > MAX_RESPONSE_BODY {
            return Err(ApnsError::Request(format!(
                "reading the answer: body over {MAX_RESPONSE_BODY} bytes"
            )));
        }
        read.extend_from_slice(&chunk);
    }
    Ok(Response::from_parts(parts, read.freeze()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base_urls() {
        let u = BaseUrl::parse("production_url", "https://api.push.apple.com").unwrap();
        assert_eq!((u.host.as_str(), u.port), ("api.push.apple.com", 443));
        let u = BaseUrl::parse("sandbox_url", "https://localhost:8443/").unwrap();
        assert_eq!((u.host.as_str(), u.port), ("localhost", 8443));
        assert_eq!(
            u.device_uri("ab12").unwrap().to_string(),
            "https://localhost:8443/3/device/ab12"
        );
        let u = BaseUrl::parse("sandbox_url", "https://example.net/apple/").unwrap();
        assert_eq!(
            u.device_uri("ab12").unwrap().to_string(),
            "https://example.net/apple/3/device/ab12"
        );
        assert!(BaseUrl::parse("sandbox_url", "http://x").is_err());
        assert!(BaseUrl::parse("sandbox_url", "not a url").is_err());
    }
}
