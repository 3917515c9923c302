//! The path of one call: the entry points the generated code calls.
//!
//! `#[cached]` turns a function into: build the [`Key`] from a static [`Descriptor`]
//! and the arguments, then hand the key and the original body to one of
//! [`call_async`], [`call_async_shared`] or [`call_sync`]. Those look the key up in the
//! in-process tier (a hit clones the stored value and returns), and on a miss run the
//! body under single flight and store what it returned.
//!
//! What a return type stores is decided by its [`ReturnKind`]: the whole value for
//! plain returns, the `Ok` value for `Result`, and for `Option` either the whole
//! value or only `Some` (`cache_none = false`).

use std::any::Any;
use std::cell::Cell;
use std::future::Future;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::deps::{collect_async, collect_sync, collecting, with_frame, Frame, Node};
use crate::flight::{Flight, Handoff, Join, Leader, Waited};
use crate::key::{with_function_key, write_function_key, Key, KeyRef, KeyWriter};
use crate::keybuf::key_hash;
use crate::memory::{slot_id, AnySlot, Expiration, Slot};
use crate::registry::{Descriptor, FnState, Mode, Registration};
use crate::remote::RemoteKey;
use crate::service::{global, in_scope, with_current, with_scoped, CachingService, Inner, Pending};
use crate::stats::Counter;

/// A value a cached function can store in the in-process tier.
#[diagnostic::on_unimplemented(
    message = "`{Self}` cannot be cached: cached values must be `Clone + Send + Sync + 'static`",
    label = "the value returned here is stored in the cache",
    note = "a hit returns a clone of the stored value: derive `Clone`, or return an `Arc<...>` of it"
)]
pub trait CachedValue: Clone + Send + Sync + 'static {}
impl<T: Clone + Send + Sync + 'static> CachedValue for T {}

/// A value a cached function can store outside the process (Redis).
#[diagnostic::on_unimplemented(
    message = "`{Self}` cannot be cached outside the process: it does not implement `serde::Serialize` and `serde::de::DeserializeOwned`",
    label = "the value returned here is serialized for the remote tier",
    note = "derive `serde::Serialize` and `serde::Deserialize` for it, or add `local` to the attribute (`#[cached(local)]`) to keep it in the in-process tier only"
)]
pub trait SharedValue: CachedValue + serde::Serialize + serde::de::DeserializeOwned {}
impl<T: CachedValue + serde::Serialize + serde::de::DeserializeOwned> SharedValue for T {}

/// The operations the call path needs on a stored type, built where the type's bounds
/// are checked (at the function's return type). The entry points take this table
/// instead of bounds, so a type that cannot be cached is reported once, where it is
/// written.
pub struct ValueOps<T> {
    clone: fn(&T) -> T,
    into_slot: fn(T, Expiration) -> Box<AnySlot>,
    into_shared: fn(T) -> Box<dyn Any + Send + Sync>,
    from_any: fn(&(dyn Any + Send + Sync)) -> Option<T>,
    /// For values a remote tier may hold.
    encode: Option<Encode<T>>,
    decode: Option<Decode<T>>,
}

type Encode<T> = fn(&T, u64, &[String]) -> Result<Vec<u8>, String>;
type Decode<T> = fn(&[u8]) -> Result<crate::remote::Decoded<T>, String>;

/// Operations on a value kept in the in-process tier only (`local`, plain `fn`): a
/// table in static memory, so a call passes one pointer.
#[inline]
pub fn value_ops<T: CachedValue>() -> &'static ValueOps<T> {
    const { &ops::<T>(None, None) }
}

/// Operations on a value that a remote tier may also hold (serializable).
#[inline]
pub fn shared_ops<T: SharedValue>() -> &'static ValueOps<T> {
    const {
        &ops::<T>(
            Some(crate::remote::encode::<T>),
            Some(crate::remote::decode::<T>),
        )
    }
}

const fn ops<T: CachedValue>(encode: Option<Encode<T>>, decode: Option<Decode<T>>) -> ValueOps<T> {
    ValueOps {
        clone: T::clone,
        into_slot: |v, e| Box::new(Slot::new(v, e)),
        into_shared: |v| Box::new(v),
        from_any: |v| v.downcast_ref::<T>().cloned(),
        encode,
        decode,
    }
}

