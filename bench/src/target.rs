//! The server under test: a spawned pushbridge or Mosquitto with ports chosen
//! here, or a server already running; its CPU time and RSS from /proc.

use std::fmt;
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};

use crate::apns_server::{self, LocalApns};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Pushbridge,
    /// pushbridge with the Redis registry: a redis-server of its own, user
    /// records filled by the tool (odd users iOS), APNs to the tool's local server.
    PushbridgeRedis,
    /// pushbridge with the in-memory registry filled over its HTTP API like
    /// `PushbridgeRedis` (odd users iOS), APNs to the tool's local server.
    PushbridgeIos,
    /// pushbridge with `receipts.enabled`, every push sent with `receipt: true`
    /// (the receipts' cost beside `Pushbridge`).
    PushbridgeReceipts,
    /// pushbridge with `runtime.worker_threads = 1`: one thread, as Mosquitto.
    PushbridgeOneThread,
    Mosquitto,
}

impl Kind {
    /// pushbridge's `runtime.worker_threads` for this target (0: one per core).
    pub fn worker_threads(self) -> usize {
        match self {
            Kind::PushbridgeOneThread => 1,
            _ => 0,
        }
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Kind::Pushbridge => "pushbridge",
            Kind::PushbridgeRedis => "pushbridge-redis",
            Kind::PushbridgeIos => "pushbridge-ios",
            Kind::PushbridgeReceipts => "pushbridge-receipts",
            Kind::PushbridgeOneThread => "pushbridge-1t",
            Kind::Mosquitto => "mosquitto",
        })
    }
}

/// How to start or reach a target.
#[derive(Debug, Clone)]
pub enum Spec {
    Spawn {
        kind: Kind,
        bin: PathBuf,
    },
    External {
        mqtt: SocketAddr,
        proxy: Option<SocketAddr>,
        pid: Option<u32>,
    },
}

impl Spec {
    pub fn name(&self) -> String {
        match self {
            Spec::Spawn { kind, .. } => kind.to_string(),
            Spec::External { mqtt, .. } => format!("external {mqtt}"),
        }
    }

    /// Pushes go through the proxy when there is one; otherwise as MQTT publishes.
    pub fn has_proxy(&self) -> bool {
        match self {
            Spec::Spawn { kind, .. } => *kind != Kind::Mosquitto,
            Spec::External { proxy, .. } => proxy.is_some(),
        }
    }
}

/// pushbridge's APNs side, towards the tool's local APNs.
#[derive(Debug, Clone, Copy)]
pub struct ApnsSetup {
    /// `apns.max_connections`.
    pub connections: usize,
    /// SETTINGS_MAX_CONCURRENT_STREAMS the local APNs announces.
    pub streams: u32,
    /// `apns.max_in_flight`.
    pub in_flight: usize,
}

impl Default for ApnsSetup {
    /// pushbridge's defaults, and Apple's stream limit.
    fn default() -> Self {
        ApnsSetup {
            connections: 4,
            streams: 1000,
            in_flight: 1000,
        }
    }
}

/// Broker limits the tool sets on both servers alike, and pushbridge's
/// worker threads (0: one per core; Mosquitto always runs on one).
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_queued: usize,
    pub max_inflight: usize,
    pub worker_threads: usize,
}

pub struct Server {
    pub mqtt: SocketAddr,
    pub proxy: Option<SocketAddr>,
    pub pid: Option<u32>,
    /// pushbridge-redis: the registry's redis-server and its URL.
    pub redis_url: Option<String>,
    /// pushbridge: its HTTP listener (metrics).
    pub http: Option<SocketAddr>,
    /// The local APNs this pushbridge sends to (records with tokens only).
    pub apns: Option<LocalApns>,
    pub kind: Option<Kind>,
    redis: Option<Child>,
    child: Option<Child>,
    dir: Option<PathBuf>,
}

fn free_port() -> anyhow::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

