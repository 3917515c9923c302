//! The dependency graph in Redis (`RedisBackend::dependencies(true)`), against real
//! `redis-server` processes: links written with entries, invalidations that reach
//! every instance's entries through Redis, no stale write-back across instances, the
//! collector and the full collection.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use cache_redis::{full_collection, DependencyCollector, RedisBackend, RedisBackendError};
use cache_runtime::{add_dependency, cached, invalidate_dependency, CachingService, MemoryBackend};
use tests::redis_server::RedisServer;

async fn instance(server: &RedisServer, prefix: &str, l1: bool, deps: bool) -> CachingService {
    let mut b = RedisBackend::builder(server.url())
        .key_prefix(prefix)
        .dependencies(deps);
    if l1 {
        b = b.l1(MemoryBackend::new());
    }
    CachingService::builder()
        .backend(b.build().await.expect("build"))
        .build()
        .unwrap()
}

async fn keys(server: &RedisServer, pattern: &str) -> Vec<String> {
    let client = redis::Client::open(server.url()).unwrap();
    let mut con = client.get_multiplexed_async_connection().await.unwrap();
    let mut keys: Vec<String> = redis::cmd("KEYS")
        .arg(pattern)
        .query_async(&mut con)
        .await
        .unwrap();
    keys.sort();
    keys
}

/// The entries that have links in the graph of `prefix`.
async fn linked(server: &RedisServer, prefix: &str) -> Vec<String> {
    let client = redis::Client::open(server.url()).unwrap();
    let mut con = client.get_multiplexed_async_connection().await.unwrap();
    let mut keys: Vec<String> = redis::cmd("HKEYS")
        .arg(format!("{prefix}:g:links"))
        .query_async(&mut con)
        .await
        .unwrap();
    keys.sort();
    keys
}

static INNER: AtomicU64 = AtomicU64::new(0);
static MIDDLE: AtomicU64 = AtomicU64::new(0);
static OUTER: AtomicU64 = AtomicU64::new(0);

#[cached(name = "rd.inner")]
async fn inner(id: u64) -> u64 {
    INNER.fetch_add(1, Ordering::SeqCst);
    add_dependency(format!("row:{id}"));
    id
}

#[cached(name = "rd.middle")]
async fn middle(id: u64) -> u64 {
    MIDDLE.fetch_add(1, Ordering::SeqCst);
    inner(id).await + 100
}

#[cached(name = "rd.outer")]
async fn outer(id: u64) -> u64 {
    OUTER.fetch_add(1, Ordering::SeqCst);
    middle(id).await + 1000
}

fn runs() -> [u64; 3] {
    [&OUTER, &MIDDLE, &INNER].map(|c| c.load(Ordering::SeqCst))
}

