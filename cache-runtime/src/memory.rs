//! The in-process tier: typed values in bounded `quick_cache` shards, with expiry.
//!
//! Values are stored as `Box<Slot<T>>` behind `dyn Any`. A hit hashes the key once,
//! takes its shard's read lock, and clones `T` out of the slot while holding it:
//! nothing is deserialized and no reference count is touched. The shards are
//! `quick_cache::unsync::Cache`s behind our own `RwLock`s (what `quick_cache::sync`
//! does inside), which is what lets a hit read the value in place instead of cloning
//! an `Arc` out of the cache; their keys carry the hash computed for choosing the
//! shard, so a key is hashed once.
//!
//! Expiry is kept in the slot (`expires_at`, in nanoseconds on a process clock) and
//! checked on read; an expired slot is removed by the reader that finds it, or evicted
//! like any cold entry. A sliding slot moves its deadline forward on each hit.

use std::any::Any;
use std::fmt;
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, LazyLock};
use std::time::Duration;

use std::hash::{BuildHasher, Hash, Hasher};

use parking_lot::{Mutex, RwLock};
use quick_cache::unsync::Cache;
use quick_cache::{DefaultHashBuilder, Equivalent, Lifecycle, Weighter};

use crate::deps::{DependencyGraph, Frame};
use crate::keybuf::key_hash;
pub use crate::profile::Expiration;

/// Deadline meaning "never expires".
pub(crate) const NEVER: u64 = u64::MAX;

/// The origin of [`now_nanos`]: a day before the first reading (or as far back as the
/// machine's monotonic clock goes), so that a clock read later is never before it.
/// Runtimes with a paused clock (tests) each have a clock of their own, which starts
/// at the real time they were built; with the first reading as the origin, a runtime
/// whose clock was behind another's read 0 until it caught up.
static CLOCK_BASE: LazyLock<tokio::time::Instant> = LazyLock::new(|| {
    let now = std::time::Instant::now();
    let base = [86_400, 3_600, 60]
        .into_iter()
        .find_map(|s| now.checked_sub(Duration::from_secs(s)))
        .unwrap_or(now);
    tokio::time::Instant::from_std(base)
});

/// Nanoseconds since the process clock started. Uses tokio's clock, so tests that pause
/// time see entries expire as time is advanced.
pub(crate) fn now_nanos() -> u64 {
    let elapsed = tokio::time::Instant::now().saturating_duration_since(*CLOCK_BASE);
    u64::try_from(elapsed.as_nanos()).unwrap_or(NEVER - 1)
}

fn nanos(d: Duration) -> u64 {
    u64::try_from(d.as_nanos()).unwrap_or(NEVER - 1)
}

/// One stored value with its deadline and what it depends on.
pub(crate) struct Slot<V: ?Sized> {
    expires_at: AtomicU64,
    sliding: u64,
    /// With fail-safe: until when an expired slot is kept as a fallback (process
    /// nanoseconds, as `expires_at`); 0 when it is not. A kept slot is never a hit.
    pub(crate) kept_until: u64,
    /// With eager refresh: the slot's expiry, while `expires_at` is the point at which
    /// a hit starts a refresh; 0 without. The first hit past that point moves
    /// `expires_at` here and starts it; the hit path itself is unchanged.
    lives_until: AtomicU64,
    /// The dependencies collected while the value was computed; a cached function that
    /// reads this entry from inside its own body links to them too.
    pub(crate) deps: Option<Arc<[crate::deps::Node]>>,
    /// The readable key, kept while the service has an invalidation bus: messages
    /// name entries by it (see [`KeyIndex`]).
    text: Option<Box<str>>,
    /// The remote invalidation count as of which the value is current (see
    /// [`crate::deps::Frame::remote_epoch`]).
    pub(crate) remote_epoch: u64,
    pub(crate) value: V,
}

pub(crate) type AnySlot = Slot<dyn Any + Send + Sync>;

/// A slot past its deadline (see [`Slot::past_deadline`]).
enum PastDeadline {
    /// Past its eager-refresh point, not expired: a hit.
    Live,
    /// The same, and this caller is to refresh it.
    Due,
    /// Expired, kept as a fallback (fail-safe): never a hit.
    Kept,
    /// Expired: removed by the reader.
    Expired,
}

/// Identifies a stored slot (its address), to remove it only if it is still the one
/// stored under its key.
pub(crate) fn slot_id(slot: &AnySlot) -> usize {
    slot as *const AnySlot as *const () as usize
}

