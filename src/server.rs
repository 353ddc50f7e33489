//! The wiring: every part started from its settings and what it depends
//! on, bottom up, each binding its own listener; then the stop, phase by
//! phase (see `lifecycle`).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::apns::{self, ApnsSender};
use crate::auth::Auth;
use crate::dispatch::Dispatcher;
use crate::external::{self, ExternalBroker};
use crate::lifecycle::Lifecycle;
use crate::mqtt::{self, Broker};
use crate::offline::{self, OfflineStore};
use crate::publisher::MqttOut;
use crate::receipts::{Notices, Outlets, Receipts};
use crate::registry::Registry;
use crate::settings::{AuthMode, Settings};
use crate::stats::{self, Stats};
use crate::{config_warnings, http, intake, proxy, status, Error};

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
    pub offline: OfflineStore,
    life: Lifecycle,
    /// Takes pushes out of intake; ends once ingress has stopped and the
    /// queue is routed.
    consumer: JoinHandle<()>,
    apns: ApnsSender,
    drain: Duration,
}

/// Binds the listeners and starts every part; cancelling `shutdown` stops it.
pub async fn start(settings: Settings, shutdown: CancellationToken) -> Result<Server, Error> {
    settings.check_anonymous()?;
    raise_fd_limit();
    let life = Lifecycle::new(shutdown);
    let stats = Arc::new(Stats::default());
    let registry = Registry::open(&settings.registry).await?;
    let auth = Auth::new(&settings.auth, &settings.mqtt.prefix)?
        .with_feedback_topic(settings.feedback_topic());
    warn_weak(&settings);

    let redis = match &registry {
        Registry::Redis(r) => Some(r.conn().clone()),
        Registry::Memory(_) => None,
    };
    let outlets = Outlets::start(&settings.receipts, redis.as_ref(), &stats, &life.rest)?;
    let notices = Notices::start(&settings.receipts, &outlets, stats.clone(), &life.rest);
    let receipts = Receipts::start(
        &settings.receipts,
        &settings.mqtt.prefix,
        redis,
        &outlets,
        stats.clone(),
        &life.rest,
    );
    let (broker, events) = Broker::with_auth(
        &settings.mqtt,
        auth,
        stats.clone(),
        notices.clone(),
        receipts.clone(),
    );
    let offline = OfflineStore::new(&registry, &settings.registry, &settings.offline);
    let (out, events, mqtt_addrs) = match &settings.mqtt.external_url {
        None => {
            let addrs = broker.listen(&life.devices).await?;
            (MqttOut::Embedded(broker.clone()), events, Some(addrs))
        }
        Some(_) => {
            let (ext, events) = start_external(&settings, &stats, &offline, &life)?;
            (MqttOut::External(ext), events, None)
        }
    };
    let feedback = apns::Feedback::new(out.clone(), settings.feedback_topic());
    let sinks = apns::Sinks {
        stats: stats.clone(),
        registry: registry.clone(),
        feedback,
        receipts: receipts.clone(),
        notices,
    };
    let apns = ApnsSender::start(&settings.apns, sinks, &life.rest)?;
    life.rest
        .spawn(stats::series::sample(stats.clone(), life.rest.token()));
    let events = offline::start(
        offline.clone(),
        broker.clone(),
        receipts.clone(),
        events,
        &life.rest,
    );
    let (reg, st) = (registry.clone(), stats.clone());
    life.rest
        .spawn(status::run(events, reg, st, life.rest.token()));

    let mut dispatcher = Dispatcher::new(
        &settings,
        registry.clone(),
        out,
        apns.clone(),
        offline.clone(),
        stats.clone(),
    );
    dispatcher.receipts = receipts.clone();
    let dispatcher = Arc::new(dispatcher);
    let started = intake::start(&settings, dispatcher.clone(), &life.ingress, &life.rest).await?;
    let http = http::Parts {
        dispatcher,
        registry: registry.clone(),
        stats: stats.clone(),
        intake: started.intake.clone(),
    };
    let http_addr = http::start(&settings.http, http, &life.ingress).await?;
    let proxy_addr = proxy::start(
        &settings.proxy,
        started.intake,
        stats.clone(),
        &life.ingress,
    )
    .await?;

    let mqtt = mqtt_addrs.unwrap_or(mqtt::Addrs {
        tcp: settings.mqtt.listen,
        tls: None,
        ws: None,
        wss: None,
    });
    log_started(&settings, &registry, proxy_addr, http_addr, mqtt_addrs);
    Ok(Server {
        proxy_addr,
        mqtt_addr: mqtt.tcp,
        mqtt_tls_addr: mqtt.tls,
        mqtt_ws_addr: mqtt.ws,
        mqtt_wss_addr: mqtt.wss,
        http_addr,
        registry,
        broker,
        stats,
        offline,
        life,
        consumer: started.consumer,
        apns,
        drain: Duration::from_secs(settings.shutdown.drain_secs),
    })
}

