//! The miss: single flight per key, the remote tier read inside the flight, the body
//! run in a dependency frame, the result kept (in-process, and queued for the remote
//! tier) unless an invalidation made it out of date while it was computed.
//!
//! The steps are written once ([`Miss`]) for the async form ([`run_async`]) and the
//! blocking one ([`run_sync`]); the remote side of a miss is in `miss_remote.rs`, the
//! flights in `flight.rs`.

use std::future::Future;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use tracing::{Instrument, Span};

use crate::deps::{collect_async, collect_sync, with_frame, Frame, Node};
use crate::exported::BodyTimer;
use crate::flight::{Flight, Handoff, Join, Leader, Waited};
use crate::hit::{read, MissPath};
use crate::inner::CachingService;
use crate::memory::now_nanos;
use crate::miss_remote::MissEntry;
use crate::pending::Pending;
use crate::profile::{Expiration, Resilience};
use crate::registry::{Descriptor, Mode};
use crate::remote::Decoded;
use crate::stats::Counter;
use crate::value::{ReturnKind, ValueOps};

/// One call on the miss path, shared by the async and the blocking forms: everything
/// but running the body and waiting for another caller.
struct Miss<'a, K: ReturnKind<R>, R> {
    service: &'a CachingService,
    desc: &'static Descriptor,
    /// The entry, its function and what the remote tier said of it.
    entry: MissEntry<'a, K::Stored>,
    lock_timeout: Duration,
    /// The key's hash, as the lookup computed it.
    hash: u64,
    /// The invalidation count when the body started (see [`crate::inner::Inner::epoch`]).
    epoch: u64,
    /// The miss's span (disabled unless a subscriber takes `cache_runtime` at `debug`).
    span: Span,
    /// Whether the call waited for another caller's flight.
    waited: bool,
    /// Fail-safe, soft timeout, eager refresh, as resolved for the function.
    resilience: Resilience,
    /// An expired value kept by fail-safe, found by the leader (boxed: most misses
    /// have none, and this struct is part of every miss's future).
    fallback: Option<Box<Fallback<K::Stored>>>,
    _r: std::marker::PhantomData<fn() -> R>,
}

/// An expired value kept by fail-safe, served if the body fails.
struct Fallback<T> {
    value: T,
    deps: Option<Arc<[Node]>>,
    remote_epoch: u64,
    /// Until when it may be served (process nanoseconds, see `memory::now_nanos`).
    kept_until: u64,
}

/// What to do after a step of the miss path.
enum Next<'a, R> {
    /// Return this.
    Return(R),
    /// Run the body as the leader of the key's flight.
    Lead(Leader<'a>),
    /// Wait for the flight's leader.
    Wait(Arc<Flight>),
    /// Run the body without leading (the wait timed out, or a refresh).
    RunAlone,
}

impl<'a, K: ReturnKind<R>, R> Miss<'a, K, R> {
    fn new(
        path: &'a MissPath,
        desc: &'static Descriptor,
        ops: &'static ValueOps<K::Stored>,
    ) -> Self {
        let span = miss_span(path);
        let inner = &*path.service.inner;
        let state = inner.function(desc, path.reg);
        let (expiration, lock_timeout, resilience) = match state.mode {
            Mode::Cached {
                expiration,
                lock_timeout,
                resilience,
            } => (expiration, lock_timeout, resilience),
            _ => (Expiration::Never, Duration::ZERO, Resilience::default()),
        };
        let mut entry = MissEntry::new(inner, state, &path.key, ops, expiration);
        entry.fail_safe = resilience.fail_safe;
        entry.lock_timeout = lock_timeout;
        entry.fallback_after = resilience
            .soft_timeout
            .filter(|_| resilience.fail_safe.is_some());
        Miss {
            service: &path.service,
            desc,
            entry,
            lock_timeout,
            hash: path.hash,
            epoch: 0,
            span,
            waited: false,
            resilience,
            fallback: None,
            _r: std::marker::PhantomData,
        }
    }

