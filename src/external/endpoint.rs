//! Where the external broker is and how to log in: `mqtt.external_*`
//! checked when settings load, then turned into rumqttc options, TLS included.

use std::path::Path;
use std::sync::Arc;

use rustls::ClientConfig;

use super::ExternalError;
use crate::settings::{MqttSettings, Settings, SettingsError};
use crate::tls_client;

/// `mqtt://host[:port]` or `mqtts://host[:port]`, parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint {
    pub host: String,
    pub port: u16,
    pub tls: bool,
}

impl Endpoint {
    /// Parses every URL of `mqtt.external_url`, at least one.
    pub fn parse_all(urls: &[String]) -> Result<Vec<Endpoint>, String> {
        if urls.is_empty() {
            return Err("an empty list: give at least one broker URL".into());
        }
        urls.iter().map(|u| Endpoint::parse(u)).collect()
    }

    /// Parses one URL of `mqtt.external_url`; the error says what is wrong with it.
    pub fn parse(url: &str) -> Result<Endpoint, String> {
        let (tls, rest) = if let Some(rest) = url.strip_prefix("mqtts://") {
            (true, rest)
        } else if let Some(rest) = url.strip_prefix("mqtt://") {
            (false, rest)
        } else {
            return Err(format!("{url:?}: must start with mqtt:// or mqtts://"));
        };
        let rest = rest.strip_suffix('/').unwrap_or(rest);
        if rest.contains('@') {
            return Err(format!(
                "{url:?}: put credentials in mqtt.external_username and mqtt.external_password"
            ));
        }
        if rest.contains(['/', '?', '#']) {
            return Err(format!(
                "{url:?}: no path or query allowed, only host and port"
            ));
        }
        let (host, port) = if let Some(v6) = rest.strip_prefix('[') {
            let (host, after) = v6
                .split_once(']')
                .ok_or_else(|| format!("{url:?}: unclosed '['"))?;
            match after {
                "" => (host, None),
                a => match a.strip_prefix(':') {
                    Some(p) => (host, Some(p)),
                    None => return Err(format!("{url:?}: expected ':port' after ']'")),
                },
            }
        } else if rest.matches(':').count() > 1 {
            return Err(format!("{url:?}: put an IPv6 address in brackets"));
        } else {
            match rest.split_once(':') {
                Some((h, p)) => (h, Some(p)),
                None => (rest, None),
            }
        };
        if host.is_empty() {
            return Err(format!("{url:?}: no host"));
        }
        let port = match port {
            None => {
                if tls {
                    8883
                } else {
                    1883
                }
            }
            Some(p) => p
                .parse::<u16>()
                .ok()
                .filter(|&p| p > 0)
                .ok_or_else(|| format!("{url:?}: bad port {p:?}"))?,
        };
        Ok(Endpoint {
            host: host.to_string(),
            port,
            tls,
        })
    }
}

impl Settings {
    /// The `mqtt.external_*` and `mqtt.outbox` part of `Settings::check`.
    pub(crate) fn check_external(&self) -> Result<(), SettingsError> {
        let m = &self.mqtt;
        let bad = |key, problem: String| Err(SettingsError::Check { key, problem });
        if m.outbox == 0 {
            return bad("mqtt.outbox", "must be at least 1".into());
        }
        let g = &m.external_shared_group;
        if g.contains(['+', '#', '/', '\0']) {
            return bad(
                "mqtt.external_shared_group",
                "must be one topic level, without wildcards or '/'".into(),
            );
        }
        if m.external_max_attempts == 0 {
            return bad("mqtt.external_max_attempts", "must be at least 1".into());
        }
        let events = &m.external_subscribe_events;
        if events.contains('\0') || events.find('#').is_some_and(|i| i + 1 != events.len()) {
            return bad(
                "mqtt.external_subscribe_events",
                "must be a topic filter ('#' only at the end)".into(),
            );
        }
        let Some(urls) = &m.external_url else {
            return Ok(());
        };
        let endpoints = match Endpoint::parse_all(urls.urls()) {
            Ok(e) => e,
            Err(problem) => return bad("mqtt.external_url", problem),
        };
        if m.external_ca_file.is_some() && !endpoints.iter().any(|e| e.tls) {
            return bad(
                "mqtt.external_ca_file",
                "needs an mqtts:// mqtt.external_url".into(),
            );
        }
        if m.external_password.is_some() && m.external_username.is_none() {
            return bad(
                "mqtt.external_password",
                "needs mqtt.external_username".into(),
            );
        }
        if m.external_client_id.as_deref() == Some("") {
            return bad("mqtt.external_client_id", "must not be empty".into());
        }
        Ok(())
    }
}

