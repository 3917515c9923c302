//! The cache on a private Redis Cluster (`redis-server --cluster-enabled yes` joined
//! by `redis-cli --cluster create`): found from any node, values on every master and
//! shared between processes, invalidations crossing processes, and the instance that
//! invalidates never reading the old value, in thousands of rounds and through a
//! failover that loses a removal.

use std::time::{Duration, Instant};

use cache_redis::{RedisBackend, RedisBackendError, RedisSync};
use cache_runtime::{cached, CachingService};
use tests::instance::Instance;
use tests::redis_cluster::RedisCluster;
use tests::redis_server::RedisServer;
use tests::rounds::{rounds, rounds_with, Stale};

/// An instance process on the cluster, connected before it says it is ready.
fn instance(mode: &str, cluster: &RedisCluster, db: &RedisServer) -> Instance {
    Instance::start_with(
        env!("CARGO_BIN_EXE_cache_instance"),
        mode,
        &cluster.url(),
        db,
        &[("CACHE_INSTANCE_EAGER", "1")],
    )
}

/// Sets row `id` of the instances' database.
fn db_set(db: &RedisServer, id: u64, value: &str) {
    let key = format!("db:{id}");
    assert_eq!(db.command(&["SET", &key, value]).as_deref(), Some("+OK"));
}

#[test]
fn values_spread_over_every_master_and_reach_another_process() {
    let cluster = RedisCluster::start(3, 0);
    let db = RedisServer::start();
    for id in 0..60 {
        db_set(&db, id, &format!("v{id}"));
    }
    let mut a = instance("l1-plain", &cluster, &db);
    for id in 0..60 {
        assert_eq!(a.cmd(&format!("get {id}")), format!("v{id}"));
    }
    a.cmd("flush");
    let per_master: Vec<usize> = (0..3).map(|i| cluster.keys_on(i, "inst:2:")).collect();
    eprintln!("entries per master: {per_master:?}");
    assert_eq!(per_master.iter().sum::<usize>(), 60, "{per_master:?}");
    assert!(per_master.iter().all(|&n| n > 0), "{per_master:?}");
    // another process, on the same cluster, reads them all without running a body
    let mut b = instance("l1-plain", &cluster, &db);
    for id in 0..60 {
        assert_eq!(b.cmd(&format!("get {id}")), format!("v{id}"));
    }
    assert_eq!(b.stat("runs"), 0);
    // a `clear` on one removes them from every master
    b.cmd("clear");
    let left: usize = (0..3).map(|i| cluster.keys_on(i, "inst:2:")).sum();
    assert_eq!(left, 0);
}

/// A's invalidation drops B's copy within 200 ms, whatever node each subscribed to.
fn crossing(mode: &str) {
    let cluster = RedisCluster::start(3, 0);
    let db = RedisServer::start();
    let (mut a, mut b) = (instance(mode, &cluster, &db), instance(mode, &cluster, &db));
    let mut delays = tests::instance::crossing_rounds(&mut a, &mut b, 30, 7);
    delays.sort_unstable();
    eprintln!(
        "{mode}: B dropped its copy after {} µs (median), {} µs (max)",
        delays[delays.len() / 2],
        delays[delays.len() - 1]
    );
}

#[test]
fn an_invalidation_reaches_the_other_processes_l1() {
    crossing("l1-plain");
}

#[test]
fn an_invalidation_reaches_the_other_processes_memory_cache_with_redis_sync() {
    crossing("sync");
}

