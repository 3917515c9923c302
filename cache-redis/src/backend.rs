//! `RedisBackend`: Redis as the remote (L2) tier.

use std::fmt;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use cache_runtime::{
    Backend, Backoff, BoxFuture, Fetched, LinkedWrite, MemoryBackend, RemoteError, RemoteGraph,
    RemoteKey, RemoteStats, RemoteStore, Removed, ShutdownReport, FORMAT_VERSION,
};
use redis::{RedisWrite, ToRedisArgs};
use tokio::sync::{mpsc, oneshot, Notify};

use crate::bus::RedisBus;
use crate::graph::{glob_escape, GraphKeys};
use crate::link::Link;

/// Why [`RedisBackendBuilder::build`] failed.
#[derive(Debug, thiserror::Error)]
pub enum RedisBackendError {
    /// The URL is not a Redis URL.
    #[error("invalid Redis URL: {0}")]
    Url(#[source] redis::RedisError),
    /// Redis did not answer, or did not let this user in. Start it, check the address
    /// and the credentials, or build with `.connect_lazily(true)` to start without it.
    #[error("cannot connect to Redis at {addr}: {source} ({})", connect_hint(.source))]
    Connect {
        /// The server's address (without credentials).
        addr: String,
        /// The client's error.
        #[source]
        source: redis::RedisError,
    },
    /// The server refused a command the configuration needs: the user lacks a
    /// permission (an ACL), or the server is a read-only replica. The message names
    /// the command, what needs it, and what to grant.
    #[error("Redis at {addr} refused {command} ({words}): {feature} needs it; {fix}")]
    Refused {
        /// The server's address.
        addr: String,
        /// The command refused.
        command: String,
        /// What needs it.
        feature: String,
        /// The server's words.
        words: String,
        /// What to change.
        fix: String,
    },
    /// The builder's settings contradict each other.
    #[error("{0}")]
    Config(&'static str),
    /// A command failed.
    #[error("Redis command failed: {0}")]
    Command(String),
    /// The server's settings do not fit (the message names the `CONFIG SET` to run).
    #[error("Redis at {addr}: {problem}")]
    ServerSettings {
        /// The server's address.
        addr: String,
        /// What is wrong, and how to fix it.
        problem: String,
    },
}

/// What to do about a connection error.
fn connect_hint(e: &redis::RedisError) -> &'static str {
    let auth = e.kind() == redis::ErrorKind::AuthenticationFailed
        || matches!(e.code(), Some("WRONGPASS" | "NOAUTH"));
    if auth {
        "check the user and the password in the URL"
    } else {
        "start Redis, check the URL, or use `.connect_lazily(true)` to start without it and connect later"
    }
}

impl RedisBackendError {
    /// The error for what the probe of `build` found.
    pub(crate) fn from_problem(addr: &str, problem: crate::probe::Problem) -> Self {
        match problem {
            crate::probe::Problem::Refused {
                command,
                feature,
                words,
                fix,
            } => RedisBackendError::Refused {
                addr: addr.to_owned(),
                command: command.to_owned(),
                feature,
                words,
                fix,
            },
            crate::probe::Problem::Connection(source) => RedisBackendError::Connect {
                addr: addr.to_owned(),
                source,
            },
        }
    }