/// How to reach and log in to one broker of `mqtt.external_url`, for
/// either protocol version (see `client`).
#[derive(Clone)]
pub(crate) struct Login {
    pub endpoint: Endpoint,
    pub client_id: String,
    pub credentials: Option<(String, String)>,
    pub tls: Option<Arc<ClientConfig>>,
    pub max_packet_size: usize,
}

impl Login {
    /// `host:port`, for logs.
    pub fn addr(&self) -> String {
        match self.endpoint.host.contains(':') {
            true => format!("[{}]:{}", self.endpoint.host, self.endpoint.port),
            false => format!("{}:{}", self.endpoint.host, self.endpoint.port),
        }
    }
}

/// One `Login` per URL of `mqtt.external_url`, in order.
pub(crate) fn logins(
    settings: &MqttSettings,
    client_id: &str,
) -> Result<Vec<Login>, ExternalError> {
    let urls = settings
        .external_url
        .as_ref()
        .map(|u| u.urls())
        .unwrap_or_default();
    let endpoints = Endpoint::parse_all(urls).map_err(|problem| ExternalError::Setting {
        key: "mqtt.external_url",
        problem,
    })?;
    let tls = match endpoints.iter().any(|e| e.tls) {
        true => Some(tls_config(settings.external_ca_file.as_deref())?),
        false => None,
    };
    let credentials = settings.external_username.as_ref().map(|user| {
        (
            user.clone(),
            settings.external_password.clone().unwrap_or_default(),
        )
    });
    Ok(endpoints
        .into_iter()
        .map(|endpoint| Login {
            tls: tls.clone().filter(|_| endpoint.tls),
            endpoint,
            client_id: client_id.to_string(),
            credentials: credentials.clone(),
            max_packet_size: settings.max_packet_size,
        })
        .collect())
}

/// The client id: the setting, or `pushbridge-<hostname>`.
pub(crate) fn client_id(settings: &MqttSettings) -> String {
    settings
        .external_client_id
        .clone()
        .unwrap_or_else(|| format!("pushbridge-{}", hostname()))
}

fn hostname() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: gethostname writes at most buf.len() bytes into buf.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    let len = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    match std::str::from_utf8(&buf[..len]) {
        Ok(h) if rc == 0 && !h.is_empty() => h.to_string(),
        _ => "localhost".into(),
    }
}

