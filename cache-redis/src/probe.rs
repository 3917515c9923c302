//! What `build()` checks before it returns: that the server lets this user run every
//! command the configuration needs, each once, on a probe key of the prefix.
//!
//! A Redis user may lack a permission (ACLs are common on managed Redis), or the URL
//! may point at a read-only replica. Without the check, such a backend builds and then
//! fails on every write or removal; the service copes (nothing stale is served, see
//! `cache_runtime`'s holds), but the cache does nothing useful. The probe runs the
//! commands themselves rather than `ACL DRYRUN`, which most users may not run, and so
//! that a script is checked with the commands it runs inside.

use std::hash::BuildHasher;
use std::time::Duration;

use redis::RedisError;

use crate::graph::{GraphKeys, ScriptCall};

/// What the probe found wrong.
#[derive(Debug)]
pub(crate) enum Problem {
    /// The server refused a command the configuration needs.
    Refused {
        /// The command, as sent (`SET`, `EVALSHA`, ...).
        command: &'static str,
        /// What needs it.
        feature: String,
        /// The server's words.
        words: String,
        /// How to fix it.
        fix: String,
    },
    /// The connection failed.
    Connection(RedisError),
}

/// What the configuration needs.
pub(crate) struct Needs<'a> {
    /// `{prefix}:{format}:`, for a backend that stores values (`None`: `RedisSync`).
    pub(crate) values: Option<&'a str>,
    /// The user name in the URL (`default` without one).
    pub(crate) user: &'a str,
    pub(crate) key_prefix: &'a str,
    pub(crate) channel: &'a str,
    /// An L1 subscribes to the channel (checked by the subscriber itself; the probe
    /// checks the `PING` it sends on that connection).
    pub(crate) subscriber: bool,
    /// `distributed_single_flight(true)`: the read with the key's lock, the release.
    pub(crate) single_flight: bool,
    pub(crate) graph: Option<&'a GraphKeys>,
}

/// An invalidation message that names nothing, which receivers ignore: what the probe
/// publishes.
pub(crate) fn probe_message() -> Vec<u8> {
    cache_runtime::Message {
        sender: 0,
        items: Vec::new(),
    }
    .encode()
}