    /// The first step: a refresh runs the body alone, anything else joins the flight.
    fn start(&mut self, refresh: bool) -> Next<'a, R> {
        if refresh {
            self.epoch = self.entry.inner.snapshot();
            return Next::RunAlone;
        }
        self.join()
    }

    /// Leads the key's flight, or joins it.
    fn join(&mut self) -> Next<'a, R> {
        match self
            .entry
            .inner
            .flights
            .join(self.entry.key.shared(), self.hash)
        {
            Join::Lead(leader) => {
                self.epoch = self.entry.inner.snapshot();
                // A flight that ended between the first look and `join` stored its value.
                let key = self.entry.key.as_bytes();
                match read(self.entry.inner, key, self.hash, self.entry.ops, None) {
                    Some(v) => {
                        self.entry.state.counters.bump(Counter::L1Hit);
                        self.served("l1");
                        Next::Return(K::from_stored(v))
                    }
                    None => {
                        if self.resilience.fail_safe.is_some() {
                            self.fallback = self.local_fallback();
                        }
                        Next::Lead(leader)
                    }
                }
            }
            Join::Wait(flight) => Next::Wait(flight),
        }
    }

    /// What a waiter does with the leader's outcome.
    fn waited(&mut self, waited: Waited) -> Next<'a, R> {
        self.waited = true;
        match waited {
            Waited::Done(handoff) => match (self.entry.ops.from_any)(&*handoff.value) {
                Some(v) => {
                    self.entry.state.counters.bump(Counter::Miss);
                    if handoff.fallback {
                        self.entry.state.counters.bump(Counter::FallbackServed);
                    }
                    self.served("flight");
                    let read_epoch = self.entry.inner.snapshot();
                    with_frame(|f| {
                        f.add_entry(
                            self.entry.key.as_bytes(),
                            handoff.deps.as_deref(),
                            read_epoch,
                            handoff.remote_epoch,
                        )
                    });
                    Next::Return(K::from_stored(v))
                }
                None => self.join(),
            },
            Waited::Abandoned => self.join(),
            Waited::TimedOut => {
                tracing::debug!(target: "cache_runtime", function = %self.entry.state.name, key = %self.entry.text(), "lock timeout: running the body without waiting");
                self.epoch = self.entry.inner.snapshot();
                Next::RunAlone
            }
        }
    }

    /// Stores the body's result (if its kind stores one) with what the body depended
    /// on, links the calling function's entry to it, and hands it to the waiters. A
    /// result that an invalidation made out of date while it was computed is returned
    /// but not kept (see [`crate::inner::InvalidationLog::is_stale`]).
    ///
    /// A refresh returns what is left to do in the shared tiers: the refreshing
    /// caller waits for it, so that it never reads the old value back.
    fn finish(
        &self,
        result: &R,
        frame: Frame,
        leader: Option<Leader<'_>>,
        refresh: bool,
    ) -> Option<Pending> {
        let key = self.entry.key.as_bytes();
        let deps: Option<Arc<[Node]>> =
            (!frame.nodes.is_empty()).then(|| frame.nodes.as_slice().into());
        let remote_epoch = self.entry.value_epoch(&frame);
        // The calling function read this value as of when it started computing.
        with_frame(|f| f.add_entry(key, deps.as_deref(), self.epoch, remote_epoch));
        // Without a value to store, dropping the leader abandons the flight: a waiter
        // runs the body. So does a value that is out of date: the waiters that joined
        // before the invalidation retry, as callers after it would.
        let value = K::stored(result, self.desc.cache_none)?;
        let current = self.keep(value, &frame, remote_epoch);
        // Entries computed from the old value are out of date.
        let pending = refresh.then(|| self.entry.inner.invalidate_dependents(key));
        if let (Some(leader), true) = (leader, current) {
            leader.complete(|| {
                Arc::new(Handoff {
                    value: (self.entry.ops.into_shared)((self.entry.ops.clone)(value)),
                    deps,
                    remote_epoch,
                    fallback: false,
                })
            });
        }
        pending
    }
}

