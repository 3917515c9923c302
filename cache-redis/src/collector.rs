//! The dependency collector: keeps the graph of `RedisBackend::dependencies(true)`
//! clean when values expire or are evicted, and the full collection that repairs a
//! whole prefix.

use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use cache_runtime::Backoff;
use futures_util::StreamExt;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::backend::{client, RedisBackendError};
use crate::bus::{PING_EVERY, PING_TIMEOUT};
use crate::graph::{glob_escape, GraphKeys};
use cache_runtime::RemoteError;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// Repairs the dependency graph of the prefix `key_prefix` on the server at `url`:
/// links without a value, entries whose links are incomplete, reverse-set members
/// whose value is gone, cascades nothing depends on. Scans in bounded batches;
/// idempotent; safe while instances and collectors run. Run it after every collector
/// was down for a while (a collector runs one itself when it starts and after it lost
/// its subscription).
///
/// ```no_run
/// # async fn run() -> Result<(), Box<dyn std::error::Error>> {
/// let report = cache_redis::full_collection("redis://127.0.0.1:6379/0", "shop").await?;
/// println!("removed {} orphans", report.removed());
/// # Ok(()) }
/// ```
pub async fn full_collection(
    url: &str,
    key_prefix: &str,
) -> Result<CollectionReport, RedisBackendError> {
    let client = client(url, None)?;
    let mut con = connect_graph(&client).await?;
    collect_all(&mut con, &GraphKeys::new(key_prefix, Duration::ZERO, None))
        .await
        .map_err(|e| RedisBackendError::Command(e.0))
}

fn client_addr(client: &redis::Client) -> String {
    client.get_connection_info().addr().to_string()
}

/// Connects for the graph's full collection or the collector's start, which need a
/// standalone server for now (see [`crate::backend`]'s `CLUSTER_GRAPH`).
async fn connect_graph(
    client: &redis::Client,
) -> Result<redis::aio::MultiplexedConnection, RedisBackendError> {
    let mut con = connect(client).await?;
    let info: String = redis::cmd("INFO")
        .arg("cluster")
        .query_async(&mut con)
        .await
        .map_err(|e| RedisBackendError::Command(e.to_string()))?;
    if info.lines().any(|l| l.trim() == "cluster_enabled:1") {
        return Err(RedisBackendError::Config(crate::backend::CLUSTER_GRAPH));
    }
    Ok(con)
}

async fn connect(
    client: &redis::Client,
) -> Result<redis::aio::MultiplexedConnection, RedisBackendError> {
    let config = redis::AsyncConnectionConfig::new()
        .set_connection_timeout(Some(CONNECT_TIMEOUT))
        .set_response_timeout(Some(Duration::from_secs(30)));
    client
        .get_multiplexed_async_connection_with_config(&config)
        .await
        .map_err(|source| RedisBackendError::Connect {
            addr: client.get_connection_info().addr().to_string(),
            source,
        })
}

/// Configures a [`DependencyCollector`].
#[must_use = "call `.start().await`"]
pub struct DependencyCollectorBuilder {
    url: String,
    key_prefix: String,
    root_certificate: Option<Vec<u8>>,
}

impl fmt::Debug for DependencyCollectorBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DependencyCollectorBuilder")
            .field("key_prefix", &self.key_prefix)
            .finish_non_exhaustive()
    }
}

impl DependencyCollectorBuilder {
    /// The prefix whose graph it keeps, as given to `RedisBackend::key_prefix`.
    /// Default: `cache`.
    pub fn key_prefix(mut self, prefix: impl Into<String>) -> Self {
        self.key_prefix = prefix.into();
        self
    }

    /// For `rediss://` URLs: trust this certificate (PEM).
    pub fn tls_root_certificate(mut self, pem: impl Into<Vec<u8>>) -> Self {
        self.root_certificate = Some(pem.into());
        self
    }

