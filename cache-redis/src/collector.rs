//! The dependency collector: keeps the graph of `RedisBackend::dependencies(true)`
//! clean when values expire or are evicted, and the full collection that repairs a
//! whole prefix.

use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use cache_runtime::Backoff;
use futures_util::stream::SelectAll;
use futures_util::StreamExt;
use redis::cluster_routing::{Route, RoutingInfo, SingleNodeRoutingInfo, SlotAddr};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::backend::RedisBackendError;
use crate::bus::{PING_EVERY, PING_TIMEOUT};
use crate::endpoint::Conn;
use crate::graph::{glob_escape, GraphKeys, ScriptCall, COLLECT_GRACE_MS, TOMBSTONE};
use crate::link::Link;
use crate::writer::run_scripts;
use cache_runtime::RemoteError;

const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// How long the collector's commands may take (a repair script on a batch, a page
/// of a scan).
const COMMAND_TIMEOUT: Duration = Duration::from_secs(30);

/// On a cluster, how many entries heard of and not collected yet the collector keeps
/// (those whose links are too recent wait); past that, the next full collection
/// repairs what it drops.
const WAITING_MAX: usize = 100_000;

/// Repairs the dependency graph of the prefix `key_prefix` on the server at `url` (a
/// standalone server, or any node of a Redis Cluster): links without a value, entries
/// whose links are incomplete, reverse-set members whose value is gone, cascades
/// nothing depends on. Scans in bounded batches; idempotent; safe while instances and
/// collectors run. Run it after every collector was down for a while (a collector
/// runs one itself when it starts and after it lost its subscription).
///
/// On a cluster the graph's keys are on one slot and the values on every master:
/// it scans the graph's master, reads the values where they are, and leaves alone
/// the links recorded less than 10 s before (their value may be on its way).
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
    let graph = Graph::open(url, None, key_prefix).await?;
    graph
        .collect_all()
        .await
        .map_err(|e| RedisBackendError::Command(e.0))
}

/// The graph a collector keeps: the connection to its server or cluster, and its
/// keys.
struct Graph {
    link: Arc<Link>,
    keys: GraphKeys,
    addr: String,
}

impl Graph {
    /// Connects to the server or cluster at `url` and finds out which it is.
    async fn open(
        url: &str,
        root_certificate: Option<&[u8]>,
        prefix: &str,
    ) -> Result<Graph, RedisBackendError> {
        let (endpoint, addr, _) = crate::backend::endpoint(url, &[], root_certificate)?;
        let link = Link::open(endpoint.clone(), COMMAND_TIMEOUT, false)
            .await
            .map_err(|source| RedisBackendError::Connect {
                addr: addr.clone(),
                source,
            })?;
        let keys = GraphKeys::new(prefix, Duration::ZERO, Some(endpoint));
        if keys.on_cluster() && !keys.one_slot() {
            return Err(RedisBackendError::Config(
                crate::backend::CLUSTER_GRAPH_PREFIX,
            ));
        }
        Ok(Graph { link, keys, addr })
    }

    fn on_cluster(&self) -> bool {
        self.keys.on_cluster()
    }

    /// Runs one of the graph's scripts.
    async fn script<T: redis::FromRedisValue>(&self, call: ScriptCall) -> Result<T, RemoteError> {
        let reply = run_scripts(&self.link, std::slice::from_ref(&call)).await?;
        let reply = reply.into_iter().next().unwrap_or(redis::Value::Nil);
        redis::from_redis_value(reply).map_err(|e| RemoteError(e.to_string()))
    }

    /// The masters' addresses: the server's on one node.
    async fn masters(&self) -> Result<Vec<(String, u16)>, RemoteError> {
        match self.link.conn() {
            Some(Conn::Cluster(con)) => {
                let topology = crate::topology::topology(&con)
                    .await
                    .map_err(|e| RemoteError(e.to_string()))?;
                let mut masters: Vec<(String, u16)> = topology
                    .masters
                    .into_iter()
                    .map(|m| (m.host, m.port))
                    .collect();
                masters.sort();
                Ok(masters)
            }
            _ => Ok(Vec::new()),
        }
    }

