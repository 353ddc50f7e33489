//! One instance's reader in the consumer group: new entries with
//! XREADGROUP, idle ones of crashed instances with XAUTOCLAIM, each routed
//! and delivered with an [`Ack`] that acknowledges it when every delivery
//! is final.

use std::sync::Arc;
use std::time::Duration;

use crate::redis_conn::RedisConn;
use bytes::Bytes;
use redis::streams::{StreamAutoClaimReply, StreamId, StreamReadReply};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, error, info, warn};

use super::stream::{create_group, FIELD};
use crate::dispatch::{Dispatcher, BATCH};
use crate::push::ack::{Ack, InFlightRef, Settled};
use crate::push::Push;
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
                next_claim = Instant::now() + (self.claim_idle / 2).max(Duration::from_millis(50));
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
                    self.handle(entries).await;
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

    /// Keeps this instance's slow deliveries from looking idle, then takes
    /// over entries idle longer than `claim_idle` (a crashed instance's,
    /// or this one's abandoned ones) and delivers them.
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
                self.handle(claimed).await;
            }
            cursor = reply.next_stream_id;
            if cursor == "0-0" {
                break;
            }
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

    /// Decodes entries and delivers them as one batch, each with its ack.
    async fn handle(&self, entries: Vec<StreamId>) {
        let mut batch: Vec<(Push, Ack)> = Vec::with_capacity(entries.len());
        for entry in entries {
            if !self.in_flight.insert(&entry.id) {
                continue;
            }
            let ack = Ack::new(entry.id.clone(), self.settled.clone());
            match decode(&entry) {
                Ok(push) => batch.push((push, ack)),
                Err(problem) => {
                    self.dispatcher.stats.intake_undecodable.inc();
                    error!(id = %entry.id, problem, "stream entry is not a push frame; acknowledged and dropped");
                    ack.settle();
                }
            }
        }
        if !batch.is_empty() {
            self.dispatcher.dispatch_acked(batch).await;
        }
    }
}

fn decode(entry: &StreamId) -> Result<Push, String> {
    let body: Vec<u8> = entry
        .get(FIELD)
        .ok_or_else(|| format!("no field {FIELD:?}"))?;
    frame::parse(&Bytes::from(body)).map_err(|e| e.to_string())
}