impl<K: ReturnKind<R>, R> Miss<'_, K, R> {
    /// Stores a computed value: in the in-process tier (if the service has one) with
    /// what it depends on, and in the remote tier, unless an invalidation made it out
    /// of date while it was computed; returns whether it is current. An invalidation
    /// that started before the entry was in place may have missed it, so the check
    /// comes after the insert; the remote write is queued under the same check, so an
    /// invalidation either sees it, or queues its removal after it.
    fn keep(&self, value: &K::Stored, frame: &Frame, remote_epoch: u64) -> bool {
        self.keep_in_tiers(
            value,
            frame,
            self.entry.expiration,
            remote_epoch,
            true,
            None,
        )
    }

    /// Stores the value in the in-process tier with `expiration`, then, with `write`,
    /// queues its remote write if it is current (see [`Miss::keep`]); returns whether
    /// it is. With fail-safe, the slot is kept as a fallback after it expires, until
    /// `kept_until` if given (a fallback served again keeps its own bound).
    fn keep_in_tiers(
        &self,
        value: &K::Stored,
        frame: &Frame,
        expiration: Expiration,
        remote_epoch: u64,
        write: bool,
        kept_until: Option<u64>,
    ) -> bool {
        let (inner, key) = (self.entry.inner, self.entry.key.as_bytes());
        let memory = &inner.memory;
        let make_slot = || {
            let mut slot = (self.entry.ops.into_slot)((self.entry.ops.clone)(value), expiration);
            slot.remote_epoch = remote_epoch;
            if let Some(grace) = self.resilience.fail_safe {
                slot.keep_for(grace);
                if let Some(until) = kept_until {
                    slot.kept_until = until;
                }
            }
            // after the fail-safe bound, which counts from the expiry
            if let (Some(f), Expiration::Absolute(ttl), None) = (
                self.resilience.eager_refresh,
                self.entry.expiration,
                kept_until,
            ) {
                // (not a fallback served again: its throttle holds)
                slot.refresh_before(ttl.mul_f64(1.0 - f));
            }
            slot
        };
        let text = || self.entry.text().to_owned();
        let unchanged = || inner.epoch.load(Ordering::SeqCst) == self.epoch;
        // No invalidation since the computation began: stored at once. The tier
        // checks under the shard's lock, so an invalidation either began before (then
        // it is not stored here) or finds it.
        let stored =
            memory.enabled() && memory.insert(key, make_slot(), Some(frame), text, unchanged);
        let write = write && inner.remote.is_some();
        if !write && (stored || (!memory.enabled() && unchanged())) {
            return true;
        }
        // Else under the invalidation log's lock: stored, and its write queued, only
        // if no invalidation since reached it (an invalidation that starts after this
        // queues its removal behind the write).
        inner.if_current(key, self.epoch, frame, || {
            if !stored {
                memory.insert(key, make_slot(), Some(frame), text, || true);
            }
            if write {
                self.entry.write(value, frame, remote_epoch);
            }
        })
    }

    /// Counts a call that runs the body.
    fn running(&self) -> BodyTimer {
        self.entry.state.counters.bump(Counter::Miss);
        self.entry.state.counters.bump(Counter::Execution);
        self.served("body");
        BodyTimer::start()
    }

    /// Records the body's run time (with the feature `metrics`).
    fn ran(&self, timer: BodyTimer) {
        timer.stop(self.entry.state.counters.exported());
    }

    /// Records in the miss's span where the value came from: `l1` (another caller
    /// stored it meanwhile), `l2`, `flight` (another caller's body), `body`.
    #[inline(always)]
    fn served(&self, tier: &'static str) {
        if !self.span.is_disabled() {
            record_served(&self.span, tier, self.waited);
        }
    }

    /// Serves a value read from the remote tier: fills the in-process tier until the
    /// remote entry's `deadline` (unix milliseconds; 0 for a sliding entry, which the
    /// read renewed), links the calling function's entry, hands it to the waiters. A
    /// value invalidated while it was read is returned to this caller (whose call
    /// began before the invalidation) but neither kept nor handed on.
    ///
    /// The value's dependencies, as the remote graph names them, become the entry's:
    /// a cached function reading it links to them as to those of a value computed here.
    fn finish_remote(&self, (value, deadline, links): Decoded<K::Stored>, leader: Leader<'_>) -> R {
        self.entry.state.counters.bump(Counter::L2Hit);
        self.served("l2");
        let key = self.entry.key.as_bytes();
        let linked = (!links.is_empty())
            .then(|| Frame::of(links.iter().filter_map(|l| Node::from_remote_id(l))));
        let frame = linked.as_ref().unwrap_or(Frame::EMPTY);
        let deps: Option<Arc<[Node]>> =
            (!frame.nodes.is_empty()).then(|| frame.nodes.as_slice().into());
        let remote_epoch = self.entry.remote_epoch();
        with_frame(|f| f.add_entry(key, deps.as_deref(), self.epoch, remote_epoch));
        let expiration = match deadline {
            _ if !self.entry.inner.memory.enabled() => self.entry.expiration, // not kept here
            0 => self.entry.expiration,
            d => match crate::remote::until(d) {
                Some(left) => Expiration::Absolute(left),
                None => return K::from_stored(value), // expired meanwhile
            },
        };
        if self.keep_in_tiers(&value, frame, expiration, remote_epoch, false, None) {
            leader.complete(|| {
                Arc::new(Handoff {
                    value: (self.entry.ops.into_shared)((self.entry.ops.clone)(&value)),
                    deps,
                    remote_epoch,
                    fallback: false,
                })
            });
        }
        K::from_stored(value)
    }
}

