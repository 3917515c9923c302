//! The dependency graph in Redis (`RedisBackend::dependencies(true)`), its scripts,
//! the server settings it needs, and the full collection.
//!
//! Layout, for the key prefix `p`:
//! - `p:{format}:{key}`: the value, always with an expiry (the value key of the
//!   backend). The graph names an entry by this key (its value key), so that the
//!   scripts delete, look up and collect entries without building their keys;
//! - `p:g:links`: a hash, for each entry, what it depends on (its nodes, separated by
//!   a zero byte), without expiry;
//! - `p:g:rev:{node}`: the entries depending on a node, a set of value keys, without
//!   expiry; nodes are `d:{dependency}` and `e:{key}` (another entry, by its readable
//!   key);
//! - `p:g:parents`: the entries something depends on (those with a `rev:e:` set), so
//!   that an invalidation looks further only from them;
//! - `p:g:cascade:{dependency}`: dependencies invalidated along with it, while an
//!   entry depends on it;
//! - `p:g:epoch`: the invalidation count, and the hash `p:g:marks`: for each node an
//!   invalidation started from, the count of the last one, so that a value computed
//!   across an invalidation on any instance is not written. Kept for the marker
//!   lifetime (the sorted set `p:g:marked` says when each was set; invalidations
//!   prune the old ones); without expiry of their own, so memory pressure never
//!   evicts them.
//!
//! Every change of the graph is one Lua script, so it is atomic; the scripts build
//! the keys they touch from the prefix. On a cluster the graph's prefix is
//! `p:g:{p}:`, so that every graph key has one slot, and the values, on other
//! slots, are written and removed in steps of their own (see [`crate::tombstones`]). Graph keys have no expiry, which is why the server must evict by
//! `volatile-lru` or `volatile-random` (never a graph key), and why a collector
//! removes the links of values that expire or are evicted.

use std::sync::Arc;
use std::time::Duration;

use crate::endpoint::{Endpoint, Kind};
use crate::script::Prefixed;
pub(crate) use crate::script::{Hashed, ScriptCall};

/// The first line of the scripts that mostly delete (the invalidation, the
/// collector's step, the repairs): they run even when Redis is out of memory under
/// `noeviction` (without it, their first write, such as the count's `INCR`, would be
/// refused there, and an invalidation would leave its entries in Redis).
const ALLOW_OOM: &str = "#!lua flags=allow-oom\n";

/// A script's text: its flags line if it has one, the variables that tell one node
/// from a cluster, the common part, the layout's own functions, then its own.
fn script_text(script: &str, prelude: &Prelude) -> String {
    let Prelude { vars, after } = prelude;
    match script.strip_prefix(ALLOW_OOM) {
        Some(own) => format!("{ALLOW_OOM}{vars}{UNLINK}{after}{own}"),
        None => format!("{vars}{UNLINK}{after}{script}"),
    }
}

/// What the scripts of one layout start with: variables, before the common part;
/// functions, after it.
#[derive(PartialEq, Eq)]
struct Prelude {
    vars: &'static str,
    after: &'static str,
}

/// The variables of the scripts on one node.
const ON_NODE: Prelude = Prelude {
    vars: "local CLUSTER, SETV = false, true\n",
    after: "",
};

/// How long after a write's links are recorded its value may still be written, in
/// milliseconds: the value's step is refused after that.
pub(crate) const PUT_WINDOW_MS: u64 = 5_000;

/// How long after an entry's links were recorded the collector may remove them for
/// want of a value, in milliseconds: past the window of the value's step, with 5 s to
/// spare for the masters' clocks (the link time is the graph master's, the value's
/// deadline is judged by the value's master).
pub(crate) const COLLECT_GRACE_MS: u64 = 10_000;

/// On a cluster: the graph's scripts do not touch values (they are on other slots);
/// an invalidation's count is reserved for `RESERVE` ms at most; the count instances
/// read is the highest one below every reserved count (see `PUBLISH_EPOCH`); a
/// linked write returns when its links were recorded (its value's step must come
/// within [`PUT_WINDOW_MS`] of it).
const ON_CLUSTER: Prelude = Prelude {
    vars: "local CLUSTER, SETV, RESERVE = true, false, 10000\n",
    after: include_str!("lua/publish_epoch.lua"),
};

