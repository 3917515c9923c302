//! Distributed single flight (`RedisBackendBuilder::distributed_single_flight`):
//! concurrent misses of one key on every instance run its body once.
//!
//! - The miss's read is a script ([`READ`]) that returns the value and, if the entry
//!   is missing or past its deadline, takes the key's lock (`SET NX PX`, for the
//!   profile's `lock_timeout`) in the same round trip. On a cluster the lock's key has
//!   the value's slot (see [`Locks::key_of`]).
//! - A read that finds the lock held appends `+` to it. The holder releases it after
//!   its value's write ([`UNLOCK`], queued behind the write on the writer's
//!   connection), and, if someone waited, publishes an unlock message on the
//!   prefix's channel, which the instances' subscribers route here ([`Locks::released`]).
//! - A waiter reads again when told, or every [`POLL_SUBSCRIBED`] (pub/sub is at most
//!   once; [`POLL_UNSUBSCRIBED`] while the subscriber is not subscribed), until the
//!   lock timeout. Told that the holder's body failed (nothing was written), it runs
//!   the body itself.
//! - A holder that dies leaves a lock that expires after `lock_timeout`;
//!   `shutdown()` releases those still held.

use std::collections::HashMap;
use std::num::NonZeroU64;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, LazyLock, Mutex, PoisonError};
use std::time::Duration;

use cache_runtime::LockId;
use tokio::sync::Notify;

use crate::endpoint::slot_of;
use crate::script::{Hashed, ScriptCall};

/// How often a waiter reads again while the subscriber is subscribed (a lost message).
/// (A message lost while the subscriber stays subscribed is rare: a lost connection
/// is noticed by the subscriber's `PING` within a second, and then waiters poll every
/// [`POLL_UNSUBSCRIBED`].)
pub(crate) const POLL_SUBSCRIBED: Duration = Duration::from_secs(1);
/// How often a waiter reads again while it is not.
pub(crate) const POLL_UNSUBSCRIBED: Duration = Duration::from_millis(25);

/// What an unlock message starts with (the rest: `d ` or `f `, then the key).
pub(crate) const UNLOCK_MAGIC: &[u8] = b"cache-rs.unlock ";

/// The miss's read (see the module's documentation).
pub(crate) static READ: LazyLock<Arc<Hashed>> = LazyLock::new(|| {
    let text = include_str!("lua/get_lock.lua")
        .replace("TOMBSTONE", &crate::graph::TOMBSTONE.to_string())
        .replace("HEADER", &VALUE_HEADER.to_string());
    Hashed::plain("the read with the key's lock", text)
});

/// The holder's release.
pub(crate) static UNLOCK: LazyLock<Arc<Hashed>> = LazyLock::new(|| {
    Hashed::plain(
        "the release of a key's lock",
        include_str!("lua/unlock.lua").to_owned(),
    )
});

/// Whether `script` is one of these.
pub(crate) fn owns(script: &Arc<Hashed>) -> bool {
    Arc::ptr_eq(script, &READ) || Arc::ptr_eq(script, &UNLOCK)
}

/// The length of the header before a value's deadline (see `cache_runtime::remote`).
const VALUE_HEADER: usize = 2;

/// This instance's locks and waits.
pub(crate) struct Locks {
    /// `{key_prefix}:lock:`
    prefix: String,
    /// The values' prefix, `{key_prefix}:{format}:`.
    values: String,
    channel: String,
    /// The first half of each token: this instance.
    instance: u64,
    next: AtomicU64,
    /// The locks held, by id.
    held: Mutex<HashMap<u64, Held>>,
    /// The keys whose release calls here wait for, by readable key.
    watches: Mutex<HashMap<String, Arc<Watch>>>,
    subscribed: AtomicBool,
}

/// A lock held: its key, its token, the readable key of its value.
struct Held {
    lock_key: String,
    token: String,
    key: String,
}

/// A key's releases, as heard.
#[derive(Default)]
pub(crate) struct Watch {
    seq: AtomicU64,
    failed: AtomicBool,
    notify: Notify,
}

/// Why a wait ended.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Woken {
    /// The lock was released after the holder's value was written.
    Released,
    /// The holder's body failed.
    Failed,
    /// Time to read again.
    Poll,
}

