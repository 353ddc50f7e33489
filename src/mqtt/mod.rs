//! Embedded MQTT broker (3.1.1 and 5) that delivers pushes to devices.
//!
//! Built for many mostly idle connections: one small task per connection,
//! buffers that grow only while data moves, and a routing index whose publish
//! cost depends on the matching subscribers only.

#[doc(hidden)]
pub mod codec;
mod connection;
mod handshake;
mod listener;
mod presence;
mod rate;
mod session;
mod signal;
mod tls;
mod topics;
mod transport;
mod ws;

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use bytes::Bytes;
use tokio::sync::mpsc;
use tracing::debug;

use crate::auth::Auth;
use crate::lifecycle::Phase;
use crate::receipts::{Notices, Receipts};
use crate::settings::MqttSettings;
use crate::stats::Stats;
pub use session::Meta;
use session::{Budget, Msg, Pushed, SessionTable};

pub use codec::CodecError;
pub use listener::{tls_listeners, Addrs};
pub use presence::Seen;
pub use tls::TlsConfig;
pub use transport::Transport;

#[derive(Debug, thiserror::Error)]
pub enum MqttError {
    #[error("mqtt io: {0}")]
    Io(#[from] std::io::Error),
    #[error("mqtt codec: {0}")]
    Codec(#[from] CodecError),
    #[error(transparent)]
    Bind(#[from] crate::net::BindError),
    #[error("mqtt tls: {path}: {problem}")]
    Tls {
        path: std::path::PathBuf,
        problem: String,
    },
}

/// What the broker tells the rest of pushbridge.
#[derive(Debug, Clone)]
pub enum BrokerEvent {
    /// A client published on `<prefix>/app/status` (the message is also routed to subscribers as usual).
    Status {
        conn: u64,
        client_id: Arc<str>,
        payload: Bytes,
    },
    /// A client was granted a subscription to one user's topic,
    /// `<prefix>/user/<id>` exactly (no wildcard); sent after the SUBACK, when
    /// a publish on the topic already reaches it.
    Subscribed { topic: Arc<str> },
    /// A client's connection ended (any reason: disconnect, error, keep-alive timeout, takeover, shutdown).
    /// Sent once for every connection whose CONNECT was accepted, and last.
    Disconnected { conn: u64, client_id: Arc<str> },
}

/// Handle on the broker; cheap to clone.
#[derive(Clone)]
pub struct Broker {
    inner: Arc<Inner>,
}

/// State shared by the accept loop, the connection tasks and `publish`.
struct Inner {
    settings: MqttSettings,
    status_topic: String,
    /// `<prefix>/user/`, for `BrokerEvent::Subscribed`.
    user_prefix: String,
    sessions: Mutex<SessionTable>,
    /// Bytes queued in offline sessions (also in the session table, for attach and detach).
    budget: Arc<Budget>,
    /// Open connections per peer address, when `max_connections_per_ip` is set.
    per_ip: Mutex<HashMap<IpAddr, u32>>,
    presence: Mutex<presence::Presence>,
    events: mpsc::Sender<BrokerEvent>,
    next_conn: AtomicU64,
    stats: Arc<Stats>,
    auth: Auth,
    /// `device.connected` and `device.disconnected` events, when wanted.
    notices: Notices,
    /// Where the PUBACKs of tagged messages are reported.
    receipts: Receipts,
    /// The devices phase is stopping: connections drain and say goodbye.
    /// Told through each session's wake, so a connection keeps no shutdown
    /// future of its own (see [`Inner::stop_connections`]).
    stopping: AtomicBool,
    /// Every connection's signal: keep-alive and other deadlines, shutdown.
    clocks: signal::Clocks,
}

/// Who is behind an address, for the per-address limits: an IPv4 address
/// (also when mapped into IPv6), or an IPv6 /64. One host is usually given a
/// whole /64 and can send from any address in it, so counting single IPv6
/// addresses would let it step around `max_connections_per_ip` and
/// `max_sessions_per_user`.
fn origin(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V4(_) => ip,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6((u128::from(v6) & !u128::from(u64::MAX)).into()),
        },
    }
}

impl Inner {
    /// Whether `filter` is exactly one user's topic.
    fn is_user_topic(&self, filter: &str) -> bool {
        filter
            .strip_prefix(&self.user_prefix)
            .is_some_and(|id| !id.is_empty() && !id.contains(['/', '+', '#']))
    }

