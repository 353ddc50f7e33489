//! The (app, environment) pairs Apple can be reached for, built from
//! config.json and the files it names; rebuilt on reload, keeping the
//! connections and provider tokens of apps that did not change.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::SystemTime;

use http::HeaderValue;
use rustls::RootCertStore;
use tracing::{error, info_span, warn};

use super::connection::{BaseUrl, Connection, Transport};
use super::credentials::{self, AppConfig};
use super::jwt::TokenSigner;
use super::{tls, ApnsError};
use crate::router::Environment;
use crate::settings::ApnsSettings;

/// One (app, environment) Apple can be reached for.
pub(crate) struct Endpoint {
    pub conn: Connection,
    /// `apns-topic`: the app's bundle id, made once; `None` when it cannot
    /// be a header value (each request then fails, saying so).
    pub topic: Option<HeaderValue>,
    /// Token auth; `None` means the TLS client certificate authenticates.
    pub token: Option<Arc<TokenSigner>>,
    /// When the client certificate expires (Unix seconds); `None` for token auth.
    pub cert_expires: Option<i64>,
}

/// The endpoints of every usable app, and what each app was built from.
#[derive(Default)]
pub(crate) struct Endpoints {
    /// App → its endpoints (one or two environments); keyed by the app
    /// alone so that a lookup borrows the delivery's app id.
    map: HashMap<String, Vec<(Environment, Arc<Endpoint>)>>,
    /// App → its config entry and the bytes of its files.
    built_from: HashMap<String, Vec<u8>>,
}

impl Endpoints {
    pub fn get(&self, app: &str, env: Environment) -> Option<&Arc<Endpoint>> {
        let envs = self.map.get(app)?;
        envs.iter()
            .find(|(e, _)| *e == env)
            .map(|(_, endpoint)| endpoint)
    }

    /// How many (app, environment) pairs can be sent to.
    pub fn len(&self) -> usize {
        self.map.values().map(Vec::len).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    fn insert(&mut self, (app, env): (String, Environment), endpoint: Arc<Endpoint>) {
        let envs = self.map.entry(app).or_default();
        envs.retain(|(e, _)| *e != env);
        envs.push((env, endpoint));
    }

    /// The (app, environment) pairs, sorted by app, sandbox first.
    pub fn configured(&self) -> Vec<(String, Environment)> {
        self.loaded().into_iter().map(|a| (a.app, a.env)).collect()
    }

    /// The loaded credentials, sorted by app, sandbox first.
    pub fn loaded(&self) -> Vec<LoadedApp> {
        let mut v: Vec<_> = self
            .map
            .iter()
            .flat_map(|(app, envs)| {
                envs.iter().map(|(env, e)| LoadedApp {
                    app: app.clone(),
                    env: *env,
                    cert_expires: e.cert_expires,
                })
            })
            .collect();
        v.sort_by_key(|a| (a.app.clone(), a.env == Environment::Production));
        v
    }
}

/// One (app, environment) with usable credentials, as ops see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoadedApp {
    pub app: String,
    pub env: Environment,
    /// Certificate auth: when the certificate expires (Unix seconds);
    /// `None`: token auth (a `.p8` key does not expire).
    pub cert_expires: Option<i64>,
}

/// Endpoints keyed by (app, environment), as a list.
type Keyed = Vec<((String, Environment), Arc<Endpoint>)>;

/// Files with their modification time and size (`None`: missing).
pub(crate) type Stamp = Vec<(PathBuf, Option<(SystemTime, u64)>)>;

/// What building endpoints needs besides config.json.
pub(crate) struct Builder {
    config: PathBuf,
    production: BaseUrl,
    sandbox: BaseUrl,
    roots: Arc<RootCertStore>,
    transport: Transport,
}

impl Builder {
    pub fn new(settings: &ApnsSettings, transport: Transport) -> Result<Builder, ApnsError> {
        Ok(Builder {
            config: settings.config.clone(),
            production: BaseUrl::parse("production_url", &settings.production_url)?,
            sandbox: BaseUrl::parse("sandbox_url", &settings.sandbox_url)?,
            roots: Arc::new(tls::root_store(settings.ca_file.as_deref())?),
            transport,
        })
    }

    pub fn config(&self) -> &Path {
        &self.config
    }

    /// The endpoints at start: a missing config.json means no apps; an app
    /// whose files are broken is logged and skipped.
    pub fn initial(&self) -> Result<Endpoints, ApnsError> {
        if !self.config.exists() {
            warn!(
                "{}: not found; APNs starts with no apps",
                self.config.display()
            );
            return Ok(Endpoints::default());
        }
        Ok(self.build(&Endpoints::default())?.0)
    }