fn scratch_dir(kind: Kind) -> anyhow::Result<PathBuf> {
    static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let dir = std::env::temp_dir().join(format!(
        "pushbridge-bench-{}-{kind}-{n}",
        std::process::id()
    ));
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    Ok(dir)
}

pub fn pushbridge_settings(
    proxy: SocketAddr,
    mqtt: SocketAddr,
    http: SocketAddr,
    limits: Limits,
    redis_url: Option<&str>,
    apns: Option<(&LocalApns, &Path, ApnsSetup)>,
) -> String {
    let registry = redis_url.map_or(String::new(), |u| {
        format!("[registry]\nredis_url = \"{u}\"\n\n")
    });
    // Only when set, so older binaries (before/after comparisons) still start.
    let runtime = match limits.worker_threads {
        0 => String::new(),
        n => format!("[runtime]\nworker_threads = {n}\n\n"),
    };
    let apns = match apns {
        None => "[apns]\nconfig = \"/nonexistent\"\n\n".to_string(),
        Some((server, config, setup)) => format!(
            "[apns]\nconfig = \"{}\"\nproduction_url = \"{url}\"\nsandbox_url = \"{url}\"\n\
             ca_file = \"{}\"\nmax_connections = {}\nmax_in_flight = {}\n\n",
            config.display(),
            server.ca_file.display(),
            setup.connections,
            setup.in_flight,
            url = server.url(),
        ),
    };
    format!(
        "# written by pushbridge-bench\n{registry}\
         [proxy]\nlisten = \"{proxy}\"\nmax_connections = 1024\n\n\
         [mqtt]\nlisten = \"{mqtt}\"\nmax_connections = 19000\n\
         max_connections_per_ip = 0\n\
         max_queued = {q}\nmax_inflight = {i}\n\n\
         {apns}\
         [http]\nlisten = \"{http}\"\n\n\
         {runtime}\
         [log]\nlevel = \"warn\"\n",
        q = limits.max_queued,
        i = limits.max_inflight,
    )
}

pub fn mosquitto_conf(mqtt: SocketAddr, limits: Limits) -> String {
    format!(
        "# written by pushbridge-bench\n\
         listener {port} {ip}\n\
         allow_anonymous true\n\
         persistence false\n\
         {user}\
         max_queued_messages {q}\n\
         max_inflight_messages {i}\n\
         max_connections -1\n\
         set_tcp_nodelay true\n\
         log_dest stderr\n\
         log_type error\n\
         log_type warning\n\
         connection_messages false\n",
        port = mqtt.port(),
        ip = mqtt.ip(),
        // As root, mosquitto switches to its own user, which clears the
        // parent-death signal: stay root (only root can switch at all).
        // SAFETY: geteuid has no preconditions.
        user = if unsafe { libc::geteuid() } == 0 {
            "user root\n"
        } else {
            ""
        },
        q = limits.max_queued,
        i = limits.max_inflight,
    )
}

impl Server {
    /// Starts the target; the kinds with iOS users get a local APNs with `ApnsSetup::default()`.
    pub async fn start(spec: &Spec, limits: Limits) -> anyhow::Result<Server> {
        Self::start_with(spec, limits, None).await
    }