/// Thousands of rounds of: read (a miss whose write is queued), change the source,
/// invalidate, read again; and the same with `refresh!`. Not one read returns the
/// old value, and no old value is left on any master.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_invalidating_instance_never_reads_the_old_value() {
    let cluster = RedisCluster::start(3, 0);
    for (prefix, l1, base) in [("w", false, 0), ("wl1", true, 1_000_000)] {
        let stale = rounds(&cluster.url(), true, prefix, l1, (base, 2_000), |_| {}).await;
        assert_eq!(stale, Stale::default(), "l1: {l1}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn any_node_or_a_seed_will_do() {
    let mut cluster = RedisCluster::start(3, 1);
    let third = cluster.nodes()[2].url();
    cluster.node_mut(0).stop();
    // a replica took over
    std::thread::sleep(Duration::from_millis(1_500));
    cluster.wait_ok(Duration::from_secs(20));
    // the URL's node is down: the seed answers, and the cluster is found from it
    let backend = RedisBackend::builder(cluster.url())
        .seed_nodes([third.clone()])
        .key_prefix("seed")
        .build()
        .await;
    assert!(backend.is_ok(), "{:?}", backend.err());
    let sync = RedisSync::builder(cluster.url())
        .seed_nodes([third])
        .build()
        .await;
    assert!(sync.is_ok(), "{:?}", sync.err());
}

/// A row kept for 1 s, depending on one of ten groups.
#[cached(name = "gc.row", ttl = "1s")]
async fn gc_row(id: u64) -> u64 {
    cache_runtime::add_dependency(format!("gc:{}", id % 10));
    id
}

/// The value key of row `id` under `prefix`.
fn gc_key(prefix: &str, id: u64) -> String {
    format!("{prefix}:2:gc.row:v1({id})")
}

/// The graph's keys of `prefix` that hold links, on every master: the forward links
/// and their times, the reverse sets, the parents, the cascades.
fn links_left(cluster: &RedisCluster, prefix: &str) -> Vec<String> {
    let graph = format!("{prefix}:g:{{{prefix}}}:");
    (0..cluster.masters().len())
        .flat_map(|i| cluster.scan_on(i, &graph).0)
        .filter(|k| {
            let kind = &k[graph.len()..];
            ["links", "linked", "rev:", "parents", "cascade:"]
                .iter()
                .any(|p| kind.starts_with(p))
        })
        .collect()
}

/// Waits up to `within` for `done`; returns how long it took.
fn wait_for(within: Duration, mut done: impl FnMut() -> bool) -> Duration {
    let start = Instant::now();
    while !done() {
        assert!(start.elapsed() < within, "not within {within:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
    start.elapsed()
}

/// A collector pointed at one node hears the values expire on every master and
/// removes their links from the graph's master, once they are old enough that no
/// value is on its way: no link is left anywhere.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_collector_leaves_no_link_of_an_expired_value_on_any_master() {
    let cluster = RedisCluster::start(3, 0);
    let collector = cache_redis::DependencyCollector::builder(cluster.url())
        .key_prefix("gc")
        .start()
        .await
        .unwrap();
    let svc = tests::redis_service(&cluster.url(), "gc", true).await;
    svc.scope(async {
        for id in 0..120 {
            assert_eq!(gc_row(id).await, id);
        }
    })
    .await;
    assert!(!svc.shutdown().await.timed_out);
    assert_eq!(svc.stats().remote.write_errors, 0);
    let per_master: Vec<usize> = (0..3).map(|i| cluster.keys_on(i, "gc:2:")).collect();
    eprintln!("values per master: {per_master:?}");
    assert!(per_master.iter().all(|&n| n > 0), "{per_master:?}");
    assert!(!links_left(&cluster, "gc").is_empty());
    let took = tokio::task::block_in_place(|| {
        wait_for(Duration::from_secs(40), || {
            links_left(&cluster, "gc").is_empty()
        })
    });
    eprintln!("links gone {took:?} after the writes");
    assert_eq!(collector.collected(), 120);
    collector.stop().await;
}

/// The first id whose value key (`key(id)`) is not on the master of the graph of
/// `prefix`.
fn off_graph(cluster: &RedisCluster, prefix: &str, key: impl Fn(u64) -> String) -> u64 {
    let graph = cluster.master_of(&format!("{prefix}:g:{{{prefix}}}:epoch"));
    (0..)
        .find(|&id| cluster.master_of(&key(id)) != graph)
        .unwrap()
}

/// A service with the graph under `prefix` whose writer waits 20 s for a reply: it
/// waits for a value's step through a pause (a client that gives up closes its
/// connection, and the paused write with it).
async fn patient_service(cluster: &RedisCluster, prefix: &str) -> CachingService {
    CachingService::builder()
        .backend(
            RedisBackend::builder(cluster.url())
                .key_prefix(prefix)
                .dependencies(true)
                .operation_timeout(Duration::from_secs(20))
                .build()
                .await
                .unwrap(),
        )
        .build()
        .unwrap()
}

/// With no collector running, the full collection (given one node) repairs the
/// links of values that expired on every master, once they are old enough: before
/// that it leaves them, counted as recent (a value may be on its way).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_full_collection_repairs_what_no_collector_heard() {
    let cluster = RedisCluster::start(3, 0);
    let svc = tests::redis_service(&cluster.url(), "fc", true).await;
    svc.scope(async {
        for id in 0..60 {
            assert_eq!(gc_row(id).await, id);
        }
    })
    .await;
    assert!(!svc.shutdown().await.timed_out);
    let written = Instant::now();
    let report = cache_redis::full_collection(&cluster.url(), "fc")
        .await
        .unwrap();
    assert_eq!((report.recent, report.removed()), (60, 0), "{report:?}");
    // the values expire after 1 s; the links are left alone for 10 s
    tokio::time::sleep(Duration::from_secs(11).saturating_sub(written.elapsed())).await;
    let report = cache_redis::full_collection(&cluster.url(), "fc")
        .await
        .unwrap();
    eprintln!("{report:?}");
    assert_eq!((report.forward_sets, report.recent), (60, 0), "{report:?}");
    assert_eq!(links_left(&cluster, "fc"), Vec::<String>::new());
    let report = cache_redis::full_collection(&cluster.url(), "fc")
        .await
        .unwrap();
    assert_eq!(report.removed(), 0, "{report:?}");
}

/// A value's write held up (its master refuses writes for 13 s) after its links were
/// recorded: the full collection 11 s later finds no value and removes the links, so
/// the value must not land when its master resumes, where no invalidation would
/// find it. It is refused: it came past its deadline.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_value_held_up_past_its_deadline_is_not_written_once_its_links_are_collected() {
    let cluster = RedisCluster::start(3, 0);
    let id = off_graph(&cluster, "late", |id| gc_key("late", id));
    let key = gc_key("late", id);
    let svc = patient_service(&cluster, "late").await;
    cluster.masters()[cluster.master_of(&key)].pause_writes(Duration::from_secs(13));
    let paused = Instant::now();
    svc.scope(async { assert_eq!(gc_row(id).await, id) }).await;
    tokio::time::sleep(Duration::from_secs(11)).await;
    let report = cache_redis::full_collection(&cluster.url(), "late")
        .await
        .unwrap();
    assert_eq!(report.forward_sets, 1, "{report:?}");
    tokio::time::sleep(Duration::from_secs(14).saturating_sub(paused.elapsed())).await;
    let (keys, mut con) = cluster.scan_on(cluster.master_of(&key), "late:2:");
    let value: Option<Vec<u8>> = redis::cmd("GET").arg(&key).query(&mut con).unwrap();
    assert_eq!((keys, value), (Vec::new(), None), "the late value landed");
    assert_eq!(links_left(&cluster, "late"), Vec::<String>::new());
}

/// What [`moving_row`] depends on: `move:a` until it is switched to `move:b`.
static MOVED_DEPENDENCY: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// A row whose dependency changes between two of its computations.
#[cached(name = "move.row")]
async fn moving_row(id: u64) -> u64 {
    let b = MOVED_DEPENDENCY.load(std::sync::atomic::Ordering::SeqCst);
    cache_runtime::add_dependency(if b { "move:b" } else { "move:a" });
    id + u64::from(b)
}

/// A value linked to `move:a`, computed again linked to `move:b`, whose new value
/// never lands (its master refuses writes past the value's deadline): the old value
/// stays in Redis, so it must stay linked to `move:a`, and an invalidation of
/// `move:a` removes it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_value_whose_successor_never_landed_keeps_its_links() {
    let cluster = RedisCluster::start(3, 0);
    let key = |id| format!("move:2:move.row:v1({id})");
    let id = off_graph(&cluster, "move", key);
    let master = cluster.master_of(&key(id));
    let svc = patient_service(&cluster, "move").await;
    svc.scope(async {
        assert_eq!(moving_row(id).await, id);
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(cluster.live_on(master, &key(id)), 1);
        MOVED_DEPENDENCY.store(true, std::sync::atomic::Ordering::SeqCst);
        // the new value's step waits for 6 s: past its deadline
        cluster.masters()[master].pause_writes(Duration::from_secs(6));
        cache_runtime::refresh!(moving_row(id)).await;
        tokio::time::sleep(Duration::from_secs(1)).await;
        // the old value is still there
        assert_eq!(cluster.live_on(master, &key(id)), 1);
        cache_runtime::invalidate_dependency("move:a").await;
    })
    .await;
    assert_eq!(
        cluster.live_on(master, &key(id)),
        0,
        "the old value outlived an invalidation of what it depends on"
    );
}

/// A row kept for a minute, depending on `kept:{id}`.
#[cached(name = "kept.row", ttl = "60s")]
async fn kept_row(id: u64) -> u64 {
    cache_runtime::add_dependency(format!("kept:{id}"));
    id
}

