//! A hand-written MQTT 3.1.1 client, just enough for the benchmark: a device
//! (CONNECT, SUBSCRIBE QoS 1, PUBLISH in, PUBACK out, PINGREQ) and a
//! pipelined QoS 1 publisher. Tiny buffers so that 15k devices stay cheap.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt, Interest};
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use crate::clock;

pub const PINGREQ: [u8; 2] = [0xC0, 0x00];
pub const DISCONNECT: [u8; 2] = [0xE0, 0x00];

fn put_len(out: &mut Vec<u8>, mut n: usize) {
    loop {
        let mut b = (n % 128) as u8;
        n /= 128;
        if n > 0 {
            b |= 0x80;
        }
        out.push(b);
        if n == 0 {
            break;
        }
    }
}

fn put_str(out: &mut Vec<u8>, s: &[u8]) {
    out.extend_from_slice(&(s.len() as u16).to_be_bytes());
    out.extend_from_slice(s);
}

fn packet(header: u8, body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(body.len() + 5);
    out.push(header);
    put_len(&mut out, body.len());
    out.extend_from_slice(body);
    out
}

/// CONNECT with a clean session.
pub fn connect(client_id: &str, keepalive_secs: u16) -> Vec<u8> {
    let mut body = Vec::with_capacity(16 + client_id.len());
    put_str(&mut body, b"MQTT");
    body.push(4);
    body.push(0x02);
    body.extend_from_slice(&keepalive_secs.to_be_bytes());
    put_str(&mut body, client_id.as_bytes());
    packet(0x10, &body)
}

/// SUBSCRIBE to one topic at QoS 1.
pub fn subscribe(packet_id: u16, topic: &str) -> Vec<u8> {
    let mut body = Vec::with_capacity(5 + topic.len());
    body.extend_from_slice(&packet_id.to_be_bytes());
    put_str(&mut body, topic.as_bytes());
    body.push(1);
    packet(0x82, &body)
}

/// Appends a QoS 1 PUBLISH.
pub fn publish_into(out: &mut Vec<u8>, topic: &[u8], packet_id: u16, payload: &[u8]) {
    out.push(0x32);
    put_len(out, 2 + topic.len() + 2 + payload.len());
    put_str(out, topic);
    out.extend_from_slice(&packet_id.to_be_bytes());
    out.extend_from_slice(payload);
}

pub fn puback(packet_id: u16) -> [u8; 4] {
    let [hi, lo] = packet_id.to_be_bytes();
    [0x40, 0x02, hi, lo]
}

/// Incoming packets the benchmark cares about.
#[derive(Debug, PartialEq)]
pub enum Packet<'a> {
    ConnAck {
        code: u8,
    },
    SubAck {
        code: u8,
    },
    Publish {
        qos: u8,
        packet_id: u16,
        payload: &'a [u8],
    },
    PubAck,
    PingResp,
    Other(u8),
}

/// Splits the first whole packet off `buf`: its first byte and its body.
pub fn take(buf: &mut BytesMut) -> io::Result<Option<(u8, BytesMut)>> {
    let mut len = 0usize;
    let mut shift = 0;
    let mut i = 1;
    loop {
        let Some(&b) = buf.get(i) else {
            return Ok(None);
        };
        len |= ((b & 0x7f) as usize) << shift;
        i += 1;
        if b & 0x80 == 0 {
            break;
        }
        shift += 7;
        if shift > 21 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "bad remaining length",
            ));
        }
    }
    if buf.len() < i + len {
        buf.reserve(i + len - buf.len());
        return Ok(None);
    }
    let first = buf[0];
    let mut pkt = buf.split_to(i + len);
    pkt.advance(i);
    Ok(Some((first, pkt)))
}

pub fn decode(first: u8, body: &[u8]) -> io::Result<Packet<'_>> {
    let bad = || io::Error::new(io::ErrorKind::InvalidData, "short packet");
    Ok(match first >> 4 {
        2 => Packet::ConnAck {
            code: *body.get(1).ok_or_else(bad)?,
        },
        9 => Packet::SubAck {
            code: *body.get(2).ok_or_else(bad)?,
        },
        3 => {
            let qos = (first >> 1) & 3;
            let tlen = u16::from_be_bytes([
                *body.first().ok_or_else(bad)?,
                *body.get(1).ok_or_else(bad)?,
            ]) as usize;
            let mut at = 2 + tlen;
            let mut packet_id = 0;
            if qos > 0 {
                let id = body.get(at..at + 2).ok_or_else(bad)?;
                packet_id = u16::from_be_bytes([id[0], id[1]]);
                at += 2;
            }
            Packet::Publish {
                qos,
                packet_id,
                payload: body.get(at..).ok_or_else(bad)?,
            }
        }
        4 => Packet::PubAck,
        13 => Packet::PingResp,
        other => Packet::Other(other),
    })
}