/// Fail-safe: the fallbacks a leader finds, and serving one when the body fails.
impl<K: ReturnKind<R>, R> Miss<'_, K, R> {
    /// The in-process slot kept by fail-safe after it expired, if any.
    fn local_fallback(&self) -> Option<Box<Fallback<K::Stored>>> {
        let e = &self.entry;
        e.inner
            .memory
            .get_fallback(e.key.as_bytes(), self.hash, |slot| {
                Some(Box::new(Fallback {
                    value: (e.ops.from_any)(&slot.value)?,
                    deps: slot.deps.clone(),
                    remote_epoch: slot.remote_epoch,
                    kept_until: slot.kept_until,
                }))
            })
    }

    /// A value read from the remote tier, if it is fresh. With fail-safe, one past
    /// its deadline is kept as the fallback instead, and the body runs.
    fn fresh(&mut self, decoded: Decoded<K::Stored>) -> Option<Decoded<K::Stored>> {
        let (Some(grace), deadline @ 1..) = (self.resilience.fail_safe, decoded.1) else {
            return Some(decoded);
        };
        if crate::remote::until(deadline).is_some() {
            return Some(decoded);
        }
        // served until `grace` past the deadline, on this process's clock
        let kept_for = crate::remote::until(deadline.saturating_add(grace.as_millis() as u64))?;
        let (value, _, links) = decoded;
        let deps: Vec<Node> = links
            .iter()
            .filter_map(|l| Node::from_remote_id(l))
            .collect();
        self.fallback = Some(Box::new(Fallback {
            value,
            deps: (!deps.is_empty()).then(|| deps.into()),
            remote_epoch: self.entry.remote_epoch(),
            kept_until: now_nanos().saturating_add(kept_for.as_nanos() as u64),
        }));
        None
    }

    /// The leader's end after running the body: a failure (`Err`) is answered with
    /// the fallback if there is one, still within `fail_safe`, that no invalidation
    /// reached since the call began; anything else is [`Miss::finish`]ed.
    fn finish_lead(&mut self, result: R, frame: Frame, leader: Leader<'_>) -> R {
        if K::failed(&result) {
            if let Some(fallback) = self.fallback.take() {
                return self.serve_fallback(*fallback, leader).unwrap_or(result);
            }
        }
        let _ = self.finish(&result, frame, Some(leader), false);
        result
    }

    /// With distributed single flight, when another instance's body of the key is
    /// slower than the soft timeout: the fallback read answers this caller and its
    /// waiters, and is not stored (the other instance's value is read once it
    /// lands). The leader back otherwise.
    fn slow_elsewhere<'l>(&mut self, leader: Leader<'l>) -> Result<R, Leader<'l>> {
        // (not after an invalidation of this instance: the body runs then)
        let unchanged = self.entry.inner.epoch.load(Ordering::SeqCst) == self.epoch;
        if !self.entry.holder_slow() || !unchanged {
            return Err(leader);
        }
        let Some(fb) = self.fallback.take() else {
            return Err(leader);
        };
        self.entry.state.counters.bump(Counter::Miss);
        self.entry.state.counters.bump(Counter::SoftTimeout);
        tracing::debug!(target: "cache_runtime", function = %self.entry.state.name, key = %self.entry.text(), "another instance's body is slower than the soft timeout: serving the fallback");
        Ok(self.hand_fallback(*fb, leader))
    }

    /// Counts a fallback served, links the calling function's entry to it, hands it
    /// to the waiters, and returns it.
    fn hand_fallback(&self, fb: Fallback<K::Stored>, leader: Leader<'_>) -> R {
        self.entry.state.counters.bump(Counter::FallbackServed);
        self.served("fallback");
        let key = self.entry.key.as_bytes();
        with_frame(|f| f.add_entry(key, fb.deps.as_deref(), self.epoch, fb.remote_epoch));
        leader.complete(|| {
            Arc::new(Handoff {
                value: (self.entry.ops.into_shared)((self.entry.ops.clone)(&fb.value)),
                deps: fb.deps.clone(),
                remote_epoch: fb.remote_epoch,
                fallback: true,
            })
        });
        K::from_stored(fb.value)
    }

    /// Serves a fallback: it counts as fresh in the in-process tier for the
    /// throttle, so that a failing source is not called on every call, and is handed
    /// to the waiters. The leader back if it is past its bound or an invalidation
    /// reached it.
    fn serve_fallback<'l>(
        &self,
        fb: Fallback<K::Stored>,
        leader: Leader<'l>,
    ) -> Result<R, Leader<'l>> {
        if fb.kept_until != 0 && now_nanos() >= fb.kept_until {
            return Err(leader);
        }
        let linked = fb.deps.as_deref().map(|d| Frame::of(d.iter().cloned()));
        let frame = linked.as_ref().unwrap_or(Frame::EMPTY);
        let throttle = Expiration::Absolute(self.resilience.fail_safe_throttle);
        let kept_until = (fb.kept_until != 0).then_some(fb.kept_until);
        if !self.keep_in_tiers(
            &fb.value,
            frame,
            throttle,
            fb.remote_epoch,
            false,
            kept_until,
        ) {
            return Err(leader);
        }
        tracing::debug!(target: "cache_runtime", function = %self.entry.state.name, key = %self.entry.text(), "served the fail-safe fallback");
        Ok(self.hand_fallback(fb, leader))
    }
}