/// Serializes the tests counting runs of `outer`, `middle` and `inner`.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// A's entries, read by B from Redis (so B's own graph knows nothing), are removed
/// by B's dependency invalidation from Redis and from A's L1.
#[tokio::test]
async fn a_dependency_invalidation_reaches_every_instance_through_redis() {
    let _serial = SERIAL.lock().await;
    for l1 in [true, false] {
        let server = RedisServer::start();
        let prefix = "dep";
        let (a, b) = (
            instance(&server, prefix, l1, true).await,
            instance(&server, prefix, l1, true).await,
        );
        let id = if l1 { 1 } else { 2 };
        let start = runs();
        assert_eq!(a.scope(outer(id)).await, 1100 + id);
        a.shutdown().await;
        assert_eq!(b.scope(outer(id)).await, 1100 + id);
        assert_eq!(b.stats().total.l2_hits, 1, "B read it from Redis");
        let links = linked(&server, "dep").await;
        assert_eq!(links.len(), 3, "{links:?}");

        b.scope(invalidate_dependency(format!("row:{id}"))).await;
        assert!(
            keys(&server, "dep:2:*").await.is_empty(),
            "the chain left Redis"
        );
        assert!(linked(&server, "dep").await.is_empty());
        assert!(keys(&server, "dep:g:rev:*").await.is_empty());
        // A's L1 heard about the three entries
        let deadline = Instant::now() + Duration::from_secs(2);
        while a.scope(cache_runtime::peek!(outer(id))).await.is_some() {
            assert!(Instant::now() < deadline, "A's L1 kept outer");
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        assert_eq!(a.scope(outer(id)).await, 1100 + id);
        let after = runs();
        assert_eq!(
            [
                after[0] - start[0],
                after[1] - start[1],
                after[2] - start[2]
            ],
            [2, 2, 2],
            "l1 = {l1}"
        );
    }
}

/// Chains, cycles and self-dependencies end; a cascade reaches what depends on it.
#[tokio::test]
async fn chains_cycles_and_cascades_through_redis() {
    #[cached(name = "rd.link")]
    async fn link(n: u64) -> u64 {
        if n < 8 {
            link(n + 1).await + 1
        } else {
            add_dependency("chain-end");
            0
        }
    }
    #[cached(name = "rd.cycle")]
    async fn cycle(n: u64) -> u64 {
        // each depends on the other's dependency and on itself by name
        add_dependency(format!("cycle:{}", n % 2));
        add_dependency(format!("cycle:{}", (n + 1) % 2));
        n
    }
    struct Order(u64);
    impl cache_runtime::CacheDependency for Order {
        fn dependency_key(&self) -> String {
            format!("order:{}", self.0)
        }
        fn cascade(&self) -> Vec<cache_runtime::Dependency> {
            vec![cache_runtime::Dependency::new("customer:9")]
        }
    }
    #[cached(name = "rd.order")]
    async fn order(id: u64) -> u64 {
        add_dependency(Order(id));
        id
    }
    #[cached(name = "rd.customer_view")]
    async fn customer_view() -> u64 {
        add_dependency("customer:9");
        9
    }
    for l1 in [false, true] {
        let server = RedisServer::start();
        let (a, b) = (
            instance(&server, "graph", l1, true).await,
            instance(&server, "graph", l1, true).await,
        );
        a.scope(link(1)).await;
        a.scope(cycle(0)).await;
        a.scope(cycle(1)).await;
        a.scope(order(5)).await;
        a.scope(customer_view()).await;
        a.shutdown().await;
        assert_eq!(keys(&server, "graph:2:*").await.len(), 8 + 2 + 2);

        b.scope(invalidate_dependency("chain-end")).await;
        assert_eq!(
            keys(&server, "graph:2:rd.link*").await,
            Vec::<String>::new()
        );
        b.scope(invalidate_dependency("cycle:0")).await;
        assert_eq!(
            keys(&server, "graph:2:rd.cycle*").await,
            Vec::<String>::new()
        );
        // invalidating the order cascades to the customer
        b.scope(invalidate_dependency(&Order(5))).await;
        assert!(keys(&server, "graph:2:*").await.is_empty());
        assert!(linked(&server, "graph").await.is_empty());
        assert!(keys(&server, "graph:g:rev:*").await.is_empty());
        assert!(keys(&server, "graph:g:cascade:*").await.is_empty());
        assert_eq!(a.local_keys(), Vec::<String>::new(), "A's L1 heard it all");
    }
}

/// Replacing an entry replaces its links in Redis.
#[tokio::test]
async fn replacing_an_entry_replaces_its_links() {
    static SOURCE: AtomicU64 = AtomicU64::new(0);
    #[cached(name = "rd.switching")]
    async fn switching() -> u64 {
        let n = SOURCE.load(Ordering::SeqCst);
        add_dependency(format!("source:{n}"));
        n
    }
    let server = RedisServer::start();
    let a = instance(&server, "replace", false, true).await;
    a.scope(switching()).await;
    SOURCE.store(1, Ordering::SeqCst);
    a.scope(cache_runtime::refresh!(switching())).await;
    a.shutdown().await;
    assert_eq!(
        keys(&server, "replace:g:rev:*").await,
        vec!["replace:g:rev:d:source:1".to_owned()]
    );
    a.scope(invalidate_dependency("source:0")).await;
    assert_eq!(
        keys(&server, "replace:2:*").await.len(),
        1,
        "the old link is gone"
    );
    a.scope(invalidate_dependency("source:1")).await;
    assert!(keys(&server, "replace:2:*").await.is_empty());
}

/// The graph's scripts go by their hash; a server that lost them (restarted, or
/// `SCRIPT FLUSH`) is sent their text again, and no write or invalidation is lost.
#[tokio::test]
async fn scripts_the_server_lost_are_sent_again() {
    let _serial = SERIAL.lock().await;
    let server = RedisServer::start();
    let a = instance(&server, "flush", false, true).await;
    let id = 31;
    let of_id = |links: Vec<String>| {
        links
            .into_iter()
            .filter(|k| k.ends_with(&format!("({id})")))
            .count()
    };
    assert_eq!(a.scope(outer(id)).await, 1100 + id);
    a.shutdown().await;
    assert_eq!(of_id(linked(&server, "flush").await), 3);
    let texts = server.calls("eval");
    let hashes = server.calls("evalsha");
    for i in 0..5 {
        a.scope(inner(100 + i)).await;
    }
    a.shutdown().await;
    assert_eq!(server.calls("eval"), texts, "no script text sent again");
    assert_eq!(server.calls("evalsha"), hashes + 5);

    assert_eq!(server.command(&["SCRIPT", "FLUSH"]).as_deref(), Some("+OK"));
    a.scope(invalidate_dependency(format!("row:{id}"))).await;
    assert!(
        keys(&server, "flush:2:*(31)").await.is_empty(),
        "the chain left Redis"
    );
    assert_eq!(of_id(linked(&server, "flush").await), 0);

    assert_eq!(server.command(&["SCRIPT", "FLUSH"]).as_deref(), Some("+OK"));
    assert_eq!(a.scope(outer(id)).await, 1100 + id);
    a.shutdown().await;
    assert_eq!(of_id(linked(&server, "flush").await), 3, "written again");
    assert_eq!(keys(&server, "flush:2:*(31)").await.len(), 3);

    // the full collection's scripts too
    assert_eq!(server.command(&["SCRIPT", "FLUSH"]).as_deref(), Some("+OK"));
    let report = full_collection(&server.url(), "flush").await.unwrap();
    assert!(report.scanned >= 8, "{report:?}");
    assert_eq!(report.removed(), 0, "{report:?}");

    // and a sliding entry's read (its value, its expiry moved, and the count)
    a.scope(slides(1)).await;
    a.shutdown().await;
    let b = instance(&server, "flush", false, true).await;
    let (texts, hashes) = (server.calls("eval"), server.calls("evalsha"));
    assert_eq!(b.scope(slides(1)).await, 1);
    assert_eq!(server.calls("eval"), texts, "read by its hash");
    assert_eq!(server.calls("evalsha"), hashes + 1);
    assert_eq!(server.command(&["SCRIPT", "FLUSH"]).as_deref(), Some("+OK"));
    assert_eq!(b.scope(slides(1)).await, 1);
    assert_eq!(server.calls("eval"), texts + 1, "its text sent again");
    assert_eq!(b.stats().total.l2_hits, 2, "{:?}", b.stats().total);

    // What `redis::Script::invoke_async` sends instead after a flush: the refused
    // `EVALSHA`, `SCRIPT LOAD`, and the `EVALSHA` again, three round trips where
    // ours takes two (the refused `EVALSHA`, then `EVAL`).
    let client = cache_redis::redis::Client::open(server.url()).unwrap();
    let mut con = client.get_multiplexed_async_connection().await.unwrap();
    let script = cache_redis::redis::Script::new("return 1");
    let _: i64 = script.invoke_async(&mut con).await.unwrap();
    assert_eq!(server.command(&["SCRIPT", "FLUSH"]).as_deref(), Some("+OK"));
    let counts = || {
        let c = |name| server.calls(name);
        (c("evalsha"), c("eval"), c("script|load"))
    };
    let before = counts();
    let _: i64 = script.invoke_async(&mut con).await.unwrap();
    let after = counts();
    assert_eq!(
        (after.0 - before.0, after.1 - before.1, after.2 - before.2),
        (2, 0, 1),
        "invoke_async after NOSCRIPT: the refused EVALSHA, SCRIPT LOAD, EVALSHA again"
    );
}

#[cached(name = "d.slides", sliding = "1m")]
async fn slides(id: u64) -> u64 {
    id
}

/// A Redis that is out of memory under `noeviction` refuses writes, but still takes
/// invalidations (they free memory): nothing stale stays in it.
#[tokio::test]
async fn a_full_redis_still_takes_invalidations() {
    let _serial = SERIAL.lock().await;
    let server = RedisServer::start_with(&["--maxmemory-policy", "noeviction"]);
    let a = instance(&server, "oom", false, true).await;
    let id = 41;
    assert_eq!(a.scope(outer(id)).await, 1100 + id);
    a.shutdown().await;
    assert_eq!(keys(&server, "oom:2:*(41)").await.len(), 3);
    // above its limit from now on: commands that add memory are refused
    assert_eq!(
        server
            .command(&["CONFIG", "SET", "maxmemory", "1"])
            .as_deref(),
        Some("+OK")
    );
    assert!(server
        .command(&["SET", "probe", "1"])
        .is_some_and(|r| r.starts_with("-OOM")));
    a.scope(invalidate_dependency(format!("row:{id}"))).await;
    assert!(
        keys(&server, "oom:2:*").await.is_empty(),
        "the chain left Redis"
    );
    assert!(linked(&server, "oom").await.is_empty());
    // a value computed now is not written (refused), and that fails nothing else
    let before = runs();
    assert_eq!(a.scope(outer(id)).await, 1100 + id);
    assert_eq!(runs()[0] - before[0], 1);
    a.shutdown().await;
    assert!(keys(&server, "oom:2:*").await.is_empty());
    assert_eq!(
        server
            .command(&["CONFIG", "SET", "maxmemory", "0"])
            .as_deref(),
        Some("+OK")
    );
    assert_eq!(a.scope(middle(id)).await, 100 + id);
    a.shutdown().await;
    assert_eq!(keys(&server, "oom:2:*(41)").await.len(), 2, "written again");
}

/// `dependencies(false)`: an entry with dependencies stays in the in-process tier.
#[tokio::test]
async fn without_the_graph_entries_with_dependencies_stay_local() {
    let _serial = SERIAL.lock().await;
    let server = RedisServer::start();
    let a = instance(&server, "local", true, false).await;
    a.scope(outer(3)).await;
    a.shutdown().await;
    assert!(
        keys(&server, "local:*").await.is_empty(),
        "nothing with dependencies in Redis"
    );
    assert_eq!(a.stats().total.local_only, 3);
    let start = runs();
    a.scope(invalidate_dependency("row:3")).await;
    a.scope(outer(3)).await;
    let after = runs();
    assert_eq!(
        [
            after[0] - start[0],
            after[1] - start[1],
            after[2] - start[2]
        ],
        [1, 1, 1]
    );
}

static GATE: tokio::sync::Notify = tokio::sync::Notify::const_new();
static ENTERED: tokio::sync::Notify = tokio::sync::Notify::const_new();

#[cached(name = "rd.slow")]
async fn slow(id: u64) -> String {
    add_dependency(format!("slow-row:{id}"));
    let seen = std::fs::read_to_string(db_path(id)).unwrap_or_default();
    ENTERED.notify_one();
    GATE.notified().await;
    seen
}

fn db_path(id: u64) -> std::path::PathBuf {
    std::env::temp_dir().join(format!("cache-rs-straddle-{}-{id}", std::process::id()))
}

/// A value computed on A across B's invalidation (of its key, or of a dependency its
/// body added) is returned to A's caller but not written to Redis. Without an L1, A
/// does not subscribe: only the markers of the invalidation keep the write out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_stale_write_back_across_instances() {
    for (id, by_dependency, l1) in [
        (1, false, true),
        (2, true, true),
        (3, false, false),
        (4, true, false),
    ] {
        let server = RedisServer::start();
        let (a, b) = (
            instance(&server, "straddle", l1, true).await,
            instance(&server, "straddle", l1, true).await,
        );
        std::fs::write(db_path(id), "old").unwrap();
        let running = tokio::spawn(a.scope(slow(id)));
        ENTERED.notified().await;
        std::fs::write(db_path(id), "new").unwrap();
        if by_dependency {
            b.scope(invalidate_dependency(format!("slow-row:{id}")))
                .await;
        } else {
            b.scope(cache_runtime::invalidate!(slow(id))).await;
        }
        // the markers have no expiry of their own: `volatile-*` eviction never takes them
        assert_eq!(
            server.command(&["PTTL", "straddle:g:marks"]).as_deref(),
            Some(":-1")
        );
        GATE.notify_one();
        assert_eq!(
            running.await.unwrap(),
            "old",
            "A's caller gets what A computed"
        );
        a.shutdown().await;
        assert!(
            keys(&server, "straddle:2:*").await.is_empty(),
            "not written"
        );
        let fresh = instance(&server, "straddle", true, true).await;
        let reading = tokio::spawn(fresh.scope(slow(id)));
        ENTERED.notified().await;
        GATE.notify_one();
        assert_eq!(reading.await.unwrap(), "new");
        let _ = std::fs::remove_file(db_path(id));
    }
}

