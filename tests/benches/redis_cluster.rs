//! The Redis tier on a 3-master Redis Cluster the benchmark starts, against raw
//! redis-rs cluster `GET`s of the same bytes, in one run: an L2 hit (no in-process
//! tier) sequential, and 64 concurrent tasks; and invalidating a dependency of 1,000
//! entries (`dependencies(true)`) on the cluster against the same on one
//! `redis-server`. Each comparison alternates its two
//! sides in short runs (each first in turn) and reports the median ratio, since this
//! machine's speed drifts by 10-20% over tens of seconds.
//!
//! Run: `cargo bench -p tests --bench redis_cluster`

use std::hint::black_box;
use std::time::{Duration, Instant};

use cache_redis::RedisBackend;
use cache_runtime::CachingService;
use redis::cluster_async::ClusterConnection;
use tests::redis_cluster::RedisCluster;
use tests::{median, product, Product};

#[cache_runtime::cached(name = "bench.product")]
async fn ours(id: u64, region: &str) -> Product {
    let _ = region;
    product(id)
}

/// Task `i`'s id: ids far apart, so that the keys spread over the slots (keys that
/// differ in one digit have close CRC16 hashes).
fn id_of(i: u64) -> u64 {
    i * 104_729
}

#[cache_runtime::cached(name = "bench.dependent")]
async fn dependent(id: u64, round: u64) -> u64 {
    cache_runtime::add_dependency(format!("shared:{round}"));
    id
}

const DEPENDENTS: u64 = 1_000;

fn key_of(id: u64) -> String {
    format!(r#"bench:2:bench.product:v1({id},"eu-west")"#)
}

async fn raw_get(con: &mut ClusterConnection, key: &str) -> Option<Vec<u8>> {
    redis::cmd("GET").arg(key).query_async(con).await.unwrap()
}

/// Runs `ops` operations spread over `tasks` spawned tasks (`task(id, n)` makes task
/// `id`'s future); returns the time taken.
fn in_tasks<F, Fut>(rt: &tokio::runtime::Runtime, tasks: u64, ops: u64, task: F) -> Duration
where
    F: Fn(u64, u64) -> Fut,
    Fut: std::future::Future<Output = ()> + Send + 'static,
{
    let per_task = ops.div_ceil(tasks);
    rt.block_on(async {
        let start = Instant::now();
        let handles: Vec<_> = (0..tasks)
            .map(|id| tokio::spawn(task(id, per_task)))
            .collect();
        for h in handles {
            h.await.unwrap();
        }
        start.elapsed()
    })
}

/// The median over `rounds` of raw time / our time, the two sides alternating.
fn alternate(
    rounds: usize,
    mut raw: impl FnMut() -> Duration,
    mut ours: impl FnMut() -> Duration,
) -> f64 {
    let mut ratios = Vec::new();
    for round in 0..rounds {
        let (r, o) = if round % 2 == 0 {
            let r = raw();
            (r, ours())
        } else {
            let o = ours();
            (raw(), o)
        };
        ratios.push(o.as_secs_f64() / r.as_secs_f64());
    }
    median(&mut ratios)
}

fn main() {
    let cluster = RedisCluster::start(3, 0);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let con = rt.block_on(async {
        CachingService::builder()
            .backend(
                RedisBackend::builder(cluster.url())
                    .key_prefix("bench")
                    .build()
                    .await
                    .unwrap(),
            )
            .install()
            .unwrap();
        for i in 0..64 {
            ours(id_of(i), "eu-west").await;
        }
        cache_runtime::shutdown().await;
        let client = redis::cluster::ClusterClient::new(vec![cluster.url()]).unwrap();
        client.get_async_connection().await.unwrap()
    });
    let spread: Vec<usize> = (0..3).map(|i| cluster.keys_on(i, "bench:2:")).collect();

    assert!(spread.iter().all(|&n| n > 0), "{spread:?}");
    let raw_task = |id: u64, ops: u64| {
        let mut con = con.clone();
        async move {
            let key = key_of(id_of(id));
            for _ in 0..ops {
                black_box(raw_get(&mut con, &key).await);
            }
        }
    };
    let decode_task = |id: u64, ops: u64| {
        let mut con = con.clone();
        async move {
            let key = key_of(id_of(id));
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
            black_box(ours(id_of(id), "eu-west").await);
        }
    };
    // warm up both
    in_tasks(&rt, 64, 64 * 256, raw_task);
    in_tasks(&rt, 64, 64 * 256, ours_task);
    let sequential = alternate(
        41,
        || in_tasks(&rt, 1, 2_000, raw_task),
        || in_tasks(&rt, 1, 2_000, ours_task),
    );
    let concurrent = alternate(
        41,
        || in_tasks(&rt, 64, 64 * 512, raw_task),
        || in_tasks(&rt, 64, 64 * 512, ours_task),
    );
    let decoding = alternate(
        41,
        || in_tasks(&rt, 64, 64 * 512, raw_task),
        || in_tasks(&rt, 64, 64 * 512, decode_task),
    );
    println!(
        "redis cluster (3 masters, entries per master {spread:?}), median of 41 alternating runs:\n  \
         L2 hit, sequential: {sequential:.2}x the time of a raw cluster GET\n  \
         L2 hit, 64 tasks: {:.2}x the throughput of raw cluster GETs\n  \
         raw cluster GET + decoding the value, 64 tasks: {:.2}x the throughput of raw cluster GETs",
        1.0 / concurrent,
        1.0 / decoding
    );
    assert_eq!(
        cache_runtime::stats().total.executions,
        64,
        "every measured call was an L2 hit"
    );
    invalidations(&rt, &cluster);
}

/// Invalidating a dependency of 1,000 entries spread over the cluster's slots, against
/// the same on one server: the time of `invalidate_dependency`, once the entries are
/// written.
fn invalidations(rt: &tokio::runtime::Runtime, cluster: &RedisCluster) {
    let node = tests::redis_server::RedisServer::start();
    let (on_cluster, on_node) = rt.block_on(async {
        (
            tests::redis_service(&cluster.url(), "bdeps", true).await,
            tests::redis_service(&node.url(), "bdeps", true).await,
        )
    });
    let mut round = 0;
    let mut times = (Vec::new(), Vec::new());
    let mut invalidate = |svc: &CachingService| -> Duration {
        round += 1;
        let r = round;
        rt.block_on(svc.scope(async move {
            for id in 0..DEPENDENTS {
                dependent(id_of(id), r).await;
            }
            cache_runtime::shutdown().await;
            let start = Instant::now();
            cache_runtime::invalidate_dependency(format!("shared:{r}")).await;
            start.elapsed()
        }))
    };
    let mut ratios = Vec::new();
    for i in 0..11 {
        let (n, c) = if i % 2 == 0 {
            let n = invalidate(&on_node);
            (n, invalidate(&on_cluster))
        } else {
            let c = invalidate(&on_cluster);
            (invalidate(&on_node), c)
        };
        times.0.push(n.as_secs_f64() * 1e3);
        times.1.push(c.as_secs_f64() * 1e3);
        ratios.push(c.as_secs_f64() / n.as_secs_f64());
    }
    let live: usize = (0..3)
        .map(|i| cluster.live_on(i, "bdeps:2:bench.dependent"))
        .sum();
    assert_eq!(live, 0, "every dependent removed from every master");
    println!(
        "invalidating a dependency of {DEPENDENTS} entries, median of 11 alternating runs: \
         one server {:.2} ms, the cluster {:.2} ms: {:.2}x",
        median(&mut times.0),
        median(&mut times.1),
        median(&mut ratios)
    );
}
