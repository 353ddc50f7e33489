//! JSON Web Tokens for devices: verified with the configured key only (the
//! token's `alg` must match it, so an HS256 token can never pass against a
//! public key), `exp` required, no leeway; `aud` and `iss` checked when
//! configured, the lifetime bounded.
//!
//! Hand-written on `ring` rather than on a JWT crate: what it checks is
//! small and fixed (three algorithms, each bound to one configured key), and
//! a crate would bring its own key formats and a default leeway to undo.

use std::path::Path;

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use ring::{hmac, signature};
use serde_json::{json, Map, Value};

use super::AuthError;
use crate::push::Id;

/// Why a token was not accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JwtError {
    #[error("token is not a JWT: {0}")]
    Malformed(&'static str),
    #[error("token algorithm {0:?} is not the configured one")]
    Algorithm(String),
    #[error("token signature does not verify")]
    Signature,
    #[error("token expired")]
    Expired,
    #[error("token not valid yet")]
    NotYetValid,
    #[error("token is not for this audience")]
    Audience,
    #[error("token is not from the configured issuer")]
    Issuer,
    #[error("token lives longer than auth.jwt_max_ttl_secs")]
    TooLong,
}

/// The claims checked besides signature and time: `auth.jwt_audience`,
/// `auth.jwt_issuer`, `auth.jwt_max_ttl_secs` (0: no bound).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Policy {
    pub audience: Option<String>,
    pub issuer: Option<String>,
    pub max_ttl_secs: u64,
}

/// What a verified token says about its device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Claims {
    pub sub: String,
    pub groups: Vec<String>,
    /// Unix seconds.
    pub exp: u64,
}

enum Key {
    Hs256(hmac::Key),
    /// PKCS#1 RSAPublicKey DER.
    Rs256(Vec<u8>),
    /// Uncompressed P-256 point.
    Es256(Vec<u8>),
}

impl Key {
    fn alg(&self) -> &'static str {
        match self {
            Key::Hs256(_) => "HS256",
            Key::Rs256(_) => "RS256",
            Key::Es256(_) => "ES256",
        }
    }

    fn verify(&self, msg: &[u8], sig: &[u8]) -> bool {
        match self {
            Key::Hs256(k) => hmac::verify(k, msg, sig).is_ok(),
            Key::Rs256(der) => {
                signature::UnparsedPublicKey::new(&signature::RSA_PKCS1_2048_8192_SHA256, der)
                    .verify(msg, sig)
                    .is_ok()
            }
            Key::Es256(point) => {
                signature::UnparsedPublicKey::new(&signature::ECDSA_P256_SHA256_FIXED, point)
                    .verify(msg, sig)
                    .is_ok()
            }
        }
    }
}

/// The keys a token may be signed with (a secret, a public key, or both).
pub struct Verifier {
    keys: Vec<Key>,
    policy: Policy,
}

impl std::fmt::Debug for Verifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let algs: Vec<_> = self.keys.iter().map(Key::alg).collect();
        f.debug_struct("Verifier").field("algs", &algs).finish()
    }
}

impl Verifier {
    pub fn new(secret: Option<&str>, public_key: Option<&Path>) -> Result<Verifier, AuthError> {
        let mut keys = Vec::new();
        if let Some(s) = secret {
            if s.is_empty() {
                return Err(AuthError::Key("auth.jwt_secret is empty".into()));
            }
            keys.push(Key::Hs256(hmac::Key::new(hmac::HMAC_SHA256, s.as_bytes())));
        }
        if let Some(path) = public_key {
            let text = std::fs::read(path)
                .map_err(|e| AuthError::Key(format!("cannot read {}: {e}", path.display())))?;
            keys.push(
                public_key_from_pem(&text)
                    .map_err(|p| AuthError::Key(format!("{}: {p}", path.display())))?,
            );
        }
        Ok(Verifier {
            keys,
            policy: Policy::default(),
        })
    }

