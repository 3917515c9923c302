//! The remote tier: a store outside the process (Redis, in `cache-redis`) holding
//! serialized values under readable keys, shared by every instance.
//!
//! The runtime reaches it on a miss of the in-process tier, inside the key's flight
//! (so concurrent callers cause one read), and writes to it after running a body,
//! through the store's write-behind queue (a call never waits for a write). A store
//! failure never fails a call: it is counted, logged at `warn` (at most once a second
//! per service), and the call goes on as a miss.

use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::key::Key;
use crate::memory::now_nanos;

/// A boxed future, as the [`RemoteStore`] methods return.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Why a remote operation failed.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct RemoteError(pub String);

/// The key of an entry being read from a [`RemoteStore`]. Its readable key is
/// rendered on the stack when the store asks for it: a remote hit allocates no string
/// for its key.
#[derive(Clone, Copy)]
pub struct RemoteKey<'a> {
    key: &'a Key,
    /// The longest readable key (`max_key_length`).
    max_len: usize,
}

impl<'a> RemoteKey<'a> {
    pub(crate) fn new(key: &'a Key, max_len: usize) -> Self {
        RemoteKey { key, max_len }
    }

    /// Runs `f` on the readable key, the same text [`RemoteStore::set`] receives for
    /// the entry.
    pub fn with_text<R>(&self, f: impl FnOnce(&str) -> R) -> R {
        self.key.with_text(self.max_len, f)
    }
}

/// A store outside the process: bytes under string keys, with expiry.
///
/// Keys given to the store are the readable keys of the entries (the store adds its
/// own prefix). Implementations bound every operation by a timeout and never panic.
pub trait RemoteStore: Send + Sync + 'static {
    /// Reads the bytes under `key`. With `touch`, a sliding entry's expiry is moved
    /// to `touch` from now in the same round trip.
    fn get<'a>(
        &'a self,
        key: RemoteKey<'a>,
        touch: Option<Duration>,
    ) -> BoxFuture<'a, Result<Fetched, RemoteError>>;

    /// Queues a write of `value` under `key`, expiring after `ttl`. Never waits: when
    /// the queue is full, the write is dropped and counted.
    fn set(&self, key: String, value: Vec<u8>, ttl: Duration);

    /// Removes `keys`, after every write queued before this call (so a queued write
    /// of an old value never lands after its removal); with no keys, just waits for
    /// those writes. Awaited: an invalidation is done when the caller continues.
    ///
    /// `publish` is only given to a store whose backend was built with
    /// [`Backend::with_store_bus`](crate::Backend::with_store_bus): it is an encoded
    /// [`InvalidationBus`](crate::InvalidationBus) message, which the store publishes on
    /// that bus once the keys are removed, in the same round trip.
    ///
    /// `Err` means the keys may still be there (refused, failed, or not confirmed in
    /// time): the service sends the removal again until it goes through. `Ok` says
    /// whether the publication failed.
    fn remove(
        &self,
        keys: Vec<String>,
        publish: Option<Vec<u8>>,
    ) -> BoxFuture<'_, Result<Removed, RemoteError>>;

    /// Removes every entry of this store (its prefix).
    fn clear(&self) -> BoxFuture<'_, Result<(), RemoteError>>;

    /// Completes the queued writes, waiting at most `timeout`.
    fn flush(&self, timeout: Duration) -> BoxFuture<'_, ShutdownReport>;

    /// The largest encoded value the store accepts; larger values are returned to the
    /// caller and not stored remotely.
    fn max_value_size(&self) -> usize;

    /// The expiry of entries whose function and profile give none.
    fn default_ttl(&self) -> Duration;

    /// The store's dependency graph, if it keeps one: then every value is written
    /// with its links through it, and invalidations walk it. Without one, values
    /// that have dependencies are kept in the in-process tier only.
    fn graph(&self) -> Option<&dyn RemoteGraph> {
        None
    }

    /// Adds the store's own counters (writes refused, failed or dropped) to `stats`.
    fn report(&self, stats: &mut crate::stats::RemoteStats) {
        let _ = stats;
    }

    /// Whether concurrent misses of one key on every instance run its body once (see
    /// [`RemoteStore::get_single_flight`]).
    fn single_flight(&self) -> bool {
        false
    }

    /// With [`RemoteStore::single_flight`]: reads `key` as [`RemoteStore::get`] does
    /// and, if the entry is missing or past its deadline, takes the key's lock in the
    /// same round trip. If another instance holds it, waits until it is released
    /// (notified, or polling), at most `lock_timeout`, and reads again. With
    /// `fallback_after`, a wait that found a value past its deadline (a fail-safe
    /// fallback) ends after that long ([`SingleFlight::Slow`]).
    fn get_single_flight<'a>(
        &'a self,
        key: RemoteKey<'a>,
        touch: Option<Duration>,
        lock_timeout: Duration,
        fallback_after: Option<Duration>,
    ) -> BoxFuture<'a, Result<(Fetched, SingleFlight), RemoteError>> {
        let _ = (lock_timeout, fallback_after);
        Box::pin(async move { Ok((self.get(key, touch).await?, SingleFlight::Free)) })
    }

    /// Takes the key's lock without reading (a refresh); `Ok(None)` if another
    /// instance holds it.
    fn try_lock<'a>(
        &'a self,
        key: &'a str,
        lock_timeout: Duration,
    ) -> BoxFuture<'a, Result<Option<LockId>, RemoteError>> {
        let _ = (key, lock_timeout);
        Box::pin(async { Err(RemoteError("no distributed single flight".into())) })
    }

    /// Releases a lock taken by [`RemoteStore::get_single_flight`] or
    /// [`RemoteStore::try_lock`], after the writes queued before (so that the
    /// instances waiting for it read the value). With `failed`, no value was written:
    /// they run the body themselves.
    fn unlock(&self, lock: LockId, failed: bool) {
        let _ = (lock, failed);
    }
}

