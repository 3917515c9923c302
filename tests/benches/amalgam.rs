//! Side by side with `amalgam-cache` 0.4 (a port of FusionCache to Rust), in one run,
//! on a `redis-server` the benchmark starts. Both cache the same ~100-byte value in
//! MessagePack, on one current-thread runtime:
//! - a memory hit (ours: an in-memory service; theirs: `Cache::get_or_set` of a key
//!   in its L1);
//! - an L2 hit on Redis, Redis the only tier (ours: `RedisBackend` without an L1;
//!   theirs: `RedisDistributedCache` with the memory tier skipped);
//! - a miss on Redis: a new key each call, a body that returns at once, the value
//!   written to Redis (ours queues the write; theirs, by default, awaits it);
//! - a fail-safe fallback in memory: a key whose entry expired, a body that fails,
//!   the expired value answers.
//!
//! Run: `cargo bench -p tests --bench amalgam`

use std::hint::black_box;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use amalgam::provider::{
    DistributedCache, DistributedSerializer, MessagePackSerializer, RedisDistributedCache,
};
use amalgam::{Cache, EntryOptions, FactoryError};
use cache_redis::RedisBackend;
use cache_runtime::{cached, CachingService};
use criterion::{criterion_group, criterion_main, Criterion};
use tests::redis_server::RedisServer;
use tests::{median, product, Product};

#[cached(name = "amalgam.product", ttl = "1h")]
async fn ours(id: u64) -> Product {
    product(id)
}

/// While set, the fallback's body fails.
static FAILING: AtomicBool = AtomicBool::new(false);

#[cached(
    name = "amalgam.fallback",
    ttl = "1ms",
    fail_safe = "1h",
    fail_safe_throttle = "1h"
)]
async fn ours_fallback(id: u64) -> Result<Product, String> {
    match FAILING.load(Ordering::Relaxed) {
        true => Err("database down".into()),
        false => Ok(product(id)),
    }
}

/// Theirs: `get_or_set` of `p:{id}`.
async fn theirs(cache: &Cache<Product>, id: u64) -> Product {
    cache
        .get_or_set(
            format!("p:{id}"),
            move |ctx: amalgam::FactoryContext<Product>| async move {
                Ok::<_, FactoryError>(ctx.value(product(id)))
            },
        )
        .await
        .expect("a value")
}

/// Theirs with fail-safe: `f:{id}`, fresh for 1 ms, kept 1 h.
async fn theirs_fallback(cache: &Cache<Product>, id: u64) -> Product {
    let options = EntryOptions::new(Duration::from_millis(1)).with_fail_safe(
        true,
        Some(Duration::from_secs(3600)),
        Some(Duration::from_secs(3600)),
    );
    cache
        .get_or_set(
            format!("f:{id}"),
            move |ctx: amalgam::FactoryContext<Product>| async move {
                match FAILING.load(Ordering::Relaxed) {
                    true => Err(ctx.fail("database down")),
                    false => Ok(ctx.value(product(id))),
                }
            },
        )
        .options(move |_| options)
        .await
        .expect("the fallback")
}

