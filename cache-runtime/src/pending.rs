//! What an invalidation leaves to do in the shared tiers once it is done here, and
//! the queue of those that failed and are sent again.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use crate::bus::Item;
use crate::held::Hold;

/// What an invalidation leaves to do in the shared tiers: the remote part, what it
/// holds until the remote tier confirms it, and the message items to publish.
#[derive(Default)]
#[must_use = "the shared tiers still hold these entries: pass this to `Inner::complete`"]
pub(crate) struct Pending {
    pub(crate) remote: RemoteJob,
    /// Held from the invalidation until the remote tier confirms it (see
    /// [`crate::held`]).
    pub(crate) hold: Hold,
    /// What to publish.
    pub(crate) items: Vec<Item>,
}

impl Pending {
    pub(crate) fn is_empty(&self) -> bool {
        self.remote.removed.is_empty()
            && self.remote.dependencies.is_empty()
            && self.items.is_empty()
            && !self.remote.barrier
    }
}

/// The remote part of an invalidation: sent once, and again while it fails.
#[derive(Clone, Default)]
pub(crate) struct RemoteJob {
    /// Readable keys of the entries to remove from the remote tier.
    pub(crate) removed: Vec<String>,
    /// With a remote graph: those of `removed` the invalidation named (the graph
    /// finds the dependents itself).
    pub(crate) named: Vec<String>,
    /// Dependencies invalidated (for a remote graph).
    pub(crate) dependencies: Vec<String>,
    /// The entry a refresh replaced: its dependents go, it stays.
    pub(crate) replaced: Option<String>,
    /// Wait for the remote tier's queued writes even with nothing to remove.
    pub(crate) barrier: bool,
    /// Remove every entry of the remote tier.
    pub(crate) clear: bool,
}

impl RemoteJob {
    pub(crate) fn clear() -> Self {
        RemoteJob {
            clear: true,
            ..RemoteJob::default()
        }
    }

    /// Whether it sends anything to a remote tier (with a graph or without).
    pub(crate) fn has_work(&self, graph: bool) -> bool {
        self.clear
            || match graph {
                true => {
                    !self.named.is_empty()
                        || !self.dependencies.is_empty()
                        || self.replaced.is_some()
                }
                false => !self.removed.is_empty() || self.barrier,
            }
    }

    /// Whether it can go as one with others ([`RemoteJob::merge`]): neither a clear
    /// nor a refresh's.
    pub(crate) fn mergeable(&self) -> bool {
        !self.clear && self.replaced.is_none()
    }

    /// Adds `other`'s removals to this one's: sent as one, they remove what each
    /// would (each is a removal: their order does not matter).
    pub(crate) fn merge(&mut self, other: &RemoteJob) {
        self.removed.extend(other.removed.iter().cloned());
        self.named.extend(other.named.iter().cloned());
        self.dependencies.extend(other.dependencies.iter().cloned());
        self.barrier |= other.barrier;
    }

    /// The remote graph's start nodes.
    pub(crate) fn graph_start(&self) -> Vec<String> {
        let mut start: Vec<String> = self.named.iter().map(|t| format!("e:{t}")).collect();
        start.extend(self.dependencies.iter().map(|d| format!("d:{d}")));
        start.extend(self.replaced.iter().map(|t| format!("e:{t}")));
        start
    }

    /// What it does, for the log.
    pub(crate) fn what(&self) -> String {
        let first = self
            .removed
            .first()
            .map(|k| format!("`{k}`"))
            .or_else(|| {
                self.dependencies
                    .first()
                    .map(|d| format!("dependency `{d}`"))
            })
            .or_else(|| {
                self.replaced
                    .as_ref()
                    .map(|k| format!("the dependents of `{k}`"))
            })
            .unwrap_or_default();
        let more = (self.removed.len() + self.dependencies.len()).saturating_sub(1);
        match (self.clear, more) {
            (true, _) => "clearing the remote tier failed".to_owned(),
            (false, 0) => format!("removing {first} from the remote tier failed"),
            (false, more) => {
                format!("removing {first} and {more} more from the remote tier failed")
            }
        }
    }
}

/// How long a failed publication is sent again.
pub(crate) const REPUBLISH_FOR: Duration = Duration::from_secs(10);

/// How many failed publications wait at most; beyond, the oldest is dropped (counted
/// in `republish_dropped`).
pub(crate) const REPUBLISH_QUEUE: usize = 10_000;

/// How many removals wait to be sent again at most; beyond, the oldest is given up
/// (counted in `removals_dropped`; its entries stay held).
pub(crate) const REMOVAL_QUEUE: usize = 10_000;

/// How many waiting removals are sent again as one at most.
pub(crate) const RETRY_MERGED: usize = 64;

/// An invalidation's remote part waiting to be sent again.
pub(crate) struct Retry {
    pub(crate) job: RemoteJob,
    pub(crate) hold: Hold,
    pub(crate) payload: Option<Vec<u8>>,
}

/// What the retry task sends again, oldest first: the remote parts of invalidations
/// (until they go through) and failed publications (each for up to
/// [`REPUBLISH_FOR`]), each with its number; `running` while the task runs.
#[derive(Default)]
pub(crate) struct Retries {
    pub(crate) removals: VecDeque<(u64, Box<Retry>)>,
    pub(crate) publications: VecDeque<(u64, Instant, Vec<u8>)>,
    pub(crate) next: u64,
    pub(crate) running: bool,
}
