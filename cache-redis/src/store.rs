//! The backend's store: [`RemoteStore`] (reads, queued writes, removals behind them)
//! and, with `dependencies(true)`, [`RemoteGraph`] over Redis.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use cache_runtime::{
    BoxFuture, Fetched, LinkedWrite, LockId, RemoteError, RemoteGraph, RemoteKey, RemoteStats,
    RemoteStore, Removed, ShutdownReport, SingleFlight,
};
use tokio::sync::{mpsc, oneshot};

use crate::cluster::{Recent, Replayer};
use crate::endpoint::{Conn, Kind};
use crate::graph::{glob_escape, GraphKeys};
use crate::link::Link;
use crate::single_flight::{Locks, Woken, READ};
use crate::writer::{millis, Backlog, CallReply, Command, Op, Prefixed, RedisMetrics};

pub(crate) struct RedisStore {
    pub(crate) link: Arc<Link>,
    pub(crate) prefix: String,
    pub(crate) default_ttl: Duration,
    pub(crate) max_value_size: usize,
    pub(crate) queue: mpsc::Sender<Op>,
    pub(crate) metrics: RedisMetrics,
    pub(crate) backlog: Arc<Backlog>,
    pub(crate) operation_timeout: Duration,
    /// The channel of the instances' invalidations.
    pub(crate) channel: String,
    /// With `dependencies(true)`.
    pub(crate) graph: Option<GraphKeys>,
    /// On a cluster: this instance's recent removals, and whether they must be
    /// applied again (see [`crate::cluster`]).
    pub(crate) recent: Arc<Recent>,
    /// What the cluster's watcher applies again (kept alive here).
    pub(crate) _replayer: Arc<Replayer>,
    /// On a cluster with the graph: invalidations whose tombstones did not all land,
    /// with the counts they release, buried with the next one (the walk found their keys and unlinked
    /// them: a walk again would not).
    pub(crate) unburied: Mutex<Vec<(Vec<u64>, Vec<String>)>>,
    /// With `distributed_single_flight(true)`.
    pub(crate) locks: Option<Arc<Locks>>,
}

/// The value, or nothing for a tombstone (see [`crate::tombstones`]).
fn live(value: Option<Vec<u8>>) -> Option<Vec<u8>> {
    value.filter(|v| v.first() != Some(&crate::graph::TOMBSTONE))
}

impl RedisStore {
    fn on_cluster(&self) -> bool {
        self.link.endpoint().kind() == Some(Kind::Cluster)
    }

    /// On a cluster after a sign of trouble, the answer to a read of `key` without
    /// asking Redis, if there is one: a miss for a key this instance removed lately
    /// (it may be old on a promoted replica until the removal was applied again), an
    /// error for a key whose slot's master did not answer the watcher (the read would
    /// wait the operation timeout for it).
    #[cold]
    fn unsure_read(&self, key: &str) -> Option<Result<Fetched, RemoteError>> {
        if self.recent.holds(key) {
            return Some(Ok(None::<Vec<u8>>.into()));
        }
        let slot = crate::endpoint::slot_of(format!("{}{key}", self.prefix).as_bytes());
        (self.link.endpoint().slot_now(slot) == crate::endpoint::SlotNow::Down)
            .then(|| Err(RemoteError(crate::endpoint::SLOT_DOWN.to_owned())))
    }