    /// The clients to subscribe with: the URL's on one node; one per master on a
    /// cluster (keyspace events are each node's own).
    async fn subscribers(&self) -> Result<(Vec<redis::Client>, Vec<(String, u16)>), RemoteError> {
        let endpoint = self.link.endpoint();
        if !self.on_cluster() {
            return Ok((vec![endpoint.first().clone()], Vec::new()));
        }
        let masters = self.masters().await?;
        let clients = masters
            .iter()
            .filter_map(|(host, port)| endpoint.client_at(host, *port))
            .collect();
        Ok((clients, masters))
    }

    /// Checks the settings of the server, or of every master.
    async fn check_settings(&self) -> Result<(), RedisBackendError> {
        let (clients, _) = self
            .subscribers()
            .await
            .map_err(|e| RedisBackendError::Command(e.0))?;
        for client in clients {
            let addr = client.get_connection_info().addr().to_string();
            let mut con = connect(&client).await?;
            crate::settings::check(&mut con, true)
                .await
                .map_err(|problem| RedisBackendError::ServerSettings { addr, problem })?;
        }
        Ok(())
    }
}

async fn connect(
    client: &redis::Client,
) -> Result<redis::aio::MultiplexedConnection, RedisBackendError> {
    let config = redis::AsyncConnectionConfig::new()
        .set_connection_timeout(Some(CONNECT_TIMEOUT))
        .set_response_timeout(Some(COMMAND_TIMEOUT));
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

    /// Checks the server's settings (every master's on a cluster), subscribes to
    /// expiry and eviction events (on every master), runs a full collection, and goes
    /// on in a task of its own until stopped.
    pub async fn start(self) -> Result<DependencyCollector, RedisBackendError> {
        let graph = Graph::open(
            &self.url,
            self.root_certificate.as_deref(),
            &self.key_prefix,
        )
        .await?;
        graph.check_settings().await?;
        let counts = Arc::new(Counts::default());
        let (stop, stopped) = watch::channel(false);
        let (ready_tx, mut ready) = watch::channel(false);
        let worker = Worker {
            db: graph
                .link
                .endpoint()
                .first()
                .get_connection_info()
                .redis_settings()
                .db(),
            graph,
            counts: counts.clone(),
            waiting: HashMap::new(),
        };
        // a refused subscription is a configuration error, said as such
        if let Err(e) = worker.subscribe().await {
            if e.code() == Some("NOPERM") {
                let db = worker.db;
                let user = crate::backend::user_of(worker.graph.link.endpoint().first());
                return Err(RedisBackendError::Refused {
                    addr: worker.graph.addr.clone(),
                    command: "PSUBSCRIBE/SUBSCRIBE".into(),
                    feature: "the collector, which hears values expire and get evicted,".into(),
                    words: crate::endpoint::words(&e),
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
    graph: Graph,
    db: i64,
    counts: Arc<Counts>,
    /// On a cluster: value keys heard of, with when to look at them (at once, or
    /// once their links are old enough; see [`GraphKeys::linked`]).
    waiting: HashMap<String, Instant>,
}

/// A subscription to keyspace events: one connection on one node, one per master on
/// a cluster (`masters`, sorted; empty on one node).
struct Subscription {
    sinks: Vec<redis::aio::PubSubSink>,
    stream: SelectAll<redis::aio::PubSubStream>,
    masters: Vec<(String, u16)>,
}

impl Worker {
    async fn run(mut self, mut stop: watch::Receiver<bool>, ready: watch::Sender<bool>) {
        let mut backoff = Backoff::RECONNECT;
        loop {
            let subscribed = tokio::select! {
                s = self.subscribe() => s,
                _ = stopped(&mut stop) => return,
            };
            match subscribed {
                Ok(mut sub) => {
                    backoff.reset();
                    ready.send_replace(true);
                    // whatever expired while it was not listening
                    self.full_collection().await;
                    let mut ping = tokio::time::interval(PING_EVERY);
                    ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
                    loop {
                        tokio::select! {
                            _ = stopped(&mut stop) => return,
                            msg = sub.stream.next() => match msg {
                                Some(msg) => self.on_event(&msg).await,
                                None => break,
                            },
                            _ = ping.tick() => {
                                if !self.tick(&mut sub).await {
                                    break;
                                }
                            }
                        }
                    }
                    self.counts
                        .subscriptions_lost
                        .fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(target: "cache_redis", "dependency collector: subscription lost (or the cluster's masters changed); resubscribing, then a full collection");
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

    /// Every [`PING_EVERY`]: checks that every subscription is alive and, on a
    /// cluster, that the masters are the same, then looks at the entries waiting.
    /// Returns false to subscribe again.
    async fn tick(&mut self, sub: &mut Subscription) -> bool {
        for sink in &mut sub.sinks {
            let alive = tokio::time::timeout(PING_TIMEOUT, sink.ping::<redis::Value>()).await;
            if !matches!(alive, Ok(Ok(_))) {
                return false;
            }
        }
        if self.graph.on_cluster() {
            // a master it does not listen to (a promoted replica, a new node)
            match self.graph.masters().await {
                Ok(masters) if masters != sub.masters => return false,
                _ => {}
            }
            self.collect_waiting().await;
        }
        true
    }

    async fn subscribe(&self) -> Result<Subscription, redis::RedisError> {
        tokio::time::timeout(CONNECT_TIMEOUT, async {
            let (clients, masters) = self.graph.subscribers().await.map_err(|e| {
                redis::RedisError::from((
                    redis::ErrorKind::Io,
                    "reading the cluster's masters",
                    e.0,
                ))
            })?;
            let mut sinks = Vec::with_capacity(clients.len());
            let mut stream = SelectAll::new();
            for client in clients {
                let (mut sink, events) = client.get_async_pubsub().await?.split();
                let db = self.db;
                // keyspace events of the value keys (`K`), and key events (`E`)
                sink.psubscribe(format!(
                    "__keyspace@{db}__:{}*",
                    glob_escape(&self.graph.keys.values)
                ))
                .await?;
                sink.subscribe(&[
                    format!("__keyevent@{db}__:expired"),
                    format!("__keyevent@{db}__:evicted"),
                ])
                .await?;
                sinks.push(sink);
                stream.push(events);
            }
            Ok(Subscription {
                sinks,
                stream,
                masters,
            })
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
        if !key.starts_with(self.graph.keys.values.as_str()) {
            return;
        }
        if self.graph.on_cluster() {
            // looked at in batches, on the next tick
            if self.waiting.len() < WAITING_MAX {
                self.waiting.insert(key, Instant::now());
            }
            return;
        }
        match self
            .graph
            .script::<i64>(self.graph.keys.collect(&key))
            .await
        {
            Ok(1) => {
                self.counts.collected.fetch_add(1, Ordering::Relaxed);
            }
            Ok(_) => {}
            Err(e) => {
                tracing::warn!(target: "cache_redis", error = %e, "dependency collector: collecting `{key}` failed (the next full collection repairs it)");
            }
        }
    }

    /// On a cluster: collects the entries heard of whose time has come, in batches.
    async fn collect_waiting(&mut self) {
        let now = Instant::now();
        let due: Vec<String> = self
            .waiting
            .iter()
            .filter(|(_, at)| **at <= now)
            .map(|(key, _)| key.clone())
            .collect();
        for batch in due.chunks(BATCH) {
            for key in batch {
                self.waiting.remove(key);
            }
            match self.graph.look(batch).await {
                Ok(look) => {
                    let gone: Vec<(String, String)> = look
                        .ready
                        .into_iter()
                        .filter(|(_, _, live)| !live)
                        .map(|(key, at, _)| (key, at))
                        .collect();
                    if !gone.is_empty() {
                        match self
                            .graph
                            .script::<u64>(self.graph.keys.collect_found(&gone))
                            .await
                        {
                            Ok(n) => {
                                self.counts.collected.fetch_add(n, Ordering::Relaxed);
                            }
                            Err(e) => {
                                tracing::warn!(target: "cache_redis", error = %e.0, "dependency collector: collecting {} entries failed (the next full collection repairs them)", gone.len());
                            }
                        }
                    }
                    for (key, wait) in look.recent {
                        self.waiting.insert(key, now + wait);
                    }
                }
                Err(e) => {
                    tracing::warn!(target: "cache_redis", error = %e.0, "dependency collector: looking at {} entries failed (the next full collection repairs them)", batch.len());
                }
            }
        }
    }

    async fn full_collection(&mut self) {
        match self.graph.collect_all().await {
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
    /// On a cluster: entries whose links were recorded too recently to judge their
    /// value missing (it may be on its way), left to the next collection.
    pub recent: u64,
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

/// A cursor command (`HSCAN`, `SSCAN`) over `key`, for [`Graph::pages`].
fn scan_of<'a>(name: &'a str, key: &'a str) -> impl Fn(u64) -> redis::Cmd + 'a {
    move |cursor| {
        let mut cmd = redis::cmd(name);
        cmd.arg(key).arg(cursor).arg("COUNT").arg(BATCH);
        cmd
    }
}

/// What [`Graph::look`] found: entries whose links are old enough, with when they
/// were recorded and whether the value is there; and those to look at again later.
struct Look {
    ready: Vec<(String, String, bool)>,
    recent: Vec<(String, Duration)>,
}

impl Graph {
    /// Repairs every orphan of the graph: links without a value, entries whose links
    /// are incomplete, reverse-set members whose value is gone or not linked back,
    /// cascade sets nothing depends on. Idempotent; safe while instances run (every
    /// repair is one script that re-checks what it removes; on a cluster, values are
    /// looked at where they are first, see [`GraphKeys::linked`]).
    async fn collect_all(&self) -> Result<CollectionReport, RemoteError> {
        let keys = &self.keys;
        let mut report = CollectionReport::default();
        let pattern = |kind: &str| format!("{}{kind}*", glob_escape(keys.g()));
        // forward links, a page of the hash at a time
        let links = format!("{}links", keys.g());
        for page in self.pages(scan_of("HSCAN", &links), false).await? {
            // field, value, field, value...
            let entries: Vec<String> = page.into_iter().step_by(2).collect();
            report.scanned += entries.len() as u64;
            if !self.on_cluster() {
                let (lonely, broken): (u64, u64) = self.script(keys.repair_links(&entries)).await?;
                report.forward_sets += lonely;
                report.broken_entries += broken;
                continue;
            }
            let look = self.look(&entries).await?;
            report.recent += look.recent.len() as u64;
            if look.ready.is_empty() {
                continue;
            }
            let (lonely, broken, count, bury): (u64, u64, u64, Vec<String>) =
                self.script(keys.repair_found(&look.ready)).await?;
            // a value whose links were incomplete: a tombstone in its place
            let calls: Vec<ScriptCall> = bury.iter().map(|v| keys.bury(v, count)).collect();
            if !calls.is_empty() {
                run_scripts(&self.link, &calls).await?;
            }
            report.forward_sets += lonely;
            report.broken_entries += broken;
        }
        // the parents set
        let parents = format!("{}parents", keys.g());
        for page in self.pages(scan_of("SSCAN", &parents), false).await? {
            let n: u64 = self.script(keys.repair_parents(&page)).await?;
            report.parents += n;
        }
        // reverse sets
        for key in self.scan(&pattern("rev:")).await? {
            report.scanned += 1;
            let node = &key[keys.g().len() + "rev:".len()..];
            for members in self.pages(scan_of("SSCAN", &key), false).await? {
                let n: u64 = self.script(keys.repair_rev(node, &members)).await?;
                report.reverse_members += n;
            }
        }
        // cascades
        for key in self.scan(&pattern("cascade:")).await? {
            report.scanned += 1;
            let dependency = &key[keys.g().len() + "cascade:".len()..];
            let n: u64 = self.script(keys.repair_cascade(dependency)).await?;
            report.cascades += n;
        }
        Ok(report)
    }

    /// On a cluster, the collector's look at the entries of the value keys `keys`:
    /// when their links were recorded (on the graph's slot), then, for those recorded
    /// long enough ago, whether their value is there (on their own slots).
    async fn look(&self, keys: &[String]) -> Result<Look, RemoteError> {
        let mut times: Vec<String> = self.script(self.keys.linked(keys)).await?;
        let now: u64 = times
            .pop()
            .and_then(|t| t.parse().ok())
            .ok_or_else(|| RemoteError("the graph's time is missing".into()))?;
        let mut look = Look {
            ready: Vec::new(),
            recent: Vec::new(),
        };
        for (key, at) in keys.iter().zip(times) {
            let Ok(t) = at.parse::<u64>() else {
                continue; // no links: nothing to collect
            };
            match (t + COLLECT_GRACE_MS).checked_sub(now) {
                Some(wait) if wait > 0 => {
                    look.recent.push((key.clone(), Duration::from_millis(wait)))
                }
                _ => look.ready.push((key.clone(), at, false)),
            }
        }
        if look.ready.is_empty() {
            return Ok(look);
        }
        let mut pipe = redis::pipe();
        for (key, _, _) in &look.ready {
            pipe.cmd("GETRANGE").arg(key).arg(0).arg(0);
        }
        let heads: Vec<Vec<u8>> = self.link.pipeline_again(&pipe).await?;
        for ((_, _, live), head) in look.ready.iter_mut().zip(heads) {
            *live = head.first().is_some_and(|&b| b != TOMBSTONE);
        }
        Ok(look)
    }

    /// Every key of the graph matching `pattern`, by `SCAN` in bounded steps (on a
    /// cluster, on the master of the graph's slot).
    async fn scan(&self, pattern: &str) -> Result<Vec<String>, RemoteError> {
        let scan = |cursor: u64| {
            let mut cmd = redis::cmd("SCAN");
            cmd.arg(cursor)
                .arg("MATCH")
                .arg(pattern)
                .arg("COUNT")
                .arg(BATCH);
            cmd
        };
        Ok(self
            .pages(scan, true)
            .await?
            .into_iter()
            .flatten()
            .collect())
    }

    /// The non-empty pages of a cursor command (`SCAN`, `SSCAN`): `page(cursor)`
    /// builds the command for a cursor; `on_graph` routes it to the master of the
    /// graph's slot on a cluster (a command without a key).
    async fn pages(
        &self,
        page: impl Fn(u64) -> redis::Cmd,
        on_graph: bool,
    ) -> Result<Vec<Vec<String>>, RemoteError> {
        let slot = crate::endpoint::slot_of(format!("{}epoch", self.keys.g()).as_bytes());
        let mut cursor: u64 = 0;
        let mut out = Vec::new();
        loop {
            let cmd = page(cursor);
            let reply: Result<(u64, Vec<String>), RemoteError> = match self.link.conn() {
                Some(Conn::Cluster(mut con)) if on_graph => {
                    let route =
                        SingleNodeRoutingInfo::SpecificNode(Route::new(slot, SlotAddr::Master));
                    match con.route_command(cmd, RoutingInfo::SingleNode(route)).await {
                        Ok(v) => redis::from_redis_value(v).map_err(|e| RemoteError(e.to_string())),
                        Err(e) => Err(RemoteError(e.to_string())),
                    }
                }
                _ => self.link.query(&cmd).await,
            };
            let (next, items) = reply?;
            if !items.is_empty() {
                out.push(items);
            }
            if next == 0 {
                return Ok(out);
            }
            cursor = next;
        }
    }
}
