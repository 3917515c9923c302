//! The dependency graph on a cluster: the steps of an invalidation across slots.
//!
//! The graph's keys share one hash tag, so the walk is one script on one slot; the
//! values are on their own slots. An invalidation is then three steps:
//! 1. the walk ([`walk`]), on the graph's slot: it takes the next count, marks the
//!    nodes reached, removes the entries' links, and reserves the count, with the
//!    keys to bury under it;
//! 2. a tombstone of that count in place of each value ([`bury`]), on each value's
//!    slot: a value's write checks it (a value computed before the invalidation has
//!    a lower count and is not written over it, whichever lands first);
//! 3. the release of the count: the count instances read moves past it.
//!
//! While a count is reserved, the count instances read stays below it, so a value
//! read from Redis between steps 1 and 2 (still the old one) never passes for one
//! current as of that count: whatever is computed from it is refused by the marks.
//! An instance that stops between the steps leaves its reservation, which the next
//! walk after its deadline takes over (its keys are buried with that walk's, then it
//! is released with it). A walk whose reply was lost (a timeout while the server was
//! slow, then ran it anyway) is taken over by the same instance's next walk, which
//! names it: the one sent again finds nothing left to walk.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use cache_runtime::RemoteError;

use crate::graph::{GraphKeys, ScriptCall};
use crate::link::Link;
use crate::writer::run_scripts;

/// How long a reservation lasts before another walk takes it over (`RESERVE` in
/// the scripts' prelude on a cluster, `graph::ON_CLUSTER`): a lost walk is named by this instance's walks for that long.
const RESERVE: Duration = Duration::from_secs(10);

/// This instance's walks: their ids, and those whose reply was lost.
pub(crate) struct Walks {
    owner: u64,
    next: AtomicU64,
    lost: Mutex<Vec<(String, Instant)>>,
}

/// Step 1's outcome: its count, the value keys to bury (its own and those of the
/// reservations it took over), the counts to release (its own first), and the keys
/// other walks in flight have not buried yet, which it buries too (they stay with
/// those walks' reservations if it fails).
pub(crate) struct Walked {
    pub(crate) count: u64,
    pub(crate) keys: Vec<String>,
    pub(crate) counts: Vec<u64>,
    pub(crate) others: Vec<String>,
}

impl Walks {
    pub(crate) fn new() -> Walks {
        Walks {
            owner: cache_runtime::new_instance_id(),
            next: AtomicU64::new(0),
            lost: Mutex::new(Vec::new()),
        }
    }

    /// Step 1: the walk from `start` (keeping `keep`), and its id.
    pub(crate) fn walk(
        &self,
        graph: &GraphKeys,
        start: &[String],
        keep: Option<&str>,
    ) -> (ScriptCall, String) {
        let id = format!(
            "{:x}.{}",
            self.owner,
            self.next.fetch_add(1, Ordering::Relaxed)
        );
        let lost = {
            let mut lost = self.lost.lock().unwrap_or_else(PoisonError::into_inner);
            lost.retain(|(_, at)| at.elapsed() < RESERVE);
            lost.iter()
                .map(|(id, _)| id.as_str())
                .collect::<Vec<_>>()
                .join(" ")
        };
        (graph.walk(start, keep, &id, &lost), id)
    }

    /// The outcome of the walk `id`. Without a reply, it may still have run (or run
    /// later): this instance's walks name it from now on, and the first to find its
    /// reservation takes it over.
    pub(crate) fn walked(
        &self,
        id: String,
        reply: Result<redis::Value, RemoteError>,
    ) -> Result<Walked, RemoteError> {
        let reply = match reply {
            Ok(reply) => reply,
            Err(e) => {
                self.lost
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .push((id, Instant::now()));
                return Err(e);
            }
        };
        let (count, keys, adopted, others): (u64, Vec<String>, Vec<u64>, Vec<String>) =
            redis::from_redis_value(reply).map_err(|e| RemoteError(e.to_string()))?;
        let mut counts = Vec::with_capacity(1 + adopted.len());
        counts.push(count);
        counts.extend(adopted);
        Ok(Walked {
            count,
            keys,
            counts,
            others,
        })
    }
}

/// Step 1 on `link`: the walk from `start`.
pub(crate) async fn walk(
    link: &Arc<Link>,
    graph: &GraphKeys,
    walks: &Walks,
    start: &[String],
) -> Result<Walked, RemoteError> {
    let (call, id) = walks.walk(graph, start, None);
    let reply = run_scripts(link, std::slice::from_ref(&call))
        .await
        .map(|r| r.into_iter().next().unwrap_or(redis::Value::Nil));
    walks.walked(id, reply)
}

/// Steps 2 and 3: tombstones of `count` in place of `keys` (value keys), then the
/// release of `counts`. Returns the count instances now read.
pub(crate) async fn bury(
    link: &Arc<Link>,
    graph: &GraphKeys,
    count: u64,
    keys: &[String],
    counts: &[u64],
) -> Result<u64, RemoteError> {
    for chunk in keys.chunks(1000) {
        let calls: Vec<ScriptCall> = chunk.iter().map(|k| graph.bury(k, count)).collect();
        run_scripts(link, &calls).await?;
    }
    let reply = run_scripts(link, &[graph.release(counts)]).await?;
    let reply = reply.into_iter().next().unwrap_or(redis::Value::Nil);
    redis::from_redis_value(reply).map_err(|e| RemoteError(e.to_string()))
}
