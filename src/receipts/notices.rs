//! Events not tied to a push: a device connected or disconnected (the
//! embedded broker), a device token Apple says is dead. They go to the same
//! webhook and stream as push outcome changes, in the same format, chosen
//! by `receipts.events`.
//!
//! Off (no webhook, no stream, or none of these kinds chosen) they cost a
//! test of an `Option`. On, a notice is queued without waiting (a bounded
//! queue; full: dropped and counted in `events_dropped`) for one task that
//! renders and publishes them in batches, so a flood of connects costs at
//! most the queue and the webhook's own bounded queue.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use serde_json::{json, Value};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::outlets::Outlets;
use crate::lifecycle::Phase;
use crate::push::{Id, PushId};
use crate::settings::{EventKind, ReceiptsSettings};
use crate::stats::Stats;

/// Notices waiting to be published.
const QUEUE: usize = 4096;
/// Notices rendered and published together.
const BATCH: usize = 100;

/// One device event or dead token.
#[derive(Debug, Clone, PartialEq)]
pub enum Notice {
    Connected(Device),
    Disconnected {
        device: Device,
        /// `disconnect` (the client's DISCONNECT), `closed` (the socket
        /// ended without one), `keepalive_timeout`, `packet_timeout`,
        /// `token_expired`, `taken_over`, `shutdown` or `error`.
        reason: &'static str,
        /// What went wrong, with `error`.
        error: Option<String>,
    },
    TokenDead(DeadToken),
}

/// A device's connection to the embedded broker.
#[derive(Debug, Clone, PartialEq)]
pub struct Device {
    pub client_id: Arc<str>,
    /// The users the connection belongs to (its token's subject, or the
    /// own user topics it subscribed to without one); often one, maybe none.
    pub users: Vec<Arc<str>>,
    /// 4 (MQTT 3.1.1) or 5.
    pub protocol: u8,
    pub peer: SocketAddr,
    /// `tcp`, `tls`, `ws` or `wss`.
    pub transport: &'static str,
    /// Unix ms the CONNECT was accepted.
    pub connected_at: u64,
}

/// A token Apple refused for good: enough for a backend to find and drop
/// it without the webhook carrying the token itself.
#[derive(Debug, Clone, PartialEq)]
pub struct DeadToken {
    pub user: Id,
    pub token: String,
    pub app: String,
    /// `production` or `sandbox`.
    pub env: &'static str,
    pub status: Option<u16>,
    pub reason: String,
    /// Removed from the user's record (false: the user has another token by now).
    pub removed: bool,
    /// The push whose delivery found it, when it asked for a receipt.
    pub push: Option<PushId>,
}

impl Notice {
    fn kind(&self) -> EventKind {
        match self {
            Notice::Connected(_) => EventKind::DeviceConnected,
            Notice::Disconnected { .. } => EventKind::DeviceDisconnected,
            Notice::TokenDead(_) => EventKind::TokenDead,
        }
    }

    /// The event as JSON: `{"event", "at", ...}`.
    pub fn to_json(&self, at: u64) -> Value {
        match self {
            Notice::Connected(d) => device(d, "device.connected", at),
            Notice::Disconnected {
                device: d,
                reason,
                error,
            } => {
                let mut e = device(d, "device.disconnected", at);
                e["reason"] = json!(reason);
                if let Some(error) = error {
                    e["error"] = json!(error);
                }
                e
            }
            Notice::TokenDead(t) => {
                let hash = ring::digest::digest(&ring::digest::SHA256, t.token.as_bytes());
                let tail = t.token.len().saturating_sub(8);
                json!({"event": "token.dead", "at": at, "user": t.user.as_str(),
                    "app": t.app, "env": t.env, "token_sha256": super::hex(hash.as_ref()),
                    "token_suffix": t.token.get(tail..).unwrap_or_default(),
                    "status": t.status, "reason": t.reason, "removed": t.removed,
                    "push": t.push.as_ref().map(ToString::to_string)})
            }
        }
    }
}

fn device(d: &Device, event: &str, at: u64) -> Value {
    let users: Vec<&str> = d.users.iter().map(|u| &**u).collect();
    let protocol = match d.protocol {
        5 => "5",
        _ => "3.1.1",
    };
    json!({"event": event, "at": at, "client_id": &*d.client_id, "users": users,
        "protocol": protocol, "peer": d.peer.to_string(), "transport": d.transport,
        "connected_at": d.connected_at})
}

/// Where notices are sent; cheap to clone. Off, it holds nothing.
#[derive(Clone, Default)]
pub struct Notices(Option<Arc<Shared>>);

