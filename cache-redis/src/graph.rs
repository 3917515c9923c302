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
//! the keys they touch from the prefix, which is why the graph needs one Redis (not
//! a cluster). Graph keys have no expiry, which is why the server must evict by
//! `volatile-lru` or `volatile-random` (never a graph key), and why a collector
//! removes the links of values that expire or are evicted.

use std::time::Duration;

/// The first line of the scripts that mostly delete (the invalidation, the
/// collector's step, the repairs): they run even when Redis is out of memory under
/// `noeviction` (without it, their first write, such as the count's `INCR`, would be
/// refused there, and an invalidation would leave its entries in Redis).
const ALLOW_OOM: &str = "#!lua flags=allow-oom\n";

/// A script's text: its flags line if it has one, then the common part, then its own.
fn script_text(script: &str) -> String {
    match script.strip_prefix(ALLOW_OOM) {
        Some(own) => format!("{ALLOW_OOM}{UNLINK}{own}"),
        None => format!("{UNLINK}{script}"),
    }
}

/// The common part of the scripts: the prefixes, and removing an entry's links
/// (it leaves its nodes' reverse sets; a cascade goes with the last entry depending
/// on its dependency, an entry leaves the parents once nothing depends on it).
/// Entries are named by their value key `v`.
const UNLINK: &str = include_str!("lua/unlink.lua");

/// ARGV: G, P, key, value, ttl ms, since, n, n links, then per cascade: dependency,
/// count, keys. Writes the value with its links, replacing the old ones, unless a
/// marker of the entry or of a link is newer than `since`, or `since` is above the
/// server's count (it restarted and lost its markers). Returns 1 if written.
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

/// A script, sent by its hash (`EVALSHA`), so that its text travels and is hashed by
/// the server only when the server does not have it yet.
#[derive(Clone, Debug)]
pub(crate) struct Hashed {
    text: String,
    sha: String,
}

impl Hashed {
    /// One of the graph's scripts, with the common part.
    fn new(script: &str) -> Self {
        Self::plain(script_text(script))
    }

    /// A script as it is.
    fn plain(text: String) -> Self {
        let sha = redis::Script::new(&text).get_hash().to_owned();
        Hashed { text, sha }
    }
}

/// A sliding entry's read with the graph: the value, its expiry moved, and the
/// invalidation count (KEYS: the value key, the count; ARGV: the expiry in ms).
const GET_TOUCH_EPOCH: &str = include_str!("lua/get_touch_epoch.lua");

/// The keys of one prefix's graph.
#[derive(Clone, Debug)]
pub(crate) struct GraphKeys {
    /// `{prefix}:g:`
    pub(crate) graph: String,
    /// `{prefix}:{format}:`, the value keys' prefix.
    pub(crate) values: String,
    /// How long a marker is kept, in milliseconds.
    pub(crate) marker_ttl: u64,
    write: Hashed,
    invalidate: Hashed,
    collect: Hashed,
    repair_links: Hashed,
    repair_rev: Hashed,
    repair_cascade: Hashed,
    repair_parents: Hashed,
    touch: Hashed,
}

impl GraphKeys {
    pub(crate) fn new(prefix: &str, marker_ttl: Duration) -> Self {
        GraphKeys {
            graph: format!("{prefix}:g:"),
            values: format!("{prefix}:{}:", cache_runtime::FORMAT_VERSION),
            marker_ttl: u64::try_from(marker_ttl.as_millis())
                .unwrap_or(u64::MAX)
                .max(1),
            write: Hashed::new(WRITE),
            invalidate: Hashed::new(INVALIDATE),
            collect: Hashed::new(COLLECT),
            repair_links: Hashed::new(REPAIR_LINKS),
            repair_rev: Hashed::new(REPAIR_REV),
            repair_cascade: Hashed::new(REPAIR_CASCADE),
            repair_parents: Hashed::new(REPAIR_PARENTS),
            touch: Hashed::plain(GET_TOUCH_EPOCH.to_owned()),
        }
    }

    /// `EVALSHA` of one of the scripts above, with the common arguments.
    fn evalsha(&self, script: &Hashed) -> redis::Cmd {
        let mut cmd = redis::cmd("EVALSHA");
        cmd.arg(&script.sha)
            .arg(0)
            .arg(&self.graph)
            .arg(&self.values);
        cmd
    }

