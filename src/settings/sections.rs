//! The sections of `setting.toml`, each with its defaults (the defaults
//! are the contract: DESIGN.md, README and `setting.toml` list them).

use std::net::SocketAddr;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ProxySettings {
    pub listen: SocketAddr,
    /// Largest accepted frame body, checked against the length prefix
    /// before anything is buffered.
    pub max_frame: u32,
    /// A backend connection silent this long is closed (the old server: 900 s).
    pub idle_timeout_secs: u64,
    pub max_connections: usize,
    /// Old name of `intake.queue`, read for one more release (warned).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub queue: Option<usize>,
    /// Old name of `shutdown.drain_secs`, read for one more release (warned).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub drain_secs: Option<u64>,
}

impl Default for ProxySettings {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:7100".parse().unwrap(),
            max_frame: 1 << 20,
            idle_timeout_secs: 900,
            max_connections: 1024,
            queue: None,
            drain_secs: None,
        }
    }
}

/// `mqtt.external_url`: one URL (a string) or several (a list).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(untagged)]
pub enum BrokerUrls {
    One(String),
    List(Vec<String>),
}

impl BrokerUrls {
    pub fn urls(&self) -> &[String] {
        match self {
            BrokerUrls::One(url) => std::slice::from_ref(url),
            BrokerUrls::List(urls) => urls,
        }
    }
}

impl From<String> for BrokerUrls {
    fn from(url: String) -> Self {
        BrokerUrls::One(url)
    }
}

impl From<Vec<String>> for BrokerUrls {
    fn from(urls: Vec<String>) -> Self {
        BrokerUrls::List(urls)
    }
}

impl std::fmt::Display for BrokerUrls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.urls().join(", "))
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct MqttSettings {
    pub listen: SocketAddr,
    pub tls_listen: Option<SocketAddr>,
    pub ws_listen: Option<SocketAddr>,
    /// MQTT over WebSocket over TLS, with `tls_cert` and `tls_key`: what a
    /// browser on an HTTPS page may open.
    pub wss_listen: Option<SocketAddr>,
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    /// Topic prefix: `<prefix>/user/<id>`, `<prefix>/group/<id>`, `<prefix>/app/status`.
    pub prefix: String,
    /// `mqtt://host[:port]` or `mqtts://host[:port]`, or a list of them
    /// (tried in turn on connection loss): publish to this broker instead
    /// of serving devices from the embedded one.
    pub external_url: Option<BrokerUrls>,
    /// Client id towards the external broker; unset: `pushbridge-<hostname>`.
    /// Stable across restarts, since the session (and the status
    /// subscription in it) is persistent.
    pub external_client_id: Option<String>,
    pub external_username: Option<String>,
    pub external_password: Option<String>,
    /// CA certificate(s) to trust for `mqtts://`, besides the public web roots.
    pub external_ca_file: Option<PathBuf>,
    /// Shared-subscription group for the status topic, so several instances
    /// handle each status once; empty: a plain subscription.
    pub external_shared_group: String,
    /// Failed attempts (a refusing PUBACK, or the connection lost while it
    /// was the one publish in flight after a reconnect) before a publish
    /// is dropped.
    pub external_max_attempts: u32,
    /// Topic filter on which the broker publishes subscribe events (EMQX
    /// system messages, Mosquitto's log topic): a user topic subscribed
    /// there replays that user's kept messages. Empty: off.
    pub external_subscribe_events: String,
    /// External mode: QoS 1 publishes kept until the broker's PUBACK.
    pub outbox: usize,
    /// What a full outbox does to a new publish: wait, or drop it (counted).
    pub outbox_full: QueueFull,
    /// CONNECT must arrive this soon after accept.
    pub connect_timeout_secs: u64,
    pub max_connections: usize,
    pub max_packet_size: usize,
    /// Unacknowledged QoS 1 messages in flight per connection.
    pub max_inflight: usize,
    /// Messages kept per session while it is offline or its inflight window is full.
    pub max_queued: usize,
    /// How long a disconnected persistent session is kept (v5 clients may ask for less).
    pub session_expiry_secs: u64,
    /// Subscriptions one session may hold; more are refused in the SUBACK.
    pub max_subscriptions: usize,
    /// New connections accepted per second on average (token bucket); the
    /// rest wait in the kernel's backlog.
    pub connect_rate: u32,
    /// Connections accepted at once before `connect_rate` applies.
    pub connect_burst: u32,
    /// Sessions (connected or kept offline) one user, the token's subject,
    /// may hold; a new one drops that user's oldest (offline ones first).
    /// Without tokens: sessions kept offline per client IP address.
    pub max_sessions_per_user: usize,
    /// Longest client id accepted; longer ones are refused in the CONNACK.
    pub max_client_id_len: usize,
    /// Bytes (topic + payload + 64 per message) queued in all offline
    /// sessions together; over it, a session's oldest messages make room, or
    /// the new one is dropped (counted in `mqtt_dropped`).
    pub max_queued_bytes: usize,
    /// Once a packet has started arriving it must be complete this soon,
    /// whatever the keep-alive.
    pub packet_timeout_secs: u64,
    /// Longest keep-alive granted; 0 (none) or more is treated as this
    /// (v5 clients are told in the CONNACK's Server Keep Alive).
    pub max_keepalive_secs: u16,
    /// Concurrent connections from one IP address; 0: no cap.
    pub max_connections_per_ip: usize,
}