/// How a return type maps to what is stored.
pub trait ReturnKind<R> {
    /// What is stored.
    type Stored: 'static;
    /// The value to store for this return, if any.
    fn stored(r: &R, cache_none: bool) -> Option<&Self::Stored>;
    /// The return rebuilt from a stored value.
    fn from_stored(s: Self::Stored) -> R;
}

/// Any return type: stored whole.
pub struct Plain;
/// `Result<T, E>`: `Ok(T)` stores `T`, `Err` is not stored.
pub struct ResultOk;
/// `Option<T>`: stored whole, unless `cache_none = false` and it is `None`.
pub struct Optional;

impl<T: 'static> ReturnKind<T> for Plain {
    type Stored = T;
    #[inline]
    fn stored(r: &T, _: bool) -> Option<&T> {
        Some(r)
    }
    #[inline]
    fn from_stored(s: T) -> T {
        s
    }
}

impl<T: 'static, E> ReturnKind<Result<T, E>> for ResultOk {
    type Stored = T;
    #[inline]
    fn stored(r: &Result<T, E>, _: bool) -> Option<&T> {
        r.as_ref().ok()
    }
    #[inline]
    fn from_stored(s: T) -> Result<T, E> {
        Ok(s)
    }
}

impl<T: 'static> ReturnKind<Option<T>> for Optional {
    type Stored = Option<T>;
    #[inline]
    fn stored(r: &Option<T>, cache_none: bool) -> Option<&Option<T>> {
        (r.is_some() || cache_none).then_some(r)
    }
    #[inline]
    fn from_stored(s: Option<T>) -> Option<T> {
        s
    }
}

/// Writes one argument into the key. A separate function so that a type without
/// `CacheKey` is reported at the argument.
#[inline]
pub fn write_arg<T: crate::CacheKey + ?Sized>(w: &mut crate::KeyWriter, value: &T) {
    value.write_key(w);
}

/// A remote invalidation count not read (yet).
const UNKNOWN: u64 = u64::MAX;

/// Outcome of [`lookup`], the synchronous first look at a call.
#[doc(hidden)]
pub enum Lookup<R> {
    /// Served from the cache.
    Hit(R),
    /// Run the body: through the miss path ([`run_async`], [`run_sync`]) if caching
    /// is on, else directly.
    Run(Option<MissPath>),
}

/// What the miss path needs from the lookup: the service it looked in and an owned key.
#[doc(hidden)]
pub struct MissPath {
    service: CachingService,
    reg: &'static Registration,
    key: Key,
    /// Run the body and store its result whatever the cache holds (`refresh!`).
    refresh: bool,
}

thread_local! {
    /// Set by `refresh!` right before it calls the function: the call's lookup takes
    /// it (so nested calls do not see it) and goes straight to the miss path.
    static REFRESH: Cell<bool> = const { Cell::new(false) };
}

/// How many threads have a refresh pending: while none has, a lookup does not look.
static REFRESHES: AtomicUsize = AtomicUsize::new(0);

/// Makes the next cached call on this thread refresh its entry instead of reading it.
#[doc(hidden)]
pub fn refresh_next_call() {
    if !REFRESH.with(|r| r.replace(true)) {
        REFRESHES.fetch_add(1, Ordering::SeqCst);
    }
}

/// Takes this thread's pending refresh, if any.
#[inline]
fn take_refresh() -> bool {
    if REFRESHES.load(Ordering::Relaxed) == 0 {
        return false;
    }
    let refresh = REFRESH.with(|r| r.replace(false));
    if refresh {
        REFRESHES.fetch_sub(1, Ordering::SeqCst);
    }
    refresh
}

/// The hit path, run by the generated code before any future of the miss path is
/// built: write the key on the stack, resolve the function's state in the current
/// service, look in the in-process tier, count. Straight-line code inlined into each
/// wrapper; everything but a hit is out of line. Only a miss copies the key.
#[doc(hidden)]
#[inline(always)]
pub fn lookup<K: ReturnKind<R>, R>(
    desc: &'static Descriptor,
    self_type: Option<&'static str>,
    ops: &'static ValueOps<K::Stored>,
    write_args: impl FnOnce(&mut KeyWriter),
) -> Lookup<R> {
    let refresh = take_refresh();
    let reg = desc.registration(self_type);
    if reg.unusable.is_some() {
        return misconfigured(desc, reg);
    }
    let mut w = KeyWriter::new();
    write_function_key(&mut w, reg, self_type, write_args);
    let (key, hash) = (KeyRef(w.as_bytes()), w.key_hash());
    if in_scope() {
        return lookup_scoped::<K, R>(desc, reg, key, hash, ops, refresh);
    }
    let svc = global();
    let state = desc.global_state(&*svc.inner, reg);
    probe::<K, R>(svc, state, reg, key, hash, ops, refresh)
}

