//! The one connection to the external broker: drives rumqttc's event loop,
//! feeds it the outbox, matches PUBACKs (and their reasons), republishes
//! after reconnects, moves on to the next broker URL when a connection is
//! lost, and forwards status messages.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use serde::Serialize;
use tokio::sync::{mpsc, Semaphore};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, info_span, warn, Instrument};

use super::client::{self, Client, Event, Loop, Protocol};
use super::endpoint::Login;
use super::outbox::{Entry, Outbox};
use super::unreached::{Keep, Unreached};
use super::Message;
use crate::mqtt::BrokerEvent;
use crate::push::Id;
use crate::stats::{Stats, Up};
use crate::status;

/// Reconnect backoff: first and longest delay.
const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// Requests rumqttc's queue holds besides the outbox (the SUBSCRIBEs, the DISCONNECT).
const QUEUE_SPARE: usize = 16;
/// The link's line in `/readyz`: down until the broker's CONNACK.
const READY_NAME: &str = "mqtt.external_url";
/// PUBACK 0x10: the broker had no subscriber for it.
const NO_SUBSCRIBERS: u8 = 0x10;

pub(super) struct Config {
    pub outbox: usize,
    pub status_topic: String,
    /// `<prefix>/user/`
    pub user_prefix: String,
    pub shared_group: String,
    /// Where subscribe events arrive; empty: not subscribed.
    pub subscribe_events: String,
    pub feedback_topic: String,
    pub max_attempts: u32,
    pub drain: Duration,
}

pub(super) struct Link {
    logins: Vec<Login>,
    /// The broker in use (index into `logins`) and the version to try with each.
    at: usize,
    protocols: Vec<Protocol>,
    client: Client,
    eventloop: Loop,
    config: Config,
    filters: Vec<String>,
    from_handles: mpsc::UnboundedReceiver<Message>,
    room: Arc<Semaphore>,
    outbox: Outbox,
    /// Set while connected; `/readyz` lists the link as `mqtt.external_url`.
    connected: Option<Up>,
    /// The broker has answered the status SUBSCRIBE on this connection:
    /// only then is the outbox published, so that a connection the broker
    /// drops before (a cluster node unable to serve the session) is not
    /// blamed on a publish.
    answered: bool,
    /// After a lost connection: one publish at a time until the broker
    /// answers one, so that a broker hanging up on a publish shows which.
    careful: bool,
    unreached: Unreached,
    events: mpsc::Sender<BrokerEvent>,
    stats: Arc<Stats>,
}

impl Link {
    pub fn new(
        logins: Vec<Login>,
        config: Config,
        from_handles: mpsc::UnboundedReceiver<Message>,
        room: Arc<Semaphore>,
        unreached: Unreached,
        events: mpsc::Sender<BrokerEvent>,
        stats: Arc<Stats>,
    ) -> Link {
        let protocols = vec![Protocol::V5; logins.len()];
        let (client, eventloop) =
            client::new(&logins[0], Protocol::V5, config.outbox + QUEUE_SPARE);
        let mut filters = vec![match config.shared_group.as_str() {
            "" => config.status_topic.clone(),
            group => format!("$share/{group}/{}", config.status_topic),
        }];
        // As given: Mosquitto delivers no `$SYS` message to a shared subscription.
        if !config.subscribe_events.is_empty() {
            filters.push(config.subscribe_events.clone());
        }
        stats.listeners.down(READY_NAME);
        Link {
            logins,
            at: 0,
            protocols,
            client,
            eventloop,
            config,
            filters,
            from_handles,
            room,
            outbox: Outbox::default(),
            connected: None,
            answered: false,
            careful: false,
            unreached,
            events,
            stats,
        }
    }

