//! What ops scrape: liveness, readiness, counters.

use std::fmt::Write;
use std::time::Duration;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::Json;
use serde_json::{Map, Value};

use super::HttpState;
use crate::apns::LoadedApp;
use crate::registry::UserStore;
use crate::router::Environment;
use crate::stats::HistogramSnapshot;
use crate::stats::{Bucket, FAILURE_REASONS};
use crate::utc::rfc3339;

pub(super) async fn healthz() -> &'static str {
    "ok\n"
}

/// A ping slower than this counts as unreachable: probes have short timeouts.
const PING_TIMEOUT: Duration = Duration::from_secs(2);

/// Ready: the registry answers within 2 s, every listener is serving, and
/// APNs has credentials for at least one app when config.json lists apps.
/// The body has one `name: ok|reason` line per check.
pub(super) async fn readyz(State(state): State<HttpState>) -> impl IntoResponse {
    let mut checks: Vec<(String, Result<(), String>)> = Vec::new();
    let described = state.registry.describe();
    let registry = match tokio::time::timeout(PING_TIMEOUT, state.registry.ping()).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(e)) => Err(format!("{described} unreachable: {e}")),
        Err(_) => Err(format!(
            "{described} unreachable: no answer within {PING_TIMEOUT:?}"
        )),
    };
    if registry.is_err() {
        state.stats.registry_errors.inc();
    }
    checks.push(("registry".into(), registry));
    for (name, up) in state.stats.listeners.states() {
        let check = if up {
            Ok(())
        } else {
            Err("not serving".into())
        };
        checks.push((name.into(), check));
    }
    checks.push(("apns".into(), state.dispatcher.apns.ready()));
    let ready = checks.iter().all(|(_, c)| c.is_ok());
    let mut body: String = checks
        .iter()
        .map(|(name, c)| match c {
            Ok(()) => format!("{name}: ok\n"),
            Err(reason) => format!("{name}: {reason}\n"),
        })
        .collect();
    // Details, not a check: dead letters need a look, not a restart.
    if let crate::intake::Intake::Durable(w) = &state.intake {
        let dead = state.stats.intake_dead.get();
        let _ = writeln!(
            body,
            "intake: ok, {dead} entries dead-lettered since start (stream {})",
            w.dead_letters()
        );
    }
    let status = match ready {
        true => StatusCode::OK,
        false => StatusCode::SERVICE_UNAVAILABLE,
    };
    (status, body)
}

pub(super) async fn stats(State(state): State<HttpState>) -> Json<Value> {
    let stats = &state.stats;
    let totals: Map<String, Value> = stats
        .samples()
        .into_iter()
        .map(|s| (s.name.to_string(), s.value.into()))
        .collect();
    // Counted up to now, not up to the sampler's last tick.
    let now = crate::utc::now();
    stats.series.observe(now, stats.tally());
    let series = stats.series.snapshot(now);
    let buckets = |b: &[Bucket]| -> Value { b.iter().map(bucket).collect() };
    Json(serde_json::json!({
        "totals": totals,
        "connections": {
            "now": stats.mqtt_connections.now(),
            "peak": stats.mqtt_connections.peak(),
        },
        "per_minute": buckets(&series.per_minute),
        "per_hour": buckets(&series.per_hour),
        "per_day": buckets(&series.per_day),
    }))
}

fn bucket(b: &Bucket) -> Value {
    let failed: Map<String, Value> = FAILURE_REASONS
        .iter()
        .zip(b.failed)
        .map(|(reason, n)| (reason.to_string(), n.into()))
        .collect();
    serde_json::json!({
        "start": b.start,
        "accepted": b.accepted,
        "mqtt": b.mqtt,
        "apns": b.apns,
        "mqtt_written": b.mqtt_written,
        "mqtt_acked": b.mqtt_acked,
        "apns_sent": b.apns_sent,
        "arrival_rate": b.arrival_rate(),
        "failed": failed,
    })
}

/// The current minute's, hour's and day's arrival rate (see
/// `Bucket::arrival_rate`); a window where nothing was sent has none.
fn arrival_rates(out: &mut String, stats: &crate::stats::Stats) {
    let now = crate::utc::now();
    stats.series.observe(now, stats.tally());
    let s = stats.series.snapshot(now);
    let _ = writeln!(
        out,
        "# HELP pushbridge_arrival_rate Of the messages written to device sessions and sent to \
         Apple in the current UTC minute, hour or day: the share acknowledged by the device \
         (PUBACK) or answered 200 by Apple."
    );
    let _ = writeln!(out, "# TYPE pushbridge_arrival_rate gauge");
    for (window, buckets) in [
        ("minute", &s.per_minute),
        ("hour", &s.per_hour),
        ("day", &s.per_day),
    ] {
        if let Some(rate) = buckets.last().and_then(Bucket::arrival_rate) {
            let _ = writeln!(out, "pushbridge_arrival_rate{{window=\"{window}\"}} {rate}");
        }
    }
}

