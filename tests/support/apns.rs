//! A local APNs: HTTP/2 over TLS on 127.0.0.1, answering as Apple documents,
//! plus writers for test credentials (PEM, encrypted PEM, .p12, .p8) and
//! config.json. Include with `#[path = "support/apns.rs"] mod apns_server;`.
#![allow(dead_code)]

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use rcgen::{BasicConstraints, CertificateParams, DnType, IsCa, KeyPair};
use rustls::client::danger::HandshakeSignatureValid;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{DigitallySignedStruct, DistinguishedName, SignatureScheme};
use serde_json::Value;
use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// How the server is set up.
#[derive(Debug, Clone, Default)]
pub struct ServerOptions {
    /// Refuse TLS handshakes without a client certificate.
    pub require_client_cert: bool,
    /// SETTINGS_MAX_CONCURRENT_STREAMS the server announces (unset: hyper's default).
    pub max_concurrent_streams: Option<u32>,
    /// Listen here (a restarted server takes its predecessor's port); unset: a free port.
    pub addr: Option<SocketAddr>,
}

/// An answer Apple can give, by device token.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    Ok,
    BadDeviceToken,
    ExpiredProviderToken,
    /// 410 with the time the token became invalid (ms since the epoch).
    Unregistered {
        timestamp: u64,
    },
    TooManyRequests,
    InternalServerError,
    ServiceUnavailable,
    Other {
        status: u16,
        reason: String,
    },
    /// No answer: the stream is reset with REFUSED_STREAM (the server did
    /// not process it).
    RefusedStream,
}

impl Reply {
    pub fn status(&self) -> StatusCode {
        let code = match self {
            Reply::Ok => 200,
            Reply::BadDeviceToken => 400,
            Reply::ExpiredProviderToken => 403,
            Reply::Unregistered { .. } => 410,
            Reply::TooManyRequests => 429,
            Reply::InternalServerError => 500,
            Reply::ServiceUnavailable => 503,
            Reply::Other { status, .. } => *status,
            Reply::RefusedStream => 0,
        };
        StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR)
    }

    /// Apple's JSON body; empty for 200.
    pub fn body(&self) -> Bytes {
        let reason = match self {
            Reply::Ok | Reply::RefusedStream => return Bytes::new(),
            Reply::Unregistered { timestamp } => {
                return serde_json::json!({"reason": "Unregistered", "timestamp": timestamp})
                    .to_string()
                    .into()
            }
            Reply::BadDeviceToken => "BadDeviceToken",
            Reply::ExpiredProviderToken => "ExpiredProviderToken",
            Reply::TooManyRequests => "TooManyRequests",
            Reply::InternalServerError => "InternalServerError",
            Reply::ServiceUnavailable => "ServiceUnavailable",
            Reply::Other { reason, .. } => reason,
        };
        serde_json::json!({ "reason": reason }).to_string().into()
    }
}

/// One request as the server saw it.
#[derive(Debug, Clone)]
pub struct SeenRequest {
    pub method: http::Method,
    pub path: String,
    pub headers: HeaderMap,
    /// The body as JSON (`Value::Null` if it was not JSON).
    pub body: Value,
    /// Subject of the client certificate, e.g. `CN=app develop`.
    pub client_subject: Option<String>,
    /// Which TLS connection carried it, counting from 1.
    pub connection: usize,
}

impl SeenRequest {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }
}

struct State {
    replies: Mutex<HashMap<String, Reply>>,
    scripts: Mutex<HashMap<String, VecDeque<Reply>>>,
    max_streams: Option<u32>,
    requests: mpsc::UnboundedSender<SeenRequest>,
    connections: AtomicUsize,
    open: watch::Sender<usize>,
    received: watch::Sender<usize>,
    hold_until: AtomicUsize,
    kick: Mutex<CancellationToken>,
    goaway: Mutex<CancellationToken>,
    shutdown: CancellationToken,
    tasks: TaskTracker,
}

/// The running server; stops when dropped.
pub struct ApnsServer {
    addr: SocketAddr,
    state: Arc<State>,
    requests: tokio::sync::Mutex<mpsc::UnboundedReceiver<SeenRequest>>,
    shutdown: CancellationToken,
}