/// A key's lock held by this instance (see [`RemoteStore::get_single_flight`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LockId(pub std::num::NonZeroU64);

/// What a read with distributed single flight says about running the body.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SingleFlight {
    /// No lock is needed (a fresh value, or the store did not look), or none was
    /// taken: the body runs if there is no value.
    Free,
    /// This call holds the key's lock: it runs the body, then releases it.
    Taken(LockId),
    /// Another instance held the lock until the wait's bound: the body runs here too.
    TimedOut,
    /// The holder's body failed: the body runs here.
    Failed,
    /// Another instance's body is slower than `fallback_after`: the fallback read
    /// answers, and the body does not run here.
    Slow,
}

/// What a removal that reached the store did.
#[derive(Debug, Default)]
pub struct Removed {
    /// With a graph and `want_keys`: the readable keys of the entries removed.
    pub keys: Vec<String>,
    /// Why the publication handed to the store failed, if one was and it did (the
    /// removal itself went through).
    pub publish_error: Option<RemoteError>,
}

/// What a read of the remote tier found.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Fetched {
    /// The bytes, if the entry is there.
    pub value: Option<Vec<u8>>,
    /// With a [`RemoteGraph`]: the store's invalidation count as of the read, which a
    /// later [`LinkedWrite`] of the same call carries as `remote_epoch`. Otherwise 0.
    pub epoch: u64,
}

impl From<Option<Vec<u8>>> for Fetched {
    fn from(value: Option<Vec<u8>>) -> Self {
        Fetched { value, epoch: 0 }
    }
}

/// A value to write with what it depends on, unless an invalidation reached the entry
/// or one of its links after `remote_epoch`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LinkedWrite {
    /// The entry's readable key.
    pub key: String,
    /// The encoded value.
    pub value: Vec<u8>,
    /// Its expiry.
    pub ttl: Duration,
    /// What it depends on: `d:{dependency}` and `e:{readable key}` (another entry).
    pub links: Vec<String>,
    /// Dependencies invalidated along with a dependency (`CacheDependency::cascade`):
    /// the dependency key, then the keys of its cascade.
    pub cascades: Vec<(String, Vec<String>)>,
    /// The invalidation count read before the value was computed ([`Fetched::epoch`];
    /// 0 when unknown: then any recent invalidation of the entry or a link drops it).
    pub remote_epoch: u64,
}

/// A dependency graph kept by the remote store, so that an invalidation on any
/// instance removes every dependent entry from the store.
pub trait RemoteGraph: Send + Sync {
    /// Queues a conditional write of a value with its links, replacing the links the
    /// entry had (never waits).
    fn set_linked(&self, write: LinkedWrite);

    /// Removes the entries among `start` (nodes `e:{key}`) and every entry that
    /// depends on a node of `start` (`e:{key}` or `d:{dependency}`), transitively,
    /// except `keep` (an entry just replaced); marks every node reached, so that a
    /// value computed across this call is not written. Ordered behind the writes
    /// queued before it. With `want_keys`, returns the readable keys of the entries
    /// removed (else none). `publish` is published once they are removed, as in
    /// [`RemoteStore::remove`], whose rules for `Err` apply here too.
    fn invalidate(
        &self,
        start: Vec<String>,
        keep: Option<String>,
        want_keys: bool,
        publish: Option<Vec<u8>>,
    ) -> BoxFuture<'_, Result<Removed, RemoteError>>;
}

