//! The HTTP side: `POST /v1/push` for backends that prefer JSON, the device
//! registry so backends need no Redis code, and what ops scrape
//! (`/metrics`, `/healthz`, `/readyz`, `/v1/stats`, `/openapi.json`).

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
use crate::push::Id;
use crate::registry::Registry;
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
    Intake(#[from] crate::intake::IntakeError),
}

impl IntoResponse for HttpError {
    fn into_response(self) -> Response {
        let status = match self {
            HttpError::BadRequest(_) => StatusCode::BAD_REQUEST,
            HttpError::NotFound => StatusCode::NOT_FOUND,
            HttpError::Unauthorized => StatusCode::UNAUTHORIZED,
            HttpError::Registry(_) | HttpError::Intake(_) => StatusCode::SERVICE_UNAVAILABLE,
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
    /// Durable intake: pushes go to the stream, not straight to delivery.
    pub stream: Option<StreamWriter>,
    pub shutdown: CancellationToken,
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
        .route(
            "/v1/groups/{gid}/ios-members/{uid}",
            put(users::add_member).delete(users::remove_member),
        )
        .route("/v1/stats", get(ops::stats))
        .route("/metrics", get(ops::metrics))
        .route("/openapi.json", get(ops::openapi))
        .route_layer(middleware::from_fn_with_state(state.clone(), require_token));
    Router::new()
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
