//! One instance's reader in the consumer group: new entries with
//! XREADGROUP, idle ones of crashed instances with XAUTOCLAIM, each routed
//! and delivered with an [`Ack`] that acknowledges it when every delivery
//! is final. An entry that cannot be decoded, or is not delivered within
//! `intake.max_deliveries` deliveries, goes to the dead-letter stream.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use redis::streams::{StreamAutoClaimReply, StreamId, StreamReadReply};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use super::housekeeping::{delivery_counts, forget_gone_consumers, Dead, DeadLetters};
use super::stream::{create_group, FIELD};
use crate::dispatch::{Dispatcher, BATCH};
use crate::push::ack::{Ack, InFlightRef, Settled};
use crate::push::Push;
use crate::redis_conn::RedisConn;
use crate::registry::RegistryError;
use crate::wire::frame;

/// Longest blocking read: bounds how late a claim round or a shutdown is noticed.
pub(crate) const MAX_BLOCK: Duration = Duration::from_secs(1);
/// Claim rounds per tick at most, so new entries are not starved.
const CLAIM_PAGES: usize = 16;

pub(crate) struct Consumer {
    /// For blocking reads only: a blocked connection delays whatever queues behind it.
    pub reader: RedisConn,
    /// Claims and heartbeats.
    pub conn: RedisConn,
    pub key: String,
    pub group: String,
    pub name: String,
    pub claim_idle: Duration,
    /// `intake.max_deliveries`: an entry is not delivered more often.
    pub max_deliveries: u64,
    /// `intake.consumer_gone_ms`: idle this long with nothing pending, a
    /// consumer name is removed from the group.
    pub consumer_gone: Duration,
    pub dead: DeadLetters,
    pub dispatcher: Arc<Dispatcher>,
    pub in_flight: InFlightRef,
    pub settled: mpsc::UnboundedSender<Settled>,
}

impl Consumer {
    /// Reads and delivers until `shutdown`, then waits for the deliveries
    /// in flight to finish (or be abandoned).
    pub async fn run(mut self, shutdown: CancellationToken) {
        let mut next_claim = Instant::now();
        let mut failures: u32 = 0;
        info!(consumer = %self.name, stream = %self.key, group = %self.group, "durable intake consuming");
        while !shutdown.is_cancelled() {
            if Instant::now() >= next_claim {
                if let Err(e) = self.claim_round().await {
                    debug!(error = %e, "claim round failed");
                }
                let period = self.claim_idle.min(self.consumer_gone) / 2;
                next_claim = Instant::now() + period.max(Duration::from_millis(50));
            }
            let block = next_claim
                .saturating_duration_since(Instant::now())
                .clamp(Duration::from_millis(1), MAX_BLOCK);
            let read = tokio::select! {
                _ = shutdown.cancelled() => break,
                r = self.read_new(block) => r,
            };
            match read {
                Ok(entries) => {
                    failures = 0;
                    let first_reads = entries.into_iter().map(|e| (e, 1)).collect();
                    self.handle(first_reads).await;
                }
                Err(e) => {
                    failures += 1;
                    if e.code() == Some("NOGROUP") {
                        warn!(stream = %self.key, "consumer group missing (Redis lost its data?); creating it");
                        let _ = create_group(&mut self.conn, &self.key, &self.group).await;
                    } else if failures.is_power_of_two() {
                        warn!(error = %e, failures, "reading the intake stream failed; retrying");
                    }
                    let pause = Duration::from_millis(50 * u64::from(failures.min(40)));
                    tokio::select! {
                        _ = shutdown.cancelled() => break,
                        _ = tokio::time::sleep(pause) => {}
                    }
                }
            }
        }
        drop(self.settled);
        self.in_flight.wait_empty().await;
        debug!("durable intake consumer stopped");
    }

    async fn read_new(&mut self, block: Duration) -> Result<Vec<StreamId>, redis::RedisError> {
        let reply: Option<StreamReadReply> = redis::cmd("XREADGROUP")
            .arg("GROUP")
            .arg(&self.group)
            .arg(&self.name)
            .arg("COUNT")
            .arg(BATCH)
            .arg("BLOCK")
            .arg(block.as_millis() as u64)
            .arg("STREAMS")
            .arg(&self.key)
            .arg(">")
            .query_async(&mut self.reader)
            .await?;
        Ok(reply
            .map(|r| r.keys.into_iter().flat_map(|k| k.ids).collect())
            .unwrap_or_default())
    }