/// One of the graph's scripts, with the common part and `prelude`.
fn hashed(name: &'static str, script: &str, prelude: &Prelude) -> Arc<Hashed> {
    Hashed::plain(name, script_text(script, prelude))
}

/// The common part of the scripts: the prefixes, and removing an entry's links
/// (it leaves its nodes' reverse sets; a cascade goes with the last entry depending
/// on its dependency, an entry leaves the parents once nothing depends on it).
/// Entries are named by their value key `v`.
const UNLINK: &str = include_str!("lua/unlink.lua");

/// ARGV: G, P, key, value, ttl ms, remote epoch, n, n links, then per cascade: dependency,
/// count, keys. Writes the value with its links, replacing the old ones, unless a
/// marker of the entry or of a link is newer than the remote epoch, or that epoch is
/// above the server's count (it restarted and lost its markers). Returns 1 if written.
/// On a cluster, records the links only (the value follows on its own slot, and may
/// not land: the old links stay with the new ones, since the old value stays), and
/// returns when, in unix ms.
const WRITE: &str = include_str!("lua/write.lua");

/// ARGV: G, P, marker ttl ms, kept key ('' for none), '1' to return the keys,
/// channel ('' for none), message, start nodes. Marks the start nodes and every
/// dependency reached (a value computed before links to one of them, its links being
/// flattened, so its write is refused), walks the reverse sets from them a level at a
/// time, each node once (chains and cycles end), removes every entry reached but the
/// kept one, publishes the message on the channel once they are gone, and returns
/// their value keys. Only entries that have dependents (the parents set) are looked
/// up further; the reverse sets of the nodes walked go whole; the removed entries
/// leave the reverse sets of their other links. A few commands per level and per
/// batch of 1,000 keys, not per entry; an entry reached costs a few table operations
/// and no new string.
const INVALIDATE: &str = include_str!("lua/invalidate.lua");

/// ARGV: G, P, value key. The collector's step for a value that expired or was
/// evicted: nothing if it was set again or its links are gone already; else removes
/// its links.
const COLLECT: &str = include_str!("lua/collect.lua");

/// On a cluster, ARGV: G, P, value keys. For each, when its links were recorded
/// ('' without links, '0' if unknown), then the time: the collector's first step (see
/// [`GraphKeys::linked`]).
const LINKED: &str = include_str!("lua/linked.lua");

/// ARGV: G, P, value keys. Repairs forward links: without its value, an entry's
/// links go (counted first); if a node's reverse set lacks the entry (an invalidation
/// of that node would miss it), the entry goes, value and links (counted second).
const REPAIR_LINKS: &str = include_str!("lua/repair_links.lua");

/// ARGV: G, P, node, value keys. Removes from the node's reverse set the entries
/// whose value is gone or whose links do not name the node; returns how many.
const REPAIR_REV: &str = include_str!("lua/repair_rev.lua");

/// ARGV: G, P, dependency. Removes a cascade set nothing depends on any more.
const REPAIR_CASCADE: &str = include_str!("lua/repair_cascade.lua");

/// ARGV: G, P, value keys. Removes from the parents the entries nothing depends on.
const REPAIR_PARENTS: &str = include_str!("lua/repair_parents.lua");

/// A sliding entry's read with the graph: the value, its expiry moved, and the
/// invalidation count (KEYS: the value key, the count; ARGV: the expiry in ms).
const GET_TOUCH_EPOCH: &str = include_str!("lua/get_touch_epoch.lua");

/// On a cluster, a value's write after the graph accepted its links (KEYS: the value
/// key; ARGV: the value, its expiry in ms, the count it was computed at, a deadline in
/// unix ms): written unless an invalidation with a higher count left a tombstone
/// there, or the deadline is past.
const PUT: &str = include_str!("lua/put.lua");

/// On a cluster, what an invalidation leaves in place of a value (KEYS: the value key;
/// ARGV: the invalidation's count, the tombstone's lifetime in ms): a zero byte and
/// the count, unless a tombstone with a count as high is there already.
const BURY: &str = include_str!("lua/bury.lua");

/// On a cluster, a sliding entry's read: the value, its expiry moved unless it is a
/// tombstone (KEYS: the value key; ARGV: the expiry in ms).
const TOUCH_VALUE: &str = include_str!("lua/touch_value.lua");