    /// As `start`, with this APNs setup for the kinds with iOS users.
    pub async fn start_with(
        spec: &Spec,
        limits: Limits,
        apns_setup: Option<ApnsSetup>,
    ) -> anyhow::Result<Server> {
        let (kind, bin) = match spec {
            Spec::External { mqtt, proxy, pid } => {
                wait_listening(*mqtt, Duration::from_secs(5), None).await?;
                return Ok(Server {
                    mqtt: *mqtt,
                    proxy: *proxy,
                    pid: *pid,
                    redis_url: None,
                    http: None,
                    apns: None,
                    kind: None,
                    redis: None,
                    child: None,
                    dir: None,
                });
            }
            Spec::Spawn { kind, bin } => (*kind, bin),
        };
        let dir = scratch_dir(kind)?;
        let mqtt: SocketAddr = format!("127.0.0.1:{}", free_port()?).parse()?;
        let log = std::fs::File::create(dir.join("server.log"))?;
        let mut cmd = Command::new(bin);
        let (mut redis, mut redis_url, mut http_addr, mut apns) = (None, None, None, None);
        let proxy = match kind {
            Kind::Pushbridge
            | Kind::PushbridgeRedis
            | Kind::PushbridgeIos
            | Kind::PushbridgeReceipts
            | Kind::PushbridgeOneThread => {
                if kind == Kind::PushbridgeRedis {
                    let (child, url) = start_redis(&dir).await?;
                    redis = Some(child);
                    redis_url = Some(url);
                }
                let proxy: SocketAddr = format!("127.0.0.1:{}", free_port()?).parse()?;
                let conf = dir.join("setting.toml");
                // Every listener on a port of its own: instances never collide.
                let http: SocketAddr = format!("127.0.0.1:{}", free_port()?).parse()?;
                http_addr = Some(http);
                let mut apns_conf = None;
                if matches!(kind, Kind::PushbridgeRedis | Kind::PushbridgeIos) {
                    let setup = apns_setup.unwrap_or_default();
                    let server = LocalApns::start(&dir, setup.streams).await?;
                    let config = apns_server::write_credentials(&dir)?;
                    apns_conf = Some((config, setup));
                    apns = Some(server);
                }
                let variant = match kind {
                    Kind::PushbridgeReceipts => "[receipts]\nenabled = true\n\n",
                    _ => "",
                };
                let limits = Limits {
                    worker_threads: limits.worker_threads.max(kind.worker_threads()),
                    ..limits
                };
                std::fs::write(
                    &conf,
                    variant.to_owned()
                        + &pushbridge_settings(
                            proxy,
                            mqtt,
                            http,
                            limits,
                            redis_url.as_deref(),
                            apns.as_ref()
                                .zip(apns_conf.as_ref())
                                .map(|(s, (c, setup))| (s, c.as_path(), *setup)),
                        ),
                )?;
                cmd.arg("serve").arg("--config").arg(&conf);
                cmd.env_remove("RUST_LOG").env("NO_COLOR", "1");
                Some(proxy)
            }
            Kind::Mosquitto => {
                let conf = dir.join("mosquitto.conf");
                std::fs::write(&conf, mosquitto_conf(mqtt, limits))?;
                cmd.arg("-c").arg(&conf);
                None
            }
        };
        // The server dies with the tool, however the tool ends.
        // SAFETY: prctl is async-signal-safe and touches only this child.
        unsafe {
            use std::os::unix::process::CommandExt;
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        let child = cmd
            .current_dir(&dir)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn();
        let child = match child {
            Ok(c) => c,
            Err(e) => {
                if let Some(mut r) = redis {
                    let _ = r.kill();
                    let _ = r.wait();
                }
                let _ = std::fs::remove_dir_all(&dir);
                return Err(e).with_context(|| format!("starting {}", bin.display()));
            }
        };
        let mut server = Server {
            mqtt,
            proxy,
            pid: Some(child.id()),
            redis_url,
            http: http_addr,
            apns,
            kind: Some(kind),
            redis,
            child: Some(child),
            dir: Some(dir),
        };
        let deadline = Duration::from_secs(10);
        let ready = async {
            wait_listening(mqtt, deadline, server.child.as_mut()).await?;
            if let Some(p) = proxy {
                wait_listening(p, deadline, server.child.as_mut()).await?;
            }
            anyhow::Ok(())
        }
        .await;
        if let Err(e) = ready {
            let log = server.log_tail();
            server.stop().await;
            bail!("{kind} did not start: {e:#}\n{log}");
        }
        Ok(server)
    }

    pub fn log_tail(&self) -> String {
        let Some(dir) = &self.dir else {
            return String::new();
        };
        let text = std::fs::read_to_string(dir.join("server.log")).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }

    pub fn alive(&mut self) -> bool {
        match &mut self.child {
            Some(c) => matches!(c.try_wait(), Ok(None)),
            None => true,
        }
    }

    pub fn sample(&self) -> Sample {
        Sample::of(self.pid)
    }

    /// SIGTERM, up to 3 s for a clean stop, then SIGKILL (the benchmark needs no drain).
    pub async fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            // SAFETY: kill(2) on our own child's pid.
            unsafe {
                libc::kill(child.id() as libc::pid_t, libc::SIGTERM);
            }
            let start = Instant::now();
            while start.elapsed() < Duration::from_secs(3) {
                if !matches!(child.try_wait(), Ok(None)) {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            if matches!(child.try_wait(), Ok(None)) {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
        if let Some(mut r) = self.redis.take() {
            let _ = r.kill();
            let _ = r.wait();
        }
        if let Some(dir) = self.dir.take() {
            let _ = std::fs::remove_dir_all(dir);
        }
    }

    /// The kinds with iOS users: a record for every user i < n, odd users
    /// iOS (APNs token and app_ident: routed to APNs), even ones without a
    /// token (routed to MQTT). Redis: pipelined `HSET`s, as the old service
    /// wrote them; in-memory: `PUT /v1/users/<i>` for the odd users over one
    /// keep-alive connection. Returns false when this server has no records.
    pub async fn fill_registry(&self, n: u64) -> anyhow::Result<bool> {
        if self.kind == Some(Kind::PushbridgeIos) {
            let http = self.http.context("no HTTP listener")?;
            put_users(http, (0..n).filter(|&u| is_ios(u))).await?;
            return Ok(true);
        }
        let Some(url) = self.redis_url.clone() else {
            return Ok(false);
        };
        let client = redis::Client::open(url.as_str())?;
        let mut conn = client.get_multiplexed_async_connection().await?;
        let mut i = 0;
        while i < n {
            let mut pipe = redis::pipe();
            for u in i..(i + 10_000).min(n) {
                let key = format!("User:{u}");
                if is_ios(u) {
                    pipe.hset_multiple(
                        key,
                        &[
                            ("app_token", apns_server::token(u)),
                            ("app_ident", apns_server::APP.into()),
                            ("app_version", "produce".into()),
                        ],
                    )
                    .ignore();
                } else {
                    pipe.hset(key, "app_version", "produce").ignore();
                }
            }
            let _: () = pipe.query_async(&mut conn).await?;
            i = (i + 10_000).min(n);
        }
        Ok(true)
    }

    /// A counter from pushbridge's `/metrics` (plain HTTP/1.1, no client library).
    pub async fn metric(&self, name: &str) -> Option<u64> {
        match self.metric_text().await {
            Ok(body) => body
                .lines()
                .filter(|l| !l.starts_with('#'))
                .find_map(|l| {
                    let (k, v) = l.split_once(' ')?;
                    (k == format!("pushbridge_{name}_total"))
                        .then(|| v.trim().parse::<f64>().ok())?
                })
                .map(|v| v as u64),
            Err(e) => {
                eprintln!("  /metrics: {e:#}");
                None
            }
        }
    }

    /// pushbridge's stage histograms (`pushbridge_stage_seconds`): per stage,
    /// the cumulative buckets and the longest wait since start.
    pub async fn stages(&self) -> Vec<Stage> {
        let Ok(body) = self.metric_text().await else {
            return Vec::new();
        };
        let mut out: Vec<Stage> = Vec::new();
        for line in body.lines().filter(|l| !l.starts_with('#')) {
            let Some((key, value)) = line.split_once(' ') else {
                continue;
            };
            let Ok(value) = value.trim().parse::<f64>() else {
                continue;
            };
            let label = |name: &str| {
                let rest = key.split_once(&format!("{name}=\""))?.1;
                Some(rest.split_once('"')?.0.to_owned())
            };
            let Some(name) = label("stage") else { continue };
            let i = match out.iter().position(|s| s.name == name) {
                Some(i) => i,
                None => {
                    out.push(Stage {
                        name,
                        ..Stage::default()
                    });
                    out.len() - 1
                }
            };
            if key.starts_with("pushbridge_stage_seconds_bucket") {
                if let Some(le) = label("le").and_then(|le| le.parse::<f64>().ok()) {
                    out[i].buckets.push((le, value as u64));
                }
            } else if key.starts_with("pushbridge_stage_max_seconds") {
                out[i].max_secs = value;
            }
        }
        out
    }

    async fn metric_text(&self) -> anyhow::Result<String> {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let http = self.http.context("no HTTP listener")?;
        let mut s = tokio::net::TcpStream::connect(http).await?;
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n")
            .await?;
        let mut body = Vec::new();
        tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut body)).await??;
        Ok(String::from_utf8_lossy(&body).into_owned())
    }
}

/// One stage of pushbridge's pipeline as read from `/metrics`.
#[derive(Debug, Default, Clone)]
pub struct Stage {
    pub name: String,
    /// (upper bound in seconds, observations at or under it), cumulative.
    pub buckets: Vec<(f64, u64)>,
    pub max_secs: f64,
}

impl Stage {
    /// What was observed since `before` (the same stage, read earlier).
    pub fn since(&self, before: Option<&Stage>) -> Stage {
        let old = |le: f64| {
            before
                .and_then(|b| b.buckets.iter().find(|x| x.0 == le))
                .map_or(0, |x| x.1)
        };
        Stage {
            name: self.name.clone(),
            buckets: self
                .buckets
                .iter()
                .map(|&(le, n)| (le, n.saturating_sub(old(le))))
                .collect(),
            max_secs: self.max_secs,
        }
    }

