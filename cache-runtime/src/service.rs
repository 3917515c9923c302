//! The service's public face: the current service, scopes, clearing, stats, shutdown.

use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use crate::current::{scoped, scoped_sync, with_current};
pub use crate::inner::CachingService;
pub use crate::profile::{ConfigError, Profile};
pub use crate::remote::ShutdownReport;
pub use crate::stats::{FunctionStats, Stats};

impl CachingService {
    /// The service cached calls use here: the scoped one inside
    /// [`scope`](Self::scope), else the global one.
    pub fn current() -> CachingService {
        with_current(CachingService::clone)
    }

    /// Runs `future` with this service as the current one: every cached call made while
    /// it runs (on this task) uses this service instead of the global one. Tasks spawned
    /// inside do not inherit it; wrap their futures in `scope` too.
    pub fn scope<F: Future>(&self, future: F) -> impl Future<Output = F::Output> {
        scoped(self.clone(), future)
    }

    /// Runs `f` with this service as the current one, for plain cached functions.
    pub fn scope_sync<R>(&self, f: impl FnOnce() -> R) -> R {
        scoped_sync(self.clone(), f)
    }

    /// Removes every entry of the current service (and the links between them), in
    /// every tier.
    pub async fn clear() {
        CachingService::current().inner.clear_everywhere().await;
    }

    /// Hit, miss and execution counts of this service, in total and per function,
    /// and its invalidation bus's counters.
    pub fn stats(&self) -> Stats {
        let inner = &self.inner;
        let mut stats = inner.functions.stats();
        stats.sync = inner.sync_stats.snapshot();
        stats.sync.l1_bypassed = inner.memory.is_bypassed();
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let r = &inner.remote_stats;
        stats.remote.removal_errors = get(&r.removal_errors);
        stats.remote.removals_retried = get(&r.removals_retried);
        stats.remote.removals_dropped = get(&r.removals_dropped);
        stats.remote.reads_held = get(&r.reads_held);
        stats.remote.removals_waiting = inner.retries.lock().removals.len() as u64;
        if let Some(remote) = &inner.remote {
            remote.report(&mut stats.remote);
        }
        stats
    }

    /// This instance's id: the sender of the invalidation messages it publishes. Each
    /// service has its own, so two services in one process are two instances.
    pub fn instance_id(&self) -> u64 {
        self.inner.instance_id
    }

    /// The readable keys of the entries in the in-process tier (including expired
    /// entries not yet removed), for inspection and debugging.
    pub fn local_keys(&self) -> Vec<String> {
        self.inner
            .memory
            .keys()
            .iter()
            .map(|bytes| match crate::key::Key::from_bytes(bytes) {
                Some(key) => key.to_text(self.inner.max_key_length),
                None => "<invalid key>".to_owned(),
            })
            .collect()
    }

    /// Completes this service's pending background writes to the remote tier, waiting
    /// at most [`Self::SHUTDOWN_TIMEOUT`]. The in-process tier has none.
    pub async fn shutdown(&self) -> ShutdownReport {
        match &self.inner.remote {
            Some(remote) => remote.flush(Self::SHUTDOWN_TIMEOUT).await,
            None => ShutdownReport::default(),
        }
    }

    /// How long [`shutdown`](Self::shutdown) waits for pending writes.
    pub const SHUTDOWN_TIMEOUT: Duration = Duration::from_secs(10);
}

/// Stats of the current service (see [`CachingService::stats`]).
pub fn stats() -> Stats {
    with_current(CachingService::stats)
}

/// Completes the current service's pending background writes before it returns.
pub async fn shutdown() -> ShutdownReport {
    CachingService::current().shutdown().await
}