impl Locks {
    pub(crate) fn new(key_prefix: &str, values: &str, channel: &str) -> Locks {
        Locks {
            prefix: format!("{key_prefix}:lock:"),
            values: values.to_owned(),
            channel: channel.to_owned(),
            instance: cache_runtime::new_instance_id(),
            next: AtomicU64::new(1),
            held: Mutex::default(),
            watches: Mutex::default(),
            subscribed: AtomicBool::new(false),
        }
    }

    /// The lock key of the value under `key` (its readable key). It contains
    /// `:lock:`, and on a cluster it has the value's slot, so that the read's script
    /// touches one slot.
    pub(crate) fn key_of(&self, key: &str, cluster: bool) -> String {
        let plain = format!("{}{key}", self.prefix);
        if !cluster {
            return plain;
        }
        let value = format!("{}{key}", self.values);
        let slot = slot_of(value.as_bytes());
        // the value's key has a hash tag the prefix does not change
        if slot_of(plain.as_bytes()) == slot {
            return plain;
        }
        // the whole value key as the tag (it has no `}`)
        let whole = format!("{}{{{value}}}", self.prefix);
        if slot_of(whole.as_bytes()) == slot {
            return whole;
        }
        // a short tag of the same slot
        let tag = tag_of_slot(slot);
        let tagged = format!("{}{{{tag}}}{key}", self.prefix);
        if slot_of(tagged.as_bytes()) == slot {
            return tagged;
        }
        // (a key prefix with `{` in it)
        format!("{{{tag}}}:{}{key}", self.prefix)
    }

    /// A new token: this instance, then a count (fixed length, so no token is the
    /// start of another).
    pub(crate) fn token(&self) -> String {
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        format!("{:016x}{n:016x}", self.instance)
    }

    /// Records a lock taken on `key` (its readable key); its id for the release.
    pub(crate) fn hold(&self, lock_key: String, token: String, key: &str) -> LockId {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let held = Held {
            lock_key,
            token,
            key: key.to_owned(),
        };
        self.held
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(id, held);
        LockId(NonZeroU64::new(id).expect("ids start at 1"))
    }

    /// The release of a lock held (`None` if it was released already: at shutdown).
    pub(crate) fn release(&self, id: LockId, failed: bool) -> Option<ScriptCall> {
        let held = self
            .held
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&id.0.get())?;
        Some(self.unlock_call(held, failed))
    }

    /// The releases of every lock still held (at shutdown).
    pub(crate) fn release_all(&self) -> Vec<ScriptCall> {
        let held: Vec<_> = self
            .held
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .drain()
            .collect();
        held.into_iter()
            .map(|(_, held)| self.unlock_call(held, true))
            .collect()
    }

    /// The release of a lock a read or a `SET NX` whose reply never came may have
    /// taken (the server may run it after the client gave up: a `CLIENT PAUSE`, a
    /// slow server), so that it does not hold the key back for its lock timeout.
    pub(crate) fn release_unknown(&self, lock_key: String, token: String, key: &str) -> ScriptCall {
        let held = Held {
            lock_key,
            token,
            key: key.to_owned(),
        };
        self.unlock_call(held, true)
    }

    fn unlock_call(&self, held: Held, failed: bool) -> ScriptCall {
        let mut message = UNLOCK_MAGIC.to_vec();
        message.extend_from_slice(if failed { b"f " } else { b"d " });
        message.extend_from_slice(held.key.as_bytes());
        let mut call = ScriptCall {
            script: UNLOCK.clone(),
            args: redis::Cmd::new(),
        };
        call.arg(1)
            .arg(held.lock_key)
            .arg(held.token)
            .arg(&self.channel)
            .arg(message);
        call
    }

    /// Starts watching `key`'s releases (before the read that may find it held, so
    /// that no release is missed in between).
    pub(crate) fn watch(self: &Arc<Self>, key: &str) -> Watching {
        let watch = self
            .watches
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .entry(key.to_owned())
            .or_default()
            .clone();
        let seen = watch.seq.load(Ordering::Acquire);
        Watching {
            locks: self.clone(),
            key: key.to_owned(),
            watch,
            seen,
        }
    }

    /// An unlock message (after [`UNLOCK_MAGIC`]): wakes the calls waiting for it.
    pub(crate) fn released(&self, message: &[u8]) {
        let (failed, key) = match message {
            [b'f', b' ', key @ ..] => (true, key),
            [b'd', b' ', key @ ..] => (false, key),
            _ => return,
        };
        let Ok(key) = std::str::from_utf8(key) else {
            return;
        };
        let watches = self.watches.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(watch) = watches.get(key) {
            watch.failed.store(failed, Ordering::Release);
            watch.seq.fetch_add(1, Ordering::AcqRel);
            watch.notify.notify_waiters();
        }
    }

    /// The subscriber's state: while it is not subscribed, waiters poll more often.
    pub(crate) fn set_subscribed(&self, subscribed: bool) {
        self.subscribed.store(subscribed, Ordering::Relaxed);
    }

    fn poll_every(&self) -> Duration {
        match self.subscribed.load(Ordering::Relaxed) {
            true => POLL_SUBSCRIBED,
            false => POLL_UNSUBSCRIBED,
        }
    }
}

