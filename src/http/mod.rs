//! The HTTP side: `POST /v1/push` for backends that prefer JSON, the device
//! registry so backends need no Redis code, and what ops scrape
//! (`/metrics`, `/healthz`, `/readyz`, `/v1/stats`, `/openapi.json`), and
//! the operators' dashboard at `/`.

mod apns_options;
mod dashboard;
mod ops;
mod push;
mod users;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Json, Router};
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use ring::hmac;
use serde_json::json;
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use crate::dispatch::Dispatcher;
use crate::intake::Intake;
use crate::lifecycle::Phase;
use crate::net::{self, Acceptor, BindError};
use crate::push::{Id, UserRecord};
use crate::registry::{Registry, UserStore};
use crate::settings::HttpSettings;
use crate::stats::Stats;

#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    #[error("{0}")]
    BadRequest(String),
    #[error("not found")]
    NotFound,
    #[error("missing or wrong bearer token")]
    Unauthorized,
    #[error("{0}")]
    UnsupportedMediaType(String),
    #[error("{0}")]
    MisdirectedHost(String),
    #[error("{0}")]
    Forbidden(String),
    #[error("registry unavailable: {0}")]
    Registry(#[from] crate::registry::RegistryError),
    #[error("{0}")]
    Unavailable(String),
    #[error("{0}")]
    Intake(#[from] crate::intake::IntakeError),
}

impl IntoResponse for HttpError {
    fn into_response(self) -> Response {
        let status = match self {
            HttpError::BadRequest(_) => StatusCode::BAD_REQUEST,
            HttpError::NotFound => StatusCode::NOT_FOUND,
            HttpError::Unauthorized => StatusCode::UNAUTHORIZED,
            HttpError::UnsupportedMediaType(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            HttpError::MisdirectedHost(_) => StatusCode::MISDIRECTED_REQUEST,
            HttpError::Forbidden(_) => StatusCode::FORBIDDEN,
            HttpError::Registry(_) | HttpError::Intake(_) => StatusCode::SERVICE_UNAVAILABLE,
            HttpError::Unavailable(_) => StatusCode::NOT_IMPLEMENTED,
        };
        (status, Json(json!({ "error": self.to_string() }))).into_response()
    }
}

/// What the handlers share.
#[derive(Clone)]
pub struct HttpState {
    pub dispatcher: Arc<Dispatcher>,
    pub registry: Registry,
    pub stats: Arc<Stats>,
    pub token: Option<ApiToken>,
    /// `http.allowed_hosts`, lower case.
    pub allowed_hosts: Arc<[String]>,
    /// A request body must arrive this soon after its head
    /// (`http.header_timeout_secs`).
    pub body_timeout: Duration,
    pub max_notifications: usize,
    /// With durable intake pushes go to the stream, not straight to delivery;
    /// in memory, its depth is reported.
    pub intake: Intake,
    /// Cancelled when ingress stops.
    pub shutdown: CancellationToken,
}

impl HttpState {
    /// A registry call failed: counted, and answered 503.
    fn registry_failed(&self, e: crate::registry::RegistryError) -> HttpError {
        self.stats.registry_errors.inc();
        HttpError::Registry(e)
    }

    /// One user's record; `None` when the registry has none.
    async fn user(&self, uid: &Id) -> Result<Option<UserRecord>, HttpError> {
        let mut found = self
            .registry
            .users(std::slice::from_ref(uid))
            .await
            .map_err(|e| self.registry_failed(e))?;
        Ok(found.pop().flatten())
    }

    /// Pushes waiting in the in-memory intake queue.
    fn intake_queued(&self) -> usize {
        match &self.intake {
            Intake::Memory(tx) => tx.max_capacity() - tx.capacity(),
            Intake::Durable(_) => 0,
        }
    }
}

/// Parses an id from a path segment or a JSON string.
fn id(text: &str) -> Result<Id, HttpError> {
    Id::parse(text).ok_or_else(|| HttpError::BadRequest(format!("bad id {text:?}: {}", Id::RULE)))
}

fn routes(state: HttpState) -> Router {
    let api = Router::new()
        .route("/v1/push", post(push::push))
        .route(
            "/v1/users/{id}",
            get(users::get).put(users::put).delete(users::delete),
        )
        .route("/v1/users/{id}/presence", get(users::presence))
        .route(
            "/v1/groups/{gid}/ios-members/{uid}",
            put(users::add_member).delete(users::remove_member),
        )
        .route("/v1/stats", get(ops::stats))
        .route("/v1/apps", get(ops::apps))
        .route("/metrics", get(ops::metrics))
        .route("/openapi.json", get(ops::openapi))
        // The token first: no body is read for a client without one.
        .route_layer(middleware::from_fn_with_state(state.clone(), read_body))
        .route_layer(middleware::from_fn_with_state(state.clone(), require_token));
    Router::new()
        .route("/", get(dashboard::page))
        .route("/healthz", get(ops::healthz))
        .route("/readyz", get(ops::readyz))
        .route_layer(middleware::from_fn_with_state(state.clone(), read_body))
        .merge(api)
        .layer(middleware::from_fn_with_state(state.clone(), browser_guard))
        .with_state(state)
}

/// Largest request body (axum's default for its extractors, which still apply).
const BODY_LIMIT: usize = 2 << 20;

/// Reads the whole body before the handler runs, within `body_timeout`, so
/// a client trickling a body cannot hold a connection (and its permit).
async fn read_body(State(state): State<HttpState>, req: Request, next: Next) -> Response {
    let (parts, body) = req.into_parts();
    let read = tokio::time::timeout(state.body_timeout, axum::body::to_bytes(body, BODY_LIMIT));
    let bytes = match read.await {
        Ok(Ok(bytes)) => bytes,
        // Over the limit (a broken connection gets no answer anyway).
        Ok(Err(e)) => {
            let error = json!({ "error": format!("request body over {BODY_LIMIT} bytes: {e}") });
            let answer = (
                StatusCode::PAYLOAD_TOO_LARGE,
                [(header::CONNECTION, "close")],
                Json(error),
            );
            return answer.into_response();
        }
        Err(_) => {
            let error = json!({ "error": "request body not received in time" });
            let answer = (
                StatusCode::REQUEST_TIMEOUT,
                [(header::CONNECTION, "close")],
                Json(error),
            );
            return answer.into_response();
        }
    };
    next.run(Request::from_parts(parts, axum::body::Body::from(bytes)))
        .await
}

/// `http.token`, kept as an HMAC tag under a key made at start, so that a
/// guess is compared in constant time whatever its length.
#[derive(Clone)]
pub struct ApiToken {
    key: hmac::Key,
    tag: Arc<[u8]>,
}

impl ApiToken {
    pub fn new(token: &str) -> ApiToken {
        let key = hmac::Key::generate(hmac::HMAC_SHA256, &ring::rand::SystemRandom::new())
            .expect("system randomness");
        let tag = hmac::sign(&key, token.as_bytes()).as_ref().into();
        ApiToken { key, tag }
    }

    fn matches(&self, given: &str) -> bool {
        hmac::verify(&self.key, given.as_bytes(), &self.tag).is_ok()
    }
}

async fn require_token(State(state): State<HttpState>, req: Request, next: Next) -> Response {
    if let Some(token) = &state.token {
        let given = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| {
                v.strip_prefix("Bearer ")
                    .or_else(|| v.strip_prefix("bearer "))
            });
        if !given.is_some_and(|g| token.matches(g)) {
            return HttpError::Unauthorized.into_response();
        }
    }
    next.run(req).await
}

/// What a web page on another site could make a browser send: refused, so
/// that an API without a token is not open to every site its user visits.
/// A `Host` must be an IP address (a page whose origin is an IP address was
/// served from that address, so it cannot be a rebinding), `localhost`, or
/// in `http.allowed_hosts`; a state-changing request whose `Origin` is not
/// this server is refused; a body must be JSON (a cross-site form can only
/// send `text/plain`, form or multipart bodies without a preflight).
async fn browser_guard(State(state): State<HttpState>, req: Request, next: Next) -> Response {
    match check_browser(&state.allowed_hosts, &req) {
        Ok(()) => next.run(req).await,
        Err(e) => e.into_response(),
    }
}

fn check_browser(allowed: &[String], req: &Request) -> Result<(), HttpError> {
    let headers = req.headers();
    let host = headers
        .get(header::HOST)
        .map(|h| h.to_str().unwrap_or("\u{fffd}"))
        .or_else(|| req.uri().authority().map(|a| a.as_str()));
    if let Some(host) = host {
        if !host_allowed(allowed, host) {
            return Err(HttpError::MisdirectedHost(format!(
                "Host {host:?} is not served here: use an IP address or localhost, \
                 or list the name in http.allowed_hosts"
            )));
        }
    }
    let safe = matches!(
        *req.method(),
        axum::http::Method::GET | axum::http::Method::HEAD | axum::http::Method::OPTIONS
    );
    if let (false, Some(origin)) = (safe, headers.get(header::ORIGIN)) {
        let origin = origin.to_str().unwrap_or("null");
        let authority = origin.split_once("://").map(|(_, a)| a);
        let same = match (authority, host) {
            (Some(a), Some(h)) if a.eq_ignore_ascii_case(h) => true,
            (Some(a), _) => {
                let name = split_port(a).0;
                allowed.iter().any(|n| n.eq_ignore_ascii_case(name))
            }
            (None, _) => false,
        };
        if !same {
            return Err(HttpError::Forbidden(format!(
                "cross-origin request refused: Origin {origin:?} is not this server"
            )));
        }
    }
    let has_body = headers.contains_key(header::TRANSFER_ENCODING)
        || headers
            .get(header::CONTENT_LENGTH)
            .is_some_and(|l| l.as_bytes() != b"0");
    if has_body {
        let json = headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split(';').next())
            .is_some_and(|m| m.trim().eq_ignore_ascii_case("application/json"));
        if !json {
            return Err(HttpError::UnsupportedMediaType(
                "request bodies must be Content-Type: application/json".into(),
            ));
        }
    }
    Ok(())
}