    /// Marks the broker stopping, then wakes every connected session's
    /// connection; one that attaches later sees the mark when it starts.
    fn stop_connections(&self) {
        self.stopping.store(true, Ordering::SeqCst);
        self.clocks.wake_all();
    }

    fn stopping(&self) -> bool {
        self.stopping.load(Ordering::SeqCst)
    }

    fn sessions(&self) -> MutexGuard<'_, SessionTable> {
        self.sessions.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn presence(&self) -> MutexGuard<'_, presence::Presence> {
        self.presence.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Takes a connection slot for `ip`'s origin; false when it has
    /// `max_connections_per_ip` already.
    fn ip_enter(&self, ip: IpAddr) -> bool {
        let max = self.settings.max_connections_per_ip;
        if max == 0 {
            return true;
        }
        let mut per_ip = self.per_ip.lock().unwrap_or_else(|e| e.into_inner());
        let n = per_ip.entry(origin(ip)).or_insert(0);
        if *n as usize >= max {
            return false;
        }
        *n += 1;
        true
    }

    /// Gives back the slot `ip_enter` took.
    fn ip_leave(&self, ip: IpAddr) {
        if self.settings.max_connections_per_ip == 0 {
            return;
        }
        let mut per_ip = self.per_ip.lock().unwrap_or_else(|e| e.into_inner());
        let ip = origin(ip);
        if let Some(n) = per_ip.get_mut(&ip) {
            *n -= 1;
            if *n == 0 {
                per_ip.remove(&ip);
            }
        }
    }

    /// Charges `session` to `user` (`max_sessions_per_user`), counting what
    /// that drops; connected sessions only with `connected`.
    fn own(&self, session: &Arc<session::Session>, user: &str, connected: bool) {
        let evicted = self.sessions().own(session, user, connected);
        if evicted > 0 {
            self.stats.mqtt_sessions_evicted.add(evicted as u64);
            debug!(
                user,
                evicted, "sessions over mqtt.max_sessions_per_user dropped"
            );
        }
    }

    /// Hands a message to every matching session without waiting; returns
    /// how many took it. On a user's own topic only its exact subscribers
    /// count: a wildcard (a monitor's `<prefix>/user/#`) is not the user.
    fn route(&self, topic: &str, payload: Bytes, max_qos: u8, meta: Option<&Arc<Meta>>) -> usize {
        type Targets = Vec<(u64, Arc<session::Session>, u8)>;
        thread_local! {
            /// Reused by every publish on this thread: no allocation per publish.
            static TARGETS: std::cell::RefCell<Targets> = const { std::cell::RefCell::new(Vec::new()) };
        }
        // Not re-entered: `push` only queues and wakes.
        let mut targets = TARGETS.with(|t| {
            t.try_borrow_mut()
                .map(|mut t| std::mem::take(&mut *t))
                .unwrap_or_default()
        });
        let (shared, exact) = self.sessions().route_into(topic, &mut targets);
        let mut delivered = 0;
        if !targets.is_empty() {
            let counted = match targets.len() > exact && self.is_user_topic(topic) {
                true => exact,
                false => usize::MAX,
            };
            let topic: Arc<str> = shared.unwrap_or_else(|| topic.into());
            delivered = self.hand_out(&topic, &payload, max_qos, meta, &mut targets, counted);
        }
        // A big fan-out's buffer is not kept for the thread's lifetime.
        if targets.capacity() <= 1024 {
            TARGETS.with(|t| {
                if let Ok(mut t) = t.try_borrow_mut() {
                    *t = targets;
                }
            });
        }
        delivered
    }

    /// Queues the message on every target (emptying `targets`); returns how
    /// many of the first `counted` took it.
    fn hand_out(
        &self,
        topic: &Arc<str>,
        payload: &Bytes,
        max_qos: u8,
        meta: Option<&Arc<Meta>>,
        targets: &mut Vec<(u64, Arc<session::Session>, u8)>,
        counted: usize,
    ) -> usize {
        let mut delivered = 0;
        let at = tokio::time::Instant::now();
        for (i, (_, session, qos)) in targets.drain(..).enumerate() {
            let msg = Msg {
                at,
                topic: topic.clone(),
                payload: payload.clone(),
                qos: qos.min(max_qos),
                meta: meta.cloned(),
            };
            match session.push(msg, self.settings.max_queued, &self.budget) {
                Pushed::Queued(dropped) => {
                    delivered += usize::from(i < counted);
                    if dropped > 0 {
                        self.stats.mqtt_dropped.add(dropped as u64);
                    }
                }
                Pushed::Refused => self.stats.mqtt_dropped.inc(),
            }
        }
        delivered
    }
}

impl Broker {
    /// A broker with its own counters; events arrive on the returned receiver,
    /// which must be drained (connection tasks wait on it when full).
    pub fn new(settings: &MqttSettings) -> (Broker, mpsc::Receiver<BrokerEvent>) {
        Self::with_stats(settings, Arc::default())
    }

