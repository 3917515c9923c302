//! Statistics: counters per function and service, and their snapshots.
//!
//! A hit increments one counter, so the increment must be cheap. Each thread that
//! counts gets a slot of its own (up to [`SLOTS`] threads at a time; a thread's slot
//! is given back when it exits). A slot has a single writer, so an increment is a
//! plain load and store, with no locked instruction, and no update is lost. Threads
//! beyond [`SLOTS`] share one overflow slot with atomic increments. A snapshot sums
//! the slots.

use std::cell::Cell;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Mutex;

use crate::exported::FnMetrics;
use crate::lock::lock;

/// Counters of one function, or of the whole service.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct FunctionStats {
    /// Calls served from the cache, without running the body.
    pub hits: u64,
    /// Calls that did not find a value. A miss either ran the body or received the
    /// value of a concurrent call of the same key (`misses - executions`).
    pub misses: u64,
    /// Hits served by the in-process tier.
    pub l1_hits: u64,
    /// Hits served by the remote tier.
    pub l2_hits: u64,
    /// Times the body ran (misses that led, disabled profiles, misconfigured functions).
    pub executions: u64,
    /// Entries removed by invalidation.
    pub invalidations: u64,
    /// Failed operations on a remote tier.
    pub backend_errors: u64,
    /// Calls that ran uncached because of a configuration error (unknown profile,
    /// two functions with the same key name).
    pub config_errors: u64,
    /// Remote values that did not decode (another format, corruption): each was a
    /// miss, and the value was written again.
    pub decode_errors: u64,
    /// Values larger than the remote store's limit: returned, not stored remotely.
    pub oversized: u64,
    /// Values kept in the in-process tier only because they have dependencies and
    /// the remote store keeps no dependency graph (`dependencies(false)`).
    pub local_only: u64,
    /// Calls answered with an expired value kept by fail-safe (the body failed, or
    /// did not answer within the soft timeout), waiters of such a call included.
    pub fallbacks_served: u64,
    /// Calls answered with a fallback because the body was slower than the soft
    /// timeout (the body went on in the background).
    pub soft_timeouts: u64,
    /// Background refreshes started by a hit on an entry past the eager-refresh point.
    pub eager_refreshes: u64,
    /// Bodies run in the background (eager refresh, past a soft timeout) that
    /// returned an error, panicked or did not store: the entry was left as it was.
    pub background_errors: u64,
}

impl FunctionStats {
    pub(crate) fn add(&mut self, o: &FunctionStats) {
        self.hits += o.hits;
        self.misses += o.misses;
        self.l1_hits += o.l1_hits;
        self.l2_hits += o.l2_hits;
        self.executions += o.executions;
        self.invalidations += o.invalidations;
        self.backend_errors += o.backend_errors;
        self.config_errors += o.config_errors;
        self.decode_errors += o.decode_errors;
        self.oversized += o.oversized;
        self.local_only += o.local_only;
        self.fallbacks_served += o.fallbacks_served;
        self.soft_timeouts += o.soft_timeouts;
        self.eager_refreshes += o.eager_refreshes;
        self.background_errors += o.background_errors;
    }
}

/// A snapshot of a service's counters.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    /// The sum over all functions.
    pub total: FunctionStats,
    /// Per function, by key name (`module::function`, or `module::Type::method`).
    pub functions: BTreeMap<String, FunctionStats>,
    /// The invalidation bus: messages published and received, in-process tier clears.
    pub sync: SyncStats,
    /// The remote tier's writes and removals that did not go through.
    pub remote: RemoteStats,
}

impl Stats {
    /// The counters of one function by its key name; zero if it never ran.
    pub fn function(&self, name: &str) -> FunctionStats {
        self.functions.get(name).copied().unwrap_or_default()
    }
}