impl Drop for ApnsServer {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

impl ApnsServer {
    pub async fn start() -> ApnsServer {
        Self::start_with(ServerOptions::default()).await
    }

    /// A server that refuses TLS handshakes without a client certificate.
    pub async fn start_requiring_client_cert() -> ApnsServer {
        Self::start_with(ServerOptions {
            require_client_cert: true,
            ..Default::default()
        })
        .await
    }

    pub async fn start_with(options: ServerOptions) -> ApnsServer {
        let ca = test_ca();
        let key = KeyPair::generate().expect("server key");
        let mut params =
            CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()])
                .expect("server params");
        params
            .distinguished_name
            .push(DnType::CommonName, "localhost");
        let cert = params
            .signed_by(&key, &ca.cert, &ca.key)
            .expect("server cert");
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let verifier = Arc::new(AnyClientCert {
            required: options.require_client_cert,
            provider: Arc::clone(&provider),
        });
        let mut config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("tls versions")
            .with_client_cert_verifier(verifier)
            .with_single_cert(
                vec![cert.der().clone()],
                PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(key.serialize_der())),
            )
            .expect("server tls config");
        config.alpn_protocols = vec![b"h2".to_vec()];
        let acceptor = TlsAcceptor::from(Arc::new(config));

        let bind_to = options
            .addr
            .unwrap_or_else(|| "127.0.0.1:0".parse().unwrap());
        let listener = TcpListener::bind(bind_to).await.expect("bind");
        let addr = listener.local_addr().expect("local addr");
        let (tx, rx) = mpsc::unbounded_channel();
        let state = Arc::new(State {
            replies: Mutex::new(HashMap::new()),
            scripts: Mutex::new(HashMap::new()),
            max_streams: options.max_concurrent_streams,
            requests: tx,
            connections: AtomicUsize::new(0),
            open: watch::channel(0).0,
            received: watch::channel(0).0,
            hold_until: AtomicUsize::new(0),
            kick: Mutex::new(CancellationToken::new()),
            goaway: Mutex::new(CancellationToken::new()),
            shutdown: CancellationToken::new(),
            tasks: TaskTracker::new(),
        });
        let shutdown = state.shutdown.clone();
        state.tasks.spawn(accept_loop(
            listener,
            acceptor,
            Arc::clone(&state),
            shutdown.clone(),
        ));
        ApnsServer {
            addr,
            state,
            requests: tokio::sync::Mutex::new(rx),
            shutdown,
        }
    }

    /// `https://localhost:PORT`, for `apns.production_url`/`sandbox_url`.
    /// Points `settings` at this server as Apple for `app`, with token
    /// (p8) credentials; the credentials' files live as long as the result.
    pub fn serve_token_app(
        &self,
        settings: &mut pushbridge::settings::Settings,
        app: &str,
    ) -> TestCredentials {
        let creds = TestCredentials::new();
        let (key, _) = creds.p8("AuthKey_KEY1.p8");
        settings.apns.config = creds
            .config(&serde_json::json!({app: {"key": key, "key_id": "KEY1", "team_id": "TEAM1"}}));
        settings.apns.production_url = self.url();
        settings.apns.ca_file = Some(self.ca_path());
        creds
    }

    pub fn url(&self) -> String {
        format!("https://localhost:{}", self.addr.port())
    }

    /// The test CA's PEM, for `apns.ca_file` (the same for every server).
    pub fn ca_path(&self) -> PathBuf {
        test_ca().pem_path.clone()
    }

    /// Answers requests for `token` with `reply` from now on (default: 200).
    pub fn reply_to(&self, token: &str, reply: Reply) {
        lock(&self.state.replies).insert(token.to_owned(), reply);
    }

    /// Answers the next requests for `token` with `replies`, in order; after
    /// them the `reply_to` answer (default: 200) applies again.
    pub fn script(&self, token: &str, replies: impl IntoIterator<Item = Reply>) {
        lock(&self.state.scripts)
            .entry(token.to_owned())
            .or_default()
            .extend(replies);
    }

    /// Holds every answer until `n` requests have arrived in total, so a
    /// client sending one request at a time never gets there.
    pub fn hold_answers_until(&self, n: usize) {
        self.state.hold_until.store(n, Ordering::SeqCst);
    }

    /// The next request, or `None` after `timeout`.
    pub async fn try_next_request(&self, timeout: Duration) -> Option<SeenRequest> {
        let mut rx = self.requests.lock().await;
        tokio::time::timeout(timeout, rx.recv())
            .await
            .ok()
            .flatten()
    }

    /// The next request; panics after `timeout`.
    pub async fn next_request(&self, timeout: Duration) -> SeenRequest {
        self.try_next_request(timeout)
            .await
            .unwrap_or_else(|| panic!("no request reached {} within {timeout:?}", self.url()))
    }

    /// TLS connections accepted so far.
    pub fn connections(&self) -> usize {
        self.state.connections.load(Ordering::SeqCst)
    }

    /// The address it listens on, for a restart on the same port.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Kills the server: listener and connections closed abruptly, and
    /// returns once they are all gone, so the port can be taken again.
    pub async fn kill(self) {
        self.state.shutdown.cancel();
        self.state.tasks.close();
        self.state.tasks.wait().await;
    }

    /// Sends GOAWAY on every open connection: requests already sent are
    /// still answered, new ones must go to a new connection.
    pub fn goaway(&self) {
        std::mem::replace(&mut *lock(&self.state.goaway), CancellationToken::new()).cancel();
    }

    /// Drops every open connection abruptly and waits until they are gone.
    pub async fn close_connections(&self) {
        let old = std::mem::replace(&mut *lock(&self.state.kick), CancellationToken::new());
        old.cancel();
        let mut open = self.state.open.subscribe();
        let _ = open.wait_for(|n| *n == 0).await;
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

async fn accept_loop(
    listener: TcpListener,
    acceptor: TlsAcceptor,
    state: Arc<State>,
    shutdown: CancellationToken,
) {
    loop {
        let tcp = tokio::select! {
            _ = shutdown.cancelled() => return,
            r = listener.accept() => match r {
                Ok((tcp, _)) => tcp,
                Err(_) => continue,
            },
        };
        let acceptor = acceptor.clone();
        let state = Arc::clone(&state);
        let shutdown = shutdown.clone();
        let tasks = state.tasks.clone();
        tasks.spawn(async move {
            let Ok(tls) = acceptor.accept(tcp).await else {
                return;
            };
            let subject = tls
                .get_ref()
                .1
                .peer_certificates()
                .and_then(|c| c.first())
                .and_then(|c| subject_of(c));
            let id = state.connections.fetch_add(1, Ordering::SeqCst) + 1;
            let kick = lock(&state.kick).clone();
            let goaway = lock(&state.goaway).clone();
            state.open.send_modify(|n| *n += 1);
            let service_state = Arc::clone(&state);
            let service =
                service_fn(move |req| handle(req, id, subject.clone(), Arc::clone(&service_state)));
            let mut builder = hyper::server::conn::http2::Builder::new(TokioExecutor::new());
            if let Some(n) = state.max_streams {
                builder.max_concurrent_streams(n);
            }
            let mut conn = std::pin::pin!(builder.serve_connection(TokioIo::new(tls), service));
            tokio::select! {
                _ = conn.as_mut() => {}
                _ = kick.cancelled() => {}
                _ = shutdown.cancelled() => {}
                _ = goaway.cancelled() => {
                    // GOAWAY: streams already open are still answered.
                    conn.as_mut().graceful_shutdown();
                    tokio::select! {
                        _ = conn.as_mut() => {}
                        _ = kick.cancelled() => {}
                        _ = shutdown.cancelled() => {}
                    }
                }
            }
            state.open.send_modify(|n| *n -= 1);
        });
    }
}

async fn handle(
    req: Request<Incoming>,
    connection: usize,
    client_subject: Option<String>,
    state: Arc<State>,
) -> Result<Response<Full<Bytes>>, h2::Error> {
    let (parts, body) = req.into_parts();
    let bytes = body
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    let path = parts.uri.path().to_owned();
    let token = path.strip_prefix("/3/device/").unwrap_or_default();
    let scripted = lock(&state.scripts)
        .get_mut(token)
        .and_then(VecDeque::pop_front);
    let reply = scripted.unwrap_or_else(|| {
        lock(&state.replies)
            .get(token)
            .cloned()
            .unwrap_or(Reply::Ok)
    });
    let _ = state.requests.send(SeenRequest {
        method: parts.method,
        path: path.clone(),
        headers: parts.headers,
        body: serde_json::from_slice(&bytes).unwrap_or(Value::Null),
        client_subject,
        connection,
    });
    state.received.send_modify(|n| *n += 1);
    let hold = state.hold_until.load(Ordering::SeqCst);
    let mut received = state.received.subscribe();
    tokio::select! {
        _ = received.wait_for(|n| *n >= hold) => {}
        _ = state.shutdown.cancelled() => {}
    }
    if reply == Reply::RefusedStream {
        // hyper resets the stream with the reason of the service's error.
        return Err(h2::Reason::REFUSED_STREAM.into());
    }
    let apns_id = format!("00000000-0000-0000-0000-{:012}", *received.borrow());
    let resp = Response::builder()
        .status(reply.status())
        .header("apns-id", apns_id)
        .header("content-type", "application/json")
        .body(Full::new(reply.body()))
        .unwrap_or_default();
    Ok(resp)
}

fn subject_of(cert: &CertificateDer<'_>) -> Option<String> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert.as_ref()).ok()?;
    Some(parsed.subject().to_string())
}

/// Accepts any client certificate (APNs certificates are Apple's to
/// check); the server only reports whose it was.
#[derive(Debug)]
struct AnyClientCert {
    required: bool,
    provider: Arc<rustls::crypto::CryptoProvider>,
}

impl ClientCertVerifier for AnyClientCert {
    fn offer_client_auth(&self) -> bool {
        true
    }
    fn client_auth_mandatory(&self) -> bool {
        self.required
    }
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }
    fn verify_client_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        Ok(ClientCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }
    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }
    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

