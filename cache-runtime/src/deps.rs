//! Dependencies: what an entry depends on, collected while its body runs, and the
//! graph that turns one invalidation into the removal of every entry that depends on
//! it, transitively.
//!
//! Nodes are dependency keys (`add_dependency("order:7")`) and entries themselves: an
//! entry computed while calling another cached function depends on that function's
//! entry, and on everything that entry depends on (whether the inner call was a hit
//! or a miss). Invalidating a node removes its dependents, then their dependents, and
//! so on; each entry is visited once, so cycles terminate.
//!
//! Collection uses a task-local frame per running body. A frame exists only inside a
//! cached function's body: `add_dependency` elsewhere does nothing, and neither does it
//! in a task spawned from the body (task-locals are not inherited).

use std::cell::RefCell;
use std::collections::{HashMap, HashSet, VecDeque};
use std::future::Future;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

/// A node of the dependency graph.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub(crate) enum Node {
    /// A dependency key (`add_dependency`).
    Key(Arc<str>),
    /// A cached entry, by its in-process key.
    Entry(Arc<[u8]>),
    /// A cached entry known by its readable key only: a dependency of an entry read
    /// from the remote tier, as the remote graph names it.
    Remote(Arc<str>),
}

impl Node {
    /// The node's id in a remote graph: `d:{dependency}`, or `e:{readable key}`.
    pub(crate) fn remote_id(&self, max_key_length: usize) -> Option<String> {
        match self {
            Node::Key(d) => Some(format!("d:{d}")),
            Node::Entry(bytes) => crate::key::Key::from_bytes(bytes)
                .map(|k| format!("e:{}", k.to_text(max_key_length))),
            Node::Remote(text) => Some(format!("e:{text}")),
        }
    }

    /// The node a remote graph's id names (see [`Node::remote_id`]).
    pub(crate) fn from_remote_id(id: &str) -> Option<Node> {
        match id.split_at_checked(2)? {
            ("d:", d) => Some(Node::Key(d.into())),
            ("e:", e) => Some(Node::Remote(e.into())),
            _ => None,
        }
    }

    /// The dependency key of a dependency node.
    pub(crate) fn dependency_key(&self) -> Option<String> {
        match self {
            Node::Key(d) => Some(d.to_string()),
            Node::Entry(_) | Node::Remote(_) => None,
        }
    }
}

/// Something an entry can depend on: a dependency key, with the keys invalidated along
/// with it (its cascade). Built from strings and from any [`CacheDependency`].
///
/// ```
/// use cache_runtime::Dependency;
///
/// let d: Dependency = "order:7".into();
/// assert_eq!(d.key(), "order:7");
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Dependency {
    key: Arc<str>,
    cascade: Vec<Dependency>,
}

impl Dependency {
    /// A dependency on `key`.
    pub fn new(key: impl Into<Arc<str>>) -> Self {
        Dependency {
            key: key.into(),
            cascade: Vec::new(),
        }
    }

    /// Adds dependencies invalidated whenever this one is.
    pub fn cascade(mut self, also: impl IntoIterator<Item = Dependency>) -> Self {
        self.cascade.extend(also);
        self
    }

    /// The dependency key.
    pub fn key(&self) -> &str {
        &self.key
    }
}

/// A type that entries can depend on, such as a domain object whose changes must
/// invalidate every cached value computed from it.
///
/// ```
/// use cache_runtime::{CacheDependency, Dependency};
///
/// struct Order { id: u64, customer_id: u64 }
///
/// impl CacheDependency for Order {
///     fn dependency_key(&self) -> String {
///         format!("order:{}", self.id)
///     }
///     /// Invalidating an order also invalidates what depends on its customer.
///     fn cascade(&self) -> Vec<Dependency> {
///         vec![Dependency::new(format!("customer:{}", self.customer_id))]
///     }
/// }
/// ```
pub trait CacheDependency {
    /// The dependency key, unique for what it stands for (`"order:7"`).
    fn dependency_key(&self) -> String;
    /// Dependencies invalidated along with this one.
    fn cascade(&self) -> Vec<Dependency> {
        Vec::new()
    }
}

