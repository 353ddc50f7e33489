//! One long-lived HTTP/2 connection per (app, environment), shared by all
//! concurrent requests and re-opened when it dies.

use std::sync::Arc;
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

/// Where and how to connect for one (app, environment).
pub(crate) struct Connection {
    url: BaseUrl,
    tls: TlsConnector,
    span: Span,
    tracker: TaskTracker,
    shutdown: CancellationToken,
    timeout: Duration,
    slot: tokio::sync::Mutex<Option<SendRequest<Full<Bytes>>>>,
}

impl Connection {
    pub fn new(
        url: BaseUrl,
        tls: Arc<ClientConfig>,
        span: Span,
        tracker: TaskTracker,
        shutdown: CancellationToken,
        timeout: Duration,
    ) -> Self {
        Connection {
            url,
            tls: TlsConnector::from(tls),
            span,
            tracker,
            shutdown,
            timeout,
            slot: tokio::sync::Mutex::new(None),
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
                let mut sender = self.sender().await?;
                match sender.try_send_request(req).await {
                    Ok(resp) => {
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
                            self.forget().await;
                            req = unsent;
                        }
                        _ => {
                            self.forget().await;
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

    /// The live connection, opening one if there is none or it has closed.
    async fn sender(&self) -> Result<SendRequest<Full<Bytes>>, ApnsError> {
        let mut slot = self.slot.lock().await;
        if let Some(s) = slot.as_ref().filter(|s| !s.is_closed()) {
            return Ok(s.clone());
        }
        let s = self.connect().instrument(self.span.clone()).await?;
        *slot = Some(s.clone());
        Ok(s)
    }

    /// Drops a connection that failed, so the next request opens a new one.
    async fn forget(&self) {
        let mut slot = self.slot.lock().await;
        if slot.as_ref().is_some_and(|s| s.is_closed()) {
            *slot = None;
        }
    }

    async fn connect(&self) -> Result<SendRequest<Full<Bytes>>, ApnsError> {
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
                .keep_alive_interval(Duration::from_secs(60))
                .keep_alive_timeout(Duration::from_secs(20))
                .keep_alive_while_idle(true)
                .handshake(TokioIo::new(tls))
                .await
                .map_err(|e| fail(format!("HTTP/2 handshake: {e}")))?;
        info!("connected");
        let shutdown = self.shutdown.clone();
        self.tracker.spawn(
            async move {
                tokio::select! {
                    r = conn => match r {
                        Ok(()) => info!("connection closed"),
                        Err(e) => info!("connection lost: {e}"),
                    },
                    _ = shutdown.cancelled() => debug!("connection closed for shutdown"),
                }
            }
            .instrument(self.span.clone()),
        );
        Ok(sender)
    }
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