    /// Keeps this instance's slow deliveries from looking idle, takes over
    /// entries idle longer than `claim_idle` (a crashed instance's, or this
    /// one's abandoned ones) and delivers them, then removes the names of
    /// consumers that are gone.
    async fn claim_round(&mut self) -> Result<(), redis::RedisError> {
        self.heartbeat().await?;
        let mut cursor = "0-0".to_string();
        for _ in 0..CLAIM_PAGES {
            let reply: StreamAutoClaimReply = redis::cmd("XAUTOCLAIM")
                .arg(&self.key)
                .arg(&self.group)
                .arg(&self.name)
                .arg(self.claim_idle.as_millis() as u64)
                .arg(&cursor)
                .arg("COUNT")
                .arg(BATCH)
                .query_async(&mut self.conn)
                .await?;
            if !reply.deleted_ids.is_empty() {
                let stats = &self.dispatcher.stats;
                stats.intake_trimmed.add(reply.deleted_ids.len() as u64);
                error!(entries = reply.deleted_ids.len(),
                    "pending stream entries were trimmed before delivery (stream over intake.max_len): pushes lost");
            }
            let claimed: Vec<StreamId> = reply
                .claimed
                .into_iter()
                .filter(|e| !self.in_flight.contains(&e.id))
                .collect();
            if !claimed.is_empty() {
                self.dispatcher
                    .stats
                    .intake_claimed
                    .add(claimed.len() as u64);
                info!(entries = claimed.len(), "claimed idle stream entries");
                let ids: Vec<&str> = claimed.iter().map(|e| e.id.as_str()).collect();
                let counts = delivery_counts(&mut self.conn, &self.key, &self.group, &ids).await?;
                self.handle(claimed.into_iter().zip(counts).collect()).await;
            }
            cursor = reply.next_stream_id;
            if cursor == "0-0" {
                break;
            }
        }
        let gone_ms = self.consumer_gone.as_millis() as u64;
        let gone =
            forget_gone_consumers(&mut self.conn, &self.key, &self.group, &self.name, gone_ms)
                .await?;
        if !gone.is_empty() {
            info!(consumers = ?gone, idle_ms = gone_ms,
                "removed consumers that are gone (idle, nothing pending) from the group");
        }
        Ok(())
    }

    /// Resets the idle time of entries still being delivered here.
    async fn heartbeat(&mut self) -> Result<(), redis::RedisError> {
        let ids = self.in_flight.snapshot();
        if ids.is_empty() {
            return Ok(());
        }
        let mut pipe = redis::pipe();
        for chunk in ids.chunks(BATCH) {
            pipe.cmd("XCLAIM")
                .arg(&self.key)
                .arg(&self.group)
                .arg(&self.name)
                .arg(0)
                .arg(chunk)
                .arg("JUSTID")
                .ignore();
        }
        pipe.query_async::<()>(&mut self.conn).await
    }

