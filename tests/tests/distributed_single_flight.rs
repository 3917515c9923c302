//! One body per key across instances (`distributed_single_flight(true)`), with OS
//! processes of `src/bin/cache_instance.rs` on a private Redis. The "database" is a
//! second Redis, where each run of the body counts itself (`sf:runs:{round}:{id}`).

use std::io::Write;
use std::time::{Duration, Instant};

use tests::instance::Instance;
use tests::redis_server::RedisServer;

fn instance(mode: &str, cache: &RedisServer, db: &RedisServer, env: &[(&str, &str)]) -> Instance {
    Instance::start_with(
        env!("CARGO_BIN_EXE_cache_instance"),
        mode,
        &cache.url(),
        db,
        env,
    )
}

const SINGLE_FLIGHT: (&str, &str) = ("CACHE_INSTANCE_SINGLE_FLIGHT", "1");

/// How many times the body of `round`'s row `id` ran, over every instance.
fn runs(db: &RedisServer, round: u64, id: u64) -> u64 {
    let mut con = redis::Client::open(db.url())
        .and_then(|c| c.get_connection())
        .expect("connect");
    let n: Option<u64> = redis::cmd("GET")
        .arg(format!("sf:runs:{round}:{id}"))
        .query(&mut con)
        .unwrap();
    n.unwrap_or(0)
}

/// The lock keys left in the cache's Redis.
fn locks(cache: &RedisServer) -> Vec<String> {
    let mut con = redis::Client::open(cache.url())
        .and_then(|c| c.get_connection())
        .expect("connect");
    redis::cmd("KEYS").arg("*:lock:*").query(&mut con).unwrap()
}

/// `rounds` rounds of 4 processes × 16 tasks on 20 cold keys (a round's own): the
/// runs of each key's body, summed over the instances.
fn stampedes(mode: &str, env: &[(&str, &str)], rounds: u64) -> Vec<u64> {
    let (cache, db) = (RedisServer::start(), RedisServer::start());
    db.command(&["SET", "sf:ms", "100"]);
    let mut instances: Vec<Instance> = (0..4).map(|_| instance(mode, &cache, &db, env)).collect();
    let mut per_key = Vec::new();
    for round in 1..=rounds {
        for inst in &mut instances {
            writeln!(inst.stdin, "stampede {round} 20 16").unwrap();
        }
        for inst in &mut instances {
            assert_eq!(inst.line(), "ok", "{mode}: every call got its key's value");
        }
        per_key.extend((0..20).map(|id| runs(&db, round, id)));
    }
    for inst in &mut instances {
        assert_eq!(inst.cmd("flush"), "ok");
    }
    assert_eq!(locks(&cache), Vec::<String>::new(), "{mode}: no lock left");
    per_key
}

fn each_body_once(mode: &str) {
    let per_key = stampedes(mode, &[SINGLE_FLIGHT], 10);
    let extra: u64 = per_key.iter().map(|n| n - 1).sum();
    eprintln!(
        "{mode}: 10 rounds of 4 processes x 16 tasks on 20 cold keys: {} keys, {extra} extra runs",
        per_key.len()
    );
    assert!(
        per_key.iter().all(|&n| n == 1),
        "{mode}: each body ran once: {per_key:?}"
    );
}

#[test]
fn four_processes_run_each_body_once_without_l1() {
    each_body_once("redis");
}

#[test]
fn four_processes_run_each_body_once_with_l1() {
    each_body_once("l1");
}

#[test]
fn four_processes_run_each_body_once_with_dependencies() {
    each_body_once("deps");
}

/// Without the option, the same load runs most bodies on several instances: what the
/// test above would see if the lock did nothing.
#[test]
fn without_it_each_instance_runs_the_body() {
    let per_key = stampedes("l1", &[], 2);
    let total: u64 = per_key.iter().sum();
    eprintln!(
        "without distributed single flight: {total} runs for {} keys",
        per_key.len()
    );
    assert!(total > per_key.len() as u64, "{per_key:?}");
}

/// A holder killed mid-body leaves its lock; another instance waits at most the lock
/// timeout (2 s here), then runs the body itself.
#[test]
fn a_killed_holder_s_lock_expires() {
    let (cache, db) = (RedisServer::start(), RedisServer::start());
    db.command(&["SET", "sf:ms", "60000"]);
    let env = [SINGLE_FLIGHT, ("CACHE_INSTANCE_LOCK_TIMEOUT_MS", "2000")];
    let mut a = instance("l1", &cache, &db, &env);
    let mut b = instance("l1", &cache, &db, &env);
    writeln!(a.stdin, "sf 1 0").unwrap();
    let start = Instant::now();
    while runs(&db, 1, 0) == 0 {
        assert!(start.elapsed() < Duration::from_secs(5), "A ran the body");
        std::thread::sleep(Duration::from_millis(5));
    }
    assert_eq!(locks(&cache).len(), 1, "A holds the key's lock");
    a.kill();
    db.command(&["SET", "sf:ms", "10"]);
    let start = Instant::now();
    assert_eq!(b.cmd("sf 1 0"), "v1.0");
    let waited = start.elapsed();
    eprintln!("B ran the body after {waited:?} (the lock timeout is 2 s)");
    assert_eq!(runs(&db, 1, 0), 2);
    assert!(
        waited > Duration::from_millis(500) && waited < Duration::from_secs(10),
        "B waited for the dead holder's lock, at most about its lock timeout: {waited:?}"
    );
    assert_eq!(b.cmd("flush"), "ok");
    assert_eq!(locks(&cache), Vec::<String>::new());
}

/// A body that fails releases the lock at once: the waiting instance runs the body
/// itself then, long before the lock timeout (30 s).
#[test]
fn a_failing_body_releases_the_lock_at_once() {
    let (cache, db) = (RedisServer::start(), RedisServer::start());
    db.command(&["SET", "sf:ms", "1000"]);
    db.command(&["SET", "sf:fail", "1"]);
    let mut a = instance("l1", &cache, &db, &[SINGLE_FLIGHT]);
    let mut b = instance("l1", &cache, &db, &[SINGLE_FLIGHT]);
    writeln!(a.stdin, "sf 1 0").unwrap();
    let start = Instant::now();
    while runs(&db, 1, 0) == 0 {
        assert!(start.elapsed() < Duration::from_secs(5), "A ran the body");
        std::thread::sleep(Duration::from_millis(5));
    }
    let start = Instant::now();
    writeln!(b.stdin, "sf 1 0").unwrap();
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(runs(&db, 1, 0), 1, "B waits for A's body");
    assert_eq!(a.line(), "err");
    assert_eq!(b.line(), "err");
    let waited = start.elapsed();
    eprintln!("B ran its own body after A's failed: answered after {waited:?}");
    assert_eq!(runs(&db, 1, 0), 2, "B ran the body itself");
    assert!(waited < Duration::from_secs(10), "{waited:?}");
    // the database back: A's next call computes it, B reads it
    db.command(&["DEL", "sf:fail"]);
    assert_eq!(a.cmd("sf 1 0"), "v1.0");
    a.cmd("flush");
    assert_eq!(b.cmd("sf 1 0"), "v1.0");
    assert_eq!(runs(&db, 1, 0), 3);
    assert_eq!(locks(&cache), Vec::<String>::new());
}
