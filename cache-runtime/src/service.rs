//! The caching service: configuration, the global instance, scoped instances, stats.

use std::collections::{HashMap, HashSet, VecDeque};
use std::fmt;
use std::future::Future;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use crate::deps::{Dependency, Frame, Live, Node};
use crate::flight::Flights;
use crate::memory::{Expiration, MemoryBackend, MemoryTier};
use crate::registry::FnTable;
use crate::remote::{RateLimitedWarn, RemoteStore};
pub use crate::stats::{FunctionStats, Stats};

/// Run-time settings shared by the cached functions that name it with
/// `#[cached(profile = "...")]`. Values given on the attribute win over the profile's.
///
/// ```
/// use cache_runtime::Profile;
/// use std::time::Duration;
///
/// let catalog = Profile::new("catalog").ttl(Duration::from_secs(600));
/// let sessions = Profile::new("sessions").sliding(Duration::from_secs(120));
/// let off = Profile::new("reports").enabled(false);
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Profile {
    pub(crate) name: String,
    pub(crate) ttl: Option<Duration>,
    pub(crate) sliding: Option<Duration>,
    pub(crate) enabled: bool,
    pub(crate) lock_timeout: Duration,
}

impl Profile {
    /// The name of the profile used when the attribute names none.
    pub const DEFAULT: &'static str = "default";
    /// How long a caller waits for another call of the same key before running the
    /// body itself, unless the profile says otherwise.
    pub const DEFAULT_LOCK_TIMEOUT: Duration = Duration::from_secs(30);

    /// A profile with no expiration, enabled, with the default lock timeout.
    pub fn new(name: impl Into<String>) -> Self {
        Profile {
            name: name.into(),
            ttl: None,
            sliding: None,
            enabled: true,
            lock_timeout: Self::DEFAULT_LOCK_TIMEOUT,
        }
    }

    /// Absolute expiration: entries are removed this long after they are stored.
    /// Cannot be combined with [`sliding`](Self::sliding).
    pub fn ttl(mut self, ttl: Duration) -> Self {
        self.ttl = Some(ttl);
        self
    }

    /// Sliding expiration: entries are removed when not read for this long.
    /// Cannot be combined with [`ttl`](Self::ttl).
    pub fn sliding(mut self, sliding: Duration) -> Self {
        self.sliding = Some(sliding);
        self
    }

    /// `false` turns caching off for the functions of this profile: they run every time.
    pub fn enabled(mut self, enabled: bool) -> Self {
        self.enabled = enabled;
        self
    }

    /// How long a call waits for a concurrent call of the same key before it runs the
    /// body itself.
    pub fn lock_timeout(mut self, timeout: Duration) -> Self {
        self.lock_timeout = timeout;
        self
    }

    /// The profile's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    pub(crate) fn expiration(&self) -> Expiration {
        match (self.ttl, self.sliding) {
            (Some(d), _) => Expiration::Absolute(d),
            (None, Some(d)) => Expiration::Sliding(d),
            (None, None) => Expiration::Never,
        }
    }

    fn validate(&self) -> Result<(), ConfigError> {
        let problem = if self.ttl.is_some() && self.sliding.is_some() {
            "sets both `ttl` and `sliding`; choose one"
        } else if self.ttl == Some(Duration::ZERO) || self.sliding == Some(Duration::ZERO) {
            "has a zero expiration, which would never serve a hit; use `enabled(false)` to turn caching off"
        } else {
            return Ok(());
        };
        Err(ConfigError::Profile {
            name: self.name.clone(),
            problem,
        })
    }
}

/// What the service stores entries in: an in-process tier, a remote store, or a
/// remote store with an in-process tier in front. Built from a [`MemoryBackend`], or by
/// a remote store's crate (`cache-redis`) with [`Backend::remote`].
#[derive(Clone)]
pub struct Backend {
    pub(crate) memory: Option<MemoryBackend>,
    pub(crate) remote: Option<Arc<dyn RemoteStore>>,
}

impl Backend {
    /// A remote store, with `l1` in front of it (or none).
    pub fn remote(store: impl RemoteStore, l1: Option<MemoryBackend>) -> Self {
        Backend {
            memory: l1,
            remote: Some(Arc::new(store)),
        }
    }
}

