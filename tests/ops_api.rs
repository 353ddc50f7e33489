//! The ops side of the HTTP API over real HTTP: loaded APNs credentials,
//! connection gauges and per-minute series, the APNs latency histogram,
//! presence, per-notification APNs overrides and readiness.

#[path = "support/apns.rs"]
mod apns_server;
#[macro_use]
mod support;

use apns_server::{ApnsServer, ClientCert, TestCredentials};
use serde_json::json;
use support::http::{get, request};
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