/// A call waiting for a key's release.
pub(crate) struct Watching {
    locks: Arc<Locks>,
    key: String,
    watch: Arc<Watch>,
    seen: u64,
}

impl Watching {
    /// Waits for a release heard since the last one seen, at most `max` and the poll
    /// interval.
    pub(crate) async fn wait(&mut self, max: Duration) -> Woken {
        let notified = self.watch.notify.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();
        if self.watch.seq.load(Ordering::Acquire) == self.seen {
            let _ = tokio::time::timeout(max.min(self.locks.poll_every()), notified).await;
        }
        let seq = self.watch.seq.load(Ordering::Acquire);
        if seq == self.seen {
            return Woken::Poll;
        }
        self.seen = seq;
        match self.watch.failed.load(Ordering::Acquire) {
            true => Woken::Failed,
            false => Woken::Released,
        }
    }
}

impl Drop for Watching {
    fn drop(&mut self) {
        let mut watches = self
            .locks
            .watches
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        // the map's and this one's: no other call watches the key
        if Arc::strong_count(&self.watch) == 2 {
            watches.remove(&self.key);
        }
    }
}

/// A short hash tag whose slot is `slot` (found once for every slot).
fn tag_of_slot(slot: u16) -> &'static str {
    static TAGS: LazyLock<Vec<String>> = LazyLock::new(|| {
        let mut tags = vec![String::new(); 16_384];
        let mut left = tags.len();
        let mut n = 0u64;
        while left > 0 {
            let tag = format!("{n:x}");
            let t = &mut tags[usize::from(slot_of(tag.as_bytes()))];
            if t.is_empty() {
                *t = tag;
                left -= 1;
            }
            n += 1;
        }
        tags
    });
    &TAGS[usize::from(slot)]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lock_keys_have_their_values_slot() {
        let locks = Locks::new("shop", "shop:2:", "shop:invalidations");
        for key in [
            "m::f(1)",
            "m::f(\"a}b\")",
            "m::f(P{x:1})",
            "m::f({})",
            "m::f({}, \"}\")",
            "m::f(\"{\")",
        ] {
            let value = format!("shop:2:{key}");
            let lock = locks.key_of(key, true);
            assert!(lock.contains(":lock:"), "{lock}");
            assert_eq!(
                slot_of(lock.as_bytes()),
                slot_of(value.as_bytes()),
                "{lock}"
            );
            // the unlock message names the readable key
            let held = Held {
                lock_key: lock,
                token: "t".into(),
                key: key.into(),
            };
            let call = locks.unlock_call(held, false);
            let message = call.args.args_iter().last().unwrap();
            let redis::Arg::Simple(m) = message else {
                panic!()
            };
            assert_eq!(&m[UNLOCK_MAGIC.len() + 2..], key.as_bytes(), "{key}");
        }
        assert_eq!(locks.key_of("m::f(1)", false), "shop:lock:m::f(1)");
        let braced = Locks::new("s{a}", "s{a}:2:", "c");
        let lock = braced.key_of("m::f(1)", true);
        assert_eq!(slot_of(lock.as_bytes()), slot_of(b"s{a}:2:m::f(1)"));
    }

    #[test]
    fn every_slot_has_a_tag() {
        for slot in [0, 1, 8_000, 16_383] {
            assert_eq!(slot_of(tag_of_slot(slot).as_bytes()), slot);
        }
    }
}