/// Public web roots plus `ca_file`.
pub(crate) fn tls_config(ca_file: Option<&Path>) -> Result<Arc<ClientConfig>, ExternalError> {
    let mut roots = tls_client::web_roots();
    if let Some(path) = ca_file {
        tls_client::add_ca_file(&mut roots, path).map_err(|e| ExternalError::File {
            path: e.path,
            problem: e.problem,
        })?;
    }
    Ok(tls_client::config(roots))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(url: &str) -> (String, u16, bool) {
        let e = Endpoint::parse(url).unwrap();
        (e.host, e.port, e.tls)
    }

    #[test]
    fn parses_urls() {
        assert_eq!(ok("mqtt://b.example"), ("b.example".into(), 1883, false));
        assert_eq!(ok("mqtts://b.example"), ("b.example".into(), 8883, true));
        assert_eq!(
            ok("mqtt://10.0.0.1:1999/"),
            ("10.0.0.1".into(), 1999, false)
        );
        assert_eq!(ok("mqtts://[::1]:8884"), ("::1".into(), 8884, true));
        assert_eq!(ok("mqtt://[::1]"), ("::1".into(), 1883, false));
    }

    #[test]
    fn rejects_bad_urls_saying_why() {
        for (url, why) in [
            ("tcp://b:1883", "mqtt://"),
            ("mqtt://", "no host"),
            ("mqtt://:1883", "no host"),
            ("mqtt://b:0", "bad port"),
            ("mqtt://b:70000", "bad port"),
            ("mqtt://u:p@b", "external_username"),
            ("mqtt://b/topic", "no path"),
        ] {
            let err = Endpoint::parse(url).unwrap_err();
            assert!(err.contains(why), "{url}: {err}");
        }
    }

    #[test]
    fn external_broker_settings_are_checked() {
        let s = Settings::from_toml("[mqtt]\nexternal_url = \"mqtts://b.example:8883\"\n").unwrap();
        assert_eq!(
            s.mqtt.external_url.map(|u| u.to_string()).as_deref(),
            Some("mqtts://b.example:8883")
        );
        let s =
            Settings::from_toml("[mqtt]\nexternal_url = [\"mqtt://a\", \"mqtts://b\"]\n").unwrap();
        let urls = s.mqtt.external_url.unwrap();
        assert_eq!(urls.urls(), ["mqtt://a", "mqtts://b"]);
        assert_eq!(urls.to_string(), "mqtt://a, mqtts://b");
        for (toml, key) in [
            ("external_url = \"http://b:1\"", "mqtt.external_url"),
            ("external_url = \"mqtt://\"", "mqtt.external_url"),
            ("external_url = \"mqtt://b:x\"", "mqtt.external_url"),
            (
                "external_url = \"mqtt://b\"\nexternal_ca_file = \"ca.pem\"",
                "mqtt.external_ca_file",
            ),
            (
                "external_url = \"mqtt://b\"\nexternal_password = \"p\"",
                "mqtt.external_password",
            ),
            ("outbox = 0", "mqtt.outbox"),
            (
                "external_shared_group = \"a/b\"",
                "mqtt.external_shared_group",
            ),
            ("outbox_full = \"shed\"", "outbox_full"),
            ("external_url = []", "mqtt.external_url"),
            (
                "external_url = [\"mqtt://a\", \"tcp://b\"]",
                "mqtt.external_url",
            ),
            ("external_max_attempts = 0", "mqtt.external_max_attempts"),
            (
                "external_subscribe_events = \"a/#/b\"",
                "mqtt.external_subscribe_events",
            ),
        ] {
            let err = Settings::from_toml(&format!("[mqtt]\n{toml}\n")).unwrap_err();
            assert!(err.to_string().contains(key), "{toml}: {err}");
        }
    }

    #[test]
    #[allow(clippy::result_large_err)]
    fn a_list_of_urls_from_the_environment() {
        figment::Jail::expect_with(|jail| {
            jail.create_file("setting.toml", "")?;
            jail.set_env(
                "PUSHBRIDGE_MQTT__EXTERNAL_URL",
                r#"["mqtt://a:1883", "mqtt://b:1883"]"#,
            );
            let s = Settings::load(std::path::Path::new("setting.toml")).expect("loads");
            let urls = s.mqtt.external_url.expect("set");
            assert_eq!(urls.urls(), ["mqtt://a:1883", "mqtt://b:1883"]);
            jail.set_env("PUSHBRIDGE_MQTT__EXTERNAL_URL", "mqtt://c:1883");
            let s = Settings::load(std::path::Path::new("setting.toml")).expect("loads");
            assert_eq!(s.mqtt.external_url.expect("set").urls(), ["mqtt://c:1883"]);
            Ok(())
        });
    }
}
