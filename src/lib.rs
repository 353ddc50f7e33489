//! pushbridge: push delivery from backends to apps, over APNs or MQTT.
//!
//! [`start`] binds every listener and returns a [`Server`] with the bound
//! addresses (tests start it on `127.0.0.1:0`); [`run`] is what the binary
//! calls: start, then serve until the shutdown token is cancelled.

pub mod apns;
pub mod auth;
pub mod dispatch;
pub mod external;
#[cfg(feature = "fuzzing")]
#[doc(hidden)]
pub mod fuzzing;
pub mod http;
pub mod intake;
pub mod mqtt;
pub mod offline;
pub mod proxy;
pub mod publisher;
pub mod push;
pub mod redis_conn;
pub mod registry;
pub mod router;
pub mod settings;
pub mod stats;
pub mod status;
pub mod utc;
pub mod wire;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

use crate::apns::ApnsSender;
use crate::auth::Auth;
use crate::dispatch::Dispatcher;
use crate::external::ExternalBroker;
use crate::intake::Intake;
use crate::mqtt::{Broker, TlsConfig, Transport};
use crate::publisher::MqttOut;
use crate::registry::Registry;
use crate::settings::{AuthMode, MqttSettings, Settings};
use crate::stats::Stats;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Settings(#[from] settings::SettingsError),
    #[error("cannot listen on {key} = {addr}: {source}")]
    Bind {
        key: &'static str,
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error(transparent)]
    Registry(#[from] registry::RegistryError),
    #[error(transparent)]
    Apns(#[from] apns::ApnsError),
    #[error(transparent)]
    Auth(#[from] auth::AuthError),
    #[error(transparent)]
    Mqtt(#[from] mqtt::MqttError),
    #[error(transparent)]
    External(#[from] external::ExternalError),
    #[error(transparent)]
    Intake(#[from] intake::IntakeError),
}

/// A running pushbridge.
pub struct Server {
    pub proxy_addr: SocketAddr,
    /// With `mqtt.external_url`: `mqtt.listen` as set, not listened on.
    pub mqtt_addr: SocketAddr,
    /// MQTT over TLS, when `mqtt.tls_listen` is set.
    pub mqtt_tls_addr: Option<SocketAddr>,
    /// MQTT over WebSocket (path `/mqtt`), when `mqtt.ws_listen` is set.
    pub mqtt_ws_addr: Option<SocketAddr>,
    /// MQTT over WebSocket over TLS (path `/mqtt`), when `mqtt.wss_listen` is set.
    pub mqtt_wss_addr: Option<SocketAddr>,
    pub http_addr: SocketAddr,
    pub registry: Registry,
    /// The embedded broker; idle (no listeners) with `mqtt.external_url`.
    pub broker: Broker,
    pub stats: Arc<Stats>,
    /// Messages kept for offline users without APNs.
    pub offline: offline::OfflineStore,
    shutdown: CancellationToken,
    /// Cancelled once queued pushes are routed and sent: stops the broker.
    stop_mqtt: CancellationToken,
    /// Cancelled once the devices are gone: stops everything else.
    stop: CancellationToken,
    ingress: TaskTracker,
    mqtt: TaskTracker,
    tracker: TaskTracker,
    dispatcher: JoinHandle<()>,
    apns: ApnsSender,
    drain: Duration,
}

async fn bind(key: &'static str, addr: SocketAddr) -> Result<TcpListener, Error> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| Error::Bind { key, addr, source })
}

/// Binds the listeners and starts every part; cancelling `shutdown` stops it.
pub async fn start(settings: Settings, shutdown: CancellationToken) -> Result<Server, Error> {
    settings.check_anonymous()?;
    raise_fd_limit();
    let stats = Arc::new(Stats::default());
    let registry = Registry::open(&settings.registry).await?;
    let (stop, stop_mqtt) = (CancellationToken::new(), CancellationToken::new());
    let (tracker, ingress, mqtt) = (TaskTracker::new(), TaskTracker::new(), TaskTracker::new());

    let proxy_listener = bind("proxy.listen", settings.proxy.listen).await?;
    let external = settings.mqtt.external_url.is_some();
    let listeners = match external {
        false => MqttListeners::bind(&settings.mqtt).await?,
        true => MqttListeners::none(&settings.mqtt),
    };
    let (mqtt_addr, mqtt_tls_addr, mqtt_ws_addr, mqtt_wss_addr) = (
        listeners.addr,
        listeners.tls_addr,
        listeners.ws_addr,
        listeners.wss_addr,
    );
    let http_listener = bind("http.listen", settings.http.listen).await?;
    let http_addr = http_listener.local_addr().expect("bound");
    let proxy_addr = proxy_listener.local_addr().expect("bound");

    let auth = Auth::new(&settings.auth, &settings.mqtt.prefix)?
        .with_feedback_topic(settings.feedback_topic());
    for warning in config_warnings(&settings) {
        warn!("{warning}");
    }
    if settings.auth.mode == AuthMode::None && !external {
        warn!(
            "auth.mode = none: MQTT clients are not authenticated; any client may read any \
             user's or group's topic (set auth.mode = jwt)"
        );
        if !settings.auth.service_accounts.is_empty() {
            warn!("auth.service_accounts is ignored with auth.mode = none");
        }
    }
    let (broker, events) = Broker::with_auth(&settings.mqtt, auth, stats.clone());
    let (out, events) = match &settings.mqtt.external_url {
        None => {
            let mut up = vec![stats.listeners.up("mqtt.listen")];
            up.extend(mqtt_tls_addr.map(|_| stats.listeners.up("mqtt.tls_listen")));
            up.extend(mqtt_ws_addr.map(|_| stats.listeners.up("mqtt.ws_listen")));
            up.extend(mqtt_wss_addr.map(|_| stats.listeners.up("mqtt.wss_listen")));
            mqtt.spawn(while_up(
                up,
                broker
                    .clone()
                    .serve_all(listeners.listeners, stop_mqtt.clone(), mqtt.clone()),
            ));
            (MqttOut::Embedded(broker.clone()), events)
        }
        Some(url) => {
            let (tx, rx) = mpsc::channel(1024);
            let cx = external::Context {
                events: tx,
                stats: stats.clone(),
                drain: Duration::from_secs(settings.proxy.drain_secs),
            };
            let ext = ExternalBroker::start(&settings.mqtt, cx, stop.clone(), &tracker)?;
            info!(
                external_url = %url,
                "mqtt.external_url is set: pushes go to the external broker; the embedded \
                 broker's listeners are not started"
            );
            (MqttOut::External(ext), rx)
        }
    };
    let sinks = apns::Sinks {
        stats: stats.clone(),
        registry: registry.clone(),
        feedback: apns::Feedback::new(out.clone(), settings.feedback_topic()),
    };
    let apns = ApnsSender::start(&settings.apns, sinks, stop.clone(), &tracker)?;
    tracker.spawn(stats::series::sample(stats.clone(), stop.clone()));
    let offline = offline::OfflineStore::new(&registry, &settings.registry, &settings.offline);
    let (status_tx, status_rx) = mpsc::channel(1024);
    let replay = offline::Replay {
        store: offline.clone(),
        broker: broker.clone(),
        user_prefix: format!("{}/user/", settings.mqtt.prefix),
        stats: stats.clone(),
        busy: Arc::default(),
    };
    tracker.spawn(offline::run(events, status_tx, replay, stop.clone()));
    tracker.spawn(status::run(
        status_rx,
        registry.clone(),
        stats.clone(),
        stop.clone(),
    ));

    let dispatcher = Arc::new(Dispatcher {
        registry: registry.clone(),
        broker: out,
        apns: apns.clone(),
        prefix: settings.mqtt.prefix.clone(),
        stats: stats.clone(),
        offline: offline.clone(),
        outage_wait: Duration::from_secs(settings.registry.outage_wait_secs),
    });
    let started = intake::start(
        &settings,
        dispatcher.clone(),
        shutdown.clone(),
        stop.clone(),
        &tracker,
    )
    .await?;
    let (stream, queue) = match &started.intake {
        Intake::Durable(writer) => (Some(writer.clone()), None),
        Intake::Memory(tx) => (None, Some(tx.downgrade())),
    };
    let http_up = vec![stats.listeners.up("http.listen")];
    ingress.spawn(while_up(
        http_up,
        http::serve(
            http_listener,
            http::HttpState {
                dispatcher,
                registry: registry.clone(),
                stats: stats.clone(),
                token: settings.http.token.as_deref().map(http::ApiToken::new),
                body_timeout: Duration::from_secs(settings.http.header_timeout_secs),
                allowed_hosts: settings
                    .http
                    .allowed_hosts
                    .iter()
                    .map(|h| h.to_ascii_lowercase())
                    .collect(),
                max_notifications: settings.http.max_notifications,
                queue,
                stream,
                shutdown: shutdown.clone(),
            },
            http::Limits {
                header_timeout: Duration::from_secs(settings.http.header_timeout_secs),
                max_connections: settings.http.max_connections,
            },
            shutdown.clone(),
        ),
    ));
    let dispatcher = started.consumer;
    let proxy_up = vec![stats.listeners.up("proxy.listen")];
    ingress.spawn(while_up(
        proxy_up,
        proxy::serve(
            proxy_listener,
            settings.proxy.clone(),
            started.intake,
            stats.clone(),
            shutdown.clone(),
            ingress.clone(),
        ),
    ));
    let mqtt_shown = match external {
        true => "external".to_string(),
        false => mqtt_addr.to_string(),
    };
    let off = |a: Option<SocketAddr>| a.map_or("off".to_string(), |a| a.to_string());
    info!(
        proxy = %proxy_addr,
        mqtt = %mqtt_shown,
        mqtt_tls = %off(mqtt_tls_addr),
        mqtt_ws = %off(mqtt_ws_addr),
        mqtt_wss = %off(mqtt_wss_addr),
        http = %http_addr,
        registry = registry.describe(),
        durable_intake = settings.intake.durable,
        prefix = %settings.mqtt.prefix,
        "pushbridge started; try `pushbridge send --addr {proxy_addr} --user 42 '{{\"alert\":\"hi\"}}'` \
         and the dashboard at http://{http_addr}/"
    );
    Ok(Server {
        proxy_addr,
        mqtt_addr,
        mqtt_tls_addr,
        mqtt_ws_addr,
        mqtt_wss_addr,
        http_addr,
        registry,
        broker,
        stats,
        offline,
        shutdown,
        stop_mqtt,
        stop,
        ingress,
        mqtt,
        tracker,
        dispatcher,
        apns,
        drain: Duration::from_secs(settings.proxy.drain_secs),
    })
}

impl Server {
    /// Waits for the shutdown token, then stops: intake first; queued pushes
    /// routed and queued notifications answered by Apple (together bounded by
    /// `proxy.drain_secs`); devices sent what their sessions hold, then
    /// disconnected; the focus they leave written; then everything else.
    pub async fn wait(self) {
        self.shutdown.cancelled().await;
        let deadline = tokio::time::Instant::now() + self.drain;
        self.ingress.close();
        self.ingress.wait().await;
        if tokio::time::timeout_at(deadline, self.dispatcher)
            .await
            .is_err()
        {
            warn!(
                secs = self.drain.as_secs(),
                "queued pushes not routed in time"
            );
        }
        if tokio::time::timeout_at(deadline, self.apns.drain())
            .await
            .is_err()
        {
            warn!(
                secs = self.drain.as_secs(),
                "queued APNs notifications not sent in time"
            );
        }
        self.stop_mqtt.cancel();
        self.mqtt.close();
        self.mqtt.wait().await;
        self.stop.cancel();
        self.tracker.close();
        self.tracker.wait().await;
        self.apns.drain().await;
        info!("pushbridge stopped");
    }

    /// Cancels the shutdown token and waits for the stop.
    pub async fn stop(self) {
        self.shutdown.cancel();
        self.wait().await;
    }
}

/// Runs a listener's task; its listeners read as down (`/readyz`) once it ends.
async fn while_up<F: std::future::Future>(up: Vec<stats::Up>, task: F) -> F::Output {
    let out = task.await;
    drop(up);
    out
}

/// The binary's entry: run until `shutdown` is cancelled.
pub async fn run(settings: Settings, shutdown: CancellationToken) -> Result<(), Error> {
    start(settings, shutdown).await?.wait().await;
    Ok(())
}

/// Settings that work but are weak; `check-config` prints them, `serve`
/// logs them.
pub fn config_warnings(settings: &Settings) -> Vec<String> {
    let mut out = Vec::new();
    if let Some(secret) = &settings.auth.jwt_secret {
        if secret.len() < 32 {
            out.push(format!(
                "auth.jwt_secret is {} bytes; an HS256 secret should be at least 32 random bytes \
                 (e.g. `openssl rand -base64 32`)",
                secret.len()
            ));
        }
    }
    out
}

/// `pushbridge check-config`: the auth key and MQTT TLS files, then every
/// APNs app's report or what is wrong with it.
pub fn check_config(settings: &Settings) -> Result<Vec<apns::AppCheck>, Error> {
    Auth::new(&settings.auth, &settings.mqtt.prefix)?;
    if let (Some(cert), Some(key)) = (&settings.mqtt.tls_cert, &settings.mqtt.tls_key) {
        TlsConfig::load(cert, key)?;
    }
    if let Some(ca) = &settings.mqtt.external_ca_file {
        external::check_ca_file(ca)?;
    }
    Ok(apns::check_config(&settings.apns)?)
}

/// The set listeners that serve `mqtt.tls_cert`, for `check-config` and
/// so the certificate is loaded once for all of them.
pub fn mqtt_tls_listeners(m: &MqttSettings) -> Vec<&'static str> {
    [
        ("mqtt.tls_listen", m.tls_listen),
        ("mqtt.wss_listen", m.wss_listen),
    ]
    .into_iter()
    .filter_map(|(key, addr)| addr.map(|_| key))
    .collect()
}

/// The embedded broker's listeners and their bound addresses.
struct MqttListeners {
    listeners: Vec<(TcpListener, Transport)>,
    addr: SocketAddr,
    tls_addr: Option<SocketAddr>,
    ws_addr: Option<SocketAddr>,
    wss_addr: Option<SocketAddr>,
}

impl MqttListeners {
    async fn bind(m: &MqttSettings) -> Result<MqttListeners, Error> {
        let listener = bind("mqtt.listen", m.listen).await?;
        let addr = listener.local_addr().expect("bound");
        let mut listeners = vec![(listener, Transport::Tcp)];
        let (mut tls_addr, mut ws_addr, mut wss_addr) = (None, None, None);
        // One certificate (and its reloads) for every TLS listener.
        let tls = match (&m.tls_cert, &m.tls_key) {
            (Some(cert), Some(key)) if !mqtt_tls_listeners(m).is_empty() => {
                Some(Arc::new(TlsConfig::load(cert, key)?))
            }
            _ => None,
        };
        if let (Some(addr), Some(tls)) = (m.tls_listen, &tls) {
            let listener = bind("mqtt.tls_listen", addr).await?;
            tls_addr = Some(listener.local_addr().expect("bound"));
            listeners.push((listener, Transport::Tls(tls.clone())));
        }
        if let Some(addr) = m.ws_listen {
            let listener = bind("mqtt.ws_listen", addr).await?;
            ws_addr = Some(listener.local_addr().expect("bound"));
            listeners.push((listener, Transport::WebSocket));
        }
        if let (Some(addr), Some(tls)) = (m.wss_listen, &tls) {
            let listener = bind("mqtt.wss_listen", addr).await?;
            wss_addr = Some(listener.local_addr().expect("bound"));
            listeners.push((listener, Transport::WebSocketTls(tls.clone())));
        }
        Ok(MqttListeners {
            listeners,
            addr,
            tls_addr,
            ws_addr,
            wss_addr,
        })
    }

    /// External broker mode: nothing to listen on.
    fn none(m: &MqttSettings) -> MqttListeners {
        MqttListeners {
            listeners: Vec::new(),
            addr: m.listen,
            tls_addr: None,
            ws_addr: None,
            wss_addr: None,
        }
    }
}

/// Each device is a socket: lift the soft open-file limit to the hard one.
fn raise_fd_limit() {
    // SAFETY: getrlimit/setrlimit only read and write the struct passed in.
    unsafe {
        let mut lim = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
            lim.rlim_cur = lim.rlim_max;
            if libc::setrlimit(libc::RLIMIT_NOFILE, &lim) != 0 {
                warn!("could not raise the open-file limit");
            }
        }
    }
}
