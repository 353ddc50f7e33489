//! What a receipt costs the server in heap, per push: the same pushes with
//! and without `receipt: true` to devices that have not acknowledged them
//! yet (in flight), then once they have (kept). The whole server
//! in-process behind a counting allocator; devices on plain blocking
//! sockets.

#[path = "support/heap.rs"]
mod heap;
mod support;

use std::net::TcpStream;

use heap::{
    by_size, device, grown_by_size, live, puback, read_publish, runtime_and_settings, Counting,
};
use pushbridge::stats::Stats;
use rmpv::Value as Mp;
use serde_json::json;
use support::proxy::Backend;

#[global_allocator]
static ALLOC: Counting = Counting;

/// Heap bytes a receipt adds to an in-flight push: the record, the tag its
/// MQTT message carries. Issue 15 asks for at most 200 (185 measured; 321
/// before a user push's record was kept inline, 668 before the records
/// were compacted).
const MAX_BYTES_IN_FLIGHT: isize = 200;
/// And once acknowledged, kept to be answered (`receipts.max_bytes` bounds
/// the sum; 137 measured, 257 and 588 before).
const MAX_BYTES_KEPT: isize = 150;
const N: usize = 2000;

/// One push to each of `users` (answered, read by its device, not
/// acknowledged); returns the packet ids.
fn push_each(
    rt: &tokio::runtime::Runtime,
    backend: &mut Backend,
    devices: &mut [TcpStream],
    first_user: usize,
    receipt: bool,
) -> Vec<u16> {
    let options = json!({"receipt": receipt});
    let data = json!({"n": 1});
    let want = if receipt { 0x0b } else { 0x00 };
    (0..devices.len())
        .map(|i| {
            let user = Mp::from(first_user + i);
            let status = rt.block_on(async {
                match receipt {
                    true => backend.push_with(2, user, &data, &options).await,
                    false => backend.push(2, user, &data).await,
                }
            });
            assert_eq!(status, want);
            read_publish(&mut devices[i])
        })
        .collect()
}

fn wait(
    rt: &tokio::runtime::Runtime,
    stats: &std::sync::Arc<Stats>,
    cond: impl Fn(&Stats) -> bool,
) {
    rt.block_on(support::wait_for(stats, cond));
}

#[test]
fn a_receipt_costs_little_heap_per_push() {
    let (rt, mut settings) = runtime_and_settings();
    settings.receipts.enabled = true;
    let server = rt.block_on(support::server::start(settings));
    let stats = server.stats.clone();
    let addr = server.mqtt_addr;
    let mut backend = rt.block_on(Backend::connect(server.proxy_addr));
    // Users 0..N get pushes without receipts, N..2N with; 2N.. warm up.
    let mut plain: Vec<TcpStream> = (0..N).map(|i| device(addr, "d", i)).collect();
    let mut tracked: Vec<TcpStream> = (N..2 * N).map(|i| device(addr, "d", i)).collect();
    let mut warm: Vec<TcpStream> = (2 * N..2 * N + 100).map(|i| device(addr, "d", i)).collect();
    for receipt in [false, true] {
        let pkids = push_each(&rt, &mut backend, &mut warm, 2 * N, receipt);
        for (d, pkid) in warm.iter_mut().zip(pkids) {
            puback(d, pkid);
        }
    }
    // Routed and written per push; one per acknowledgement.
    let recorded = |n: u64| move |s: &Stats| s.receipts_recorded.get() == n;
    let acked = |n: u64| move |s: &Stats| s.mqtt_acked.get() == n;
    wait(&rt, &stats, |s| recorded(300)(s) && acked(200)(s));

    let start = live();
    let plain_ids = push_each(&rt, &mut backend, &mut plain, 0, false);
    let plain_allocs = live().1 - start.1;
    let plain_in_flight = live().0 - start.0;

    let sizes0 = by_size();
    let start = live();
    let tracked_ids = push_each(&rt, &mut backend, &mut tracked, N, true);
    wait(&rt, &stats, recorded(300 + 2 * N as u64));
    let tracked_allocs = live().1 - start.1;
    let tracked_in_flight = live().0 - start.0;
    let tracked_sizes = grown_by_size(&sizes0, &by_size(), N);

    let start = live().0;
    for (d, pkid) in plain.iter_mut().zip(plain_ids) {
        puback(d, pkid);
    }
    wait(&rt, &stats, acked(200 + N as u64));
    let plain_acked = live().0 - start;

    let start = live().0;
    for (d, pkid) in tracked.iter_mut().zip(tracked_ids) {
        puback(d, pkid);
    }
    wait(&rt, &stats, acked(200 + 2 * N as u64));
    wait(&rt, &stats, recorded(300 + 3 * N as u64));
    let tracked_acked = live().0 - start;

    let n = N as isize;
    let in_flight = (tracked_in_flight - plain_in_flight) / n;
    let kept = (tracked_in_flight + tracked_acked - plain_in_flight - plain_acked) / n;
    println!(
        "per push: {} heap bytes in flight without a receipt, {in_flight} more with one \
         ({:.1} more allocations); {kept} bytes per receipt kept after the acknowledgement",
        plain_in_flight / n,
        (tracked_allocs - plain_allocs) as f64 / N as f64
    );
    println!(
        "  live allocations per push with a receipt (its message too), by size: {tracked_sizes}"
    );
    assert_eq!(stats.receipts_dropped.get(), 0);
    assert!(
        in_flight <= MAX_BYTES_IN_FLIGHT,
        "a receipt adds {in_flight} heap bytes per in-flight push (budget {MAX_BYTES_IN_FLIGHT})"
    );
    assert!(
        kept <= MAX_BYTES_KEPT,
        "a kept receipt holds {kept} heap bytes (budget {MAX_BYTES_KEPT})"
    );
    drop((plain, tracked, warm, backend));
    rt.block_on(server.stop());
}
