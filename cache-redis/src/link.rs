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
//!
//! A call sends on its own handle to the connection. Cloning one increments counters
//! that every thread shares, which under load costs more than the rest of the call's
//! bookkeeping, so each thread keeps the handles its calls are done with (up to
//! [`SPARES_PER_THREAD`]) and lends them to its next calls, each with a command
//! buffer: a read builds its command without allocating. Spares of an older
//! connection are dropped when met; when any link is dropped, every thread drops its
//! spares at its next call. Commands go to `MultiplexedConnection::send_packed_command`
//! directly, not through `ConnectionLike`, which boxes every request's future.

use std::cell::RefCell;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use arc_swap::ArcSwapOption;
use cache_runtime::{Backoff, RemoteError};
use redis::{Cmd, FromRedisValue, RedisError, RedisResult, Value};
use tokio::sync::Notify;
use tokio::time::Instant;

use crate::deadline;
use crate::endpoint::{Conn, Deadlines, Endpoint};

/// How many idle connection handles a thread keeps, over all links.
const SPARES_PER_THREAD: usize = 64;

static NEXT_LINK: AtomicU64 = AtomicU64::new(1);
/// How many links were dropped in this process: a thread that sees it change drops
/// its spares, so no handle outlives its link for long.
static LINKS_DROPPED: AtomicU64 = AtomicU64::new(0);

/// What one call sends with: a handle to the connection of `link` made in
/// `generation`, and a command buffer, kept by the thread for its next calls.
struct Handle {
    link: u64,
    generation: u64,
    conn: Conn,
    cmd: Cmd,
}

// Boxed on purpose: a call takes its handle out and gives it back, and moving a
// pointer is cheaper than moving the handle (it measured 400 instructions a read).
#[allow(clippy::vec_box)]
struct Spares {
    links_dropped: u64,
    conns: Vec<Box<Handle>>,
}

#[allow(clippy::vec_box)]
impl Spares {
    fn current(&mut self) -> &mut Vec<Box<Handle>> {
        let dropped = LINKS_DROPPED.load(Ordering::Relaxed);
        if dropped != self.links_dropped {
            self.conns.clear();
            self.links_dropped = dropped;
        }
        &mut self.conns
    }
}

thread_local! {
    static SPARES: RefCell<Spares> = const {
        RefCell::new(Spares { links_dropped: 0, conns: Vec::new() })
    };
}

struct Current {
    conn: Conn,
    generation: u64,
}

/// Reconnection state: changed only by the attempts, under the mutex.
struct Attempts {
    connecting: bool,
    /// Before this instant no new attempt starts (after a failed one).
    retry_at: Option<Instant>,
    backoff: Backoff,
    generation: u64,
}

pub(crate) struct Link {
    id: u64,
    /// The current connection's generation (0: none), for checking spares.
    generation: AtomicU64,
    endpoint: Arc<Endpoint>,
    connect_timeout: Duration,
    response_timeout: Duration,
    /// How long a call waits for a connection attempt that is under way.
    wait: Duration,
    current: ArcSwapOption<Current>,
    attempts: Mutex<Attempts>,
    /// Woken when an attempt ends.
    attempted: Notify,
}

