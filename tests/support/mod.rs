//! Shared test harness: a real redis-server, the whole pushbridge in-process
//! on 127.0.0.1:0, raw proxy frames, real MQTT clients and a real headless
//! Chromium.
#![allow(dead_code)]

pub mod binary;
pub mod browser;
pub mod http;
pub mod mosquitto;
pub mod mqtt;
pub mod pki;
pub mod proxy;
pub mod rabbitmq;
pub mod redis;
pub mod redis_cluster;
pub mod server;
pub mod webhook;

use std::time::Duration;

/// Bounds a wait that only a failure would exceed; never a timing claim.
pub const WAIT: Duration = Duration::from_secs(10);

/// Polls `cond` (cheap local state: counters, registry reads) until it holds;
/// panics after WAIT. For state with no event to wait on.
/// Waits until `cond` holds for the server's counters.
pub async fn wait_for(
    stats: &std::sync::Arc<pushbridge::stats::Stats>,
    cond: impl Fn(&pushbridge::stats::Stats) -> bool,
) {
    let stats = stats.clone();
    wait_until(move || {
        let ok = cond(&stats);
        async move { ok }
    })
    .await;
}

pub async fn wait_until<F, Fut>(mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + WAIT;
    while !cond().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "condition not reached within {WAIT:?}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

/// Runs `$body(settings)` as two tests: with the in-memory registry and with
/// a real redis-server; with `cluster`, also against a real three-master
/// Redis Cluster (a few seconds more each, so only where routing touches the
/// registry in a way a cluster could break).
#[macro_export]
macro_rules! both_registries {
    ($name:ident, $body:ident) => {
        $crate::both_registries!($name, $body, {});
    };
    ($name:ident, $body:ident, cluster) => {
        $crate::both_registries!($name, $body, {
            #[tokio::test]
            async fn redis_cluster() {
                let redis = $crate::support::redis_cluster::RedisCluster::start();
                super::$body($crate::support::server::settings(Some(&redis.url))).await;
            }
        });
    };
    ($name:ident, $body:ident, { $($extra:tt)* }) => {
        mod $name {
            #[tokio::test]
            async fn memory() {
                super::$body($crate::support::server::settings(None)).await;
            }
            #[tokio::test]
            async fn redis() {
                let redis = $crate::support::redis::RedisServer::start();
                super::$body($crate::support::server::settings(Some(&redis.url))).await;
            }
            $($extra)*
        }
    };
}

/// Waits until the registry's `app_focus` for `uid` is `focus`.
pub async fn wait_for_focus(server: &pushbridge::Server, uid: &str, focus: bool) {
    use pushbridge::registry::UserStore;
    let registry = server.registry.clone();
    let uid = pushbridge::push::Id::from(uid);
    wait_until(move || {
        let registry = registry.clone();
        let uid = uid.clone();
        async move {
            let rec = registry.users(std::slice::from_ref(&uid)).await.unwrap();
            rec[0].as_ref().is_some_and(|r| r.app_focus) == focus
        }
    })
    .await;
}

/// A user record for an iOS device: `token` of `app`, production.
pub fn ios_user(token: &str, app: &str) -> pushbridge::push::UserRecord {
    pushbridge::push::UserRecord {
        app_token: Some(token.into()),
        app_ident: Some(app.into()),
        app_version: Some("produce".into()),
        app_focus: false,
    }
}

/// Gives `user` an iOS record: `token` of `app` (see `ios_user`).
pub async fn put_ios_user(
    server: &pushbridge::Server,
    user: &pushbridge::push::Id,
    token: &str,
    app: &str,
) {
    use pushbridge::registry::UserStore;
    let record = ios_user(token, app);
    server
        .registry
        .put_user(user, &record)
        .await
        .expect("record written");
}

/// Gives `uid` a record (no APNs token): status messages set focus only
/// for users who have one.
pub async fn register(server: &pushbridge::Server, uid: &str) {
    use pushbridge::registry::UserStore;
    let record = pushbridge::push::UserRecord {
        app_version: Some("produce".into()),
        ..Default::default()
    };
    server
        .registry
        .put_user(&pushbridge::push::Id::from(uid), &record)
        .await
        .expect("record written");
}

/// The app's status message sets focus, and clears it again (the user id as
/// a number, then as a string), published by a client of the broker at `mqtt`.
pub async fn status_sets_and_clears_focus(server: &pushbridge::Server, mqtt: std::net::SocketAddr) {
    register(server, "77").await;
    let mut app = mqtt::Device::connect(mqtt, "app-77", true).await;
    app.publish("push/app/status", br#"{"user_id": 77, "focus": true}"#)
        .await;
    wait_for_focus(server, "77", true).await;
    app.publish("push/app/status", br#"{"user_id": "77", "focus": false}"#)
        .await;
    wait_for_focus(server, "77", false).await;
}