impl Default for MqttSettings {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:1883".parse().unwrap(),
            tls_listen: None,
            ws_listen: None,
            wss_listen: None,
            tls_cert: None,
            tls_key: None,
            prefix: "push".into(),
            external_url: None,
            external_client_id: None,
            external_username: None,
            external_password: None,
            external_ca_file: None,
            external_shared_group: "pushbridge".into(),
            external_max_attempts: 3,
            external_subscribe_events: String::new(),
            outbox: 100_000,
            outbox_full: QueueFull::Wait,
            connect_timeout_secs: 5,
            max_connections: 19000,
            max_packet_size: 256 * 1024,
            max_inflight: 32,
            max_queued: 1000,
            session_expiry_secs: 7 * 24 * 3600,
            max_subscriptions: 64,
            connect_rate: 500,
            connect_burst: 1000,
            max_sessions_per_user: 8,
            max_client_id_len: 256,
            max_queued_bytes: 256 << 20,
            packet_timeout_secs: 30,
            max_keepalive_secs: 3600,
            max_connections_per_ip: 1000,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct RegistrySettings {
    pub redis_url: Option<String>,
    /// For `rediss` URLs: the only CA trusted (PEM); unset: the public web roots.
    pub redis_ca_file: Option<PathBuf>,
    /// Key of a user's hash; `{id}` is replaced by the user id.
    pub user_key: String,
    /// Key of a group's set of iOS members; `{id}` is replaced by the group id.
    pub group_apple_key: String,
    /// Key of a user's list of messages kept while offline (see `offline`).
    pub offline_key: String,
    /// While Redis is unreachable, queued pushes wait and retry this long;
    /// then they are counted and logged as final failures.
    pub outage_wait_secs: u64,
}

impl Default for RegistrySettings {
    fn default() -> Self {
        Self {
            redis_url: None,
            redis_ca_file: None,
            user_key: "User:{id}".into(),
            group_apple_key: "GroupAppleUser:{id}".into(),
            offline_key: "Offline:{id}".into(),
            outage_wait_secs: 300,
        }
    }
}

/// Messages for users without a usable APNs token who have no MQTT session:
/// kept (in Redis when Redis is the registry) and replayed when a device of
/// the user subscribes to its user topic.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct OfflineSettings {
    /// Messages kept per user; the oldest is dropped (counted) beyond it. 0: keep none.
    pub max_per_user: usize,
    /// A kept message is dropped this long after it was kept.
    pub ttl_secs: u64,
    /// Bytes kept per user, as stored; the oldest go first, and a message
    /// larger than this is not kept. 0: no bound.
    pub max_bytes_per_user: usize,
    /// Bytes kept for all users together by the in-memory store; a message
    /// that does not fit is not kept. 0: no bound.
    pub max_bytes: usize,
}

