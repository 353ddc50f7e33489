//! End to end to APNs: raw proxy frames in, the router with a real registry,
//! out to a local HTTP/2 TLS server answering as Apple does, and MQTT beside it.

#[path = "support/apns.rs"]
mod apns_server;
#[macro_use]
mod support;

use apns_server::{ApnsServer, Reply, SeenRequest, TestCredentials};
use pushbridge::push::{Id, UserRecord};
use pushbridge::registry::UserStore;
use pushbridge::settings::Settings;
use rmpv::Value as Mp;
use serde_json::json;
use support::mqtt::Device;
use support::proxy::Backend;
use support::{server, WAIT};

const APP: &str = "com.example.app";

/// A production and a sandbox APNs, token credentials for `APP`.
struct Apple {
    production: ApnsServer,
    sandbox: ApnsServer,
    _creds: TestCredentials,
}

async fn apple(settings: &mut Settings) -> Apple {
    let production = ApnsServer::start().await;
    let sandbox = ApnsServer::start().await;
    let creds = TestCredentials::new();
    let (key, _) = creds.p8("AuthKey_KEY1.p8");
    let config = creds.config(&json!({APP: {"key": key, "key_id": "KEY1", "team_id": "TEAM1"}}));
    settings.apns.config = config;
    settings.apns.production_url = production.url();
    settings.apns.sandbox_url = sandbox.url();
    settings.apns.ca_file = Some(production.ca_path());
    Apple {
        production,
        sandbox,
        _creds: creds,
    }
}

fn ios(token: &str, version: &str) -> UserRecord {
    UserRecord {
        app_token: Some(token.into()),
        app_ident: Some(APP.into()),
        app_version: Some(version.into()),
        app_focus: false,
    }
}

fn assert_notification(req: &SeenRequest, token: &str, alert: bool, data: serde_json::Value) {
    assert_eq!(req.method, http::Method::POST);
    assert_eq!(req.path, format!("/3/device/{token}"));
    assert_eq!(req.header("apns-topic"), Some(APP));
    assert_eq!(
        req.header("apns-push-type"),
        Some(if alert { "alert" } else { "background" })
    );
    assert_eq!(
        req.header("apns-priority"),
        Some(if alert { "10" } else { "5" })
    );
    assert!(req.header("apns-expiration").is_some());
    assert!(req.header("authorization").unwrap().starts_with("bearer "));
    let mut aps = serde_json::Map::new();
    for key in ["alert", "sound", "badge"] {
        if let Some(v) = data.get(key) {
            aps.insert(key.into(), v.clone());
        }
    }
    if !alert {
        aps.insert("content-available".into(), json!(1));
    }
    assert_eq!(req.body, json!({"aps": aps, "data": data}));
}

both_registries!(alert_and_silent_follow_app_version, alert_and_silent);
async fn alert_and_silent(mut settings: Settings) {
    let apple = apple(&mut settings).await;
    let server = server::start(settings).await;
    server
        .registry
        .put_user(&Id::from(50), &ios("aa50", "produce"))
        .await
        .unwrap();
    server
        .registry
        .put_user(&Id::from(51), &ios("bb51", "develop"))
        .await
        .unwrap();
    let mut backend = Backend::connect(server.proxy_addr).await;

    let alert = json!({"alert": "hi", "sound": "default", "x": 1});
    assert_eq!(backend.push(2, Mp::from(50), &alert).await, 0);
    assert_notification(
        &apple.production.next_request(WAIT).await,
        "aa50",
        true,
        alert,
    );

    let silent = json!({"x": 2});
    assert_eq!(backend.push(3, Mp::from("51"), &silent).await, 0);
    assert_notification(
        &apple.sandbox.next_request(WAIT).await,
        "bb51",
        false,
        silent,
    );

    wait_until_delivered(&server, 2).await;
    server.stop().await;
}