    /// Queues an operation for the writer; a write is dropped (and counted) when the
    /// queue is full.
    pub(crate) fn queue(&self, op: Op) -> Result<(), Op> {
        self.backlog.pending.fetch_add(1, Ordering::SeqCst);
        self.queue.try_send(op).map_err(|e| {
            self.backlog.pending.fetch_sub(1, Ordering::SeqCst);
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
        cmd: Option<Command>,
        then: Option<Box<redis::Cmd>>,
    ) -> CallReply {
        let (done, result) = oneshot::channel();
        self.backlog.pending.fetch_add(1, Ordering::SeqCst);
        match self.queue.try_send(Op::Call { cmd, then, done }) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(op)) => {
                // never dropped: it must land after the writes before it
                let queue = self.queue.clone();
                tokio::spawn(async move { queue.send(op).await });
            }
            Err(mpsc::error::TrySendError::Closed(_)) => {
                self.backlog.pending.fetch_sub(1, Ordering::SeqCst);
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
}

/// Distributed single flight (see [`crate::single_flight`]).
impl RedisStore {
    /// The read of a miss with the key's lock: the value (a tombstone is none), what
    /// the script said of the lock (0 fresh, 1 taken, 2 held elsewhere) and, with the
    /// graph on one server, its invalidation count.
    async fn read_locking(
        &self,
        key: &str,
        lock_key: &str,
        token: &str,
        lock_timeout: Duration,
        touch: Option<Duration>,
    ) -> Result<(Option<Vec<u8>>, i64, Option<u64>), RemoteError> {
        let count = self.graph.as_ref().filter(|g| !g.on_cluster());
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        let build = |by_hash: bool| {
            move |cmd: &mut redis::Cmd| {
                let (command, script) = READ.head(by_hash);
                cmd.arg(command)
                    .arg(script)
                    .arg(2 + usize::from(count.is_some()));
                cmd.arg(Prefixed(&self.prefix, key)).arg(lock_key);
                if let Some(graph) = count {
                    cmd.arg(Prefixed(graph.g(), "epoch"));
                }
                cmd.arg(token)
                    .arg(millis(lock_timeout))
                    .arg(now)
                    .arg(touch.map_or(0, millis));
            }
        };
        let send = |by_hash: bool| async move {
            match self.on_cluster() {
                true => self.link.request_routed(build(by_hash)).await,
                false => self.link.request(build(by_hash)).await,
            }
        };
        let (value, state, count): (Option<Vec<u8>>, i64, Option<u64>) = match send(true).await {
            Err(e) if e.0.starts_with("NOSCRIPT") => send(false).await?,
            reply => reply?,
        };
        Ok((live(value), state, count))
    }

    /// [`RemoteStore::get_single_flight`].
    async fn get_locked(
        &self,
        locks: &Arc<Locks>,
        key: RemoteKey<'_>,
        touch: Option<Duration>,
        lock_timeout: Duration,
        fallback_after: Option<Duration>,
    ) -> Result<(Fetched, SingleFlight), RemoteError> {
        if self.recent.unsure() {
            if let Some(early) = key.with_text(|k| self.unsure_read(k)) {
                return early.map(|f| (f, SingleFlight::Free));
            }
        }
        let text = key.with_text(str::to_owned);
        let lock_key = locks.key_of(&text, self.on_cluster());
        let token = locks.token();
        let mut watching = locks.watch(&text);
        let start = tokio::time::Instant::now();
        loop {
            let epoch = self.recent.epoch.load(Ordering::Acquire);
            let read = self
                .read_locking(&text, &lock_key, &token, lock_timeout, touch)
                .await;
            let (value, state, count) = match read {
                Ok(read) => read,
                Err(e) => {
                    self.release_unknown(locks.release_unknown(lock_key, token, &text));
                    return Err(e);
                }
            };
            let found = value.is_some();
            let fetched = Fetched {
                value,
                epoch: match &self.graph {
                    Some(g) if g.on_cluster() => epoch,
                    Some(_) => count.unwrap_or(0),
                    None => 0,
                },
            };
            match state {
                1 => {
                    let id = locks.hold(lock_key, token, &text);
                    return Ok((fetched, SingleFlight::Taken(id)));
                }
                2 => {}
                _ => return Ok((fetched, SingleFlight::Free)),
            }
            // held elsewhere: wait for its release (a fallback, at most `fallback_after`)
            let bound = match fallback_after.filter(|_| found) {
                Some(f) if f < lock_timeout => f,
                _ => lock_timeout,
            };
            let Some(left) = bound.checked_sub(start.elapsed()).filter(|l| !l.is_zero()) else {
                let why = match bound < lock_timeout {
                    true => SingleFlight::Slow,
                    false => SingleFlight::TimedOut,
                };
                return Ok((fetched, why));
            };
            if watching.wait(left).await == Woken::Failed {
                return Ok((fetched, SingleFlight::Failed));
            }
        }
    }

    /// Releases, in the background, a lock that a command whose reply never came may
    /// have taken: sent again with back-off until it finds the lock (and removes it)
    /// or for a minute, since the server may run the command late.
    fn release_unknown(&self, call: crate::script::ScriptCall) {
        let link = self.link.clone();
        tokio::spawn(async move {
            let mut backoff =
                cache_runtime::Backoff::new(Duration::from_millis(50), Duration::from_secs(5));
            let give_up = tokio::time::Instant::now() + Duration::from_secs(60);
            while tokio::time::Instant::now() < give_up {
                backoff.wait().await;
                let released = crate::writer::run_scripts(&link, std::slice::from_ref(&call)).await;
                // (1 or 2: it was there, and is gone)
                if matches!(released.as_deref(), Ok([redis::Value::Int(1..)])) {
                    return;
                }
            }
        });
    }

    /// Queues a lock's release behind the writes queued before it.
    fn queue_unlock(&self, call: crate::script::ScriptCall) {
        if let Err(op) = self.queue(Op::Unlock(call)) {
            // never dropped: waiters would wait for the lock's expiry
            let queue = self.queue.clone();
            self.backlog.pending.fetch_add(1, Ordering::SeqCst);
            tokio::spawn(async move {
                let _ = queue.send(op).await;
            });
        }
    }
}

impl RemoteStore for RedisStore {
    fn get<'a>(
        &'a self,
        key: RemoteKey<'a>,
        touch: Option<Duration>,
    ) -> BoxFuture<'a, Result<Fetched, RemoteError>> {
        if self.recent.unsure() {
            if let Some(early) = key.with_text(|k| self.unsure_read(k)) {
                return Box::pin(async { early });
            }
        }
        // bounded by the connection's response timeout (no second timer per read)
        let Some(graph) = &self.graph else {
            let build = move |cmd: &mut redis::Cmd| {
                key.with_text(|key| {
                    let key = Prefixed(&self.prefix, key);
                    match touch {
                        Some(d) => cmd.arg("GETEX").arg(key).arg("PX").arg(millis(d)),
                        None => cmd.arg("GET").arg(key),
                    };
                })
            };
            if self.on_cluster() {
                return Box::pin(async move {
                    let value: Option<Vec<u8>> = self.link.request_routed(build).await?;
                    Ok(live(value).into())
                });
            }
            return Box::pin(async move {
                let value: Option<Vec<u8>> = self.link.request(build).await?;
                Ok(live(value).into())
            });
        };
        if graph.on_cluster() {
            // the count known before the read (see `crate::tombstones`), and a
            // tombstone is a miss
            let epoch = self.recent.epoch.load(Ordering::Acquire);
            let read = move |by_hash: bool| {
                self.link.request_routed::<Option<Vec<u8>>>(move |cmd| {
                    key.with_text(|key| {
                        let key = Prefixed(&self.prefix, key);
                        match touch {
                            Some(d) => {
                                let (command, script) = graph.touch().head(by_hash);
                                cmd.arg(command).arg(script).arg(1).arg(key).arg(millis(d))
                            }
                            None => cmd.arg("GET").arg(key),
                        };
                    })
                })
            };
            return Box::pin(async move {
                let value = match read(true).await {
                    Err(e) if touch.is_some() && e.0.starts_with("NOSCRIPT") => read(false).await?,
                    reply => reply?,
                };
                Ok(Fetched {
                    value: live(value),
                    epoch,
                })
            });
        }
        // with the graph, the invalidation count comes in the same round trip; a
        // sliding entry's read is a script (by hash, with its text on `NOSCRIPT`)
        let read = move |by_hash: bool| {
            self.link
                .request::<(Option<Vec<u8>>, Option<u64>)>(move |cmd| {
                    key.with_text(|key| {
                        let key = Prefixed(&self.prefix, key);
                        let epoch = Prefixed(graph.g(), "epoch");
                        match touch {
                            Some(d) => {
                                let (command, script) = graph.touch().head(by_hash);
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
                value: live(value),
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
            if self.on_cluster() {
                self.recent.removed(&keys);
            }
            let cmd = (!keys.is_empty()).then(|| {
                let mut cmd = redis::cmd("DEL");
                for k in &keys {
                    cmd.arg(Prefixed(&self.prefix, k));
                }
                Command::Plain(cmd)
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
            if let Some(Conn::Cluster(con)) = self.link.conn() {
                self.recent.cleared();
                let masters = crate::topology::topology(&con)
                    .await
                    .map_err(|e| RemoteError(e.to_string()))?
                    .masters;
                let replicas = |slot| self.link.endpoint().replicas_of(slot);
                // the values, and with dependencies the graph too
                let mut prefixes = vec![self.prefix.as_str()];
                prefixes.extend(self.graph.as_ref().map(|g| g.g()));
                for prefix in prefixes {
                    let pattern = format!("{}*", glob_escape(prefix));
                    crate::cluster::unlink_matching(&con, &masters, &pattern, &replicas)
                        .await
                        .map_err(|e| RemoteError(e.to_string()))?;
                }
                // the count went back to nothing with the graph
                self.recent.epoch.store(0, Ordering::Release);
                return Ok(());
            }
            // the values, and with dependencies the graph too
            let mut prefixes = vec![self.prefix.as_str()];
            prefixes.extend(self.graph.as_ref().map(|g| g.g()));
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
            // the locks still held (bodies still running) are released
            for call in self.locks.iter().flat_map(|l| l.release_all()) {
                self.queue_unlock(call);
            }
            let before = self.metrics.written();
            let drained = tokio::time::timeout(timeout, async {
                loop {
                    let notified = self.backlog.drained.notified();
                    if self.backlog.pending.load(Ordering::SeqCst) == 0 {
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
                    let left = self.backlog.pending.load(Ordering::SeqCst) as u64;
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

    fn single_flight(&self) -> bool {
        self.locks.is_some()
    }

    fn get_single_flight<'a>(
        &'a self,
        key: RemoteKey<'a>,
        touch: Option<Duration>,
        lock_timeout: Duration,
        fallback_after: Option<Duration>,
    ) -> BoxFuture<'a, Result<(Fetched, SingleFlight), RemoteError>> {
        let Some(locks) = &self.locks else {
            return Box::pin(async move { Ok((self.get(key, touch).await?, SingleFlight::Free)) });
        };
        Box::pin(self.get_locked(locks, key, touch, lock_timeout, fallback_after))
    }

    fn try_lock<'a>(
        &'a self,
        key: &'a str,
        lock_timeout: Duration,
    ) -> BoxFuture<'a, Result<Option<LockId>, RemoteError>> {
        Box::pin(async move {
            let Some(locks) = &self.locks else {
                return Ok(None);
            };
            let lock_key = locks.key_of(key, self.on_cluster());
            let token = locks.token();
            let build = |cmd: &mut redis::Cmd| {
                cmd.arg("SET")
                    .arg(&lock_key)
                    .arg(&token)
                    .arg("NX")
                    .arg("PX")
                    .arg(millis(lock_timeout));
            };
            let taken: Result<Option<String>, RemoteError> = match self.on_cluster() {
                true => self.link.request_routed(build).await,
                false => self.link.request(build).await,
            };
            match taken {
                Ok(taken) => Ok(taken.map(|_| locks.hold(lock_key, token, key))),
                Err(e) => {
                    self.release_unknown(locks.release_unknown(lock_key, token, key));
                    Err(e)
                }
            }
        })
    }

    fn unlock(&self, lock: LockId, failed: bool) {
        if let Some(call) = self.locks.as_ref().and_then(|l| l.release(lock, failed)) {
            self.queue_unlock(call);
        }
    }

    fn report(&self, stats: &mut RemoteStats) {
        let c = &self.metrics.0;
        stats.write_errors += c.failed_sets.load(Ordering::Relaxed);
        stats.linked_write_errors += c.failed_linked.load(Ordering::Relaxed);
        stats.writes_dropped += c.dropped.load(Ordering::Relaxed);
        stats.topology_changes += self.recent.topology_changes.load(Ordering::Relaxed);
        stats.invalidations_replayed += self.recent.replayed.load(Ordering::Relaxed);
        stats.graphs_lost += self.recent.graphs_lost.load(Ordering::Relaxed);
        if self.on_cluster() {
            // the process's count, the same for every cluster backend
            stats.redirections = stats.redirections.max(crate::node_con::redirections());
        }
    }
}

impl RemoteGraph for RedisStore {
    fn set_linked(&self, write: LinkedWrite) {
        let Some(graph) = &self.graph else { return };
        let op = match graph.on_cluster() {
            true => Op::Linked {
                graph: graph.write(&write),
                put: Box::new(graph.put(&write)),
            },
            false => Op::Send(graph.write(&write)),
        };
        if self.queue(op).is_err() {
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
            if graph.on_cluster() {
                return self
                    .invalidate_on_cluster(graph, start, keep, want_keys, publish)
                    .await;
            }
            let publish = publish.as_deref().map(|m| (self.channel.as_str(), m));
            let cmd = graph.invalidate(&start, keep.as_deref(), want_keys, publish);
            let (reply, _) = self.call(Some(Command::Script(cmd)), None).await?;
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

impl RedisStore {
    /// An invalidation of the graph on a cluster (see [`crate::tombstones`]): the
    /// walk, the tombstones (with those of earlier invalidations that did not all
    /// land), the release, then the message.
    async fn invalidate_on_cluster(
        &self,
        graph: &GraphKeys,
        start: Vec<String>,
        keep: Option<String>,
        want_keys: bool,
        publish: Option<Vec<u8>>,
    ) -> Result<Removed, RemoteError> {
        // behind the writes queued before it, whose values are written before the
        // reply (on the graph's slot, the links of a write queued before it are
        // recorded before the walk, which so finds them)
        let walks = &self.recent.walks;
        let (walk, id) = walks.walk(graph, &start, keep.as_deref());
        let reply = self.call(Some(Command::Script(walk)), None).await;
        let walked = walks.walked(id, reply.map(|(reply, _)| reply))?;
        let (count, keys, others) = (walked.count, walked.keys, walked.others);
        let readable: Vec<String> = keys
            .iter()
            .filter_map(|v| v.strip_prefix(graph.values.as_str()).map(str::to_owned))
            .collect();
        self.recent.invalidated(&start, &readable);
        let mut pending =
            std::mem::take(&mut *self.unburied.lock().unwrap_or_else(PoisonError::into_inner));
        pending.push((walked.counts, keys));
        let counts: Vec<u64> = pending
            .iter()
            .flat_map(|(c, _)| c.iter().copied())
            .collect();
        // each key once: walks in flight name theirs to every walk
        let mut seen = std::collections::HashSet::new();
        let all: Vec<String> = pending
            .iter()
            .flat_map(|(_, k)| k.iter())
            .chain(&others)
            .filter(|k| seen.insert(k.as_str()))
            .cloned()
            .collect();
        // the highest count: a tombstone's count only refuses more
        let top = counts.iter().copied().max().unwrap_or(count);
        match crate::tombstones::bury(&self.link, graph, top, &all, &counts).await {
            Ok(published) => {
                self.recent.epoch.fetch_max(published, Ordering::AcqRel);
            }
            Err(e) => {
                self.unburied
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .extend(pending);
                return Err(e);
            }
        }
        let publish_error = match publish {
            Some(message) => self
                .link
                .query_again::<()>(redis::cmd("PUBLISH").arg(&self.channel).arg(message))
                .await
                .err(),
            None => None,
        };
        Ok(Removed {
            keys: if want_keys { readable } else { Vec::new() },
            publish_error,
        })
    }
}
