//! Proxy codec: `check` + `parse` of a typical frame (a user push with a
//! ~100-byte data map), as the proxy does for every frame a backend sends.

use criterion::{black_box, criterion_group, criterion_main, Criterion, Throughput};
use pushbridge::wire::frame::{check, encode, parse};
use rmpv::Value as Mp;

fn typical_data() -> Mp {
    Mp::Map(vec![
        (Mp::from("alert"), Mp::from("You have a new message")),
        (Mp::from("t"), Mp::from(1_732_540_000_000_000_000u64)),
        (Mp::from("badge"), Mp::from(3)),
        (Mp::from("sound"), Mp::from("default")),
        (Mp::from("p"), Mp::from("x".repeat(32).as_str())),
    ])
}

fn bench(c: &mut Criterion) {
    let user = encode(2, &Mp::from(4_200_042), &typical_data());
    let list = encode(
        3,
        &Mp::Array((0..100).map(Mp::from).collect()),
        &typical_data(),
    );
    let mut g = c.benchmark_group("proxy_frame");
    g.throughput(Throughput::Elements(1));
    g.bench_function("check+parse user push", |b| {
        b.iter(|| {
            let n = check(black_box(&user), 1 << 20).unwrap().unwrap();
            parse(&user[4..4 + n]).unwrap()
        })
    });
    g.bench_function("check+parse 100-user list", |b| {
        b.iter(|| {
            let n = check(black_box(&list), 1 << 20).unwrap().unwrap();
            parse(&list[4..4 + n]).unwrap()
        })
    });
    g.bench_function("encode user push", |b| {
        let data = typical_data();
        let id = Mp::from(4_200_042);
        b.iter(|| encode(2, black_box(&id), black_box(&data)))
    });
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
