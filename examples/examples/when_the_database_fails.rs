//! When the database fails or is slow: fail-safe, the soft timeout and eager refresh,
//! in memory, no server needed.
//!
//! Run: `cargo run -p examples --example when_the_database_fails`

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use cache_runtime::{cached, CachingService, Profile};

/// A database that can be down, or slow.
struct Db {
    down: AtomicBool,
    delay_ms: AtomicU64,
    price: AtomicU64,
    queries: AtomicU64,
}

static DB: Db = Db {
    down: AtomicBool::new(false),
    delay_ms: AtomicU64::new(20),
    price: AtomicU64::new(100),
    queries: AtomicU64::new(0),
};

/// Fresh for 2 s; kept 1 h as a fallback; a failure reuses it for 1 s; with a
/// fallback, an answer after at most 100 ms; refreshed in the background once 80 %
/// of the ttl has passed.
#[cached(profile = "catalog")]
pub async fn get_price(id: u64) -> Result<u64, String> {
    DB.queries.fetch_add(1, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(DB.delay_ms.load(Ordering::SeqCst))).await;
    if DB.down.load(Ordering::SeqCst) {
        return Err("connection refused".into());
    }
    Ok(DB.price.load(Ordering::SeqCst) + id)
}

async fn call(what: &str) {
    let start = Instant::now();
    let price = get_price(0).await;
    println!(
        "{what:<48} {price:?} in {:>4} ms (queries so far: {})",
        start.elapsed().as_millis(),
        DB.queries.load(Ordering::SeqCst)
    );
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    CachingService::builder()
        .profile(
            Profile::new("catalog")
                .ttl(Duration::from_secs(2))
                .fail_safe(Duration::from_secs(3600))
                .fail_safe_throttle(Duration::from_secs(1))
                .soft_timeout(Duration::from_millis(100))
                .eager_refresh(0.8),
        )
        .install()?;

    call("first call: the database answers").await;
    call("second call: a hit").await;

    // Eager refresh: past 80 % of the ttl, a hit answers at once and refreshes the
    // entry in the background.
    tokio::time::sleep(Duration::from_millis(1_700)).await;
    DB.price.store(110, Ordering::SeqCst);
    call("at 1.7 s: a hit, and a refresh starts").await;
    tokio::time::sleep(Duration::from_millis(100)).await;
    call("then: the refreshed value").await;

    // Fail-safe: the database is down and the entry expired: the expired value
    // answers instead of the error, and is reused for the throttle (1 s).
    DB.down.store(true, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(2_100)).await;
    call("database down, entry expired: the fallback").await;
    call("again: no query during the throttle").await;

    // The soft timeout: the database is back but slow; with a fallback, the caller
    // gets it after 100 ms and the query's value lands when it ends.
    DB.down.store(false, Ordering::SeqCst);
    DB.delay_ms.store(1_000, Ordering::SeqCst);
    DB.price.store(120, Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(1_100)).await; // the throttle ends
    call("database slow: the fallback at the soft timeout").await;
    tokio::time::sleep(Duration::from_millis(1_000)).await;
    call("a second later: the slow query's value").await;

    let s = cache_runtime::stats().total;
    println!(
        "fallbacks served: {}, soft timeouts: {}, eager refreshes: {}",
        s.fallbacks_served, s.soft_timeouts, s.eager_refreshes
    );
    Ok(())
}
