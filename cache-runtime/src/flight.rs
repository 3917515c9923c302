//! Single flight: one execution per key at a time, in this process.
//!
//! The first caller of a missing key becomes the leader; later callers of the same key
//! wait for the leader's outcome instead of running the body. The leader publishes the
//! stored slot on success. If it returns an error, panics or is dropped (cancelled),
//! its guard marks the flight abandoned on drop and the waiters try again: one of them
//! becomes the new leader, so a failure never poisons the key. Waiting is bounded by
//! the caller's lock timeout, after which the waiter runs the body itself.
//!
//! Flights are removed from the table before their outcome is published, so a caller
//! that arrives after the outcome finds the value in the cache (stored before
//! `complete`) or starts a new flight; it never joins a finished one. What waiters
//! wait on is allocated by the first of them: a flight nobody joins costs a table
//! insert and remove.

use hashbrown::HashTable;
use std::pin::pin;
use std::sync::{Arc, Condvar, Mutex, PoisonError};

use crate::lock::lock;
use std::time::Duration;

use tokio::sync::Notify;

use std::any::Any;

use crate::deps::Node;
use crate::keybuf::key_hash;

/// What a flight's leader hands its waiters: the value, and what it depends on (so a
/// waiter running inside another cached function links to it as the leader would).
pub(crate) struct Handoff {
    pub(crate) value: Box<dyn Any + Send + Sync>,
    pub(crate) deps: Option<Arc<[Node]>>,
    /// The remote invalidation count as of which the value is current.
    pub(crate) remote_epoch: u64,
    /// A fail-safe fallback (an expired value), not a fresh one.
    pub(crate) fallback: bool,
}

#[derive(Clone)]
pub(crate) enum Outcome {
    Done(Arc<Handoff>),
    Abandoned,
}

pub(crate) enum Waited {
    Done(Arc<Handoff>),
    Abandoned,
    TimedOut,
}

pub(crate) struct Flight {
    state: Mutex<Option<Outcome>>,
    cond: Condvar,
    notify: Notify,
}

impl Flight {
    /// Waits for the leader's outcome, at most `timeout`.
    pub(crate) async fn wait(&self, timeout: Duration) -> Waited {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let mut notified = pin!(self.notify.notified());
            notified.as_mut().enable();
            if let Some(outcome) = lock(&self.state).clone() {
                return outcome.into();
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return Waited::TimedOut;
            }
        }
    }

    /// Blocking form of [`Flight::wait`], for plain (non-async) cached functions.
    pub(crate) fn wait_blocking(&self, timeout: Duration) -> Waited {
        let guard = lock(&self.state);
        let (guard, _) = self
            .cond
            .wait_timeout_while(guard, timeout, |s| s.is_none())
            .unwrap_or_else(PoisonError::into_inner);
        match guard.clone() {
            Some(outcome) => outcome.into(),
            None => Waited::TimedOut,
        }
    }
}

impl From<Outcome> for Waited {
    fn from(o: Outcome) -> Self {
        match o {
            Outcome::Done(slot) => Waited::Done(slot),
            Outcome::Abandoned => Waited::Abandoned,
        }
    }
}

/// Shards of the flight table, so concurrent misses of different keys rarely meet.
const SHARDS: usize = 16;

/// A running flight. Its [`Flight`] exists only once a second caller waits: a miss
/// nobody waits for allocates nothing but the entry.
struct Entry {
    hash: u64,
    /// Shared with the leader, which finds its own entry by this pointer.
    key: Arc<[u8]>,
    flight: Option<Arc<Flight>>,
}

/// Keys are filed by [`key_hash`], the hash the in-process tier files them by: the
/// lookup computed it, and a miss hands it on.
#[derive(Default)]
pub(crate) struct Flights {
    shards: [Mutex<HashTable<Entry>>; SHARDS],
}

pub(crate) enum Join<'a> {
    Lead(Leader<'a>),
    Wait(Arc<Flight>),
}

