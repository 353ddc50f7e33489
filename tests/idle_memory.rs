//! What an idle, subscribed device costs the server in heap: the whole
//! server in-process behind a counting allocator, devices connected from
//! plain blocking sockets (which allocate nothing on the heap).

#[path = "support/heap.rs"]
mod heap;
mod support;

use std::net::TcpStream;

use heap::{
    by_size, device, grown_by_size, live, runtime_and_settings, Counting, MAX_BYTES_IDLE_DEVICE,
};

#[global_allocator]
static ALLOC: Counting = Counting;

const MAX_ALLOCS_PER_DEVICE: isize = 12;

#[test]
fn an_idle_subscribed_device_costs_little_heap() {
    let (rt, settings) = runtime_and_settings();
    let server = rt.block_on(support::server::start(settings));
    let addr = server.mqtt_addr;
    // Warm up: the maps and the runtime's slabs exist before measuring.
    let mut devices: Vec<TcpStream> = (0..100).map(|i| device(addr, "idle", i)).collect();
    const N: usize = 2000;
    let sizes0 = by_size();
    let (bytes0, allocs0) = live();
    devices.reserve(N);
    let reserved = (live().0 - bytes0, 1);
    devices.extend((100..100 + N).map(|i| device(addr, "idle", i)));
    let (bytes, allocs) = live();
    let (bytes, allocs) = (bytes - bytes0 - reserved.0, allocs - allocs0 - reserved.1);
    let (per_device, allocs_per_device) = (bytes / N as isize, allocs as f64 / N as f64);
    println!("idle device: {per_device} heap bytes in {allocs_per_device:.1} allocations");
    println!(
        "  live allocations per device by size: {}",
        grown_by_size(&sizes0, &by_size(), N)
    );
    assert!(
        per_device <= MAX_BYTES_IDLE_DEVICE,
        "an idle device holds {per_device} heap bytes (budget {MAX_BYTES_IDLE_DEVICE})"
    );
    assert!(
        allocs_per_device <= MAX_ALLOCS_PER_DEVICE as f64,
        "an idle device holds {allocs_per_device:.1} allocations (budget {MAX_ALLOCS_PER_DEVICE})"
    );
    drop(devices);
    rt.block_on(server.stop());
}