    /// Also checks `aud`, `iss` and the lifetime as `policy` says.
    pub fn with_policy(mut self, policy: Policy) -> Verifier {
        self.policy = policy;
        self
    }

    /// Checks signature, `exp`, `nbf`, `iat` against `now` (unix seconds),
    /// and the policy's `aud`, `iss` and lifetime. A time claim that is
    /// present must be a number.
    pub fn verify(&self, token: &str, now: u64) -> Result<Claims, JwtError> {
        let mut parts = token.split('.');
        let (Some(h), Some(p), Some(s), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(JwtError::Malformed("not three dot-separated parts"));
        };
        let header = decode_json(h)?;
        let alg = header.get("alg").and_then(Value::as_str).unwrap_or("");
        let key = self
            .keys
            .iter()
            .find(|k| k.alg() == alg)
            .ok_or_else(|| JwtError::Algorithm(alg.into()))?;
        let sig = URL_SAFE_NO_PAD
            .decode(s)
            .map_err(|_| JwtError::Malformed("signature is not base64url"))?;
        let signed = &token[..h.len() + 1 + p.len()];
        if !key.verify(signed.as_bytes(), &sig) {
            return Err(JwtError::Signature);
        }
        let claims = decode_json(p)?;
        let exp = claims
            .get("exp")
            .and_then(number)
            .ok_or(JwtError::Malformed("no numeric exp claim"))?;
        if now >= exp {
            return Err(JwtError::Expired);
        }
        let time = |name: &str, bad: &'static str| match claims.get(name) {
            None => Ok(None),
            Some(v) => number(v).map(Some).ok_or(JwtError::Malformed(bad)),
        };
        if time("nbf", "nbf is not a number")?.is_some_and(|nbf| now < nbf) {
            return Err(JwtError::NotYetValid);
        }
        let iat = time("iat", "iat is not a number")?;
        let max = self.policy.max_ttl_secs;
        if max > 0 && (exp - now > max || iat.is_some_and(|iat| exp.saturating_sub(iat) > max)) {
            return Err(JwtError::TooLong);
        }
        if let Some(want) = &self.policy.issuer {
            if claims.get("iss").and_then(Value::as_str) != Some(want.as_str()) {
                return Err(JwtError::Issuer);
            }
        }
        if let Some(want) = &self.policy.audience {
            let ok = match claims.get("aud") {
                Some(Value::String(a)) => a == want,
                Some(Value::Array(auds)) => auds.iter().any(|a| a.as_str() == Some(want)),
                _ => false,
            };
            if !ok {
                return Err(JwtError::Audience);
            }
        }
        let sub = claims
            .get("sub")
            .and_then(id)
            .ok_or(JwtError::Malformed("no sub claim"))?;
        let groups = match claims.get("groups") {
            None | Some(Value::Null) => Vec::new(),
            Some(Value::Array(gs)) => gs
                .iter()
                .map(id)
                .collect::<Option<_>>()
                .ok_or(JwtError::Malformed("groups is not a list of ids"))?,
            Some(_) => return Err(JwtError::Malformed("groups is not a list")),
        };
        Ok(Claims { sub, groups, exp })
    }
}

/// An HS256 token for `sub` (the `pushbridge token` command, tests).
pub fn mint_hs256(secret: &str, sub: &str, groups: &[String], exp: u64) -> String {
    let mut claims = Map::new();
    claims.insert("sub".into(), json!(sub));
    if !groups.is_empty() {
        claims.insert("groups".into(), json!(groups));
    }
    claims.insert("exp".into(), json!(exp));
    mint_hs256_claims(secret, claims)
}

