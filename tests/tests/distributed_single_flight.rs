//! One body per key across instances (`distributed_single_flight(true)`), with OS
//! processes of `src/bin/cache_instance.rs` on a private Redis. The "database" is a
//! second Redis, where each run of the body counts itself (`sf:runs:{round}:{id}`).

use std::io::Write;
use std::time::{Duration, Instant};

use tests::instance::Instance;
use tests::redis_cluster::RedisCluster;
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

/// The lock keys left in the cache's Redis (not the one a lazy backend's probe of
/// its permissions takes and removes a moment later).
fn locks(cache: &RedisServer) -> Vec<String> {
    let mut con = redis::Client::open(cache.url())
        .and_then(|c| c.get_connection())
        .expect("connect");
    let keys: Vec<String> = redis::cmd("KEYS").arg("*:lock:*").query(&mut con).unwrap();
    keys.into_iter()
        .filter(|k| !k.contains("cache-rs.probe"))
        .collect()
}

/// `rounds` rounds of 4 processes × 16 tasks on 20 cold keys (a round's own) against
/// the cache at `url`: the runs of each key's body, summed over the instances. After
/// the instances' shutdown, `locks_left` must say none is left.
fn stampedes_at(
    mode: &str,
    url: &str,
    env: &[(&str, &str)],
    rounds: u64,
    locks_left: impl Fn() -> usize,
) -> Vec<u64> {
    let db = RedisServer::start();
    db.command(&["SET", "sf:ms", "100"]);
    let exe = env!("CARGO_BIN_EXE_cache_instance");
    let mut instances: Vec<Instance> = (0..4)
        .map(|_| Instance::start_with(exe, mode, url, &db, env))
        .collect();
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
    assert_eq!(locks_left(), 0, "{mode}: no lock left");
    per_key
}

fn stampedes(mode: &str, env: &[(&str, &str)], rounds: u64) -> Vec<u64> {
    let cache = RedisServer::start();
    stampedes_at(mode, &cache.url(), env, rounds, || locks(&cache).len())
}

fn assert_once(what: &str, per_key: &[u64]) {
    let extra: u64 = per_key.iter().map(|n| n - 1).sum();
    eprintln!(
        "{what}: 10 rounds of 4 processes x 16 tasks on 20 cold keys: {} keys, {extra} extra runs",
        per_key.len()
    );
    assert!(
        per_key.iter().all(|&n| n == 1),
        "{what}: each body ran once: {per_key:?}"
    );
}

fn each_body_once(mode: &str) {
    assert_once(mode, &stampedes(mode, &[SINGLE_FLIGHT], 10));
}

/// The same on a 3-master Redis Cluster: each lock has its value's slot.
fn each_body_once_on_a_cluster(mode: &str) {
    let cluster = RedisCluster::start(3, 0);
    let env = [SINGLE_FLIGHT, ("CACHE_INSTANCE_EAGER", "1")];
    let left = || (0..3).map(|i| cluster.keys_on(i, "inst:lock:")).sum();
    let per_key = stampedes_at(mode, &cluster.url(), &env, 10, left);
    assert_once(&format!("{mode} on a cluster"), &per_key);
    let values: Vec<usize> = (0..3).map(|i| cluster.keys_on(i, "inst:2:")).collect();
    assert!(values.iter().all(|&n| n > 0), "spread: {values:?}");
}

#[test]
fn on_a_cluster_each_body_runs_once() {
    each_body_once_on_a_cluster("l1");
}

#[test]
fn on_a_cluster_with_dependencies_each_body_runs_once() {
    each_body_once_on_a_cluster("deps");
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

/// With fail-safe and a soft timeout, an instance that finds another's body of the
/// key running, slower than the soft timeout, answers with the fallback from Redis
/// without running the body, then reads the other's value once it lands.
#[test]
fn a_waiter_answers_with_the_fallback_after_the_soft_timeout() {
    let (cache, db) = (RedisServer::start(), RedisServer::start());
    db.command(&["SET", "sf:ms", "10"]);
    let mut a = instance("l1", &cache, &db, &[SINGLE_FLIGHT]);
    let mut b = instance("l1", &cache, &db, &[SINGLE_FLIGHT]);
    assert_eq!(a.cmd("sft 1 0"), "v1.0");
    a.cmd("flush");
    std::thread::sleep(Duration::from_millis(1_200)); // expired, kept as a fallback
    db.command(&["SET", "sf:gen", "2"]);
    db.command(&["SET", "sf:ms", "3000"]);
    writeln!(a.stdin, "sft 1 0").unwrap();
    let start = Instant::now();
    while runs(&db, 1, 0) < 2 {
        assert!(start.elapsed() < Duration::from_secs(5), "A ran the body");
        std::thread::sleep(Duration::from_millis(5));
    }
    let start = Instant::now();
    assert_eq!(b.cmd("sft 1 0"), "v1.0", "B: the fallback");
    let waited = start.elapsed();
    assert_eq!(a.line(), "v1.0", "A: its soft timeout's fallback");
    eprintln!("B answered with the fallback after {waited:?} (soft timeout 300 ms, A's body 3 s)");
    assert!(waited < Duration::from_secs(2), "{waited:?}");
    assert_eq!(b.stat("runs"), 0, "B did not run the body");
    // A's body lands; B then reads its value
    let start = Instant::now();
    while b.cmd("sft 1 0") != "v1.0.2" {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "A's value reached B"
        );
    }
    eprintln!(
        "B read A's value {:?} after its first call",
        start.elapsed() + waited
    );
    assert_eq!(b.stat("runs"), 0);
    assert_eq!(runs(&db, 1, 0), 2);
    assert_eq!(b.cmd("flush"), "ok");
    assert_eq!(a.cmd("flush"), "ok");
    assert_eq!(locks(&cache), Vec::<String>::new());
}