    /// The error of a subscription that failed at `build`.
    pub(crate) fn subscribing(
        addr: &str,
        user: &str,
        channel: &str,
        source: redis::RedisError,
    ) -> Self {
        if source.code() == Some("NOPERM") {
            RedisBackendError::Refused {
                addr: addr.to_owned(),
                command: "SUBSCRIBE".to_owned(),
                feature: format!(
                    "the in-process tier, which hears the other instances' invalidations on `{channel}`,"
                ),
                words: crate::probe::words(&source),
                fix: format!(
                    "grant it: `ACL SETUSER {user} +subscribe +ping &{channel}`, or build without an in-process tier"
                ),
            }
        } else {
            RedisBackendError::Connect {
                addr: addr.to_owned(),
                source,
            }
        }
    }
}

/// The user name in a client's URL (`default` without one).
pub(crate) fn user_of(client: &redis::Client) -> String {
    client
        .get_connection_info()
        .redis_settings()
        .username()
        .unwrap_or("default")
        .to_owned()
}

/// Counters of the Redis backend's background writes, readable while it runs.
#[derive(Clone, Debug, Default)]
pub struct RedisMetrics(Arc<Counters>);

#[derive(Debug, Default)]
struct Counters {
    written: AtomicU64,
    dropped: AtomicU64,
    /// `SET`s refused or failed.
    failed_sets: AtomicU64,
    /// Linked writes (the graph's write script) refused or failed.
    failed_linked: AtomicU64,
}

impl RedisMetrics {
    /// Writes completed.
    pub fn written(&self) -> u64 {
        self.0.written.load(Ordering::Relaxed)
    }
    /// Writes dropped because the queue was full.
    pub fn dropped(&self) -> u64 {
        self.0.dropped.load(Ordering::Relaxed)
    }
    /// Writes that Redis refused or that failed (both kinds; `stats().remote` tells
    /// them apart).
    pub fn failed(&self) -> u64 {
        self.0.failed_sets.load(Ordering::Relaxed) + self.0.failed_linked.load(Ordering::Relaxed)
    }
}

/// Configures a [`RedisBackend`].
#[must_use = "call `.build().await`"]
pub struct RedisBackendBuilder {
    url: String,
    key_prefix: String,
    l1: Option<MemoryBackend>,
    default_ttl: Duration,
    max_value_size: usize,
    operation_timeout: Duration,
    write_queue: usize,
    lazy: bool,
    root_certificate: Option<Vec<u8>>,
    dependencies: bool,
    marker_ttl: Duration,
}

impl fmt::Debug for RedisBackendBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisBackendBuilder")
            .field("key_prefix", &self.key_prefix)
            .field("l1", &self.l1)
            .field("default_ttl", &self.default_ttl)
            .field("max_value_size", &self.max_value_size)
            .field("operation_timeout", &self.operation_timeout)
            .field("write_queue", &self.write_queue)
            .field("lazy", &self.lazy)
            .field("dependencies", &self.dependencies)
            .finish_non_exhaustive()
    }
}

impl RedisBackendBuilder {
    /// The prefix of every key this backend writes (`shop` gives `shop:2:...`, where
    /// `2` is the value format's version). Default: `cache`.
    pub fn key_prefix(mut self, prefix: impl Into<String>) -> Self {
        self.key_prefix = prefix.into();
        self
    }

    /// An in-process tier in front of Redis. Without one, every call reads Redis.
    pub fn l1(mut self, l1: MemoryBackend) -> Self {
        self.l1 = Some(l1);
        self
    }

    /// Expiry of entries whose function and profile give none, so that Redis's
    /// `volatile-*` eviction can remove them. Default: one day.
    pub fn default_ttl(mut self, ttl: Duration) -> Self {
        self.default_ttl = ttl;
        self
    }

    /// The largest encoded value written to Redis; larger values are returned to the
    /// caller and kept in the in-process tier only. Default: 1 MiB.
    pub fn max_value_size(mut self, bytes: usize) -> Self {
        self.max_value_size = bytes;
        self
    }

    /// How long one Redis operation may take before the call goes on without it; also
    /// how long a call waits for a connection being made (at start with
    /// `connect_lazily`, or after Redis went away). Default: 200 ms.
    pub fn operation_timeout(mut self, timeout: Duration) -> Self {
        self.operation_timeout = timeout;
        self
    }

    /// How many writes may wait for Redis; beyond that, writes are dropped and
    /// counted ([`RedisMetrics::dropped`]). Default: 10,000.
    pub fn write_queue(mut self, capacity: usize) -> Self {
        self.write_queue = capacity;
        self
    }

    /// For `rediss://` URLs: trust this certificate (PEM) instead of the system's
    /// root certificates, as for a server whose certificate a private CA signed.
    pub fn tls_root_certificate(mut self, pem: impl Into<Vec<u8>>) -> Self {
        self.root_certificate = Some(pem.into());
        self
    }

    /// With `true`, the dependency graph is kept in Redis: an entry's links are
    /// written with it atomically, an invalidation (by key or by dependency) on any
    /// instance removes every dependent entry from Redis in one round trip, and a
    /// value computed across an invalidation on any instance is not written. Needs
    /// `maxmemory-policy volatile-lru` (or `volatile-random`) and
    /// `notify-keyspace-events Exe` (checked by `build`), and a running
    /// [`DependencyCollector`](crate::DependencyCollector).
    ///
    /// With `false` (the default), an entry that has dependencies is kept in the
    /// in-process tier only, never written to Redis (counted in `local_only`), so
    /// invalidating a dependency stays exact.
    pub fn dependencies(mut self, enabled: bool) -> Self {
        self.dependencies = enabled;
        self
    }

    /// With dependencies: how long an invalidation's markers are kept, during which a
    /// value computed before it is not written. Longer than any cached body runs.
    /// Default: 10 minutes.
    pub fn marker_ttl(mut self, ttl: Duration) -> Self {
        self.marker_ttl = ttl;
        self
    }

