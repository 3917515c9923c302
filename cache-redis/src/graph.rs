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

use std::sync::Arc;
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

/// ARGV: G, P, key, value, ttl ms, remote epoch, n, n links, then per cascade: dependency,
/// count, keys. Writes the value with its links, replacing the old ones, unless a
/// marker of the entry or of a link is newer than the remote epoch, or that epoch is above the
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
#[derive(Debug)]
pub(crate) struct Hashed {
    /// What it is, for errors and the log.
    name: &'static str,
    text: String,
    sha: String,
}

impl Hashed {
    /// One of the graph's scripts, with the common part.
    fn new(name: &'static str, script: &str) -> Arc<Self> {
        Self::plain(name, script_text(script))
    }

    /// A script as it is.
    fn plain(name: &'static str, text: String) -> Arc<Self> {
        let sha = redis::Script::new(&text).get_hash().to_owned();
        Arc::new(Hashed { name, text, sha })
    }

    /// The command and its first argument: `EVALSHA` and the hash, or, for a server
    /// that answered `NOSCRIPT` (it restarted, or its scripts were flushed), `EVAL`
    /// and the text, which loads it again.
    pub(crate) fn head(&self, by_hash: bool) -> (&'static str, &str) {
        match by_hash {
            true => ("EVALSHA", &self.sha),
            false => ("EVAL", &self.text),
        }
    }
}

/// Whether the server answered that it does not have the script.
pub(crate) fn no_script(code: Option<&str>) -> bool {
    code == Some("NOSCRIPT")
}

/// A call of one of the graph's scripts: the script and the arguments after it. Sent
/// by hash, and with the text where the server answers `NOSCRIPT`: in a pipeline
/// (the writer), alone on a connection ([`ScriptCall::run`]), and in the sliding read
/// ([`Hashed::head`] written into the link's command buffer).
///
/// Not `redis::Script::invoke_async`: it runs one command by itself, and after
/// `NOSCRIPT` sends `SCRIPT LOAD` and the `EVALSHA` again (two more round trips, out
/// of order with the writer's queue); redis-rs 1.8 has no script in a pipeline.
#[derive(Clone, Debug)]
pub(crate) struct ScriptCall {
    script: Arc<Hashed>,
    /// The arguments after the script, in one buffer (not a command to send).
    args: redis::Cmd,
}

impl ScriptCall {
    fn arg<T: redis::ToRedisArgs>(&mut self, value: T) -> &mut Self {
        self.args.arg(value);
        self
    }

    /// The command: by hash, or with the script's text.
    pub(crate) fn cmd(&self, by_hash: bool) -> redis::Cmd {
        let (command, script) = self.script.head(by_hash);
        let mut cmd = redis::cmd(command);
        cmd.arg(script);
        for arg in self.args.args_iter() {
            if let redis::Arg::Simple(bytes) = arg {
                cmd.arg(bytes);
            }
        }
        cmd
    }

    /// Which script it runs, for errors and the log.
    pub(crate) fn name(&self) -> &'static str {
        self.script.name
    }

    /// Runs it on `con`: by hash, and once more with the text if the server does not
    /// have the script.
    pub(crate) async fn run<T: redis::FromRedisValue>(
        &self,
        con: &mut (impl redis::aio::ConnectionLike + Send),
    ) -> redis::RedisResult<T> {
        match self.cmd(true).query_async(con).await {
            Err(e) if no_script(e.code()) => self.cmd(false).query_async(con).await,
            result => result,
        }
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
    write: Arc<Hashed>,
    invalidate: Arc<Hashed>,
    collect: Arc<Hashed>,
    repair_links: Arc<Hashed>,
    repair_rev: Arc<Hashed>,
    repair_cascade: Arc<Hashed>,
    repair_parents: Arc<Hashed>,
    touch: Arc<Hashed>,
}

impl GraphKeys {
    pub(crate) fn new(prefix: &str, marker_ttl: Duration) -> Self {
        GraphKeys {
            graph: format!("{prefix}:g:"),
            values: format!("{prefix}:{}:", cache_runtime::FORMAT_VERSION),
            marker_ttl: u64::try_from(marker_ttl.as_millis())
                .unwrap_or(u64::MAX)
                .max(1),
            write: Hashed::new("the graph's write script", WRITE),
            invalidate: Hashed::new("the graph's invalidation script", INVALIDATE),
            collect: Hashed::new("the collector's script", COLLECT),
            repair_links: Hashed::new("a repair script", REPAIR_LINKS),
            repair_rev: Hashed::new("a repair script", REPAIR_REV),
            repair_cascade: Hashed::new("a repair script", REPAIR_CASCADE),
            repair_parents: Hashed::new("a repair script", REPAIR_PARENTS),
            touch: Hashed::plain("the sliding read", GET_TOUCH_EPOCH.to_owned()),
        }
    }

    /// A call of one of the scripts above, with the common arguments.
    fn call(&self, script: &Arc<Hashed>) -> ScriptCall {
        let mut call = ScriptCall {
            script: script.clone(),
            args: redis::Cmd::new(),
        };
        call.arg(0).arg(&self.graph).arg(&self.values);
        call
    }

    /// The sliding entry's read (see `GET_TOUCH_EPOCH`).
    pub(crate) fn touch(&self) -> &Hashed {
        &self.touch
    }

    /// The conditional write of a value with its links.
    pub(crate) fn write(&self, w: &cache_runtime::LinkedWrite) -> ScriptCall {
        let mut cmd = self.call(&self.write);
        cmd.arg(&w.key)
            .arg(&w.value)
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
        let mut cmd = self.call(&self.invalidate);
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
    pub(crate) fn collect(&self, key: &str) -> ScriptCall {
        let mut cmd = self.call(&self.collect);
        cmd.arg(key);
        cmd
    }

    pub(crate) fn repair_links(&self, keys: &[String]) -> ScriptCall {
        let mut cmd = self.call(&self.repair_links);
        cmd.arg(keys);
        cmd
    }

    pub(crate) fn repair_parents(&self, keys: &[String]) -> ScriptCall {
        let mut cmd = self.call(&self.repair_parents);
        cmd.arg(keys);
        cmd
    }

    pub(crate) fn repair_rev(&self, node: &str, keys: &[String]) -> ScriptCall {
        let mut cmd = self.call(&self.repair_rev);
        cmd.arg(node).arg(keys);
        cmd
    }

    pub(crate) fn repair_cascade(&self, dependency: &str) -> ScriptCall {
        let mut cmd = self.call(&self.repair_cascade);
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