fn amalgam(c: &mut Criterion) {
    let server = RedisServer::start();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let hour = EntryOptions::new(Duration::from_secs(3600));
    let (memory, redis, their_memory, their_redis) = rt.block_on(async {
        let memory = CachingService::builder().build().unwrap();
        let backend = RedisBackend::builder(server.url())
            .key_prefix("ours")
            .build()
            .await
            .unwrap();
        let redis = CachingService::builder().backend(backend).build().unwrap();
        let their_memory: Cache<Product> = Cache::builder()
            .default_options(hour.clone())
            .try_build()
            .unwrap();
        let l2 = RedisDistributedCache::connect(server.url()).await.unwrap();
        let their_redis: Cache<Product> = Cache::builder()
            .key_prefix("theirs:")
            .default_options(hour.clone().with_skip_memory(true, true))
            .distributed(Arc::new(l2) as Arc<dyn DistributedCache>)
            .serializer(Arc::new(MessagePackSerializer) as Arc<dyn DistributedSerializer<Product>>)
            .try_build()
            .unwrap();
        // the hits' keys are stored
        memory.scope(ours(1)).await;
        redis.scope(ours(1)).await;
        theirs(&their_memory, 1).await;
        theirs(&their_redis, 1).await;
        tokio::time::sleep(Duration::from_millis(200)).await; // (our write lands)
        (memory, redis, their_memory, their_redis)
    });

    let mut g = c.benchmark_group("amalgam memory hit");
    g.bench_function("#[cached]", |b| {
        b.iter_custom(|iters| rt.block_on(memory.scope(tests::time_loop(iters, || ours(1)))))
    });
    g.bench_function("amalgam get_or_set", |b| {
        b.iter_custom(|iters| rt.block_on(tests::time_loop(iters, || theirs(&their_memory, 1))))
    });
    g.finish();

    let mut g = c.benchmark_group("amalgam L2 hit");
    g.bench_function("#[cached]", |b| {
        b.iter_custom(|iters| rt.block_on(redis.scope(tests::time_loop(iters, || ours(1)))))
    });
    g.bench_function("amalgam get_or_set", |b| {
        b.iter_custom(|iters| rt.block_on(tests::time_loop(iters, || theirs(&their_redis, 1))))
    });
    g.finish();

    let next = AtomicU64::new(1_000);
    let mut g = c.benchmark_group("amalgam miss");
    g.bench_function("#[cached]", |b| {
        b.iter_custom(|iters| {
            rt.block_on(redis.scope(tests::time_loop(iters, || {
                ours(next.fetch_add(1, Ordering::Relaxed))
            })))
        })
    });
    g.bench_function("amalgam get_or_set", |b| {
        b.iter_custom(|iters| {
            rt.block_on(tests::time_loop(iters, || {
                theirs(&their_redis, next.fetch_add(1, Ordering::Relaxed))
            }))
        })
    });
    g.finish();

    // Each measured call is a key's first call after its entry expired, with the
    // body failing: the keys are stored (not timed), left to expire, then read.
    let mut g = c.benchmark_group("amalgam fail-safe fallback");
    // (in chunks that the in-process tiers hold whole)
    let fallbacks = |iters: u64, ours_side: bool| {
        let mut total = Duration::ZERO;
        let mut left = iters;
        while left > 0 {
            let n = left.min(1_000);
            left -= n;
            // the same keys each time, removed first (a full tier would evict new
            // entries before they are read)
            let first = 0;
            total += rt.block_on(async {
                FAILING.store(false, Ordering::Relaxed);
                for id in first..first + n {
                    match ours_side {
                        true => {
                            memory
                                .scope(async {
                                    cache_runtime::invalidate!(ours_fallback(id)).await
                                })
                                .await;
                            drop(memory.scope(ours_fallback(id)).await);
                        }
                        false => {
                            let _ = their_memory.remove(format!("f:{id}")).await;
                            drop(theirs_fallback(&their_memory, id).await);
                        }
                    }
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
                FAILING.store(true, Ordering::Relaxed);
                let start = Instant::now();
                for id in first..first + n {
                    match ours_side {
                        true => {
                            let v = memory.scope(ours_fallback(id)).await;
                            black_box(v.expect("the fallback"));
                        }
                        false => {
                            black_box(theirs_fallback(&their_memory, id).await);
                        }
                    }
                }
                start.elapsed()
            });
        }
        total
    };
    g.bench_function("#[cached]", |b| {
        b.iter_custom(|iters| fallbacks(iters, true))
    });
    g.bench_function("amalgam get_or_set", |b| {
        b.iter_custom(|iters| fallbacks(iters, false))
    });
    g.finish();
    let s = memory.stats().total;
    assert!(s.fallbacks_served > 0, "{s:?}");

    // The rows above run one after the other; runs that alternate (each first in
    // turn) give the ratios.
    let rounds = 21;
    let mut ratios = [Vec::new(), Vec::new(), Vec::new(), Vec::new()];
    for round in 0..rounds {
        let mut secs = [0.0; 8];
        for i in 0..8 {
            let which = (round + i) % 8;
            let ops = match which / 2 {
                0 => 20_000,
                3 => 2_000,
                _ => 1_000,
            };
            secs[which] = match which {
                0 => rt.block_on(memory.scope(tests::time_loop(ops, || ours(1)))),
                1 => rt.block_on(tests::time_loop(ops, || theirs(&their_memory, 1))),
                2 => rt.block_on(redis.scope(tests::time_loop(ops, || ours(1)))),
                3 => rt.block_on(tests::time_loop(ops, || theirs(&their_redis, 1))),
                4 => rt.block_on(redis.scope(tests::time_loop(ops, || {
                    ours(next.fetch_add(1, Ordering::Relaxed))
                }))),
                5 => rt.block_on(tests::time_loop(ops, || {
                    theirs(&their_redis, next.fetch_add(1, Ordering::Relaxed))
                })),
                6 => fallbacks(ops, true),
                _ => fallbacks(ops, false),
            }
            .as_secs_f64();
        }
        for (k, r) in ratios.iter_mut().enumerate() {
            r.push(secs[2 * k + 1] / secs[2 * k]);
        }
    }
    println!(
        "amalgam-cache 0.4 against #[cached], alternating runs (median of {rounds}): \
         their time a call over ours: memory hit {:.2}x, L2 hit {:.2}x, miss on Redis {:.2}x, \
         fail-safe fallback {:.2}x",
        median(&mut ratios[0]),
        median(&mut ratios[1]),
        median(&mut ratios[2]),
        median(&mut ratios[3]),
    );
    FAILING.store(false, Ordering::Relaxed);
    rt.block_on(async {
        redis.shutdown().await;
        let _ = their_redis.shutdown().await;
        let _ = their_memory.shutdown().await;
    });
    drop(server);
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3))
        .sample_size(20);
    targets = amalgam
}
criterion_main!(benches);