impl<V> Slot<V> {
    pub(crate) fn new(value: V, expiration: Expiration) -> Self {
        let (expires_at, sliding) = match expiration {
            Expiration::Never => (NEVER, 0),
            Expiration::Absolute(d) => (now_nanos().saturating_add(nanos(d)), 0),
            Expiration::Sliding(d) => {
                let d = nanos(d);
                (now_nanos().saturating_add(d), d)
            }
        };
        Slot {
            expires_at: AtomicU64::new(expires_at),
            sliding,
            kept_until: 0,
            lives_until: AtomicU64::new(0),
            deps: None,
            text: None,
            remote_epoch: 0,
            value,
        }
    }
}

impl<V: ?Sized> Slot<V> {
    /// Keeps the slot as a fallback for `grace` after it expires (fail-safe).
    pub(crate) fn keep_for(&mut self, grace: Duration) {
        let deadline = self.expires_at.load(Ordering::Relaxed);
        if deadline != NEVER {
            self.kept_until = deadline.saturating_add(nanos(grace));
        }
    }

    /// Eager refresh: a hit `margin` before the slot expires starts a refresh of it.
    pub(crate) fn refresh_before(&mut self, margin: Duration) {
        let deadline = *self.expires_at.get_mut();
        if deadline != NEVER {
            *self.lives_until.get_mut() = deadline;
            *self.expires_at.get_mut() = deadline.saturating_sub(nanos(margin));
        }
    }

    /// What a slot past its deadline is (out of the hit path's line). With `claim`,
    /// the first caller to see it past its eager-refresh point moves its deadline to
    /// its expiry, and refreshes it.
    #[cold]
    #[inline(never)]
    fn past_deadline(&self, claim: bool) -> PastDeadline {
        let lives = self.lives_until.load(Ordering::Relaxed);
        if lives != 0 && now_nanos() < lives {
            let due = self.expires_at.load(Ordering::Relaxed);
            let first = claim
                && due != lives
                && self
                    .expires_at
                    .compare_exchange(due, lives, Ordering::Relaxed, Ordering::Relaxed)
                    .is_ok();
            return if first {
                PastDeadline::Due
            } else {
                PastDeadline::Live
            };
        }
        if self.kept() {
            PastDeadline::Kept
        } else {
            PastDeadline::Expired
        }
    }

    /// Whether an expired slot is still kept as a fallback.
    fn kept(&self) -> bool {
        self.kept_until != 0 && now_nanos() < self.kept_until
    }

    /// Checks the deadline; a live sliding slot moves it forward.
    #[inline]
    fn touch(&self) -> bool {
        let deadline = self.expires_at.load(Ordering::Relaxed);
        if deadline == NEVER {
            return true;
        }
        let now = now_nanos();
        if now >= deadline {
            return false;
        }
        if self.sliding != 0 {
            self.expires_at
                .store(now.saturating_add(self.sliding), Ordering::Relaxed);
        }
        true
    }
}

/// Weighs one entry: the key's encoded bytes and the stored value (downcast it to the
/// types you cache).
pub type WeighFn = dyn Fn(&[u8], &(dyn Any + Send + Sync)) -> u64 + Send + Sync;

#[derive(Clone)]
struct EntryWeighter(Option<Arc<WeighFn>>);

impl Weighter<StoredKey, Box<AnySlot>> for EntryWeighter {
    fn weight(&self, key: &StoredKey, val: &Box<AnySlot>) -> u64 {
        match &self.0 {
            None => 1,
            Some(f) => f(&key.bytes, &val.value),
        }
    }
}

/// A key as stored in a shard, with its hash.
struct StoredKey {
    hash: u64,
    bytes: Box<[u8]>,
}

/// A key being looked up, with its hash.
struct LookupKey<'a> {
    hash: u64,
    bytes: &'a [u8],
}

impl Hash for StoredKey {
    fn hash<H: Hasher>(&self, state: &mut H) {
        state.write_u64(self.hash);
    }
}
impl Hash for LookupKey<'_> {
    fn hash<H: Hasher>(&self, state: &mut H) {
        state.write_u64(self.hash);
    }
}
impl PartialEq for StoredKey {
    fn eq(&self, other: &Self) -> bool {
        self.hash == other.hash && same_bytes(&self.bytes, &other.bytes)
    }
}
impl Eq for StoredKey {}
impl Equivalent<StoredKey> for LookupKey<'_> {
    #[inline]
    fn equivalent(&self, key: &StoredKey) -> bool {
        self.hash == key.hash && same_bytes(self.bytes, &key.bytes)
    }
}

