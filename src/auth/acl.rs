//! What a connection may subscribe to and publish.
//!
//! | role | subscribe | publish |
//! |---|---|---|
//! | Device | `<prefix>/user/<own id>`, `<prefix>/group/<gid>` for the token's groups | `<prefix>/app/status` about itself |
//! | Service | any valid filter, wildcards included | as Device |
//! | Anonymous (`auth.mode = none`) | any `<prefix>/user/<id>`, `<prefix>/group/<id>`, the APNs feedback topic, no wildcards | `<prefix>/app/status`, any user |
//! | Open (no auth) | anything | anything |

use bytes::Bytes;
use serde_json::Value;

use super::{Auth, Identity, Role};

impl Auth {
    /// May `who` subscribe to `filter` (already a valid filter)?
    pub fn may_subscribe(&self, who: &Identity, filter: &str) -> bool {
        match who.role {
            Role::Open | Role::Service => return true,
            Role::Anonymous | Role::Device => {}
        }
        if filter.contains(['+', '#']) {
            return false;
        }
        if who.role == Role::Anonymous && self.feedback_topic.as_deref() == Some(filter) {
            return true;
        }
        let Some(rest) = filter
            .strip_prefix(self.prefix.as_str())
            .and_then(|r| r.strip_prefix('/'))
        else {
            return false;
        };
        let (kind, id) = match rest.split_once('/') {
            Some((kind, id)) if !id.is_empty() && !id.contains('/') => (kind, id),
            _ => return false,
        };
        match (kind, &who.role) {
            ("user" | "group", Role::Anonymous) => true,
            ("user", _) => who.user.as_deref() == Some(id),
            ("group", _) => who.groups.iter().any(|g| g == id),
            _ => false,
        }
    }

    /// The payload to route if `who` may publish it on `topic`: a status
    /// message without `user_id` gets the publisher's; `None` is refused.
    pub fn may_publish(&self, who: &Identity, topic: &str, payload: Bytes) -> Option<Bytes> {
        if who.role == Role::Open {
            return Some(payload);
        }
        if topic != self.status_topic {
            return None;
        }
        let Some(user) = who.user.as_deref() else {
            return Some(payload);
        };
        let Ok(Value::Object(mut map)) = serde_json::from_slice::<Value>(&payload) else {
            return None;
        };
        match map.get("user_id") {
            None => {
                map.insert("user_id".into(), Value::String(user.into()));
                Some(Value::Object(map).to_string().into())
            }
            Some(Value::String(s)) if s == user => Some(payload),
            Some(Value::Number(n)) if n.to_string() == user => Some(payload),
            Some(_) => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn feedback_topic_is_readable_anonymously_only_when_named() {
        let none = crate::settings::AuthSettings::default();
        let auth = Auth::new(&none, "push").unwrap();
        let anon = who(Role::Anonymous, None, &[]);
        assert!(!auth.may_subscribe(&anon, "push/feedback"));
        let auth = auth.with_feedback_topic("push/feedback".into());
        assert!(auth.may_subscribe(&anon, "push/feedback"));
        assert!(!auth.may_subscribe(&who(Role::Device, Some("1"), &[]), "push/feedback"));
        assert!(!auth.may_subscribe(&anon, "push/feedback/#"));
    }

    fn who(role: Role, user: Option<&str>, groups: &[&str]) -> Identity {
        Identity {
            role,
            user: user.map(String::from),
            groups: groups.iter().map(|g| g.to_string()).collect(),
            expires: None,
        }
    }

    #[test]
    fn subscribe_rules() {
        let auth = Auth::open("push");
        let dev = who(Role::Device, Some("42"), &["7"]);
        let anon = who(Role::Anonymous, None, &[]);
        let ops = who(Role::Service, Some("ops"), &[]);
        let open = who(Role::Open, None, &[]);
        let cases = [
            ("push/user/42", true, true, true),
            ("push/user/43", false, true, true),
            ("push/group/7", true, true, true),
            ("push/group/8", false, true, true),
            ("push/user/#", false, false, true),
            ("push/user/+", false, false, true),
            ("#", false, false, true),
            ("push/user/42/x", false, false, true),
            ("push/user/", false, false, true),
            ("push/app/status", false, false, true),
            ("other/user/42", false, false, true),
            ("pushx/user/42", false, false, true),
        ];
        for (filter, d, a, s) in cases {
            assert_eq!(auth.may_subscribe(&dev, filter), d, "device {filter}");
            assert_eq!(auth.may_subscribe(&anon, filter), a, "anonymous {filter}");
            assert_eq!(auth.may_subscribe(&ops, filter), s, "service {filter}");
            assert!(auth.may_subscribe(&open, filter), "open {filter}");
        }
    }

    #[test]
    fn publish_rules() {
        let auth = Auth::open("push");
        let dev = who(Role::Device, Some("42"), &[]);
        let anon = who(Role::Anonymous, None, &[]);
        let p = |s: &'static str| Bytes::from_static(s.as_bytes());
        let st = "push/app/status";
        let own = p(r#"{"user_id":42,"focus":true}"#);
        assert_eq!(auth.may_publish(&dev, st, own.clone()), Some(own.clone()));
        let own_str = p(r#"{"user_id":"42","focus":true}"#);
        assert!(auth.may_publish(&dev, st, own_str).is_some());
        assert_eq!(
            auth.may_publish(&dev, st, p(r#"{"user_id":43,"focus":true}"#)),
            None
        );
        assert_eq!(auth.may_publish(&dev, st, p("not json")), None);
        let filled = auth.may_publish(&dev, st, p(r#"{"focus":true}"#)).unwrap();
        assert_eq!(crate::status::parse(&filled), Some(("42".into(), true)));
        assert_eq!(auth.may_publish(&dev, "push/user/42", own.clone()), None);
        assert_eq!(auth.may_publish(&anon, "push/user/42", own.clone()), None);
        let other = p(r#"{"user_id":43,"focus":true}"#);
        assert_eq!(auth.may_publish(&anon, st, other.clone()), Some(other));
        let open = who(Role::Open, None, &[]);
        assert!(auth.may_publish(&open, "any/topic", own).is_some());
    }
}
