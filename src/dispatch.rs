//! Takes accepted pushes off the intake queue in batches, reads the users'
//! records (one registry round trip per batch, two with groups), routes each
//! push and hands the results to the MQTT broker and the APNs sender.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tracing::{debug, error, warn};

use crate::apns::{ApnsJob, ApnsSender};
use crate::offline::OfflineStore;
use crate::publisher::MqttOut;
use crate::push::{Id, Push, Target, UserRecord};
use crate::registry::{Registry, RegistryError, UserStore};
use crate::router;
use crate::stats::Stats;

/// Pushes routed together; bounds one pipeline's size.
const BATCH: usize = 256;
/// Registry attempts per batch before its pushes are dropped (counted, logged).
const ATTEMPTS: u32 = 8;

pub struct Dispatcher {
    pub registry: Registry,
    pub broker: MqttOut,
    pub apns: ApnsSender,
    pub prefix: String,
    pub stats: Arc<Stats>,
    /// Keeps user messages that reached no session (see `crate::offline`).
    pub offline: OfflineStore,
}

/// What one push turned into, for callers that answer per target (HTTP).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delivered {
    pub routing: router::Routing,
    /// Per MQTT topic, in `routing.mqtt_topics` order: sessions it reached.
    pub sessions: Vec<usize>,
    /// Targeted users with no record in the registry.
    pub unknown_users: Vec<Id>,
}

impl Dispatcher {
    /// Runs until every intake sender is gone and the queue is drained.
    pub async fn run(self: Arc<Self>, mut intake: mpsc::Receiver<Push>) {
        let mut batch = Vec::with_capacity(BATCH);
        while intake.recv_many(&mut batch, BATCH).await > 0 {
            if let Err(e) = self.dispatch(&batch).await {
                error!(error = %e, pushes = batch.len(), "registry unreachable; pushes dropped");
                self.stats.pushes_failed_registry.add(batch.len() as u64);
            }
            batch.clear();
        }
        debug!("intake closed and drained");
    }

    /// Routes and delivers a batch in order, with one registry lookup for all
    /// of it (retried with backoff while the registry is unreachable).
    pub async fn dispatch(&self, batch: &[Push]) -> Result<Vec<Delivered>, RegistryError> {
        let records = self.lookup_with_retry(batch).await?;
        let mut out = Vec::with_capacity(batch.len());
        for push in batch {
            out.push(self.deliver(push, &records).await);
        }
        Ok(out)
    }

    async fn lookup_with_retry(&self, batch: &[Push]) -> Result<Records, RegistryError> {
        let mut delay = Duration::from_millis(50);
        let mut attempt = 1;
        loop {
            let found = self.lookup(batch).await;
            match found.inspect_err(|_| self.stats.registry_errors.inc()) {
                Ok(r) => return Ok(r),
                Err(e) if attempt < ATTEMPTS => {
                    warn!(error = %e, attempt, "registry lookup failed; retrying");
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(Duration::from_secs(5));
                    attempt += 1;
                }
                Err(e) => return Err(e),
            }
        }
    }

    async fn lookup(&self, batch: &[Push]) -> Result<Records, RegistryError> {
        let groups: Vec<Id> = batch
            .iter()
            .filter_map(|p| match &p.target {
                Target::Group(g) => Some(g.clone()),
                _ => None,
            })
            .collect();
        let members: HashMap<Id, Vec<Id>> = if groups.is_empty() {
            HashMap::new()
        } else {
            let sets = self.registry.group_apple_members(&groups).await?;
            groups.into_iter().zip(sets).collect()
        };
        let mut ids: Vec<Id> = batch
            .iter()
            .flat_map(|p| router::user_targets(&p.target))
            .chain(members.values().flatten().cloned())
            .collect();
        ids.sort_unstable();
        ids.dedup();
        let users = self.registry.users(&ids).await?;
        Ok(Records {
            users: ids.into_iter().zip(users).collect(),
            members,
        })
    }

    async fn deliver(&self, push: &Push, records: &Records) -> Delivered {
        let ids = match &push.target {
            Target::Group(g) => records.members.get(g).cloned().unwrap_or_default(),
            target => router::user_targets(target),
        };
        let users: Vec<(Id, Option<&UserRecord>)> = ids
            .into_iter()
            .map(|id| {
                let record = records.users.get(&id).and_then(Option::as_ref);
                (id, record)
            })
            .collect();
        let routing = router::route(&self.prefix, push, &users);
        let mut sessions = Vec::with_capacity(routing.mqtt_topics.len());
        if !routing.mqtt_topics.is_empty() {
            let payload = push.json();
            for topic in &routing.mqtt_topics {
                let reached = self.broker.publish(topic, payload.clone()).await;
                debug!(%topic, sessions = reached, "published");
                self.stats.mqtt_published.inc();
                sessions.push(reached);
            }
            self.keep_offline(push, &users, &routing.mqtt_topics, &sessions, &payload)
                .await;
        }
        for delivery in &routing.apns {
            self.apns
                .send(ApnsJob {
                    delivery: delivery.clone(),
                    data: push.data.clone(),
                    options: push.apns.clone(),
                })
                .await;
        }
        Delivered {
            routing,
            sessions,
            unknown_users: users
                .into_iter()
                .filter_map(|(id, r)| r.is_none().then_some(id))
                .collect(),
        }
    }
}

impl Dispatcher {
    /// Keeps the message for each target user who has no way in but MQTT and
    /// whose user topic reached no session (a persistent session that is
    /// offline counts as reached: it queues, so keeping would deliver twice).
    async fn keep_offline(
        &self,
        push: &Push,
        users: &[(Id, Option<&UserRecord>)],
        topics: &[String],
        sessions: &[usize],
        payload: &bytes::Bytes,
    ) {
        if matches!(push.target, Target::Group(_)) || !self.offline.enabled() {
            return;
        }
        let unreached: std::collections::HashSet<&str> = topics
            .iter()
            .zip(sessions)
            .filter(|(_, reached)| **reached == 0)
            .map(|(topic, _)| topic.as_str())
            .collect();
        if unreached.is_empty() {
            return;
        }
        let keep: Vec<Id> = users
            .iter()
            .filter(|(id, record)| {
                !router::has_apns(*record)
                    && unreached.contains(router::user_topic(&self.prefix, id).as_str())
            })
            .map(|(id, _)| id.clone())
            .collect();
        match self.offline.keep(&keep, payload).await {
            Ok(dropped) => {
                self.stats.offline_kept.add(keep.len() as u64);
                self.stats.offline_dropped.add(dropped as u64);
            }
            Err(e) => {
                warn!(error = %e, users = keep.len(), "offline message not kept");
                self.stats.offline_dropped.add(keep.len() as u64);
            }
        }
    }
}

/// A batch's registry answers.
struct Records {
    users: HashMap<Id, Option<UserRecord>>,
    members: HashMap<Id, Vec<Id>>,
}
