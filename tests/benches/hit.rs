//! A cache hit of `#[cached]` next to its peers, in one run: raw `quick_cache` get with
//! a pre-built key, `moka::future::Cache::get`, and the `cached` crate's async
//! `#[cached]` hit. Every function takes `(u64, &str)` and returns a ~100-byte value.
//!
//! Async calls are timed in a loop of awaits inside one `block_on`; the raw get is
//! also timed in that loop, to show what the loop itself costs.
//!
//! Run: `cargo bench -p tests --bench hit`

use std::hint::black_box;
use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion};
use tests::{product, time_loop, Product};

#[path = "common/hit_fns.rs"]
mod hit_fns;
use hit_fns::{ours, ours_plain, theirs};

fn time_async<F, Fut>(rt: &tokio::runtime::Runtime, iters: u64, f: F) -> Duration
where
    F: FnMut() -> Fut,
    Fut: std::future::Future,
{
    rt.block_on(time_loop(iters, f))
}

fn hit(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let region = String::from("eu-west");
    let key = format!("get_product:v1(42,{region:?})");

    let raw = quick_cache::sync::Cache::<String, Product>::new(10_000);
    raw.insert(key.clone(), product(42));
    let moka = moka::future::Cache::<String, Product>::new(10_000);
    rt.block_on(moka.insert(key.clone(), product(42)));
    rt.block_on(ours(42, &region));
    rt.block_on(theirs(42, &region));
    ours_plain(42, &region);

    let mut g = c.benchmark_group("hit");
    g.bench_function("quick_cache get (pre-built key)", |b| {
        b.iter(|| black_box(raw.get(black_box(key.as_str()))))
    });
    g.bench_function("quick_cache get, in the async loop", |b| {
        b.iter_custom(|iters| time_async(&rt, iters, || async { raw.get(black_box(key.as_str())) }))
    });
    g.bench_function("cache_runtime #[cached] async fn", |b| {
        b.iter_custom(|iters| time_async(&rt, iters, || ours(black_box(42), black_box(&region))))
    });
    g.bench_function("cache_runtime #[cached] fn", |b| {
        b.iter(|| black_box(ours_plain(black_box(42), black_box(&region))))
    });
    g.bench_function("moka future get", |b| {
        b.iter_custom(|iters| time_async(&rt, iters, || moka.get(black_box(&key))))
    });
    g.bench_function("cached #[cached] async", |b| {
        b.iter_custom(|iters| time_async(&rt, iters, || theirs(black_box(42), black_box(&region))))
    });
    g.finish();

    let stats = cache_runtime::stats();
    assert_eq!(stats.total.executions, 2, "every measured call was a hit");
}

criterion_group! {
    name = benches;
    config = Criterion::default().warm_up_time(Duration::from_secs(1)).measurement_time(Duration::from_secs(3));
    targets = hit
}
criterion_main!(benches);
