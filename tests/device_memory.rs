//! What the app's devices cost the server in heap once they have been
//! sent a push: the whole server in-process behind a counting allocator (a
//! test binary of its own, so no other test allocates meanwhile), devices
//! on plain blocking sockets.

#[path = "support/heap.rs"]
mod heap;
mod support;

use std::net::TcpStream;

use heap::{
    by_size, device_with_will, grown_by_size, live, puback, read_publish, runtime_and_settings,
    Counting, MAX_BYTES_IDLE_DEVICE,
};
use support::proxy::Backend;

#[global_allocator]
static ALLOC: Counting = Counting;

/// What the app's devices look like: a last will on the status topic, and
/// pushes now and then. Once a push is acknowledged such a device holds
/// its will and nothing else more than an idle one: no message buffers, no
/// read buffer kept by the will (each was over 500 bytes).
#[test]
fn a_device_with_a_will_that_was_sent_a_push_costs_little_more() {
    const WILL: (&str, &[u8]) = ("push/app/status", br#"{"focus":false}"#);
    /// Its `Box`, the topic and the payload, each rounded up a little.
    const WILL_BYTES: isize = 128;
    let (rt, settings) = runtime_and_settings();
    let server = rt.block_on(support::server::start(settings));
    let (addr, stats) = (server.mqtt_addr, server.stats.clone());
    let mut backend = rt.block_on(Backend::connect(server.proxy_addr));
    let data = serde_json::json!({"n": 1});
    let mut push_and_ack = |devices: &mut [TcpStream], first: usize| {
        for (i, d) in devices.iter_mut().enumerate() {
            let user = rmpv::Value::from(first + i);
            assert_eq!(rt.block_on(backend.push(2, user, &data)), 0x00);
            let pkid = read_publish(d);
            puback(d, pkid);
        }
    };
    const N: usize = 2000;
    let mut warm: Vec<TcpStream> = (N..N + 100)
        .map(|i| device_with_will(addr, "w", i, Some(WILL)))
        .collect();
    push_and_ack(&mut warm, N);
    let acked = |n: u64| move |s: &pushbridge::stats::Stats| s.mqtt_acked.get() == n;
    rt.block_on(support::wait_for(&stats, acked(100)));

    let sizes0 = by_size();
    let (bytes0, allocs0) = live();
    let mut devices = Vec::with_capacity(N);
    let reserved = live().0 - bytes0;
    devices.extend((0..N).map(|i| device_with_will(addr, "w", i, Some(WILL))));
    push_and_ack(&mut devices, 0);
    rt.block_on(support::wait_for(&stats, acked(100 + N as u64)));
    let (bytes, allocs) = live();
    let per_device = (bytes - bytes0 - reserved) / N as isize;
    let allocs_per_device = (allocs - allocs0 - 1) as f64 / N as f64;
    println!("device with a will, push acknowledged: {per_device} heap bytes in {allocs_per_device:.1} allocations");
    println!(
        "  live allocations per device by size: {}",
        grown_by_size(&sizes0, &by_size(), N)
    );
    let budget = MAX_BYTES_IDLE_DEVICE + WILL_BYTES;
    assert!(
        per_device <= budget,
        "such a device holds {per_device} heap bytes (an idle one's budget and its will: {budget})"
    );
    drop((devices, warm));
    rt.block_on(server.stop());
}
