//! The ops side of the HTTP API over real HTTP: loaded APNs credentials,
//! connection gauges and per-minute series, the APNs latency histogram,
//! presence, per-notification APNs overrides and readiness.

#[path = "support/apns.rs"]
mod apns_server;
#[macro_use]
mod support;

use apns_server::{ApnsServer, ClientCert, TestCredentials};
use rmpv::Value as Mp;
use serde_json::{json, Value};
use support::http::{get, post_json, request};
use support::mqtt::Device;
use support::proxy::Backend;
use support::redis::RedisServer;
use support::server;

#[tokio::test]
async fn apps_list_credentials_with_expiry() {
    let apple = ApnsServer::start().await;
    let creds = TestCredentials::new();
    let dev = creds.pem("dev.pem", &ClientCert::expiring_in("cert dev", 40), None);
    let (key, _) = creds.p8("AuthKey_K1.p8");
    let config = creds.config(&json!({
        "com.example.cert": {"develop": dev},
        "com.example.token": {"key": key, "key_id": "K1", "team_id": "T1"},
    }));
    let mut settings = server::settings(None);
    settings.apns.config = config;
    settings.apns.sandbox_url = apple.url();
    settings.apns.production_url = apple.url();
    settings.apns.ca_file = Some(apple.ca_path());
    settings.http.token = Some("t".into());
    let server = server::start(settings).await;
    let addr = server.http_addr;

    assert_eq!(get(addr, "/v1/apps").await.status, 401);
    let apps = request(addr, "GET", "/v1/apps", Some("t"), None)
        .await
        .json();
    let apps = apps.as_array().unwrap();
    assert_eq!(apps.len(), 3, "{apps:?}");
    let cert = &apps[0];
    assert_eq!(
        (&cert["app"], &cert["environment"], &cert["kind"]),
        (
            &json!("com.example.cert"),
            &json!("sandbox"),
            &json!("certificate")
        )
    );
    // Valid until midnight UTC 40 days from today: 39 whole days and some.
    assert_eq!(cert["days_left"], 39, "{cert}");
    let expires = cert["expires"].as_str().unwrap();
    assert!(expires.ends_with("T00:00:00Z"), "{expires}");
    for (token, env) in apps[1..].iter().zip(["sandbox", "production"]) {
        assert_eq!(
            token,
            &json!({"app": "com.example.token", "environment": env, "kind": "token",
                    "expires": null, "days_left": null})
        );
    }

    let metrics = request(addr, "GET", "/metrics", Some("t"), None)
        .await
        .text();
    assert!(
        metrics.lines().any(|l| {
            l
            == "pushbridge_apns_cert_days_left{app=\"com.example.cert\",environment=\"sandbox\"} 39"
        }),
        "{metrics}"
    );
    assert!(!metrics.contains("app=\"com.example.token\""), "{metrics}");
    server.stop().await;
}

/// The sum of one field over a series' buckets.
fn total(stats: &Value, series: &str, field: &str) -> u64 {
    stats[series]
        .as_array()
        .unwrap_or_else(|| panic!("{series} missing: {stats}"))
        .iter()
        .map(|b| b[field].as_u64().unwrap())
        .sum()
}

