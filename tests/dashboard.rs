//! The dashboard at `/` in a real headless Chromium: it loads without a
//! token, asks for one, shows counters that move after a push, and its form
//! sends a push that a real MQTT client receives. Where the server offers
//! optional data (connection gauges, per-minute series, `/v1/apps`), the test
//! reads it over HTTP and checks the page shows the same.

#[path = "support/apns.rs"]
mod apns_server;
mod support;

use apns_server::{ApnsServer, ClientCert, TestCredentials};
use rmpv::Value as Mp;
use serde_json::json;
use support::browser::Browser;
use support::http::{get, request};
use support::mqtt::Device;
use support::proxy::Backend;
use support::server;

const TOKEN: &str = "dash-s3cret";

#[tokio::test]
async fn page_is_public_and_the_api_it_reads_is_not() {
    let mut settings = server::settings(None);
    settings.http.token = Some(TOKEN.into());
    let server = server::start(settings).await;
    let page = get(server.http_addr, "/").await;
    assert_eq!(page.status, 200);
    assert_eq!(
        page.content_type.as_deref(),
        Some("text/html; charset=utf-8")
    );
    assert!(page.text().contains("id=\"push-form\""));
    assert_eq!(get(server.http_addr, "/v1/stats").await.status, 401);
    let stats = request(server.http_addr, "GET", "/v1/stats", Some(TOKEN), None).await;
    assert_eq!(stats.status, 200);
    server.stop().await;
}