impl Flights {
    /// Joins the flight for `key` (whose [`key_hash`] is `hash`), or starts one and
    /// leads it.
    pub(crate) fn join(&self, key: &Arc<[u8]>, hash: u64) -> Join<'_> {
        debug_assert_eq!(hash, key_hash(key));
        // the table uses the low bits of the hash: pick the shard with the high ones
        let shard = &self.shards[(hash >> 60) as usize % SHARDS];
        let mut table = lock(shard);
        if let Some(entry) = table.find_mut(hash, |e| *e.key == **key) {
            let flight = entry.flight.get_or_insert_with(|| {
                Arc::new(Flight {
                    state: Mutex::new(None),
                    cond: Condvar::new(),
                    notify: Notify::new(),
                })
            });
            return Join::Wait(flight.clone());
        }
        table.insert_unique(
            hash,
            Entry {
                hash,
                key: key.clone(),
                flight: None,
            },
            |e| e.hash,
        );
        Join::Lead(Leader {
            shard,
            hash,
            key: Some(key.clone()),
        })
    }

    /// Ends every running flight for new callers: after an invalidation, a call must
    /// not receive a value computed before it. Callers already waiting try again (and
    /// one of them leads a new flight); the leaders finish on their own.
    pub(crate) fn detach_all(&self) {
        for shard in &self.shards {
            let waited: Vec<Arc<Flight>> = lock(shard).drain().filter_map(|e| e.flight).collect();
            for flight in waited {
                flight.publish(Outcome::Abandoned);
            }
        }
    }

    /// Ends the running flights of `keys` for new callers (see [`Flights::detach_all`]).
    pub(crate) fn detach<'k>(&self, keys: impl IntoIterator<Item = &'k [u8]>) {
        for key in keys {
            let hash = key_hash(key);
            let shard = &self.shards[(hash >> 60) as usize % SHARDS];
            let flight = {
                let mut table = lock(shard);
                match table.find_entry(hash, |e| *e.key == *key) {
                    Ok(entry) => entry.remove().0.flight,
                    Err(_) => None,
                }
            };
            if let Some(flight) = flight {
                flight.publish(Outcome::Abandoned);
            }
        }
    }

    /// The keys of the running flights for which `matches` holds.
    pub(crate) fn keys_matching(&self, mut matches: impl FnMut(&[u8]) -> bool) -> Vec<Arc<[u8]>> {
        let mut found = Vec::new();
        for shard in &self.shards {
            let keys: Vec<Arc<[u8]>> = lock(shard).iter().map(|e| e.key.clone()).collect();
            found.extend(keys.into_iter().filter(|k| matches(k)));
        }
        found
    }

    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.shards.iter().map(|s| lock(s).len()).sum()
    }
}

impl Flight {
    fn publish(&self, outcome: Outcome) {
        let mut state = lock(&self.state);
        if state.is_none() {
            *state = Some(outcome);
        }
        drop(state);
        self.cond.notify_all();
        self.notify.notify_waiters();
    }
}

/// Held by the caller that runs the body. Dropping it without [`Leader::complete`]
/// (error, panic, cancellation) abandons the flight and wakes the waiters.
pub(crate) struct Leader<'a> {
    shard: &'a Mutex<HashTable<Entry>>,
    hash: u64,
    /// `None` once the flight has ended.
    key: Option<Arc<[u8]>>,
}

impl Leader<'_> {
    /// Ends the flight with a value: `handoff` makes it, if anyone waits.
    pub(crate) fn complete(mut self, handoff: impl FnOnce() -> Arc<Handoff>) {
        if let Some(flight) = self.end() {
            flight.publish(Outcome::Done(handoff()));
        }
    }

    /// Takes the flight out of the table (unless an invalidation detached it) and
    /// returns what its waiters wait on, if any wait.
    fn end(&mut self) -> Option<Arc<Flight>> {
        let key = self.key.take()?;
        let mut table = lock(self.shard);
        let entry = table
            .find_entry(self.hash, |e| Arc::ptr_eq(&e.key, &key))
            .ok()?;
        entry.remove().0.flight
    }
}

