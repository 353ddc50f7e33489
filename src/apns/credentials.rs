//! config.json and the files it names: client certificates (PEM or
//! PKCS#12) per environment, or one `.p8` key for token auth.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::crypto::CryptoProvider;
use rustls::sign::CertifiedKey;
use rustls_pki_types::{
    CertificateDer, PrivateKeyDer, PrivatePkcs1KeyDer, PrivatePkcs8KeyDer, PrivateSec1KeyDer,
};
use serde::Deserialize;

use super::jwt::TokenSigner;
use super::{legacy, pem, ApnsError};
use crate::router::Environment;

/// One app's entry as written in config.json.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawEntry {
    develop: Option<PathBuf>,
    produce: Option<PathBuf>,
    password: Option<String>,
    key: Option<PathBuf>,
    key_id: Option<String>,
    team_id: Option<String>,
}

/// How an app authenticates, with paths resolved against config.json's directory.
#[derive(Debug, Clone)]
pub(crate) enum AppConfig {
    Certificate {
        develop: Option<PathBuf>,
        produce: Option<PathBuf>,
        password: Option<String>,
    },
    Token {
        key: PathBuf,
        key_id: String,
        team_id: String,
    },
}

impl AppConfig {
    /// The certificate file for `env`, if this is certificate auth.
    pub fn cert_path(&self, env: Environment) -> Option<&Path> {
        match (self, env) {
            (AppConfig::Certificate { develop, .. }, Environment::Sandbox) => develop.as_deref(),
            (AppConfig::Certificate { produce, .. }, Environment::Production) => produce.as_deref(),
            (AppConfig::Token { .. }, _) => None,
        }
    }

    /// Every file the entry names.
    pub fn files(&self) -> Vec<&Path> {
        match self {
            AppConfig::Certificate {
                develop, produce, ..
            } => develop
                .iter()
                .chain(produce)
                .map(PathBuf::as_path)
                .collect(),
            AppConfig::Token { key, .. } => vec![key.as_path()],
        }
    }

    pub fn password(&self) -> Option<&str> {
        match self {
            AppConfig::Certificate { password, .. } => password.as_deref(),
            AppConfig::Token { .. } => None,
        }
    }
}

/// config.json: app ident → its entry, or why the entry is unusable.
pub(crate) type Apps = BTreeMap<String, Result<AppConfig, ApnsError>>;

/// Reads config.json; `Ok(None)` when it does not exist.
pub(crate) fn read_config(path: &Path) -> Result<Option<Apps>, ApnsError> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(ApnsError::file(path, format!("cannot read: {e}"))),
    };
    let raw: BTreeMap<String, serde_json::Value> = serde_json::from_str(&text)
        .map_err(|e| ApnsError::file(path, format!("not a JSON object of apps: {e}")))?;
    let dir = path.parent().unwrap_or(Path::new("."));
    let apps = raw
        .into_iter()
        .map(|(app, value)| {
            let entry = parse_entry(path, dir, &app, value);
            (app, entry)
        })
        .collect();
    Ok(Some(apps))
}

fn parse_entry(
    config: &Path,
    dir: &Path,
    app: &str,
    value: serde_json::Value,
) -> Result<AppConfig, ApnsError> {
    let bad = |problem: String| ApnsError::App {
        path: config.display().to_string(),
        app: app.to_owned(),
        problem,
    };
    let e: RawEntry = serde_json::from_value(value).map_err(|e| bad(e.to_string()))?;
    let resolve = |p: PathBuf| dir.join(p);
    match (e.key, e.key_id, e.team_id) {
        (Some(key), Some(key_id), Some(team_id)) => {
            if e.develop.is_some() || e.produce.is_some() {
                return Err(bad("has both a key and certificates; use one".into()));
            }
            Ok(AppConfig::Token {
                key: resolve(key),
                key_id,
                team_id,
            })
        }
        (None, None, None) if e.develop.is_some() || e.produce.is_some() => {
            Ok(AppConfig::Certificate {
                develop: e.develop.map(resolve),
                produce: e.produce.map(resolve),
                password: e.password,
            })
        }
        (None, None, None) => Err(bad(
            "no credentials: needs develop and/or produce, or key, key_id and team_id".into(),
        )),
        _ => Err(bad("token auth needs all of key, key_id and team_id".into())),
    }
}

/// A client certificate with its key, checked to match and not expired.
#[derive(Debug)]
pub(crate) struct Identity {
    pub chain: Vec<CertificateDer<'static>>,
    pub key: PrivateKeyDer<'static>,
    pub subject: String,
    pub not_after: String,
    /// `not_after` as Unix seconds.
    pub expires_at: i64,
    /// Whole days until the certificate expires.
    pub days_left: i64,
}

