//! Runtime settings: `setting.toml` overlaid by `PUSHBRIDGE_<SECTION>__<KEY>`
//! variables. Every key has a default, so an empty or missing file runs the
//! embedded default (embedded broker, in-memory registry).

use std::path::Path;

use figment::providers::{Env, Format, Serialized, Toml};
use figment::Figment;
use serde::{Deserialize, Serialize};

mod sections;
pub use sections::*;

/// A settings file or variable that could not be used; figment's message
/// names the key, the value and where it came from.
#[derive(Debug, thiserror::Error)]
pub enum SettingsError {
    #[error("settings: {0}")]
    Invalid(#[from] Box<figment::Error>),
    #[error("settings: {key}: {problem}")]
    Check { key: &'static str, problem: String },
}

#[derive(Debug, Clone, Serialize, Deserialize, Default, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Settings {
    pub proxy: ProxySettings,
    pub mqtt: MqttSettings,
    pub registry: RegistrySettings,
    pub offline: OfflineSettings,
    pub receipts: ReceiptsSettings,
    pub apns: ApnsSettings,
    pub http: HttpSettings,
    pub auth: AuthSettings,
    pub intake: IntakeSettings,
    pub shutdown: ShutdownSettings,
    pub runtime: RuntimeSettings,
    pub log: LogSettings,
    /// Keys read under an old name, to be warned about.
    #[serde(skip)]
    pub renamed: Vec<String>,
}

impl Settings {
    /// Defaults, then `path` (a missing file is fine), then the environment.
    pub fn load(path: &Path) -> Result<Self, SettingsError> {
        Self::from_figment(
            Figment::from(Serialized::defaults(Settings::default()))
                .merge(Toml::file(path))
                .merge(Env::prefixed("PUSHBRIDGE_").split("__")),
        )
    }

    /// Settings from a TOML text alone (tests, examples).
    pub fn from_toml(text: &str) -> Result<Self, SettingsError> {
        Self::from_figment(
            Figment::from(Serialized::defaults(Settings::default())).merge(Toml::string(text)),
        )
    }

    fn from_figment(figment: Figment) -> Result<Self, SettingsError> {
        let mut settings: Settings = figment.extract().map_err(Box::new)?;
        settings.read_old_names();
        settings.check()?;
        Ok(settings)
    }

    /// Old names of renamed keys still work for a release: their value is
    /// used unless the new key is set too, and either way it is warned.
    fn read_old_names(&mut self) {
        let d = Settings::default();
        if let Some(q) = self.proxy.queue.take() {
            if self.intake.queue == d.intake.queue {
                self.intake.queue = q;
            }
            self.renamed.push("proxy.queue is now intake.queue".into());
        }
        if let Some(secs) = self.proxy.drain_secs.take() {
            if self.shutdown.drain_secs == d.shutdown.drain_secs {
                self.shutdown.drain_secs = secs;
            }
            self.renamed
                .push("proxy.drain_secs is now shutdown.drain_secs".into());
        }
    }

    /// Where the APNs sender publishes feedback for backends.
    pub fn feedback_topic(&self) -> String {
        self.apns
            .feedback_topic
            .clone()
            .unwrap_or_else(|| format!("{}/feedback", self.mqtt.prefix))
    }

    /// `auth.mode = none` on an MQTT listener beyond loopback needs
    /// `auth.allow_anonymous`; checked on load and again by `start`.
    pub fn check_anonymous(&self) -> Result<(), SettingsError> {
        if self.auth.mode != AuthMode::None || self.auth.allow_anonymous {
            return Ok(());
        }
        match self.open_mqtt_listener() {
            None => Ok(()),
            Some((key, addr)) => Err(SettingsError::Check {
                key: "auth.mode",
                problem: format!(
                    "none (no device authentication) with {key} = {addr}, which is not \
                     loopback: set auth.mode = \"jwt\", listen on loopback, or set \
                     auth.allow_anonymous = true to serve anonymous devices anyway"
                ),
            }),
        }
    }