#[tokio::test]
async fn dashboard_in_chromium_shows_live_counts_and_sends_a_test_push() {
    let browser = Browser::start().await;
    let apple = ApnsServer::start().await;
    let creds = TestCredentials::new();
    let cert = creds.pem("dev.pem", &ClientCert::expiring_in("dash", 40), None);
    let mut settings = server::settings(None);
    settings.apns.config = creds.config(&json!({"com.example.dash": {"develop": cert}}));
    settings.apns.sandbox_url = apple.url();
    settings.apns.production_url = apple.url();
    settings.apns.ca_file = Some(apple.ca_path());
    settings.http.token = Some(TOKEN.into());
    let server = server::start(settings).await;
    let api = |path: &'static str| request(server.http_addr, "GET", path, Some(TOKEN), None);
    let mut device = Device::connect(server.mqtt_addr, "d77", true).await;
    device.subscribe("push/user/77").await;
    let mut backend = Backend::connect(server.proxy_addr).await;
    // Before the page loads: only a per-minute series can show it in the chart.
    assert_eq!(backend.push(2, Mp::from(77), &json!({"n": 0})).await, 0x00);
    assert_eq!(device.next_json().await, json!({"n": 0}));

    browser.open(&format!("http://{}/", server.http_addr)).await;
    browser
        .wait_text("stats-status", |t| t.contains("token needed"))
        .await;
    assert_eq!(browser.text("total-accepted").await, "–");
    browser.fill("token", TOKEN).await;
    browser.click("token-save").await;
    browser.wait_text("total-accepted", |t| t == "1").await;
    let stats = api("/v1/stats").await.json();
    assert!(stats["per_minute"].is_array(), "/v1/stats has per_minute");
    assert_eq!(stats["connections"]["now"], json!(1));
    browser.wait_text("conn-now", |t| t == "1").await;
    assert_eq!(browser.text("conn-connects").await, "1");
    assert_eq!(browser.text("apns_delivered").await, "0");
    // The push made before the page loaded comes from the per-minute seed.
    browser.wait_text("window-accepted", |t| t == "1").await;
    let apps = api("/v1/apps").await;
    assert_eq!(apps.status, 200);
    let app = &apps.json()[0];
    let shown = browser
        .wait_text("apps", |t| t.contains("com.example.dash"))
        .await;
    let expires = app["expires"].as_str().expect("a certificate's expiry");
    for want in [
        "sandbox",
        "certificate",
        expires,
        &app["days_left"].to_string(),
    ] {
        assert!(
            shown.contains(want),
            "#apps shows {shown:?}, lacks {want:?}"
        );
    }

    // A push through the proxy moves the totals and the chart's window.
    assert_eq!(backend.push(2, Mp::from(77), &json!({"n": 1})).await, 0x00);
    assert_eq!(device.next_json().await, json!({"n": 1}));
    browser.wait_text("total-accepted", |t| t == "2").await;
    browser.wait_text("total-mqtt", |t| t == "2").await;
    browser.wait_text("window-accepted", |t| t == "2").await;

    // The form's push reaches the device, and the page shows the answer.
    browser.fill("push-user", "77").await;
    browser
        .fill("push-data", r#"{"alert":"from the dashboard"}"#)
        .await;
    browser.click("push-send").await;
    assert_eq!(
        device.next_json().await,
        json!({"alert": "from the dashboard"})
    );
    browser
        .wait_text("push-result", |t| {
            t.contains("mqtt push/user/77: 1 session(s)")
        })
        .await;
    browser.wait_text("total-accepted", |t| t == "3").await;

    // Bad JSON is refused in the page; nothing is sent.
    browser.fill("push-data", "{nope").await;
    browser.click("push-send").await;
    browser
        .wait_text("push-result", |t| {
            t.starts_with("data must be a JSON object")
        })
        .await;
    assert_eq!(server.stats.http_pushes.get(), 1);

    browser.close().await;
    server.stop().await;
}

/// The form's push asks for a receipt, which the page shows as it changes
/// until the device's acknowledgement makes it final; looking the user up
/// shows the record, presence, and that push with its outcome.
#[tokio::test]
async fn dashboard_in_chromium_shows_a_live_receipt_and_a_users_last_pushes() {
    let browser = Browser::start().await;
    let mut settings = server::settings(None);
    settings.receipts.enabled = true;
    settings.http.token = Some(TOKEN.into());
    let server = server::start(settings).await;
    let http = server.http_addr;
    let record = br#"{"ident":"com.example.dash","version":"7.1"}"#;
    let put = request(http, "PUT", "/v1/users/78", Some(TOKEN), Some(record)).await;
    assert_eq!(put.status, 204);
    // A device that acknowledges what it gets (rumqttc sends the PUBACK on its next poll).
    let mut device = Device::connect(server.mqtt_addr, "d78", true).await;
    device.subscribe("push/user/78").await;
    let acking = tokio::spawn(async move { while device.events.poll().await.is_ok() {} });

    browser.open(&format!("http://{http}/")).await;
    browser.fill("token", TOKEN).await;
    browser.click("token-save").await;
    browser.fill("push-user", "78").await;
    browser
        .fill("push-data", r#"{"alert":"with a receipt"}"#)
        .await;
    browser.click("push-send").await;
    let shown = browser
        .wait_text("push-receipt", |t| {
            t.contains("(final)")
                && t.contains(
                    "mqtt push/user/78: acknowledged (written to 1 session(s), 1 acknowledged)",
                )
        })
        .await;
    let id = shown
        .strip_prefix("receipt ")
        .and_then(|t| t.split(' ').next())
        .unwrap_or_else(|| panic!("no push id in {shown:?}"))
        .to_owned();
    let outcome = request(http, "GET", &format!("/v1/pushes/{id}"), Some(TOKEN), None).await;
    assert_eq!(outcome.json()["mqtt"][0]["state"], "acked");

    browser.fill("lookup-user", "78").await;
    browser.click("lookup-send").await;
    browser
        .wait_text("lookup-record", |t| {
            t.contains("ident com.example.dash") && t.contains("version 7.1")
        })
        .await;
    browser
        .wait_text("lookup-presence", |t| {
            t.contains("connected since") && t.contains("d78")
        })
        .await;
    let row = format!("lookup-push-{id}");
    let pushes = browser
        .wait_text("lookup-pushes", |t| t.contains(&id))
        .await;
    assert!(pushes.contains("acknowledged"), "{pushes}");
    let row = browser.text(&row).await;
    assert!(
        row.contains("mqtt push/user/78: acknowledged"),
        "#lookup-push-{id} shows {row:?}"
    );

    // A user with no record, no session and no pushes says so.
    browser.fill("lookup-user", "79").await;
    browser.click("lookup-send").await;
    browser
        .wait_text("lookup-record", |t| t == "none (404)")
        .await;
    browser
        .wait_text("lookup-presence", |t| t == "not connected")
        .await;
    browser
        .wait_text("lookup-pushes", |t| t == "none kept")
        .await;

    acking.abort();
    browser.close().await;
    server.stop().await;
}
