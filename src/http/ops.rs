//! What ops scrape: liveness, readiness, counters.

use std::fmt::Write;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::Json;
use serde_json::{Map, Value};

use super::{rfc3339, HttpState};
use crate::apns::LoadedApp;
use crate::registry::UserStore;
use crate::router::Environment;

pub(super) async fn healthz() -> &'static str {
    "ok\n"
}

pub(super) async fn readyz(State(state): State<HttpState>) -> impl IntoResponse {
    match state.registry.ping().await {
        Ok(()) => (StatusCode::OK, "ready\n".to_string()),
        Err(e) => (StatusCode::SERVICE_UNAVAILABLE, format!("registry: {e}\n")),
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
    let now = crate::auth::now() as i64;
    let _ = writeln!(
        out,
        "# HELP pushbridge_apns_cert_days_left Whole days until an APNs client certificate expires."
    );
    let _ = writeln!(out, "# TYPE pushbridge_apns_cert_days_left gauge");
    for app in state.dispatcher.apns.loaded() {
        if let Some(days) = days_left(&app, now) {
            let _ = writeln!(
                out,
                "pushbridge_apns_cert_days_left{{app=\"{}\",environment=\"{}\"}} {days}",
                label(&app.app),
                env_name(app.env)
            );
        }
    }
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], out)
}

/// The loaded APNs credentials and when certificates expire, so ops renew
/// them before Apple refuses the connection.
pub(super) async fn apps(State(state): State<HttpState>) -> Json<Value> {
    let now = crate::auth::now() as i64;
    let apps: Vec<Value> = state
        .dispatcher
        .apns
        .loaded()
        .iter()
        .map(|a| {
            serde_json::json!({
                "app": a.app,
                "environment": env_name(a.env),
                "kind": if a.cert_expires.is_some() { "certificate" } else { "token" },
                "expires": a.cert_expires.map(rfc3339),
                "days_left": days_left(a, now),
            })
        })
        .collect();
    Json(Value::Array(apps))
}

/// Whole days until the certificate expires (negative once it has).
fn days_left(app: &LoadedApp, now: i64) -> Option<i64> {
    app.cert_expires.map(|at| (at - now).div_euclid(86400))
}

pub(super) fn env_name(env: Environment) -> &'static str {
    match env {
        Environment::Sandbox => "sandbox",
        Environment::Production => "production",
    }
}

/// A Prometheus label value: backslash, quote and newline escaped.
fn label(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

pub(super) async fn openapi() -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "application/json")],
        include_str!("openapi.json"),
    )
}
