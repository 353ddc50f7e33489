//! Takes accepted pushes off the intake queue in batches, reads the users'
//! records (one registry round trip per batch, two with groups), routes each
//! push and hands the results to the MQTT broker and the APNs sender.

use std::collections::{HashMap, HashSet};
use std::num::NonZeroU64;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;
use tracing::{debug, info, warn};

use crate::apns::{ApnsJob, ApnsSender};
use crate::mqtt::Meta;
use crate::offline::{Message, OfflineStore};
use crate::publisher::MqttOut;
use crate::push::Ack;
use crate::push::{ApnsOptions, Id, Push, Target, UserRecord};
use crate::receipts::{Event, Receipts, Topics};
use crate::registry::{Registry, RegistryError, UserStore};
use crate::router;
use crate::settings::Settings;
use crate::stats::Stats;

/// Pushes routed together; bounds one pipeline's size.
pub(crate) const BATCH: usize = 256;
/// Pushes delivered between two yields. Each can wake a connection, and
/// tokio's per-worker run queue holds 256 tasks: beyond it, woken tasks
/// spill to the global queue, which a worker looks at only every few dozen
/// polls, and a push waits there for tens of milliseconds (session stage
/// p99 24-48 ms with whole batches of 256, 2-8 ms in chunks of 32).
const WAKE_CHUNK: usize = 32;
/// The longest pause between two registry attempts: a recovered Redis is
/// noticed this soon.
const MAX_BACKOFF: Duration = Duration::from_secs(2);

pub struct Dispatcher {
    pub registry: Registry,
    pub broker: MqttOut,
    pub apns: ApnsSender,
    pub prefix: String,
    pub stats: Arc<Stats>,
    /// Keeps user messages that reached no session (see `crate::offline`).
    pub offline: OfflineStore,
    /// How long a batch waits for an unreachable registry before its pushes
    /// are final failures (`registry.outage_wait_secs`).
    pub outage_wait: Duration,
    /// A lookup is failing and being retried: the intake queue is then the
    /// buffer that rides out the outage, not a queue to keep short.
    registry_failing: AtomicBool,
    /// Outcomes of pushes that ask for a receipt (off unless set).
    pub receipts: Receipts,
}

impl Dispatcher {
    pub fn new(
        settings: &Settings,
        registry: Registry,
        broker: MqttOut,
        apns: ApnsSender,
        offline: OfflineStore,
        stats: Arc<Stats>,
    ) -> Dispatcher {
        Dispatcher {
            registry,
            broker,
            apns,
            prefix: settings.mqtt.prefix.clone(),
            stats,
            offline,
            outage_wait: Duration::from_secs(settings.registry.outage_wait_secs),
            registry_failing: AtomicBool::new(false),
            receipts: Receipts::default(),
        }
    }

    /// Whether a registry lookup is failing and waiting to be retried.
    pub fn registry_failing(&self) -> bool {
        self.registry_failing.load(Ordering::Relaxed)
    }
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
    /// Routes and delivers a batch in order, with one registry lookup for all
    /// of it, retried with backoff while the registry is unreachable for up
    /// to `wait` (an HTTP caller cannot wait as long as the queue can).
    /// `acks` (durable intake: one per push) are settled once every delivery
    /// is final; if the lookup fails they are dropped unsettled, so the
    /// stream entries stay pending and are claimed again later.
    pub async fn route_now(
        &self,
        batch: &[Push],
        acks: Vec<Ack>,
        wait: Duration,
    ) -> Result<Vec<Delivered>, RegistryError> {
        let records = self.lookup_with_retry(batch, wait).await?;
        let mut out = Vec::with_capacity(batch.len());
        let mut offline: Vec<Message> = Vec::new();
        for (i, push) in batch.iter().enumerate() {
            if i > 0 && i % WAKE_CHUNK == 0 {
                // The connections woken so far write before more are woken.
                tokio::task::yield_now().await;
            }
            out.push(
                self.deliver(push, &records, acks.get(i), &mut offline)
                    .await,
            );
        }
        // Kept before the entries are acknowledged: a crash in between
        // delivers again rather than losing them.
        self.keep_offline(&offline).await;
        for ack in acks {
            ack.settle();
        }
        Ok(out)
    }

    /// Routing only, for answering what pushes will become before a
    /// consumer delivers them (HTTP with durable intake): `sessions` is empty.
    pub async fn plan(
        &self,
        batch: &[Push],
        wait: Duration,
    ) -> Result<Vec<Delivered>, RegistryError> {
        let records = self.lookup_with_retry(batch, wait).await?;
        Ok(batch
            .iter()
            .map(|push| {
                let (routing, users) = self.route(push, &records);
                Delivered {
                    routing,
                    sessions: Vec::new(),
                    unknown_users: unknown(&users),
                }
            })
            .collect())
    }