    /// Runs until `stop`, then until the outbox is empty or the drain time is up.
    pub async fn run(mut self, stop: CancellationToken) {
        let brokers: Vec<String> = self.logins.iter().map(Login::addr).collect();
        let span = info_span!("external_broker", brokers = %brokers.join(","));
        async move {
            let mut backoff = BACKOFF_MIN;
            let mut deadline: Option<Instant> = None;
            loop {
                let Some(event) = self.next_event(&stop, &mut deadline).await else {
                    break;
                };
                match event {
                    Ok(event) => {
                        if matches!(event, Event::ConnAck { .. }) {
                            backoff = BACKOFF_MIN;
                        }
                        self.on_event(event).await;
                    }
                    Err(e) => {
                        for event in self.eventloop.leftover() {
                            self.on_event(event).await;
                        }
                        self.on_error(e);
                        let wait = tokio::time::sleep(backoff);
                        backoff = (backoff * 2).min(BACKOFF_MAX);
                        tokio::select! {
                            _ = wait => {}
                            _ = until(deadline) => break,
                        }
                    }
                }
            }
            self.close().await;
        }
        .instrument(span)
        .await
    }

    /// The next event from rumqttc, taking new publishes meanwhile; `None`
    /// once stopping and the outbox is empty or the drain time is up.
    async fn next_event(
        &mut self,
        stop: &CancellationToken,
        deadline: &mut Option<Instant>,
    ) -> Option<Result<Event, client::Error>> {
        // The poll future lives across the other branches: dropping it midway
        // could lose a packet rumqttc had already taken from its queue.
        let poll = self.eventloop.poll();
        tokio::pin!(poll);
        loop {
            if deadline.is_some() && self.outbox.is_empty() && self.from_handles.is_empty() {
                return None;
            }
            tokio::select! {
                event = &mut poll => return Some(event),
                Some(m) = self.from_handles.recv() => {
                    let seq = self.outbox.add(m.topic, m.payload, m.ack);
                    if may_send(self.answered, self.careful, &self.outbox) {
                        Self::hand_over(&self.client, &mut self.outbox, &self.stats, seq);
                    }
                }
                _ = stop.cancelled(), if deadline.is_none() => {
                    *deadline = Some(Instant::now() + self.config.drain);
                }
                _ = until(*deadline) => return None,
            }
        }
    }

    async fn on_event(&mut self, event: Event) {
        if matches!(event, Event::SubAck { .. }) && !self.answered {
            self.answered = true;
            for seq in self.outbox.pending() {
                self.offer(seq);
            }
        }
        match event {
            Event::ConnAck { session_present } => {
                let protocol = self.protocols[self.at];
                self.connected = Some(self.stats.listeners.up(READY_NAME));
                self.stats.mqtt_external_connects.inc();
                match protocol {
                    Protocol::V5 => self.stats.mqtt_external_connects_v5.inc(),
                    Protocol::V311 => self.stats.mqtt_external_connects_v311.inc(),
                }
                info!(
                    broker = %self.logins[self.at].addr(),
                    mqtt = protocol.name(),
                    session_present,
                    republishing = self.outbox.len(),
                    "connected to the external broker"
                );
                for filter in &self.filters {
                    if let Err(e) = self.client.try_subscribe(filter) {
                        error!(error = %e, %filter, "could not queue a subscription");
                    }
                }
            }
            Event::SubAck { granted: false } => error!(
                filters = ?self.filters,
                "the external broker refused a subscription: app status (or subscribe \
                 events) not handled (check its ACL; without shared subscriptions set \
                 mqtt.external_shared_group = \"\")"
            ),
            Event::SubAck { granted: true } => {
                self.stats.mqtt_external_subscribed.inc();
                info!(filters = ?self.filters, "subscribed");
            }
            Event::Publish { topic, payload } => self.on_publish(topic, payload).await,
            Event::PubAck { pkid, reason } => self.on_puback(pkid, reason),
            Event::Written(pkid) => {
                if !self.outbox.written(pkid) {
                    warn!(pkid, "rumqttc wrote a publish the outbox did not hand over");
                }
            }
            Event::Other => {}
        }
    }

    async fn on_publish(&mut self, topic: String, payload: Bytes) {
        if topic != self.config.status_topic {
            match subscribed_topic(&payload).and_then(|t| self.user_of(&t)) {
                Some(user) => self.unreached.back(user),
                None => debug!(%topic, "ignored a publish that is no user topic's subscribe event"),
            }
            return;
        }
        if let Some((user, true)) = status::parse(&payload) {
            self.unreached.back(user);
        }
        let event = BrokerEvent::Status {
            conn: status::UNTRACKED,
            client_id: self.logins[self.at].addr().into(),
            payload,
        };
        if self.events.send(event).await.is_err() {
            debug!("status handling has stopped");
        }
    }

