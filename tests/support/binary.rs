//! The real `pushbridge` binary as a child process: started from a
//! settings file on free loopback ports, its log lines readable, killed
//! (SIGKILL) when the test wants or when it ends.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Instant;

pub const BIN: &str = env!("CARGO_BIN_EXE_pushbridge");

/// A settings file in `dir`: every listener on 127.0.0.1:0, then `extra`
/// (TOML sections).
pub fn settings_file(dir: &Path, extra: &str) -> std::path::PathBuf {
    let path = dir.join("setting.toml");
    let text = format!(
        "[proxy]\nlisten = \"127.0.0.1:0\"\n[mqtt]\nlisten = \"127.0.0.1:0\"\n\
         [http]\nlisten = \"127.0.0.1:0\"\n[apns]\nconfig = \"{}\"\n{extra}",
        dir.join("config.json").display()
    );
    std::fs::write(&path, text).unwrap();
    path
}

/// `pushbridge serve`, running until killed (on drop at the latest).
pub struct Running {
    child: Child,
    started: String,
    lines: mpsc::Receiver<String>,
}

impl Running {
    /// Starts `pushbridge serve --config <config>` and waits for its start-up line.
    pub fn serve(config: &Path) -> Running {
        let mut child = Command::new(BIN)
            .args(["serve", "--config"])
            .arg(config)
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let mut out = BufReader::new(child.stdout.take().unwrap()).lines();
        let started = out
            .by_ref()
            .map(|l| l.unwrap())
            .find(|l| l.contains("pushbridge started"))
            .expect("start-up line");
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in out.map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        Running {
            child,
            started,
            lines,
        }
    }

    /// The start-up line's `key=value` field.
    pub fn started_field(&self, key: &str) -> &str {
        let s = &self.started;
        let start = s.find(&format!(" {key}=")).expect(key) + key.len() + 2;
        s[start..].split_whitespace().next().unwrap()
    }

    /// A listener's address from the start-up line (`proxy`, `mqtt`, `http`).
    pub fn addr(&self, name: &str) -> SocketAddr {
        self.started_field(name).parse().unwrap()
    }

    /// The next log line containing every one of `words`; panics after WAIT.
    pub fn log_line(&self, words: &[&str]) -> String {
        let deadline = Instant::now() + super::WAIT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let line = self
                .lines
                .recv_timeout(left)
                .unwrap_or_else(|_| panic!("no log line with {words:?} in time"));
            if words.iter().all(|w| line.contains(w)) {
                return line;
            }
        }
    }

    /// SIGTERM, and how it exited.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        self.child.wait().unwrap()
    }

    /// SIGKILL: no stop phases, nothing flushed.
    pub fn kill9(&mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
