//! A throwaway Mosquitto on a free loopback port (no persistence), killed on
//! drop; it can be paused, killed and started again on the same port.

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = "/usr/sbin/mosquitto";

pub struct Mosquitto {
    child: Option<Child>,
    pub port: u16,
    dir: tempfile::TempDir,
}

impl Mosquitto {
    /// Anonymous clients, no persistence, no inflight limit towards
    /// subscribers (a message is written to them before its PUBACK).
    pub fn start() -> Mosquitto {
        Self::start_with("")
    }

    /// Like `start`, with `extra` config lines (another listener, say).
    pub fn start_with(extra: &str) -> Mosquitto {
        for _ in 0..5 {
            let port = TcpListener::bind("127.0.0.1:0")
                .and_then(|l| l.local_addr())
                .map(|a| a.port())
                .expect("free port");
            let mut m = Mosquitto {
                child: None,
                port,
                dir: tempfile::tempdir().expect("tempdir"),
            };
            if m.try_run(extra) {
                return m;
            }
        }
        panic!("could not start mosquitto (scripts/test.sh installs it)");
    }

    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    pub fn url(&self) -> String {
        format!("mqtt://127.0.0.1:{}", self.port)
    }

    fn config_path(&self) -> PathBuf {
        self.dir.path().join("mosquitto.conf")
    }

    /// Writes the config with `extra` lines (reloaded by `reload`).
    pub fn write_config(&self, extra: &str) {
        let conf = format!(
            "listener {} 127.0.0.1\nallow_anonymous true\npersistence false\n\
             max_inflight_messages 0\nmax_queued_messages 0\n{extra}\n",
            self.port
        );
        std::fs::write(self.config_path(), conf).expect("write mosquitto.conf");
    }

    /// Starts on `self.port` with `extra` config lines; false if it exited
    /// (the port was taken) or never accepted a connection.
    fn try_run(&mut self, extra: &str) -> bool {
        self.write_config(extra);
        let mut child = Command::new(BIN)
            .arg("-c")
            .arg(self.config_path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("mosquitto not found: run scripts/test.sh, which installs it");
        let deadline = Instant::now() + super::WAIT;
        while Instant::now() < deadline {
            if let Ok(Some(_)) = child.try_wait() {
                return false;
            }
            if TcpStream::connect(self.addr()).is_ok() {
                self.child = Some(child);
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
        let _ = child.wait();
        false
    }

    /// Starts again on the same port (after `kill`), with `extra` config lines.
    pub fn restart(&mut self, extra: &str) {
        assert!(self.child.is_none(), "kill it first");
        let deadline = Instant::now() + super::WAIT;
        while !self.try_run(extra) {
            assert!(Instant::now() < deadline, "mosquitto did not restart");
        }
    }

    /// SIGKILL: whatever it held in memory is gone.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGTERM, then waits for the exit: Mosquitto closes every connection
    /// after writing what it had already sent on its way.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let pid = child.id() as libc::pid_t;
            // SAFETY: kill only sends a signal to our own child process.
            unsafe { libc::kill(pid, libc::SIGTERM) };
            let _ = child.wait();
        }
    }

    /// SIGSTOP: connections stay open, nothing is read or acknowledged.
    pub fn pause(&self) {
        self.signal(libc::SIGSTOP);
    }

    /// SIGCONT: after `pause`.
    pub fn resume(&self) {
        self.signal(libc::SIGCONT);
    }

    /// SIGHUP: re-reads the reloadable parts of the config file.
    pub fn reload(&self) {
        self.signal(libc::SIGHUP);
    }

    fn signal(&self, sig: libc::c_int) {
        let pid = self.child.as_ref().expect("running").id() as libc::pid_t;
        // SAFETY: kill only sends a signal to our own child process.
        assert_eq!(unsafe { libc::kill(pid, sig) }, 0, "signal mosquitto");
    }
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        self.kill();
    }
}
