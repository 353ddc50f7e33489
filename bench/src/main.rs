//! `pushbridge-bench`: drives real MQTT devices and real proxy backends over
//! loopback against pushbridge and Mosquitto, the same workload for each
//! target in one run, so that ratios hold on a noisy machine.
//!
//! Workloads: `idle` (server memory per connected device), `p2p` (pushes to
//! random connected users), `fanout` (one push to a group), `ingest` (frames/s
//! the proxy accepts). Every wait is bounded by a count and a time limit.

mod apns;
mod apns_server;
mod mqtt;
mod report;
mod routing;
mod send;
mod target;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::Parser;
use rand::{Rng, SeedableRng};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use mqtt::{DeviceConfig, Devices, Phase};
use report::Row;
use send::{Msg, To, Via};
use target::{Kind, Limits, Sample, Server, Spec};

/// Nanoseconds since the tool started: senders stamp payloads with it and
/// devices subtract it, all in this one process.
pub mod clock {
    use std::sync::OnceLock;
    use std::time::Instant;

    /// The tool's start, on the monotonic clock and on the kernel's wall clock.
    static START: OnceLock<(Instant, u64)> = OnceLock::new();

    fn start() -> &'static (Instant, u64) {
        START.get_or_init(|| (Instant::now(), realtime_ns()))
    }

    pub fn now_ns() -> u64 {
        start().0.elapsed().as_nanos() as u64
    }

    /// A kernel timestamp (`CLOCK_REALTIME`, as `SO_TIMESTAMPNS` gives) on the `now_ns` scale.
    pub fn from_realtime_ns(t: u64) -> u64 {
        t.saturating_sub(start().1)
    }

    fn realtime_ns() -> u64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64)
    }
}

#[derive(Parser, Debug, Clone)]
#[command(
    version,
    about = "Benchmark pushbridge against Mosquitto with real MQTT devices and proxy backends over loopback"
)]
struct Cli {
    /// Targets to spawn, comma-separated: pushbridge, pushbridge-redis (Redis
    /// registry with a record for every device's user, odd users iOS: their
    /// pushes go to APNs, which has no credentials here and fails them),
    /// pushbridge-ios, pushbridge-receipts, pushbridge-1t (one worker
    /// thread), mosquitto.
    #[arg(long, value_delimiter = ',', default_value = "pushbridge,mosquitto")]
    target: Vec<String>,
    /// Benchmark an already running server instead: its MQTT address (loopback only).
    #[arg(long)]
    target_addr: Option<SocketAddr>,
    /// With --target-addr: the server's proxy address; pushes then go through
    /// the proxy, otherwise they are MQTT publishes.
    #[arg(long, requires = "target_addr")]
    proxy_addr: Option<SocketAddr>,
    /// With --target-addr: the server's pid, for CPU time and RSS.
    #[arg(long, requires = "target_addr")]
    target_pid: Option<u32>,
    /// Workloads, comma-separated: idle, p2p, fanout, ingest, core (in-process
    /// routing, no server), apns (APNs sender against h2load, local HTTP/2 TLS server).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "idle,p2p,fanout,ingest,core,apns"
    )]
    workloads: Vec<String>,
    /// Connected devices for idle and p2p.
    #[arg(long, value_delimiter = ',', default_value = "1000,5000,15000")]
    devices: Vec<u64>,
    /// Paced send rates for p2p, msg/s in all; 0 = as fast as acknowledgements allow.
    #[arg(long, value_delimiter = ',', default_value = "0,20000")]
    p2p_rates: Vec<u64>,
    /// Pushes per p2p run.
    #[arg(long, default_value_t = 100_000)]
    messages: u64,
    /// Group sizes for fanout.
    #[arg(long, value_delimiter = ',', default_value = "1000,10000")]
    groups: Vec<u64>,
    /// Pushes per fanout run, one after the other.
    #[arg(long, default_value_t = 5)]
    fanout_pushes: u64,
    /// Backend connections for ingest.
    #[arg(long, value_delimiter = ',', default_value = "1,10,100")]
    ingest_conns: Vec<u64>,
    /// Frames per ingest run.
    #[arg(long, default_value_t = 200_000)]
    ingest_frames: u64,
    /// Sessions for core (in-process routing).
    #[arg(long, value_delimiter = ',', default_value = "1000,100000,1000000")]
    core_sessions: Vec<u64>,
    /// Publishes per core run.
    #[arg(long, default_value_t = 2_000_000)]
    core_publishes: u64,
    /// HTTP/2 connections for apns: pushbridge's apns.max_connections and h2load's -c.
    #[arg(long, value_delimiter = ',', default_value = "1,4")]
    apns_conns: Vec<usize>,
    /// Concurrent streams per connection the local APNs allows (h2load's -m).
    #[arg(long, default_value_t = 100)]
    apns_streams: u32,
    /// Notifications per apns run.
    #[arg(long, default_value_t = 50_000)]
    apns_pushes: u64,
    /// Distinct iOS users (device tokens) the apns notifications go to.
    #[arg(long, default_value_t = 1000)]
    apns_users: u64,
    /// h2load binary (default: from PATH).
    #[arg(long)]
    h2load_bin: Option<PathBuf>,
    /// Sender connections for p2p (proxy backends or MQTT publishers).
    #[arg(long, default_value_t = 4)]
    senders: usize,
    /// Unacknowledged pushes per sender connection.
    #[arg(long, default_value_t = 256)]
    window: usize,
    /// Size of the JSON payload devices receive, in bytes (about).
    #[arg(long, default_value_t = 100)]
    payload: usize,
    /// Source addresses 127.0.0.2 … for device connections.
    #[arg(long, default_value_t = 16)]
    sources: u8,
    /// Devices handshaking at once (more overflows SYN queues: 1 s retries).
    #[arg(long, default_value_t = 64)]
    connect_concurrency: usize,
    /// Upper bound on each phase (connect, deliver, ingest), in seconds.
    #[arg(long, default_value_t = 120)]
    phase_timeout: u64,
    /// A delivery phase with no progress for this long stops (the rest is loss).
    #[arg(long, default_value_t = 15)]
    stall_timeout: u64,
    /// Wait after the devices are connected before reading the server's RSS, ms.
    #[arg(long, default_value_t = 1000)]
    settle_ms: u64,
    /// Runs of the whole sequence, interleaved; tables show each measurement's median run.
    #[arg(long, default_value_t = 1)]
    repeat: u32,
    /// Broker setting on both servers: messages queued per session.
    #[arg(long, default_value_t = 10_000)]
    max_queued: usize,
    /// Broker setting on both servers: QoS 1 messages in flight per session.
    #[arg(long, default_value_t = 32)]
    max_inflight: usize,
    /// Directory for results.md, results.csv and the SVG charts.
    #[arg(long, default_value = "target/bench-results")]
    out: PathBuf,
    /// pushbridge binary (default: beside this tool, else target/release/pushbridge).
    #[arg(long)]
    pushbridge_bin: Option<PathBuf>,
    #[arg(long, default_value = "/usr/sbin/mosquitto")]
    mosquitto_bin: PathBuf,
    /// Tiny sizes that run in seconds: 20 devices, 200 pushes, groups of 20, 2 000 frames.
    #[arg(long)]
    smoke: bool,
    /// Exit with status 2 when anything was lost, refused or failed.
    #[arg(long)]
    fail_on_loss: bool,
    /// No SVG charts.
    #[arg(long)]
    no_svg: bool,
}