impl fmt::Debug for Backend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Backend")
            .field("memory", &self.memory)
            .field("remote", &self.remote.is_some())
            .finish()
    }
}

impl From<MemoryBackend> for Backend {
    fn from(memory: MemoryBackend) -> Self {
        Backend {
            memory: Some(memory),
            remote: None,
        }
    }
}

/// A configuration the service refuses.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    /// A profile's settings contradict each other.
    #[error("profile `{name}` {problem}")]
    Profile {
        /// The profile.
        name: String,
        /// What is wrong with it.
        problem: &'static str,
    },
    /// Two profiles have the same name.
    #[error("profile `{0}` is configured twice")]
    DuplicateProfile(String),
    /// The key length limit is too small to hold a function name and a hash.
    #[error("max_key_length must be at least 64 bytes, got {0}")]
    KeyLength(usize),
}

/// Why [`CachingServiceBuilder::install`] failed.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum InstallError {
    /// A service is already installed (by an earlier `install`, or the default one a
    /// cached call installed because none was).
    #[error("a caching service is already installed; call `install` once, at the start of `main`, before any cached call")]
    AlreadyInstalled,
    /// The configuration is invalid.
    #[error(transparent)]
    Config(#[from] ConfigError),
}

/// Configures a [`CachingService`].
#[derive(Debug)]
#[must_use = "call `.install()` or `.build()`"]
pub struct CachingServiceBuilder {
    backend: Backend,
    profiles: Vec<Profile>,
    max_key_length: usize,
}

impl CachingServiceBuilder {
    /// Where entries are stored. Default: `MemoryBackend::new()`.
    pub fn backend(mut self, backend: impl Into<Backend>) -> Self {
        self.backend = backend.into();
        self
    }

    /// Adds a profile. A profile named `"default"` replaces the built-in default.
    pub fn profile(mut self, profile: Profile) -> Self {
        self.profiles.push(profile);
        self
    }

    /// Readable keys longer than this many bytes keep their function part and have the
    /// arguments replaced by a 128-bit hash. Default: 1024.
    pub fn max_key_length(mut self, bytes: usize) -> Self {
        self.max_key_length = bytes;
        self
    }

    /// Builds a service without installing it; run code against it with
    /// [`CachingService::scope`].
    pub fn build(self) -> Result<CachingService, ConfigError> {
        if self.max_key_length < 64 {
            return Err(ConfigError::KeyLength(self.max_key_length));
        }
        let mut profiles = HashMap::new();
        profiles.insert(Profile::DEFAULT.to_owned(), Profile::new(Profile::DEFAULT));
        let mut seen = std::collections::HashSet::new();
        for p in self.profiles {
            p.validate()?;
            if !seen.insert(p.name.clone()) {
                return Err(ConfigError::DuplicateProfile(p.name));
            }
            profiles.insert(p.name.clone(), p);
        }
        Ok(CachingService {
            inner: Arc::new(Inner {
                memory: match &self.backend.memory {
                    Some(m) => m.build(),
                    None => MemoryBackend::build_disabled(),
                },
                remote: self.backend.remote,
                warn: RateLimitedWarn::default(),
                profiles,
                max_key_length: self.max_key_length,
                flights: Flights::default(),
                functions: FnTable::default(),
                epoch: AtomicU64::new(0),
                log: parking_lot::Mutex::default(),
            }),
        })
    }

    /// Builds the service and makes it the global one, used by every cached call that
    /// does not run inside [`CachingService::scope`]. Fails if a service is already
    /// installed.
    pub fn install(self) -> Result<(), InstallError> {
        let service = self.build()?;
        let mut installed = false;
        GLOBAL.get_or_init(|| {
            installed = true;
            service
        });
        if installed {
            Ok(())
        } else {
            Err(InstallError::AlreadyInstalled)
        }
    }
}

