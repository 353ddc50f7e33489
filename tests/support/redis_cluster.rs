//! A throwaway Redis Cluster (three masters) and a Sentinel-watched master,
//! from real redis-server processes on free loopback ports, killed on drop.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::redis::{free_port, spawn};

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
    /// `redis+cluster://` with every node as a seed.
    pub url: String,
}

impl RedisCluster {
    pub fn start() -> RedisCluster {
        for _ in 0..5 {
            if let Some(cluster) = Self::try_start() {
                return cluster;
            }
        }
        panic!("could not start a redis cluster (redis-server and redis-cli installed?)");
    }

    fn try_start() -> Option<RedisCluster> {
        let mut nodes = Nodes {
            children: Vec::new(),
            dir: tempfile::tempdir().ok()?,
        };
        let mut ports = Vec::new();
        for _ in 0..3 {
            // The bus port is set explicitly: port + 10000 may not exist.
            let (port, bus) = (free_port()?, free_port()?);
            let conf = format!("nodes-{port}.conf");
            let extra = [
                "--cluster-enabled",
                "yes",
                "--cluster-config-file",
                &conf,
                "--cluster-port",
                &bus.to_string(),
                "--cluster-node-timeout",
                "5000",
            ];
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
        Some(RedisCluster {
            _nodes: nodes,
            url: format!("redis+cluster://{}", addrs.join(",")),
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
    /// `redis+sentinel://` naming the sentinel and the master name.
    pub url: String,
}

impl RedisSentinel {
    pub fn start() -> RedisSentinel {
        for _ in 0..5 {
            if let Some(s) = Self::try_start() {
                return s;
            }
        }
        panic!("could not start redis sentinel (is redis-server installed?)");
    }

    fn try_start() -> Option<RedisSentinel> {
        let dir = tempfile::tempdir().ok()?;
        let master_port = free_port()?;
        let master = spawn(master_port, &dir, None, &[])?;
        let mut nodes = Nodes {
            children: vec![master],
            dir,
        };
        let replica_port = free_port()?;
        let master_addr = format!("127.0.0.1 {master_port}");
        let replica = spawn(
            replica_port,
            &nodes.dir,
            None,
            &["--replicaof", &master_addr, "--dbfilename", "replica.rdb"],
        )?;
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
                "sentinel monitor mymaster 127.0.0.1 {master_port} 1\n\
                 sentinel down-after-milliseconds mymaster 2000\n\
                 sentinel failover-timeout mymaster 5000\n"
            ),
        )
        .ok()?;
        let sentinel = spawn(sentinel_port, &nodes.dir, Some(&conf), &["--sentinel"])?;
        nodes.children.push(sentinel);
        wait_for(
            sentinel_port,
            "SENTINEL",
            &["get-master-addr-by-name", "mymaster"],
            |v| v.contains(&master_port.to_string()),
        )?;
        Some(RedisSentinel {
            _nodes: nodes,
            master_port,
            replica_port,
            sentinel_port,
            url: format!("redis+sentinel://127.0.0.1:{sentinel_port}/mymaster"),
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
