//! The same registry tests against Redis (a real redis-server) and memory.

mod support;

use pushbridge::push::{Id, UserRecord};
use pushbridge::registry::{MemoryRegistry, RedisRegistry, Registry, UserStore};
use pushbridge::settings::RegistrySettings;
use redis::Commands;
use support::redis::RedisServer;
use support::redis_cluster::{RedisCluster, RedisSentinel};

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

/// A key of the wrong type costs its own user's lookup, not the batch's.
async fn wrong_type_keys(r: &impl UserStore, mut raw: impl FnMut(&str)) {
    r.put_user(&Id::from("7001"), &ios("good")).await.unwrap();
    raw("User:7002");
    raw("Group:7003");
    let got = r
        .users(&[Id::from("7001"), Id::from("7002")])
        .await
        .expect("one bad key does not fail the batch");
    assert_eq!(got, vec![Some(ios("good")), None]);
    let sets = r
        .group_apple_members(&[Id::from("7003")])
        .await
        .expect("a bad group key reads as empty");
    assert_eq!(sets, vec![Vec::<Id>::new()]);
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
    let mut conn = redis.conn();
    wrong_type_keys(&r, |key| conn.set::<_, _, ()>(key, "not a hash").unwrap()).await;
}

/// A batch lookup whose keys live on different masters still answers in
/// order (redis-rs refuses cross-slot pipelines; the registry fans out).
#[tokio::test]
async fn redis_cluster_registry() {
    let cluster = RedisCluster::start();
    let r = RedisRegistry::connect(&cluster.url, &RegistrySettings::default())
        .await
        .unwrap();
    exercise(&r).await;
    let mut conn = cluster.conn();
    wrong_type_keys(&r, |key| conn.set::<_, _, ()>(key, "not a hash").unwrap()).await;
    let ids: Vec<Id> = (100..160).map(Id::from).collect();
    for id in &ids {
        r.put_user(id, &ios(&format!("t{id}"))).await.unwrap();
    }
    let got = r.users(&ids).await.unwrap();
    for (id, rec) in ids.iter().zip(got) {
        assert_eq!(rec, Some(ios(&format!("t{id}"))));
    }
    assert_every_node_holds_users(&cluster.ports);
    let token: String = cluster.conn().hget("User:100", "app_token").unwrap();
    assert_eq!(token, "t100");
    let r = Registry::open(&RegistrySettings {
        redis_url: Some(cluster.url.clone()),
        ..Default::default()
    })
    .await
    .unwrap();
    assert_eq!(r.describe(), "redis cluster");
}

/// The master named by a sentinel serves the registry.
#[tokio::test]
async fn redis_sentinel_registry() {
    let sentinel = RedisSentinel::start();
    let r = RedisRegistry::connect(&sentinel.url, &RegistrySettings::default())
        .await
        .unwrap();
    exercise(&r).await;
    let mut master = redis::Client::open(format!("redis://127.0.0.1:{}/", sentinel.master_port))
        .and_then(|c| c.get_connection())
        .unwrap();
    let token: String = master.hget("User:3", "app_token").unwrap();
    assert_eq!(token, "cc");

    // After a failover the old master turns read-only (the sentinel demotes
    // it); the failed write makes the registry ask the sentinel again, and
    // from then on writes land on the promoted replica. (Writes in the
    // moment before the demotion reach the old master: Sentinel's usual
    // window, not something a client can close.)
    sentinel.failover();
    let promoted =
        redis::Client::open(format!("redis://127.0.0.1:{}/", sentinel.replica_port)).unwrap();
    let (id, rec) = (Id::from("4"), ios("44"));
    support::wait_until(|| {
        let (r, id, rec, promoted) = (r.clone(), id.clone(), rec.clone(), promoted.clone());
        async move {
            let written = r.put_user(&id, &rec).await.is_ok();
            let mut conn = promoted.get_connection().unwrap();
            let token: Option<String> = conn.hget("User:4", "app_token").unwrap();
            written && token.is_some()
        }
    })
    .await;
    let mut conn = promoted.get_connection().unwrap();
    let token: String = conn.hget("User:4", "app_token").unwrap();
    assert_eq!(token, "44");
}

/// `rediss` for every deployment: the server, every cluster node, the
/// sentinel and the master it names, each verified against
/// `registry.redis_ca_file`; without it (the public web roots) the test
/// CA's certificate is refused.
#[tokio::test]
async fn redis_over_tls() {
    let dir = tempfile::tempdir().unwrap();
    let pki = support::pki::pki(dir.path(), "redis");
    let single = RedisServer::start_tls(&pki);
    let cluster = RedisCluster::start_tls(&pki);
    let sentinel = RedisSentinel::start_tls(&pki);
    for (url, kind) in [
        (&single.url, "redis"),
        (&cluster.url, "redis cluster"),
        (&sentinel.url, "redis sentinel"),
    ] {
        assert!(url.starts_with("rediss"), "{url}");
        let settings = RegistrySettings {
            redis_url: Some(url.clone()),
            redis_ca_file: Some(pki.ca.clone()),
            ..Default::default()
        };
        let r = Registry::open(&settings).await.unwrap();
        assert_eq!(r.describe(), kind);
        exercise(&r).await;
        let untrusted = RegistrySettings {
            redis_ca_file: None,
            ..settings
        };
        let Err(e) = Registry::open(&untrusted).await else {
            panic!("{url}: a certificate from an unknown CA was accepted");
        };
        let msg = e.to_string();
        assert!(
            msg.contains("UnknownIssuer") || msg.contains("certificate"),
            "{url}: {msg}"
        );
    }
    let mut plain = single.conn();
    let token: String = plain.hget("User:3", "app_token").unwrap();
    assert_eq!(token, "cc");
    // Keys on every master: each was reached over TLS (the URL names only
    // TLS ports, and the cluster announces its TLS ports to TLS clients).
    let r = Registry::open(&RegistrySettings {
        redis_url: Some(cluster.url.clone()),
        redis_ca_file: Some(pki.ca.clone()),
        ..Default::default()
    })
    .await
    .unwrap();
    for id in (100..160).map(Id::from) {
        r.put_user(&id, &ios("t")).await.unwrap();
    }
    assert_every_node_holds_users(&cluster.ports);
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
        ..Default::default()
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

/// Keys are spread over the masters: each of `ports` holds some.
fn assert_every_node_holds_users(ports: &[u16]) {
    for port in ports {
        let mut node = redis::Client::open(format!("redis://127.0.0.1:{port}/"))
            .and_then(|c| c.get_connection())
            .unwrap();
        let keys: u64 = redis::cmd("DBSIZE").query(&mut node).unwrap();
        assert!(keys > 0, "node {port} holds none of the users");
    }
}