/// Counters of a service's invalidation bus.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct SyncStats {
    /// Messages this instance published.
    pub published: u64,
    /// Publications that failed (the bus was unreachable or too slow).
    pub publish_errors: u64,
    /// Failed publications that went through when sent again.
    pub republished: u64,
    /// Failed publications given up: still failing after 10 s, or the oldest of more
    /// than 10,000 waiting. Other instances keep those copies until they expire.
    pub republish_dropped: u64,
    /// Messages of other instances received and applied.
    pub received: u64,
    /// Payloads received that did not decode.
    pub undecodable: u64,
    /// Times the in-process tier was cleared because messages may have been lost.
    pub l1_clears: u64,
    /// Whether the in-process tier is bypassed now because the bus is not receiving
    /// (not subscribed yet, or the subscription was lost): calls read the remote tier
    /// or run, and nothing is stored in the in-process tier until it receives again.
    pub l1_bypassed: bool,
}

/// What the remote tier refused or failed to do, and what the service did about it.
/// Each failure is also logged at `warn` (rate-limited), with the command and the
/// server's words.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct RemoteStats {
    /// Writes of values (`SET`) the store refused (a missing permission, out of
    /// memory, a read-only replica) or that failed: those values are not stored
    /// remotely.
    pub write_errors: u64,
    /// Writes of values with their links (the dependency graph's write script) the
    /// store refused or that failed.
    pub linked_write_errors: u64,
    /// Writes dropped because the store's queue was full.
    pub writes_dropped: u64,
    /// Attempts at removing invalidated entries (`DEL`, the graph's invalidation
    /// script, a clear) that the store refused or that failed. Each is sent again
    /// until it goes through; meanwhile this instance reads none of those entries (nor
    /// their dependents) from the store.
    pub removal_errors: u64,
    /// Removals that went through when sent again.
    pub removals_retried: u64,
    /// Removals waiting to be sent again now.
    pub removals_waiting: u64,
    /// Removals given up because more than 10,000 were waiting; this instance keeps
    /// reading none of their entries from the store.
    pub removals_dropped: u64,
    /// Values read from the store and not served, because an invalidation of this
    /// instance that covers them had not reached the store (the call ran the body).
    pub reads_held: u64,
    /// On a Redis Cluster: changes of which node serves which slots (a failover, a
    /// resharding) after which this instance replayed its recent invalidations and
    /// cleared its in-process tier.
    pub topology_changes: u64,
    /// On a Redis Cluster: redirections (`MOVED` after a slot moved, `ASK` while it
    /// moves) that the cluster connection met and followed, sending the command to the
    /// node named. The count is the process's: every cluster backend of a process
    /// reports the same one.
    pub redirections: u64,
    /// Removals applied again to the cluster after a topology change (a promoted
    /// replica may never have seen them).
    pub invalidations_replayed: u64,
    /// On a Redis Cluster with the dependency graph: times this instance found the
    /// graph lost or replaced (its master restarted empty, or failed over to a
    /// replica that lacked it, or it was cleared), after which it removed the values
    /// under the prefix, which no invalidation could reach any more, and cleared its
    /// in-process tier.
    pub graphs_lost: u64,
}

/// What is counted.
#[derive(Clone, Copy)]
pub(crate) enum Counter {
    Miss = 0,
    L1Hit,
    L2Hit,
    Execution,
    Invalidation,
    BackendError,
    ConfigError,
    DecodeError,
    Oversized,
    LocalOnly,
    FallbackServed,
    SoftTimeout,
    EagerRefresh,
    BackgroundError,
}

pub(crate) const COUNTERS: usize = 14;

// every counter has its metric
const _: () = assert!(COUNTERS == crate::exported::COUNTED);

/// Number of threads that count without atomic read-modify-write at a time.
pub(crate) const SLOTS: usize = 16;

#[derive(Default)]
#[repr(align(64))]
struct CounterRow([AtomicU64; COUNTERS]);

/// Live counters of one function in one service.
#[derive(Default)]
pub(crate) struct Counters {
    slots: [CounterRow; SLOTS],
    overflow: CounterRow,
    /// The same counts, for the `metrics` facade (with the feature).
    exported: FnMetrics,
}

/// Slots given back by threads that exited.
static FREE_SLOTS: Mutex<Vec<usize>> = Mutex::new(Vec::new());
static NEXT_SLOT: AtomicUsize = AtomicUsize::new(0);
const UNASSIGNED: usize = usize::MAX;