    /// With `true`, `build` succeeds while Redis is down: calls run without the Redis
    /// tier (each failure counted) until it answers, and the L1 is bypassed until the
    /// subscription to the other instances' invalidations is in place. The commands
    /// the configuration needs are checked once Redis answers (a refusal is logged at
    /// `error`). Default: `false`, `build` fails.
    pub fn connect_lazily(mut self, lazy: bool) -> Self {
        self.lazy = lazy;
        self
    }

    /// Connects (unless lazy), checks that the server lets this user run every command
    /// the configuration needs (each once, on a probe key of the prefix: writes,
    /// reads, removals, `PUBLISH`, with an L1 `SUBSCRIBE` and `PING`, with dependencies
    /// the graph's scripts and the server's settings), and starts the background
    /// writer. A refused command is [`RedisBackendError::Refused`], which names it,
    /// what needs it and what to grant. Needs a tokio runtime.
    pub async fn build(self) -> Result<RedisBackend, RedisBackendError> {
        if self.key_prefix.is_empty() || self.key_prefix.contains(char::is_whitespace) {
            return Err(RedisBackendError::Config(
                "key_prefix must be non-empty and without spaces",
            ));
        }
        if self.operation_timeout.is_zero() || self.write_queue == 0 {
            return Err(RedisBackendError::Config(
                "operation_timeout and write_queue must be positive",
            ));
        }
        let client = client(&self.url, self.root_certificate.as_deref())?;
        let addr = client.get_connection_info().addr().to_string();
        let user = user_of(&client);
        // Reads and writes use separate connections: Redis answers a connection's
        // commands in order, so reads sharing one with a slow write would wait for it.
        let open = || async {
            Link::open(client.clone(), self.operation_timeout, self.lazy)
                .await
                .map_err(|source| RedisBackendError::Connect {
                    addr: addr.clone(),
                    source,
                })
        };
        let reads = open().await?;
        let writes = open().await?;
        let prefix = format!("{}:{FORMAT_VERSION}:", self.key_prefix);
        let metrics = RedisMetrics::default();
        let (tx, rx) = mpsc::channel(self.write_queue);
        let shared = Arc::new(Shared {
            pending: AtomicUsize::new(0),
            drained: Notify::new(),
        });
        let graph = self
            .dependencies
            .then(|| GraphKeys::new(&self.key_prefix, self.marker_ttl));
        tokio::spawn(writer(
            writes,
            prefix.clone(),
            graph.clone(),
            rx,
            metrics.clone(),
            shared.clone(),
        ));
        let channel = channel_name(&self.key_prefix);
        // Every instance publishes its invalidations; one with an in-process tier also
        // listens to the others'.
        let bus = match self.l1 {
            Some(_) => RedisBus::start(
                client.clone(),
                reads.clone(),
                channel.clone(),
                self.lazy,
                self.operation_timeout,
            )
            .await
            .map_err(|source| RedisBackendError::subscribing(&addr, &user, &channel, source))?,
            None => RedisBus::publish_only(reads.clone(), channel.clone(), self.operation_timeout),
        };
        let store = RedisStore {
            link: reads,
            prefix,
            default_ttl: self.default_ttl,
            max_value_size: self.max_value_size,
            queue: tx,
            metrics: metrics.clone(),
            shared,
            operation_timeout: self.operation_timeout,
            channel,
            graph,
        };
        let probe = Probe {
            client: client.clone(),
            addr: addr.clone(),
            user,
            key_prefix: self.key_prefix.clone(),
            values: store.prefix.clone(),
            channel: store.channel.clone(),
            subscriber: self.l1.is_some(),
            graph: store.graph.clone(),
            timeout: self.operation_timeout.max(Duration::from_secs(1)),
        };
        if self.lazy {
            // checked once Redis answers; until then (and if refused) the service
            // copes: nothing stale is served
            let alive = store.queue.downgrade();
            tokio::spawn(async move { probe.later(alive).await });
        } else {
            store.check_server().await;
            let mut con = probe.connect().await?;
            probe.run(&mut con).await?;
            if self.dependencies {
                crate::graph::check_settings(&mut con)
                    .await
                    .map_err(|problem| RedisBackendError::ServerSettings {
                        addr: addr.clone(),
                        problem,
                    })?;
            }
        }
        Ok(RedisBackend {
            store,
            l1: self.l1,
            bus,
            metrics,
        })
    }
}

/// What `build` checks (see [`crate::probe`]).
struct Probe {
    client: redis::Client,
    addr: String,
    user: String,
    key_prefix: String,
    values: String,
    channel: String,
    subscriber: bool,
    graph: Option<GraphKeys>,
    timeout: Duration,
}

