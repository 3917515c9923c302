//! The caching service: configuration, the global instance, scoped instances, stats.

use std::collections::{HashMap, HashSet, VecDeque};
use std::fmt;
use std::future::Future;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use crate::backoff::Backoff;
use crate::bus::{
    new_instance_id, BusReceiver, InvalidationBus, Item, Message, Receive, SyncCounters,
};
use crate::deps::{Dependency, DependencyGraph, Frame, Live, MemoryGraph, Node};
use crate::flight::Flights;
use crate::held::{Held, Hold};
use crate::memory::{MemoryBackend, MemoryTier};
pub use crate::profile::{ConfigError, Profile};
use crate::registry::{Descriptor, FnState, FnTable, FunctionStates, Registration, MAX_FUNCTIONS};
pub use crate::remote::ShutdownReport;
use crate::remote::{RateLimitedWarn, RemoteError, RemoteStore};
pub use crate::stats::{FunctionStats, Stats};

/// What the service stores entries in: an in-process tier, a remote store, or a
/// remote store with an in-process tier in front. Built from a [`MemoryBackend`], or by
/// a remote store's crate (`cache-redis`) with [`Backend::remote`].
#[derive(Clone)]
pub struct Backend {
    pub(crate) memory: Option<MemoryBackend>,
    pub(crate) remote: Option<Arc<dyn RemoteStore>>,
    pub(crate) bus: Option<Arc<dyn InvalidationBus>>,
    /// The remote store publishes on `bus` itself, along with its removals.
    pub(crate) store_publishes: bool,
}

impl Backend {
    /// A remote store, with `l1` in front of it (or none).
    pub fn remote(store: impl RemoteStore, l1: Option<MemoryBackend>) -> Self {
        Backend {
            memory: l1,
            remote: Some(Arc::new(store)),
            bus: None,
            store_publishes: false,
        }
    }

    /// Publishes this backend's invalidations on `bus`, and applies the other
    /// instances' ones to its in-process tier (see [`InvalidationBus`]).
    pub fn with_bus(mut self, bus: impl InvalidationBus) -> Self {
        self.bus = Some(Arc::new(bus));
        self.store_publishes = false;
        self
    }

    /// Like [`Backend::with_bus`], for a bus the remote store can publish on itself:
    /// an invalidation's message is handed to the store with the removal
    /// ([`RemoteStore::remove`], [`RemoteGraph::invalidate`](crate::RemoteGraph::invalidate)),
    /// which publishes it once the entries are gone, in the same round trip. If that
    /// fails, the message is published on `bus`.
    pub fn with_store_bus(mut self, bus: impl InvalidationBus) -> Self {
        self.bus = Some(Arc::new(bus));
        self.store_publishes = true;
        self
    }
}

impl fmt::Debug for Backend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Backend")
            .field("memory", &self.memory)
            .field("remote", &self.remote.is_some())
            .field("bus", &self.bus.is_some())
            .finish()
    }
}

impl From<MemoryBackend> for Backend {
    fn from(memory: MemoryBackend) -> Self {
        Backend {
            memory: Some(memory),
            remote: None,
            bus: None,
            store_publishes: false,
        }
    }
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

