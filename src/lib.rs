//! pushbridge: push delivery from backends to apps, over APNs or MQTT.
//!
//! [`start`] binds every listener and returns a [`Server`] with the bound
//! addresses (tests start it on `127.0.0.1:0`); [`run`] is what the binary
//! calls: start, then serve until the shutdown token is cancelled.

pub mod apns;
pub mod auth;
pub mod dispatch;
#[doc(hidden)]
pub mod fuzzing;
pub mod http;
pub mod mqtt;
pub mod proxy;
pub mod push;
pub mod registry;
pub mod router;
pub mod settings;
pub mod stats;
pub mod status;

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
use crate::mqtt::{Broker, TlsConfig, Transport};
use crate::registry::Registry;
use crate::settings::{AuthMode, Settings};
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
}

/// A running pushbridge.
pub struct Server {
    pub proxy_addr: SocketAddr,
    pub mqtt_addr: SocketAddr,
    /// MQTT over TLS, when `mqtt.tls_listen` is set.
    pub mqtt_tls_addr: Option<SocketAddr>,
    /// MQTT over WebSocket (path `/mqtt`), when `mqtt.ws_listen` is set.
    pub mqtt_ws_addr: Option<SocketAddr>,
    pub http_addr: SocketAddr,
    pub registry: Registry,
    pub broker: Broker,
    pub stats: Arc<Stats>,
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
    raise_fd_limit();
    let stats = Arc::new(Stats::default());
    let registry = Registry::open(&settings.registry).await?;
    let (stop, stop_mqtt) = (CancellationToken::new(), CancellationToken::new());
    let (tracker, ingress, mqtt) = (TaskTracker::new(), TaskTracker::new(), TaskTracker::new());

    let proxy_listener = bind("proxy.listen", settings.proxy.listen).await?;
    let mqtt_listener = bind("mqtt.listen", settings.mqtt.listen).await?;
    let http_listener = bind("http.listen", settings.http.listen).await?;
    let http_addr = http_listener.local_addr().expect("bound");
    let proxy_addr = proxy_listener.local_addr().expect("bound");
    let mqtt_addr = mqtt_listener.local_addr().expect("bound");
    let mut mqtt_listeners = vec![(mqtt_listener, Transport::Tcp)];
    let (mut mqtt_tls_addr, mut mqtt_ws_addr) = (None, None);
    if let (Some(addr), Some(cert), Some(key)) = (
        settings.mqtt.tls_listen,
        &settings.mqtt.tls_cert,
        &settings.mqtt.tls_key,
    ) {
        let tls = Arc::new(TlsConfig::load(cert, key)?);
        let listener = bind("mqtt.tls_listen", addr).await?;
        mqtt_tls_addr = Some(listener.local_addr().expect("bound"));
        mqtt_listeners.push((listener, Transport::Tls(tls)));
    }
    if let Some(addr) = settings.mqtt.ws_listen {
        let listener = bind("mqtt.ws_listen", addr).await?;
        mqtt_ws_addr = Some(listener.local_addr().expect("bound"));
        mqtt_listeners.push((listener, Transport::WebSocket));
    }

    let auth = Auth::new(&settings.auth, &settings.mqtt.prefix)?
        .with_feedback_topic(settings.feedback_topic());
    if settings.auth.mode == AuthMode::None {
        warn!(
            "auth.mode = none: MQTT clients are not authenticated; any client may read any \
             user's or group's topic (set auth.mode = jwt)"
        );
        if !settings.auth.service_accounts.is_empty() {
            warn!("auth.service_accounts is ignored with auth.mode = none");
        }
    }
    let (broker, events) = Broker::with_auth(&settings.mqtt, auth, stats.clone());
    let sinks = apns::Sinks {
        stats: stats.clone(),
        registry: registry.clone(),
        feedback: apns::Feedback::new(broker.clone(), settings.feedback_topic()),
    };
    let apns = ApnsSender::start(&settings.apns, sinks, stop.clone(), &tracker)?;
    let mut mqtt_up = vec![stats.listeners.up("mqtt.listen")];
    mqtt_up.extend(mqtt_tls_addr.map(|_| stats.listeners.up("mqtt.tls_listen")));
    mqtt_up.extend(mqtt_ws_addr.map(|_| stats.listeners.up("mqtt.ws_listen")));
    mqtt.spawn(while_up(
        mqtt_up,
        broker
            .clone()
            .serve_all(mqtt_listeners, stop_mqtt.clone(), mqtt.clone()),
    ));
    tracker.spawn(stats::series::sample(stats.clone(), stop.clone()));
    tracker.spawn(status::run(
        events,
        registry.clone(),
        stats.clone(),
        stop.clone(),
    ));

    let (intake_tx, intake_rx) = mpsc::channel(settings.proxy.queue);
    let dispatcher = Arc::new(Dispatcher {
        registry: registry.clone(),
        broker: broker.clone(),
        apns: apns.clone(),
        prefix: settings.mqtt.prefix.clone(),
        stats: stats.clone(),
    });
    let http_up = vec![stats.listeners.up("http.listen")];
    ingress.spawn(while_up(
        http_up,
        http::serve(
            http_listener,
            http::HttpState {
                dispatcher: dispatcher.clone(),
                registry: registry.clone(),
                stats: stats.clone(),
                token: settings.http.token.as_deref().map(Arc::from),
                max_notifications: settings.http.max_notifications,
                intake: intake_tx.downgrade(),
            },
            shutdown.clone(),
        ),
    ));
    let dispatcher = tokio::spawn(dispatcher.run(intake_rx));
    let proxy_up = vec![stats.listeners.up("proxy.listen")];
    ingress.spawn(while_up(
        proxy_up,
        proxy::serve(
            proxy_listener,
            settings.proxy.clone(),
            intake_tx,
            stats.clone(),
            shutdown.clone(),
            ingress.clone(),
        ),
    ));
    info!(
        proxy = %proxy_addr,
        mqtt = %mqtt_addr,
        mqtt_tls = ?mqtt_tls_addr,
        mqtt_ws = ?mqtt_ws_addr,
        http = %http_addr,
        registry = registry.describe(),
        prefix = %settings.mqtt.prefix,
        "pushbridge started"
    );
    Ok(Server {
        proxy_addr,
        mqtt_addr,
        mqtt_tls_addr,
        mqtt_ws_addr,
        http_addr,
        registry,
        broker,
        stats,
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

/// `pushbridge check-config`: the auth key and MQTT TLS files, then the
/// APNs credentials' report, or what is wrong.
pub fn check_config(settings: &Settings) -> Result<Vec<apns::AppReport>, Error> {
    Auth::new(&settings.auth, &settings.mqtt.prefix)?;
    if let (Some(cert), Some(key)) = (&settings.mqtt.tls_cert, &settings.mqtt.tls_key) {
        TlsConfig::load(cert, key)?;
    }
    Ok(apns::check_config(&settings.apns)?)
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