impl CacheDependency for str {
    fn dependency_key(&self) -> String {
        self.to_owned()
    }
}
impl CacheDependency for String {
    fn dependency_key(&self) -> String {
        self.clone()
    }
}
impl<T: CacheDependency + ?Sized> CacheDependency for &T {
    fn dependency_key(&self) -> String {
        (**self).dependency_key()
    }
    fn cascade(&self) -> Vec<Dependency> {
        (**self).cascade()
    }
}
impl<T: CacheDependency + ?Sized> CacheDependency for Arc<T> {
    fn dependency_key(&self) -> String {
        (**self).dependency_key()
    }
    fn cascade(&self) -> Vec<Dependency> {
        (**self).cascade()
    }
}

impl<T: CacheDependency> From<T> for Dependency {
    fn from(value: T) -> Self {
        Dependency {
            key: value.dependency_key().into(),
            cascade: value.cascade(),
        }
    }
}

/// The nodes invalidated by invalidating `dep`: its key and its cascade's, recursively.
pub(crate) fn nodes_of(dep: &Dependency) -> Vec<Node> {
    let mut nodes = vec![Node::Key(dep.key.clone())];
    for c in &dep.cascade {
        nodes.extend(nodes_of(c));
    }
    nodes
}

/// What one running body has collected.
#[derive(Default)]
pub(crate) struct Frame {
    pub(crate) nodes: Vec<Node>,
    /// For each node, the invalidation count when it was read: a nested cached call
    /// reads its entry at a known moment; `add_dependency` records 0, for "since the
    /// body started", since what the body read for it may be older than the call.
    pub(crate) read_epoch: Vec<u64>,
    pub(crate) cascades: Vec<(Arc<str>, Vec<Node>)>,
    /// The oldest remote invalidation count as of which an entry read here was
    /// current (see [`crate::Fetched::epoch`]): a value computed from it is as old.
    pub(crate) remote_epoch: Option<u64>,
    /// Inside `untracked`: collect nothing.
    suspended: bool,
}

impl Frame {
    /// A frame with nothing in it, for values that depend on nothing.
    pub(crate) const EMPTY: &Frame = &Frame {
        nodes: Vec::new(),
        read_epoch: Vec::new(),
        cascades: Vec::new(),
        remote_epoch: None,
        suspended: false,
    };

    /// A frame holding `nodes`, read since the body started.
    pub(crate) fn of(nodes: impl Iterator<Item = Node>) -> Frame {
        let nodes: Vec<Node> = nodes.collect();
        Frame {
            read_epoch: vec![0; nodes.len()],
            nodes,
            ..Frame::default()
        }
    }

    fn add(&mut self, node: Node, read_epoch: u64) {
        if self.suspended {
            return;
        }
        match self.nodes.iter().position(|n| *n == node) {
            // keep the earliest read: the value may come from it
            Some(i) => self.read_epoch[i] = self.read_epoch[i].min(read_epoch),
            None => {
                self.nodes.push(node);
                self.read_epoch.push(read_epoch);
            }
        }
    }

    fn add_dependency(&mut self, dep: Dependency) {
        if self.suspended {
            return;
        }
        self.record_cascade(&dep);
        self.add(Node::Key(dep.key), 0);
    }

    /// Records the dependencies invalidated along with `dep`, and theirs.
    fn record_cascade(&mut self, dep: &Dependency) {
        if dep.cascade.is_empty() {
            return;
        }
        let nodes = dep
            .cascade
            .iter()
            .map(|c| Node::Key(c.key.clone()))
            .collect();
        self.cascades.push((dep.key.clone(), nodes));
        for c in &dep.cascade {
            self.record_cascade(c);
        }
    }

    /// Links to another entry, read when the invalidation count was `read_epoch`: the
    /// entry itself and what it depends on.
    ///
    /// `remote_epoch` is the remote invalidation count as of which the entry was current.
    pub(crate) fn add_entry(
        &mut self,
        key: &[u8],
        deps: Option<&[Node]>,
        read_epoch: u64,
        remote_epoch: u64,
    ) {
        if self.suspended {
            return;
        }
        self.remote_epoch = Some(
            self.remote_epoch
                .map_or(remote_epoch, |a| a.min(remote_epoch)),
        );
        self.add(Node::Entry(key.into()), read_epoch);
        for node in deps.into_iter().flatten() {
            self.add(node.clone(), read_epoch);
        }
    }
}

