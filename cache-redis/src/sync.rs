//! `RedisSync`: in-memory caches kept in sync across instances over Redis pub/sub.

use std::fmt;
use std::time::Duration;

use cache_runtime::{BoxFuture, BusReceiver, InvalidationBus, RemoteError};

use crate::backend::{channel_name, endpoint, RedisBackendError};
use crate::bus::RedisBus;
use crate::endpoint::Deadlines;
use crate::link::Link;

/// Configures a [`RedisSync`].
#[must_use = "call `.build().await`"]
pub struct RedisSyncBuilder {
    url: String,
    channel_prefix: String,
    operation_timeout: Duration,
    lazy: bool,
    root_certificate: Option<Vec<u8>>,
    seed_nodes: Vec<String>,
}

impl fmt::Debug for RedisSyncBuilder {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisSyncBuilder")
            .field("channel_prefix", &self.channel_prefix)
            .field("operation_timeout", &self.operation_timeout)
            .field("lazy", &self.lazy)
            .finish_non_exhaustive()
    }
}

impl RedisSyncBuilder {
    /// The instances that share this prefix (and server) keep each other in sync; the
    /// channel is `{prefix}:invalidations`, as for a `RedisBackend` with the same
    /// `key_prefix`. Default: `cache`.
    pub fn channel_prefix(mut self, prefix: impl Into<String>) -> Self {
        self.channel_prefix = prefix.into();
        self
    }

    /// How long publishing an invalidation may take before the call goes on without
    /// it (counted in `publish_errors`). Default: 200 ms.
    pub fn operation_timeout(mut self, timeout: Duration) -> Self {
        self.operation_timeout = timeout;
        self
    }

    /// With `true`, `build` succeeds while Redis is down: the instance subscribes when
    /// Redis answers (and clears its cache then). Default: `false`, `build` fails.
    pub fn connect_lazily(mut self, lazy: bool) -> Self {
        self.lazy = lazy;
        self
    }

    /// More nodes of a Redis Cluster, tried in turn when the URL's does not answer
    /// (see [`RedisBackendBuilder::seed_nodes`](crate::RedisBackendBuilder::seed_nodes)).
    pub fn seed_nodes<S: Into<String>>(mut self, urls: impl IntoIterator<Item = S>) -> Self {
        self.seed_nodes = urls.into_iter().map(Into::into).collect();
        self
    }

    /// For `rediss://` URLs: trust this certificate (PEM) instead of the system's
    /// root certificates.
    pub fn tls_root_certificate(mut self, pem: impl Into<Vec<u8>>) -> Self {
        self.root_certificate = Some(pem.into());
        self
    }

    /// Connects and subscribes (unless lazy). Needs a tokio runtime.
    pub async fn build(self) -> Result<RedisSync, RedisBackendError> {
        if self.channel_prefix.is_empty() || self.channel_prefix.contains(char::is_whitespace) {
            return Err(RedisBackendError::Config(
                "channel_prefix must be non-empty and without spaces",
            ));
        }
        if self.operation_timeout.is_zero() {
            return Err(RedisBackendError::Config(
                "operation_timeout must be positive",
            ));
        }
        let (endpoint, addr, user) = endpoint(
            &self.url,
            &self.seed_nodes,
            self.root_certificate.as_deref(),
        )?;
        let channel = channel_name(&self.channel_prefix);
        let publisher = Link::open(endpoint.clone(), self.operation_timeout, self.lazy)
            .await
            .map_err(|source| RedisBackendError::Connect {
                addr: addr.clone(),
                source,
            })?;
        let bus = RedisBus::start(
            endpoint.clone(),
            publisher,
            channel.clone(),
            self.lazy,
            self.operation_timeout,
            None,
        )
        .await
        .map_err(|source| RedisBackendError::subscribing(&addr, &user, &channel, true, source))?;
        if !self.lazy {
            // what the bus needs besides SUBSCRIBE: PUBLISH on the channel, PING
            let timeout = self
                .operation_timeout
                .max(std::time::Duration::from_secs(1));
            let mut con = endpoint
                .connect(timeout, timeout, Deadlines::Connection)
                .await
                .map_err(|source| RedisBackendError::Connect {
                    addr: addr.clone(),
                    source,
                })?;
            let needs = crate::probe::Needs {
                values: None,
                user: &user,
                key_prefix: &self.channel_prefix,
                channel: &channel,
                subscriber: true,
                single_flight: false,
                graph: None,
            };
            crate::probe::probe(&mut con, &needs)
                .await
                .map_err(|p| RedisBackendError::from_problem(&addr, p))?;
        }
        Ok(RedisSync { bus })
    }
}

/// Keeps in-memory caches in sync across instances over Redis pub/sub: every
/// invalidation (by key, by dependency, `refresh!`, `clear`) is published, and every
/// other instance drops what it names. No value is ever written to Redis.
///
/// ```no_run
/// use cache_redis::RedisSync;
/// use cache_runtime::{CachingService, MemoryBackend};
///
/// # async fn run() -> Result<(), Box<dyn std::error::Error>> {
/// CachingService::builder()
///     .backend(MemoryBackend::new().max_entries(50_000))
///     .sync(RedisSync::builder("redis://127.0.0.1:6379").channel_prefix("shop").build().await?)
///     .install()?;
/// # Ok(()) }
/// ```
///
/// Pub/sub is at most once: after a lost subscription (server restart, `CLIENT KILL`,
/// a connection that stopped answering its periodic `PING`), the instance clears its
/// cache as soon as it notices, resubscribes by itself, and clears it again once
/// subscribed (counted in `stats().sync.l1_clears`).
pub struct RedisSync {
    bus: RedisBus,
}

impl fmt::Debug for RedisSync {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisSync")
            .field("channel", &self.bus.channel())
            .field("subscribed", &self.bus.is_subscribed())
            .finish()
    }
}

impl RedisSync {
    /// Starts configuring a sync for the server at `url`.
    pub fn builder(url: impl Into<String>) -> RedisSyncBuilder {
        RedisSyncBuilder {
            url: url.into(),
            channel_prefix: "cache".into(),
            operation_timeout: Duration::from_millis(200),
            lazy: false,
            root_certificate: None,
            seed_nodes: Vec::new(),
        }
    }

    /// Whether it is subscribed now (false while Redis is unreachable).
    pub fn is_subscribed(&self) -> bool {
        self.bus.is_subscribed()
    }
}

impl InvalidationBus for RedisSync {
    fn attach(&self, receiver: BusReceiver) {
        self.bus.attach(receiver);
    }

    fn publish(&self, payload: Vec<u8>) -> BoxFuture<'_, Result<(), RemoteError>> {
        self.bus.publish(payload)
    }
}
