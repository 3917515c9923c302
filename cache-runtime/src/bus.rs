//! The invalidation bus: how instances of a service tell each other what they
//! invalidated, so that each drops its in-process copies.
//!
//! A bus moves opaque payloads between the instances that share it (Redis pub/sub in
//! `cache-redis`, [`MemoryBus`] inside one process for tests). The service encodes a
//! [`Message`] (who sent it, and what was removed) after every invalidation that
//! reached the shared tiers, and publishes it; every other instance decodes it, maps
//! each readable key back to its own in-process key, and applies it locally only:
//! never published again, never sent to a remote store again. An instance ignores its
//! own messages.
//!
//! Delivery is at most once. A bus that may have lost messages (its subscription
//! dropped) calls [`BusReceiver::missed`], and the service clears its in-process tier.

use std::fmt;
use std::hash::BuildHasher;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};

use crate::lock::lock;
use crate::remote::{BoxFuture, RemoteError};
use crate::stats::SyncStats;

/// A channel between the instances of a service: carries invalidation messages.
///
/// Implementations deliver every payload published by one instance to every other
/// instance attached to the same channel (and may deliver it back to the sender too,
/// which ignores it). An in-process tier is served only while its bus receives: a bus
/// that is not receiving yet when a receiver is attached calls
/// [`BusReceiver::waiting`]; one that may have lost messages (a lost subscription)
/// calls [`BusReceiver::missed`] as soon as the loss is noticed; and either calls
/// [`BusReceiver::receiving`] once it receives again.
pub trait InvalidationBus: Send + Sync + 'static {
    /// Delivers received payloads to `receiver` from now on. Called once, when the
    /// service is built.
    fn attach(&self, receiver: BusReceiver);

    /// Sends `payload` to the other instances. Awaited by the invalidating call, and
    /// bounded by the bus's own timeout.
    fn publish(&self, payload: Vec<u8>) -> BoxFuture<'_, Result<(), RemoteError>>;
}

/// What an invalidation message names.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Item {
    /// An entry was removed, by its readable key.
    Removed(String),
    /// An entry was replaced by a new value (`refresh!`), by its readable key.
    Replaced(String),
    /// A dependency was invalidated: every entry depending on it goes.
    Dependency(String),
    /// Every entry was removed.
    Clear,
}

/// One invalidation, as it travels between instances.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Message {
    /// The instance that sent it (see [`CachingService::instance_id`](crate::CachingService::instance_id)).
    pub sender: u64,
    /// What it invalidated.
    pub items: Vec<Item>,
}

/// First line of every payload: the format and its version.
const MAGIC: &str = "cache-rs/1";

impl Message {
    /// The payload: a first line `cache-rs/1 <sender in hex>`, then one line per item,
    /// `r <key>`, `u <key>`, `d <dependency>` or `c`, with `\` and line breaks in keys
    /// escaped as `\\`, `\n` and `\r`. Readable with `redis-cli SUBSCRIBE`.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = format!("{MAGIC} {:016x}\n", self.sender);
        for item in &self.items {
            let (kind, key) = match item {
                Item::Removed(k) => ('r', k.as_str()),
                Item::Replaced(k) => ('u', k.as_str()),
                Item::Dependency(k) => ('d', k.as_str()),
                Item::Clear => ('c', ""),
            };
            out.push(kind);
            if !key.is_empty() || kind != 'c' {
                out.push(' ');
                for c in key.chars() {
                    match c {
                        '\\' => out.push_str("\\\\"),
                        '\n' => out.push_str("\\n"),
                        '\r' => out.push_str("\\r"),
                        c => out.push(c),
                    }
                }
            }
            out.push('\n');
        }
        out.into_bytes()
    }

    /// Reads a payload written by [`Message::encode`].
    pub fn decode(payload: &[u8]) -> Result<Message, String> {
        let text = std::str::from_utf8(payload).map_err(|_| "not UTF-8".to_owned())?;
        let mut lines = text.split('\n');
        let sender = lines
            .next()
            .and_then(|l| l.strip_prefix(MAGIC))
            .and_then(|l| l.strip_prefix(' '))
            .and_then(|s| u64::from_str_radix(s, 16).ok())
            .ok_or_else(|| format!("no `{MAGIC} <sender>` header"))?;
        let mut items = Vec::new();
        for line in lines.filter(|l| !l.is_empty()) {
            if line == "c" {
                items.push(Item::Clear);
                continue;
            }
            let (kind, key) = line
                .split_at_checked(2)
                .filter(|(k, _)| k.ends_with(' '))
                .ok_or_else(|| format!("bad item `{line}`"))?;
            let key = unescape(key).ok_or_else(|| format!("bad escape in `{line}`"))?;
            items.push(match kind {
                "r " => Item::Removed(key),
                "u " => Item::Replaced(key),
                "d " => Item::Dependency(key),
                _ => return Err(format!("unknown item kind in `{line}`")),
            });
        }
        Ok(Message { sender, items })
    }
}

