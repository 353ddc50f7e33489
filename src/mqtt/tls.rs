//! Server TLS for MQTT: certificate chain and key from PEM files, reloaded
//! when either file changes (checked at most once a second, at a handshake),
//! so a renewed certificate needs no restart.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use rustls::ServerConfig;
use tracing::{info, warn};

use super::MqttError;

const CHECK_EVERY: Duration = Duration::from_secs(1);

pub struct TlsConfig {
    cert: PathBuf,
    key: PathBuf,
    state: Mutex<State>,
}

struct State {
    config: Arc<ServerConfig>,
    stamps: (Option<SystemTime>, Option<SystemTime>),
    checked: Instant,
}

impl TlsConfig {
    /// Loads the files now; an unusable certificate or key stops the start.
    pub fn load(cert: &Path, key: &Path) -> Result<TlsConfig, MqttError> {
        let config = server_config(cert, key)?;
        Ok(TlsConfig {
            cert: cert.into(),
            key: key.into(),
            state: Mutex::new(State {
                config,
                stamps: (modified(cert), modified(key)),
                checked: Instant::now(),
            }),
        })
    }

    /// The config for the next handshake, reloaded if the files changed;
    /// a broken replacement is logged and the previous one kept.
    pub fn current(&self) -> Arc<ServerConfig> {
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if st.checked.elapsed() >= CHECK_EVERY {
            st.checked = Instant::now();
            let stamps = (modified(&self.cert), modified(&self.key));
            if stamps != st.stamps {
                st.stamps = stamps;
                match server_config(&self.cert, &self.key) {
                    Ok(c) => {
                        info!(cert = %self.cert.display(), "MQTT TLS certificate reloaded");
                        st.config = c;
                    }
                    Err(e) => warn!("MQTT TLS certificate not reloaded: {e}"),
                }
            }
        }
        st.config.clone()
    }
}

fn modified(path: &Path) -> Option<SystemTime> {
    std::fs::metadata(path).and_then(|m| m.modified()).ok()
}

fn server_config(cert: &Path, key: &Path) -> Result<Arc<ServerConfig>, MqttError> {
    let bad = |path: &Path, problem: String| MqttError::Tls {
        path: path.into(),
        problem,
    };
    let read = |path: &Path| std::fs::read(path).map_err(|e| bad(path, e.to_string()));
    let chain = rustls_pemfile::certs(&mut &read(cert)?[..])
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| bad(cert, e.to_string()))?;
    if chain.is_empty() {
        return Err(bad(cert, "no CERTIFICATE in file".into()));
    }
    let private = rustls_pemfile::private_key(&mut &read(key)?[..])
        .map_err(|e| bad(key, e.to_string()))?
        .ok_or_else(|| bad(key, "no private key in file".into()))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| bad(cert, e.to_string()))?
        .with_no_client_auth()
        .with_single_cert(chain, private)
        .map_err(|e| bad(key, e.to_string()))?;
    Ok(Arc::new(config))
}
