//! A stand-alone APNs for the benchmark: HTTP/2 over TLS on 127.0.0.1,
//! answering every `POST /3/device/<token>` with 200 and an `apns-id`, as
//! Apple does for a good token. pushbridge and h2load are measured against
//! the same server, so its own cost is the same for both. It counts what it
//! answered and when (the tool's clock), which is what both rates are
//! computed from.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use anyhow::Context;
use bytes::Bytes;
use rcgen::{CertificateParams, DnType, KeyPair};
use rustls::pki_types::{PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;

use crate::clock;

/// What the server answered, for one measurement.
#[derive(Debug, Default)]
pub struct Counters {
    pub requests: AtomicU64,
    pub body_bytes: AtomicU64,
    pub connections: AtomicU64,
    /// Tool-clock ns of the first and the last request answered.
    pub first_ns: AtomicU64,
    pub last_ns: AtomicU64,
}

impl Counters {
    pub fn requests(&self) -> u64 {
        self.requests.load(Ordering::Relaxed)
    }

    /// Requests per second between the first and the last answer.
    pub fn rate(&self) -> f64 {
        let (a, b) = (
            self.first_ns.load(Ordering::Relaxed),
            self.last_ns.load(Ordering::Relaxed),
        );
        let n = self.requests();
        if n < 2 || b <= a {
            return 0.0;
        }
        (n - 1) as f64 / ((b - a) as f64 / 1e9)
    }

    pub fn secs(&self) -> f64 {
        let (a, b) = (
            self.first_ns.load(Ordering::Relaxed),
            self.last_ns.load(Ordering::Relaxed),
        );
        b.saturating_sub(a) as f64 / 1e9
    }
}

/// The running server; stops when dropped.
pub struct LocalApns {
    pub addr: SocketAddr,
    /// Its certificate, for pushbridge's `apns.ca_file`.
    pub ca_file: PathBuf,
    pub counters: Arc<Counters>,
    stop: CancellationToken,
}

impl Drop for LocalApns {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

impl LocalApns {
    /// Listens on a free 127.0.0.1 port, announcing `streams` as
    /// SETTINGS_MAX_CONCURRENT_STREAMS; writes its certificate into `dir`.
    pub async fn start(dir: &Path, streams: u32) -> anyhow::Result<LocalApns> {
        let key = KeyPair::generate().context("server key")?;
        let mut params =
            CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()])?;
        params
            .distinguished_name
            .push(DnType::CommonName, "pushbridge-bench APNs");
        let cert = params.self_signed(&key).context("server certificate")?;
        let ca_file = dir.join("apns-ca.pem");
        std::fs::write(&ca_file, cert.pem())?;
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let mut config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .with_no_client_auth()
            .with_single_cert(
                vec![cert.der().clone()],
                PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
            )?;
        config.alpn_protocols = vec![b"h2".to_vec()];
        let acceptor = TlsAcceptor::from(Arc::new(config));
        let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        let counters = Arc::new(Counters::default());
        let stop = CancellationToken::new();
        // Its own thread and one-thread runtime: the server's cost and
        // scheduling are the same whichever client it answers, and it never
        // takes the client's core (on the tool's runtime its CPU per request
        // swung by 1.6x from one run to the next).
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("local APNs runtime")?;
        let (accepts, counted, stopping) = (acceptor, Arc::clone(&counters), stop.clone());
        std::thread::Builder::new()
            .name("local-apns".into())
            .spawn(move || {
                rt.block_on(async move {
                    match TcpListener::from_std(listener) {
                        Ok(l) => accept_loop(l, accepts, streams.max(1), counted, stopping).await,
                        Err(e) => eprintln!("local APNs: {e}"),
                    }
                })
            })
            .context("local APNs thread")?;
        Ok(LocalApns {
            addr,
            ca_file,
            counters,
            stop,
        })
    }

    /// `https://127.0.0.1:PORT`, for `apns.production_url`/`sandbox_url`.
    pub fn url(&self) -> String {
        format!("https://127.0.0.1:{}", self.addr.port())
    }
}

