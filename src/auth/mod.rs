//! Who a device is (its MQTT password, a JWT) and what it may read and write.
//!
//! The old service let any client subscribe to any user's topic; here every
//! CONNECT goes through [`Auth::login`] and every SUBSCRIBE and PUBLISH
//! through the ACL in [`acl`].

pub mod acl;
pub mod jwt;

use std::collections::HashSet;
use std::sync::{Arc, OnceLock};

use crate::settings::{AuthMode, AuthSettings};
use crate::utc::now;

#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("auth key: {0}")]
    Key(String),
    #[error("device token: {0}")]
    Token(String),
}

/// Why a CONNECT is refused; each maps to its CONNACK code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// No token, not a JWT, wrong algorithm or signature (v3.1.1: 4, v5: 0x86).
    BadCredentials,
    /// A valid signature, but expired, not yet valid, or a user name that is
    /// not the token's subject (v3.1.1: 5, v5: 0x87).
    NotAuthorized,
}

/// What a connection may do; fixed at CONNECT.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Role {
    /// No ACL at all: a broker built without auth (embedding, broker tests).
    Open,
    /// `auth.mode = none`: identity unknown; the old service's topics only.
    Anonymous,
    /// A token's subject: its own user topic and its groups.
    Device,
    /// A token subject listed in `auth.service_accounts`: may subscribe to anything.
    Service,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    pub role: Role,
    /// The user id (token `sub`); `None` unless the role is Device or Service.
    pub user: Option<String>,
    pub groups: Vec<String>,
    /// Unix seconds the token expires; the connection is closed then.
    pub expires: Option<u64>,
}

impl Identity {
    fn without_token(role: Role) -> Identity {
        Identity {
            role,
            user: None,
            groups: Vec::new(),
            expires: None,
        }
    }

    /// A handle for a connection to keep. The identities without a token
    /// are all alike, so they share one allocation (per idle device, 88
    /// bytes saved).
    pub fn into_shared(self) -> Arc<Identity> {
        static OPEN: OnceLock<Arc<Identity>> = OnceLock::new();
        static ANONYMOUS: OnceLock<Arc<Identity>> = OnceLock::new();
        let shared = match self.role {
            Role::Open => &OPEN,
            Role::Anonymous => &ANONYMOUS,
            Role::Device | Role::Service => return Arc::new(self),
        };
        if self.user.is_some() || !self.groups.is_empty() || self.expires.is_some() {
            return Arc::new(self);
        }
        shared.get_or_init(|| Arc::new(self)).clone()
    }
}

enum Mode {
    Open,
    None,
    Jwt(jwt::Verifier),
}

/// Authentication and ACL for one broker.
pub struct Auth {
    mode: Mode,
    service_accounts: HashSet<String>,
    prefix: String,
    status_topic: String,
    /// APNs feedback for backends; anonymous clients may read it (see acl).
    feedback_topic: Option<String>,
}

impl std::fmt::Debug for Auth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Auth")
            .field("prefix", &self.prefix)
            .finish_non_exhaustive()
    }
}

impl Auth {
    /// No authentication and no ACL; for embedding the broker where every client is trusted.
    pub fn open(prefix: &str) -> Auth {
        Auth::with_mode(Mode::Open, HashSet::new(), prefix)
    }

    /// From the settings; reads the public key file, if any.
    pub fn new(settings: &AuthSettings, prefix: &str) -> Result<Auth, AuthError> {
        let mode = match settings.mode {
            AuthMode::None => Mode::None,
            AuthMode::Jwt => Mode::Jwt(
                jwt::Verifier::new(
                    settings.jwt_secret.as_deref(),
                    settings.jwt_public_key.as_deref(),
                )?
                .with_policy(jwt::Policy {
                    audience: settings.jwt_audience.clone(),
                    issuer: settings.jwt_issuer.clone(),
                    max_ttl_secs: settings.jwt_max_ttl_secs,
                }),
            ),
        };
        let accounts = settings.service_accounts.iter().cloned().collect();
        Ok(Auth::with_mode(mode, accounts, prefix))
    }

