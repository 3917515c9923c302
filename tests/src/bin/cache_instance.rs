//! One instance of an application, as a process of its own, for the tests that check
//! what crosses between instances (`tests/tests/sync_processes.rs`).
//!
//! `cache_instance <mode> <cache redis url> <database redis url>`, where mode is `l1`
//! (`RedisBackend` with an in-process L1; with `l1-plain`, rows depend on nothing, so
//! they are stored in Redis), `redis` (`RedisBackend` alone), `deps`
//! (`RedisBackend` with an L1 and `.dependencies(true)`) or `sync` (`MemoryBackend`
//! with `RedisSync`). The "database" is a second Redis holding rows
//! `db:{id}`. Reads commands on stdin, one per line, and answers each with one line:
//!
//! | command | answer |
//! |---|---|
//! | `get ID` | the cached value of row ID (`none` if absent) |
//! | `oget ID` | row ID through two nested cached calls, the inner one depending on `group` and `row:{ID}` |
//! | `set ID VALUE` | writes the row and invalidates it (`#[invalidate_cache]`): `ok` |
//! | `inv_range FROM TO` | invalidates rows FROM..TO one by one: `ok` |
//! | `dep NAME` | `invalidate_dependency(NAME)`: `ok` |
//! | `clear` | `CachingService::clear()`: `ok` |
//! | `peek ID` | the value in the in-process tier, or `-` |
//! | `wait_drop ID MS` | polls `peek` until the entry is gone: microseconds taken, or `timeout` |
//! | `wait_value ID VALUE MS` | polls `get` every 5 ms until it returns VALUE: milliseconds, or `timeout` |
//! | `flush` | waits for this instance's queued writes to Redis: `ok` |
//! | `sf ROUND ID` | [`sf_row`]: the value, or `err` |
//! | `sfinv ROUND ID` | invalidates [`sf_row`]`(ROUND, ID)`: `ok` |
//! | `sft ROUND ID` | [`sft_row`]: the value, or `err` |
//! | `sfe ROUND ID` | [`sfe_row`]: the value, or `err` |
//! | `stampede ROUND KEYS TASKS` | [`stampede`]: `ok`, or the first wrong answer |
//! | `fget ID` | row ID through [`fs_row`] (fail-safe: while the database key `db:fail` exists its body fails): the value, or `err` |
//! | `fset ID VALUE` | writes the row and invalidates `fs_row` (`#[invalidate_cache]`): `ok` |
//! | `stats` | `runs=N received=N published=N l1_clears=N l1_bypassed=0/1`, and the remote tier's errors (`write_errors=N removal_errors=N reads_held=N ...`) and, on a cluster, `topology_changes=N invalidations_replayed=N redirections=N` |
//! | `random SECONDS SEED` | a random mix for SECONDS (see [`random`]): `ops=N reads=N stale=N` |
//! | `soak SECONDS SEED` | the soak's load (see [`soak`]): a `progress ...` line a second, then `result {json}` |
//!
//! `CACHE_INSTANCE_SOURCE_FAULTS=1` makes the soak read [`soak_row_fs`] and
//! [`soak_view_fs`] (fail-safe, soft timeout) from a database that fails or stalls
//! on the soak's schedule.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use cache_redis::{RedisBackend, RedisSync};
use cache_runtime::{add_dependency, cached, invalidate_cache, CachingService, MemoryBackend};
use redis::aio::MultiplexedConnection;
use tokio::io::AsyncBufReadExt;

static DB: OnceLock<MultiplexedConnection> = OnceLock::new();
static METRICS: OnceLock<cache_redis::RedisMetrics> = OnceLock::new();
static RUNS: AtomicU64 = AtomicU64::new(0);

async fn db_get(id: u64) -> Option<String> {
    let mut db = DB.get().expect("database").clone();
    redis::cmd("GET")
        .arg(format!("db:{id}"))
        .query_async(&mut db)
        .await
        .expect("database read")
}

/// Whether rows depend on `row:{id}` (all modes but the `-plain` ones).
static ROW_DEPENDENCY: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(true);

