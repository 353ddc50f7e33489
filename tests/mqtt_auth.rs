//! Device authentication and the ACL, with real MQTT clients (rumqttc v3.1.1
//! and v5) against the whole server over real sockets.

mod support;

use pushbridge::auth::jwt;
use pushbridge::settings::{AuthMode, Settings};
use pushbridge::utc::now;
use rumqttc::v5::mqttbytes::v5 as mq5;
use rumqttc::{ConnectReturnCode, ConnectionError, Event, Packet};
use support::mqtt::Device;
use support::{server, wait_for_focus, wait_until, WAIT};

const SECRET: &str = "test-secret";

fn jwt_settings() -> Settings {
    let mut s = server::settings(None);
    s.auth.mode = AuthMode::Jwt;
    s.auth.jwt_secret = Some(SECRET.into());
    s.auth.service_accounts = vec!["monitor".into()];
    s
}

fn token(user: &str, groups: &[&str]) -> String {
    let groups: Vec<String> = groups.iter().map(|g| g.to_string()).collect();
    jwt::mint_hs256(SECRET, user, &groups, now() + 3600)
}

/// The CONNACK refusal a v3.1.1 client gets, or None if it was accepted.
async fn v4_refusal(
    addr: std::net::SocketAddr,
    password: Option<&str>,
) -> Option<ConnectReturnCode> {
    let mut opts = Device::options(addr, "refused", true);
    if let Some(p) = password {
        opts.set_credentials("42", p);
    }
    let (_client, mut events) = rumqttc::AsyncClient::new(opts, 8);
    let polled = tokio::time::timeout(WAIT, events.poll())
        .await
        .expect("CONNACK in time");
    match polled {
        Ok(Event::Incoming(Packet::ConnAck(_))) => None,
        Err(ConnectionError::ConnectionRefused(code)) => Some(code),
        other => panic!("unexpected {other:?}"),
    }
}

async fn v5_client(
    addr: std::net::SocketAddr,
    password: Option<&str>,
) -> (rumqttc::v5::AsyncClient, rumqttc::v5::EventLoop) {
    let mut opts = rumqttc::v5::MqttOptions::new("v5dev", addr.ip().to_string(), addr.port());
    if let Some(p) = password {
        opts.set_credentials("42", p);
    }
    rumqttc::v5::AsyncClient::new(opts, 8)
}

/// The next v5 packet matching `want`; panics on errors or after WAIT.
async fn v5_until(
    events: &mut rumqttc::v5::EventLoop,
    want: impl Fn(&mq5::Packet) -> bool,
) -> Result<mq5::Packet, rumqttc::v5::ConnectionError> {
    tokio::time::timeout(WAIT, async {
        loop {
            if let rumqttc::v5::Event::Incoming(p) = events.poll().await? {
                if want(&p) {
                    return Ok(p);
                }
            }
        }
    })
    .await
    .expect("v5 packet in time")
}

#[tokio::test]
async fn bad_tokens_are_refused_with_the_right_code() {
    let server = server::start(jwt_settings()).await;
    let addr = server.mqtt_addr;
    let expired = jwt::mint_hs256(SECRET, "42", &[], now() - 10);
    let forged = jwt::mint_hs256("not-the-secret", "42", &[], now() + 3600);
    let cases = [
        (None, ConnectReturnCode::BadUserNamePassword),
        (Some("not a jwt"), ConnectReturnCode::BadUserNamePassword),
        (
            Some(forged.as_str()),
            ConnectReturnCode::BadUserNamePassword,
        ),
        (Some(expired.as_str()), ConnectReturnCode::NotAuthorized),
    ];
    for (password, code) in cases {
        assert_eq!(v4_refusal(addr, password).await, Some(code), "{password:?}");
    }
    // The user name, when given, must be the token's subject.
    assert_eq!(
        v4_refusal(addr, Some(&token("43", &[]))).await,
        Some(ConnectReturnCode::NotAuthorized)
    );
    assert_eq!(v4_refusal(addr, Some(&token("42", &[]))).await, None);

    use rumqttc::v5::mqttbytes::v5::ConnectReturnCode as Code5;
    for (password, code) in [
        (None, Code5::BadUserNamePassword),
        (Some(forged.as_str()), Code5::BadUserNamePassword),
        (Some(expired.as_str()), Code5::NotAuthorized),
    ] {
        let (_c, mut events) = v5_client(addr, password).await;
        match v5_until(&mut events, |_| true).await {
            Err(rumqttc::v5::ConnectionError::ConnectionRefused(got)) => {
                assert_eq!(got, code, "{password:?}")
            }
            other => panic!("{password:?}: expected a refusal, got {other:?}"),
        }
    }
    assert_eq!(server.stats.mqtt_auth_refused.get(), 8);
    // The listener survived all of it.
    Device::connect_as(addr, "after", "42", &token("42", &[])).await;
    // A lifetime over auth.jwt_max_ttl_secs (90 days by default).
    let forever = jwt::mint_hs256(SECRET, "42", &[], u64::MAX);
    let code = v4_refusal(addr, Some(&forever)).await;
    assert_eq!(code, Some(ConnectReturnCode::BadUserNamePassword));
    server.stop().await;

    // Unbounded: an expiry too far off for a clock is simply no expiry.
    let mut settings = jwt_settings();
    settings.auth.jwt_max_ttl_secs = 0;
    let server = server::start(settings).await;
    let mut d = Device::connect_as(server.mqtt_addr, "forever", "42", &forever).await;
    d.subscribe("push/user/42").await;
}