/// [`lookup`] in the enclosing scope's service: out of line, so that the wrapper holds
/// one copy of the hit path. (The parameters go one by one, as to [`probe`]: bundled in
/// a struct, the optimizer stopped inlining the value's downcast into the wrapper, 808
/// instructions a hit became 834.)
#[cold]
#[inline(never)]
fn lookup_scoped<K: ReturnKind<R>, R>(
    desc: &'static Descriptor,
    reg: &'static Registration,
    key: KeyRef<'_>,
    hash: u64,
    ops: &'static ValueOps<K::Stored>,
    refresh: bool,
) -> Lookup<R> {
    with_scoped(|svc| {
        let state = svc.inner.function(desc, reg);
        probe::<K, R>(svc, state, reg, key, hash, ops, refresh)
    })
}

/// The hit path's look in the service's in-process tier, once the service and the
/// function's state are known.
#[inline(always)]
fn probe<K: ReturnKind<R>, R>(
    svc: &CachingService,
    state: &FnState,
    reg: &'static Registration,
    key: KeyRef<'_>,
    hash: u64,
    ops: &'static ValueOps<K::Stored>,
    refresh: bool,
) -> Lookup<R> {
    if !state.mode.is_cached() {
        return not_cached(state);
    }
    if !refresh {
        if let Some(v) = read(&svc.inner, key.as_bytes(), hash, ops) {
            state.counters.bump(Counter::L1Hit);
            tracing::debug!(target: "cache_runtime", function = %state.name, key = %key, "cache hit");
            return Lookup::Hit(K::from_stored(v));
        }
    }
    miss_path(svc, state, reg, key, refresh)
}

/// A function whose profile is disabled or missing: counted, run uncached.
#[cold]
#[inline(never)]
fn not_cached<R>(state: &FnState) -> Lookup<R> {
    let c = &state.counters;
    if matches!(state.mode, Mode::Misconfigured) {
        c.bump(Counter::ConfigError);
    }
    c.bump(Counter::Execution);
    Lookup::Run(None)
}

/// Not in the in-process tier (or a refresh): the miss path takes over, with an owned
/// key. Counted there, since it knows whether another tier has the entry.
#[inline(never)]
fn miss_path<R>(
    svc: &CachingService,
    state: &FnState,
    reg: &'static Registration,
    key: KeyRef<'_>,
    refresh: bool,
) -> Lookup<R> {
    tracing::debug!(target: "cache_runtime", function = %state.name, key = %key, refresh, "cache miss");
    Lookup::Run(Some(MissPath {
        service: svc.clone(),
        reg,
        key: key.to_owned(),
        refresh,
    }))
}

/// Reads an entry; inside another cached function's body, also links that function's
/// entry to this one and to what this one depends on.
#[inline(always)]
fn read<T>(inner: &Inner, key: &[u8], hash: u64, ops: &'static ValueOps<T>) -> Option<T> {
    if !collecting() {
        return inner
            .memory
            .get_hashed(key, hash, |slot| (ops.from_any)(&slot.value));
    }
    let read_at = inner.epoch.load(Ordering::SeqCst);
    inner.memory.get_hashed(key, hash, |slot| {
        let value = (ops.from_any)(&slot.value)?;
        with_frame(|f| f.add_entry(key, slot.deps.as_deref(), read_at, slot.as_of));
        Some(value)
    })
}

/// A function that cannot have keys (see [`Registration::unusable`]): counted, run
/// uncached.
#[cold]
fn misconfigured<R>(desc: &'static Descriptor, reg: &'static Registration) -> Lookup<R> {
    with_current(|svc| {
        let c = &svc.inner.unusable(desc, reg).counters;
        c.bump(Counter::ConfigError);
        c.bump(Counter::Execution);
    });
    Lookup::Run(None)
}