/// A number field of the benchmark's JSON payload (`"t":123`), found without
/// a JSON parser: the devices must stay cheap.
pub fn field(payload: &[u8], key: &[u8]) -> Option<u64> {
    let at = payload.windows(key.len()).position(|w| w == key)? + key.len();
    let digits = payload[at..].iter().take_while(|b| b.is_ascii_digit());
    let mut n: u64 = 0;
    let mut any = false;
    for d in digits {
        n = n.checked_mul(10)?.checked_add((d - b'0') as u64)?;
        any = true;
    }
    any.then_some(n)
}

/// What devices received in one measured phase, de-duplicated by key.
pub struct Phase {
    /// Fan-out: each (message, device) pair is one delivery.
    per_device: bool,
    devices: u64,
    seen: Vec<AtomicU64>,
    expected: u64,
    pub received: AtomicU64,
    pub duplicates: AtomicU64,
    pub stray: AtomicU64,
    pub last_ns: AtomicU64,
    /// Send → read, and send → the kernel queued it on the device's socket
    /// (the server's part alone, without the tool's devices waiting for a
    /// core to read it): one lock for both.
    latencies: Mutex<(Vec<u64>, Vec<u64>)>,
}

impl Phase {
    /// `expected` deliveries; keys are `seq` (p2p) or `seq * devices + device` (fan-out).
    pub fn new(expected: u64, per_device: bool, devices: u64) -> Arc<Phase> {
        Self::with_keys(expected, expected, per_device, devices)
    }

    /// Keys below `keys`, of which only `expected` are to reach a device (p2p with APNs users).
    pub fn with_keys(keys: u64, expected: u64, per_device: bool, devices: u64) -> Arc<Phase> {
        Arc::new(Phase {
            per_device,
            devices,
            seen: (0..keys.div_ceil(64)).map(|_| AtomicU64::new(0)).collect(),
            expected: keys,
            received: AtomicU64::new(0),
            duplicates: AtomicU64::new(0),
            stray: AtomicU64::new(0),
            last_ns: AtomicU64::new(0),
            latencies: Mutex::new((
                Vec::with_capacity(expected as usize),
                Vec::with_capacity(expected as usize),
            )),
        })
    }

    pub fn received(&self) -> u64 {
        self.received.load(Ordering::Relaxed)
    }

    /// `queued_ns`: when the kernel received the read's last byte, if it said.
    fn record(&self, device: u32, payload: &[u8], queued_ns: Option<u64>) {
        let now = clock::now_ns();
        let (Some(sent), Some(seq)) = (field(payload, b"\"t\":"), field(payload, b"\"s\":")) else {
            self.stray.fetch_add(1, Ordering::Relaxed);
            return;
        };
        let key = if self.per_device {
            seq * self.devices + device as u64
        } else {
            seq
        };
        if key >= self.expected {
            self.stray.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let bit = 1u64 << (key % 64);
        if self.seen[(key / 64) as usize].fetch_or(bit, Ordering::Relaxed) & bit != 0 {
            self.duplicates.fetch_add(1, Ordering::Relaxed);
            return;
        }
        let mut lat = self.latencies.lock().expect("latency lock");
        lat.0.push(now.saturating_sub(sent));
        if let Some(q) = queued_ns {
            lat.1.push(q.min(now).saturating_sub(sent));
        }
        drop(lat);
        self.last_ns.fetch_max(now, Ordering::Relaxed);
        self.received.fetch_add(1, Ordering::Release);
    }

    /// Send → read latencies, and send → queued on the socket.
    pub fn take_latencies(&self) -> (Vec<u64>, Vec<u64>) {
        std::mem::take(&mut *self.latencies.lock().expect("latency lock"))
    }
}

/// State shared by a set of devices.
#[derive(Default)]
pub struct Devices {
    pub ready: AtomicUsize,
    pub ready_ids: Mutex<Vec<u32>>,
    pub failed: AtomicUsize,
    pub dropped: AtomicUsize,
    pub first_error: Mutex<Option<String>>,
    pub phase: RwLock<Option<Arc<Phase>>>,
}

impl Devices {
    pub fn set_phase(&self, phase: Option<Arc<Phase>>) {
        *self.phase.write().expect("phase lock") = phase;
    }

