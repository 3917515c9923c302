//! The dependency graph in Redis (`RedisBackend::dependencies(true)`), against raw
//! redis-rs commands, in one run on a `redis-server` the benchmark starts:
//! - invalidating a dependency that 1,000 entries depend on (one script) against a
//!   pipelined `DEL` of the same 1,000 keys, and against the least a script keeping
//!   this graph does (read the reverse set, delete the values and their links);
//! - a miss with a dependency (read with the invalidation count, body, queued
//!   conditional write with links) against a miss without one on a backend without
//!   the graph (`GET`, body, queued `SET`);
//! - an L2 hit of an entry with dependencies against a raw `GET` of the same key.
//!
//! Run: `cargo bench -p tests --bench graph`

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use cache_runtime::{add_dependency, CachingService};
use criterion::{criterion_group, criterion_main, Criterion};
use tests::redis_server::RedisServer;
use tests::{median, product, time_loop, time_raw_gets, Product};

#[cache_runtime::cached(name = "graph.dependent")]
async fn dependent(id: u64, round: u64) -> u64 {
    add_dependency(format!("shared:{round}"));
    id
}

#[cache_runtime::cached(name = "graph.linked")]
async fn linked(id: u64) -> Product {
    add_dependency(format!("product:{id}"));
    product(id)
}

#[cache_runtime::cached(name = "graph.plain")]
async fn plain(id: u64) -> Product {
    product(id)
}

async fn service(url: &str, dependencies: bool) -> CachingService {
    let prefix = if dependencies { "graph" } else { "flat" };
    tests::redis_service(url, prefix, dependencies).await
}

const DEPENDENTS: u64 = 1_000;

/// The least any script keeping this graph does for the same invalidation: read the
/// reverse set (the dependents' value keys), delete the values and their links;
/// nothing else (no walk, no markers, no other links, no publication).
fn floor_script() -> redis::Script {
    redis::Script::new(
        r"
local m = redis.call('SMEMBERS', KEYS[1])
redis.call('UNLINK', unpack(m))
redis.call('HDEL', KEYS[2], unpack(m))
redis.call('DEL', KEYS[1])
",
    )
}