/// One call on the miss path, shared by the async and the blocking forms: everything
/// but running the body and waiting for another caller.
struct Miss<'a, K: ReturnKind<R>, R> {
    service: &'a CachingService,
    inner: &'a Inner,
    desc: &'static Descriptor,
    state: &'a FnState,
    key: &'a Key,
    ops: &'static ValueOps<K::Stored>,
    expiration: Expiration,
    lock_timeout: Duration,
    /// The invalidation count when the body started (see [`Inner::epoch`]).
    epoch: u64,
    /// The remote store's invalidation count, read with the entry (see
    /// [`crate::Fetched::epoch`]); [`UNKNOWN`] until a read succeeds.
    remote_epoch: AtomicU64,
    _r: std::marker::PhantomData<fn() -> R>,
}

/// What to do after a step of the miss path.
enum Next<'a, R> {
    /// Return this.
    Return(R),
    /// Run the body as the leader of the key's flight.
    Lead(Leader<'a>),
    /// Wait for the flight's leader.
    Wait(Arc<Flight>),
    /// Run the body without leading (the wait timed out, or a refresh).
    RunAlone,
}

impl<'a, K: ReturnKind<R>, R> Miss<'a, K, R> {
    fn new(
        path: &'a MissPath,
        desc: &'static Descriptor,
        ops: &'static ValueOps<K::Stored>,
    ) -> Self {
        let inner = &*path.service.inner;
        let state = inner.function(desc, path.reg);
        let (expiration, lock_timeout) = match state.mode {
            Mode::Cached {
                expiration,
                lock_timeout,
            } => (expiration, lock_timeout),
            _ => (Expiration::Never, Duration::ZERO),
        };
        Miss {
            service: &path.service,
            inner,
            desc,
            state,
            key: &path.key,
            ops,
            expiration,
            lock_timeout,
            epoch: 0,
            remote_epoch: AtomicU64::new(UNKNOWN),
            _r: std::marker::PhantomData,
        }
    }

    /// The first step: a refresh runs the body alone, anything else joins the flight.
    fn start(&mut self, refresh: bool) -> Next<'a, R> {
        if refresh {
            self.epoch = self.inner.epoch.load(Ordering::SeqCst);
            return Next::RunAlone;
        }
        self.join()
    }

    /// Leads the key's flight, or joins it.
    fn join(&mut self) -> Next<'a, R> {
        match self.inner.flights.join(self.key.shared()) {
            Join::Lead(leader) => {
                self.epoch = self.inner.epoch.load(Ordering::SeqCst);
                // A flight that ended between the first look and `join` stored its value.
                let key = self.key.as_bytes();
                match read(self.inner, key, key_hash(key), self.ops) {
                    Some(v) => {
                        self.state.counters.bump(Counter::L1Hit);
                        Next::Return(K::from_stored(v))
                    }
                    None => Next::Lead(leader),
                }
            }
            Join::Wait(flight) => Next::Wait(flight),
        }
    }

    /// What a waiter does with the leader's outcome.
    fn waited(&mut self, waited: Waited) -> Next<'a, R> {
        match waited {
            Waited::Done(handoff) => match (self.ops.from_any)(&*handoff.value) {
                Some(v) => {
                    self.state.counters.bump(Counter::Miss);
                    let read_at = self.inner.epoch.load(Ordering::SeqCst);
                    with_frame(|f| {
                        f.add_entry(
                            self.key.as_bytes(),
                            handoff.deps.as_deref(),
                            read_at,
                            handoff.as_of,
                        )
                    });
                    Next::Return(K::from_stored(v))
                }
                None => self.join(),
            },
            Waited::Abandoned => self.join(),
            Waited::TimedOut => {
                tracing::debug!(target: "cache_runtime", function = %self.state.name, key = %self.key, "lock timeout: running the body without waiting");
                self.epoch = self.inner.epoch.load(Ordering::SeqCst);
                Next::RunAlone
            }
        }
    }

    /// Stores the body's result (if its kind stores one) with what the body depended
    /// on, links the calling function's entry to it, and hands it to the waiters. A
    /// result that an invalidation made out of date while it was computed is returned
    /// but not kept (see [`Inner::is_stale`]).
    ///
    /// A refresh returns what is left to do in the shared tiers: the refreshing
    /// caller waits for it, so that it never reads the old value back.
    fn finish(
        &self,
        result: &R,
        frame: Frame,
        leader: Option<Leader<'_>>,
        refresh: bool,
    ) -> Option<Pending> {
        let key = self.key.as_bytes();
        let deps: Option<Arc<[Node]>> =
            (!frame.nodes.is_empty()).then(|| frame.nodes.as_slice().into());
        let as_of = self.as_of(&frame);
        // The calling function read this value as of when it started computing.
        with_frame(|f| f.add_entry(key, deps.as_deref(), self.epoch, as_of));
        // Without a value to store, dropping the leader abandons the flight: a waiter
        // runs the body. So does a value that is out of date: the waiters that joined
        // before the invalidation retry, as callers after it would.
        let value = K::stored(result, self.desc.cache_none)?;
        let current = self.keep(value, &frame, as_of);
        // Entries computed from the old value are out of date.
        let pending = refresh.then(|| self.inner.invalidate_dependents(key));
        if let (Some(leader), true) = (leader, current) {
            leader.complete(|| {
                Arc::new(Handoff {
                    value: (self.ops.into_shared)((self.ops.clone)(value)),
                    deps,
                    as_of,
                })
            });
        }
        pending
    }
}