    fn fail(&self, what: String) {
        self.failed.fetch_add(1, Ordering::Relaxed);
        self.first_error
            .lock()
            .expect("error lock")
            .get_or_insert(what);
    }

    fn on_publish(&self, device: u32, payload: &[u8], queued_ns: Option<u64>) {
        let phase = self.phase.read().expect("phase lock").clone();
        if let Some(p) = phase {
            p.record(device, payload, queued_ns);
        }
    }
}

pub struct DeviceConfig {
    pub server: SocketAddr,
    pub source: IpAddr,
    pub client_id: String,
    pub topic: String,
    pub keepalive_secs: u16,
    pub handshake_timeout: Duration,
}

/// Connects from `source` (any port) so that many source addresses lift the
/// ephemeral-port limit of one.
pub async fn connect_from(source: IpAddr, server: SocketAddr) -> io::Result<TcpStream> {
    let socket = TcpSocket::new_v4()?;
    socket.bind(SocketAddr::new(source, 0))?;
    let stream = socket.connect(server).await?;
    stream.set_nodelay(true)?;
    Ok(stream)
}

async fn read_packet(stream: &mut TcpStream, buf: &mut BytesMut) -> io::Result<(u8, BytesMut)> {
    loop {
        if let Some(p) = take(buf)? {
            return Ok(p);
        }
        if stream.read_buf(buf).await? == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
    }
}

/// MQTT CONNECT and wait for a successful CONNACK.
pub async fn handshake(
    stream: &mut TcpStream,
    buf: &mut BytesMut,
    client_id: &str,
    keepalive_secs: u16,
) -> io::Result<()> {
    stream
        .write_all(&connect(client_id, keepalive_secs))
        .await?;
    let (first, body) = read_packet(stream, buf).await?;
    match decode(first, &body)? {
        Packet::ConnAck { code: 0 } => Ok(()),
        other => Err(io::Error::other(format!("CONNACK expected, got {other:?}"))),
    }
}

async fn device_setup(cfg: &DeviceConfig, buf: &mut BytesMut) -> io::Result<TcpStream> {
    let mut stream = connect_from(cfg.source, cfg.server).await?;
    handshake(&mut stream, buf, &cfg.client_id, cfg.keepalive_secs).await?;
    stream.write_all(&subscribe(1, &cfg.topic)).await?;
    loop {
        let (first, body) = read_packet(&mut stream, buf).await?;
        match decode(first, &body)? {
            Packet::SubAck { code } if code <= 2 => return Ok(stream),
            Packet::SubAck { code } => {
                return Err(io::Error::other(format!("SUBACK refused: 0x{code:02x}")))
            }
            _ => {}
        }
    }
}

/// Asks the kernel to stamp what arrives on `stream` with its receive time.
fn stamp_arrivals(stream: &TcpStream) -> io::Result<()> {
    let on: libc::c_int = 1;
    // SAFETY: a valid socket and an int option of the right size.
    let r = unsafe {
        libc::setsockopt(
            stream.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_TIMESTAMPNS,
            (&on as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

/// Reads what has arrived into `buf`, with the kernel's receive time of the
/// last byte read (`CLOCK_REALTIME` ns; TCP reports it per read).
async fn read_stamped(stream: &TcpStream, buf: &mut BytesMut) -> io::Result<(usize, Option<u64>)> {
    buf.reserve(256);
    loop {
        stream.readable().await?;
        match stream.try_io(Interest::READABLE, || recv_stamped(stream.as_raw_fd(), buf)) {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            r => return r,
        }
    }
}

fn recv_stamped(fd: RawFd, buf: &mut BytesMut) -> io::Result<(usize, Option<u64>)> {
    let spare = buf.spare_capacity_mut();
    let mut iov = libc::iovec {
        iov_base: spare.as_mut_ptr().cast(),
        iov_len: spare.len(),
    };
    let mut control = [0u64; 8];
    // SAFETY: msghdr is plain data; all-zero is its empty value.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = std::mem::size_of_val(&control) as _;
    // SAFETY: iov points at `buf`'s spare capacity, control at a local array.
    let n = unsafe { libc::recvmsg(fd, &mut msg, 0) };
    if n < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the kernel wrote `n` bytes into the spare capacity.
    unsafe { buf.set_len(buf.len() + n as usize) };
    let mut stamp = None;
    // SAFETY: the CMSG macros walk the control buffer the kernel filled in.
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(&msg);
        while !c.is_null() {
            if (*c).cmsg_level == libc::SOL_SOCKET && (*c).cmsg_type == libc::SCM_TIMESTAMPNS {
                let t: libc::timespec = std::ptr::read_unaligned(libc::CMSG_DATA(c).cast());
                stamp = Some(t.tv_sec as u64 * 1_000_000_000 + t.tv_nsec as u64);
            }
            c = libc::CMSG_NXTHDR(&msg, c);
        }
    }
    Ok((n as usize, stamp))
}

/// One device: connect, subscribe, then receive and acknowledge until `stop`.
/// `gate` bounds how many devices handshake at once.
pub async fn device(
    index: u32,
    cfg: DeviceConfig,
    shared: Arc<Devices>,
    gate: Arc<Semaphore>,
    stop: CancellationToken,
) {
    let mut buf = BytesMut::with_capacity(256);
    let permit = tokio::select! {
        p = gate.acquire_owned() => p,
        _ = stop.cancelled() => return,
    };
    let setup = tokio::select! {
        r = tokio::time::timeout(cfg.handshake_timeout, device_setup(&cfg, &mut buf)) => r,
        _ = stop.cancelled() => return,
    };
    drop(permit);
    let mut stream = match setup {
        Ok(Ok(s)) => s,
        Ok(Err(e)) => return shared.fail(format!("device {index}: {e}")),
        Err(_) => {
            return shared.fail(format!(
                "device {index}: no CONNACK/SUBACK within {:?}",
                cfg.handshake_timeout
            ))
        }
    };
    if let Err(e) = stamp_arrivals(&stream) {
        return shared.fail(format!("device {index}: SO_TIMESTAMPNS: {e}"));
    }
    shared.ready_ids.lock().expect("ready lock").push(index);
    shared.ready.fetch_add(1, Ordering::Relaxed);
    let ping_every = Duration::from_secs(cfg.keepalive_secs as u64 / 2);
    let mut next_ping = tokio::time::Instant::now() + ping_every;
    loop {
        tokio::select! {
            _ = stop.cancelled() => {
                let _ = tokio::time::timeout(Duration::from_secs(1), stream.write_all(&DISCONNECT)).await;
                return;
            }
            _ = tokio::time::sleep_until(next_ping) => {
                if stream.write_all(&PINGREQ).await.is_err() { break; }
                next_ping += ping_every;
            }
            r = read_stamped(&stream, &mut buf) => {
                let queued_ns = match r {
                    Ok((0, _)) | Err(_) => break,
                    Ok((_, t)) => t.map(clock::from_realtime_ns),
                };
                let mut acks: Vec<u8> = Vec::new();
                loop {
                    let (first, body) = match take(&mut buf) {
                        Ok(Some(p)) => p,
                        Ok(None) => break,
                        Err(_) => { shared.dropped.fetch_add(1, Ordering::Relaxed); return; }
                    };
                    if let Ok(Packet::Publish { qos, packet_id, payload }) = decode(first, &body) {
                        if qos > 0 {
                            acks.extend_from_slice(&puback(packet_id));
                        }
                        shared.on_publish(index, payload, queued_ns);
                    }
                }
                if !acks.is_empty() && stream.write_all(&acks).await.is_err() {
                    break;
                }
            }
        }
    }
    shared.dropped.fetch_add(1, Ordering::Relaxed);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn publish_round_trips() {
        let mut out = Vec::new();
        publish_into(
            &mut out,
            b"push/user/7",
            9,
            b"{\"t\":12,\"s\":3,\"p\":\"x\"}",
        );
        let mut buf = BytesMut::from(&out[..]);
        let (first, body) = take(&mut buf).unwrap().unwrap();
        assert!(buf.is_empty());
        let Packet::Publish {
            qos,
            packet_id,
            payload,
        } = decode(first, &body).unwrap()
        else {
            panic!("not a publish")
        };
        assert_eq!((qos, packet_id), (1, 9));
        assert_eq!(field(payload, b"\"t\":"), Some(12));
        assert_eq!(field(payload, b"\"s\":"), Some(3));
    }

    #[test]
    fn long_remaining_length_waits() {
        let mut out = Vec::new();
        publish_into(&mut out, b"t", 1, &[b'x'; 300]);
        let mut buf = BytesMut::from(&out[..100]);
        assert!(take(&mut buf).unwrap().is_none());
        buf.extend_from_slice(&out[100..]);
        assert!(take(&mut buf).unwrap().is_some());
    }
}