    /// Rebuilds from config.json. Apps whose entry and files did not change
    /// keep their endpoints; an app whose new files cannot be used keeps its
    /// old ones (logged). Also returns how many apps were refused. `Err`
    /// (config.json missing or unreadable): nothing changes.
    pub fn build(&self, previous: &Endpoints) -> Result<(Endpoints, usize), ApnsError> {
        let apps = credentials::read_config(&self.config)?
            .ok_or_else(|| ApnsError::file(&self.config, "not found"))?;
        let mut next = Endpoints::default();
        let mut refused = 0;
        for (app, config) in apps {
            let built = config.and_then(|config| {
                let fingerprint = fingerprint(&config);
                if previous.built_from.get(&app) == Some(&fingerprint) {
                    return Ok((previous.of(&app), Vec::new(), fingerprint));
                }
                let (built, failed) = self.app(&app, &config)?;
                Ok((built, failed, fingerprint))
            });
            match built {
                Ok((endpoints, failed, fingerprint)) => {
                    // One environment's file is broken: the other still works.
                    for (env, e) in failed {
                        refused += 1;
                        match previous.get(&app, env) {
                            Some(old) => {
                                error!("APNs app {app} ({env:?}): new credentials refused, keeping the old: {e}");
                                next.insert((app.clone(), env), Arc::clone(old));
                            }
                            None => error!("APNs app {app} ({env:?}) disabled: {e}"),
                        }
                    }
                    next.extend(endpoints);
                    next.built_from.insert(app, fingerprint);
                }
                Err(e) if previous.built_from.contains_key(&app) => {
                    refused += 1;
                    error!("APNs app {app}: new credentials refused, keeping the old: {e}");
                    next.extend(previous.of(&app));
                    next.built_from
                        .insert(app.clone(), previous.built_from[&app].clone());
                }
                Err(e) => {
                    refused += 1;
                    error!("APNs app {app} disabled: {e}");
                }
            }
        }
        Ok((next, refused))
    }

    /// An app's endpoints and the environments whose certificate cannot be
    /// used; `Err` if its key cannot be used.
    fn app(
        &self,
        app: &str,
        config: &AppConfig,
    ) -> Result<(Keyed, Vec<(Environment, ApnsError)>), ApnsError> {
        let token = match config {
            AppConfig::Token {
                key,
                key_id,
                team_id,
            } => Some(Arc::new(credentials::load_token(key, key_id, team_id)?)),
            AppConfig::Certificate { .. } => None,
        };
        let mut out = Vec::new();
        let mut failed = Vec::new();
        for env in [Environment::Sandbox, Environment::Production] {
            let (tls, cert_expires) = match tls::for_app(config, env, &self.roots) {
                Ok(Some(found)) => found,
                Ok(None) => continue,
                Err(e) => {
                    failed.push((env, e));
                    continue;
                }
            };
            let url = match env {
                Environment::Sandbox => self.sandbox.clone(),
                Environment::Production => self.production.clone(),
            };
            let span = info_span!("apns", app = %app, env = ?env, host = %url.host);
            let conn = Connection::new(url, tls, span, self.transport.clone());
            let token = token.clone();
            let endpoint = Endpoint {
                conn,
                topic: HeaderValue::from_str(app).ok(),
                token,
                cert_expires,
            };
            out.push(((app.to_owned(), env), Arc::new(endpoint)));
        }
        Ok((out, failed))
    }

    /// config.json's and its files' modification times and sizes: a reload
    /// is due when this changes.
    pub fn stamp(&self) -> Stamp {
        let mut paths = vec![self.config.clone()];
        if let Ok(Some(apps)) = credentials::read_config(&self.config) {
            for config in apps.into_values().flatten() {
                paths.extend(config.files().into_iter().map(Path::to_path_buf));
            }
        }
        paths
            .into_iter()
            .map(|p| {
                let meta = std::fs::metadata(&p).ok();
                let stamp = meta.and_then(|m| Some((m.modified().ok()?, m.len())));
                (p, stamp)
            })
            .collect()
    }
}

impl Endpoints {
    fn of(&self, app: &str) -> Keyed {
        let envs = self.map.get(app).map_or(&[][..], Vec::as_slice);
        envs.iter()
            .map(|(env, e)| ((app.to_owned(), *env), Arc::clone(e)))
            .collect()
    }
}

impl Extend<((String, Environment), Arc<Endpoint>)> for Endpoints {
    fn extend<I: IntoIterator<Item = ((String, Environment), Arc<Endpoint>)>>(&mut self, iter: I) {
        for (key, endpoint) in iter {
            self.insert(key, endpoint);
        }
    }
}

/// An app's entry and the bytes of its files (unreadable files count as empty).
fn fingerprint(config: &AppConfig) -> Vec<u8> {
    let mut out = format!("{config:?}").into_bytes();
    for path in config.files() {
        out.extend(std::fs::read(path).unwrap_or_default());
        out.push(0);
    }
    out
}