impl Cli {
    fn apply_smoke(&mut self) {
        if self.smoke {
            self.devices = vec![20];
            self.messages = 200;
            self.p2p_rates = vec![0, 2000];
            self.groups = vec![20];
            self.fanout_pushes = 2;
            self.ingest_conns = vec![1, 4];
            self.ingest_frames = 2000;
            self.core_sessions = vec![100, 1000];
            self.core_publishes = 2000;
            self.apns_conns = vec![1];
            self.apns_pushes = 500;
            self.apns_users = 50;
            self.settle_ms = 50;
            self.phase_timeout = self.phase_timeout.min(30);
            self.stall_timeout = self.stall_timeout.min(10);
        }
    }

    fn wants(&self, w: &str) -> bool {
        self.workloads.iter().any(|x| x == w)
    }

    fn limits(&self) -> Limits {
        Limits {
            max_queued: self.max_queued,
            max_inflight: self.max_inflight,
            worker_threads: 0,
        }
    }

    fn phase_limit(&self) -> Duration {
        Duration::from_secs(self.phase_timeout)
    }
}

fn main() -> ExitCode {
    let mut cli = Cli::parse();
    cli.apply_smoke();
    clock::now_ns();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("pushbridge-bench: runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    // On Ctrl-C or SIGTERM the run is dropped, and with it every server it started.
    let outcome = rt.block_on(async {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        tokio::select! {
            r = run(cli) => r,
            _ = tokio::signal::ctrl_c() => bail!("interrupted"),
            _ = term.recv() => bail!("terminated"),
        }
    });
    match outcome {
        Ok(code) => code,
        Err(e) => {
            eprintln!("pushbridge-bench: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn specs(cli: &Cli) -> anyhow::Result<Vec<Spec>> {
    if let Some(mqtt) = cli.target_addr {
        for a in [Some(mqtt), cli.proxy_addr].into_iter().flatten() {
            if !a.ip().is_loopback() {
                bail!("{a} is not a loopback address; the benchmark only talks over loopback");
            }
        }
        return Ok(vec![Spec::External {
            mqtt,
            proxy: cli.proxy_addr,
            pid: cli.target_pid,
        }]);
    }
    cli.target
        .iter()
        .map(|t| match t.as_str() {
            "pushbridge" => {
                let bin = cli
                    .pushbridge_bin
                    .clone()
                    .unwrap_or_else(target::default_pushbridge_bin);
                if !bin.exists() {
                    bail!(
                        "{} not found: build it (cargo build --release) or pass --pushbridge-bin",
                        bin.display()
                    );
                }
                // The server runs in its own scratch directory.
                let bin = std::fs::canonicalize(&bin)?;
                Ok(Spec::Spawn {
                    kind: Kind::Pushbridge,
                    bin,
                })
            }
            "pushbridge-redis" | "pushbridge-ios" | "pushbridge-receipts" | "pushbridge-1t" => {
                let bin = cli
                    .pushbridge_bin
                    .clone()
                    .unwrap_or_else(target::default_pushbridge_bin);
                Ok(Spec::Spawn {
                    kind: match t.as_str() {
                        "pushbridge-ios" => Kind::PushbridgeIos,
                        "pushbridge-receipts" => Kind::PushbridgeReceipts,
                        "pushbridge-1t" => Kind::PushbridgeOneThread,
                        _ => Kind::PushbridgeRedis,
                    },
                    bin: std::fs::canonicalize(&bin)
                        .with_context(|| format!("{} not found", bin.display()))?,
                })
            }
            "mosquitto" => {
                if !cli.mosquitto_bin.exists() {
                    bail!(
                        "{} not found: apt-get install mosquitto, or pass --mosquitto-bin",
                        cli.mosquitto_bin.display()
                    );
                }
                Ok(Spec::Spawn {
                    kind: Kind::Mosquitto,
                    bin: std::fs::canonicalize(&cli.mosquitto_bin)?,
                })
            }
            other => bail!(
                "unknown target {other:?} (pushbridge, pushbridge-redis, pushbridge-ios, pushbridge-receipts, pushbridge-1t, mosquitto)"
            ),
        })
        .collect()
}

async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    for w in &cli.workloads {
        if !report::WORKLOADS.contains(&w.as_str()) {
            bail!("unknown workload {w:?} (idle, p2p, fanout, ingest, core, apns)");
        }
    }
    let fd_limit = target::raise_fd_limit();
    let max_devices = fd_limit.saturating_sub(300);
    let specs = specs(&cli)?;
    std::fs::create_dir_all(&cli.out).with_context(|| format!("creating {}", cli.out.display()))?;
    eprintln!(
        "pushbridge-bench: targets {}; open-file limit {fd_limit}",
        specs.iter().map(Spec::name).collect::<Vec<_>>().join(", ")
    );

    let mut rows: Vec<Row> = Vec::new();
    let mut record = |mut new: Vec<Row>| {
        for r in &mut new {
            // One table cell: the whole text went to stderr already.
            if r.note.contains(['\n', '|']) || r.note.len() > 300 {
                eprintln!("  note: {}", r.note);
                let flat = r.note.replace(['\n', '|'], " ");
                r.note = flat.chars().take(300).collect();
            }
        }
        for r in &new {
            eprintln!("  {}", report::csv_line(r));
        }
        rows.append(&mut new);
    };

    for run in 1..=cli.repeat.max(1) {
        if cli.wants("core") {
            for &n in &cli.core_sessions {
                eprintln!("[run {run}/{}] [core] {n} sessions", cli.repeat);
                let (p, size) = (cli.core_publishes, cli.payload);
                let row = tokio::task::spawn_blocking(move || routing::run(n, p, size))
                    .await
                    .context("core workload")?;
                record(vec![row]);
            }
        }
        if cli.wants("idle") || cli.wants("p2p") {
            for &n in &cli.devices {
                if n > max_devices {
                    eprintln!("skipping {n} devices: over the open-file limit of {fd_limit}");
                    continue;
                }
                for spec in &specs {
                    eprintln!("[run {run}/{}] [{}] {n} devices", cli.repeat, spec.name());
                    record(devices_run(&cli, spec, n).await);
                }
            }
        }
        if cli.wants("fanout") {
            for &g in &cli.groups {
                if g > max_devices {
                    eprintln!("skipping a group of {g}: over the open-file limit of {fd_limit}");
                    continue;
                }
                for spec in &specs {
                    eprintln!("[run {run}/{}] [{}] fanout to {g}", cli.repeat, spec.name());
                    record(vec![fanout_run(&cli, spec, g).await]);
                }
            }
        }
        if cli.wants("apns") {
            apns_runs(&cli, &specs, run, &mut record).await;
        }
        if cli.wants("ingest") {
            for &c in &cli.ingest_conns {
                for spec in specs.iter().filter(|s| s.has_proxy()) {
                    eprintln!(
                        "[run {run}/{}] [{}] ingest over {c} connections",
                        cli.repeat,
                        spec.name()
                    );
                    record(vec![ingest_run(&cli, spec, c).await]);
                }
            }
        }
    }

    let summary = report::medians(&rows);
    let tables = report::markdown(&summary);
    println!("{tables}");
    write_results(&cli, &summary, &rows, &tables)?;
    let bad = rows
        .iter()
        .any(|r| r.lost > 0 || r.note.contains("failed") || r.delivered == 0);
    if cli.fail_on_loss && (bad || rows.is_empty()) {
        eprintln!("pushbridge-bench: loss or failure (see the tables)");
        return Ok(ExitCode::from(2));
    }
    Ok(ExitCode::SUCCESS)
}

/// apns: pushbridge (with one worker thread too when pushbridge-1t is a
/// target; the first pushbridge target's binary) then h2load (when
/// installed), per connection count.
async fn apns_runs(cli: &Cli, specs: &[Spec], run: u32, record: &mut impl FnMut(Vec<Row>)) {
    let bin = specs.iter().find_map(|s| match s {
        Spec::Spawn { kind, bin } if *kind != Kind::Mosquitto => Some(bin.clone()),
        _ => None,
    });
    // The row name of each pushbridge run; its kind says its worker threads.
    let mut senders = vec![Kind::Pushbridge];
    if specs
        .iter()
        .any(|s| s.name() == Kind::PushbridgeOneThread.to_string())
    {
        senders.push(Kind::PushbridgeOneThread);
    }
    let h2load = cli.h2load_bin.clone().or_else(apns::find_h2load);
    if h2load.is_none() {
        eprintln!("[apns] h2load not found (apt-get install nghttp2-client): pushbridge alone");
    }
    for &c in &cli.apns_conns {
        let shape = apns::Shape {
            connections: c.max(1),
            streams: cli.apns_streams,
            pushes: cli.apns_pushes,
            users: cli.apns_users.max(1),
            payload: cli.payload,
            senders: cli.senders,
            window: cli.window,
            phase_limit: cli.phase_limit(),
            stall: Duration::from_secs(cli.stall_timeout),
        };
        if let Some(bin) = &bin {
            for &kind in &senders {
                eprintln!(
                    "[run {run}/{}] [{kind}] apns over {c} connections",
                    cli.repeat
                );
                let limits = Limits {
                    worker_threads: kind.worker_threads(),
                    ..cli.limits()
                };
                let row = apns::pushbridge(bin, &kind.to_string(), limits, &shape).await;
                record(vec![row]);
            }
        }
        if let Some(h2) = &h2load {
            eprintln!(
                "[run {run}/{}] [h2load] apns over {c} connections",
                cli.repeat
            );
            record(vec![apns::h2load(h2, &shape).await]);
        }
    }
}

/// A set of connected, subscribed devices.
struct DeviceSet {
    shared: Arc<Devices>,
    stop: CancellationToken,
    tasks: JoinSet<()>,
    connect_secs: f64,
    note: String,
}

impl DeviceSet {
    async fn connect(
        cli: &Cli,
        server: SocketAddr,
        n: u64,
        topic: impl Fn(u32) -> String,
    ) -> DeviceSet {
        static RUN: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let run = RUN.fetch_add(1, Ordering::Relaxed);
        let shared = Arc::new(Devices::default());
        let stop = CancellationToken::new();
        let gate = Arc::new(Semaphore::new(cli.connect_concurrency.max(1)));
        let mut tasks = JoinSet::new();
        let start = Instant::now();
        let sources = cli.sources.clamp(1, 250) as u32;
        for i in 0..n as u32 {
            let cfg = DeviceConfig {
                server,
                source: IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2 + (i % sources) as u8)),
                client_id: format!("bench-{}-{run}-{i}", std::process::id()),
                topic: topic(i),
                keepalive_secs: 300,
                handshake_timeout: Duration::from_secs(10),
            };
            tasks.spawn(mqtt::device(
                i,
                cfg,
                shared.clone(),
                gate.clone(),
                stop.clone(),
            ));
        }
        let give_up = (n / 100).max(10) as usize;
        let deadline = start + cli.phase_limit();
        let mut note = String::new();
        loop {
            let ready = shared.ready.load(Ordering::Relaxed);
            let failed = shared.failed.load(Ordering::Relaxed);
            if ready + failed >= n as usize {
                break;
            }
            if failed >= give_up {
                note = format!("connect failed: {failed} devices gave up; stopped early");
                break;
            }
            if Instant::now() > deadline {
                note = format!(
                    "connect failed: only {ready}/{n} within {:?}",
                    cli.phase_limit()
                );
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let failed = shared.failed.load(Ordering::Relaxed);
        if failed > 0 {
            let first = shared.first_error.lock().expect("error lock").clone();
            if note.is_empty() {
                note = format!("{failed} devices failed to connect");
            }
            note.push_str(&format!(" (first: {})", first.unwrap_or_default()));
        }
        DeviceSet {
            shared,
            stop,
            tasks,
            connect_secs: start.elapsed().as_secs_f64(),
            note,
        }
    }

    fn ready(&self) -> Vec<u32> {
        let mut ids = self.shared.ready_ids.lock().expect("ready lock").clone();
        ids.sort_unstable();
        ids
    }

    async fn close(mut self) {
        self.stop.cancel();
        let drained = tokio::time::timeout(Duration::from_secs(15), async {
            while self.tasks.join_next().await.is_some() {}
        })
        .await;
        if drained.is_err() {
            self.tasks.abort_all();
        }
    }
}

/// Waits until `phase` has `want` deliveries, the deadline passes, or nothing
/// arrives for the stall timeout.
async fn wait_deliveries(cli: &Cli, phase: &Phase, want: u64, deadline: Instant) {
    let stall = Duration::from_secs(cli.stall_timeout);
    let mut last = phase.received();
    let mut last_change = Instant::now();
    loop {
        let got = phase.received();
        if got >= want || Instant::now() > deadline {
            return;
        }
        if got != last {
            last = got;
            last_change = Instant::now();
        } else if last_change.elapsed() > stall {
            return;
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

pub(crate) fn cpu_delta(a: Sample, b: Sample) -> Option<f64> {
    Some(b.cpu_secs? - a.cpu_secs?)
}

/// The kernel's part of [`cpu_delta`].
fn sys_delta(a: Sample, b: Sample) -> Option<f64> {
    Some(b.sys_secs? - a.sys_secs?)
}

fn via(server: &Server) -> Via {
    match server.proxy {
        Some(p) if server.kind == Some(Kind::PushbridgeReceipts) => Via::ProxyWithReceipts(p),
        Some(p) => Via::Proxy(p),
        None => Via::Mqtt(server.mqtt),
    }
}

pub(crate) fn join_note(parts: &[String]) -> String {
    parts
        .iter()
        .filter(|p| !p.is_empty())
        .cloned()
        .collect::<Vec<_>>()
        .join("; ")
}

pub(crate) fn sent_note(sent: &send::Sent) -> String {
    let mut parts = Vec::new();
    if sent.refused > 0 {
        parts.push(format!("{} refused by the server", sent.refused));
    }
    if let Some(e) = sent.errors.first() {
        parts.push(format!("sender: {e}"));
    }
    parts.join("; ")
}

/// idle and p2p at `n` devices on a fresh server.
async fn devices_run(cli: &Cli, spec: &Spec, n: u64) -> Vec<Row> {
    let name = spec.name();
    let mut server = match Server::start(spec, cli.limits()).await {
        Ok(s) => s,
        Err(e) => return failed_rows(cli, &name, n, format!("start failed: {e:#}")),
    };
    match server.fill_registry(n).await {
        Ok(_) => {}
        Err(e) => {
            server.stop().await;
            return failed_rows(cli, &name, n, format!("filling the registry failed: {e:#}"));
        }
    }
    let before = server.sample();
    let set = DeviceSet::connect(cli, server.mqtt, n, |i| format!("push/user/{i}")).await;
    tokio::time::sleep(Duration::from_millis(cli.settle_ms)).await;
    let after = server.sample();
    let ready = set.ready();
    let mut rows = Vec::new();
    if cli.wants("idle") {
        rows.push(Row {
            workload: "idle",
            target: name.clone(),
            param: n,
            messages: n,
            delivered: ready.len() as u64,
            lost: n - ready.len() as u64,
            secs: set.connect_secs,
            rate: ready.len() as f64 / set.connect_secs.max(1e-9),
            cpu_secs: cpu_delta(before, after),
            rss_before_kib: before.rss_kib,
            rss_after_kib: after.rss_kib,
            note: set.note.clone(),
            ..Row::default()
        });
    }
    if cli.wants("p2p") {
        for &rate in &cli.p2p_rates {
            let offered = (rate > 0).then_some(rate as f64);
            let row = if ready.is_empty() || set.note.contains("failed") {
                Row {
                    workload: "p2p",
                    target: name.clone(),
                    param: n,
                    offered,
                    messages: cli.messages,
                    lost: cli.messages,
                    note: join_note(&["not run: devices did not connect".into(), set.note.clone()]),
                    ..Row::default()
                }
            } else {
                p2p(cli, &name, &mut server, &set, &ready, n, offered).await
            };
            rows.push(row);
        }
    }
    set.close().await;
    if !server.alive() {
        for r in &mut rows {
            r.note = join_note(&[r.note.clone(), "server exited".into()]);
        }
        eprintln!("server log:\n{}", server.log_tail());
    }
    server.stop().await;
    rows
}

fn failed_rows(cli: &Cli, name: &str, n: u64, note: String) -> Vec<Row> {
    eprintln!("{name}: {note}");
    ["idle", "p2p"]
        .into_iter()
        .filter(|w| cli.wants(w))
        .map(|w| Row {
            workload: w,
            target: name.into(),
            param: n,
            lost: if w == "p2p" { cli.messages } else { n },
            messages: if w == "p2p" { cli.messages } else { n },
            note: note.clone(),
            ..Row::default()
        })
        .collect()
}

async fn p2p(
    cli: &Cli,
    name: &str,
    server: &mut Server,
    set: &DeviceSet,
    ready: &[u32],
    n: u64,
    offered: Option<f64>,
) -> Row {
    let m = cli.messages;
    // The same pseudo-random users for every target.
    let mut rng = rand::rngs::StdRng::seed_from_u64(0x5eed ^ n ^ offered.unwrap_or(0.0) as u64);
    let msgs: Vec<Msg> = (0..m)
        .map(|seq| Msg {
            to: To::User(ready[rng.random_range(0..ready.len())]),
            seq,
        })
        .collect();
    // pushbridge-redis, pushbridge-ios: pushes to iOS users go to the local APNs, not to the devices.
    let apns_counters = server.apns.as_ref().map(|a| Arc::clone(&a.counters));
    let ios = apns_counters.is_some();
    let to_apns = if ios {
        msgs.iter()
            .filter(|m| matches!(m.to, To::User(u) if target::is_ios(u.into())))
            .count() as u64
    } else {
        0
    };
    let expected = m - to_apns;
    let apns0 = apns_counters.as_ref().map_or(0, |c| c.requests());
    let phase = Phase::with_keys(m, expected, false, n);
    set.shared.set_phase(Some(phase.clone()));
    let pad = send::pad_for(cli.payload);
    let stages0 = server.stages().await;
    let s0 = server.sample();
    let me0 = Sample::of(Some(std::process::id()));
    let deadline = Instant::now() + cli.phase_limit();
    let via = via(server);
    let (senders, window) = (cli.senders, cli.window);
    let sender = tokio::spawn(async move {
        send::send_all(via, &msgs, senders, window, &pad, deadline, offered).await
    });
    wait_deliveries(cli, &phase, expected, deadline).await;
    let sent = sender.await.unwrap_or_default();
    let mut apns = 0;
    if let Some(c) = &apns_counters {
        // The devices' share is in; wait for the APNs share as long (stall-bounded).
        let stall = Duration::from_secs(cli.stall_timeout);
        let (mut last, mut since) = (u64::MAX, Instant::now());
        loop {
            apns = c.requests().saturating_sub(apns0);
            if apns >= to_apns || Instant::now() > deadline {
                break;
            }
            if apns != last {
                (last, since) = (apns, Instant::now());
            } else if since.elapsed() > stall {
                break;
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }
    let s1 = server.sample();
    let me1 = Sample::of(Some(std::process::id()));
    let stages = stages_note(&stages0, &server.stages().await);
    set.shared.set_phase(None);
    let (mut lat, mut at_socket) = phase.take_latencies();
    lat.sort_unstable();
    at_socket.sort_unstable();
    let delivered = phase.received().min(expected) + apns.min(to_apns);
    let mut last = phase.last_ns.load(Ordering::Relaxed);
    if let Some(c) = &apns_counters {
        last = last.max(c.last_ns.load(Ordering::Relaxed));
    }
    let secs = last.saturating_sub(sent.first_ns) as f64 / 1e9;
    let dropped = set.shared.dropped.load(Ordering::Relaxed);
    Row {
        workload: "p2p",
        target: name.into(),
        param: n,
        offered,
        messages: m,
        delivered,
        lost: m - delivered.min(m),
        duplicates: phase.duplicates.load(Ordering::Relaxed),
        secs,
        rate: if secs > 0.0 {
            delivered as f64 / secs
        } else {
            0.0
        },
        p50_ms: report::percentile_ms(&lat, 0.50),
        p99_ms: report::percentile_ms(&lat, 0.99),
        max_ms: report::percentile_ms(&lat, 1.0),
        sock_p50_ms: report::percentile_ms(&at_socket, 0.50),
        sock_p99_ms: report::percentile_ms(&at_socket, 0.99),
        sock_max_ms: report::percentile_ms(&at_socket, 1.0),
        cpu_secs: cpu_delta(s0, s1),
        sys_cpu_secs: sys_delta(s0, s1),
        tool_cpu_secs: cpu_delta(me0, me1),
        rss_before_kib: s0.rss_kib,
        rss_after_kib: s1.rss_kib,
        note: join_note(&[
            if ios {
                format!(
                    "{} to devices, {apns} of {to_apns} answered by the local APNs",
                    phase.received()
                )
            } else {
                String::new()
            },
            sent_note(&sent),
            if dropped > 0 {
                format!("{dropped} devices disconnected")
            } else {
                String::new()
            },
            stages,
        ]),
        ..Row::default()
    }
}

/// Where pushes waited inside pushbridge over the phase: p50/p99/max ms per
/// stage (empty for other servers).
fn stages_note(before: &[target::Stage], after: &[target::Stage]) -> String {
    let parts: Vec<String> = after
        .iter()
        .map(|s| s.since(before.iter().find(|b| b.name == s.name)))
        .filter_map(|s| {
            let max = s.max_secs * 1e3;
            let (p50, p99) = (s.quantile_ms(0.5)?.min(max), s.quantile_ms(0.99)?.min(max));
            Some(format!("{} {p50:.2}/{p99:.2}/{max:.1}", s.name))
        })
        .collect();
    if parts.is_empty() {
        return String::new();
    }
    format!("stages p50/p99/max ms: {}", parts.join(", "))
}

async fn fanout_run(cli: &Cli, spec: &Spec, g: u64) -> Row {
    let name = spec.name();
    let pushes = cli.fanout_pushes.max(1);
    let mut row = Row {
        workload: "fanout",
        target: name.clone(),
        param: g,
        messages: pushes,
        lost: pushes * g,
        ..Row::default()
    };
    let mut server = match Server::start(spec, cli.limits()).await {
        Ok(s) => s,
        Err(e) => {
            row.note = format!("start failed: {e:#}");
            return row;
        }
    };
    let set = DeviceSet::connect(cli, server.mqtt, g, |_| "push/group/1".into()).await;
    let ready = set.ready().len() as u64;
    if ready == 0 || set.note.contains("failed") {
        row.note = join_note(&["not run: devices did not connect".into(), set.note.clone()]);
        set.close().await;
        server.stop().await;
        return row;
    }
    let phase = Phase::new(pushes * g, true, g);
    set.shared.set_phase(Some(phase.clone()));
    let pad = send::pad_for(cli.payload);
    let s0 = server.sample();
    let me0 = Sample::of(Some(std::process::id()));
    let via = via(&server);
    let mut to_last = Vec::new();
    let mut notes = vec![set.note.clone()];
    let mut first_ns = None;
    for r in 0..pushes {
        let deadline = Instant::now() + cli.phase_limit();
        let msg = [Msg {
            to: To::Group(1),
            seq: r,
        }];
        let sent = send::send_all(via, &msg, 1, 1, &pad, deadline, None).await;
        first_ns.get_or_insert(sent.first_ns);
        notes.push(sent_note(&sent));
        if sent.accepted == 0 {
            break;
        }
        let want = (r + 1) * ready;
        wait_deliveries(cli, &phase, want, deadline).await;
        if phase.received() < want {
            notes.push(format!(
                "push {r} reached {} of {ready}",
                phase.received() - r * ready
            ));
            break;
        }
        to_last.push(
            phase
                .last_ns
                .load(Ordering::Relaxed)
                .saturating_sub(sent.first_ns),
        );
    }
    let s1 = server.sample();
    let me1 = Sample::of(Some(std::process::id()));
    set.shared.set_phase(None);
    let (mut lat, _) = phase.take_latencies();
    lat.sort_unstable();
    to_last.sort_unstable();
    let delivered = phase.received();
    let secs = phase
        .last_ns
        .load(Ordering::Relaxed)
        .saturating_sub(first_ns.unwrap_or(0)) as f64
        / 1e9;
    row.delivered = delivered;
    row.lost = pushes * g - delivered.min(pushes * g);
    row.duplicates = phase.duplicates.load(Ordering::Relaxed);
    row.secs = secs;
    row.rate = if to_last.is_empty() {
        0.0
    } else {
        // Deliveries per second while a push is spreading.
        (to_last.len() as u64 * ready) as f64 / (to_last.iter().sum::<u64>() as f64 / 1e9)
    };
    row.p50_ms = report::percentile_ms(&lat, 0.5);
    row.p99_ms = report::percentile_ms(&lat, 0.99);
    row.max_ms = report::percentile_ms(&lat, 1.0);
    row.last_p50_ms = report::percentile_ms(&to_last, 0.5);
    row.last_max_ms = report::percentile_ms(&to_last, 1.0);
    row.cpu_secs = cpu_delta(s0, s1);
    row.tool_cpu_secs = cpu_delta(me0, me1);
    row.rss_before_kib = s0.rss_kib;
    row.rss_after_kib = s1.rss_kib;
    row.note = join_note(&notes);
    set.close().await;
    if !server.alive() {
        row.note = join_note(&[row.note.clone(), "server exited".into()]);
    }
    server.stop().await;
    row
}

async fn ingest_run(cli: &Cli, spec: &Spec, conns: u64) -> Row {
    let name = spec.name();
    let f = cli.ingest_frames;
    let mut row = Row {
        workload: "ingest",
        target: name.clone(),
        param: conns,
        messages: f,
        lost: f,
        ..Row::default()
    };
    let mut server = match Server::start(spec, cli.limits()).await {
        Ok(s) => s,
        Err(e) => {
            row.note = format!("start failed: {e:#}");
            return row;
        }
    };
    let Some(proxy) = server.proxy else {
        row.note = "no proxy".into();
        return row;
    };
    // Users nobody is subscribed for: the proxy and dispatcher work, the broker has no one to send to.
    let mut rng = rand::rngs::StdRng::seed_from_u64(0x16e57 ^ conns);
    let msgs: Vec<Msg> = (0..f)
        .map(|seq| Msg {
            to: To::User(rng.random_range(0..1000)),
            seq,
        })
        .collect();
    let pad = send::pad_for(cli.payload);
    let s0 = server.sample();
    let me0 = Sample::of(Some(std::process::id()));
    let deadline = Instant::now() + cli.phase_limit();
    let mut sent = send::send_all(
        Via::Proxy(proxy),
        &msgs,
        conns as usize,
        cli.window,
        &pad,
        deadline,
        None,
    )
    .await;
    let s1 = server.sample();
    let me1 = Sample::of(Some(std::process::id()));
    sent.ack_latencies.sort_unstable();
    let secs = sent.last_ack_ns.saturating_sub(sent.first_ns) as f64 / 1e9;
    row.delivered = sent.accepted;
    row.lost = f - sent.accepted.min(f);
    row.secs = secs;
    row.rate = if secs > 0.0 {
        sent.accepted as f64 / secs
    } else {
        0.0
    };
    row.p50_ms = report::percentile_ms(&sent.ack_latencies, 0.5);
    row.p99_ms = report::percentile_ms(&sent.ack_latencies, 0.99);
    row.max_ms = report::percentile_ms(&sent.ack_latencies, 1.0);
    row.cpu_secs = cpu_delta(s0, s1);
    row.tool_cpu_secs = cpu_delta(me0, me1);
    row.rss_before_kib = s0.rss_kib;
    row.rss_after_kib = s1.rss_kib;
    row.note = sent_note(&sent);
    if !server.alive() {
        row.note = join_note(&[row.note.clone(), "server exited".into()]);
    }
    server.stop().await;
    row
}

fn machine() -> String {
    let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .map(|l| l.trim_start_matches([' ', '\t', ':']).to_string())
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let mem = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find_map(|l| l.strip_prefix("MemTotal:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        })
        .map_or("?".into(), |k| format!("{:.1} GiB", k as f64 / 1048576.0));
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    format!("{model}, {cores} cores, {mem} RAM, Linux {}", kernel.trim())
}

fn mosquitto_version(bin: &std::path::Path) -> String {
    std::process::Command::new(bin)
        .arg("-h")
        .output()
        .ok()
        .and_then(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .find(|l| l.contains("version"))
                .map(str::to_string)
        })
        .unwrap_or_else(|| "mosquitto (version unknown)".into())
}

/// `YYYY-MM-DD HH:MM UTC` without a date library.
fn utc_now() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs()) as i64;
    let (days, rem) = (secs.div_euclid(86400), secs.rem_euclid(86400));
    let (y, m, d) = pushbridge::utc::civil_from_days(days);
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02} UTC",
        rem / 3600,
        rem % 3600 / 60
    )
}

fn write_results(cli: &Cli, rows: &[Row], runs: &[Row], tables: &str) -> anyhow::Result<()> {
    let command: Vec<String> = std::env::args().collect();
    let header = format!(
        "# pushbridge-bench results\n\n\
         - date: {}\n- machine: {}\n- command: `{}`\n- mosquitto: {}\n\
         - runs: {} (tables show the median run of each measurement; every run is in runs.csv)\n\
         - broker limits on both: max_queued {}, max_inflight {}; payload ≈{} bytes JSON; \
         {} sender connections × window {}\n\n",
        utc_now(),
        machine(),
        command.join(" "),
        mosquitto_version(&cli.mosquitto_bin),
        cli.repeat.max(1),
        cli.max_queued,
        cli.max_inflight,
        cli.payload,
        cli.senders,
        cli.window,
    );
    let md = cli.out.join("results.md");
    std::fs::write(&md, format!("{header}{tables}"))
        .with_context(|| format!("writing {}", md.display()))?;
    let mut csv = String::from(report::CSV_HEADER);
    csv.push('\n');
    for r in rows {
        csv.push_str(&report::csv_line(r));
        csv.push('\n');
    }
    std::fs::write(cli.out.join("results.csv"), csv)?;
    let mut csv = String::from(report::CSV_HEADER);
    csv.push('\n');
    for r in runs {
        csv.push_str(&report::csv_line(r));
        csv.push('\n');
    }
    std::fs::write(cli.out.join("runs.csv"), csv)?;
    if !cli.no_svg {
        for w in report::WORKLOADS {
            if let Some(svg) = report::svg(w, rows) {
                std::fs::write(cli.out.join(format!("{w}.svg")), svg)?;
            }
        }
    }
    eprintln!("results written to {}", cli.out.display());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn utc_date_is_plausible() {
        let d = utc_now();
        assert!(d.starts_with("20") && d.ends_with(" UTC"), "{d}");
    }

    #[test]
    fn smoke_sizes_are_small() {
        let mut cli = Cli::parse_from(["pushbridge-bench", "--smoke"]);
        cli.apply_smoke();
        assert_eq!(cli.devices, vec![20]);
        assert_eq!(cli.messages, 200);
    }
}
