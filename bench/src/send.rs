//! The pushing side: backend connections to the pushbridge proxy (msgpack
//! frames, status bytes read back asynchronously) or MQTT publishers (QoS 1,
//! PUBACKs read back asynchronously), each pipelined with a window of
//! unacknowledged messages. Every payload carries its send time and sequence.

use std::collections::VecDeque;
use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex};

use bytes::BytesMut;
use rmpv::Value as Mp;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::OwnedReadHalf;
use tokio::sync::Semaphore;
use tokio::time::{timeout_at, Instant};

use crate::clock;
use crate::mqtt;

/// Where pushes go in.
#[derive(Debug, Clone, Copy)]
pub enum Via {
    /// pushbridge's proxy port.
    Proxy(SocketAddr),
    /// pushbridge's proxy port, every frame asking for a receipt
    /// (`[type, id, data, {"receipt": true}]`).
    ProxyWithReceipts(SocketAddr),
    /// A broker, as an MQTT publisher.
    Mqtt(SocketAddr),
}

#[derive(Debug, Clone, Copy)]
pub enum To {
    User(u32),
    Group(u32),
}

#[derive(Debug, Clone, Copy)]
pub struct Msg {
    pub to: To,
    pub seq: u64,
}

/// What the senders saw.
#[derive(Debug, Default)]
pub struct Sent {
    pub sent: u64,
    pub accepted: u64,
    pub refused: u64,
    pub first_ns: u64,
    pub last_ack_ns: u64,
    /// Write → status byte (proxy) or PUBACK (MQTT), per message.
    pub ack_latencies: Vec<u64>,
    pub errors: Vec<String>,
}

/// The JSON payload a device receives: `{"t":<ns>,"s":<seq>,"p":"<pad>"}`.
pub fn json_payload(t: u64, seq: u64, pad: &str) -> String {
    format!("{{\"t\":{t},\"s\":{seq},\"p\":\"{pad}\"}}")
}

/// Pad that brings the JSON payload to about `size` bytes.
pub fn pad_for(size: usize) -> String {
    let base = json_payload(clock::now_ns().max(1 << 40), 100_000, "").len();
    "x".repeat(size.saturating_sub(base))
}

/// The proxy frame whose `data` pushbridge turns into exactly `json_payload`;
/// with `receipt`, an options item asking for one.
pub fn frame(msg: &Msg, t: u64, pad: &str, receipt: bool) -> Vec<u8> {
    let (kind, id) = match msg.to {
        To::Group(g) => (1, Mp::from(g)),
        To::User(u) => (2, Mp::from(u)),
    };
    let data = Mp::Map(vec![
        (Mp::from("t"), Mp::from(t)),
        (Mp::from("s"), Mp::from(msg.seq)),
        (Mp::from("p"), Mp::from(pad)),
    ]);
    let options = Mp::Map(vec![(Mp::from("receipt"), Mp::from(true))]);
    pushbridge::wire::frame::encode_with(kind, &id, &data, receipt.then_some(&options))
}

pub fn topic(to: To) -> String {
    match to {
        To::User(u) => format!("push/user/{u}"),
        To::Group(g) => format!("push/group/{g}"),
    }
}