/// Byte equality that compares keys of 8 to 32 bytes (most keys) with a few word
/// loads instead of a call to `memcmp`.
#[inline]
fn same_bytes(a: &[u8], b: &[u8]) -> bool {
    let n = a.len();
    if n != b.len() {
        return false;
    }
    let word =
        |s: &[u8], at: usize| u64::from_le_bytes(s[at..at + 8].try_into().unwrap_or_default());
    let differ = |at: usize| word(a, at) ^ word(b, at);
    match n {
        8..=16 => differ(0) | differ(n - 8) == 0,
        17..=32 => differ(0) | differ(8) | differ(n - 16) | differ(n - 8) == 0,
        _ => a == b,
    }
}

/// The shards' hasher: keys arrive already hashed, as one `u64`.
#[derive(Clone, Default)]
struct PreHashed;
struct PreHashedHasher(u64);

impl BuildHasher for PreHashed {
    type Hasher = PreHashedHasher;
    fn build_hasher(&self) -> PreHashedHasher {
        PreHashedHasher(0)
    }
}

impl Hasher for PreHashedHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write_u64(&mut self, hash: u64) {
        self.0 = hash;
    }
    fn write(&mut self, bytes: &[u8]) {
        // Only `write_u64` is used by the key types above; mix anything else anyway.
        for &b in bytes {
            self.0 = (self.0.rotate_left(5) ^ u64::from(b)).wrapping_mul(0x517c_c1b7_2722_0a95);
        }
    }
}

/// Collects the keys of evicted entries that had dependencies, to unlink them from
/// the graph once the shard's lock is released; drops evicted entries from the key
/// index under the shard's lock.
#[derive(Clone, Default)]
struct Evictions(Option<Arc<KeyIndex>>);

impl Lifecycle<StoredKey, Box<AnySlot>> for Evictions {
    type RequestState = Vec<Box<[u8]>>;

    fn on_evict(&self, evicted: &mut Vec<Box<[u8]>>, key: StoredKey, val: Box<AnySlot>) {
        if let (Some(index), Some(text)) = (&self.0, &val.text) {
            index.remove(text);
        }
        if val.deps.is_some() {
            evicted.push(key.bytes);
        }
    }
}

/// The readable keys of the entries held, mapped to their in-process keys: an
/// invalidation message names entries by readable key, and the in-process key (which
/// holds a registration number local to the process) cannot be parsed back from it
/// (long keys are hashed). Kept only while the service has a bus. It is changed under
/// the write lock of the entry's shard (lock order: shard, then index), so it names
/// exactly the entries held.
#[derive(Default)]
pub(crate) struct KeyIndex {
    shards: [Mutex<IndexShard>; 16],
    hasher: DefaultHashBuilder,
}

/// Readable keys to in-process keys.
type IndexShard = std::collections::HashMap<Box<str>, Box<[u8]>>;

impl KeyIndex {
    fn shard(&self, text: &str) -> &Mutex<IndexShard> {
        &self.shards[(self.hasher.hash_one(text) >> 60) as usize]
    }

    fn insert(&self, text: &str, key: &[u8]) {
        self.shard(text).lock().insert(text.into(), key.into());
    }

    fn remove(&self, text: &str) {
        self.shard(text).lock().remove(text);
    }

    /// The in-process key of the entry whose readable key is `text`, if one is held.
    pub(crate) fn get(&self, text: &str) -> Option<Box<[u8]>> {
        self.shard(text).lock().get(text).cloned()
    }

    fn clear(&self) {
        for s in &self.shards {
            s.lock().clear();
        }
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.shards.iter().map(|s| s.lock().len()).sum()
    }
}

type Shard = Cache<StoredKey, Box<AnySlot>, EntryWeighter, PreHashed, Evictions>;