/// The graph's master acknowledges a value's links but never passes them to its
/// replica (frozen, cut), then is killed, and the replica takes over without them.
/// A value written on its own master by then would stay there, linked to nothing an
/// invalidation could reach: so the value is written only once a replica has its
/// links (none did here), and after the takeover an invalidation of its dependency
/// leaves no value behind.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_value_is_not_written_before_a_replica_has_its_links() {
    let mut cluster = RedisCluster::start(3, 1);
    let graph = cluster.master_of("wl:g:{wl}:epoch");
    let key = |id| format!("wl:2:kept.row:v1({id})");
    let id = off_graph(&cluster, "wl", key);
    let master = cluster.master_of(&key(id));
    let svc = tests::redis_service(&cluster.url(), "wl", true).await;
    let replica = cluster.replica_of(graph);
    cluster.nodes()[replica].suspend();
    let killed = cluster.nodes()[graph].command(&["CLIENT", "KILL", "TYPE", "replica"]);
    assert_eq!(killed.as_deref(), Some(":1"));
    svc.scope(async { assert_eq!(kept_row(id).await, id) })
        .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let written = cluster.live_on(master, &key(id));
    cluster.node_mut(graph).stop();
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    cluster.nodes()[replica].resume();
    let reply = cluster.nodes()[replica].command(&["CLUSTER", "FAILOVER", "TAKEOVER"]);
    assert_eq!(reply.as_deref(), Some("+OK"));
    tokio::task::block_in_place(|| cluster.wait_ok(Duration::from_secs(20)));
    svc.scope(cache_runtime::invalidate_dependency(format!("kept:{id}")))
        .await;
    tokio::task::block_in_place(|| {
        wait_for(Duration::from_secs(20), || {
            svc.stats().remote.removals_waiting == 0
        })
    });
    let left = cluster.live_on(master, &key(id));
    eprintln!("written before the takeover: {written}; left after the invalidation: {left}");
    assert_eq!(left, 0, "a value outlived its links");
}

/// The source of [`source_row`].
static SOURCE: std::sync::Mutex<u64> = std::sync::Mutex::new(1);

/// A row kept for a minute, depending on `source:{id}`, read from [`SOURCE`].
#[cached(name = "source.row", ttl = "60s")]
async fn source_row(id: u64) -> u64 {
    cache_runtime::add_dependency(format!("source:{id}"));
    *SOURCE.lock().unwrap()
}

/// The graph's master restarts empty (no replica, nothing on disk): the graph is
/// gone, the values on the other masters are not, and no invalidation could reach
/// them any more. The instance notices (its scripts are refused by a graph it does
/// not know, and its watcher reads the graph's identity): it removes the prefix's
/// values before it writes to the new graph. Its invalidation after the restart is
/// held until then, so it never reads an old value; neither does a new process.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_graph_lost_with_its_master_takes_the_values_it_linked_with_it() {
    let mut cluster = RedisCluster::start(3, 0);
    let graph = cluster.master_of("gl:g:{gl}:epoch");
    let key = |id| format!("gl:2:source.row:v1({id})");
    let ids: Vec<u64> = (0..200)
        .filter(|&id| cluster.master_of(&key(id)) != graph)
        .take(20)
        .collect();
    let svc = tests::redis_service(&cluster.url(), "gl", true).await;
    svc.scope(async {
        for &id in &ids {
            assert_eq!(source_row(id).await, 1);
        }
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let live = || -> usize { (0..3).map(|i| cluster.live_on(i, "gl:2:")).sum() };
    assert_eq!(live(), ids.len());
    cluster.node_mut(graph).restart();
    tokio::task::block_in_place(|| cluster.wait_ok(Duration::from_secs(20)));
    *SOURCE.lock().unwrap() = 2;
    let mut old = 0;
    svc.scope(async {
        for &id in &ids {
            cache_runtime::invalidate_dependency(format!("source:{id}")).await;
            if source_row(id).await != 2 {
                old += 1;
            }
        }
    })
    .await;
    let fresh = tests::redis_service(&cluster.url(), "gl", true).await;
    fresh
        .scope(async {
            for &id in &ids {
                assert_eq!(source_row(id).await, 2, "a new process read an old value");
            }
        })
        .await;
    let remote = svc.stats().remote;
    eprintln!("{remote:?}");
    assert_eq!(old, 0, "old values read after the invalidations");
    assert_eq!(remote.graphs_lost, 1, "the loss is counted once");
    assert_eq!(
        fresh.stats().remote.graphs_lost,
        0,
        "a new process lost nothing"
    );
}

/// The source of [`replaced_row`].
static REPLACED: std::sync::Mutex<u64> = std::sync::Mutex::new(1);

/// A row kept for a minute, depending on `replaced:{id}`, read from [`REPLACED`].
#[cached(name = "replaced.row", ttl = "60s")]
async fn replaced_row(id: u64) -> u64 {
    cache_runtime::add_dependency(format!("replaced:{id}"));
    *REPLACED.lock().unwrap()
}

/// The graph is replaced between two looks of the instance's watcher: its keys gone
/// (as when its master restarts empty) and another identity in place (as when
/// another instance has taken the empty graph over). The instance's invalidation
/// comes first, against a graph that no longer links the value: the graph's scripts
/// refuse an instance that does not know the graph, so the invalidation is held (the
/// instance reads no value meanwhile) and sent again once the watcher has removed the
/// prefix's values. Without the refusal the walk finds nothing and the old value is
/// read back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_graphs_scripts_refuse_an_instance_that_does_not_know_the_graph() {
    let cluster = RedisCluster::start(3, 0);
    let key = |id| format!("rg:2:replaced.row:v1({id})");
    let graph = cluster.master_of("rg:g:{rg}:epoch");
    let ids: Vec<u64> = (0..400)
        .filter(|&id| cluster.master_of(&key(id)) != graph)
        .take(10)
        .collect();
    let svc = tests::redis_service(&cluster.url(), "rg", true).await;
    let (mut old, mut refused) = (0, 0);
    for (round, &id) in ids.iter().enumerate() {
        *REPLACED.lock().unwrap() = 1;
        svc.scope(async { assert_eq!(replaced_row(id).await, 1) })
            .await;
        let master = cluster.master_of(&key(id));
        tokio::task::block_in_place(|| {
            wait_for(Duration::from_secs(5), || {
                cluster.live_on(master, &key(id)) == 1
            })
        });
        let before = svc.stats().remote;
        let node = &cluster.nodes()[graph];
        assert_eq!(node.command(&["FLUSHALL"]).as_deref(), Some("+OK"));
        let other = format!("other-{round}");
        assert_eq!(
            node.command(&["SET", "rg:g:{rg}:gen", &other]).as_deref(),
            Some("+OK")
        );
        *REPLACED.lock().unwrap() = 2;
        svc.scope(async {
            cache_runtime::invalidate_dependency(format!("replaced:{id}")).await;
            if replaced_row(id).await != 2 {
                old += 1;
            }
        })
        .await;
        let after = svc.stats().remote;
        if after.removal_errors > before.removal_errors {
            refused += 1;
        }
        // the watcher takes the new graph over, and the held removal goes through
        tokio::task::block_in_place(|| {
            wait_for(Duration::from_secs(20), || {
                let r = svc.stats().remote;
                r.removals_waiting == 0 && r.graphs_lost > before.graphs_lost
            })
        });
    }
    let remote = svc.stats().remote;
    eprintln!("rounds {}, refused {refused}: {remote:?}", ids.len());
    assert_eq!(old, 0, "old values read after the invalidations");
    assert!(refused > 0, "no invalidation came before the watcher");
    assert_eq!(remote.graphs_lost, ids.len() as u64);
}