#[cached(name = "inst.row")]
async fn row(id: u64) -> String {
    RUNS.fetch_add(1, Ordering::SeqCst);
    if ROW_DEPENDENCY.load(Ordering::Relaxed) {
        add_dependency(format!("row:{id}"));
    }
    db_get(id).await.unwrap_or_else(|| "none".into())
}

/// A row that also depends on `group` (one invalidation reaches every row).
#[cached(name = "inst.grouped")]
async fn grouped(id: u64) -> String {
    RUNS.fetch_add(1, Ordering::SeqCst);
    add_dependency("group");
    add_dependency(format!("row:{id}"));
    db_get(id).await.unwrap_or_else(|| "none".into())
}

/// [`grouped`] through a nested cached call (linked to it).
#[cached(name = "inst.outer")]
async fn outer(id: u64) -> String {
    grouped(id).await
}

#[invalidate_cache(row)]
async fn write_row(id: u64, value: String) {
    let mut db = DB.get().expect("database").clone();
    let () = redis::cmd("SET")
        .arg(format!("db:{id}"))
        .arg(value)
        .query_async(&mut db)
        .await
        .expect("database write");
}

/// A row with fail-safe: expired after 1 s, kept 1 h as a fallback, which counts as
/// fresh for 1 s after a failure. Its body fails while the database key `db:fail`
/// exists (every instance sees the same database).
#[cached(
    name = "inst.fs_row",
    ttl = "1s",
    fail_safe = "1h",
    fail_safe_throttle = "1s"
)]
async fn fs_row(id: u64) -> Result<String, String> {
    RUNS.fetch_add(1, Ordering::SeqCst);
    let mut db = DB.get().ok_or("no database")?.clone();
    let failing: bool = redis::cmd("EXISTS")
        .arg("db:fail")
        .query_async(&mut db)
        .await
        .map_err(|e| e.to_string())?;
    if failing {
        return Err("database unavailable".into());
    }
    Ok(db_get(id).await.unwrap_or_else(|| "none".into()))
}

#[invalidate_cache(fs_row)]
async fn write_fs_row(id: u64, value: String) {
    write_row(id, value).await;
}

/// A slow row for the stampede tests (profile `sf`: `lock_timeout` from
/// `CACHE_INSTANCE_LOCK_TIMEOUT_MS`, default 30 s). See [`sf_body`].
#[cached(name = "inst.sf_row", profile = "sf")]
async fn sf_row(round: u64, id: u64) -> Result<String, String> {
    sf_body(round, id).await
}

/// [`sf_row`] with fail-safe and a soft timeout: expired after 1 s, kept 1 h as a
/// fallback, which answers a call whose body (here or on another instance) takes
/// longer than 300 ms.
#[cached(
    name = "inst.sft_row",
    profile = "sf",
    ttl = "1s",
    fail_safe = "1h",
    soft_timeout = "300ms"
)]
async fn sft_row(round: u64, id: u64) -> Result<String, String> {
    sf_body(round, id).await
}

/// [`sf_row`] refreshed early: expired after 2 s, refreshed in the background by the
/// first hit past 1 s.
#[cached(name = "inst.sfe_row", profile = "sf", ttl = "2s", eager_refresh = 0.5)]
async fn sfe_row(round: u64, id: u64) -> Result<String, String> {
    sf_body(round, id).await
}