impl Probe {
    async fn connect(&self) -> Result<redis::aio::MultiplexedConnection, RedisBackendError> {
        let config = redis::AsyncConnectionConfig::new()
            .set_connection_timeout(Some(self.timeout))
            .set_response_timeout(Some(self.timeout));
        self.client
            .get_multiplexed_async_connection_with_config(&config)
            .await
            .map_err(|source| RedisBackendError::Connect {
                addr: self.addr.clone(),
                source,
            })
    }

    /// Runs every command the configuration needs once.
    async fn run(
        &self,
        con: &mut redis::aio::MultiplexedConnection,
    ) -> Result<(), RedisBackendError> {
        let needs = crate::probe::Needs {
            values: Some(&self.values),
            user: &self.user,
            key_prefix: &self.key_prefix,
            channel: &self.channel,
            subscriber: self.subscriber,
            graph: self.graph.as_ref(),
        };
        crate::probe::probe(con, &needs)
            .await
            .map_err(|p| RedisBackendError::from_problem(&self.addr, p))
    }

    /// For a lazy backend: probes once Redis answers, and logs a refusal at `error`.
    /// Ends with the backend.
    async fn later(self, alive: mpsc::WeakSender<Op>) {
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(10));
        while alive.upgrade().is_some() {
            let result = match self.connect().await {
                Ok(mut con) => self.run(&mut con).await,
                Err(e) => Err(e),
            };
            match result {
                Ok(()) => return,
                Err(RedisBackendError::Connect { .. }) => {}
                Err(e) => {
                    tracing::error!(target: "cache_redis", "{e} (the cache goes on without what is refused: nothing stale is served, and every refusal is counted in `stats().remote`)");
                    return;
                }
            }
            backoff.wait().await;
        }
    }
}

/// Redis as the remote tier of a [`CachingService`](cache_runtime::CachingService),
/// with an optional in-process tier (L1) in front, kept in sync across instances.
///
/// ```no_run
/// use cache_redis::RedisBackend;
/// use cache_runtime::{CachingService, MemoryBackend};
///
/// # async fn run() -> Result<(), Box<dyn std::error::Error>> {
/// CachingService::builder()
///     .backend(
///         RedisBackend::builder("redis://127.0.0.1:6379/0")
///             .key_prefix("shop")
///             .l1(MemoryBackend::new().max_entries(10_000))
///             .build()
///             .await?,
///     )
///     .install()?;
/// # Ok(()) }
/// ```
///
/// Entries are MessagePack under `{prefix}:{format version}:{readable key}`, always
/// with an expiry (`ttl`, `sliding`, or the default one). Reads happen on a miss of
/// the in-process tier, once per key however many callers wait; writes go through a
/// bounded queue and a background task, so a miss never waits for Redis.
/// `cache_runtime::shutdown().await` waits for the queue to drain.
///
/// Instances sharing a Redis and a `key_prefix` form one cache. Every invalidation is
/// applied in Redis (behind any queued write of the same entry, on the writer's
/// connection) and then published on the channel `{prefix}:invalidations`; an instance
/// with an L1 subscribes to it and drops what other instances invalidated. After a
/// lost subscription it clears its L1 at once and again once resubscribed.
pub struct RedisBackend {
    store: RedisStore,
    l1: Option<MemoryBackend>,
    bus: RedisBus,
    metrics: RedisMetrics,
}

impl fmt::Debug for RedisBackend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisBackend")
            .field("prefix", &self.store.prefix)
            .field("l1", &self.l1)
            .field("channel", &self.bus.channel())
            .finish_non_exhaustive()
    }
}

impl RedisBackend {
    /// Starts configuring a backend for the server at `url`:
    /// `redis://[user:password@]host:port/db`, or `rediss://...` for TLS.
    pub fn builder(url: impl Into<String>) -> RedisBackendBuilder {
        RedisBackendBuilder {
            url: url.into(),
            key_prefix: "cache".into(),
            l1: None,
            default_ttl: Duration::from_secs(86_400),
            max_value_size: 1 << 20,
            operation_timeout: Duration::from_millis(200),
            write_queue: 10_000,
            lazy: false,
            root_certificate: None,
            dependencies: false,
            marker_ttl: Duration::from_secs(600),
        }
    }

    /// The background writer's counters (keep a clone before passing the backend to
    /// the service).
    pub fn metrics(&self) -> RedisMetrics {
        self.metrics.clone()
    }
}

impl From<RedisBackend> for Backend {
    fn from(backend: RedisBackend) -> Backend {
        Backend::remote(backend.store, backend.l1).with_store_bus(backend.bus)
    }
}

/// The pub/sub channel of the instances sharing `prefix`.
pub(crate) fn channel_name(prefix: &str) -> String {
    format!("{prefix}:invalidations")
}