/// The external broker's link on `rest`, and its status events.
fn start_external(
    settings: &Settings,
    stats: &Arc<Stats>,
    offline: &OfflineStore,
    life: &Lifecycle,
) -> Result<
    (
        ExternalBroker,
        tokio::sync::mpsc::Receiver<mqtt::BrokerEvent>,
    ),
    Error,
> {
    let (tx, rx) = tokio::sync::mpsc::channel(1024);
    let cx = external::Context {
        events: tx,
        stats: stats.clone(),
        drain: Duration::from_secs(settings.shutdown.drain_secs),
        offline: offline.clone(),
        feedback_topic: settings.feedback_topic(),
    };
    let ext = ExternalBroker::start(&settings.mqtt, cx, &life.rest)?;
    info!(
        external_url = %settings.mqtt.external_url.as_ref().map(ToString::to_string).unwrap_or_default(),
        "mqtt.external_url is set: pushes go to the external broker; the embedded \
         broker's listeners are not started"
    );
    Ok((ext, rx))
}

impl Server {
    /// Waits for the shutdown token, then stops: ingress first; queued
    /// pushes routed and queued notifications answered by Apple (together
    /// bounded by `shutdown.drain_secs`); devices sent what their sessions
    /// hold, then disconnected; the focus they leave written; then the rest.
    pub async fn wait(self) {
        self.life.ingress.stopping().await;
        let deadline = tokio::time::Instant::now() + self.drain;
        self.life.ingress.end().await;
        if tokio::time::timeout_at(deadline, self.consumer)
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
            let secs = self.drain.as_secs();
            warn!(secs, "queued APNs notifications not sent in time");
        }
        self.life.devices.end().await;
        self.life.rest.end().await;
        self.apns.drain().await;
        info!("pushbridge stopped");
    }

    /// Starts the stop and waits for it.
    pub async fn stop(self) {
        self.life.ingress.token().cancel();
        self.wait().await;
    }
}

/// Settings that work but deserve a word at start-up.
fn warn_weak(settings: &Settings) {
    for warning in config_warnings(settings) {
        warn!("{warning}");
    }
    if settings.auth.mode == AuthMode::None && settings.mqtt.external_url.is_none() {
        warn!(
            "auth.mode = none: MQTT clients are not authenticated; any client may read any \
             user's or group's topic (set auth.mode = jwt)"
        );
        if !settings.auth.service_accounts.is_empty() {
            warn!("auth.service_accounts is ignored with auth.mode = none");
        }
    }
}

/// One line: where every listener is, and what to try first.
fn log_started(
    settings: &Settings,
    registry: &Registry,
    proxy: SocketAddr,
    http: SocketAddr,
    mqtt: Option<mqtt::Addrs>,
) {
    let off = |a: Option<SocketAddr>| a.map_or("off".to_string(), |a| a.to_string());
    let tcp = mqtt.map_or("external".to_string(), |m| m.tcp.to_string());
    info!(
        proxy = %proxy,
        mqtt = %tcp,
        mqtt_tls = %off(mqtt.and_then(|m| m.tls)),
        mqtt_ws = %off(mqtt.and_then(|m| m.ws)),
        mqtt_wss = %off(mqtt.and_then(|m| m.wss)),
        http = %http,
        registry = registry.describe(),
        durable_intake = settings.intake.durable,
        prefix = %settings.mqtt.prefix,
        worker_threads = tokio::runtime::Handle::current().metrics().num_workers(),
        "pushbridge started; try `pushbridge send --addr {proxy} --user 42 '{{\"alert\":\"hi\"}}'` \
         and the dashboard at http://{http}/"
    );
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