/// The steps of the miss path, written once for the async and the blocking forms:
/// `$run` runs the body in a dependency frame (it appears in two arms, each of which
/// returns), `$wait` waits for another caller's flight, `$complete` completes a
/// refresh in the shared tiers. `$run_lead`, if given, runs the body as the leader
/// (`$leader`), and returns the leader with the result, or returns from the call
/// (a soft timeout).
macro_rules! miss_loop {
    ($miss:ident, $refresh:expr, $remote:expr, $run:expr, |$flight:ident| $wait:expr, |$pending:ident| $complete:expr) => {
        miss_loop!(
            $miss,
            $refresh,
            $remote,
            |value| $miss.finish_remote(value, leader),
            |leader| {
                let (r, f) = $run;
                (r, f, leader)
            },
            $run,
            |$flight| $wait,
            |$pending| $complete
        )
    };
    ($miss:ident, $refresh:expr, $remote:expr, |$value:ident| $on_remote:expr, |$leader:ident| $run_lead:expr, $run:expr, |$flight:ident| $wait:expr, |$pending:ident| $complete:expr) => {{
        let mut next = $miss.start($refresh);
        loop {
            next = match next {
                Next::Return(r) => return r,
                Next::Lead($leader) => {
                    if let Some($value) = $remote.and_then(|v| $miss.fresh(v)) {
                        return $on_remote;
                    }
                    // another instance runs the body, slower than the soft timeout
                    let $leader = match $miss.slow_elsewhere($leader) {
                        Ok(fallback) => return fallback,
                        Err(leader) => leader,
                    };
                    let timer = $miss.running();
                    let (result, frame, $leader) = $run_lead;
                    $miss.ran(timer);
                    return $miss.finish_lead(result, frame, $leader);
                }
                Next::Wait($flight) => {
                    let waited = $wait;
                    $miss.waited(waited)
                }
                Next::RunAlone => {
                    let timer = $miss.running();
                    let (result, frame) = $run;
                    $miss.ran(timer);
                    if let Some($pending) = $miss.finish(&result, frame, None, $refresh) {
                        $complete;
                    }
                    return result;
                }
            }
        }
    }};
}

