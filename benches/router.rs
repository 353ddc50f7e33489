//! `router::route` for a user push and for a 100-user list, with a mix of
//! records (no record, APNs token, token with focus) as the registry returns.

use std::sync::Arc;

use criterion::{black_box, criterion_group, criterion_main, Criterion, Throughput};
use pushbridge::push::{Id, Push, Target, UserRecord};
use pushbridge::router::{route, user_targets};

fn data(alert: bool) -> Arc<serde_json::Map<String, serde_json::Value>> {
    let mut m = serde_json::Map::new();
    if alert {
        m.insert("alert".into(), "You have a new message".into());
    }
    m.insert("t".into(), 1_732_540_000u64.into());
    Arc::new(m)
}

fn record(i: u64) -> Option<UserRecord> {
    match i % 3 {
        0 => None,
        1 => Some(UserRecord {
            app_token: Some("ab".repeat(32)),
            app_ident: Some("com.example.app".into()),
            app_version: Some("produce".into()),
            app_focus: false,
        }),
        _ => Some(UserRecord {
            app_token: Some("cd".repeat(32)),
            app_ident: Some("com.example.app".into()),
            app_version: Some("develop".into()),
            app_focus: true,
        }),
    }
}

fn bench(c: &mut Criterion) {
    let mut g = c.benchmark_group("router");
    g.throughput(Throughput::Elements(1));
    for alert in [false, true] {
        let kind = if alert { "alert" } else { "silent" };
        let one = Push::new(Target::User(Id::from(42u64)), data(alert));
        let one_users = vec![(Id::from(42u64), None::<UserRecord>)];
        g.bench_function(format!("route user push ({kind}, no record)"), |b| {
            b.iter(|| route("push", black_box(&one), black_box(&one_users)))
        });
        let ids: Vec<Id> = (0..100u64).map(Id::from).collect();
        let list = Push::new(Target::Users(ids), data(alert));
        let users: Vec<(Id, Option<UserRecord>)> = user_targets(&list.target)
            .into_iter()
            .enumerate()
            .map(|(i, id)| (id, record(i as u64)))
            .collect();
        g.bench_function(
            format!("route 100-user list ({kind}, mixed records)"),
            |b| b.iter(|| route("push", black_box(&list), black_box(&users))),
        );
        g.bench_function(
            format!("user_targets + route 100-user list ({kind})"),
            |b| {
                b.iter(|| {
                    let ids = user_targets(black_box(&list.target));
                    let users: Vec<(Id, Option<UserRecord>)> = ids
                        .into_iter()
                        .enumerate()
                        .map(|(i, id)| (id, record(i as u64)))
                        .collect();
                    route("push", &list, &users)
                })
            },
        );
    }
    g.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