/// A client for `url`, trusting `root_certificate` (PEM) for TLS if given.
pub(crate) fn client(
    url: &str,
    root_certificate: Option<&[u8]>,
) -> Result<redis::Client, RedisBackendError> {
    // TLS (`rediss://`) uses rustls with the ring provider, unless the application
    // installed another provider already. rustls 0.23.48 deprecates ring's provider
    // for lacking post-quantum key exchange; its alternative (aws-lc-rs) is a C
    // library to build, which this crate does not impose: an application that wants
    // post-quantum key exchange installs that provider before building the backend.
    #[allow(deprecated)]
    let provider = rustls::crypto::ring::default_provider();
    let _ = provider.install_default();
    match root_certificate {
        None => redis::Client::open(url),
        Some(pem) => redis::Client::build_with_tls(
            url,
            redis::TlsCertificates {
                client_tls: None,
                root_cert: Some(pem.to_vec()),
            },
        ),
    }
    .map_err(RedisBackendError::Url)
}

/// State shared with the writer: how many writes are queued or in progress.
struct Shared {
    pending: AtomicUsize,
    drained: Notify,
}

/// What the writer does, in the order queued: a removal queued after a write of the
/// same key lands after it.
pub(crate) enum Op {
    Set {
        key: String,
        value: Vec<u8>,
        ttl: Duration,
    },
    /// A command whose reply nobody waits for (a conditional write).
    Send(redis::Cmd),
    /// A command whose reply the sender waits for; without one, the sender only waits
    /// for the operations queued before. `then` is sent right after it, in the same
    /// pipeline (its reply is not looked at).
    Call {
        cmd: Option<redis::Cmd>,
        then: Option<Box<redis::Cmd>>,
        done: oneshot::Sender<CallReply>,
    },
}

/// The reply to [`Op::Call`]: `cmd`'s reply (`Nil` without one) and, if `then` was
/// sent and failed, why.
type CallReply = Result<(redis::Value, Option<RemoteError>), RemoteError>;

struct RedisStore {
    link: Arc<Link>,
    prefix: String,
    default_ttl: Duration,
    max_value_size: usize,
    queue: mpsc::Sender<Op>,
    metrics: RedisMetrics,
    shared: Arc<Shared>,
    operation_timeout: Duration,
    /// The channel of the instances' invalidations.
    channel: String,
    /// With `dependencies(true)`.
    graph: Option<GraphKeys>,
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX).max(1)
}

/// A key with the backend's prefix, written as one argument without formatting a
/// string first.
struct Prefixed<'a>(&'a str, &'a str);

impl ToRedisArgs for Prefixed<'_> {
    fn write_redis_args<W: ?Sized + RedisWrite>(&self, out: &mut W) {
        use std::io::Write;
        let mut arg = out.writer_for_next_arg();
        // writing into memory does not fail
        let _ = arg.write_all(self.0.as_bytes());
        let _ = arg.write_all(self.1.as_bytes());
    }
}

impl RedisStore {
    /// Queues an operation for the writer; a write is dropped (and counted) when the
    /// queue is full.
    pub(crate) fn queue(&self, op: Op) -> Result<(), Op> {
        self.shared.pending.fetch_add(1, Ordering::SeqCst);
        self.queue.try_send(op).map_err(|e| {
            self.shared.pending.fetch_sub(1, Ordering::SeqCst);
            match e {
                mpsc::error::TrySendError::Full(op) | mpsc::error::TrySendError::Closed(op) => op,
            }
        })
    }

    /// Runs `cmd` on the writer's connection, behind the operations queued before
    /// (Redis runs a connection's commands in order, so no queued or in-flight write
    /// of an old value lands after its removal), and waits for its reply at most the
    /// operation timeout. Without a command, only waits for the operations before.
    pub(crate) async fn call(
        &self,
        cmd: Option<redis::Cmd>,
        then: Option<Box<redis::Cmd>>,
    ) -> CallReply {
        let (done, result) = oneshot::channel();
        self.shared.pending.fetch_add(1, Ordering::SeqCst);
        match self.queue.try_send(Op::Call { cmd, then, done }) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(op)) => {
                // never dropped: it must land after the writes before it
                let queue = self.queue.clone();
                tokio::spawn(async move { queue.send(op).await });
            }
            Err(mpsc::error::TrySendError::Closed(_)) => {
                self.shared.pending.fetch_sub(1, Ordering::SeqCst);
                return Err(RemoteError("the writer has stopped".into()));
            }
        }
        match tokio::time::timeout(self.operation_timeout, result).await {
            Ok(Ok(r)) => r,
            Ok(Err(_)) => Err(RemoteError("the writer has stopped".into())),
            Err(_) => Err(RemoteError(format!(
                "not confirmed within {:?}; it stays queued behind earlier writes",
                self.operation_timeout
            ))),
        }
    }

    /// Warns about server settings that will cause trouble.
    async fn check_server(&self) {
        let policy: Result<Vec<String>, _> = self
            .link
            .query(redis::cmd("CONFIG").arg("GET").arg("maxmemory-policy"))
            .await;
        if let Ok(values) = policy {
            if values.get(1).is_some_and(|p| p == "noeviction") {
                tracing::warn!(target: "cache_redis", "Redis uses `maxmemory-policy noeviction`: once full it refuses writes. Set `maxmemory-policy volatile-lru` (cache entries always carry an expiry)");
            }
        }
    }
}