struct TestCa {
    cert: rcgen::Certificate,
    key: KeyPair,
    pem_path: PathBuf,
    _dir: tempfile::TempDir,
}

/// One CA for every server in the test binary, so one `ca_file` trusts them all.
fn test_ca() -> &'static TestCa {
    static CA: OnceLock<TestCa> = OnceLock::new();
    CA.get_or_init(|| {
        let key = KeyPair::generate().expect("ca key");
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("ca params");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params
            .distinguished_name
            .push(DnType::CommonName, "pushbridge test CA");
        let cert = params.self_signed(&key).expect("ca cert");
        let dir = tempfile::tempdir().expect("ca dir");
        let pem_path = dir.path().join("ca.pem");
        std::fs::write(&pem_path, cert.pem()).expect("write ca.pem");
        TestCa {
            cert,
            key,
            pem_path,
            _dir: dir,
        }
    })
}

/// A directory of test credentials and a config.json naming them. Writers
/// return the file name relative to the directory, as config.json wants.
pub struct TestCredentials {
    dir: tempfile::TempDir,
}

/// A self-signed client certificate and its key.
pub struct ClientCert {
    pub cert_pem: String,
    pub cert_der: Vec<u8>,
    /// PKCS#8 DER.
    pub key_der: Vec<u8>,
    /// As the server reports it: `CN=<cn>`.
    pub subject: String,
}

