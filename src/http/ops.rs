//! What ops scrape: liveness, readiness, counters.

use std::fmt::Write;
use std::time::Duration;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::Json;
use serde_json::{Map, Value};

use super::HttpState;
use crate::registry::UserStore;

pub(super) async fn healthz() -> &'static str {
    "ok\n"
}

/// A ping slower than this counts as unreachable: probes have short timeouts.
const PING_TIMEOUT: Duration = Duration::from_secs(2);

pub(super) async fn readyz(State(state): State<HttpState>) -> impl IntoResponse {
    match tokio::time::timeout(PING_TIMEOUT, state.registry.ping()).await {
        Ok(Ok(())) => (StatusCode::OK, "ready\n".to_string()),
        Ok(Err(e)) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!(
                "registry ({}) unreachable: {e}\n",
                state.registry.describe()
            ),
        ),
        Err(_) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!(
                "registry ({}) unreachable: no answer within {PING_TIMEOUT:?}\n",
                state.registry.describe()
            ),
        ),
    }
}

pub(super) async fn stats(State(state): State<HttpState>) -> Json<Value> {
    let totals: Map<String, Value> = state
        .stats
        .samples()
        .into_iter()
        .map(|s| (s.name.to_string(), s.value.into()))
        .collect();
    Json(serde_json::json!({ "totals": totals }))
}

/// Prometheus text exposition format, version 0.0.4.
pub(super) async fn metrics(State(state): State<HttpState>) -> impl IntoResponse {
    let mut out = String::new();
    for s in state.stats.samples() {
        let _ = writeln!(out, "# HELP pushbridge_{}_total {}", s.name, s.help);
        let _ = writeln!(out, "# TYPE pushbridge_{}_total counter", s.name);
        let _ = writeln!(out, "pushbridge_{}_total {}", s.name, s.value);
    }
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], out)
}

pub(super) async fn openapi() -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "application/json")],
        include_str!("openapi.json"),
    )
}