impl<K: ReturnKind<R>, R> Miss<'_, K, R> {
    /// Stores a computed value: in the in-process tier (if the service has one) with
    /// what it depends on, and in the remote tier, unless an invalidation made it out
    /// of date while it was computed; returns whether it is current. An invalidation
    /// that started before the entry was in place may have missed it, so the check
    /// comes after the insert; the remote write is queued under the same check, so an
    /// invalidation either sees it, or queues its removal after it.
    fn keep(&self, value: &K::Stored, frame: &Frame, as_of: u64) -> bool {
        self.keep_local(value, frame, self.expiration, as_of, true)
    }

    /// The remote invalidation count as of which a value computed from what `frame`
    /// read is current: the count read with the entry, or older if an entry the body
    /// read was older (an in-process copy another instance's invalidation has not
    /// reached yet must not make a value that passes for newer).
    fn as_of(&self, frame: &Frame) -> u64 {
        // unknown (no read, or a failed one): as old as can be
        let fetched = match self.remote_epoch.load(Ordering::Relaxed) {
            UNKNOWN => 0,
            e => e,
        };
        frame.as_of.map_or(fetched, |a| a.min(fetched))
    }

    /// What the value depends on, as the remote graph names it.
    fn links(&self, frame: &Frame) -> (Vec<String>, Vec<(String, Vec<String>)>) {
        let max = self.inner.max_key_length;
        let links = frame
            .nodes
            .iter()
            .filter_map(|n| n.remote_id(max))
            .collect();
        let cascades = frame
            .cascades
            .iter()
            .map(|(d, c)| {
                let keys = c.iter().filter_map(|n| n.dependency_key()).collect();
                (d.to_string(), keys)
            })
            .collect();
        (links, cascades)
    }

    /// Stores the value in the in-process tier with `expiration`, then, with `write`,
    /// queues its remote write if it is current (see [`Miss::keep`]); returns whether
    /// it is.
    fn keep_local(
        &self,
        value: &K::Stored,
        frame: &Frame,
        expiration: Expiration,
        as_of: u64,
        write: bool,
    ) -> bool {
        let key = self.key.as_bytes();
        let slot = self.inner.memory.enabled().then(|| {
            let mut slot = (self.ops.into_slot)((self.ops.clone)(value), expiration);
            slot.as_of = as_of;
            let id = slot_id(&slot);
            self.inner.memory.insert(key, slot, Some(frame));
            id
        });
        let write = write && self.inner.remote.is_some();
        let current = if self.inner.epoch.load(Ordering::SeqCst) == self.epoch && !write {
            // Nothing to queue: an invalidation that starts now finds the entry.
            true
        } else {
            self.inner.if_current(key, self.epoch, frame, || {
                if write {
                    self.write_remote(value, frame, as_of);
                }
            })
        };
        if let (false, Some(id)) = (current, slot) {
            self.inner.memory.remove_slot(key, id);
        }
        current
    }

    /// Counts a call that runs the body.
    fn running(&self) {
        self.state.counters.bump(Counter::Miss);
        self.state.counters.bump(Counter::Execution);
    }

    /// Reads the remote graph's invalidation count (with the entry, which is ignored).
    async fn read_epoch(&self) {
        let Some(remote) = self.inner.remote.as_ref().filter(|r| r.graph().is_some()) else {
            return;
        };
        let key = RemoteKey::new(self.key, self.inner.max_key_length);
        if let Ok(f) = remote.get(key, None).await {
            self.remote_epoch.store(f.epoch, Ordering::Relaxed);
        }
    }

    /// Reads the entry from the remote tier, if there is one and it holds the entry.
    /// A failure or bytes that do not decode are a miss (counted).
    /// Returns the value with the remote entry's deadline (see [`crate::remote::encode`]).
    async fn read_remote(&self) -> Option<crate::remote::Decoded<K::Stored>> {
        let (Some(remote), Some(decode)) = (&self.inner.remote, self.ops.decode) else {
            return None;
        };
        let touch = match self.expiration {
            Expiration::Sliding(d) => Some(d),
            _ => None,
        };
        let c = &self.state.counters;
        let key = RemoteKey::new(self.key, self.inner.max_key_length);
        let mark = self.inner.held.mark();
        let fetched = remote.get(key, touch).await.map(|f| {
            self.remote_epoch.store(f.epoch, Ordering::Relaxed);
            f.value
        });
        match fetched {
            Ok(Some(bytes)) => match decode(&bytes) {
                Ok(value)
                    if self.inner.held.covers(
                        mark,
                        || self.key.to_text(self.inner.max_key_length),
                        &value.2,
                    ) =>
                {
                    // an invalidation of this instance that covers it has not reached
                    // the remote tier: it may be the old value
                    let r = &self.inner.remote_stats;
                    r.bump(&r.reads_held);
                    tracing::debug!(target: "cache_runtime", function = %self.state.name, key = %self.key, "remote value held back: its invalidation has not reached the remote tier");
                    None
                }
                Ok(value) => {
                    // (the value and its deadline)
                    c.bump(Counter::L2Hit);
                    tracing::debug!(target: "cache_runtime", function = %self.state.name, key = %self.key, "remote hit");
                    Some(value)
                }
                Err(e) => {
                    c.bump(Counter::DecodeError);
                    tracing::debug!(target: "cache_runtime", function = %self.state.name, key = %self.key, error = %e, "remote value does not decode: a miss, to be overwritten");
                    None
                }
            },
            Ok(None) => None,
            Err(e) => {
                c.bump(Counter::BackendError);
                self.inner
                    .warn
                    .warn(format_args!("reading `{}` failed: {e}", self.state.name));
                None
            }
        }
    }

    /// Queues the value's write to the remote tier (never waited for). The value
    /// carries its deadline, so that an instance filling its in-process tier from the
    /// remote one expires it when the remote entry expires.
    ///
    /// A value with dependencies goes through the store's graph, with its links; a
    /// store without one does not get it (it could not remove it when a dependency
    /// is invalidated on another instance).
    fn write_remote(&self, value: &K::Stored, frame: &Frame, as_of: u64) {
        let (Some(remote), Some(encode)) = (&self.inner.remote, self.ops.encode) else {
            return;
        };
        let c = &self.state.counters;
        let graph = remote.graph();
        if graph.is_none() && !frame.nodes.is_empty() {
            c.bump(Counter::LocalOnly);
            return;
        }
        if graph.is_some() && self.remote_epoch.load(Ordering::Relaxed) == UNKNOWN {
            // Without the count read before the body ran (the read failed, or there was
            // none: a refresh), invalidations while the store was unreachable left no
            // marker to check against: the value is not written.
            tracing::debug!(target: "cache_runtime", function = %self.state.name, key = %self.key, "no invalidation count read: not written to the remote graph");
            return;
        }
        let (ttl, deadline) = match self.expiration {
            // a sliding entry's deadline moves with each read
            Expiration::Sliding(d) => (d, 0),
            Expiration::Absolute(d) => (d, crate::remote::deadline_after(d)),
            Expiration::Never => {
                let d = remote.default_ttl();
                (d, crate::remote::deadline_after(d))
            }
        };
        let (links, cascades) = self.links(frame);
        match encode(value, deadline, &links) {
            Ok(bytes) if bytes.len() > remote.max_value_size() => {
                c.bump(Counter::Oversized);
                tracing::debug!(target: "cache_runtime", function = %self.state.name, key = %self.key, size = bytes.len(), "value over the remote size limit: not stored remotely");
            }
            Ok(bytes) => {
                let key = self.key.to_text(self.inner.max_key_length);
                match graph {
                    Some(graph) => {
                        graph.set_linked(crate::LinkedWrite {
                            key,
                            value: bytes,
                            ttl,
                            links,
                            cascades,
                            since: as_of,
                        });
                    }
                    None => remote.set(key, bytes, ttl),
                }
            }
            Err(e) => {
                c.bump(Counter::BackendError);
                self.inner.warn.warn(format_args!(
                    "encoding a value of `{}` failed: {e}",
                    self.state.name
                ));
            }
        }
    }

    /// Serves a value read from the remote tier: fills the in-process tier until the
    /// remote entry's `deadline` (unix milliseconds; 0 for a sliding entry, which the
    /// read renewed), links the calling function's entry, hands it to the waiters. A
    /// value invalidated while it was read is returned to this caller (whose call
    /// began before the invalidation) but neither kept nor handed on.
    ///
    /// The value's dependencies, as the remote graph names them, become the entry's:
    /// a cached function reading it links to them as to those of a value computed here.
    fn finish_remote(
        &self,
        (value, deadline, links): crate::remote::Decoded<K::Stored>,
        leader: Leader<'_>,
    ) -> R {
        let key = self.key.as_bytes();
        let linked = (!links.is_empty())
            .then(|| Frame::of(links.iter().filter_map(|l| Node::from_remote_id(l))));
        let frame = linked.as_ref().unwrap_or(Frame::EMPTY);
        let deps: Option<Arc<[Node]>> =
            (!frame.nodes.is_empty()).then(|| frame.nodes.as_slice().into());
        let as_of = match self.remote_epoch.load(Ordering::Relaxed) {
            UNKNOWN => 0,
            e => e,
        };
        with_frame(|f| f.add_entry(key, deps.as_deref(), self.epoch, as_of));
        let expiration = match deadline {
            _ if !self.inner.memory.enabled() => self.expiration, // not kept here
            0 => self.expiration,
            d => match crate::remote::until(d) {
                Some(left) => Expiration::Absolute(left),
                None => return K::from_stored(value), // expired meanwhile
            },
        };
        if self.keep_local(&value, frame, expiration, as_of, false) {
            leader.complete(|| {
                Arc::new(Handoff {
                    value: (self.ops.into_shared)((self.ops.clone)(&value)),
                    deps,
                    as_of,
                })
            });
        }
        K::from_stored(value)
    }
}

