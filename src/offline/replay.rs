//! Hands kept messages over when a device subscribes to its user topic.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, warn};

use super::{OfflineError, OfflineStore};
use crate::lifecycle::Phase;
use crate::mqtt::{Broker, BrokerEvent, Meta};
use crate::push::Id;
use crate::receipts::{Event, Receipts};
use crate::stats::Stats;

/// How often the memory store drops expired messages nobody came for.
const SWEEP: Duration = Duration::from_secs(60);

/// Starts the replayer on `rest`, between the broker's `events` and what it
/// returns: every event but the replays, for the status consumer.
pub fn start(
    store: OfflineStore,
    broker: Broker,
    receipts: Receipts,
    events: mpsc::Receiver<BrokerEvent>,
    rest: &Phase,
) -> mpsc::Receiver<BrokerEvent> {
    let (forward, passed) = mpsc::channel(1024);
    let (kick_tx, kicks) = mpsc::channel(KICKS);
    let _ = store.kicks.set(kick_tx);
    let replay = Replay {
        store,
        user_prefix: format!("{}/user/", broker.settings().prefix),
        stats: broker.stats().clone(),
        broker,
        busy: Arc::default(),
        receipts,
    };
    rest.spawn(run(events, kicks, forward, replay, rest.token()));
    passed
}

/// Replays asked for by the dispatcher and not yet started, at most.
const KICKS: usize = 4096;

/// Sits between the broker and the status consumer: replays kept messages
/// when a client subscribes to a user topic, and passes every other event on.
/// Also sweeps expired messages out of the memory store.
pub async fn run(
    mut events: mpsc::Receiver<BrokerEvent>,
    mut kicks: mpsc::Receiver<Id>,
    forward: mpsc::Sender<BrokerEvent>,
    replay: Replay,
    stop: CancellationToken,
) {
    let tracker = TaskTracker::new();
    let mut sweep = tokio::time::interval(SWEEP);
    sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        // On stop, events already sent still pass (the status task needs the
        // disconnects of a shutdown).
        let event = tokio::select! {
            biased;
            event = events.recv() => event,
            _ = stop.cancelled() => events.try_recv().ok(),
            Some(user) = kicks.recv() => {
                if !replay.broker.presence(user.as_str()).is_empty() {
                    let replay = replay.clone();
                    let topic = format!("{}{user}", replay.user_prefix);
                    tracker.spawn(async move { replay.user_topic(&topic).await });
                }
                continue;
            }
            _ = sweep.tick() => {
                let expired = replay.store.sweep();
                replay.stats.offline_expired.add(expired as u64);
                continue;
            }
        };
        let Some(event) = event else { break };
        match event {
            BrokerEvent::Subscribed { topic } => {
                let replay = replay.clone();
                if replay.store.enabled() {
                    tracker.spawn(async move { replay.user_topic(&topic).await });
                }
            }
            other => {
                if forward.send(other).await.is_err() {
                    break;
                }
            }
        }
    }
    tracker.close();
    tracker.wait().await;
}

/// What a replay needs; cheap to clone.
#[derive(Clone)]
pub struct Replay {
    pub store: OfflineStore,
    pub broker: Broker,
    /// `<prefix>/user/`
    pub user_prefix: String,
    pub stats: Arc<Stats>,
    /// Users being replayed now: a second subscriber of the same user gets
    /// the running replay's publishes (they go to the topic), not a second
    /// copy. `true`: asked again meanwhile (messages kept since it read),
    /// so it reads once more before it ends.
    pub busy: Arc<Mutex<HashMap<Id, bool>>>,
    /// Replays (and expiries) of pushes that asked for a receipt.
    pub receipts: Receipts,
}

impl Replay {
    async fn user_topic(&self, topic: &str) {
        let Some(user) = topic.strip_prefix(&self.user_prefix) else {
            return;
        };
        let user = Id::from(user);
        {
            let mut busy = self.lock_busy();
            if let Some(again) = busy.get_mut(&user) {
                *again = true;
                return;
            }
            busy.insert(user.clone(), false);
        }
        loop {
            if let Err(e) = self.user(topic, &user).await {
                warn!(%user, error = %e, "offline messages not replayed (kept for the next subscribe)");
            }
            let mut busy = self.lock_busy();
            if busy.get(&user) == Some(&true) {
                busy.insert(user.clone(), false);
                continue;
            }
            busy.remove(&user);
            break;
        }
    }

    fn lock_busy(&self) -> std::sync::MutexGuard<'_, HashMap<Id, bool>> {
        self.busy.lock().unwrap_or_else(|e| e.into_inner())
    }

    async fn user(&self, topic: &str, user: &Id) -> Result<(), OfflineError> {
        let pending = self.store.pending(user).await?;
        self.stats.offline_expired.add(pending.expired as u64);
        for push in &pending.expired_receipts {
            let user = user.clone();
            self.receipts.record(push, Event::OfflineExpired { user });
        }
        let mut consumed = pending.read;
        let mut sent = 0;
        for (through, payload, receipt) in pending.messages {
            let meta = receipt.as_ref().map(|push| {
                Arc::new(Meta {
                    tag: self.receipts.tag(push),
                    expires_ms: None,
                })
            });
            if self.broker.publish_with(topic, payload, meta.as_ref()) == 0 {
                // The subscriber left meanwhile: keep the rest.
                consumed = through - 1;
                break;
            }
            if let Some(push) = &receipt {
                let user = user.clone();
                self.receipts.record(push, Event::OfflineReplayed { user });
            }
            sent += 1;
        }
        self.stats.offline_delivered.add(sent);
        debug!(%user, sent, "offline messages replayed");
        self.store.remove(user, consumed).await
    }
}