/// What `build()` says for a user with `rules` taken away, with the option and
/// without an in-process tier.
async fn build_as(server: &RedisServer, rules: &[&str]) -> String {
    server.acl_user("u", rules);
    let built = cache_redis::RedisBackend::builder(server.url_as("u", RedisServer::PASSWORD))
        .key_prefix("acl")
        .distributed_single_flight(true)
        .build()
        .await;
    match built {
        Err(e @ cache_redis::RedisBackendError::Refused { .. }) => e.to_string(),
        Err(e) => panic!("{rules:?}: expected a refusal, got {e}"),
        Ok(_) => "built".into(),
    }
}

#[tokio::test]
async fn build_names_what_single_flight_needs() {
    let server = RedisServer::start();
    for (rules, says) in [
        (&["-evalsha", "-eval"][..], "EVALSHA"),
        (&["-append"], "a command the single flight's scripts run"),
        (&["-subscribe"], "SUBSCRIBE"),
    ] {
        let text = build_as(&server, rules).await;
        eprintln!("{rules:?}: {text}");
        assert!(text.contains(says), "{rules:?}: {text}");
        assert!(
            text.contains("single flight") || text.contains("single_flight"),
            "{text}"
        );
        assert!(text.contains("ACL SETUSER u"), "{text}");
    }
    assert_eq!(build_as(&server, &[]).await, "built");
    // the probe leaves no lock behind
    assert_eq!(locks(&server), Vec::<String>::new());
}

/// `shutdown()` releases the locks of bodies still running.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_releases_the_locks_still_held() {
    use cache_runtime::{cached, CachingService};
    #[cached(name = "dsf.slow_at_shutdown")]
    async fn slow_at_shutdown(id: u64) -> u64 {
        tokio::time::sleep(Duration::from_secs(30)).await;
        id
    }
    let server = RedisServer::start();
    let backend = cache_redis::RedisBackend::builder(server.url())
        .key_prefix("down")
        .distributed_single_flight(true)
        .build()
        .await
        .unwrap();
    let svc = CachingService::builder().backend(backend).build().unwrap();
    let call = tokio::spawn(svc.scope(slow_at_shutdown(1)));
    let start = Instant::now();
    while locks(&server).is_empty() {
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "the call took the lock"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // (the read's reply reaches the call: it holds the lock)
    tokio::time::sleep(Duration::from_millis(200)).await;
    svc.shutdown().await;
    assert_eq!(locks(&server), Vec::<String>::new());
    call.abort();
}