/// This thread's slot; gives it back when the thread exits.
struct ThreadSlot(Cell<usize>);

impl Drop for ThreadSlot {
    fn drop(&mut self) {
        let slot = self.0.get();
        if slot < SLOTS {
            lock(&FREE_SLOTS).push(slot);
        }
    }
}

thread_local! {
    static THREAD_SLOT: ThreadSlot = const { ThreadSlot(Cell::new(UNASSIGNED)) };
}

#[inline(always)]
fn thread_slot() -> usize {
    match THREAD_SLOT.try_with(|s| s.0.get()) {
        Ok(slot) if slot != UNASSIGNED => slot,
        Ok(_) => assign_slot(),
        Err(_) => SLOTS, // during thread teardown: the overflow slot
    }
}

/// Gives this thread its slot, on its first count.
#[cold]
fn assign_slot() -> usize {
    THREAD_SLOT
        .try_with(|s| {
            let slot = lock(&FREE_SLOTS).pop().unwrap_or_else(|| {
                let n = NEXT_SLOT.fetch_add(1, Ordering::Relaxed);
                if n < SLOTS {
                    n
                } else {
                    NEXT_SLOT.store(SLOTS, Ordering::Relaxed);
                    SLOTS
                }
            });
            s.0.set(slot);
            slot
        })
        .unwrap_or(SLOTS)
}

impl Counters {
    /// The counters of the function `name`.
    pub(crate) fn new(name: &str) -> Self {
        Counters {
            exported: FnMetrics::new(name),
            ..Counters::default()
        }
    }

    /// The function's handles of the `metrics` facade.
    pub(crate) fn exported(&self) -> &FnMetrics {
        &self.exported
    }

    #[inline(always)]
    pub(crate) fn bump(&self, counter: Counter) {
        self.exported.count(counter as usize);
        let slot = thread_slot();
        match self.slots.get(slot) {
            Some(CounterRow(c)) => {
                // Single writer: this thread owns the slot.
                let c = &c[counter as usize];
                c.store(c.load(Ordering::Relaxed) + 1, Ordering::Relaxed);
            }
            None => {
                self.overflow.0[counter as usize].fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    pub(crate) fn snapshot(&self) -> FunctionStats {
        let mut sum = [0u64; COUNTERS];
        for slot in self.slots.iter().chain(std::iter::once(&self.overflow)) {
            for (total, c) in sum.iter_mut().zip(&slot.0) {
                *total += c.load(Ordering::Relaxed);
            }
        }
        let get = |c: Counter| sum[c as usize];
        FunctionStats {
            hits: get(Counter::L1Hit) + get(Counter::L2Hit),
            misses: get(Counter::Miss),
            l1_hits: get(Counter::L1Hit),
            l2_hits: get(Counter::L2Hit),
            executions: get(Counter::Execution),
            invalidations: get(Counter::Invalidation),
            backend_errors: get(Counter::BackendError),
            config_errors: get(Counter::ConfigError),
            decode_errors: get(Counter::DecodeError),
            oversized: get(Counter::Oversized),
            local_only: get(Counter::LocalOnly),
            fallbacks_served: get(Counter::FallbackServed),
            soft_timeouts: get(Counter::SoftTimeout),
            eager_refreshes: get(Counter::EagerRefresh),
            background_errors: get(Counter::BackgroundError),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn counts_exactly_from_many_threads() {
        let counters = Arc::new(Counters::default());
        // more threads than slots, twice over, so slots are reused and the overflow is used
        for _ in 0..2 {
            let threads: Vec<_> = (0..SLOTS + 8)
                .map(|_| {
                    let c = counters.clone();
                    std::thread::spawn(move || {
                        for _ in 0..10_000 {
                            c.bump(Counter::L1Hit);
                        }
                        c.bump(Counter::Miss);
                    })
                })
                .collect();
            for t in threads {
                t.join().unwrap();
            }
        }
        let s = counters.snapshot();
        assert_eq!(s.l1_hits, 2 * (SLOTS as u64 + 8) * 10_000);
        assert_eq!(s.hits, s.l1_hits);
        assert_eq!(s.misses, 2 * (SLOTS as u64 + 8));
    }
}