    fn with_mode(mode: Mode, service_accounts: HashSet<String>, prefix: &str) -> Auth {
        Auth {
            mode,
            service_accounts,
            prefix: prefix.into(),
            status_topic: format!("{prefix}/app/status"),
            feedback_topic: None,
        }
    }

    /// Names the APNs feedback topic, which backends read without a token
    /// under `auth.mode = none` (under `jwt`, service accounts read it).
    pub fn with_feedback_topic(mut self, topic: String) -> Auth {
        self.feedback_topic = Some(topic);
        self
    }

    /// The identity behind a CONNECT's user name and password.
    pub fn login(
        &self,
        username: Option<&str>,
        password: Option<&str>,
    ) -> Result<Identity, Refusal> {
        let verifier = match &self.mode {
            Mode::Open => return Ok(Identity::without_token(Role::Open)),
            Mode::None => return Ok(Identity::without_token(Role::Anonymous)),
            Mode::Jwt(v) => v,
        };
        let token = password
            .filter(|p| !p.is_empty())
            .ok_or(Refusal::BadCredentials)?;
        let claims = verifier.verify(token, now()).map_err(|e| match e {
            jwt::JwtError::Expired | jwt::JwtError::NotYetValid => Refusal::NotAuthorized,
            _ => Refusal::BadCredentials,
        })?;
        if username.is_some_and(|u| !u.is_empty() && u != claims.sub) {
            return Err(Refusal::NotAuthorized);
        }
        let role = match self.service_accounts.contains(&claims.sub) {
            true => Role::Service,
            false => Role::Device,
        };
        Ok(Identity {
            role,
            user: Some(claims.sub),
            groups: claims.groups,
            expires: Some(claims.exp),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn jwt_auth(accounts: &[&str]) -> Auth {
        let settings = AuthSettings {
            mode: AuthMode::Jwt,
            jwt_secret: Some("k".into()),
            service_accounts: accounts.iter().map(|s| s.to_string()).collect(),
            ..AuthSettings::default()
        };
        Auth::new(&settings, "push").unwrap()
    }

    #[test]
    fn login_outcomes() {
        let auth = jwt_auth(&["ops"]);
        let ok = jwt::mint_hs256("k", "42", &["7".into()], now() + 60);
        let id = auth.login(Some("42"), Some(&ok)).unwrap();
        assert_eq!((id.role, id.user.as_deref()), (Role::Device, Some("42")));
        assert_eq!(auth.login(None, Some(&ok)).unwrap().groups, ["7"]);
        assert_eq!(
            auth.login(Some("43"), Some(&ok)),
            Err(Refusal::NotAuthorized)
        );
        assert_eq!(auth.login(Some("42"), None), Err(Refusal::BadCredentials));
        let bad = jwt::mint_hs256("other", "42", &[], now() + 60);
        assert_eq!(auth.login(None, Some(&bad)), Err(Refusal::BadCredentials));
        let old = jwt::mint_hs256("k", "42", &[], now() - 1);
        assert_eq!(auth.login(None, Some(&old)), Err(Refusal::NotAuthorized));
        let forever = jwt::mint_hs256("k", "42", &[], u64::MAX);
        assert_eq!(
            auth.login(None, Some(&forever)),
            Err(Refusal::BadCredentials),
            "over auth.jwt_max_ttl_secs"
        );
        let unbounded = Auth::new(
            &AuthSettings {
                mode: AuthMode::Jwt,
                jwt_secret: Some("k".into()),
                jwt_max_ttl_secs: 0,
                ..AuthSettings::default()
            },
            "push",
        )
        .unwrap();
        assert_eq!(
            unbounded.login(None, Some(&forever)).unwrap().expires,
            Some(u64::MAX)
        );
        let ops = jwt::mint_hs256("k", "ops", &[], now() + 60);
        assert_eq!(auth.login(None, Some(&ops)).unwrap().role, Role::Service);
    }
}