/// Sends `msgs` over `conns` connections (message `i` on connection
/// `i % conns`), each with up to `window` unacknowledged, stopping at `deadline`;
/// paced to `rate` messages/s in all when given, else as fast as acks allow.
pub async fn send_all(
    via: Via,
    msgs: &[Msg],
    conns: usize,
    window: usize,
    pad: &str,
    deadline: Instant,
    rate: Option<f64>,
) -> Sent {
    let conns = conns.max(1);
    let per_conn = rate.filter(|r| *r > 0.0).map(|r| r / conns as f64);
    let pad: Arc<str> = Arc::from(pad);
    let mut tasks = Vec::with_capacity(conns);
    for c in 0..conns {
        let mine: Vec<Msg> = msgs.iter().skip(c).step_by(conns).copied().collect();
        let pad = pad.clone();
        tasks.push(tokio::spawn(async move {
            connection(via, c, mine, window, pad, deadline, per_conn).await
        }));
    }
    let mut total = Sent {
        first_ns: u64::MAX,
        ..Sent::default()
    };
    for t in tasks {
        match t.await {
            Ok(Ok(s)) => {
                total.sent += s.sent;
                total.accepted += s.accepted;
                total.refused += s.refused;
                total.first_ns = total.first_ns.min(s.first_ns);
                total.last_ack_ns = total.last_ack_ns.max(s.last_ack_ns);
                total.ack_latencies.extend(s.ack_latencies);
                total.errors.extend(s.errors);
            }
            Ok(Err(e)) => total.errors.push(e.to_string()),
            Err(e) => total.errors.push(format!("sender task: {e}")),
        }
    }
    if total.first_ns == u64::MAX {
        total.first_ns = clock::now_ns();
    }
    total
}

async fn connection(
    via: Via,
    index: usize,
    msgs: Vec<Msg>,
    window: usize,
    pad: Arc<str>,
    deadline: Instant,
    rate: Option<f64>,
) -> io::Result<Sent> {
    let local = IpAddr::V4(Ipv4Addr::LOCALHOST);
    let mut leftover = BytesMut::with_capacity(4096);
    let receipt = matches!(via, Via::ProxyWithReceipts(_));
    let (stream, is_mqtt) = match via {
        Via::Proxy(addr) | Via::ProxyWithReceipts(addr) => {
            (mqtt::connect_from(local, addr).await?, false)
        }
        Via::Mqtt(addr) => {
            let mut s = mqtt::connect_from(local, addr).await?;
            let id = format!("bench-pub-{}-{index}", std::process::id());
            match timeout_at(deadline, mqtt::handshake(&mut s, &mut leftover, &id, 300)).await {
                Ok(r) => r?,
                Err(_) => return Err(io::Error::other("publisher: no CONNACK")),
            }
            (s, true)
        }
    };
    let (rd, mut wr) = stream.into_split();
    let total = msgs.len() as u64;
    let window = window.max(1);
    let credit = Arc::new(Semaphore::new(window));
    let fifo = Arc::new(Mutex::new(VecDeque::<u64>::with_capacity(window)));
    let reader = tokio::spawn(read_acks(
        rd,
        is_mqtt,
        leftover,
        credit.clone(),
        fifo.clone(),
        total,
        deadline,
    ));

    let mut out = Vec::with_capacity(64 * 256);
    let mut i = 0usize;
    let mut first_ns = u64::MAX;
    let mut errors = Vec::new();
    let topics: Vec<Vec<u8>> = msgs.iter().map(|m| topic(m.to).into_bytes()).collect();
    let start = Instant::now();
    while i < msgs.len() {
        // Pacing: no more than `rate * elapsed` sent so far.
        let mut allowed = 64;
        if let Some(rate) = rate {
            let due = (start.elapsed().as_secs_f64() * rate) as usize;
            if due <= i {
                let next = start + std::time::Duration::from_secs_f64((i + 1) as f64 / rate);
                if next > deadline {
                    errors.push(format!("sender {index}: pacing ran past the deadline"));
                    break;
                }
                tokio::time::sleep_until(next).await;
                continue;
            }
            allowed = (due - i).min(64);
        }
        match timeout_at(deadline, credit.acquire()).await {
            Ok(Ok(p)) => p.forget(),
            _ => {
                errors.push(format!(
                    "sender {index}: window never reopened before the deadline"
                ));
                break;
            }
        }
        let mut k = 1;
        while k < allowed && i + k < msgs.len() {
            match credit.try_acquire() {
                Ok(p) => {
                    p.forget();
                    k += 1;
                }
                Err(_) => break,
            }
        }
        out.clear();
        let t = clock::now_ns();
        first_ns = first_ns.min(t);
        for (j, m) in msgs[i..i + k].iter().enumerate() {
            if is_mqtt {
                let packet_id = ((i + j) % 65535 + 1) as u16;
                let payload = json_payload(t, m.seq, &pad);
                mqtt::publish_into(&mut out, &topics[i + j], packet_id, payload.as_bytes());
            } else {
                out.extend_from_slice(&frame(m, t, &pad, receipt));
            }
        }
        fifo.lock()
            .expect("fifo lock")
            .extend(std::iter::repeat_n(t, k));
        match timeout_at(deadline, wr.write_all(&out)).await {
            Ok(Ok(())) => i += k,
            Ok(Err(e)) => {
                errors.push(format!("sender {index}: {e}"));
                break;
            }
            Err(_) => {
                errors.push(format!("sender {index}: write blocked past the deadline"));
                break;
            }
        }
    }
    let acks = reader.await.unwrap_or_default();
    let _ = tokio::time::timeout(std::time::Duration::from_secs(1), async {
        if is_mqtt {
            let _ = wr.write_all(&mqtt::DISCONNECT).await;
        }
        let _ = wr.shutdown().await;
    })
    .await;
    Ok(Sent {
        sent: i as u64,
        accepted: acks.accepted,
        refused: acks.refused,
        first_ns: if first_ns == u64::MAX { 0 } else { first_ns },
        last_ack_ns: acks.last_ns,
        ack_latencies: acks.latencies,
        errors,
    })
}

