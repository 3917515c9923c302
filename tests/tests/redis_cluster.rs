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

/// Fails unless `err` says the cluster does not support it yet.
fn says_not_yet(err: &RedisBackendError) {
    assert!(
        err.to_string()
            .contains("not supported on a Redis Cluster yet"),
        "{err}"
    );
}

/// What the cluster does not support yet is refused with a message that says so,
/// rather than failing on every call.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_collector_is_refused_on_a_cluster() {
    let cluster = RedisCluster::start(3, 0);
    let err = cache_redis::DependencyCollector::builder(cluster.url())
        .start()
        .await
        .unwrap_err();
    says_not_yet(&err);
    let err = cache_redis::full_collection(&cluster.url(), "cache")
        .await
        .unwrap_err();
    says_not_yet(&err);
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