both_registries!(focus_moves_silent_pushes_to_mqtt, focus_routing);
async fn focus_routing(mut settings: Settings) {
    let apple = apple(&mut settings).await;
    let server = server::start(settings).await;
    server
        .registry
        .put_user(&Id::from(60), &ios("cc60", "produce"))
        .await
        .unwrap();
    let mut backend = Backend::connect(server.proxy_addr).await;
    let mut app = Device::connect(server.mqtt_addr, "app-60", true).await;
    app.subscribe("push/user/60").await;

    // In focus: silent over MQTT, alerts still over APNs.
    app.publish("push/app/status", br#"{"user_id": 60, "focus": true}"#)
        .await;
    support::wait_for_focus(&server, "60", true).await;
    assert_eq!(backend.push(2, Mp::from(60), &json!({"s": 1})).await, 0);
    assert_eq!(app.next_json().await, json!({"s": 1}));
    assert_eq!(
        backend.push(2, Mp::from(60), &json!({"alert": "a"})).await,
        0
    );
    let req = apple.production.next_request(WAIT).await;
    assert_notification(&req, "cc60", true, json!({"alert": "a"}));

    // The app's connection drops: focus is cleared, silent goes to APNs.
    drop(app);
    support::wait_for_focus(&server, "60", false).await;
    assert_eq!(backend.push(2, Mp::from(60), &json!({"s": 2})).await, 0);
    let req = apple.production.next_request(WAIT).await;
    assert_notification(&req, "cc60", false, json!({"s": 2}));
    server.stop().await;
}

both_registries!(group_push_reaches_mqtt_and_ios_members, group_push, cluster);
async fn group_push(mut settings: Settings) {
    let apple = apple(&mut settings).await;
    let server = server::start(settings).await;
    let r = &server.registry;
    r.put_user(&Id::from(71), &ios("dd71", "produce"))
        .await
        .unwrap();
    r.put_user(&Id::from(72), &ios("ee72", "produce"))
        .await
        .unwrap();
    r.set_focus(&Id::from(72), true).await.unwrap();
    for uid in [71, 72] {
        r.add_group_apple_member(&Id::from(9), &Id::from(uid))
            .await
            .unwrap();
    }
    let mut member = Device::connect(server.mqtt_addr, "android-73", true).await;
    member.subscribe("push/group/9").await;
    let mut backend = Backend::connect(server.proxy_addr).await;

    // Alert: one group publish, APNs for both iOS members.
    let alert = json!({"alert": "g"});
    assert_eq!(backend.push(1, Mp::from(9), &alert).await, 0);
    assert_eq!(member.next_json().await, alert);
    let mut tokens = vec![
        apple.production.next_request(WAIT).await.path,
        apple.production.next_request(WAIT).await.path,
    ];
    tokens.sort();
    assert_eq!(tokens, ["/3/device/dd71", "/3/device/ee72"]);

    // Silent: the member in focus gets it over MQTT only; the next APNs
    // request after 71's is the sentinel alert, not one for 72.
    assert_eq!(backend.push(1, Mp::from("9"), &json!({"s": 1})).await, 0);
    assert_eq!(member.next_json().await, json!({"s": 1}));
    assert_eq!(
        apple.production.next_request(WAIT).await.path,
        "/3/device/dd71"
    );
    assert_eq!(
        backend
            .push(2, Mp::from(71), &json!({"alert": "sentinel"}))
            .await,
        0
    );
    let req = apple.production.next_request(WAIT).await;
    assert_notification(&req, "dd71", true, json!({"alert": "sentinel"}));
    server.stop().await;
}

both_registries!(dead_tokens_go_and_backends_hear_of_it, dead_tokens, cluster);
async fn dead_tokens(mut settings: Settings) {
    settings.apns.retry_attempts = 2;
    settings.apns.retry_base_ms = 5;
    let apple = apple(&mut settings).await;
    let gone = Reply::Unregistered {
        timestamp: 1_700_000_000_000,
    };
    apple.production.reply_to("a81", gone.clone());
    apple.production.reply_to("b82", gone);
    apple.production.reply_to("c83", Reply::InternalServerError);
    let server = server::start(settings).await;
    let r = &server.registry;
    for (uid, token) in [(81, "a81"), (82, "b82"), (83, "c83")] {
        r.put_user(&Id::from(uid), &ios(token, "produce"))
            .await
            .unwrap();
    }
    let mut ops = Device::connect(server.mqtt_addr, "backend-feedback", true).await;
    ops.subscribe("push/feedback").await;
    let mut backend = Backend::connect(server.proxy_addr).await;

    // 81's token is dead and still its own: removed, reported.
    assert_eq!(
        backend.push(2, Mp::from(81), &json!({"alert": "a"})).await,
        0
    );
    let fb = ops.next_json().await;
    assert_eq!(
        (
            &fb["user_id"],
            &fb["token"],
            &fb["app_ident"],
            &fb["reason"]
        ),
        (
            &json!(81),
            &json!("a81"),
            &json!(APP),
            &json!("Unregistered")
        )
    );
    assert!(fb["at"].as_u64().unwrap() > 1_700_000_000);
    let rec = r.users(&[Id::from(81)]).await.unwrap().remove(0).unwrap();
    assert_eq!(rec.app_token, None);

    // 82 re-registers while Apple answers for its old token: the new one stays.
    apple.production.hold_answers_until(3);
    assert_eq!(
        backend.push(2, Mp::from(82), &json!({"alert": "b"})).await,
        0
    );
    assert_eq!(
        apple.production.next_request(WAIT).await.path,
        "/3/device/a81"
    );
    assert_eq!(
        apple.production.next_request(WAIT).await.path,
        "/3/device/b82"
    );
    r.put_user(&Id::from(82), &ios("new82", "produce"))
        .await
        .unwrap();
    // A third request releases the held answers.
    r.put_user(&Id::from(50), &ios("d50", "produce"))
        .await
        .unwrap();
    assert_eq!(
        backend.push(2, Mp::from(50), &json!({"alert": "c"})).await,
        0
    );
    let fb = ops.next_json().await;
    assert_eq!((&fb["user_id"], &fb["token"]), (&json!(82), &json!("b82")));
    let rec = r.users(&[Id::from(82)]).await.unwrap().remove(0).unwrap();
    assert_eq!(rec.app_token.as_deref(), Some("new82"));

    // 83 keeps failing: retried, dropped, reported.
    assert_eq!(
        backend.push(2, Mp::from(83), &json!({"alert": "d"})).await,
        0
    );
    let fb = ops.next_json().await;
    assert_eq!((&fb["user_id"], &fb["token"]), (&json!(83), &json!("c83")));
    assert!(
        fb["reason"]
            .as_str()
            .unwrap()
            .contains("InternalServerError"),
        "{fb}"
    );
    let stats = &server.stats;
    assert_eq!(stats.apns_dead_tokens.get(), 2);
    assert_eq!(stats.apns_tokens_deleted.get(), 1);
    assert_eq!(stats.apns_retries_exhausted.get(), 1);
    assert_eq!(stats.apns_feedback.get(), 3);
    server.stop().await;
}

async fn wait_until_delivered(server: &pushbridge::Server, n: u64) {
    let stats = server.stats.clone();
    support::wait_until(move || std::future::ready(stats.apns_delivered.get() == n)).await;
}