fn unescape(s: &str) -> Option<String> {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c != '\\' {
            out.push(c);
            continue;
        }
        out.push(match chars.next()? {
            '\\' => '\\',
            'n' => '\n',
            'r' => '\r',
            _ => return None,
        });
    }
    Some(out)
}

/// A fresh random id, for an instance or anything else that must not collide with
/// another process's (its messages' sender, its reservations in a shared store).
pub fn new_instance_id() -> u64 {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    std::collections::hash_map::RandomState::new().hash_one((n, nanos, std::process::id()))
}

/// What a service does with what its bus hands it (the service implements it; the
/// bus knows nothing more of the service).
pub(crate) trait Receive: Send + Sync {
    /// Another instance's message (or its own, which it ignores).
    fn message(&self, message: Message);
    /// A payload that does not decode.
    fn undecodable(&self, error: &str);
    /// Messages may have been lost: clear the in-process tier, bypass it.
    fn missed(&self);
    /// Not receiving yet: bypass the in-process tier.
    fn waiting(&self);
    /// Receiving (again): serve the in-process tier (after a loss, clear it first).
    fn receiving(&self);
    /// The store may have served values that were invalidated: clear the in-process
    /// tier.
    fn stale(&self);
}

/// A service's end of a bus: hands it received payloads and loss signals.
#[derive(Clone)]
pub struct BusReceiver {
    inner: Weak<dyn Receive>,
}

impl fmt::Debug for BusReceiver {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BusReceiver")
            .field("alive", &self.is_alive())
            .finish()
    }
}

impl BusReceiver {
    pub(crate) fn new(inner: Weak<dyn Receive>) -> Self {
        BusReceiver { inner }
    }

    /// Runs `f` on the service; `false` once it is gone.
    fn with(&self, f: impl FnOnce(&dyn Receive)) -> bool {
        let Some(inner) = self.inner.upgrade() else {
            return false;
        };
        f(&*inner);
        true
    }

    /// Applies a received payload: a message of another instance is applied to this
    /// instance's in-process tier; its own messages and payloads that do not decode
    /// are ignored (the latter counted and logged). Returns `false` once the service
    /// is gone, when the bus can stop delivering to it.
    pub fn deliver(&self, payload: &[u8]) -> bool {
        self.with(|inner| match Message::decode(payload) {
            Ok(message) => inner.message(message),
            Err(e) => inner.undecodable(&e),
        })
    }

    /// Says that messages may have been lost (the subscription dropped): the service
    /// clears its in-process tier (counted in [`SyncStats::l1_clears`]) and bypasses
    /// it, storing nothing there, until [`BusReceiver::receiving`]. Returns `false`
    /// once the service is gone.
    pub fn missed(&self) -> bool {
        self.with(|inner| inner.missed())
    }

    /// Says that the bus is not receiving yet (it is still subscribing): the service
    /// bypasses its in-process tier until [`BusReceiver::receiving`]. Nothing was
    /// missed, so nothing is cleared or counted. Returns `false` once the service is
    /// gone.
    pub fn waiting(&self) -> bool {
        self.with(|inner| inner.waiting())
    }

    /// Says that the bus receives (again): the tier is served again; after a loss,
    /// it is cleared once more first (messages published until the subscription was
    /// back were missed; counted in [`SyncStats::l1_clears`]). Returns `false` once
    /// the service is gone.
    pub fn receiving(&self) -> bool {
        self.with(|inner| inner.receiving())
    }

    /// Says that the remote store may have served values that were invalidated (a
    /// Redis Cluster failover promoted a replica that had not seen some removals): the
    /// service clears its in-process tier (counted in [`SyncStats::l1_clears`]);
    /// nothing is bypassed. Returns `false` once the service is gone.
    pub fn stale(&self) -> bool {
        self.with(|inner| inner.stale())
    }

    /// Whether the service still exists.
    pub fn is_alive(&self) -> bool {
        self.inner.strong_count() > 0
    }
}