/// The caching service: the tiers, the profiles and the statistics that cached
/// functions use. Cheap to clone (a handle).
///
/// One service is global: installed in `main` with
/// [`CachingService::builder`]`()...install()`, or created with default settings by the
/// first cached call. Other services can be built and used for a scope, which is how
/// tests and benchmarks keep their caches apart:
///
/// ```
/// use cache_runtime::{cached, CachingService};
///
/// #[cached]
/// async fn square(x: u64) -> u64 { x * x }
///
/// # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
/// let service = CachingService::builder().build().unwrap();
/// service.scope(async {
///     square(3).await;
///     square(3).await;
/// }).await;
/// assert_eq!(service.stats().total.hits, 1);
/// # });
/// ```
#[derive(Clone)]
pub struct CachingService {
    pub(crate) inner: Arc<Inner>,
}

pub(crate) struct Inner {
    pub(crate) memory: MemoryTier,
    pub(crate) remote: Option<Arc<dyn RemoteStore>>,
    pub(crate) warn: RateLimitedWarn,
    pub(crate) profiles: HashMap<String, Profile>,
    pub(crate) max_key_length: usize,
    pub(crate) flights: Flights,
    pub(crate) functions: FnTable,
    /// Counts invalidations (see [`Inner::is_stale`]).
    pub(crate) epoch: AtomicU64,
    pub(crate) log: parking_lot::Mutex<InvalidationLog>,
}

/// Recent invalidations, with every node each one reached, so that a computation that
/// ran across one can tell whether it read something that was invalidated.
#[derive(Default)]
pub(crate) struct InvalidationLog {
    entries: VecDeque<(u64, HashSet<Node>)>,
    /// Computations started before this count are treated as out of date: the entries
    /// that would tell were dropped, or everything was cleared.
    floor: u64,
}

/// How many invalidations the log keeps.
const LOG_CAPACITY: usize = 1024;

impl Inner {
    /// Every invalidation goes through here. Under the log's lock: count it, detach the
    /// running flights (so no later call joins a computation that may have read what is
    /// invalidated), remove the entries and their dependents, and record what was
    /// reached. Returns how many entries were removed.
    ///
    /// The returned keys are to be removed from the remote tier: the entries removed
    /// here and the entries named in `nodes` (which the remote tier may hold alone).
    pub(crate) fn invalidate(&self, nodes: Vec<Node>) -> RemoteKeys {
        let named: Vec<Arc<[u8]>> = nodes
            .iter()
            .filter_map(|n| match n {
                Node::Entry(k) => Some(k.clone()),
                Node::Key(_) => None,
            })
            .collect();
        self.invalidating(named, |memory| memory.invalidate(nodes))
    }

    /// Removes the entries depending on the entry `key`, not the entry itself (its
    /// value was just replaced).
    pub(crate) fn invalidate_dependents(&self, key: &[u8]) -> RemoteKeys {
        self.invalidating(Vec::new(), |memory| memory.invalidate_dependents(key))
    }

    /// Runs `remove` (which returns the entries it removed and the nodes it reached)
    /// as an invalidation: see [`Inner::invalidate`].
    fn invalidating(
        &self,
        mut named: Vec<Arc<[u8]>>,
        remove: impl FnOnce(&MemoryTier) -> (Vec<Arc<[u8]>>, HashSet<Node>),
    ) -> RemoteKeys {
        let mut log = self.log.lock();
        let epoch = self.epoch.fetch_add(1, Ordering::SeqCst) + 1;
        self.flights.detach_all();
        let (removed, reached) = remove(&self.memory);
        log.record(epoch, reached);
        drop(log);
        removed.iter().for_each(|key| self.count_invalidation(key));
        if self.remote.is_none() {
            return RemoteKeys(Vec::new());
        }
        named.extend(removed);
        named.sort_unstable();
        named.dedup();
        RemoteKeys(
            named
                .iter()
                .filter_map(|bytes| crate::Key::from_bytes(bytes))
                .map(|key| key.to_text(self.max_key_length))
                .collect(),
        )
    }

    /// Removes keys from the remote tier; a failure is counted and logged.
    pub(crate) async fn remove_remote(&self, keys: RemoteKeys) {
        let (Some(remote), false) = (&self.remote, keys.0.is_empty()) else {
            return;
        };
        if let Err(e) = remote.remove(keys.0).await {
            self.warn
                .warn(format_args!("removing invalidated entries failed: {e}"));
        }
    }
}

