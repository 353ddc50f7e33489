//! User pushes the external broker delivered to nobody (MQTT 5 PUBACK 0x10
//! No matching subscribers): kept in the offline store, as the embedded
//! broker keeps what reaches no session, and published again when their
//! user is back: the app's `focus: true` status, or a subscribe event.
//!
//! One task does both, keeps first: a keep reported before a "back" (the
//! PUBACK arrives before the app's status on the same connection) is in the
//! store before that user's replay reads it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use tokio::sync::{mpsc, oneshot, Semaphore};
use tracing::{debug, warn};

use super::ExternalBroker;
use crate::lifecycle::Phase;
use crate::offline::{OfflineError, OfflineStore};
use crate::push::Id;
use crate::stats::Stats;

/// "Back" signals waiting for the task; more are dropped (the user's
/// messages wait for the next one).
const BACKS: usize = 1024;
/// Users replayed at once; a "back" for another user beyond it is dropped.
const MAX_REPLAYS: usize = 256;

/// A publish answered 0x10, with its outbox slot still taken.
pub(super) struct Keep {
    pub user: Id,
    pub payload: Bytes,
    pub ack: Option<oneshot::Sender<()>>,
}

/// The link's side; dropping it ends the task once it has kept what it was given.
pub(super) struct Unreached {
    keeps: mpsc::UnboundedSender<Keep>,
    backs: mpsc::Sender<Id>,
}

impl Unreached {
    pub fn start(
        store: OfflineStore,
        broker: ExternalBroker,
        room: Arc<Semaphore>,
        rest: &Phase,
    ) -> Unreached {
        let (keeps, keep_rx) = mpsc::unbounded_channel();
        let (backs, back_rx) = mpsc::channel(BACKS);
        let replay = Replay {
            store,
            broker,
            busy: Arc::default(),
        };
        rest.spawn(run(keep_rx, back_rx, replay, room));
        Unreached { keeps, backs }
    }

    /// Keeps it (the outbox slot is given back once kept, which bounds
    /// what waits here), then tells `ack`.
    pub fn keep(&self, keep: Keep) {
        let _ = self.keeps.send(keep);
    }

    /// `user`'s app is back: replay what is kept for it.
    pub fn back(&self, user: Id) {
        if self.backs.try_send(user).is_err() {
            debug!("too many users coming back at once; the rest replay next time");
        }
    }
}

async fn run(
    mut keeps: mpsc::UnboundedReceiver<Keep>,
    mut backs: mpsc::Receiver<Id>,
    replay: Replay,
    room: Arc<Semaphore>,
) {
    let stats = replay.broker.inner.stats.clone();
    loop {
        tokio::select! {
            biased;
            Some(k) = keeps.recv() => {
                keep(&replay.store, &stats, k).await;
                room.add_permits(1);
            }
            Some(user) = backs.recv() => replay.start(user),
            else => break,
        }
    }
}

async fn keep(store: &OfflineStore, stats: &Stats, k: Keep) {
    if store.enabled() {
        match store.keep(&[(k.user.clone(), k.payload).into()]).await {
            Ok(dropped) => {
                stats.offline_kept.inc();
                stats.offline_dropped.add(dropped as u64);
            }
            Err(e) => {
                warn!(user = %k.user, error = %e, "unreached push not kept");
                stats.offline_dropped.inc();
            }
        }
    }
    if let Some(ack) = k.ack {
        let _ = ack.send(());
    }
}

#[derive(Clone)]
struct Replay {
    store: OfflineStore,
    broker: ExternalBroker,
    /// Users being replayed, and whether another "back" came meanwhile
    /// (then it runs again: keeps may have arrived after its read).
    busy: Arc<Mutex<HashMap<Id, bool>>>,
}

impl Replay {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Id, bool>> {
        self.busy.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn start(&self, user: Id) {
        if !self.store.enabled() {
            return;
        }
        {
            let mut busy = self.lock();
            if let Some(again) = busy.get_mut(&user) {
                *again = true;
                return;
            }
            if busy.len() >= MAX_REPLAYS {
                debug!(%user, "too many replays at once; this one waits for the next status");
                return;
            }
            busy.insert(user.clone(), false);
        }
        let replay = self.clone();
        tokio::spawn(async move {
            loop {
                if let Err(e) = replay.user(&user).await {
                    warn!(%user, error = %e, "kept messages not replayed (kept for next time)");
                }
                let mut busy = replay.lock();
                match busy.get_mut(&user) {
                    Some(again) if *again => *again = false,
                    _ => {
                        busy.remove(&user);
                        break;
                    }
                }
            }
        });
    }

    /// Publishes `user`'s kept messages, oldest first, and removes them once
    /// the broker has acknowledged them (one that reached nobody again is
    /// kept again first, as the newest).
    async fn user(&self, user: &Id) -> Result<(), OfflineError> {
        let pending = self.store.pending(user).await?;
        let stats = &self.broker.inner.stats;
        stats.offline_expired.add(pending.expired as u64);
        let topic = format!("{}{}", self.broker.inner.user_prefix, user);
        let mut confirms = Vec::with_capacity(pending.messages.len());
        for (through, payload, _) in &pending.messages {
            let confirm = self.broker.publish_confirmed(&topic, payload.clone()).await;
            confirms.push((*through, confirm));
        }
        let mut consumed = pending.read;
        let mut sent = 0;
        for (through, confirm) in confirms {
            if confirm.await.is_err() {
                consumed = through - 1;
                break;
            }
            sent += 1;
        }
        stats.offline_delivered.add(sent);
        debug!(%user, sent, "kept messages replayed to the external broker");
        self.store.remove(user, consumed).await
    }
}