/// Each run counts itself in the database (`sf:runs:{round}:{id}`, so every
/// instance's runs add up), sleeps for the database key `sf:ms` (milliseconds,
/// default 200), then fails if `sf:fail` exists; else `v{round}.{id}`, followed by
/// `.{sf:gen}` if that key exists.
async fn sf_body(round: u64, id: u64) -> Result<String, String> {
    RUNS.fetch_add(1, Ordering::SeqCst);
    let mut db = DB.get().ok_or("no database")?.clone();
    let (ms, failing, generation): (Option<u64>, bool, Option<u64>) = redis::pipe()
        .cmd("INCR")
        .arg(format!("sf:runs:{round}:{id}"))
        .ignore()
        .cmd("GET")
        .arg("sf:ms")
        .cmd("EXISTS")
        .arg("sf:fail")
        .cmd("GET")
        .arg("sf:gen")
        .query_async(&mut db)
        .await
        .map_err(|e| e.to_string())?;
    tokio::time::sleep(Duration::from_millis(ms.unwrap_or(200))).await;
    if failing {
        return Err("database unavailable".into());
    }
    Ok(match generation {
        Some(g) => format!("v{round}.{id}.{g}"),
        None => format!("v{round}.{id}"),
    })
}

/// `TASKS` tasks, each calling [`sf_row`] on every id of `0..KEYS` of `round`, in an
/// order of its own: `ok`, or the first wrong answer.
async fn stampede(round: u64, keys: u64, tasks: u64) -> String {
    let handles: Vec<_> = (0..tasks)
        .map(|t| {
            tokio::spawn(async move {
                let mut next = xorshift(t + 1);
                let mut ids: Vec<u64> = (0..keys).collect();
                for i in (1..ids.len()).rev() {
                    ids.swap(i, (next() % (i as u64 + 1)) as usize);
                }
                for id in ids {
                    let v = sf_row(round, id).await;
                    if v.as_deref() != Ok(format!("v{round}.{id}").as_str()) {
                        return format!("wrong {round}.{id}: {v:?}");
                    }
                }
                "ok".to_owned()
            })
        })
        .collect();
    for h in handles {
        let answer = h.await.expect("a task");
        if answer != "ok" {
            return answer;
        }
    }
    "ok".into()
}

/// A small seeded random number generator (xorshift), so that a run can be repeated.
fn xorshift(seed: u64) -> impl FnMut() -> u64 {
    let mut state = seed.max(1);
    move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    }
}

/// A row's version: a counter in the database.
#[cached(name = "inst.version", ttl = "1s")]
async fn version(id: u64) -> u64 {
    add_dependency(format!("version:{id}"));
    db_get_u64(id).await
}

/// The same version, through a nested cached call (linked to it).
#[cached(name = "inst.summary", ttl = "3s")]
async fn summary(id: u64) -> u64 {
    version(id).await
}

async fn db_get_u64(id: u64) -> u64 {
    let mut db = DB.get().expect("database").clone();
    let v: Option<u64> = redis::cmd("GET")
        .arg(format!("db:v:{id}"))
        .query_async(&mut db)
        .await
        .expect("database read");
    v.unwrap_or(0)
}

/// For `seconds`: reads of `version` and `summary` (80%), and writes that bump a row's
/// version in the database and then invalidate it by key or by dependency (20%), over
/// 40 rows. A read that returns a version older than one this instance committed
/// before the read began is stale.
async fn random(seconds: Duration, seed: u64) -> String {
    let mut next = xorshift(seed);
    let mut committed = [0u64; 40];
    let (mut ops, mut reads, mut stale) = (0u64, 0u64, 0u64);
    let end = Instant::now() + seconds;
    while Instant::now() < end {
        let r = next();
        let id = (r >> 8) % 40;
        ops += 1;
        match r % 10 {
            0 | 1 => {
                let mut db = DB.get().expect("database").clone();
                let v: u64 = redis::cmd("INCR")
                    .arg(format!("db:v:{id}"))
                    .query_async(&mut db)
                    .await
                    .expect("database write");
                if r % 10 == 0 {
                    cache_runtime::invalidate!(version(id)).await;
                } else {
                    cache_runtime::invalidate_dependency(format!("version:{id}")).await;
                }
                committed[id as usize] = v;
            }
            k => {
                let before = committed[id as usize];
                let v = if k < 6 {
                    version(id).await
                } else {
                    summary(id).await
                };
                reads += 1;
                if v < before {
                    stale += 1;
                    if std::env::var_os("CACHE_INSTANCE_DEBUG").is_some() {
                        eprintln!(
                            "stale: {} of {id}: {v} < {before} at {:?} before the end",
                            if k < 6 { "version" } else { "summary" },
                            end.saturating_duration_since(Instant::now())
                        );
                    }
                }
            }
        }
    }
    format!("ops={ops} reads={reads} stale={stale}")
}

