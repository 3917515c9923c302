//! The L1 kept in sync, against a real `redis-server`, with instances in one process:
//! L1 entries filled from Redis expire with the Redis entry, other prefixes are
//! untouched, and an invalidation with Redis down or paused still returns in time.

use std::time::{Duration, Instant};

use cache_redis::RedisBackend;
use cache_runtime::{cached, CachingService, MemoryBackend};
use tests::redis_server::RedisServer;

#[cached(name = "l.short", ttl = "1500ms")]
async fn short(id: u64) -> u64 {
    id
}

#[cached(name = "l.plain")]
async fn plain(id: u64) -> u64 {
    id
}

async fn instance(server: &RedisServer, prefix: &str) -> CachingService {
    CachingService::builder()
        .backend(
            RedisBackend::builder(server.url())
                .key_prefix(prefix)
                .l1(MemoryBackend::new())
                .connect_lazily(true)
                .build()
                .await
                .unwrap(),
        )
        .build()
        .unwrap()
}

#[tokio::test]
async fn an_l1_filled_from_redis_expires_with_the_redis_entry() {
    let server = RedisServer::start();
    let (a, b) = (
        instance(&server, "exp").await,
        instance(&server, "exp").await,
    );
    let written = Instant::now();
    a.scope(short(1)).await;
    a.shutdown().await;
    tokio::time::sleep(Duration::from_millis(900)).await;
    b.scope(short(1)).await;
    assert_eq!(b.stats().total.l2_hits, 1);
    assert_eq!(b.scope(cache_runtime::peek!(short(1))).await, Some(1));
    // a fresh 1.5 s from B's fill would last until 2.4 s; the Redis entry ends at 1.5 s
    tokio::time::sleep(Duration::from_millis(1_800).saturating_sub(written.elapsed())).await;
    assert_eq!(b.scope(cache_runtime::peek!(short(1))).await, None);
}

#[tokio::test]
async fn instances_on_another_prefix_are_untouched() {
    let server = RedisServer::start();
    let (a, same, other) = (
        instance(&server, "one").await,
        instance(&server, "one").await,
        instance(&server, "two").await,
    );
    same.scope(plain(1)).await;
    other.scope(plain(1)).await;
    a.scope(cache_runtime::invalidate!(plain(1))).await;
    let start = Instant::now();
    while same.scope(cache_runtime::peek!(plain(1))).await.is_some() {
        assert!(
            start.elapsed() < Duration::from_secs(2),
            "the same prefix heard it"
        );
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(other.scope(cache_runtime::peek!(plain(1))).await, Some(1));
    assert_eq!(other.stats().sync.received, 0);
}

#[tokio::test]
async fn an_invalidation_with_redis_down_or_paused_returns_in_time() {
    let mut server = RedisServer::start();
    let svc = instance(&server, "down").await;
    svc.scope(plain(1)).await;
    server.pause(Duration::from_secs(2));
    let start = Instant::now();
    svc.scope(cache_runtime::invalidate!(plain(1))).await;
    let paused = start.elapsed();
    assert_eq!(svc.scope(cache_runtime::peek!(plain(1))).await, None);
    server.stop();
    svc.scope(plain(2)).await;
    let start = Instant::now();
    svc.scope(cache_runtime::invalidate!(plain(2))).await;
    let down = start.elapsed();
    assert_eq!(svc.scope(cache_runtime::peek!(plain(2))).await, None);
    eprintln!("invalidation returned after {paused:?} (Redis paused), {down:?} (Redis down)");
    // the operation timeout is 200 ms
    assert!(paused < Duration::from_millis(600), "{paused:?}");
    assert!(down < Duration::from_millis(600), "{down:?}");
    // the publications were left to tasks of their own, which fail
    let start = Instant::now();
    while svc.stats().sync.publish_errors < 2 {
        assert!(
            start.elapsed() < Duration::from_secs(3),
            "{:?}",
            svc.stats().sync
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}