struct Shared {
    queue: mpsc::Sender<(u64, Notice)>,
    kinds: Vec<EventKind>,
    stats: Arc<Stats>,
    /// Open connections, by the broker's connection number, for their
    /// `device.disconnected` (kept here, not in each connection: off, a
    /// connection carries nothing for it).
    devices: Mutex<HashMap<u64, Device>>,
}

impl Notices {
    /// On when `outlets` go somewhere and `receipts.events` names a kind
    /// of notice; the publishing task runs on `rest`.
    pub fn start(
        settings: &ReceiptsSettings,
        outlets: &Outlets,
        stats: Arc<Stats>,
        rest: &Phase,
    ) -> Notices {
        let kinds: Vec<EventKind> = settings
            .events
            .iter()
            .copied()
            .filter(|k| *k != EventKind::Push)
            .collect();
        if outlets.is_empty() || kinds.is_empty() {
            return Notices(None);
        }
        let (tx, rx) = mpsc::channel(QUEUE);
        rest.spawn(publish(rx, outlets.clone(), stats.clone(), rest.token()));
        Notices(Some(Arc::new(Shared {
            queue: tx,
            kinds,
            stats,
            devices: Mutex::default(),
        })))
    }

    /// Whether notices of `kind` are sent: ask before building one.
    pub fn wants(&self, kind: EventKind) -> bool {
        self.0.as_ref().is_some_and(|s| s.kinds.contains(&kind))
    }

    /// Connection `conn` was accepted: `device.connected` now, and what
    /// `device.disconnected` will say kept until [`Notices::disconnected`].
    /// `device` is only called when either is sent.
    pub fn connected(&self, conn: u64, device: impl FnOnce() -> Device) {
        let Some(shared) = &self.0 else { return };
        let kinds = &shared.kinds;
        let keep = kinds.contains(&EventKind::DeviceDisconnected);
        if !keep && !kinds.contains(&EventKind::DeviceConnected) {
            return;
        }
        let device = device();
        if keep {
            let mut devices = shared.devices.lock().unwrap_or_else(|e| e.into_inner());
            devices.insert(conn, device.clone());
        }
        self.send(Notice::Connected(device));
    }

    /// Connection `conn` ended, belonging to `users` then; `why` gives the
    /// reason and error text (see [`Notice::Disconnected`]), asked only
    /// when the event is sent.
    pub fn disconnected(
        &self,
        conn: u64,
        users: Vec<Arc<str>>,
        why: impl FnOnce() -> (&'static str, Option<String>),
    ) {
        let Some(shared) = &self.0 else { return };
        let mut devices = shared.devices.lock().unwrap_or_else(|e| e.into_inner());
        let Some(mut device) = devices.remove(&conn) else {
            return;
        };
        drop(devices);
        device.users = users;
        let (reason, error) = why();
        self.send(Notice::Disconnected {
            device,
            reason,
            error,
        });
    }

    /// Queues `notice` (stamped now) without waiting, if its kind is sent.
    pub fn send(&self, notice: Notice) {
        let Some(shared) = &self.0 else { return };
        if !shared.kinds.contains(&notice.kind()) {
            return;
        }
        if shared
            .queue
            .try_send((crate::utc::now_ms(), notice))
            .is_err()
        {
            shared.stats.events_dropped.inc();
        }
    }
}

/// Renders and publishes notices in batches until `stop`, then what is queued.
async fn publish(
    mut rx: mpsc::Receiver<(u64, Notice)>,
    outlets: Outlets,
    stats: Arc<Stats>,
    stop: CancellationToken,
) {
    let mut batch = Vec::with_capacity(BATCH);
    loop {
        let n = tokio::select! {
            n = rx.recv_many(&mut batch, BATCH) => n,
            _ = stop.cancelled() => {
                rx.close();
                rx.recv_many(&mut batch, QUEUE).await
            }
        };
        if n == 0 {
            return;
        }
        let events = batch.drain(..).map(|(at, n)| n.to_json(at)).collect();
        outlets.publish(events, &stats).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_dead_token_is_named_by_hash_and_suffix_never_whole() {
        let token = "00fc13adff785122b4ad28809a3420982341241421348097878e577c991de8f0";
        let notice = Notice::TokenDead(DeadToken {
            user: Id::from(7u64),
            token: token.into(),
            app: "com.example.app".into(),
            env: "production",
            status: Some(410),
            reason: "Unregistered".into(),
            removed: true,
            push: None,
        });
        let e = notice.to_json(5);
        assert_eq!(e["event"], "token.dead");
        assert_eq!(e["token_suffix"], "991de8f0");
        let hash = ring::digest::digest(&ring::digest::SHA256, token.as_bytes());
        assert_eq!(e["token_sha256"], super::super::hex(hash.as_ref()));
        assert!(!e.to_string().contains(token), "{e}");
    }
}
