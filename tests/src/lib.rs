//! Support code for the integration tests.

pub mod instance;
pub mod redis_cluster;
pub mod redis_server;
pub mod rounds;

use std::sync::atomic::{AtomicUsize, Ordering};

/// The value of the benchmarks: about 100 bytes, two integers and two short strings.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct Product {
    /// Id.
    pub id: u64,
    /// Price.
    pub price_cents: u64,
    /// Name.
    pub name: String,
    /// Category path.
    pub category: String,
}

/// The benchmarks' product `id`.
pub fn product(id: u64) -> Product {
    Product {
        id,
        price_cents: 1999,
        name: "Stainless steel water bottle, 750 ml".to_owned(),
        category: "kitchen/drinkware/bottles".to_owned(),
    }
}

/// Times `iters` sequential awaits of `f()`, for benchmarks: timing a whole loop inside
/// one `block_on` keeps the executor's entry cost out of each iteration.
pub async fn time_loop<F, Fut>(iters: u64, mut f: F) -> std::time::Duration
where
    F: FnMut() -> Fut,
    Fut: std::future::Future,
{
    let start = std::time::Instant::now();
    for _ in 0..iters {
        std::hint::black_box(f().await);
    }
    start.elapsed()
}

/// Times `iters` sequential raw redis-rs `GET`s of `key`, for benchmarks.
pub async fn time_raw_gets(
    con: &mut redis::aio::MultiplexedConnection,
    key: &str,
    iters: u64,
) -> std::time::Duration {
    let start = std::time::Instant::now();
    for _ in 0..iters {
        let value: Option<Vec<u8>> = redis::cmd("GET")
            .arg(key)
            .query_async(con)
            .await
            .expect("GET");
        std::hint::black_box(value);
    }
    start.elapsed()
}

/// The median of `values` (reordered), for benchmarks.
pub fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    let n = values.len();
    (values[(n - 1) / 2] + values[n / 2]) / 2.0
}

/// Counts how many times a function body ran.
#[derive(Debug, Default)]
pub struct Runs(AtomicUsize);

impl Runs {
    /// A counter at zero.
    pub const fn new() -> Self {
        Runs(AtomicUsize::new(0))
    }
    /// Counts one run.
    pub fn hit(&self) {
        self.0.fetch_add(1, Ordering::SeqCst);
    }
    /// Runs so far.
    pub fn get(&self) -> usize {
        self.0.load(Ordering::SeqCst)
    }
}

/// The README's Rust examples, compiled and run as doc tests.
#[doc = include_str!("../../README.md")]
#[cfg(doctest)]
pub struct Readme;

/// A service of its own on the Redis at `url`, under `prefix`, with or without the
/// dependency graph.
pub async fn redis_service(
    url: &str,
    prefix: &str,
    dependencies: bool,
) -> cache_runtime::CachingService {
    cache_runtime::CachingService::builder()
        .backend(
            cache_redis::RedisBackend::builder(url)
                .key_prefix(prefix)
                .dependencies(dependencies)
                .build()
                .await
                .unwrap(),
        )
        .build()
        .unwrap()
}