/// The miss path of an `async fn`: runs the body under single flight and stores its
/// result; with `path == None` (caching off) just runs the body. `body` makes the
/// body's future, only when it runs.
#[doc(hidden)]
pub async fn run_async<K, R, B, F>(
    path: Option<MissPath>,
    desc: &'static Descriptor,
    ops: &'static ValueOps<K::Stored>,
    body: B,
) -> R
where
    K: ReturnKind<R>,
    B: FnOnce() -> F,
    F: Future<Output = R>,
{
    let Some(path) = path else {
        return boxed(body).await;
    };
    let mut miss = Miss::<K, R>::new(&path, desc, ops);
    if path.refresh {
        // a refresh writes what it computes: with a remote graph, as of the count now
        miss.entry.read_epoch().await;
    }
    // This future is boxed by the caller and allocated on every miss of the
    // in-process tier, remote hits included: what only some misses do is boxed on
    // its own, so that it stays small.
    // - The body runs in a box of its own, made when it runs: the user's future (a
    //   database query's can take kilobytes) is not part of a remote hit's.
    // - Waiting for another caller and completing a refresh: kept inline, their
    //   timers and state made this future larger than the allocator's per-thread
    //   cache takes (1,136 bytes, against 640), and each miss paid for a slower
    //   allocation (64 tasks of L2 hits: 0.80x the raw GET's throughput, 0.87-0.89x
    //   boxed).
    miss_loop!(
        miss,
        path.refresh,
        miss.entry.read().await,
        boxed(|| collect_async(body()).instrument(miss.span.clone())).await,
        |flight| Box::pin(flight.wait(miss.lock_timeout)).await,
        |pending| Box::pin(path.service.inner.complete(pending)).await
    )
}

/// [`run_async`] of a function whose body can go on in the background (an `async
/// fn` with owned parameters, whose future is `Send`): with a soft timeout and a
/// fallback, a body slower than the timeout lets the caller return the fallback, and
/// finishes in the background.
#[doc(hidden)]
pub async fn run_async_background<K, R, B, F>(
    path: Option<MissPath>,
    desc: &'static Descriptor,
    ops: &'static ValueOps<K::Stored>,
    body: B,
) -> R
where
    K: ReturnKind<R> + 'static,
    K::Stored: Send + Sync,
    R: 'static,
    B: FnOnce() -> F,
    F: Future<Output = R> + Send + 'static,
{
    let Some(path) = path else {
        return boxed(body).await;
    };
    let mut miss = Miss::<K, R>::new(&path, desc, ops);
    if path.refresh {
        miss.entry.read_epoch().await;
    }
    miss_loop!(
        miss,
        path.refresh,
        miss.entry.read().await,
        |value| {
            // Without an in-process tier, whose hits start eager refreshes, the
            // remote hit does.
            let due = miss.remote_refresh_due(&value);
            let served = miss.finish_remote(value, leader);
            if due {
                refresh_in_background::<K, R, B, F>(
                    Some(path.for_background(true)),
                    desc,
                    ops,
                    body,
                );
            }
            served
        },
        |leader| {
            let mut running = boxed(|| collect_async(body()).instrument(miss.span.clone()));
            match miss.soft_timeout() {
                None => {
                    let (r, f) = running.await;
                    (r, f, leader)
                }
                Some(d) => match Box::pin(tokio::time::timeout(d, &mut running)).await {
                    Ok((r, f)) => (r, f, leader),
                    Err(_) => match miss.timed_out(leader) {
                        Ok(fallback) => {
                            miss.finish_in_background(running, &path);
                            return fallback;
                        }
                        Err(leader) => {
                            let (r, f) = running.await;
                            (r, f, leader)
                        }
                    },
                },
            }
        },
        boxed(|| collect_async(body()).instrument(miss.span.clone())).await,
        |flight| Box::pin(flight.wait(miss.lock_timeout)).await,
        |pending| Box::pin(path.service.inner.complete(pending)).await
    )
}

