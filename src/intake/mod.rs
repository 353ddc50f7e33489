//! Where accepted pushes wait for routing: in memory (an mpsc queue, the
//! default: a crash loses what is queued), or, with `intake.durable`, in a
//! Redis Stream read by every instance in one consumer group, so a push
//! answered `0x00` survives the crash of the instance that accepted it.
//!
//! `stream` appends and acknowledges, `consumer` reads and claims,
//! `housekeeping` dead-letters entries and forgets consumers that are gone.

mod consumer;
mod gate;
mod housekeeping;
mod queue;
mod stream;

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use rmpv::Value as Mp;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

pub use gate::Ticket;
pub use queue::{Queue, Refused};
pub use stream::StreamWriter;

use crate::dispatch::Dispatcher;
use crate::lifecycle::Phase;
use crate::push::{Push, Target};
use crate::settings::Settings;

#[derive(Debug, thiserror::Error)]
pub enum IntakeError {
    #[error("intake stream: redis {url}: {source}")]
    Connect {
        url: String,
        source: redis::RedisError,
    },
    #[error("intake stream: redis unreachable for {secs} s (registry.outage_wait_secs): {source}")]
    Unavailable {
        secs: u64,
        source: redis::RedisError,
    },
    #[error("intake stream: shutting down")]
    ShuttingDown,
}

/// What the proxy hands accepted pushes to.
#[derive(Clone)]
pub enum Intake {
    /// The in-memory queue the dispatcher drains.
    Memory(Queue),
    /// The Redis Stream: frames are appended before they are answered.
    Durable(StreamWriter),
}

/// The running intake: where to put pushes, and the task that takes them
/// out (it ends once intake has stopped and what it took is settled).
pub struct Started {
    pub intake: Intake,
    pub consumer: JoinHandle<()>,
}

/// Starts the configured intake. The consumer stops reading when `ingress`
/// stops; the acknowledger (durable only) runs on `rest`.
pub async fn start(
    settings: &Settings,
    dispatcher: Arc<Dispatcher>,
    ingress: &Phase,
    rest: &Phase,
) -> Result<Started, IntakeError> {
    let s = &settings.intake;
    let url = match (&settings.registry.redis_url, s.durable) {
        (Some(url), true) => url,
        _ => {
            let max_wait = Duration::from_millis(s.max_wait_ms);
            let (queue, rx) = Queue::new(dispatcher, s.queue, max_wait);
            return Ok(Started {
                intake: Intake::Memory(queue),
                consumer: tokio::spawn(queue::run(rx)),
            });
        }
    };
    let ca_file = settings.registry.redis_ca_file.as_deref();
    let mut conn = stream::connect(url, ca_file).await?;
    let reader = stream::connect(url, ca_file).await?;
    stream::create_group(&mut conn, &s.stream, &s.group)
        .await
        .map_err(|source| IntakeError::Connect {
            url: url.clone(),
            source,
        })?;
    let (settled_tx, settled_rx) = mpsc::unbounded_channel();
    let in_flight = Arc::new(crate::push::ack::InFlight::default());
    rest.spawn(stream::acknowledge(
        conn.clone(),
        s.stream.clone(),
        s.group.clone(),
        settled_rx,
        in_flight.clone(),
        dispatcher.stats.clone(),
        rest.token(),
    ));
    let consumer = consumer::Consumer {
        reader,
        conn: conn.clone(),
        key: s.stream.clone(),
        group: s.group.clone(),
        name: s.consumer.clone().unwrap_or_else(default_consumer),
        claim_idle: Duration::from_millis(s.claim_idle_ms),
        max_deliveries: s.max_deliveries,
        consumer_gone: Duration::from_millis(s.consumer_gone_ms),
        dead: housekeeping::DeadLetters {
            key: stream::dead_key(&s.stream),
            max_len: s.dead_max_len,
        },
        dispatcher,
        in_flight,
        settled: settled_tx,
    };
    Ok(Started {
        intake: Intake::Durable(StreamWriter::new(
            conn,
            &s.stream,
            s.max_len,
            Duration::from_secs(settings.registry.outage_wait_secs),
        )),
        consumer: tokio::spawn(consumer.run(ingress.token())),
    })
}

/// `<hostname>-<pid>`: unique per process, and says where it ran.
pub fn default_consumer() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: gethostname writes at most `buf.len()` bytes into `buf`.
    let ok = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) } == 0;
    let host = if ok {
        let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
        String::from_utf8_lossy(&buf[..end]).into_owned()
    } else {
        "pushbridge".to_owned()
    };
    format!("{host}-{}", std::process::id())
}

/// A push as the body of a proxy frame (what the stream holds), for pushes
/// that did not arrive as frames (HTTP): with its options map, so the
/// consumer delivers it under the id the backend was answered.
pub fn encode(push: &Push) -> Bytes {
    let (kind, id) = match &push.target {
        Target::Group(g) => (1u8, Mp::from(g.as_str())),
        Target::User(u) => (2, Mp::from(u.as_str())),
        Target::Users(us) => (
            3,
            Mp::Array(us.iter().map(|u| Mp::from(u.as_str())).collect()),
        ),
    };
    let data =
        crate::wire::client::json_to_msgpack(&serde_json::Value::Object((*push.data).clone()));
    let options = crate::wire::frame::options(push);
    let frame = crate::wire::frame::encode_with(kind, &id, &data, Some(&options));
    Bytes::from(frame).slice(4..)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn encoded_pushes_parse_back() {
        let data = Arc::new(
            json!({"alert": "hi", "n": [1, 2.5, null]})
                .as_object()
                .unwrap()
                .clone(),
        );
        for target in [
            Target::Group("7".into()),
            Target::User("42".into()),
            Target::Users(vec!["1".into(), "x".into()]),
        ] {
            let mut push = Push::new(target, data.clone());
            assert_eq!(crate::wire::frame::parse(&encode(&push)).unwrap(), push);
            (push.receipt, push.ttl) = (true, Some(60));
            assert_eq!(crate::wire::frame::parse(&encode(&push)).unwrap(), push);
        }
    }
}