/// Loads a `.p12`/`.pfx` (by extension) or PEM certificate and key.
pub(crate) fn load_identity(path: &Path, password: Option<&str>) -> Result<Identity, ApnsError> {
    let bytes =
        std::fs::read(path).map_err(|e| ApnsError::file(path, format!("cannot read: {e}")))?;
    let ext = path
        .extension()
        .and_then(|e| e.to_str())
        .map(str::to_ascii_lowercase);
    let (chain, key) = match ext.as_deref() {
        Some("p12" | "pfx") => read_p12(&bytes, password),
        _ => read_pem(&bytes, password),
    }
    .map_err(|problem| ApnsError::file(path, problem))?;
    check_identity(chain, key).map_err(|problem| ApnsError::file(path, problem))
}

fn read_p12(
    bytes: &[u8],
    password: Option<&str>,
) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), String> {
    let store = p12_keystore::KeyStore::from_pkcs12(bytes, password.unwrap_or("")).map_err(
        |e| match e {
            p12_keystore::error::Error::MacError(_) => "wrong password for PKCS#12 file".to_owned(),
            e => format!("unreadable PKCS#12 file (or wrong password): {e}"),
        },
    )?;
    let (_, chain) = store
        .private_key_chain()
        .ok_or("PKCS#12 file has no private key with a certificate")?;
    let certs = chain
        .chain()
        .iter()
        .map(|c| CertificateDer::from(c.as_der().to_vec()))
        .collect();
    let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(chain.key().to_vec()));
    Ok((certs, key))
}

fn read_pem(
    bytes: &[u8],
    password: Option<&str>,
) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), String> {
    let text = std::str::from_utf8(bytes)
        .map_err(|_| "not a PEM file (not text); .p12/.pfx files need that extension")?;
    let mut certs = Vec::new();
    let mut key = None;
    for block in pem::blocks(text)? {
        let found = match (block.label.as_str(), &block.legacy_encrypted) {
            ("CERTIFICATE", _) => {
                certs.push(CertificateDer::from(block.der));
                continue;
            }
            ("RSA PRIVATE KEY" | "EC PRIVATE KEY", Some(dek_info)) => {
                let password = password
                    .ok_or("the private key is encrypted but config.json gives no password")?;
                let der = legacy::decrypt(dek_info, password, &block.der)?;
                match block.label.as_str() {
                    "RSA PRIVATE KEY" => PrivateKeyDer::Pkcs1(PrivatePkcs1KeyDer::from(der)),
                    _ => PrivateKeyDer::Sec1(PrivateSec1KeyDer::from(der)),
                }
            }
            ("PRIVATE KEY", _) => PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(block.der)),
            ("RSA PRIVATE KEY", None) => PrivateKeyDer::Pkcs1(PrivatePkcs1KeyDer::from(block.der)),
            ("EC PRIVATE KEY", None) => PrivateKeyDer::Sec1(PrivateSec1KeyDer::from(block.der)),
            ("ENCRYPTED PRIVATE KEY", _) => decrypt_pkcs8(&block.der, password)?,
            _ => continue,
        };
        if key.replace(found).is_some() {
            return Err("more than one private key".into());
        }
    }
    if certs.is_empty() {
        return Err("no CERTIFICATE in PEM file".into());
    }
    let key = key.ok_or("no PRIVATE KEY in PEM file")?;
    Ok((certs, key))
}

fn decrypt_pkcs8(der: &[u8], password: Option<&str>) -> Result<PrivateKeyDer<'static>, String> {
    let password =
        password.ok_or("the private key is encrypted but config.json gives no password")?;
    let info = pkcs8::EncryptedPrivateKeyInfo::try_from(der)
        .map_err(|e| format!("unreadable ENCRYPTED PRIVATE KEY: {e}"))?;
    let doc = info
        .decrypt(password)
        .map_err(|_| "wrong password for the encrypted private key".to_owned())?;
    Ok(PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(
        doc.as_bytes().to_vec(),
    )))
}

