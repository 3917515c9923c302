//! Instances as separate OS processes (`src/bin/cache_instance.rs`) on one Redis:
//! invalidations cross between them, within the bus latency, and recover after a lost
//! subscription or a Redis restart. The "database" is a second Redis.

use std::time::{Duration, Instant};

use tests::redis_server::RedisServer;

fn instance(mode: &str, cache: &RedisServer, db: &RedisServer) -> Instance {
    Instance::start(env!("CARGO_BIN_EXE_cache_instance"), mode, cache, db)
}

use tests::instance::Instance;

/// A's invalidation drops B's copy within 200 ms, and B reads the new value.
fn crossing(mode: &str) {
    let (cache, db) = (RedisServer::start(), RedisServer::start());
    let (mut a, mut b) = (instance(mode, &cache, &db), instance(mode, &cache, &db));
    tests::instance::crossing_rounds(&mut a, &mut b, 20, 3);
    assert_eq!(a.stat("received"), 0, "A ignores its own messages");
    assert!(b.stat("received") >= 20);
}

#[test]
fn an_invalidation_reaches_the_other_processes_l1() {
    crossing("l1");
}

#[test]
fn an_invalidation_reaches_the_other_processes_memory_cache_with_redis_sync() {
    crossing("sync");
}

#[test]
fn redis_sync_leaves_no_key_in_redis() {
    let (cache, db) = (RedisServer::start(), RedisServer::start());
    let (mut a, mut b) = (instance("sync", &cache, &db), instance("sync", &cache, &db));
    for id in 0..50 {
        a.cmd(&format!("get {id}"));
        b.cmd(&format!("get {id}"));
        a.cmd(&format!("set {id} x"));
    }
    a.cmd("dep row:1");
    a.cmd("clear");
    assert_eq!(cache.command(&["DBSIZE"]).as_deref(), Some(":0"));
    assert_eq!(db.command(&["DBSIZE"]).as_deref(), Some(":50"));
}

#[test]
fn dependencies_and_clear_cross_processes() {
    let (cache, db) = (RedisServer::start(), RedisServer::start());
    let (mut a, mut b) = (instance("l1", &cache, &db), instance("l1", &cache, &db));
    b.cmd("get 1");
    b.cmd("get 2");
    a.cmd("dep row:1");
    assert_ne!(b.cmd("wait_drop 1 1000"), "timeout");
    assert_eq!(b.cmd("peek 2"), "none", "row 2 stays");
    a.cmd("clear");
    assert_ne!(b.cmd("wait_drop 2 1000"), "timeout");
}

/// The subscription is killed and an invalidation is published at once, which B
/// cannot hear: B notices the loss, clears its L1, and serves the new value within
/// 1.5 s.
#[test]
fn a_killed_subscription_recovers() {
    for mode in ["l1", "sync"] {
        let (cache, db) = (RedisServer::start(), RedisServer::start());
        let (mut a, mut b) = (instance(mode, &cache, &db), instance(mode, &cache, &db));
        assert_eq!(b.cmd("get 1"), "none");
        b.cmd("flush");
        let killed = cache.command(&["CLIENT", "KILL", "TYPE", "pubsub"]);
        assert!(killed.is_some_and(|k| k != ":0"), "a subscriber was killed");
        assert_eq!(a.cmd("set 1 new"), "ok");
        let ms: u64 = b
            .cmd("wait_value 1 new 1500")
            .parse()
            .expect("B served the new value within 1.5 s");
        assert!(ms <= 1500);
        b.wait_stat("l1_clears", 2, Duration::from_secs(5));
        // and it hears invalidations again
        b.cmd("get 1");
        b.cmd("flush");
        a.cmd("set 1 newer");
        assert_ne!(b.cmd("wait_drop 1 1000"), "timeout", "{mode}");
    }
}

/// Redis killed and restarted: B drops what it held, and later invalidations reach
/// it again.
#[test]
fn a_redis_restart_clears_and_resubscribes() {
    let (mut cache, db) = (RedisServer::start(), RedisServer::start());
    let (mut a, mut b) = (instance("l1", &cache, &db), instance("l1", &cache, &db));
    a.cmd("set 1 before");
    assert_eq!(b.cmd("get 1"), "before");
    cache.stop();
    // B notices the loss and clears its L1
    b.wait_stat("l1_clears", 1, Duration::from_secs(3));
    assert_eq!(b.cmd("peek 1"), "-");
    cache.restart();
    b.wait_stat("l1_clears", 2, Duration::from_secs(5));
    a.wait_stat("l1_clears", 2, Duration::from_secs(5));
    let runs = b.stat("runs");
    assert_eq!(b.cmd("get 1"), "before");
    assert_eq!(b.stat("runs"), runs + 1, "read from the database again");
    // B's write of "before" goes on a connection that has to be made again: let it
    // land first (a write still queued on another instance can land after an
    // invalidation unless the backend has `.dependencies(true)`)
    b.cmd("flush");
    a.cmd("set 1 after");
    assert_ne!(b.cmd("wait_drop 1 1000"), "timeout");
    assert_eq!(b.cmd("get 1"), "after");
}

/// 5,000 invalidations of other keys leave B's entry cached.
#[test]
fn invalidations_of_other_keys_leave_an_entry_cached() {
    let (cache, db) = (RedisServer::start(), RedisServer::start());
    let (mut a, mut b) = (instance("l1", &cache, &db), instance("l1", &cache, &db));
    b.cmd("get 1");
    let runs = b.stat("runs");
    a.cmd("inv_range 1000 6000");
    b.wait_stat("received", 5_000, Duration::from_secs(30));
    b.cmd("get 1");
    assert_eq!(b.stat("runs"), runs, "B's entry stayed cached");
    assert_eq!(b.stat("l1_clears"), 0);
}

/// A connection that stops answering (the server paused) is noticed by the
/// subscriber's `PING` within about a second: B clears its L1 without any message.
#[test]
fn an_unanswering_connection_is_noticed() {
    let (cache, db) = (RedisServer::start(), RedisServer::start());
    let mut b = instance("l1", &cache, &db);
    b.cmd("get 1");
    let start = Instant::now();
    cache.pause(Duration::from_secs(3));
    b.wait_stat("l1_clears", 1, Duration::from_secs(3));
    let noticed = start.elapsed();
    eprintln!("loss noticed after {noticed:?}");
    assert!(
        noticed < Duration::from_millis(2_000),
        "noticed after {noticed:?}"
    );
    assert_eq!(b.cmd("peek 1"), "-");
    // once the server answers again, B subscribes again and clears once more
    b.wait_stat("l1_clears", 2, Duration::from_secs(10));
}
