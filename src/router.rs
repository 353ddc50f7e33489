//! Who gets what, over which channel: a pure function over plain data.
//!
//! User push, per user: a usable APNs token and (an alert, or the app not in
//! focus) → APNs; otherwise → MQTT `<prefix>/user/<uid>`. Group push: one MQTT
//! publish on `<prefix>/group/<gid>`, plus APNs for each iOS member the user
//! rule sends to APNs.

use std::borrow::Borrow;

use crate::push::{Id, Push, Target, UserRecord};

/// Which APNs host a device token belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Environment {
    Sandbox,
    Production,
}

impl Environment {
    /// `app_version` `develop` → sandbox; anything else → production.
    pub fn from_app_version(version: Option<&str>) -> Self {
        match version {
            Some("develop") => Environment::Sandbox,
            _ => Environment::Production,
        }
    }

    /// `sandbox` or `production`, as APIs and events name it.
    pub fn name(self) -> &'static str {
        match self {
            Environment::Sandbox => "sandbox",
            Environment::Production => "production",
        }
    }
}

/// One notification for Apple.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApnsDelivery {
    pub user: Id,
    pub token: String,
    pub app_ident: String,
    pub env: Environment,
}

/// Everything one push turns into.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Routing {
    pub mqtt_topics: Vec<String>,
    pub apns: Vec<ApnsDelivery>,
}

/// The users whose records `route` needs: the targets of a user push. A
/// group push needs its iOS members, which only the registry knows.
pub fn user_targets(target: &Target) -> Vec<Id> {
    match target {
        Target::User(id) => vec![id.clone()],
        Target::Users(ids) => {
            let mut seen = std::collections::HashSet::with_capacity(ids.len());
            ids.iter().filter(|id| seen.insert(*id)).cloned().collect()
        }
        Target::Group(_) => Vec::new(),
    }
}

/// `concat`, not `format!`: one allocation of the right size (one per push).
pub fn user_topic(prefix: &str, id: &Id) -> String {
    [prefix, "/user/", id.as_str()].concat()
}

pub fn group_topic(prefix: &str, id: &Id) -> String {
    [prefix, "/group/", id.as_str()].concat()
}

/// Routes `push` given the records of its users: for a user push, of
/// `user_targets(&push.target)`; for a group push, of the group's iOS members.
/// A user with no record is treated as one with no token. Records may be
/// owned or borrowed, so callers need not copy them.
pub fn route<R: Borrow<UserRecord>>(
    prefix: &str,
    push: &Push,
    users: &[(Id, Option<R>)],
) -> Routing {
    let alert = push.is_alert();
    let mut routing = Routing::default();
    let group = match &push.target {
        Target::Group(gid) => {
            routing.mqtt_topics.push(group_topic(prefix, gid));
            true
        }
        Target::User(_) | Target::Users(_) => false,
    };
    for (id, record) in users {
        match apns_for(alert, id, record.as_ref().map(Borrow::borrow)) {
            Some(delivery) => routing.apns.push(delivery),
            None if !group => routing.mqtt_topics.push(user_topic(prefix, id)),
            None => {}
        }
    }
    routing
}

/// Whether the user can be reached over APNs at all (a token and an app
/// ident); users who cannot get MQTT only, and their messages are kept
/// while they are offline.
pub fn has_apns(record: Option<&UserRecord>) -> bool {
    record.is_some_and(|r| {
        r.app_token.as_deref().is_some_and(|t| !t.is_empty())
            && r.app_ident.as_deref().is_some_and(|i| !i.is_empty())
    })
}

