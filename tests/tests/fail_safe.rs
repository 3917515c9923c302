//! Fail-safe in the in-process tier: an expired entry kept as a fallback for a body
//! that fails, the throttle, invalidation removing fallbacks, waiters, the profile's
//! settings and the refusals.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use cache_runtime::{add_dependency, cached, invalidate_dependency, CachingService, Profile};
use tests::Runs;

/// The "database": a value and whether it fails.
struct Source {
    value: AtomicU64,
    failing: AtomicBool,
}

impl Source {
    const fn new() -> Self {
        Source {
            value: AtomicU64::new(1),
            failing: AtomicBool::new(false),
        }
    }
    fn read(&self) -> Result<u64, String> {
        if self.failing.load(Ordering::SeqCst) {
            Err("database unavailable".into())
        } else {
            Ok(self.value.load(Ordering::SeqCst))
        }
    }
    fn set(&self, value: u64, failing: bool) {
        self.value.store(value, Ordering::SeqCst);
        self.failing.store(failing, Ordering::SeqCst);
    }
}

fn service() -> CachingService {
    CachingService::builder().build().unwrap()
}

const SEC: Duration = Duration::from_secs(1);

#[tokio::test(start_paused = true)]
async fn a_failing_body_gets_the_expired_value_then_the_throttle_holds_it() {
    static DB: Source = Source::new();
    static RUNS: Runs = Runs::new();
    #[cached(ttl = "10s", fail_safe = "1h", fail_safe_throttle = "30s")]
    async fn price_1(id: u64) -> Result<u64, String> {
        RUNS.hit();
        DB.read().map(|v| v * 100 + id)
    }
    let svc = service();
    svc.scope(async {
        assert_eq!(price_1(1).await, Ok(101));
        tokio::time::advance(11 * SEC).await;
        DB.set(2, true);
        // expired: the body runs, fails, and the expired value answers
        assert_eq!(price_1(1).await, Ok(101));
        assert_eq!(RUNS.get(), 2);
        // fresh for the throttle: no call to the failing source
        tokio::time::advance(29 * SEC).await;
        assert_eq!(price_1(1).await, Ok(101));
        assert_eq!(RUNS.get(), 2);
        // after it, the source is tried again
        tokio::time::advance(2 * SEC).await;
        assert_eq!(price_1(1).await, Ok(101));
        assert_eq!(RUNS.get(), 3);
        // a key without a fallback gets the error
        assert_eq!(price_1(2).await, Err("database unavailable".into()));
        // the source is back: the next call after the throttle stores the new value
        DB.set(2, false);
        tokio::time::advance(31 * SEC).await;
        assert_eq!(price_1(1).await, Ok(201));
        tokio::time::advance(11 * SEC).await;
        DB.set(3, true);
        assert_eq!(price_1(1).await, Ok(201), "the newer value is the fallback");
    })
    .await;
    let s = svc.stats().total;
    assert_eq!(s.fallbacks_served, 3, "{s:?}");
    assert_eq!(s.hits, 1, "the throttled call: {s:?}");
}

#[tokio::test(start_paused = true)]
async fn a_fallback_is_kept_no_longer_than_fail_safe() {
    static DB: Source = Source::new();
    #[cached(ttl = "10s", fail_safe = "1m", fail_safe_throttle = "20s")]
    async fn price_2(id: u64) -> Result<u64, String> {
        DB.read().map(|v| v + id)
    }
    service()
        .scope(async {
            assert_eq!(price_2(0).await, Ok(1));
            DB.set(2, true);
            tokio::time::advance(11 * SEC).await;
            assert_eq!(price_2(0).await, Ok(1));
            // throttled again and again, but never past expiry + 1 min
            tokio::time::advance(21 * SEC).await;
            assert_eq!(price_2(0).await, Ok(1));
            tokio::time::advance(21 * SEC).await;
            assert_eq!(price_2(0).await, Ok(1));
            tokio::time::advance(21 * SEC).await;
            assert_eq!(price_2(0).await, Err("database unavailable".into()));
        })
        .await;
}

#[tokio::test(start_paused = true)]
async fn without_fail_safe_the_error_is_returned() {
    static DB: Source = Source::new();
    #[cached(ttl = "10s")]
    async fn price_3(id: u64) -> Result<u64, String> {
        DB.read().map(|v| v + id)
    }
    service()
        .scope(async {
            assert_eq!(price_3(0).await, Ok(1));
            DB.set(2, true);
            tokio::time::advance(11 * SEC).await;
            assert_eq!(price_3(0).await, Err("database unavailable".into()));
        })
        .await;
}