/// Prometheus text exposition format, version 0.0.4.
pub(super) async fn metrics(State(state): State<HttpState>) -> impl IntoResponse {
    let mut out = String::new();
    for s in state.stats.samples() {
        let _ = writeln!(out, "# HELP pushbridge_{}_total {}", s.name, s.help);
        let _ = writeln!(out, "# TYPE pushbridge_{}_total counter", s.name);
        let _ = writeln!(out, "pushbridge_{}_total {}", s.name, s.value);
    }
    let connections = &state.stats.mqtt_connections;
    let dispatcher = &state.dispatcher;
    let gauges = [
        (
            "mqtt_connections",
            "MQTT connections open now.",
            connections.now(),
        ),
        (
            "mqtt_connections_peak",
            "Most MQTT connections open at once since start.",
            connections.peak(),
        ),
        (
            "mqtt_sessions",
            "MQTT sessions kept: connected, or persistent and not yet expired.",
            dispatcher
                .broker
                .embedded()
                .map_or(0, |b| b.session_count() as u64),
        ),
        (
            "intake_queued",
            "Accepted pushes waiting in the intake queue for the dispatcher.",
            state.intake_queued() as u64,
        ),
        (
            "backends_held",
            "Backend connections held back by intake.max_wait_ms, waiting for a turn to read.",
            state.backends_held() as u64,
        ),
        (
            "apns_queued",
            "Notifications waiting in the APNs sender's queue.",
            dispatcher.apns.queued() as u64,
        ),
        (
            "webhook_queued",
            "Events waiting for the webhook (at most receipts.webhook_queue).",
            state.stats.webhook_queued.now(),
        ),
    ];
    for (name, help, value) in gauges {
        let _ = writeln!(out, "# HELP pushbridge_{name} {help}");
        let _ = writeln!(out, "# TYPE pushbridge_{name} gauge");
        let _ = writeln!(out, "pushbridge_{name} {value}");
    }
    arrival_rates(&mut out, &state.stats);
    let name = "pushbridge_apns_request_duration_seconds";
    let _ = writeln!(
        out,
        "# HELP {name} Seconds from sending an APNs request to reading Apple's answer."
    );
    let _ = writeln!(out, "# TYPE {name} histogram");
    histogram(&mut out, name, "", &state.stats.apns_latency.snapshot());
    let name = "pushbridge_stage_seconds";
    let _ = writeln!(
        out,
        "# HELP {name} Seconds a push waits in each stage: intake (accepted to taken by the dispatcher), route (a batch's routing), session (queued in a session to written to its socket), ack (written to the device's PUBACK, sampled)."
    );
    let _ = writeln!(out, "# TYPE {name} histogram");
    let stages = state
        .stats
        .stages
        .all()
        .map(|(stage, h)| (stage, h.snapshot()));
    for (stage, h) in &stages {
        histogram(&mut out, name, &format!("stage=\"{stage}\","), h);
    }
    let name = "pushbridge_stage_max_seconds";
    let _ = writeln!(
        out,
        "# HELP {name} The longest wait seen in each stage since start."
    );
    let _ = writeln!(out, "# TYPE {name} gauge");
    for (stage, h) in &stages {
        let _ = writeln!(out, "{name}{{stage=\"{stage}\"}} {}", h.max_secs);
    }

    let now = crate::utc::now() as i64;
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
    let now = crate::utc::now() as i64;
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
    env.name()
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

/// One histogram in the text format; `labels` ends with a comma when not empty.
fn histogram(out: &mut String, name: &str, labels: &str, h: &HistogramSnapshot) {
    for (le, n) in &h.buckets {
        let _ = writeln!(out, "{name}_bucket{{{labels}le=\"{le}\"}} {n}");
    }
    let _ = writeln!(out, "{name}_bucket{{{labels}le=\"+Inf\"}} {}", h.count);
    let bare = match labels.trim_end_matches(',') {
        "" => String::new(),
        l => format!("{{{l}}}"),
    };
    let _ = writeln!(out, "{name}_sum{bare} {}", h.sum_secs);
    let _ = writeln!(out, "{name}_count{bare} {}", h.count);
}