tokio::task_local! {
    static FRAME: RefCell<Frame>;
}

/// How many frames exist in the process: while none does, a call skips the
/// task-local lookup.
static FRAMES: AtomicUsize = AtomicUsize::new(0);

/// Counts one live thing in a process-wide counter while it exists: task-local scopes
/// (frames here, scoped services) are looked up only while their counter is not zero.
pub(crate) struct Live(&'static AtomicUsize);

impl Live {
    pub(crate) fn enter(counter: &'static AtomicUsize) -> Self {
        counter.fetch_add(1, Ordering::Relaxed);
        Live(counter)
    }
}

impl Drop for Live {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Runs `f` on the frame of the body running here, if there is one.
#[inline]
pub(crate) fn with_frame(f: impl FnOnce(&mut Frame)) {
    if FRAMES.load(Ordering::Relaxed) == 0 {
        return;
    }
    let _ = FRAME.try_with(|frame| {
        if let Ok(mut frame) = frame.try_borrow_mut() {
            f(&mut frame);
        }
    });
}

/// Whether a body is collecting dependencies here (cheap when none is anywhere).
#[inline]
pub(crate) fn collecting() -> bool {
    FRAMES.load(Ordering::Relaxed) != 0
        && FRAME.try_with(|f| !f.borrow().suspended).unwrap_or(false)
}

/// Runs `body` in a new frame and returns what it collected.
pub(crate) async fn collect_async<F: Future>(body: F) -> (F::Output, Frame) {
    let _live = Live::enter(&FRAMES);
    let frame = RefCell::new(Frame::default());
    FRAME
        .scope(frame, async move {
            let out = body.await;
            let frame = FRAME.with(|f| std::mem::take(&mut *f.borrow_mut()));
            (out, frame)
        })
        .await
}

/// Runs `body` in a new frame and returns what it collected (plain functions).
pub(crate) fn collect_sync<R>(body: impl FnOnce() -> R) -> (R, Frame) {
    let _live = Live::enter(&FRAMES);
    FRAME.sync_scope(RefCell::new(Frame::default()), || {
        let out = body();
        let frame = FRAME.with(|f| std::mem::take(&mut *f.borrow_mut()));
        (out, frame)
    })
}

/// Declares that the cached function running here depends on `dependency`: invalidating
/// it (with [`invalidate_dependency`](crate::invalidate_dependency)) removes this
/// function's entry. Outside a cached function's body it does nothing, and so inside a
/// task spawned from the body.
///
/// ```
/// use cache_runtime::{add_dependency, cached, invalidate_dependency};
///
/// #[cached]
/// async fn order_total(order_id: u64) -> u64 {
///     add_dependency(format!("order:{order_id}"));
///     100
/// }
///
/// # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
/// order_total(7).await;
/// invalidate_dependency("order:7").await; // the next call runs the body again
/// # });
/// ```
pub fn add_dependency(dependency: impl Into<Dependency>) {
    if FRAMES.load(Ordering::Relaxed) == 0 {
        return;
    }
    let dependency = dependency.into();
    with_frame(|f| f.add_dependency(dependency));
}

/// Runs `future` without collecting dependencies: the cached calls and
/// `add_dependency` calls it makes are not linked to the cached function around it.
pub async fn untracked<F: Future>(future: F) -> F::Output {
    let _live = Live::enter(&FRAMES);
    let frame = Frame {
        suspended: true,
        ..Frame::default()
    };
    FRAME.scope(RefCell::new(frame), future).await
}

/// The dependency graph of a service: which entries depend on which nodes. The
/// in-process tier tells it about the entries it stores and drops; an invalidation asks
/// it for the dependents to remove. [`MemoryGraph`] keeps it in this process.
pub(crate) trait DependencyGraph: Send + Sync {
    /// Records what `entry` depends on, replacing what it depended on before.
    fn link(&self, entry: &[u8], frame: &Frame);
    /// Forgets what `entry` depends on (it was removed or replaced).
    fn unlink(&self, entry: &[u8]);
    /// Every entry that depends, directly or not, on `start`, and every node reached
    /// on the way (`start` included); see [`Graph::dependents`].
    fn dependents(&self, start: Vec<Node>, unlink_start: bool) -> (Vec<Arc<[u8]>>, HashSet<Node>);
    /// Forgets everything.
    fn clear(&self);
}

/// The dependency graph in this process's memory. Until an entry has dependencies,
/// every operation is a flag check.
#[derive(Default)]
pub(crate) struct MemoryGraph {
    graph: parking_lot::Mutex<Graph>,
    /// Set once any entry has had dependencies.
    linked: std::sync::atomic::AtomicBool,
}

impl MemoryGraph {
    fn linked(&self) -> bool {
        self.linked.load(Ordering::Relaxed)
    }

    #[cfg(test)]
    pub(crate) fn sizes(&self) -> (usize, usize, usize) {
        self.graph.lock().sizes()
    }
}

impl DependencyGraph for MemoryGraph {
    fn link(&self, entry: &[u8], frame: &Frame) {
        if !frame.nodes.is_empty() {
            self.linked.store(true, Ordering::Relaxed);
        }
        if self.linked() {
            self.graph.lock().link(entry, frame);
        }
    }

    fn unlink(&self, entry: &[u8]) {
        if self.linked() {
            self.graph.lock().unlink(entry);
        }
    }

    fn dependents(&self, start: Vec<Node>, unlink_start: bool) -> (Vec<Arc<[u8]>>, HashSet<Node>) {
        if !self.linked() {
            return (Vec::new(), start.into_iter().collect());
        }
        self.graph.lock().dependents(start, unlink_start)
    }

    fn clear(&self) {
        self.graph.lock().clear();
    }
}

/// The graph's data.
#[derive(Default)]
pub(crate) struct Graph {
    /// What each entry depends on.
    forward: HashMap<Arc<[u8]>, Vec<Node>>,
    /// The entries that depend on each node.
    reverse: HashMap<Node, HashSet<Arc<[u8]>>>,
    /// Dependency keys invalidated along with a key, while some entry depends on it.
    cascades: HashMap<Arc<str>, HashSet<Node>>,
}

impl Graph {
    /// Records what `entry` depends on, replacing what it depended on before.
    pub(crate) fn link(&mut self, entry: &[u8], frame: &Frame) {
        self.unlink(entry);
        if frame.nodes.is_empty() {
            return;
        }
        let entry: Arc<[u8]> = entry.into();
        for node in &frame.nodes {
            self.reverse
                .entry(node.clone())
                .or_default()
                .insert(entry.clone());
        }
        for (key, cascade) in &frame.cascades {
            self.cascades
                .entry(key.clone())
                .or_default()
                .extend(cascade.iter().cloned());
        }
        self.forward.insert(entry, frame.nodes.clone());
    }

    /// Forgets what `entry` depends on (it was removed or replaced).
    pub(crate) fn unlink(&mut self, entry: &[u8]) {
        let Some(nodes) = self.forward.remove(entry) else {
            return;
        };
        for node in nodes {
            if let Some(set) = self.reverse.get_mut(&node) {
                set.remove(entry);
                if set.is_empty() {
                    self.reverse.remove(&node);
                    if let Node::Key(k) = &node {
                        self.cascades.remove(k);
                    }
                }
            }
        }
    }

    /// Every entry that depends, directly or not, on `start`, and every node reached
    /// on the way (`start` included). The dependents are unlinked, and with
    /// `unlink_start` so are the entries in `start` (when the caller removes them too).
    /// Each node is visited once, so cycles terminate.
    pub(crate) fn dependents(
        &mut self,
        start: Vec<Node>,
        unlink_start: bool,
    ) -> (Vec<Arc<[u8]>>, HashSet<Node>) {
        let starting: Vec<Arc<[u8]>> = start
            .iter()
            .filter_map(|n| match n {
                Node::Entry(k) => Some(k.clone()),
                Node::Key(_) | Node::Remote(_) => None,
            })
            .collect();
        let mut seen: HashSet<Node> = HashSet::new();
        let mut queue: VecDeque<Node> = start.into();
        let mut removed = Vec::new();
        while let Some(node) = queue.pop_front() {
            if !seen.insert(node.clone()) {
                continue;
            }
            if let Node::Key(k) = &node {
                if let Some(cascade) = self.cascades.get(k) {
                    queue.extend(cascade.iter().cloned());
                }
            }
            let Some(entries) = self.reverse.get(&node) else {
                continue;
            };
            let entries: Vec<Arc<[u8]>> = entries.iter().cloned().collect();
            for entry in entries {
                let node = Node::Entry(entry.clone());
                if !seen.contains(&node) {
                    queue.push_back(node);
                    removed.push(entry);
                }
            }
        }
        let starting = if unlink_start { starting } else { Vec::new() };
        for entry in removed.iter().chain(&starting) {
            self.unlink(entry);
        }
        (removed, seen)
    }

    pub(crate) fn clear(&mut self) {
        *self = Graph::default();
    }

    #[cfg(test)]
    pub(crate) fn is_empty(&self) -> bool {
        self.forward.is_empty()
    }

    #[cfg(test)]
    pub(crate) fn sizes(&self) -> (usize, usize, usize) {
        (self.forward.len(), self.reverse.len(), self.cascades.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(nodes: &[Node]) -> Frame {
        Frame {
            nodes: nodes.to_vec(),
            read_epoch: vec![0; nodes.len()],
            ..Frame::default()
        }
    }
    fn key(k: &str) -> Node {
        Node::Key(k.into())
    }
    fn entry(e: &str) -> Node {
        Node::Entry(e.as_bytes().into())
    }
    fn names(v: Vec<Arc<[u8]>>) -> Vec<String> {
        let mut v: Vec<String> = v
            .iter()
            .map(|e| String::from_utf8_lossy(e).into_owned())
            .collect();
        v.sort();
        v
    }

    #[test]
    fn chains_are_removed_whole() {
        let mut g = Graph::default();
        // A depends on B, B on C, ... G on H, H on key "h"
        let chain = ["A", "B", "C", "D", "E", "F", "G", "H"];
        for w in chain.windows(2) {
            g.link(w[0].as_bytes(), &frame(&[entry(w[1])]));
        }
        g.link(b"H", &frame(&[key("h")]));
        assert_eq!(
            names(g.dependents(vec![key("h")], true).0),
            chain.map(String::from).to_vec()
        );
        assert_eq!(g.sizes(), (0, 0, 0), "nothing left in the graph");
    }

    #[test]
    fn cycles_terminate() {
        let mut g = Graph::default();
        g.link(b"A", &frame(&[entry("B")]));
        g.link(b"B", &frame(&[entry("A")]));
        g.link(b"S", &frame(&[entry("S")]));
        // the start entries are removed by the caller; their dependents come back
        assert_eq!(names(g.dependents(vec![entry("A")], true).0), vec!["B"]);
        assert_eq!(
            names(g.dependents(vec![entry("S")], true).0),
            Vec::<String>::new()
        );
        assert_eq!(g.sizes(), (0, 0, 0));
    }

    #[test]
    fn replacing_drops_old_links() {
        let mut g = Graph::default();
        g.link(b"A", &frame(&[key("old")]));
        g.link(b"A", &frame(&[key("new")]));
        assert!(g.dependents(vec![key("old")], true).0.is_empty());
        assert_eq!(names(g.dependents(vec![key("new")], true).0), vec!["A"]);
    }

    #[test]
    fn cascades_follow_while_linked() {
        let mut g = Graph::default();
        let mut f = frame(&[key("order:1")]);
        f.cascades.push(("order:1".into(), vec![key("customer:9")]));
        g.link(b"A", &f);
        g.link(b"B", &frame(&[key("customer:9")]));
        assert_eq!(
            names(g.dependents(vec![key("order:1")], true).0),
            vec!["A", "B"]
        );
        assert_eq!(g.sizes(), (0, 0, 0));
    }

    #[test]
    fn many_dependents() {
        let mut g = Graph::default();
        for i in 0..10_000u32 {
            g.link(&i.to_le_bytes(), &frame(&[key("shared")]));
        }
        assert_eq!(g.dependents(vec![key("shared")], true).0.len(), 10_000);
        assert!(g.is_empty());
    }
}