#[derive(Default)]
pub(crate) struct SyncCounters {
    pub(crate) published: AtomicU64,
    pub(crate) publish_errors: AtomicU64,
    pub(crate) republished: AtomicU64,
    pub(crate) republish_dropped: AtomicU64,
    pub(crate) received: AtomicU64,
    pub(crate) undecodable: AtomicU64,
    pub(crate) l1_clears: AtomicU64,
}

impl SyncCounters {
    pub(crate) fn bump(&self, c: &AtomicU64) {
        c.fetch_add(1, Ordering::Relaxed);
    }

    /// Counts a message this instance published.
    pub(crate) fn published(&self) {
        self.bump(&self.published);
        crate::exported::sync_message("published");
    }

    /// Counts a message of another instance, received and applied.
    pub(crate) fn received(&self) {
        self.bump(&self.received);
        crate::exported::sync_message("received");
    }

    pub(crate) fn snapshot(&self) -> SyncStats {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        SyncStats {
            published: get(&self.published),
            publish_errors: get(&self.publish_errors),
            republished: get(&self.republished),
            republish_dropped: get(&self.republish_dropped),
            received: get(&self.received),
            undecodable: get(&self.undecodable),
            l1_clears: get(&self.l1_clears),
            l1_bypassed: false,
        }
    }
}

/// A bus inside one process: every service attached to clones of one `MemoryBus`
/// receives the others' messages, synchronously. For tests of code that runs several
/// instances in one process, and of the sync logic without a server.
///
/// ```
/// use cache_runtime::{CachingService, MemoryBackend, MemoryBus};
///
/// let bus = MemoryBus::new();
/// let a = CachingService::builder().backend(MemoryBackend::new()).sync(bus.clone()).build().unwrap();
/// let b = CachingService::builder().backend(MemoryBackend::new()).sync(bus).build().unwrap();
/// assert_ne!(a.instance_id(), b.instance_id());
/// ```
#[derive(Clone, Default)]
pub struct MemoryBus {
    receivers: Arc<Mutex<Vec<BusReceiver>>>,
}

impl fmt::Debug for MemoryBus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MemoryBus")
            .field("attached", &lock(&self.receivers).len())
            .finish()
    }
}

impl MemoryBus {
    /// A new, empty bus.
    pub fn new() -> Self {
        Self::default()
    }

    /// Tells every attached service that messages may have been lost, as a bus does
    /// after a lost subscription: their in-process tiers are cleared and bypassed
    /// until [`MemoryBus::signal_receiving`].
    pub fn signal_loss(&self) {
        for r in self.receivers() {
            r.missed();
        }
    }

    /// Tells every attached service that the bus receives again, as a bus does once
    /// resubscribed.
    pub fn signal_receiving(&self) {
        for r in self.receivers() {
            r.receiving();
        }
    }

    fn receivers(&self) -> Vec<BusReceiver> {
        let mut receivers = lock(&self.receivers);
        receivers.retain(BusReceiver::is_alive);
        receivers.clone()
    }
}

impl InvalidationBus for MemoryBus {
    fn attach(&self, receiver: BusReceiver) {
        lock(&self.receivers).push(receiver);
    }

    fn publish(&self, payload: Vec<u8>) -> BoxFuture<'_, Result<(), RemoteError>> {
        for r in self.receivers() {
            r.deliver(&payload);
        }
        Box::pin(async { Ok(()) })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_round_trip() {
        let m = Message {
            sender: 0xdead_beef,
            items: vec![
                Item::Removed("shop::get:v1(42)".into()),
                Item::Replaced("a \\ b\nc\rd".into()),
                Item::Dependency("order:7".into()),
                Item::Dependency(String::new()),
                Item::Clear,
            ],
        };
        let bytes = m.encode();
        assert!(bytes.starts_with(b"cache-rs/1 00000000deadbeef\nr shop::get:v1(42)\n"));
        assert_eq!(Message::decode(&bytes).unwrap(), m);
    }

    #[test]
    fn foreign_payloads_do_not_decode() {
        for bad in [
            &b""[..],
            b"hello",
            b"cache-rs/1 xyz\n",
            b"cache-rs/1 12\nq key\n",
            b"cache-rs/1 12\nr bad\\escape\n",
            b"\xff\xfe",
        ] {
            assert!(Message::decode(bad).is_err(), "{bad:?}");
        }
    }
}
