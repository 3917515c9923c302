//! Attribute-driven caching for async Rust.
//!
//! Write `#[cached]` on a function; its result is stored under a key built from its
//! name and arguments, and the next call with the same arguments returns the stored
//! value without running the body.
//!
//! ```
//! use cache_runtime::cached;
//!
//! #[derive(Clone, serde::Serialize, serde::Deserialize)]
//! pub struct Product { pub id: u64, pub name: String }
//!
//! #[cached(ttl = "10m")]
//! pub async fn get_product(id: u64) -> Result<Product, String> {
//!     // a slow query
//!     Ok(Product { id, name: format!("product {id}") })
//! }
//!
//! # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
//! let first = get_product(42).await;   // runs the body
//! let second = get_product(42).await;  // served from the cache
//! assert_eq!(cache_runtime::stats().function(concat!(module_path!(), "::get_product")).hits, 1);
//! # });
//! ```
//!
//! - [`cached`]: the attribute and its options (`profile`, `ttl`, `sliding`, `skip`,
//!   `name`, `version`, `local`, `cache_none`, `fail_safe`, `fail_safe_throttle`,
//!   `soft_timeout`, `eager_refresh`).
//! - [`CacheKey`]: what arguments must implement, with `#[derive(CacheKey)]`.
//! - [`CachingService`]: configured once in `main` (backend, profiles), or created with
//!   defaults by the first cached call; [`CachingService::scope`] runs code against
//!   another service.
//! - [`stats()`]: hit, miss and execution counts per function.
//! - [`InvalidationBus`]: how instances tell each other what they invalidated, so that
//!   each drops its in-process copies (`cache_redis::RedisSync` and `RedisBackend`'s L1
//!   use Redis pub/sub; [`MemoryBus`] works inside one process).
//!
//! Tracing: each hit and miss is a `debug` event of target `cache_runtime` with the
//! readable key; configuration errors are `error` events.

#![warn(missing_docs)]
// Unsafe code is confined to the two modules that allow it below, and to two
// functions of key rendering (`key::render::ascii`, `StackText::as_str`).
#![deny(unsafe_code)]

// Grouped by layer: a module refers only to its own group and those before it
// (`tests/tests/module_cycles.rs` checks that none refers back).
// Settings, counters and buffers:
mod backoff;
// the counters' metrics, with the feature `metrics`
mod exported;
// the key buffer: short copies into its inline array, and reading it back
#[allow(unsafe_code)]
mod keybuf;
mod lock;
mod profile;
mod stats;
// Keys, values, and the stores and structures the flows work on:
mod bus;
mod deps;
mod flight;
mod held;
mod key;
mod memory;
mod pending;
// the global service's function state, kept as a pointer next to the descriptor
#[allow(unsafe_code)]
mod registry;
mod remote;
mod value;
// The service's state, its configuration and the current service:
mod builder;
mod current;
mod inner;
// The flows: the hit, the miss, the invalidation, another instance's invalidation:
mod hit;
mod invalidate;
mod invalidate_local;
mod miss;
mod miss_remote;
mod receive;
// The public face:
mod service;

pub use backoff::Backoff;
pub use builder::{Backend, CachingServiceBuilder, InstallError};
pub use bus::{new_instance_id, BusReceiver, InvalidationBus, Item, MemoryBus, Message};
pub use deps::{add_dependency, untracked, CacheDependency, Dependency};
pub use invalidate::invalidate_dependency;
pub use key::{key_text, CacheKey, KeyWriter};
pub use memory::{MemoryBackend, WeighFn};
pub use profile::Expiration;
pub use remote::{
    BoxFuture, Fetched, LinkedWrite, LockId, RemoteError, RemoteGraph, RemoteKey, RemoteStore,
    Removed, SingleFlight, FORMAT_VERSION,
};
pub use service::{
    shutdown, stats, CachingService, ConfigError, FunctionStats, Profile, ShutdownReport, Stats,
};
pub use stats::{RemoteStats, SyncStats};

/// Caches a function's result under a key built from its arguments.
///
/// ```
/// use cache_runtime::cached;
/// # #[derive(Clone)] pub struct Db;
///
/// #[cached(profile = "catalog", ttl = "10m", skip(db))]
/// pub async fn products_in(category: &str, db: &Db) -> Vec<String> {
///     vec![format!("{category}: first")]
/// }
/// ```
///
/// | option | meaning |
/// |---|---|
/// | `profile = "name"` | run-time [`Profile`]; default `"default"` |
/// | `ttl = "10m"` | absolute expiration; units `ms s m h d`, combinable (`"1h30m"`) |
/// | `sliding = "2m"` | sliding expiration; not with `ttl` |
/// | `skip(a, b, self)` | parameters left out of the key |
/// | `name = "catalog.product"` | stable key name instead of `module_path::fn` |
/// | `version = 2` | bump when the value's shape changes; older entries are never read |
/// | `local` | in-process tier only; the value need not implement serde |
/// | `cache_none = false` | for `Option<T>` returns: do not store `None` |
/// | `fail_safe = "1h"` | keep expired entries this long, as a fallback for a body that returns `Err` |
/// | `fail_safe_throttle = "30s"` | after a failure, the fallback counts as fresh this long (default 30 s) |
/// | `soft_timeout = "100ms"` | with a fallback, answer with it after this long; the body finishes in the background |
/// | `eager_refresh = 0.8` | past this fraction of the ttl, a hit refreshes the entry in the background |
///
/// `soft_timeout` and `eager_refresh` (on the attribute or in the profile) run the body
/// in a task of its own: they apply to an `async fn` without generics or `self` whose
/// parameters are owned, and its future must be `Send`; such a function that names a
/// profile or sets one of them is compiled for it.
///
/// Return types: the value must be `Clone + Send + Sync + 'static` and, unless
/// `local`, `Serialize + DeserializeOwned`. For `Result<T, E>` only `Ok` is stored. A
/// plain `fn` is cached in the in-process tier only, and needs no serde.
///
/// Keys: `module_path::function` (methods: `receiver_type::method`), then `:v` and the
/// version, then the arguments, for example `shop::catalog::get_product:v1(42)`.
/// Generic functions add their type arguments (`::<u64>`), skipped parameters show as
/// `*`.
pub use cache_macros::cached;

