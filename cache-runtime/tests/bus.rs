//! The invalidation bus's rules, with two instances (services) on an in-process bus:
//! what one invalidates, the other drops; own messages are ignored; received
//! invalidations are applied locally only; a loss clears the in-process tier.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use cache_runtime::{
    add_dependency, cached, invalidate_cache, invalidate_dependency, BoxFuture, BusReceiver,
    CachingService, InvalidationBus, Item, MemoryBackend, MemoryBus, Message, RemoteError,
};

#[cached(name = "b.item")]
async fn item(id: u64) -> String {
    add_dependency(format!("item:{id}"));
    format!("item {id}")
}

#[cached(name = "b.page")]
async fn page(id: u64) -> String {
    format!("page of {}", item(id).await)
}

#[invalidate_cache(item)]
async fn touch(id: u64) {
    let _ = id;
}

fn instance(bus: &MemoryBus) -> CachingService {
    CachingService::builder()
        .backend(MemoryBackend::new())
        .sync(bus.clone())
        .build()
        .unwrap()
}

fn held(svc: &CachingService) -> Vec<String> {
    let mut keys = svc.local_keys();
    keys.sort();
    keys
}

#[tokio::test]
async fn an_invalidation_reaches_the_other_instance_only_once() {
    let bus = MemoryBus::new();
    let (a, b) = (instance(&bus), instance(&bus));
    a.scope(page(1)).await;
    b.scope(page(1)).await;
    b.scope(page(2)).await;
    assert_eq!(held(&b).len(), 4);

    a.scope(touch(1)).await;
    // b dropped item(1) and what depends on it (page(1)), by its own graph
    assert_eq!(held(&b), vec!["b.item:v1(2)", "b.page:v1(2)"]);
    assert_eq!(held(&a), Vec::<String>::new());
    let (sa, sb) = (a.stats().sync, b.stats().sync);
    assert_eq!(
        (sa.published, sa.received),
        (1, 0),
        "own messages are ignored"
    );
    assert_eq!(
        (sb.published, sb.received),
        (0, 1),
        "received, not published again"
    );
}

#[tokio::test]
async fn dependencies_and_clear_cross() {
    let bus = MemoryBus::new();
    let (a, b) = (instance(&bus), instance(&bus));
    b.scope(page(3)).await;
    b.scope(page(4)).await;
    a.scope(invalidate_dependency("item:3")).await;
    assert_eq!(held(&b), vec!["b.item:v1(4)", "b.page:v1(4)"]);
    a.scope(CachingService::clear()).await;
    assert!(held(&b).is_empty());
    assert_eq!(b.stats().sync.received, 2);
}

#[tokio::test]
async fn a_refresh_replaces_the_other_copies() {
    let bus = MemoryBus::new();
    let (a, b) = (instance(&bus), instance(&bus));
    b.scope(item(5)).await;
    b.scope(page(5)).await;
    a.scope(cache_runtime::refresh!(item(5))).await;
    assert!(held(&b).is_empty(), "{:?}", held(&b));
    assert_eq!(held(&a), vec!["b.item:v1(5)"]);
}

#[tokio::test]
async fn a_loss_clears_the_in_process_tier() {
    let bus = MemoryBus::new();
    let b = instance(&bus);
    b.scope(item(6)).await;
    bus.signal_loss();
    assert!(held(&b).is_empty());
    assert_eq!(b.stats().sync.l1_clears, 1);
    // until the bus receives again, nothing is kept in the in-process tier
    assert!(b.stats().sync.l1_bypassed);
    b.scope(item(6)).await;
    assert!(held(&b).is_empty(), "{:?}", held(&b));
    bus.signal_receiving();
    let sync = b.stats().sync;
    assert_eq!((sync.l1_clears, sync.l1_bypassed), (2, false));
    b.scope(item(6)).await;
    assert_eq!(held(&b), vec!["b.item:v1(6)"]);
}

#[tokio::test]
async fn messages_for_entries_not_held_leave_the_rest_alone() {
    static OWN_RUNS: AtomicU64 = AtomicU64::new(0);
    #[cached(name = "b.counted")]
    async fn counted(id: u64) -> u64 {
        OWN_RUNS.fetch_add(1, Ordering::SeqCst);
        id
    }
    let bus = MemoryBus::new();
    let (a, b) = (instance(&bus), instance(&bus));
    b.scope(counted(7)).await;
    for id in 1_000..6_000 {
        a.scope(cache_runtime::invalidate!(counted(id))).await;
    }
    assert_eq!(b.stats().sync.received, 5_000);
    b.scope(counted(7)).await;
    assert_eq!(OWN_RUNS.load(Ordering::SeqCst), 1, "still cached");
    assert_eq!(b.stats().function("b.counted").hits, 1);
}

/// A bus that delivers a message to the other instance while that instance is in the
/// middle of computing the entry: its result must not be kept.
#[tokio::test]
async fn a_message_during_a_computation_keeps_its_result_out() {
    static GATE: tokio::sync::Notify = tokio::sync::Notify::const_new();
    static ENTERED: tokio::sync::Notify = tokio::sync::Notify::const_new();
    #[cached(name = "b.slow")]
    async fn slow(id: u64) -> u64 {
        ENTERED.notify_one();
        GATE.notified().await;
        id
    }
    let bus = MemoryBus::new();
    let (a, b) = (instance(&bus), instance(&bus));
    let running = tokio::spawn(b.scope(slow(1)));
    ENTERED.notified().await;
    a.scope(cache_runtime::invalidate!(slow(1))).await;
    GATE.notify_one();
    assert_eq!(running.await.unwrap(), 1);
    assert!(
        held(&b).is_empty(),
        "computed across an invalidation: not kept"
    );
}