#[tokio::test(start_paused = true)]
async fn a_fresh_value_is_never_replaced_by_the_fallback() {
    static DB: Source = Source::new();
    #[cached(ttl = "10s", fail_safe = "1h")]
    async fn price_4(id: u64) -> Result<u64, String> {
        DB.read().map(|v| v + id)
    }
    service()
        .scope(async {
            assert_eq!(price_4(0).await, Ok(1));
            DB.set(5, false);
            tokio::time::advance(11 * SEC).await;
            assert_eq!(
                price_4(0).await,
                Ok(5),
                "expired: the body's value, not the old one"
            );
            assert_eq!(price_4(0).await, Ok(5));
        })
        .await;
}

#[tokio::test(start_paused = true)]
async fn an_invalidated_entry_is_never_a_fallback() {
    static DB: Source = Source::new();
    #[cached(ttl = "10s", fail_safe = "1h")]
    async fn price_5(id: u64) -> Result<u64, String> {
        DB.read().map(|v| v + id)
    }
    service()
        .scope(async {
            assert_eq!(price_5(0).await, Ok(1));
            tokio::time::advance(11 * SEC).await;
            DB.set(2, true);
            cache_runtime::invalidate!(price_5(0)).await;
            assert_eq!(price_5(0).await, Err("database unavailable".into()));
            // and while it is fresh
            DB.set(3, false);
            assert_eq!(price_5(0).await, Ok(3));
            DB.set(4, true);
            cache_runtime::invalidate!(price_5(0)).await;
            assert_eq!(price_5(0).await, Err("database unavailable".into()));
        })
        .await;
}

#[tokio::test(start_paused = true)]
async fn a_fallback_stays_linked_to_its_dependencies() {
    static DB: Source = Source::new();
    #[cached(ttl = "1h")]
    async fn stock_6(id: u64) -> u64 {
        add_dependency(format!("stock:{id}"));
        id * 10
    }
    #[cached(ttl = "10s", fail_safe = "1h")]
    async fn page_6(id: u64) -> Result<u64, String> {
        let s = stock_6(id).await;
        DB.read().map(|v| v + s)
    }
    service()
        .scope(async {
            assert_eq!(page_6(1).await, Ok(11));
            assert_eq!(page_6(2).await, Ok(21));
            tokio::time::advance(11 * SEC).await;
            DB.set(2, true);
            // a dependency of the expired entry, invalidated: its fallback goes too
            invalidate_dependency("stock:1").await;
            assert_eq!(page_6(1).await, Err("database unavailable".into()));
            assert_eq!(page_6(2).await, Ok(21), "the other entry kept its fallback");
        })
        .await;
}

#[tokio::test(start_paused = true)]
async fn the_waiters_of_a_failing_body_get_the_fallback() {
    static DB: Source = Source::new();
    static RUNS: Runs = Runs::new();
    #[cached(ttl = "10s", fail_safe = "1h")]
    async fn slow_7(id: u64) -> Result<u64, String> {
        RUNS.hit();
        tokio::time::sleep(Duration::from_millis(100)).await;
        DB.read().map(|v| v + id)
    }
    let svc = service();
    assert_eq!(svc.scope(slow_7(0)).await, Ok(1));
    tokio::time::advance(11 * SEC).await;
    DB.set(2, true);
    let calls: Vec<_> = (0..20)
        .map(|_| tokio::spawn(svc.scope(slow_7(0))))
        .collect();
    for c in calls {
        assert_eq!(c.await.unwrap(), Ok(1));
    }
    assert_eq!(RUNS.get(), 2, "one body for the twenty calls");
    let s = svc.stats().total;
    assert_eq!(s.fallbacks_served, 20, "{s:?}");
}