/// The steps of the miss path, written once for the async and the blocking forms:
/// `$run` runs the body in a dependency frame (it appears in two arms, each of which
/// returns), `$wait` waits for another caller's flight, `$complete` completes a
/// refresh in the shared tiers.
macro_rules! miss_loop {
    ($miss:ident, $refresh:expr, $remote:expr, $run:expr, |$flight:ident| $wait:expr, |$pending:ident| $complete:expr) => {{
        let mut next = $miss.start($refresh);
        loop {
            next = match next {
                Next::Return(r) => return r,
                Next::Lead(leader) => {
                    if let Some(value) = $remote {
                        return $miss.finish_remote(value, leader);
                    }
                    $miss.running();
                    let (result, frame) = $run;
                    let _ = $miss.finish(&result, frame, Some(leader), false);
                    return result;
                }
                Next::Wait($flight) => {
                    let waited = $wait;
                    $miss.waited(waited)
                }
                Next::RunAlone => {
                    $miss.running();
                    let (result, frame) = $run;
                    if let Some($pending) = $miss.finish(&result, frame, None, $refresh) {
                        $complete;
                    }
                    return result;
                }
            }
        }
    }};
}

/// The miss path of an `async fn`: runs the body under single flight and stores its
/// result; with `path == None` (caching off) just runs the body.
#[doc(hidden)]
pub async fn run_async<K, R, F>(
    path: Option<MissPath>,
    desc: &'static Descriptor,
    ops: &'static ValueOps<K::Stored>,
    body: F,
) -> R
where
    K: ReturnKind<R>,
    F: Future<Output = R>,
{
    let Some(path) = path else {
        return body.await;
    };
    let mut miss = Miss::<K, R>::new(&path, desc, ops);
    if path.refresh {
        // a refresh writes what it computes: with a remote graph, as of the count now
        miss.read_epoch().await;
    }
    miss_loop!(
        miss,
        path.refresh,
        miss.read_remote().await,
        collect_async(body).await,
        |flight| flight.wait(miss.lock_timeout).await,
        |pending| path.service.inner.complete(pending).await
    )
}

