//! Workload `apns`: notifications/s from pushbridge's APNs sender to the
//! tool's local HTTP/2 TLS APNs, against `h2load` posting the same payloads
//! with the same headers to the same kind of server over the same number of
//! connections and streams, in the same run. pushbridge gets its pushes over
//! the proxy for users whose records (in-memory registry, filled over HTTP)
//! carry a token, so the whole path counts: proxy, lookup, payload, JWT,
//! HTTP/2. Both rates are the local server's: answers between its first and
//! its last request.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use rand::{Rng, SeedableRng};
use tokio::time::Instant;

use crate::apns_server::{self, Counters, LocalApns, APP};
use crate::report::Row;
use crate::send::{self, Msg, To, Via};
use crate::target::{ApnsSetup, Kind, Limits, Sample, Server, Spec};

/// One measurement's shape, the same for both clients.
#[derive(Debug, Clone)]
pub struct Shape {
    pub connections: usize,
    pub streams: u32,
    pub pushes: u64,
    /// Distinct iOS users (device tokens, request paths).
    pub users: u64,
    pub payload: usize,
    pub senders: usize,
    pub window: usize,
    pub phase_limit: Duration,
    pub stall: Duration,
}

fn row(target: &str, shape: &Shape) -> Row {
    Row {
        workload: "apns",
        target: target.into(),
        param: shape.connections as u64,
        messages: shape.pushes,
        lost: shape.pushes,
        ..Row::default()
    }
}

fn fill_from(row: &mut Row, c: &Counters, shape: &Shape) {
    let n = c.requests();
    row.delivered = n.min(shape.pushes);
    row.lost = shape.pushes - row.delivered;
    row.secs = c.secs();
    row.rate = c.rate();
}

fn shape_note(c: &Counters) -> String {
    let n = c.requests().max(1);
    format!(
        "{} connections used, body {} B",
        c.connections.load(std::sync::atomic::Ordering::Relaxed),
        c.body_bytes.load(std::sync::atomic::Ordering::Relaxed) / n
    )
}