impl Drop for Leader<'_> {
    fn drop(&mut self) {
        if let Some(flight) = self.end() {
            flight.publish(Outcome::Abandoned);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key() -> Arc<[u8]> {
        Arc::from(&b"k"[..])
    }

    fn slot(v: u32) -> Arc<Handoff> {
        Arc::new(Handoff {
            value: Box::new(v),
            deps: None,
            remote_epoch: 0,
            fallback: false,
        })
    }

    fn value(w: Waited) -> Option<u32> {
        match w {
            Waited::Done(s) => s.value.downcast_ref::<u32>().copied(),
            _ => None,
        }
    }

    #[tokio::test]
    async fn waiters_get_the_leaders_value() {
        let flights = Flights::default();
        let Join::Lead(leader) = flights.join(&key(), key_hash(b"k")) else {
            panic!("first caller leads")
        };
        let Join::Wait(flight) = flights.join(&key(), key_hash(b"k")) else {
            panic!("second caller waits")
        };
        let waiter = flight.clone();
        let task = tokio::spawn(async move { value(waiter.wait(Duration::from_secs(5)).await) });
        tokio::task::yield_now().await;
        leader.complete(|| slot(7));
        assert_eq!(task.await.unwrap(), Some(7));
        assert_eq!(flights.len(), 0);
        // a finished flight still answers late waiters
        assert_eq!(value(flight.wait(Duration::from_secs(1)).await), Some(7));
    }

    #[tokio::test]
    async fn dropping_the_leader_abandons_the_flight() {
        let flights = Flights::default();
        let leader = flights.join(&key(), key_hash(b"k"));
        let Join::Wait(flight) = flights.join(&key(), key_hash(b"k")) else {
            panic!()
        };
        drop(leader);
        assert!(matches!(
            flight.wait(Duration::from_secs(1)).await,
            Waited::Abandoned
        ));
        assert!(
            matches!(flights.join(&key(), key_hash(b"k")), Join::Lead(_)),
            "the key is free again"
        );
    }

    #[tokio::test]
    async fn detached_flights_take_no_new_waiters() {
        let flights = Flights::default();
        let Join::Lead(old) = flights.join(&key(), key_hash(b"k")) else {
            panic!()
        };
        flights.detach_all();
        let Join::Lead(new) = flights.join(&key(), key_hash(b"k")) else {
            panic!("a new caller leads a new flight")
        };
        old.complete(|| slot(1));
        assert!(
            matches!(flights.join(&key(), key_hash(b"k")), Join::Wait(_)),
            "the old leader left the new flight in place"
        );
        drop(new);
    }

    #[tokio::test(start_paused = true)]
    async fn waiting_is_bounded() {
        let flights = Flights::default();
        let _leader = flights.join(&key(), key_hash(b"k"));
        let Join::Wait(flight) = flights.join(&key(), key_hash(b"k")) else {
            panic!()
        };
        assert!(matches!(
            flight.wait(Duration::from_millis(50)).await,
            Waited::TimedOut
        ));
        assert!(matches!(
            flight.wait_blocking(Duration::from_millis(10)),
            Waited::TimedOut
        ));
    }

    #[test]
    fn blocking_waiters_are_woken() {
        let flights = Arc::new(Flights::default());
        let Join::Lead(leader) = flights.join(&key(), key_hash(b"k")) else {
            panic!()
        };
        let Join::Wait(flight) = flights.join(&key(), key_hash(b"k")) else {
            panic!()
        };
        let t = std::thread::spawn(move || value(flight.wait_blocking(Duration::from_secs(5))));
        std::thread::sleep(Duration::from_millis(20));
        leader.complete(|| slot(3));
        assert_eq!(t.join().unwrap(), Some(3));
    }
}