/// A row of the soak's database: its version, or the database's error.
#[cached(name = "inst.soak_row", ttl = "2s")]
async fn soak_row(id: u64) -> Result<u64, String> {
    if ROW_DEPENDENCY.load(Ordering::Relaxed) {
        add_dependency(format!("soak:{id}"));
    }
    let mut db = DB.get().ok_or("no database")?.clone();
    let v: Option<u64> = redis::cmd("GET")
        .arg(format!("db:s:{id}"))
        .query_async(&mut db)
        .await
        .map_err(|e| e.to_string())?;
    Ok(v.unwrap_or(0))
}

/// The same version through a nested cached call.
#[cached(name = "inst.soak_view", ttl = "5s")]
async fn soak_view(id: u64) -> Result<u64, String> {
    soak_row(id).await
}

/// With source faults (`CACHE_INSTANCE_SOURCE_FAULTS=1`): the soak reads these, with
/// fail-safe and a soft timeout, from a database that fails while `db:fail` exists
/// and answers in 400 ms while `db:stall` does.
static SOURCE_FAULTS: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
/// The bodies run (the database's reads).
static SOURCE_CALLS: AtomicU64 = AtomicU64::new(0);

/// What a failing database answers.
const SOURCE_DOWN: &str = "source down";

#[cached(
    name = "inst.soak_row_fs",
    ttl = "2s",
    fail_safe = "1h",
    fail_safe_throttle = "1s",
    soft_timeout = "100ms"
)]
async fn soak_row_fs(id: u64) -> Result<u64, String> {
    SOURCE_CALLS.fetch_add(1, Ordering::Relaxed);
    if ROW_DEPENDENCY.load(Ordering::Relaxed) {
        add_dependency(format!("soak:{id}"));
    }
    let mut db = DB.get().ok_or("no database")?.clone();
    let (v, failing, stalling): (Option<u64>, bool, bool) = redis::pipe()
        .cmd("GET")
        .arg(format!("db:s:{id}"))
        .cmd("EXISTS")
        .arg("db:fail")
        .cmd("EXISTS")
        .arg("db:stall")
        .query_async(&mut db)
        .await
        .map_err(|e| e.to_string())?;
    if stalling {
        tokio::time::sleep(Duration::from_millis(400)).await;
    }
    if failing {
        return Err(SOURCE_DOWN.into());
    }
    Ok(v.unwrap_or(0))
}

#[cached(
    name = "inst.soak_view_fs",
    ttl = "5s",
    fail_safe = "1h",
    fail_safe_throttle = "1s"
)]
async fn soak_view_fs(id: u64) -> Result<u64, String> {
    soak_row_fs(id).await
}

/// A read of the soak's load: a row, or a view of it (`view`).
async fn soak_read(id: u64, view: bool) -> Result<u64, String> {
    match (SOURCE_FAULTS.load(Ordering::Relaxed), view) {
        (false, false) => soak_row(id).await,
        (false, true) => soak_view(id).await,
        (true, false) => soak_row_fs(id).await,
        (true, true) => soak_view_fs(id).await,
    }
}