    /// Like `new`, counting into the process-wide `stats`. No authentication
    /// and no ACL: every client is trusted (see `with_auth`).
    pub fn with_stats(
        settings: &MqttSettings,
        stats: Arc<Stats>,
    ) -> (Broker, mpsc::Receiver<BrokerEvent>) {
        Self::with_auth(
            settings,
            Auth::open(&settings.prefix),
            stats,
            Notices::default(),
            Receipts::default(),
        )
    }

    /// A broker that authenticates every CONNECT and applies the ACL, and
    /// tells `notices` of devices connecting and disconnecting and
    /// `receipts` of acknowledged tagged messages.
    pub fn with_auth(
        settings: &MqttSettings,
        auth: Auth,
        stats: Arc<Stats>,
        notices: Notices,
        receipts: Receipts,
    ) -> (Broker, mpsc::Receiver<BrokerEvent>) {
        let (tx, rx) = mpsc::channel(1024);
        let budget = Arc::new(Budget::new(settings.max_queued_bytes));
        let sessions = SessionTable::new(settings.max_sessions_per_user, budget.clone());
        let inner = Inner {
            settings: settings.clone(),
            status_topic: format!("{}/app/status", settings.prefix),
            user_prefix: format!("{}/user/", settings.prefix),
            sessions: Mutex::new(sessions),
            budget,
            per_ip: Mutex::default(),
            presence: Mutex::default(),
            events: tx,
            next_conn: AtomicU64::new(1),
            stats,
            auth,
            notices,
            receipts,
            stopping: AtomicBool::new(false),
            clocks: signal::Clocks::default(),
        };
        let broker = Broker {
            inner: Arc::new(inner),
        };
        (broker, rx)
    }

    /// Server-originated publish, QoS 1 to every matching session (QoS 0 where
    /// the subscription asked for 0); never blocks, never awaits.
    /// Returns the number of sessions it was delivered or queued to;
    /// sessions whose queue is full drop it (counted in `mqtt_dropped`).
    pub fn publish(&self, topic: &str, payload: Bytes) -> usize {
        self.inner.route(topic, payload, 1, None)
    }

    /// `publish` for a push with a receipt (each device's PUBACK is
    /// reported through its tag) or a TTL (not sent once expired; v5
    /// devices get the message expiry interval).
    pub fn publish_with(&self, topic: &str, payload: Bytes, meta: Option<&Arc<Meta>>) -> usize {
        self.inner.route(topic, payload, 1, meta)
    }

    /// Binds the listeners `mqtt` sets and serves devices on `devices`
    /// until it stops (the sessions' expiry sweeper with them).
    pub async fn listen(&self, devices: &Phase) -> Result<Addrs, MqttError> {
        listener::start(self.inner.clone(), devices).await
    }

    /// Sessions currently kept (connected, or persistent and not yet expired).
    pub fn session_count(&self) -> usize {
        self.inner.sessions().len()
    }

    /// Bytes queued in sessions without a connection, as counted against
    /// `mqtt.max_queued_bytes`.
    pub fn offline_bytes(&self) -> usize {
        self.inner.budget.used()
    }

    /// `user`'s open connections, oldest first (see `presence`).
    pub fn presence(&self, user: &str) -> Vec<Seen> {
        self.inner.presence().of(user)
    }

    /// The `mqtt` settings it was built with.
    pub fn settings(&self) -> &MqttSettings {
        &self.inner.settings
    }

    /// The counters this broker bumps.
    pub fn stats(&self) -> &Arc<Stats> {
        &self.inner.stats
    }

