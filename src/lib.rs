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
pub mod intake;
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
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

use crate::apns::ApnsSender;
use crate::auth::Auth;
use crate::dispatch::Dispatcher;
use crate::intake::Intake;
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
    #[error(transparent)]
    Intake(#[from] intake::IntakeError),
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
    /// Cancelled after intake has drained: stops the broker and the senders.
    stop: CancellationToken,
    ingress: TaskTracker,
    tracker: TaskTracker,
    dispatcher: JoinHandle<()>,
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
    let stop = CancellationToken::new();
    let tracker = TaskTracker::new();
    let ingress = TaskTracker::new();

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
    tracker.spawn(
        broker
            .clone()
            .serve_all(mqtt_listeners, stop.clone(), tracker.clone()),
    );
    tracker.spawn(status::run(
        events,
        registry.clone(),
        stats.clone(),
        stop.clone(),
    ));

    let dispatcher = Arc::new(Dispatcher {
        registry: registry.clone(),
        broker: broker.clone(),
        apns,
        prefix: settings.mqtt.prefix.clone(),
        stats: stats.clone(),
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
    let stream = match &started.intake {
        Intake::Durable(writer) => Some(writer.clone()),
        Intake::Memory(_) => None,
    };
    ingress.spawn(http::serve(
        http_listener,
        http::HttpState {
            dispatcher,
            registry: registry.clone(),
            stats: stats.clone(),
            token: settings.http.token.as_deref().map(Arc::from),
            max_notifications: settings.http.max_notifications,
            stream,
            shutdown: shutdown.clone(),
        },
        shutdown.clone(),
    ));
    let dispatcher = started.consumer;
    ingress.spawn(proxy::serve(
        proxy_listener,
        settings.proxy.clone(),
        started.intake,
        stats.clone(),
        shutdown.clone(),
        ingress.clone(),
    ));
    info!(
        proxy = %proxy_addr,
        mqtt = %mqtt_addr,
        mqtt_tls = ?mqtt_tls_addr,
        mqtt_ws = ?mqtt_ws_addr,
        http = %http_addr,
        registry = registry.describe(),
        durable_intake = settings.intake.durable,
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
        stop,
        ingress,
        tracker,
        dispatcher,
        drain: Duration::from_secs(settings.proxy.drain_secs),
    })
}

impl Server {
    /// Waits for the shutdown token, then stops: intake first, queued pushes
    /// routed (bounded by a drain timeout), then the broker and senders.
    pub async fn wait(self) {
        self.shutdown.cancelled().await;
        self.ingress.close();
        self.ingress.wait().await;
        if tokio::time::timeout(self.drain, self.dispatcher)
            .await
            .is_err()
        {
            warn!(
                secs = self.drain.as_secs(),
                "queued pushes not drained in time"
            );
        }
        self.stop.cancel();
        self.tracker.close();
        self.tracker.wait().await;
        info!("pushbridge stopped");
    }

    /// Cancels the shutdown token and waits for the stop.
    pub async fn stop(self) {
        self.shutdown.cancel();
        self.wait().await;
    }
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