    /// Checks the server's settings, subscribes to expiry and eviction events, runs a
    /// full collection, and goes on in a task of its own until stopped.
    pub async fn start(self) -> Result<DependencyCollector, RedisBackendError> {
        let client = client(&self.url, self.root_certificate.as_deref())?;
        let addr = client.get_connection_info().addr().to_string();
        let mut con = connect_graph(&client).await?;
        crate::settings::check(&mut con, true)
            .await
            .map_err(|problem| RedisBackendError::ServerSettings { addr, problem })?;
        let counts = Arc::new(Counts::default());
        let (stop, stopped) = watch::channel(false);
        let (ready_tx, mut ready) = watch::channel(false);
        let worker = Worker {
            db: client.get_connection_info().redis_settings().db(),
            client,
            keys: GraphKeys::new(&self.key_prefix, Duration::ZERO, None),
            con,
            counts: counts.clone(),
        };
        // a refused subscription is a configuration error, said as such
        if let Err(e) = worker.subscribe().await {
            if e.code() == Some("NOPERM") {
                let db = worker.db;
                let user = crate::backend::user_of(&worker.client);
                return Err(RedisBackendError::Refused {
                    addr: client_addr(&worker.client),
                    command: "PSUBSCRIBE/SUBSCRIBE".into(),
                    feature: "the collector, which hears values expire and get evicted,".into(),
                    words: crate::probe::words(&e),
                    fix: format!(
                        "grant it: `ACL SETUSER {user} +psubscribe +subscribe &__keyspace@{db}__:* &__keyevent@{db}__:*`"
                    ),
                });
            }
        }
        let task = tokio::spawn(worker.run(stopped, ready_tx));
        let subscribed = tokio::time::timeout(CONNECT_TIMEOUT * 2, ready.wait_for(|r| *r)).await;
        if !matches!(subscribed, Ok(Ok(_))) {
            task.abort();
            return Err(RedisBackendError::Command(
                "the collector could not subscribe to keyspace notifications".into(),
            ));
        }
        Ok(DependencyCollector { task, stop, counts })
    }
}

#[derive(Default)]
struct Counts {
    collected: AtomicU64,
    full_collections: AtomicU64,
    repaired: AtomicU64,
    subscriptions_lost: AtomicU64,
}

/// Removes the links of values that expire or are evicted, from Redis's keyspace
/// notifications, for one key prefix. Several may run at once (each step re-checks
/// what it removes). After a lost subscription it resubscribes and runs a full
/// collection, since it may have missed notifications.
///
/// ```no_run
/// use cache_redis::DependencyCollector;
///
/// # async fn run() -> Result<(), Box<dyn std::error::Error>> {
/// let collector = DependencyCollector::builder("redis://127.0.0.1:6379/0")
///     .key_prefix("shop")
///     .start()
///     .await?;
/// /* ... */
/// collector.stop().await;
/// # Ok(()) }
/// ```
///
/// Also a binary: `cargo run -p cache-redis --bin cache-redis-gc -- --url ... --prefix ...`.
pub struct DependencyCollector {
    task: JoinHandle<()>,
    stop: watch::Sender<bool>,
    counts: Arc<Counts>,
}

impl fmt::Debug for DependencyCollector {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DependencyCollector")
            .field("collected", &self.collected())
            .field("full_collections", &self.full_collections())
            .finish_non_exhaustive()
    }
}

impl DependencyCollector {
    /// Starts configuring a collector for the server at `url`.
    pub fn builder(url: impl Into<String>) -> DependencyCollectorBuilder {
        DependencyCollectorBuilder {
            url: url.into(),
            key_prefix: "cache".into(),
            root_certificate: None,
        }
    }

    /// Entries whose links it removed after their value expired or was evicted.
    pub fn collected(&self) -> u64 {
        self.counts.collected.load(Ordering::Relaxed)
    }

    /// Full collections it ran (one at start, one after each lost subscription).
    pub fn full_collections(&self) -> u64 {
        self.counts.full_collections.load(Ordering::Relaxed)
    }

    /// Orphans its full collections removed.
    pub fn repaired(&self) -> u64 {
        self.counts.repaired.load(Ordering::Relaxed)
    }

    /// Times its subscription was lost.
    pub fn subscriptions_lost(&self) -> u64 {
        self.counts.subscriptions_lost.load(Ordering::Relaxed)
    }

    /// Stops it, after the step it is running.
    pub async fn stop(self) {
        let _ = self.stop.send(true);
        let _ = self.task.await;
    }
}

/// Resolves once the collector is told to stop.
async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await.map(|_| ());
}

struct Worker {
    client: redis::Client,
    db: i64,
    keys: GraphKeys,
    con: redis::aio::MultiplexedConnection,
    counts: Arc<Counts>,
}