/// Payloads that are not messages are counted and ignored.
#[tokio::test]
async fn undecodable_payloads_are_counted() {
    #[derive(Default, Clone)]
    struct Capture(Arc<std::sync::Mutex<Option<BusReceiver>>>);
    impl InvalidationBus for Capture {
        fn attach(&self, receiver: BusReceiver) {
            *self.0.lock().unwrap() = Some(receiver);
        }
        fn publish(&self, _: Vec<u8>) -> BoxFuture<'_, Result<(), RemoteError>> {
            Box::pin(async { Err(RemoteError("down".into())) })
        }
    }
    let bus = Capture::default();
    let svc = CachingService::builder().sync(bus.clone()).build().unwrap();
    let receiver = bus.0.lock().unwrap().clone().unwrap();
    assert!(receiver.deliver(b"garbage"));
    let other = Message {
        sender: svc.instance_id() ^ 1,
        items: vec![Item::Clear],
    };
    svc.scope(item(8)).await;
    assert!(receiver.deliver(&other.encode()));
    assert!(held(&svc).is_empty());
    // a failing publication is counted; the invalidation still completes locally
    svc.scope(item(9)).await;
    tokio::time::timeout(Duration::from_secs(1), svc.scope(touch(9)))
        .await
        .unwrap();
    assert!(held(&svc).is_empty());
    let s = svc.stats().sync;
    assert_eq!((s.undecodable, s.received, s.publish_errors), (1, 1, 1));
    drop(svc);
    assert!(!receiver.deliver(&other.encode()), "the service is gone");
}

/// `peek!` reads the service of the scope it is awaited in.
#[tokio::test]
async fn peek_reads_the_scoped_service() {
    let b = instance(&MemoryBus::new());
    b.scope(item(10)).await;
    assert_eq!(
        b.scope(cache_runtime::peek!(item(10))).await.as_deref(),
        Some("item 10")
    );
    assert_eq!(
        cache_runtime::peek!(item(10)).await,
        None,
        "the global service"
    );
}

/// A publication that fails is sent again until it goes through: the other instance
/// drops its copy late rather than keeping it until it expires.
#[tokio::test]
async fn a_failed_publication_is_sent_again() {
    #[derive(Clone)]
    struct Flaky(MemoryBus, Arc<std::sync::atomic::AtomicU32>);
    impl InvalidationBus for Flaky {
        fn attach(&self, receiver: BusReceiver) {
            self.0.attach(receiver);
        }
        fn publish(&self, payload: Vec<u8>) -> BoxFuture<'_, Result<(), RemoteError>> {
            if self.1.fetch_add(1, std::sync::atomic::Ordering::SeqCst) < 3 {
                return Box::pin(async { Err(RemoteError("down".into())) });
            }
            self.0.publish(payload)
        }
    }
    let bus = Flaky(MemoryBus::new(), Arc::default());
    let a = CachingService::builder().sync(bus.clone()).build().unwrap();
    let b = CachingService::builder().sync(bus.clone()).build().unwrap();
    b.scope(item(11)).await;
    a.scope(cache_runtime::invalidate!(item(11))).await;
    assert_eq!(held(&b).len(), 1, "the first publication failed");
    let start = std::time::Instant::now();
    while !held(&b).is_empty() {
        assert!(start.elapsed() < Duration::from_secs(5), "never sent again");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let s = a.stats().sync;
    assert_eq!((s.publish_errors, s.republished, s.published), (1, 1, 1));
}

/// Publications that fail while the bus is down wait in one queue, sent again in order
/// by one task: a burst of invalidations does not become a burst of retrying tasks.
#[tokio::test]
async fn failed_publications_wait_in_one_queue() {
    #[derive(Clone)]
    struct Switch(
        MemoryBus,
        Arc<std::sync::atomic::AtomicBool>,
        Arc<AtomicU64>,
    );
    impl InvalidationBus for Switch {
        fn attach(&self, receiver: BusReceiver) {
            self.0.attach(receiver);
        }
        fn publish(&self, payload: Vec<u8>) -> BoxFuture<'_, Result<(), RemoteError>> {
            if self.1.load(Ordering::SeqCst) {
                self.2.fetch_add(1, Ordering::SeqCst);
                return Box::pin(async { Err(RemoteError("down".into())) });
            }
            self.0.publish(payload)
        }
    }
    let bus = Switch(MemoryBus::new(), Arc::default(), Arc::default());
    let a = CachingService::builder().sync(bus.clone()).build().unwrap();
    let b = CachingService::builder().sync(bus.clone()).build().unwrap();
    for id in 100..150 {
        b.scope(item(id)).await;
    }
    bus.1.store(true, Ordering::SeqCst);
    for id in 100..150 {
        a.scope(cache_runtime::invalidate!(item(id))).await;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let attempts = bus.2.load(Ordering::SeqCst);
    assert!(
        attempts <= 50 + 10,
        "{attempts} attempts while down: the retries went one at a time"
    );
    assert_eq!(held(&b).len(), 50, "nothing went through while down");
    bus.1.store(false, Ordering::SeqCst);
    let start = std::time::Instant::now();
    while !held(&b).is_empty() {
        assert!(start.elapsed() < Duration::from_secs(5), "not sent again");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let s = a.stats().sync;
    assert_eq!(
        (
            s.publish_errors,
            s.republished,
            s.published,
            s.republish_dropped
        ),
        (50, 50, 50, 0)
    );
}