/// A device token this server accepts under `auth` (`pushbridge token`):
/// signed with `auth.jwt_secret`, with `iat`, and `aud`/`iss` when set; a
/// lifetime over `auth.jwt_max_ttl_secs` is refused here, as the server would.
pub fn device_token(
    auth: &crate::settings::AuthSettings,
    sub: &str,
    groups: &[String],
    ttl: u64,
) -> Result<String, AuthError> {
    let secret = auth
        .jwt_secret
        .as_deref()
        .ok_or_else(|| AuthError::Token("auth.jwt_secret is not set".into()))?;
    if auth.jwt_max_ttl_secs > 0 && ttl > auth.jwt_max_ttl_secs {
        return Err(AuthError::Token(format!(
            "--ttl {ttl} is over auth.jwt_max_ttl_secs = {}: the server would refuse the token",
            auth.jwt_max_ttl_secs
        )));
    }
    let now = crate::utc::now();
    let mut claims = Map::new();
    claims.insert("sub".into(), json!(sub));
    if !groups.is_empty() {
        claims.insert("groups".into(), json!(groups));
    }
    claims.insert("iat".into(), json!(now));
    claims.insert("exp".into(), json!(now + ttl));
    if let Some(aud) = &auth.jwt_audience {
        claims.insert("aud".into(), json!(aud));
    }
    if let Some(iss) = &auth.jwt_issuer {
        claims.insert("iss".into(), json!(iss));
    }
    Ok(mint_hs256_claims(secret, claims))
}