#[derive(Default)]
struct Acks {
    accepted: u64,
    refused: u64,
    last_ns: u64,
    latencies: Vec<u64>,
}

async fn read_acks(
    mut rd: OwnedReadHalf,
    is_mqtt: bool,
    mut buf: BytesMut,
    credit: Arc<Semaphore>,
    fifo: Arc<Mutex<VecDeque<u64>>>,
    total: u64,
    deadline: Instant,
) -> Acks {
    let mut acks = Acks {
        latencies: Vec::with_capacity(total as usize),
        ..Acks::default()
    };
    while acks.accepted + acks.refused < total {
        let mut ok = 0u64;
        let mut bad = 0u64;
        if is_mqtt {
            loop {
                match mqtt::take(&mut buf) {
                    Ok(Some((first, body))) => {
                        if let Ok(mqtt::Packet::PubAck) = mqtt::decode(first, &body) {
                            ok += 1;
                        }
                    }
                    Ok(None) => break,
                    Err(_) => return acks,
                }
            }
        } else {
            for &b in buf.iter() {
                // 0x0b: accepted with its options (receipts).
                if b == 0 || b == 0x0b {
                    ok += 1;
                } else {
                    bad += 1;
                }
            }
            buf.clear();
        }
        if ok + bad > 0 {
            let now = clock::now_ns();
            let mut q = fifo.lock().expect("fifo lock");
            for _ in 0..ok + bad {
                if let Some(t) = q.pop_front() {
                    acks.latencies.push(now.saturating_sub(t));
                }
            }
            drop(q);
            acks.accepted += ok;
            acks.refused += bad;
            acks.last_ns = now;
            credit.add_permits((ok + bad) as usize);
            continue;
        }
        buf.reserve(4096);
        match timeout_at(deadline, rd.read_buf(&mut buf)).await {
            Ok(Ok(n)) if n > 0 => {}
            _ => break,
        }
    }
    acks
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frame_parses_to_the_json_payload() {
        let msg = Msg {
            to: To::User(42),
            seq: 7,
        };
        let f = frame(&msg, 123, "xx", false);
        let n = pushbridge::wire::frame::check(&f, 1 << 20)
            .unwrap()
            .unwrap();
        let push = pushbridge::wire::frame::parse(&f[4..4 + n]).unwrap();
        assert_eq!(&push.json()[..], json_payload(123, 7, "xx").as_bytes());
    }

    #[test]
    fn pad_reaches_the_size() {
        let p = json_payload(clock::now_ns().max(1 << 40), 100_000, &pad_for(100));
        assert!((98..=102).contains(&p.len()), "{}", p.len());
    }
}