#[tokio::test]
async fn bad_server_settings_are_named() {
    let server = RedisServer::start_with(&["--maxmemory-policy", "allkeys-lru"]);
    let err = RedisBackend::builder(server.url())
        .dependencies(true)
        .build()
        .await
        .unwrap_err();
    assert!(
        matches!(err, RedisBackendError::ServerSettings { .. }),
        "{err}"
    );
    assert!(
        err.to_string()
            .contains("CONFIG SET maxmemory-policy volatile-lru"),
        "{err}"
    );
    let server = RedisServer::start_with(&["--notify-keyspace-events", ""]);
    let err = DependencyCollector::builder(server.url())
        .start()
        .await
        .unwrap_err();
    assert!(
        err.to_string()
            .contains("CONFIG SET notify-keyspace-events Exe"),
        "{err}"
    );
    // without dependencies, the backend does not need them
    RedisBackend::builder(server.url()).build().await.unwrap();
    // expiry events without eviction events are accepted (with a warning)
    let server = RedisServer::start_with(&["--notify-keyspace-events", "Exg"]);
    RedisBackend::builder(server.url())
        .dependencies(true)
        .build()
        .await
        .unwrap();
    // noeviction is accepted (with a warning): the graph is never evicted
    let server = RedisServer::start_with(&["--maxmemory-policy", "noeviction"]);
    RedisBackend::builder(server.url())
        .dependencies(true)
        .build()
        .await
        .unwrap();
}