/// Invalidates a row by key.
async fn soak_invalidate(id: u64) {
    match SOURCE_FAULTS.load(Ordering::Relaxed) {
        false => cache_runtime::invalidate!(soak_row(id)).await,
        true => cache_runtime::invalidate!(soak_row_fs(id)).await,
    }
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// The soak's load for `seconds`, over 400 rows: 90% reads (of a row, or of a view
/// through a nested call), 10% writes that bump a row's version in the database,
/// invalidate it (by key or by dependency) and record when the invalidation returned
/// (`db:st:{row}`, version -> unix ms). Every fourth read also checks the database: a
/// read that returned a version older than one committed, by any instance, before the
/// read began is stale by the time since that commit. A read older than a version this
/// instance committed before the read began is a wrong value. Prints a progress line
/// every second and returns the result as JSON.
async fn soak(seconds: Duration, seed: u64) -> String {
    const ROWS: u64 = 400;
    let mut next = xorshift(seed);
    let mut committed = vec![0u64; ROWS as usize];
    let (mut calls, mut failed, mut wrong, mut writes) = (0u64, 0u64, 0u64, 0u64);
    let mut latencies: Vec<u32> = Vec::new();
    let mut stale: Vec<(u64, u64)> = Vec::new();
    let mut db = DB.get().expect("database").clone();
    let source_faults = SOURCE_FAULTS.load(Ordering::Relaxed);
    let (mut source_errors, mut fallbacks_after_invalidation) = (0u64, 0u64);
    let end = Instant::now() + seconds;
    let mut progress = Instant::now() + Duration::from_secs(1);
    while Instant::now() < end {
        if Instant::now() >= progress {
            println!("progress calls={calls} failed={failed} wrong={wrong}");
            progress += Duration::from_secs(1);
        }
        let r = next();
        let id = (r >> 8) % ROWS;
        if r % 10 == 0 {
            let v: Result<u64, _> = redis::cmd("INCR")
                .arg(format!("db:s:{id}"))
                .query_async(&mut db)
                .await;
            let Ok(v) = v else {
                failed += 1;
                continue;
            };
            let start = Instant::now();
            // (by key only when rows depend on nothing: the `-plain` modes)
            if (r >> 4) % 2 == 0 || !ROW_DEPENDENCY.load(Ordering::Relaxed) {
                soak_invalidate(id).await;
            } else {
                cache_runtime::invalidate_dependency(format!("soak:{id}")).await;
            }
            latencies.push(start.elapsed().as_micros().min(u32::MAX as u128) as u32);
            let _: Result<(), _> = redis::cmd("HSET")
                .arg(format!("db:st:{id}"))
                .arg(v)
                .arg(now_ms())
                .query_async(&mut db)
                .await;
            committed[id as usize] = v;
            writes += 1;
            calls += 1;
            continue;
        }
        let before = committed[id as usize];
        let began = now_ms();
        let start = Instant::now();
        let fallbacks = match source_faults {
            true => cache_runtime::stats().total.fallbacks_served,
            false => 0,
        };
        let read = soak_read(id, (r >> 4) % 3 == 0).await;
        latencies.push(start.elapsed().as_micros().min(u32::MAX as u128) as u32);
        calls += 1;
        let u = match read {
            Ok(u) => u,
            // the database is down and there is no fallback: its answer
            Err(e) if e == SOURCE_DOWN => {
                source_errors += 1;
                continue;
            }
            Err(_) => {
                failed += 1;
                continue;
            }
        };
        if u < before {
            wrong += 1;
            if source_faults && cache_runtime::stats().total.fallbacks_served > fallbacks {
                // a fallback this instance had invalidated
                fallbacks_after_invalidation += 1;
            }
            if std::env::var_os("CACHE_INSTANCE_DEBUG").is_some() {
                eprintln!(
                    "wrong: {} of {id}: {u} < {before} at {} ms; {:?}",
                    if (r >> 4) % 3 == 0 { "view" } else { "row" },
                    now_ms() % 100_000,
                    cache_runtime::stats().remote
                );
            }
        }
        if (r >> 12) % 4 == 0 {
            let latest: Option<u64> = redis::cmd("GET")
                .arg(format!("db:s:{id}"))
                .query_async(&mut db)
                .await
                .unwrap_or(None);
            if latest.unwrap_or(0) > u {
                let at: Option<u64> = redis::cmd("HGET")
                    .arg(format!("db:st:{id}"))
                    .arg(u + 1)
                    .query_async(&mut db)
                    .await
                    .unwrap_or(None);
                if let Some(at) = at.filter(|at| *at < began) {
                    stale.push((began, began - at));
                }
            }
        }
    }
    latencies.sort_unstable();
    let pct = |p: f64| {
        latencies
            .get(((latencies.len() as f64 - 1.0) * p).round() as usize)
            .copied()
            .unwrap_or(0)
    };
    let stats = cache_runtime::stats();
    let result = serde_json::json!({
        "calls": calls,
        "failed_calls": failed,
        "wrong_values": wrong,
        "writes": writes,
        "latency_p50_us": pct(0.5),
        "latency_p99_us": pct(0.99),
        "l1_clears": stats.sync.l1_clears,
        "l2_hits": stats.total.l2_hits,
        "writes_dropped": METRICS.get().map_or(0, |m| m.dropped()),
        "fallbacks_served": stats.total.fallbacks_served,
        "fallbacks_after_invalidation": fallbacks_after_invalidation,
        "source_calls": SOURCE_CALLS.load(Ordering::Relaxed),
        "source_errors": source_errors,
        "stale": stale,
    });
    format!("result {result}")
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    // `CACHE_INSTANCE_LOG=cache_redis=debug` shows the backend's log on stderr
    if let Ok(filter) = std::env::var("CACHE_INSTANCE_LOG") {
        tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
            .with_writer(std::io::stderr)
            .init();
    }
    let args: Vec<String> = std::env::args().collect();
    let [_, mode, cache_url, db_url] = &args[..] else {
        panic!("usage: cache_instance l1|redis|sync <cache redis url> <database redis url>");
    };
    let db = redis::Client::open(db_url.as_str()).expect("database url");
    DB.set(
        db.get_multiplexed_async_connection()
            .await
            .expect("database"),
    )
    .ok();
    SOURCE_FAULTS.store(
        std::env::var_os("CACHE_INSTANCE_SOURCE_FAULTS").is_some(),
        Ordering::Relaxed,
    );
    let builder = CachingService::builder();
    // `l1-plain`: `l1` with rows that depend on nothing, so that they are stored in
    // Redis without the graph
    let mode = match mode.strip_suffix("-plain") {
        Some(mode) => {
            ROW_DEPENDENCY.store(false, Ordering::Relaxed);
            mode.to_owned()
        }
        None => mode.clone(),
    };
    let builder = match mode.as_str() {
        "l1" | "redis" | "deps" => {
            let mut backend = RedisBackend::builder(cache_url.as_str())
                .key_prefix("inst")
                .dependencies(mode == "deps")
                // `CACHE_INSTANCE_EAGER=1`: connected before `ready`
                .connect_lazily(std::env::var_os("CACHE_INSTANCE_EAGER").is_none());
            if mode != "redis" {
                backend = backend.l1(MemoryBackend::new().max_entries(100_000));
            }
            // `CACHE_INSTANCE_SINGLE_FLIGHT=1`: one body per key across instances
            if std::env::var_os("CACHE_INSTANCE_SINGLE_FLIGHT").is_some() {
                backend = backend.distributed_single_flight(true);
            }
            if let Some(n) = std::env::var("CACHE_INSTANCE_L1_ENTRIES")
                .ok()
                .and_then(|n| n.parse().ok())
            {
                if mode != "redis" {
                    backend = backend.l1(MemoryBackend::new().max_entries(n));
                }
            }
            let backend = backend.build().await.expect("cache redis");
            METRICS.set(backend.metrics()).ok();
            builder.backend(backend)
        }
        "sync" => builder.backend(MemoryBackend::new()).sync(
            RedisSync::builder(cache_url.as_str())
                .channel_prefix("inst")
                .build()
                .await
                .expect("cache redis"),
        ),
        other => panic!("unknown mode {other}"),
    };
    let lock_timeout = std::env::var("CACHE_INSTANCE_LOCK_TIMEOUT_MS")
        .ok()
        .and_then(|ms| ms.parse().ok())
        .map_or(Duration::from_secs(30), Duration::from_millis);
    let builder = builder.profile(cache_runtime::Profile::new("sf").lock_timeout(lock_timeout));
    builder.install().expect("install");
    println!("ready");

    let mut lines = tokio::io::BufReader::new(tokio::io::stdin()).lines();
    while let Ok(Some(line)) = lines.next_line().await {
        let words: Vec<&str> = line.split_whitespace().collect();
        let num = |i: usize| -> u64 { words[i].parse().expect("a number") };
        let answer = match words.first().copied() {
            Some("get") => row(num(1)).await,
            Some("oget") => outer(num(1)).await,
            Some("set") => {
                write_row(num(1), words[2].to_owned()).await;
                "ok".into()
            }
            Some("sf") => {
                let v = sf_row(num(1), num(2)).await;
                v.unwrap_or_else(|_| "err".into())
            }
            Some("sft") => {
                let v = sft_row(num(1), num(2)).await;
                v.unwrap_or_else(|_| "err".into())
            }
            Some("sfinv") => {
                cache_runtime::invalidate!(sf_row(num(1), num(2))).await;
                "ok".into()
            }
            Some("sfe") => {
                let v = sfe_row(num(1), num(2)).await;
                v.unwrap_or_else(|_| "err".into())
            }
            Some("stampede") => stampede(num(1), num(2), num(3)).await,
            Some("fget") => fs_row(num(1)).await.unwrap_or_else(|_| "err".into()),
            Some("fset") => {
                write_fs_row(num(1), words[2].to_owned()).await;
                "ok".into()
            }
            Some("inv_range") => {
                for id in num(1)..num(2) {
                    cache_runtime::invalidate!(row(id)).await;
                }
                "ok".into()
            }
            Some("dep") => {
                cache_runtime::invalidate_dependency(words[1]).await;
                "ok".into()
            }
            Some("clear") => {
                CachingService::clear().await;
                "ok".into()
            }
            Some("peek") => cache_runtime::peek!(row(num(1)))
                .await
                .unwrap_or_else(|| "-".into()),
            Some("wait_drop") => {
                let (id, limit) = (num(1), Duration::from_millis(num(2)));
                let start = Instant::now();
                loop {
                    if cache_runtime::peek!(row(id)).await.is_none() {
                        break start.elapsed().as_micros().to_string();
                    }
                    if start.elapsed() > limit {
                        break "timeout".into();
                    }
                    tokio::time::sleep(Duration::from_micros(50)).await;
                }
            }
            Some("wait_value") => {
                let (id, limit) = (num(1), Duration::from_millis(num(3)));
                let start = Instant::now();
                loop {
                    if row(id).await == words[2] {
                        break start.elapsed().as_millis().to_string();
                    }
                    if start.elapsed() > limit {
                        break "timeout".into();
                    }
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            }
            Some("flush") => {
                cache_runtime::shutdown().await;
                "ok".into()
            }
            Some("random") => random(Duration::from_secs(num(1)), num(2)).await,
            Some("soak") => soak(Duration::from_secs(num(1)), num(2)).await,
            Some("stats") => {
                let stats = cache_runtime::stats();
                let (s, r) = (stats.sync, stats.remote);
                format!(
                    "runs={} fallbacks={} received={} published={} l1_clears={} l1_bypassed={} publish_errors={} write_errors={} linked_write_errors={} removal_errors={} removals_retried={} removals_waiting={} reads_held={} topology_changes={} invalidations_replayed={} redirections={}",
                    RUNS.load(Ordering::SeqCst),
                    stats.total.fallbacks_served,
                    s.received,
                    s.published,
                    s.l1_clears,
                    u8::from(s.l1_bypassed),
                    s.publish_errors,
                    r.write_errors,
                    r.linked_write_errors,
                    r.removal_errors,
                    r.removals_retried,
                    r.removals_waiting,
                    r.reads_held,
                    r.topology_changes,
                    r.invalidations_replayed,
                    r.redirections,
                )
            }
            Some("quit") | None => break,
            Some(other) => format!("unknown command {other}"),
        };
        println!("{answer}");
    }
    cache_runtime::shutdown().await;
}
