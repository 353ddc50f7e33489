//! A device written against a real MQTT library in a real browser: MQTT.js
//! (from npm, pinned in tests/browser/package-lock.json) in headless
//! Chromium, over WebSocket and over WebSocket inside TLS, with a JWT. It
//! receives a push sent through the proxy, reports focus on the status
//! topic, and is refused another user's topic.
//!
//! Chromium trusts the test server's key through
//! `--ignore-certificate-errors-spki-list` with that key's hash: any other
//! certificate is still refused, unlike with `--ignore-certificate-errors`.

mod support;

use std::net::SocketAddr;
use std::path::PathBuf;

use axum::http::header::CONTENT_TYPE;
use axum::response::Html;
use bytes::Bytes;
use pushbridge::auth::jwt;
use pushbridge::settings::AuthMode;
use pushbridge::utc::now;
use rmpv::Value as Mp;
use serde_json::{json, Value};
use support::browser::Browser;
use support::pki::{pki, Pki};
use support::proxy::Backend;
use support::{server, wait_for_focus};

const SECRET: &str = "browser-secret";
const PAGE: &str = include_str!("browser/mqtt.html");

/// MQTT.js's browser bundle, installed by `npm ci` in tests/browser.
fn bundle() -> Bytes {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/browser/node_modules/mqtt/dist/mqtt.min.js");
    match std::fs::read(&path) {
        Ok(b) => b.into(),
        Err(e) => panic!(
            "{}: {e}: MQTT.js is not installed; run scripts/test.sh (it runs npm ci in tests/browser)",
            path.display()
        ),
    }
}

/// Serves the page and the bundle over plain HTTP on loopback, so the page
/// loads MQTT.js from the same origin with no CSP in the way.
async fn serve_page() -> SocketAddr {
    let js = bundle();
    let app = axum::Router::new()
        .route("/", axum::routing::get(|| async { Html(PAGE) }))
        .route(
            "/mqtt.min.js",
            axum::routing::get(move || {
                let js = js.clone();
                async move { ([(CONTENT_TYPE, "text/javascript")], js) }
            }),
        );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    addr
}

/// A JWT server with both WebSocket listeners, sharing one certificate.
async fn start_server(pki: &Pki) -> pushbridge::Server {
    let mut settings = server::settings(None);
    settings.auth.mode = AuthMode::Jwt;
    settings.auth.jwt_secret = Some(SECRET.into());
    settings.mqtt.ws_listen = Some("127.0.0.1:0".parse().unwrap());
    settings.mqtt.wss_listen = Some("127.0.0.1:0".parse().unwrap());
    settings.mqtt.tls_cert = Some(pki.cert.clone());
    settings.mqtt.tls_key = Some(pki.key.clone());
    server::start(settings).await
}

/// The page as user `user` at `url`: connected, subscribed, focus reported,
/// then a push through the proxy reaches it.
async fn device_in_browser(scheme: &str, user: &str) {
    let dir = tempfile::tempdir().unwrap();
    let pki = pki(dir.path(), "browser");
    let server = start_server(&pki).await;
    // Focus is kept only in an existing record.
    support::register(&server, user).await;
    let page = serve_page().await;
    let trust = format!("--ignore-certificate-errors-spki-list={}", pki.spki_sha256);
    let browser = Browser::start_with(&[trust]).await;
    let mqtt = match scheme {
        "ws" => server.mqtt_ws_addr.unwrap(),
        _ => server.mqtt_wss_addr.unwrap(),
    };
    let token = jwt::mint_hs256(SECRET, user, &[], now() + 3600);
    let url = format!(
        "http://{page}/?url={scheme}://{mqtt}/mqtt&user={user}&token={token}&other=push/user/9{user}"
    );
    browser.open(&url).await;
    let results = "return window.results";
    let failed = |r: &Value| r["closed"] != 0 || r["errors"] != json!([]);
    let r = browser
        .wait_script(results, |r| r["ready"] == true || failed(r))
        .await;
    assert_eq!(r["library"], true, "MQTT.js loaded: {r}");
    assert!(!failed(&r), "{r}");
    assert_eq!(r["own"], json!({"error": null, "granted": [1]}), "{r}");
    // SUBACK 0x80: MQTT.js reports an error and the granted code 128.
    assert_eq!(r["other"]["granted"], json!([128]), "{r}");
    assert!(r["other"]["error"].as_str().is_some(), "{r}");
    assert_eq!(r["statusAcked"], true, "{r}");

    wait_for_focus(&server, user, true).await;
    let path = format!("/v1/users/{user}/presence");
    let presence = support::http::get(server.http_addr, &path).await.json();
    assert_eq!(presence["connected"], true, "{presence}");
    assert_eq!(presence["client_ids"], json!([format!("browser-{user}")]));

    let mut backend = Backend::connect(server.proxy_addr).await;
    let data = json!({"alert": "to the browser", "over": scheme});
    let uid: i64 = user.parse().unwrap();
    assert_eq!(backend.push(2, Mp::from(uid), &data).await, 0x00);
    let r = browser
        .wait_script(results, |r| r["messages"] != json!([]) || failed(r))
        .await;
    let got = &r["messages"][0];
    assert_eq!(got["topic"], format!("push/user/{user}"));
    let payload: Value = serde_json::from_str(got["payload"].as_str().unwrap()).unwrap();
    assert_eq!(payload, data);
    assert_eq!(server.stats.mqtt_denied.get(), 1, "the other user's topic");
    browser.close().await;
    server.stop().await;
}

#[tokio::test]
async fn mqtt_js_in_chromium_over_websocket() {
    device_in_browser("ws", "51").await;
}

#[tokio::test]
async fn mqtt_js_in_chromium_over_websocket_tls() {
    device_in_browser("wss", "52").await;
}
