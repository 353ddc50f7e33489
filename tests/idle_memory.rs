//! What an idle, subscribed device costs the server in heap: the whole
//! server in-process behind a counting allocator, devices connected from
//! plain blocking sockets (which allocate nothing on the heap).

use std::alloc::{GlobalAlloc, Layout, System};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::atomic::{AtomicIsize, Ordering};

mod support;

struct Counting;

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

#[global_allocator]
static ALLOC: Counting = Counting;

/// Heap budget per idle device (the target is 2 KiB of RSS, which
/// also holds the allocator's own overhead per allocation).
const MAX_BYTES_PER_DEVICE: isize = 1728;
const MAX_ALLOCS_PER_DEVICE: isize = 12;

/// CONNECT (3.1.1, clean session, keep-alive 300 s) then SUBSCRIBE QoS 1 to
/// the device's own topic; returns once SUBACK is read.
fn device(addr: SocketAddr, i: usize) -> TcpStream {
    let mut s = TcpStream::connect(addr).expect("connect");
    let id = format!("idle-{i}");
    let mut connect = vec![0x10, (10 + 2 + id.len()) as u8, 0, 4];
    connect.extend_from_slice(b"MQTT\x04\x02\x01\x2c");
    connect.extend_from_slice(&(id.len() as u16).to_be_bytes());
    connect.extend_from_slice(id.as_bytes());
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

#[test]
fn an_idle_subscribed_device_costs_little_heap() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let mut settings = support::server::settings(None);
    settings.mqtt.max_connections_per_ip = 0;
    settings.mqtt.connect_rate = 1_000_000;
    settings.mqtt.connect_burst = 1_000_000;
    let server = rt.block_on(support::server::start(settings));
    let addr = server.mqtt_addr;
    // Warm up: the maps and the runtime's slabs exist before measuring.
    let mut devices: Vec<TcpStream> = (0..100).map(|i| device(addr, i)).collect();
    const N: usize = 2000;
    let sizes0: Vec<isize> = BY_SIZE.iter().map(|c| c.load(Ordering::SeqCst)).collect();
    let (bytes0, allocs0) = (
        LIVE_BYTES.load(Ordering::SeqCst),
        LIVE_ALLOCS.load(Ordering::SeqCst),
    );
    devices.reserve(N);
    let reserved = (LIVE_BYTES.load(Ordering::SeqCst) - bytes0, 1);
    devices.extend((100..100 + N).map(|i| device(addr, i)));
    let bytes = LIVE_BYTES.load(Ordering::SeqCst) - bytes0 - reserved.0;
    let allocs = LIVE_ALLOCS.load(Ordering::SeqCst) - allocs0 - reserved.1;
    let (per_device, allocs_per_device) = (bytes / N as isize, allocs as f64 / N as f64);
    println!("idle device: {per_device} heap bytes in {allocs_per_device:.1} allocations");
    let per_class = BY_SIZE
        .iter()
        .zip(&sizes0)
        .enumerate()
        .filter_map(|(c, (now, before))| {
            let n = (now.load(Ordering::SeqCst) - before) as f64 / N as f64;
            (n >= 0.05).then(|| format!("{}B x{n:.2}", c * 8))
        });
    println!(
        "  live allocations per device by size: {}",
        per_class.collect::<Vec<_>>().join(", ")
    );
    assert!(
        per_device <= MAX_BYTES_PER_DEVICE,
        "an idle device holds {per_device} heap bytes (budget {MAX_BYTES_PER_DEVICE})"
    );
    assert!(
        allocs_per_device <= MAX_ALLOCS_PER_DEVICE as f64,
        "an idle device holds {allocs_per_device:.1} allocations (budget {MAX_ALLOCS_PER_DEVICE})"
    );
    drop(devices);
    rt.block_on(server.stop());
}
