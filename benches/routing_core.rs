//! The MQTT routing core at scale, no sockets: `Broker::publish` to one of S
//! offline sessions subscribed to `push/user/<i>` (uniformly random i), each
//! publish followed by draining that session's queue the way its connection
//! would, so queues never grow and nothing is dropped. Heap bytes per
//! session (a counting allocator, live bytes after / before attaching) are
//! printed to stderr. Sizes: `ROUTING_CORE_SIZES=1000,100000,1000000` (default).

use std::alloc::{GlobalAlloc, Layout, System};
use std::fmt::Write as _;
use std::sync::atomic::{AtomicIsize, Ordering};

use bytes::Bytes;
use criterion::{black_box, criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use pushbridge::mqtt::Broker;
use pushbridge::settings::MqttSettings;
use rand::{Rng, SeedableRng};

struct Counting;

static LIVE: AtomicIsize = AtomicIsize::new(0);

// SAFETY: forwards to the system allocator unchanged; only counts bytes.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        LIVE.fetch_add(l.size() as isize, Ordering::Relaxed);
        System.alloc(l)
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        LIVE.fetch_sub(l.size() as isize, Ordering::Relaxed);
        System.dealloc(p, l)
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, new: usize) -> *mut u8 {
        LIVE.fetch_add(new as isize - l.size() as isize, Ordering::Relaxed);
        System.realloc(p, l, new)
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

fn sizes() -> Vec<usize> {
    std::env::var("ROUTING_CORE_SIZES")
        .unwrap_or_else(|_| "1000,100000,1000000".into())
        .split(',')
        .filter_map(|s| s.trim().parse().ok())
        .collect()
}

fn bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("routing_core");
    g.throughput(Throughput::Elements(1));
    let payload = Bytes::from(vec![b'x'; 100]);
    for s in sizes() {
        let settings = MqttSettings {
            max_queued: 16,
            ..MqttSettings::default()
        };
        let (broker, _rx) = Broker::new(&settings);
        let before = LIVE.load(Ordering::Relaxed);
        let sessions = broker.attach_bench_sessions(s);
        let attached = LIVE.load(Ordering::Relaxed);
        let mut topic = String::new();
        for i in 0..s {
            topic.clear();
            let _ = write!(topic, "push/user/{i}");
            broker.publish(&topic, payload.clone());
            sessions.drain(i);
        }
        let warm = LIVE.load(Ordering::Relaxed);
        eprintln!(
            "routing_core/{s}: heap {:.0} bytes/session attached, {:.0} after one message each",
            (attached - before) as f64 / s as f64,
            (warm - before) as f64 / s as f64
        );
        let mut rng = rand::rngs::StdRng::seed_from_u64(s as u64);
        g.bench_function(BenchmarkId::new("publish+drain", s), |b| {
            b.iter(|| {
                let i = rng.random_range(0..s);
                topic.clear();
                let _ = write!(topic, "push/user/{i}");
                let n = broker.publish(black_box(&topic), payload.clone());
                sessions.drain(i);
                n
            })
        });
        assert_eq!(broker.stats().mqtt_dropped.get(), 0);
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
