//! Where events go once known (a push's changes once stored): the
//! webhook's queue and a Redis Stream. Push outcome changes, devices
//! connecting and disconnecting and dead tokens all leave through here, in
//! the same format.

use std::sync::Arc;

use redis::Value as RedisValue;
use serde_json::Value;
use tracing::warn;

use super::webhook::{Target, Webhook};
use super::ReceiptsError;
use crate::lifecycle::Phase;
use crate::redis_conn::RedisConn;
use crate::settings::ReceiptsSettings;
use crate::stats::Stats;
use crate::tls_client;

/// The webhook and the stream (key, MAXLEN ~); both unset: nowhere.
#[derive(Clone, Default)]
pub struct Outlets {
    webhook: Option<Webhook>,
    stream: Option<(RedisConn, String, u64)>,
}

impl Outlets {
    /// Starts the webhook's sender on `rest` when `receipts.webhook_url`
    /// is set; the stream needs `redis` (the registry's).
    pub fn start(
        settings: &ReceiptsSettings,
        redis: Option<&RedisConn>,
        stats: &Arc<Stats>,
        rest: &Phase,
    ) -> Result<Outlets, ReceiptsError> {
        let webhook = match &settings.webhook_url {
            None => None,
            Some(url) => {
                let roots = match &settings.webhook_ca_file {
                    None => tls_client::web_roots(),
                    Some(path) => {
                        let mut roots = rustls::RootCertStore::empty();
                        tls_client::add_ca_file(&mut roots, path)?;
                        roots
                    }
                };
                let target = Target::new(url, tls_client::config(roots))
                    .map_err(|problem| ReceiptsError::Setting("receipts.webhook_url", problem))?;
                let hook = Webhook::new(settings.webhook_queue, stats.clone());
                let secret = settings.webhook_secret.clone().unwrap_or_default();
                rest.spawn(hook.clone().run(target, secret, rest.token()));
                Some(hook)
            }
        };
        let stream = match (&settings.stream, redis) {
            (Some(key), Some(conn)) => Some((conn.clone(), key.clone(), settings.stream_max_len)),
            _ => None,
        };
        Ok(Outlets { webhook, stream })
    }

    /// Nowhere to send: events need not even be rendered.
    pub fn is_empty(&self) -> bool {
        self.webhook.is_none() && self.stream.is_none()
    }

    /// Adds `events` to the stream (failures counted in
    /// `receipts_stream_dropped`), then offers them to the webhook.
    pub async fn publish(&self, events: Vec<Value>, stats: &Stats) {
        if events.is_empty() {
            return;
        }
        if let Some((conn, key, max_len)) = &self.stream {
            let cmds = events
                .iter()
                .map(|e| {
                    redis::cmd("XADD")
                        .arg(key)
                        .arg("MAXLEN")
                        .arg("~")
                        .arg(*max_len)
                        .arg("*")
                        .arg("event")
                        .arg(e.to_string())
                        .clone()
                })
                .collect();
            let failed = match conn.each::<RedisValue>(cmds).await {
                Ok(results) => results.iter().filter(|r| r.is_err()).count(),
                Err(_) => events.len(),
            };
            if failed > 0 {
                warn!(failed, stream = %key, "events not added to the stream");
                stats.receipts_stream_dropped.add(failed as u64);
            }
        }
        if let Some(hook) = &self.webhook {
            hook.offer(events);
        }
    }
}