async fn accept_loop(
    listener: TcpListener,
    acceptor: TlsAcceptor,
    streams: u32,
    counters: Arc<Counters>,
    stop: CancellationToken,
) {
    loop {
        let tcp = tokio::select! {
            _ = stop.cancelled() => return,
            r = listener.accept() => match r {
                Ok((tcp, _)) => tcp,
                Err(_) => continue,
            },
        };
        let _ = tcp.set_nodelay(true);
        let (acceptor, counters, stop) = (acceptor.clone(), Arc::clone(&counters), stop.clone());
        tokio::spawn(async move {
            tokio::select! {
                _ = stop.cancelled() => {}
                _ = serve(tcp, acceptor, streams, counters) => {}
            }
        });
    }
}

async fn serve(
    tcp: tokio::net::TcpStream,
    acceptor: TlsAcceptor,
    streams: u32,
    counters: Arc<Counters>,
) -> anyhow::Result<()> {
    let tls = acceptor.accept(tcp).await?;
    let mut conn = h2::server::Builder::new()
        .max_concurrent_streams(streams)
        .handshake::<_, Bytes>(tls)
        .await?;
    counters.connections.fetch_add(1, Ordering::Relaxed);
    while let Some(req) = conn.accept().await {
        let (req, respond) = req?;
        tokio::spawn(answer(req, respond, Arc::clone(&counters)));
    }
    Ok(())
}

/// Reads the whole body (as Apple does before answering), then 200.
async fn answer(
    req: http::Request<h2::RecvStream>,
    mut respond: h2::server::SendResponse<Bytes>,
    counters: Arc<Counters>,
) {
    let mut body = req.into_body();
    let mut len = 0;
    while let Some(chunk) = body.data().await {
        let Ok(chunk) = chunk else { return };
        len += chunk.len();
        let _ = body.flow_control().release_capacity(chunk.len());
    }
    let n = counters.requests.fetch_add(1, Ordering::Relaxed);
    let now = clock::now_ns();
    if n == 0 {
        counters.first_ns.store(now, Ordering::Relaxed);
    }
    counters.last_ns.fetch_max(now, Ordering::Relaxed);
    counters.body_bytes.fetch_add(len as u64, Ordering::Relaxed);
    let resp = http::Response::builder()
        .status(200)
        .header("apns-id", format!("00000000-0000-0000-0000-{n:012}"))
        .body(())
        .unwrap_or_default();
    let _ = respond.send_response(resp, true);
}

/// The app every benchmark iOS user has.
pub const APP: &str = "com.example.bench";

/// A token (.p8) app for `APP` in `dir`: config.json and the key it names.
pub fn write_credentials(dir: &Path) -> anyhow::Result<PathBuf> {
    use p256::pkcs8::{DecodePrivateKey, EncodePrivateKey, LineEnding};
    let key = KeyPair::generate()?;
    let signing = p256::ecdsa::SigningKey::from_pkcs8_der(&key.serialize_der())
        .map_err(|e| anyhow::anyhow!("p8 key: {e}"))?;
    let pem = signing
        .to_pkcs8_pem(LineEnding::LF)
        .map_err(|e| anyhow::anyhow!("p8 pem: {e}"))?;
    std::fs::write(dir.join("AuthKey_BENCH00001.p8"), pem.as_bytes())?;
    let config = dir.join("config.json");
    std::fs::write(
        &config,
        serde_json::json!({ APP: {
            "key": "AuthKey_BENCH00001.p8", "key_id": "BENCH00001", "team_id": "TEAMBENCH1"
        }})
        .to_string(),
    )?;
    Ok(config)
}

/// The device token the tool gives user `u`.
pub fn token(u: u64) -> String {
    format!("{u:064x}")
}
