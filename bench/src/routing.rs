//! `core`: the MQTT routing core in this process, no sockets. S offline
//! sessions subscribed to `push/user/<i>` (`Broker::attach_bench_sessions`),
//! then publishes to uniformly random i, each followed by draining that
//! session's queue as its connection would: route + enqueue + dequeue, with
//! queues that never grow (a drop would show as loss).

use std::fmt::Write as _;
use std::time::Instant;

use bytes::Bytes;
use pushbridge::mqtt::Broker;
use pushbridge::settings::MqttSettings;
use rand::{Rng, SeedableRng};

use crate::report::Row;
use crate::target::Sample;

/// Bytes glibc malloc has handed out and not taken back (arena + mmapped).
fn heap_bytes() -> i64 {
    // SAFETY: mallinfo2 only reads allocator statistics.
    let m = unsafe { libc::mallinfo2() };
    (m.uordblks + m.hblkhd) as i64
}

/// CPU time of the calling thread, seconds.
fn thread_cpu() -> f64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: ts is a valid out-pointer.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
    ts.tv_sec as f64 + ts.tv_nsec as f64 / 1e9
}

/// One measurement: `sessions` sessions, `publishes` publishes (blocking; run it off the runtime).
pub fn run(sessions: u64, publishes: u64, payload: usize) -> Row {
    let s = sessions.max(1) as usize;
    let settings = MqttSettings {
        max_queued: 16,
        ..MqttSettings::default()
    };
    let (broker, _events) = Broker::new(&settings);
    let me = Some(std::process::id());
    let (heap0, rss0) = (heap_bytes(), Sample::of(me).rss_kib);
    let t = Instant::now();
    let set = broker.attach_bench_sessions(s);
    let attach_secs = t.elapsed().as_secs_f64();
    let heap1 = heap_bytes();
    let body = Bytes::from(vec![b'x'; payload.max(1)]);
    let mut topic = String::with_capacity(32);
    // One message to each session first: the queue buffers a connection keeps exist from then on.
    for i in 0..s {
        topic.clear();
        let _ = write!(topic, "push/user/{i}");
        broker.publish(&topic, body.clone());
        set.drain(i);
    }
    let (heap2, rss2) = (heap_bytes(), Sample::of(me).rss_kib);
    let mut rng = rand::rngs::StdRng::seed_from_u64(0xc0de ^ sessions);
    let picks: Vec<u32> = (0..publishes)
        .map(|_| rng.random_range(0..s) as u32)
        .collect();
    let (mut routed, mut drained) = (0u64, 0u64);
    let (c0, t0) = (thread_cpu(), Instant::now());
    for &i in &picks {
        topic.clear();
        let _ = write!(topic, "push/user/{i}");
        routed += broker.publish(&topic, body.clone()) as u64;
        drained += set.drain(i as usize) as u64;
    }
    let secs = t0.elapsed().as_secs_f64();
    let cpu = thread_cpu() - c0;
    // Control: a bare hash lookup of the same topics in a map of S boxed keys,
    // to tell memory latency (grows with S for anything) from the broker's own work.
    let map: std::collections::HashMap<Box<str>, u32> = (0..s as u32)
        .map(|i| (format!("push/user/{i}").into_boxed_str(), i))
        .collect();
    let mut sum = 0u64;
    let c1 = thread_cpu();
    for &i in &picks {
        topic.clear();
        let _ = write!(topic, "push/user/{i}");
        sum += u64::from(*map.get(topic.as_str()).unwrap_or(&0));
    }
    let control_ns = (thread_cpu() - c1) * 1e9 / publishes.max(1) as f64;
    std::hint::black_box(sum);
    drop(map);
    let dropped = broker.stats().mqtt_dropped.get();
    let per = |b: i64| b as f64 / s as f64;
    let rss_per = match (rss0, rss2) {
        (Some(a), Some(b)) => Some(b.saturating_sub(a) as f64 * 1024.0 / s as f64),
        _ => None,
    };
    Row {
        workload: "core",
        target: "pushbridge".into(),
        param: sessions,
        messages: publishes,
        delivered: drained.min(routed),
        lost: publishes - routed.min(publishes),
        secs,
        rate: if secs > 0.0 {
            publishes as f64 / secs
        } else {
            0.0
        },
        cpu_secs: Some(cpu),
        rss_before_kib: rss0,
        rss_after_kib: rss2,
        setup_secs: Some(attach_secs),
        heap_per_item: Some(per(heap1 - heap0)),
        heap_per_item_warm: Some(per(heap2 - heap0)),
        rss_per_item: rss_per,
        note: {
            let control = format!("control: bare HashMap lookup {control_ns:.0} ns");
            if dropped > 0 {
                format!("{dropped} dropped at the queue bound; {control}")
            } else {
                control
            }
        },
        ..Row::default()
    }
}