#[tokio::test]
async fn connections_and_series_count_what_happened() {
    let server = server::start(server::settings(None)).await;
    let addr = server.http_addr;
    let stats = || async move { get(addr, "/v1/stats").await.json() };

    let mut a = Device::connect(server.mqtt_addr, "a", true).await;
    a.subscribe("push/user/1").await;
    let b = Device::connect(server.mqtt_addr, "b", true).await;
    let s = stats().await;
    assert_eq!(s["connections"], json!({"now": 2, "peak": 2}));

    // 3 over HTTP, 2 over the proxy: 5 accepted, 5 MQTT publishes.
    let http = json!({"notifications": [
        {"user": 1, "data": {"n": 1}}, {"user": 2, "data": {}}, {"group": 3, "data": {}},
    ]});
    assert_eq!(post_json(addr, "/v1/push", &http).await.status, 200);
    let mut backend = Backend::connect(server.proxy_addr).await;
    for n in [2, 3] {
        assert_eq!(backend.push(2, Mp::from(1), &json!({ "n": n })).await, 0);
    }
    for n in 1..=3 {
        assert_eq!(a.next_json().await, json!({ "n": n }));
    }
    b.disconnect().await;
    let stats_now = stats;
    support::wait_until(|| async move {
        let s = stats_now().await;
        s["connections"]["now"] == 1 && total(&s, "per_minute", "mqtt") == 5
    })
    .await;

    let s = stats().await;
    assert_eq!(s["connections"], json!({"now": 1, "peak": 2}));
    let (minutes, hours, days) = (
        s["per_minute"].as_array().unwrap(),
        s["per_hour"].as_array().unwrap(),
        s["per_day"].as_array().unwrap(),
    );
    assert_eq!((minutes.len(), hours.len(), days.len()), (60, 48, 30));
    for series in ["per_minute", "per_hour", "per_day"] {
        assert_eq!(total(&s, series, "accepted"), 5, "{series}");
        assert_eq!(total(&s, series, "mqtt"), 5, "{series}");
        assert_eq!(total(&s, series, "apns"), 0, "{series}");
    }
    assert_eq!(s["totals"]["mqtt_published"], 5);
    let today = days.last().unwrap();
    assert_eq!(today["start"].as_u64().unwrap() % 86400, 0);
    assert_eq!(today["failed"]["registry"], 0);
    assert_eq!(today["failed"].as_object().unwrap().len(), 8, "{today}");
    let starts: Vec<u64> = minutes
        .iter()
        .map(|b| b["start"].as_u64().unwrap())
        .collect();
    assert!(starts.windows(2).all(|w| w[1] - w[0] == 60), "{starts:?}");

    let metrics = get(addr, "/metrics").await.text();
    for line in [
        "pushbridge_mqtt_connections 1",
        "pushbridge_mqtt_connections_peak 2",
        "pushbridge_intake_queued 0",
        "pushbridge_apns_queued 0",
        "# TYPE pushbridge_mqtt_connections gauge",
    ] {
        assert!(metrics.lines().any(|l| l == line), "{line}: {metrics}");
    }
    a.disconnect().await;
    server.stop().await;
}

#[tokio::test]
async fn registry_errors_are_counted() {
    let redis = RedisServer::start();
    let server = server::start(server::settings(Some(&redis.url))).await;
    let addr = server.http_addr;
    drop(redis);
    let reply = get(addr, "/v1/users/1").await;
    assert_eq!(reply.status, 503, "{}", reply.text());
    assert!(reply.json()["error"].as_str().unwrap().contains("registry"));
    assert!(server.stats.registry_errors.get() >= 1);
    let stats = get(addr, "/v1/stats").await.json();
    assert!(stats["totals"]["registry_errors"].as_u64().unwrap() >= 1);
    server.stop().await;
}

/// A production APNs and token credentials for `APP`.
async fn apple(settings: &mut pushbridge::settings::Settings) -> (ApnsServer, TestCredentials) {
    let apple = ApnsServer::start().await;
    let creds = TestCredentials::new();
    let (key, _) = creds.p8("AuthKey_K1.p8");
    settings.apns.config =
        creds.config(&json!({APP: {"key": key, "key_id": "K1", "team_id": "T1"}}));
    settings.apns.production_url = apple.url();
    settings.apns.sandbox_url = apple.url();
    settings.apns.ca_file = Some(apple.ca_path());
    (apple, creds)
}

const APP: &str = "com.example.app";

async fn put_ios_user(addr: std::net::SocketAddr, uid: u32, token: &str) {
    let body = json!({"token": token, "ident": APP, "version": "produce"}).to_string();
    let path = format!("/v1/users/{uid}");
    let reply = request(addr, "PUT", &path, None, Some(body.as_bytes())).await;
    assert_eq!(reply.status, 204, "{}", reply.text());
}

#[tokio::test]
async fn apns_requests_show_in_the_latency_histogram_and_series() {
    let mut settings = server::settings(None);
    let (apple, _creds) = apple(&mut settings).await;
    let server = server::start(settings).await;
    let addr = server.http_addr;
    put_ios_user(addr, 7, "aa07").await;
    let push = json!({"notifications": [{"user": 7, "data": {"alert": "hi"}}]});
    assert_eq!(post_json(addr, "/v1/push", &push).await.status, 200);
    apple.next_request(support::WAIT).await;
    let stats = server.stats.clone();
    support::wait_until(|| {
        let stats = stats.clone();
        async move { stats.apns_delivered.get() == 1 }
    })
    .await;

    let metrics = get(addr, "/metrics").await.text();
    let name = "pushbridge_apns_request_duration_seconds";
    for line in [
        format!("# TYPE {name} histogram"),
        format!("{name}_bucket{{le=\"+Inf\"}} 1"),
        format!("{name}_bucket{{le=\"10\"}} 1"),
        format!("{name}_count 1"),
    ] {
        assert!(metrics.lines().any(|l| l == line), "{line}: {metrics}");
    }
    assert!(metrics.contains(&format!("{name}_sum ")), "{metrics}");
    let s = get(addr, "/v1/stats").await.json();
    assert_eq!(total(&s, "per_minute", "apns"), 1);
    assert_eq!(total(&s, "per_day", "accepted"), 1);
    server.stop().await;
}

