//! A random run of two instances in two processes with the dependency graph in Redis
//! (`src/bin/cache_instance.rs`), Redis killed and restarted in the middle. A test
//! binary of its own, so that it does not share the machine with the other
//! multi-process tests.

use std::io::Write;
use std::time::Duration;

use tests::instance::Instance;
use tests::redis_server::RedisServer;

/// Two instances in two processes with the dependency graph in Redis: random reads,
/// writes with invalidations (by key and by dependency) and expiries for 20 s, Redis
/// killed and restarted once in the middle, a collector running. No read of an
/// instance returns a version older than one it committed before, and after a full
/// collection no orphan is left.
#[test]
fn a_random_run_with_a_restart_leaves_no_stale_read_and_no_orphan() {
    let (mut cache, db) = (RedisServer::start(), RedisServer::start());
    let rt = tokio::runtime::Runtime::new().unwrap();
    let collector = rt.block_on(async {
        cache_redis::DependencyCollector::builder(cache.url())
            .key_prefix("inst")
            .start()
            .await
            .unwrap()
    });
    let (mut a, mut b) = (
        Instance::start(env!("CARGO_BIN_EXE_cache_instance"), "deps", &cache, &db),
        Instance::start(env!("CARGO_BIN_EXE_cache_instance"), "deps", &cache, &db),
    );
    writeln!(a.stdin, "random 20 7").unwrap();
    writeln!(b.stdin, "random 20 11").unwrap();
    std::thread::sleep(Duration::from_secs(10));
    cache.restart();
    tests::instance::assert_random_runs(&a.line(), &b.line());
    a.cmd("flush");
    b.cmd("flush");
    std::thread::sleep(Duration::from_millis(1_500)); // the last values expire
    let (first, second) = rt.block_on(async {
        let first = cache_redis::full_collection(&cache.url(), "inst")
            .await
            .unwrap();
        let second = cache_redis::full_collection(&cache.url(), "inst")
            .await
            .unwrap();
        (first, second)
    });
    eprintln!("full collection after the run: {first:?}");
    assert_eq!(second.removed(), 0, "orphans left: {second:?}");
    rt.block_on(collector.stop());
}
