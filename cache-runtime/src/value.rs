//! What a return type stores, and the operations the call path needs on it.
//!
//! What a return type stores is decided by its [`ReturnKind`]: the whole value for
//! plain returns, the `Ok` value for `Result`, and for `Option` either the whole
//! value or only `Some` (`cache_none = false`). The operations ([`ValueOps`]) are built
//! where the type's bounds are checked, at the function's return type.

use std::any::Any;

use crate::memory::{AnySlot, Slot};
use crate::profile::Expiration;

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
    pub(crate) clone: fn(&T) -> T,
    pub(crate) into_slot: fn(T, Expiration) -> Box<AnySlot>,
    pub(crate) into_shared: fn(T) -> Box<dyn Any + Send + Sync>,
    pub(crate) from_any: fn(&(dyn Any + Send + Sync)) -> Option<T>,
    /// For values a remote tier may hold.
    pub(crate) encode: Option<Encode<T>>,
    pub(crate) decode: Option<Decode<T>>,
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
    /// Whether the body failed (`Err`): then fail-safe may answer with a fallback.
    #[inline]
    fn failed(_: &R) -> bool {
        false
    }
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
    #[inline]
    fn failed(r: &Result<T, E>) -> bool {
        r.is_err()
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