/// Runs each command the configuration needs once. Server errors that are not about
/// permissions (out of memory) are logged and left to run time.
pub(crate) async fn probe(
    con: &mut (impl redis::aio::ConnectionLike + Send),
    needs: &Needs<'_>,
) -> Result<(), Problem> {
    let id = format!(
        "cache-rs.probe:{:016x}",
        std::collections::hash_map::RandomState::new().hash_one(std::process::id())
    );
    let key = format!("{}{id}", needs.values.unwrap_or_default());
    let user = needs.user;
    let keys = format!("~{}:*", needs.key_prefix);
    let grant = |perm: &str| format!("grant it: `ACL SETUSER {user} {perm} {keys}`");
    let mut set_result = Ok(());
    if needs.values.is_some() {
        let writes = "storing values in Redis (every miss writes one)";
        let mut set = redis::cmd("SET");
        set.arg(&key).arg("probe").arg("PX").arg(10_000);
        set_result = run(con, &set, "SET", writes, grant("+set")).await;
        let reads = "reading values from Redis";
        run(
            con,
            redis::cmd("GET").arg(&key),
            "GET",
            reads,
            grant("+get"),
        )
        .await?;
        let removals = "removing invalidated entries from Redis";
        run(
            con,
            redis::cmd("DEL").arg(&key),
            "DEL",
            removals,
            grant("+del"),
        )
        .await?;
    }
    if let (true, Some(values)) = (needs.single_flight, needs.values) {
        let feature = "distributed single flight (`.distributed_single_flight(true)`): a miss's read takes the key's lock, as a script";
        let fix = format!(
            "grant the scripts and the commands they run: `ACL SETUSER {user} +eval +evalsha +get +set +append +del +pexpire +publish {keys} &{}`",
            needs.channel
        );
        let locks = crate::single_flight::Locks::new(needs.key_prefix, values, needs.channel);
        // (with the value's slot, as on a cluster)
        let lock_key = locks.key_of(&id, true);
        let token = locks.token();
        let mut read = ScriptCall {
            script: crate::single_flight::READ.clone(),
            args: redis::Cmd::new(),
        };
        read.arg(2)
            .arg(&key)
            .arg(&lock_key)
            .arg(&token)
            .arg(10_000)
            .arg(0)
            .arg(0);
        let lock = locks.hold(lock_key.clone(), token, &id);
        let unlock = locks.release(lock, true);
        let mut steps = vec![read.clone(), read];
        steps.extend(unlock);
        // the second read finds the lock held (and marks a waiter), so the release
        // publishes
        let mut result = Ok(());
        for step in steps {
            result = script(con, step, feature, &fix).await;
            if result.is_err() {
                break;
            }
        }
        // (a refusal half-way leaves the lock)
        let _: redis::RedisResult<()> = redis::cmd("DEL").arg(&lock_key).query_async(con).await;
        result?;
    }
    let channel = needs.channel;
    run(
        con,
        redis::cmd("PUBLISH").arg(channel).arg(probe_message()),
        "PUBLISH",
        &format!("telling the other instances about invalidations (channel `{channel}`)"),
        format!("grant it: `ACL SETUSER {user} +publish &{channel}`"),
    )
    .await?;
    if needs.subscriber {
        run(
            con,
            &redis::cmd("PING"),
            "PING",
            "checking the subscription to the other instances' invalidations",
            format!("grant it: `ACL SETUSER {user} +ping`"),
        )
        .await?;
    }
    if let Some(graph) = needs.graph {
        let feature = "the dependency graph (`.dependencies(true)`): values are written with their links, and invalidations run, as scripts";
        let scripts = format!(
            "grant the scripts and the commands they run: `ACL SETUSER {user} +eval +evalsha +@read +@write {keys}`"
        );
        let epoch = format!("{}epoch", graph.g());
        let cluster = graph.on_cluster();
        let remote_epoch: Option<u64> = match cluster {
            // on a cluster, the value and the count are on different slots
            true => query(
                con,
                redis::cmd("GET").arg(&epoch),
                "GET",
                "reading the invalidation count (`.dependencies(true)`)",
                grant("+get"),
            )
            .await?
            .flatten(),
            false => {
                let (_, remote_epoch): (Option<Vec<u8>>, Option<u64>) = query(
                    con,
                    redis::cmd("MGET").arg(&key).arg(&epoch),
                    "MGET",
                    "reading values with the invalidation count (`.dependencies(true)`)",
                    grant("+mget"),
                )
                .await?
                .unwrap_or_default();
                remote_epoch
            }
        };
        let dependency = format!("d:{id}");
        let linked = cache_runtime::LinkedWrite {
            key: id.clone(),
            value: b"probe".to_vec(),
            ttl: Duration::from_secs(10),
            links: vec![dependency.clone()],
            cascades: Vec::new(),
            remote_epoch: remote_epoch.unwrap_or(0),
        };
        script(con, graph.write(&linked), feature, &scripts).await?;
        let start = std::slice::from_ref(&dependency);
        if cluster {
            // the steps of an invalidation on a cluster (see `crate::tombstones`);
            // reservations it takes over are buried and released with its own
            let mut put = graph.put(&linked);
            put.arg(u64::MAX);
            script(con, put, feature, &scripts).await?;
            let walk = graph.walk(start, None, "probe", "");
            // (the keys of other walks in flight, last, are theirs to bury)
            type Walked = (u64, Vec<String>, Vec<u64>, Vec<String>);
            let (count, keys, adopted, _): Walked = match walk.run(con).await {
                Ok(reply) => reply,
                Err(e) => return judge(Err(e), "EVALSHA", feature, scripts.clone()),
            };
            for key in &keys {
                script(con, graph.bury(key, count), feature, &scripts).await?;
            }
            let counts: Vec<u64> = std::iter::once(count).chain(adopted).collect();
            script(con, graph.release(&counts), feature, &scripts).await?;
        } else {
            let invalidate = graph.invalidate(start, None, false, None);
            script(con, invalidate, feature, &scripts).await?;
        }
        // the invalidation's marker of the probe's dependency is of no use to anyone
        let _: redis::RedisResult<()> = redis::pipe()
            .cmd("HDEL")
            .arg(format!("{}marks", graph.g()))
            .arg(&dependency)
            .ignore()
            .cmd("ZREM")
            .arg(format!("{}marked", graph.g()))
            .arg(&dependency)
            .ignore()
            .query_async(con)
            .await;
        let (eval, text) = graph.touch().head(false);
        let mut touch = redis::cmd(eval);
        match cluster {
            true => touch.arg(text).arg(1).arg(&key).arg(10_000),
            false => touch.arg(text).arg(2).arg(&key).arg(&epoch).arg(10_000),
        };
        run(
            con,
            &touch,
            "EVAL",
            "reading sliding entries with the invalidation count (`.dependencies(true)`)",
            scripts.clone(),
        )
        .await?;
        if cluster {
            let _: redis::RedisResult<()> = redis::cmd("DEL").arg(&key).query_async(con).await;
        }
    }
    // A refused `SET` is reported after the rest: the removals matter more, and a
    // full server (out of memory) is only a warning.
    set_result
}

