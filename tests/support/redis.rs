//! A throwaway `redis-server` on a free loopback port, killed on drop.

use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct RedisServer {
    child: Child,
    pub url: String,
    _dir: tempfile::TempDir,
}

impl RedisServer {
    pub fn start() -> RedisServer {
        for _ in 0..5 {
            if let Some(server) = Self::try_start() {
                return server;
            }
        }
        panic!("could not start redis-server (is it installed? scripts/test.sh installs it)");
    }

    fn try_start() -> Option<RedisServer> {
        let port = free_port()?;
        let dir = tempfile::tempdir().ok()?;
        let child = spawn(port, &dir, None, &[])?;
        Some(RedisServer {
            child,
            url: format!("redis://127.0.0.1:{port}/"),
            _dir: dir,
        })
    }

    /// A plain connection, for writing data the way the old service did.
    pub fn conn(&self) -> ::redis::Connection {
        ::redis::Client::open(self.url.as_str())
            .and_then(|c| c.get_connection())
            .expect("connect to test redis")
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
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
