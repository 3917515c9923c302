//! The service's state, shared by every flow: the tiers, the bus, the function table,
//! the invalidation count and log, and what this instance's invalidations hold.
//!
//! The flows are written over it in their own files: the hit (`hit.rs`), the miss
//! (`miss.rs`), the invalidation (`invalidate_local.rs`, `invalidate.rs`) and what
//! another instance's invalidation does here (`receive.rs`).

use std::collections::{HashMap, HashSet, VecDeque};
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use crate::bus::{InvalidationBus, SyncCounters};
use crate::deps::{DependencyGraph, Frame, Node};
use crate::flight::Flights;
use crate::held::Held;
use crate::memory::MemoryTier;
use crate::pending::Retries;
use crate::profile::Profile;
use crate::registry::{Descriptor, FnState, FnTable, FunctionStates, Registration, MAX_FUNCTIONS};
use crate::remote::{RateLimitedWarn, RemoteStore};

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
    /// The remote store publishes on `bus` itself ([`Backend::with_store_bus`](crate::Backend::with_store_bus)).
    pub(crate) store_publishes: bool,
    /// This instance's id in bus messages.
    pub(crate) instance_id: u64,
    pub(crate) sync_stats: SyncCounters,
    pub(crate) warn: RateLimitedWarn,
    pub(crate) profiles: HashMap<String, Profile>,
    pub(crate) max_key_length: usize,
    pub(crate) flights: Flights,
    pub(crate) functions: FnTable,
    /// Counts invalidations (see [`InvalidationLog::is_stale`]), bumped when one
    /// begins, before it removes anything: a value stored while it has not moved is
    /// found by every invalidation that begins later.
    pub(crate) epoch: AtomicU64,
    /// The invalidations whose removals in this process are done: what a computation
    /// takes as its starting point ([`Inner::snapshot`]).
    pub(crate) settled: AtomicU64,
    pub(crate) log: parking_lot::Mutex<InvalidationLog>,
    /// The keys whose body runs in the background now (an eager refresh, or a body
    /// past its soft timeout): at most one each.
    pub(crate) background: parking_lot::Mutex<HashSet<Arc<[u8]>>>,
    /// Removals and publications that failed, sent again by one task.
    pub(crate) retries: parking_lot::Mutex<Retries>,
    /// This instance's invalidations not confirmed by the remote tier yet.
    pub(crate) held: Held,
    pub(crate) remote_stats: RemoteCounters,
}

/// Recent invalidations, with every node each one reached, so that a computation that
/// ran across one can tell whether it read something that was invalidated.
#[derive(Default)]
pub(crate) struct InvalidationLog {
    pub(crate) entries: VecDeque<(u64, HashSet<Node>)>,
    /// Computations started before this count are treated as out of date: the entries
    /// that would tell were dropped, or everything was cleared.
    pub(crate) floor: u64,
}

/// How many invalidations the log keeps.
const LOG_CAPACITY: usize = 1024;

impl Inner {
    /// This service's state for a function, created on first use. The registration must
    /// be usable (its number below [`MAX_FUNCTIONS`]).
    #[inline]
    pub(crate) fn function(
        &self,
        desc: &'static Descriptor,
        reg: &'static Registration,
    ) -> &FnState {
        self.functions.numbered.get_or_init(reg.id as usize, || {
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
                .beyond
                .get_or_init(|| FnState::resolve(&self.profiles, desc, reg))
        }
    }

    pub(crate) fn count_invalidation(&self, key: &[u8]) {
        if let Some(state) = crate::key::function_id(key).and_then(|id| self.functions.get(id)) {
            state.counters.bump(crate::stats::Counter::Invalidation);
        }
    }

    /// The invalidation count a computation starts from (its `epoch`, a read's
    /// `read_epoch`): the invalidations whose removals are done. An invalidation
    /// counted in [`Inner::epoch`] but still removing comes after it, since what the
    /// computation reads next may be what it is about to remove (an expired entry
    /// kept as a fallback, an entry a body reads).
    #[inline]
    pub(crate) fn snapshot(&self) -> u64 {
        self.settled.load(Ordering::SeqCst)
    }

    /// Runs `then` if a value for `key`, computed epoch `epoch` from what `frame`
    /// collected, is current ([`InvalidationLog::is_stale`]), under the invalidation log's
    /// lock: an invalidation is either seen here, or starts after `then` ran (so its
    /// removal is queued after what `then` queued).
    pub(crate) fn if_current(
        &self,
        key: &[u8],
        epoch: u64,
        frame: &Frame,
        then: impl FnOnce(),
    ) -> bool {
        let log = self.log.lock();
        if self.epoch.load(Ordering::SeqCst) != epoch && log.is_stale(key, epoch, frame) {
            return false;
        }
        then();
        true
    }
}

impl FunctionStates for Inner {
    #[inline]
    fn function(&self, desc: &'static Descriptor, reg: &'static Registration) -> &FnState {
        Inner::function(self, desc, reg)
    }
}

impl InvalidationLog {
    /// Whether a value for `key`, computed epoch the invalidation count `epoch` from
    /// what `frame` collected, is out of date: an invalidation after `epoch` reached the
    /// key itself, or reached something the body read before that invalidation.
    pub(crate) fn is_stale(&self, key: &[u8], epoch: u64, frame: &Frame) -> bool {
        let log = self;
        if epoch < log.floor {
            return true;
        }
        let own = Node::Entry(key.into());
        log.entries
            .iter()
            .filter(|(e, _)| *e > epoch)
            .any(|(e, reached)| {
                reached.contains(&own)
                    || frame
                        .nodes
                        .iter()
                        .zip(&frame.read_epoch)
                        .any(|(node, read_epoch)| *e > *read_epoch && reached.contains(node))
            })
    }

    pub(crate) fn record(&mut self, epoch: u64, reached: HashSet<Node>) {
        if self.entries.len() == LOG_CAPACITY {
            if let Some((dropped, _)) = self.entries.pop_front() {
                self.floor = dropped;
            }
        }
        self.entries.push_back((epoch, reached));
    }
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

impl fmt::Debug for CachingService {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CachingService")
            .field("entries", &self.inner.memory.len())
            .field("profiles", &self.inner.profiles.keys().collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}
