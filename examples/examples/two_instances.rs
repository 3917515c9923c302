//! Two instances of one service, as two processes on one Redis, each with an L1 in
//! front of it: an invalidation on one reaches the other's L1.
//!
//! Start a Redis first, for example:
//!
//! ```text
//! redis-server --port 6379 --save "" --maxmemory 256mb --maxmemory-policy volatile-lru
//! ```
//!
//! Run: `cargo run -p examples --example two_instances` (set `REDIS_URL` for another
//! server). The program is instance A; it starts a copy of itself as instance B and
//! tells it, line by line on its standard input, when to read. The "database" is a key
//! in the same Redis, so that both processes see one price.

use std::io::{BufRead, BufReader, Write};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use cache_redis::{redis, RedisBackend};
use cache_runtime::{cached, invalidate_cache, CachingService, MemoryBackend};

static QUERIES: AtomicU64 = AtomicU64::new(0);

fn url() -> String {
    std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379/0".into())
}

async fn db() -> redis::aio::MultiplexedConnection {
    redis::Client::open(url())
        .expect("a Redis URL")
        .get_multiplexed_async_connection()
        .await
        .expect("Redis answers")
}

/// The price of a product, from the "database" (100 ms a query).
#[cached(name = "example.price", ttl = "10m")]
async fn price(id: u64) -> u64 {
    QUERIES.fetch_add(1, Ordering::Relaxed);
    tokio::time::sleep(Duration::from_millis(100)).await;
    let cents: Option<u64> = redis::cmd("GET")
        .arg(format!("example:db:price:{id}"))
        .query_async(&mut db().await)
        .await
        .unwrap_or(None);
    cents.unwrap_or(0)
}

/// Changes the price; `price(id)` is invalidated in Redis and in every instance's L1.
#[invalidate_cache(price)]
async fn set_price(id: u64, cents: u64) {
    let () = redis::cmd("SET")
        .arg(format!("example:db:price:{id}"))
        .arg(cents)
        .query_async(&mut db().await)
        .await
        .expect("database write");
}

async fn install() -> Result<(), Box<dyn std::error::Error>> {
    CachingService::builder()
        .backend(
            RedisBackend::builder(url())
                .key_prefix("example-sync")
                .l1(MemoryBackend::new().max_entries(10_000))
                .build()
                .await?,
        )
        .install()?;
    Ok(())
}

/// Instance B: reads the price each time it is asked to.
async fn instance_b() -> Result<(), Box<dyn std::error::Error>> {
    install().await?;
    println!("ready");
    for line in std::io::stdin().lock().lines() {
        if line? != "read" {
            break;
        }
        let cents = price(1).await;
        println!(
            "B: price(1) = {cents} cents (queries so far: {}, invalidations heard: {})",
            QUERIES.load(Ordering::Relaxed),
            cache_runtime::stats().sync.received
        );
    }
    cache_runtime::shutdown().await;
    Ok(())
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    if std::env::args().nth(1).as_deref() == Some("b") {
        return instance_b().await;
    }
    install().await?;
    CachingService::clear().await;
    set_price(1, 100).await;

    let mut b = Command::new(std::env::current_exe()?)
        .arg("b")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()?;
    let mut to_b = b.stdin.take().ok_or("no stdin")?;
    let mut from_b = BufReader::new(b.stdout.take().ok_or("no stdout")?).lines();
    if from_b.next().ok_or("B exited")??.as_str() != "ready" {
        return Err("B did not start".into());
    }
    let mut ask_b = move || -> Result<String, Box<dyn std::error::Error>> {
        writeln!(to_b, "read")?;
        Ok(from_b.next().ok_or("B exited")??)
    };
    println!("{}", ask_b()?);
    println!("{}   <- from B's L1", ask_b()?);

    println!("A: price(1) = {} cents", price(1).await);
    set_price(1, 120).await;
    println!("A: set the price to 120 cents (invalidates price(1) everywhere)");
    println!("A: price(1) = {} cents", price(1).await);
    println!("{}   <- B dropped its copy", ask_b()?);
    println!("{}", ask_b()?);

    cache_runtime::shutdown().await;
    drop(ask_b);
    b.wait()?;
    Ok(())
}
