//! Keeps `pushbridge-bench` from rotting: its smoke mode (20 devices, 200
//! pushes, a group of 20) against a real Mosquitto, and the proxy ingest
//! workload against pushbridge (also with one worker thread), the in-process routing core, the APNs sender
//! against h2load, and the registries with iOS users. Only completion and zero loss are checked;
//! timing never is.

use std::path::Path;
use std::process::Command;
use std::sync::OnceLock;

const BENCH: &str = env!("CARGO_BIN_EXE_pushbridge-bench");

/// The server, built beside this tool by `cargo test --workspace` (scripts/test.sh).
fn pushbridge() -> &'static str {
    static BIN: OnceLock<String> = OnceLock::new();
    BIN.get_or_init(|| {
        let bin = Path::new(BENCH).with_file_name("pushbridge");
        assert!(
            bin.exists(),
            "{} missing: build it first (`cargo build --bin pushbridge`; scripts/test.sh does)",
            bin.display()
        );
        bin.display().to_string()
    })
}
const MOSQUITTO: &str = "/usr/sbin/mosquitto";

fn run(out: &Path, args: &[&str]) -> String {
    let output = Command::new(BENCH)
        .args(["--smoke", "--fail-on-loss", "--no-svg"])
        .arg("--out")
        .arg(out)
        .args(args)
        .output()
        .expect("pushbridge-bench runs");
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "pushbridge-bench {args:?} failed ({}):\n{stdout}\n{stderr}",
        output.status
    );
    stdout
}

/// Rows of results.csv as maps from column name to value.
fn csv_rows(out: &Path) -> Vec<std::collections::HashMap<String, String>> {
    let text = std::fs::read_to_string(out.join("results.csv")).expect("results.csv");
    let mut lines = text.lines();
    let header: Vec<String> = lines
        .next()
        .expect("header")
        .split(',')
        .map(str::to_string)
        .collect();
    lines
        .map(|l| {
            header
                .iter()
                .cloned()
                .zip(l.split(',').map(str::to_string))
                .collect()
        })
        .collect()
}

#[test]
fn smoke_against_mosquitto_delivers_everything() {
    assert!(
        Path::new(MOSQUITTO).exists(),
        "{MOSQUITTO} is missing: scripts/test.sh installs it (apt-get install mosquitto)"
    );
    let out = tempfile::tempdir().unwrap();
    let stdout = run(
        out.path(),
        &[
            "--target",
            "mosquitto",
            "--mosquitto-bin",
            MOSQUITTO,
            "--workloads",
            "idle,p2p,fanout",
        ],
    );
    for table in ["### idle", "### p2p", "### fanout"] {
        assert!(stdout.contains(table), "no {table} table in:\n{stdout}");
    }
    let rows = csv_rows(out.path());
    let workloads: Vec<&str> = rows.iter().map(|r| r["workload"].as_str()).collect();
    assert_eq!(workloads, ["idle", "p2p", "p2p", "fanout"]);
    for r in &rows {
        assert_eq!(r["lost"], "0", "{r:?}");
        let num = |k: &str| r[k].parse::<u64>().unwrap();
        let want = match r["workload"].as_str() {
            "fanout" => num("messages") * num("param"),
            _ => num("messages"),
        };
        assert_eq!(num("delivered"), want, "{r:?}");
        if r["workload"] == "p2p" {
            // The kernel queued each push on the device's socket before the device read it.
            let ms = |k: &str| r[k].parse::<f64>().unwrap_or_else(|_| panic!("{k}: {r:?}"));
            assert!(ms("sock_p99_ms") <= ms("p99_ms"), "{r:?}");
            assert!(ms("sock_max_ms") <= ms("max_ms"), "{r:?}");
        }
    }
    assert!(out.path().join("results.md").exists());
}