/// Keys to remove from the remote tier after an invalidation.
#[must_use = "the remote tier still holds these entries: pass them to `remove_remote`"]
pub(crate) struct RemoteKeys(Vec<String>);

impl CachingService {
    /// Removes keys from the remote tier without waiting, from code that cannot wait
    /// (a plain function, a refresh). Needs a tokio runtime; without one the removal is
    /// skipped and logged.
    pub(crate) fn remove_remote_detached(&self, keys: RemoteKeys) {
        if keys.0.is_empty() || self.inner.remote.is_none() {
            return;
        }
        match tokio::runtime::Handle::try_current() {
            Ok(handle) => {
                let inner = self.inner.clone();
                handle.spawn(async move { inner.remove_remote(keys).await });
            }
            Err(_) => self.inner.warn.warn(format_args!(
                "invalidated entries could not be removed from the remote tier: no tokio runtime here"
            )),
        }
    }
}

impl Inner {
    /// Whether a value for `key`, computed since the invalidation count `since` from
    /// what `frame` collected, is out of date: an invalidation after `since` reached the
    /// key itself, or reached something the body read before that invalidation.
    pub(crate) fn is_stale(&self, key: &[u8], since: u64, frame: &Frame) -> bool {
        let log = self.log.lock();
        if since < log.floor {
            return true;
        }
        let own = Node::Entry(key.into());
        log.entries
            .iter()
            .filter(|(e, _)| *e > since)
            .any(|(e, reached)| {
                reached.contains(&own)
                    || frame
                        .nodes
                        .iter()
                        .zip(&frame.read_at)
                        .any(|(node, read_at)| *e > *read_at && reached.contains(node))
            })
    }

    fn count_invalidation(&self, key: &[u8]) {
        if let Some(state) = crate::key::function_id(key).and_then(|id| self.functions.get(id)) {
            state.counters.bump(crate::stats::Counter::Invalidation);
        }
    }

    fn clear(&self) {
        let mut log = self.log.lock();
        let epoch = self.epoch.fetch_add(1, Ordering::SeqCst) + 1;
        self.flights.detach_all();
        self.memory.clear();
        log.entries.clear();
        log.floor = epoch;
    }
}

impl InvalidationLog {
    fn record(&mut self, epoch: u64, reached: HashSet<Node>) {
        if self.entries.len() == LOG_CAPACITY {
            if let Some((dropped, _)) = self.entries.pop_front() {
                self.floor = dropped;
            }
        }
        self.entries.push_back((epoch, reached));
    }
}

impl fmt::Debug for CachingService {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CachingService")
            .field("entries", &self.inner.memory.len())
            .field("profiles", &self.inner.profiles.keys().collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

static GLOBAL: OnceLock<CachingService> = OnceLock::new();

tokio::task_local! {
    static SCOPED: CachingService;
}

/// How many scopes are running in the process: while none is, a call skips the
/// task-local lookup and goes straight to the global service.
static SCOPES: AtomicUsize = AtomicUsize::new(0);

/// Runs `f` with the current service: the one of the enclosing
/// [`CachingService::scope`], else the global one (installed with defaults if needed).
#[inline]
pub(crate) fn with_current<R>(f: impl FnOnce(&CachingService) -> R) -> R {
    if SCOPES.load(Ordering::Relaxed) != 0 && SCOPED.try_with(|_| ()).is_ok() {
        SCOPED.with(f)
    } else {
        f(global())
    }
}

fn global() -> &'static CachingService {
    GLOBAL.get_or_init(|| {
        tracing::debug!(target: "cache_runtime", "no caching service installed: using the default in-memory service");
        CachingService::builder()
            .build()
            .unwrap_or_else(|_| unreachable!("the default configuration is valid"))
    })
}

impl CachingService {
    /// Starts configuring a service.
    pub fn builder() -> CachingServiceBuilder {
        CachingServiceBuilder {
            backend: MemoryBackend::new().into(),
            profiles: Vec::new(),
            max_key_length: 1024,
        }
    }

