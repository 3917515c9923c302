//! Bodies that go on in the background: the soft timeout (a slow body lets the
//! caller answer with the fail-safe fallback) and eager refresh (a hit past a
//! fraction of the ttl refreshes the entry while callers keep getting hits).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use cache_runtime::{cached, CachingService, Profile};
use tests::Runs;

/// The "database": a value, how long it takes, and whether it fails.
struct Source {
    value: AtomicU64,
    delay_ms: AtomicU64,
    failing: AtomicBool,
    /// Bodies that ran to their end.
    finished: Runs,
}

impl Source {
    const fn new() -> Self {
        Source {
            value: AtomicU64::new(1),
            delay_ms: AtomicU64::new(0),
            failing: AtomicBool::new(false),
            finished: Runs::new(),
        }
    }
    async fn read(&self) -> Result<u64, String> {
        let delay = self.delay_ms.load(Ordering::SeqCst);
        if delay > 0 {
            tokio::time::sleep(Duration::from_millis(delay)).await;
        }
        self.finished.hit();
        if self.failing.load(Ordering::SeqCst) {
            Err("database unavailable".into())
        } else {
            Ok(self.value.load(Ordering::SeqCst))
        }
    }
    fn set(&self, value: u64, delay_ms: u64) {
        self.value.store(value, Ordering::SeqCst);
        self.delay_ms.store(delay_ms, Ordering::SeqCst);
    }
}

fn service() -> CachingService {
    CachingService::builder().build().unwrap()
}

const SEC: Duration = Duration::from_secs(1);

/// Lets spawned tasks run, and the paused clock move by `d`.
async fn pass(d: Duration) {
    tokio::time::sleep(d).await;
    for _ in 0..10 {
        tokio::task::yield_now().await;
    }
}

#[tokio::test(start_paused = true)]
async fn a_slow_body_answers_with_the_fallback_and_its_value_lands_later() {
    static DB: Source = Source::new();
    #[cached(ttl = "10s", fail_safe = "1h", soft_timeout = "100ms")]
    async fn price_1(id: u64) -> Result<u64, String> {
        DB.read().await.map(|v| v + id)
    }
    let svc = service();
    svc.scope(async {
        assert_eq!(price_1(0).await, Ok(1));
        pass(11 * SEC).await;
        DB.set(2, 1_000);
        let started = tokio::time::Instant::now();
        assert_eq!(price_1(0).await, Ok(1), "the fallback");
        let waited = started.elapsed();
        assert!(
            waited >= Duration::from_millis(100) && waited < Duration::from_millis(200),
            "answered at the soft timeout: {waited:?}"
        );
        assert_eq!(price_1(0).await, Ok(1), "fresh for the throttle meanwhile");
        pass(SEC).await;
        assert_eq!(DB.finished.get(), 2, "the body finished in the background");
        assert_eq!(price_1(0).await, Ok(2), "its value landed");
    })
    .await;
    let s = svc.stats().total;
    assert_eq!((s.soft_timeouts, s.fallbacks_served), (1, 1), "{s:?}");
    assert_eq!(s.executions, 2, "{s:?}");
}

#[tokio::test(start_paused = true)]
async fn without_a_fallback_the_caller_waits_for_the_slow_body() {
    static DB: Source = Source::new();
    #[cached(ttl = "10s", fail_safe = "1h", soft_timeout = "100ms")]
    async fn price_2(id: u64) -> Result<u64, String> {
        DB.read().await.map(|v| v + id)
    }
    service()
        .scope(async {
            DB.set(7, 1_000);
            let started = tokio::time::Instant::now();
            assert_eq!(price_2(0).await, Ok(7));
            assert!(started.elapsed() >= SEC);
        })
        .await;
}

#[tokio::test(start_paused = true)]
async fn at_most_one_body_per_key_goes_on_in_the_background() {
    static DB: Source = Source::new();
    #[cached(
        ttl = "10s",
        fail_safe = "1h",
        fail_safe_throttle = "1s",
        soft_timeout = "100ms"
    )]
    async fn price_3(id: u64) -> Result<u64, String> {
        DB.read().await.map(|v| v + id)
    }
    service()
        .scope(async {
            assert_eq!(price_3(0).await, Ok(1));
            pass(11 * SEC).await;
            DB.set(2, 5_000);
            assert_eq!(price_3(0).await, Ok(1));
            // the throttle ends while the first body still runs: the next call's
            // body is slow too, and is dropped rather than run alongside
            pass(2 * SEC).await;
            assert_eq!(price_3(0).await, Ok(1));
            pass(10 * SEC).await;
            assert_eq!(
                DB.finished.get(),
                2,
                "one body in the background, the other dropped"
            );
            assert_eq!(price_3(0).await, Ok(2));
        })
        .await;
}

