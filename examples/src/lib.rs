//! Shared pieces of the examples: a deliberately slow data source, and the load
//! driver of the shop (`load`).

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// A stand-in for a slow database: every query sleeps, and queries are counted.
#[derive(Debug, Default)]
pub struct SlowDb {
    queries: AtomicU64,
    latency: Duration,
}

impl SlowDb {
    /// A database whose queries take `latency`.
    pub const fn new(latency: Duration) -> Self {
        SlowDb {
            queries: AtomicU64::new(0),
            latency,
        }
    }

    /// Waits for the query latency and counts the query.
    pub async fn query(&self) {
        self.queries.fetch_add(1, Ordering::Relaxed);
        tokio::time::sleep(self.latency).await;
    }

    /// How many queries ran.
    pub fn queries(&self) -> u64 {
        self.queries.load(Ordering::Relaxed)
    }
}

pub mod load;
