//! The HTTP API over real HTTP: pushes, the registry, ops endpoints, auth.

#[path = "support/apns.rs"]
mod apns_server;
#[macro_use]
mod support;

use pushbridge::push::Id;
use pushbridge::registry::UserStore;
use serde_json::json;
use support::http::{get, post_json, raw, raw_request, request};
use support::mqtt::Device;
use support::redis::RedisServer;
use support::server;

both_registries!(push_answers_per_notification, push_api);
async fn push_api(settings: pushbridge::settings::Settings) {
    let server = server::start(settings).await;
    let mut d = Device::connect(server.mqtt_addr, "d5", true).await;
    d.subscribe("push/user/5").await;
    let ios = json!({"token": "abcd", "ident": "com.example.app", "version": "develop"});
    let put = request(
        server.http_addr,
        "PUT",
        "/v1/users/6",
        None,
        Some(ios.to_string().as_bytes()),
    )
    .await;
    assert_eq!(put.status, 204, "{}", put.text());

    let reply = post_json(
        server.http_addr,
        "/v1/push",
        &json!({"notifications": [
            {"user": 5, "data": {"n": 1}, "id": "a1"},
            {"users": ["5", 6, 7], "data": {"alert": "hi"}, "id": "a2"},
            {"group": "g1", "data": {"n": 3}, "id": "a3"},
        ]}),
    )
    .await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(
        reply.json(),
        json!({"results": [
            {"id": "a1", "mqtt": [{"topic": "push/user/5", "sessions": 1}], "apns": [], "unknown_users": ["5"]},
            {"id": "a2", "mqtt": [{"topic": "push/user/5", "sessions": 1}, {"topic": "push/user/7", "sessions": 0}],
             "apns": [{"user": "6", "app": "com.example.app", "environment": "sandbox"}],
             "unknown_users": ["5", "7"]},
            {"id": "a3", "mqtt": [{"topic": "push/group/g1", "sessions": 0}], "apns": [], "unknown_users": []},
        ]})
    );
    assert_eq!(d.next_json().await, json!({"n": 1}));
    assert_eq!(d.next_json().await, json!({"alert": "hi"}));

    // One notification on its own: the same answer shape.
    let reply = post_json(
        server.http_addr,
        "/v1/push",
        &json!({"user": 5, "data": {"n": 4}, "id": "a4"}),
    )
    .await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(
        reply.json(),
        json!({"results": [
            {"id": "a4", "mqtt": [{"topic": "push/user/5", "sessions": 1}], "apns": [], "unknown_users": ["5"]},
        ]})
    );
    assert_eq!(d.next_json().await, json!({"n": 4}));
    assert_eq!(server.stats.http_pushes.get(), 4);
    server.stop().await;
}

both_registries!(users_and_groups_round_trip, users_api);
async fn users_api(settings: pushbridge::settings::Settings) {
    let server = server::start(settings).await;
    let addr = server.http_addr;
    assert_eq!(get(addr, "/v1/users/9").await.status, 404);
    let body = json!({"token": "00ff", "ident": "com.x", "version": "produce"}).to_string();
    assert_eq!(
        request(addr, "PUT", "/v1/users/9", None, Some(body.as_bytes()))
            .await
            .status,
        204
    );
    let got = get(addr, "/v1/users/9").await;
    assert_eq!(
        got.json(),
        json!({"id": "9", "token": "00ff", "ident": "com.x", "version": "produce", "focus": false})
    );
    // The same record the router reads.
    let rec = server
        .registry
        .users(&[Id::from(9)])
        .await
        .unwrap()
        .remove(0)
        .unwrap();
    assert_eq!(rec.app_token.as_deref(), Some("00ff"));

    for (method, want) in [("PUT", vec![Id::from(9)]), ("DELETE", vec![])] {
        let path = "/v1/groups/3/ios-members/9";
        assert_eq!(request(addr, method, path, None, None).await.status, 204);
        let members = server
            .registry
            .group_apple_members(&[Id::from(3)])
            .await
            .unwrap();
        assert_eq!(members, vec![want], "after {method}");
    }

    assert_eq!(
        request(addr, "DELETE", "/v1/users/9", None, None)
            .await
            .status,
        204
    );
    assert_eq!(
        request(addr, "DELETE", "/v1/users/9", None, None)
            .await
            .status,
        404
    );
    server.stop().await;
}