    fn user_of(&self, topic: &str) -> Option<Id> {
        Id::parse(topic.strip_prefix(&self.config.user_prefix)?)
    }

    fn on_puback(&mut self, pkid: u16, reason: u8) {
        let Some(seq) = self.outbox.answered(pkid) else {
            return;
        };
        self.settle(seq, reason);
        if self.careful {
            self.careful = false;
            for seq in self.outbox.pending() {
                self.offer(seq);
            }
        }
    }

    fn settle(&mut self, seq: u64, reason: u8) {
        if reason >= 0x80 {
            self.stats.mqtt_external_refused.inc();
            let text = format!(
                "refused by the broker: 0x{reason:02x} {}",
                client::puback_reason(reason)
            );
            // Careful: it goes again with everything else, below.
            if !self.failed(seq, false, &text) && !self.careful {
                self.offer(seq);
            }
            return;
        }
        let Some(entry) = self.outbox.take(seq) else {
            return;
        };
        self.stats.mqtt_external_acked.inc();
        if reason == NO_SUBSCRIBERS {
            if let Some(user) = self.user_of(&entry.topic) {
                self.stats.mqtt_external_unreached.inc();
                // The outbox slot is given back once kept.
                self.unreached.keep(Keep {
                    user,
                    payload: entry.payload,
                    ack: entry.ack,
                });
                return;
            }
        }
        self.room.add_permits(1);
        if let Some(ack) = entry.ack {
            let _ = ack.send(());
        }
    }

    /// Counts a failed attempt of `seq`; at `max_attempts` drops it, with
    /// feedback, and returns true.
    fn failed(&mut self, seq: u64, lost: bool, reason: &str) -> bool {
        let failures = self.outbox.failed(seq, lost);
        if failures < self.config.max_attempts {
            return false;
        }
        let Some(mut entry) = self.outbox.take(seq) else {
            return true;
        };
        // Final, as an APNs notification given up on: its caller is done.
        if let Some(ack) = entry.ack.take() {
            let _ = ack.send(());
        }
        match lost {
            false => self.stats.mqtt_external_dropped_refused.inc(),
            true => self.stats.mqtt_external_dropped_disconnected.inc(),
        }
        warn!(topic = %entry.topic, failures, reason, "publish dropped after its last attempt");
        self.feedback(&entry, &format!("{reason} (after {failures} attempts)"));
        true
    }

    /// Tells backends on the feedback topic (never about a feedback message:
    /// a broker refusing that topic would loop). Takes the dropped entry's
    /// outbox slot.
    fn feedback(&mut self, dropped: &Entry, reason: &str) {
        if dropped.topic == self.config.feedback_topic {
            self.room.add_permits(1);
            return;
        }
        let user_id = self.user_of(&dropped.topic).map(|u| {
            u.as_str()
                .parse::<u64>()
                .map(serde_json::Value::from)
                .unwrap_or_else(|_| u.as_str().into())
        });
        let body = Feedback {
            user_id,
            topic: &dropped.topic,
            reason,
            at: crate::utc::now_ms() / 1000,
        };
        let body = serde_json::to_vec(&body).unwrap_or_default();
        let seq = self
            .outbox
            .add(self.config.feedback_topic.clone(), body.into(), None);
        self.stats.mqtt_external_feedback.inc();
        self.offer(seq);
    }

