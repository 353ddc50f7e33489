//! The optional `apns` object of a `POST /v1/push` notification, checked
//! field by field so a 400 names the field and what it accepts.

use serde_json::{Map, Value};

use crate::push::ApnsOptions;

/// Push types Apple documents for `apns-push-type`.
const PUSH_TYPES: [&str; 11] = [
    "alert",
    "background",
    "location",
    "voip",
    "complication",
    "fileprovider",
    "mdm",
    "liveactivity",
    "pushtotalk",
    "controls",
    "widgets",
];

/// Apple ignores the rest of a longer collapse id, so it is refused here.
const MAX_COLLAPSE_ID: usize = 64;

/// Parses `apns`; `Err` names the field (`apns.priority: ...`).
pub(super) fn parse(apns: &Map<String, Value>) -> Result<ApnsOptions, String> {
    let mut o = ApnsOptions::default();
    for (key, v) in apns {
        let bad = |what: &str| format!("apns.{key}: {what}, got {v}");
        match key.as_str() {
            "priority" => match v.as_u64() {
                Some(p @ (5 | 10)) => o.priority = Some(p as u8),
                _ => return Err(bad("must be 5 or 10")),
            },
            "expiration" => {
                let at = v.as_u64();
                o.expiration = Some(at.ok_or_else(|| {
                    bad("must be Unix seconds (an integer >= 0; 0 = deliver once)")
                })?);
            }
            "collapse_id" => match v.as_str() {
                Some(s)
                    if !s.is_empty()
                        && s.len() <= MAX_COLLAPSE_ID
                        && s.bytes().all(|b| (b' '..=b'~').contains(&b)) =>
                {
                    o.collapse_id = Some(s.to_owned())
                }
                _ => {
                    return Err(bad(&format!(
                        "must be 1 to {MAX_COLLAPSE_ID} bytes of printable ASCII"
                    )))
                }
            },
            "push_type" => match v.as_str() {
                Some(t) if PUSH_TYPES.contains(&t) => o.push_type = Some(t.to_owned()),
                _ => return Err(bad(&format!("must be one of {}", PUSH_TYPES.join(", ")))),
            },
            "sound" => match v {
                Value::String(s) if !s.is_empty() => o.sound = Some(v.clone()),
                Value::Object(_) => o.sound = Some(v.clone()),
                _ => return Err(bad("must be a sound name or a critical-alert object")),
            },
            "badge" => {
                let n = v.as_u64();
                o.badge = Some(n.ok_or_else(|| bad("must be an integer >= 0"))?);
            }
            _ => {
                return Err(format!(
                    "apns.{key}: unknown field; expected priority, expiration, collapse_id, \
                     push_type, sound or badge"
                ))
            }
        }
    }
    Ok(o)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn try_parse(v: Value) -> Result<ApnsOptions, String> {
        parse(v.as_object().unwrap())
    }

    #[test]
    fn every_field() {
        let o = try_parse(json!({"priority": 5, "expiration": 0, "collapse_id": "c",
            "push_type": "background", "sound": "a.caf", "badge": 2}))
        .unwrap();
        assert_eq!(
            o,
            ApnsOptions {
                priority: Some(5),
                expiration: Some(0),
                collapse_id: Some("c".into()),
                push_type: Some("background".into()),
                sound: Some(json!("a.caf")),
                badge: Some(2),
            }
        );
        assert_eq!(try_parse(json!({})).unwrap(), ApnsOptions::default());
    }

    #[test]
    fn errors_name_the_field() {
        for (bad, field) in [
            (json!({"priority": 7}), "apns.priority"),
            (json!({"priority": "10"}), "apns.priority"),
            (json!({"expiration": -1}), "apns.expiration"),
            (json!({"collapse_id": "x".repeat(65)}), "apns.collapse_id"),
            (json!({"collapse_id": "a\nb"}), "apns.collapse_id"),
            (json!({"push_type": "loud"}), "apns.push_type"),
            (json!({"sound": 1}), "apns.sound"),
            (json!({"badge": 1.5}), "apns.badge"),
            (json!({"colapse_id": "x"}), "apns.colapse_id: unknown field"),
        ] {
            let err = try_parse(bad.clone()).unwrap_err();
            assert!(err.starts_with(field), "{bad}: {err}");
        }
    }
}