/// `GET /v1/users/{uid}/presence`, polled until `want` holds.
async fn presence_until(
    addr: std::net::SocketAddr,
    uid: &str,
    want: impl Fn(&Value) -> bool,
) -> Value {
    let path = format!("/v1/users/{uid}/presence");
    let (path, want) = (&path, &want);
    support::wait_until(|| async move { want(&get(addr, path).await.json()) }).await;
    get(addr, path).await.json()
}

#[tokio::test]
async fn presence_follows_token_connections() {
    use pushbridge::auth::jwt;
    use pushbridge::utc::now;
    let mut settings = server::settings(None);
    settings.auth.mode = pushbridge::settings::AuthMode::Jwt;
    settings.auth.jwt_secret = Some("s".into());
    let server = server::start(settings).await;
    let addr = server.http_addr;

    let offline =
        json!({"user": "42", "connected": false, "since": null, "client_ids": [], "focus": false});
    assert_eq!(get(addr, "/v1/users/42/presence").await.json(), offline);
    let token = jwt::mint_hs256("s", "42", &[], now() + 3600);
    let phone = Device::connect_as(server.mqtt_addr, "phone", "42", &token).await;
    let p = presence_until(addr, "42", |p| p["connected"] == true).await;
    assert_eq!(p["client_ids"], json!(["phone"]));
    let since = p["since"].as_str().unwrap();
    assert!(since.len() == 20 && since.ends_with('Z'), "{since}");
    let tablet = Device::connect_as(server.mqtt_addr, "tablet", "42", &token).await;
    let p = presence_until(addr, "42", |p| {
        p["client_ids"].as_array().unwrap().len() == 2
    })
    .await;
    assert_eq!(p["client_ids"], json!(["phone", "tablet"]));

    phone.disconnect().await;
    let p = presence_until(addr, "42", |p| p["client_ids"] == json!(["tablet"])).await;
    assert_eq!(p["connected"], true);
    tablet.disconnect().await;
    presence_until(addr, "42", |p| *p == offline).await;
    server.stop().await;
}

#[tokio::test]
async fn presence_without_tokens_and_bad_ids() {
    let server = server::start(server::settings(None)).await;
    support::register(&server, "5").await;
    let addr = server.http_addr;
    let mut app = Device::connect(server.mqtt_addr, "app-5", true).await;
    app.subscribe("push/user/5").await;
    let p = presence_until(addr, "5", |p| p["connected"] == true).await;
    assert_eq!(p["client_ids"], json!(["app-5"]));
    assert_eq!(p["focus"], false);
    app.publish("push/app/status", br#"{"user_id": 5, "focus": true}"#)
        .await;
    presence_until(addr, "5", |p| p["focus"] == true).await;

    let unknown = get(addr, "/v1/users/nobody/presence").await;
    assert_eq!(unknown.status, 200);
    assert_eq!(unknown.json()["connected"], false);
    let bad = get(addr, "/v1/users/a%2Bb/presence").await;
    assert_eq!(bad.status, 400);
    assert!(
        bad.json()["error"].as_str().unwrap().contains("bad id"),
        "{}",
        bad.text()
    );

    app.disconnect().await;
    presence_until(addr, "5", |p| {
        p["connected"] == false && p["focus"] == false
    })
    .await;
    server.stop().await;
}

#[tokio::test]
async fn readyz_lists_each_check() {
    let server = server::start(server::settings(None)).await;
    let ready = get(server.http_addr, "/readyz").await;
    assert_eq!(ready.status, 200, "{}", ready.text());
    assert_eq!(
        ready.text(),
        "registry: ok\nmqtt.listen: ok\nhttp.listen: ok\nproxy.listen: ok\napns: ok\n"
    );
    server.stop().await;

    // config.json names an app, but its certificate is missing: not ready.
    let creds = TestCredentials::new();
    let mut settings = server::settings(None);
    settings.apns.config = creds.config(&json!({APP: {"produce": "missing.pem"}}));
    let server = server::start(settings).await;
    let ready = get(server.http_addr, "/readyz").await;
    assert_eq!(ready.status, 503, "{}", ready.text());
    let text = ready.text();
    assert!(text.contains("registry: ok\n"), "{text}");
    assert!(
        text.contains("apns: ")
            && text.contains("config.json lists 1 app(s) but none has usable credentials"),
        "{text}"
    );
    server.stop().await;
}