/// The source of [`flight_row`].
static FLIGHT: std::sync::Mutex<u64> = std::sync::Mutex::new(1);

/// A row kept for a minute, depending on `flight:{id}`, read from [`FLIGHT`].
#[cached(name = "flight.row", ttl = "60s")]
async fn flight_row(id: u64) -> u64 {
    cache_runtime::add_dependency(format!("flight:{id}"));
    *FLIGHT.lock().unwrap()
}

/// Another instance's invalidation has unlinked a value but not buried it yet (the
/// value's master refuses writes for 3 s); this instance then invalidates the same
/// dependency: its own walk finds the links gone, so it buries what the other walk
/// has not, and until that lands it holds the key: it never reads the old value.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invalidation_buries_what_another_walk_in_flight_unlinked() {
    let cluster = RedisCluster::start(3, 0);
    let key = |id| format!("fl:2:flight.row:v1({id})");
    let id = off_graph(&cluster, "fl", key);
    let master = cluster.master_of(&key(id));
    let a = tests::redis_service(&cluster.url(), "fl", true).await;
    let b = tests::redis_service(&cluster.url(), "fl", true).await;
    *FLIGHT.lock().unwrap() = 1;
    a.scope(async { assert_eq!(flight_row(id).await, 1) }).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(cluster.live_on(master, &key(id)), 1);
    cluster.masters()[master].pause_writes(Duration::from_secs(3));
    let other = tokio::spawn(b.scope(cache_runtime::invalidate_dependency(format!("flight:{id}"))));
    tokio::time::sleep(Duration::from_millis(200)).await;
    *FLIGHT.lock().unwrap() = 2;
    let read = a
        .scope(async {
            cache_runtime::invalidate_dependency(format!("flight:{id}")).await;
            flight_row(id).await
        })
        .await;
    other.await.unwrap();
    assert_eq!(
        read, 2,
        "the instance read the value another walk had unlinked"
    );
}

/// The source of [`replicated_row`].
static REPLICATED: std::sync::Mutex<u64> = std::sync::Mutex::new(1);

/// A row kept for a minute (no dependencies), read from [`REPLICATED`].
#[cached(name = "replicated.row", ttl = "60s")]
async fn replicated_row(id: u64) -> u64 {
    let _ = id;
    *REPLICATED.lock().unwrap()
}

/// The bytes node `i` holds at `key` (`READONLY` first, so a replica answers too).
fn read_on(cluster: &RedisCluster, i: usize, key: &str) -> Option<Vec<u8>> {
    let client = redis::Client::open(cluster.nodes()[i].url()).unwrap();
    let mut con = client.get_connection().unwrap();
    redis::cmd("READONLY").query::<()>(&mut con).unwrap();
    redis::cmd("GET").arg(key).query(&mut con).unwrap()
}

/// Waits until `svc` holds no removal to send again (at most 30 s): how long.
fn nothing_held(svc: &CachingService) -> Duration {
    tokio::task::block_in_place(|| {
        wait_for(Duration::from_secs(30), || {
            svc.stats().remote.removals_waiting == 0
        })
    })
}

/// What [`spread_dependent`] returns over its id.
static SPREAD_ROUND: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// One of many entries (their keys on every master's slots) that depend on one key.
#[cached(name = "spread.dependent")]
async fn spread_dependent(id: u64) -> u64 {
    cache_runtime::add_dependency("spread:shared");
    id + SPREAD_ROUND.load(std::sync::atomic::Ordering::SeqCst)
}

/// The `WAIT`s the masters ran.
fn waits_on_masters(cluster: &RedisCluster) -> u64 {
    cluster.masters().iter().map(|m| m.calls("WAIT")).sum()
}

/// An invalidation of 300 entries (about 300 slots on three masters, each with a
/// replica) waits for the replicas once per connection, not once per slot; and when
/// a master's replica is frozen (still listed online, so its `WAIT` times out), that
/// master's tombstones are held and sent again, while this instance reads the new
/// values throughout, and a new instance reads them once the replica is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invalidation_of_many_slots_waits_once_per_connection() {
    use std::sync::atomic::Ordering;
    const N: u64 = 300;
    let cluster = RedisCluster::start(3, 1);
    let svc = tests::redis_service(&cluster.url(), "spread", true).await;
    let all_read = |round: u64, what: &'static str| async move {
        for id in 0..N {
            assert_eq!(spread_dependent(id).await, id + round, "{what}: entry {id}");
        }
    };
    svc.scope(all_read(0, "first read")).await;
    svc.shutdown().await;
    let per_master: Vec<usize> = (0..3)
        .map(|i| cluster.live_on(i, "spread:2:spread.dependent"))
        .collect();
    assert!(per_master.iter().all(|&n| n > 0), "{per_master:?}");
    // the writes have waited for their links to be on a replica: the count now
    let before = waits_on_masters(&cluster);
    SPREAD_ROUND.store(1_000, Ordering::SeqCst);
    svc.scope(cache_runtime::invalidate_dependency("spread:shared"))
        .await;
    let waits = waits_on_masters(&cluster) - before;
    eprintln!("an invalidation of {N} entries ({per_master:?} per master): {waits} WAITs");
    assert!(waits <= 12, "{waits} WAITs for {N} tombstones");
    svc.scope(all_read(1_000, "after the invalidation")).await;
    assert_eq!(svc.stats().remote.removals_waiting, 0);

    // the first master's replica frozen: its WAIT times out
    let replica = cluster.replica_of(0);
    cluster.nodes()[replica].suspend();
    SPREAD_ROUND.store(2_000, Ordering::SeqCst);
    svc.scope(async {
        cache_runtime::invalidate_dependency("spread:shared").await;
        all_read(2_000, "while the tombstones are held").await;
    })
    .await;
    let remote = svc.stats().remote;
    assert!(remote.removals_waiting > 0, "{remote:?}");
    cluster.nodes()[replica].resume();
    let took = nothing_held(&svc);
    eprintln!("the held tombstones went through {took:?} after the replica resumed");
    svc.scope(all_read(2_000, "after they went through")).await;
    let fresh = tests::redis_service(&cluster.url(), "spread", true).await;
    fresh.scope(all_read(2_000, "a new instance")).await;
}

