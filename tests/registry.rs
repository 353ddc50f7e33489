//! The same registry tests against Redis (a real redis-server) and memory.

mod support;

use pushbridge::push::{Id, UserRecord};
use pushbridge::registry::{MemoryRegistry, RedisRegistry, Registry, UserStore};
use pushbridge::settings::RegistrySettings;
use redis::Commands;
use support::redis::RedisServer;

fn ios(token: &str) -> UserRecord {
    UserRecord {
        app_token: Some(token.into()),
        app_ident: Some("com.example.app".into()),
        app_version: Some("develop".into()),
        app_focus: false,
    }
}

async fn exercise(r: &impl UserStore) {
    let (a, b, c) = (Id::from("1"), Id::from("2"), Id::from("3"));
    assert_eq!(
        r.users(&[a.clone(), b.clone()]).await.unwrap(),
        vec![None, None]
    );
    assert!(r.users(&[]).await.unwrap().is_empty());

    r.put_user(&a, &ios("aa")).await.unwrap();
    r.put_user(&c, &ios("cc")).await.unwrap();
    let got = r.users(&[c.clone(), b.clone(), a.clone()]).await.unwrap();
    assert_eq!(got, vec![Some(ios("cc")), None, Some(ios("aa"))]);

    r.set_focus(&a, true).await.unwrap();
    assert!(
        r.users(std::slice::from_ref(&a)).await.unwrap()[0]
            .as_ref()
            .unwrap()
            .app_focus
    );
    r.set_focus(&a, false).await.unwrap();
    assert_eq!(
        r.users(std::slice::from_ref(&a)).await.unwrap()[0],
        Some(ios("aa"))
    );

    let (g, h) = (Id::from("7"), Id::from("8"));
    r.add_group_apple_member(&g, &a).await.unwrap();
    r.add_group_apple_member(&g, &c).await.unwrap();
    r.add_group_apple_member(&g, &a).await.unwrap();
    let mut members = r
        .group_apple_members(&[h.clone(), g.clone()])
        .await
        .unwrap();
    members[1].sort();
    assert_eq!(members, vec![vec![], vec![a.clone(), c.clone()]]);

    r.remove_group_apple_member(&g, &a).await.unwrap();
    r.remove_group_apple_member(&h, &a).await.unwrap();
    let members = r
        .group_apple_members(std::slice::from_ref(&g))
        .await
        .unwrap();
    assert_eq!(members, vec![vec![c.clone()]]);

    // A dead token goes only while it is still the user's token.
    assert!(!r.delete_token_if(&c, "other").await.unwrap());
    assert!(!r.delete_token_if(&b, "cc").await.unwrap());
    assert!(r.delete_token_if(&c, "cc").await.unwrap());
    assert!(!r.delete_token_if(&c, "cc").await.unwrap());
    let left = r.users(std::slice::from_ref(&c)).await.unwrap().remove(0);
    let left = left.expect("the record stays");
    assert_eq!(left.app_token, None);
    assert_eq!(left.app_ident.as_deref(), Some("com.example.app"));
    r.put_user(&c, &ios("cc")).await.unwrap();

    assert!(r.delete_user(&a).await.unwrap());
    assert!(!r.delete_user(&a).await.unwrap());
    assert_eq!(
        r.users(&[a.clone(), c.clone()]).await.unwrap(),
        vec![None, Some(ios("cc"))]
    );
    r.ping().await.unwrap();
}

#[tokio::test]
async fn memory_registry() {
    exercise(&MemoryRegistry::default()).await;
}

#[tokio::test]
async fn redis_registry() {
    let redis = RedisServer::start();
    let r = RedisRegistry::connect(&redis.url, &RegistrySettings::default())
        .await
        .unwrap();
    exercise(&r).await;
}

#[tokio::test]
async fn configured_registry_delegates() {
    exercise(&Registry::open(&RegistrySettings::default()).await.unwrap()).await;
    let redis = RedisServer::start();
    let settings = RegistrySettings {
        redis_url: Some(redis.url.clone()),
        ..Default::default()
    };
    let r = Registry::open(&settings).await.unwrap();
    assert_eq!(r.describe(), "redis");
    exercise(&r).await;
}

/// Data written by the old service (raw HSET/SADD) reads back; focus writes
/// land where the old service looks.
#[tokio::test]
async fn old_service_schema() {
    let redis = RedisServer::start();
    let mut raw = redis.conn();
    let _: () = raw
        .hset_multiple(
            "User:42",
            &[
                ("app_token", "deadbeef"),
                ("app_ident", "com.example.app"),
                ("app_version", "produce"),
                ("app_focus", "1"),
                ("other", "ignored"),
            ],
        )
        .unwrap();
    let _: () = raw.sadd("GroupAppleUser:9", &[42, 43]).unwrap();
    let r = RedisRegistry::connect(&redis.url, &RegistrySettings::default())
        .await
        .unwrap();
    let rec = r.users(&[Id::from(42)]).await.unwrap().remove(0).unwrap();
    assert_eq!(rec.app_token.as_deref(), Some("deadbeef"));
    assert_eq!(rec.app_version.as_deref(), Some("produce"));
    assert!(rec.app_focus);
    let mut members = r
        .group_apple_members(&[Id::from(9)])
        .await
        .unwrap()
        .remove(0);
    members.sort();
    assert_eq!(members, vec![Id::from(42), Id::from(43)]);

    r.set_focus(&Id::from(42), false).await.unwrap();
    let focus: Option<String> = raw.hget("User:42", "app_focus").unwrap();
    assert_eq!(focus, None);
    r.set_focus(&Id::from(42), true).await.unwrap();
    let focus: Option<String> = raw.hget("User:42", "app_focus").unwrap();
    assert_eq!(focus.as_deref(), Some("1"));
}

#[tokio::test]
async fn key_formats_are_configurable() {
    let redis = RedisServer::start();
    let settings = RegistrySettings {
        redis_url: Some(redis.url.clone()),
        user_key: "app:{id}:user".into(),
        group_apple_key: "ios-group:{id}".into(),
        ..RegistrySettings::default()
    };
    let r = RedisRegistry::connect(&redis.url, &settings).await.unwrap();
    r.put_user(&Id::from("5"), &ios("55")).await.unwrap();
    r.add_group_apple_member(&Id::from("6"), &Id::from("5"))
        .await
        .unwrap();
    let mut raw = redis.conn();
    let token: String = raw.hget("app:5:user", "app_token").unwrap();
    assert_eq!(token, "55");
    let is_member: bool = raw.sismember("ios-group:6", "5").unwrap();
    assert!(is_member);
}

#[tokio::test]
async fn unreachable_redis_is_a_clear_error() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let url = format!("redis://127.0.0.1:{port}/");
    let err = RedisRegistry::connect(&url, &RegistrySettings::default())
        .await
        .err()
        .expect("nothing listens there");
    assert!(err.to_string().contains(&url), "{err}");
}
