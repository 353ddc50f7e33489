//! A throwaway Redis Cluster (three masters) and a Sentinel-watched master,
//! from real redis-server processes on free loopback ports, killed on drop;
//! `start_tls` serves them over TLS as well (clients, cluster bus,
//! replication), with a certificate from [`Pki`].

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::pki::Pki;
use super::redis::{free_port, spawn};

/// redis-server arguments for serving TLS on `port` with `pki`'s
/// certificate (clients need not present one), replicating and gossiping
/// over TLS too. The plain port stays open for the harness's own checks.
pub fn tls_args(pki: &Pki, port: u16) -> Vec<String> {
    let path = |p: &std::path::Path| p.display().to_string();
    [
        "--tls-port",
        &port.to_string(),
        "--tls-cert-file",
        &path(&pki.cert),
        "--tls-key-file",
        &path(&pki.key),
        "--tls-ca-cert-file",
        &path(&pki.ca),
        "--tls-auth-clients",
        "no",
        "--tls-replication",
        "yes",
    ]
    .map(str::to_owned)
    .to_vec()
}

/// Processes killed (and their files removed) on drop.
struct Nodes {
    children: Vec<Child>,
    dir: tempfile::TempDir,
}

impl Drop for Nodes {
    fn drop(&mut self) {
        for child in &mut self.children {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

pub struct RedisCluster {
    _nodes: Nodes,
    pub ports: Vec<u16>,
    /// `redis+cluster://` with every node as a seed (`rediss+cluster://`
    /// and the TLS ports from `start_tls`).
    pub url: String,
}

impl RedisCluster {
    pub fn start() -> RedisCluster {
        Self::start_with(None)
    }

    /// A cluster whose nodes talk TLS to clients and to each other.
    pub fn start_tls(pki: &Pki) -> RedisCluster {
        Self::start_with(Some(pki))
    }

    fn start_with(pki: Option<&Pki>) -> RedisCluster {
        for _ in 0..5 {
            if let Some(cluster) = Self::try_start(pki) {
                return cluster;
            }
        }
        panic!("could not start a redis cluster (redis-server and redis-cli installed?)");
    }

    fn try_start(pki: Option<&Pki>) -> Option<RedisCluster> {
        let mut nodes = Nodes {
            children: Vec::new(),
            dir: tempfile::tempdir().ok()?,
        };
        let (mut ports, mut tls_ports) = (Vec::new(), Vec::new());
        for _ in 0..3 {
            // The bus port is set explicitly: port + 10000 may not exist.
            let (port, bus) = (free_port()?, free_port()?);
            let conf = format!("nodes-{port}.conf");
            let mut extra: Vec<String> = [
                "--cluster-enabled",
                "yes",
                "--cluster-config-file",
                &conf,
                "--cluster-port",
                &bus.to_string(),
                "--cluster-node-timeout",
                "5000",
            ]
            .map(str::to_owned)
            .to_vec();
            if let Some(pki) = pki {
                let tls_port = free_port()?;
                extra.extend(tls_args(pki, tls_port));
                extra.extend(["--tls-cluster".into(), "yes".into()]);
                tls_ports.push(tls_port);
            }
            let extra: Vec<&str> = extra.iter().map(String::as_str).collect();
            nodes.children.push(spawn(port, &nodes.dir, None, &extra)?);
            ports.push(port);
        }
        let addrs: Vec<String> = ports.iter().map(|p| format!("127.0.0.1:{p}")).collect();
        let created = Command::new("redis-cli")
            .arg("--cluster")
            .arg("create")
            .args(&addrs)
            .arg("--cluster-yes")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .expect("redis-cli not found: scripts/test.sh installs redis-server, which has it");
        if !created.success() {
            return None;
        }
        for port in &ports {
            wait_for(*port, "CLUSTER", &["INFO"], |info| {
                info.contains("cluster_state:ok")
            })?;
        }
        let url = if pki.is_some() {
            let tls: Vec<String> = tls_ports.iter().map(|p| format!("127.0.0.1:{p}")).collect();
            format!("rediss+cluster://{}", tls.join(","))
        } else {
            format!("redis+cluster://{}", addrs.join(","))
        };
        Some(RedisCluster {
            _nodes: nodes,
            url,
            ports,
        })
    }

    /// A cluster connection, for checking data behind pushbridge's back.
    pub fn conn(&self) -> ::redis::cluster::ClusterConnection {
        let nodes: Vec<String> = self
            .ports
            .iter()
            .map(|p| format!("redis://127.0.0.1:{p}/"))
            .collect();
        ::redis::cluster::ClusterClient::new(nodes)
            .and_then(|c| c.get_connection())
            .expect("connect to test cluster")
    }
}

/// Polls `cmd args` on the server at `port` until `ok(answer)`; `None` after WAIT.
fn wait_for(port: u16, cmd: &str, args: &[&str], ok: impl Fn(&str) -> bool) -> Option<()> {
    let client = ::redis::Client::open(format!("redis://127.0.0.1:{port}/")).ok()?;
    let deadline = Instant::now() + super::WAIT;
    while Instant::now() < deadline {
        if let Ok(mut conn) = client.get_connection() {
            let answer: Result<::redis::Value, _> = ::redis::cmd(cmd).arg(args).query(&mut conn);
            if answer.is_ok_and(|v| ok(&format!("{v:?}"))) {
                return Some(());
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    None
}

/// One master with one replica, watched by one sentinel (quorum 1) as
/// `mymaster`; `failover` promotes the replica.
pub struct RedisSentinel {
    _nodes: Nodes,
    pub master_port: u16,
    pub replica_port: u16,
    pub sentinel_port: u16,
    /// `redis+sentinel://` naming the sentinel and the master name
    /// (`rediss+sentinel://` and the sentinel's TLS port from `start_tls`).
    pub url: String,
}

impl RedisSentinel {
    pub fn start() -> RedisSentinel {
        Self::start_with(None)
    }

    /// Master, replica and sentinel serving TLS; the sentinel watches the
    /// master over TLS and names its TLS port.
    pub fn start_tls(pki: &Pki) -> RedisSentinel {
        Self::start_with(Some(pki))
    }

    fn start_with(pki: Option<&Pki>) -> RedisSentinel {
        for _ in 0..5 {
            if let Some(s) = Self::try_start(pki) {
                return s;
            }
        }
        panic!("could not start redis sentinel (is redis-server installed?)");
    }

    fn try_start(pki: Option<&Pki>) -> Option<RedisSentinel> {
        let dir = tempfile::tempdir().ok()?;
        // The port clients, replicas and the sentinel use: the TLS one if any.
        let tls = |port: u16| -> Option<(Vec<String>, u16)> {
            match pki {
                Some(pki) => {
                    let tls_port = free_port()?;
                    Some((tls_args(pki, tls_port), tls_port))
                }
                None => Some((Vec::new(), port)),
            }
        };
        let master_port = free_port()?;
        let (master_args, master_served) = tls(master_port)?;
        let master_args: Vec<&str> = master_args.iter().map(String::as_str).collect();
        let master = spawn(master_port, &dir, None, &master_args)?;
        let mut nodes = Nodes {
            children: vec![master],
            dir,
        };
        let replica_port = free_port()?;
        let master_addr = format!("127.0.0.1 {master_served}");
        let (mut replica_args, _) = tls(replica_port)?;
        replica_args.extend(
            ["--replicaof", &master_addr, "--dbfilename", "replica.rdb"].map(str::to_owned),
        );
        let replica_args: Vec<&str> = replica_args.iter().map(String::as_str).collect();
        let replica = spawn(replica_port, &nodes.dir, None, &replica_args)?;
        nodes.children.push(replica);
        wait_for(replica_port, "INFO", &["replication"], |v| {
            v.contains("master_link_status:up")
        })?;
        let sentinel_port = free_port()?;
        // Sentinel rewrites its configuration file, so it gets its own.
        let conf = nodes.dir.path().join("sentinel.conf");
        std::fs::write(
            &conf,
            format!(
                "sentinel monitor mymaster 127.0.0.1 {master_served} 1\n\
                 sentinel down-after-milliseconds mymaster 2000\n\
                 sentinel failover-timeout mymaster 5000\n"
            ),
        )
        .ok()?;
        let (mut sentinel_args, sentinel_served) = tls(sentinel_port)?;
        sentinel_args.push("--sentinel".into());
        let sentinel_args: Vec<&str> = sentinel_args.iter().map(String::as_str).collect();
        let sentinel = spawn(sentinel_port, &nodes.dir, Some(&conf), &sentinel_args)?;
        nodes.children.push(sentinel);
        wait_for(
            sentinel_port,
            "SENTINEL",
            &["get-master-addr-by-name", "mymaster"],
            |v| v.contains(&master_served.to_string()),
        )?;
        let scheme = if pki.is_some() { "rediss" } else { "redis" };
        Some(RedisSentinel {
            _nodes: nodes,
            master_port,
            replica_port,
            sentinel_port,
            url: format!("{scheme}+sentinel://127.0.0.1:{sentinel_served}/mymaster"),
        })
    }

    /// Has the sentinel promote the replica and demotes the old master;
    /// returns once the sentinel names the replica master.
    pub fn failover(&self) {
        let port = self.replica_port.to_string();
        // Refused (NOGOODSLAVE) until the sentinel has connected to the
        // replica and heard from it; ask until it starts.
        wait_for(
            self.sentinel_port,
            "SENTINEL",
            &["FAILOVER", "mymaster"],
            |v| v == "ok",
        )
        .expect("the sentinel starts a failover");
        wait_for(
            self.sentinel_port,
            "SENTINEL",
            &["get-master-addr-by-name", "mymaster"],
            |v| v.contains(&port),
        )
        .expect("sentinel names the replica master");
        wait_for(self.replica_port, "ROLE", &[], |v| v.contains("master"))
            .expect("the replica is promoted");
        // The sentinel demotes a still-running old master only after
        // watching it for several seconds; do now what it would do then.
        let mut old = ::redis::Client::open(format!("redis://127.0.0.1:{}/", self.master_port))
            .and_then(|c| c.get_connection())
            .expect("connect to the old master");
        let _: () = ::redis::cmd("REPLICAOF")
            .arg("127.0.0.1")
            .arg(self.replica_port)
            .query(&mut old)
            .expect("demote the old master");
    }
}