    /// The first embedded-broker listener beyond loopback, if any.
    fn open_mqtt_listener(&self) -> Option<(&'static str, std::net::SocketAddr)> {
        if self.mqtt.external_url.is_some() {
            return None;
        }
        [
            ("mqtt.listen", Some(self.mqtt.listen)),
            ("mqtt.tls_listen", self.mqtt.tls_listen),
            ("mqtt.ws_listen", self.mqtt.ws_listen),
            ("mqtt.wss_listen", self.mqtt.wss_listen),
        ]
        .into_iter()
        .find_map(|(key, addr)| addr.filter(|a| !a.ip().is_loopback()).map(|a| (key, a)))
    }

    fn check(&self) -> Result<(), SettingsError> {
        let bad = |key, problem: &str| {
            Err(SettingsError::Check {
                key,
                problem: problem.into(),
            })
        };
        if self.proxy.max_frame == 0 {
            return bad("proxy.max_frame", "must be at least 1 byte");
        }
        if self.intake.queue == 0 {
            return bad("intake.queue", "must be at least 1");
        }
        if self.runtime.worker_threads > 1024 {
            return bad(
                "runtime.worker_threads",
                "must be at most 1024 (0: one per core)",
            );
        }
        if self.intake.max_wait_ms > 60_000 {
            return bad("intake.max_wait_ms", "must be at most 60000 (a minute)");
        }
        if self.apns.queue == 0 {
            return bad("apns.queue", "must be at least 1");
        }
        if self.apns.max_in_flight == 0 {
            return bad("apns.max_in_flight", "must be at least 1");
        }
        if self.apns.max_connections == 0 {
            return bad("apns.max_connections", "must be at least 1");
        }
        if self.apns.retry_attempts == 0 {
            return bad("apns.retry_attempts", "must be at least 1");
        }
        if let Some(t) = &self.apns.feedback_topic {
            if t.is_empty() || t.contains(['+', '#', '\0']) {
                return bad(
                    "apns.feedback_topic",
                    "must be a non-empty topic without wildcards",
                );
            }
        }
        let p = &self.mqtt.prefix;
        if p.is_empty() || p.contains(['+', '#', '\0']) || p.ends_with('/') {
            return bad(
                "mqtt.prefix",
                "must be a non-empty topic level path without wildcards or a trailing '/'",
            );
        }
        if self.mqtt.max_inflight == 0 || self.mqtt.max_inflight > u16::MAX as usize {
            return bad("mqtt.max_inflight", "must be between 1 and 65535");
        }
        if self.mqtt.connect_rate == 0 {
            return bad("mqtt.connect_rate", "must be at least 1");
        }
        if self.mqtt.connect_burst == 0 {
            return bad("mqtt.connect_burst", "must be at least 1");
        }
        for (key, v) in [
            (
                "mqtt.max_sessions_per_user",
                self.mqtt.max_sessions_per_user,
            ),
            ("mqtt.max_client_id_len", self.mqtt.max_client_id_len),
            (
                "mqtt.packet_timeout_secs",
                self.mqtt.packet_timeout_secs as usize,
            ),
            (
                "mqtt.max_keepalive_secs",
                self.mqtt.max_keepalive_secs.into(),
            ),
        ] {
            if v == 0 {
                return bad(key, "must be at least 1");
            }
        }
        let no_pair = self.mqtt.tls_cert.is_none() || self.mqtt.tls_key.is_none();
        for (key, set) in [
            ("mqtt.tls_listen", self.mqtt.tls_listen.is_some()),
            ("mqtt.wss_listen", self.mqtt.wss_listen.is_some()),
        ] {
            if set && no_pair {
                return bad(key, "needs mqtt.tls_cert and mqtt.tls_key");
            }
        }
        self.check_external()?;
        for (key, template) in [
            ("registry.user_key", &self.registry.user_key),
            ("registry.group_apple_key", &self.registry.group_apple_key),
            ("registry.offline_key", &self.registry.offline_key),
        ] {
            if !template.contains("{id}") {
                return bad(key, "must contain {id}");
            }
        }
        if self.offline.ttl_secs == 0 {
            return bad("offline.ttl_secs", "must be at least 1");
        }
        let r = &self.receipts;
        if !r.key.contains("{id}") {
            return bad("receipts.key", "must contain {id}");
        }
        for (key, value) in [
            ("receipts.ttl_secs", r.ttl_secs as usize),
            ("receipts.ack_timeout_secs", r.ack_timeout_secs as usize),
            ("receipts.max_records", r.max_records),
            ("receipts.max_bytes", r.max_bytes),
            ("receipts.queue", r.queue),
            ("receipts.webhook_queue", r.webhook_queue),
        ] {
            if value == 0 {
                return bad(key, "must be at least 1");
            }
        }
        if r.stream.is_some() && self.registry.redis_url.is_none() {
            return bad(
                "receipts.stream",
                "needs registry.redis_url (the stream lives in Redis)",
            );
        }
        if r.stream.as_deref() == Some("") || r.stream_max_len == 0 {
            return bad(
                "receipts.stream",
                "must not be empty, and receipts.stream_max_len at least 1",
            );
        }
        if let Some(url) = &r.webhook_url {
            let https = url.starts_with("https://");
            let host = url
                .parse::<http::Uri>()
                .ok()
                .and_then(|u| u.host().map(str::len));
            if !(https || url.starts_with("http://")) || host.unwrap_or(0) == 0 {
                return bad(
                    "receipts.webhook_url",
                    "must be an http:// or https://host[:port]/path URL",
                );
            }
            if r.webhook_ca_file.is_some() && !https {
                return bad(
                    "receipts.webhook_ca_file",
                    "is only used with an https:// receipts.webhook_url",
                );
            }
            if r.webhook_secret.as_deref().unwrap_or("").is_empty() {
                return bad(
                    "receipts.webhook_secret",
                    "must be set with receipts.webhook_url",
                );
            }
        }
        if !self.http.listen.ip().is_loopback()
            && self.http.token.as_deref().unwrap_or("").is_empty()
        {
            return bad(
                "http.token",
                "must be set when http.listen is not a loopback address",
            );
        }
        if self.registry.redis_ca_file.is_some()
            && !self
                .registry
                .redis_url
                .as_deref()
                .is_some_and(|u| u.starts_with("rediss"))
        {
            return bad(
                "registry.redis_ca_file",
                "needs a TLS registry.redis_url (rediss://, rediss+cluster://, rediss+sentinel://)",
            );
        }
        let i = &self.intake;
        if i.durable && self.registry.redis_url.is_none() {
            return bad(
                "intake.durable",
                "needs registry.redis_url (the stream lives in Redis)",
            );
        }
        if i.stream.is_empty() {
            return bad("intake.stream", "must not be empty");
        }
        if i.group.is_empty() {
            return bad("intake.group", "must not be empty");
        }
        if i.consumer.as_deref() == Some("") {
            return bad(
                "intake.consumer",
                "must not be empty (unset: <hostname>-<pid>)",
            );
        }
        if i.claim_idle_ms == 0 {
            return bad("intake.claim_idle_ms", "must be at least 1");
        }
        if i.max_len == 0 {
            return bad("intake.max_len", "must be at least 1");
        }
        if i.max_deliveries == 0 {
            return bad("intake.max_deliveries", "must be at least 1");
        }
        if i.dead_max_len == 0 {
            return bad("intake.dead_max_len", "must be at least 1");
        }
        if i.consumer_gone_ms < 2000 {
            return bad(
                "intake.consumer_gone_ms",
                "must be at least 2000 (a live consumer reads at least every second)",
            );
        }
        if self.http.header_timeout_secs == 0 {
            return bad("http.header_timeout_secs", "must be at least 1");
        }
        if self.http.max_connections == 0 {
            return bad("http.max_connections", "must be at least 1");
        }
        if let Some(h) = self.http.allowed_hosts.iter().find(|h| {
            h.is_empty() || h.contains(|c: char| c == ':' || c == '/' || c.is_whitespace())
        }) {
            return bad(
                "http.allowed_hosts",
                &format!("{h:?}: must be a host name without port or scheme"),
            );
        }
        if self.http.max_notifications == 0 {
            return bad("http.max_notifications", "must be at least 1");
        }
        self.check_anonymous()?;
        if self.auth.mode == AuthMode::Jwt
            && self.auth.jwt_secret.is_none()
            && self.auth.jwt_public_key.is_none()
        {
            return bad(
                "auth.mode",
                "jwt needs auth.jwt_secret or auth.jwt_public_key",
            );
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_file_is_the_embedded_default() {
        assert_eq!(Settings::from_toml("").unwrap(), Settings::default());
        let s = Settings::default();
        assert_eq!(s.proxy.listen.to_string(), "127.0.0.1:7100");
        assert_eq!(s.proxy.max_frame, 1 << 20);
        assert_eq!(s.mqtt.prefix, "push");
        assert_eq!(s.mqtt.listen.to_string(), "127.0.0.1:1883");
        assert!(s.registry.redis_url.is_none());
        assert_eq!(s.registry.user_key, "User:{id}");
    }

    #[test]
    fn unknown_key_names_the_key() {
        let err = Settings::from_toml("[proxy]\nlisten_port = 1\n").unwrap_err();
        let msg = err.to_string();
        assert!(msg.contains("listen_port"), "{msg}");
        let err = Settings::from_toml("[nosuchsection]\n").unwrap_err();
        assert!(err.to_string().contains("nosuchsection"), "{err}");
    }

    #[test]
    fn bad_value_names_the_key() {
        let err = Settings::from_toml("[proxy]\nmax_frame = \"big\"\n").unwrap_err();
        assert!(err.to_string().contains("max_frame"), "{err}");
        let err = Settings::from_toml("[mqtt]\nprefix = \"a/#\"\n").unwrap_err();
        assert!(err.to_string().contains("mqtt.prefix"), "{err}");
        let err = Settings::from_toml("[http]\nlisten = \"0.0.0.0:8090\"\n").unwrap_err();
        assert!(err.to_string().contains("http.token"), "{err}");
        let err = Settings::from_toml("[auth]\nmode = \"jwt\"\n").unwrap_err();
        assert!(err.to_string().contains("auth.mode"), "{err}");
        let err = Settings::from_toml("[mqtt]\nlisten = \"0.0.0.0:1883\"\n").unwrap_err();
        let msg = err.to_string();
        assert!(
            msg.contains("auth.mode") && msg.contains("auth.allow_anonymous"),
            "{msg}"
        );
        assert!(msg.contains("mqtt.listen = 0.0.0.0:1883"), "{msg}");
        let err = Settings::from_toml("[mqtt]\nws_listen = \"[::]:8083\"\n").unwrap_err();
        assert!(err.to_string().contains("mqtt.ws_listen"), "{err}");
        for (toml, key) in [
            (
                "[receipts]\nkey = \"R\"\n",
                "receipts.key: must contain {id}",
            ),
            (
                "[receipts]\nttl_secs = 0\n",
                "receipts.ttl_secs: must be at least 1",
            ),
            ("[receipts]\nmax_records = 0\n", "receipts.max_records"),
            (
                "[runtime]\nworker_threads = 5000\n",
                "runtime.worker_threads: must be at most 1024",
            ),
            ("[receipts]\nqueue = 0\n", "receipts.queue"),
            (
                "[receipts]\nwebhook_url = \"ftp://h/\"\n",
                "receipts.webhook_url",
            ),
            (
                "[receipts]\nwebhook_url = \"https:///x\"\n",
                "receipts.webhook_url",
            ),
            (
                "[receipts]\nwebhook_url = \"http://h/\"\nwebhook_secret = \"s\"\nwebhook_ca_file = \"ca.pem\"\n",
                "receipts.webhook_ca_file",
            ),
            (
                "[receipts]\nevents = [\"device.connect\"]\n",
                "receipts.events",
            ),
            (
                "[receipts]\nwebhook_url = \"http://h/\"\n",
                "receipts.webhook_secret",
            ),
            (
                "[receipts]\nstream = \"s\"\n",
                "receipts.stream: needs registry.redis_url",
            ),
        ] {
            let err = Settings::from_toml(toml).unwrap_err();
            assert!(err.to_string().contains(key), "{err}");
        }
        for fine in [
            "[mqtt]\nlisten = \"0.0.0.0:1883\"\n[auth]\nallow_anonymous = true\n",
            "[mqtt]\nlisten = \"0.0.0.0:1883\"\n[auth]\nmode = \"jwt\"\njwt_secret = \"k\"\n",
            "[mqtt]\nlisten = \"0.0.0.0:1883\"\nexternal_url = \"mqtt://b:1883\"\n",
        ] {
            Settings::from_toml(fine).unwrap_or_else(|e| panic!("{fine}: {e}"));
        }
        let err = Settings::from_toml(
            "[registry]\nredis_url = \"redis://h\"\nredis_ca_file = \"ca.pem\"\n",
        )
        .unwrap_err();
        assert!(err.to_string().contains("registry.redis_ca_file"), "{err}");
        let err = Settings::from_toml("[intake]\ndurable = true\n").unwrap_err();
        assert!(err.to_string().contains("intake.durable"), "{err}");
        assert!(err.to_string().contains("registry.redis_url"), "{err}");
    }

    #[test]
    fn tls_listeners_need_the_certificate_and_key() {
        for key in ["tls_listen", "wss_listen"] {
            let text = format!("[mqtt]\n{key} = \"127.0.0.1:0\"\ntls_cert = \"c.pem\"\n");
            let err = Settings::from_toml(&text).unwrap_err().to_string();
            assert!(err.contains(&format!("mqtt.{key}")), "{err}");
            assert!(err.contains("mqtt.tls_cert and mqtt.tls_key"), "{err}");
            let both = format!("{text}tls_key = \"k.pem\"\n");
            assert!(Settings::from_toml(&both).is_ok(), "{both}");
        }
    }

    #[test]
    #[allow(clippy::result_large_err)]
    fn file_then_environment() {
        figment::Jail::expect_with(|jail| {
            jail.create_file(
                "setting.toml",
                "[proxy]\nmax_frame = 10\n[mqtt]\nprefix = \"fromfile\"\n",
            )?;
            jail.set_env("PUSHBRIDGE_MQTT__PREFIX", "fromenv");
            let s = Settings::load(Path::new("setting.toml")).expect("loads");
            assert_eq!(s.proxy.max_frame, 10);
            assert_eq!(s.mqtt.prefix, "fromenv");
            Ok(())
        });
    }

    /// The shipped setting.toml documents every key with its default.
    #[test]
    fn shipped_setting_toml_is_the_default() {
        let text = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/setting.toml"))
            .expect("setting.toml ships with the crate");
        assert_eq!(Settings::from_toml(&text).unwrap(), Settings::default());
        let shown = |line: &str| {
            line.trim_start_matches(['#', ' '])
                .split([' ', '='])
                .next()
                .map(String::from)
        };
        let keys: Vec<String> = text
            .lines()
            .filter(|l| l.contains(" = "))
            .filter_map(shown)
            .collect();
        let defaults = serde_json::to_value(Settings::default()).unwrap();
        for (section, fields) in defaults.as_object().unwrap() {
            for key in fields.as_object().unwrap().keys() {
                assert!(
                    keys.contains(key),
                    "setting.toml does not show {section}.{key}"
                );
            }
        }
    }

    #[test]
    fn old_names_still_work_and_are_warned() {
        let s = Settings::from_toml("[proxy]\nqueue = 7\ndrain_secs = 3\n").unwrap();
        assert_eq!((s.intake.queue, s.shutdown.drain_secs), (7, 3));
        assert_eq!(s.renamed.len(), 2, "{:?}", s.renamed);
        assert_eq!((s.proxy.queue, s.proxy.drain_secs), (None, None));
        let both = "[proxy]\nqueue = 7\n[intake]\nqueue = 9\n";
        let s = Settings::from_toml(both).unwrap();
        assert_eq!(s.intake.queue, 9, "the new name wins");
        assert!(Settings::default().renamed.is_empty());
    }

    #[test]
    fn feedback_topic_follows_the_prefix() {
        let s = Settings::from_toml("[mqtt]\nprefix = \"app\"\n").unwrap();
        assert_eq!(s.feedback_topic(), "app/feedback");
        let s = Settings::from_toml("[apns]\nfeedback_topic = \"ops/apns\"\n").unwrap();
        assert_eq!(s.feedback_topic(), "ops/apns");
        let err = Settings::from_toml("[apns]\nfeedback_topic = \"a/#\"\n").unwrap_err();
        assert!(err.to_string().contains("apns.feedback_topic"), "{err}");
        let err = Settings::from_toml("[apns]\nqueue_full = \"shed\"\n").unwrap_err();
        assert!(err.to_string().contains("queue_full"), "{err}");
    }

    #[test]
    fn missing_file_is_the_default() {
        let s = Settings::load(Path::new("/nonexistent/setting.toml")).unwrap();
        assert_eq!(s.proxy, ProxySettings::default());
    }
}