/// Runs a graph script the way the writer does (by hash, then with its text).
async fn script(
    con: &mut (impl redis::aio::ConnectionLike + Send),
    call: ScriptCall,
    feature: &str,
    fix: &str,
) -> Result<(), Problem> {
    let result: redis::RedisResult<redis::Value> = call.run(con).await;
    let command = match &result {
        // `run` sends `EVAL` after a `NOSCRIPT`; a refused `EVALSHA` never gets there
        Err(e) if e.code() == Some("NOPERM") && mentions(e, "evalsha") => "EVALSHA",
        Err(e) if e.code() == Some("NOPERM") => "EVAL",
        // the server does not say which
        _ if crate::single_flight::owns(&call.script) => {
            "a command the single flight's scripts run"
        }
        _ => "a command the graph's scripts run",
    };
    judge(result.map(|_| ()), command, feature, fix.to_owned())
}

async fn run(
    con: &mut (impl redis::aio::ConnectionLike + Send),
    cmd: &redis::Cmd,
    command: &'static str,
    feature: &str,
    fix: String,
) -> Result<(), Problem> {
    query::<redis::Value>(con, cmd, command, feature, fix)
        .await
        .map(|_| ())
}

/// Sends `cmd`; `Ok(None)` for a server error that is only worth a warning.
async fn query<T: redis::FromRedisValue>(
    con: &mut (impl redis::aio::ConnectionLike + Send),
    cmd: &redis::Cmd,
    command: &'static str,
    feature: &str,
    fix: String,
) -> Result<Option<T>, Problem> {
    match cmd.query_async::<T>(con).await {
        Ok(v) => Ok(Some(v)),
        Err(e) => judge(Err(e), command, feature, fix).map(|()| None),
    }
}

fn mentions(e: &RedisError, what: &str) -> bool {
    e.to_string().to_ascii_lowercase().contains(what)
}

/// A permission error or a read-only server is a problem; a connection error too;
/// another server error (out of memory) is logged and left to run time.
fn judge(
    result: redis::RedisResult<()>,
    command: &'static str,
    feature: &str,
    fix: String,
) -> Result<(), Problem> {
    let Err(e) = result else { return Ok(()) };
    if e.is_io_error() || e.is_timeout() || e.is_connection_dropped() {
        return Err(Problem::Connection(e));
    }
    let words = crate::endpoint::words(&e);
    let refused = |fix: String| Problem::Refused {
        command,
        feature: feature.to_owned(),
        words: words.clone(),
        fix,
    };
    let denied = [
        "NOPERM",
        "no permissions",
        "can't run this command",
        "can't access",
    ];
    if e.code() == Some("NOPERM") || denied.iter().any(|d| words.contains(d)) {
        return Err(refused(fix));
    }
    if e.code() == Some("READONLY") || words.contains("READONLY") {
        return Err(refused(
            "this server is a read-only replica: point the URL at the primary".to_owned(),
        ));
    }
    tracing::warn!(target: "cache_redis", "Redis refused {command} ({words}), which {feature} needs; going on, the cache copes while it is refused");
    Ok(())
}

/// A client error as the log says it: a refusal names the server's words.
pub(crate) fn describe(e: &RedisError) -> String {
    if e.code() == Some("NOPERM") {
        format!("Redis refused it ({})", crate::endpoint::words(e))
    } else {
        e.to_string()
    }
}
