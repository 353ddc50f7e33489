//! TLS as a client (an external MQTT broker, the receipts webhook): which
//! CAs to trust, read from a PEM file with problems that name the file, and
//! one rustls configuration (ring, TLS 1.2 and 1.3).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::{ClientConfig, RootCertStore};

/// A CA file that cannot be used.
#[derive(Debug, thiserror::Error)]
#[error("{}: {problem}", path.display())]
pub struct CaFileError {
    pub path: PathBuf,
    pub problem: String,
}

/// The public web roots.
pub fn web_roots() -> RootCertStore {
    RootCertStore::from_iter(webpki_roots::TLS_SERVER_ROOTS.iter().cloned())
}

/// Adds every certificate of the PEM file at `path` to `roots`; at least one.
pub fn add_ca_file(roots: &mut RootCertStore, path: &Path) -> Result<(), CaFileError> {
    let err = |problem: String| CaFileError {
        path: path.into(),
        problem,
    };
    let text = std::fs::read(path).map_err(|e| err(format!("cannot read: {e}")))?;
    let mut added = 0;
    for cert in rustls_pemfile::certs(&mut text.as_slice()) {
        let cert = cert.map_err(|e| err(format!("bad PEM: {e}")))?;
        roots
            .add(cert)
            .map_err(|e| err(format!("unusable CA certificate: {e}")))?;
        added += 1;
    }
    if added == 0 {
        return Err(err("no CERTIFICATE in CA file".into()));
    }
    Ok(())
}

/// A client configuration trusting `roots`, without a client certificate.
pub fn config(roots: RootCertStore) -> Arc<ClientConfig> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("ring supports TLS 1.2 and 1.3")
        .with_root_certificates(roots)
        .with_no_client_auth();
    Arc::new(config)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ca_file_problems_name_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ca.pem");
        std::fs::write(&path, "not a certificate").unwrap();
        let mut roots = RootCertStore::empty();
        let err = add_ca_file(&mut roots, &path).unwrap_err().to_string();
        assert!(
            err.contains("ca.pem") && err.contains("no CERTIFICATE"),
            "{err}"
        );
        let err = add_ca_file(&mut roots, &dir.path().join("missing.pem"))
            .unwrap_err()
            .to_string();
        assert!(err.contains("missing.pem"), "{err}");
    }
}
