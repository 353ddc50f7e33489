//! The HTTP side: `POST /v1/push` for backends that prefer JSON, the device
//! registry so backends need no Redis code, and what ops scrape
//! (`/metrics`, `/healthz`, `/readyz`, `/v1/stats`, `/openapi.json`), and
//! the operators' dashboard at `/`.

mod apns_options;
mod dashboard;
mod ops;
mod push;
mod users;

use std::sync::Arc;

use axum::extract::{Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Json, Router};
use serde_json::json;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::dispatch::Dispatcher;
use crate::intake::StreamWriter;
use crate::push::{Id, UserRecord};
use crate::registry::{Registry, UserStore};
use crate::stats::Stats;

#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    #[error("{0}")]
    BadRequest(String),
    #[error("not found")]
    NotFound,
    #[error("missing or wrong bearer token")]
    Unauthorized,
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
    pub token: Option<Arc<str>>,
    pub max_notifications: usize,
    /// The in-memory intake queue, to report its depth (`None` with durable
    /// intake); weak, so it does not keep the dispatcher running after the
    /// proxy stops.
    pub queue: Option<tokio::sync::mpsc::WeakSender<crate::push::Push>>,
    /// Durable intake: pushes go to the stream, not straight to delivery.
    pub stream: Option<StreamWriter>,
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
        self.queue
            .as_ref()
            .and_then(|q| q.upgrade())
            .map_or(0, |tx| tx.max_capacity() - tx.capacity())
    }
}

/// Parses an id from a path segment or a JSON string.
fn id(text: &str) -> Result<Id, HttpError> {
    Id::parse(text).ok_or_else(|| {
        HttpError::BadRequest(format!(
            "bad id {text:?}: empty, or has '/', '+', '#' or control characters"
        ))
    })
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
        .route_layer(middleware::from_fn_with_state(state.clone(), require_token));
    Router::new()
        .route("/", get(dashboard::page))
        .route("/healthz", get(ops::healthz))
        .route("/readyz", get(ops::readyz))
        .merge(api)
        .with_state(state)
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
        if given != Some(token.as_ref()) {
            return HttpError::Unauthorized.into_response();
        }
    }
    next.run(req).await
}

/// Serves the API until `shutdown`.
pub async fn serve(listener: TcpListener, state: HttpState, shutdown: CancellationToken) {
    let app = routes(state);
    if let Err(e) = axum::serve(listener, app)
        .with_graceful_shutdown(shutdown.cancelled_owned())
        .await
    {
        tracing::error!(error = %e, "http server failed");
    }
}
