//! Quickstart: cache a slow lookup in memory, no server needed.
//!
//! Run: `cargo run -p examples --example quickstart`

use std::time::{Duration, Instant};

use cache_runtime::{cached, CachingService, MemoryBackend, Profile};
use examples::SlowDb;
use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Product {
    pub id: u64,
    pub name: String,
    pub price_cents: u64,
}

/// A database whose every query takes about 200 ms.
static DB: SlowDb = SlowDb::new(Duration::from_millis(200));

/// Cached for ten minutes under the "catalog" profile; the key is the product id.
#[cached(profile = "catalog", ttl = "10m")]
pub async fn get_product(id: u64) -> Result<Product, String> {
    DB.query().await;
    Ok(Product {
        id,
        name: format!("Product {id}"),
        price_cents: 100 * id,
    })
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    tracing_subscriber::fmt()
        .with_env_filter(std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()))
        .init();

    // Configure once, at the start of main. Without this, the first cached call
    // installs a default in-memory service.
    CachingService::builder()
        .backend(MemoryBackend::new().max_entries(10_000))
        .profile(Profile::new("catalog").lock_timeout(Duration::from_secs(5)))
        .install()?;

    for round in 1..=3 {
        for id in [1, 2] {
            let started = Instant::now();
            let product = get_product(id).await?;
            println!(
                "round {round}: get_product({id}) -> {:?} in {:?}",
                product.name,
                started.elapsed()
            );
        }
    }

    // Ten concurrent calls for a key nobody asked for yet: the body runs once.
    let started = Instant::now();
    let calls: Vec<_> = (0..10).map(|_| tokio::spawn(get_product(3))).collect();
    for call in calls {
        call.await??;
    }
    println!(
        "10 concurrent calls of get_product(3) in {:?}",
        started.elapsed()
    );

    let stats = cache_runtime::stats();
    let s = stats.function("quickstart::get_product");
    println!(
        "stats: {} hits, {} misses, {} executions; database queries: {}",
        s.hits,
        s.misses,
        s.executions,
        DB.queries()
    );
    cache_runtime::shutdown().await;
    Ok(())
}