/// Puts the certificate matching the key first and rejects a key that
/// matches none, an unreadable key and an expired certificate.
fn check_identity(
    mut chain: Vec<CertificateDer<'static>>,
    key: PrivateKeyDer<'static>,
) -> Result<Identity, String> {
    let provider = rustls::crypto::ring::default_provider();
    let signer = provider
        .key_provider
        .load_private_key(key.clone_key())
        .map_err(|e| format!("unreadable private key (or wrong password): {e}"))?;
    if signer.public_key().is_some() {
        let leaf = chain
            .iter()
            .position(|c| {
                CertifiedKey::new(vec![c.clone()], Arc::clone(&signer))
                    .keys_match()
                    .is_ok()
            })
            .ok_or("the private key does not match the certificate")?;
        chain.swap(0, leaf);
    }
    let (subject, not_after, expires_at) = describe(&chain[0])?;
    let seconds_left = expires_at - x509_parser::time::ASN1Time::now().timestamp();
    if seconds_left < 0 {
        return Err(format!("certificate {subject} expired on {not_after}"));
    }
    Ok(Identity {
        chain,
        key,
        subject,
        not_after,
        expires_at,
        days_left: seconds_left / 86400,
    })
}

/// Subject, expiry as text and as Unix seconds.
fn describe(cert: &CertificateDer<'_>) -> Result<(String, String, i64), String> {
    let (_, parsed) = x509_parser::parse_x509_certificate(cert.as_ref())
        .map_err(|e| format!("unreadable certificate: {e}"))?;
    let not_after = parsed.validity().not_after;
    Ok((
        parsed.subject().to_string(),
        not_after.to_string(),
        not_after.timestamp(),
    ))
}

/// Loads the `.p8` key for token auth.
pub(crate) fn load_token(
    path: &Path,
    key_id: &str,
    team_id: &str,
) -> Result<TokenSigner, ApnsError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| ApnsError::file(path, format!("cannot read: {e}")))?;
    TokenSigner::from_pem(&text, key_id, team_id).map_err(|problem| ApnsError::file(path, problem))
}

/// The crypto provider every APNs TLS config uses.
pub(crate) fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn testdata(name: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("src/apns/testdata")
            .join(name)
    }

    /// Real-world shapes made by `openssl` 3: an RSA key, PKCS#12 with
    /// AES (default) and RC2/3DES (`-legacy`), legacy-encrypted PEM keys.
    #[test]
    fn openssl_made_files_load() {
        for (file, password) in [
            ("rsa.pem", None),
            ("rsa.p12", Some("secret")),
            ("rsa-legacy.p12", Some("secret")),
            ("rsa-legacy-enc.pem", Some("secret")),
            ("rsa-legacy-des.pem", Some("secret")),
        ] {
            let id =
                load_identity(&testdata(file), password).unwrap_or_else(|e| panic!("{file}: {e}"));
            assert!(
                id.subject.contains("com.example.rsa"),
                "{file}: {}",
                id.subject
            );
        }
    }

    #[test]
    fn wrong_or_missing_password_is_named() {
        for file in ["rsa.p12", "rsa-legacy-enc.pem", "rsa-legacy-des.pem"] {
            let err = load_identity(&testdata(file), Some("wrong"))
                .unwrap_err()
                .to_string();
            assert!(err.contains(file), "{err}");
            assert!(err.contains("wrong password"), "{err}");
        }
        let err = load_identity(&testdata("rsa-legacy-enc.pem"), None)
            .unwrap_err()
            .to_string();
        assert!(err.contains("gives no password"), "{err}");
    }

    #[test]
    fn config_entries() {
        let dir = Path::new("/etc/pb");
        let cfg = Path::new("/etc/pb/config.json");
        let ok = |v: serde_json::Value| parse_entry(cfg, dir, "a", v);
        match ok(serde_json::json!({"develop": "d.pem", "password": "p"})).unwrap() {
            c @ AppConfig::Certificate { .. } => {
                assert_eq!(
                    c.cert_path(Environment::Sandbox),
                    Some(Path::new("/etc/pb/d.pem"))
                );
                assert_eq!(c.cert_path(Environment::Production), None);
                assert_eq!(c.password(), Some("p"));
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            ok(serde_json::json!({"key": "k.p8", "key_id": "K", "team_id": "T"})).unwrap(),
            AppConfig::Token { .. }
        ));
        for bad in [
            serde_json::json!({}),
            serde_json::json!({"key": "k.p8"}),
            serde_json::json!({"develop": "d.pem", "key": "k", "key_id": "K", "team_id": "T"}),
            serde_json::json!({"develop": "d.pem", "typo": 1}),
        ] {
            let err = ok(bad.clone()).unwrap_err().to_string();
            assert!(
                err.starts_with("/etc/pb/config.json: app a: "),
                "{bad}: {err}"
            );
        }
    }
}