/// Issue 14 point 12: with auth.jwt_audience and auth.jwt_issuer set, a
/// token signed with the same key for another service is refused, and so is
/// one with a lifetime over auth.jwt_max_ttl_secs or a non-numeric nbf.
#[tokio::test]
async fn tokens_for_other_services_or_too_long_are_refused() {
    let mut settings = jwt_settings();
    settings.auth.jwt_audience = Some("pushbridge".into());
    settings.auth.jwt_issuer = Some("https://auth.example".into());
    settings.auth.jwt_max_ttl_secs = 3600;
    let server = server::start(settings).await;
    let addr = server.mqtt_addr;
    let mint = |claims: serde_json::Value| {
        let mut c = serde_json::json!({"sub": "42", "exp": now() + 600,
            "aud": "pushbridge", "iss": "https://auth.example"});
        for (k, v) in claims.as_object().unwrap() {
            c[k] = v.clone();
        }
        jwt::mint_hs256_claims(SECRET, c.as_object().unwrap().clone())
    };
    assert_eq!(
        v4_refusal(addr, Some(&mint(serde_json::json!({})))).await,
        None
    );
    for claims in [
        serde_json::json!({"aud": "billing"}),
        serde_json::json!({"iss": "https://other.example"}),
        serde_json::json!({"exp": now() + 7200}),
        serde_json::json!({"exp": 1u64 << 62}),
        serde_json::json!({"nbf": "later"}),
    ] {
        assert_eq!(
            v4_refusal(addr, Some(&mint(claims.clone()))).await,
            Some(ConnectReturnCode::BadUserNamePassword),
            "{claims}"
        );
    }
}

#[tokio::test]
async fn a_device_reads_only_its_own_topics() {
    let server = server::start(jwt_settings()).await;
    let addr = server.mqtt_addr;
    let mut d42 = Device::connect_as(addr, "phone", "42", &token("42", &["7"])).await;
    for refused in [
        "push/user/43",
        "#",
        "push/user/+",
        "push/group/8",
        "push/app/status",
    ] {
        assert!(!d42.try_subscribe(refused).await, "{refused}");
    }
    d42.subscribe("push/user/42").await;
    d42.subscribe("push/group/7").await;
    // User 43 reusing the client id gets its own session, not 42's.
    let mut d43 = Device::connect_as(addr, "phone", "43", &token("43", &[])).await;
    d43.subscribe("push/user/43").await;
    let mut monitor = Device::connect_as(addr, "mon", "monitor", &token("monitor", &[])).await;
    monitor.subscribe("push/#").await;

    for topic in [
        "push/user/43",
        "push/group/8",
        "push/group/7",
        "push/user/42",
    ] {
        server
            .broker
            .publish(topic, format!("\"{topic}\"").into_bytes().into());
    }
    // 42 sees only its own two, in order: nothing for 43 or group 8 came first.
    assert_eq!(d42.next_json().await, "push/group/7");
    assert_eq!(d42.next_json().await, "push/user/42");
    assert_eq!(d43.next_json().await, "push/user/43");
    for topic in [
        "push/user/43",
        "push/group/8",
        "push/group/7",
        "push/user/42",
    ] {
        assert_eq!(monitor.next_json().await, topic);
    }
    assert_eq!(server.stats.mqtt_denied.get(), 5);
}