impl RemoteStore for RedisStore {
    fn get<'a>(
        &'a self,
        key: RemoteKey<'a>,
        touch: Option<Duration>,
    ) -> BoxFuture<'a, Result<Fetched, RemoteError>> {
        // bounded by the connection's response timeout (no second timer per read)
        let Some(graph) = &self.graph else {
            return Box::pin(async move {
                let value: Option<Vec<u8>> = self
                    .link
                    .request(move |cmd| {
                        key.with_text(|key| {
                            let key = Prefixed(&self.prefix, key);
                            match touch {
                                Some(d) => cmd.arg("GETEX").arg(key).arg("PX").arg(millis(d)),
                                None => cmd.arg("GET").arg(key),
                            };
                        })
                    })
                    .await?;
                Ok(value.into())
            });
        };
        // with the graph, the invalidation count comes in the same round trip; a
        // sliding entry's read is a script (by hash, with its text on `NOSCRIPT`)
        let read = move |by_hash: bool| {
            self.link
                .request::<(Option<Vec<u8>>, Option<u64>)>(move |cmd| {
                    key.with_text(|key| {
                        let key = Prefixed(&self.prefix, key);
                        let epoch = Prefixed(&graph.graph, "epoch");
                        match touch {
                            Some(d) => {
                                let (command, script) = graph.touch_script(by_hash);
                                cmd.arg(command)
                                    .arg(script)
                                    .arg(2)
                                    .arg(key)
                                    .arg(epoch)
                                    .arg(millis(d))
                            }
                            None => cmd.arg("MGET").arg(key).arg(epoch),
                        };
                    })
                })
        };
        Box::pin(async move {
            let (value, epoch) = match read(true).await {
                Err(e) if touch.is_some() && e.0.starts_with("NOSCRIPT") => read(false).await?,
                reply => reply?,
            };
            Ok(Fetched {
                value,
                epoch: epoch.unwrap_or(0),
            })
        })
    }

    fn set(&self, key: String, value: Vec<u8>, ttl: Duration) {
        if self.queue(Op::Set { key, value, ttl }).is_err() {
            self.metrics.0.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn remove(
        &self,
        keys: Vec<String>,
        publish: Option<Vec<u8>>,
    ) -> BoxFuture<'_, Result<Removed, RemoteError>> {
        Box::pin(async move {
            let cmd = (!keys.is_empty()).then(|| {
                let mut cmd = redis::cmd("DEL");
                for k in &keys {
                    cmd.arg(Prefixed(&self.prefix, k));
                }
                cmd
            });
            let publish = publish.map(|message| {
                let mut cmd = redis::cmd("PUBLISH");
                cmd.arg(&self.channel).arg(message);
                Box::new(cmd)
            });
            let (_, publish_error) = self.call(cmd, publish).await?;
            Ok(Removed {
                keys: Vec::new(),
                publish_error,
            })
        })
    }

    fn clear(&self) -> BoxFuture<'_, Result<(), RemoteError>> {
        Box::pin(async move {
            // the values, and with dependencies the graph too
            let mut prefixes = vec![self.prefix.as_str()];
            prefixes.extend(self.graph.as_ref().map(|g| g.graph.as_str()));
            for prefix in prefixes {
                let pattern = format!("{}*", glob_escape(prefix));
                let mut cursor: u64 = 0;
                loop {
                    let (next, keys): (u64, Vec<String>) = self
                        .link
                        .query(
                            redis::cmd("SCAN")
                                .arg(cursor)
                                .arg("MATCH")
                                .arg(&pattern)
                                .arg("COUNT")
                                .arg(500),
                        )
                        .await?;
                    if !keys.is_empty() {
                        self.link
                            .query::<()>(redis::cmd("UNLINK").arg(&keys))
                            .await?;
                    }
                    if next == 0 {
                        break;
                    }
                    cursor = next;
                }
            }
            Ok(())
        })
    }

    fn flush(&self, timeout: Duration) -> BoxFuture<'_, ShutdownReport> {
        Box::pin(async move {
            let before = self.metrics.written();
            let drained = tokio::time::timeout(timeout, async {
                loop {
                    let notified = self.shared.drained.notified();
                    if self.shared.pending.load(Ordering::SeqCst) == 0 {
                        return;
                    }
                    notified.await;
                }
            })
            .await;
            let written = self.metrics.written() - before;
            match drained {
                Ok(()) => ShutdownReport::new(written, 0, false),
                Err(_) => {
                    let left = self.shared.pending.load(Ordering::SeqCst) as u64;
                    tracing::warn!(target: "cache_redis", "shutdown: {left} writes to Redis were not completed within {timeout:?}");
                    ShutdownReport::new(written, left, true)
                }
            }
        })
    }

    fn max_value_size(&self) -> usize {
        self.max_value_size
    }

    fn default_ttl(&self) -> Duration {
        self.default_ttl
    }

    fn graph(&self) -> Option<&dyn RemoteGraph> {
        self.graph.as_ref().map(|_| self as &dyn RemoteGraph)
    }

    fn report(&self, stats: &mut RemoteStats) {
        let c = &self.metrics.0;
        stats.write_errors += c.failed_sets.load(Ordering::Relaxed);
        stats.linked_write_errors += c.failed_linked.load(Ordering::Relaxed);
        stats.writes_dropped += c.dropped.load(Ordering::Relaxed);
    }
}

