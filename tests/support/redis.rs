//! A throwaway `redis-server` on a free loopback port, killed on drop; it
//! can be stopped and started again on the same port (outage tests).

use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct RedisServer {
    child: Option<Child>,
    pub url: String,
    port: u16,
    /// Append-only file with an fsync per write: a restart keeps every
    /// write Redis acknowledged.
    persistent: bool,
    /// More redis-server arguments (TLS).
    extra: Vec<String>,
    dir: tempfile::TempDir,
}

impl RedisServer {
    pub fn start() -> RedisServer {
        Self::start_with(false, None)
    }

    /// A server that also serves TLS with `pki`'s certificate; `url` is
    /// its `rediss://` URL (`conn` stays plain).
    pub fn start_tls(pki: &super::pki::Pki) -> RedisServer {
        Self::start_with(false, Some(pki))
    }

    /// A server that keeps its data across `stop` and `restart`.
    pub fn start_persistent() -> RedisServer {
        Self::start_with(true, None)
    }

    fn start_with(persistent: bool, pki: Option<&super::pki::Pki>) -> RedisServer {
        for _ in 0..5 {
            let (Some(port), Some(tls_port)) = (free_port(), free_port()) else {
                continue;
            };
            let (url, extra) = match pki {
                Some(pki) => (
                    format!("rediss://127.0.0.1:{tls_port}/"),
                    super::redis_cluster::tls_args(pki, tls_port),
                ),
                None => (format!("redis://127.0.0.1:{port}/"), Vec::new()),
            };
            let mut server = RedisServer {
                child: None,
                url,
                port,
                persistent,
                extra,
                dir: tempfile::tempdir().expect("temp dir"),
            };
            if server.spawn() {
                return server;
            }
        }
        panic!("could not start redis-server (is it installed? scripts/test.sh installs it)");
    }

    /// Starts redis-server on `self.port`; false if it exited or never answered.
    fn spawn(&mut self) -> bool {
        let mut args = if self.persistent {
            vec!["--appendonly", "yes", "--appendfsync", "always"]
        } else {
            vec![]
        };
        args.extend(self.extra.iter().map(String::as_str));
        self.child = spawn(self.port, &self.dir, None, &args);
        self.child.is_some()
    }

    /// Kills the server (SIGKILL, no goodbye to clients).
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts it again on the same port (and, if persistent, with its data).
    pub fn restart(&mut self) {
        self.stop();
        assert!(
            self.spawn(),
            "redis-server did not come back on port {}",
            self.port
        );
    }

    /// The plain (not TLS) port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// A plain connection, for writing data the way the old service did.
    pub fn conn(&self) -> ::redis::Connection {
        ::redis::Client::open(format!("redis://127.0.0.1:{}/", self.port))
            .and_then(|c| c.get_connection())
            .expect("connect to test redis")
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.stop();
    }
}

pub fn free_port() -> Option<u16> {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .ok()
}

/// Starts `redis-server` on `port` with its files in `dir`, the config file
/// `conf` if any, and `extra` arguments; waits until it answers PING. `None`
/// if it exited (most likely the port was taken meanwhile) or never answered.
pub fn spawn(
    port: u16,
    dir: &tempfile::TempDir,
    conf: Option<&std::path::Path>,
    extra: &[&str],
) -> Option<Child> {
    let client = ::redis::Client::open(format!("redis://127.0.0.1:{port}/")).ok()?;
    let mut child = Command::new("redis-server")
        .args(conf)
        .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
        .args(["--save", "", "--appendonly", "no", "--dir"])
        .arg(dir.path())
        .args(extra)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("redis-server not found: run scripts/test.sh, which installs it");
    let deadline = Instant::now() + super::WAIT;
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return None;
        }
        if let Ok(mut conn) = client.get_connection() {
            if ::redis::cmd("PING").query::<String>(&mut conn).is_ok() {
                return Some(child);
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
    None
}