/// `host[:port]` or `[v6][:port]` → (host, port).
fn split_port(authority: &str) -> (&str, Option<&str>) {
    if let Some(rest) = authority.strip_prefix('[') {
        return match rest.split_once(']') {
            Some((ip, port)) => (ip, port.strip_prefix(':')),
            None => (authority, None),
        };
    }
    match authority.rsplit_once(':') {
        Some((h, p)) => (h, Some(p)),
        None => (authority, None),
    }
}

fn host_allowed(allowed: &[String], host: &str) -> bool {
    let name = split_port(host).0;
    let name = name.strip_suffix('.').unwrap_or(name);
    name.parse::<std::net::IpAddr>().is_ok()
        || name.eq_ignore_ascii_case("localhost")
        || allowed.iter().any(|n| n.eq_ignore_ascii_case(name))
}

/// What the API serves from: the parts below it.
pub struct Parts {
    pub dispatcher: Arc<Dispatcher>,
    pub registry: Registry,
    pub stats: Arc<Stats>,
    pub intake: Intake,
}

/// Binds `http.listen` and serves the API on `ingress` until it stops; each
/// connection then finishes the request it is in. At most
/// `http.max_connections` at once, each request head within
/// `http.header_timeout_secs`. Returns the bound address.
pub async fn start(
    settings: &HttpSettings,
    parts: Parts,
    ingress: &Phase,
) -> Result<SocketAddr, BindError> {
    let listener = net::bind("http.listen", settings.listen).await?;
    let addr = listener.local_addr().expect("bound");
    let header_timeout = Duration::from_secs(settings.header_timeout_secs);
    let state = HttpState {
        dispatcher: parts.dispatcher,
        registry: parts.registry,
        token: settings.token.as_deref().map(ApiToken::new),
        body_timeout: header_timeout,
        allowed_hosts: settings
            .allowed_hosts
            .iter()
            .map(|h| h.to_ascii_lowercase())
            .collect(),
        max_notifications: settings.max_notifications,
        intake: parts.intake,
        shutdown: ingress.token(),
        stats: parts.stats,
    };
    let acceptor = Acceptor {
        key: "http.listen",
        listener,
        slots: Arc::new(Semaphore::new(settings.max_connections)),
        up: state.stats.listeners.up("http.listen"),
    };
    let app = routes(state);
    let shutdown = ingress.token();
    ingress.spawn(acceptor.run(
        || None,
        ingress.clone(),
        move |stream, peer, slot| {
            let service = TowerToHyperService::new(app.clone());
            let shutdown = shutdown.clone();
            async move {
                let mut builder = hyper::server::conn::http1::Builder::new();
                builder
                    .timer(TokioTimer::new())
                    .header_read_timeout(header_timeout);
                let conn = builder.serve_connection(TokioIo::new(stream), service);
                tokio::pin!(conn);
                let done = tokio::select! {
                    r = conn.as_mut() => r,
                    _ = shutdown.cancelled() => {
                        conn.as_mut().graceful_shutdown();
                        conn.await
                    }
                };
                if let Err(e) = done {
                    tracing::debug!(%peer, error = %e, "http connection ended");
                }
                drop(slot);
            }
        },
    ));
    Ok(addr)
}