impl Default for OfflineSettings {
    fn default() -> Self {
        Self {
            max_per_user: 100,
            ttl_secs: 86400,
            max_bytes_per_user: 1 << 20,
            max_bytes: 256 << 20,
        }
    }
}

/// `[receipts]`: what became of pushes sent with `receipt: true`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ReceiptsSettings {
    /// Record outcomes of pushes that ask for a receipt; off, they are
    /// delivered alike and nothing is recorded.
    pub enabled: bool,
    /// A push's outcome is kept this long after its last change.
    pub ttl_secs: u64,
    /// A topic whose sessions have not all acknowledged (PUBACK) this long
    /// after the message was written to them is reported `timeout`.
    pub ack_timeout_secs: u64,
    /// The Redis hash per push (when Redis is the registry).
    pub key: String,
    /// Pushes whose outcome the in-memory store keeps; the oldest go first.
    pub max_records: usize,
    /// Bytes of outcomes the in-memory store keeps; the oldest go first.
    pub max_bytes: usize,
    /// Outcome changes waiting to be written; beyond it they are dropped
    /// (counted in `receipts_dropped`).
    pub queue: usize,
    /// `http://` or `https://host[:port]/path` that receives batches of
    /// events as JSON, signed with `webhook_secret`; unset: none.
    pub webhook_url: Option<String>,
    /// The only CA certificate(s) (PEM) trusted for an `https://`
    /// `webhook_url`; unset: the public web roots.
    pub webhook_ca_file: Option<PathBuf>,
    /// The HMAC-SHA256 key of the `X-Pushbridge-Signature` header.
    pub webhook_secret: Option<String>,
    /// Events waiting for the webhook; beyond it the oldest are dropped
    /// (counted in `webhook_dropped`).
    pub webhook_queue: usize,
    /// A Redis Stream (in the registry's Redis) that every outcome change
    /// is added to, for backends that consume with XREADGROUP; unset: none.
    pub stream: Option<String>,
    /// About how many events the stream keeps (XADD MAXLEN ~).
    pub stream_max_len: u64,
    /// Which events go to the webhook and the stream: `push` (outcome
    /// changes, with `enabled`), `device.connected`, `device.disconnected`,
    /// `token.dead`.
    pub events: Vec<EventKind>,
}

/// A kind of event for `receipts.events`.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub enum EventKind {
    /// What became of a push sent with `receipt: true`.
    #[serde(rename = "push")]
    Push,
    /// An MQTT client's CONNECT was accepted by the embedded broker.
    #[serde(rename = "device.connected")]
    DeviceConnected,
    /// An MQTT connection whose CONNECT was accepted ended.
    #[serde(rename = "device.disconnected")]
    DeviceDisconnected,
    /// Apple said a device token is dead.
    #[serde(rename = "token.dead")]
    TokenDead,
}

impl EventKind {
    pub const ALL: [EventKind; 4] = [
        EventKind::Push,
        EventKind::DeviceConnected,
        EventKind::DeviceDisconnected,
        EventKind::TokenDead,
    ];
}

impl Default for ReceiptsSettings {
    fn default() -> Self {
        Self {
            enabled: false,
            ttl_secs: 86400,
            ack_timeout_secs: 60,
            key: "Receipt:{id}".into(),
            max_records: 100_000,
            max_bytes: 64 << 20,
            queue: 65_536,
            webhook_url: None,
            webhook_ca_file: None,
            webhook_secret: None,
            webhook_queue: 100_000,
            stream: None,
            stream_max_len: 100_000,
            events: EventKind::ALL.to_vec(),
        }
    }
}

