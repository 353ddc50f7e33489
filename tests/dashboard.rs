//! The dashboard at `/` in a real headless Chromium: it loads without a
//! token, asks for one, shows counters that move after a push, and its form
//! sends a push that a real MQTT client receives.

mod support;

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
    let mut settings = server::settings(None);
    settings.http.token = Some(TOKEN.into());
    let server = server::start(settings).await;
    let mut device = Device::connect(server.mqtt_addr, "d77", true).await;
    device.subscribe("push/user/77").await;

    browser.open(&format!("http://{}/", server.http_addr)).await;
    browser
        .wait_text("stats-status", |t| t.contains("token needed"))
        .await;
    assert_eq!(browser.text("total-accepted").await, "–");
    browser.fill("token", TOKEN).await;
    browser.click("token-save").await;
    browser.wait_text("total-accepted", |t| t == "0").await;
    assert_eq!(browser.text("conn-connects").await, "1");
    assert_eq!(browser.text("apns_delivered").await, "0");
    browser
        .wait_text("apps", |t| {
            t.starts_with("not available") || t.contains("no apps")
        })
        .await;

    // A push through the proxy moves the totals and the chart's window.
    let mut backend = Backend::connect(server.proxy_addr).await;
    assert_eq!(backend.push(2, Mp::from(77), &json!({"n": 1})).await, 0x00);
    assert_eq!(device.next_json().await, json!({"n": 1}));
    browser.wait_text("total-accepted", |t| t == "1").await;
    browser.wait_text("total-mqtt", |t| t == "1").await;
    browser.wait_text("window-accepted", |t| t == "1").await;

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
    browser.wait_text("total-accepted", |t| t == "2").await;

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