    /// The `q` quantile in milliseconds, interpolated inside its bucket as
    /// Prometheus's `histogram_quantile` does; `None` without observations.
    pub fn quantile_ms(&self, q: f64) -> Option<f64> {
        let total = self.buckets.last()?.1;
        if total == 0 {
            return None;
        }
        let rank = q * total as f64;
        let (mut lo, mut below) = (0.0, 0u64);
        for &(le, n) in &self.buckets {
            if n as f64 >= rank {
                let inside = (n - below) as f64;
                let frac = if inside > 0.0 {
                    (rank - below as f64) / inside
                } else {
                    1.0
                };
                return Some((lo + (le - lo) * frac) * 1e3);
            }
            (lo, below) = (le, n);
        }
        Some(lo * 1e3)
    }
}

/// `PUT /v1/users/<u>` (token, app, production) for every `u`, one request
/// at a time over one keep-alive HTTP/1.1 connection (no client library).
async fn put_users(http: SocketAddr, users: impl Iterator<Item = u64>) -> anyhow::Result<()> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(http).await?;
    s.set_nodelay(true)?;
    let mut buf = Vec::with_capacity(1024);
    for u in users {
        let body = format!(
            "{{\"token\":\"{}\",\"ident\":\"{}\",\"version\":\"produce\"}}",
            apns_server::token(u),
            apns_server::APP
        );
        let req = format!(
            "PUT /v1/users/{u} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        s.write_all(req.as_bytes()).await?;
        buf.clear();
        // 204 No Content: the answer ends with its header.
        let head_end = loop {
            let mut chunk = [0u8; 512];
            let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut chunk)).await??;
            if n == 0 {
                bail!("PUT /v1/users/{u}: connection closed");
            }
            buf.extend_from_slice(&chunk[..n]);
            if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
        };
        let head = String::from_utf8_lossy(&buf[..head_end]);
        if !head.starts_with("HTTP/1.1 2") || head_end != buf.len() {
            bail!("PUT /v1/users/{u}: {}", head.lines().next().unwrap_or(""));
        }
    }
    Ok(())
}