    /// The batch's records; while the registry fails, retries with capped
    /// backoff until `wait` has passed, then returns the last error.
    async fn lookup_with_retry(
        &self,
        batch: &[Push],
        wait: Duration,
    ) -> Result<Records, RegistryError> {
        let started = Instant::now();
        let mut delay = Duration::from_millis(50);
        let mut attempt: u32 = 1;
        loop {
            let found = self.lookup(batch).await;
            self.registry_failing
                .store(found.is_err(), Ordering::Relaxed);
            match found.inspect_err(|_| self.stats.registry_errors.inc()) {
                Ok(r) => {
                    if attempt > 1 {
                        info!(attempt, pushes = batch.len(), "registry reachable again");
                    }
                    return Ok(r);
                }
                Err(e) if started.elapsed() + delay <= wait => {
                    if attempt.is_power_of_two() {
                        warn!(error = %e, attempt, pushes = batch.len(),
                            "registry lookup failed; pushes wait and retry");
                    }
                    tokio::time::sleep(delay).await;
                    delay = (delay * 2).min(MAX_BACKOFF);
                    attempt += 1;
                }
                Err(e) => {
                    self.registry_failing.store(false, Ordering::Relaxed);
                    return Err(e);
                }
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
        // Only users without APNs can have kept messages; only the embedded
        // broker replays them when a device subscribes (see `held_topics`).
        let mqtt_only: Vec<Id> = match self.broker.embedded() {
            Some(_) => ids
                .iter()
                .zip(&users)
                .filter(|(_, r)| !router::has_apns(r.as_ref()))
                .map(|(id, _)| id.clone())
                .collect(),
            None => Vec::new(),
        };
        let backlog = self
            .offline
            .backlogged(&mqtt_only)
            .await
            .unwrap_or_else(|e| {
                warn!(error = %e, "offline store not read; live pushes may overtake kept messages");
                HashSet::new()
            });
        Ok(Records {
            users: ids.into_iter().zip(users).collect(),
            members,
            backlog,
        })
    }

    /// The push's routing, and its target users with their records.
    fn route<'r>(
        &self,
        push: &Push,
        records: &'r Records,
    ) -> (router::Routing, Vec<(Id, Option<&'r UserRecord>)>) {
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
        (routing, users)
    }

    /// Publishes and queues what `push` routes to; APNs jobs carry a share
    /// of `ack` (durable intake) so its entry waits for Apple's answer.
    /// Messages for the offline store are added to `offline`, kept once per
    /// batch.
    async fn deliver(
        &self,
        push: &Push,
        records: &Records,
        ack: Option<&Ack>,
        offline: &mut Vec<Message>,
    ) -> Delivered {
        let (routing, users) = self.route(push, records);
        let (meta, tracked) = self.meta(push, &routing, &users);
        let mut sessions = Vec::with_capacity(routing.mqtt_topics.len());
        if !routing.mqtt_topics.is_empty() {
            let payload = push.json();
            let held = self.held_topics(push, &users, records, offline);
            for (i, topic) in routing.mqtt_topics.iter().enumerate() {
                if held.contains(topic.as_str()) {
                    // Kept behind the user's earlier messages (counts as unreached).
                    sessions.push(0);
                    continue;
                }
                let reached = self
                    .broker
                    .publish_acked(topic, payload.clone(), ack, meta.as_ref())
                    .await;
                debug!(%topic, sessions = reached, "published");
                self.stats.mqtt_published.inc();
                self.stats.mqtt_written.add(reached as u64);
                sessions.push(reached);
                if let Some(topic) = tracked.as_ref().and_then(|t| t.get(i)) {
                    let written = Event::MqttWritten {
                        topic: topic.clone(),
                        sessions: reached,
                    };
                    self.receipts.record(&push.id, written);
                }
            }
            if self.offline.enabled() {
                let unreached = self.unreached(push, &users, &routing.mqtt_topics, &sessions);
                let receipt = push.receipt.then(|| push.id.clone());
                let ttl = push.ttl.map(|t| Duration::from_secs(t.into()));
                offline.extend(unreached.into_iter().map(|user| Message {
                    user,
                    payload: payload.clone(),
                    receipt: receipt.clone(),
                    ttl,
                }));
            }
        }
        let options = match routing.apns.is_empty() {
            true => None,
            false => apns_options(push),
        };
        for delivery in &routing.apns {
            self.apns
                .send(ApnsJob {
                    delivery: delivery.clone(),
                    data: push.data.clone(),
                    options: options.clone(),
                    ack: ack.map(Ack::share),
                    receipt: push.receipt.then(|| push.id.clone()),
                })
                .await;
        }
        Delivered {
            routing,
            sessions,
            unknown_users: unknown(&users),
        }
    }
}

/// The push's APNs overrides, with its TTL as `apns-expiration` unless
/// the backend set one.
fn apns_options(push: &Push) -> Option<Arc<ApnsOptions>> {
    match (push.ttl, &push.apns) {
        (Some(ttl), o) if o.as_ref().is_none_or(|o| o.expiration.is_none()) => {
            Some(Arc::new(ApnsOptions {
                expiration: Some(crate::utc::now() + u64::from(ttl)),
                ..o.as_deref().cloned().unwrap_or_default()
            }))
        }
        (_, o) => o.clone(),
    }
}

/// Targeted users with no record in the registry.
fn unknown(users: &[(Id, Option<&UserRecord>)]) -> Vec<Id> {
    users
        .iter()
        .filter(|(_, r)| r.is_none())
        .map(|(id, _)| id.clone())
        .collect()
}

impl Dispatcher {
    /// The target users to keep the message for: those who have no way in
    /// but MQTT and whose user topic reached no session (a persistent
    /// session that is offline counts as reached: it queues, so keeping
    /// would deliver twice). Group messages are not kept.
    fn unreached(
        &self,
        push: &Push,
        users: &[(Id, Option<&UserRecord>)],
        topics: &[String],
        sessions: &[usize],
    ) -> Vec<Id> {
        if matches!(push.target, Target::Group(_)) {
            return Vec::new();
        }
        let unreached: std::collections::HashSet<&str> = topics
            .iter()
            .zip(sessions)
            .filter(|(_, reached)| **reached == 0)
            .map(|(topic, _)| topic.as_str())
            .collect();
        if unreached.is_empty() {
            return Vec::new();
        }
        users
            .iter()
            .filter(|(id, record)| {
                !router::has_apns(*record)
                    && unreached.contains(router::user_topic(&self.prefix, id).as_str())
            })
            .map(|(id, _)| id.clone())
            .collect()
    }

    /// What the push's MQTT messages carry when it has a receipt or a TTL
    /// (`None` for every other push), and with a receipt (recorded as
    /// routed here) its topics, shared by the changes recorded for them.
    fn meta(
        &self,
        push: &Push,
        routing: &router::Routing,
        users: &[(Id, Option<&UserRecord>)],
    ) -> (Option<Arc<Meta>>, Option<Topics>) {
        if !push.receipt && push.ttl.is_none() {
            return (None, None);
        }
        let (tag, tracked) = match push.receipt && self.receipts.enabled() {
            true => {
                let topics: Topics = routing
                    .mqtt_topics
                    .iter()
                    .map(|t| t.as_str().into())
                    .collect();
                let routed = Event::Routed {
                    mqtt: topics.clone(),
                    apns: routing.apns.iter().map(|a| a.user.clone()).collect(),
                    unknown_users: unknown(users),
                    users: users.iter().map(|(id, _)| id.clone()).collect(),
                };
                self.receipts.record(&push.id, routed);
                (self.receipts.tag(&push.id), Some(topics))
            }
            false => (None, None),
        };
        let expires_ms = push
            .ttl
            .and_then(|t| NonZeroU64::new(crate::utc::now_ms() + u64::from(t) * 1000));
        let meta =
            (tag.is_some() || expires_ms.is_some()).then(|| Arc::new(Meta { tag, expires_ms }));
        (meta, tracked)
    }

    /// Topics of the push's MQTT-only users who have messages kept (before
    /// this batch, or earlier in it): publishing there would overtake them.
    /// Embedded broker only: with an external one nothing replays on a
    /// subscribe yet, so held messages would wait for nothing.
    fn held_topics(
        &self,
        push: &Push,
        users: &[(Id, Option<&UserRecord>)],
        records: &Records,
        offline: &[Message],
    ) -> HashSet<String> {
        if matches!(push.target, Target::Group(_))
            || (records.backlog.is_empty() && offline.is_empty())
            || self.broker.embedded().is_none()
        {
            return HashSet::new();
        }
        users
            .iter()
            .filter(|(id, record)| {
                !router::has_apns(*record)
                    && (records.backlog.contains(id) || offline.iter().any(|m| &m.user == id))
            })
            .map(|(id, _)| router::user_topic(&self.prefix, id))
            .collect()
    }

    /// Keeps a batch's messages for users who were offline (one Redis round
    /// trip), then has them replayed to any of those users who connected
    /// meanwhile.
    async fn keep_offline(&self, kept: &[Message]) {
        if kept.is_empty() {
            return;
        }
        match self.offline.keep(kept).await {
            Ok(dropped) => {
                self.stats.offline_kept.add(kept.len() as u64);
                self.stats.offline_dropped.add(dropped as u64);
                for m in kept {
                    if let Some(push) = &m.receipt {
                        let user = m.user.clone();
                        self.receipts.record(push, Event::OfflineKept { user });
                    }
                }
                let users: HashSet<&Id> = kept.iter().map(|m| &m.user).collect();
                self.offline.kick(users);
            }
            Err(e) => {
                warn!(error = %e, messages = kept.len(), "offline messages not kept");
                self.stats.offline_dropped.add(kept.len() as u64);
            }
        }
    }
}

/// A batch's registry answers.
struct Records {
    users: HashMap<Id, Option<UserRecord>>,
    members: HashMap<Id, Vec<Id>>,
    /// Users with kept messages: their new messages are kept behind them.
    backlog: HashSet<Id>,
}
