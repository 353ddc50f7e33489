//! Provider tokens for token auth: an ES256 JWT Apple accepts for an hour
//! and throttles if minted too often, so one is reused for 50 minutes.

use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use http::HeaderValue;
use p256::ecdsa::signature::Signer;
use p256::ecdsa::{Signature, SigningKey};
use p256::pkcs8::DecodePrivateKey;
use serde_json::json;

/// How long a minted token is reused.
pub(crate) const REUSE: Duration = Duration::from_secs(50 * 60);

/// Signs and caches the provider token of one app.
pub(crate) struct TokenSigner {
    key_id: String,
    team_id: String,
    key: SigningKey,
    cached: Mutex<Option<(Bearer, Instant)>>,
}

impl std::fmt::Debug for TokenSigner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TokenSigner")
            .field("key_id", &self.key_id)
            .field("team_id", &self.team_id)
            .finish_non_exhaustive()
    }
}

impl TokenSigner {
    /// From the text of an AuthKey_*.p8 (a PKCS#8 P-256 key).
    pub fn from_pem(pem: &str, key_id: &str, team_id: &str) -> Result<Self, String> {
        let key = SigningKey::from_pkcs8_pem(pem)
            .map_err(|e| format!("not a PKCS#8 P-256 (.p8) private key: {e}"))?;
        Ok(TokenSigner {
            key_id: key_id.to_owned(),
            team_id: team_id.to_owned(),
            key,
            cached: Mutex::new(None),
        })
    }

    /// The current token, minting a new one when the cached one is old.
    pub fn token(&self) -> Bearer {
        let mut cached = self.cached.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((token, at)) = cached.as_ref() {
            if at.elapsed() < REUSE {
                return token.clone();
            }
        }
        let token = Bearer::new(&self.mint(unix_now()));
        *cached = Some((token.clone(), Instant::now()));
        token
    }

    /// Apple refused `rejected`: mints a new token unless the current one is
    /// younger than `min_age` (Apple throttles frequent updates) or another
    /// request has already replaced it.
    pub fn renew(&self, rejected: &Bearer, min_age: Duration) -> Renewal {
        let mut cached = self.cached.lock().unwrap_or_else(|p| p.into_inner());
        match cached.as_ref() {
            Some((token, _)) if token != rejected => return Renewal::AlreadyNew,
            Some((_, at)) if at.elapsed() < min_age => return Renewal::TooSoon,
            _ => {}
        }
        *cached = Some((Bearer::new(&self.mint(unix_now())), Instant::now()));
        Renewal::Minted
    }

    fn mint(&self, iat: u64) -> String {
        let header = json!({"alg": "ES256", "kid": self.key_id});
        let claims = json!({"iss": self.team_id, "iat": iat});
        let signing_input = format!(
            "{}.{}",
            URL_SAFE_NO_PAD.encode(header.to_string()),
            URL_SAFE_NO_PAD.encode(claims.to_string())
        );
        let sig: Signature = self.key.sign(signing_input.as_bytes());
        format!("{signing_input}.{}", URL_SAFE_NO_PAD.encode(sig.to_bytes()))
    }
}

/// What `renew` did.
/// A provider token as the `authorization` header carries it, made once
/// per token rather than once per request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Bearer(HeaderValue);

impl Bearer {
    fn new(jwt: &str) -> Bearer {
        // A JWT is base64url and dots: always a valid header value.
        let mut value = HeaderValue::try_from(format!("bearer {jwt}"))
            .unwrap_or_else(|_| HeaderValue::from_static("bearer"));
        value.set_sensitive(true);
        Bearer(value)
    }

    pub fn header(&self) -> HeaderValue {
        self.0.clone()
    }

    /// The JWT itself.
    #[cfg(test)]
    pub fn jwt(&self) -> &str {
        let value = self.0.to_str().unwrap_or_default();
        value.strip_prefix("bearer ").unwrap_or(value)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Renewal {
    Minted,
    /// Another request renewed it; retry with the current token.
    AlreadyNew,
    /// The refused token is too young to replace.
    TooSoon,
}

pub(crate) fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use p256::ecdsa::signature::Verifier;
    use p256::ecdsa::VerifyingKey;
    use p256::pkcs8::{EncodePrivateKey, LineEnding};

    fn signer() -> TokenSigner {
        let key = SigningKey::from_slice(&[7u8; 32]).unwrap();
        let pem = key.to_pkcs8_pem(LineEnding::LF).unwrap();
        TokenSigner::from_pem(&pem, "ABC123", "TEAM456").unwrap()
    }

    #[test]
    fn token_verifies_and_names_kid_and_iss() {
        let s = signer();
        let token = s.token();
        let parts: Vec<&str> = token.jwt().split('.').collect();
        assert_eq!(parts.len(), 3);
        let header: serde_json::Value =
            serde_json::from_slice(&URL_SAFE_NO_PAD.decode(parts[0]).unwrap()).unwrap();
        let claims: serde_json::Value =
            serde_json::from_slice(&URL_SAFE_NO_PAD.decode(parts[1]).unwrap()).unwrap();
        assert_eq!(header, json!({"alg": "ES256", "kid": "ABC123"}));
        assert_eq!(claims["iss"], "TEAM456");
        assert!(claims["iat"].as_u64().unwrap() > 1_700_000_000);
        let sig = Signature::from_slice(&URL_SAFE_NO_PAD.decode(parts[2]).unwrap()).unwrap();
        let vk = VerifyingKey::from(&s.key);
        vk.verify(format!("{}.{}", parts[0], parts[1]).as_bytes(), &sig)
            .unwrap();
    }

    #[test]
    fn token_is_reused_until_renewed() {
        let s = signer();
        let a = s.token();
        assert_eq!(s.token(), a);
        let old = Bearer::new("old");
        *s.cached.lock().unwrap() = Some((old.clone(), Instant::now()));
        assert_eq!(s.token().jwt(), "old");
        assert_eq!(s.renew(&old, Duration::ZERO), Renewal::Minted);
        assert_ne!(s.token(), old);
        assert_eq!(s.token().header(), format!("bearer {}", s.token().jwt()));
    }

    #[test]
    fn renewal_waits_twenty_minutes_and_happens_once() {
        let twenty = Duration::from_secs(20 * 60);
        let s = signer();
        let young = Bearer::new("young");
        *s.cached.lock().unwrap() = Some((young.clone(), Instant::now()));
        assert_eq!(s.renew(&young, twenty), Renewal::TooSoon);
        assert_eq!(s.token().jwt(), "young");
        let old = Instant::now().checked_sub(twenty + Duration::from_secs(1));
        if let Some(old) = old {
            let aged = Bearer::new("aged");
            *s.cached.lock().unwrap() = Some((aged.clone(), old));
            assert_eq!(s.renew(&aged, twenty), Renewal::Minted);
            assert_eq!(s.renew(&aged, twenty), Renewal::AlreadyNew);
        }
    }

    #[test]
    fn not_a_key() {
        assert!(TokenSigner::from_pem("nope", "a", "b").is_err());
    }
}
