//! The APNs sender against a local HTTP/2 TLS server answering as Apple does.

#[path = "support/apns.rs"]
mod apns_server;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use apns_server::{ApnsServer, ClientCert, Reply, ServerOptions, TestCredentials};
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use p256::ecdsa::signature::Verifier;
use pushbridge::apns::{check_config, ApnsJob, ApnsSender, Feedback, Sinks};
use pushbridge::lifecycle::{Lifecycle, Phase};
use pushbridge::mqtt::Broker;
use pushbridge::push::{Id, UserRecord};
use pushbridge::registry::{MemoryRegistry, Registry, UserStore};
use pushbridge::router::{ApnsDelivery, Environment};
use pushbridge::settings::{ApnsSettings, MqttSettings, QueueFull};
use pushbridge::stats::{Counter, Stats};
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;

const WAIT: Duration = Duration::from_secs(10);
const APP: &str = "com.example.app";

fn settings(config: PathBuf, production: &ApnsServer, sandbox: &ApnsServer) -> ApnsSettings {
    ApnsSettings {
        config,
        production_url: production.url(),
        sandbox_url: sandbox.url(),
        ca_file: Some(production.ca_path()),
        expiration_secs: 3600,
        queue: 16,
        request_timeout_secs: 10,
        retry_attempts: 3,
        retry_base_ms: 5,
        retry_max_secs: 10,
        ..ApnsSettings::default()
    }
}

/// A started sender with what it needs to stop.
struct Running {
    sender: ApnsSender,
    stats: Arc<Stats>,
    registry: Registry,
    rest: Phase,
}

impl Running {
    fn start(settings: &ApnsSettings) -> Running {
        let _ = tracing_subscriber::fmt()
            .with_env_filter("pushbridge=debug")
            .with_test_writer()
            .try_init();
        let stats = Arc::new(Stats::default());
        let rest = Lifecycle::new(CancellationToken::new()).rest;
        let registry = Registry::Memory(MemoryRegistry::default());
        let (broker, _events) = Broker::new(&MqttSettings::default());
        let sinks = Sinks {
            stats: Arc::clone(&stats),
            registry: registry.clone(),
            feedback: Feedback::new(broker, "push/feedback".into()),
            receipts: Default::default(),
            notices: Default::default(),
        };
        let sender = ApnsSender::start(settings, sinks, &rest).expect("sender starts");
        Running {
            sender,
            stats,
            registry,
            rest,
        }
    }

    async fn send(&self, token: &str, app: &str, env: Environment, data: Value) {
        let data = Arc::new(data.as_object().cloned().expect("data is an object"));
        let delivery = ApnsDelivery {
            user: "42".into(),
            token: token.into(),
            app_ident: app.into(),
            env,
        };
        self.sender
            .send(ApnsJob {
                delivery,
                data,
                options: None,
                ack: None,
                receipt: None,
            })
            .await;
    }

    /// Stops the sender and waits for all its tasks.
    async fn stop(self) {
        tokio::time::timeout(WAIT, self.rest.end())
            .await
            .expect("sender tasks stop on shutdown");
    }
}