    /// The connection is gone: the publish to blame (if any) is charged,
    /// everything unacknowledged is owed again, and the next attempt goes
    /// to the next broker URL, or (a handshake this version failed) to the
    /// same one with the other protocol version.
    fn on_error(&mut self, e: client::Error) {
        let addr = self.logins[self.at].addr();
        let unacked = self.outbox.len();
        // The client refused the packet it was writing: that one. Otherwise
        // only the lone publish of a careful connection is known to be the
        // last thing the broker read (nothing is published before the SUBACK).
        let blamed = match (e.writing, self.careful) {
            (true, _) => self.outbox.being_written(),
            (false, true) => self.outbox.oldest_unanswered(),
            (false, false) => None,
        };
        self.answered = false;
        self.careful = true;
        if let Some(seq) = blamed {
            self.failed(seq, true, &format!("connection lost: {}", e.text));
        }
        let was_connected = self.connected.take().is_some();
        if was_connected {
            warn!(broker = %addr, error = %e.text, unacked, "external broker connection lost; reconnecting");
        } else {
            warn!(broker = %addr, error = %e.text, unacked, "cannot connect to the external broker; retrying");
        }
        if e.handshake && !was_connected {
            let other = self.protocols[self.at].other();
            info!(broker = %addr, mqtt = other.name(), "the broker refused the handshake; trying the other MQTT version");
            self.protocols[self.at] = other;
        } else {
            // A handshake cut short by a broker going down is no verdict on
            // its version: MQTT 5 first again next time.
            if was_connected {
                self.protocols[self.at] = Protocol::V5;
            }
            self.at = (self.at + 1) % self.logins.len();
        }
        self.outbox.connection_lost();
        let (client, eventloop) = client::new(
            &self.logins[self.at],
            self.protocols[self.at],
            self.config.outbox + QUEUE_SPARE,
        );
        self.client = client;
        self.eventloop = eventloop;
    }

    fn offer(&mut self, seq: u64) {
        if may_send(self.answered, self.careful, &self.outbox) {
            Self::hand_over(&self.client, &mut self.outbox, &self.stats, seq);
        }
    }

    fn hand_over(client: &Client, outbox: &mut Outbox, stats: &Stats, seq: u64) {
        let Some(entry) = outbox.peek(seq) else {
            return;
        };
        match client.try_publish(&entry.topic, entry.payload.clone()) {
            Ok(()) => {
                if outbox.queued(seq).is_some_and(|e| e.sends > 1) {
                    stats.mqtt_external_republished.inc();
                }
            }
            // Cannot happen: the queue has room for the whole outbox.
            Err(e) => {
                error!(error = %e, "rumqttc queue refused a publish; it waits for the next connection")
            }
        }
    }

    async fn close(mut self) {
        let left = self.outbox.len() + self.from_handles.len();
        if left > 0 {
            warn!(
                left,
                "external broker link closing with publishes not acknowledged"
            );
        }
        if self.connected.is_some() && self.client.try_disconnect() {
            let _ = tokio::time::timeout(Duration::from_secs(1), async {
                while self.eventloop.poll().await.is_ok() {}
            })
            .await;
        }
        info!("external broker link closed");
    }
}

/// A publish given up on, for backends: `{user_id, topic, reason, at}`
/// (`user_id` only for a user topic; `at`: Unix seconds).
#[derive(Serialize)]
struct Feedback<'a> {
    #[serde(skip_serializing_if = "Option::is_none")]
    user_id: Option<serde_json::Value>,
    topic: &'a str,
    reason: &'a str,
    at: u64,
}

/// The topic a subscribe event names: the `topic` of a JSON object (EMQX's
/// system messages and rule events), or the last word of a line of text
/// (Mosquitto's log topic: `<time>: <client id> <qos> <topic>`).
fn subscribed_topic(payload: &[u8]) -> Option<String> {
    let text = std::str::from_utf8(payload).ok()?.trim();
    if text.starts_with('{') {
        let v: serde_json::Value = serde_json::from_str(text).ok()?;
        return v.get("topic")?.as_str().map(String::from);
    }
    text.rsplit(' ')
        .next()
        .filter(|t| !t.is_empty())
        .map(String::from)
}

/// A publish goes to rumqttc once the broker has answered the SUBSCRIBE;
/// while careful, only when nothing else is unanswered.
fn may_send(answered: bool, careful: bool, outbox: &Outbox) -> bool {
    answered && (!careful || outbox.oldest_unanswered().is_none())
}

/// Resolves at `deadline`, never without one.
async fn until(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subscribe_events_name_their_topic() {
        let emqx =
            br#"{"clientid":"app8","username":"8","topic":"push/user/8","subopts":{"qos":1}}"#;
        assert_eq!(subscribed_topic(emqx).as_deref(), Some("push/user/8"));
        let mosquitto = b"1796005680: app8 1 push/user/8";
        assert_eq!(subscribed_topic(mosquitto).as_deref(), Some("push/user/8"));
        assert_eq!(subscribed_topic(br#"{"topic": 7}"#), None);
        assert_eq!(subscribed_topic(b""), None);
        assert_eq!(subscribed_topic(&[0xff, 0xfe]), None);
    }
}
