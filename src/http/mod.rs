//! The HTTP side: `POST /v1/push` for backends that prefer JSON, the device
//! registry so backends need no Redis code, and what ops scrape
//! (`/metrics`, `/healthz`, `/readyz`, `/v1/stats`, `/openapi.json`), and
//! the operators' dashboard at `/`.

mod apns_options;
mod dashboard;
mod guard;
mod ops;
mod push;
mod receipts;
mod users;

pub use guard::ApiToken;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::http::StatusCode;
use axum::middleware;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Json, Router};
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
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
    /// A 404 that says what is missing and why.
    #[error("{0}")]
    Missing(String),
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
    #[error("{0}")]
    Receipts(#[from] crate::receipts::ReceiptsError),
}

impl IntoResponse for HttpError {
    fn into_response(self) -> Response {
        let status = match self {
            HttpError::BadRequest(_) => StatusCode::BAD_REQUEST,
            HttpError::NotFound | HttpError::Missing(_) => StatusCode::NOT_FOUND,
            HttpError::Unauthorized => StatusCode::UNAUTHORIZED,
            HttpError::UnsupportedMediaType(_) => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            HttpError::MisdirectedHost(_) => StatusCode::MISDIRECTED_REQUEST,
            HttpError::Forbidden(_) => StatusCode::FORBIDDEN,
            HttpError::Registry(_) | HttpError::Intake(_) | HttpError::Receipts(_) => {
                StatusCode::SERVICE_UNAVAILABLE
            }
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
            Intake::Memory(queue) => queue.len(),
            Intake::Durable(_) => 0,
        }
    }

    /// Backend connections held back by the intake's time bound.
    fn backends_held(&self) -> usize {
        match &self.intake {
            Intake::Memory(queue) => queue.held(),
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
        .route("/v1/users/{id}/pushes", get(users::pushes))
        .route("/v1/pushes/{id}", get(receipts::get))
        .route(
            "/v1/groups/{gid}/ios-members/{uid}",
            put(users::add_member).delete(users::remove_member),
        )
        .route("/v1/stats", get(ops::stats))
        .route("/v1/apps", get(ops::apps))
        .route("/metrics", get(ops::metrics))
        .route("/openapi.json", get(ops::openapi))
        // The token first: no body is read for a client without one.
        .route_layer(middleware::from_fn_with_state(
            state.clone(),
            guard::read_body,
        ))
        .route_layer(middleware::from_fn_with_state(
            state.clone(),
            guard::require_token,
        ));
    Router::new()
        .route("/", get(dashboard::page))
        .route("/healthz", get(ops::healthz))
        .route("/readyz", get(ops::readyz))
        .route_layer(middleware::from_fn_with_state(
            state.clone(),
            guard::read_body,
        ))
        .merge(api)
        .layer(middleware::from_fn_with_state(
            state.clone(),
            guard::browser_guard,
        ))
        .with_state(state)
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