#[cached(name = "rd.expiring", ttl = "1s")]
async fn expiring(id: u64) -> u64 {
    add_dependency(format!("a:{id}"));
    add_dependency(format!("b:{id}"));
    add_dependency("shared");
    id
}

/// After 50 entries with three dependencies each expire under a running collector,
/// no key naming them or their dependencies is left.
#[tokio::test]
async fn the_collector_removes_the_links_of_expired_values() {
    let server = RedisServer::start();
    // two collectors at once
    let start = || {
        DependencyCollector::builder(server.url())
            .key_prefix("gc")
            .start()
    };
    let (collector, other) = (start().await.unwrap(), start().await.unwrap());
    let a = instance(&server, "gc", false, true).await;
    for id in 0..50 {
        a.scope(expiring(id)).await;
    }
    a.shutdown().await;
    assert_eq!(linked(&server, "gc").await.len(), 50);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let left: Vec<String> = keys(&server, "gc:*")
            .await
            .into_iter()
            .filter(|k| k != "gc:g:epoch")
            .collect();
        if left.is_empty() {
            break;
        }
        assert!(Instant::now() < deadline, "left: {left:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(collector.collected() + other.collected(), 50);
    collector.stop().await;
    other.stop().await;
}

/// A collector whose subscription is killed resubscribes and runs a full collection
/// (it may have missed notifications), and goes on collecting.
#[tokio::test]
async fn a_collector_recovers_its_subscription() {
    let server = RedisServer::start();
    let collector = DependencyCollector::builder(server.url())
        .key_prefix("gcl")
        .start()
        .await
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while collector.full_collections() < 1 {
        assert!(Instant::now() < deadline, "the collection at start");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let a = instance(&server, "gcl", false, true).await;
    for id in 0..10 {
        a.scope(expiring(id)).await;
    }
    a.shutdown().await;
    server.command(&["CLIENT", "KILL", "TYPE", "pubsub"]);
    let deadline = Instant::now() + Duration::from_secs(10);
    // the values expire while it may not be listening: the full collection or the
    // notifications remove every link
    while !linked(&server, "gcl").await.is_empty() || collector.full_collections() < 2 {
        assert!(Instant::now() < deadline, "{collector:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(collector.subscriptions_lost() >= 1);
    collector.stop().await;
}

/// Without a collector the graph outlives the values, until a full collection; an
/// entry set again before collection keeps its new links.
#[tokio::test]
async fn a_full_collection_repairs_what_no_collector_saw() {
    let server = RedisServer::start();
    let a = instance(&server, "full", false, true).await;
    for id in 0..20 {
        a.scope(expiring(id)).await;
    }
    a.shutdown().await;
    tokio::time::sleep(Duration::from_millis(1_300)).await;
    // values gone, the graph still there
    assert!(keys(&server, "full:2:*").await.is_empty());
    assert_eq!(linked(&server, "full").await.len(), 20);
    // set again before any collection
    a.scope(cache_runtime::refresh!(expiring(0))).await;
    a.shutdown().await;
    // a dangling member and an orphan cascade, as a crash might leave
    server.command(&["SADD", "full:g:rev:d:other", "gone-entry"]);
    server.command(&["SADD", "full:g:cascade:unused", "x"]);
    server.command(&["SADD", "full:g:parents", "ghost"]);
    let report = full_collection(&server.url(), "full").await.unwrap();
    assert_eq!(report.parents, 1, "{report:?}");
    assert_eq!(report.forward_sets, 19, "{report:?}");
    assert_eq!(report.reverse_members, 1, "{report:?}");
    assert_eq!(report.cascades, 1, "{report:?}");
    assert_eq!(
        linked(&server, "full").await,
        vec!["full:2:rd.expiring:v1(0)".to_owned()],
        "the entry set again keeps its links"
    );
    let again = full_collection(&server.url(), "full").await.unwrap();
    assert_eq!(again.removed(), 0, "idempotent");
    // and it is still invalidated through them
    a.scope(invalidate_dependency("shared")).await;
    assert!(keys(&server, "full:2:*").await.is_empty());
}

/// An entry whose reverse link is missing goes with the full collection (an
/// invalidation of that dependency would miss it).
#[tokio::test]
async fn entries_with_incomplete_links_are_removed() {
    let server = RedisServer::start();
    let a = instance(&server, "broken", false, true).await;
    a.scope(expiring(1)).await;
    a.scope(expiring(2)).await;
    a.shutdown().await;
    server.command(&["SREM", "broken:g:rev:d:a:1", "broken:2:rd.expiring:v1(1)"]);
    let report = full_collection(&server.url(), "broken").await.unwrap();
    assert_eq!(report.broken_entries, 1, "{report:?}");
    assert_eq!(
        keys(&server, "broken:2:*").await,
        vec!["broken:2:rd.expiring:v1(2)".to_owned()]
    );
}

/// A bus that carries nothing: the instance neither hears others nor is heard, as
/// while a message is still on its way.
struct Deaf;

impl cache_runtime::InvalidationBus for Deaf {
    fn attach(&self, _: cache_runtime::BusReceiver) {}
    fn publish(
        &self,
        _: Vec<u8>,
    ) -> cache_runtime::BoxFuture<'_, Result<(), cache_runtime::RemoteError>> {
        Box::pin(async { Ok(()) })
    }
}

async fn deaf_instance(server: &RedisServer, prefix: &str) -> CachingService {
    CachingService::builder()
        .backend(
            RedisBackend::builder(server.url())
                .key_prefix(prefix)
                .l1(MemoryBackend::new())
                .dependencies(true)
                .build()
                .await
                .unwrap(),
        )
        .sync(Deaf)
        .build()
        .unwrap()
}

static VERSION: AtomicU64 = AtomicU64::new(0);

#[cached(name = "rd.version")]
async fn version(id: u64) -> u64 {
    add_dependency(format!("version:{id}"));
    VERSION.load(Ordering::SeqCst)
}

#[cached(name = "rd.summary")]
async fn summary(id: u64) -> u64 {
    version(id).await
}

/// B computes a value from its in-process copy of an entry that A has invalidated
/// (the message has not reached B): the value is as old as that copy, and is not
/// written to Redis.
#[tokio::test]
async fn a_value_computed_from_an_old_in_process_copy_is_not_written() {
    let server = RedisServer::start();
    let a = instance(&server, "asof", true, true).await;
    let b = deaf_instance(&server, "asof").await;
    VERSION.store(1, Ordering::SeqCst);
    b.scope(version(1)).await;
    b.shutdown().await;
    VERSION.store(2, Ordering::SeqCst);
    a.scope(cache_runtime::invalidate!(version(1))).await;
    assert_eq!(b.scope(summary(1)).await, 1, "B read its old copy");
    b.shutdown().await;
    assert!(
        keys(&server, "asof:2:rd.summary*").await.is_empty(),
        "a value as old as its input stays out of Redis"
    );
    assert_eq!(a.scope(summary(1)).await, 2);
}

/// An entry read from Redis links to what it depends on by readable key: invalidating
/// that entry here removes it even where Redis no longer links them.
#[tokio::test]
async fn entries_read_from_redis_keep_their_links_here() {
    let server = RedisServer::start();
    let a = deaf_instance(&server, "remote-links").await;
    let b = instance(&server, "remote-links", false, true).await;
    b.scope(summary(7)).await;
    b.shutdown().await;
    a.scope(summary(7)).await;
    assert_eq!(a.stats().total.l2_hits, 1);
    // B removes summary alone from Redis; A does not hear it
    b.scope(cache_runtime::invalidate!(summary(7))).await;
    assert!(a.scope(cache_runtime::peek!(summary(7))).await.is_some());
    a.scope(cache_runtime::invalidate!(version(7))).await;
    assert_eq!(a.scope(cache_runtime::peek!(summary(7))).await, None);
}

/// A value computed while Redis did not answer (the read with the invalidation count
/// failed) is not written once it answers again: invalidations meanwhile left no
/// marker to check it against.
#[tokio::test]
async fn a_value_computed_while_redis_did_not_answer_is_not_written() {
    let server = RedisServer::start();
    let a = instance(&server, "unanswered", false, true).await;
    server.pause(Duration::from_millis(800));
    assert_eq!(a.scope(summary(21)).await, VERSION.load(Ordering::SeqCst));
    tokio::time::sleep(Duration::from_millis(900)).await;
    a.shutdown().await;
    assert!(keys(&server, "unanswered:2:*").await.is_empty());
    // once it answers, values are written again
    a.scope(summary(22)).await;
    a.shutdown().await;
    assert_eq!(keys(&server, "unanswered:2:*").await.len(), 2);
}