/// Starts one refresh of the entry in the background, for a hit past its
/// eager-refresh point (`Lookup::Refresh`): the body runs and its value replaces the
/// entry, unless an invalidation reached it meanwhile. One at a time per key; a body
/// that fails leaves the entry as it was (counted).
#[doc(hidden)]
pub fn refresh_in_background<K, R, B, F>(
    path: Option<MissPath>,
    desc: &'static Descriptor,
    ops: &'static ValueOps<K::Stored>,
    body: B,
) where
    K: ReturnKind<R> + 'static,
    K::Stored: Send + Sync,
    R: 'static,
    B: FnOnce() -> F,
    F: Future<Output = R> + Send + 'static,
{
    let Some(path) = path else { return };
    let Some(slot) = Background::claim(&path) else {
        return;
    };
    let running = boxed(|| collect_async(body()));
    Background::spawn(path.service.clone(), async move {
        let _slot = slot;
        let mut miss = Miss::<K, R>::new(&path, desc, ops);
        // with distributed single flight, one instance refreshes the key
        if !miss.entry.lock_for_refresh().await {
            return;
        }
        let counters = &miss.entry.state.counters;
        counters.bump(Counter::EagerRefresh);
        counters.bump(Counter::Execution);
        miss.epoch = miss.entry.inner.snapshot();
        miss.entry.read_epoch().await;
        let (result, frame) = running.await;
        miss.finish_background(&result, frame);
    });
}

/// A key's body running in the background: at most one per key and service.
struct Background {
    inner: Arc<crate::inner::Inner>,
    key: Arc<[u8]>,
}

impl Background {
    /// The key's place in the background, unless a body of it runs there already.
    fn claim(path: &MissPath) -> Option<Background> {
        let inner = &path.service.inner;
        let key = path.key.shared().clone();
        inner
            .background
            .lock()
            .insert(key.clone())
            .then(|| Background {
                inner: inner.clone(),
                key,
            })
    }

    /// Runs `task` on the tokio runtime, in `service` (the current service of the
    /// call that started it). Outside a runtime it is dropped.
    fn spawn(service: CachingService, task: impl Future<Output = ()> + Send + 'static) {
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        if crate::current::is_global(&service) {
            runtime.spawn(task);
        } else {
            runtime.spawn(service.scope(task));
        }
    }
}

impl Drop for Background {
    fn drop(&mut self) {
        self.inner.background.lock().remove(&self.key);
    }
}

