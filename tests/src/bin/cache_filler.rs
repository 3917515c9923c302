//! A separate process for `tests/tests/redis_processes.rs`: fills the cache on the
//! Redis at the URL given as the first argument, then exits.

use cache_redis::RedisBackend;
use cache_runtime::{cached, CachingService};

/// Same key name and prefix as the test's `report`.
#[cached(name = "p.report")]
async fn report(id: u64) -> String {
    format!("report {id}")
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let url = std::env::args()
        .nth(1)
        .expect("usage: cache_filler <redis url>");
    let svc = CachingService::builder()
        .backend(
            RedisBackend::builder(url)
                .key_prefix("procs")
                .build()
                .await
                .expect("connect"),
        )
        .build()
        .expect("service");
    svc.scope(async {
        for id in 0..20 {
            report(id).await;
        }
    })
    .await;
    let report = svc.shutdown().await;
    assert!(!report.timed_out, "writes did not complete");
    assert_eq!(svc.stats().total.executions, 20);
}
