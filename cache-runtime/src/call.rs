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

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use crate::flight::{Join, Waited};
use crate::key::Key;
use crate::memory::{AnySlot, Expiration, Slot};
use crate::registry::{Descriptor, FnState, Mode, Registration};
use crate::service::{with_current, CachingService, Counters, Inner};

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

/// How a return type maps to what is stored.
pub trait ReturnKind<R> {
    /// What is stored.
    type Stored: CachedValue;
    /// The value to store for this return, if any.
    fn to_stored(r: &R, cache_none: bool) -> Option<Self::Stored>;
    /// The return rebuilt from a stored value.
    fn from_stored(s: Self::Stored) -> R;
}

/// Any return type: stored whole.
pub struct Plain;
/// `Result<T, E>`: `Ok(T)` stores `T`, `Err` is not stored.
pub struct ResultOk;
/// `Option<T>`: stored whole, unless `cache_none = false` and it is `None`.
pub struct Optional;

impl<T: CachedValue> ReturnKind<T> for Plain {
    type Stored = T;
    #[inline]
    fn to_stored(r: &T, _: bool) -> Option<T> {
        Some(r.clone())
    }
    #[inline]
    fn from_stored(s: T) -> T {
        s
    }
}

impl<T: CachedValue, E> ReturnKind<Result<T, E>> for ResultOk {
    type Stored = T;
    #[inline]
    fn to_stored(r: &Result<T, E>, _: bool) -> Option<T> {
        r.as_ref().ok().cloned()
    }
    #[inline]
    fn from_stored(s: T) -> Result<T, E> {
        Ok(s)
    }
}