#[tokio::test]
async fn bad_requests_get_4xx_with_a_message() {
    let server = server::start(server::settings(None)).await;
    let addr = server.http_addr;
    let cases = [
        ("POST", "/v1/push", "{not json", "bad request body"),
        (
            "POST",
            "/v1/push",
            r#"{"notifications": []}"#,
            "between 1 and 100",
        ),
        (
            "POST",
            "/v1/push",
            r#"{"notifications": [{"data": {}}]}"#,
            "notifications[0]",
        ),
        (
            "POST",
            "/v1/push",
            r#"{"notifications": [{"user": 1, "group": 2, "data": {}}]}"#,
            "exactly one",
        ),
        (
            "POST",
            "/v1/push",
            r#"{"notifications": [{"user": 1.5, "data": {}}]}"#,
            "bad id",
        ),
        (
            "POST",
            "/v1/push",
            r#"{"notifications": [{"user": "a/b", "data": {}}]}"#,
            "bad id",
        ),
        (
            "POST",
            "/v1/push",
            r#"{"notifications": [{"user": 1, "data": []}]}"#,
            "bad request body",
        ),
        (
            "POST",
            "/v1/push",
            r#"{"notifications": [{"user": 1, "data": {}, "x": 1}]}"#,
            "unknown field",
        ),
        (
            "POST",
            "/v1/push",
            r#"{"user": 1, "group": 2, "data": {}}"#,
            "notification: needs exactly one",
        ),
        (
            "POST",
            "/v1/push",
            r#"{"user": 1, "data": {}, "apns": {"priority": 7}}"#,
            "notification.apns.priority: must be 5 or 10",
        ),
        (
            "POST",
            "/v1/push",
            r#"{"user": 1, "data": {}, "notifications": []}"#,
            "unknown field",
        ),
        ("PUT", "/v1/users/1", r#"{"token": "not hex"}"#, "hex"),
        ("PUT", "/v1/users/1", r#"{"tokn": "00"}"#, "unknown field"),
        ("GET", "/v1/users/%23", "", "bad id"),
        (
            "POST",
            "/v1/push",
            r#"{"notifications": [{"user": 1, "data": {}}, {"user": 1, "data": {}, "apns": {"priority": 7}}]}"#,
            "notifications[1].apns.priority: must be 5 or 10",
        ),
        (
            "POST",
            "/v1/push",
            r#"{"notifications": [{"user": 1, "data": {}, "apns": {"push_type": "loud"}}]}"#,
            "apns.push_type: must be one of alert, background",
        ),
        (
            "POST",
            "/v1/push",
            r#"{"notifications": [{"user": 1, "data": {}, "apns": {"badge": -1}}]}"#,
            "apns.badge",
        ),
        (
            "POST",
            "/v1/push",
            r#"{"notifications": [{"user": 1, "data": {}, "apns": {"expiry": 1}}]}"#,
            "apns.expiry: unknown field",
        ),
    ];
    for (method, path, body, want) in cases {
        let reply = request(addr, method, path, None, Some(body.as_bytes())).await;
        assert_eq!(
            reply.status,
            400,
            "{method} {path} {body}: {}",
            reply.text()
        );
        let err = reply.json()["error"].as_str().unwrap().to_string();
        assert!(err.contains(want), "{method} {path} {body}: {err}");
    }
    let too_many: Vec<_> = (0..101).map(|i| json!({"user": i, "data": {}})).collect();
    let reply = post_json(addr, "/v1/push", &json!({"notifications": too_many})).await;
    assert_eq!(reply.status, 400);
    assert_eq!(server.stats.http_pushes.get(), 0);
    server.stop().await;
}

#[tokio::test]
async fn token_required_when_set() {
    let mut settings = server::settings(None);
    settings.http.token = Some("s3cret".into());
    let server = server::start(settings).await;
    let addr = server.http_addr;
    let body = json!({"notifications": [{"user": 1, "data": {}}]}).to_string();
    for token in [None, Some("wrong")] {
        let reply = request(addr, "POST", "/v1/push", token, Some(body.as_bytes())).await;
        assert_eq!(reply.status, 401);
        assert_eq!(
            request(addr, "GET", "/metrics", token, None).await.status,
            401
        );
    }
    let reply = request(
        addr,
        "POST",
        "/v1/push",
        Some("s3cret"),
        Some(body.as_bytes()),
    )
    .await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    assert_eq!(get(addr, "/healthz").await.status, 200);
    server.stop().await;
}

#[tokio::test]
async fn ops_endpoints() {
    let redis = RedisServer::start();
    let server = server::start(server::settings(Some(&redis.url))).await;
    let addr = server.http_addr;
    assert_eq!(get(addr, "/healthz").await.text(), "ok\n");
    assert_eq!(get(addr, "/readyz").await.status, 200);

    post_json(
        addr,
        "/v1/push",
        &json!({"notifications": [{"user": 1, "data": {}}]}),
    )
    .await;
    let metrics = get(addr, "/metrics").await;
    assert_eq!(
        metrics.content_type.as_deref(),
        Some("text/plain; version=0.0.4")
    );
    let text = metrics.text();
    assert!(
        text.contains("# TYPE pushbridge_http_pushes_total counter"),
        "{text}"
    );
    assert!(
        text.lines().any(|l| l == "pushbridge_http_pushes_total 1"),
        "{text}"
    );
    assert!(
        text.lines()
            .any(|l| l == "pushbridge_mqtt_published_total 1"),
        "{text}"
    );
    let stats = get(addr, "/v1/stats").await.json();
    assert_eq!(stats["totals"]["http_pushes"], 1);

    // The OpenAPI document lists every route the server answers.
    let doc = get(addr, "/openapi.json").await.json();
    assert_eq!(doc["openapi"], "3.0.3");
    for path in [
        "/v1/push",
        "/v1/users/{id}",
        "/v1/users/{id}/presence",
        "/v1/users/{id}/pushes",
        "/v1/pushes/{id}",
        "/v1/groups/{gid}/ios-members/{uid}",
        "/v1/stats",
        "/v1/apps",
        "/metrics",
        "/openapi.json",
        "/healthz",
        "/readyz",
    ] {
        assert!(
            doc["paths"].get(path).is_some(),
            "{path} missing from openapi.json"
        );
    }

    // Redis gone: not ready, with the reason.
    drop(redis);
    let ready = get(addr, "/readyz").await;
    assert_eq!(ready.status, 503);
    assert!(ready.text().contains("registry"), "{}", ready.text());
    server.stop().await;
}

#[tokio::test]
async fn apns_overrides_reach_apple() {
    use apns_server::{ApnsServer, TestCredentials};
    const APP: &str = "com.example.app";
    let apple = ApnsServer::start().await;
    let creds = TestCredentials::new();
    let (key, _) = creds.p8("AuthKey_K1.p8");
    let mut settings = server::settings(None);
    settings.apns.config =
        creds.config(&json!({APP: {"key": key, "key_id": "K1", "team_id": "T1"}}));
    settings.apns.production_url = apple.url();
    settings.apns.sandbox_url = apple.url();
    settings.apns.ca_file = Some(apple.ca_path());
    let server = server::start(settings).await;
    let addr = server.http_addr;
    let collapse = "c".repeat(64);
    for (uid, token) in [(1, "aa01"), (2, "aa02")] {
        let body = json!({"token": token, "ident": APP, "version": "produce"}).to_string();
        let path = format!("/v1/users/{uid}");
        let put = request(addr, "PUT", &path, None, Some(body.as_bytes())).await;
        assert_eq!(put.status, 204);
    }
    let reply = post_json(
        addr,
        "/v1/push",
        &json!({"notifications": [
            {"user": 1, "data": {"alert": "hi", "sound": "a.caf"},
             "apns": {"priority": 5, "expiration": 0, "collapse_id": collapse,
                      "push_type": "alert", "sound": "b.caf", "badge": 3}},
            {"user": 2, "data": {"n": 1}, "apns": {"push_type": "background", "expiration": 2000000000}},
        ]}),
    )
    .await;
    assert_eq!(reply.status, 200, "{}", reply.text());
    let mut seen = [
        apple.next_request(support::WAIT).await,
        apple.next_request(support::WAIT).await,
    ];
    seen.sort_by_key(|r| r.path.clone());
    let [first, second] = seen;
    assert_eq!(first.path, "/3/device/aa01");
    assert_eq!(first.header("apns-priority"), Some("5"));
    assert_eq!(first.header("apns-expiration"), Some("0"));
    assert_eq!(first.header("apns-collapse-id"), Some(collapse.as_str()));
    assert_eq!(first.header("apns-push-type"), Some("alert"));
    assert_eq!(
        first.body,
        json!({"aps": {"alert": "hi", "sound": "b.caf", "badge": 3},
               "data": {"alert": "hi", "sound": "a.caf"}})
    );
    assert_eq!(second.header("apns-push-type"), Some("background"));
    assert_eq!(second.header("apns-priority"), Some("5"));
    assert_eq!(second.header("apns-expiration"), Some("2000000000"));
    assert_eq!(second.header("apns-collapse-id"), None);
    assert_eq!(
        second.body,
        json!({"aps": {"content-available": 1}, "data": {"n": 1}})
    );
    server.stop().await;
}

/// Issue 14 point 10: what a page on another site can make a browser send
/// to the loopback API (CSRF, DNS rebinding) is refused; the same requests
/// from the server's own origin, or by a name in http.allowed_hosts, work.
#[tokio::test]
async fn cross_site_and_rebound_requests_are_refused() {
    let mut settings = server::settings(None);
    settings.http.allowed_hosts = vec!["push.internal".into()];
    let server = server::start(settings).await;
    let addr = server.http_addr;
    let host = addr.to_string();
    let record = json!({"token": "00ff", "ident": "com.x", "version": "produce"}).to_string();
    let put = request(addr, "PUT", "/v1/users/42", None, Some(record.as_bytes())).await;
    assert_eq!(put.status, 204);
    let push = json!({"notifications": [{"user": 1, "data": {"alert": "x"}}]}).to_string();

    // A cross-site form: text/plain, no preflight.
    let (status, body) = raw(
        addr,
        &raw_request(
            "POST",
            "/v1/push",
            &[
                ("Host", &host),
                ("Content-Type", "text/plain"),
                ("Origin", "http://evil.example"),
            ],
            &push,
        ),
    )
    .await;
    assert_eq!(status, 403, "{body}");
    let (status, body) = raw(
        addr,
        &raw_request(
            "POST",
            "/v1/push",
            &[("Host", &host), ("Content-Type", "text/plain")],
            &push,
        ),
    )
    .await;
    assert_eq!(status, 415, "{body}");
    assert!(body.contains("application/json"), "{body}");
    // A foreign Origin with a JSON body (a page that got past the preflight).
    let (status, body) = raw(
        addr,
        &raw_request(
            "POST",
            "/v1/push",
            &[
                ("Host", &host),
                ("Content-Type", "application/json"),
                ("Origin", "http://evil.example"),
            ],
            &push,
        ),
    )
    .await;
    assert_eq!(status, 403, "{body}");
    assert!(body.contains("Origin"), "{body}");
    assert_eq!(server.stats.http_pushes.get(), 0);

    // DNS rebinding: evil.example now resolves to 127.0.0.1.
    let rebound = [("Host", "evil.example:8090")];
    let (status, body) = raw(addr, &raw_request("GET", "/v1/users/42", &rebound, "")).await;
    assert_eq!(status, 421, "{body}");
    assert!(!body.contains("00ff"), "{body}");
    assert!(body.contains("http.allowed_hosts"), "{body}");
    let (status, _) = raw(addr, &raw_request("DELETE", "/v1/users/42", &rebound, "")).await;
    assert_eq!(status, 421);
    let (status, _) = raw(addr, &raw_request("GET", "/metrics", &rebound, "")).await;
    assert_eq!(status, 421);
    assert_eq!(get(addr, "/v1/users/42").await.status, 200, "still there");

    // The server's own origin, localhost, IP addresses and allowed names work.
    let own = format!("http://{host}");
    for (h, origin) in [
        (host.as_str(), Some(own.as_str())),
        ("localhost:8090", Some("http://localhost:8090")),
        ("LOCALHOST", None),
        ("[::1]:8090", None),
        ("push.internal", Some("https://push.internal")),
    ] {
        let mut headers = vec![("Host", h), ("Content-Type", "application/json")];
        headers.extend(origin.map(|o| ("Origin", o)));
        let (status, body) = raw(addr, &raw_request("POST", "/v1/push", &headers, &push)).await;
        assert_eq!(status, 200, "Host {h}: {body}");
    }
    let (status, _) = raw(
        addr,
        &raw_request("GET", "/v1/users/42", &[("Host", "Push.Internal:1")], ""),
    )
    .await;
    assert_eq!(status, 200);
    // Without a body no content type is needed (curl -X PUT).
    let (status, body) = raw(
        addr,
        &raw_request("PUT", "/v1/groups/3/ios-members/42", &[("Host", &host)], ""),
    )
    .await;
    assert_eq!(status, 204, "{body}");
    server.stop().await;
}

/// Issue 14 point 7: a request head that stops half way is closed after
/// http.header_timeout_secs; silence (no request at all) too.
#[tokio::test]
async fn half_sent_requests_are_closed() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut settings = server::settings(None);
    settings.http.header_timeout_secs = 1;
    let server = server::start(settings).await;
    for half in ["GET /v1/sta", "GET /v1/stats HTTP/1.1\r\nHost: x\r\n", ""] {
        let mut s = tokio::net::TcpStream::connect(server.http_addr)
            .await
            .unwrap();
        s.write_all(half.as_bytes()).await.unwrap();
        let mut out = Vec::new();
        tokio::time::timeout(support::WAIT, s.read_to_end(&mut out))
            .await
            .unwrap_or_else(|_| panic!("{half:?} still open after {:?}", support::WAIT))
            .unwrap();
        assert!(out.is_empty(), "{}", String::from_utf8_lossy(&out));
    }
    server.stop().await;
}

/// Issue 14 point 7: a body that stops half way is answered 408 and closed
/// after http.header_timeout_secs.
#[tokio::test]
async fn half_sent_bodies_are_closed() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut settings = server::settings(None);
    settings.http.header_timeout_secs = 1;
    let server = server::start(settings).await;
    for request in ["POST /v1/push", "GET /healthz"] {
        let mut s = tokio::net::TcpStream::connect(server.http_addr)
            .await
            .unwrap();
        let head = format!(
            "{request} HTTP/1.1\r\nHost: localhost\r\n\
             Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n"
        );
        s.write_all(head.as_bytes()).await.unwrap();
        s.write_all(br#"{"notifications": ["#).await.unwrap();
        let mut out = Vec::new();
        tokio::time::timeout(support::WAIT, s.read_to_end(&mut out))
            .await
            .unwrap_or_else(|_| panic!("{request}: still open after {:?}", support::WAIT))
            .unwrap();
        let text = String::from_utf8_lossy(&out);
        assert!(text.starts_with("HTTP/1.1 408"), "{request}: {text}");
    }
    assert_eq!(server.stats.http_pushes.get(), 0);
    server.stop().await;
}

/// Issue 14 point 7: at most http.max_connections are served at once; the
/// next waits (in the backlog) until one of them is closed.
#[tokio::test]
async fn http_connections_are_capped() {
    use std::io::{Read, Write};
    let mut settings = server::settings(None);
    settings.http.max_connections = 1;
    settings.http.header_timeout_secs = 1;
    let server = server::start(settings).await;
    let addr = server.http_addr;
    let mut first = std::net::TcpStream::connect(addr).unwrap();
    first.write_all(b"GET /healthz HTT").unwrap();
    // Answered only once the first is closed (by the header timeout): by
    // then the first one's EOF is already here.
    let (status, _) = raw(
        addr,
        &raw_request("GET", "/healthz", &[("Host", "localhost")], ""),
    )
    .await;
    assert_eq!(status, 200);
    first.set_nonblocking(true).unwrap();
    let mut buf = [0u8; 64];
    match first.read(&mut buf) {
        Ok(0) => {}
        other => panic!("the first connection is still served: {other:?}"),
    }
    server.stop().await;
}