/// Soft timeout: the caller answers with the fallback, the body goes on.
impl<K: ReturnKind<R> + 'static, R: 'static> Miss<'_, K, R>
where
    K::Stored: Send + Sync,
{
    /// Whether a remote hit is past its eager-refresh point, in a service without an
    /// in-process tier (with one, the in-process slot's hits start the refresh).
    fn remote_refresh_due(&self, (_, deadline, _): &Decoded<K::Stored>) -> bool {
        let (Some(f), Expiration::Absolute(ttl)) =
            (self.resilience.eager_refresh, self.entry.expiration)
        else {
            return false;
        };
        !self.entry.inner.memory.enabled()
            && *deadline != 0
            && crate::remote::until(*deadline).is_some_and(|left| left < ttl.mul_f64(1.0 - f))
    }

    /// The soft timeout, if there is one and a fallback to answer with.
    fn soft_timeout(&self) -> Option<Duration> {
        self.resilience
            .soft_timeout
            .filter(|_| self.fallback.is_some())
    }

    /// The body is slower than the soft timeout: the caller gets the fallback (see
    /// [`Miss::serve_fallback`]), or the leader back if there is none to serve.
    fn timed_out<'l>(&mut self, leader: Leader<'l>) -> Result<R, Leader<'l>> {
        let Some(fallback) = self.fallback.take() else {
            return Err(leader);
        };
        let served = self.serve_fallback(*fallback, leader)?;
        self.entry.state.counters.bump(Counter::SoftTimeout);
        Ok(served)
    }

    /// Lets the body past its soft timeout finish in the background, and keeps its
    /// value as a leader would have, unless an invalidation reached it meanwhile. If
    /// a body of the key already runs there, this one is dropped.
    fn finish_in_background<Fut>(&self, running: std::pin::Pin<Box<Fut>>, path: &MissPath)
    where
        Fut: Future<Output = (R, Frame)> + Send + 'static,
    {
        let path = path.for_background(false);
        let Some(slot) = Background::claim(&path) else {
            return;
        };
        let (desc, ops, epoch) = (self.desc, self.entry.ops, self.epoch);
        let remote_epoch = self.entry.remote_epoch_read();
        // the key's remote lock, released once the value is written
        let lock = self.entry.take_lock();
        Background::spawn(path.service.clone(), async move {
            let _slot = slot;
            let (result, frame) = running.await;
            let mut miss = Miss::<K, R>::new(&path, desc, ops);
            miss.epoch = epoch;
            miss.entry.set_remote_epoch(remote_epoch);
            miss.entry.hold(lock);
            miss.finish_background(&result, frame);
        });
    }

    /// Keeps what a body run in the background returned; a failure is counted and
    /// leaves the entry as it was.
    fn finish_background(&self, result: &R, frame: Frame) {
        if K::failed(result) {
            self.entry.state.counters.bump(Counter::BackgroundError);
            tracing::debug!(target: "cache_runtime", function = %self.entry.state.name, key = %self.entry.text(), "a body run in the background failed: the entry is left as it was");
            return;
        }
        let _ = self.finish(result, frame, None, false);
    }
}

/// The span of a miss: the function, the key, then where the value came from
/// (`tier`) and whether the call waited for another caller's flight (`waited`).
/// The body runs in it, so that its own spans (a query's) are inside.
fn miss_span(path: &MissPath) -> Span {
    tracing::debug_span!(
        target: "cache_runtime",
        "cache_miss",
        function = %path.reg.name,
        key = %path.key,
        tier = tracing::field::Empty,
        waited = tracing::field::Empty,
    )
}

#[cold]
#[inline(never)]
fn record_served(span: &Span, tier: &'static str, waited: bool) {
    span.record("tier", tier);
    span.record("waited", waited);
}

/// The future `make` makes, made and boxed outside the miss path's future: made
/// inside it (even as an argument), the compiler keeps room for it there.
fn boxed<F: Future>(make: impl FnOnce() -> F) -> std::pin::Pin<Box<F>> {
    Box::pin(make())
}

/// The miss path of a plain `fn`: concurrent callers of the same key block until the
/// first one finishes, at most the lock timeout.
#[doc(hidden)]
pub fn run_sync<K, R, F>(
    path: Option<MissPath>,
    desc: &'static Descriptor,
    ops: &'static ValueOps<K::Stored>,
    body: F,
) -> R
where
    K: ReturnKind<R>,
    F: FnOnce() -> R,
{
    let Some(path) = path else {
        return body();
    };
    let mut miss = Miss::<K, R>::new(&path, desc, ops);
    let span = miss.span.clone();
    let _entered = span.enter();
    // plain functions use the in-process tier only
    miss_loop!(
        miss,
        path.refresh,
        None::<Decoded<K::Stored>>,
        collect_sync(body),
        |flight| flight.wait_blocking(miss.lock_timeout),
        |pending| miss.service.complete_detached(pending)
    )
}
