//! Without `install`, the first cached call installs the default in-memory service.

use cache_runtime::{cached, CachingService, InstallError};
use tests::Runs;

static RUNS: Runs = Runs::new();

#[cached]
async fn lookup(id: u64) -> u64 {
    RUNS.hit();
    id * 2
}

#[tokio::test]
async fn first_call_installs_the_default_and_install_then_fails() {
    assert_eq!(lookup(21).await, 42);
    assert_eq!(lookup(21).await, 42);
    assert_eq!(RUNS.get(), 1);
    let stats = cache_runtime::stats();
    assert_eq!(stats.function(concat!(module_path!(), "::lookup")).hits, 1);
    assert_eq!(
        CachingService::builder().install(),
        Err(InstallError::AlreadyInstalled)
    );
    let report = cache_runtime::shutdown().await;
    assert!(!report.timed_out);
}
