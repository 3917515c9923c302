//! `install` sets the global service once.

use std::time::Duration;

use cache_runtime::{cached, CachingService, ConfigError, InstallError, MemoryBackend, Profile};
use tests::Runs;

static RUNS: Runs = Runs::new();

#[cached(profile = "catalog")]
async fn lookup(id: u64) -> u64 {
    RUNS.hit();
    id
}

#[tokio::test(start_paused = true)]
async fn install_once() {
    let bad = CachingService::builder()
        .profile(
            Profile::new("x")
                .ttl(Duration::from_secs(1))
                .sliding(Duration::from_secs(1)),
        )
        .install();
    assert!(matches!(
        bad,
        Err(InstallError::Config(ConfigError::Profile { .. }))
    ));

    CachingService::builder()
        .backend(MemoryBackend::new().max_entries(1000))
        .profile(Profile::new("catalog").ttl(Duration::from_secs(60)))
        .install()
        .expect("first install");
    let again = CachingService::builder().install();
    assert_eq!(again, Err(InstallError::AlreadyInstalled));
    assert_eq!(
        again.unwrap_err().to_string(),
        "a caching service is already installed; call `install` once, at the start of `main`, before any cached call"
    );

    lookup(1).await;
    lookup(1).await;
    assert_eq!(RUNS.get(), 1);
    tokio::time::advance(Duration::from_secs(61)).await;
    lookup(1).await;
    assert_eq!(RUNS.get(), 2, "the installed profile's ttl applies");
    assert_eq!(cache_runtime::stats().total.hits, 1);
}
