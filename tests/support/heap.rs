//! Heap accounting for the memory tests: a counting global allocator (live
//! bytes and allocations), and devices on plain blocking sockets, which
//! allocate nothing on the heap, so what is counted is the server's.
//! Included with `#[path]` by a test file that installs the allocator.
#![allow(dead_code)]

use std::alloc::{GlobalAlloc, Layout, System};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicIsize, Ordering};

pub struct Counting;

/// Heap budget per idle, subscribed device (the target is 2 KiB of
/// RSS, which also holds the allocator's own overhead per allocation).
pub const MAX_BYTES_IDLE_DEVICE: isize = 1728;

static LIVE_BYTES: AtomicIsize = AtomicIsize::new(0);
static LIVE_ALLOCS: AtomicIsize = AtomicIsize::new(0);
/// Live allocations by size (8-byte classes up to 4 KiB; the last holds the rest).
static BY_SIZE: [AtomicIsize; 513] = [const { AtomicIsize::new(0) }; 513];

fn class(size: usize) -> usize {
    (size.div_ceil(8)).min(512)
}

// SAFETY: forwards to the system allocator; only counts.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LIVE_BYTES.fetch_add(layout.size() as isize, Ordering::Relaxed);
        LIVE_ALLOCS.fetch_add(1, Ordering::Relaxed);
        BY_SIZE[class(layout.size())].fetch_add(1, Ordering::Relaxed);
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE_BYTES.fetch_sub(layout.size() as isize, Ordering::Relaxed);
        LIVE_ALLOCS.fetch_sub(1, Ordering::Relaxed);
        BY_SIZE[class(layout.size())].fetch_sub(1, Ordering::Relaxed);
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new: usize) -> *mut u8 {
        LIVE_BYTES.fetch_add(new as isize - layout.size() as isize, Ordering::Relaxed);
        BY_SIZE[class(layout.size())].fetch_sub(1, Ordering::Relaxed);
        BY_SIZE[class(new)].fetch_add(1, Ordering::Relaxed);
        unsafe { System.realloc(ptr, layout, new) }
    }
}

/// (live heap bytes, live allocations) now.
pub fn live() -> (isize, isize) {
    (
        LIVE_BYTES.load(Ordering::SeqCst),
        LIVE_ALLOCS.load(Ordering::SeqCst),
    )
}

/// Live allocations per 8-byte size class now.
pub fn by_size() -> Vec<isize> {
    BY_SIZE.iter().map(|c| c.load(Ordering::SeqCst)).collect()
}

/// What grew between two [`by_size`] readings, per `n` items: `"<size>B
/// x<count>"` for each class that grew by at least 0.05 an item.
pub fn grown_by_size(before: &[isize], after: &[isize], n: usize) -> String {
    let grown = after
        .iter()
        .zip(before)
        .enumerate()
        .filter_map(|(c, (a, b))| {
            let per = (a - b) as f64 / n as f64;
            (per >= 0.05).then(|| format!("{}B x{per:.2}", c * 8))
        });
    grown.collect::<Vec<_>>().join(", ")
}

/// CONNECT (3.1.1, clean session, keep-alive 300 s) as `<prefix>-<i>`, then
/// SUBSCRIBE QoS 1 to `push/user/<i>`; returns once SUBACK is read.
pub fn device(addr: SocketAddr, prefix: &str, i: usize) -> TcpStream {
    device_with_will(addr, prefix, i, None)
}

/// [`device`], with a QoS 0 last will (topic, payload) if given.
pub fn device_with_will(
    addr: SocketAddr,
    prefix: &str,
    i: usize,
    will: Option<(&str, &[u8])>,
) -> TcpStream {
    let mut s = TcpStream::connect(addr).expect("connect");
    let id = format!("{prefix}-{i}");
    let field = |out: &mut Vec<u8>, b: &[u8]| {
        out.extend_from_slice(&(b.len() as u16).to_be_bytes());
        out.extend_from_slice(b);
    };
    let mut body = b"\0\x04MQTT\x04\x02\x01\x2c".to_vec();
    field(&mut body, id.as_bytes());
    if let Some((topic, payload)) = will {
        // Connect flags, after the protocol name and level: will, QoS 0.
        body[7] |= 0x04;
        field(&mut body, topic.as_bytes());
        field(&mut body, payload);
    }
    let mut connect = vec![0x10, body.len() as u8];
    connect.extend_from_slice(&body);
    let topic = format!("push/user/{i}");
    let mut subscribe = vec![0x82, (2 + 2 + topic.len() + 1) as u8, 0, 1];
    subscribe.extend_from_slice(&(topic.len() as u16).to_be_bytes());
    subscribe.extend_from_slice(topic.as_bytes());
    subscribe.push(1);
    s.write_all(&connect).expect("CONNECT");
    let mut connack = [0u8; 4];
    s.read_exact(&mut connack).expect("CONNACK");
    assert_eq!(connack, [0x20, 2, 0, 0], "CONNACK");
    s.write_all(&subscribe).expect("SUBSCRIBE");
    let mut suback = [0u8; 5];
    s.read_exact(&mut suback).expect("SUBACK");
    assert_eq!(suback, [0x90, 3, 0, 1, 1], "SUBACK");
    s
}

/// Reads one QoS 1 PUBLISH and returns its packet id (not acknowledged).
pub fn read_publish(s: &mut TcpStream) -> u16 {
    s.set_read_timeout(Some(crate::support::WAIT))
        .expect("timeout");
    let mut byte = [0u8; 1];
    s.read_exact(&mut byte).expect("PUBLISH");
    assert_eq!(byte[0] & 0xf6, 0x32, "a QoS 1 PUBLISH, got {:#x}", byte[0]);
    let (mut len, mut shift) = (0usize, 0);
    loop {
        s.read_exact(&mut byte).expect("length");
        len |= usize::from(byte[0] & 0x7f) << shift;
        shift += 7;
        if byte[0] & 0x80 == 0 {
            break;
        }
    }
    let mut body = [0u8; 1024];
    assert!(len <= body.len(), "PUBLISH of {len} bytes");
    s.read_exact(&mut body[..len]).expect("body");
    let topic_len = usize::from(u16::from_be_bytes([body[0], body[1]]));
    u16::from_be_bytes([body[2 + topic_len], body[3 + topic_len]])
}

/// Acknowledges packet `pkid` (PUBACK).
pub fn puback(s: &mut TcpStream, pkid: u16) {
    let [hi, lo] = pkid.to_be_bytes();
    s.write_all(&[0x40, 2, hi, lo]).expect("PUBACK");
}

/// A two-worker runtime and the test server's settings with connection
/// limits lifted, for thousands of devices from one address at once.
pub fn runtime_and_settings() -> (tokio::runtime::Runtime, pushbridge::settings::Settings) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let mut settings = crate::support::server::settings(None);
    settings.mqtt.max_connections_per_ip = 0;
    settings.mqtt.connect_rate = 1_000_000;
    settings.mqtt.connect_burst = 1_000_000;
    (rt, settings)
}