impl RemoteGraph for RedisStore {
    fn set_linked(&self, write: LinkedWrite) {
        let Some(graph) = &self.graph else { return };
        if self.queue(Op::Send(graph.write(&write))).is_err() {
            self.metrics.0.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn invalidate(
        &self,
        start: Vec<String>,
        keep: Option<String>,
        want_keys: bool,
        publish: Option<Vec<u8>>,
    ) -> BoxFuture<'_, Result<Removed, RemoteError>> {
        Box::pin(async move {
            let Some(graph) = &self.graph else {
                return Ok(Removed::default());
            };
            let publish = publish.as_deref().map(|m| (self.channel.as_str(), m));
            let cmd = graph.invalidate(&start, keep.as_deref(), want_keys, publish);
            let (reply, _) = self.call(Some(cmd), None).await?;
            let removed: Vec<String> =
                redis::from_redis_value(reply).map_err(|e| RemoteError(e.to_string()))?;
            // the graph names entries by their value keys
            Ok(Removed {
                keys: removed
                    .into_iter()
                    .filter_map(|v| v.strip_prefix(graph.values.as_str()).map(str::to_owned))
                    .collect(),
                // the script publishes as its last step: it did if it ran
                publish_error: None,
            })
        })
    }
}

/// The background writer: takes queued operations in batches and sends each batch as
/// one pipeline, in order. A batch that fails (the connection) is counted and dropped
/// (the entries are simply not in Redis; the next miss writes them again), and its
/// removals report the failure; an operation the server refuses fails alone. Graph
/// scripts go by their hash; those the server does not have are sent again with their
/// text, in order, before the next batch.
async fn writer(
    link: Arc<Link>,
    prefix: String,
    graph: Option<GraphKeys>,
    mut rx: mpsc::Receiver<Op>,
    metrics: RedisMetrics,
    shared: Arc<Shared>,
) {
    const BATCH: usize = 128;
    let mut batch = Vec::with_capacity(BATCH);
    let warn = crate::link::RateLimited::default();
    while rx.recv_many(&mut batch, BATCH).await > 0 {
        let mut pipe = redis::pipe();
        pipe.ignore_errors();
        for op in &batch {
            match op {
                Op::Set { key, value, ttl } => {
                    pipe.cmd("SET")
                        .arg(Prefixed(&prefix, key))
                        .arg(value)
                        .arg("PX")
                        .arg(millis(*ttl));
                }
                Op::Send(cmd) => {
                    pipe.add_command(cmd.clone());
                }
                Op::Call { cmd, then, .. } => {
                    if let Some(cmd) = cmd {
                        pipe.add_command(cmd.clone());
                    }
                    if let Some(then) = then {
                        pipe.add_command((**then).clone());
                    }
                }
            }
        }
        let mut result = match pipe.is_empty() {
            true => Ok(Vec::new()),
            false => link.pipeline_again::<Vec<redis::Value>>(&pipe).await,
        };
        if let (Ok(replies), Some(graph)) = (&mut result, &graph) {
            with_text(&link, graph, &pipe, replies).await;
        }
        if let Err(e) = &result {
            let e = format!(
                "a batch of {} operations on Redis failed: {}",
                batch.len(),
                e.0
            );
            warn.warn("a batch", &RemoteError(e));
        }
        let n = batch.len();
        let mut replies = match &mut result {
            Ok(values) => std::mem::take(values).into_iter(),
            Err(_) => Vec::new().into_iter(),
        };
        let mut cmds = pipe.cmd_iter();
        // the reply of the next command sent, with what it was for the log
        let mut next = |present: bool| -> Result<redis::Value, RemoteError> {
            if !present {
                return Ok(redis::Value::Nil);
            }
            let cmd = cmds.next();
            let what = || describe(cmd, graph.as_ref());
            match &result {
                Err(e) => Err(RemoteError(format!(
                    "Redis did not answer {}: {}",
                    what(),
                    e.0
                ))),
                Ok(_) => match replies.next() {
                    Some(redis::Value::ServerError(e)) => {
                        let what = what();
                        let e = RemoteError(format!("Redis refused {what}: {}", server_words(&e)));
                        warn.warn(&what, &e);
                        Err(e)
                    }
                    Some(v) => Ok(v),
                    None => Err(RemoteError(format!("no reply to {}", what()))),
                },
            }
        };
        for op in batch.drain(..) {
            match op {
                Op::Set { .. } | Op::Send(_) => {
                    let counter = match (next(true), &op) {
                        (Ok(_), _) => &metrics.0.written,
                        (Err(_), Op::Set { .. }) => &metrics.0.failed_sets,
                        (Err(_), _) => &metrics.0.failed_linked,
                    };
                    counter.fetch_add(1, Ordering::Relaxed);
                }
                Op::Call { cmd, then, done } => {
                    let reply = next(cmd.is_some());
                    let then = next(then.is_some()).err();
                    let _ = done.send(reply.map(|v| (v, then)));
                }
            }
        }
        if shared.pending.fetch_sub(n, Ordering::SeqCst) == n {
            shared.drained.notify_waiters();
        }
    }
}

/// What a command sent by the writer is, for errors and the log: its name, and for a
/// graph script, which one.
fn describe(cmd: Option<&redis::Cmd>, graph: Option<&GraphKeys>) -> String {
    let Some(cmd) = cmd else {
        return "a command".to_owned();
    };
    let name = match cmd.args_iter().next() {
        Some(redis::Arg::Simple(name)) => String::from_utf8_lossy(name).to_ascii_uppercase(),
        _ => "a command".to_owned(),
    };
    match graph.and_then(|g| g.script_name(cmd)) {
        Some(script) => format!("{name} ({script})"),
        None => name,
    }
}

/// The server's words for an error reply: its code and details.
pub(crate) fn server_words(e: &redis::ServerError) -> String {
    match e.details() {
        Some(details) => format!("{} {details}", e.code()),
        None => e.code().to_owned(),
    }
}

/// Sends again, with their text, the graph scripts of `pipe` the server did not have
/// (`NOSCRIPT`), in order, and puts their replies in `replies`. If that fails, their
/// replies stay errors.
async fn with_text(
    link: &Arc<Link>,
    graph: &GraphKeys,
    pipe: &redis::Pipeline,
    replies: &mut [redis::Value],
) {
    let unknown =
        |v: &redis::Value| matches!(v, redis::Value::ServerError(e) if e.code() == "NOSCRIPT");
    if !replies.iter().any(unknown) {
        return;
    }
    let mut again = redis::pipe();
    again.ignore_errors();
    let mut at = Vec::new();
    for (i, cmd) in pipe.cmd_iter().enumerate() {
        if replies.get(i).is_some_and(unknown) {
            if let Some(eval) = graph.with_text(cmd) {
                again.add_command(eval);
                at.push(i);
            }
        }
    }
    if at.is_empty() {
        return;
    }
    if let Ok(values) = link.query_pipeline::<Vec<redis::Value>>(&again).await {
        for (i, v) in at.into_iter().zip(values) {
            replies[i] = v;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn glob_escape_escapes() {
        assert_eq!(glob_escape("shop:1:"), "shop:1:");
        assert_eq!(glob_escape("a*b?[c]\\"), "a\\*b\\?\\[c\\]\\\\");
    }

    #[tokio::test]
    async fn bad_settings_are_refused() {
        let err = RedisBackend::builder("redis://127.0.0.1:1/0")
            .key_prefix("")
            .build()
            .await
            .unwrap_err();
        assert!(err.to_string().contains("key_prefix"), "{err}");
        let err = RedisBackend::builder("http://nope")
            .build()
            .await
            .unwrap_err();
        assert!(matches!(err, RedisBackendError::Url(_)), "{err}");
    }
}