/// Waits until `c` has `want` requests, the deadline passes, or nothing arrives for `stall`.
async fn wait_requests(c: &Counters, want: u64, deadline: Instant, stall: Duration) {
    let (mut last, mut since) = (u64::MAX, Instant::now());
    loop {
        let got = c.requests();
        if got >= want || Instant::now() > deadline {
            return;
        }
        if got != last {
            (last, since) = (got, Instant::now());
        } else if since.elapsed() > stall {
            return;
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// pushbridge: pushes over the proxy to random iOS users.
/// `name`: the row's target (pushbridge, or pushbridge-1t with one worker thread in `limits`).
pub async fn pushbridge(bin: &Path, name: &str, limits: Limits, shape: &Shape) -> Row {
    let mut row = row(name, shape);
    let spec = Spec::Spawn {
        kind: Kind::PushbridgeIos,
        bin: bin.to_path_buf(),
    };
    let setup = ApnsSetup {
        connections: shape.connections,
        streams: shape.streams,
        // pushbridge's default, as it runs: more than the streams on the wire,
        // so h2 opens the next request as a stream frees (as h2load does in
        // its own loop) instead of the sender refilling each one. At exactly
        // the stream count it went 0.49-0.52x h2load over 4 connections.
        in_flight: ApnsSetup::default()
            .in_flight
            .max(shape.connections * shape.streams as usize),
    };
    let mut server = match Server::start_with(&spec, limits, Some(setup)).await {
        Ok(s) => s,
        Err(e) => {
            row.note = format!("start failed: {e:#}");
            return row;
        }
    };
    if let Err(e) = server.fill_registry(shape.users * 2).await {
        row.note = format!("filling the registry failed: {e:#}");
        server.stop().await;
        return row;
    }
    let (Some(proxy), Some(counters)) = (
        server.proxy,
        server.apns.as_ref().map(|a| Arc::clone(&a.counters)),
    ) else {
        row.note = "no proxy or no APNs".into();
        server.stop().await;
        return row;
    };
    let mut rng = rand::rngs::StdRng::seed_from_u64(0xa9e5 ^ shape.connections as u64);
    let msgs: Vec<Msg> = (0..shape.pushes)
        .map(|seq| Msg {
            to: To::User((rng.random_range(0..shape.users) * 2 + 1) as u32),
            seq,
        })
        .collect();
    let pad = send::pad_for(shape.payload);
    let s0 = server.sample();
    let me0 = Sample::of(Some(std::process::id()));
    let deadline = Instant::now() + shape.phase_limit;
    let (senders, window) = (shape.senders, shape.window);
    let sender = tokio::spawn(async move {
        send::send_all(
            Via::Proxy(proxy),
            &msgs,
            senders,
            window,
            &pad,
            deadline,
            None,
        )
        .await
    });
    wait_requests(&counters, shape.pushes, deadline, shape.stall).await;
    let sent = sender.await.unwrap_or_default();
    let s1 = server.sample();
    let me1 = Sample::of(Some(std::process::id()));
    fill_from(&mut row, &counters, shape);
    row.cpu_secs = crate::cpu_delta(s0, s1);
    row.tool_cpu_secs = crate::cpu_delta(me0, me1);
    row.rss_before_kib = s0.rss_kib;
    row.rss_after_kib = s1.rss_kib;
    let end_to_end = counters
        .last_ns
        .load(std::sync::atomic::Ordering::Relaxed)
        .saturating_sub(sent.first_ns) as f64
        / 1e9;
    let failed = server.metric("apns_failed").await.unwrap_or(0);
    row.note = crate::join_note(&[
        shape_note(&counters),
        format!(
            "first push sent → last answer: {:.0}/s",
            row.delivered as f64 / end_to_end.max(1e-9)
        ),
        if failed > 0 {
            format!("{failed} apns_failed")
        } else {
            String::new()
        },
        crate::sent_note(&sent),
    ]);
    if !server.alive() {
        row.note = crate::join_note(&[row.note.clone(), "server exited".into()]);
    }
    server.stop().await;
    row
}

/// h2load: the same headers and a payload of the same shape, the same paths.
pub async fn h2load(bin: &Path, shape: &Shape) -> Row {
    let mut row = row("h2load", shape);
    match h2load_inner(bin, shape, &mut row).await {
        Ok(()) => {}
        Err(e) => row.note = crate::join_note(&[row.note.clone(), format!("failed: {e:#}")]),
    }
    row
}

async fn h2load_inner(bin: &Path, shape: &Shape, row: &mut Row) -> anyhow::Result<()> {
    let dir = tempdir()?;
    let server = LocalApns::start(&dir, shape.streams).await?;
    let body = dir.join("body.json");
    std::fs::write(&body, payload_body(shape.payload)?)?;
    let uris = dir.join("uris.txt");
    let mut text = String::new();
    for u in 0..shape.users {
        text.push_str(&format!(
            "{}/3/device/{}\n",
            server.url(),
            apns_server::token(u * 2 + 1)
        ));
    }
    std::fs::write(&uris, text)?;
    let expiration = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_secs()
        + 86_400;
    let out = dir.join("h2load.out");
    let threads = shape
        .connections
        .min(std::thread::available_parallelism().map_or(1, |n| n.get()));
    let mut cmd = std::process::Command::new(bin);
    cmd.arg("-n")
        .arg(shape.pushes.to_string())
        .arg("-c")
        .arg(shape.connections.to_string())
        .arg("-m")
        .arg(shape.streams.to_string())
        .arg("-t")
        .arg(threads.to_string())
        .args(["-H", &format!("apns-topic: {APP}")])
        .args(["-H", "apns-push-type: background"])
        .args(["-H", "apns-priority: 5"])
        .args(["-H", &format!("apns-expiration: {expiration}")])
        .args(["-H", "content-type: application/json"])
        .args(["-H", &format!("authorization: bearer {}", fake_jwt())])
        .arg("-d")
        .arg(&body)
        .arg("-i")
        .arg(&uris)
        .stdin(std::process::Stdio::null())
        .stdout(std::fs::File::create(&out)?)
        .stderr(std::process::Stdio::null());
    // SAFETY: prctl is async-signal-safe and touches only this child.
    unsafe {
        use std::os::unix::process::CommandExt;
        cmd.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            Ok(())
        });
    }
    let me0 = Sample::of(Some(std::process::id()));
    let child = cmd.spawn().with_context(|| {
        format!(
            "starting {} (apt-get install nghttp2-client)",
            bin.display()
        )
    })?;
    let pid = child.id() as libc::pid_t;
    let limit = shape.phase_limit;
    let waited = tokio::task::spawn_blocking(move || wait_with_rusage(pid));
    let (status, cpu) = match tokio::time::timeout(limit, waited).await {
        Ok(r) => r??,
        Err(_) => {
            // SAFETY: kill(2) on our own child's pid; the blocking wait then reaps it.
            unsafe { libc::kill(pid, libc::SIGKILL) };
            bail!("h2load did not finish within {limit:?}");
        }
    };
    let me1 = Sample::of(Some(std::process::id()));
    let counters = &server.counters;
    fill_from(row, counters, shape);
    row.cpu_secs = Some(cpu);
    row.tool_cpu_secs = crate::cpu_delta(me0, me1);
    // No RSS: wait4's ru_maxrss keeps the high-water mark of the forked tool before exec.
    let report = std::fs::read_to_string(&out).unwrap_or_default();
    let line = |prefix: &str| {
        report
            .lines()
            .find(|l| l.starts_with(prefix))
            .unwrap_or("")
            .to_string()
    };
    row.note = crate::join_note(&[
        shape_note(counters),
        format!("h2load: {}", line("finished in")),
        // Only when h2load had errors: `--fail-on-loss` looks for "failed" in notes.
        {
            let requests = line("requests:");
            if requests.contains(" 0 failed, 0 errored, 0 timeout") {
                String::new()
            } else {
                format!("h2load had errors: {requests}")
            }
        },
        if status != 0 {
            format!("h2load exit status {status}")
        } else {
            String::new()
        },
    ]);
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

/// The body pushbridge sends for the benchmark's data map (silent push).
fn payload_body(size: usize) -> anyhow::Result<Vec<u8>> {
    let json = send::json_payload(crate::clock::now_ns(), 50_000, &send::pad_for(size));
    let data: serde_json::Map<String, serde_json::Value> = serde_json::from_str(&json)?;
    Ok(pushbridge::apns::Payload::build(&data)?.body.to_vec())
}

/// An ES256 provider token's shape and length (the server does not check it).
fn fake_jwt() -> String {
    use base64::Engine;
    let b64 = |v: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v);
    format!(
        "{}.{}.{}",
        b64(br#"{"alg":"ES256","kid":"BENCH00001"}"#),
        b64(br#"{"iss":"TEAMBENCH1","iat":1764000000}"#),
        b64(&[7u8; 64])
    )
}

/// Waits for `pid` and returns (exit status, user + system CPU s).
fn wait_with_rusage(pid: libc::pid_t) -> anyhow::Result<(i32, f64)> {
    let mut status = 0;
    // SAFETY: an all-zero rusage is a valid value for wait4 to overwrite.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: wait4 on our own child with valid out-pointers.
    let r = unsafe { libc::wait4(pid, &mut status, 0, &mut ru) };
    if r != pid {
        bail!("wait4: {}", std::io::Error::last_os_error());
    }
    let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    let code = if libc::WIFEXITED(status) {
        libc::WEXITSTATUS(status)
    } else {
        -1
    };
    Ok((code, secs(ru.ru_utime) + secs(ru.ru_stime)))
}

fn tempdir() -> anyhow::Result<PathBuf> {
    static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let dir = std::env::temp_dir().join(format!(
        "pushbridge-bench-{}-h2load-{n}",
        std::process::id()
    ));
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

/// `h2load` on the PATH, or `None`.
pub fn find_h2load() -> Option<PathBuf> {
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|p| p.join("h2load"))
            .find(|p| p.is_file())
    })
}