impl ClientCert {
    pub fn new(cn: &str) -> ClientCert {
        Self::build(cn, None)
    }

    /// A certificate whose validity ended in 2020.
    pub fn expired(cn: &str) -> ClientCert {
        Self::build(cn, Some((2020, 1, 1)))
    }

    /// A certificate valid until `days` days from today (UTC).
    pub fn expiring_in(cn: &str, days: i64) -> ClientCert {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("clock after 1970")
            .as_secs() as i64;
        let (y, m, d) = pushbridge::utc::civil_from_days(now / 86400 + days);
        Self::build(cn, Some((y as i32, m as u8, d as u8)))
    }

    /// `not_after`: (year, month, day), the end of validity; `None`: far away.
    fn build(cn: &str, not_after: Option<(i32, u8, u8)>) -> ClientCert {
        let key = KeyPair::generate().expect("client key");
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("client params");
        params.distinguished_name.push(DnType::CommonName, cn);
        if let Some((y, m, d)) = not_after {
            params.not_before = rcgen::date_time_ymd(2019, 1, 1);
            params.not_after = rcgen::date_time_ymd(y, m, d);
        }
        let cert = params.self_signed(&key).expect("client cert");
        ClientCert {
            cert_pem: cert.pem(),
            cert_der: cert.der().to_vec(),
            key_der: key.serialize_der(),
            subject: format!("CN={cn}"),
        }
    }