/// The kinds with iOS users: users whose record carries an APNs token.
pub fn is_ios(user: u64) -> bool {
    user % 2 == 1
}

/// A redis-server on a free loopback port, no persistence, dying with the tool.
async fn start_redis(dir: &Path) -> anyhow::Result<(Child, String)> {
    let port = free_port()?;
    let url = format!("redis://127.0.0.1:{port}/");
    let mut cmd = Command::new("redis-server");
    cmd.args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
        .args(["--save", "", "--appendonly", "no", "--dir"])
        .arg(dir);
    // SAFETY: prctl is async-signal-safe and touches only this child.
    unsafe {
        use std::os::unix::process::CommandExt;
        cmd.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            Ok(())
        });
    }
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("starting redis-server (apt-get install redis-server)")?;
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse()?;
    if let Err(e) = wait_listening(addr, Duration::from_secs(10), Some(&mut child)).await {
        let _ = child.kill();
        let _ = child.wait();
        bail!("redis-server did not start: {e:#}");
    }
    Ok((child, url))
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(r) = &mut self.redis {
            let _ = r.kill();
            let _ = r.wait();
        }
        if let Some(child) = &mut self.child {
            let _ = child.kill();
            let _ = child.wait();
        }
        if let Some(dir) = &self.dir {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

async fn wait_listening(
    addr: SocketAddr,
    limit: Duration,
    mut child: Option<&mut Child>,
) -> anyhow::Result<()> {
    let start = Instant::now();
    loop {
        if let Ok(Ok(_)) =
            tokio::time::timeout(Duration::from_secs(1), tokio::net::TcpStream::connect(addr)).await
        {
            return Ok(());
        }
        if let Some(c) = child.as_deref_mut() {
            if let Ok(Some(status)) = c.try_wait() {
                bail!("exited with {status}");
            }
        }
        if start.elapsed() > limit {
            bail!("nothing listening on {addr} after {limit:?}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// CPU time (user + system, and the system part alone) and resident
/// memory of a process.
#[derive(Debug, Clone, Copy, Default)]
pub struct Sample {
    pub cpu_secs: Option<f64>,
    /// The kernel's part: on loopback most of a push's cost is the kernel
    /// sending and waking the receiver, the same work for every server.
    pub sys_secs: Option<f64>,
    pub rss_kib: Option<u64>,
}

impl Sample {
    pub fn of(pid: Option<u32>) -> Sample {
        let Some(pid) = pid else {
            return Sample::default();
        };
        let (cpu_secs, sys_secs) = match cpu_times(pid) {
            Some((user, sys)) => (Some(user + sys), Some(sys)),
            None => (None, None),
        };
        Sample {
            cpu_secs,
            sys_secs,
            rss_kib: rss_kib(pid),
        }
    }
}

/// (user, system) CPU seconds.
fn cpu_times(pid: u32) -> Option<(f64, f64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name, which is in parentheses and may hold spaces.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // utime and stime are fields 14 and 15 of stat(5); `rest` starts at field 3.
    let (user, sys): (u64, u64) = (fields.get(11)?.parse().ok()?, fields.get(12)?.parse().ok()?);
    // SAFETY: sysconf only reads a configuration value.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    let hz = if hz > 0 { hz as f64 } else { 100.0 };
    Some((user as f64 / hz, sys as f64 / hz))
}

fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()
}

/// The tool's own open-file limit: soft up to hard, as the server does.
pub fn raise_fd_limit() -> u64 {
    // SAFETY: getrlimit/setrlimit only read and write the struct passed in.
    unsafe {
        let mut lim = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return 0;
        }
        if lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
        libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim);
        #[allow(clippy::unnecessary_cast)]
        let cur = lim.rlim_cur as u64;
        cur
    }
}

pub fn default_pushbridge_bin() -> PathBuf {
    if let Ok(exe) = std::env::current_exe() {
        let sibling = exe.with_file_name("pushbridge");
        if sibling.exists() {
            return sibling;
        }
    }
    Path::new("target/release/pushbridge").to_path_buf()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_process_has_cpu_and_rss() {
        let s = Sample::of(Some(std::process::id()));
        let (cpu, sys) = (s.cpu_secs.unwrap(), s.sys_secs.unwrap());
        assert!((0.0..=cpu).contains(&sys), "kernel {sys} s of {cpu} s");
        assert!(s.rss_kib.unwrap() > 0);
    }
}