/// The same with a user whose ACL has no `CLIENT`: its first invalidation's
/// tombstones are held (the `CLIENT INFO` that names their connections refused) and
/// sent again, each slot waiting on its own; every read is new throughout, and the
/// later invalidations wait per slot from the start.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_client_info_an_invalidation_waits_once_per_slot() {
    use std::sync::atomic::Ordering;
    const N: u64 = 100;
    let cluster = RedisCluster::start(3, 1);
    for node in cluster.nodes() {
        let rules = [
            "ACL", "SETUSER", "u", "on", ">pw", "~*", "&*", "+@all", "-client",
        ];
        assert_eq!(node.command(&rules).as_deref(), Some("+OK"));
    }
    let url = cluster.url().replace("redis://", "redis://u:pw@");
    let svc = tests::redis_service(&url, "noinfo", true).await;
    let all_read = |round: u64, what: &'static str| async move {
        for id in 0..N {
            assert_eq!(spread_dependent(id).await, id + round, "{what}: entry {id}");
        }
    };
    let base = 10_000;
    SPREAD_ROUND.store(base, Ordering::SeqCst);
    svc.scope(all_read(base, "first read")).await;
    svc.shutdown().await;
    for round in 1..=3 {
        let before = waits_on_masters(&cluster);
        SPREAD_ROUND.store(base + round, Ordering::SeqCst);
        svc.scope(cache_runtime::invalidate_dependency("spread:shared"))
            .await;
        let waits = waits_on_masters(&cluster) - before;
        let held = svc.stats().remote.removals_waiting;
        svc.scope(all_read(base + round, "after an invalidation"))
            .await;
        let took = nothing_held(&svc);
        eprintln!("round {round}: {waits} WAITs, {held} held, none left after {took:?}");
        if round == 1 {
            assert!(held > 0, "the first tombstones were not held");
        } else {
            assert_eq!(held, 0, "round {round}");
            assert!(waits >= N, "{waits} WAITs: one per slot expected");
        }
        // the values written again, with their links (a value read while its
        // tombstone was held is not written)
        svc.scope(all_read(base + round, "once nothing is held"))
            .await;
        svc.shutdown().await;
    }
    let fresh = tests::redis_service(&url, "noinfo", true).await;
    fresh.scope(all_read(base + 3, "a new instance")).await;
}