/// The miss path of a plain `fn`: concurrent callers of the same key block until the
/// first one finishes, at most the lock timeout.
#[doc(hidden)]
pub fn run_sync<K, R, F>(
    path: Option<MissPath>,
    desc: &'static Descriptor,
    ops: &'static ValueOps<K::Stored>,
    body: F,
) -> R
where
    K: ReturnKind<R>,
    F: FnOnce() -> R,
{
    let Some(path) = path else {
        return body();
    };
    let mut miss = Miss::<K, R>::new(&path, desc, ops);
    // plain functions use the in-process tier only
    miss_loop!(
        miss,
        path.refresh,
        None::<crate::remote::Decoded<K::Stored>>,
        collect_sync(body),
        |flight| flight.wait_blocking(miss.lock_timeout),
        |pending| miss.service.complete_detached(pending)
    )
}

/// The key of one call of a cached function, computed by the function's companion
/// (`get_product::__cache_key(42)`) for invalidation.
#[doc(hidden)]
pub struct CallKey {
    key: Option<Key>,
}

/// Builds the key of a call, without running anything.
#[doc(hidden)]
pub fn call_key(
    desc: &'static Descriptor,
    self_type: Option<&'static str>,
    write_args: impl FnOnce(&mut KeyWriter),
) -> CallKey {
    let reg = desc.registration(self_type);
    if reg.unusable.is_some() {
        return CallKey { key: None };
    }
    CallKey {
        key: Some(with_function_key(reg, self_type, write_args, |k| {
            k.to_owned()
        })),
    }
}