    /// Sends `cmd`, an `EVALSHA` of one of the scripts above, and once more with the
    /// script's text if the server does not have it (see [`GraphKeys::with_text`]).
    pub(crate) async fn run<T: redis::FromRedisValue>(
        &self,
        con: &mut redis::aio::MultiplexedConnection,
        cmd: redis::Cmd,
    ) -> redis::RedisResult<T> {
        match cmd.query_async(con).await {
            Err(e) if e.code() == Some("NOSCRIPT") => match self.with_text(&cmd) {
                Some(eval) => eval.query_async(con).await,
                None => Err(e),
            },
            result => result,
        }
    }

    /// The `EVAL` form of `cmd`, an `EVALSHA` of one of this graph's hashed scripts,
    /// for a server that does not have the script (`NOSCRIPT`: it restarted, or its
    /// scripts were flushed); `EVAL` loads it again.
    pub(crate) fn with_text(&self, cmd: &redis::Cmd) -> Option<redis::Cmd> {
        let mut args = cmd.args_iter().map(|a| match a {
            redis::Arg::Simple(bytes) => bytes,
            _ => &[],
        });
        if !args.next()?.eq_ignore_ascii_case(b"EVALSHA") {
            return None;
        }
        let sha = args.next()?;
        let script = [
            &self.write,
            &self.invalidate,
            &self.collect,
            &self.repair_links,
            &self.repair_rev,
            &self.repair_cascade,
            &self.repair_parents,
        ]
        .into_iter()
        .find(|s| s.sha.as_bytes() == sha)?;
        let mut eval = redis::cmd("EVAL");
        eval.arg(&script.text);
        for a in args {
            eval.arg(a);
        }
        Some(eval)
    }

    /// The command and its first argument for a sliding entry's read: `EVALSHA` and
    /// the hash, or (`by_hash` false, after `NOSCRIPT`) `EVAL` and the text.
    pub(crate) fn touch_script(&self, by_hash: bool) -> (&'static str, &str) {
        match by_hash {
            true => ("EVALSHA", &self.touch.sha),
            false => ("EVAL", &self.touch.text),
        }
    }

    /// Which of the graph's scripts `cmd` runs, if it is an `EVALSHA` of one.
    pub(crate) fn script_name(&self, cmd: &redis::Cmd) -> Option<&'static str> {
        let mut args = cmd.args_iter();
        match args.next()? {
            redis::Arg::Simple(name) if name.eq_ignore_ascii_case(b"EVALSHA") => {}
            _ => return None,
        }
        let redis::Arg::Simple(sha) = args.next()? else {
            return None;
        };
        [
            (&self.write, "the graph's write script"),
            (&self.invalidate, "the graph's invalidation script"),
            (&self.collect, "the collector's script"),
            (&self.repair_links, "a repair script"),
            (&self.repair_rev, "a repair script"),
            (&self.repair_cascade, "a repair script"),
            (&self.repair_parents, "a repair script"),
        ]
        .into_iter()
        .find(|(s, _)| s.sha.as_bytes() == sha)
        .map(|(_, name)| name)
    }

    /// The conditional write of a value with its links.
    pub(crate) fn write(&self, w: &cache_runtime::LinkedWrite) -> redis::Cmd {
        let mut cmd = self.evalsha(&self.write);
        cmd.arg(&w.key)
            .arg(&w.value)
            .arg(u64::try_from(w.ttl.as_millis()).unwrap_or(u64::MAX).max(1))
            .arg(w.since)
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
    ) -> redis::Cmd {
        let mut cmd = self.evalsha(&self.invalidate);
        let (channel, message) = publish.unwrap_or(("", b""));
        cmd.arg(self.marker_ttl)
            .arg(keep.unwrap_or(""))
            .arg(if want_keys { "1" } else { "0" })
            .arg(channel)
            .arg(message)
            .arg(start);
        cmd
    }

    /// The collector's step for the value key `key`.
    pub(crate) fn collect(&self, key: &str) -> redis::Cmd {
        let mut cmd = self.evalsha(&self.collect);
        cmd.arg(key);
        cmd
    }

    pub(crate) fn repair_links(&self, keys: &[String]) -> redis::Cmd {
        let mut cmd = self.evalsha(&self.repair_links);
        cmd.arg(keys);
        cmd
    }

    pub(crate) fn repair_parents(&self, keys: &[String]) -> redis::Cmd {
        let mut cmd = self.evalsha(&self.repair_parents);
        cmd.arg(keys);
        cmd
    }

    pub(crate) fn repair_rev(&self, node: &str, keys: &[String]) -> redis::Cmd {
        let mut cmd = self.evalsha(&self.repair_rev);
        cmd.arg(node).arg(keys);
        cmd
    }

    pub(crate) fn repair_cascade(&self, dependency: &str) -> redis::Cmd {
        let mut cmd = self.evalsha(&self.repair_cascade);
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