#[tokio::test(start_paused = true)]
async fn an_invalidation_keeps_the_background_value_out() {
    static DB: Source = Source::new();
    #[cached(ttl = "10s", fail_safe = "1h", soft_timeout = "100ms")]
    async fn price_4(id: u64) -> Result<u64, String> {
        DB.read().await.map(|v| v + id)
    }
    let svc = service();
    svc.scope(async {
        assert_eq!(price_4(0).await, Ok(1));
        pass(11 * SEC).await;
        DB.set(2, 1_000);
        assert_eq!(price_4(0).await, Ok(1));
        // the data changes again while the body (which read 2) runs
        DB.set(3, 0);
        cache_runtime::invalidate!(price_4(0)).await;
        pass(2 * SEC).await;
        assert_eq!(price_4(0).await, Ok(3), "the body's value was not kept");
    })
    .await;
    assert_eq!(svc.stats().total.executions, 3);
}

#[tokio::test(start_paused = true)]
async fn a_background_body_that_fails_leaves_the_entry() {
    static DB: Source = Source::new();
    #[cached(
        ttl = "10s",
        fail_safe = "1h",
        fail_safe_throttle = "30s",
        soft_timeout = "100ms"
    )]
    async fn price_5(id: u64) -> Result<u64, String> {
        DB.read().await.map(|v| v + id)
    }
    let svc = service();
    svc.scope(async {
        assert_eq!(price_5(0).await, Ok(1));
        pass(11 * SEC).await;
        DB.set(2, 1_000);
        DB.failing.store(true, Ordering::SeqCst);
        assert_eq!(price_5(0).await, Ok(1));
        pass(2 * SEC).await;
        assert_eq!(price_5(0).await, Ok(1), "the fallback, for the throttle");
    })
    .await;
    let s = svc.stats().total;
    assert_eq!((s.background_errors, s.executions), (1, 2), "{s:?}");
}