fn apns_for(alert: bool, id: &Id, record: Option<&UserRecord>) -> Option<ApnsDelivery> {
    let record = record?;
    let token = record.app_token.as_deref().filter(|t| !t.is_empty())?;
    let ident = record.app_ident.as_deref().filter(|i| !i.is_empty())?;
    (alert || !record.app_focus).then(|| ApnsDelivery {
        user: id.clone(),
        token: token.to_owned(),
        app_ident: ident.to_owned(),
        env: Environment::from_app_version(record.app_version.as_deref()),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;
    use std::sync::Arc;

    fn push(target: Target, alert: bool) -> Push {
        let data = if alert {
            json!({"alert": "hi", "n": 1})
        } else {
            json!({"n": 1})
        };
        Push::new(target, Arc::new(data.as_object().unwrap().clone()))
    }

    fn record(token: bool, focus: bool) -> UserRecord {
        UserRecord {
            app_token: token.then(|| "ab12".to_string()),
            app_ident: Some("com.example.app".into()),
            app_version: Some("produce".into()),
            app_focus: focus,
        }
    }

    fn apns(id: &str) -> ApnsDelivery {
        ApnsDelivery {
            user: id.into(),
            token: "ab12".into(),
            app_ident: "com.example.app".into(),
            env: Environment::Production,
        }
    }

    /// The user rule's full truth table, for a single user.
    #[test]
    fn user_rule_every_branch() {
        for alert in [true, false] {
            for token in [true, false] {
                for focus in [true, false] {
                    let p = push(Target::User("7".into()), alert);
                    let r = route("push", &p, &[("7".into(), Some(record(token, focus)))]);
                    let to_apns = token && (alert || !focus);
                    let want = if to_apns {
                        Routing {
                            mqtt_topics: vec![],
                            apns: vec![apns("7")],
                        }
                    } else {
                        Routing {
                            mqtt_topics: vec!["push/user/7".into()],
                            apns: vec![],
                        }
                    };
                    assert_eq!(r, want, "alert={alert} token={token} focus={focus}");
                }
            }
        }
    }

    #[test]
    fn no_record_goes_to_mqtt() {
        for alert in [true, false] {
            let p = push(Target::User("9".into()), alert);
            let r = route::<UserRecord>("pfx", &p, &[("9".into(), None)]);
            assert_eq!(r.mqtt_topics, vec!["pfx/user/9"]);
            assert!(r.apns.is_empty());
        }
    }

    #[test]
    fn unusable_token_goes_to_mqtt() {
        let mut empty = record(true, false);
        empty.app_token = Some(String::new());
        let mut no_ident = record(true, false);
        no_ident.app_ident = None;
        for rec in [empty, no_ident] {
            let p = push(Target::User("1".into()), true);
            let r = route("push", &p, &[("1".into(), Some(rec))]);
            assert_eq!(r.mqtt_topics, vec!["push/user/1"]);
            assert!(r.apns.is_empty());
        }
    }

    #[test]
    fn users_list_routes_each_user() {
        for alert in [true, false] {
            let ids: Vec<Id> = ["1", "2", "3", "4"].map(Id::from).to_vec();
            let p = push(Target::Users(ids.clone()), alert);
            let recs = vec![
                (ids[0].clone(), Some(record(true, false))),
                (ids[1].clone(), Some(record(true, true))),
                (ids[2].clone(), Some(record(false, false))),
                (ids[3].clone(), None),
            ];
            let r = route("push", &p, &recs);
            let mut want_apns = vec![apns("1")];
            let mut want_mqtt = vec!["push/user/3".to_string(), "push/user/4".to_string()];
            if alert {
                want_apns.push(apns("2"));
            } else {
                want_mqtt.insert(0, "push/user/2".into());
            }
            assert_eq!(r.apns, want_apns, "alert={alert}");
            assert_eq!(r.mqtt_topics, want_mqtt, "alert={alert}");
        }
    }

    #[test]
    fn group_publishes_once_and_apns_by_user_rule() {
        for alert in [true, false] {
            for token in [true, false] {
                for focus in [true, false] {
                    let p = push(Target::Group("5".into()), alert);
                    let r = route("push", &p, &[("8".into(), Some(record(token, focus)))]);
                    assert_eq!(r.mqtt_topics, vec!["push/group/5"]);
                    let to_apns = token && (alert || !focus);
                    assert_eq!(r.apns, if to_apns { vec![apns("8")] } else { vec![] });
                }
            }
        }
    }

    #[test]
    fn group_without_ios_members_is_one_publish() {
        let p = push(Target::Group("5".into()), true);
        let r = route::<UserRecord>("push", &p, &[]);
        assert_eq!(r.mqtt_topics, vec!["push/group/5"]);
        assert!(r.apns.is_empty());
    }

    #[test]
    fn app_version_picks_environment() {
        let mut rec = record(true, false);
        for (version, env) in [
            (Some("develop"), Environment::Sandbox),
            (Some("produce"), Environment::Production),
            (None, Environment::Production),
        ] {
            rec.app_version = version.map(String::from);
            let p = push(Target::User("1".into()), true);
            let r = route("push", &p, &[("1".into(), Some(rec.clone()))]);
            assert_eq!(r.apns[0].env, env);
        }
    }

    #[test]
    fn user_targets_dedups_in_order() {
        let ids = ["3", "1", "3", "2", "1"].map(Id::from).to_vec();
        assert_eq!(
            user_targets(&Target::Users(ids)),
            ["3", "1", "2"].map(Id::from).to_vec()
        );
        assert_eq!(user_targets(&Target::User("4".into())), vec![Id::from("4")]);
        assert!(user_targets(&Target::Group("4".into())).is_empty());
    }

    #[test]
    fn focus_values() {
        for (v, want) in [
            (None, false),
            (Some(""), false),
            (Some("0"), false),
            (Some("false"), false),
            (Some("1"), true),
            (Some("true"), true),
            (Some("True"), true),
        ] {
            assert_eq!(UserRecord::focus_from(v), want, "{v:?}");
        }
    }
}
