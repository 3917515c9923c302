//! The hit: the first look at a call, inlined into each generated wrapper.
//!
//! `#[cached]` turns a function into: [`lookup`] (write the key on the stack from the
//! arguments, find the current service and the function's state, look in the
//! in-process tier), and on anything but a hit, the miss path (`miss.rs`) with the
//! original body. [`peek`] is the same look without running anything.

use std::cell::Cell;
use std::sync::atomic::{AtomicUsize, Ordering};

use crate::current::{global, in_scope, with_current, with_scoped};
use crate::deps::{collecting, with_frame};
use crate::inner::{CachingService, Inner};
use crate::key::{with_function_key, write_function_key, Key, KeyRef, KeyWriter};
use crate::memory::AnySlot;
use crate::registry::{Descriptor, FnState, Mode, Registration};
use crate::stats::Counter;
use crate::value::{ReturnKind, ValueOps};

/// Outcome of [`lookup`], the synchronous first look at a call.
#[doc(hidden)]
pub enum Lookup<R> {
    /// Served from the cache.
    Hit(R),
    /// Served from the cache, and the entry is past its eager-refresh point: the
    /// wrapper starts one refresh of it in the background (`refresh_in_background`).
    Refresh(R, Box<MissPath>),
    /// Run the body: through the miss path (`run_async`, `run_sync` in `miss.rs`) if
    /// caching is on, else directly.
    Run(Option<MissPath>),
}

/// What the miss path needs from the lookup: the service it looked in and an owned key.
#[doc(hidden)]
pub struct MissPath {
    pub(crate) service: CachingService,
    pub(crate) reg: &'static Registration,
    pub(crate) key: Key,
    /// The key's hash (`keybuf::key_hash`), as the lookup computed it.
    pub(crate) hash: u64,
    /// Run the body and store its result whatever the cache holds (`refresh!`).
    pub(crate) refresh: bool,
}

impl MissPath {
    /// A copy for a body run in the background (`refresh`: an eager refresh).
    pub(crate) fn for_background(&self, refresh: bool) -> MissPath {
        MissPath {
            service: self.service.clone(),
            reg: self.reg,
            key: self.key.clone(),
            hash: self.hash,
            refresh,
        }
    }

    fn new(
        svc: &CachingService,
        reg: &'static Registration,
        key: KeyRef<'_>,
        hash: u64,
        refresh: bool,
    ) -> Self {
        MissPath {
            service: svc.clone(),
            reg,
            key: key.to_owned(),
            hash,
            refresh,
        }
    }
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
/// `BACKGROUND`: the function's body can run in the background, so a hit past the
/// entry's eager-refresh point may return [`Lookup::Refresh`]; without it, the hit
/// path carries nothing of eager refresh.
#[doc(hidden)]
#[inline(always)]
pub fn lookup<K: ReturnKind<R>, R, const BACKGROUND: bool>(
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
        return lookup_scoped::<K, R, BACKGROUND>(desc, reg, key, hash, ops, refresh);
    }
    let svc = global();
    let state = desc.global_state(&*svc.inner, reg);
    probe::<K, R, BACKGROUND>(svc, state, reg, key, hash, ops, refresh)
}

/// [`lookup`] in the enclosing scope's service: out of line, so that the wrapper holds
/// one copy of the hit path. (The parameters go one by one, as to [`probe`]: bundled in
/// a struct, the optimizer stopped inlining the value's downcast into the wrapper, 808
/// instructions a hit became 834.)
#[cold]
#[inline(never)]
fn lookup_scoped<K: ReturnKind<R>, R, const BACKGROUND: bool>(
    desc: &'static Descriptor,
    reg: &'static Registration,
    key: KeyRef<'_>,
    hash: u64,
    ops: &'static ValueOps<K::Stored>,
    refresh: bool,
) -> Lookup<R> {
    with_scoped(|svc| {
        let state = svc.inner.function(desc, reg);
        probe::<K, R, BACKGROUND>(svc, state, reg, key, hash, ops, refresh)
    })
}

/// The hit path's look in the service's in-process tier, once the service and the
/// function's state are known.
#[inline(always)]
fn probe<K: ReturnKind<R>, R, const BACKGROUND: bool>(
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
        if BACKGROUND {
            let due = Cell::new(false);
            if let Some(v) = read(&svc.inner, key.as_bytes(), hash, ops, Some(&due)) {
                return hit::<K, R>(state, key, v);
            }
            if due.get() {
                return refresh_hit::<K, R>(svc, state, reg, key, hash, ops);
            }
        } else if let Some(v) = read(&svc.inner, key.as_bytes(), hash, ops, None) {
            return hit::<K, R>(state, key, v);
        }
    }
    miss_path(svc, state, reg, key, hash, refresh)
}

/// A hit: counted, returned.
#[inline(always)]
fn hit<K: ReturnKind<R>, R>(state: &FnState, key: KeyRef<'_>, v: K::Stored) -> Lookup<R> {
    state.counters.bump(Counter::L1Hit);
    tracing::debug!(target: "cache_runtime", function = %state.name, key = %key, "cache hit");
    Lookup::Hit(K::from_stored(v))
}

/// A hit on an entry past its eager-refresh point, by the caller that refreshes it
/// (the first to see it there, which made it live until its expiry).
#[cold]
#[inline(never)]
fn refresh_hit<K: ReturnKind<R>, R>(
    svc: &CachingService,
    state: &FnState,
    reg: &'static Registration,
    key: KeyRef<'_>,
    hash: u64,
    ops: &'static ValueOps<K::Stored>,
) -> Lookup<R> {
    let Some(v) = read(&svc.inner, key.as_bytes(), hash, ops, None) else {
        return miss_path(svc, state, reg, key, hash, false);
    };
    state.counters.bump(Counter::L1Hit);
    let path = MissPath::new(svc, reg, key, hash, true);
    Lookup::Refresh(K::from_stored(v), Box::new(path))
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
    hash: u64,
    refresh: bool,
) -> Lookup<R> {
    tracing::debug!(target: "cache_runtime", function = %state.name, key = %key, refresh, "cache miss");
    Lookup::Run(Some(MissPath::new(svc, reg, key, hash, refresh)))
}

/// Reads an entry; inside another cached function's body, also links that function's
/// entry to this one and to what this one depends on. With `due`, an entry past its
/// eager-refresh point is not read if this caller is the one to refresh it: `due`
/// is set (see [`crate::memory::MemoryTier::get_or_refresh`]); without, such an
/// entry reads as a miss ([`crate::memory::MemoryTier::get_fast`]).
#[inline(always)]
pub(crate) fn read<T>(
    inner: &Inner,
    key: &[u8],
    hash: u64,
    ops: &'static ValueOps<T>,
    due: Option<&Cell<bool>>,
) -> Option<T> {
    let memory = &inner.memory;
    if !collecting() {
        let read = |slot: &AnySlot| (ops.from_any)(&slot.value);
        return match due {
            None => memory.get_fast(key, hash, read),
            Some(_) => memory.get_or_refresh(key, hash, read, due),
        };
    }
    let read_epoch = inner.snapshot();
    let read = |slot: &AnySlot| {
        let value = (ops.from_any)(&slot.value)?;
        with_frame(|f| f.add_entry(key, slot.deps.as_deref(), read_epoch, slot.remote_epoch));
        Some(value)
    };
    match due {
        None => memory.get_fast(key, hash, read),
        Some(_) => memory.get_or_refresh(key, hash, read, due),
    }
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