/// Derives [`CacheKey`] for a struct or an enum whose fields implement it.
pub use cache_macros::CacheKey;

/// Invalidates cached entries once the function has succeeded: after it returns `Ok`
/// (or any value, for a return type that is not a `Result`), before the caller gets
/// the result; never after `Err` or a panic.
///
/// ```
/// use cache_runtime::{cached, invalidate_cache};
///
/// #[cached]
/// pub async fn get_product(id: u64) -> String { format!("product {id}") }
///
/// #[cached]
/// pub async fn products_in(category: &str) -> Vec<u64> { vec![1, 2] }
///
/// // By name: `get_product`'s key parameter `id` is this function's `id`.
/// #[invalidate_cache(get_product)]
/// pub async fn rename_product(id: u64, name: String) -> Result<(), String> { Ok(()) }
///
/// // Explicit arguments: any expression over the parameters; several targets.
/// #[invalidate_cache(get_product(id), products_in(&category))]
/// pub async fn move_product(id: u64, category: String) -> Result<(), String> { Ok(()) }
///
/// // A dependency (see `add_dependency`).
/// #[invalidate_cache(dependency = format!("order:{id}"))]
/// pub async fn cancel_order(id: u64) -> Result<(), String> { Ok(()) }
/// ```
///
/// Targets are paths: `get_product`, `crate::catalog::get_product`, `Self::get_by_id`.
/// By name, every key parameter of the target must be a parameter of this function
/// with the same name and a type that fits, or it does not compile. Methods are named
/// with explicit arguments: `Self::get_by_id(self, id)` or `self.get_by_id(id)`.
pub use cache_macros::invalidate_cache;

/// Removes the entry of a call of a cached function, and every entry that depends on
/// it, without running anything. The arguments are type-checked against the function.
///
/// ```
/// # use cache_runtime::cached;
/// # #[cached] pub async fn get_product(id: u64) -> String { id.to_string() }
/// # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
/// cache_runtime::invalidate!(get_product(42)).await;
/// # });
/// ```
///
/// Method forms: `invalidate!(repo.get_by_id(42))`, `invalidate!(Repo::get_by_id(&repo, 42))`.
pub use cache_macros::invalidate;

/// Runs the body of a cached call and stores its result, replacing the entry; entries
/// that depend on it are invalidated. It is shallow: cached functions the body calls
/// are served from the cache as usual. Returns the function's result (`.await` it
/// for an `async fn`).
///
/// ```
/// # use cache_runtime::cached;
/// # #[cached] pub async fn get_product(id: u64) -> String { id.to_string() }
/// # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
/// let fresh = cache_runtime::refresh!(get_product(42)).await;
/// # });
/// ```
pub use cache_macros::refresh;

/// The cached value of a call, if there is one, without running the function.
///
/// ```
/// # use cache_runtime::cached;
/// # #[cached] pub async fn get_product(id: u64) -> String { id.to_string() }
/// # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
/// assert_eq!(cache_runtime::peek!(get_product(42)).await, None);
/// get_product(42).await;
/// assert_eq!(cache_runtime::peek!(get_product(42)).await, Some("42".to_owned()));
/// # });
/// ```
pub use cache_macros::peek;

/// Items used by the generated code. Not a public API: names and signatures change
/// without notice.
#[doc(hidden)]
pub mod __private {
    pub use crate::hit::{lookup, peek, refresh_next_call, Lookup, MissPath};
    pub use crate::invalidate::{
        call_key, invalidate_after, invalidate_after_sync, invalidate_calls, CallKey,
    };
    pub use crate::key::{write_arg, KeyWriter};
    pub use crate::miss::{refresh_in_background, run_async, run_async_background, run_sync};
    pub use crate::profile::{Expiration, Overrides};
    pub use crate::registry::{Descriptor, DescriptorRuntime};
    /// The remote tier's decoder, for benchmarks that compare against raw reads.
    pub use crate::remote::decode;
    pub use crate::value::{
        shared_ops, value_ops, CachedValue, Optional, Plain, ResultOk, ReturnKind, SharedValue,
        ValueOps,
    };
    pub use cache_macros::__by_name as by_name;
    pub use core::any::type_name;
    pub use core::time::Duration;
    pub use std::boxed::Box;
}