/// An HS256 token with exactly these claims.
pub fn mint_hs256_claims(secret: &str, claims: Map<String, Value>) -> String {
    let header = URL_SAFE_NO_PAD.encode(br#"{"alg":"HS256","typ":"JWT"}"#);
    let payload = URL_SAFE_NO_PAD.encode(Value::Object(claims).to_string());
    let signed = format!("{header}.{payload}");
    let key = hmac::Key::new(hmac::HMAC_SHA256, secret.as_bytes());
    let sig = URL_SAFE_NO_PAD.encode(hmac::sign(&key, signed.as_bytes()));
    format!("{signed}.{sig}")
}

fn decode_json(part: &str) -> Result<Map<String, Value>, JwtError> {
    let bytes = URL_SAFE_NO_PAD
        .decode(part)
        .map_err(|_| JwtError::Malformed("part is not base64url"))?;
    match serde_json::from_slice(&bytes) {
        Ok(Value::Object(m)) => Ok(m),
        _ => Err(JwtError::Malformed("part is not a JSON object")),
    }
}

fn number(v: &Value) -> Option<u64> {
    v.as_u64()
        .or_else(|| v.as_f64().filter(|f| *f >= 0.0).map(|f| f as u64))
}

/// User and group ids: strings or integers, valid as [`Id`]s.
fn id(v: &Value) -> Option<String> {
    let s = match v {
        Value::String(s) => s.clone(),
        Value::Number(n) if n.is_u64() || n.is_i64() => n.to_string(),
        _ => return None,
    };
    Id::parse(&s).map(|_| s)
}

const RSA_OID: &str = "1.2.840.113549.1.1.1";
const EC_OID: &str = "1.2.840.10045.2.1";

/// An RSA or P-256 public key: `PUBLIC KEY` (SPKI) or `RSA PUBLIC KEY` (PKCS#1).
fn public_key_from_pem(text: &[u8]) -> Result<Key, String> {
    use x509_parser::prelude::FromDer;
    let (_, pem) =
        x509_parser::pem::parse_x509_pem(text).map_err(|e| format!("not a PEM file: {e}"))?;
    match pem.label.as_str() {
        "RSA PUBLIC KEY" => Ok(Key::Rs256(pem.contents)),
        "PUBLIC KEY" => {
            let (_, spki) = x509_parser::x509::SubjectPublicKeyInfo::from_der(&pem.contents)
                .map_err(|e| format!("not a public key: {e}"))?;
            let bits = spki.subject_public_key.data.to_vec();
            match spki.algorithm.algorithm.to_id_string().as_str() {
                RSA_OID => Ok(Key::Rs256(bits)),
                EC_OID if bits.len() == 65 && bits[0] == 4 => Ok(Key::Es256(bits)),
                EC_OID => Err("EC key is not an uncompressed P-256 point".into()),
                other => Err(format!("unsupported key algorithm {other}")),
            }
        }
        other => Err(format!("expected a PUBLIC KEY, found {other}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hs(secret: &str) -> Verifier {
        Verifier::new(Some(secret), None).unwrap()
    }

    #[test]
    fn minted_token_verifies() {
        let t = mint_hs256("s3cret", "42", &["7".into(), "9".into()], 2000);
        let c = hs("s3cret").verify(&t, 1000).unwrap();
        assert_eq!(c.sub, "42");
        assert_eq!(c.groups, ["7", "9"]);
        assert_eq!(c.exp, 2000);
    }

    #[test]
    fn refusals() {
        let t = mint_hs256("s3cret", "42", &[], 2000);
        assert_eq!(hs("other").verify(&t, 1000), Err(JwtError::Signature));
        assert_eq!(hs("s3cret").verify(&t, 2000), Err(JwtError::Expired));
        assert!(matches!(
            hs("s3cret").verify("abc", 0),
            Err(JwtError::Malformed(_))
        ));
        let (head, rest) = t.split_once('.').unwrap();
        assert!(!head.is_empty());
        let none_alg = format!("{}.{rest}", URL_SAFE_NO_PAD.encode(br#"{"alg":"none"}"#));
        assert_eq!(
            hs("s3cret").verify(&none_alg, 0),
            Err(JwtError::Algorithm("none".into()))
        );
        // A tampered payload (longer exp) breaks the signature.
        let (signed, sig) = t.rsplit_once('.').unwrap();
        let forged_payload = URL_SAFE_NO_PAD.encode(br#"{"sub":"43","exp":9999999999}"#);
        let forged = format!(
            "{}.{forged_payload}.{sig}",
            signed.split('.').next().unwrap()
        );
        assert_eq!(hs("s3cret").verify(&forged, 0), Err(JwtError::Signature));
    }

    /// Issue 14 point 12.
    #[test]
    fn audience_issuer_lifetime_and_time_claims() {
        let sign = |claims: Value| {
            let Value::Object(m) = claims else { panic!() };
            mint_hs256_claims("s3cret", m)
        };
        let now = 1_000_000;
        let strict = hs("s3cret").with_policy(Policy {
            audience: Some("pushbridge".into()),
            issuer: Some("https://auth.example".into()),
            max_ttl_secs: 3600,
        });
        let good = json!({"sub": "42", "exp": now + 60, "iat": now,
                          "aud": "pushbridge", "iss": "https://auth.example"});
        assert_eq!(strict.verify(&sign(good.clone()), now).unwrap().sub, "42");
        let with = |key: &str, v: Value| {
            let mut c = good.clone();
            match v {
                Value::Null => c.as_object_mut().unwrap().remove(key),
                v => c.as_object_mut().unwrap().insert(key.into(), v),
            };
            sign(c)
        };
        let aud_list = with("aud", json!(["other", "pushbridge"]));
        assert!(strict.verify(&aud_list, now).is_ok());
        for (key, v, want) in [
            ("aud", json!("other-service"), JwtError::Audience),
            ("aud", json!(["other-service"]), JwtError::Audience),
            ("aud", Value::Null, JwtError::Audience),
            ("iss", json!("https://evil.example"), JwtError::Issuer),
            ("iss", Value::Null, JwtError::Issuer),
            ("exp", json!(1u64 << 62), JwtError::TooLong),
            ("exp", json!(now + 3601), JwtError::TooLong),
            ("iat", json!(now - 7200), JwtError::TooLong),
            (
                "nbf",
                json!("tomorrow"),
                JwtError::Malformed("nbf is not a number"),
            ),
            (
                "iat",
                json!("yesterday"),
                JwtError::Malformed("iat is not a number"),
            ),
        ] {
            assert_eq!(
                strict.verify(&with(key, v.clone()), now),
                Err(want),
                "{key}: {v}"
            );
        }
        // Without a policy: no aud/iss needed, no bound on the lifetime, but
        // a non-numeric nbf is still refused.
        let lax = hs("s3cret");
        assert!(lax
            .verify(&mint_hs256("s3cret", "1", &[], 1 << 62), now)
            .is_ok());
        assert_eq!(
            lax.verify(&sign(json!({"sub": "1", "exp": now + 1, "nbf": "x"})), now),
            Err(JwtError::Malformed("nbf is not a number"))
        );
    }

    #[test]
    fn es256_token_verifies_against_the_public_key() {
        use p256::ecdsa::signature::Signer;
        use p256::pkcs8::DecodePrivateKey;
        let pair = rcgen::KeyPair::generate().unwrap();
        let sk = p256::ecdsa::SigningKey::from_pkcs8_pem(&pair.serialize_pem()).unwrap();
        let pem = pair.public_key_pem();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("jwt.pub");
        std::fs::write(&path, pem).unwrap();
        let v = Verifier::new(None, Some(&path)).unwrap();
        let h = URL_SAFE_NO_PAD.encode(br#"{"alg":"ES256"}"#);
        let p = URL_SAFE_NO_PAD.encode(br#"{"sub":7,"exp":50}"#);
        let signed = format!("{h}.{p}");
        let sig: p256::ecdsa::Signature = sk.sign(signed.as_bytes());
        let token = format!("{signed}.{}", URL_SAFE_NO_PAD.encode(sig.to_bytes()));
        assert_eq!(v.verify(&token, 10).unwrap().sub, "7");
        // The HS256 token signed with the public key's bytes is refused: alg must match a key.
        let forged = mint_hs256("whatever", "7", &[], 50);
        assert_eq!(
            v.verify(&forged, 10),
            Err(JwtError::Algorithm("HS256".into()))
        );
    }

    #[test]
    fn rs256_token_verifies_against_the_public_key() {
        let dir = tempfile::tempdir().unwrap();
        let path = |name: &str| dir.path().join(name);
        let openssl = |args: &[&str]| {
            let out = std::process::Command::new("openssl")
                .args(args)
                .current_dir(dir.path())
                .output()
                .expect("openssl (scripts/test.sh installs it)");
            assert!(out.status.success(), "openssl {args:?}: {out:?}");
        };
        openssl(&[
            "genpkey",
            "-algorithm",
            "RSA",
            "-pkeyopt",
            "rsa_keygen_bits:2048",
            "-out",
            "k.pem",
        ]);
        openssl(&["pkey", "-in", "k.pem", "-pubout", "-out", "k.pub"]);
        let h = URL_SAFE_NO_PAD.encode(br#"{"alg":"RS256","typ":"JWT"}"#);
        let p = URL_SAFE_NO_PAD.encode(br#"{"sub":"42","groups":[7],"exp":50}"#);
        let signed = format!("{h}.{p}");
        std::fs::write(path("in"), &signed).unwrap();
        openssl(&["dgst", "-sha256", "-sign", "k.pem", "-out", "sig", "in"]);
        let sig = std::fs::read(path("sig")).unwrap();
        let token = format!("{signed}.{}", URL_SAFE_NO_PAD.encode(&sig));
        let v = Verifier::new(None, Some(&path("k.pub"))).unwrap();
        let claims = v.verify(&token, 10).unwrap();
        assert_eq!(
            (claims.sub.as_str(), claims.groups),
            ("42", vec!["7".to_string()])
        );
        let mut bad = sig.clone();
        bad[0] ^= 1;
        let forged = format!("{signed}.{}", URL_SAFE_NO_PAD.encode(&bad));
        assert_eq!(v.verify(&forged, 10), Err(JwtError::Signature));
    }
}