/// On a cluster, the end of invalidations (ARGV: G, P, their counts): their
/// reservations go, and the count instances read moves up. Returns it.
const RELEASE: &str = include_str!("lua/release.lua");

/// A tombstone's first byte (an encoded value starts with `0xCA`).
pub(crate) const TOMBSTONE: u8 = 0;

/// The scripts and the graph's key prefix of one layout: one node, or a cluster.
#[derive(Debug)]
struct Layout {
    /// `{prefix}:g:` on one node; `{prefix}:g:{{prefix}}:` on a cluster, so that every
    /// graph key has the same hash tag, and so the same slot.
    graph: String,
    write: Arc<Hashed>,
    invalidate: Arc<Hashed>,
    collect: Arc<Hashed>,
    linked: Arc<Hashed>,
    repair_links: Arc<Hashed>,
    repair_rev: Arc<Hashed>,
    repair_cascade: Arc<Hashed>,
    repair_parents: Arc<Hashed>,
}

impl Layout {
    fn new(graph: String, prelude: &Prelude) -> Arc<Layout> {
        let new = |name, script| hashed(name, script, prelude);
        Arc::new(Layout {
            graph,
            // on a cluster the value follows on its own slot once its links are
            // recorded: a failover must not lose links whose value is written
            write: match *prelude == ON_CLUSTER {
                true => new("the graph's write script", WRITE).removing(),
                false => new("the graph's write script", WRITE),
            },
            invalidate: match *prelude == ON_CLUSTER {
                true => new("the graph's invalidation script", INVALIDATE).removing(),
                false => new("the graph's invalidation script", INVALIDATE),
            },
            collect: new("the collector's script", COLLECT),
            linked: new("the collector's script", LINKED),
            repair_links: new("a repair script", REPAIR_LINKS),
            repair_rev: new("a repair script", REPAIR_REV),
            repair_cascade: new("a repair script", REPAIR_CASCADE),
            repair_parents: new("a repair script", REPAIR_PARENTS),
        })
    }
}

/// The keys and scripts of one prefix's graph, on one node or on a cluster (which the
/// endpoint tells once connected; one node until then).
#[derive(Clone)]
pub(crate) struct GraphKeys {
    node: Arc<Layout>,
    cluster: Arc<Layout>,
    endpoint: Option<Arc<Endpoint>>,
    /// `{prefix}:{format}:`, the value keys' prefix.
    pub(crate) values: String,
    /// How long a marker is kept, in milliseconds.
    pub(crate) marker_ttl: u64,
    touch: Arc<Hashed>,
    touch_value: Arc<Hashed>,
    put: Arc<Hashed>,
    bury: Arc<Hashed>,
    release: Arc<Hashed>,
    /// On a cluster, the graph's identity (`{graph}gen`) as known, shared by the
    /// clones (see [`crate::cluster::know_graph`]).
    gen: Arc<arc_swap::ArcSwap<String>>,
}

impl std::fmt::Debug for GraphKeys {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GraphKeys")
            .field("graph", &self.g())
            .field("values", &self.values)
            .finish_non_exhaustive()
    }
}

impl GraphKeys {
    /// The graph of `prefix`, on the server or cluster `endpoint` leads to (one node
    /// without one).
    pub(crate) fn new(prefix: &str, marker_ttl: Duration, endpoint: Option<Arc<Endpoint>>) -> Self {
        GraphKeys {
            node: Layout::new(format!("{prefix}:g:"), &ON_NODE),
            cluster: Layout::new(format!("{prefix}:g:{{{prefix}}}:"), &ON_CLUSTER),
            endpoint,
            values: format!("{prefix}:{}:", cache_runtime::FORMAT_VERSION),
            marker_ttl: u64::try_from(marker_ttl.as_millis())
                .unwrap_or(u64::MAX)
                .max(1),
            touch: Hashed::plain("the sliding read", GET_TOUCH_EPOCH.to_owned()),
            touch_value: Hashed::plain("the sliding read", TOUCH_VALUE.to_owned()),
            put: Hashed::plain("the value's write", PUT.to_owned()),
            bury: Hashed::plain("the tombstone's write", BURY.to_owned()).removing(),
            release: hashed("the end of an invalidation", RELEASE, &ON_CLUSTER).removing(),
            gen: Arc::default(),
        }
    }

