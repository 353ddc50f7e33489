//! A real headless Chromium (Debian's `chromium`) driven over WebDriver by
//! Debian's `chromedriver`, so page tests run the page's own JavaScript.

use std::net::{SocketAddr, TcpListener};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use fantoccini::{Client, ClientBuilder, Locator};
use hyper_util::client::legacy::connect::HttpConnector;
use serde_json::json;

const CHROMIUM: &str = "/usr/bin/chromium";
const CHROMEDRIVER: &str = "/usr/bin/chromedriver";

/// Bounds browser start-up, which is slow on a loaded machine; only a
/// broken install would exceed it.
const START: Duration = Duration::from_secs(60);

/// chromedriver (and the Chromium it starts) in its own process group,
/// killed as a group when dropped so a failing test leaves no browser behind.
pub struct Browser {
    driver: Child,
    pub client: Client,
}

impl Browser {
    /// Starts chromedriver and a headless Chromium session. Panics (never
    /// skips) when either is missing: scripts/test.sh installs them.
    pub async fn start() -> Browser {
        Browser::start_with(&[]).await
    }

    /// `start`, with more Chromium command-line switches.
    pub async fn start_with(args: &[String]) -> Browser {
        for bin in [CHROMIUM, CHROMEDRIVER] {
            assert!(
                Path::new(bin).exists(),
                "{bin} is missing: the browser tests need Debian's chromium and \
                 chromium-driver; run scripts/test.sh (it apt-installs them)"
            );
        }
        let port = free_port();
        let driver = Command::new(CHROMEDRIVER)
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .process_group(0)
            .spawn()
            .expect("start chromedriver");
        let browser = Browser {
            driver,
            client: connect(port, args).await,
        };
        browser.client.set_window_size(1200, 1000).await.unwrap();
        browser
    }

    pub async fn open(&self, url: &str) {
        self.client.goto(url).await.expect("page loads");
    }

    /// The rendered text of the element with this id. The dashboard
    /// re-renders live values, so an element found may be replaced before
    /// its text is read (a stale reference): it is found again, a few times.
    pub async fn text(&self, id: &str) -> String {
        let mut tries = 0;
        loop {
            match self.element(id).await.text().await {
                Ok(text) => return text,
                Err(e) if tries < 3 => {
                    tries += 1;
                    eprintln!("#{id}: {e}; finding it again");
                }
                Err(e) => panic!("#{id}: element text: {e}"),
            }
        }
    }

    /// Polls the element's text until `want` holds; panics with the last
    /// text seen after WAIT.
    pub async fn wait_text(&self, id: &str, want: impl Fn(&str) -> bool) -> String {
        let deadline = tokio::time::Instant::now() + super::WAIT;
        loop {
            let text = self.text(id).await;
            if want(&text) {
                return text;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "#{id} still shows {text:?} after {:?}",
                super::WAIT
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Evaluates `script` (a function body that `return`s JSON) until
    /// `want` holds; panics with the last value seen after WAIT.
    pub async fn wait_script(
        &self,
        script: &str,
        want: impl Fn(&serde_json::Value) -> bool,
    ) -> serde_json::Value {
        let deadline = tokio::time::Instant::now() + super::WAIT;
        loop {
            let value = self
                .client
                .execute(script, Vec::new())
                .await
                .expect("script runs");
            if want(&value) {
                return value;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{script:?} still gives {value} after {:?}",
                super::WAIT
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Replaces an input's value by typing, as a person would.
    pub async fn fill(&self, id: &str, text: &str) {
        let el = self.element(id).await;
        el.clear().await.expect("clear input");
        el.send_keys(text).await.expect("type into input");
    }

    pub async fn click(&self, id: &str) {
        self.element(id).await.click().await.expect("click");
    }

    async fn element(&self, id: &str) -> fantoccini::elements::Element {
        self.client
            .find(Locator::Id(id))
            .await
            .unwrap_or_else(|e| panic!("no element #{id}: {e}"))
    }

    /// Ends the session (Chromium exits) and chromedriver.
    pub async fn close(self) {
        let _ = self.client.clone().close().await;
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        // SAFETY: kill(2) on our own child's process group; no memory involved.
        unsafe { libc::kill(-(self.driver.id() as i32), libc::SIGKILL) };
        let _ = self.driver.wait();
    }
}

fn free_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind a free port");
    l.local_addr().unwrap().port()
}

/// Waits for chromedriver to listen, then opens a session.
async fn connect(port: u16, extra: &[String]) -> Client {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let mut args = vec![
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--disable-background-networking",
        "--no-first-run",
    ];
    args.extend(extra.iter().map(String::as_str));
    let caps = json!({
        "browserName": "chrome",
        "goog:chromeOptions": { "binary": CHROMIUM, "args": args },
    });
    let caps = match caps {
        serde_json::Value::Object(m) => m,
        _ => unreachable!(),
    };
    let session = async {
        while tokio::net::TcpStream::connect(addr).await.is_err() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        ClientBuilder::new(HttpConnector::new())
            .capabilities(caps)
            .connect(&format!("http://{addr}"))
            .await
            .expect("chromedriver opens a Chromium session")
    };
    tokio::time::timeout(START, session)
        .await
        .expect("chromedriver and Chromium start in time")
}
