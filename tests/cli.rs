//! The binary as ops and backends use it: `serve`, `send`, `check-config`,
//! and a standard MQTT client (mosquitto_sub) receiving what `send` sent.

#[path = "support/apns.rs"]
mod apns_server;
mod support;

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};

use support::binary::{settings_file, Running as Server, BIN};

/// A child process killed when the test ends, passing or not.
struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `pushbridge serve` on free ports, and its proxy and MQTT addresses.
fn serve(config: &std::path::Path) -> (Server, String, String) {
    let server = Server::serve(config);
    let (proxy, mqtt) = (server.addr("proxy"), server.addr("mqtt"));
    (server, proxy.to_string(), mqtt.to_string())
}

/// `mosquitto_sub -d` for one QoS 1 message on `topic`, giving up after 30 s.
/// Run under `stdbuf -oL`: it block-buffers a pipe, hiding its SUBACK line.
fn mosquitto_sub(addr: &str, extra: &[&str], topic: &str) -> Child {
    let (host, port) = addr.rsplit_once(':').unwrap();
    Command::new("stdbuf")
        .args(["-oL", "mosquitto_sub", "-h", host, "-p", port])
        .args(extra)
        .args(["-t", topic, "-q", "1", "-C", "1", "-W", "30", "-d"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("mosquitto_sub (scripts/test.sh installs mosquitto-clients)")
}

fn check_config(settings: &std::path::Path) -> std::process::Output {
    Command::new(BIN)
        .args(["check-config", "--config"])
        .arg(settings)
        .output()
        .unwrap()
}

fn send(proxy: &str, args: &[&str]) -> std::process::Output {
    Command::new(BIN)
        .args(["send", "--addr", proxy])
        .args(args)
        .output()
        .unwrap()
}

#[test]
fn serve_send_and_a_standard_client_receives() {
    let dir = tempfile::tempdir().unwrap();
    let (mut server, proxy, mqtt) = serve(&settings_file(dir.path(), ""));

    let mut sub = Running(mosquitto_sub(&mqtt, &[], "push/user/42"));
    let mut out = BufReader::new(sub.0.stdout.take().unwrap()).lines();
    out.by_ref()
        .map(|l| l.unwrap())
        .find(|l| l.contains("SUBACK"))
        .expect("mosquitto_sub subscribed");

    let sent = send(&proxy, &["--user", "42", r#"{"alert":"hi","n":1}"#]);
    assert!(sent.status.success(), "{sent:?}");
    assert_eq!(
        String::from_utf8_lossy(&sent.stdout).trim(),
        "0x00 accepted: queued for delivery"
    );
    let payload = out
        .map(|l| l.unwrap())
        .find(|l| l.starts_with('{'))
        .expect("payload line");
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&payload).unwrap(),
        serde_json::json!({"alert":"hi","n":1})
    );
    assert!(sub.0.wait().unwrap().success());

    for args in [
        &["--users", "1,2,3", "{}"][..],
        &["--group", "7", r#"{"g":1}"#],
    ] {
        let sent = send(&proxy, args);
        assert!(sent.status.success(), "{args:?}: {sent:?}");
    }

    // SIGTERM: a clean stop with exit 0.
    assert!(server.terminate().success());
}

#[test]
fn version_names_the_allocator() {
    let out = Command::new(BIN).arg("--version").output().unwrap();
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    // The suite builds with every feature, mimalloc among them.
    assert!(text.contains("(allocator: mimalloc)"), "{text}");
}

#[test]
fn runtime_worker_threads_sets_the_runtime() {
    let dir = tempfile::tempdir().unwrap();
    for n in ["1", "3"] {
        let extra = format!("[runtime]\nworker_threads = {n}\n");
        let server = Server::serve(&settings_file(dir.path(), &extra));
        assert_eq!(server.started_field("worker_threads"), n);
    }
}

#[test]
fn send_reports_refusals_and_bad_arguments() {
    let out = Command::new(BIN)
        .args(["send", "--user", "1", "[1,2]"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("JSON object"));

    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let out = send(&port.to_string(), &["--user", "1", "{}"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains(&port.to_string()));
}

#[test]
fn bad_settings_name_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let not_pem = dir.path().join("hook-ca.pem");
    std::fs::write(&not_pem, "not a certificate").unwrap();
    let https_hook = format!(
        "[receipts]\nwebhook_url = \"https://h/x\"\nwebhook_secret = \"s\"\nwebhook_ca_file = \"{}\"\n",
        not_pem.display()
    );
    for (extra, key) in [
        (https_hook.as_str(), "receipts.webhook_ca_file"),
        (
            "[receipts]\nevents = [\"device.gone\"]\n",
            "receipts.events",
        ),
        ("[mqtt]\nprefx = \"x\"\n", "prefx"),
        ("[proxy]\nmax_frame = \"big\"\n", "max_frame"),
        ("[mqtt]\nwss_listen = \"127.0.0.1:0\"\n", "mqtt.wss_listen"),
        (
            "[mqtt]\nlisten = \"0.0.0.0:1883\"\n",
            "auth.allow_anonymous",
        ),
    ] {
        let path = dir.path().join("bad.toml");
        std::fs::write(&path, extra).unwrap();
        for cmd in ["serve", "check-config"] {
            let out = Command::new(BIN)
                .args([cmd, "--config"])
                .arg(&path)
                .output()
                .unwrap();
            assert!(!out.status.success(), "{cmd} {extra}");
            let err = String::from_utf8_lossy(&out.stderr);
            assert!(err.contains(key), "{cmd}: {err}");
        }
    }
}

#[test]
fn check_config_reports_apps_and_names_bad_files() {
    let creds = apns_server::TestCredentials::new();
    let (key, _) = creds.p8("AuthKey_K1.p8");
    let cert = apns_server::ClientCert::new("com.example.app");
    let pem = creds.pem("develop.pem", &cert, Some("pw"));
    let config = creds.config(&serde_json::json!({
        "com.example.token": {"key": key, "key_id": "K1", "team_id": "T1"},
        "com.example.app": {"develop": pem, "password": "pw"},
    }));
    let settings = creds.dir().join("setting.toml");
    std::fs::write(
        &settings,
        format!("[apns]\nconfig = \"{}\"\n", config.display()),
    )
    .unwrap();
    let out = check_config(&settings);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text} {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("com.example.token"), "{text}");
    assert!(text.contains("com.example.app"), "{text}");

    // A wrong password and a missing file: non-zero, naming the file.
    for (entry, file) in [
        (
            serde_json::json!({"develop": "develop.pem", "password": "wrong"}),
            "develop.pem",
        ),
        (
            serde_json::json!({"produce": "gone.p12", "password": "pw"}),
            "gone.p12",
        ),
    ] {
        creds.config(&serde_json::json!({ "com.example.app": entry }));
        let out = check_config(&settings);
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(file), "{err}");
    }
}

/// check-config loads the MQTT certificate and names the listeners using it.
#[test]
fn check_config_names_the_mqtt_tls_listeners() {
    let dir = tempfile::tempdir().unwrap();
    let pki = support::pki::pki(dir.path(), "cc");
    let config = dir.path().join("config.json");
    std::fs::write(&config, "{}").unwrap();
    let settings = dir.path().join("setting.toml");
    std::fs::write(
        &settings,
        format!(
            "[apns]\nconfig = \"{}\"\n[mqtt]\nwss_listen = \"127.0.0.1:8084\"\n\
             tls_cert = \"{}\"\ntls_key = \"{}\"\n",
            config.display(),
            pki.cert.display(),
            pki.key.display()
        ),
    )
    .unwrap();
    let out = check_config(&settings);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text} {out:?}");
    let want = format!("mqtt tls: {} ok (mqtt.wss_listen)", pki.cert.display());
    assert!(text.contains(&want), "{text}");
}

/// README's worked example: `pushbridge token`, then mosquitto_sub with it.
#[test]
fn token_command_and_mosquitto_sub_with_jwt() {
    let dir = tempfile::tempdir().unwrap();
    let config = settings_file(
        dir.path(),
        "[auth]\nmode = \"jwt\"\njwt_secret = \"demo\"\n",
    );
    let token = Command::new(BIN)
        .args([
            "token", "--user", "42", "--groups", "7,9", "--ttl", "1h", "--config",
        ])
        .arg(&config)
        .output()
        .unwrap();
    assert!(token.status.success(), "{token:?}");
    let token = String::from_utf8(token.stdout).unwrap().trim().to_string();
    assert_eq!(token.split('.').count(), 3, "{token}");

    let (_server, proxy, mqtt) = serve(&config);
    let sub =
        |password: &str, topic: &str| mosquitto_sub(&mqtt, &["-u", "42", "-P", password], topic);
    let mut ok = Running(sub(&token, "push/user/42"));
    let mut out = BufReader::new(ok.0.stdout.take().unwrap()).lines();
    out.by_ref()
        .map(|l| l.unwrap())
        .find(|l| l.contains("SUBACK"))
        .expect("mosquitto_sub subscribed");
    assert!(send(&proxy, &["--user", "42", r#"{"n":1}"#])
        .status
        .success());
    let payload = out.map(|l| l.unwrap()).find(|l| l.starts_with('{'));
    assert_eq!(payload.as_deref(), Some(r#"{"n":1}"#));
    assert!(ok.0.wait().unwrap().success());

    // Someone else's topic: the subscription is refused.
    let other = sub(&token, "push/user/43").wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&other.stdout) + String::from_utf8_lossy(&other.stderr);
    assert!(
        text.contains("All subscription requests were denied"),
        "{text}"
    );
    // A wrong password: refused at CONNECT.
    let bad = sub("wrong", "push/user/42").wait_with_output().unwrap();
    let text = String::from_utf8_lossy(&bad.stdout) + String::from_utf8_lossy(&bad.stderr);
    assert!(!bad.status.success(), "{text}");
    assert!(text.contains("bad user name or password"), "{text}");

    let missing = Command::new(BIN)
        .args(["token", "--user", "42", "--config"])
        .arg(settings_file(dir.path(), ""))
        .output()
        .unwrap();
    assert!(!missing.status.success());
    assert!(String::from_utf8_lossy(&missing.stderr).contains("auth.jwt_secret"));
}

/// Issue 14 point 12: check-config warns about a short HS256 secret (and
/// still succeeds); `token` puts the configured aud and iss in and refuses
/// a --ttl the server would refuse.
#[test]
fn check_config_warns_on_a_short_secret_and_token_follows_the_policy() {
    use base64::Engine;
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("config.json"), "{}").unwrap();
    let config = settings_file(
        dir.path(),
        "[auth]\nmode = \"jwt\"\njwt_secret = \"demo\"\njwt_audience = \"pb\"\n\
         jwt_issuer = \"me\"\njwt_max_ttl_secs = 7200\n",
    );
    let out = Command::new(BIN)
        .args(["check-config", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    assert!(
        err.contains("warning: auth.jwt_secret is 4 bytes") && err.contains("32"),
        "{err}"
    );

    let token = |ttl: &str| {
        Command::new(BIN)
            .args(["token", "--user", "42", "--ttl", ttl, "--config"])
            .arg(&config)
            .output()
            .unwrap()
    };
    let ok = token("1h");
    assert!(ok.status.success(), "{ok:?}");
    let text = String::from_utf8(ok.stdout).unwrap();
    let payload = text.trim().split('.').nth(1).unwrap();
    let claims: serde_json::Value = serde_json::from_slice(
        &base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(payload)
            .unwrap(),
    )
    .unwrap();
    assert_eq!(
        (claims["aud"].as_str(), claims["iss"].as_str()),
        (Some("pb"), Some("me"))
    );
    let now = pushbridge::utc::now();
    let verifier = pushbridge::auth::jwt::Verifier::new(Some("demo"), None)
        .unwrap()
        .with_policy(pushbridge::auth::jwt::Policy {
            audience: Some("pb".into()),
            issuer: Some("me".into()),
            max_ttl_secs: 7200,
        });
    assert_eq!(verifier.verify(text.trim(), now).unwrap().sub, "42");
    let long = token("3h");
    assert!(!long.status.success());
    let err = String::from_utf8_lossy(&long.stderr);
    assert!(err.contains("auth.jwt_max_ttl_secs"), "{err}");
}
