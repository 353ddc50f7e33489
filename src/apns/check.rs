//! `pushbridge check-config`: open every credential file now, so a wrong
//! password or an expired certificate shows up before the first push.

use std::fmt;

use super::credentials::{self, AppConfig};
use super::ApnsError;
use crate::router::Environment;
use crate::settings::ApnsSettings;

/// What check-config found for one app.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AppReport {
    pub app: String,
    pub credential: Credential,
    pub environments: Vec<Environment>,
}

/// Certificates expiring sooner than this are reported with a warning.
pub const EXPIRY_WARNING_DAYS: i64 = 30;

/// One client certificate, checked: it loaded, so its key matches it and it
/// has not expired.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CertReport {
    pub env: Environment,
    pub subject: String,
    pub expires: String,
    pub days_left: i64,
}

impl CertReport {
    /// Whether ops should renew it now.
    pub fn expires_soon(&self) -> bool {
        self.days_left < EXPIRY_WARNING_DAYS
    }
}

/// The kind of credential, with what identifies it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Credential {
    /// One client certificate per environment.
    Certificate(Vec<CertReport>),
    Token {
        key_id: String,
        team_id: String,
    },
}

fn env_name(env: Environment) -> &'static str {
    env.name()
}

impl fmt::Display for AppReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let envs: Vec<&str> = self.environments.iter().map(|e| env_name(*e)).collect();
        match &self.credential {
            Credential::Token { key_id, team_id } => write!(
                f,
                "{}: token auth (key {key_id}, team {team_id}); {}",
                self.app,
                envs.join(", ")
            ),
            Credential::Certificate(certs) => {
                write!(f, "{}: certificate; {}", self.app, envs.join(", "))?;
                for c in certs {
                    write!(
                        f,
                        "; {}: {}, key matches certificate, expires {} (in {} days)",
                        env_name(c.env),
                        c.subject,
                        c.expires,
                        c.days_left
                    )?;
                    if c.expires_soon() {
                        write!(f, " WARNING: expires in under {EXPIRY_WARNING_DAYS} days")?;
                    }
                }
                Ok(())
            }
        }
    }
}

/// One app of config.json: its report, or what is wrong with it.
pub type AppCheck = (String, Result<AppReport, ApnsError>);

/// Loads config.json and opens every app's certificates and keys, so that
/// ops see every broken app at once. Err: config.json itself is missing or
/// unreadable. Ok: per app, by app ident, a report (type, environments,
/// and per certificate its subject, expiry and a warning under 30 days
/// left) or the problem, naming the file (missing file, wrong password,
/// unreadable key, key not matching certificate, expired certificate).
pub fn check_config(settings: &ApnsSettings) -> Result<Vec<AppCheck>, ApnsError> {
    let path = &settings.config;
    let apps = credentials::read_config(path)?.ok_or_else(|| ApnsError::file(path, "not found"))?;
    Ok(apps
        .into_iter()
        .map(|(app, config)| {
            let report = config.and_then(|config| check_app(&app, config));
            (app, report)
        })
        .collect())
}

fn check_app(app: &str, config: AppConfig) -> Result<AppReport, ApnsError> {
    let app = app.to_owned();
    Ok(match config {
        AppConfig::Token {
            key,
            key_id,
            team_id,
        } => {
            credentials::load_token(&key, &key_id, &team_id)?;
            AppReport {
                app,
                credential: Credential::Token { key_id, team_id },
                environments: vec![Environment::Sandbox, Environment::Production],
            }
        }
        config @ AppConfig::Certificate { .. } => {
            let mut certs = Vec::new();
            for env in [Environment::Sandbox, Environment::Production] {
                if let Some(path) = config.cert_path(env) {
                    let id = credentials::load_identity(path, config.password())?;
                    certs.push(CertReport {
                        env,
                        subject: id.subject,
                        expires: id.not_after,
                        days_left: id.days_left,
                    });
                }
            }
            AppReport {
                app,
                environments: certs.iter().map(|c| c.env).collect(),
                credential: Credential::Certificate(certs),
            }
        }
    })
}