/// Looks a call up without running it (`peek!`).
#[doc(hidden)]
pub fn peek<K: ReturnKind<R>, R>(
    desc: &'static Descriptor,
    self_type: Option<&'static str>,
    ops: &'static ValueOps<K::Stored>,
    write_args: impl FnOnce(&mut KeyWriter),
) -> Option<R> {
    let reg = desc.registration(self_type);
    if reg.unusable.is_some() {
        return None;
    }
    with_function_key(reg, self_type, write_args, |key| {
        with_current(|svc| {
            svc.inner
                .memory
                .get(key.as_bytes(), |slot| (ops.from_any)(&slot.value))
                .map(K::from_stored)
        })
    })
}

/// Removes the entries of these calls, and every entry that depends on them.
#[doc(hidden)]
pub async fn invalidate_calls(keys: impl IntoIterator<Item = CallKey>) {
    let nodes: Vec<Node> = keys
        .into_iter()
        .filter_map(|k| k.key)
        .map(|k| Node::Entry(k.as_bytes().into()))
        .collect();
    if !nodes.is_empty() {
        let service = CachingService::current();
        let pending = service.inner.invalidate(nodes);
        service.inner.complete(pending).await;
    }
}

/// Runs the invalidations of `#[invalidate_cache]` once the function has succeeded.
#[doc(hidden)]
pub async fn invalidate_after(keys: Vec<CallKey>, dependencies: Vec<crate::Dependency>) {
    invalidate_calls(keys).await;
    for d in dependencies {
        crate::invalidate_dependency(d).await;
    }
}

/// Blocking form of [`invalidate_after`], for plain functions. The in-process tier
/// needs no waiting; remote tiers queue their part.
#[doc(hidden)]
pub fn invalidate_after_sync(keys: Vec<CallKey>, dependencies: Vec<crate::Dependency>) {
    let mut nodes: Vec<Node> = keys
        .into_iter()
        .filter_map(|k| k.key)
        .map(|k| Node::Entry(k.as_bytes().into()))
        .collect();
    nodes.extend(dependencies.iter().flat_map(crate::deps::nodes_of));
    if !nodes.is_empty() {
        let service = CachingService::current();
        let pending = service.inner.invalidate(nodes);
        service.complete_detached(pending);
    }
}