    /// Whether the graph is on a cluster.
    pub(crate) fn on_cluster(&self) -> bool {
        self.endpoint
            .as_ref()
            .is_some_and(|e| e.kind() == Some(Kind::Cluster))
    }

    fn layout(&self) -> &Layout {
        match self.on_cluster() {
            true => &self.cluster,
            false => &self.node,
        }
    }

    /// The prefix of the graph's keys.
    pub(crate) fn g(&self) -> &str {
        &self.layout().graph
    }

    /// Whether every key of the graph has one slot on a cluster (a prefix with `{}`
    /// in it would break the hash tag).
    pub(crate) fn one_slot(&self) -> bool {
        let g = &self.cluster.graph;
        let slot = crate::endpoint::slot_of(format!("{g}epoch").as_bytes());
        ["links", "rev:d:x", "marks", "burying:1"]
            .iter()
            .all(|k| crate::endpoint::slot_of(format!("{g}{k}").as_bytes()) == slot)
    }

    /// A call of one of the scripts above, with the common arguments: the count's key
    /// (which routes it to the graph's slot on a cluster), the graph's prefix, the
    /// values'.
    fn call<'s>(&'s self, script: impl FnOnce(&'s Layout) -> &'s Arc<Hashed>) -> ScriptCall {
        let layout = self.layout();
        let mut call = ScriptCall {
            script: script(layout).clone(),
            args: redis::Cmd::new(),
        };
        call.arg(1).arg(Prefixed(&layout.graph, "epoch"));
        // on a cluster, the graph's identity as known: the scripts change nothing in
        // another graph (see `unlink.lua`)
        let gen = self.gen.load();
        match self.on_cluster() && !gen.is_empty() {
            true => call.arg(format!("{}\0{gen}", layout.graph)),
            false => call.arg(&layout.graph),
        };
        call.arg(&self.values);
        call
    }

    /// On a cluster, the graph's identity as this instance knows it ('' before it
    /// knows one: its scripts then change whatever graph is there).
    pub(crate) fn gen(&self) -> Arc<String> {
        self.gen.load_full()
    }

    pub(crate) fn set_gen(&self, gen: String) {
        self.gen.store(Arc::new(gen));
    }

    /// A call of a script on one value key.
    fn on_value(script: &Arc<Hashed>, key: impl redis::ToRedisArgs) -> ScriptCall {
        let mut call = ScriptCall {
            script: script.clone(),
            args: redis::Cmd::new(),
        };
        call.arg(1).arg(key);
        call
    }

    /// The sliding entry's read (see `GET_TOUCH_EPOCH`; `TOUCH_VALUE` on a cluster).
    pub(crate) fn touch(&self) -> &Hashed {
        match self.on_cluster() {
            true => &self.touch_value,
            false => &self.touch,
        }
    }

    /// On a cluster, the value's write after its links were accepted (see `PUT`),
    /// without its deadline: the caller adds it once the links are recorded.
    pub(crate) fn put(&self, w: &cache_runtime::LinkedWrite) -> ScriptCall {
        let mut call = Self::on_value(&self.put, Prefixed(&self.values, &w.key));
        call.arg(&w.value)
            .arg(u64::try_from(w.ttl.as_millis()).unwrap_or(u64::MAX).max(1))
            .arg(w.remote_epoch);
        call
    }

    /// On a cluster, a tombstone of count `count` in place of the value key `key`.
    pub(crate) fn bury(&self, key: &str, count: u64) -> ScriptCall {
        let mut call = Self::on_value(&self.bury, key);
        call.arg(count).arg(self.marker_ttl);
        call
    }

    /// On a cluster, the end of the invalidations of `counts`.
    pub(crate) fn release(&self, counts: &[u64]) -> ScriptCall {
        let mut call = self.call(|_| &self.release);
        call.arg(counts);
        call
    }

    /// The conditional write of a value with its links.
    pub(crate) fn write(&self, w: &cache_runtime::LinkedWrite) -> ScriptCall {
        let mut cmd = self.call(|l| &l.write);
        // on a cluster, the value goes to its own slot afterwards (`put`)
        let value: &[u8] = match self.on_cluster() {
            true => b"",
            false => &w.value,
        };
        cmd.arg(&w.key)
            .arg(value)
            .arg(u64::try_from(w.ttl.as_millis()).unwrap_or(u64::MAX).max(1))
            .arg(w.remote_epoch)
            .arg(w.links.len())
            .arg(&w.links);
        for (dependency, keys) in &w.cascades {
            cmd.arg(dependency).arg(keys.len()).arg(keys);
        }
        cmd
    }