impl Link {
    /// A link to the server or cluster `endpoint` names; connects now unless `lazy`.
    pub(crate) async fn open(
        endpoint: Arc<Endpoint>,
        timeout: Duration,
        lazy: bool,
    ) -> Result<Arc<Link>, RedisError> {
        let connect_timeout = timeout.max(Duration::from_secs(1));
        let link = Arc::new(Link {
            id: NEXT_LINK.fetch_add(1, Ordering::Relaxed),
            generation: AtomicU64::new(0),
            endpoint,
            connect_timeout,
            response_timeout: timeout,
            wait: timeout,
            current: ArcSwapOption::empty(),
            attempts: Mutex::new(Attempts {
                connecting: false,
                retry_at: None,
                backoff: Backoff::RECONNECT,
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

    /// Sends the command `build` writes, in a buffer the thread reuses: the read path,
    /// which allocates no command of its own.
    pub(crate) async fn request<T: FromRedisValue>(
        self: &Arc<Self>,
        build: impl FnOnce(&mut Cmd),
    ) -> Result<T, RemoteError> {
        let mut handle = self.prepared(build).await?;
        let result = send(&mut handle.conn, &handle.cmd, self.response_timeout).await;
        self.done(handle, result)
    }

    /// [`Link::request`] on a cluster: the same, in a future that does not hold the
    /// single server's send (about 1.1 KB, never used on a cluster), so that the read's
    /// boxed future fits the allocator's per-thread cache (64 tasks of L2 hits on a
    /// 3-master cluster: 0.85x a raw cluster `GET`'s throughput with it inline).
    pub(crate) async fn request_routed<T: FromRedisValue>(
        self: &Arc<Self>,
        build: impl FnOnce(&mut Cmd),
    ) -> Result<T, RemoteError> {
        let mut handle = self.prepared(build).await?;
        let sent = match &mut handle.conn {
            Conn::Cluster(c) => c.send(&handle.cmd),
            // (not used on one server, whose connection has no timeout of its own)
            conn => deadline::within(
                self.response_timeout,
                redis::aio::ConnectionLike::req_packed_command(conn, &handle.cmd),
            ),
        };
        let reply = sent.await;
        let result = reply.and_then(|r| Ok(redis::from_redis_value(r.extract_error()?)?));
        self.done(handle, result)
    }

    /// A connection handle (a ready one if the thread holds one) with the command
    /// `build` writes in its buffer.
    async fn prepared(
        self: &Arc<Self>,
        build: impl FnOnce(&mut Cmd),
    ) -> Result<Box<Handle>, RemoteError> {
        let mut handle = match self.ready() {
            Some(handle) => handle,
            None => Box::pin(self.connection()).await?,
        };
        handle.cmd.clear();
        build(&mut handle.cmd);
        Ok(handle)
    }

    /// Sends one command.
    pub(crate) async fn query<T: FromRedisValue>(
        self: &Arc<Self>,
        cmd: &Cmd,
    ) -> Result<T, RemoteError> {
        let mut handle = self.connection().await?;
        let result = send(&mut handle.conn, cmd, self.response_timeout).await;
        self.done(handle, result)
    }

    /// Sends a pipeline.
    pub(crate) async fn query_pipeline<T: FromRedisValue>(
        self: &Arc<Self>,
        pipe: &redis::Pipeline,
    ) -> Result<T, RemoteError> {
        let mut handle = self.connection().await?;
        let result = match &mut handle.conn {
            Conn::Node(c) => deadline::within(self.response_timeout, pipe.query_async(c)).await,
            Conn::Cluster(c) => match crate::endpoint::cluster_pipeline(
                c,
                pipe,
                &|slot| self.endpoint.replicas_of(slot),
                &|slot| self.endpoint.slot_now(slot),
            )
            .await
            {
                Ok(replies) => redis::from_redis_value(Value::Array(replies)).map_err(Into::into),
                Err(e) => Err(e),
            },
        };
        self.done(handle, result)
    }

    /// Sends one command, and once more if it failed at once: the connection had
    /// dropped (a server restart, a killed client), which a command finds out only
    /// when it is sent. For commands that may run twice (`PUBLISH`, `DEL`, `SET`).
    pub(crate) async fn query_again<T: FromRedisValue>(
        self: &Arc<Self>,
        cmd: &Cmd,
    ) -> Result<T, RemoteError> {
        let start = Instant::now();
        match self.query(cmd).await {
            Err(_) if start.elapsed() < self.wait / 2 => self.query(cmd).await,
            result => result,
        }
    }

    /// [`Link::query_again`] for a pipeline.
    pub(crate) async fn pipeline_again<T: FromRedisValue>(
        self: &Arc<Self>,
        pipe: &redis::Pipeline,
    ) -> Result<T, RemoteError> {
        let start = Instant::now();
        match self.query_pipeline(pipe).await {
            Err(_) if start.elapsed() < self.wait / 2 => self.query_pipeline(pipe).await,
            result => result,
        }
    }

    /// After a command: keeps the handle for this thread's next call, or drops the
    /// connection if the error left it unusable.
    fn done<T>(
        self: &Arc<Self>,
        handle: Box<Handle>,
        result: RedisResult<T>,
    ) -> Result<T, RemoteError> {
        match result {
            // a cluster connection reconnects to its nodes by itself
            Err(e) if e.is_unrecoverable_error() && matches!(handle.conn, Conn::Node(_)) => {
                self.broken(handle.generation);
                Err(RemoteError(e.to_string()))
            }
            result => {
                self.give_back(handle);
                // a server's error as it says it: its code, then its words
                result.map_err(|e| RemoteError(crate::endpoint::words(&e)))
            }
        }
    }

    /// A spare handle to the current connection, kept by this thread.
    fn take_spare(&self) -> Option<Box<Handle>> {
        let generation = self.generation.load(Ordering::Acquire);
        if generation == 0 {
            return None;
        }
        SPARES
            .try_with(|spares| {
                let mut spares = spares.try_borrow_mut().ok()?;
                let conns = spares.current();
                loop {
                    let i = conns.iter().rposition(|s| s.link == self.id)?;
                    let spare = conns.swap_remove(i);
                    if spare.generation == generation {
                        return Some(spare);
                    }
                }
            })
            .ok()
            .flatten()
    }

    fn give_back(&self, handle: Box<Handle>) {
        if handle.generation != self.generation.load(Ordering::Relaxed) {
            return;
        }
        let _ = SPARES.try_with(|spares| {
            if let Ok(mut spares) = spares.try_borrow_mut() {
                // spares of dropped links are cleared when a handle is taken
                let conns = &mut spares.conns;
                if conns.len() < SPARES_PER_THREAD {
                    conns.push(handle);
                }
            }
        });
    }

    /// A handle to the current connection, if there is one: a spare, or a new one.
    fn ready(&self) -> Option<Box<Handle>> {
        self.take_spare().or_else(|| self.current())
    }

    /// The current connection, or the one an attempt under way makes within the wait.
    async fn connection(self: &Arc<Self>) -> Result<Box<Handle>, RemoteError> {
        if let Some(conn) = self.ready() {
            return Ok(conn);
        }
        let mut notified = std::pin::pin!(self.attempted.notified());
        notified.as_mut().enable();
        if let Some(conn) = self.current() {
            return Ok(conn);
        }
        if self.start_attempt() {
            // one attempt at most: its outcome is final for this call
            let _ = tokio::time::timeout(self.wait, notified).await;
            if let Some(conn) = self.current() {
                return Ok(conn);
            }
        }
        Err(RemoteError("not connected to Redis".into()))
    }

    /// The current connection, if there is one (without waiting for an attempt).
    pub(crate) fn conn(&self) -> Option<Conn> {
        self.current.load().as_ref().map(|c| c.conn.clone())
    }

    /// Drops the current connection and connects again (a cluster connection that
    /// stopped recovering by itself).
    pub(crate) fn redial(self: &Arc<Self>) {
        let generation = self.generation.load(Ordering::Acquire);
        if generation != 0 {
            self.broken(generation);
        }
    }

    /// The server or cluster this link connects to.
    pub(crate) fn endpoint(&self) -> &Arc<Endpoint> {
        &self.endpoint
    }

    /// A new handle to the current connection.
    fn current(&self) -> Option<Box<Handle>> {
        let current = self.current.load();
        let c = current.as_ref()?;
        Some(Box::new(Handle {
            link: self.id,
            generation: c.generation,
            conn: c.conn.clone(),
            cmd: Cmd::new(),
        }))
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
                    let delay = a.backoff.next_delay();
                    a.retry_at = Some(Instant::now() + delay);
                    tracing::debug!(target: "cache_redis", error = %e, "connecting to Redis failed; next attempt in {delay:?}");
                }
            }
        }
        self.attempted.notify_waiters();
    }

    async fn dial(&self) -> Result<Conn, RedisError> {
        let dial = self.endpoint.connect(
            self.connect_timeout,
            self.response_timeout,
            Deadlines::Caller,
        );
        match tokio::time::timeout(self.connect_timeout, dial).await {
            Ok(result) => result,
            Err(_) => Err(std::io::Error::from(std::io::ErrorKind::TimedOut).into()),
        }
    }

    fn install(&self, conn: Conn) {
        let mut a = self.attempts.lock().unwrap_or_else(PoisonError::into_inner);
        a.generation += 1;
        a.retry_at = None;
        a.backoff.reset();
        self.current.store(Some(Arc::new(Current {
            conn,
            generation: a.generation,
        })));
        self.generation.store(a.generation, Ordering::Release);
    }

    /// Drops the connection of `generation` (if it is still the current one) and
    /// starts reconnecting.
    fn broken(self: &Arc<Self>, generation: u64) {
        let current = self.current.load();
        if current.as_ref().is_some_and(|c| c.generation == generation) {
            let _ = self.generation.compare_exchange(
                generation,
                0,
                Ordering::AcqRel,
                Ordering::Relaxed,
            );
            self.current
                .compare_and_swap(&current, None::<Arc<Current>>);
            tracing::debug!(target: "cache_redis", "the connection to Redis broke; reconnecting");
            self.start_attempt();
        }
    }
}

/// Sends a command on `conn`: to one server directly (not through `ConnectionLike`,
/// which boxes every request's future), to a cluster routed by its key; and converts
/// the reply.
async fn send<T: FromRedisValue>(conn: &mut Conn, cmd: &Cmd, within: Duration) -> RedisResult<T> {
    let reply = match conn {
        Conn::Node(c) => deadline::within(within, c.send_packed_command(cmd)).await?,
        // ended by the cluster connection's own deadline
        Conn::Cluster(c) => c.send(cmd).await?,
    };
    Ok(redis::from_redis_value(reply.extract_error()?)?)
}

/// Logs failures at `warn`, at most once a second for each kind (the command that
/// failed); the others are only counted by the caller.
#[derive(Default)]
pub(crate) struct RateLimited {
    last: Mutex<std::collections::HashMap<String, std::time::Instant>>,
}

impl RateLimited {
    pub(crate) fn warn(&self, kind: &str, e: &RemoteError) {
        let mut last = self.last.lock().unwrap_or_else(PoisonError::into_inner);
        if last
            .get(kind)
            .is_some_and(|t| t.elapsed() < Duration::from_secs(1))
        {
            return;
        }
        last.insert(kind.to_owned(), std::time::Instant::now());
        tracing::warn!(target: "cache_redis", "{e} (later failures of {kind} within a second are only counted)");
    }
}

impl Drop for Link {
    fn drop(&mut self) {
        LINKS_DROPPED.fetch_add(1, Ordering::Relaxed);
    }
}
