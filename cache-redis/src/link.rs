//! One multiplexed connection to Redis, replaced when it breaks.
//!
//! A call takes the current connection with one lock-free load and a clone (no
//! shared future, no extra boxing), which is what keeps an L2 hit close to a raw
//! redis-rs GET under load. When a command fails in a way that leaves the connection
//! unusable (the server closed it, a protocol error), the connection is dropped and
//! one task reconnects in the background. While there is no connection, a call waits
//! for a running attempt at most the operation timeout, and otherwise fails at once:
//! the caller runs the body, so Redis being down never blocks anyone. Failed attempts
//! back off from 25 ms to 1 s, so a server that is down is not flooded with connects.

use std::future::Future;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use arc_swap::ArcSwapOption;
use cache_runtime::RemoteError;
use redis::aio::MultiplexedConnection;
use redis::{AsyncConnectionConfig, Client, RedisError, RedisResult};
use tokio::sync::Notify;
use tokio::time::Instant;

const FIRST_RETRY: Duration = Duration::from_millis(25);
const MAX_RETRY: Duration = Duration::from_secs(1);

struct Current {
    conn: MultiplexedConnection,
    generation: u64,
}

/// Reconnection state: changed only by the attempts, under the mutex.
struct Attempts {
    connecting: bool,
    /// Before this instant no new attempt starts (after a failed one).
    retry_at: Option<Instant>,
    delay: Duration,
    generation: u64,
}

pub(crate) struct Link {
    client: Client,
    config: AsyncConnectionConfig,
    connect_timeout: Duration,
    /// How long a call waits for a connection attempt that is under way.
    wait: Duration,
    current: ArcSwapOption<Current>,
    attempts: Mutex<Attempts>,
    /// Woken when an attempt ends.
    attempted: Notify,
}

impl Link {
    /// A link to the server `client` points at; connects now unless `lazy`.
    pub(crate) async fn open(
        client: Client,
        timeout: Duration,
        lazy: bool,
    ) -> Result<Arc<Link>, RedisError> {
        let connect_timeout = timeout.max(Duration::from_secs(1));
        let config = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(connect_timeout))
            .set_response_timeout(Some(timeout));
        let link = Arc::new(Link {
            client,
            config,
            connect_timeout,
            wait: timeout,
            current: ArcSwapOption::empty(),
            attempts: Mutex::new(Attempts {
                connecting: false,
                retry_at: None,
                delay: Duration::ZERO,
                generation: 0,
            }),
            attempted: Notify::new(),
        });
        if !lazy {
            let conn = link.dial().await?;
            link.install(conn);
        }
        Ok(link)
    }

    /// Sends one command.
    pub(crate) async fn query<T: redis::FromRedisValue>(
        self: &Arc<Self>,
        cmd: &redis::Cmd,
    ) -> Result<T, RemoteError> {
        self.send(|mut conn| async move { cmd.query_async(&mut conn).await })
            .await
    }

    /// Sends a pipeline.
    pub(crate) async fn query_pipeline<T: redis::FromRedisValue>(
        self: &Arc<Self>,
        pipe: &redis::Pipeline,
    ) -> Result<T, RemoteError> {
        self.send(|mut conn| async move { pipe.query_async(&mut conn).await })
            .await
    }

    async fn send<T, F, Fut>(self: &Arc<Self>, f: F) -> Result<T, RemoteError>
    where
        F: FnOnce(MultiplexedConnection) -> Fut,
        Fut: Future<Output = RedisResult<T>>,
    {
        let (conn, generation) = self.connection().await?;
        f(conn).await.map_err(|e| {
            if e.is_unrecoverable_error() {
                self.broken(generation);
            }
            RemoteError(e.to_string())
        })
    }

    /// The current connection, or the one an attempt under way makes within the wait.
    async fn connection(self: &Arc<Self>) -> Result<(MultiplexedConnection, u64), RemoteError> {
        if let Some(c) = &*self.current.load() {
            return Ok((c.conn.clone(), c.generation));
        }
        let mut notified = std::pin::pin!(self.attempted.notified());
        notified.as_mut().enable();
        if let Some(c) = &*self.current.load() {
            return Ok((c.conn.clone(), c.generation));
        }
        if self.start_attempt() {
            // one attempt at most: its outcome is final for this call
            let _ = tokio::time::timeout(self.wait, notified).await;
            if let Some(c) = &*self.current.load() {
                return Ok((c.conn.clone(), c.generation));
            }
        }
        Err(RemoteError("not connected to Redis".into()))
    }

    /// Starts a connection attempt unless one runs or the last failure is too recent.
    /// Returns whether an attempt is under way.
    fn start_attempt(self: &Arc<Self>) -> bool {
        let mut a = self.attempts.lock().unwrap_or_else(PoisonError::into_inner);
        if a.connecting {
            return true;
        }
        if a.retry_at.is_some_and(|t| Instant::now() < t) {
            return false;
        }
        a.connecting = true;
        let link = self.clone();
        tokio::spawn(async move { link.attempt().await });
        true
    }

    async fn attempt(self: Arc<Self>) {
        let result = self.dial().await;
        {
            let mut a = self.attempts.lock().unwrap_or_else(PoisonError::into_inner);
            a.connecting = false;
            match result {
                Ok(conn) => {
                    drop(a);
                    self.install(conn);
                    tracing::info!(target: "cache_redis", "connected to Redis");
                }
                Err(e) => {
                    a.delay = (a.delay * 2).clamp(FIRST_RETRY, MAX_RETRY);
                    a.retry_at = Some(Instant::now() + a.delay);
                    tracing::debug!(target: "cache_redis", error = %e, "connecting to Redis failed; next attempt in {:?}", a.delay);
                }
            }
        }
        self.attempted.notify_waiters();
    }

    async fn dial(&self) -> Result<MultiplexedConnection, RedisError> {
        let dial = self
            .client
            .get_multiplexed_async_connection_with_config(&self.config);
        match tokio::time::timeout(self.connect_timeout, dial).await {
            Ok(result) => result,
            Err(_) => Err(std::io::Error::from(std::io::ErrorKind::TimedOut).into()),
        }
    }

    fn install(&self, conn: MultiplexedConnection) {
        let mut a = self.attempts.lock().unwrap_or_else(PoisonError::into_inner);
        a.generation += 1;
        a.retry_at = None;
        a.delay = Duration::ZERO;
        self.current.store(Some(Arc::new(Current {
            conn,
            generation: a.generation,
        })));
    }

    /// Drops the connection of `generation` (if it is still the current one) and
    /// starts reconnecting.
    fn broken(self: &Arc<Self>, generation: u64) {
        let current = self.current.load();
        if current.as_ref().is_some_and(|c| c.generation == generation) {
            self.current
                .compare_and_swap(&current, None::<Arc<Current>>);
            tracing::debug!(target: "cache_redis", "the connection to Redis broke; reconnecting");
            self.start_attempt();
        }
    }
}
