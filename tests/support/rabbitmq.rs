//! A throwaway RabbitMQ cluster (Debian's rabbitmq-server with its MQTT
//! plugin) of three nodes on free loopback ports, each with its own node
//! name, data and log directories, one Erlang cookie and its own epmd;
//! killed (process group) on drop. Three nodes: before 3.12 the MQTT plugin
//! keeps client ids in a Raft cluster of the nodes, which two nodes lose
//! with one of them; persistent sessions use quorum queues, replicated to
//! every node (a classic queue lives on one).

use std::net::{SocketAddr, TcpListener};
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = "/usr/lib/rabbitmq/bin";
/// Forming the cluster took 15 to 28 s on a shared 2-core machine.
const START: Duration = Duration::from_secs(120);

pub struct RabbitCluster {
    nodes: Vec<Node>,
    epmd_port: u16,
    epmd: Child,
    dir: tempfile::TempDir,
}

struct Node {
    name: String,
    mqtt_port: u16,
    env: Vec<(String, String)>,
    child: Option<Child>,
}

/// `epmd -port <free port>` in the foreground; `None` if it exited (the
/// port was taken meanwhile) or did not listen in time.
fn start_epmd(dir: &std::path::Path) -> Option<(Child, u16)> {
    let port = free_port();
    let log = std::fs::File::create(dir.join("epmd.log")).ok()?;
    let mut child = Command::new("epmd")
        .args(["-port", &port.to_string()])
        .stdout(log.try_clone().ok()?)
        .stderr(log)
        .spawn()
        .expect("epmd starts (erlang, installed with rabbitmq-server)");
    let deadline = Instant::now() + super::WAIT;
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return None;
        }
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return Some((child, port));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
    None
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

impl RabbitCluster {
    pub fn start() -> RabbitCluster {
        assert!(
            std::path::Path::new(BIN).join("rabbitmq-server").exists(),
            "rabbitmq-server not installed: run scripts/test.sh, which installs it"
        );
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join(".erlang.cookie"), "PUSHBRIDGETESTCOOKIE").unwrap();
        use std::os::unix::fs::PermissionsExt;
        let cookie = std::fs::Permissions::from_mode(0o400);
        std::fs::set_permissions(dir.path().join(".erlang.cookie"), cookie).unwrap();
        // Its own epmd, up before the nodes (three starting it at once race).
        let Some((epmd, epmd_port)) = (0..5).find_map(|_| start_epmd(dir.path())) else {
            let log = std::fs::read_to_string(dir.path().join("epmd.log")).unwrap_or_default();
            panic!("epmd did not start: {log}");
        };
        let mut cluster = RabbitCluster {
            nodes: Vec::new(),
            epmd_port,
            epmd,
            dir,
        };
        for n in ["a", "b", "c"] {
            let node = cluster.node(n);
            cluster.nodes.push(node);
        }
        for i in 0..cluster.nodes.len() {
            cluster.spawn(i);
        }
        let deadline = Instant::now() + START;
        for i in 0..cluster.nodes.len() {
            while !cluster.ctl(i, &["await_startup"]) {
                assert!(Instant::now() < deadline, "rabbitmq node did not start");
                std::thread::sleep(Duration::from_millis(200));
            }
        }
        let first = cluster.nodes[0].name.clone();
        for i in 1..cluster.nodes.len() {
            for args in [&["stop_app"][..], &["join_cluster", &first], &["start_app"]] {
                assert!(cluster.ctl(i, args), "rabbitmqctl {args:?}");
            }
        }
        cluster
    }

    fn node(&self, n: &str) -> Node {
        let dir = self.dir.path().join(n);
        std::fs::create_dir(&dir).unwrap();
        let mqtt_port = free_port();
        let conf = dir.join("rabbitmq.conf");
        std::fs::write(
            &conf,
            format!(
                "listeners.tcp.default = {}\nmqtt.listeners.tcp.default = {mqtt_port}\n\
                 mqtt.allow_anonymous = true\nloopback_users = none\n\
                 mqtt.durable_queue_type = quorum\n",
                free_port()
            ),
        )
        .unwrap();
        std::fs::write(dir.join("enabled_plugins"), "[rabbitmq_mqtt].\n").unwrap();
        let name = format!("pbtest{}{n}@localhost", self.epmd_port);
        let path = |p: &str| dir.join(p).to_string_lossy().into_owned();
        let env = [
            ("HOME", self.dir.path().to_string_lossy().into_owned()),
            ("ERL_EPMD_PORT", self.epmd_port.to_string()),
            ("RABBITMQ_NODENAME", name.clone()),
            ("RABBITMQ_CONFIG_FILE", path("rabbitmq.conf")),
            ("RABBITMQ_ENABLED_PLUGINS_FILE", path("enabled_plugins")),
            ("RABBITMQ_MNESIA_BASE", path("mnesia")),
            ("RABBITMQ_LOG_BASE", path("log")),
            ("RABBITMQ_PID_FILE", path("pid")),
            ("RABBITMQ_DIST_PORT", free_port().to_string()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
        Node {
            name,
            mqtt_port,
            env,
            child: None,
        }
    }

    fn spawn(&mut self, i: usize) {
        let node = &mut self.nodes[i];
        let child = Command::new(format!("{BIN}/rabbitmq-server"))
            .envs(node.env.iter().map(|(k, v)| (k, v)))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .process_group(0)
            .spawn()
            .expect("rabbitmq-server starts");
        node.child = Some(child);
    }

    /// `rabbitmqctl -n <node> args`; true when it succeeded.
    fn ctl(&self, i: usize, args: &[&str]) -> bool {
        let node = &self.nodes[i];
        Command::new(format!("{BIN}/rabbitmqctl"))
            .arg("-n")
            .arg(&node.name)
            .args(args)
            .envs(node.env.iter().map(|(k, v)| (k, v)))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    }

    pub fn addr(&self, i: usize) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.nodes[i].mqtt_port))
    }

    pub fn url(&self, i: usize) -> String {
        format!("mqtt://127.0.0.1:{}", self.nodes[i].mqtt_port)
    }

    /// `rabbitmqctl stop`: the node leaves (its connections closed), then exits.
    pub fn stop(&mut self, i: usize) {
        assert!(self.ctl(i, &["stop"]), "rabbitmqctl stop");
        if let Some(mut child) = self.nodes[i].child.take() {
            let _ = child.wait();
        }
    }
}

impl Drop for RabbitCluster {
    fn drop(&mut self) {
        for node in &mut self.nodes {
            if let Some(mut child) = node.child.take() {
                // SAFETY: signals our own child's process group (the script and its beam).
                unsafe { libc::kill(-(child.id() as libc::pid_t), libc::SIGKILL) };
                let _ = child.wait();
            }
        }
        let _ = self.epmd.kill();
        let _ = self.epmd.wait();
    }
}
