//! Redis quickstart: an in-process tier in front of Redis, shared by every instance.
//!
//! Start a Redis first, for example:
//!
//! ```text
//! redis-server --port 6379 --save "" --maxmemory 256mb --maxmemory-policy volatile-lru
//! ```
//!
//! Run: `cargo run -p examples --example redis_quickstart` (set `REDIS_URL` for
//! another server, for example `redis://:password@10.0.0.5:6379/2`). Run it twice: the
//! second run is served by Redis without querying the database.

use std::time::{Duration, Instant};

use cache_redis::RedisBackend;
use cache_runtime::{cached, CachingService, MemoryBackend};
use examples::SlowDb;
use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Product {
    pub id: u64,
    pub name: String,
}

static DB: SlowDb = SlowDb::new(Duration::from_millis(200));

#[cached(ttl = "10m")]
pub async fn get_product(id: u64) -> Result<Product, String> {
    DB.query().await;
    Ok(Product {
        id,
        name: format!("Product {id}"),
    })
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    tracing_subscriber::fmt()
        .with_env_filter(std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()))
        .init();
    let url = std::env::var("REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379/0".into());

    let backend = match RedisBackend::builder(&url)
        .key_prefix("quickstart")
        .l1(MemoryBackend::new().max_entries(10_000))
        .build()
        .await
    {
        Ok(backend) => backend,
        Err(e) => {
            eprintln!("{e}\nStart Redis (see the top of examples/examples/redis_quickstart.rs) or set REDIS_URL.");
            std::process::exit(1);
        }
    };
    CachingService::builder().backend(backend).install()?;

    for round in 1..=3 {
        let started = Instant::now();
        let product = get_product(7).await?;
        println!("round {round}: {} in {:?}", product.name, started.elapsed());
    }
    let s = cache_runtime::stats().total;
    println!(
        "in-process hits {}, Redis hits {}, database queries {}",
        s.l1_hits,
        s.l2_hits,
        DB.queries()
    );
    let report = cache_runtime::shutdown().await;
    println!("shutdown: {} pending writes completed", report.written);
    Ok(())
}
