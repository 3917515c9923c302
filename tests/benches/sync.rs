//! The L1 kept in sync across instances, in one run on a `redis-server` the benchmark
//! starts:
//! - how long after instance A's invalidation instance B's L1 has dropped the entry
//!   (B and A are two services on one Redis, each with its own subscriber), p50 and
//!   p99, against a raw redis-rs `PUBLISH` received by a raw subscriber, timed the
//!   same way;
//! - an L1 hit in front of Redis against a hit of a memory-only service.
//!
//! Run: `cargo bench -p tests --bench sync`

use std::hint::black_box;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use cache_redis::RedisBackend;
use cache_runtime::{CachingService, MemoryBackend};
use criterion::Criterion;
use futures_util::StreamExt;
use tests::redis_server::RedisServer;
use tests::{product, time_loop, Product};

#[cache_runtime::cached(name = "sync.value")]
async fn value(id: u64) -> u64 {
    id
}

#[cache_runtime::cached(name = "sync.product")]
async fn hit_fn(id: u64, region: &str) -> Product {
    let _ = region;
    product(id)
}

const ROUNDS: usize = 3_000;

async fn instance(url: &str) -> CachingService {
    CachingService::builder()
        .backend(
            RedisBackend::builder(url)
                .key_prefix("sync")
                .l1(MemoryBackend::new().max_entries(100_000))
                .build()
                .await
                .unwrap(),
        )
        .build()
        .unwrap()
}

/// Percentile of sorted samples, in microseconds.
fn pct(sorted: &[Duration], p: f64) -> f64 {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i].as_secs_f64() * 1e6
}

/// Microseconds from A's invalidation (its start, and its return) to B's L1 not
/// holding the entry any more.
async fn ours(url: &str) -> (Vec<Duration>, Vec<Duration>) {
    let (a, b) = (instance(url).await, instance(url).await);
    let (mut from_start, mut from_return) = (Vec::new(), Vec::new());
    for i in 0..ROUNDS as u64 {
        b.scope(value(i)).await;
        assert!(b.scope(cache_runtime::peek!(value(i))).await.is_some());
        let start = Instant::now();
        a.scope(cache_runtime::invalidate!(value(i))).await;
        let returned = Instant::now();
        while b.scope(cache_runtime::peek!(value(i))).await.is_some() {
            tokio::task::yield_now().await;
        }
        from_start.push(start.elapsed());
        from_return.push(returned.elapsed());
    }
    assert_eq!(b.stats().sync.received, ROUNDS as u64);
    (from_start, from_return)
}

/// A raw `PUBLISH` from a multiplexed connection to a raw subscriber: from sending it
/// to the subscriber having it.
async fn raw(url: &str) -> Vec<Duration> {
    let client = redis::Client::open(url).unwrap();
    let (mut sink, mut stream) = client.get_async_pubsub().await.unwrap().split();
    sink.subscribe("raw").await.unwrap();
    let seen = Arc::new(AtomicU64::new(0));
    let s = seen.clone();
    tokio::spawn(async move {
        while let Some(msg) = stream.next().await {
            let n: u64 = msg.get_payload().unwrap();
            s.store(n, Ordering::Release);
        }
    });
    let mut con = client.get_multiplexed_async_connection().await.unwrap();
    let mut samples = Vec::new();
    for i in 1..=ROUNDS as u64 {
        let start = Instant::now();
        let _: i64 = redis::cmd("PUBLISH")
            .arg("raw")
            .arg(i)
            .query_async(&mut con)
            .await
            .unwrap();
        while seen.load(Ordering::Acquire) != i {
            tokio::task::yield_now().await;
        }
        samples.push(start.elapsed());
    }
    samples
}

fn latency(rt: &tokio::runtime::Runtime, url: &str) {
    // alternate the two, so that both see the same machine
    let (mut start, mut ret, mut raw_samples) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..3 {
        let (s, r) = rt.block_on(ours(url));
        start.extend(s);
        ret.extend(r);
        raw_samples.extend(rt.block_on(raw(url)));
    }
    for v in [&mut start, &mut ret, &mut raw_samples] {
        v.sort();
    }
    println!(
        "invalidation crossing to another instance's L1 ({} rounds each, µs):",
        start.len()
    );
    println!("  {:<52} {:>8} {:>8} {:>8}", "", "p50", "p99", "max");
    for (name, s) in [
        ("A's invalidation returned -> B's L1 dropped it", &ret),
        ("A's invalidation started -> B's L1 dropped it", &start),
        ("raw PUBLISH sent -> raw subscriber has it", &raw_samples),
    ] {
        println!(
            "  {name:<52} {:>8.1} {:>8.1} {:>8.1}",
            pct(s, 0.5),
            pct(s, 0.99),
            pct(s, 1.0)
        );
    }
    println!(
        "  ratio p50 (from return / raw): {:.2}x; (from start / raw): {:.2}x",
        pct(&ret, 0.5) / pct(&raw_samples, 0.5),
        pct(&start, 0.5) / pct(&raw_samples, 0.5)
    );
}

fn hits(c: &mut Criterion, url: &str) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let l1 = rt.block_on(instance(url));
    let memory = CachingService::builder()
        .backend(MemoryBackend::new().max_entries(100_000))
        .build()
        .unwrap();
    let region = String::from("eu-west");
    for svc in [&l1, &memory] {
        rt.block_on(svc.scope(hit_fn(42, &region)));
    }
    let mut g = c.benchmark_group("hit");
    for (name, svc) in [
        ("L1 in front of Redis (synced)", &l1),
        ("memory only", &memory),
    ] {
        g.bench_function(name, |b| {
            b.iter_custom(|iters| {
                rt.block_on(svc.scope(time_loop(iters, || {
                    hit_fn(black_box(42), black_box(&region))
                })))
            })
        });
    }
    g.finish();
    for svc in [&l1, &memory] {
        assert_eq!(
            svc.stats().total.executions,
            1,
            "every measured call was a hit"
        );
    }
}

fn main() {
    let server = RedisServer::start();
    let url = server.url();
    // One thread: the measuring loop yields to the subscribers' tasks instead of
    // competing with them (and with redis-server) for this machine's two cores.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    latency(&rt, &url);
    let mut c = Criterion::default()
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(3))
        .configure_from_args();
    hits(&mut c, &url);
    c.final_summary();
}
