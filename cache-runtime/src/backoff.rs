//! The back-off every retry loop of the crates uses.

use std::time::Duration;

/// Delays between attempts that double from `first` up to `max`, and start over after
/// a success ([`Backoff::reset`]). Used by the crates' retry loops (reconnecting,
/// resubscribing, sending failed invalidations again), each with its own bounds.
///
/// ```
/// use cache_runtime::Backoff;
/// use std::time::Duration;
///
/// let mut b = Backoff::new(Duration::from_millis(25), Duration::from_millis(80));
/// let delays: Vec<_> = (0..4).map(|_| b.next_delay().as_millis()).collect();
/// assert_eq!(delays, [25, 50, 80, 80]);
/// b.reset();
/// assert_eq!(b.next_delay(), Duration::from_millis(25));
/// ```
#[derive(Clone, Debug)]
pub struct Backoff {
    first: Duration,
    max: Duration,
    next: Duration,
}

impl Backoff {
    /// Reconnecting to a server: 25 ms, doubling up to 1 s.
    pub const RECONNECT: Backoff = Backoff::new(Duration::from_millis(25), Duration::from_secs(1));

    /// Delays from `first`, doubling, at most `max`.
    pub const fn new(first: Duration, max: Duration) -> Self {
        Backoff {
            first,
            max,
            next: first,
        }
    }

    /// The delay before the next attempt (the one after is twice as long, up to the
    /// maximum).
    pub fn next_delay(&mut self) -> Duration {
        let delay = self.next;
        self.next = (delay * 2).min(self.max);
        delay
    }

    /// Sleeps [`Backoff::next_delay`].
    pub async fn wait(&mut self) {
        tokio::time::sleep(self.next_delay()).await;
    }

    /// An attempt succeeded: the next delay is the first again.
    pub fn reset(&mut self) {
        self.next = self.first;
    }
}
