//! TLS for the connections to Apple: trust, ALPN `h2`, client certificates.

use std::path::Path;
use std::sync::Arc;

use rustls::{ClientConfig, RootCertStore};

use super::credentials::{self, AppConfig, Identity};
use super::{pem, ApnsError};
use crate::router::Environment;

/// A client TLS config and, for certificate auth, the certificate's expiry
/// (Unix seconds).
pub(crate) type AppTls = (Arc<ClientConfig>, Option<i64>);

/// The client TLS config for an app in `env` and, for certificate auth,
/// when the certificate expires (Unix seconds); `None` when a certificate
/// app has no certificate for it. Token apps need no client certificate.
pub(crate) fn for_app(
    config: &AppConfig,
    env: Environment,
    roots: &Arc<RootCertStore>,
) -> Result<Option<AppTls>, ApnsError> {
    match config {
        AppConfig::Token { .. } => Ok(Some((client_config(roots, None)?, None))),
        AppConfig::Certificate { .. } => match config.cert_path(env) {
            None => Ok(None),
            Some(path) => {
                let identity = credentials::load_identity(path, config.password())?;
                let expires = identity.expires_at;
                client_config(roots, Some(identity))
                    .map(|c| Some((c, Some(expires))))
                    .map_err(|e| ApnsError::file(path, e.to_string()))
            }
        },
    }
}

fn client_config(
    roots: &Arc<RootCertStore>,
    identity: Option<Identity>,
) -> Result<Arc<ClientConfig>, ApnsError> {
    let tls_err = |e: rustls::Error| ApnsError::Setting {
        key: "tls",
        problem: e.to_string(),
    };
    let builder = ClientConfig::builder_with_provider(credentials::provider())
        .with_safe_default_protocol_versions()
        .map_err(tls_err)?
        .with_root_certificates(Arc::clone(roots));
    let mut config = match identity {
        Some(id) => builder
            .with_client_auth_cert(id.chain, id.key)
            .map_err(tls_err)?,
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(config))
}

/// The public web roots plus `ca_file`, so tests (or a proxy) can be trusted.
pub(crate) fn root_store(ca_file: Option<&Path>) -> Result<RootCertStore, ApnsError> {
    let mut roots = RootCertStore::from_iter(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    let Some(path) = ca_file else {
        return Ok(roots);
    };
    let text = std::fs::read_to_string(path)
        .map_err(|e| ApnsError::file(path, format!("cannot read CA file: {e}")))?;
    let blocks = pem::blocks(&text).map_err(|p| ApnsError::file(path, p))?;
    let mut added = 0;
    for block in blocks.into_iter().filter(|b| b.label == "CERTIFICATE") {
        roots
            .add(block.der.into())
            .map_err(|e| ApnsError::file(path, format!("unusable CA certificate: {e}")))?;
        added += 1;
    }
    if added == 0 {
        return Err(ApnsError::file(path, "no CERTIFICATE in CA file"));
    }
    Ok(roots)
}
