//! Concurrent calls of one key run the body once.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use cache_runtime::{cached, CachingService, Profile};
use tests::Runs;

fn service() -> CachingService {
    CachingService::builder().build().unwrap()
}

/// Spawns `n` calls of `f` on the multi-threaded runtime, all inside `svc`.
async fn spawn_all<F, Fut, T>(svc: &CachingService, n: usize, f: F) -> Vec<T>
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = T> + Send + 'static,
    T: Send + 'static,
{
    let handles: Vec<_> = (0..n).map(|_| tokio::spawn(svc.scope(f()))).collect();
    let mut out = Vec::with_capacity(n);
    for h in handles {
        out.push(h.await.unwrap());
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_thousand_callers_one_execution() {
    static RUNS: Runs = Runs::new();
    #[cached]
    async fn slow(id: u64) -> String {
        RUNS.hit();
        tokio::time::sleep(Duration::from_millis(100)).await;
        format!("value {id}")
    }
    let svc = service();
    let values = spawn_all(&svc, 1000, || slow(7)).await;
    assert_eq!(RUNS.get(), 1);
    assert!(values.iter().all(|v| v == "value 7"));
    let s = svc.stats().total;
    assert_eq!((s.executions, s.hits + s.misses), (1, 1000), "{s:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_error_does_not_poison_the_key() {
    static RUNS: Runs = Runs::new();
    static FAIL: AtomicBool = AtomicBool::new(true);
    #[cached]
    async fn flaky(id: u64) -> Result<u64, String> {
        RUNS.hit();
        tokio::time::sleep(Duration::from_millis(50)).await;
        if FAIL.swap(false, Ordering::SeqCst) {
            Err("database unavailable".into())
        } else {
            Ok(id)
        }
    }
    let svc = service();
    let results = spawn_all(&svc, 100, || flaky(1)).await;
    // the leader failed; its waiters retried, one of them ran the body again and the
    // rest got its value
    assert_eq!(RUNS.get(), 2);
    assert_eq!(results.iter().filter(|r| r.is_err()).count(), 1);
    assert_eq!(svc.scope(flaky(1)).await, Ok(1));
    assert_eq!(RUNS.get(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_panic_does_not_poison_the_key() {
    static RUNS: Runs = Runs::new();
    static PANIC: AtomicBool = AtomicBool::new(true);
    #[cached]
    async fn fragile(id: u64) -> u64 {
        RUNS.hit();
        tokio::time::sleep(Duration::from_millis(50)).await;
        if PANIC.swap(false, Ordering::SeqCst) {
            panic!("bug in the body");
        }
        id
    }
    let svc = service();
    let handles: Vec<_> = (0..50)
        .map(|_| tokio::spawn(svc.scope(fragile(3))))
        .collect();
    let mut ok = 0;
    let mut panicked = 0;
    for h in handles {
        match h.await {
            Ok(v) => {
                assert_eq!(v, 3);
                ok += 1;
            }
            Err(e) => {
                assert!(e.is_panic());
                panicked += 1;
            }
        }
    }
    assert_eq!((ok, panicked), (49, 1));
    assert_eq!(RUNS.get(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancelled_leader_hands_over() {
    static RUNS: Runs = Runs::new();
    #[cached]
    async fn slow_cancelled(id: u64) -> u64 {
        RUNS.hit();
        tokio::time::sleep(Duration::from_millis(200)).await;
        id
    }
    let svc = service();
    let leader = tokio::spawn(svc.scope(slow_cancelled(5)));
    tokio::time::sleep(Duration::from_millis(20)).await;
    let waiter = tokio::spawn(svc.scope(slow_cancelled(5)));
    tokio::time::sleep(Duration::from_millis(20)).await;
    leader.abort();
    assert!(leader.await.unwrap_err().is_cancelled());
    assert_eq!(
        waiter.await.unwrap(),
        5,
        "the waiter took over instead of hanging"
    );
    assert_eq!(RUNS.get(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lock_timeout_bounds_the_wait() {
    static RUNS: Runs = Runs::new();
    #[cached(profile = "impatient")]
    async fn stuck(id: u64) -> u64 {
        RUNS.hit();
        if RUNS.get() == 1 {
            tokio::time::sleep(Duration::from_secs(30)).await;
        }
        id
    }
    let svc = CachingService::builder()
        .profile(Profile::new("impatient").lock_timeout(Duration::from_millis(100)))
        .build()
        .unwrap();
    let first = tokio::spawn(svc.scope(stuck(1)));
    tokio::time::sleep(Duration::from_millis(20)).await;
    let started = std::time::Instant::now();
    assert_eq!(svc.scope(stuck(1)).await, 1);
    let waited = started.elapsed();
    assert!(waited >= Duration::from_millis(80), "{waited:?}");
    assert!(waited < Duration::from_secs(5), "{waited:?}");
    assert_eq!(RUNS.get(), 2, "the waiter ran the body itself");
    // its result was stored: later calls are hits
    assert_eq!(svc.scope(stuck(1)).await, 1);
    assert_eq!(RUNS.get(), 2);
    first.abort();
}

#[test]
fn plain_functions_single_flight_across_threads() {
    static RUNS: Runs = Runs::new();
    #[cached]
    fn blocking(id: u64) -> u64 {
        RUNS.hit();
        std::thread::sleep(Duration::from_millis(100));
        id
    }
    let svc = service();
    let threads: Vec<_> = (0..16)
        .map(|_| {
            let svc = svc.clone();
            std::thread::spawn(move || svc.scope_sync(|| blocking(9)))
        })
        .collect();
    for t in threads {
        assert_eq!(t.join().unwrap(), 9);
    }
    assert_eq!(RUNS.get(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn different_keys_run_concurrently() {
    static RUNS: Runs = Runs::new();
    #[cached]
    async fn slow_many(id: u64) -> u64 {
        RUNS.hit();
        tokio::time::sleep(Duration::from_millis(200)).await;
        id
    }
    let svc = service();
    let started = std::time::Instant::now();
    let handles: Vec<_> = (0..20)
        .map(|i| tokio::spawn(svc.scope(slow_many(i))))
        .collect();
    for (i, h) in handles.into_iter().enumerate() {
        assert_eq!(h.await.unwrap(), i as u64);
    }
    assert_eq!(RUNS.get(), 20);
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "keys do not wait for each other"
    );
}