/// An eager refresh takes the key's lock: two instances whose hits pass the refresh
/// point while one of them refreshes leave it to that one, and both then read its
/// value.
#[test]
fn one_instance_refreshes_a_key_early() {
    let (cache, db) = (RedisServer::start(), RedisServer::start());
    db.command(&["SET", "sf:ms", "10"]);
    let mut a = instance("l1", &cache, &db, &[SINGLE_FLIGHT]);
    let mut b = instance("l1", &cache, &db, &[SINGLE_FLIGHT]);
    assert_eq!(a.cmd("sfe 1 0"), "v1.0");
    a.cmd("flush");
    assert_eq!(b.cmd("sfe 1 0"), "v1.0", "B reads A's value from Redis");
    assert_eq!(b.stat("runs"), 0);
    std::thread::sleep(Duration::from_millis(1_100)); // past the refresh point
    db.command(&["SET", "sf:gen", "2"]);
    db.command(&["SET", "sf:ms", "1000"]);
    assert_eq!(
        a.cmd("sfe 1 0"),
        "v1.0",
        "A: a hit, which starts the refresh"
    );
    let start = Instant::now();
    while runs(&db, 1, 0) < 2 {
        assert!(start.elapsed() < Duration::from_secs(5), "A's refresh ran");
        std::thread::sleep(Duration::from_millis(5));
    }
    assert_eq!(
        b.cmd("sfe 1 0"),
        "v1.0",
        "B: a hit; A holds the refresh's lock"
    );
    // B reads A's refreshed value once its own copy expires, without a body of its own
    let start = Instant::now();
    while b.cmd("sfe 1 0") != "v1.0.2" {
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "A's value reached B"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    assert_eq!(a.cmd("sfe 1 0"), "v1.0.2");
    assert_eq!(b.stat("runs"), 0, "B never ran the body");
    assert_eq!(runs(&db, 1, 0), 2, "the first value and one refresh");
    assert_eq!(a.cmd("flush"), "ok");
    assert_eq!(b.cmd("flush"), "ok");
    assert_eq!(locks(&cache), Vec::<String>::new());
}

/// A read whose reply never came (Redis paused past the operation timeout) may have
/// taken the lock once the server ran it: the instance releases it in the background,
/// so that the key is not held back for the lock timeout (30 s here).
#[test]
fn a_read_that_timed_out_leaves_no_lock() {
    let (cache, db) = (RedisServer::start(), RedisServer::start());
    db.command(&["SET", "sf:ms", "10"]);
    db.command(&["SET", "sf:fail", "1"]); // nothing is written
    let mut a = instance("redis", &cache, &db, &[SINGLE_FLIGHT]);
    let mut b = instance("redis", &cache, &db, &[SINGLE_FLIGHT]);
    cache.pause(Duration::from_millis(1_000));
    assert_eq!(a.cmd("sf 1 0"), "err", "the read timed out; the body ran");
    let start = Instant::now();
    loop {
        let left = locks(&cache);
        if left.is_empty() {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "the late read's lock was released: {left:?}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    eprintln!(
        "the late read's lock was gone {:?} after A's call",
        start.elapsed()
    );
    let start = Instant::now();
    assert_eq!(b.cmd("sf 1 0"), "err");
    assert!(
        start.elapsed() < Duration::from_secs(5),
        "{:?}",
        start.elapsed()
    );
    assert_eq!(runs(&db, 1, 0), 2);
}

/// A waiter is told when the holder's value lands, not only by reading again (every
/// second while subscribed): with a 300 ms body, it answers well before its first
/// poll would.
#[test]
fn a_waiter_is_told_when_the_value_lands() {
    let (cache, db) = (RedisServer::start(), RedisServer::start());
    db.command(&["SET", "sf:ms", "300"]);
    let env = [SINGLE_FLIGHT, ("CACHE_INSTANCE_EAGER", "1")];
    let mut a = instance("l1", &cache, &db, &env);
    let mut b = instance("l1", &cache, &db, &env);
    let scripts = || cache.calls("evalsha") + cache.calls("eval");
    let before = scripts();
    writeln!(a.stdin, "sf 1 0").unwrap();
    let start = Instant::now();
    while runs(&db, 1, 0) == 0 {
        assert!(start.elapsed() < Duration::from_secs(5), "A ran the body");
        std::thread::sleep(Duration::from_millis(2));
    }
    let start = Instant::now();
    assert_eq!(b.cmd("sf 1 0"), "v1.0");
    let waited = start.elapsed();
    assert_eq!(a.line(), "v1.0");
    a.cmd("flush");
    let reads = scripts() - before;
    eprintln!("B answered {waited:?} after A's body began (300 ms); scripts run: {reads}");
    assert_eq!(b.stat("runs"), 0);
    assert!(
        waited < Duration::from_millis(900),
        "told, not polled: {waited:?}"
    );
    // A's read and release, B's read that found the lock and the one after the message
    assert!(reads <= 4, "{reads}");
}

/// B invalidates a key while A holds its lock and computes it from the old data: B
/// waits for A's lock, and must still read the new value (A's is out of date: not
/// written, or refused by the graph's marker), and so must A's next call.
fn the_invalidating_instance_waits_and_reads_the_new_value(mode: &str) {
    let (cache, db) = (RedisServer::start(), RedisServer::start());
    db.command(&["SET", "sf:ms", "1000"]);
    let env = [SINGLE_FLIGHT, ("CACHE_INSTANCE_EAGER", "1")];
    let mut a = instance(mode, &cache, &db, &env);
    let mut b = instance(mode, &cache, &db, &env);
    writeln!(a.stdin, "sf 1 0").unwrap();
    let start = Instant::now();
    while runs(&db, 1, 0) == 0 {
        assert!(start.elapsed() < Duration::from_secs(5), "A ran the body");
        std::thread::sleep(Duration::from_millis(2));
    }
    // A's body read the old data; B changes it and invalidates
    db.command(&["SET", "sf:gen", "2"]);
    assert_eq!(b.cmd("sfinv 1 0"), "ok");
    assert_eq!(
        b.cmd("sf 1 0"),
        "v1.0.2",
        "{mode}: B never reads the old value"
    );
    assert_eq!(
        a.line(),
        "v1.0",
        "{mode}: A's caller began before the change"
    );
    a.cmd("flush");
    assert_eq!(
        a.cmd("sf 1 0"),
        "v1.0.2",
        "{mode}: A did not keep its old value"
    );
    assert_eq!(locks(&cache), Vec::<String>::new());
}

#[test]
fn the_invalidating_instance_reads_the_new_value_with_l1() {
    the_invalidating_instance_waits_and_reads_the_new_value("l1");
}

#[test]
fn the_invalidating_instance_reads_the_new_value_with_dependencies() {
    the_invalidating_instance_waits_and_reads_the_new_value("deps");
}
