//! A miss in the remote tier: the entry read (with the remote graph's invalidation
//! count), held back while an invalidation of this instance has not reached the tier,
//! decoded; the computed value encoded and queued for writing, with its links.

use std::num::NonZeroU64;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::OnceLock;
use std::time::Duration;

use crate::deps::Frame;
use crate::inner::Inner;
use crate::key::Key;
use crate::profile::Expiration;
use crate::registry::FnState;
use crate::remote::{deadline_after, Decoded, LockId, RemoteKey, SingleFlight};
use crate::stats::Counter;
use crate::value::ValueOps;

/// A remote invalidation count not read (yet).
const UNKNOWN: u64 = u64::MAX;

/// The entry a miss is for, and what the miss learned of it in the remote tier.
///
/// Its readable key is rendered once, when first needed (the remote read, the write,
/// the bus's index of the in-process tier, the log), and passed along.
pub(crate) struct MissEntry<'a, T: 'static> {
    pub(crate) inner: &'a Inner,
    pub(crate) state: &'a FnState,
    pub(crate) key: &'a Key,
    pub(crate) ops: &'static ValueOps<T>,
    pub(crate) expiration: Expiration,
    /// With fail-safe, how long the remote entry is kept past its deadline.
    pub(crate) fail_safe: Option<std::time::Duration>,
    text: OnceLock<String>,
    /// The remote store's invalidation count, read with the entry (see
    /// [`crate::Fetched::epoch`]); [`UNKNOWN`] until a read succeeds.
    remote_epoch: AtomicU64,
    /// With distributed single flight: how long another instance's lock is waited
    /// for, and how long before a fallback answers instead (the soft timeout).
    pub(crate) lock_timeout: Duration,
    pub(crate) fallback_after: Option<Duration>,
    /// The key's remote lock, if this call holds it (0: none); released when the
    /// entry is dropped, after its write.
    lock: AtomicU64,
    /// Whether the value was queued for the remote tier (else the lock's release
    /// tells the waiting instances to run the body themselves).
    written: AtomicBool,
    /// The read found another instance's body slower than `fallback_after`.
    slow_holder: AtomicBool,
}

