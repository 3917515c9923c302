//! The Redis tier against a raw redis-rs GET of the same bytes, in one run, on a
//! `redis-server` the benchmark starts:
//! - an L2 hit (no in-process tier), sequential and with 64 concurrent tasks on one
//!   multiplexed connection, with the `cached` crate's Redis hit alongside, and a raw
//!   GET that also decodes the value (what any cache of encoded values must do);
//! - a miss (one GET that finds nothing, the body, a queued SET) against the body plus
//!   one GET, and the same miss with `distributed_single_flight(true)`.
//!
//! Run: `cargo bench -p tests --bench redis`

use std::hint::black_box;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use cache_redis::RedisBackend;
use cache_runtime::CachingService;
use criterion::{criterion_group, criterion_main, Criterion};
use tests::redis_server::RedisServer;
use tests::{median, product, time_loop, time_raw_gets, Product};

#[cache_runtime::cached(name = "bench.product")]
async fn ours(id: u64, region: &str) -> Product {
    let _ = region;
    product(id)
}

#[derive(Debug, Clone)]
pub struct BenchError(String);

#[cached::macros::concurrent_cached(
    redis = true,
    ttl_secs = 3600,
    cache_prefix_block = r##"{ "bench-cached:" }"##,
    key = "String",
    convert = r##"{ format!("{id}:{region}") }"##,
    map_error = r##"|e| BenchError(format!("{e:?}"))"##
)]
async fn theirs(id: u64, region: &str) -> Result<Product, BenchError> {
    let _ = region;
    Ok(product(id))
}

/// The same value, from a body whose future is large (4 KB held across an await, as
/// a database driver's query future can be): a remote hit must not pay for it.
#[cache_runtime::cached(name = "bench.large")]
async fn large(id: u64, region: &str) -> Product {
    let _ = region;
    let buf = [id as u8; 4096];
    tokio::task::yield_now().await;
    black_box(&buf);
    product(id)
}

/// Owned parameters, plain and with `fail_safe` and `eager_refresh` set: the cost of
/// those options on an L2 hit.
#[cache_runtime::cached(name = "bench.owned", ttl = "1h")]
async fn owned(id: u64, region: String) -> Result<Product, String> {
    let _ = region;
    Ok(product(id))
}

#[cache_runtime::cached(
    name = "bench.resilient",
    ttl = "1h",
    fail_safe = "1h",
    eager_refresh = 0.8
)]
async fn resilient(id: u64, region: String) -> Result<Product, String> {
    let _ = region;
    Ok(product(id))
}

#[cache_runtime::cached(name = "bench.fresh")]
async fn fresh(id: u64) -> u64 {
    id
}

impl std::fmt::Display for BenchError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// The Redis server as the only tier: every call reads Redis.
async fn backend(url: &str) -> RedisBackend {
    RedisBackend::builder(url)
        .key_prefix("bench")
        .build()
        .await
        .unwrap()
}

fn key_of(id: u64) -> String {
    format!(r#"bench:2:bench.product:v1({id},"eu-west")"#)
}

async fn raw_get(con: &mut redis::aio::MultiplexedConnection, key: &str) -> Option<Vec<u8>> {
    redis::cmd("GET").arg(key).query_async(con).await.unwrap()
}

/// Spreads `iters` operations over 64 spawned tasks (`task(id, operations)` makes task
/// `id`'s future) and returns the time `iters` operations took.
fn in_64_tasks<F, Fut>(rt: &tokio::runtime::Runtime, iters: u64, task: F) -> Duration
where
    F: Fn(u64, u64) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let per_task = iters.div_ceil(64);
    rt.block_on(async {
        let start = Instant::now();
        let tasks: Vec<_> = (0..64u64)
            .map(|id| tokio::spawn(task(id, per_task)))
            .collect();
        for t in tasks {
            t.await.unwrap();
        }
        start
            .elapsed()
            .mul_f64(iters as f64 / (per_task * 64) as f64)
    })
}