#[tokio::test(start_paused = true)]
async fn the_profile_sets_fail_safe_and_the_attribute_wins() {
    static DB: Source = Source::new();
    #[cached(profile = "catalog")]
    async fn by_profile_8(id: u64) -> Result<u64, String> {
        DB.read().map(|v| v + id)
    }
    #[cached(profile = "catalog", fail_safe_throttle = "1s")]
    async fn short_throttle_8(id: u64) -> Result<u64, String> {
        DB.read().map(|v| v + id)
    }
    static RUNS: Runs = Runs::new();
    #[cached(profile = "plain", ttl = "10s", fail_safe = "1h")]
    async fn by_attribute_8(id: u64) -> Result<u64, String> {
        RUNS.hit();
        DB.read().map(|v| v + id)
    }
    let svc = CachingService::builder()
        .profile(
            Profile::new("catalog")
                .ttl(10 * SEC)
                .fail_safe(Duration::from_secs(3600))
                .fail_safe_throttle(60 * SEC),
        )
        .profile(Profile::new("plain").ttl(10 * SEC))
        .build()
        .unwrap();
    svc.scope(async {
        assert_eq!(by_profile_8(0).await, Ok(1));
        assert_eq!(short_throttle_8(0).await, Ok(1));
        assert_eq!(by_attribute_8(0).await, Ok(1));
        tokio::time::advance(11 * SEC).await;
        DB.set(2, true);
        assert_eq!(by_profile_8(0).await, Ok(1));
        assert_eq!(short_throttle_8(0).await, Ok(1));
        assert_eq!(by_attribute_8(0).await, Ok(1));
        DB.set(3, false);
        tokio::time::advance(2 * SEC).await;
        assert_eq!(by_profile_8(0).await, Ok(1), "the profile's 60 s throttle");
        assert_eq!(
            short_throttle_8(0).await,
            Ok(3),
            "the attribute's 1 s throttle"
        );
        assert_eq!(RUNS.get(), 2);
    })
    .await;
}

#[tokio::test(start_paused = true)]
async fn a_plain_value_has_nothing_to_fall_back_from() {
    static RUNS: Runs = Runs::new();
    #[cached(ttl = "10s", fail_safe = "1h")]
    async fn plain_9(id: u64) -> u64 {
        RUNS.hit();
        id + RUNS.get() as u64
    }
    service()
        .scope(async {
            assert_eq!(plain_9(0).await, 1);
            tokio::time::advance(11 * SEC).await;
            assert_eq!(plain_9(0).await, 2, "expired: the new value");
        })
        .await;
}

#[test]
fn a_plain_fn_falls_back_too() {
    static DB: Source = Source::new();
    #[cached(ttl = "50ms", fail_safe = "1h")]
    fn blocking_10(id: u64) -> Result<u64, String> {
        DB.read().map(|v| v + id)
    }
    let svc = service();
    svc.scope_sync(|| {
        assert_eq!(blocking_10(0), Ok(1));
        std::thread::sleep(Duration::from_millis(80));
        DB.set(2, true);
        assert_eq!(blocking_10(0), Ok(1));
    });
    assert_eq!(svc.stats().total.fallbacks_served, 1);
}

#[test]
fn bad_profiles_are_refused() {
    let refused = |p: Profile| {
        CachingService::builder()
            .profile(p)
            .build()
            .unwrap_err()
            .to_string()
    };
    let p = || Profile::new("p").ttl(10 * SEC);
    let cases = [
        (p().fail_safe(Duration::ZERO), "zero `fail_safe`"),
        (
            p().fail_safe(SEC).fail_safe_throttle(Duration::ZERO),
            "zero `fail_safe_throttle`",
        ),
        (
            p().fail_safe(SEC).soft_timeout(Duration::ZERO),
            "zero `soft_timeout`",
        ),
        (p().eager_refresh(1.5), "outside 0 to 1"),
        (p().eager_refresh(0.0), "outside 0 to 1"),
        (p().eager_refresh(f64::NAN), "outside 0 to 1"),
        (
            Profile::new("p").sliding(SEC).fail_safe(SEC),
            "`fail_safe` with `sliding`",
        ),
        (
            Profile::new("p").sliding(SEC).eager_refresh(0.5),
            "`eager_refresh` with `sliding`",
        ),
        (
            Profile::new("p").eager_refresh(0.5),
            "`eager_refresh` without a `ttl`",
        ),
        (p().soft_timeout(SEC), "`soft_timeout` without `fail_safe`"),
    ];
    for (profile, expected) in cases {
        let err = refused(profile);
        assert!(err.starts_with("profile `p` "), "{err}");
        assert!(err.contains(expected), "{expected}: {err}");
    }
    CachingService::builder()
        .profile(
            p().fail_safe(SEC)
                .fail_safe_throttle(SEC)
                .soft_timeout(SEC)
                .eager_refresh(0.8),
        )
        .build()
        .expect("a valid profile");
}