    /// The key as PEM: `PRIVATE KEY`, or `ENCRYPTED PRIVATE KEY` (PBES2,
    /// AES-256-CBC) when a password is given.
    pub fn key_pem(&self, password: Option<&str>) -> String {
        use pkcs8::der::pem::LineEnding;
        let info = pkcs8::PrivateKeyInfo::try_from(self.key_der.as_slice()).expect("pkcs8");
        match password {
            None => pkcs8::der::SecretDocument::try_from(info)
                .expect("doc")
                .to_pem("PRIVATE KEY", LineEnding::LF)
                .expect("pem")
                .to_string(),
            Some(pw) => {
                let params = pkcs8::pkcs5::pbes2::Parameters::pbkdf2_sha256_aes256cbc(
                    2048,
                    b"pushbridge-salt",
                    &[7u8; 16],
                )
                .expect("pbes2 params");
                info.encrypt_with_params(params, pw)
                    .expect("encrypt")
                    .to_pem("ENCRYPTED PRIVATE KEY", LineEnding::LF)
                    .expect("pem")
                    .to_string()
            }
        }
    }
}

impl Default for TestCredentials {
    fn default() -> Self {
        Self::new()
    }
}

impl TestCredentials {
    pub fn new() -> TestCredentials {
        TestCredentials {
            dir: tempfile::tempdir().expect("credentials dir"),
        }
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    pub fn write(&self, name: &str, contents: impl AsRef<[u8]>) -> String {
        std::fs::write(self.dir.path().join(name), contents).expect("write credential");
        name.to_owned()
    }

    /// Certificate + key in one PEM, the key encrypted when `password` is given.
    pub fn pem(&self, name: &str, cert: &ClientCert, password: Option<&str>) -> String {
        self.write(name, format!("{}{}", cert.cert_pem, cert.key_pem(password)))
    }

    /// `cert`'s certificate with `other`'s key.
    pub fn mismatched_pem(&self, name: &str, cert: &ClientCert, other: &ClientCert) -> String {
        self.write(name, format!("{}{}", cert.cert_pem, other.key_pem(None)))
    }

    /// A PKCS#12 file with the key and certificate.
    pub fn p12(&self, name: &str, cert: &ClientCert, password: &str) -> String {
        let mut store = p12_keystore::KeyStore::new();
        let chain = p12_keystore::PrivateKeyChain::new(
            &cert.key_der,
            [1u8, 2, 3, 4],
            [p12_keystore::Certificate::from_der(&cert.cert_der).expect("p12 cert")],
        );
        store.add_entry("apns", p12_keystore::KeyStoreEntry::PrivateKeyChain(chain));
        let bytes = store.writer(password).write().expect("write p12");
        self.write(name, bytes)
    }

    /// An `AuthKey_*.p8` (PKCS#8 P-256) and the public key to verify JWTs with.
    pub fn p8(&self, name: &str) -> (String, p256::ecdsa::VerifyingKey) {
        use p256::pkcs8::{DecodePrivateKey, EncodePrivateKey, LineEnding};
        let key = KeyPair::generate().expect("p8 key");
        let signing =
            p256::ecdsa::SigningKey::from_pkcs8_der(&key.serialize_der()).expect("p256 key");
        let pem = signing.to_pkcs8_pem(LineEnding::LF).expect("p8 pem");
        let name = self.write(name, pem.as_bytes());
        (name, *signing.verifying_key())
    }

    /// Writes `config.json` with `apps` and returns its path.
    pub fn config(&self, apps: &Value) -> PathBuf {
        let path = self.dir.path().join("config.json");
        std::fs::write(&path, apps.to_string()).expect("write config.json");
        path
    }
}