/// `[intake]`: where accepted pushes wait for routing.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct IntakeSettings {
    /// Answer `0x00` only once the push is in a Redis Stream, consumed by
    /// every instance in one group (needs `registry.redis_url`).
    pub durable: bool,
    /// The stream's key.
    pub stream: String,
    /// The consumer group every instance reads in.
    pub group: String,
    /// This instance's consumer name; unset: `<hostname>-<pid>`.
    pub consumer: Option<String>,
    /// Entries pending this long with their consumer are taken over by another.
    pub claim_idle_ms: u64,
    /// About how many undelivered entries the stream keeps (XADD MAXLEN ~).
    pub max_len: u64,
    /// An entry delivered this often without being acknowledged (its
    /// routing kept failing, or the instances holding it stopped) goes to
    /// the dead-letter stream `<stream>:dead` instead of being retried.
    pub max_deliveries: u64,
    /// About how many entries the dead-letter stream keeps (XADD MAXLEN ~).
    pub dead_max_len: u64,
    /// A consumer idle this long (XINFO CONSUMERS) with nothing pending is
    /// gone: its name is removed from the group.
    pub consumer_gone_ms: u64,
    /// Accepted pushes waiting in memory for routing (proxy and HTTP);
    /// when full, backends wait.
    pub queue: usize,
    /// While pushes wait in the memory queue longer than this, the proxy
    /// stops reading from backends (TCP holds them back): a bound on the
    /// time a push waits, where `queue` bounds memory.
    pub max_wait_ms: u64,
}

impl Default for IntakeSettings {
    fn default() -> Self {
        Self {
            durable: false,
            stream: "pushbridge:intake".into(),
            group: "pushbridge".into(),
            consumer: None,
            claim_idle_ms: 30_000,
            max_len: 1_000_000,
            max_deliveries: 5,
            dead_max_len: 100_000,
            consumer_gone_ms: 600_000,
            queue: 65536,
            max_wait_ms: 2,
        }
    }
}