/// A function whose attribute says `sliding`, in a profile with fail-safe: cached,
/// without fail-safe (an error event says why).
#[tokio::test(start_paused = true)]
async fn an_attribute_that_does_not_fit_the_profile_drops_fail_safe() {
    static DB: Source = Source::new();
    static RUNS: Runs = Runs::new();
    #[cached(profile = "fs", sliding = "10s")]
    async fn sliding_11(id: u64) -> Result<u64, String> {
        RUNS.hit();
        DB.read().map(|v| v + id)
    }
    let svc = CachingService::builder()
        .profile(Profile::new("fs").ttl(10 * SEC).fail_safe(60 * SEC))
        .build()
        .unwrap();
    svc.scope(async {
        assert_eq!(sliding_11(0).await, Ok(1));
        assert_eq!(sliding_11(0).await, Ok(1));
        assert_eq!(RUNS.get(), 1, "cached");
        tokio::time::advance(11 * SEC).await;
        DB.set(2, true);
        assert_eq!(sliding_11(0).await, Err("database unavailable".into()));
    })
    .await;
    assert_eq!(svc.stats().total.config_errors, 0);
}

/// The invalidating caller never gets a fallback older than its invalidation, while
/// calls, invalidations and the source's failures race: thousands of rounds on a
/// multi-threaded runtime. Returns the fallbacks served before the invalidation
/// returned (they show that the race was exercised).
async fn race_invalidation_against_fallbacks(svc: CachingService, rounds: u64) -> u64 {
    #[cached(ttl = "1ms", fail_safe = "1h", fail_safe_throttle = "1h", skip(db))]
    async fn value(id: u64, db: &'static Source) -> Result<u64, String> {
        tokio::task::yield_now().await;
        db.read().map(|v| v + id)
    }
    static DB: Source = Source::new();
    let (stale, served) = svc
        .scope(async {
            let stale = Arc::new(AtomicU64::new(0));
            let mut served = 0;
            for round in 1..=rounds {
                DB.set(round * 10, false);
                let Ok(fresh) = value(0, &DB).await else {
                    continue;
                };
                tokio::time::sleep(Duration::from_millis(2)).await; // expired
                DB.set(round * 10 + 1, true);
                // readers race the invalidation; each notes whether it began after
                // the invalidation returned
                let done = Arc::new(AtomicBool::new(false));
                let readers: Vec<_> = (0..3)
                    .map(|_| {
                        let (done, stale) = (done.clone(), stale.clone());
                        tokio::spawn(CachingService::current().scope(async move {
                            let mut fallbacks = 0;
                            for _ in 0..4 {
                                let after = done.load(Ordering::SeqCst);
                                if value(0, &DB).await == Ok(fresh) {
                                    fallbacks += 1;
                                    if after {
                                        stale.fetch_add(1, Ordering::SeqCst);
                                    }
                                }
                                tokio::task::yield_now().await;
                            }
                            fallbacks
                        }))
                    })
                    .collect();
                // the invalidation lands anywhere in the readers' calls: at once, or
                // up to 300 µs later (a remote read takes about 100)
                let lag = std::time::Instant::now() + Duration::from_micros(round % 4 * 100);
                while std::time::Instant::now() < lag {
                    tokio::task::yield_now().await;
                }
                cache_runtime::invalidate!(value(0, &DB)).await;
                done.store(true, Ordering::SeqCst);
                if value(0, &DB).await == Ok(fresh) {
                    stale.fetch_add(1, Ordering::SeqCst);
                }
                for r in readers {
                    served += r.await.unwrap();
                }
            }
            (stale.load(Ordering::SeqCst), served)
        })
        .await;
    eprintln!("{served} fallbacks served before the invalidation returned, {stale} after");
    assert_eq!(stale, 0, "fallbacks served after their invalidation");
    assert!(
        served > 0,
        "the race was exercised: some fallbacks were served"
    );
    served
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn race_invalidation_against_fallbacks_in_memory() {
    race_invalidation_against_fallbacks(service(), 3_000).await;
}

/// The same on Redis with an L1: the fallback is in both tiers.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn race_invalidation_against_fallbacks_on_redis() {
    let server = tests::redis_server::RedisServer::start();
    for l1 in [true, false] {
        let mut backend = cache_redis::RedisBackend::builder(server.url()).key_prefix(if l1 {
            "l1"
        } else {
            "l2"
        });
        if l1 {
            backend = backend.l1(cache_runtime::MemoryBackend::new());
        }
        let svc = CachingService::builder()
            .backend(backend.build().await.unwrap())
            .build()
            .unwrap();
        race_invalidation_against_fallbacks(svc, 1_500).await;
    }
}
