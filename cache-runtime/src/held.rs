//! Invalidations of this instance that the remote store has not confirmed yet, and
//! what they cover.
//!
//! An invalidation removes its entries here at once, then from the remote store. From
//! the moment it is decided (under the invalidation log's lock) until the store
//! confirms the removal, its nodes are *held*: a value read from the store that is one
//! of them (`e:{readable key}`), or that links to one of them (`e:...`,
//! `d:{dependency}`; links are flattened, so every dependent carries them), is not
//! served and not kept: the caller runs the body instead. A removal the store refused
//! (a missing permission, `READONLY`, a script error, the store down) keeps its hold
//! until a later attempt goes through, so the instance that invalidated never reads
//! the old value back, whatever the store does.
//!
//! A read compares against the holds in place when its reply is handled, and against
//! those released while it was in flight (a removal confirmed after the read was
//! answered with the old value): it takes a [`Held::mark`] before sending. Checking
//! costs two atomic loads while nothing is held and nothing was released meanwhile.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

/// What one invalidation holds until the store confirms it.
#[derive(Clone, Debug, Default)]
pub(crate) struct Hold {
    /// Graph node ids: `e:{readable key}` and `d:{dependency}`.
    pub(crate) nodes: Vec<String>,
    /// Every entry (a clear).
    pub(crate) all: bool,
}

impl Hold {
    pub(crate) fn all() -> Self {
        Hold {
            nodes: Vec::new(),
            all: true,
        }
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.nodes.is_empty() && !self.all
    }
}

/// How many released holds are remembered for reads still in flight; a read that
/// lasted across more releases than this is treated as covered.
const RECENT: usize = 1024;

#[derive(Default)]
pub(crate) struct Held {
    /// Holds in place.
    busy: AtomicUsize,
    /// Holds released so far (numbers the releases).
    released: AtomicU64,
    state: parking_lot::Mutex<State>,
}

#[derive(Default)]
struct State {
    /// Node id to the number of holds naming it.
    nodes: HashMap<String, usize>,
    /// Holds of everything in place.
    all: usize,
    /// The last released holds, with their release numbers.
    recent: VecDeque<(u64, Hold)>,
    /// Releases up to this number are no longer in `recent`.
    floor: u64,
}

impl Held {
    /// Holds `hold`'s nodes until [`Held::release`].
    pub(crate) fn hold(&self, hold: &Hold) {
        if hold.is_empty() {
            return;
        }
        let mut s = self.state.lock();
        for n in &hold.nodes {
            *s.nodes.entry(n.clone()).or_default() += 1;
        }
        s.all += usize::from(hold.all);
        self.busy.fetch_add(1, Ordering::SeqCst);
    }

    /// The store confirmed the invalidation that took `hold`.
    pub(crate) fn release(&self, hold: Hold) {
        if hold.is_empty() {
            return;
        }
        let mut s = self.state.lock();
        for n in &hold.nodes {
            if let Some(count) = s.nodes.get_mut(n) {
                *count -= 1;
                if *count == 0 {
                    s.nodes.remove(n);
                }
            }
        }
        s.all -= usize::from(hold.all);
        let number = self.released.load(Ordering::SeqCst) + 1;
        s.recent.push_back((number, hold));
        if s.recent.len() > RECENT {
            if let Some((n, _)) = s.recent.pop_front() {
                s.floor = n;
            }
        }
        // before `busy` drops: a reader that sees it drop sees the release too
        self.released.store(number, Ordering::SeqCst);
        self.busy.fetch_sub(1, Ordering::SeqCst);
    }

    /// Taken before a read is sent, for [`Held::covers`].
    #[inline]
    pub(crate) fn mark(&self) -> u64 {
        self.released.load(Ordering::SeqCst)
    }

    /// Whether no invalidation of this instance was pending or released since `mark`:
    /// then [`Held::covers`] holds nothing back, whatever the key.
    #[inline]
    pub(crate) fn quiet(&self, mark: u64) -> bool {
        self.busy.load(Ordering::SeqCst) == 0 && self.released.load(Ordering::SeqCst) == mark
    }

    /// Whether a value read since `mark` under the readable key `key` with the links
    /// `links` may be one an invalidation of this instance removed: a hold in place
    /// names it or a link, or one released since the mark did.
    pub(crate) fn covers(&self, mark: u64, key: &str, links: &[String]) -> bool {
        if self.quiet(mark) {
            return false;
        }
        let own = format!("e:{key}");
        let s = self.state.lock();
        if s.all > 0 || mark < s.floor {
            return true;
        }
        let named = |n: &str| n == own || links.iter().any(|l| l == n);
        if s.nodes.contains_key(&own) || links.iter().any(|l| s.nodes.contains_key(l)) {
            return true;
        }
        s.recent
            .iter()
            .rev()
            .take_while(|(n, _)| *n > mark)
            .any(|(_, h)| h.all || h.nodes.iter().any(|n| named(n)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hold(nodes: &[&str]) -> Hold {
        Hold {
            nodes: nodes.iter().map(|s| s.to_string()).collect(),
            all: false,
        }
    }

    #[test]
    fn a_hold_covers_its_entries_and_their_dependents_until_released() {
        let held = Held::default();
        let mark = held.mark();
        assert!(!held.covers(mark, "k(1)", &[]));
        let h = hold(&["e:k(1)", "d:order:7"]);
        held.hold(&h);
        assert!(held.covers(mark, "k(1)", &[]));
        assert!(held.covers(mark, "page(1)", &["d:order:7".into()]));
        assert!(held.covers(mark, "page(2)", &["e:k(1)".into()]));
        assert!(!held.covers(mark, "k(2)", &["d:order:8".into()]));
        held.release(h);
        // a read that started before the release may hold the old value
        assert!(held.covers(mark, "k(1)", &[]));
        let later = held.mark();
        assert!(!held.covers(later, "k(1)", &[]));
        assert_eq!(held.busy.load(Ordering::SeqCst), 0);
    }

    #[test]
    fn holds_of_one_node_are_counted() {
        let held = Held::default();
        let (a, b) = (hold(&["e:k"]), hold(&["e:k"]));
        held.hold(&a);
        held.hold(&b);
        held.release(a);
        assert!(held.covers(held.mark(), "k", &[]));
        held.release(b);
        assert!(!held.covers(held.mark(), "k", &[]));
    }

    #[test]
    fn a_clear_covers_everything_and_old_reads_stay_covered() {
        let held = Held::default();
        let mark = held.mark();
        held.hold(&Hold::all());
        assert!(held.covers(held.mark(), "any", &[]));
        held.release(Hold::all());
        assert!(held.covers(mark, "any", &[]));
        for _ in 0..RECENT + 1 {
            let h = hold(&["e:other"]);
            held.hold(&h);
            held.release(h);
        }
        // released beyond what is remembered: covered, to be safe
        assert!(held.covers(mark, "any", &[]));
        assert!(!held.covers(held.mark(), "any", &[]));
    }
}