/// The async runtime pushbridge runs on.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
#[serde(deny_unknown_fields, default)]
pub struct RuntimeSettings {
    /// Threads running connections, routing and delivery; 0 = one per core.
    /// 1 suits a host whose other cores are busy with other work: the
    /// threads no longer wake and steal from each other.
    pub worker_threads: usize,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ShutdownSettings {
    /// On SIGTERM, how long queued pushes may take to be routed and queued
    /// APNs notifications to be answered, together.
    pub drain_secs: u64,
}

impl Default for ShutdownSettings {
    fn default() -> Self {
        Self { drain_secs: 10 }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ApnsSettings {
    /// config.json with the apps' credentials; paths in it are relative to it.
    pub config: PathBuf,
    pub production_url: String,
    pub sandbox_url: String,
    /// Extra CA certificate(s) trusted besides the system roots.
    pub ca_file: Option<PathBuf>,
    /// `apns-expiration`, seconds from now; 0 asks Apple to try once only.
    pub expiration_secs: u64,
    /// Notifications waiting for the sender.
    pub queue: usize,
    /// Requests awaiting Apple's answer (or a retry) at once; beyond it
    /// notifications wait in `queue`.
    pub max_in_flight: usize,
    /// What a full `queue` does to a new notification: wait, or drop it (counted).
    pub queue_full: QueueFull,
    pub request_timeout_secs: u64,
    /// Most HTTP/2 connections per (app, environment); another is opened only
    /// while every open one uses all the streams the server allows.
    pub max_connections: usize,
    /// Most sending attempts per notification for answers worth retrying
    /// (429, 5xx, no answer), the first included.
    pub retry_attempts: u32,
    /// First backoff delay; it doubles per attempt, with jitter.
    pub retry_base_ms: u64,
    /// A notification still not delivered this long after its first attempt is dropped.
    pub retry_max_secs: u64,
    /// Shortest time between two provider tokens (JWTs) for one key; Apple
    /// answers 429 TooManyProviderTokenUpdates to more frequent ones.
    pub jwt_refresh_min_secs: u64,
    /// How often config.json and its files are checked for changes, in
    /// milliseconds; 0: only SIGHUP reloads.
    pub reload_poll_ms: u64,
    /// MQTT topic for dead tokens and final failures; unset: `<mqtt.prefix>/feedback`.
    pub feedback_topic: Option<String>,
}

/// `apns.queue_full` and `mqtt.outbox_full`: backpressure or load shedding
/// in front of a bounded queue.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, Default, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum QueueFull {
    /// The router waits for room, and so, eventually, do the backends.
    #[default]
    Wait,
    /// The message is dropped and counted (`apns_queue_dropped`, `mqtt_outbox_dropped`).
    Drop,
}

impl Default for ApnsSettings {
    fn default() -> Self {
        Self {
            config: "config.json".into(),
            production_url: "https://api.push.apple.com".into(),
            sandbox_url: "https://api.sandbox.push.apple.com".into(),
            ca_file: None,
            expiration_secs: 86400,
            queue: 65536,
            max_in_flight: 1000,
            queue_full: QueueFull::Wait,
            request_timeout_secs: 10,
            max_connections: 4,
            retry_attempts: 5,
            retry_base_ms: 500,
            retry_max_secs: 60,
            jwt_refresh_min_secs: 20 * 60,
            reload_poll_ms: 5000,
            feedback_topic: None,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct HttpSettings {
    pub listen: SocketAddr,
    /// Bearer token the API requires; mandatory when `listen` is not loopback.
    pub token: Option<String>,
    /// Most notifications one `POST /v1/push` may carry.
    pub max_notifications: usize,
    /// Host names (besides `localhost` and IP addresses) the API answers to;
    /// any other `Host` is refused, so a DNS-rebinding page cannot reach it.
    pub allowed_hosts: Vec<String>,
    /// A request's head must arrive within this many seconds of the
    /// connection's opening (or of the previous answer), and its body within
    /// as long again; otherwise the connection is closed.
    pub header_timeout_secs: u64,
    /// Concurrent HTTP connections; taken before `accept`.
    pub max_connections: usize,
}

impl Default for HttpSettings {
    fn default() -> Self {
        Self {
            listen: "127.0.0.1:8090".parse().unwrap(),
            token: None,
            max_notifications: 100,
            allowed_hosts: Vec::new(),
            header_timeout_secs: 10,
            max_connections: 256,
        }
    }
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, Default, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum AuthMode {
    #[default]
    None,
    Jwt,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct AuthSettings {
    pub mode: AuthMode,
    pub jwt_secret: Option<String>,
    pub jwt_public_key: Option<PathBuf>,
    /// Token subjects that may subscribe to any topic (monitoring); `jwt` mode only.
    pub service_accounts: Vec<String>,
    /// When set, a token's `aud` (a string or a list) must contain it.
    pub jwt_audience: Option<String>,
    /// When set, a token's `iss` must equal it.
    pub jwt_issuer: Option<String>,
    /// A token whose `exp` is further than this from now (or from its
    /// `iat`) is refused; 0: no bound.
    pub jwt_max_ttl_secs: u64,
    /// `mode = none` on an MQTT listener beyond loopback is refused unless
    /// this says the operator means it.
    pub allow_anonymous: bool,
}

impl Default for AuthSettings {
    fn default() -> Self {
        Self {
            mode: AuthMode::None,
            jwt_secret: None,
            jwt_public_key: None,
            service_accounts: Vec::new(),
            jwt_audience: None,
            jwt_issuer: None,
            jwt_max_ttl_secs: 90 * 86400,
            allow_anonymous: false,
        }
    }
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, Default, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct LogSettings {
    /// A tracing filter; `RUST_LOG` wins when set.
    pub level: String,
    pub format: LogFormat,
}

impl Default for LogSettings {
    fn default() -> Self {
        Self {
            level: "info".into(),
            format: LogFormat::Text,
        }
    }
}