fn redis(c: &mut Criterion) {
    let server = RedisServer::start();
    // read by the `cached` crate when it creates its store, on the first call
    std::env::set_var("CACHED_REDIS_CONNECTION_STRING", server.url());
    let region = "eu-west";

    // Sequential latency: one task on a current-thread runtime.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let (svc, mut con) = rt.block_on(async {
        let svc = CachingService::builder()
            .backend(backend(&server.url()).await)
            .build()
            .unwrap();
        // ids 0..64 are stored, for the concurrent runs too
        for id in 0..64 {
            svc.scope(ours(id, region)).await;
            svc.scope(large(id, region)).await;
        }
        svc.scope(owned(42, region.to_owned())).await.unwrap();
        svc.scope(resilient(42, region.to_owned())).await.unwrap();
        svc.shutdown().await;
        theirs(42, region).await.unwrap();
        let client = redis::Client::open(server.url()).unwrap();
        (
            svc,
            client.get_multiplexed_async_connection().await.unwrap(),
        )
    });
    let key = key_of(42);
    assert!(
        rt.block_on(raw_get(&mut con, &key)).is_some(),
        "the cache wrote {key}"
    );

    // Latency on a loaded 2-core machine varies from one second to the next: many
    // samples over a long time.
    let mut g = c.benchmark_group("redis hit");
    g.measurement_time(Duration::from_secs(6)).sample_size(40);
    g.bench_function("raw redis-rs GET, sequential", |b| {
        b.iter_custom(|iters| rt.block_on(time_raw_gets(&mut con, &key, iters)))
    });
    g.bench_function("#[cached] L2 hit, sequential", |b| {
        b.iter_custom(|iters| rt.block_on(svc.scope(time_loop(iters, || ours(42, region)))))
    });
    g.bench_function("cached crate Redis hit, sequential", |b| {
        b.iter_custom(|iters| rt.block_on(time_loop(iters, || theirs(42, region))))
    });
    g.bench_function("#[cached] L2 hit, owned parameters, sequential", |b| {
        b.iter_custom(|iters| {
            rt.block_on(svc.scope(time_loop(iters, || owned(42, region.to_owned()))))
        })
    });
    g.bench_function(
        "#[cached] L2 hit, owned parameters, fail_safe and eager_refresh, sequential",
        |b| {
            b.iter_custom(|iters| {
                rt.block_on(svc.scope(time_loop(iters, || resilient(42, region.to_owned()))))
            })
        },
    );
    g.finish();

    // Throughput: 64 tasks on a multi-threaded runtime, each reading its own key (so
    // single flight does not merge them), on one multiplexed connection. The service
    // is installed as the process's default, as an application does in `main`.
    let mt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let mut g = c.benchmark_group("redis hit, 64 tasks");
    g.measurement_time(Duration::from_secs(10)).sample_size(40);
    let mt_con = mt.block_on(async {
        CachingService::builder()
            .backend(backend(&server.url()).await)
            .install()
            .unwrap();
        let client = redis::Client::open(server.url()).unwrap();
        client.get_multiplexed_async_connection().await.unwrap()
    });
    // What task `id` of the 64 runs in each row: `ops` reads of its own key.
    let raw_task = |id: u64, ops: u64| {
        let mut con = mt_con.clone();
        async move {
            let key = key_of(id);
            for _ in 0..ops {
                black_box(raw_get(&mut con, &key).await);
            }
        }
    };
    let decode_task = |id: u64, ops: u64| {
        let mut con = mt_con.clone();
        async move {
            let key = key_of(id);
            for _ in 0..ops {
                let bytes = raw_get(&mut con, &key).await.unwrap();
                let (value, _deadline, _links): (Product, u64, Vec<String>) =
                    cache_runtime::__private::decode(&bytes).unwrap();
                black_box(value);
            }
        }
    };
    let ours_task = |id: u64, ops: u64| async move {
        for _ in 0..ops {
            black_box(ours(id, "eu-west").await);
        }
    };
    let large_task = |id: u64, ops: u64| async move {
        for _ in 0..ops {
            black_box(large(id, "eu-west").await);
        }
    };
    g.bench_function("raw redis-rs GET, 64 tasks", |b| {
        b.iter_custom(|iters| in_64_tasks(&mt, iters, raw_task))
    });
    g.bench_function("raw redis-rs GET + decoding the value, 64 tasks", |b| {
        b.iter_custom(|iters| in_64_tasks(&mt, iters, decode_task))
    });
    g.bench_function("#[cached] L2 hit, 64 tasks", |b| {
        b.iter_custom(|iters| in_64_tasks(&mt, iters, ours_task))
    });
    g.finish();

    // The rows above run one after the other, and this machine's throughput drifts
    // by 10-20% over tens of seconds: their ratio is not reliable. Runs of the three
    // that alternate every half second (each first in turn) are.
    let rounds = 41;
    let ops = 64 * 1024;
    let (mut ours_ratios, mut decode_ratios, mut large_ratios) =
        (Vec::new(), Vec::new(), Vec::new());
    for round in 0..rounds {
        let mut secs = [0.0; 4];
        for i in 0..4 {
            let which = (round + i) % 4;
            secs[which] = match which {
                0 => in_64_tasks(&mt, ops, raw_task),
                1 => in_64_tasks(&mt, ops, decode_task),
                2 => in_64_tasks(&mt, ops, ours_task),
                _ => in_64_tasks(&mt, ops, large_task),
            }
            .as_secs_f64();
        }
        decode_ratios.push(secs[0] / secs[1]);
        ours_ratios.push(secs[0] / secs[2]);
        large_ratios.push(secs[0] / secs[3]);
    }
    println!(
        "redis hit, 64 tasks, alternating runs: median throughput against the raw GET: \
         #[cached] L2 hit {:.2}x, the same with a 4 KB body future {:.2}x, \
         raw GET + decoding {:.2}x ({rounds} rounds of {ops} operations each)",
        median(&mut ours_ratios),
        median(&mut large_ratios),
        median(&mut decode_ratios),
    );
    assert_eq!(
        cache_runtime::stats().total.executions,
        0,
        "every measured call was an L2 hit"
    );

    let next = AtomicU64::new(1_000_000);
    let mut g = c.benchmark_group("redis miss");
    g.measurement_time(Duration::from_secs(6)).sample_size(40);
    g.bench_function("body + one raw GET", |b| {
        b.iter_custom(|iters| {
            rt.block_on(async {
                let start = Instant::now();
                for _ in 0..iters {
                    let k = format!("absent:{}", next.fetch_add(1, Ordering::Relaxed));
                    black_box(raw_get(&mut con, &k).await);
                }
                start.elapsed()
            })
        })
    });
    g.bench_function("#[cached] miss (GET, body, queued SET)", |b| {
        b.iter_custom(|iters| {
            rt.block_on(svc.scope(time_loop(iters, || {
                fresh(next.fetch_add(1, Ordering::Relaxed))
            })))
        })
    });
    // the same miss with one body per key across instances: the read is the script
    // that takes the key's lock, and the lock's release is queued behind the write
    let single_flight = rt.block_on(async {
        let backend = RedisBackend::builder(server.url())
            .key_prefix("bench-sf")
            .distributed_single_flight(true)
            .build()
            .await
            .unwrap();
        CachingService::builder().backend(backend).build().unwrap()
    });
    g.bench_function(
        "#[cached] miss with distributed_single_flight (script, body, queued SET and release)",
        |b| {
            b.iter_custom(|iters| {
                rt.block_on(single_flight.scope(time_loop(iters, || {
                    fresh(next.fetch_add(1, Ordering::Relaxed))
                })))
            })
        },
    );
    g.finish();
    // As for the 64 tasks above: runs that alternate (each first in turn), 2,000
    // misses each, and an L2 hit of a stored key with the option against a plain one.
    rt.block_on(async {
        single_flight.scope(ours(1, region)).await;
        // (its write lands)
        tokio::time::sleep(Duration::from_millis(200)).await;
    });
    let rounds = 31;
    let ops = 2_000;
    // the floor of a miss by hand: the body, one raw GET, and a raw SET of ~100 bytes
    // sent behind the call (a task on a connection of its own, not awaited)
    let writes = rt.block_on(async {
        redis::Client::open(server.url())
            .unwrap()
            .get_multiplexed_async_connection()
            .await
            .unwrap()
    });
    let mut ratios = [Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new()];
    for round in 0..rounds {
        let mut secs = [0.0; 6];
        for i in 0..6 {
            let which = (round + i) % 6;
            secs[which] = rt
                .block_on(async {
                    match which {
                        0 => {
                            let start = Instant::now();
                            for _ in 0..ops {
                                let k = format!("absent:{}", next.fetch_add(1, Ordering::Relaxed));
                                black_box(raw_get(&mut con, &k).await);
                            }
                            start.elapsed()
                        }
                        1 => {
                            svc.scope(time_loop(ops, || {
                                fresh(next.fetch_add(1, Ordering::Relaxed))
                            }))
                            .await
                        }
                        2 => {
                            single_flight
                                .scope(time_loop(ops, || {
                                    fresh(next.fetch_add(1, Ordering::Relaxed))
                                }))
                                .await
                        }
                        3 => svc.scope(time_loop(ops, || ours(1, region))).await,
                        4 => {
                            single_flight
                                .scope(time_loop(ops, || ours(1, region)))
                                .await
                        }
                        _ => {
                            let start = Instant::now();
                            for _ in 0..ops {
                                let k = format!("absent:{}", next.fetch_add(1, Ordering::Relaxed));
                                black_box(raw_get(&mut con, &k).await);
                                let mut w = writes.clone();
                                tokio::spawn(async move {
                                    let _: redis::RedisResult<()> = redis::cmd("SET")
                                        .arg(k)
                                        .arg([7u8; 100].as_slice())
                                        .arg("PX")
                                        .arg(60_000)
                                        .query_async(&mut w)
                                        .await;
                                });
                            }
                            start.elapsed()
                        }
                    }
                })
                .as_secs_f64();
        }
        ratios[0].push(secs[1] / secs[0]);
        ratios[1].push(secs[2] / secs[0]);
        ratios[2].push(secs[4] / secs[3]);
        ratios[3].push(secs[1] / secs[5]);
        ratios[4].push(secs[2] / secs[5]);
    }
    println!(
        "redis miss, alternating runs: median time against body + one raw GET: \
         #[cached] miss {:.2}x, with distributed_single_flight {:.2}x; \
         against body + one raw GET + a raw SET sent behind: {:.2}x and {:.2}x; \
         an L2 hit with distributed_single_flight against a plain one {:.2}x \
         ({rounds} rounds of {ops} calls each)",
        median(&mut ratios[0]),
        median(&mut ratios[1]),
        median(&mut ratios[3]),
        median(&mut ratios[4]),
        median(&mut ratios[2]),
    );
    rt.block_on(single_flight.shutdown());
    rt.block_on(svc.shutdown());
    mt.block_on(cache_runtime::shutdown());
    drop(server);
}

criterion_group! {
    name = benches;
    config = Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3))
        .sample_size(20);
    targets = redis
}
criterion_main!(benches);
