//! The plain data a push is made of, shared by the proxy, the router and the senders.

pub(crate) mod ack;
mod id;

pub use ack::Ack;
pub use id::PushId;

use std::fmt;
use std::sync::Arc;

use serde_json::{Map, Value};

/// A user or group id, normalised to text: `42` and `"42"` are the same id.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Id(pub Arc<str>);

impl Id {
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Longest id in bytes: ids are user and group ids, not payloads.
    pub const MAX_LEN: usize = 256;

    /// What [`Id::parse`] refuses, for error messages.
    pub const RULE: &'static str =
        "empty, longer than 256 bytes, or has '/', '+', '#' or control characters";

    /// An id from text. Ids become topic levels and Redis keys, so they may
    /// not be empty, longer than [`Id::MAX_LEN`], or hold `/`, `+`, `#` or
    /// control characters.
    pub fn parse(text: &str) -> Option<Id> {
        let bad = |c: char| matches!(c, '/' | '+' | '#') || c.is_control();
        (!text.is_empty() && text.len() <= Id::MAX_LEN && !text.contains(bad))
            .then(|| Id::from(text))
    }
}

impl From<&str> for Id {
    fn from(s: &str) -> Self {
        Id(Arc::from(s))
    }
}

impl From<u64> for Id {
    fn from(n: u64) -> Self {
        Id(Arc::from(n.to_string()))
    }
}

impl fmt::Display for Id {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Whom a push is for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    User(Id),
    Users(Vec<Id>),
    Group(Id),
}

/// One accepted push: its target and the `data` map the app receives.
#[derive(Debug, Clone, PartialEq)]
pub struct Push {
    pub target: Target,
    pub data: Arc<Map<String, Value>>,
    /// APNs overrides given over HTTP; the proxy's wire format has none.
    pub apns: Option<Arc<ApnsOptions>>,
    /// Generated at acceptance, or the backend's (options map, HTTP `id`).
    pub id: PushId,
    /// The backend asked for a receipt: outcomes are recorded under `id`.
    pub receipt: bool,
    /// Seconds the push stays worth delivering (options map, HTTP `ttl`).
    pub ttl: Option<u32>,
}

impl Push {
    /// Longest TTL accepted: 30 days, beyond what APNs or an offline
    /// store would keep anyway.
    pub const MAX_TTL: u64 = 30 * 86_400;

    /// A push with a new id, no receipt, no TTL and no APNs overrides.
    pub fn new(target: Target, data: Arc<Map<String, Value>>) -> Push {
        Push {
            target,
            data,
            apns: None,
            id: PushId::generate(),
            receipt: false,
            ttl: None,
        }
    }

    /// A TTL if `secs` is within 1 ..= [`Push::MAX_TTL`].
    pub fn ttl_from(secs: u64) -> Option<u32> {
        (1..=Self::MAX_TTL).contains(&secs).then_some(secs as u32)
    }
}

/// Per-notification APNs request settings a backend may set over HTTP;
/// each `None` keeps what pushbridge derives from `data` and the settings.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ApnsOptions {
    /// `apns-priority`: 5 or 10.
    pub priority: Option<u8>,
    /// `apns-expiration`: Unix seconds; 0 = deliver once, do not store.
    pub expiration: Option<u64>,
    /// `apns-collapse-id`: at most 64 bytes.
    pub collapse_id: Option<String>,
    /// `apns-push-type`: "alert", "background", ...
    pub push_type: Option<String>,
    /// `aps.sound`: a name, or a critical-alert dictionary.
    pub sound: Option<Value>,
    /// `aps.badge`.
    pub badge: Option<u64>,
}

impl Push {
    /// A push with an `alert` key is shown to the user; without one it is silent.
    pub fn is_alert(&self) -> bool {
        self.data.contains_key("alert")
    }

    /// `data` as the JSON text apps receive over MQTT.
    pub fn json(&self) -> bytes::Bytes {
        serde_json::to_vec(&*self.data)
            .expect("a JSON map always serialises")
            .into()
    }
}

/// A user's record as the registry holds it (`User:<uid>` hash).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UserRecord {
    pub app_token: Option<String>,
    pub app_ident: Option<String>,
    pub app_version: Option<String>,
    pub app_focus: bool,
}

impl UserRecord {
    /// The old service stored focus as `1`; read any non-empty value but an
    /// explicit false as set.
    pub fn focus_from(value: Option<&str>) -> bool {
        match value.map(str::trim) {
            None | Some("") => false,
            Some(v) => !matches!(
                v.to_ascii_lowercase().as_str(),
                "0" | "false" | "no" | "off"
            ),
        }
    }
}