impl<T: CachedValue> ReturnKind<Option<T>> for Optional {
    type Stored = Option<T>;
    #[inline]
    fn to_stored(r: &Option<T>, cache_none: bool) -> Option<Option<T>> {
        (r.is_some() || cache_none).then(|| r.clone())
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

/// Makes the compiler check, at the return type's span, that the value can be cached.
#[inline]
pub fn assert_cached_value<T: CachedValue>() {}
/// Makes the compiler check, at the return type's span, that the value can be serialized.
#[inline]
pub fn assert_shared_value<T: SharedValue>() {}

/// Outcome of the synchronous first look at a call.
enum First<R> {
    /// Served (hit), or ran the body with caching off.
    Hit(R),
    Miss,
    Uncached,
}

#[inline]
fn registration(desc: &'static Descriptor, key: &Key) -> &'static Registration {
    desc.registration(|| key.function_name().unwrap_or(desc.name).to_owned())
}

#[inline]
fn first_look<K: ReturnKind<R>, R>(inner: &Inner, state: &FnState, key: &Key) -> First<R> {
    match state.mode {
        Mode::Cached { .. } => {}
        Mode::Disabled => {
            Counters::bump(&state.counters.executions);
            return First::Uncached;
        }
        Mode::Misconfigured => {
            Counters::bump(&state.counters.config_errors);
            Counters::bump(&state.counters.executions);
            return First::Uncached;
        }
    }
    match inner.memory.get::<K::Stored>(key.as_bytes()) {
        Some(v) => {
            Counters::bump(&state.counters.hits);
            Counters::bump(&state.counters.l1_hits);
            tracing::debug!(target: "cache_runtime", function = %state.name, key = %key, "cache hit");
            First::Hit(K::from_stored(v))
        }
        None => {
            Counters::bump(&state.counters.misses);
            tracing::debug!(target: "cache_runtime", function = %state.name, key = %key, "cache miss");
            First::Miss
        }
    }
}

fn settings(state: &FnState) -> (Expiration, Duration) {
    match state.mode {
        Mode::Cached {
            expiration,
            lock_timeout,
        } => (expiration, lock_timeout),
        _ => (Expiration::Never, Duration::ZERO),
    }
}

/// Stores a result, if its kind stores one, and returns the stored slot.
fn store<K: ReturnKind<R>, R>(
    inner: &Inner,
    desc: &Descriptor,
    key: &Key,
    result: &R,
    expiration: Expiration,
) -> Option<Arc<AnySlot>> {
    let value = K::to_stored(result, desc.cache_none)?;
    let slot: Arc<AnySlot> = Arc::new(Slot::new(value, expiration));
    inner.memory.insert(key.as_bytes().into(), slot.clone());
    Some(slot)
}

fn from_slot<K: ReturnKind<R>, R>(slot: &AnySlot) -> Option<R> {
    slot.value
        .downcast_ref::<K::Stored>()
        .map(|v| K::from_stored(v.clone()))
}

/// Entry point of `#[cached(local)] async fn`: in-process tier only.
#[doc(hidden)]
pub async fn call_async<K, R, F>(desc: &'static Descriptor, key: Key, body: F) -> R
where
    K: ReturnKind<R>,
    F: Future<Output = R>,
{
    let reg = registration(desc, &key);
    let service = match with_current(|svc| {
        let state = svc.inner.function(desc, reg);
        match first_look::<K, R>(&svc.inner, state, &key) {
            First::Hit(r) => Ok(r),
            First::Miss => Err(Some(svc.clone())),
            First::Uncached => Err(None),
        }
    }) {
        Ok(hit) => return hit,
        Err(None) => return body.await,
        Err(Some(service)) => service,
    };
    miss_async::<K, R, F>(service, desc, reg, key, body).await
}

/// Entry point of `#[cached] async fn`: values are also serializable, so a remote tier
/// can hold them.
#[doc(hidden)]
pub async fn call_async_shared<K, R, F>(desc: &'static Descriptor, key: Key, body: F) -> R
where
    K: ReturnKind<R>,
    K::Stored: SharedValue,
    F: Future<Output = R>,
{
    call_async::<K, R, F>(desc, key, body).await
}

async fn miss_async<K, R, F>(
    service: CachingService,
    desc: &'static Descriptor,
    reg: &'static Registration,
    key: Key,
    body: F,
) -> R
where
    K: ReturnKind<R>,
    F: Future<Output = R>,
{
    let inner = &*service.inner;
    let state = inner.function(desc, reg);
    let (expiration, lock_timeout) = settings(state);
    loop {
        match inner.flights.join(key.as_bytes()) {
            Join::Lead(leader) => {
                // A flight that ended between our lookup and `join` stored its value.
                if let Some(v) = inner.memory.get::<K::Stored>(key.as_bytes()) {
                    return K::from_stored(v);
                }
                Counters::bump(&state.counters.executions);
                let result = body.await;
                if let Some(slot) = store::<K, R>(inner, desc, &key, &result, expiration) {
                    leader.complete(slot);
                }
                return result;
            }
            Join::Wait(flight) => match flight.wait(lock_timeout).await {
                Waited::Done(slot) => {
                    if let Some(r) = from_slot::<K, R>(&slot) {
                        return r;
                    }
                }
                Waited::Abandoned => continue,
                Waited::TimedOut => {
                    tracing::debug!(target: "cache_runtime", function = %state.name, key = %key, "lock timeout: running the body without waiting");
                    Counters::bump(&state.counters.executions);
                    let result = body.await;
                    store::<K, R>(inner, desc, &key, &result, expiration);
                    return result;
                }
            },
        }
    }
}

/// Entry point of `#[cached] fn` (not async): in-process tier only; concurrent callers
/// of the same key block until the first one finishes, at most the lock timeout.
#[doc(hidden)]
pub fn call_sync<K, R, F>(desc: &'static Descriptor, key: Key, body: F) -> R
where
    K: ReturnKind<R>,
    F: FnOnce() -> R,
{
    let reg = registration(desc, &key);
    let service = match with_current(|svc| {
        let state = svc.inner.function(desc, reg);
        match first_look::<K, R>(&svc.inner, state, &key) {
            First::Hit(r) => Ok(r),
            First::Miss => Err(Some(svc.clone())),
            First::Uncached => Err(None),
        }
    }) {
        Ok(hit) => return hit,
        Err(None) => return body(),
        Err(Some(service)) => service,
    };
    let inner = &*service.inner;
    let state = inner.function(desc, reg);
    let (expiration, lock_timeout) = settings(state);
    loop {
        match inner.flights.join(key.as_bytes()) {
            Join::Lead(leader) => {
                if let Some(v) = inner.memory.get::<K::Stored>(key.as_bytes()) {
                    return K::from_stored(v);
                }
                Counters::bump(&state.counters.executions);
                let result = body();
                if let Some(slot) = store::<K, R>(inner, desc, &key, &result, expiration) {
                    leader.complete(slot);
                }
                return result;
            }
            Join::Wait(flight) => match flight.wait_blocking(lock_timeout) {
                Waited::Done(slot) => {
                    if let Some(r) = from_slot::<K, R>(&slot) {
                        return r;
                    }
                }
                Waited::Abandoned => continue,
                Waited::TimedOut => {
                    Counters::bump(&state.counters.executions);
                    let result = body();
                    store::<K, R>(inner, desc, &key, &result, expiration);
                    return result;
                }
            },
        }
    }
}
