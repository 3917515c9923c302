//! The tiering logic with a remote store, checked against an in-memory store: what is
//! read from and written to the remote tier, and what happens when it fails.
//! (`cache-redis`'s tests run the same paths against real Redis servers.)

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use cache_runtime::{
    cached, invalidate_cache, Backend, BoxFuture, CachingService, Fetched, MemoryBackend,
    RemoteError, RemoteKey, RemoteStore, Removed, ShutdownReport,
};

/// Value and expiry, by key.
type Entries = HashMap<String, (Vec<u8>, Duration)>;

#[derive(Clone, Default)]
struct Store {
    data: Arc<Mutex<Entries>>,
    down: Arc<AtomicBool>,
    /// Removals fail (as a Redis user without `DEL` would see).
    refuse_removals: Arc<AtomicBool>,
    gets: Arc<AtomicUsize>,
    sets: Arc<AtomicUsize>,
    touches: Arc<Mutex<Vec<Duration>>>,
}

impl Store {
    fn keys(&self) -> Vec<String> {
        let mut k: Vec<String> = self.data.lock().unwrap().keys().cloned().collect();
        k.sort();
        k
    }
}

impl RemoteStore for Store {
    fn get<'a>(
        &'a self,
        key: RemoteKey<'a>,
        touch: Option<Duration>,
    ) -> BoxFuture<'a, Result<Fetched, RemoteError>> {
        Box::pin(async move {
            self.gets.fetch_add(1, Ordering::SeqCst);
            if self.down.load(Ordering::SeqCst) {
                return Err(RemoteError("connection refused".into()));
            }
            if let Some(t) = touch {
                self.touches.lock().unwrap().push(t);
            }
            let data = self.data.lock().unwrap();
            Ok(key
                .with_text(|key| data.get(key).map(|(v, _)| v.clone()))
                .into())
        })
    }
    fn set(&self, key: String, value: Vec<u8>, ttl: Duration) {
        if !self.down.load(Ordering::SeqCst) {
            self.sets.fetch_add(1, Ordering::SeqCst);
            self.data.lock().unwrap().insert(key, (value, ttl));
        }
    }
    fn remove(
        &self,
        keys: Vec<String>,
        _publish: Option<Vec<u8>>,
    ) -> BoxFuture<'_, Result<Removed, RemoteError>> {
        Box::pin(async move {
            if self.refuse_removals.load(Ordering::SeqCst) {
                return Err(RemoteError("NOPERM no DEL for you".into()));
            }
            let mut data = self.data.lock().unwrap();
            for k in keys {
                data.remove(&k);
            }
            Ok(Removed::default())
        })
    }
    fn clear(&self) -> BoxFuture<'_, Result<(), RemoteError>> {
        Box::pin(async move {
            self.data.lock().unwrap().clear();
            Ok(())
        })
    }
    fn flush(&self, _timeout: Duration) -> BoxFuture<'_, ShutdownReport> {
        Box::pin(async { ShutdownReport::new(0, 0, false) })
    }
    fn max_value_size(&self) -> usize {
        64
    }
    fn default_ttl(&self) -> Duration {
        Duration::from_secs(3600)
    }
}

fn service(store: &Store, l1: bool) -> CachingService {
    let l1 = l1.then(|| MemoryBackend::new().max_entries(100));
    CachingService::builder()
        .backend(Backend::remote(store.clone(), l1))
        .build()
        .unwrap()
}

#[cached(name = "t.product")]
async fn product(id: u64) -> String {
    format!("product {id}")
}

#[invalidate_cache(product)]
async fn rename(id: u64) {
    let _ = id;
}

#[tokio::test]
async fn a_second_instance_reads_what_the_first_wrote() {
    let store = Store::default();
    let (a, b) = (service(&store, true), service(&store, true));
    assert_eq!(a.scope(product(1)).await, "product 1");
    assert_eq!(store.keys(), vec!["t.product:v1(1)".to_owned()]);
    assert_eq!(b.scope(product(1)).await, "product 1");
    // b was served by the remote tier: it never ran the body
    let s = b.stats().total;
    assert_eq!((s.l2_hits, s.hits, s.misses, s.executions), (1, 1, 0, 0));
    // and b's in-process tier holds it now
    b.scope(product(1)).await;
    assert_eq!(b.stats().total.l1_hits, 1);
    // an invalidation on b removes it from the remote tier too
    b.scope(rename(1)).await;
    assert!(store.keys().is_empty());
}

#[tokio::test]
async fn without_an_in_process_tier() {
    let store = Store::default();
    let svc = service(&store, false);
    svc.scope(async {
        product(2).await;
        product(2).await;
        product(2).await;
    })
    .await;
    let s = svc.stats().total;
    assert_eq!((s.l1_hits, s.l2_hits, s.executions), (0, 2, 1));
}

#[tokio::test]
async fn bytes_that_do_not_decode_are_a_miss_and_are_overwritten() {
    let store = Store::default();
    store.data.lock().unwrap().insert(
        "t.product:v1(3)".into(),
        (b"not msgpack".to_vec(), Duration::ZERO),
    );
    let svc = service(&store, true);
    assert_eq!(svc.scope(product(3)).await, "product 3");
    let s = svc.stats().total;
    assert_eq!((s.decode_errors, s.executions), (1, 1));
    let other = service(&store, true);
    assert_eq!(other.scope(product(3)).await, "product 3");
    assert_eq!(
        other.stats().total.l2_hits,
        1,
        "the value was written again"
    );
}

