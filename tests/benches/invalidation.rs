//! Invalidation and dependencies:
//! - `invalidate_dependency` with 1 and with 10,000 dependent entries;
//! - a miss with no dependency, with one `add_dependency`, and one that calls a
//!   cached function (linking to its entry and its dependency).
//!
//! Run: `cargo bench -p tests --bench invalidation`

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use cache_runtime::{add_dependency, cached, invalidate_dependency, CachingService, MemoryBackend};
use criterion::{criterion_group, criterion_main, BatchSize, Criterion};
use tests::time_loop;

#[cached]
async fn dependent(group: u32, id: u64) -> u64 {
    add_dependency(format!("group:{group}"));
    id
}

#[cached]
async fn miss_plain(id: u64) -> u64 {
    id
}

#[cached]
async fn miss_with_dependency(id: u64) -> u64 {
    add_dependency("shared");
    id
}

#[cached]
async fn leaf(id: u64) -> u64 {
    add_dependency("leaf");
    id
}

#[cached]
async fn miss_with_nested_call(id: u64) -> u64 {
    leaf(0).await + id
}

fn invalidation(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let svc = CachingService::builder()
        .backend(MemoryBackend::new().max_entries(100_000))
        .build()
        .unwrap();
    let group = AtomicU64::new(0);

    let mut g = c.benchmark_group("invalidate_dependency");
    for dependents in [1u64, 10_000] {
        g.bench_function(format!("{dependents} dependents"), |b| {
            b.iter_batched(
                || {
                    // a fresh group of entries depending on one key (not timed)
                    let grp = group.fetch_add(1, Ordering::Relaxed) as u32;
                    rt.block_on(svc.scope(async {
                        for id in 0..dependents {
                            dependent(grp, id).await;
                        }
                    }));
                    format!("group:{grp}")
                },
                |key| rt.block_on(svc.scope(invalidate_dependency(key))),
                BatchSize::PerIteration,
            )
        });
    }
    g.finish();

    // Every call is a miss: a new id each time.
    let next = AtomicU64::new(0);
    let mut g = c.benchmark_group("miss");
    let mut miss =
        |name: &str, f: fn(u64) -> std::pin::Pin<Box<dyn std::future::Future<Output = u64>>>| {
            g.bench_function(name, |b| {
                b.iter_custom(|iters| {
                    rt.block_on(
                        svc.scope(time_loop(iters, || f(next.fetch_add(1, Ordering::Relaxed)))),
                    )
                })
            });
        };
    miss("no dependency", |id| Box::pin(miss_plain(id)));
    miss("one add_dependency", |id| {
        Box::pin(miss_with_dependency(id))
    });
    miss("a nested cached call (hit)", |id| {
        Box::pin(miss_with_nested_call(id))
    });
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().warm_up_time(Duration::from_secs(1)).measurement_time(Duration::from_secs(3)).sample_size(30);
    targets = invalidation
}
criterion_main!(benches);
