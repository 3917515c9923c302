//! Deadlines for requests to Redis, kept by one thread that looks at them every few
//! milliseconds.
//!
//! Every request must end within the operation timeout. A tokio timer per request
//! does that, and on an L2 hit it was the largest cost after redis-rs itself: the
//! timer is put in the runtime's wheel on the first poll and taken out when the reply
//! comes, about 640 instructions, plus a copy of the request's future into the
//! `Timeout` that holds it. Here a request that is not answered at its first poll
//! files its deadline and waker in one of a few tables (a lock taken by one thread in
//! the common case), and takes them out when it ends: about a tenth of that. A thread
//! wakes every [`TICK`] while any deadline is filed, and wakes the requests whose
//! deadline passed; it sleeps when there is none. A request thus ends between its
//! deadline and one tick later.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Mutex, OnceLock, PoisonError};
use std::task::{Context, Poll, Waker};
use std::thread::Thread;
use std::time::{Duration, Instant};

/// How often the deadlines are looked at while any is filed.
pub(crate) const TICK: Duration = Duration::from_millis(5);

const SHARDS: usize = 16;

struct Filed {
    /// Milliseconds since [`Clock::start`].
    at: u64,
    waker: Waker,
    passed: bool,
}

#[derive(Default)]
struct Table {
    entries: Vec<Option<Filed>>,
    free: Vec<usize>,
    filed: usize,
}

struct Clock {
    start: Instant,
    tables: [Mutex<Table>; SHARDS],
    /// Set while the thread sleeps with nothing filed.
    idle: AtomicBool,
    thread: OnceLock<Thread>,
}

static CLOCK: OnceLock<Clock> = OnceLock::new();
static NEXT_SHARD: AtomicUsize = AtomicUsize::new(0);

thread_local! {
    /// The table this thread files in: requests mostly start and end on one thread.
    static SHARD: usize = NEXT_SHARD.fetch_add(1, Ordering::Relaxed) % SHARDS;
}

fn clock() -> &'static Clock {
    CLOCK.get_or_init(|| Clock {
        start: Instant::now(),
        tables: std::array::from_fn(|_| Mutex::new(Table::default())),
        // no thread yet: the first deadline filed starts it
        idle: AtomicBool::new(true),
        thread: OnceLock::new(),
    })
}

impl Clock {
    fn now(&self) -> u64 {
        self.start.elapsed().as_millis() as u64
    }

    fn file(&'static self, at: u64, waker: &Waker) -> (usize, usize) {
        let shard = SHARD.try_with(|s| *s).unwrap_or(0);
        let mut t = self.tables[shard]
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let filed = Filed {
            at,
            waker: waker.clone(),
            passed: false,
        };
        let slot = match t.free.pop() {
            Some(i) => {
                t.entries[i] = Some(filed);
                i
            }
            None => {
                t.entries.push(Some(filed));
                t.entries.len() - 1
            }
        };
        t.filed += 1;
        drop(t);
        // the thread may have found every table empty before this one was filed
        if self.idle.load(Ordering::SeqCst) {
            self.wake_thread();
        }
        (shard, slot)
    }

    /// Whether the deadline filed at `at` passed; keeps its waker current.
    fn passed(&self, (shard, slot): (usize, usize), waker: &Waker) -> bool {
        let mut t = self.tables[shard]
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        match &mut t.entries[slot] {
            Some(f) if f.passed => true,
            Some(f) => {
                if !f.waker.will_wake(waker) {
                    f.waker = waker.clone();
                }
                false
            }
            None => true,
        }
    }

    fn remove(&self, (shard, slot): (usize, usize)) {
        let mut t = self.tables[shard]
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        if t.entries[slot].take().is_some() {
            t.free.push(slot);
            t.filed -= 1;
        }
    }

    fn wake_thread(&'static self) {
        self.thread
            .get_or_init(|| {
                std::thread::Builder::new()
                    .name("cache-redis-deadlines".into())
                    .spawn(move || self.run())
                    .expect("starting the thread that keeps Redis request deadlines")
                    .thread()
                    .clone()
            })
            .unpark();
    }

