//! The invalidation's entry points (`#[invalidate_cache]`, `invalidate!`,
//! [`invalidate_dependency`]) and its completion in the shared tiers: the removal from
//! the remote tier, the message to the other instances, and both sent again while
//! they fail.

use std::collections::{HashSet, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::backoff::Backoff;
use crate::bus::{InvalidationBus, Item, Message};
use crate::current::with_current;
use crate::deps::{Dependency, Node};
use crate::held::Hold;
use crate::inner::{CachingService, Inner};
use crate::key::{with_function_key, Key, KeyWriter};
use crate::pending::{
    Pending, RemoteJob, Retries, Retry, REMOVAL_QUEUE, REPUBLISH_FOR, REPUBLISH_QUEUE, RETRY_MERGED,
};
use crate::registry::Descriptor;
use crate::remote::RemoteError;

/// The key of one call of a cached function, computed by the function's companion
/// (`get_product::__cache_key(42)`) for invalidation.
#[doc(hidden)]
pub struct CallKey {
    key: Option<Key>,
}

/// Builds the key of a call, without running anything.
#[doc(hidden)]
pub fn call_key(
    desc: &'static Descriptor,
    self_type: Option<&'static str>,
    write_args: impl FnOnce(&mut KeyWriter),
) -> CallKey {
    let reg = desc.registration(self_type);
    if reg.unusable.is_some() {
        return CallKey { key: None };
    }
    CallKey {
        key: Some(with_function_key(reg, self_type, write_args, |k| {
            k.to_owned()
        })),
    }
}

/// Removes the entries of these calls, and every entry that depends on them.
#[doc(hidden)]
pub async fn invalidate_calls(keys: impl IntoIterator<Item = CallKey>) {
    invalidate_after(keys.into_iter().collect(), Vec::new()).await;
}

/// Runs the invalidations of `#[invalidate_cache]` once the function has succeeded:
/// its keys and dependencies in one invalidation (one remote removal, one message).
#[doc(hidden)]
pub async fn invalidate_after(keys: Vec<CallKey>, dependencies: Vec<Dependency>) {
    let nodes = nodes_of(keys, &dependencies);
    if !nodes.is_empty() {
        let service = with_current(CachingService::clone);
        let pending = service.inner.invalidate(nodes);
        service.inner.complete(pending).await;
    }
}

/// Blocking form of [`invalidate_after`], for plain functions. The in-process tier
/// needs no waiting; remote tiers queue their part.
#[doc(hidden)]
pub fn invalidate_after_sync(keys: Vec<CallKey>, dependencies: Vec<Dependency>) {
    let nodes = nodes_of(keys, &dependencies);
    if !nodes.is_empty() {
        let service = with_current(CachingService::clone);
        let pending = service.inner.invalidate(nodes);
        service.complete_detached(pending);
    }
}

/// The graph nodes of calls' keys and dependencies.
fn nodes_of(keys: Vec<CallKey>, dependencies: &[Dependency]) -> Vec<Node> {
    let mut nodes: Vec<Node> = keys
        .into_iter()
        .filter_map(|k| k.key)
        .map(|k| Node::Entry(k.as_bytes().into()))
        .collect();
    nodes.extend(dependencies.iter().flat_map(crate::deps::nodes_of));
    nodes
}

/// Invalidates a dependency in the current service: every entry that depends on it
/// (see [`add_dependency`](crate::add_dependency)) is removed, with the entries that
/// depend on those, transitively, and the dependencies of its cascade.
pub async fn invalidate_dependency(dependency: impl Into<Dependency>) {
    invalidate_after(Vec::new(), vec![dependency.into()]).await;
}

impl Inner {
    /// Completes an invalidation in the shared tiers: removes its entries from the
    /// remote tier (after any write of them queued before; with a remote graph, their
    /// dependents too, which are then dropped from this instance's L1 as well), then
    /// tells the other instances. Failures are counted and logged, never returned.
    ///
    /// Bounded by the remote store's timeout: when the removal failed (refused, down
    /// or slow), it is sent again by the retry task until it goes through, and its
    /// entries stay held meanwhile (see [`crate::held`]); the publication is left to
    /// a task of its own.
    pub(crate) async fn complete(self: &Arc<Self>, pending: Pending) {
        let Pending {
            remote: job,
            hold,
            items,
        } = pending;
        let payload = match (&self.bus, items.is_empty()) {
            (Some(_), false) => Some(self.message(items)),
            _ => None,
        };
        let mut published = false;
        let mut done = true;
        if self.remote.is_some() && job.has_work(self.remote_graph()) {
            // the store publishes it along with the removal, in the same round trip
            let along = payload.clone().filter(|_| self.store_publishes);
            match self.send_remote(&job, along).await {
                Ok(p) => {
                    published = p;
                    self.held.release(hold);
                }
                Err(e) => {
                    done = false;
                    self.remote_stats.bump(&self.remote_stats.removal_errors);
                    self.warn.warn(format_args!(
                        "{}: {e} (sent again until it goes through; until then this instance reads none of those entries from the remote tier)",
                        job.what()
                    ));
                    self.retry_removal(job, hold, payload.clone());
                }
            }
        } else {
            self.held.release(hold);
        }
        let (Some(bus), Some(payload)) = (self.bus.clone(), payload) else {
            return;
        };
        if published {
            self.sync_stats.published();
            return;
        }
        match (done, tokio::runtime::Handle::try_current()) {
            (false, Ok(handle)) => {
                let inner = self.clone();
                handle.spawn(async move { inner.publish(&bus, payload).await });
            }
            _ => self.publish(&bus, payload).await,
        }
    }

    fn remote_graph(&self) -> bool {
        self.remote.as_ref().is_some_and(|r| r.graph().is_some())
    }

    /// Sends the remote part of an invalidation, with `along` published by the store
    /// once it is done. `Ok` says whether `along` was published; a failed publication
    /// is counted and logged here.
    async fn send_remote(
        &self,
        job: &RemoteJob,
        along: Option<Vec<u8>>,
    ) -> Result<bool, RemoteError> {
        let Some(remote) = &self.remote else {
            return Ok(false);
        };
        if job.clear {
            remote.clear().await?;
            return Ok(false);
        }
        let sent_along = along.is_some();
        let removed = match remote.graph() {
            Some(graph) => {
                let start = job.graph_start();
                if start.is_empty() {
                    return Ok(false);
                }
                // Links are flattened, so every instance's own graph reaches the
                // same dependents from the nodes the message names; the keys the
                // remote graph removed only matter for this instance's L1, as a
                // safety net.
                let want_keys = self.memory.enabled();
                let removed = graph
                    .invalidate(start, job.replaced.clone(), want_keys, along)
                    .await?;
                let known: HashSet<&String> = job.removed.iter().collect();
                let extra: Vec<String> = removed
                    .keys
                    .iter()
                    .filter(|t| !known.contains(t))
                    .cloned()
                    .collect();
                self.remove_local(&extra);
                removed
            }
            None if !job.removed.is_empty() || job.barrier => {
                remote.remove(job.removed.clone(), along).await?
            }
            None => return Ok(false),
        };
        match removed.publish_error {
            Some(e) if sent_along => {
                self.sync_stats.bump(&self.sync_stats.publish_errors);
                self.warn
                    .warn(format_args!("publishing an invalidation failed: {e}"));
                Ok(false)
            }
            _ => Ok(sent_along),
        }
    }

    /// This instance's message carrying `items`, encoded.
    fn message(&self, items: Vec<Item>) -> Vec<u8> {
        Message {
            sender: self.instance_id,
            items,
        }
        .encode()
    }

    /// Publishes an invalidation. A publication that fails is sent again, with the
    /// others that failed, in order, by one task with back-off, each for up to
    /// [`REPUBLISH_FOR`]: other instances that kept their subscription would otherwise
    /// keep their copies until they expire (those that lost it clear their tier
    /// anyway).
    async fn publish(self: &Arc<Self>, bus: &Arc<dyn InvalidationBus>, payload: Vec<u8>) {
        match bus.publish(payload.clone()).await {
            Ok(()) => self.sync_stats.published(),
            Err(e) => {
                self.sync_stats.bump(&self.sync_stats.publish_errors);
                self.warn.warn(format_args!(
                    "publishing an invalidation failed: {e} (sent again while it fails, for {REPUBLISH_FOR:?})"
                ));
                self.publish_later(payload);
            }
        }
    }

    /// Queues a failed publication for the retry task.
    fn publish_later(self: &Arc<Self>, payload: Vec<u8>) {
        let mut r = self.retries.lock();
        if r.publications.len() >= REPUBLISH_QUEUE {
            r.publications.pop_front();
            self.sync_stats.bump(&self.sync_stats.republish_dropped);
        }
        let n = r.next;
        r.next += 1;
        r.publications.push_back((n, Instant::now(), payload));
        self.start_retries(r);
    }

    /// Queues the remote part of an invalidation that did not go through: the retry
    /// task sends it again until it does, then releases `hold` and publishes
    /// `payload` again (other instances may have read the old value back from the
    /// store meanwhile).
    pub(crate) fn retry_removal(
        self: &Arc<Self>,
        job: RemoteJob,
        hold: Hold,
        payload: Option<Vec<u8>>,
    ) {
        let mut r = self.retries.lock();
        if r.removals.len() >= REMOVAL_QUEUE {
            // its entries stay held: this instance keeps not reading them remotely
            r.removals.pop_front();
            self.remote_stats.bump(&self.remote_stats.removals_dropped);
        }
        let n = r.next;
        r.next += 1;
        r.removals
            .push_back((n, Box::new(Retry { job, hold, payload })));
        self.start_retries(r);
    }

    /// Starts the retry task unless it runs.
    fn start_retries(self: &Arc<Self>, mut r: parking_lot::MutexGuard<'_, Retries>) {
        if std::mem::replace(&mut r.running, true) {
            return;
        }
        drop(r);
        let Ok(handle) = tokio::runtime::Handle::try_current() else {
            self.retries.lock().running = false;
            self.warn.warn(format_args!(
                "no tokio runtime here: failed invalidations are not sent again"
            ));
            return;
        };
        let inner = Arc::downgrade(self);
        handle.spawn(async move {
            let mut backoff = Backoff::new(Duration::from_millis(20), Duration::from_millis(500));
            loop {
                backoff.wait().await;
                let Some(inner) = inner.upgrade() else { return };
                let removals_ok = inner.retry_removals().await;
                let publications_ok = inner.retry_publications().await;
                let mut r = inner.retries.lock();
                if r.removals.is_empty() && r.publications.is_empty() {
                    r.running = false;
                    return;
                }
                if removals_ok && publications_ok {
                    backoff.reset();
                }
            }
        });
    }

    /// Sends the waiting removals again, oldest first, until one fails; returns
    /// whether none did. Plain removals that follow each other go as one, up to
    /// [`RETRY_MERGED`] (a failover holds hundreds: one at a time, they took
    /// seconds to send again, while each new invalidation carried what they left).
    async fn retry_removals(self: &Arc<Self>) -> bool {
        loop {
            let (ns, job, payloads) = {
                let r = self.retries.lock();
                let mut ns: Vec<u64> = Vec::new();
                let mut payloads: Vec<Option<Vec<u8>>> = Vec::new();
                let mut job: Option<RemoteJob> = None;
                for (n, retry) in r.removals.iter() {
                    match &mut job {
                        None => job = Some(retry.job.clone()),
                        Some(job) if job.mergeable() && retry.job.mergeable() => {
                            job.merge(&retry.job)
                        }
                        Some(_) => break,
                    }
                    ns.push(*n);
                    payloads.push(retry.payload.clone());
                    if ns.len() == RETRY_MERGED {
                        break;
                    }
                }
                match job {
                    Some(job) => (ns, job, payloads),
                    None => return true,
                }
            };
            // alone, it goes with its message; merged, each message goes after
            let along = match payloads.as_slice() {
                [one] => one.clone().filter(|_| self.store_publishes),
                _ => None,
            };
            match self.send_remote(&job, along).await {
                Ok(published) => {
                    let retried: Vec<Box<Retry>> = {
                        let mut r = self.retries.lock();
                        // (those given up meanwhile are not there)
                        let all = std::mem::take(&mut r.removals);
                        let (mine, rest): (VecDeque<_>, VecDeque<_>) =
                            all.into_iter().partition(|(n, _)| ns.contains(n));
                        r.removals = rest;
                        mine.into_iter().map(|(_, retry)| retry).collect()
                    };
                    tracing::info!(target: "cache_runtime", "{}: went through when sent again", job.what());
                    for retry in retried {
                        self.held.release(retry.hold);
                        self.remote_stats.bump(&self.remote_stats.removals_retried);
                        match (published, &self.bus, retry.payload) {
                            (true, _, _) => self.sync_stats.published(),
                            (false, Some(bus), Some(payload)) => {
                                let bus = bus.clone();
                                self.publish(&bus, payload).await;
                            }
                            _ => {}
                        }
                    }
                }
                Err(e) => {
                    self.remote_stats.bump(&self.remote_stats.removal_errors);
                    self.warn
                        .warn(format_args!("{} (sent again): {e}", job.what()));
                    return false;
                }
            }
        }
    }

    /// Sends the failed publications again, in order, until one fails; gives up those
    /// older than [`REPUBLISH_FOR`]. Returns whether none failed.
    async fn retry_publications(self: &Arc<Self>) -> bool {
        let Some(bus) = self.bus.clone() else {
            self.retries.lock().publications.clear();
            return true;
        };
        loop {
            let (n, payload) = {
                let mut r = self.retries.lock();
                while r
                    .publications
                    .front()
                    .is_some_and(|(_, at, _)| at.elapsed() > REPUBLISH_FOR)
                {
                    r.publications.pop_front();
                    self.sync_stats.bump(&self.sync_stats.republish_dropped);
                }
                match r.publications.front() {
                    Some((n, _, payload)) => (*n, payload.clone()),
                    None => return true,
                }
            };
            if bus.publish(payload).await.is_err() {
                return false;
            }
            self.sync_stats.published();
            self.sync_stats.bump(&self.sync_stats.republished);
            let mut r = self.retries.lock();
            if r.publications
                .front()
                .is_some_and(|(front, _, _)| *front == n)
            {
                r.publications.pop_front();
            }
        }
    }
}

impl CachingService {
    /// Completes an invalidation in the shared tiers without waiting, from code that
    /// cannot wait (a plain function). Needs a tokio runtime; without one it is
    /// skipped and logged.
    pub(crate) fn complete_detached(&self, pending: Pending) {
        if pending.is_empty() {
            return;
        }
        match tokio::runtime::Handle::try_current() {
            Ok(handle) => {
                let inner = self.inner.clone();
                handle.spawn(async move { inner.complete(pending).await });
            }
            Err(_) => self.inner.warn.warn(format_args!(
                "invalidated entries could not be removed from the shared tiers: no tokio runtime here"
            )),
        }
    }
}

impl Inner {
    /// Removes every entry, here and in the shared tiers (see [`CachingService::clear`]).
    pub(crate) async fn clear_everywhere(self: &Arc<Self>) {
        let inner = self;
        let hold = match inner.remote {
            Some(_) => Hold::all(),
            None => Hold::default(),
        };
        // nothing is read from the remote tier until it is cleared
        inner.held.hold(&hold);
        inner.clear_local();
        let payload = inner.bus.as_ref().map(|_| inner.message(vec![Item::Clear]));
        if let Some(remote) = &inner.remote {
            match remote.clear().await {
                Ok(()) => inner.held.release(hold),
                Err(e) => {
                    inner.remote_stats.bump(&inner.remote_stats.removal_errors);
                    inner.warn.warn(format_args!(
                        "clearing the remote tier failed: {e} (sent again until it goes through; until then this instance reads nothing from the remote tier)"
                    ));
                    inner.retry_removal(RemoteJob::clear(), hold, payload.clone());
                }
            }
        }
        if let (Some(bus), Some(payload)) = (&inner.bus, payload) {
            inner.publish(bus, payload).await;
        }
    }
}
