//! The instance that invalidates never reads the old value back, from any tier, while
//! a write of the old value is queued or in flight: thousands of rounds per
//! configuration against a real `redis-server`, then what Redis holds.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use cache_redis::RedisBackend;
use cache_runtime::{cached, CachingService, MemoryBackend};
use tests::redis_server::RedisServer;

static DB: Mutex<Option<HashMap<u64, u64>>> = Mutex::new(None);

fn db_set(id: u64, v: u64) {
    DB.lock()
        .unwrap()
        .get_or_insert_with(HashMap::new)
        .insert(id, v);
}

fn db_get(id: u64) -> u64 {
    DB.lock()
        .unwrap()
        .as_ref()
        .and_then(|m| m.get(&id).copied())
        .unwrap_or(0)
}

#[cached(name = "w.row")]
async fn row(id: u64) -> u64 {
    db_get(id)
}

const ROUNDS: u64 = 2_000;

/// Runs the rounds on one configuration: returns (stale reads right after an
/// invalidation, stale reads right after a refresh, stale values left in Redis).
async fn rounds(server: &RedisServer, prefix: &str, l1: bool, base: u64) -> (u64, u64, u64) {
    let mut b = RedisBackend::builder(server.url()).key_prefix(prefix);
    if l1 {
        b = b.l1(MemoryBackend::new().max_entries(100_000));
    }
    let svc = CachingService::builder()
        .backend(b.build().await.unwrap())
        .build()
        .unwrap();
    let (mut stale, mut stale_refresh) = (0, 0);
    svc.scope(async {
        for i in base..base + ROUNDS {
            if i % 500 == 250 {
                // a stall while writes are queued: removals wait behind them
                server.pause_writes(Duration::from_millis(50));
            }
            db_set(i, 1);
            assert_eq!(row(i).await, 1); // a miss: the write of 1 is queued
            db_set(i, 2);
            cache_runtime::invalidate!(row(i)).await;
            if row(i).await != 2 {
                stale += 1;
            }
            db_set(i, 3);
            cache_runtime::refresh!(row(i)).await;
            if row(i).await != 3 {
                stale_refresh += 1;
            }
        }
    })
    .await;
    assert!(!svc.shutdown().await.timed_out);
    let client = redis::Client::open(server.url()).unwrap();
    let mut con = client.get_multiplexed_async_connection().await.unwrap();
    let mut in_redis = 0;
    for i in base..base + ROUNDS {
        let key = format!("{prefix}:2:w.row:v1({i})");
        let bytes: Option<Vec<u8>> = redis::cmd("GET")
            .arg(&key)
            .query_async(&mut con)
            .await
            .unwrap();
        if let Some(bytes) = bytes {
            let (v, _, _): (u64, u64, Vec<String>) =
                cache_runtime::__private::decode(&bytes).unwrap();
            if v != 3 {
                in_redis += 1;
            }
        }
    }
    (stale, stale_refresh, in_redis)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_stale_read_back_without_l1() {
    let server = RedisServer::start();
    assert_eq!(rounds(&server, "nol1", false, 0).await, (0, 0, 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_stale_read_back_with_l1() {
    let server = RedisServer::start();
    assert_eq!(rounds(&server, "withl1", true, 1_000_000).await, (0, 0, 0));
}
