//! The server settings the backend, the graph and the collector need, checked in one
//! place at `build()` and at the collector's `start()`.

/// Checks the server settings: without the graph (`graph == false`), only warns
/// about `noeviction`; with it, checks what the graph and its collector need; `Err` says what is
/// wrong and which `CONFIG SET` fixes it. A server that refuses `CONFIG GET`
/// (managed services often do) is accepted with a warning.
pub(crate) async fn check(
    con: &mut (impl redis::aio::ConnectionLike + Send),
    graph: bool,
) -> Result<(), String> {
    let get = |name: &'static str| {
        let mut cmd = redis::cmd("CONFIG");
        cmd.arg("GET").arg(name);
        cmd
    };
    let policy: Result<Vec<String>, _> = get("maxmemory-policy").query_async(con).await;
    let events: Result<Vec<String>, _> = get("notify-keyspace-events").query_async(con).await;
    if !graph {
        if let Ok(policy) = policy {
            if policy.get(1).is_some_and(|p| p == "noeviction") {
                tracing::warn!(target: "cache_redis", "Redis uses `maxmemory-policy noeviction`: once full it refuses writes. Set `maxmemory-policy volatile-lru` (cache entries always carry an expiry)");
            }
        }
        return Ok(());
    }
    let (Ok(policy), Ok(events)) = (policy, events) else {
        tracing::warn!(target: "cache_redis", "CONFIG GET is not allowed on this server: make sure it runs with `maxmemory-policy volatile-lru` and `notify-keyspace-events Exe`, which the dependency graph and its collector need");
        return Ok(());
    };
    let policy = policy.get(1).map(String::as_str).unwrap_or("");
    let events = events.get(1).map(String::as_str).unwrap_or("");
    match policy {
        "volatile-lru" | "volatile-random" => {}
        "noeviction" => tracing::warn!(target: "cache_redis", "Redis uses `maxmemory-policy noeviction`: once full it refuses writes (the graph stays whole). `CONFIG SET maxmemory-policy volatile-lru` evicts cache entries instead"),
        other => {
            return Err(format!(
                "Redis evicts with `maxmemory-policy {other}`, which can evict the dependency graph's keys (they have no expiry): run `CONFIG SET maxmemory-policy volatile-lru` (or volatile-random)"
            ))
        }
    }
    let has = |c: char| events.contains(c) || (events.contains('A') && "xe".contains(c));
    if !(events.contains('E') || events.contains('K')) || !has('x') {
        return Err(format!(
            "Redis sends no expiry events (`notify-keyspace-events` is `{events}`), which the dependency collector needs: run `CONFIG SET notify-keyspace-events Exe` (or add `Exe` to what is set)"
        ));
    }
    if !has('e') {
        tracing::warn!(target: "cache_redis", "Redis sends no eviction events (`notify-keyspace-events` is `{events}`): the links of evicted values stay until a full collection. `CONFIG SET notify-keyspace-events Exe` adds them");
    }
    Ok(())
}