fn graph(c: &mut Criterion) {
    let server = RedisServer::start();
    let url = server.url();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let (with, without, mut con) = rt.block_on(async {
        let client = redis::Client::open(url.as_str()).unwrap();
        (
            service(&url, true).await,
            service(&url, false).await,
            client.get_multiplexed_async_connection().await.unwrap(),
        )
    });

    let mut g = c.benchmark_group("invalidate 1,000 dependents");
    g.measurement_time(Duration::from_secs(6)).sample_size(20);
    let round = AtomicU64::new(0);
    let (floor_script, floor_con) = (floor_script(), con.clone());
    // One invalidation of 1,000 fresh dependents, by the cache or by the floor script.
    let invalidation = |floor: bool| {
        let r = round.fetch_add(1, Ordering::Relaxed);
        let (mut con, floor_script) = (floor_con.clone(), &floor_script);
        rt.block_on(with.scope(async move {
            for id in 0..DEPENDENTS {
                dependent(id, r).await;
            }
            cache_runtime::shutdown().await;
            if !floor {
                let start = Instant::now();
                cache_runtime::invalidate_dependency(format!("shared:{r}")).await;
                return start.elapsed();
            }
            let mut call = floor_script.prepare_invoke();
            call.key(format!("graph:g:rev:d:shared:{r}"))
                .key("graph:g:links");
            let start = Instant::now();
            let () = call.invoke_async(&mut con).await.unwrap();
            let took = start.elapsed();
            let (links, values): (u64, Vec<String>) = redis::pipe()
                .cmd("HLEN")
                .arg("graph:g:links")
                .cmd("KEYS")
                .arg("graph:*:graph.dependent:*")
                .query_async(&mut con)
                .await
                .unwrap();
            assert_eq!((links, values.len()), (0, 0), "the floor deleted all");
            took
        }))
    };
    g.bench_function("invalidate_dependency (one script)", |b| {
        b.iter_custom(|iters| (0..iters).map(|_| invalidation(false)).sum())
    });
    g.bench_function(
        "floor: a script that only reads the reverse set and deletes",
        |b| b.iter_custom(|iters| (0..iters).map(|_| invalidation(true)).sum()),
    );
    let value = vec![7u8; 100];
    g.bench_function("raw pipelined DEL of the 1,000 keys", |b| {
        b.iter_custom(|iters| {
            rt.block_on(async {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    let mut set = redis::pipe();
                    for id in 0..DEPENDENTS {
                        set.cmd("SET").arg(format!("raw:{id}")).arg(&value).ignore();
                    }
                    let () = set.query_async(&mut con).await.unwrap();
                    let mut del = redis::pipe();
                    for id in 0..DEPENDENTS {
                        del.cmd("DEL").arg(format!("raw:{id}")).ignore();
                    }
                    let start = Instant::now();
                    let () = del.query_async(&mut con).await.unwrap();
                    total += start.elapsed();
                }
                total
            })
        })
    });
    g.finish();
    // The rows above run one after the other while this machine's speed drifts:
    // alternating runs of the two (each first in turn) give a steadier ratio.
    let (rounds, each) = (21, 5);
    let mut ratios = Vec::new();
    for r in 0..rounds {
        let mut secs = [0.0; 2];
        for i in 0..2 {
            let floor = (r + i) % 2 == 1;
            let took: Duration = (0..each).map(|_| invalidation(floor)).sum();
            secs[usize::from(floor)] = took.as_secs_f64();
        }
        ratios.push(secs[0] / secs[1]);
    }
    println!(
        "invalidate 1,000 dependents, alternating runs: median time of invalidate_dependency \
         against the floor script: {:.2}x ({rounds} rounds of {each} each)",
        median(&mut ratios)
    );

    let mut g = c.benchmark_group("graph miss");
    g.measurement_time(Duration::from_secs(6)).sample_size(40);
    let next = AtomicU64::new(1_000_000);
    g.bench_function("miss without dependencies (GET, body, queued SET)", |b| {
        b.iter_custom(|iters| {
            rt.block_on(without.scope(time_loop(iters, || {
                plain(next.fetch_add(1, Ordering::Relaxed))
            })))
        })
    });
    g.bench_function("miss with a dependency, dependencies(true)", |b| {
        b.iter_custom(|iters| {
            rt.block_on(with.scope(time_loop(iters, || {
                linked(next.fetch_add(1, Ordering::Relaxed))
            })))
        })
    });
    g.finish();

    rt.block_on(async {
        with.scope(linked(42)).await;
        with.shutdown().await;
        without.shutdown().await;
    });
    let key = "graph:2:graph.linked:v1(42)";
    let found: Option<Vec<u8>> = rt
        .block_on(redis::cmd("GET").arg(key).query_async(&mut con))
        .unwrap();
    assert!(found.is_some(), "the cache wrote {key}");
    let mut g = c.benchmark_group("graph hit");
    g.measurement_time(Duration::from_secs(6)).sample_size(40);
    g.bench_function("raw redis-rs GET, sequential", |b| {
        b.iter_custom(|iters| rt.block_on(time_raw_gets(&mut con, key, iters)))
    });
    g.bench_function("L2 hit with dependencies, sequential", |b| {
        b.iter_custom(|iters| rt.block_on(with.scope(time_loop(iters, || linked(42)))))
    });
    g.finish();

    // Sequential latency drifts by 10-20% between the rows above; runs of the two that
    // alternate (each first in turn) give a steadier ratio.
    let (rounds, ops) = (41, 400);
    let mut ratios = Vec::new();
    for round in 0..rounds {
        let mut secs = [0.0; 2];
        for i in 0..2 {
            let which = (round + i) % 2;
            secs[which] = match which {
                0 => rt.block_on(time_raw_gets(&mut con, key, ops)),
                _ => rt.block_on(with.scope(time_loop(ops, || linked(42)))),
            }
            .as_secs_f64();
        }
        ratios.push(secs[1] / secs[0]);
    }
    println!(
        "graph hit, alternating runs: median time of an L2 hit with dependencies against \
         a raw GET: {:.3}x ({rounds} rounds of {ops} calls each)",
        median(&mut ratios)
    );
}

criterion_group! {
    name = benches;
    config = Criterion::default().warm_up_time(Duration::from_secs(1));
    targets = graph
}
criterion_main!(benches);