impl Worker {
    async fn run(mut self, mut stop: watch::Receiver<bool>, ready: watch::Sender<bool>) {
        let mut backoff = Backoff::RECONNECT;
        let mut first = true;
        loop {
            let subscribed = tokio::select! {
                s = self.subscribe() => s,
                _ = stopped(&mut stop) => return,
            };
            match subscribed {
                Ok((mut sink, mut stream)) => {
                    backoff.reset();
                    if !std::mem::take(&mut first) {
                        // the command connection went down with the subscription
                        match connect(&self.client).await {
                            Ok(con) => self.con = con,
                            Err(_) => continue,
                        }
                    }
                    ready.send_replace(true);
                    // whatever expired while it was not listening
                    self.full_collection().await;
                    let mut ping = tokio::time::interval(PING_EVERY);
                    ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                    loop {
                        tokio::select! {
                            _ = stopped(&mut stop) => return,
                            msg = stream.next() => match msg {
                                Some(msg) => self.on_event(&msg).await,
                                None => break,
                            },
                            _ = ping.tick() => {
                                let alive = tokio::time::timeout(PING_TIMEOUT, sink.ping::<redis::Value>()).await;
                                if !matches!(alive, Ok(Ok(_))) {
                                    break;
                                }
                            }
                        }
                    }
                    self.counts
                        .subscriptions_lost
                        .fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(target: "cache_redis", "dependency collector: subscription lost; resubscribing, then a full collection");
                }
                Err(e) => {
                    tracing::debug!(target: "cache_redis", error = %e, "dependency collector: subscribing failed");
                }
            }
            tokio::select! {
                _ = backoff.wait() => {}
                _ = stopped(&mut stop) => return,
            }
        }
    }

    async fn subscribe(
        &self,
    ) -> Result<(redis::aio::PubSubSink, redis::aio::PubSubStream), redis::RedisError> {
        tokio::time::timeout(CONNECT_TIMEOUT, async {
            let (mut sink, stream) = self.client.get_async_pubsub().await?.split();
            let db = self.db;
            // keyspace events of the value keys (`K`), and key events (`E`)
            sink.psubscribe(format!(
                "__keyspace@{db}__:{}*",
                glob_escape(&self.keys.values)
            ))
            .await?;
            sink.subscribe(&[
                format!("__keyevent@{db}__:expired"),
                format!("__keyevent@{db}__:evicted"),
            ])
            .await?;
            Ok((sink, stream))
        })
        .await
        .map_err(|_| redis::RedisError::from((redis::ErrorKind::Io, "subscribing timed out")))?
    }

    /// A value key expired or was evicted: its links go, unless it was set again.
    async fn on_event(&mut self, msg: &redis::Msg) {
        let channel = msg.get_channel_name();
        let payload: String = msg.get_payload().unwrap_or_default();
        let key = if let Some(rest) = channel.strip_prefix("__keyspace@") {
            if payload != "expired" && payload != "evicted" {
                return;
            }
            match rest.split_once("__:") {
                Some((_, key)) => key.to_owned(),
                None => return,
            }
        } else {
            payload
        };
        if !key.starts_with(self.keys.values.as_str()) {
            return;
        }
        let entry = &key;
        match self.keys.collect(entry).run::<i64>(&mut self.con).await {
            Ok(1) => {
                self.counts.collected.fetch_add(1, Ordering::Relaxed);
            }
            Ok(_) => {}
            Err(e) => {
                tracing::warn!(target: "cache_redis", error = %e, "dependency collector: collecting `{entry}` failed (the next full collection repairs it)");
            }
        }
    }

    async fn full_collection(&mut self) {
        match collect_all(&mut self.con, &self.keys).await {
            Ok(report) => {
                self.counts.full_collections.fetch_add(1, Ordering::Relaxed);
                self.counts
                    .repaired
                    .fetch_add(report.removed(), Ordering::Relaxed);
                if report.removed() > 0 {
                    tracing::info!(target: "cache_redis", ?report, "dependency collector: full collection repaired orphans");
                }
            }
            Err(e) => {
                tracing::warn!(target: "cache_redis", error = %e.0, "dependency collector: full collection failed");
            }
        }
    }
}

/// What a [`full_collection`] removed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct CollectionReport {
    /// Graph items looked at: entries' links, reverse sets, cascades.
    pub scanned: u64,
    /// Entries whose value was gone: their links went.
    pub forward_sets: u64,
    /// Entries (value and links) whose links were incomplete.
    pub broken_entries: u64,
    /// Reverse-set members whose value was gone or no longer linked to the node.
    pub reverse_members: u64,
    /// Cascade sets nothing depended on any more.
    pub cascades: u64,
    /// Entries listed as having dependents that had none.
    pub parents: u64,
}