/// The in-process cache: bounded, typed, with `ttl` and `sliding` expiry.
///
/// ```
/// use cache_runtime::MemoryBackend;
///
/// // At most 100,000 entries.
/// let by_count = MemoryBackend::new().max_entries(100_000);
///
/// // At most 64 MiB of strings, weighed by their length.
/// let by_size = MemoryBackend::new().max_weight(64 << 20).weigher(|key, value| {
///     let value_len = value.downcast_ref::<String>().map_or(64, |s| s.len());
///     (key.len() + value_len) as u64
/// });
/// ```
#[derive(Clone)]
pub struct MemoryBackend {
    max_entries: usize,
    max_weight: Option<u64>,
    weigher: Option<Arc<WeighFn>>,
}

impl Default for MemoryBackend {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Debug for MemoryBackend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MemoryBackend")
            .field("max_entries", &self.max_entries)
            .field("max_weight", &self.max_weight)
            .field("weigher", &self.weigher.is_some())
            .finish()
    }
}

impl MemoryBackend {
    /// Default bound: 10,000 entries.
    pub const DEFAULT_MAX_ENTRIES: usize = 10_000;

    /// An in-process cache of at most [`Self::DEFAULT_MAX_ENTRIES`] entries.
    pub fn new() -> Self {
        MemoryBackend {
            max_entries: Self::DEFAULT_MAX_ENTRIES,
            max_weight: None,
            weigher: None,
        }
    }

    /// The bound on the number of entries. With a [`weigher`](Self::weigher), this is
    /// the expected number of entries (used to size the table) and the weight is the bound.
    pub fn max_entries(mut self, n: usize) -> Self {
        self.max_entries = n.max(1);
        self
    }

    /// The bound on the total weight, with a [`weigher`](Self::weigher). Without a
    /// weigher every entry weighs 1.
    pub fn max_weight(mut self, weight: u64) -> Self {
        self.max_weight = Some(weight.max(1));
        self
    }

    /// How much one entry weighs. Keep it cheap: it runs on every insert and eviction.
    pub fn weigher(
        mut self,
        f: impl Fn(&[u8], &(dyn Any + Send + Sync)) -> u64 + Send + Sync + 'static,
    ) -> Self {
        self.weigher = Some(Arc::new(f));
        self
    }

    /// A tier that holds nothing, for a service whose only tier is remote.
    pub(crate) fn build_disabled(graph: Arc<dyn DependencyGraph>) -> MemoryTier {
        MemoryTier {
            enabled: false,
            bypassed: AtomicU8::new(SERVED),
            ..MemoryBackend::new().max_entries(1).build(graph, false)
        }
    }

    /// The tier, telling `graph` about the entries it drops on its own (expiry,
    /// eviction). With `index`, it keeps a [`KeyIndex`] of the entries' readable keys.
    pub(crate) fn build(&self, graph: Arc<dyn DependencyGraph>, index: bool) -> MemoryTier {
        let items = self.max_entries as u64;
        let weight = self.max_weight.unwrap_or(items);
        // As `quick_cache::sync` does: four shards per core, halved while a shard
        // would hold fewer than 32 entries.
        let cores = std::thread::available_parallelism().map_or(4, |n| n.get());
        let mut shards = (cores * 4).next_power_of_two() as u64;
        while shards > 1 && items.div_ceil(shards) < 32 {
            shards /= 2;
        }
        let weigher = EntryWeighter(self.weigher.clone());
        let key_index = index.then(|| Arc::new(KeyIndex::default()));
        MemoryTier {
            shards: (0..shards)
                .map(|_| {
                    RwLock::new(Shard::with(
                        items.div_ceil(shards) as usize,
                        weight.div_ceil(shards),
                        weigher.clone(),
                        PreHashed,
                        Evictions(key_index.clone()),
                    ))
                })
                .collect(),
            mask: shards - 1,
            graph,
            index: key_index,
            enabled: true,
            bypassed: AtomicU8::new(SERVED),
        }
    }
}

/// A built [`MemoryBackend`]: the entries. The dependency graph between them is the
/// service's; the tier tells it when it stores an entry and when it drops one on its
/// own (expiry, eviction).
const SERVED: u8 = 0;
const WAITING: u8 = 1;
const MISSED: u8 = 2;

pub(crate) struct MemoryTier {
    shards: Box<[RwLock<Shard>]>,
    mask: u64,
    graph: Arc<dyn DependencyGraph>,
    /// The readable keys of the entries (kept while the service has a bus).
    index: Option<Arc<KeyIndex>>,
    /// False for a service without an in-process tier (a remote store alone).
    enabled: bool,
    /// While the invalidation bus is not receiving, the tier is bypassed: it was
    /// cleared, and nothing is stored until the bus receives again. [`SERVED`],
    /// [`WAITING`] (not receiving yet) or [`MISSED`] (messages may have been lost).
    bypassed: AtomicU8,
}