#[tokio::test]
async fn status_only_about_oneself() {
    let server = server::start(jwt_settings()).await;
    support::register(&server, "42").await;
    support::register(&server, "43").await;
    let addr = server.mqtt_addr;
    let mut d42 = Device::connect_as(addr, "phone", "42", &token("42", &[])).await;
    d42.publish("push/app/status", br#"{"user_id":43,"focus":true}"#)
        .await;
    d42.publish("push/user/43", b"{}").await;
    // No user_id: taken from the token.
    d42.publish("push/app/status", br#"{"focus":true}"#).await;
    wait_for_focus(&server, "42", true).await;
    // Status events are applied in order, so 43's would have been applied by now.
    wait_for_focus(&server, "43", false).await;
    assert_eq!(server.stats.mqtt_denied.get(), 2);
    assert_eq!(server.stats.status_updates.get(), 1);

    // v5 says why in the PUBACK.
    let t = token("42", &[]);
    let (client, mut events) = v5_client(addr, Some(&t)).await;
    v5_until(&mut events, |p| matches!(p, mq5::Packet::ConnAck(_)))
        .await
        .unwrap();
    let qos = rumqttc::v5::mqttbytes::QoS::AtLeastOnce;
    client
        .publish(
            "push/app/status",
            qos,
            false,
            r#"{"user_id":"43","focus":true}"#,
        )
        .await
        .unwrap();
    match v5_until(&mut events, |p| matches!(p, mq5::Packet::PubAck(_))).await {
        Ok(mq5::Packet::PubAck(ack)) => assert_eq!(ack.reason, mq5::PubAckReason::NotAuthorized),
        other => panic!("expected PUBACK, got {other:?}"),
    }
    client.subscribe("push/user/43", qos).await.unwrap();
    match v5_until(&mut events, |p| matches!(p, mq5::Packet::SubAck(_))).await {
        Ok(mq5::Packet::SubAck(ack)) => {
            assert_eq!(ack.return_codes, [mq5::SubscribeReasonCode::NotAuthorized])
        }
        other => panic!("expected SUBACK, got {other:?}"),
    }
}

#[tokio::test]
async fn a_connection_ends_with_its_token() {
    let server = server::start(jwt_settings()).await;
    let short = jwt::mint_hs256(SECRET, "42", &[], now() + 2);
    let mut d = Device::connect_as(server.mqtt_addr, "phone", "42", &short).await;
    d.subscribe("push/user/42").await;
    let closed = tokio::time::timeout(WAIT, async {
        loop {
            if d.events.poll().await.is_err() {
                return;
            }
        }
    })
    .await;
    assert!(closed.is_ok(), "connection outlived its token");
    assert_eq!(server.stats.mqtt_tokens_expired.get(), 1);
}

#[tokio::test]
async fn mode_none_keeps_the_old_topics_but_no_wildcards() {
    let mut settings = server::settings(None);
    settings.mqtt.max_subscriptions = 2;
    let server = server::start(settings).await;
    support::register(&server, "43").await;
    let mut d = Device::connect(server.mqtt_addr, "anon", true).await;
    assert!(!d.try_subscribe("push/#").await);
    assert!(!d.try_subscribe("push/user/+").await);
    assert!(!d.try_subscribe("elsewhere/x").await);
    d.subscribe("push/user/43").await;
    d.subscribe("push/group/1").await;
    // Over max_subscriptions.
    assert!(!d.try_subscribe("push/user/44").await);
    d.subscribe("push/user/43").await;
    d.publish("push/app/status", br#"{"user_id":43,"focus":true}"#)
        .await;
    wait_for_focus(&server, "43", true).await;
    d.publish("push/user/44", b"{}").await;
    wait_until(|| async { server.stats.mqtt_denied.get() == 4 }).await;
}

/// User 42's persistent session `tablet`, logging in with `token`.
fn tablet(server: &pushbridge::Server, token: &str) -> rumqttc::MqttOptions {
    let mut opts = Device::options(server.mqtt_addr, "tablet", false);
    opts.set_credentials("42", token);
    opts
}

#[tokio::test]
async fn a_kept_session_loses_groups_its_new_token_lacks() {
    let server = server::start(jwt_settings()).await;
    let mut d = Device::connect_opts(tablet(&server, &token("42", &["7"]))).await;
    d.subscribe("push/group/7").await;
    d.subscribe("push/user/42").await;
    d.disconnect().await;
    let mut d = Device::connect_opts(tablet(&server, &token("42", &[]))).await;
    server.broker.publish("push/group/7", "\"group\"".into());
    server.broker.publish("push/user/42", "\"user\"".into());
    assert_eq!(d.next_json().await, "user");
}

#[tokio::test]
async fn v5_client_is_told_its_token_expired() {
    let server = server::start(jwt_settings()).await;
    let short = jwt::mint_hs256(SECRET, "42", &[], now() + 2);
    let (_client, mut events) = v5_client(server.mqtt_addr, Some(&short)).await;
    v5_until(&mut events, |p| matches!(p, mq5::Packet::ConnAck(_)))
        .await
        .unwrap();
    // rumqttc reports a server DISCONNECT as the end of the connection.
    match v5_until(&mut events, |p| matches!(p, mq5::Packet::Disconnect(_))).await {
        Err(rumqttc::v5::ConnectionError::MqttState(
            rumqttc::v5::StateError::ServerDisconnect { reason_code, .. },
        )) => assert_eq!(reason_code, mq5::DisconnectReasonCode::NotAuthorized),
        other => panic!("expected DISCONNECT, got {other:?}"),
    }
}

/// Issue 14: messages queued for a group while the session was offline are
/// not delivered once the reconnecting token lost the group (read access is
/// checked as each message leaves for the device).
#[tokio::test]
async fn queued_messages_of_a_revoked_group_are_not_delivered() {
    let server = server::start(jwt_settings()).await;
    let mut d = Device::connect_opts(tablet(&server, &token("42", &["7"]))).await;
    d.subscribe("push/group/7").await;
    d.subscribe("push/user/42").await;
    d.disconnect().await;
    assert_eq!(server.broker.publish("push/group/7", "\"group\"".into()), 1);
    assert_eq!(server.broker.publish("push/user/42", "\"user\"".into()), 1);
    let mut d = Device::connect_opts(tablet(&server, &token("42", &[]))).await;
    assert_eq!(d.next_json().await, "user");
    assert_eq!(server.stats.mqtt_denied.get(), 1);
}

/// Issue 14: a JWT user's sessions are capped by `mqtt.max_sessions_per_user`
/// (each connection holds one, so this caps the user's connections too).
#[tokio::test]
async fn a_users_sessions_are_capped() {
    let mut settings = jwt_settings();
    settings.mqtt.max_sessions_per_user = 2;
    let server = server::start(settings).await;
    let t = token("42", &[]);
    for id in ["p1", "p2", "p3"] {
        let mut opts = Device::options(server.mqtt_addr, id, false);
        opts.set_credentials("42", &t);
        let mut d = Device::connect_opts(opts).await;
        d.subscribe("push/user/42").await;
        d.disconnect().await;
    }
    wait_until(|| async { server.broker.session_count() == 2 }).await;
    assert_eq!(server.stats.mqtt_sessions_evicted.get(), 1);
    // Another user is not affected.
    let mut other = Device::connect_as(server.mqtt_addr, "p1", "43", &token("43", &[])).await;
    other.subscribe("push/user/43").await;
    assert_eq!(server.broker.session_count(), 3);
}

/// Issue 14: a monitor's `push/user/#` is not the user: a push to an
/// offline user is kept for it, and replayed when its device subscribes.
#[tokio::test]
async fn a_monitors_wildcard_does_not_count_as_reaching_the_user() {
    let server = server::start(jwt_settings()).await;
    let mut monitor =
        Device::connect_as(server.mqtt_addr, "mon", "monitor", &token("monitor", &[])).await;
    monitor.subscribe("push/user/#").await;
    let mut backend = support::proxy::Backend::connect(server.proxy_addr).await;
    let data = serde_json::json!({"n": 1});
    assert_eq!(backend.push(2, rmpv::Value::from(42), &data).await, 0x00);
    assert_eq!(monitor.next_json().await, data);
    wait_until(|| async { server.stats.offline_kept.get() == 1 }).await;
    let mut d = Device::connect_as(server.mqtt_addr, "phone", "42", &token("42", &[])).await;
    d.subscribe("push/user/42").await;
    assert_eq!(d.next_json().await, data);
}

/// Issue 14 point 13: anonymous devices on a listener beyond loopback only
/// when the operator says so.
#[tokio::test]
async fn anonymous_mqtt_beyond_loopback_needs_allow_anonymous() {
    let mut settings = server::settings(None);
    settings.mqtt.listen = "0.0.0.0:0".parse().unwrap();
    let err = pushbridge::start(settings.clone(), Default::default())
        .await
        .err()
        .expect("refused")
        .to_string();
    assert!(
        err.contains("auth.mode") && err.contains("auth.allow_anonymous"),
        "{err}"
    );
    settings.auth.allow_anonymous = true;
    let server = server::start(settings).await;
    let loopback = std::net::SocketAddr::from(([127, 0, 0, 1], server.mqtt_addr.port()));
    let mut d = Device::connect(loopback, "anon", true).await;
    d.subscribe("push/user/1").await;
    server.stop().await;
}