impl CollectionReport {
    /// Everything removed.
    pub fn removed(&self) -> u64 {
        self.forward_sets
            + self.broken_entries
            + self.reverse_members
            + self.cascades
            + self.parents
    }
}

/// How many keys one `SCAN` step asks for, and how many set members one repair
/// script checks: bounded batches, so the server is never blocked for long.
const BATCH: usize = 500;

/// Repairs every orphan of the graph under `keys`: links without a value,
/// entries whose links are incomplete, reverse-set members whose value is gone or not
/// linked back, cascade sets nothing depends on. Idempotent; safe while instances run
/// (every repair is one script that re-checks what it removes).
pub(crate) async fn collect_all(
    con: &mut redis::aio::MultiplexedConnection,
    keys: &GraphKeys,
) -> Result<CollectionReport, RemoteError> {
    let mut report = CollectionReport::default();
    let err = |e: redis::RedisError| RemoteError(e.to_string());
    let pattern = |kind: &str| format!("{}{kind}*", glob_escape(keys.g()));
    // forward links, a page of the hash at a time
    let links = format!("{}links", keys.g());
    let hscan = |cursor: u64| {
        let mut cmd = redis::cmd("HSCAN");
        cmd.arg(&links).arg(cursor).arg("COUNT").arg(BATCH);
        cmd
    };
    for page in pages(con, hscan).await? {
        // field, value, field, value...
        let entries: Vec<String> = page.into_iter().step_by(2).collect();
        report.scanned += entries.len() as u64;
        let (lonely, broken): (u64, u64) =
            keys.repair_links(&entries).run(con).await.map_err(err)?;
        report.forward_sets += lonely;
        report.broken_entries += broken;
    }
    // the parents set
    let parents = format!("{}parents", keys.g());
    let sscan = |cursor: u64| {
        let mut cmd = redis::cmd("SSCAN");
        cmd.arg(&parents).arg(cursor).arg("COUNT").arg(BATCH);
        cmd
    };
    for page in pages(con, sscan).await? {
        let n: u64 = keys.repair_parents(&page).run(con).await.map_err(err)?;
        report.parents += n;
    }
    // reverse sets
    for key in scan(con, &pattern("rev:")).await? {
        report.scanned += 1;
        let node = &key[keys.g().len() + "rev:".len()..];
        let sscan = |cursor: u64| {
            let mut cmd = redis::cmd("SSCAN");
            cmd.arg(&key).arg(cursor).arg("COUNT").arg(BATCH);
            cmd
        };
        for members in pages(con, sscan).await? {
            let n: u64 = keys
                .repair_rev(node, &members)
                .run(con)
                .await
                .map_err(err)?;
            report.reverse_members += n;
        }
    }
    // cascades
    for key in scan(con, &pattern("cascade:")).await? {
        report.scanned += 1;
        let dependency = &key[keys.g().len() + "cascade:".len()..];
        let n: u64 = keys
            .repair_cascade(dependency)
            .run(con)
            .await
            .map_err(err)?;
        report.cascades += n;
    }
    Ok(report)
}

/// Every key matching `pattern`, by `SCAN` in bounded steps.
async fn scan(
    con: &mut redis::aio::MultiplexedConnection,
    pattern: &str,
) -> Result<Vec<String>, RemoteError> {
    let scan = |cursor: u64| {
        let mut cmd = redis::cmd("SCAN");
        cmd.arg(cursor)
            .arg("MATCH")
            .arg(pattern)
            .arg("COUNT")
            .arg(BATCH);
        cmd
    };
    Ok(pages(con, scan).await?.into_iter().flatten().collect())
}

/// The non-empty pages of a cursor command (`SCAN`, `SSCAN`): `page(cursor)` builds
/// the command for a cursor.
async fn pages(
    con: &mut redis::aio::MultiplexedConnection,
    page: impl Fn(u64) -> redis::Cmd,
) -> Result<Vec<Vec<String>>, RemoteError> {
    let mut cursor: u64 = 0;
    let mut out = Vec::new();
    loop {
        let (next, items): (u64, Vec<String>) = page(cursor)
            .query_async(con)
            .await
            .map_err(|e| RemoteError(e.to_string()))?;
        if !items.is_empty() {
            out.push(items);
        }
        if next == 0 {
            return Ok(out);
        }
        cursor = next;
    }
}