#[tokio::test]
async fn oversized_values_are_returned_and_not_stored_remotely() {
    #[cached(name = "t.big")]
    async fn big(n: usize) -> String {
        "x".repeat(n)
    }
    let store = Store::default();
    let svc = service(&store, true);
    assert_eq!(svc.scope(big(1000)).await.len(), 1000);
    assert!(store.keys().is_empty());
    assert_eq!(svc.stats().total.oversized, 1);
    assert_eq!(svc.scope(big(1000)).await.len(), 1000);
    assert_eq!(svc.stats().total.l1_hits, 1, "still cached in process");
}

#[tokio::test]
async fn a_failing_store_never_fails_a_call() {
    let store = Store::default();
    store.down.store(true, Ordering::SeqCst);
    let svc = service(&store, false);
    for _ in 0..3 {
        assert_eq!(svc.scope(product(4)).await, "product 4");
    }
    let s = svc.stats().total;
    assert_eq!((s.backend_errors, s.executions), (3, 3));
    store.down.store(false, Ordering::SeqCst);
    svc.scope(product(4)).await;
    svc.scope(product(4)).await;
    assert_eq!(
        svc.stats().total.l2_hits,
        1,
        "back in use once the store answers"
    );
}

#[tokio::test]
async fn expiry_reaches_the_store() {
    #[cached(name = "t.ttl", ttl = "90s")]
    async fn with_ttl(id: u64) -> u64 {
        id
    }
    #[cached(name = "t.sliding", sliding = "2m")]
    async fn sliding(id: u64) -> u64 {
        id
    }
    let store = Store::default();
    let (a, b) = (service(&store, false), service(&store, false));
    a.scope(with_ttl(1)).await;
    a.scope(sliding(1)).await;
    let data = store.data.lock().unwrap().clone();
    assert_eq!(data["t.ttl:v1(1)"].1, Duration::from_secs(90));
    assert_eq!(data["t.sliding:v1(1)"].1, Duration::from_secs(120));
    b.scope(sliding(1)).await;
    // every read of a sliding entry moves its expiry (a's miss and b's hit)
    assert_eq!(
        *store.touches.lock().unwrap(),
        vec![Duration::from_secs(120); 2]
    );
    assert_eq!(b.stats().total.l2_hits, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_remote_read_and_one_write_for_concurrent_callers() {
    static SLOW: AtomicUsize = AtomicUsize::new(0);
    #[cached(name = "t.slow")]
    async fn slow(id: u64) -> u64 {
        SLOW.fetch_add(1, Ordering::SeqCst);
        tokio::time::sleep(Duration::from_millis(100)).await;
        id
    }
    let store = Store::default();
    let svc = service(&store, true);
    let handles: Vec<_> = (0..1000)
        .map(|_| tokio::spawn(svc.scope(slow(9))))
        .collect();
    for h in handles {
        assert_eq!(h.await.unwrap(), 9);
    }
    assert_eq!(SLOW.load(Ordering::SeqCst), 1);
    assert_eq!(store.gets.load(Ordering::SeqCst), 1);
    assert_eq!(store.sets.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn failures_are_counted_each_and_logged_once_a_second() {
    use std::sync::Mutex as StdMutex;
    use tracing::Level;
    use tracing_subscriber::layer::{Context, SubscriberExt};

    #[derive(Clone, Default)]
    struct Warnings(Arc<StdMutex<usize>>);
    impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for Warnings {
        fn on_event(&self, event: &tracing::Event<'_>, _: Context<'_, S>) {
            if *event.metadata().level() == Level::WARN {
                *self.0.lock().unwrap() += 1;
            }
        }
    }
    let warnings = Warnings::default();
    let _guard =
        tracing::subscriber::set_default(tracing_subscriber::registry().with(warnings.clone()));

    let store = Store::default();
    store.down.store(true, Ordering::SeqCst);
    let svc = service(&store, false);
    for _ in 0..50 {
        svc.scope(product(8)).await;
    }
    assert_eq!(svc.stats().total.backend_errors, 50);
    assert_eq!(
        *warnings.0.lock().unwrap(),
        1,
        "one warning for 50 failures within a second"
    );
}

/// A version counter standing in for the database.
static VERSION: AtomicUsize = AtomicUsize::new(0);

#[cached(name = "t.versioned")]
async fn versioned(id: u64) -> usize {
    let _ = id;
    VERSION.load(Ordering::SeqCst)
}

#[invalidate_cache(versioned)]
async fn bump(id: u64) {
    let _ = id;
    VERSION.fetch_add(1, Ordering::SeqCst);
}

#[tokio::test]
async fn a_refused_removal_is_never_read_back_and_is_sent_again() {
    let store = Store::default();
    let (a, b) = (service(&store, true), service(&store, false));
    let start = VERSION.load(Ordering::SeqCst);
    assert_eq!(a.scope(versioned(1)).await, start);
    store.refuse_removals.store(true, Ordering::SeqCst);
    for round in 1..=200 {
        a.scope(bump(1)).await;
        // the old value is still in the store, and the invalidating instance never
        // reads it back
        assert_eq!(a.scope(versioned(1)).await, start + round, "round {round}");
    }
    let stale_for_others = b.scope(versioned(1)).await;
    assert!(stale_for_others <= start + 200);
    let r = a.stats().remote;
    assert!(r.removal_errors >= 200, "{r:?}");
    assert!(r.removals_waiting > 0, "{r:?}");
    assert!(r.reads_held >= 1, "{r:?}");
    // once removals go through again, the waiting ones are sent, in order
    store.refuse_removals.store(false, Ordering::SeqCst);
    let t = std::time::Instant::now();
    while a.stats().remote.removals_waiting > 0 {
        assert!(
            t.elapsed() < Duration::from_secs(10),
            "{:?}",
            a.stats().remote
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert!(a.stats().remote.removals_retried >= 1);
    assert_eq!(
        b.scope(versioned(1)).await,
        start + 200,
        "the removal landed"
    );
    assert_eq!(a.scope(versioned(1)).await, start + 200);
}
