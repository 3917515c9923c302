//! Fail-safe across instances (OS processes of `src/bin/cache_instance.rs`) on one
//! Redis: a fallback kept in Redis serves a process that never computed the value,
//! and an invalidation on one instance removes the fallback from every tier and
//! instance. The "database" is a second Redis; its key `db:fail` makes the body fail.

use std::time::{Duration, Instant};

use tests::instance::Instance;
use tests::redis_server::RedisServer;

fn instance(mode: &str, cache: &RedisServer, db: &RedisServer) -> Instance {
    Instance::start(env!("CARGO_BIN_EXE_cache_instance"), mode, cache, db)
}

/// Polls `fget id` on `inst` until it answers `want`: the milliseconds taken.
fn wait_answer(inst: &mut Instance, id: u64, want: &str, limit: Duration) -> Option<u128> {
    let start = Instant::now();
    loop {
        if inst.cmd(&format!("fget {id}")) == want {
            return Some(start.elapsed().as_millis());
        }
        if start.elapsed() > limit {
            return None;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn fallbacks_across_processes(mode: &str) {
    let (cache, db) = (RedisServer::start(), RedisServer::start());
    db.command(&["SET", "db:1", "a"]);
    db.command(&["SET", "db:2", "z"]);
    let mut a = instance(mode, &cache, &db);
    assert_eq!(a.cmd("fget 1"), "a");
    assert_eq!(a.cmd("fget 2"), "z");
    a.cmd("flush");
    // in Redis for ttl + fail_safe (1 s + 1 h), not for the ttl alone
    let mut con = redis::Client::open(cache.url())
        .and_then(|c| c.get_connection())
        .expect("connect");
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg("*fs_row*(1)")
        .query(&mut con)
        .unwrap();
    let [key] = &keys[..] else {
        panic!("{mode}: one entry of row 1 in Redis: {keys:?}")
    };
    let pttl: i64 = redis::cmd("PTTL").arg(key).query(&mut con).unwrap();
    assert!(
        pttl > 3_590_000 && pttl <= 3_601_000,
        "{key} lives ttl + fail_safe: {pttl} ms"
    );

    std::thread::sleep(Duration::from_millis(1_200)); // expired
    db.command(&["SET", "db:fail", "1"]);
    // a process that never computed it gets the fallback from Redis
    let mut b = instance(mode, &cache, &db);
    assert_eq!(b.cmd("fget 1"), "a", "{mode}: the fallback from Redis");
    assert_eq!(b.stat("runs"), 1, "the body ran, and failed");
    assert_eq!(b.stat("fallbacks"), 1);
    assert_eq!(a.cmd("fget 1"), "a", "{mode}: A's own fallback");

    // B changes the row: the fallback is gone for B at once, for A within the bus
    // latency, and for a new process
    assert_eq!(b.cmd("fset 1 b"), "ok");
    assert_eq!(
        b.cmd("fget 1"),
        "err",
        "{mode}: no fallback after the invalidation"
    );
    let ms = wait_answer(&mut a, 1, "err", Duration::from_secs(1));
    eprintln!("{mode}: A stopped serving the invalidated fallback after {ms:?} ms");
    assert!(
        ms.is_some(),
        "{mode}: A served the invalidated fallback for 1 s"
    );
    let mut c = instance(mode, &cache, &db);
    assert_eq!(c.cmd("fget 1"), "err", "{mode}: not in Redis either");
    assert_eq!(
        c.cmd("fget 2"),
        "z",
        "{mode}: the other row kept its fallback"
    );

    // the database is back
    db.command(&["DEL", "db:fail"]);
    assert_eq!(c.cmd("fget 1"), "b");
    let ms = wait_answer(&mut a, 1, "b", Duration::from_secs(3));
    assert!(
        ms.is_some(),
        "{mode}: A reads the new value once its throttle ends"
    );
}

#[test]
fn a_fallback_in_redis_serves_another_process_until_invalidated_l1() {
    fallbacks_across_processes("l1");
}

#[test]
fn a_fallback_in_redis_serves_another_process_until_invalidated_redis_only() {
    fallbacks_across_processes("redis");
}

#[test]
fn a_fallback_in_redis_serves_another_process_until_invalidated_dependencies() {
    fallbacks_across_processes("deps");
}