#[test]
fn smoke_ingest_against_pushbridge_accepts_every_frame() {
    let out = tempfile::tempdir().unwrap();
    run(
        out.path(),
        &[
            "--target",
            "pushbridge,pushbridge-1t",
            "--pushbridge-bin",
            pushbridge(),
            "--workloads",
            "ingest",
        ],
    );
    let rows = csv_rows(out.path());
    assert_eq!(rows.len(), 4, "{rows:?}");
    let targets: Vec<&str> = rows.iter().map(|r| r["target"].as_str()).collect();
    assert!(targets.contains(&"pushbridge-1t"), "{targets:?}");
    for r in &rows {
        assert_eq!(r["workload"], "ingest");
        assert_eq!(r["lost"], "0", "{r:?}");
        assert_eq!(r["delivered"], "2000", "{r:?}");
    }
}

#[test]
fn smoke_core_routes_every_publish_in_process() {
    let out = tempfile::tempdir().unwrap();
    let stdout = run(out.path(), &["--workloads", "core"]);
    assert!(stdout.contains("### core"), "no core table in:\n{stdout}");
    let rows = csv_rows(out.path());
    assert_eq!(rows.len(), 2, "{rows:?}");
    for r in &rows {
        assert_eq!(r["workload"], "core");
        assert_eq!(r["lost"], "0", "{r:?}");
        assert_eq!(r["delivered"], r["messages"], "{r:?}");
        assert!(
            r["heap_bytes_per_item"].parse::<f64>().unwrap() > 0.0,
            "{r:?}"
        );
    }
}

#[test]
fn smoke_p2p_with_redis_registry_routes_every_push() {
    let out = tempfile::tempdir().unwrap();
    run(
        out.path(),
        &[
            "--target",
            "pushbridge-redis",
            "--pushbridge-bin",
            pushbridge(),
            "--workloads",
            "p2p",
        ],
    );
    let rows = csv_rows(out.path());
    assert_eq!(rows.len(), 2, "{rows:?}");
    for r in &rows {
        assert_eq!(
            (r["workload"].as_str(), r["lost"].as_str()),
            ("p2p", "0"),
            "{r:?}"
        );
        assert_eq!(r["delivered"], r["messages"], "{r:?}");
        assert!(r["note"].contains("to devices"), "{r:?}");
    }
}

#[test]
fn smoke_apns_sender_and_h2load_get_every_notification_answered() {
    assert!(
        Path::new("/usr/bin/h2load").exists(),
        "h2load is missing: scripts/test.sh installs it (apt-get install nghttp2-client)"
    );
    let out = tempfile::tempdir().unwrap();
    let stdout = run(
        out.path(),
        &[
            "--target",
            "pushbridge",
            "--pushbridge-bin",
            pushbridge(),
            "--h2load-bin",
            "/usr/bin/h2load",
            "--workloads",
            "apns",
        ],
    );
    assert!(stdout.contains("### apns"), "no apns table in:\n{stdout}");
    let rows = csv_rows(out.path());
    let targets: Vec<&str> = rows.iter().map(|r| r["target"].as_str()).collect();
    assert_eq!(targets, ["pushbridge", "h2load"], "{rows:?}");
    for r in &rows {
        assert_eq!(r["workload"], "apns");
        assert_eq!(r["lost"], "0", "{r:?}");
        assert_eq!(r["delivered"], r["messages"], "{r:?}");
    }
}

#[test]
fn smoke_p2p_with_ios_users_in_memory_reaches_devices_and_apns() {
    let out = tempfile::tempdir().unwrap();
    run(
        out.path(),
        &[
            "--target",
            "pushbridge-ios",
            "--pushbridge-bin",
            pushbridge(),
            "--workloads",
            "p2p",
        ],
    );
    let rows = csv_rows(out.path());
    assert_eq!(rows.len(), 2, "{rows:?}");
    for r in &rows {
        assert_eq!((r["workload"].as_str(), r["lost"].as_str()), ("p2p", "0"));
        assert_eq!(r["delivered"], r["messages"], "{r:?}");
    }
    // The note holds commas, which `csv_rows` does not unquote: read it whole.
    let csv = std::fs::read_to_string(out.path().join("results.csv")).unwrap();
    assert_eq!(
        csv.matches("answered by the local APNs").count(),
        2,
        "{csv}"
    );
}