/// A removal no replica acknowledges (the master's only replica frozen and cut) is
/// refused (`WAIT 1` answered 0), held and sent again: meanwhile the instance reads
/// the new value (the body runs). Once the replica is back the removal goes through;
/// the master killed then and the replica taking over, the instance reads the new
/// value throughout and replays its removals, and a new process reads it too.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_removal_no_replica_acknowledged_is_held_and_sent_again() {
    let mut cluster = RedisCluster::start(3, 1);
    let key = |id| format!("nr:2:replicated.row:v1({id})");
    let id = 7;
    let master = cluster.master_of(&key(id));
    let svc = tests::redis_service(&cluster.url(), "nr", false).await;
    svc.scope(async { assert_eq!(replicated_row(id).await, 1) })
        .await;
    let replica = cluster.replica_of(master);
    tokio::task::block_in_place(|| {
        wait_for(Duration::from_secs(5), || {
            cluster.nodes()[replica].command(&["DBSIZE"]).as_deref() == Some(":1")
        })
    });
    let old = read_on(&cluster, replica, &key(id));
    assert!(old.is_some());
    cluster.nodes()[replica].suspend();
    let killed = cluster.nodes()[master].command(&["CLIENT", "KILL", "TYPE", "replica"]);
    assert_eq!(killed.as_deref(), Some(":1"));
    *REPLICATED.lock().unwrap() = 2;
    svc.scope(async {
        cache_runtime::invalidate!(replicated_row(id)).await;
        for _ in 0..20 {
            assert_eq!(replicated_row(id).await, 2, "read the old value while held");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    let remote = svc.stats().remote;
    assert!(remote.removal_errors > 0, "{remote:?}");
    assert!(remote.removals_waiting > 0, "{remote:?}");
    cluster.nodes()[replica].resume();
    let took = nothing_held(&svc);
    eprintln!("the removal went through {took:?} after the replica resumed");
    // the replica never holds the old value again, and soon holds what the master
    // holds: the new value, which the calls meanwhile computed and wrote once the
    // removal went through
    tokio::task::block_in_place(|| {
        wait_for(Duration::from_secs(5), || {
            let on_replica = read_on(&cluster, replica, &key(id));
            assert_ne!(on_replica, old, "the replica kept the old value");
            on_replica == read_on(&cluster, master, &key(id))
        })
    });
    // Promoted now, the replica serves what it holds; the instance reads the new
    // value throughout and replays its removals, then a new process reads it too.
    cluster.node_mut(master).stop();
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    let reply = cluster.nodes()[replica].command(&["CLUSTER", "FAILOVER", "TAKEOVER"]);
    assert_eq!(reply.as_deref(), Some("+OK"));
    let promoted = Instant::now();
    svc.scope(async {
        while svc.stats().remote.invalidations_replayed == 0 {
            assert_eq!(
                replicated_row(id).await,
                2,
                "read the old value after the takeover"
            );
            assert!(promoted.elapsed() < Duration::from_secs(30), "no replay");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    let fresh = tests::redis_service(&cluster.nodes()[replica].url(), "nr", false).await;
    fresh
        .scope(async { assert_eq!(replicated_row(id).await, 2) })
        .await;
}

/// Entries whose values sit on every master, linked to one dependency directly and
/// through a nested cached call, are all removed from every master by an
/// invalidation in another process; the graph's keys are on one master; the
/// instance that read them reads the new values, and so does a new process.
#[test]
fn dependencies_on_every_master_go_with_an_invalidation_from_another_process() {
    let cluster = RedisCluster::start(3, 0);
    let db = RedisServer::start();
    for id in 0..60 {
        db_set(&db, id, &format!("v{id}"));
    }
    let mut a = instance("deps", &cluster, &db);
    for id in 0..60 {
        assert_eq!(a.cmd(&format!("oget {id}")), format!("v{id}"));
    }
    a.cmd("flush");
    let live =
        |prefix: &str| -> Vec<usize> { (0..3).map(|i| cluster.live_on(i, prefix)).collect() };
    let per_master = live("inst:2:");
    eprintln!("values per master: {per_master:?}");
    assert_eq!(per_master.iter().sum::<usize>(), 120, "{per_master:?}");
    assert!(per_master.iter().all(|&n| n > 0), "{per_master:?}");
    let graph: Vec<usize> = (0..3).map(|i| cluster.keys_on(i, "inst:g:")).collect();
    eprintln!("graph keys per master: {graph:?}");
    assert_eq!(graph.iter().filter(|&&n| n > 0).count(), 1, "{graph:?}");
    // one row's dependency: its two entries go, the others stay
    let mut b = instance("deps", &cluster, &db);
    db_set(&db, 7, "new7");
    assert_eq!(b.cmd("dep row:7"), "ok");
    assert_eq!(live("inst:2:").iter().sum::<usize>(), 118);
    assert_eq!(a.cmd("oget 7"), "new7");
    // the dependency of every row: every entry goes from every master
    for id in 0..60 {
        db_set(&db, id, &format!("w{id}"));
    }
    assert_eq!(b.cmd("dep group"), "ok");
    let left = live("inst:2:");
    assert_eq!(left, vec![0, 0, 0], "values left per master");
    for id in 0..60 {
        assert_eq!(a.cmd(&format!("oget {id}")), format!("w{id}"), "row {id}");
    }
    let mut c = instance("deps", &cluster, &db);
    for id in 0..60 {
        assert_eq!(c.cmd(&format!("oget {id}")), format!("w{id}"), "row {id}");
    }
    for i in [&mut a, &mut b, &mut c] {
        assert_eq!((i.stat("write_errors"), i.stat("removal_errors")), (0, 0));
    }
}

/// The rounds with the dependency graph on the cluster: an invalidation by key and a
/// `refresh!`, each followed by a read, thousands of times.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_dependencies_the_invalidating_instance_never_reads_the_old_value() {
    let cluster = RedisCluster::start(3, 0);
    // ids of their own: the rows of the other rounds run in the same process
    for (prefix, l1, base) in [("wd", false, 2_000_000), ("wdl1", true, 3_000_000)] {
        let stale = rounds_with(
            &cluster.url(),
            true,
            prefix,
            (l1, true),
            (base, 2_000),
            |_| {},
        )
        .await;
        assert_eq!(stale, Stale::default(), "l1: {l1}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_database_other_than_0_is_refused() {
    let cluster = RedisCluster::start(3, 0);
    let url = cluster.url().replace("/0", "/3");
    let err = RedisBackend::builder(url).build().await.unwrap_err();
    assert!(
        matches!(err, RedisBackendError::Connect { .. }) && err.to_string().contains("database 0"),
        "{err}"
    );
}

/// The replay: the replica of the master holding two values is frozen, so it never
/// sees their removal; the master is killed; the replica resumes and takes over
/// (`CLUSTER FAILOVER TAKEOVER`), holding the old values. The instance that
/// invalidated (without an L1: every call reads Redis) never reads the first one
/// back, and once it applied its recent removals again, a new process does not read
/// the second one (which the first instance did not read again in between).
#[test]
fn an_invalidation_survives_a_failover_that_lost_it() {
    let mut cluster = RedisCluster::start(3, 1);
    let db = RedisServer::start();
    let key = |id: u64| format!("inst:2:inst.row:v1({id})");
    let (x, master) = (5, cluster.master_of(&key(5)));
    let y = (6..)
        .find(|&id| cluster.master_of(&key(id)) == master)
        .unwrap();
    let mut a = instance("redis-plain", &cluster, &db);
    for id in [x, y] {
        db_set(&db, id, "old");
        assert_eq!(a.cmd(&format!("get {id}")), "old");
    }
    a.cmd("flush");
    let replica = cluster.replica_of(master);
    // the replica has the old values, then sees nothing more
    let start = Instant::now();
    while cluster.nodes()[replica].command(&["DBSIZE"]).as_deref() != Some(":2") {
        assert!(start.elapsed() < Duration::from_secs(5), "not replicated");
        std::thread::sleep(Duration::from_millis(10));
    }
    cluster.nodes()[replica].suspend();
    // the master drops its link to the replica: what it sends from now on does not
    // wait in the frozen replica's socket buffer
    let killed = cluster.nodes()[master].command(&["CLIENT", "KILL", "TYPE", "replica"]);
    assert_eq!(killed.as_deref(), Some(":1"));
    for id in [x, y] {
        assert_eq!(a.cmd(&format!("set {id} new")), "ok");
    }
    assert_eq!(
        cluster.nodes()[master].command(&["DBSIZE"]).as_deref(),
        Some(":0")
    );
    cluster.node_mut(master).stop();
    // no failover can happen within the node timeout (1 s)
    std::thread::sleep(Duration::from_millis(1_500));
    assert_eq!(
        a.cmd(&format!("get {x}")),
        "new",
        "while the slot has no master"
    );
    cluster.nodes()[replica].resume();
    // the replica still holds the old values: the removals never reached it
    assert_eq!(
        cluster.nodes()[replica].command(&["DBSIZE"]).as_deref(),
        Some(":2")
    );
    let reply = cluster.nodes()[replica].command(&["CLUSTER", "FAILOVER", "TAKEOVER"]);
    assert_eq!(reply.as_deref(), Some("+OK"));
    let promoted = Instant::now();
    // A reads x, again and again, while the cluster settles and A replays
    let mut reads = 0;
    while a.stat("invalidations_replayed") == 0 {
        assert_eq!(a.cmd(&format!("get {x}")), "new", "A read the old value");
        reads += 1;
        assert!(
            promoted.elapsed() < Duration::from_secs(20),
            "A did not replay its removals"
        );
    }
    eprintln!(
        "A replayed its removals {:?} after the takeover ({reads} reads meanwhile)",
        promoted.elapsed()
    );
    assert_eq!(a.cmd(&format!("get {x}")), "new");
    assert!(a.stat("topology_changes") >= 1);
    // a new process does not read the old y (it is connected when it reads)
    let mut b = Instance::start_with(
        env!("CARGO_BIN_EXE_cache_instance"),
        "redis-plain",
        &cluster.nodes()[replica].url(),
        &db,
        &[("CACHE_INSTANCE_EAGER", "1")],
    );
    assert_eq!(b.cmd(&format!("get {y}")), "new");
    assert_eq!(b.stat("runs"), 1);
}

#[cached(name = "load.row")]
async fn load_row(id: u64) -> u64 {
    id * 10
}

/// Eight tasks call without pause (no L1: every call reads Redis) while a master is
/// killed and its replica takes over: no call fails or returns a wrong value, none
/// waits much longer than the operation timeout, the bodies run while the slots have
/// no master, L2 hits come back by themselves, and the instance counts the topology
/// change and clears its L1 after it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_master_killed_under_load_fails_no_call_and_hits_resume() {
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    use std::sync::Arc;
    let mut cluster = RedisCluster::start(3, 1);
    let svc = CachingService::builder()
        .backend(
            RedisBackend::builder(cluster.url())
                .key_prefix("load")
                .build()
                .await
                .unwrap(),
        )
        .build()
        .unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let (calls, wrong, slowest) = (
        Arc::new(AtomicU64::new(0)),
        Arc::new(AtomicU64::new(0)),
        Arc::new(AtomicU64::new(0)),
    );
    let tasks: Vec<_> = (0..8u64)
        .map(|t| {
            let (svc, stop, calls, wrong, slowest) = (
                svc.clone(),
                stop.clone(),
                calls.clone(),
                wrong.clone(),
                slowest.clone(),
            );
            tokio::spawn(async move {
                svc.scope(async {
                    let mut i = t;
                    while !stop.load(Ordering::Relaxed) {
                        i = (i * 7 + 13) % 300;
                        let start = Instant::now();
                        let v = load_row(i).await;
                        let took = start.elapsed().as_micros() as u64;
                        slowest.fetch_max(took, Ordering::Relaxed);
                        calls.fetch_add(1, Ordering::Relaxed);
                        if v != i * 10 {
                            wrong.fetch_add(1, Ordering::Relaxed);
                        }
                    }
                })
                .await
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let before = svc.stats().total;
    assert!(before.l2_hits > 0);
    let killed = Instant::now();
    tokio::task::block_in_place(|| cluster.node_mut(0).stop());
    // L2 hits are back once no body ran for 300 ms
    let mut last = svc.stats().total.executions;
    let mut quiet_since: Option<Instant> = None;
    let resumed = loop {
        tokio::time::sleep(Duration::from_millis(50)).await;
        let now = svc.stats().total.executions;
        if now != last || killed.elapsed() < Duration::from_millis(500) {
            quiet_since = None;
        } else if quiet_since.get_or_insert_with(Instant::now).elapsed()
            >= Duration::from_millis(300)
        {
            break quiet_since.unwrap() - killed;
        }
        last = now;
        assert!(
            killed.elapsed() < Duration::from_secs(30),
            "L2 hits did not resume"
        );
    };
    // and the topology change is counted, the L1 cleared
    while svc.stats().remote.topology_changes == 0 {
        assert!(
            killed.elapsed() < Duration::from_secs(30),
            "no topology change counted"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        t.await.unwrap();
    }
    let after = svc.stats();
    eprintln!(
        "{} calls, {} bodies run after the kill, L2 hits back {resumed:?} after the kill, slowest call {} ms, {} L1 clears",
        calls.load(Ordering::Relaxed),
        after.total.executions - before.executions,
        slowest.load(Ordering::Relaxed) / 1000,
        after.sync.l1_clears,
    );
    assert_eq!(wrong.load(Ordering::Relaxed), 0);
    assert!(
        after.total.executions > before.executions,
        "bodies ran meanwhile"
    );
    assert!(
        after.sync.l1_clears >= 1,
        "the L1 was cleared after the change"
    );
    assert!(
        slowest.load(Ordering::Relaxed) < 2_000_000,
        "a call waited {} µs",
        slowest.load(Ordering::Relaxed)
    );
}

/// Slots move from one master to another (`redis-cli --cluster reshard`, keys and
/// all) while an instance process reads them: the cluster connection follows the
/// `ASK` and `MOVED` answers, the values are still read from Redis (no body runs
/// again), and `stats().remote.redirections` counts what was followed. (The count is
/// the process's, so it is read from a process of its own.)
#[test]
fn redirections_are_followed_and_counted_while_slots_move() {
    let cluster = RedisCluster::start(3, 0);
    let db = RedisServer::start();
    let keys = 300u64;
    for id in 0..keys {
        db_set(&db, id, &format!("v{id}"));
    }
    let mut a = instance("redis-plain", &cluster, &db);
    let read_all = |a: &mut Instance| {
        for id in 0..keys {
            assert_eq!(a.cmd(&format!("get {id}")), format!("v{id}"));
        }
    };
    read_all(&mut a);
    assert_eq!(a.cmd("flush"), "ok");
    let on_first = cluster.keys_on(0, "inst:");
    assert_eq!(a.stat("runs"), keys);
    assert_eq!(a.stat("redirections"), 0, "no slot moved yet");
    // reads while 3,000 of the first master's slots move, then after
    let mut reshard = cluster.reshard(0, 1, 3_000);
    let mut rounds = 0;
    while reshard.try_wait().unwrap().is_none() {
        read_all(&mut a);
        rounds += 1;
    }
    assert!(reshard.wait().unwrap().success(), "the resharding failed");
    let while_moving = a.stat("redirections");
    read_all(&mut a);
    let redirections = a.stat("redirections");
    let left = cluster.keys_on(0, "inst:");
    eprintln!(
        "{on_first} of {keys} keys on the first master, {left} after; {rounds} rounds of reads while the slots moved; {while_moving} redirections counted then, {redirections} in all"
    );
    assert!(left < on_first, "keys moved off the first master");
    assert_eq!(a.stat("runs"), keys, "every read after the move was a hit");
    assert!(redirections >= 1, "redirections were counted");
    assert_eq!(a.stat("write_errors"), 0);
}

static DOWN_RUNS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

#[cached(name = "down.row")]
async fn down_row(id: u64) -> u64 {
    DOWN_RUNS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    id + 1
}

/// A master dies and, for as long as the cluster has not noticed (Redis's default
/// node timeout is 15 s), its slots answer nothing: once the watcher found it silent,
/// calls for its keys run their bodies at once rather than each waiting the
/// operation timeout (200 ms), and the other masters' keys are still read from Redis.
/// A removal for the silent master is held; one for another master goes through.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_of_a_silent_master_do_not_wait_the_timeout() {
    use std::sync::atomic::Ordering;
    let mut cluster = RedisCluster::start_with(3, 0, "15000");
    let svc = tests::redis_service(&cluster.url(), "down", false).await;
    let key = |id: u64| format!("down:2:down.row:v1({id})");
    let ids: Vec<u64> = (0..90).collect();
    svc.scope(async {
        for &id in &ids {
            assert_eq!(down_row(id).await, id + 1);
        }
    })
    .await;
    svc.shutdown().await;
    let (dead, alive): (Vec<u64>, Vec<u64>) = tokio::task::block_in_place(|| {
        ids.iter()
            .partition(|&&id| cluster.master_of(&key(id)) == 0)
    });
    assert!(!dead.is_empty() && !alive.is_empty());
    tokio::task::block_in_place(|| cluster.node_mut(0).stop());
    // the watcher looks four times a second, and takes a master that does not
    // answer twice for down
    tokio::time::sleep(Duration::from_secs(2)).await;
    let before = DOWN_RUNS.load(Ordering::Relaxed);
    let (took_dead, took_alive) = svc
        .scope(async {
            let start = Instant::now();
            for &id in &dead {
                assert_eq!(down_row(id).await, id + 1);
            }
            let took_dead = start.elapsed();
            let start = Instant::now();
            for &id in &alive {
                assert_eq!(down_row(id).await, id + 1);
            }
            (took_dead, start.elapsed())
        })
        .await;
    let ran = DOWN_RUNS.load(Ordering::Relaxed) - before;
    eprintln!(
        "{} calls for the silent master's keys took {took_dead:?} ({} bodies run), {} for the others {took_alive:?}",
        dead.len(),
        ran,
        alive.len()
    );
    assert_eq!(
        cluster.nodes()[1].info("cluster_state").as_deref(),
        Some("ok"),
        "the cluster has not noticed yet"
    );
    assert_eq!(ran, dead.len() as u64, "only the silent master's keys ran");
    // each waiting the 200 ms timeout would take dead.len() * 200 ms
    assert!(
        took_dead < Duration::from_millis(dead.len() as u64 * 100),
        "{took_dead:?} for {} calls",
        dead.len()
    );
    assert!(svc.stats().total.backend_errors >= dead.len() as u64);
    // removals: the silent master's is held (sent again later), the other's stands
    svc.scope(async {
        cache_runtime::invalidate!(down_row(dead[0])).await;
        cache_runtime::invalidate!(down_row(alive[0])).await;
    })
    .await;
    let remote = svc.stats().remote;
    assert_eq!(remote.removals_waiting, 1, "{remote:?}");
    let gone = tokio::task::block_in_place(|| {
        cluster.nodes()[cluster.master_of(&key(alive[0]))].command(&["EXISTS", &key(alive[0])])
    });
    assert_eq!(gone.as_deref(), Some(":0"));
}

/// Two processes with the dependency graph on a cluster (3 masters, a replica each):
/// random reads, writes invalidating by key and by dependency, nested entries and
/// expiries for 20 s; the master holding the graph's keys is killed in the middle and
/// its replica takes over. No read of an instance returns a version older than one it
/// committed before the read: no value computed across an invalidation was left in
/// Redis, and none came back with the failover.
#[test]
fn a_random_run_with_dependencies_and_the_graphs_master_killed_leaves_no_stale_read() {
    use std::io::Write;
    let mut cluster = RedisCluster::start(3, 1);
    let db = RedisServer::start();
    let (mut a, mut b) = (
        instance("deps", &cluster, &db),
        instance("deps", &cluster, &db),
    );
    writeln!(a.stdin, "random 20 7").unwrap();
    writeln!(b.stdin, "random 20 11").unwrap();
    std::thread::sleep(Duration::from_secs(8));
    let graph = cluster.master_of("inst:g:{inst}:epoch");
    cluster.node_mut(graph).stop();
    tests::instance::assert_random_runs(&a.line(), &b.line());
    for i in [&mut a, &mut b] {
        eprintln!("{}", i.cmd("stats"));
        assert!(i.stat("topology_changes") >= 1);
    }
}

/// The source of [`lost_row`]: the round each row was last changed in.
static LOST_DB: std::sync::Mutex<u64> = std::sync::Mutex::new(0);

/// A row of [`a_walk_whose_reply_was_lost_is_taken_over_by_the_next_one`]: it
/// depends on its round's group.
#[cached(name = "lost.row")]
async fn lost_row(id: u64) -> u64 {
    cache_runtime::add_dependency(format!("lost:{}", id / 10));
    *LOST_DB.lock().unwrap()
}

/// The graph's master paused past the operation timeout while an invalidation's walk
/// is on its way: the walk times out at the instance but runs when the master
/// resumes, so the one sent again finds nothing to walk. Its reservation is taken
/// over by the one sent again, which buries its keys: once the invalidation went
/// through, the instance reads none of the old values (before, it did until the
/// reservation's deadline, 10 s later).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_walk_whose_reply_was_lost_is_taken_over_by_the_next_one() {
    let cluster = RedisCluster::start(3, 0);
    let svc = CachingService::builder()
        .backend(
            RedisBackend::builder(cluster.url())
                .key_prefix("lost")
                .dependencies(true)
                .operation_timeout(Duration::from_millis(200))
                .build()
                .await
                .unwrap(),
        )
        .build()
        .unwrap();
    let graph = &cluster.masters()[cluster.master_of("lost:g:{lost}:epoch")];
    let (mut reads, mut old) = (0u64, 0u64);
    svc.scope(async {
        for round in 1..=5u64 {
            *LOST_DB.lock().unwrap() = round;
            let ids = round * 10..round * 10 + 10;
            for id in ids.clone() {
                assert_eq!(lost_row(id).await, round);
            }
            // the writes are in Redis, read by the instance (no L1)
            tokio::time::sleep(Duration::from_millis(300)).await;
            for id in ids.clone() {
                assert_eq!(lost_row(id).await, round);
            }
            *LOST_DB.lock().unwrap() = round + 100;
            graph.pause(Duration::from_millis(700));
            cache_runtime::invalidate_dependency(format!("lost:{round}")).await;
            // until the invalidation went through, then for a second more
            let mut through = None;
            while through.is_none_or(|t: Instant| t.elapsed() < Duration::from_secs(1)) {
                for id in ids.clone() {
                    reads += 1;
                    if lost_row(id).await == round {
                        old += 1;
                    }
                }
                if through.is_none() && svc.stats().remote.removals_waiting == 0 {
                    through = Some(Instant::now());
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    })
    .await;
    let remote = svc.stats().remote;
    eprintln!(
        "reads {reads}, old {old}, removal errors {}, retried {}",
        remote.removal_errors, remote.removals_retried
    );
    assert!(
        remote.removals_retried >= 5,
        "the walks timed out: {remote:?}"
    );
    assert_eq!(old, 0, "old values read after the invalidation");
}