    /// Decodes entries (with their delivery counts) and delivers them as one
    /// batch, each with its ack. When the batch cannot be routed because
    /// Redis refused a lookup (not because it is unreachable), each entry is
    /// tried alone once, so one bad entry does not hold back the others;
    /// an entry whose last allowed delivery failed is dead-lettered.
    async fn handle(&mut self, entries: Vec<(StreamId, u64)>) {
        let mut dead = Vec::new();
        let mut batch: Vec<(&StreamId, u64, Push)> = Vec::with_capacity(entries.len());
        for (entry, deliveries) in &entries {
            if !self.in_flight.insert(&entry.id) {
                continue;
            }
            match decode(entry) {
                Err(problem) => {
                    self.dispatcher.stats.intake_undecodable.inc();
                    dead.push(Dead {
                        entry,
                        reason: format!("not a push frame: {problem}"),
                        deliveries: *deliveries,
                    });
                }
                Ok(_) if *deliveries > self.max_deliveries => dead.push(Dead {
                    entry,
                    reason: format!(
                        "delivered {} times, never acknowledged (the instances holding it stopped)",
                        deliveries - 1
                    ),
                    deliveries: deliveries - 1,
                }),
                Ok(push) => batch.push((entry, *deliveries, push)),
            }
        }
        let held: Vec<&str> = batch
            .iter()
            .map(|b| b.0.id.as_str())
            .chain(dead.iter().map(|d| d.entry.id.as_str()))
            .collect();
        let wait = self.dispatcher.outage_wait;
        if let Err(e) = self.route(&batch, wait).await {
            let refused = refused(&e);
            warn!(error = %e, pushes = batch.len(), refused,
                "routing stream entries failed; left pending, to be claimed again");
            let failed: Vec<(&StreamId, u64, String)> = if refused && batch.len() > 1 {
                let mut failed = Vec::new();
                for one in &batch {
                    if let Err(e) = self.route(std::slice::from_ref(one), Duration::ZERO).await {
                        failed.push((one.0, one.1, e.to_string()));
                    }
                }
                failed
            } else {
                batch.iter().map(|b| (b.0, b.1, e.to_string())).collect()
            };
            dead.extend(
                failed
                    .into_iter()
                    .filter(|(_, deliveries, _)| *deliveries >= self.max_deliveries)
                    .map(|(entry, deliveries, e)| Dead {
                        entry,
                        reason: format!("routing failed: {e}"),
                        deliveries,
                    }),
            );
        }
        self.dead_letter(dead).await;
        for id in held {
            self.in_flight.remove(id);
        }
    }

    /// Routes and delivers `batch`; each entry is acknowledged once its
    /// deliveries are final, and left pending if this fails.
    async fn route(
        &self,
        batch: &[(&StreamId, u64, Push)],
        wait: Duration,
    ) -> Result<(), RegistryError> {
        if batch.is_empty() {
            return Ok(());
        }
        let pushes: Vec<Push> = batch.iter().map(|b| b.2.clone()).collect();
        let acks = batch.iter().map(|b| self.ack(b.0)).collect();
        self.dispatcher
            .route_now(&pushes, acks, wait)
            .await
            .map(|_| ())
    }

    /// An ack for one attempt at `entry`, holding it in flight until it settles.
    fn ack(&self, entry: &StreamId) -> Ack {
        self.in_flight.hold(&entry.id);
        Ack::new(entry.id.clone(), self.settled.clone())
    }

    /// Moves entries to the dead-letter stream, then acknowledges them; if
    /// the stream cannot be written they stay pending (no ack is made).
    async fn dead_letter(&mut self, dead: Vec<Dead<'_>>) {
        if dead.is_empty() {
            return;
        }
        match self.dead.add(&mut self.conn, &dead).await {
            Ok(()) => {
                self.dispatcher.stats.intake_dead.add(dead.len() as u64);
                for d in &dead {
                    error!(id = %d.entry.id, deliveries = d.deliveries, reason = %d.reason,
                        dead_letters = %self.dead.key, "stream entry given up on: dead-lettered");
                    self.ack(d.entry).settle();
                }
            }
            Err(e) => warn!(error = %e, entries = dead.len(),
                "dead-lettering failed; the entries stay pending"),
        }
    }
}

/// Redis answered the lookup with a refusal that another try will not
/// change (NOPERM, WRONGTYPE in a script, ...), as opposed to being
/// unreachable or busy.
fn refused(e: &RegistryError) -> bool {
    let (RegistryError::Redis(e) | RegistryError::Connect { source: e, .. }) = e;
    e.code().is_some_and(|code| {
        !matches!(
            code,
            "CLUSTERDOWN"
                | "TRYAGAIN"
                | "LOADING"
                | "READONLY"
                | "MASTERDOWN"
                | "BUSY"
                | "MOVED"
                | "ASK"
        )
    })
}

fn decode(entry: &StreamId) -> Result<Push, String> {
    let body: Vec<u8> = entry
        .get(FIELD)
        .ok_or_else(|| format!("no field {FIELD:?}"))?;
    frame::parse(&Bytes::from(body)).map_err(|e| e.to_string())
}