    /// The transitive invalidation from `start`, then the publication of a message on
    /// a channel.
    pub(crate) fn invalidate(
        &self,
        start: &[String],
        keep: Option<&str>,
        want_keys: bool,
        publish: Option<(&str, &[u8])>,
    ) -> ScriptCall {
        let mut cmd = self.call(|l| &l.invalidate);
        let (channel, message) = publish.unwrap_or(("", b""));
        cmd.arg(self.marker_ttl)
            .arg(keep.unwrap_or(""))
            .arg(if want_keys { "1" } else { "0" })
            .arg(channel)
            .arg(message)
            .arg(start);
        cmd
    }

    /// On a cluster, the walk of an invalidation from `start` (see
    /// [`crate::tombstones`]): `id` names it, `lost` names this instance's earlier
    /// walks whose replies were lost, whose reservations it takes over.
    pub(crate) fn walk(
        &self,
        start: &[String],
        keep: Option<&str>,
        id: &str,
        lost: &str,
    ) -> ScriptCall {
        let mut cmd = self.call(|l| &l.invalidate);
        cmd.arg(self.marker_ttl)
            .arg(keep.unwrap_or(""))
            .arg("1")
            .arg(id)
            .arg(lost)
            .arg(start);
        cmd
    }

    /// The collector's step for the value key `key`.
    pub(crate) fn collect(&self, key: &str) -> ScriptCall {
        let mut cmd = self.call(|l| &l.collect);
        cmd.arg(key);
        cmd
    }

    /// On a cluster, the collector's first step for the value keys `keys`: when
    /// their links were recorded, and the graph master's time. Values are on other
    /// slots, so the collector then looks at each value, and removes the links of
    /// those it found without one ([`GraphKeys::collect_found`]), unless written
    /// again since. It only looks at links recorded [`COLLECT_GRACE_MS`] ago at least:
    /// by then a value's step is past its deadline ([`PUT_WINDOW_MS`]), so a value
    /// not there is not on its way.
    pub(crate) fn linked(&self, keys: &[String]) -> ScriptCall {
        let mut cmd = self.call(|l| &l.linked);
        cmd.arg(keys);
        cmd
    }

    /// On a cluster, the collector's step for entries found without a value: their
    /// value keys, with when their links were recorded (as [`GraphKeys::linked`] said).
    pub(crate) fn collect_found(&self, found: &[(String, String)]) -> ScriptCall {
        let mut cmd = self.call(|l| &l.collect);
        for (key, at) in found {
            cmd.arg(key).arg(at);
        }
        cmd
    }

    /// On a cluster, the repair of forward links: value keys, with when their links
    /// were recorded and whether their value was there after that.
    pub(crate) fn repair_found(&self, found: &[(String, String, bool)]) -> ScriptCall {
        let mut cmd = self.call(|l| &l.repair_links);
        for (key, at, live) in found {
            cmd.arg(key).arg(at).arg(if *live { "1" } else { "0" });
        }
        cmd
    }

    pub(crate) fn repair_links(&self, keys: &[String]) -> ScriptCall {
        let mut cmd = self.call(|l| &l.repair_links);
        cmd.arg(keys);
        cmd
    }

    pub(crate) fn repair_parents(&self, keys: &[String]) -> ScriptCall {
        let mut cmd = self.call(|l| &l.repair_parents);
        cmd.arg(keys);
        cmd
    }

    pub(crate) fn repair_rev(&self, node: &str, keys: &[String]) -> ScriptCall {
        let mut cmd = self.call(|l| &l.repair_rev);
        cmd.arg(node).arg(keys);
        cmd
    }

    pub(crate) fn repair_cascade(&self, dependency: &str) -> ScriptCall {
        let mut cmd = self.call(|l| &l.repair_cascade);
        cmd.arg(dependency);
        cmd
    }
}

/// Escapes the glob characters of `SCAN MATCH` in a literal prefix.
pub(crate) fn glob_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if matches!(c, '*' | '?' | '[' | ']' | '\\') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}