    /// Benchmark support, no sockets: registers `n` offline sessions
    /// `bench-<i>`, each subscribed with QoS 1 to `<prefix>/user/<i>`, with
    /// no connection and no expiry clock (they live as long as the broker).
    /// `publish` queues to them as to any offline session, up to `max_queued`;
    /// the returned handle empties a queue the way a connection would.
    #[cfg(any(test, feature = "bench"))]
    #[doc(hidden)]
    pub fn attach_bench_sessions(&self, n: usize) -> BenchSessions {
        let prefix = &self.inner.settings.prefix;
        let wake = Arc::new(signal::Signal::default());
        let mut reg = self.inner.sessions();
        let sessions = (0..n)
            .map(|i| {
                let owner = session::Owner {
                    conn: 0,
                    wake: wake.clone(),
                };
                let session = reg.attach(&format!("bench-{i}"), true, 0, owner).session;
                reg.subscribe(&session, &format!("{prefix}/user/{i}"), 1);
                session.lock().owner = None;
                session
            })
            .collect();
        BenchSessions {
            sessions,
            budget: self.inner.budget.clone(),
        }
    }
}

/// Sessions made by [`Broker::attach_bench_sessions`], by index.
#[cfg(any(test, feature = "bench"))]
#[doc(hidden)]
pub struct BenchSessions {
    sessions: Vec<Arc<session::Session>>,
    budget: Arc<Budget>,
}

#[cfg(any(test, feature = "bench"))]
impl BenchSessions {
    /// Takes every message queued for session `i`; returns how many there were.
    pub fn drain(&self, i: usize) -> usize {
        self.sessions[i].drain_offline(&self.budget)
    }

    pub fn len(&self) -> usize {
        self.sessions.len()
    }

    pub fn is_empty(&self) -> bool {
        self.sessions.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_ipv6_host_is_its_64_and_a_mapped_address_its_ipv4() {
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        let host = origin(ip("2001:db8:1:2::1"));
        assert_eq!(host, ip("2001:db8:1:2::"));
        assert_eq!(origin(ip("2001:db8:1:2:ffff:eeee:dddd:cccc")), host);
        assert_ne!(origin(ip("2001:db8:1:3::1")), host);
        assert_eq!(origin(ip("::ffff:192.0.2.7")), ip("192.0.2.7"));
        assert_eq!(origin(ip("192.0.2.7")), ip("192.0.2.7"));
    }

    /// Addresses of one /64 share `max_connections_per_ip`.
    #[test]
    fn a_64_shares_one_connection_cap() {
        let (broker, _rx) = Broker::new(&MqttSettings {
            max_connections_per_ip: 2,
            ..MqttSettings::default()
        });
        let inner = &broker.inner;
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        assert!(inner.ip_enter(ip("2001:db8::1")));
        assert!(inner.ip_enter(ip("2001:db8::2")));
        assert!(
            !inner.ip_enter(ip("2001:db8::3")),
            "a third address of the /64"
        );
        assert!(inner.ip_enter(ip("2001:db8:0:1::3")), "another /64");
        inner.ip_leave(ip("2001:db8::1"));
        assert!(inner.ip_enter(ip("2001:db8::3")));
    }

    #[test]
    fn only_exact_user_topics_are_user_topics() {
        let (broker, _rx) = Broker::new(&MqttSettings::default());
        let inner = &broker.inner;
        assert!(inner.is_user_topic("push/user/42"));
        for not in [
            "push/user/+",
            "push/user/#",
            "push/user/",
            "push/user/1/x",
            "push/group/1",
        ] {
            assert!(!inner.is_user_topic(not), "{not}");
        }
    }

    #[test]
    fn publish_without_subscribers_reaches_nobody() {
        let (broker, _rx) = Broker::new(&MqttSettings::default());
        assert_eq!(broker.publish("push/user/1", Bytes::from_static(b"x")), 0);
    }

    #[test]
    fn bench_sessions_take_publishes_and_drain() {
        let settings = MqttSettings {
            max_queued: 2,
            ..MqttSettings::default()
        };
        let (broker, _rx) = Broker::new(&settings);
        let s = broker.attach_bench_sessions(3);
        assert_eq!((s.len(), broker.session_count()), (3, 3));
        let x = || Bytes::from_static(b"x");
        assert_eq!(broker.publish("push/user/2", x()), 1);
        assert_eq!(broker.publish("push/user/2", x()), 1);
        assert_eq!(broker.publish("push/user/2", x()), 0, "queue bound");
        assert_eq!(broker.stats().mqtt_dropped.get(), 1);
        assert_eq!((s.drain(2), s.drain(2), s.drain(0)), (2, 0, 0));
        assert_eq!(broker.publish("push/user/2", x()), 1);
    }
}
