//! An invalidation in this process: the entries and their dependents removed from the
//! in-process tier, the running flights that read them detached, the invalidation
//! counted and logged (so that a computation across it is not kept), and what is left
//! to do in the shared tiers ([`Pending`]), which `invalidate.rs` completes.

use std::collections::HashSet;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use crate::bus::Item;
use crate::deps::Node;
use crate::held::Hold;
use crate::inner::Inner;
use crate::pending::{Pending, RemoteJob};

impl Inner {
    /// Every invalidation of this instance goes through here: removes the entries
    /// under `nodes` (entry nodes) and everything that depends on `nodes`, here; what
    /// it returns completes it in the shared tiers ([`Inner::complete`]).
    pub(crate) fn invalidate(&self, nodes: Vec<Node>) -> Pending {
        let mut named: Vec<Arc<[u8]>> = Vec::new();
        let mut dependencies = Vec::new();
        for n in &nodes {
            match n {
                Node::Entry(k) => named.push(k.clone()),
                Node::Key(d) => dependencies.push(d.to_string()),
                Node::Remote(_) => {}
            }
        }
        let mut start = nodes;
        let mut named_texts = Vec::new();
        if self.bus.is_some() || self.remote.is_some() {
            named_texts = named
                .iter()
                .filter_map(|k| Some(crate::key::Key::from_bytes(k)?.to_text(self.max_key_length)))
                .collect();
            // and what depends on them through entries read from the remote tier
            start.extend(named_texts.iter().map(|t| Node::Remote(t.as_str().into())));
        }
        let remote_graph = self.remote.as_ref().is_some_and(|r| r.graph().is_some());
        self.invalidating(start, true, |removed| {
            named.extend(removed.iter().cloned());
            let mut pending = self.pending(named, dependencies, None);
            // A remote graph finds the dependents itself: it starts from the entries
            // named here, not from every dependent this instance knows of.
            if remote_graph {
                pending.remote.named = named_texts;
            }
            self.held.hold(&pending.hold);
            pending
        })
    }

    /// Removes the entries depending on the entry `key`, not the entry itself (its
    /// value was just replaced, by a refresh).
    pub(crate) fn invalidate_dependents(&self, key: &[u8]) -> Pending {
        self.invalidating(vec![Node::Entry(key.into())], false, |removed| {
            let pending = self.pending(removed.to_vec(), Vec::new(), Some(key));
            self.held.hold(&pending.hold);
            pending
        })
    }

    /// What an invalidation leaves to do in the shared tiers: `entries` removed,
    /// `dependencies` invalidated, and with `replaced`, an entry given a new value.
    pub(crate) fn pending(
        &self,
        mut entries: Vec<Arc<[u8]>>,
        dependencies: Vec<String>,
        replaced: Option<&[u8]>,
    ) -> Pending {
        if self.remote.is_none() && self.bus.is_none() {
            return Pending::default();
        }
        entries.sort_unstable();
        entries.dedup();
        let text = |bytes: &[u8]| {
            crate::key::Key::from_bytes(bytes).map(|k| k.to_text(self.max_key_length))
        };
        let removed: Vec<String> = entries.iter().filter_map(|k| text(k)).collect();
        let replaced = replaced.and_then(text);
        let mut items = Vec::new();
        if self.bus.is_some() {
            items.extend(dependencies.iter().cloned().map(Item::Dependency));
            items.extend(removed.iter().cloned().map(Item::Removed));
            items.extend(replaced.iter().cloned().map(Item::Replaced));
        }
        if self.remote.is_none() {
            return Pending {
                items,
                ..Pending::default()
            };
        }
        // until the remote tier confirms, none of these is read from it
        let mut hold = Hold::default();
        hold.nodes.extend(removed.iter().map(|t| format!("e:{t}")));
        hold.nodes.extend(replaced.iter().map(|t| format!("e:{t}")));
        hold.nodes
            .extend(dependencies.iter().map(|d| format!("d:{d}")));
        Pending {
            remote: RemoteJob {
                // a replaced entry waits for its write, even with nothing to remove
                barrier: replaced.is_some(),
                removed,
                named: Vec::new(),
                dependencies,
                replaced,
                clear: false,
            },
            hold,
            items,
        }
    }