    /// The thread: wakes the requests whose deadline passed, every tick while any is
    /// filed.
    fn run(&'static self) {
        self.idle.store(false, Ordering::SeqCst);
        let mut due = Vec::new();
        loop {
            let now = self.now();
            let mut filed = 0;
            for table in &self.tables {
                let mut t = table.lock().unwrap_or_else(PoisonError::into_inner);
                filed += t.filed;
                for f in t.entries.iter_mut().flatten() {
                    if !f.passed && f.at <= now {
                        f.passed = true;
                        due.push(f.waker.clone());
                    }
                }
            }
            for waker in due.drain(..) {
                waker.wake();
            }
            if filed == 0 {
                self.idle.store(true, Ordering::SeqCst);
                // filed meanwhile: `file` saw `idle` false, so look again
                let any = self
                    .tables
                    .iter()
                    .any(|t| t.lock().unwrap_or_else(PoisonError::into_inner).filed > 0);
                if !any {
                    std::thread::park();
                }
                self.idle.store(false, Ordering::SeqCst);
            } else {
                std::thread::sleep(TICK);
            }
        }
    }
}

/// `fut`, ended with an error once `within` has passed (and at most one [`TICK`]
/// later).
pub(crate) fn within<F>(within: Duration, fut: F) -> Deadline<F> {
    maybe_within(Some(within), fut)
}

/// [`within`], or `fut` as it is with `None`.
pub(crate) fn maybe_within<F>(within: Option<Duration>, fut: F) -> Deadline<F> {
    Deadline {
        fut,
        within,
        filed: None,
    }
}

pin_project_lite::pin_project! {
    /// See [`within`].
    pub(crate) struct Deadline<F> {
        #[pin]
        fut: F,
        within: Option<Duration>,
        filed: Option<(usize, usize)>,
    }

    impl<F> PinnedDrop for Deadline<F> {
        fn drop(this: Pin<&mut Self>) {
            if let Some(filed) = this.filed {
                clock().remove(filed);
            }
        }
    }
}

/// What a request that passed its deadline ends with: the error redis-rs gives when
/// a reply does not come within the response timeout.
pub(crate) fn timed_out() -> redis::RedisError {
    std::io::Error::from(std::io::ErrorKind::TimedOut).into()
}

impl<F, T> Future for Deadline<F>
where
    F: Future<Output = redis::RedisResult<T>>,
{
    type Output = redis::RedisResult<T>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.project();
        if let Poll::Ready(out) = this.fut.poll(cx) {
            if let Some(filed) = this.filed.take() {
                clock().remove(filed);
            }
            return Poll::Ready(out);
        }
        let Some(within) = *this.within else {
            return Poll::Pending;
        };
        let clock = clock();
        match *this.filed {
            None => {
                let at = clock.now() + within.as_millis() as u64;
                *this.filed = Some(clock.file(at, cx.waker()));
            }
            Some(filed) => {
                if clock.passed(filed, cx.waker()) {
                    clock.remove(filed);
                    *this.filed = None;
                    return Poll::Ready(Err(timed_out()));
                }
            }
        }
        Poll::Pending
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_request_that_is_not_answered_ends_after_its_deadline() {
        let start = Instant::now();
        let never = std::future::pending::<redis::RedisResult<()>>();
        let e = within(Duration::from_millis(50), never).await.unwrap_err();
        let took = start.elapsed();
        assert_eq!(e.kind(), redis::ErrorKind::Io);
        assert!(took >= Duration::from_millis(50), "{took:?}");
        assert!(took < Duration::from_secs(2), "{took:?}");
    }

    #[tokio::test]
    async fn an_answered_request_keeps_its_reply_and_leaves_nothing_filed() {
        for _ in 0..1000 {
            let reply = within(Duration::from_millis(50), async {
                tokio::task::yield_now().await;
                Ok::<_, redis::RedisError>(7)
            })
            .await;
            assert_eq!(reply.unwrap(), 7);
        }
        let filed: usize = clock().tables.iter().map(|t| t.lock().unwrap().filed).sum();
        // other tests of this module may have deadlines filed at the same time
        assert!(filed < 100, "{filed}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn deadlines_filed_after_the_thread_slept_still_pass() {
        for _ in 0..3 {
            let never = std::future::pending::<redis::RedisResult<()>>();
            assert!(within(Duration::from_millis(20), never).await.is_err());
            // long enough for the thread to find nothing filed and sleep
            tokio::time::sleep(TICK * 4).await;
        }
    }
}