/// What [`shutdown`](crate::shutdown) did.
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

/// First bytes of every encoded value: a marker and the encoding's version. A value
/// whose header differs (another format, corruption) does not decode.
const HEADER: [u8; 2] = [0xCA, 2];

/// The encoding's version, also part of the remote key space, so that a deploy that
/// changes the encoding never reads old bytes.
pub const FORMAT_VERSION: u8 = HEADER[1];

fn unix_millis() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// The wall-clock deadline `d` from now, in unix milliseconds.
pub(crate) fn deadline_after(d: Duration) -> u64 {
    unix_millis().saturating_add(u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// How long until the wall-clock `deadline`; `None` once it has passed.
pub(crate) fn until(deadline: u64) -> Option<Duration> {
    let left = deadline.checked_sub(unix_millis())?;
    (left > 0).then(|| Duration::from_millis(left))
}

/// Encodes a value: the header, the entry's deadline (unix milliseconds, little
/// endian; 0 when it moves with each read), what it depends on (a MessagePack array
/// of remote graph ids, so that an instance reading it links its callers to them as
/// the writer would), then the value in MessagePack.
pub(crate) fn encode<T: Serialize>(
    value: &T,
    deadline: u64,
    links: &[String],
) -> Result<Vec<u8>, String> {
    let mut out = HEADER.to_vec();
    out.extend_from_slice(&deadline.to_le_bytes());
    rmp_serde::encode::write(&mut out, links).map_err(|e| e.to_string())?;
    rmp_serde::encode::write(&mut out, value).map_err(|e| e.to_string())?;
    Ok(out)
}

/// A decoded remote value: the value, its deadline, what it depends on.
pub type Decoded<T> = (T, u64, Vec<String>);

/// Decodes bytes written by the remote tier (see `encode`).
pub fn decode<T: DeserializeOwned>(bytes: &[u8]) -> Result<Decoded<T>, String> {
    let body = bytes
        .strip_prefix(&HEADER)
        .ok_or_else(|| "unknown header".to_owned())?;
    let (deadline, mut body) = body
        .split_first_chunk::<8>()
        .ok_or_else(|| "truncated".to_owned())?;
    // most values depend on nothing: an empty array, one byte
    let links: Vec<String> = match body.split_first() {
        Some((0x90, rest)) => {
            body = rest;
            Vec::new()
        }
        _ => rmp_serde::decode::from_read(&mut body).map_err(|e| e.to_string())?,
    };
    let value = rmp_serde::from_slice(body).map_err(|e| e.to_string())?;
    Ok((value, u64::from_le_bytes(*deadline), links))
}

/// Logs a remote failure at `warn`, at most once a second (the others are counted).
#[derive(Default)]
pub(crate) struct RateLimitedWarn {
    last: AtomicU64,
}

impl RateLimitedWarn {
    pub(crate) fn warn(&self, what: fmt::Arguments<'_>) {
        let now = now_nanos();
        let last = self.last.load(Ordering::Relaxed);
        if (last == 0 || now.saturating_sub(last) >= 1_000_000_000)
            && self
                .last
                .compare_exchange(last, now.max(1), Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            tracing::warn!(target: "cache_runtime", "remote cache: {what} (the call goes on without it; later failures within a second are only counted)");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, PartialEq, serde::Serialize, serde::Deserialize)]
    struct Product {
        id: u64,
        name: String,
        tags: Vec<String>,
    }

    #[test]
    fn round_trip() {
        let p = Product {
            id: 7,
            name: "kettle".into(),
            tags: vec!["a".into()],
        };
        let links = vec!["d:order:7".to_owned(), "e:x:v1(1)".to_owned()];
        let bytes = encode(&p, 1234, &links).unwrap();
        assert_eq!(&bytes[..2], &HEADER);
        assert_eq!(decode::<Product>(&bytes).unwrap(), (p, 1234, links));
    }

    #[test]
    fn foreign_bytes_do_not_decode() {
        assert!(decode::<Product>(b"").is_err());
        assert!(decode::<Product>(b"{\"id\":7}").is_err(), "no header");
        let mut wrong_version = encode(&1u8, 0, &[]).unwrap();
        wrong_version[1] = 99;
        assert!(decode::<u8>(&wrong_version).is_err());
        let truncated = &encode(&"a long enough string".to_owned(), 0, &[]).unwrap()[..5];
        assert!(decode::<String>(truncated).is_err());
        let truncated = &encode(&"a long enough string".to_owned(), 0, &[]).unwrap()[..14];
        assert!(decode::<String>(truncated).is_err());
        // another shape of value
        assert!(decode::<Product>(&encode(&(1u8, 2u8), 0, &[]).unwrap()).is_err());
    }
}