    /// The service cached calls use here: the scoped one inside
    /// [`scope`](Self::scope), else the global one.
    pub fn current() -> CachingService {
        with_current(CachingService::clone)
    }

    /// Runs `future` with this service as the current one: every cached call made while
    /// it runs (on this task) uses this service instead of the global one. Tasks spawned
    /// inside do not inherit it; wrap their futures in `scope` too.
    pub fn scope<F: Future>(&self, future: F) -> impl Future<Output = F::Output> {
        let service = self.clone();
        async move {
            let _live = Live::enter(&SCOPES);
            SCOPED.scope(service, future).await
        }
    }

    /// Runs `f` with this service as the current one, for plain cached functions.
    pub fn scope_sync<R>(&self, f: impl FnOnce() -> R) -> R {
        let _live = Live::enter(&SCOPES);
        SCOPED.sync_scope(self.clone(), f)
    }

    /// Removes every entry of the current service (and the links between them), in
    /// every tier.
    pub async fn clear() {
        let service = CachingService::current();
        service.inner.clear();
        if let Some(remote) = &service.inner.remote {
            if let Err(e) = remote.clear().await {
                service.inner.warn.warn(format_args!("clear failed: {e}"));
            }
        }
    }

    /// Hit, miss and execution counts of this service, in total and per function.
    pub fn stats(&self) -> Stats {
        self.inner.functions.stats()
    }

    /// The readable keys of the entries in the in-process tier (including expired
    /// entries not yet removed), for inspection and debugging.
    pub fn local_keys(&self) -> Vec<String> {
        self.inner
            .memory
            .keys()
            .iter()
            .map(|bytes| match crate::Key::from_bytes(bytes) {
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

/// Invalidates a dependency in the current service: every entry that depends on it
/// (see [`add_dependency`](crate::add_dependency)) is removed, with the entries that
/// depend on those, transitively, and the dependencies of its cascade.
pub async fn invalidate_dependency(dependency: impl Into<Dependency>) {
    let nodes = crate::deps::nodes_of(&dependency.into());
    let service = CachingService::current();
    let keys = service.inner.invalidate(nodes);
    service.inner.remove_remote(keys).await;
}

/// Completes the current service's pending background writes before it returns.
pub async fn shutdown() -> ShutdownReport {
    CachingService::current().shutdown().await
}

/// What [`shutdown`] did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct ShutdownReport {
    /// Background writes completed during shutdown.
    pub written: u64,
    /// Background writes abandoned because the shutdown timeout passed.
    pub abandoned: u64,
    /// Whether the shutdown timeout passed before everything was written.
    pub timed_out: bool,
}

impl ShutdownReport {
    /// A report of `written` completed and `abandoned` dropped writes.
    pub fn new(written: u64, abandoned: u64, timed_out: bool) -> Self {
        ShutdownReport {
            written,
            abandoned,
            timed_out,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejects_contradictory_profiles() {
        let err = CachingService::builder()
            .profile(
                Profile::new("p")
                    .ttl(Duration::from_secs(1))
                    .sliding(Duration::from_secs(1)),
            )
            .build()
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "profile `p` sets both `ttl` and `sliding`; choose one"
        );
        let err = CachingService::builder()
            .profile(Profile::new("p").ttl(Duration::ZERO))
            .build()
            .unwrap_err();
        assert!(err.to_string().contains("zero expiration"), "{err}");
        let err = CachingService::builder()
            .profile(Profile::new("p"))
            .profile(Profile::new("p"))
            .build()
            .unwrap_err();
        assert_eq!(err, ConfigError::DuplicateProfile("p".into()));
        assert_eq!(
            CachingService::builder()
                .max_key_length(10)
                .build()
                .unwrap_err(),
            ConfigError::KeyLength(10)
        );
    }

    #[test]
    fn profile_expiration() {
        assert_eq!(Profile::new("a").expiration(), Expiration::Never);
        let d = Duration::from_secs(3);
        assert_eq!(
            Profile::new("a").ttl(d).expiration(),
            Expiration::Absolute(d)
        );
        assert_eq!(
            Profile::new("a").sliding(d).expiration(),
            Expiration::Sliding(d)
        );
    }
}