impl<'a, T: 'static> MissEntry<'a, T> {
    pub(crate) fn new(
        inner: &'a Inner,
        state: &'a FnState,
        key: &'a Key,
        ops: &'static ValueOps<T>,
        expiration: Expiration,
    ) -> Self {
        MissEntry {
            inner,
            state,
            key,
            ops,
            expiration,
            fail_safe: None,
            text: OnceLock::new(),
            remote_epoch: AtomicU64::new(UNKNOWN),
            lock_timeout: Duration::ZERO,
            fallback_after: None,
            lock: AtomicU64::new(0),
            written: AtomicBool::new(false),
            slow_holder: AtomicBool::new(false),
        }
    }

    /// Takes the remote lock this call holds, to hand it to the call that goes on in
    /// the background (see [`MissEntry::hold`]).
    pub(crate) fn take_lock(&self) -> u64 {
        self.lock.swap(0, Ordering::Relaxed)
    }

    /// Holds the remote lock `lock` (from [`MissEntry::take_lock`]), released when
    /// this entry is dropped.
    pub(crate) fn hold(&self, lock: u64) {
        self.lock.store(lock, Ordering::Relaxed);
    }

    /// Whether the read found another instance's body slower than the soft timeout:
    /// the fallback answers, and the body does not run here.
    pub(crate) fn holder_slow(&self) -> bool {
        self.slow_holder.load(Ordering::Relaxed)
    }

    /// For a refresh with distributed single flight: takes the key's remote lock;
    /// `false` if another instance holds it (it refreshes the entry). A store that
    /// fails does not stop the refresh.
    pub(crate) async fn lock_for_refresh(&self) -> bool {
        let Some(remote) = self.inner.remote.as_ref().filter(|r| r.single_flight()) else {
            return true;
        };
        match remote.try_lock(self.text(), self.lock_timeout).await {
            Ok(Some(id)) => {
                self.hold(id.0.get());
                true
            }
            Ok(None) => false,
            Err(_) => true,
        }
    }

    /// The readable key, rendered on first use.
    pub(crate) fn text(&self) -> &str {
        self.text
            .get_or_init(|| self.key.to_text(self.inner.max_key_length))
    }

    /// The remote invalidation count read with the entry; 0 (as old as can be) when
    /// none was read, or the read failed.
    pub(crate) fn remote_epoch(&self) -> u64 {
        match self.remote_epoch.load(Ordering::Relaxed) {
            UNKNOWN => 0,
            e => e,
        }
    }

    /// The remote invalidation count as read (unknown included), to carry to the
    /// end of a body that finishes in the background.
    pub(crate) fn remote_epoch_read(&self) -> u64 {
        self.remote_epoch.load(Ordering::Relaxed)
    }

    /// Sets the remote invalidation count read by the miss this one continues.
    pub(crate) fn set_remote_epoch(&self, epoch: u64) {
        self.remote_epoch.store(epoch, Ordering::Relaxed);
    }

    /// The remote invalidation count as of which a value computed from what `frame`
    /// read is current: the count read with the entry, or older if an entry the body
    /// read was older (an in-process copy another instance's invalidation has not
    /// reached yet must not make a value that passes for newer).
    pub(crate) fn value_epoch(&self, frame: &Frame) -> u64 {
        let fetched = self.remote_epoch();
        frame.remote_epoch.map_or(fetched, |a| a.min(fetched))
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

    /// Reads the remote graph's invalidation count (with the entry, which is ignored).
    pub(crate) async fn read_epoch(&self) {
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
    pub(crate) async fn read(&self) -> Option<Decoded<T>> {
        let (Some(remote), Some(decode)) = (&self.inner.remote, self.ops.decode) else {
            return None;
        };
        let touch = match self.expiration {
            Expiration::Sliding(d) => Some(d),
            _ => None,
        };
        let c = &self.state.counters;
        // the key is rendered on the stack for the read: a hit builds no string
        let key = RemoteKey::new(self.key, self.inner.max_key_length);
        let mark = self.inner.held.mark();
        let fetched = match remote.single_flight() {
            false => remote.get(key, touch).await,
            true => self.read_single_flight(key, touch).await,
        };
        let fetched = fetched.map(|f| {
            self.remote_epoch.store(f.epoch, Ordering::Relaxed);
            f.value
        });
        match fetched {
            Ok(Some(bytes)) => match decode(&bytes) {
                Ok(value)
                    if !self.inner.held.quiet(mark)
                        && self.inner.held.covers(mark, self.text(), &value.2) =>
                {
                    // an invalidation of this instance that covers it has not reached
                    // the remote tier: it may be the old value
                    let r = &self.inner.remote_stats;
                    r.bump(&r.reads_held);
                    tracing::debug!(target: "cache_runtime", function = %self.state.name, key = %self.text(), "remote value held back: its invalidation has not reached the remote tier");
                    None
                }
                Ok(value) => {
                    // (the value and its deadline; counted as a hit if it is fresh)
                    tracing::debug!(target: "cache_runtime", function = %self.state.name, key = %self.text(), "remote hit");
                    Some(value)
                }
                Err(e) => {
                    c.bump(Counter::DecodeError);
                    tracing::debug!(target: "cache_runtime", function = %self.state.name, key = %self.text(), error = %e, "remote value does not decode: a miss, to be overwritten");
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

    /// [`MissEntry::read`] with distributed single flight: the read takes the key's
    /// lock if the entry is missing or past its deadline, or waits for the instance
    /// that holds it.
    #[inline(never)]
    async fn read_single_flight(
        &self,
        key: RemoteKey<'_>,
        touch: Option<Duration>,
    ) -> Result<crate::remote::Fetched, crate::remote::RemoteError> {
        let remote = self.inner.remote.as_ref().expect("a remote tier");
        let (fetched, flight) = remote
            .get_single_flight(key, touch, self.lock_timeout, self.fallback_after)
            .await?;
        match flight {
            SingleFlight::Taken(id) => self.hold(id.0.get()),
            SingleFlight::Slow => self.slow_holder.store(true, Ordering::Relaxed),
            SingleFlight::TimedOut => {
                tracing::debug!(target: "cache_runtime", function = %self.state.name, key = %self.text(), "another instance held the key's lock until the lock timeout: running the body here too");
            }
            SingleFlight::Failed | SingleFlight::Free => {}
        }
        Ok(fetched)
    }

    /// Queues the value's write to the remote tier (never waited for). The value
    /// carries its deadline, so that an instance filling its in-process tier from the
    /// remote one expires it when the remote entry expires. With fail-safe, the
    /// entry itself lives `fail_safe` longer, as a fallback past that deadline.
    ///
    /// A value with dependencies goes through the store's graph, with its links; a
    /// store without one does not get it (it could not remove it when a dependency
    /// is invalidated on another instance).
    pub(crate) fn write(&self, value: &T, frame: &Frame, remote_epoch: u64) {
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
            tracing::debug!(target: "cache_runtime", function = %self.state.name, key = %self.text(), "no invalidation count read: not written to the remote graph");
            return;
        }
        let (ttl, deadline) = match self.expiration {
            // a sliding entry's deadline moves with each read
            Expiration::Sliding(d) => (d, 0),
            Expiration::Absolute(d) => (d, deadline_after(d)),
            Expiration::Never => {
                let d = remote.default_ttl();
                (d, deadline_after(d))
            }
        };
        // with fail-safe, the entry outlives its deadline as a fallback
        let ttl = ttl.saturating_add(self.fail_safe.unwrap_or_default());
        let (links, cascades) = self.links(frame);
        match encode(value, deadline, &links) {
            Ok(bytes) if bytes.len() > remote.max_value_size() => {
                c.bump(Counter::Oversized);
                tracing::debug!(target: "cache_runtime", function = %self.state.name, key = %self.text(), size = bytes.len(), "value over the remote size limit: not stored remotely");
            }
            Ok(bytes) => {
                let key = self.text().to_owned();
                self.written.store(true, Ordering::Relaxed);
                match graph {
                    Some(graph) => {
                        graph.set_linked(crate::remote::LinkedWrite {
                            key,
                            value: bytes,
                            ttl,
                            links,
                            cascades,
                            remote_epoch,
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
}

impl<T: 'static> Drop for MissEntry<'_, T> {
    /// Releases the key's remote lock if this call holds it, after its write: the
    /// instances waiting for it then read the value, or, if none was written, run
    /// the body themselves.
    fn drop(&mut self) {
        let Some(lock) = NonZeroU64::new(*self.lock.get_mut()) else {
            return;
        };
        if let Some(remote) = &self.inner.remote {
            remote.unlock(LockId(lock), !*self.written.get_mut());
        }
    }
}
