//! The JSON body and the headers that depend on it: the contract with the
//! existing iOS apps, which read `aps` and the original map under `data`.

use std::borrow::Cow;

use bytes::Bytes;
use serde::Serialize;
use serde_json::{Map, Value};

use crate::push::ApnsOptions;

/// Apple refuses larger payloads; refusing them here saves a round trip
/// and gives a log line that names the user.
pub const MAX_PAYLOAD: usize = 4096;

/// Whether the app shows the notification or is woken up silently.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PushType {
    Alert,
    Background,
}

impl PushType {
    /// `apns-push-type`.
    pub fn header(self) -> &'static str {
        match self {
            PushType::Alert => "alert",
            PushType::Background => "background",
        }
    }

    /// `apns-priority`: Apple requires 5 for background pushes.
    pub fn priority(self) -> &'static str {
        match self {
            PushType::Alert => "10",
            PushType::Background => "5",
        }
    }
}

/// A body ready to send, at most `MAX_PAYLOAD` bytes.
#[derive(Debug, Clone)]
pub struct Payload {
    pub push_type: PushType,
    pub body: Bytes,
}

/// Why no payload could be built.
#[derive(Debug, thiserror::Error)]
pub enum PayloadError {
    #[error("payload is {size} bytes, APNs allows {MAX_PAYLOAD}")]
    TooLarge { size: usize },
    #[error("payload does not encode: {0}")]
    Encode(#[from] serde_json::Error),
}

impl Payload {
    /// `aps` gets `alert`, `sound` and `badge` from `data`; a push without
    /// `alert` is silent and gets `content-available: 1`. All of `data`
    /// also goes under `"data"`.
    pub fn build(data: &Map<String, Value>) -> Result<Payload, PayloadError> {
        Payload::with_options(data, None)
    }

    /// Like `build`, with `sound` and `badge` from `options` over those of `data`.
    pub fn with_options(
        data: &Map<String, Value>,
        options: Option<&ApnsOptions>,
    ) -> Result<Payload, PayloadError> {
        let badge = options.and_then(|o| o.badge).map(|b| Cow::Owned(b.into()));
        let sound = options.and_then(|o| o.sound.as_ref());
        let alert = data.get("alert");
        let aps = Aps {
            alert,
            sound: sound.or_else(|| data.get("sound")),
            badge: badge.or_else(|| data.get("badge").map(Cow::Borrowed)),
            content_available: alert.is_none().then_some(1),
        };
        let mut body = Vec::with_capacity(256);
        serde_json::to_writer(&mut body, &Body { aps, data })?;
        if body.len() > MAX_PAYLOAD {
            return Err(PayloadError::TooLarge { size: body.len() });
        }
        let push_type = match alert {
            Some(_) => PushType::Alert,
            None => PushType::Background,
        };
        Ok(Payload {
            push_type,
            body: body.into(),
        })
    }
}

/// The body as Apple gets it, written straight from the push's data.
#[derive(Serialize)]
struct Body<'a> {
    aps: Aps<'a>,
    data: &'a Map<String, Value>,
}

#[derive(Serialize)]
struct Aps<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    alert: Option<&'a Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    sound: Option<&'a Value>,
    #[serde(skip_serializing_if = "Option::is_none")]
    badge: Option<Cow<'a, Value>>,
    #[serde(rename = "content-available", skip_serializing_if = "Option::is_none")]
    content_available: Option<u8>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn map(v: Value) -> Map<String, Value> {
        v.as_object().cloned().unwrap_or_default()
    }

    #[test]
    fn alert_copies_alert_sound_badge() {
        let data = map(json!({"alert": "hi", "sound": "ding", "badge": 3, "n": 1}));
        let p = Payload::build(&data).unwrap();
        assert_eq!(p.push_type, PushType::Alert);
        let body: Value = serde_json::from_slice(&p.body).unwrap();
        assert_eq!(
            body,
            json!({"aps": {"alert": "hi", "sound": "ding", "badge": 3},
                   "data": {"alert": "hi", "sound": "ding", "badge": 3, "n": 1}})
        );
    }

    #[test]
    fn silent_is_content_available() {
        let p = Payload::build(&map(json!({"n": 1}))).unwrap();
        assert_eq!(p.push_type, PushType::Background);
        assert_eq!(
            (p.push_type.header(), p.push_type.priority()),
            ("background", "5")
        );
        let body: Value = serde_json::from_slice(&p.body).unwrap();
        assert_eq!(
            body,
            json!({"aps": {"content-available": 1}, "data": {"n": 1}})
        );
    }

    #[test]
    fn options_override_sound_and_badge_in_aps_only() {
        let data = map(json!({"alert": "hi", "sound": "a.caf", "badge": 1}));
        let options = ApnsOptions {
            sound: Some(json!({"critical": 1, "name": "b.caf"})),
            badge: Some(0),
            ..ApnsOptions::default()
        };
        let p = Payload::with_options(&data, Some(&options)).unwrap();
        let body: Value = serde_json::from_slice(&p.body).unwrap();
        assert_eq!(
            body,
            json!({"aps": {"alert": "hi", "sound": {"critical": 1, "name": "b.caf"}, "badge": 0},
                   "data": {"alert": "hi", "sound": "a.caf", "badge": 1}})
        );
    }

    #[test]
    fn too_large_is_refused_with_size() {
        let data = map(json!({"alert": "x".repeat(2100)}));
        match Payload::build(&data) {
            Err(PayloadError::TooLarge { size }) => assert!(size > MAX_PAYLOAD),
            other => panic!("{other:?}"),
        }
        let just_fits = map(json!({"alert": "x".repeat(2000)}));
        assert!(Payload::build(&just_fits).is_ok());
    }
}
