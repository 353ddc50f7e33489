//! The Redis Stream side of durable intake: appending accepted frames,
//! creating the consumer group, and acknowledging delivered entries.

use std::time::Duration;

use crate::redis_conn::RedisConn;
use bytes::Bytes;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::IntakeError;
use crate::push::ack::{InFlightRef, Settled};
use crate::stats::Stats;
use std::sync::Arc;

/// The entry field holding the frame body (the proxy's msgpack bytes).
pub(crate) const FIELD: &str = "f";
/// The longest pause between two attempts at an unreachable Redis.
const MAX_BACKOFF: Duration = Duration::from_secs(2);
/// Acknowledgements sent in one round trip.
const ACK_BATCH: usize = 1024;

/// Opens a connection that reconnects by itself, to a single server, a
/// cluster or a sentinel-named master (every stream command touches one key).
pub(crate) async fn connect(
    url: &str,
    ca_file: Option<&std::path::Path>,
) -> Result<RedisConn, IntakeError> {
    RedisConn::open(url, ca_file)
        .await
        .map_err(|source| IntakeError::Connect {
            url: crate::redis_conn::redact(url),
            source,
        })
}

/// Creates the consumer group (and the stream) if missing; from the
/// stream's start, so entries appended before it are delivered too.
pub(crate) async fn create_group(
    conn: &mut RedisConn,
    key: &str,
    group: &str,
) -> Result<(), redis::RedisError> {
    let created: Result<(), redis::RedisError> = redis::cmd("XGROUP")
        .arg("CREATE")
        .arg(key)
        .arg(group)
        .arg("0")
        .arg("MKSTREAM")
        .query_async(conn)
        .await;
    match created {
        Err(e) if e.code() == Some("BUSYGROUP") => Ok(()),
        other => other,
    }
}

/// The dead-letter stream of `stream`: `<stream>:dead`.
pub(crate) fn dead_key(stream: &str) -> String {
    format!("{stream}:dead")
}

/// Appends accepted frames to the stream; cheap to clone.
#[derive(Clone)]
pub struct StreamWriter {
    conn: RedisConn,
    key: Arc<str>,
    max_len: u64,
    outage_wait: Duration,
}

impl StreamWriter {
    pub(crate) fn new(conn: RedisConn, key: &str, max_len: u64, outage_wait: Duration) -> Self {
        StreamWriter {
            conn,
            key: key.into(),
            max_len,
            outage_wait,
        }
    }

    /// The dead-letter stream's key.
    pub fn dead_letters(&self) -> String {
        dead_key(&self.key)
    }

    /// How long the proxy's appends wait for an unreachable Redis
    /// (`registry.outage_wait_secs`).
    pub fn outage_wait(&self) -> Duration {
        self.outage_wait
    }

    /// Appends every body in one round trip (XADD each, trimmed to about
    /// `max_len`), retrying with capped backoff while Redis is unreachable,
    /// for up to `wait` or until `shutdown`.
    pub async fn append(
        &self,
        bodies: &[Bytes],
        wait: Duration,
        shutdown: &CancellationToken,
    ) -> Result<(), IntakeError> {
        if bodies.is_empty() {
            return Ok(());
        }
        let mut pipe = redis::pipe();
        for body in bodies {
            pipe.cmd("XADD")
                .arg(&*self.key)
                .arg("MAXLEN")
                .arg("~")
                .arg(self.max_len)
                .arg("*")
                .arg(FIELD)
                .arg(body.as_ref())
                .ignore();
        }
        let started = Instant::now();
        let mut delay = Duration::from_millis(50);
        let mut attempt: u32 = 1;
        loop {
            let e = match pipe.query_async::<()>(&mut self.conn.clone()).await {
                Ok(()) => return Ok(()),
                Err(e) => e,
            };
            if started.elapsed() + delay > wait {
                return Err(IntakeError::Unavailable {
                    secs: wait.as_secs(),
                    source: e,
                });
            }
            if attempt.is_power_of_two() {
                warn!(error = %e, attempt, frames = bodies.len(),
                    "intake stream unreachable; the backend waits for its status bytes");
            }
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                _ = shutdown.cancelled() => return Err(IntakeError::ShuttingDown),
            }
            delay = (delay * 2).min(MAX_BACKOFF);
            attempt += 1;
        }
    }
}

/// Acknowledges (XACK, then XDEL: the stream holds only what is not yet
/// delivered) every entry whose deliveries are done, in batches; forgets
/// abandoned ones so they can be claimed. Runs until every [`super::Ack`]
/// and the consumer are gone, or `stop` (then what is already settled is
/// flushed once).
pub(crate) async fn acknowledge(
    mut conn: RedisConn,
    key: String,
    group: String,
    mut settled: mpsc::UnboundedReceiver<Settled>,
    in_flight: InFlightRef,
    stats: Arc<Stats>,
    stop: CancellationToken,
) {
    let mut batch = Vec::with_capacity(ACK_BATCH);
    loop {
        let stopping = tokio::select! {
            n = settled.recv_many(&mut batch, ACK_BATCH) => {
                if n == 0 {
                    break;
                }
                false
            }
            _ = stop.cancelled() => {
                while let Ok(s) = settled.try_recv() {
                    batch.push(s);
                }
                true
            }
        };
        let mut done = Vec::with_capacity(batch.len());
        for s in batch.drain(..) {
            match s {
                Settled::Done(id) => done.push(id),
                Settled::Abandoned(id) => {
                    debug!(id, "stream entry left pending");
                    in_flight.remove(&id);
                }
            }
        }
        ack_with_retry(&mut conn, &key, &group, &done, &stats, &stop).await;
        for id in &done {
            in_flight.remove(id);
        }
        if stopping {
            break;
        }
    }
    debug!("acknowledger stopped");
}

async fn ack_with_retry(
    conn: &mut RedisConn,
    key: &str,
    group: &str,
    ids: &[String],
    stats: &Stats,
    stop: &CancellationToken,
) {
    if ids.is_empty() {
        return;
    }
    let mut pipe = redis::pipe();
    pipe.cmd("XACK").arg(key).arg(group).arg(ids).ignore();
    pipe.cmd("XDEL").arg(key).arg(ids).ignore();
    let mut delay = Duration::from_millis(50);
    let mut attempt: u32 = 1;
    loop {
        match pipe.query_async::<()>(conn).await {
            Ok(()) => {
                stats.intake_acked.add(ids.len() as u64);
                if attempt > 1 {
                    info!(
                        entries = ids.len(),
                        "stream entries acknowledged after retrying"
                    );
                }
                return;
            }
            Err(e) if stop.is_cancelled() => {
                warn!(error = %e, entries = ids.len(),
                    "stopping: delivered stream entries not acknowledged; they will be delivered again");
                return;
            }
            Err(e) => {
                if attempt.is_power_of_two() {
                    warn!(error = %e, attempt, entries = ids.len(),
                        "acknowledging stream entries failed; retrying");
                }
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    _ = stop.cancelled() => {}
                }
                delay = (delay * 2).min(MAX_BACKOFF);
                attempt += 1;
            }
        }
    }
}
