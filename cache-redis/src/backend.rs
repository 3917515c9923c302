//! `RedisBackend`: Redis as the remote (L2) tier.

use std::fmt;
use std::sync::atomic::AtomicUsize;
use std::sync::Arc;
use std::time::Duration;

use cache_runtime::{Backend, Backoff, MemoryBackend, FORMAT_VERSION};
use tokio::sync::{mpsc, Notify};

use crate::bus::RedisBus;
use crate::cluster::{Recent, Replayer};
use crate::endpoint::{Conn, Deadlines, Endpoint};
use crate::graph::GraphKeys;
use crate::link::Link;
use crate::single_flight::Locks;
use crate::store::RedisStore;
use crate::writer::{writer, Backlog, Op, RedisMetrics};

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
        l1: bool,
        source: redis::RedisError,
    ) -> Self {
        if source.code() == Some("NOPERM") {
            let (feature, without) = match l1 {
                true => (
                    format!("the in-process tier, which hears the other instances' invalidations on `{channel}`,"),
                    "an in-process tier",
                ),
                false => (
                    format!("distributed single flight, whose waiters hear the locks' releases on `{channel}`,"),
                    "distributed_single_flight",
                ),
            };
            RedisBackendError::Refused {
                addr: addr.to_owned(),
                command: "SUBSCRIBE".to_owned(),
                feature,
                words: crate::endpoint::words(&source),
                fix: format!(
                    "grant it: `ACL SETUSER {user} +subscribe +ping &{channel}`, or build without {without}"
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
    seed_nodes: Vec<String>,
    replay_window: Duration,
    single_flight: bool,
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

    /// More nodes of a Redis Cluster, tried in turn at `build` (and at each
    /// reconnection) when the URL's does not answer. The URL, and any of these, may
    /// be a standalone server or any node of a cluster: which one is found out at the
    /// first connection, and a cluster's other nodes are discovered from it.
    pub fn seed_nodes<S: Into<String>>(mut self, urls: impl IntoIterator<Item = S>) -> Self {
        self.seed_nodes = urls.into_iter().map(Into::into).collect();
        self
    }

    /// On a Redis Cluster: how long this instance remembers the keys it removed, to
    /// apply those removals again after a failover (a promoted replica may never have
    /// seen them). Longer than the cluster takes to promote a replica. Default: 30 s.
    pub fn replay_window(mut self, window: Duration) -> Self {
        self.replay_window = window;
        self
    }

    /// With `true`, concurrent misses of one key on any number of instances run its
    /// body once. The miss's read takes the key's lock in Redis in the same round
    /// trip (a script instead of `GET`); the other instances wait for the holder's
    /// value, told by a message on the prefix's channel (and reading again every
    /// second, since pub/sub may lose one), at most the function's `lock_timeout`,
    /// then run the body themselves. A lock whose holder died expires after
    /// `lock_timeout`; a body that fails releases it at once, and the waiters run the
    /// body themselves (or serve a fail-safe fallback). With a `soft_timeout` and a
    /// fallback, a waiter answers with the fallback after the soft timeout. Lock keys
    /// are `{prefix}:lock:...`; `shutdown()` releases those still held. Needs
    /// `EVALSHA` and `SUBSCRIBE` on the channel (checked by `build`). Default: `false`.
    pub fn distributed_single_flight(mut self, enabled: bool) -> Self {
        self.single_flight = enabled;
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
        let (endpoint, addr, user) = endpoint(
            &self.url,
            &self.seed_nodes,
            self.root_certificate.as_deref(),
        )?;
        // Reads and writes use separate connections: Redis answers a connection's
        // commands in order, so reads sharing one with a slow write would wait for it.
        let open = || async {
            Link::open(endpoint.clone(), self.operation_timeout, self.lazy)
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
        let shared = Arc::new(Backlog {
            pending: AtomicUsize::new(0),
            drained: Notify::new(),
        });
        let graph = self
            .dependencies
            .then(|| GraphKeys::new(&self.key_prefix, self.marker_ttl, Some(endpoint.clone())));
        tokio::spawn(writer(
            writes,
            prefix.clone(),
            rx,
            metrics.clone(),
            shared.clone(),
        ));
        let channel = channel_name(&self.key_prefix);
        // Every instance publishes its invalidations; one with an in-process tier also
        // listens to the others'.
        let locks = self
            .single_flight
            .then(|| Arc::new(Locks::new(&self.key_prefix, &prefix, &channel)));
        let bus = match self.l1.is_some() || locks.is_some() {
            true => RedisBus::start(
                endpoint.clone(),
                reads.clone(),
                channel.clone(),
                self.lazy,
                self.operation_timeout,
                locks.clone(),
            )
            .await
            .map_err(|source| {
                RedisBackendError::subscribing(&addr, &user, &channel, self.l1.is_some(), source)
            })?,
            false => RedisBus::publish_only(reads.clone(), channel.clone(), self.operation_timeout),
        };
        let recent = Arc::new(Recent::new(self.replay_window));
        let replayer = Arc::new(Replayer {
            prefix: prefix.clone(),
            graph: graph.clone(),
            endpoint: endpoint.clone(),
            receivers: bus.receivers(),
        });
        // on a cluster, watches for failovers (ends at once on a standalone server)
        tokio::spawn(crate::cluster::watch(
            reads.clone(),
            Arc::downgrade(&recent),
            Arc::downgrade(&replayer),
            self.operation_timeout.max(Duration::from_millis(500)),
        ));
        let store = RedisStore {
            recent,
            _replayer: replayer,
            unburied: std::sync::Mutex::default(),
            link: reads,
            prefix,
            default_ttl: self.default_ttl,
            max_value_size: self.max_value_size,
            queue: tx,
            metrics: metrics.clone(),
            backlog: shared,
            operation_timeout: self.operation_timeout,
            channel,
            graph,
            locks,
        };
        let probe = Probe {
            endpoint: endpoint.clone(),
            addr: addr.clone(),
            user,
            key_prefix: self.key_prefix.clone(),
            values: store.prefix.clone(),
            channel: store.channel.clone(),
            subscriber: self.l1.is_some() || self.single_flight,
            single_flight: self.single_flight,
            graph: store.graph.clone(),
            timeout: self.operation_timeout.max(Duration::from_secs(1)),
        };
        if self.lazy {
            // checked once Redis answers; until then (and if refused) the service
            // copes: nothing stale is served
            let alive = store.queue.downgrade();
            tokio::spawn(async move { probe.later(alive).await });
        } else {
            let mut con = probe.connect().await?;
            if store
                .graph
                .as_ref()
                .is_some_and(|g| g.on_cluster() && !g.one_slot())
            {
                return Err(RedisBackendError::Config(CLUSTER_GRAPH_PREFIX));
            }
            if let (Some(graph), Conn::Cluster(cluster)) = (&store.graph, &con) {
                // the graph's identity, which its scripts then check
                let known = async {
                    let masters = crate::topology::topology(cluster).await?.masters;
                    let replicas = |slot| endpoint.replicas_of(slot);
                    crate::cluster::know_graph(&store.link, cluster, graph, &masters, &replicas)
                        .await
                };
                known.await.map_err(|e| {
                    RedisBackendError::Command(format!(
                        "reading the dependency graph's identity: {}",
                        crate::endpoint::words(&e)
                    ))
                })?;
            }
            probe.run(&mut con).await?;
            crate::settings::check(&mut con, self.dependencies)
                .await
                .map_err(|problem| RedisBackendError::ServerSettings {
                    addr: addr.clone(),
                    problem,
                })?;
        }
        Ok(RedisBackend {
            store,
            l1: self.l1,
            bus,
            metrics,
        })
    }
}

/// Why a prefix is refused for the dependency graph on a cluster.
pub(crate) const CLUSTER_GRAPH_PREFIX: &str = "with dependencies(true) on a Redis Cluster, the key_prefix must not contain `{}`: the graph's keys carry the prefix as their hash tag, so that they share one slot";

/// What `build` checks (see [`crate::probe`]).
struct Probe {
    endpoint: Arc<Endpoint>,
    addr: String,
    user: String,
    key_prefix: String,
    values: String,
    channel: String,
    subscriber: bool,
    single_flight: bool,
    graph: Option<GraphKeys>,
    timeout: Duration,
}

impl Probe {
    async fn connect(&self) -> Result<Conn, RedisBackendError> {
        self.endpoint
            .connect(self.timeout, self.timeout, Deadlines::Connection)
            .await
            .map_err(|source| RedisBackendError::Connect {
                addr: self.addr.clone(),
                source,
            })
    }

    /// Runs every command the configuration needs once.
    async fn run(&self, con: &mut Conn) -> Result<(), RedisBackendError> {
        let needs = crate::probe::Needs {
            values: Some(&self.values),
            user: &self.user,
            key_prefix: &self.key_prefix,
            channel: &self.channel,
            subscriber: self.subscriber,
            single_flight: self.single_flight,
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
            seed_nodes: Vec::new(),
            replay_window: Duration::from_secs(30),
            single_flight: false,
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

/// Where to connect: `url`, then the `seeds`, trusting `root_certificate` (PEM) for
/// TLS if given; with the first address (for errors) and the URL's user.
pub(crate) fn endpoint(
    url: &str,
    seeds: &[String],
    root_certificate: Option<&[u8]>,
) -> Result<(Arc<Endpoint>, String, String), RedisBackendError> {
    let clients = std::iter::once(url)
        .chain(seeds.iter().map(String::as_str))
        .map(|url| client(url, root_certificate))
        .collect::<Result<Vec<_>, _>>()?;
    let endpoint = Endpoint::new(clients, root_certificate.map(<[u8]>::to_vec));
    let (addr, user) = (endpoint.addr(), user_of(endpoint.first()));
    Ok((Arc::new(endpoint), addr, user))
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::graph::glob_escape;

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