#[tokio::test(start_paused = true)]
async fn a_hit_past_the_refresh_point_refreshes_once_in_the_background() {
    static DB: Source = Source::new();
    #[cached(ttl = "10s", eager_refresh = 0.5)]
    async fn price_6(id: u64) -> Result<u64, String> {
        DB.read().await.map(|v| v + id)
    }
    let svc = service();
    svc.scope(async {
        assert_eq!(price_6(0).await, Ok(1));
        pass(4 * SEC).await;
        DB.set(2, 500);
        assert_eq!(price_6(0).await, Ok(1), "before the refresh point: a hit");
        pass(2 * SEC).await;
        let started = tokio::time::Instant::now();
        for _ in 0..20 {
            assert_eq!(price_6(0).await, Ok(1), "answered at once");
        }
        assert_eq!(started.elapsed(), Duration::ZERO);
        pass(SEC).await;
        assert_eq!(price_6(0).await, Ok(2), "refreshed");
        assert_eq!(DB.finished.get(), 2, "one refresh for the twenty hits");
    })
    .await;
    let s = svc.stats().total;
    assert_eq!(
        (s.eager_refreshes, s.misses, s.executions),
        (1, 1, 2),
        "{s:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn under_steady_load_an_eagerly_refreshed_entry_never_expires() {
    static DB: Source = Source::new();
    #[cached(ttl = "1s", eager_refresh = 0.8)]
    async fn price_7(id: u64) -> Result<u64, String> {
        DB.read().await.map(|v| v + id)
    }
    let svc = service();
    svc.scope(async {
        DB.set(1, 50);
        for i in 0..200u64 {
            DB.value.store(i, Ordering::SeqCst);
            let v = price_7(0).await.unwrap();
            assert!(v + 20 >= i, "at most a second old: {v} at {i}");
            pass(Duration::from_millis(50)).await;
        }
    })
    .await;
    let s = svc.stats().total;
    assert_eq!(
        s.misses, 1,
        "only the first call waited for the body: {s:?}"
    );
    assert!(s.eager_refreshes >= 10, "{s:?}");
}

#[tokio::test(start_paused = true)]
async fn a_failed_refresh_leaves_the_entry_until_it_expires() {
    static DB: Source = Source::new();
    #[cached(ttl = "10s", eager_refresh = 0.5)]
    async fn price_8(id: u64) -> Result<u64, String> {
        DB.read().await.map(|v| v + id)
    }
    let svc = service();
    svc.scope(async {
        assert_eq!(price_8(0).await, Ok(1));
        pass(6 * SEC).await;
        DB.failing.store(true, Ordering::SeqCst);
        assert_eq!(price_8(0).await, Ok(1));
        pass(SEC).await;
        assert_eq!(price_8(0).await, Ok(1), "the entry as it was");
        pass(4 * SEC).await;
        assert_eq!(
            price_8(0).await,
            Err("database unavailable".into()),
            "expired"
        );
    })
    .await;
    let s = svc.stats().total;
    assert_eq!((s.eager_refreshes, s.background_errors), (1, 1), "{s:?}");
}

#[tokio::test(start_paused = true)]
async fn a_profile_sets_them_for_the_functions_that_name_it() {
    static DB: Source = Source::new();
    #[cached(profile = "catalog")]
    async fn price_9(id: u64) -> Result<u64, String> {
        DB.read().await.map(|v| v + id)
    }
    // borrows its parameter: cached without them (an error event says why)
    static RUNS: Runs = Runs::new();
    #[cached(profile = "catalog")]
    async fn by_name_9(name: &str) -> Result<u64, String> {
        RUNS.hit();
        Ok(name.len() as u64)
    }
    let svc = CachingService::builder()
        .profile(
            Profile::new("catalog")
                .ttl(10 * SEC)
                .fail_safe(Duration::from_secs(3600))
                .soft_timeout(Duration::from_millis(100))
                .eager_refresh(0.5),
        )
        .build()
        .unwrap();
    svc.scope(async {
        assert_eq!(price_9(0).await, Ok(1));
        assert_eq!(by_name_9("ab").await, Ok(2));
        pass(6 * SEC).await;
        DB.set(2, 1_000);
        assert_eq!(price_9(0).await, Ok(1), "an eager refresh starts");
        assert_eq!(by_name_9("ab").await, Ok(2));
        pass(2 * SEC).await;
        assert_eq!(price_9(0).await, Ok(2));
        pass(11 * SEC).await;
        DB.set(3, 1_000);
        assert_eq!(price_9(0).await, Ok(2), "the soft timeout's fallback");
        pass(11 * SEC).await;
        assert_eq!(by_name_9("ab").await, Ok(2));
    })
    .await;
    assert_eq!(RUNS.get(), 2, "by_name: cached, expired once");
    let s = svc.stats().function(concat!(module_path!(), "::price_9"));
    assert_eq!((s.eager_refreshes, s.soft_timeouts), (1, 1), "{s:?}");
}

/// Without an in-process tier, a remote hit past the refresh point starts the
/// refresh (real time: Redis deadlines are wall-clock).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_remote_hit_past_the_refresh_point_refreshes_without_an_l1() {
    static DB: Source = Source::new();
    #[cached(ttl = "2s", eager_refresh = 0.5)]
    async fn price_10(id: u64) -> Result<u64, String> {
        DB.read().await.map(|v| v + id)
    }
    let server = tests::redis_server::RedisServer::start();
    let backend = cache_redis::RedisBackend::builder(server.url())
        .key_prefix("eager")
        .build()
        .await
        .unwrap();
    let svc = CachingService::builder().backend(backend).build().unwrap();
    svc.scope(async {
        assert_eq!(price_10(0).await, Ok(1));
        CachingService::current().shutdown().await; // the write has landed
        assert_eq!(price_10(0).await, Ok(1), "a remote hit");
        tokio::time::sleep(Duration::from_millis(1_200)).await;
        DB.set(2, 0);
        assert_eq!(
            price_10(0).await,
            Ok(1),
            "past the refresh point: answered at once"
        );
        let start = std::time::Instant::now();
        while price_10(0).await != Ok(2) {
            assert!(start.elapsed() < Duration::from_secs(1), "refreshed");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
    // one at a time; until the refreshed value's write lands in Redis, a later hit
    // may read the old one and start another
    let s = svc.stats().total;
    assert!(s.eager_refreshes >= 1, "{s:?}");
    assert_eq!(
        (s.executions, s.misses),
        (1 + s.eager_refreshes, 1),
        "{s:?}"
    );
}