/// Waits until `counter` reaches `n`; the timeout only bounds a failure.
async fn wait_count(counter: &Counter, n: u64) {
    let reached = tokio::time::timeout(WAIT, async {
        while counter.get() < n {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    })
    .await;
    assert!(
        reached.is_ok(),
        "counter stuck at {} (want {n})",
        counter.get()
    );
}

fn token_app(creds: &TestCredentials) -> (PathBuf, p256::ecdsa::VerifyingKey) {
    let (key, public) = creds.p8("AuthKey_ABC123.p8");
    let config = creds.config(&json!({
        APP: { "key": key, "key_id": "ABC123", "team_id": "TEAM456" }
    }));
    (config, public)
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .expect("clock after 1970")
        .as_secs()
}

#[tokio::test]
async fn alert_and_silent_push_on_the_wire() {
    let server = ApnsServer::start().await;
    let creds = TestCredentials::new();
    let (config, _) = token_app(&creds);
    let run = Running::start(&settings(config, &server, &server));

    let before = unix_now();
    run.send(
        "aa11",
        APP,
        Environment::Production,
        json!({"alert": "hello", "sound": "default", "badge": 2, "room": 7}),
    )
    .await;
    let r = server.next_request(WAIT).await;
    let after = unix_now();
    assert_eq!(r.method, http::Method::POST);
    assert_eq!(r.path, "/3/device/aa11");
    assert_eq!(r.header("apns-topic"), Some(APP));
    assert_eq!(r.header("apns-push-type"), Some("alert"));
    assert_eq!(r.header("apns-priority"), Some("10"));
    let exp: u64 = r.header("apns-expiration").unwrap().parse().unwrap();
    assert!((before + 3600..=after + 3600).contains(&exp), "{exp}");
    assert!(r.header("authorization").unwrap().starts_with("bearer "));
    assert_eq!(
        r.body,
        json!({"aps": {"alert": "hello", "sound": "default", "badge": 2},
               "data": {"alert": "hello", "sound": "default", "badge": 2, "room": 7}})
    );

    run.send("bb22", APP, Environment::Production, json!({"room": 7}))
        .await;
    let r = server.next_request(WAIT).await;
    assert_eq!(r.path, "/3/device/bb22");
    assert_eq!(r.header("apns-topic"), Some(APP));
    assert_eq!(r.header("apns-push-type"), Some("background"));
    assert_eq!(r.header("apns-priority"), Some("5"));
    assert_eq!(
        r.body,
        json!({"aps": {"content-available": 1}, "data": {"room": 7}})
    );
    wait_count(&run.stats.apns_delivered, 2).await;
    assert_eq!(run.stats.apns_queued.get(), 2);
    assert_eq!(run.stats.apns_failed.get(), 0);
    run.stop().await;
}

#[tokio::test]
async fn zero_expiration_is_sent_as_zero() {
    let server = ApnsServer::start().await;
    let creds = TestCredentials::new();
    let (config, _) = token_app(&creds);
    let mut s = settings(config, &server, &server);
    s.expiration_secs = 0;
    let run = Running::start(&s);
    run.send("aa11", APP, Environment::Sandbox, json!({"alert": "x"}))
        .await;
    let r = server.next_request(WAIT).await;
    assert_eq!(r.header("apns-expiration"), Some("0"));
    run.stop().await;
}

#[tokio::test]
async fn token_auth_jwt_verifies_with_the_p8_public_key() {
    let server = ApnsServer::start().await;
    let creds = TestCredentials::new();
    let (config, public) = token_app(&creds);
    let run = Running::start(&settings(config, &server, &server));
    run.send("aa11", APP, Environment::Production, json!({"alert": "x"}))
        .await;
    run.send("aa12", APP, Environment::Production, json!({"alert": "y"}))
        .await;
    run.send("aa13", APP, Environment::Sandbox, json!({"alert": "z"}))
        .await;
    let first = server.next_request(WAIT).await;
    let second = server.next_request(WAIT).await;
    let sandbox = server.next_request(WAIT).await;
    assert_eq!(first.client_subject, None);
    let auth = first.header("authorization").unwrap();
    assert_eq!(second.header("authorization"), Some(auth), "token reused");
    assert_eq!(
        sandbox.header("authorization"),
        Some(auth),
        "one token per app"
    );
    let jwt = auth.strip_prefix("bearer ").expect("bearer scheme");
    let parts: Vec<&str> = jwt.split('.').collect();
    assert_eq!(parts.len(), 3, "{jwt}");
    let decode = |p: &str| -> Value {
        serde_json::from_slice(&URL_SAFE_NO_PAD.decode(p).expect("base64url")).expect("json")
    };
    assert_eq!(decode(parts[0]), json!({"alg": "ES256", "kid": "ABC123"}));
    let claims = decode(parts[1]);
    assert_eq!(claims["iss"], "TEAM456");
    let iat = claims["iat"].as_u64().expect("iat");
    assert!(iat <= unix_now() && iat + 3600 > unix_now(), "{iat}");
    let sig = p256::ecdsa::Signature::from_slice(&URL_SAFE_NO_PAD.decode(parts[2]).unwrap())
        .expect("64-byte ES256 signature");
    public
        .verify(format!("{}.{}", parts[0], parts[1]).as_bytes(), &sig)
        .expect("signature verifies with the .p8 public key");
    run.stop().await;
}

#[tokio::test]
async fn sandbox_and_production_go_to_their_hosts_with_their_certificates() {
    let production = ApnsServer::start_requiring_client_cert().await;
    let sandbox = ApnsServer::start_requiring_client_cert().await;
    let creds = TestCredentials::new();
    let dev = ClientCert::new("app develop");
    let prod = ClientCert::new("app produce");
    let config = creds.config(&json!({ APP: {
        "develop": creds.pem("develop.pem", &dev, None),
        "produce": creds.pem("produce.pem", &prod, None),
    }}));
    let run = Running::start(&settings(config, &production, &sandbox));

    run.send("5a11", APP, Environment::Sandbox, json!({"alert": "s"}))
        .await;
    let r = sandbox.next_request(WAIT).await;
    assert_eq!(r.path, "/3/device/5a11");
    assert_eq!(r.client_subject.as_deref(), Some(dev.subject.as_str()));
    assert_eq!(r.header("authorization"), None);

    run.send("9a11", APP, Environment::Production, json!({"alert": "p"}))
        .await;
    let r = production.next_request(WAIT).await;
    assert_eq!(r.path, "/3/device/9a11");
    assert_eq!(r.client_subject.as_deref(), Some(prod.subject.as_str()));

    wait_count(&run.stats.apns_delivered, 2).await;
    assert!(sandbox.try_next_request(Duration::ZERO).await.is_none());
    assert!(production.try_next_request(Duration::ZERO).await.is_none());
    run.stop().await;
}

#[tokio::test]
async fn pem_encrypted_pem_and_p12_present_the_client_certificate() {
    let server = ApnsServer::start_requiring_client_cert().await;
    let creds = TestCredentials::new();
    let plain = ClientCert::new("plain pem");
    let encrypted = ClientCert::new("encrypted pem");
    let p12 = ClientCert::new("pkcs12");
    let config = creds.config(&json!({
        "app.plain": { "develop": creds.pem("plain.pem", &plain, None) },
        "app.encrypted": {
            "develop": creds.pem("enc.pem", &encrypted, Some("secret")),
            "password": "secret",
        },
        "app.p12": { "develop": creds.p12("cert.p12", &p12, "secret"), "password": "secret" },
    }));
    let run = Running::start(&settings(config, &server, &server));
    assert_eq!(run.sender.configured().len(), 3);
    for (app, cert) in [
        ("app.plain", &plain),
        ("app.encrypted", &encrypted),
        ("app.p12", &p12),
    ] {
        run.send("aa11", app, Environment::Sandbox, json!({"alert": app}))
            .await;
        let r = server.next_request(WAIT).await;
        assert_eq!(r.header("apns-topic"), Some(app));
        assert_eq!(
            r.client_subject.as_deref(),
            Some(cert.subject.as_str()),
            "{app}"
        );
    }
    wait_count(&run.stats.apns_delivered, 3).await;
    run.stop().await;
}

#[tokio::test]
async fn payload_over_4096_bytes_is_counted_and_not_sent() {
    let server = ApnsServer::start().await;
    let creds = TestCredentials::new();
    let (config, _) = token_app(&creds);
    let run = Running::start(&settings(config, &server, &server));
    run.send(
        "b1a5",
        APP,
        Environment::Production,
        json!({"alert": "x".repeat(3000)}),
    )
    .await;
    run.send(
        "5a11",
        APP,
        Environment::Production,
        json!({"alert": "small"}),
    )
    .await;
    let r = server.next_request(WAIT).await;
    assert_eq!(r.path, "/3/device/5a11", "the large one was not sent");
    assert_eq!(run.stats.apns_too_large.get(), 1);
    wait_count(&run.stats.apns_delivered, 1).await;
    assert_eq!(run.stats.apns_failed.get(), 0);
    run.stop().await;
}

#[tokio::test]
async fn error_answers_are_failures_and_the_sender_keeps_working() {
    let server = ApnsServer::start().await;
    server.reply_to(
        "dead",
        Reply::Unregistered {
            timestamp: 1_700_000_000_000,
        },
    );
    server.reply_to("bad", Reply::BadDeviceToken);
    server.reply_to("oops", Reply::InternalServerError);
    server.reply_to("busy", Reply::TooManyRequests);
    let creds = TestCredentials::new();
    let (config, _) = token_app(&creds);
    let mut s = settings(config, &server, &server);
    s.retry_attempts = 1;
    let run = Running::start(&s);
    for token in ["dead", "bad", "oops", "busy"] {
        run.send(token, APP, Environment::Production, json!({"alert": token}))
            .await;
        server.next_request(WAIT).await;
    }
    wait_count(&run.stats.apns_failed, 4).await;
    run.send("a11e", APP, Environment::Production, json!({"alert": "ok"}))
        .await;
    assert_eq!(server.next_request(WAIT).await.path, "/3/device/a11e");
    wait_count(&run.stats.apns_delivered, 1).await;
    assert_eq!(run.stats.apns_failed.get(), 4);
    assert_eq!(run.stats.apns_dead_tokens.get(), 2);
    assert_eq!(run.stats.apns_retries_exhausted.get(), 2);
    assert_eq!(run.stats.apns_retried.get(), 0);
    assert_eq!(server.connections(), 1, "errors do not cost the connection");
    run.stop().await;
}

#[tokio::test]
async fn hundred_concurrent_notifications_share_one_connection() {
    let server = ApnsServer::start().await;
    // No answer until all 100 are in flight: one-at-a-time sending never finishes.
    server.hold_answers_until(100);
    let creds = TestCredentials::new();
    let (config, _) = token_app(&creds);
    let mut s = settings(config, &server, &server);
    s.queue = 128;
    let run = Running::start(&s);
    for i in 0..100 {
        run.send(
            &format!("d{i:03}"),
            APP,
            Environment::Production,
            json!({"n": i}),
        )
        .await;
    }
    let mut paths = Vec::new();
    for _ in 0..100 {
        let r = server.next_request(WAIT).await;
        assert_eq!(r.connection, 1);
        paths.push(r.path);
    }
    paths.sort();
    let want: Vec<String> = (0..100).map(|i| format!("/3/device/d{i:03}")).collect();
    assert_eq!(paths, want);
    wait_count(&run.stats.apns_delivered, 100).await;
    assert_eq!(server.connections(), 1);
    run.stop().await;
}

#[tokio::test]
async fn reconnects_when_the_connection_dies() {
    let server = ApnsServer::start().await;
    let creds = TestCredentials::new();
    let (config, _) = token_app(&creds);
    let run = Running::start(&settings(config, &server, &server));
    run.send("aa11", APP, Environment::Production, json!({"alert": "1"}))
        .await;
    assert_eq!(server.next_request(WAIT).await.connection, 1);
    wait_count(&run.stats.apns_delivered, 1).await;

    server.close_connections().await;
    run.send("aa12", APP, Environment::Production, json!({"alert": "2"}))
        .await;
    let r = server.next_request(WAIT).await;
    assert_eq!((r.path.as_str(), r.connection), ("/3/device/aa12", 2));
    wait_count(&run.stats.apns_delivered, 2).await;
    assert_eq!(run.stats.apns_failed.get(), 0);
    run.stop().await;
}

#[tokio::test]
async fn no_answer_within_the_request_timeout_is_a_failure() {
    let server = ApnsServer::start().await;
    server.hold_answers_until(usize::MAX);
    let creds = TestCredentials::new();
    let (config, _) = token_app(&creds);
    let mut s = settings(config, &server, &server);
    s.request_timeout_secs = 1;
    s.retry_attempts = 1;
    let run = Running::start(&s);
    run.send("aa11", APP, Environment::Production, json!({"alert": "x"}))
        .await;
    server.next_request(WAIT).await;
    wait_count(&run.stats.apns_failed, 1).await;
    assert_eq!(run.stats.apns_delivered.get(), 0);
    run.stop().await;
}

#[tokio::test]
async fn unreachable_or_untrusted_apple_is_a_failure_not_a_panic() {
    let server = ApnsServer::start().await;
    let closed = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let closed_url = format!("https://localhost:{}", closed.local_addr().unwrap().port());
    drop(closed);
    let creds = TestCredentials::new();
    let (config, _) = token_app(&creds);
    let mut s = settings(config, &server, &server);
    s.sandbox_url = closed_url;
    s.ca_file = None;
    let run = Running::start(&s);
    run.send("aa11", APP, Environment::Sandbox, json!({"alert": "x"}))
        .await;
    run.send("aa11", APP, Environment::Production, json!({"alert": "x"}))
        .await;
    wait_count(&run.stats.apns_failed, 2).await;
    assert!(server.try_next_request(Duration::ZERO).await.is_none());
    run.stop().await;
}

#[tokio::test]
async fn unknown_app_or_environment_is_counted_as_no_credentials() {
    let server = ApnsServer::start().await;
    let creds = TestCredentials::new();
    let dev = ClientCert::new("dev only");
    let config = creds.config(&json!({ APP: { "develop": creds.pem("d.pem", &dev, None) }}));
    let run = Running::start(&settings(config, &server, &server));
    run.send(
        "aa11",
        "com.unknown",
        Environment::Sandbox,
        json!({"alert": "x"}),
    )
    .await;
    run.send("aa11", APP, Environment::Production, json!({"alert": "x"}))
        .await;
    run.send("aa11", APP, Environment::Sandbox, json!({"alert": "x"}))
        .await;
    assert_eq!(
        server.next_request(WAIT).await.header("apns-topic"),
        Some(APP)
    );
    assert_eq!(run.stats.apns_no_credentials.get(), 2);
    run.stop().await;
}

#[tokio::test]
async fn a_broken_app_does_not_stop_the_others() {
    let server = ApnsServer::start().await;
    let creds = TestCredentials::new();
    let good = ClientCert::new("good");
    let config = creds.config(&json!({
        "app.broken": { "develop": "missing.pem" },
        "app.badjson": { "develop": 5 },
        "app.good": { "develop": creds.pem("good.pem", &good, None) },
    }));
    let run = Running::start(&settings(config, &server, &server));
    assert_eq!(
        run.sender.configured(),
        &[("app.good".to_string(), Environment::Sandbox)]
    );
    run.send(
        "aa11",
        "app.good",
        Environment::Sandbox,
        json!({"alert": "x"}),
    )
    .await;
    assert_eq!(
        server.next_request(WAIT).await.client_subject,
        Some(good.subject)
    );
    run.stop().await;
}

#[tokio::test]
async fn missing_config_json_starts_with_no_apps() {
    let server = ApnsServer::start().await;
    let dir = tempfile::tempdir().unwrap();
    let s = settings(dir.path().join("config.json"), &server, &server);
    let run = Running::start(&s);
    assert!(run.sender.configured().is_empty());
    run.send("aa11", APP, Environment::Production, json!({"alert": "x"}))
        .await;
    wait_count(&run.stats.apns_no_credentials, 1).await;
    run.stop().await;
    let err = check_config(&s).unwrap_err().to_string();
    assert!(
        err.contains("config.json") && err.contains("not found"),
        "{err}"
    );
}

/// check_config's reports, every app being fine.
fn reports(s: &ApnsSettings) -> Vec<pushbridge::apns::AppReport> {
    check_config(s)
        .expect("config.json is readable")
        .into_iter()
        .map(|(app, check)| check.unwrap_or_else(|e| panic!("{app}: {e}")))
        .collect()
}

#[test]
fn check_config_lists_every_broken_app() {
    let creds = TestCredentials::new();
    let (key, _) = creds.p8("AuthKey_ABC123.p8");
    let s = ApnsSettings {
        config: creds.config(&json!({
            "app.first": { "develop": "gone-first.pem" },
            "app.fine": { "key": key, "key_id": "ABC123", "team_id": "TEAM456" },
            "app.second": { "produce": "gone-second.p12", "password": "pw" },
        })),
        ..ApnsSettings::default()
    };
    let checks = check_config(&s).expect("config.json is readable");
    let apps: Vec<&str> = checks.iter().map(|(app, _)| app.as_str()).collect();
    assert_eq!(apps, ["app.fine", "app.first", "app.second"]);
    assert!(checks[0].1.is_ok(), "{:?}", checks[0].1);
    let error = |i: usize| checks[i].1.as_ref().expect_err("broken").to_string();
    assert!(error(1).contains("gone-first.pem"), "{}", error(1));
    assert!(error(2).contains("gone-second.p12"), "{}", error(2));
}

/// check_config's error for `apps`, which must name `file` and `problem`.
fn check_fails(creds: &TestCredentials, apps: Value, file: &str, problem: &str) {
    let s = ApnsSettings {
        config: creds.config(&apps),
        ..ApnsSettings::default()
    };
    let err = check_config(&s)
        .expect("config.json is readable")
        .into_iter()
        .find_map(|(_, check)| check.err())
        .expect("an app fails")
        .to_string();
    assert!(err.contains(file), "{err:?} should name {file}");
    assert!(err.contains(problem), "{err:?} should say {problem:?}");
}

#[test]
fn check_config_reports_every_app() {
    let creds = TestCredentials::new();
    let dev = ClientCert::new("report develop");
    let prod = ClientCert::new("report produce");
    let (key, _) = creds.p8("AuthKey_ABC123.p8");
    let s = ApnsSettings {
        config: creds.config(&json!({
            "app.cert": {
                "develop": creds.pem("d.pem", &dev, Some("pw")),
                "produce": creds.p12("p.p12", &prod, "pw"),
                "password": "pw",
            },
            "app.token": { "key": key, "key_id": "ABC123", "team_id": "TEAM456" },
        })),
        ..ApnsSettings::default()
    };
    let lines: Vec<String> = reports(&s).iter().map(ToString::to_string).collect();
    assert_eq!(lines.len(), 2);
    assert!(
        lines[0].starts_with("app.cert: certificate; sandbox, production"),
        "{}",
        lines[0]
    );
    assert!(lines[0].contains("CN=report develop") && lines[0].contains("CN=report produce"));
    assert!(lines[0].contains("key matches certificate"), "{}", lines[0]);
    assert!(lines[0].contains("expires"));
    assert!(!lines[0].contains("WARNING"), "{}", lines[0]);
    assert_eq!(
        lines[1],
        "app.token: token auth (key ABC123, team TEAM456); sandbox, production"
    );
}

#[test]
fn check_config_warns_of_a_certificate_expiring_within_30_days() {
    let creds = TestCredentials::new();
    let soon = ClientCert::expiring_in("soon", 10);
    let later = ClientCert::expiring_in("later", 90);
    let s = ApnsSettings {
        config: creds.config(&json!({
            "app.soon": { "develop": creds.pem("soon.pem", &soon, None) },
            "app.later": { "produce": creds.pem("later.pem", &later, None) },
        })),
        ..ApnsSettings::default()
    };
    let reports = reports(&s);
    let line = |app: &str| {
        reports
            .iter()
            .find(|r| r.app == app)
            .map(ToString::to_string)
            .unwrap()
    };
    let soon = line("app.soon");
    assert!(soon.contains("WARNING: expires in under 30 days"), "{soon}");
    assert!(
        soon.contains("(in 9 days)") || soon.contains("(in 10 days)"),
        "{soon}"
    );
    assert!(
        !line("app.later").contains("WARNING"),
        "{}",
        line("app.later")
    );
}

#[test]
fn check_config_names_file_and_problem() {
    let creds = TestCredentials::new();
    let cert = ClientCert::new("c");
    let other = ClientCert::new("other");
    check_fails(
        &creds,
        json!({ APP: { "develop": "nope.pem" } }),
        "nope.pem",
        "No such file",
    );
    let enc = creds.pem("enc.pem", &cert, Some("right"));
    check_fails(
        &creds,
        json!({ APP: { "develop": enc, "password": "wrong" } }),
        "enc.pem",
        "wrong password",
    );
    let p12 = creds.p12("c.p12", &cert, "right");
    check_fails(
        &creds,
        json!({ APP: { "produce": p12, "password": "wrong" } }),
        "c.p12",
        "wrong password",
    );
    let mismatched = creds.mismatched_pem("mismatch.pem", &cert, &other);
    check_fails(
        &creds,
        json!({ APP: { "develop": mismatched } }),
        "mismatch.pem",
        "does not match the certificate",
    );
    let expired = creds.pem("old.pem", &ClientCert::expired("old"), None);
    check_fails(
        &creds,
        json!({ APP: { "develop": expired } }),
        "old.pem",
        "expired",
    );
    let garbage = creds.write("garbage.p8", "not a key");
    check_fails(
        &creds,
        json!({ APP: { "key": garbage, "key_id": "K", "team_id": "T" } }),
        "garbage.p8",
        "not a PKCS#8 P-256",
    );
    let legacy = creds.write(
        "legacy.pem",
        format!(
            "{}-----BEGIN RSA PRIVATE KEY-----\nProc-Type: 4,ENCRYPTED\nDEK-Info: BF-CBC,0001020304050607\n\nAAAA\n-----END RSA PRIVATE KEY-----\n",
            cert.cert_pem
        ),
    );
    check_fails(
        &creds,
        json!({ APP: { "develop": legacy, "password": "x" } }),
        "legacy.pem",
        "openssl pkcs8 -topk8",
    );
    check_fails(
        &creds,
        json!({ APP: { "key": "k.p8" } }),
        "config.json",
        "needs all of key, key_id and team_id",
    );
}

/// Sends `token` and returns once the server has seen `n` requests for it;
/// a sentinel sent afterwards must be the next request, so no more came.
async fn requests_for(server: &ApnsServer, token: &str, n: usize) {
    for i in 0..n {
        let r = server.next_request(WAIT).await;
        assert_eq!(r.path, format!("/3/device/{token}"), "request {i}");
    }
}

async fn no_more_requests_than_the_sentinel(run: &Running, server: &ApnsServer) {
    run.send("5e471", APP, Environment::Production, json!({"alert": "s"}))
        .await;
    assert_eq!(server.next_request(WAIT).await.path, "/3/device/5e471");
}

#[tokio::test]
async fn busy_or_failing_apple_is_retried_until_it_delivers() {
    let server = ApnsServer::start().await;
    server.script(
        "f1a4",
        [
            Reply::ServiceUnavailable,
            Reply::TooManyRequests,
            Reply::InternalServerError,
        ],
    );
    let creds = TestCredentials::new();
    let (config, _) = token_app(&creds);
    let mut s = settings(config, &server, &server);
    s.retry_attempts = 4;
    let run = Running::start(&s);
    run.send("f1a4", APP, Environment::Production, json!({"alert": "x"}))
        .await;
    requests_for(&server, "f1a4", 4).await;
    wait_count(&run.stats.apns_delivered, 1).await;
    assert_eq!(run.stats.apns_retried.get(), 3);
    assert_eq!(run.stats.apns_failed.get(), 0);
    run.stop().await;
}

#[tokio::test]
async fn retries_are_bounded_then_the_drop_is_counted() {
    let server = ApnsServer::start().await;
    server.reply_to("d0e5", Reply::ServiceUnavailable);
    let creds = TestCredentials::new();
    let (config, _) = token_app(&creds);
    let run = Running::start(&settings(config, &server, &server));
    run.send("d0e5", APP, Environment::Production, json!({"alert": "x"}))
        .await;
    requests_for(&server, "d0e5", 3).await;
    wait_count(&run.stats.apns_retries_exhausted, 1).await;
    assert_eq!(run.stats.apns_retried.get(), 2);
    assert_eq!(run.stats.apns_failed.get(), 1);
    assert_eq!(run.stats.apns_feedback.get(), 1);
    no_more_requests_than_the_sentinel(&run, &server).await;
    run.stop().await;
}

#[tokio::test]
async fn a_reset_connection_is_retried_on_a_new_one() {
    let server = ApnsServer::start().await;
    // The first request's answer is held; the connection dies under it.
    server.hold_answers_until(2);
    let creds = TestCredentials::new();
    let (config, _) = token_app(&creds);
    let run = Running::start(&settings(config, &server, &server));
    run.send("e5e7", APP, Environment::Production, json!({"alert": "x"}))
        .await;
    assert_eq!(server.next_request(WAIT).await.connection, 1);
    server.close_connections().await;
    let again = server.next_request(WAIT).await;
    assert_eq!(
        (again.path.as_str(), again.connection),
        ("/3/device/e5e7", 2)
    );
    wait_count(&run.stats.apns_delivered, 1).await;
    assert_eq!(run.stats.apns_retried.get(), 1);
    assert_eq!(run.stats.apns_failed.get(), 0);
    run.stop().await;
}

#[tokio::test]
async fn a_refused_stream_is_sent_again_at_once_on_the_same_connection() {
    let server = ApnsServer::start().await;
    // REFUSED_STREAM: the server did not process it, so it is no retry.
    server.script("5eed", [Reply::RefusedStream]);
    let creds = TestCredentials::new();
    let (config, _) = token_app(&creds);
    let run = Running::start(&settings(config, &server, &server));
    run.send("5eed", APP, Environment::Production, json!({"alert": "x"}))
        .await;
    requests_for(&server, "5eed", 2).await;
    wait_count(&run.stats.apns_delivered, 1).await;
    assert_eq!(run.stats.apns_retried.get(), 0);
    assert_eq!(run.stats.apns_failed.get(), 0);
    assert_eq!(
        server.connections(),
        1,
        "a reset stream keeps its connection"
    );
    run.stop().await;
}

#[tokio::test]
async fn refused_provider_token_is_reminted_and_retried_once() {
    let server = ApnsServer::start().await;
    server.script("a0e1", [Reply::ExpiredProviderToken]);
    server.reply_to("a0e2", Reply::ExpiredProviderToken);
    let creds = TestCredentials::new();
    let (config, _) = token_app(&creds);
    let mut s = settings(config, &server, &server);
    s.jwt_refresh_min_secs = 0;
    let run = Running::start(&s);

    run.send("a0e1", APP, Environment::Production, json!({"alert": "x"}))
        .await;
    requests_for(&server, "a0e1", 2).await;
    wait_count(&run.stats.apns_delivered, 1).await;
    assert_eq!(run.stats.apns_jwt_renewed.get(), 1);

    // Refused again after the new token: given up, not retried for ever.
    run.send("a0e2", APP, Environment::Production, json!({"alert": "y"}))
        .await;
    requests_for(&server, "a0e2", 2).await;
    wait_count(&run.stats.apns_rejected, 1).await;
    assert_eq!(run.stats.apns_jwt_renewed.get(), 2);
    assert_eq!(run.stats.apns_failed.get(), 1);
    no_more_requests_than_the_sentinel(&run, &server).await;
    run.stop().await;
}

#[tokio::test]
async fn provider_token_is_not_reminted_within_twenty_minutes() {
    let server = ApnsServer::start().await;
    server.script("a0e3", [Reply::ExpiredProviderToken]);
    let creds = TestCredentials::new();
    let (config, _) = token_app(&creds);
    let run = Running::start(&settings(config, &server, &server));
    run.send("a0e3", APP, Environment::Production, json!({"alert": "x"}))
        .await;
    requests_for(&server, "a0e3", 1).await;
    wait_count(&run.stats.apns_rejected, 1).await;
    assert_eq!(run.stats.apns_jwt_renewed.get(), 0);
    no_more_requests_than_the_sentinel(&run, &server).await;
    run.stop().await;
}

#[tokio::test]
async fn payload_too_large_and_other_4xx_are_not_retried() {
    let server = ApnsServer::start().await;
    server.reply_to(
        "b1",
        Reply::Other {
            status: 413,
            reason: "PayloadTooLarge".into(),
        },
    );
    server.reply_to(
        "b2",
        Reply::Other {
            status: 400,
            reason: "BadTopic".into(),
        },
    );
    let creds = TestCredentials::new();
    let (config, _) = token_app(&creds);
    let run = Running::start(&settings(config, &server, &server));
    for token in ["b1", "b2"] {
        run.send(token, APP, Environment::Production, json!({"alert": "x"}))
            .await;
        requests_for(&server, token, 1).await;
    }
    wait_count(&run.stats.apns_rejected, 2).await;
    assert_eq!(run.stats.apns_failed.get(), 2);
    assert_eq!(run.stats.apns_retried.get(), 0);
    assert_eq!(run.stats.apns_dead_tokens.get(), 0);
    no_more_requests_than_the_sentinel(&run, &server).await;
    run.stop().await;
}

#[tokio::test]
async fn dead_token_is_removed_from_the_registry() {
    let server = ApnsServer::start().await;
    server.reply_to(
        "dead",
        Reply::Unregistered {
            timestamp: 1_700_000_000_000,
        },
    );
    let creds = TestCredentials::new();
    let (config, _) = token_app(&creds);
    let run = Running::start(&settings(config, &server, &server));
    let user = Id::from("42");
    let record = UserRecord {
        app_token: Some("dead".into()),
        app_ident: Some(APP.into()),
        app_version: Some("produce".into()),
        app_focus: false,
    };
    run.registry.put_user(&user, &record).await.unwrap();
    run.send("dead", APP, Environment::Production, json!({"alert": "x"}))
        .await;
    requests_for(&server, "dead", 1).await;
    wait_count(&run.stats.apns_tokens_deleted, 1).await;
    let left = run
        .registry
        .users(&[user])
        .await
        .unwrap()
        .remove(0)
        .unwrap();
    assert_eq!(left.app_token, None);
    assert_eq!(left.app_ident.as_deref(), Some(APP));
    assert_eq!(run.stats.apns_dead_tokens.get(), 1);
    assert_eq!(run.stats.apns_retried.get(), 0);
    run.stop().await;
}

#[tokio::test]
async fn full_queue_drops_with_the_drop_policy() {
    let server = ApnsServer::start().await;
    server.hold_answers_until(usize::MAX);
    let creds = TestCredentials::new();
    let (config, _) = token_app(&creds);
    let mut s = settings(config, &server, &server);
    s.queue = 1;
    s.max_in_flight = 1;
    s.queue_full = QueueFull::Drop;
    let run = Running::start(&s);
    // 1 is in flight (answer held), so the sender takes no other: 2 fills
    // the queue; 3 and 4 find it full.
    run.send("c1", APP, Environment::Production, json!({"n": 1}))
        .await;
    server.next_request(WAIT).await;
    for token in ["c2", "c3", "c4"] {
        run.send(token, APP, Environment::Production, json!({"n": 2}))
            .await;
    }
    assert_eq!(run.sender.queued(), 1);
    assert_eq!(run.stats.apns_queue_dropped.get(), 2);
    assert_eq!(run.stats.apns_queued.get(), 2);
    run.stop().await;
}

#[tokio::test]
async fn one_stream_per_connection_opens_more_connections_up_to_the_limit() {
    let server = ApnsServer::start_with(ServerOptions {
        max_concurrent_streams: Some(1),
        ..Default::default()
    })
    .await;
    let creds = TestCredentials::new();
    let (config, _) = token_app(&creds);
    let mut s = settings(config, &server, &server);
    s.queue = 64;
    s.max_connections = 3;
    let run = Running::start(&s);
    // The first answer teaches the sender the server's limit of 1 stream.
    run.send("e00", APP, Environment::Production, json!({"n": 0}))
        .await;
    wait_count(&run.stats.apns_delivered, 1).await;
    // Answers are held until 3 more requests are in: only 3 connections get there.
    server.hold_answers_until(4);
    for i in 1..=3 {
        run.send(
            &format!("e{i:02}"),
            APP,
            Environment::Production,
            json!({"n": i}),
        )
        .await;
    }
    wait_count(&run.stats.apns_delivered, 4).await;
    assert_eq!(server.connections(), 3);
    // More than the connections can carry at once: they wait for a stream.
    for i in 4..50 {
        run.send(
            &format!("e{i:02}"),
            APP,
            Environment::Production,
            json!({"n": i}),
        )
        .await;
    }
    wait_count(&run.stats.apns_delivered, 50).await;
    assert_eq!(server.connections(), 3, "never more than max_connections");
    assert_eq!(run.stats.apns_failed.get(), 0);
    assert_eq!(run.stats.apns_retried.get(), 0, "no stream was refused");
    run.stop().await;
}

#[tokio::test]
async fn goaway_loses_nothing_and_moves_to_a_new_connection() {
    let server = ApnsServer::start().await;
    // The first answer is held until the second request is in.
    server.hold_answers_until(2);
    let creds = TestCredentials::new();
    let (config, _) = token_app(&creds);
    let run = Running::start(&settings(config, &server, &server));
    run.send("90a1", APP, Environment::Production, json!({"alert": "1"}))
        .await;
    assert_eq!(server.next_request(WAIT).await.connection, 1);
    server.goaway();
    // Sent while the server is going away: answered there, or re-sent.
    run.send("90a2", APP, Environment::Production, json!({"alert": "2"}))
        .await;
    wait_count(&run.stats.apns_delivered, 2).await;
    run.send("90a3", APP, Environment::Production, json!({"alert": "3"}))
        .await;
    let last = loop {
        let r = server.next_request(WAIT).await;
        if r.path == "/3/device/90a3" {
            break r;
        }
    };
    assert_eq!(last.connection, 2);
    wait_count(&run.stats.apns_delivered, 3).await;
    assert_eq!(run.stats.apns_failed.get(), 0);
    run.stop().await;
}

#[tokio::test]
async fn a_killed_and_restarted_apple_loses_nothing_within_the_retry_window() {
    let server = ApnsServer::start().await;
    let addr = server.addr();
    let creds = TestCredentials::new();
    let (config, _) = token_app(&creds);
    let mut s = settings(config, &server, &server);
    s.retry_attempts = 12;
    s.retry_base_ms = 20;
    s.retry_max_secs = 60;
    let run = Running::start(&s);
    run.send("4b11", APP, Environment::Production, json!({"alert": "1"}))
        .await;
    wait_count(&run.stats.apns_delivered, 1).await;

    server.kill().await;
    for token in ["4b12", "4b13"] {
        run.send(token, APP, Environment::Production, json!({"alert": token}))
            .await;
    }
    // Both have failed against the dead server at least once.
    wait_count(&run.stats.apns_retried, 2).await;
    let server = ApnsServer::start_with(ServerOptions {
        addr: Some(addr),
        ..Default::default()
    })
    .await;
    let mut paths = vec![
        server.next_request(WAIT).await.path,
        server.next_request(WAIT).await.path,
    ];
    paths.sort();
    assert_eq!(paths, ["/3/device/4b12", "/3/device/4b13"]);
    wait_count(&run.stats.apns_delivered, 3).await;
    assert_eq!(run.stats.apns_failed.get(), 0);
    run.stop().await;
}

/// The `kid` of the provider token a request carried.
fn jwt_kid(r: &apns_server::SeenRequest) -> Value {
    let jwt = r.header("authorization").unwrap().strip_prefix("bearer ");
    let header = jwt.unwrap().split('.').next().unwrap();
    let header: Value = serde_json::from_slice(&URL_SAFE_NO_PAD.decode(header).unwrap()).unwrap();
    header["kid"].clone()
}

#[tokio::test]
async fn changed_credentials_are_reloaded_without_dropping_what_is_in_flight() {
    let server = ApnsServer::start().await;
    // The first answer is held until a request with the new key is in.
    server.hold_answers_until(2);
    let creds = TestCredentials::new();
    let (config, _) = token_app(&creds);
    let mut s = settings(config, &server, &server);
    s.reload_poll_ms = 20;
    let run = Running::start(&s);
    run.send("7e11", APP, Environment::Production, json!({"alert": "1"}))
        .await;
    assert_eq!(jwt_kid(&server.next_request(WAIT).await), "ABC123");

    let (key, public) = creds.p8("AuthKey_NEW456.p8");
    creds.config(&json!({ APP: { "key": key, "key_id": "NEW456", "team_id": "TEAM456" } }));
    wait_count(&run.stats.apns_reloads, 1).await;
    run.send("7e12", APP, Environment::Production, json!({"alert": "2"}))
        .await;
    let r = server.next_request(WAIT).await;
    assert_eq!(jwt_kid(&r), "NEW456");
    let jwt = r.header("authorization").unwrap().strip_prefix("bearer ");
    let parts: Vec<&str> = jwt.unwrap().split('.').collect();
    let sig = p256::ecdsa::Signature::from_slice(&URL_SAFE_NO_PAD.decode(parts[2]).unwrap())
        .expect("signature");
    public
        .verify(format!("{}.{}", parts[0], parts[1]).as_bytes(), &sig)
        .expect("signed with the new key");
    wait_count(&run.stats.apns_delivered, 2).await;
    assert_eq!(run.stats.apns_failed.get(), 0);
    assert_eq!(run.stats.apns_reloads_refused.get(), 0);
    run.stop().await;
}

#[tokio::test]
async fn broken_new_credentials_are_refused_and_the_old_ones_kept() {
    let server = ApnsServer::start().await;
    let creds = TestCredentials::new();
    let (config, _) = token_app(&creds);
    let mut s = settings(config.clone(), &server, &server);
    s.reload_poll_ms = 20;
    let run = Running::start(&s);

    creds.write("AuthKey_ABC123.p8", "not a key any more");
    wait_count(&run.stats.apns_reloads_refused, 1).await;
    run.send("b0c1", APP, Environment::Production, json!({"alert": "1"}))
        .await;
    assert_eq!(jwt_kid(&server.next_request(WAIT).await), "ABC123");

    std::fs::write(&config, "{ not json").unwrap();
    wait_count(&run.stats.apns_reloads_refused, 2).await;
    run.send("b0c2", APP, Environment::Production, json!({"alert": "2"}))
        .await;
    assert_eq!(jwt_kid(&server.next_request(WAIT).await), "ABC123");
    wait_count(&run.stats.apns_delivered, 2).await;
    assert_eq!(run.sender.configured().len(), 2);
    run.stop().await;
}

#[tokio::test]
async fn sighup_reloads_the_credentials() {
    let server = ApnsServer::start().await;
    let creds = TestCredentials::new();
    let (config, _) = token_app(&creds);
    let mut s = settings(config, &server, &server);
    s.reload_poll_ms = 0;
    let run = Running::start(&s);
    // Nothing reloads before the signal: the first request still uses the old key.
    let (key, _) = creds.p8("AuthKey_HUP789.p8");
    creds.config(&json!({ APP: { "key": key, "key_id": "HUP789", "team_id": "TEAM456" } }));
    run.send("5191", APP, Environment::Production, json!({"alert": "1"}))
        .await;
    assert_eq!(jwt_kid(&server.next_request(WAIT).await), "ABC123");
    // SAFETY: signals this test process; the sender has a SIGHUP handler.
    assert_eq!(unsafe { libc::kill(libc::getpid(), libc::SIGHUP) }, 0);
    wait_count(&run.stats.apns_reloads, 1).await;
    run.send("5192", APP, Environment::Production, json!({"alert": "2"}))
        .await;
    assert_eq!(jwt_kid(&server.next_request(WAIT).await), "HUP789");
    run.stop().await;
}

#[tokio::test]
async fn one_broken_certificate_leaves_the_other_environment_working() {
    let server = ApnsServer::start_requiring_client_cert().await;
    let creds = TestCredentials::new();
    let dev = ClientCert::new("dev v1");
    let prod = ClientCert::new("prod v1");
    let config = creds.config(&json!({ APP: {
        "develop": creds.pem("d.pem", &dev, None),
        "produce": creds.pem("p.pem", &prod, None),
    }}));
    let mut s = settings(config, &server, &server);
    s.reload_poll_ms = 20;
    let run = Running::start(&s);
    assert_eq!(run.sender.configured().len(), 2);

    // The new production certificate is good, the new sandbox file is not.
    let prod2 = ClientCert::new("prod v2");
    creds.pem("p.pem", &prod2, None);
    creds.write("d.pem", "garbage");
    wait_count(&run.stats.apns_reloads_refused, 1).await;
    run.send("d1", APP, Environment::Sandbox, json!({"alert": "s"}))
        .await;
    let r = server.next_request(WAIT).await;
    assert_eq!(r.client_subject.as_deref(), Some(dev.subject.as_str()));
    run.send("p1", APP, Environment::Production, json!({"alert": "p"}))
        .await;
    let r = server.next_request(WAIT).await;
    assert_eq!(r.client_subject.as_deref(), Some(prod2.subject.as_str()));
    run.stop().await;

    // At start, the broken environment is disabled, the other one works.
    let run = Running::start(&s);
    assert_eq!(
        run.sender.configured(),
        &[(APP.to_string(), Environment::Production)]
    );
    run.stop().await;
}
