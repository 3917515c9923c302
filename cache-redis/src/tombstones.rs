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
//! walk after its deadline takes over (its keys are buried with that walk's).

use std::sync::Arc;

use cache_runtime::RemoteError;

use crate::graph::{GraphKeys, ScriptCall};
use crate::link::Link;
use crate::writer::run_scripts;

/// Step 1's reply: its count and the value keys to bury.
pub(crate) fn walked(reply: redis::Value) -> Result<(u64, Vec<String>), RemoteError> {
    redis::from_redis_value(reply).map_err(|e| RemoteError(e.to_string()))
}

/// Step 1 on `link`: the walk from `start`. Returns its count and the value keys to
/// bury.
pub(crate) async fn walk(
    link: &Arc<Link>,
    graph: &GraphKeys,
    start: &[String],
) -> Result<(u64, Vec<String>), RemoteError> {
    let call = graph.invalidate(start, None, true, None);
    let reply = run_scripts(link, std::slice::from_ref(&call)).await?;
    walked(reply.into_iter().next().unwrap_or(redis::Value::Nil))
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