    /// Keeps this instance's in-process tier in sync with other instances over `bus`:
    /// every invalidation is published on it, and the other instances' ones are
    /// applied here (see [`InvalidationBus`]; `cache_redis::RedisSync` is the Redis
    /// one). Replaces the bus a backend brings with it.
    pub fn sync(mut self, bus: impl InvalidationBus) -> Self {
        self.backend.bus = Some(Arc::new(bus));
        self.backend.store_publishes = false;
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
        let graph: Arc<dyn DependencyGraph> = Arc::new(MemoryGraph::default());
        let bus = self.backend.bus;
        let index = bus.as_ref().map(|_| self.max_key_length);
        let inner = Arc::new(Inner {
            memory: match &self.backend.memory {
                Some(m) => m.build(graph.clone(), index),
                None => MemoryBackend::build_disabled(graph.clone()),
            },
            graph,
            remote: self.backend.remote,
            bus: bus.clone(),
            store_publishes: self.backend.store_publishes,
            instance_id: new_instance_id(),
            sync_stats: SyncCounters::default(),
            warn: RateLimitedWarn::default(),
            profiles,
            max_key_length: self.max_key_length,
            flights: Flights::default(),
            retries: Default::default(),
            held: Held::default(),
            remote_stats: RemoteCounters::default(),
            functions: FnTable::default(),
            epoch: AtomicU64::new(0),
            log: parking_lot::Mutex::default(),
        });
        if let Some(bus) = bus {
            let receiver: std::sync::Weak<dyn Receive> =
                Arc::downgrade(&inner) as std::sync::Weak<Inner>;
            bus.attach(BusReceiver::new(receiver));
        }
        Ok(CachingService { inner })
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
    /// What the entries depend on; the in-process tier keeps it in step with what it
    /// holds.
    pub(crate) graph: Arc<dyn DependencyGraph>,
    pub(crate) remote: Option<Arc<dyn RemoteStore>>,
    pub(crate) bus: Option<Arc<dyn InvalidationBus>>,
    /// The remote store publishes on `bus` itself ([`Backend::with_store_bus`]).
    store_publishes: bool,
    /// This instance's id in bus messages.
    pub(crate) instance_id: u64,
    pub(crate) sync_stats: SyncCounters,
    pub(crate) warn: RateLimitedWarn,
    pub(crate) profiles: HashMap<String, Profile>,
    pub(crate) max_key_length: usize,
    pub(crate) flights: Flights,
    pub(crate) functions: FnTable,
    /// Counts invalidations (see [`Inner::is_stale`]).
    pub(crate) epoch: AtomicU64,
    pub(crate) log: parking_lot::Mutex<InvalidationLog>,
    /// Removals and publications that failed, sent again by one task.
    retries: parking_lot::Mutex<Retries>,
    /// This instance's invalidations not confirmed by the remote tier yet.
    pub(crate) held: Held,
    pub(crate) remote_stats: RemoteCounters,
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

/// How long a failed publication is sent again.
pub(crate) const REPUBLISH_FOR: Duration = Duration::from_secs(10);

/// How many failed publications wait at most; beyond, the oldest is dropped (counted
/// in `republish_dropped`).
const REPUBLISH_QUEUE: usize = 10_000;

/// How many removals wait to be sent again at most; beyond, the oldest is given up
/// (counted in `removals_dropped`; its entries stay held).
const REMOVAL_QUEUE: usize = 10_000;

/// How many invalidations the log keeps.
const LOG_CAPACITY: usize = 1024;

impl Inner {
    /// Every invalidation of this instance goes through here: removes the entries
    /// under `nodes` (entry nodes) and everything that depends on `nodes`, here; what
    /// it returns completes it in the shared tiers ([`Inner::complete`]).
    pub(crate) fn invalidate(&self, nodes: Vec<Node>) -> Pending {
        let mut named: Vec<Arc<[u8]>> = Vec::new();
        let mut dependencies = Vec::new();
        for n in &nodes {
            match n {
                Node::Entry(k) => named.push(k.clone()),
                Node::Key(d) => dependencies.push(d.to_string()),
                Node::Remote(_) => {}
            }
        }
        let mut start = nodes;
        let mut named_texts = Vec::new();
        if self.bus.is_some() || self.remote.is_some() {
            named_texts = named
                .iter()
                .filter_map(|k| Some(crate::Key::from_bytes(k)?.to_text(self.max_key_length)))
                .collect();
            // and what depends on them through entries read from the remote tier
            start.extend(named_texts.iter().map(|t| Node::Remote(t.as_str().into())));
        }
        let remote_graph = self.remote.as_ref().is_some_and(|r| r.graph().is_some());
        self.invalidating(start, true, |removed| {
            named.extend(removed.iter().cloned());
            let mut pending = self.pending(named, dependencies, None);
            // A remote graph finds the dependents itself: it starts from the entries
            // named here, not from every dependent this instance knows of.
            if remote_graph {
                pending.remote.named = named_texts;
            }
            self.held.hold(&pending.hold);
            pending
        })
    }

    /// Removes the entries depending on the entry `key`, not the entry itself (its
    /// value was just replaced, by a refresh).
    pub(crate) fn invalidate_dependents(&self, key: &[u8]) -> Pending {
        self.invalidating(vec![Node::Entry(key.into())], false, |removed| {
            let pending = self.pending(removed.to_vec(), Vec::new(), Some(key));
            self.held.hold(&pending.hold);
            pending
        })
    }

    /// What an invalidation leaves to do in the shared tiers: `entries` removed,
    /// `dependencies` invalidated, and with `replaced`, an entry given a new value.
    fn pending(
        &self,
        mut entries: Vec<Arc<[u8]>>,
        dependencies: Vec<String>,
        replaced: Option<&[u8]>,
    ) -> Pending {
        if self.remote.is_none() && self.bus.is_none() {
            return Pending::default();
        }
        entries.sort_unstable();
        entries.dedup();
        let text =
            |bytes: &[u8]| crate::Key::from_bytes(bytes).map(|k| k.to_text(self.max_key_length));
        let removed: Vec<String> = entries.iter().filter_map(|k| text(k)).collect();
        let replaced = replaced.and_then(text);
        let mut items = Vec::new();
        if self.bus.is_some() {
            items.extend(dependencies.iter().cloned().map(Item::Dependency));
            items.extend(removed.iter().cloned().map(Item::Removed));
            items.extend(replaced.iter().cloned().map(Item::Replaced));
        }
        if self.remote.is_none() {
            return Pending {
                items,
                ..Pending::default()
            };
        }
        // until the remote tier confirms, none of these is read from it
        let mut hold = Hold::default();
        hold.nodes.extend(removed.iter().map(|t| format!("e:{t}")));
        hold.nodes.extend(replaced.iter().map(|t| format!("e:{t}")));
        hold.nodes
            .extend(dependencies.iter().map(|d| format!("d:{d}")));
        Pending {
            remote: RemoteJob {
                // a replaced entry waits for its write, even with nothing to remove
                barrier: replaced.is_some(),
                removed,
                named: Vec::new(),
                dependencies,
                replaced,
                clear: false,
            },
            hold,
            items,
        }
    }

    /// Removes, in this process, the entries under the entry nodes of `start` (with
    /// `remove_start`) and every entry depending on `start`. Under the invalidation
    /// log's lock: count it, remove, detach the running flights of what it reached
    /// (so no later call joins a computation that may have read it), record what
    /// was reached, and run `then` with the entries removed (an invalidation holds
    /// its nodes there, so that no call starting after it reads them from the remote
    /// tier before the removal reaches it).
    fn invalidating<R>(
        &self,
        start: Vec<Node>,
        remove_start: bool,
        then: impl FnOnce(&[Arc<[u8]>]) -> R,
    ) -> R {
        let mut keys: Vec<Arc<[u8]>> = Vec::new();
        if remove_start {
            keys.extend(start.iter().filter_map(|n| match n {
                Node::Entry(k) => Some(k.clone()),
                Node::Key(_) | Node::Remote(_) => None,
            }));
        }
        let starting: Vec<Node> = if remove_start {
            Vec::new()
        } else {
            start.clone()
        };
        let mut log = self.log.lock();
        let epoch = self.epoch.fetch_add(1, Ordering::SeqCst) + 1;
        let (dependents, mut reached) = self.graph.dependents(start, remove_start);
        for n in &starting {
            // the entry itself stays valid
            reached.remove(n);
        }
        keys.extend(dependents);
        let removed = self.memory.remove_all(keys);
        self.flights.detach(reached.iter().filter_map(|n| match n {
            Node::Entry(k) => Some(&**k),
            Node::Key(_) | Node::Remote(_) => None,
        }));
        log.record(epoch, reached);
        let result = then(&removed);
        drop(log);
        removed.iter().for_each(|key| self.count_invalidation(key));
        result
    }

    /// Completes an invalidation in the shared tiers: removes its entries from the
    /// remote tier (after any write of them queued before; with a remote graph, their
    /// dependents too, which are then dropped from this instance's L1 as well), then
    /// tells the other instances. Failures are counted and logged, never returned.
    ///
    /// Bounded by the remote store's timeout: when the removal failed (refused, down
    /// or slow), it is sent again by the retry task until it goes through, and its
    /// entries stay held meanwhile (see [`crate::held`]); the publication is left to
    /// a task of its own.
    pub(crate) async fn complete(self: &Arc<Self>, pending: Pending) {
        let Pending {
            remote: job,
            hold,
            items,
        } = pending;
        let payload = match (&self.bus, items.is_empty()) {
            (Some(_), false) => Some(self.message(items)),
            _ => None,
        };
        let mut published = false;
        let mut done = true;
        if self.remote.is_some() && job.has_work(self.remote_graph()) {
            // the store publishes it along with the removal, in the same round trip
            let along = payload.clone().filter(|_| self.store_publishes);
            match self.send_remote(&job, along).await {
                Ok(p) => {
                    published = p;
                    self.held.release(hold);
                }
                Err(e) => {
                    done = false;
                    self.remote_stats.bump(&self.remote_stats.removal_errors);
                    self.warn.warn(format_args!(
                        "{}: {e} (sent again until it goes through; until then this instance reads none of those entries from the remote tier)",
                        job.what()
                    ));
                    self.retry_removal(job, hold, payload.clone());
                }
            }
        } else {
            self.held.release(hold);
        }
        let (Some(bus), Some(payload)) = (self.bus.clone(), payload) else {
            return;
        };
        if published {
            self.sync_stats.bump(&self.sync_stats.published);
            return;
        }
        match (done, tokio::runtime::Handle::try_current()) {
            (false, Ok(handle)) => {
                let inner = self.clone();
                handle.spawn(async move { inner.publish(&bus, payload).await });
            }
            _ => self.publish(&bus, payload).await,
        }
    }

    fn remote_graph(&self) -> bool {
        self.remote.as_ref().is_some_and(|r| r.graph().is_some())
    }

    /// Sends the remote part of an invalidation, with `along` published by the store
    /// once it is done. `Ok` says whether `along` was published; a failed publication
    /// is counted and logged here.
    async fn send_remote(
        &self,
        job: &RemoteJob,
        along: Option<Vec<u8>>,
    ) -> Result<bool, RemoteError> {
        let Some(remote) = &self.remote else {
            return Ok(false);
        };
        if job.clear {
            remote.clear().await?;
            return Ok(false);
        }
        let sent_along = along.is_some();
        let removed = match remote.graph() {
            Some(graph) => {
                let start = job.graph_start();
                if start.is_empty() {
                    return Ok(false);
                }
                // Links are flattened, so every instance's own graph reaches the
                // same dependents from the nodes the message names; the keys the
                // remote graph removed only matter for this instance's L1, as a
                // safety net.
                let want_keys = self.memory.enabled();
                let removed = graph
                    .invalidate(start, job.replaced.clone(), want_keys, along)
                    .await?;
                let known: HashSet<&String> = job.removed.iter().collect();
                let extra: Vec<String> = removed
                    .keys
                    .iter()
                    .filter(|t| !known.contains(t))
                    .cloned()
                    .collect();
                self.remove_local(&extra);
                removed
            }
            None if !job.removed.is_empty() || job.barrier => {
                remote.remove(job.removed.clone(), along).await?
            }
            None => return Ok(false),
        };
        match removed.publish_error {
            Some(e) if sent_along => {
                self.sync_stats.bump(&self.sync_stats.publish_errors);
                self.warn
                    .warn(format_args!("publishing an invalidation failed: {e}"));
                Ok(false)
            }
            _ => Ok(sent_along),
        }
    }

    /// This instance's message carrying `items`, encoded.
    fn message(&self, items: Vec<Item>) -> Vec<u8> {
        Message {
            sender: self.instance_id,
            items,
        }
        .encode()
    }

    /// Publishes an invalidation. A publication that fails is sent again, with the
    /// others that failed, in order, by one task with back-off, each for up to
    /// [`REPUBLISH_FOR`]: other instances that kept their subscription would otherwise
    /// keep their copies until they expire (those that lost it clear their tier
    /// anyway).
    async fn publish(self: &Arc<Self>, bus: &Arc<dyn InvalidationBus>, payload: Vec<u8>) {
        match bus.publish(payload.clone()).await {
            Ok(()) => self.sync_stats.bump(&self.sync_stats.published),
            Err(e) => {
                self.sync_stats.bump(&self.sync_stats.publish_errors);
                self.warn.warn(format_args!(
                    "publishing an invalidation failed: {e} (sent again while it fails, for {REPUBLISH_FOR:?})"
                ));
                self.publish_later(payload);
            }
        }
    }

    /// Queues a failed publication for the retry task.
    fn publish_later(self: &Arc<Self>, payload: Vec<u8>) {
        let mut r = self.retries.lock();
        if r.publications.len() >= REPUBLISH_QUEUE {
            r.publications.pop_front();
            self.sync_stats.bump(&self.sync_stats.republish_dropped);
        }
        let n = r.next;
        r.next += 1;
        r.publications.push_back((n, Instant::now(), payload));
        self.start_retries(r);
    }

    /// Queues the remote part of an invalidation that did not go through: the retry
    /// task sends it again until it does, then releases `hold` and publishes
    /// `payload` again (other instances may have read the old value back from the
    /// store meanwhile).
    pub(crate) fn retry_removal(
        self: &Arc<Self>,
        job: RemoteJob,
        hold: Hold,
        payload: Option<Vec<u8>>,
    ) {
        let mut r = self.retries.lock();
        if r.removals.len() >= REMOVAL_QUEUE {
            // its entries stay held: this instance keeps not reading them remotely
            r.removals.pop_front();
            self.remote_stats.bump(&self.remote_stats.removals_dropped);
        }
        let n = r.next;
        r.next += 1;
        r.removals
            .push_back((n, Box::new(Retry { job, hold, payload })));
        self.start_retries(r);
    }

    /// Starts the retry task unless it runs.
    fn start_retries(self: &Arc<Self>, mut r: parking_lot::MutexGuard<'_, Retries>) {
        if std::mem::replace(&mut r.running, true) {
            return;
        }
        drop(r);
        let Ok(handle) = tokio::runtime::Handle::try_current() else {
            self.retries.lock().running = false;
            self.warn.warn(format_args!(
                "no tokio runtime here: failed invalidations are not sent again"
            ));
            return;
        };
        let inner = Arc::downgrade(self);
        handle.spawn(async move {
            let mut backoff = Backoff::new(Duration::from_millis(20), Duration::from_millis(500));
            loop {
                backoff.wait().await;
                let Some(inner) = inner.upgrade() else { return };
                let removals_ok = inner.retry_removals().await;
                let publications_ok = inner.retry_publications().await;
                let mut r = inner.retries.lock();
                if r.removals.is_empty() && r.publications.is_empty() {
                    r.running = false;
                    return;
                }
                if removals_ok && publications_ok {
                    backoff.reset();
                }
            }
        });
    }

    /// Sends the waiting removals again, in order, until one fails; returns whether
    /// none did.
    async fn retry_removals(self: &Arc<Self>) -> bool {
        loop {
            let Some((n, job, payload)) = self
                .retries
                .lock()
                .removals
                .front()
                .map(|(n, r)| (*n, r.job.clone(), r.payload.clone()))
            else {
                return true;
            };
            let along = payload.clone().filter(|_| self.store_publishes);
            match self.send_remote(&job, along).await {
                Ok(published) => {
                    let retry = {
                        let mut r = self.retries.lock();
                        match r.removals.front() {
                            Some((front, _)) if *front == n => r.removals.pop_front(),
                            _ => None, // dropped meanwhile
                        }
                    };
                    let Some((_, retry)) = retry else { continue };
                    self.held.release(retry.hold);
                    self.remote_stats.bump(&self.remote_stats.removals_retried);
                    tracing::info!(target: "cache_runtime", "{}: went through when sent again", job.what());
                    match (published, &self.bus, payload) {
                        (true, _, _) => self.sync_stats.bump(&self.sync_stats.published),
                        (false, Some(bus), Some(payload)) => {
                            let bus = bus.clone();
                            self.publish(&bus, payload).await;
                        }
                        _ => {}
                    }
                }
                Err(e) => {
                    self.remote_stats.bump(&self.remote_stats.removal_errors);
                    self.warn
                        .warn(format_args!("{} (sent again): {e}", job.what()));
                    return false;
                }
            }
        }
    }

    /// Sends the failed publications again, in order, until one fails; gives up those
    /// older than [`REPUBLISH_FOR`]. Returns whether none failed.
    async fn retry_publications(self: &Arc<Self>) -> bool {
        let Some(bus) = self.bus.clone() else {
            self.retries.lock().publications.clear();
            return true;
        };
        loop {
            let (n, payload) = {
                let mut r = self.retries.lock();
                while r
                    .publications
                    .front()
                    .is_some_and(|(_, at, _)| at.elapsed() > REPUBLISH_FOR)
                {
                    r.publications.pop_front();
                    self.sync_stats.bump(&self.sync_stats.republish_dropped);
                }
                match r.publications.front() {
                    Some((n, _, payload)) => (*n, payload.clone()),
                    None => return true,
                }
            };
            if bus.publish(payload).await.is_err() {
                return false;
            }
            self.sync_stats.bump(&self.sync_stats.published);
            self.sync_stats.bump(&self.sync_stats.republished);
            let mut r = self.retries.lock();
            if r.publications
                .front()
                .is_some_and(|(front, _, _)| *front == n)
            {
                r.publications.pop_front();
            }
        }
    }
    /// Applies another instance's invalidation here, locally only.
    pub(crate) fn apply_received(&self, message: Message) {
        // its own, or a probe (a message naming nothing)
        if message.sender == self.instance_id || message.items.is_empty() {
            return;
        }
        self.sync_stats.bump(&self.sync_stats.received);
        let mut nodes = Vec::new();
        let mut named = Vec::new();
        for item in message.items {
            match item {
                Item::Removed(text) | Item::Replaced(text) => named.push(text),
                Item::Dependency(d) => nodes.push(Node::Key(d.into())),
                Item::Clear => self.clear_local(),
            }
        }
        nodes.extend(self.nodes_named(&named));
        if !nodes.is_empty() {
            self.invalidating(nodes, true, |_| ());
        }
    }

    /// Removes here, locally only, the entries named by readable keys.
    fn remove_local(&self, texts: &[String]) {
        let nodes = self.nodes_named(texts);
        if !nodes.is_empty() {
            self.invalidating(nodes, true, |_| ());
        }
    }

    /// The entries held under the readable keys `texts`, and the running flights of
    /// them (a call computing one now may have read the old value). The running
    /// flights' keys are rendered once, whatever the number of texts.
    fn nodes_named(&self, texts: &[String]) -> Vec<Node> {
        if texts.is_empty() {
            return Vec::new();
        }
        let wanted: HashSet<&str> = texts.iter().map(String::as_str).collect();
        let renders_to_one = |bytes: &[u8]| {
            crate::Key::from_bytes(bytes)
                .is_some_and(|k| wanted.contains(k.to_text(self.max_key_length).as_str()))
        };
        let mut nodes: Vec<Node> = self
            .flights
            .keys_matching(renders_to_one)
            .into_iter()
            .map(Node::Entry)
            .collect();
        for text in texts {
            if let Some(key) = self.memory.key_of(text) {
                nodes.push(Node::Entry(key.into()));
            }
            // what depends on it through an entry read from the remote tier
            nodes.push(Node::Remote(text.as_str().into()));
        }
        nodes
    }
}

impl FunctionStates for Inner {
    #[inline]
    fn function(&self, desc: &'static Descriptor, reg: &'static Registration) -> &FnState {
        Inner::function(self, desc, reg)
    }
}

impl Receive for Inner {
    fn message(&self, message: Message) {
        self.apply_received(message);
    }

    fn undecodable(&self, error: &str) {
        self.sync_stats.bump(&self.sync_stats.undecodable);
        self.warn.warn(format_args!(
            "an invalidation message does not decode: {error}"
        ));
    }

    fn missed(&self) {
        self.clear_after_loss();
    }

    fn waiting(&self) {
        self.memory.bypass(false);
    }

    fn receiving(&self) {
        self.resume_after_loss();
    }
}

impl Inner {
    /// Clears the in-process tier because invalidations may have been missed, and
    /// bypasses it (storing nothing) until the bus receives again.
    pub(crate) fn clear_after_loss(&self) {
        self.memory.bypass(true);
        self.clear_local();
        self.sync_stats.bump(&self.sync_stats.l1_clears);
    }

    /// Serves the in-process tier again once the bus receives; after a loss, clears it
    /// once more first (counted): whatever computations started before the loss
    /// still finish are out of date.
    pub(crate) fn resume_after_loss(&self) {
        if self.memory.missed() {
            self.clear_local();
            self.sync_stats.bump(&self.sync_stats.l1_clears);
        }
        self.memory.serve();
    }
}

/// What an invalidation leaves to do in the shared tiers: the remote part, what it
/// holds until the remote tier confirms it, and the message items to publish.
#[derive(Default)]
#[must_use = "the shared tiers still hold these entries: pass this to `Inner::complete`"]
pub(crate) struct Pending {
    remote: RemoteJob,
    /// Held from the invalidation until the remote tier confirms it (see
    /// [`crate::held`]).
    hold: Hold,
    /// What to publish.
    items: Vec<Item>,
}

impl Pending {
    fn is_empty(&self) -> bool {
        self.remote.removed.is_empty()
            && self.remote.dependencies.is_empty()
            && self.items.is_empty()
            && !self.remote.barrier
    }
}

/// The remote part of an invalidation: sent once, and again while it fails.
#[derive(Clone, Default)]
pub(crate) struct RemoteJob {
    /// Readable keys of the entries to remove from the remote tier.
    removed: Vec<String>,
    /// With a remote graph: those of `removed` the invalidation named (the graph
    /// finds the dependents itself).
    named: Vec<String>,
    /// Dependencies invalidated (for a remote graph).
    dependencies: Vec<String>,
    /// The entry a refresh replaced: its dependents go, it stays.
    replaced: Option<String>,
    /// Wait for the remote tier's queued writes even with nothing to remove.
    barrier: bool,
    /// Remove every entry of the remote tier.
    clear: bool,
}

impl RemoteJob {
    fn clear() -> Self {
        RemoteJob {
            clear: true,
            ..RemoteJob::default()
        }
    }

    /// Whether it sends anything to a remote tier (with a graph or without).
    fn has_work(&self, graph: bool) -> bool {
        self.clear
            || match graph {
                true => {
                    !self.named.is_empty()
                        || !self.dependencies.is_empty()
                        || self.replaced.is_some()
                }
                false => !self.removed.is_empty() || self.barrier,
            }
    }

    /// The remote graph's start nodes.
    fn graph_start(&self) -> Vec<String> {
        let mut start: Vec<String> = self.named.iter().map(|t| format!("e:{t}")).collect();
        start.extend(self.dependencies.iter().map(|d| format!("d:{d}")));
        start.extend(self.replaced.iter().map(|t| format!("e:{t}")));
        start
    }

    /// What it does, for the log.
    fn what(&self) -> String {
        let first = self
            .removed
            .first()
            .map(|k| format!("`{k}`"))
            .or_else(|| {
                self.dependencies
                    .first()
                    .map(|d| format!("dependency `{d}`"))
            })
            .or_else(|| {
                self.replaced
                    .as_ref()
                    .map(|k| format!("the dependents of `{k}`"))
            })
            .unwrap_or_default();
        let more = (self.removed.len() + self.dependencies.len()).saturating_sub(1);
        match (self.clear, more) {
            (true, _) => "clearing the remote tier failed".to_owned(),
            (false, 0) => format!("removing {first} from the remote tier failed"),
            (false, more) => {
                format!("removing {first} and {more} more from the remote tier failed")
            }
        }
    }
}

/// An invalidation's remote part waiting to be sent again.
struct Retry {
    job: RemoteJob,
    hold: Hold,
    payload: Option<Vec<u8>>,
}

/// What the retry task sends again, oldest first: the remote parts of invalidations
/// (until they go through) and failed publications (each for up to
/// [`REPUBLISH_FOR`]), each with its number; `running` while the task runs.
#[derive(Default)]
struct Retries {
    removals: VecDeque<(u64, Box<Retry>)>,
    publications: VecDeque<(u64, Instant, Vec<u8>)>,
    next: u64,
    running: bool,
}

/// Counters of the service's own dealings with the remote tier.
#[derive(Default)]
pub(crate) struct RemoteCounters {
    pub(crate) removal_errors: AtomicU64,
    pub(crate) removals_retried: AtomicU64,
    pub(crate) removals_dropped: AtomicU64,
    pub(crate) reads_held: AtomicU64,
}

impl RemoteCounters {
    pub(crate) fn bump(&self, c: &AtomicU64) {
        c.fetch_add(1, Ordering::Relaxed);
    }
}

impl CachingService {
    /// Completes an invalidation in the shared tiers without waiting, from code that
    /// cannot wait (a plain function). Needs a tokio runtime; without one it is
    /// skipped and logged.
    pub(crate) fn complete_detached(&self, pending: Pending) {
        if pending.is_empty() {
            return;
        }
        match tokio::runtime::Handle::try_current() {
            Ok(handle) => {
                let inner = self.inner.clone();
                handle.spawn(async move { inner.complete(pending).await });
            }
            Err(_) => self.inner.warn.warn(format_args!(
                "invalidated entries could not be removed from the shared tiers: no tokio runtime here"
            )),
        }
    }
}

impl Inner {
    /// This service's state for a function, created on first use. The registration must
    /// be usable (its number below [`MAX_FUNCTIONS`]).
    #[inline]
    pub(crate) fn function(
        &self,
        desc: &'static Descriptor,
        reg: &'static Registration,
    ) -> &FnState {
        self.functions.0.get_or_init(reg.id as usize, || {
            FnState::resolve(&self.profiles, desc, reg)
        })
    }

    /// The state counting the calls of a function that runs uncached because it
    /// cannot have keys.
    pub(crate) fn unusable(
        &self,
        desc: &'static Descriptor,
        reg: &'static Registration,
    ) -> &FnState {
        if (reg.id as usize) < MAX_FUNCTIONS {
            self.function(desc, reg)
        } else {
            self.functions
                .1
                .get_or_init(|| FnState::resolve(&self.profiles, desc, reg))
        }
    }

    fn count_invalidation(&self, key: &[u8]) {
        if let Some(state) = crate::key::function_id(key).and_then(|id| self.functions.get(id)) {
            state.counters.bump(crate::stats::Counter::Invalidation);
        }
    }

    /// Runs `then` if a value for `key`, computed since `since` from what `frame`
    /// collected, is current ([`InvalidationLog::is_stale`]), under the invalidation log's
    /// lock: an invalidation is either seen here, or starts after `then` ran (so its
    /// removal is queued after what `then` queued).
    pub(crate) fn if_current(
        &self,
        key: &[u8],
        since: u64,
        frame: &Frame,
        then: impl FnOnce(),
    ) -> bool {
        let log = self.log.lock();
        if self.epoch.load(Ordering::SeqCst) != since && log.is_stale(key, since, frame) {
            return false;
        }
        then();
        true
    }

    /// Removes every entry of this process's tier and every link, and ends the
    /// running flights.
    pub(crate) fn clear_local(&self) {
        let mut log = self.log.lock();
        let epoch = self.epoch.fetch_add(1, Ordering::SeqCst) + 1;
        self.flights.detach_all();
        self.memory.clear();
        self.graph.clear();
        log.entries.clear();
        log.floor = epoch;
    }
}

impl InvalidationLog {
    /// Whether a value for `key`, computed since the invalidation count `since` from
    /// what `frame` collected, is out of date: an invalidation after `since` reached the
    /// key itself, or reached something the body read before that invalidation.
    fn is_stale(&self, key: &[u8], since: u64, frame: &Frame) -> bool {
        let log = self;
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
    if in_scope() {
        with_scoped(f)
    } else {
        f(global())
    }
}

/// Whether a call here runs inside [`CachingService::scope`] (checked only while some
/// scope exists).
#[inline(always)]
pub(crate) fn in_scope() -> bool {
    SCOPES.load(Ordering::Relaxed) != 0 && SCOPED.try_with(|_| ()).is_ok()
}

/// Runs `f` with the enclosing scope's service; only after [`in_scope`].
pub(crate) fn with_scoped<R>(f: impl FnOnce(&CachingService) -> R) -> R {
    SCOPED.with(f)
}

/// The global service, installed with defaults if none was.
#[inline]
pub(crate) fn global() -> &'static CachingService {
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
        let inner = &service.inner;
        let hold = match inner.remote {
            Some(_) => Hold::all(),
            None => Hold::default(),
        };
        // nothing is read from the remote tier until it is cleared
        inner.held.hold(&hold);
        inner.clear_local();
        let payload = inner.bus.as_ref().map(|_| inner.message(vec![Item::Clear]));
        if let Some(remote) = &inner.remote {
            match remote.clear().await {
                Ok(()) => inner.held.release(hold),
                Err(e) => {
                    inner.remote_stats.bump(&inner.remote_stats.removal_errors);
                    inner.warn.warn(format_args!(
                        "clearing the remote tier failed: {e} (sent again until it goes through; until then this instance reads nothing from the remote tier)"
                    ));
                    inner.retry_removal(RemoteJob::clear(), hold, payload.clone());
                }
            }
        }
        if let (Some(bus), Some(payload)) = (&inner.bus, payload) {
            inner.publish(bus, payload).await;
        }
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
    let pending = service.inner.invalidate(nodes);
    service.inner.complete(pending).await;
}

/// Completes the current service's pending background writes before it returns.
pub async fn shutdown() -> ShutdownReport {
    CachingService::current().shutdown().await
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
}
