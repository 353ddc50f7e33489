//! The one connection to the external broker: drives rumqttc's event loop,
//! feeds it the outbox, matches PUBACKs, republishes after reconnects and
//! forwards status messages.

use std::sync::Arc;
use std::time::Duration;

use rumqttc::{
    AsyncClient, ConnectionError, Event, EventLoop, MqttOptions, MqttState, Outgoing, Packet, QoS,
    SubscribeReasonCode,
};
use tokio::sync::{mpsc, Semaphore};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, info_span, warn, Instrument};

use super::outbox::Outbox;
use super::Message;
use crate::mqtt::BrokerEvent;
use crate::stats::{Stats, Up};
use crate::status;

/// Reconnect backoff: first and longest delay.
const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// Requests rumqttc's queue holds besides the outbox (the SUBSCRIBE, the DISCONNECT).
const QUEUE_SPARE: usize = 16;
/// The link's line in `/readyz`: down until the broker's CONNACK.
const READY_NAME: &str = "mqtt.external_url";

pub(super) struct Config {
    pub outbox: usize,
    pub status_topic: String,
    pub shared_group: String,
    pub drain: Duration,
}

pub(super) struct Link {
    client: AsyncClient,
    eventloop: EventLoop,
    config: Config,
    filter: String,
    from_handles: mpsc::UnboundedReceiver<Message>,
    room: Arc<Semaphore>,
    outbox: Outbox,
    /// Set while connected; `/readyz` lists the link as `mqtt.external_url`.
    connected: Option<Up>,
    events: mpsc::Sender<BrokerEvent>,
    source: Arc<str>,
    stats: Arc<Stats>,
}

impl Link {
    pub fn new(
        options: MqttOptions,
        config: Config,
        from_handles: mpsc::UnboundedReceiver<Message>,
        room: Arc<Semaphore>,
        events: mpsc::Sender<BrokerEvent>,
        stats: Arc<Stats>,
    ) -> Link {
        let source = format!(
            "{}:{}",
            options.broker_address().0,
            options.broker_address().1
        );
        let (client, eventloop) = AsyncClient::new(options, config.outbox + QUEUE_SPARE);
        let filter = match config.shared_group.as_str() {
            "" => config.status_topic.clone(),
            group => format!("$share/{group}/{}", config.status_topic),
        };
        stats.listeners.down(READY_NAME);
        Link {
            client,
            eventloop,
            config,
            filter,
            from_handles,
            room,
            outbox: Outbox::default(),
            connected: None,
            events,
            source: source.into(),
            stats,
        }
    }

    /// Runs until `stop`, then until the outbox is empty or the drain time is up.
    pub async fn run(mut self, stop: CancellationToken) {
        let span = info_span!("external_broker", broker = %self.source);
        async move {
            let mut backoff = BACKOFF_MIN;
            let mut deadline: Option<Instant> = None;
            loop {
                let Some(event) = self.next_event(&stop, &mut deadline).await else {
                    break;
                };
                match event {
                    Ok(event) => {
                        if matches!(event, Event::Incoming(Packet::ConnAck(_))) {
                            backoff = BACKOFF_MIN;
                        }
                        self.on_event(event).await;
                    }
                    Err(e) => {
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
    ) -> Option<Result<Event, ConnectionError>> {
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
                    if self.connected.is_some() {
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
        match event {
            Event::Incoming(Packet::ConnAck(ack)) => {
                self.connected = Some(self.stats.listeners.up(READY_NAME));
                self.stats.mqtt_external_connects.inc();
                info!(
                    session_present = ack.session_present,
                    republishing = self.outbox.len(),
                    "connected to the external broker"
                );
                if let Err(e) = self.client.try_subscribe(&self.filter, QoS::AtLeastOnce) {
                    error!(error = %e, "could not queue the status subscription");
                }
                for seq in self.outbox.pending() {
                    Self::hand_over(&self.client, &mut self.outbox, &self.stats, seq);
                }
            }
            Event::Incoming(Packet::SubAck(ack)) => {
                if ack
                    .return_codes
                    .iter()
                    .any(|c| matches!(c, SubscribeReasonCode::Failure))
                {
                    error!(
                        filter = %self.filter,
                        "the external broker refused the status subscription: app status is not \
                         handled (check its ACL; without shared subscriptions set \
                         mqtt.external_shared_group = \"\")"
                    );
                } else {
                    self.stats.mqtt_external_subscribed.inc();
                    info!(filter = %self.filter, "subscribed to app status");
                }
            }
            Event::Incoming(Packet::Publish(p)) => {
                if p.topic != self.config.status_topic {
                    debug!(topic = %p.topic, "ignored a publish on another topic");
                    return;
                }
                let event = BrokerEvent::Status {
                    conn: status::UNTRACKED,
                    client_id: self.source.clone(),
                    payload: p.payload,
                };
                if self.events.send(event).await.is_err() {
                    debug!("status handling has stopped");
                }
            }
            Event::Incoming(Packet::PubAck(ack)) => self.on_puback(ack.pkid),
            Event::Outgoing(Outgoing::Publish(pkid)) => self.on_written(pkid),
            _ => {}
        }
    }

    fn on_puback(&mut self, pkid: u16) {
        if let Some(entry) = self.outbox.acked(pkid) {
            self.room.add_permits(1);
            self.stats.mqtt_external_acked.inc();
            if let Some(ack) = entry.ack {
                let _ = ack.send(());
            }
        }
    }

    fn on_written(&mut self, pkid: u16) {
        if !self.outbox.written(pkid) {
            warn!(pkid, "rumqttc wrote a publish the outbox did not hand over");
        }
    }

    /// rumqttc keeps its unacknowledged publishes for the next connection
    /// and drops them if the broker lost the session; both are replaced by
    /// the outbox's republishing, so its state starts afresh.
    fn on_error(&mut self, e: ConnectionError) {
        if self.connected.is_some() {
            warn!(error = %e, unacked = self.outbox.len(), "external broker connection lost; reconnecting");
        } else {
            warn!(error = %e, unacked = self.outbox.len(), "cannot connect to the external broker; retrying");
        }
        self.connected = None;
        self.eventloop.pending.clear();
        let options = &self.eventloop.mqtt_options;
        self.eventloop.state = MqttState::new(options.inflight(), options.manual_acks());
        self.outbox.connection_lost();
    }

    fn hand_over(client: &AsyncClient, outbox: &mut Outbox, stats: &Stats, seq: u64) {
        let Some(entry) = outbox.peek(seq) else {
            return;
        };
        match client.try_publish(
            entry.topic.clone(),
            QoS::AtLeastOnce,
            false,
            entry.payload.to_vec(),
        ) {
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
        if self.connected.is_some() && self.client.try_disconnect().is_ok() {
            let _ = tokio::time::timeout(Duration::from_secs(1), async {
                loop {
                    match self.eventloop.poll().await {
                        Ok(Event::Outgoing(Outgoing::Disconnect)) | Err(_) => break,
                        Ok(_) => {}
                    }
                }
            })
            .await;
        }
        info!("external broker link closed");
    }
}

/// Resolves at `deadline`, never without one.
async fn until(deadline: Option<Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}
