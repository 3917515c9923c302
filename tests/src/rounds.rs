//! The invalidating instance's rounds, against one server or a cluster: thousands of
//! rounds of a read (a miss whose write is queued), a change of the source, an
//! invalidation (or a `refresh!`) and a read again; then what Redis holds.

use std::collections::HashMap;
use std::sync::Mutex;

use cache_redis::RedisBackend;
use cache_runtime::{cached, CachingService, MemoryBackend};

static DB: Mutex<Option<HashMap<u64, u64>>> = Mutex::new(None);

fn db_set(id: u64, v: u64) {
    DB.lock()
        .unwrap()
        .get_or_insert_with(HashMap::new)
        .insert(id, v);
}

fn db_get(id: u64) -> u64 {
    DB.lock()
        .unwrap()
        .as_ref()
        .and_then(|m| m.get(&id).copied())
        .unwrap_or(0)
}

#[cached(name = "w.row")]
async fn row(id: u64) -> u64 {
    db_get(id)
}

/// A row that depends on `w:{id}` (for a backend with `dependencies(true)`).
#[cached(name = "w.row_dep")]
async fn row_dep(id: u64) -> u64 {
    cache_runtime::add_dependency(format!("w:{id}"));
    db_get(id)
}

/// One round on row `$i` through the cached function `$row`.
macro_rules! round {
    ($row:ident, $i:expr, $stale:expr) => {{
        let i = $i;
        db_set(i, 1);
        assert_eq!($row(i).await, 1); // a miss: the write of 1 is queued
        db_set(i, 2);
        cache_runtime::invalidate!($row(i)).await;
        if $row(i).await != 2 {
            $stale.after_invalidation += 1;
        }
        db_set(i, 3);
        cache_runtime::refresh!($row(i)).await;
        if $row(i).await != 3 {
            $stale.after_refresh += 1;
        }
    }};
}

/// What the rounds found: reads of the old value right after an invalidation, right
/// after a refresh, and old values left in Redis. All three must be 0.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Stale {
    /// Reads after `invalidate!` that returned the old value.
    pub after_invalidation: u64,
    /// Reads after `refresh!` that returned the old value.
    pub after_refresh: u64,
    /// Entries left in Redis with an old value.
    pub in_redis: u64,
}

/// Runs `n` rounds on ids `base..base + n` with a backend on `url` (a cluster's node
/// if `cluster`) under `prefix`, with or without an L1; `each(i)` runs before round
/// `i` (to inject a fault).
pub async fn rounds(
    url: &str,
    cluster: bool,
    prefix: &str,
    l1: bool,
    range: (u64, u64),
    each: impl FnMut(u64),
) -> Stale {
    rounds_with(url, cluster, prefix, (l1, false), range, each).await
}

/// [`rounds`] with `(l1, deps)`: with `deps`, the backend keeps the dependency graph
/// (`dependencies(true)`) and each row depends on `w:{id}`.
pub async fn rounds_with(
    url: &str,
    cluster: bool,
    prefix: &str,
    (l1, deps): (bool, bool),
    (base, n): (u64, u64),
    mut each: impl FnMut(u64),
) -> Stale {
    let mut b = RedisBackend::builder(url)
        .key_prefix(prefix)
        .dependencies(deps);
    if l1 {
        b = b.l1(MemoryBackend::new().max_entries(100_000));
    }
    let svc = CachingService::builder()
        .backend(b.build().await.unwrap())
        .build()
        .unwrap();
    let mut stale = Stale::default();
    svc.scope(async {
        for i in base..base + n {
            each(i);
            match deps {
                true => round!(row_dep, i, stale),
                false => round!(row, i, stale),
            }
        }
    })
    .await;
    assert!(!svc.shutdown().await.timed_out);
    let remote = svc.stats().remote;
    assert_eq!((remote.write_errors, remote.removal_errors), (0, 0));
    let keys: Vec<String> = (base..base + n)
        .map(|i| match deps {
            true => format!("{prefix}:2:w.row_dep:v1({i})"),
            false => format!("{prefix}:2:w.row:v1({i})"),
        })
        .collect();
    let (old, current) = if cluster {
        let client = redis::cluster::ClusterClient::new(vec![url]).unwrap();
        old_values(&mut client.get_async_connection().await.unwrap(), &keys).await
    } else {
        let client = redis::Client::open(url).unwrap();
        old_values(
            &mut client.get_multiplexed_async_connection().await.unwrap(),
            &keys,
        )
        .await
    };
    // the rows went through Redis (a row kept in-process only would prove nothing)
    assert!(current > n / 2, "only {current} of {n} rows are in Redis");
    stale.in_redis = old;
    stale
}

/// How many of `keys` hold a value other than 3, and how many hold 3.
async fn old_values(con: &mut impl redis::aio::ConnectionLike, keys: &[String]) -> (u64, u64) {
    let (mut old, mut current) = (0, 0);
    for key in keys {
        let bytes: Option<Vec<u8>> = redis::cmd("GET").arg(key).query_async(con).await.unwrap();
        // a tombstone (the graph on a cluster) starts with a zero byte
        if let Some(bytes) = bytes.filter(|b| b.first() != Some(&0)) {
            let (v, _, _): (u64, u64, Vec<String>) =
                cache_runtime::__private::decode(&bytes).unwrap();
            old += u64::from(v != 3);
            current += u64::from(v == 3);
        }
    }
    (old, current)
}
