//! pushbridge: push delivery from backends to apps, over APNs or MQTT.
//!
//! [`start`] binds every listener and returns a [`Server`] with the bound
//! addresses (tests start it on `127.0.0.1:0`); [`run`] is what the binary
//! calls: start, then serve until the shutdown token is cancelled.

pub mod apns;
pub mod auth;
pub mod dispatch;
pub mod external;
#[cfg(feature = "fuzzing")]
#[doc(hidden)]
pub mod fuzzing;
pub mod http;
pub mod intake;
pub mod lifecycle;
pub mod mqtt;
pub mod net;
pub mod offline;
pub mod proxy;
pub mod publisher;
pub mod push;
pub mod receipts;
pub mod redis_conn;
pub mod registry;
pub mod router;
mod server;
pub mod settings;
pub mod stats;
pub mod status;
pub mod tls_client;
pub mod utc;
pub mod wire;

use tokio_util::sync::CancellationToken;

use crate::auth::Auth;
use crate::mqtt::TlsConfig;
use crate::settings::Settings;

pub use server::{start, Server};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Settings(#[from] settings::SettingsError),
    #[error(transparent)]
    Bind(#[from] net::BindError),
    #[error(transparent)]
    Registry(#[from] registry::RegistryError),
    #[error(transparent)]
    Apns(#[from] apns::ApnsError),
    #[error(transparent)]
    Auth(#[from] auth::AuthError),
    #[error(transparent)]
    Mqtt(#[from] mqtt::MqttError),
    #[error(transparent)]
    External(#[from] external::ExternalError),
    #[error(transparent)]
    Intake(#[from] intake::IntakeError),
    #[error(transparent)]
    Receipts(#[from] receipts::ReceiptsError),
}

/// The binary's entry: run until `shutdown` is cancelled.
pub async fn run(settings: Settings, shutdown: CancellationToken) -> Result<(), Error> {
    start(settings, shutdown).await?.wait().await;
    Ok(())
}

/// Settings that work but are weak; `check-config` prints them, `serve`
/// logs them.
pub fn config_warnings(settings: &Settings) -> Vec<String> {
    let mut out: Vec<String> = settings
        .renamed
        .iter()
        .map(|r| format!("{r}; the old name will stop working in a later release"))
        .collect();
    if let Some(secret) = &settings.auth.jwt_secret {
        if secret.len() < 32 {
            out.push(format!(
                "auth.jwt_secret is {} bytes; an HS256 secret should be at least 32 random bytes \
                 (e.g. `openssl rand -base64 32`)",
                secret.len()
            ));
        }
    }
    out
}

/// `pushbridge check-config`: the auth key, TLS and CA files, then every
/// APNs app's report or what is wrong with it.
pub fn check_config(settings: &Settings) -> Result<Vec<apns::AppCheck>, Error> {
    Auth::new(&settings.auth, &settings.mqtt.prefix)?;
    if let (Some(cert), Some(key)) = (&settings.mqtt.tls_cert, &settings.mqtt.tls_key) {
        TlsConfig::load(cert, key)?;
    }
    if let Some(ca) = &settings.mqtt.external_ca_file {
        external::check_ca_file(ca)?;
    }
    if let Some(ca) = &settings.registry.redis_ca_file {
        redis_conn::load_ca(ca).map_err(registry::RegistryError::Redis)?;
    }
    if let Some(ca) = &settings.receipts.webhook_ca_file {
        let mut roots = rustls::RootCertStore::empty();
        tls_client::add_ca_file(&mut roots, ca).map_err(receipts::ReceiptsError::from)?;
    }
    Ok(apns::check_config(&settings.apns)?)
}