    /// Removes, in this process, the entries under the entry nodes of `start` (with
    /// `remove_start`) and every entry depending on `start`. Under the invalidation
    /// log's lock: count it, remove, detach the running flights of what it reached
    /// (so no later call joins a computation that may have read it), record what
    /// was reached, and run `then` with the entries removed (an invalidation holds
    /// its nodes there, so that no call starting after it reads them from the remote
    /// tier before the removal reaches it).
    pub(crate) fn invalidating<R>(
        &self,
        start: Vec<Node>,
        remove_start: bool,
        then: impl FnOnce(&[Arc<[u8]>]) -> R,
    ) -> R {
        let mut keys: Vec<Arc<[u8]>> = Vec::new();
        if remove_start {
            keys.extend(start.iter().filter_map(|n| match n {
                Node::Entry(k) => Some(k.clone()),
                Node::Key(_) | Node::Remote(_) => None,
            }));
        }
        let starting: Vec<Node> = if remove_start {
            Vec::new()
        } else {
            start.clone()
        };
        let mut log = self.log.lock();
        let epoch = self.epoch.fetch_add(1, Ordering::SeqCst) + 1;
        let (dependents, mut reached) = self.graph.dependents(start, remove_start);
        for n in &starting {
            // the entry itself stays valid
            reached.remove(n);
        }
        keys.extend(dependents);
        let removed = self.memory.remove_all(keys);
        self.flights.detach(reached.iter().filter_map(|n| match n {
            Node::Entry(k) => Some(&**k),
            Node::Key(_) | Node::Remote(_) => None,
        }));
        log.record(epoch, reached);
        let result = then(&removed);
        // Only now may a computation start from this count: the entries are gone and
        // the holds are in place (a read of the remote tier that starts from it is
        // held back until the removal reaches the tier).
        self.settled.store(epoch, Ordering::SeqCst);
        drop(log);
        removed.iter().for_each(|key| self.count_invalidation(key));
        result
    }

    /// Removes here, locally only, the entries named by readable keys.
    pub(crate) fn remove_local(&self, texts: &[String]) {
        let nodes = self.nodes_named(texts);
        if !nodes.is_empty() {
            self.invalidating(nodes, true, |_| ());
        }
    }

    /// The entries held under the readable keys `texts`, and the running flights of
    /// them (a call computing one now may have read the old value). The running
    /// flights' keys are rendered once, whatever the number of texts.
    pub(crate) fn nodes_named(&self, texts: &[String]) -> Vec<Node> {
        if texts.is_empty() {
            return Vec::new();
        }
        let wanted: HashSet<&str> = texts.iter().map(String::as_str).collect();
        let renders_to_one = |bytes: &[u8]| {
            crate::key::Key::from_bytes(bytes)
                .is_some_and(|k| wanted.contains(k.to_text(self.max_key_length).as_str()))
        };
        let mut nodes: Vec<Node> = self
            .flights
            .keys_matching(renders_to_one)
            .into_iter()
            .map(Node::Entry)
            .collect();
        for text in texts {
            if let Some(key) = self.memory.key_of(text) {
                nodes.push(Node::Entry(key.into()));
            }
            // what depends on it through an entry read from the remote tier
            nodes.push(Node::Remote(text.as_str().into()));
        }
        nodes
    }

    /// Removes every entry of this process's tier and every link, and ends the
    /// running flights.
    pub(crate) fn clear_local(&self) {
        let mut log = self.log.lock();
        let epoch = self.epoch.fetch_add(1, Ordering::SeqCst) + 1;
        self.flights.detach_all();
        self.memory.clear();
        self.graph.clear();
        self.settled.store(epoch, Ordering::SeqCst);
        log.entries.clear();
        log.floor = epoch;
    }
}
