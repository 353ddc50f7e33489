//! pushbridge: push delivery from backends to apps, over APNs or MQTT.
//!
//! [`start`] binds every listener and returns a [`Server`] with the bound
//! addresses (tests start it on `127.0.0.1:0`); [`run`] is what the binary
//! calls: start, then serve until the shutdown token is cancelled.

pub mod apns;
pub mod dispatch;
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
use crate::dispatch::Dispatcher;
use crate::mqtt::Broker;
use crate::registry::Registry;
use crate::settings::Settings;
use crate::stats::Stats;

/// How long a stopping server waits for queued pushes to be routed.
const DRAIN: Duration = Duration::from_secs(10);

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
}

/// A running pushbridge.
pub struct Server {
    pub proxy_addr: SocketAddr,
    pub mqtt_addr: SocketAddr,
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

    let (broker, events) = Broker::with_stats(&settings.mqtt, stats.clone());
    let sinks = apns::Sinks {
        stats: stats.clone(),
        registry: registry.clone(),
        feedback: apns::Feedback::new(broker.clone(), settings.feedback_topic()),
    };
    let apns = ApnsSender::start(&settings.apns, sinks, stop.clone(), &tracker)?;
    tracker.spawn(
        broker
            .clone()
            .serve(mqtt_listener, stop.clone(), tracker.clone()),
    );
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
        apns,
        prefix: settings.mqtt.prefix.clone(),
        stats: stats.clone(),
    });
    ingress.spawn(http::serve(
        http_listener,
        http::HttpState {
            dispatcher: dispatcher.clone(),
            registry: registry.clone(),
            stats: stats.clone(),
            token: settings.http.token.as_deref().map(Arc::from),
            max_notifications: settings.http.max_notifications,
        },
        shutdown.clone(),
    ));
    let dispatcher = tokio::spawn(dispatcher.run(intake_rx));
    ingress.spawn(proxy::serve(
        proxy_listener,
        settings.proxy.clone(),
        intake_tx,
        stats.clone(),
        shutdown.clone(),
        ingress.clone(),
    ));
    info!(
        proxy = %proxy_addr,
        mqtt = %mqtt_addr,
        http = %http_addr,
        registry = registry.describe(),
        prefix = %settings.mqtt.prefix,
        "pushbridge started"
    );
    Ok(Server {
        proxy_addr,
        mqtt_addr,
        http_addr,
        registry,
        broker,
        stats,
        shutdown,
        stop,
        ingress,
        tracker,
        dispatcher,
    })
}

impl Server {
    /// Waits for the shutdown token, then stops: intake first, queued pushes
    /// routed (bounded by a drain timeout), then the broker and senders.
    pub async fn wait(self) {
        self.shutdown.cancelled().await;
        self.ingress.close();
        self.ingress.wait().await;
        if tokio::time::timeout(DRAIN, self.dispatcher).await.is_err() {
            warn!(secs = DRAIN.as_secs(), "queued pushes not drained in time");
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

/// `pushbridge check-config`: the APNs credentials' report, or what is wrong.
pub fn check_config(settings: &Settings) -> Result<Vec<apns::AppReport>, Error> {
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