impl MemoryTier {
    #[inline]
    fn locate<'k>(&self, key: &'k [u8]) -> (LookupKey<'k>, &RwLock<Shard>) {
        self.locate_hashed(key, key_hash(key))
    }

    /// `hash` is [`key_hash`] of `key`.
    #[inline(always)]
    fn locate_hashed<'k>(&self, key: &'k [u8], hash: u64) -> (LookupKey<'k>, &RwLock<Shard>) {
        // The low bits pick the slot inside a shard's table: pick the shard by the high ones.
        let shard = &self.shards[((hash >> 40) & self.mask) as usize];
        (LookupKey { hash, bytes: key }, shard)
    }

    /// Whether this tier holds entries (false for a remote store alone).
    #[inline]
    pub(crate) fn enabled(&self) -> bool {
        self.enabled
    }

    /// Stores nothing from now on, until [`MemoryTier::serve`]; the caller clears
    /// the tier after this (an insert checks under its shard's lock, so none lands
    /// after the clear). With `missed`, messages may have been lost meanwhile.
    pub(crate) fn bypass(&self, missed: bool) {
        let state = if missed { MISSED } else { WAITING };
        self.bypassed.fetch_max(state, Ordering::SeqCst);
    }

    /// Stores entries again.
    pub(crate) fn serve(&self) {
        self.bypassed.store(SERVED, Ordering::SeqCst);
    }

    /// Whether it is bypassed after messages may have been missed.
    pub(crate) fn missed(&self) -> bool {
        self.bypassed.load(Ordering::SeqCst) == MISSED
    }

    /// Whether the tier is bypassed (see [`MemoryTier::bypass`]).
    pub(crate) fn is_bypassed(&self) -> bool {
        self.enabled && self.bypassed.load(Ordering::SeqCst) != SERVED
    }

    /// Reads the live slot stored under `key` with `read` (a downcast and a clone),
    /// under the shard's read lock. An expired slot is removed.
    #[inline(always)]
    pub(crate) fn get<X>(&self, key: &[u8], read: impl FnOnce(&AnySlot) -> Option<X>) -> Option<X> {
        self.get_hashed(key, key_hash(key), read)
    }

    /// [`get`](Self::get) of a key whose [`key_hash`] is known. A slot past its
    /// eager-refresh point is read as any live slot.
    #[inline(always)]
    pub(crate) fn get_hashed<X>(
        &self,
        key: &[u8],
        hash: u64,
        read: impl FnOnce(&AnySlot) -> Option<X>,
    ) -> Option<X> {
        self.get_or_refresh(key, hash, read, None)
    }

    /// The hit path of a function without eager refresh: [`get_hashed`](Self::get_hashed)
    /// with one copy of `read` (a second one, for a slot past its eager-refresh
    /// point, cost the hit harness 8 instructions a hit). Such a slot, which a
    /// function whose body cannot run in the background never has, is taken for
    /// expired.
    #[inline(always)]
    pub(crate) fn get_fast<X>(
        &self,
        key: &[u8],
        hash: u64,
        read: impl FnOnce(&AnySlot) -> Option<X>,
    ) -> Option<X> {
        if !self.enabled {
            return None;
        }
        let (lookup, shard) = self.locate_hashed(key, hash);
        let expired = {
            let guard = shard.read();
            let slot = guard.get(&lookup)?;
            if slot.touch() {
                return read(slot);
            }
            if slot.kept() {
                // kept as a fallback (fail-safe)
                return None;
            }
            slot_id(slot)
        };
        self.remove_slot(key, expired);
        None
    }

    /// [`get_hashed`](Self::get_hashed); with `due`, a slot past its eager-refresh
    /// point, seen first by this caller, is not read: `due` is set instead, and the
    /// caller reads it again as it starts the refresh (the slot is then live until
    /// its expiry). The hit path itself is unchanged: all of this is past the
    /// deadline check. (Written out rather than through a helper shared with
    /// [`MemoryTier::get_fallback`]: the hit harness counted 6 more instructions a
    /// hit that way.)
    #[inline(always)]
    pub(crate) fn get_or_refresh<X>(
        &self,
        key: &[u8],
        hash: u64,
        read: impl FnOnce(&AnySlot) -> Option<X>,
        due: Option<&std::cell::Cell<bool>>,
    ) -> Option<X> {
        if !self.enabled {
            return None;
        }
        let (lookup, shard) = self.locate_hashed(key, hash);
        let expired = {
            let guard = shard.read();
            let slot = guard.get(&lookup)?;
            if slot.touch() {
                return read(slot);
            }
            match slot.past_deadline(due.is_some()) {
                PastDeadline::Live => return read(slot),
                PastDeadline::Due => {
                    if let Some(due) = due {
                        due.set(true);
                    }
                    return None;
                }
                PastDeadline::Kept => return None,
                PastDeadline::Expired => slot_id(slot),
            }
        };
        self.remove_slot(key, expired);
        None
    }

    /// Reads the slot under `key`, live or kept as a fallback after it expired
    /// (fail-safe).
    pub(crate) fn get_fallback<X>(
        &self,
        key: &[u8],
        hash: u64,
        read: impl FnOnce(&AnySlot) -> Option<X>,
    ) -> Option<X> {
        if !self.enabled {
            return None;
        }
        let (lookup, shard) = self.locate_hashed(key, hash);
        let guard = shard.read();
        let slot = guard.get(&lookup)?;
        let deadline = slot.expires_at.load(Ordering::Relaxed);
        (deadline == NEVER || now_nanos() < deadline || slot.kept())
            .then(|| read(slot))
            .flatten()
    }

    /// Stores `slot` under `key`, with the dependencies `frame` collected, replacing
    /// the entry and the links it had, if `current()` holds when it would become
    /// readable (checked under the shard's write lock); returns whether it is stored.
    /// `text` gives the entry's readable key, asked for only when the tier keeps an
    /// index of them.
    ///
    /// The links are made before the slot can be read, so an invalidation that begins
    /// once it is readable finds it through them. Refused (bypassed, or `current()`
    /// false), the key's slot is removed, since its links were replaced.
    pub(crate) fn insert(
        &self,
        key: &[u8],
        mut slot: Box<AnySlot>,
        frame: Option<&Frame>,
        text: impl FnOnce() -> String,
        current: impl Fn() -> bool,
    ) -> bool {
        if !self.enabled || !current() {
            return false;
        }
        let nodes = frame.filter(|f| !f.nodes.is_empty());
        if let Some(f) = nodes {
            slot.deps = Some(f.nodes.as_slice().into());
        }
        if self.index.is_some() {
            slot.text = Some(text().into());
        }
        let text = slot.text.clone();
        match frame {
            Some(f) => self.graph.link(key, f),
            None => self.graph.unlink(key),
        }
        let (lookup, shard) = self.locate(key);
        let mut evicted = Vec::new();
        let stored = {
            let mut shard = shard.write();
            if self.bypassed.load(Ordering::SeqCst) != SERVED || !current() {
                None
            } else {
                shard.insert_with_lifecycle(
                    StoredKey {
                        hash: lookup.hash,
                        bytes: key.into(),
                    },
                    slot,
                    &mut evicted,
                );
                // unless the insert evicted the new entry itself
                let stored = shard.get(&lookup).is_some();
                if let (Some(index), Some(text), true) = (&self.index, &text, stored) {
                    index.insert(text, key);
                }
                Some(stored)
            }
        };
        let Some(stored) = stored else {
            self.remove_all(vec![key.into()]);
            self.graph.unlink(key);
            return false;
        };
        for k in &evicted {
            // the slot replaced under the same key keeps the new links
            if !(stored && **k == *key) {
                self.graph.unlink(k);
            }
        }
        stored
    }

    /// Removes the entries under `keys`; returns those it held.
    pub(crate) fn remove_all(&self, keys: Vec<Arc<[u8]>>) -> Vec<Arc<[u8]>> {
        keys.into_iter()
            .filter(|key| {
                let (lookup, shard) = self.locate(key);
                let mut shard = shard.write();
                let removed = shard.remove(&lookup);
                self.unindex(removed.as_ref().map(|(_, s)| &**s));
                removed.is_some()
            })
            .collect()
    }

    fn unindex(&self, removed: Option<&AnySlot>) {
        if let (Some(index), Some(text)) = (&self.index, removed.and_then(|s| s.text.as_ref())) {
            index.remove(text);
        }
    }

    /// The in-process key of the entry held under the readable key `text`.
    pub(crate) fn key_of(&self, text: &str) -> Option<Box<[u8]>> {
        self.index.as_ref().and_then(|index| index.get(text))
    }

    /// Removes the slot identified by `slot` ([`slot_id`]), if it is still the one
    /// stored under `key` (another caller may have replaced it meanwhile).
    pub(crate) fn remove_slot(&self, key: &[u8], slot: usize) {
        let (lookup, shard) = self.locate(key);
        let removed = {
            let mut shard = shard.write();
            let removed = shard.remove_if(&lookup, |current| slot_id(current) == slot);
            self.unindex(removed.as_ref().map(|(_, s)| &**s));
            removed
        };
        if removed.is_some_and(|(_, s)| s.deps.is_some()) {
            self.graph.unlink(key);
        }
    }

    #[cfg(test)]
    pub(crate) fn remove(&self, key: &[u8]) -> bool {
        self.graph.unlink(key);
        !self.remove_all(vec![key.into()]).is_empty()
    }

    /// Removes every entry (the graph is the caller's to clear).
    pub(crate) fn clear(&self) {
        // every shard at once, so the index never lacks an entry a shard holds
        let mut shards: Vec<_> = self.shards.iter().map(|s| s.write()).collect();
        for shard in &mut shards {
            shard.clear();
        }
        if let Some(index) = &self.index {
            index.clear();
        }
    }

    pub(crate) fn len(&self) -> usize {
        self.shards.iter().map(|s| s.read().len()).sum()
    }

    pub(crate) fn keys(&self) -> Vec<Box<[u8]>> {
        self.shards
            .iter()
            .flat_map(|s| {
                s.read()
                    .iter()
                    .map(|(k, _)| k.bytes.clone())
                    .collect::<Vec<_>>()
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tier(backend: MemoryBackend) -> MemoryTier {
        backend.build(Arc::new(crate::deps::MemoryGraph::default()), false)
    }

    fn slot<T: Send + Sync + 'static>(v: T, e: Expiration) -> Box<AnySlot> {
        Box::new(Slot::new(v, e))
    }

    impl MemoryTier {
        fn get_as<T: Clone + 'static>(&self, key: &[u8]) -> Option<T> {
            self.get(key, |s| s.value.downcast_ref::<T>().cloned())
        }
    }

    #[test]
    fn stores_typed_values() {
        let tier = tier(MemoryBackend::new());
        tier.insert(
            b"a",
            slot(String::from("x"), Expiration::Never),
            None,
            String::new,
            || true,
        );
        assert_eq!(tier.get_as::<String>(b"a"), Some("x".to_owned()));
        assert_eq!(tier.get_as::<u32>(b"a"), None, "another type is a miss");
        assert_eq!(tier.get_as::<String>(b"b"), None);
        assert!(tier.remove(b"a"));
        assert_eq!(tier.get_as::<String>(b"a"), None);
    }

    #[test]
    fn is_bounded_by_entries() {
        let tier = tier(MemoryBackend::new().max_entries(100));
        for i in 0..1000u32 {
            tier.insert(
                &i.to_le_bytes(),
                slot(i, Expiration::Never),
                None,
                String::new,
                || true,
            );
        }
        assert!(tier.len() <= 100, "{} entries", tier.len());
    }

    #[test]
    fn is_bounded_across_shards() {
        let tier = tier(MemoryBackend::new().max_entries(4096));
        assert!(tier.shards.len() > 1, "{} shards", tier.shards.len());
        for i in 0..50_000u32 {
            tier.insert(
                &i.to_le_bytes(),
                slot(i, Expiration::Never),
                None,
                String::new,
                || true,
            );
        }
        assert!(
            tier.len() <= 4096 + tier.shards.len(),
            "{} entries",
            tier.len()
        );
        assert!(
            tier.len() > 2048,
            "the bound is used: {} entries",
            tier.len()
        );
        // every live entry reads back its own value
        for k in tier.keys() {
            let i = u32::from_le_bytes(k[..4].try_into().unwrap());
            assert_eq!(tier.get_as::<u32>(&k), Some(i));
        }
    }

    #[test]
    fn evicted_entries_leave_the_graph_and_the_index() {
        let graph = Arc::new(crate::deps::MemoryGraph::default());
        let tier = MemoryBackend::new()
            .max_entries(64)
            .build(graph.clone(), true);
        let mut frame = Frame::default();
        frame.add_entry(b"inner", None, 0, 0);
        let key = |i: u32| crate::registry::test_key(&i.to_string());
        for i in 0..10_000u32 {
            let k = key(i);
            tier.insert(
                k.as_bytes(),
                slot(i, Expiration::Never),
                Some(&frame),
                || k.to_text(1024),
                || true,
            );
        }
        let (forward, reverse, _) = graph.sizes();
        assert!(
            forward <= 64 + tier.shards.len(),
            "{forward} entries still linked"
        );
        assert_eq!(reverse, 1);
        let index = tier.index.as_ref().unwrap();
        assert_eq!(
            index.len(),
            tier.len(),
            "the index names exactly the entries held"
        );
        for k in tier.keys() {
            let text = crate::key::Key::from_bytes(&k).unwrap().to_text(1024);
            assert_eq!(tier.key_of(&text).as_deref(), Some(&*k));
        }
        // invalidating the inner entry reaches every live dependent
        let live = tier.len();
        let (dependents, _) = graph.dependents(
            vec![crate::deps::Node::Entry(b"inner".as_slice().into())],
            true,
        );
        assert_eq!(tier.remove_all(dependents).len(), live);
        assert_eq!(graph.sizes(), (0, 0, 0));
        assert_eq!(index.len(), 0);
    }

    #[test]
    fn is_bounded_by_weight() {
        let tier = tier(
            MemoryBackend::new()
                .max_entries(10)
                .max_weight(1000)
                .weigher(|_, v| v.downcast_ref::<String>().map_or(1, |s| s.len() as u64)),
        );
        for i in 0..100u32 {
            tier.insert(
                &i.to_le_bytes(),
                slot("x".repeat(100), Expiration::Never),
                None,
                String::new,
                || true,
            );
        }
        let total: usize = tier
            .keys()
            .iter()
            .filter_map(|k| tier.get_as::<String>(k))
            .map(|s| s.len())
            .sum();
        assert!(total <= 1000, "{total} bytes held");
        assert!(total >= 500, "the bound is used: {total} bytes held");
    }

    #[tokio::test(start_paused = true)]
    async fn absolute_expiry() {
        let tier = tier(MemoryBackend::new());
        tier.insert(
            b"k",
            slot(1u8, Expiration::Absolute(Duration::from_secs(10))),
            None,
            String::new,
            || true,
        );
        tokio::time::advance(Duration::from_secs(9)).await;
        assert_eq!(tier.get_as::<u8>(b"k"), Some(1));
        tokio::time::advance(Duration::from_secs(2)).await;
        assert_eq!(tier.get_as::<u8>(b"k"), None);
        assert_eq!(tier.len(), 0, "the reader removed the expired entry");
    }

    #[tokio::test(start_paused = true)]
    async fn expired_slot_kept_as_fallback() {
        let tier = tier(MemoryBackend::new());
        let mut s = slot(1u8, Expiration::Absolute(Duration::from_secs(10)));
        s.keep_for(Duration::from_secs(60));
        tier.insert(b"k", s, None, String::new, || true);
        let fallback = |tier: &MemoryTier| {
            tier.get_fallback(b"k", key_hash(b"k"), |s| {
                s.value.downcast_ref::<u8>().copied()
            })
        };
        tokio::time::advance(Duration::from_secs(11)).await;
        assert_eq!(tier.get_as::<u8>(b"k"), None, "expired: never a hit");
        assert_eq!(fallback(&tier), Some(1), "kept as a fallback");
        assert_eq!(tier.len(), 1);
        tokio::time::advance(Duration::from_secs(60)).await;
        assert_eq!(fallback(&tier), None, "past fail_safe");
        assert_eq!(tier.get_as::<u8>(b"k"), None);
        assert_eq!(tier.len(), 0, "the reader removed it");
    }

    #[tokio::test(start_paused = true)]
    async fn sliding_expiry() {
        let tier = tier(MemoryBackend::new());
        tier.insert(
            b"k",
            slot(1u8, Expiration::Sliding(Duration::from_secs(10))),
            None,
            String::new,
            || true,
        );
        for _ in 0..5 {
            tokio::time::advance(Duration::from_secs(8)).await;
            assert_eq!(
                tier.get_as::<u8>(b"k"),
                Some(1),
                "each read extends the deadline"
            );
        }
        tokio::time::advance(Duration::from_secs(11)).await;
        assert_eq!(tier.get_as::<u8>(b"k"), None);
    }
}
