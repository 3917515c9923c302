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

use cache_runtime::RemoteError;

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
const UNLINK: &str = r#"
local G, P = ARGV[1], ARGV[2]
local LINKS, PARENTS = G .. 'links', G .. 'parents'
local function forget(node, v)
  local rev = G .. 'rev:' .. node
  redis.call('SREM', rev, v)
  if redis.call('EXISTS', rev) == 0 then
    if string.sub(node, 1, 2) == 'd:' then
      redis.call('DEL', G .. 'cascade:' .. string.sub(node, 3))
    else
      redis.call('SREM', PARENTS, P .. string.sub(node, 3))
    end
  end
end
local function unlink(v)
  local links = redis.call('HGET', LINKS, v)
  if links then
    for node in string.gmatch(links, '[^%z]+') do forget(node, v) end
    redis.call('HDEL', LINKS, v)
  end
end
"#;

/// ARGV: G, P, key, value, ttl ms, since, n, n links, then per cascade: dependency,
/// count, keys. Writes the value with its links, replacing the old ones, unless a
/// marker of the entry or of a link is newer than `since`, or `since` is above the
/// server's count (it restarted and lost its markers). Returns 1 if written.
const WRITE: &str = r#"
local e, since, n = ARGV[3], tonumber(ARGV[6]), tonumber(ARGV[7])
local v = P .. e
-- a count above the server's: it restarted since the read, its markers are gone
if since > tonumber(redis.call('GET', G .. 'epoch') or 0) then return 0 end
local function newer(node)
  local m = redis.call('HGET', G .. 'marks', node)
  return m and tonumber(m) > since
end
if newer('e:' .. e) then return 0 end
for i = 8, 7 + n do
  if newer(ARGV[i]) then return 0 end
end
unlink(v)
redis.call('SET', v, ARGV[4], 'PX', ARGV[5])
if n > 0 then
  local links = {}
  for i = 8, 7 + n do
    links[#links + 1] = ARGV[i]
    redis.call('SADD', G .. 'rev:' .. ARGV[i], v)
    if string.sub(ARGV[i], 1, 2) == 'e:' then
      redis.call('SADD', PARENTS, P .. string.sub(ARGV[i], 3))
    end
  end
  redis.call('HSET', LINKS, v, table.concat(links, '\0'))
end
local i = 8 + n
while i <= #ARGV do
  local d, c = ARGV[i], tonumber(ARGV[i + 1])
  for j = i + 2, i + 1 + c do
    redis.call('SADD', G .. 'cascade:' .. d, ARGV[j])
  end
  i = i + 2 + c
end
return 1
"#;

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
const INVALIDATE: &str = r#"#!lua flags=allow-oom
local ttl, want = tonumber(ARGV[3]), ARGV[5] == '1'
local keep = ARGV[4] ~= '' and P .. ARGV[4]
local epoch = redis.call('INCR', G .. 'epoch')
local MARKS, MARKED = G .. 'marks', G .. 'marked'
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local function mark(node)
  redis.call('HSET', MARKS, node, epoch)
  redis.call('ZADD', MARKED, now, node)
end
-- markers past their lifetime go, a bounded number per call
local old = redis.call('ZRANGEBYSCORE', MARKED, '-inf', now - ttl, 'LIMIT', 0, 200)
if #old > 0 then
  redis.call('HDEL', MARKS, unpack(old))
  redis.call('ZREM', MARKED, unpack(old))
end
local RD, RE, skip = G .. 'rev:d:', G .. 'rev:e:', #P + 1
-- without nested entries (nothing in the parents set), no entry is looked up further
local nested = redis.call('SCARD', PARENTS) > 0
local seen_d, seen_e, removed, dead, left, deps, entries = {}, {}, {}, {}, {}, {}, {}
local function chunks(list, f)
  for i = 1, #list, 1000 do
    f(unpack(list, i, math.min(i + 999, #list)))
  end
end
for i = 8, #ARGV do
  mark(ARGV[i])
  if string.sub(ARGV[i], 1, 2) == 'd:' then
    deps[#deps + 1] = string.sub(ARGV[i], 3)
  else
    entries[#entries + 1] = P .. string.sub(ARGV[i], 3)
  end
end
while #deps > 0 or #entries > 0 do
  local revs, next_d, next_e, fresh = {}, {}, {}, {}
  for _, d in ipairs(deps) do
    if not seen_d['d:' .. d] then
      seen_d['d:' .. d] = true
      -- a cascade's dependency is marked too (start nodes were above)
      mark('d:' .. d)
      local cascade = G .. 'cascade:' .. d
      for _, c in ipairs(redis.call('SMEMBERS', cascade)) do
        next_d[#next_d + 1] = c
      end
      dead[#dead + 1] = cascade
      revs[#revs + 1] = RD .. d
    end
  end
  for _, v in ipairs(entries) do
    if not seen_e[v] then
      seen_e[v] = true
      if nested then fresh[#fresh + 1] = v end
      if v ~= keep then
        removed[#removed + 1] = v
        dead[#dead + 1] = v
      end
    end
  end
  if nested then
    chunks(fresh, function(...)
      local names = {...}
      for i, has in ipairs(redis.call('SMISMEMBER', PARENTS, ...)) do
        if has == 1 then
          revs[#revs + 1] = RE .. string.sub(names[i], skip)
          left[#left + 1] = names[i]
        end
      end
    end)
  end
  chunks(revs, function(...)
    for _, v in ipairs(redis.call('SUNION', ...)) do
      next_e[#next_e + 1] = v
    end
  end)
  for _, rev in ipairs(revs) do dead[#dead + 1] = rev end
  deps, entries = next_d, next_e
end
chunks(left, function(...) redis.call('SREM', PARENTS, ...) end)
-- the removed entries' links to nodes not walked: they leave those reverse sets
local others = {}
local function other(node, v)
  local walked
  if string.byte(node, 1) == 100 then walked = seen_d[node]
  else walked = seen_e[P .. string.sub(node, 3)] end
  if not walked then
    local vs = others[node]
    if not vs then vs = {}; others[node] = vs end
    vs[#vs + 1] = v
  end
end
chunks(removed, function(...)
  local links = redis.call('HMGET', LINKS, ...)
  for i = 1, #links do
    local l = links[i]
    -- most entries link to one dependency, which was walked
    if l and not seen_d[l] then
      if string.find(l, '\0', 1, true) then
        local v = select(i, ...)
        for node in string.gmatch(l, '[^%z]+') do other(node, v) end
      else
        other(l, (select(i, ...)))
      end
    end
  end
  redis.call('HDEL', LINKS, ...)
end)
for node, vs in pairs(others) do
  for _, v in ipairs(vs) do forget(node, v) end
end
chunks(dead, function(...) redis.call('UNLINK', ...) end)
if ARGV[6] ~= '' then redis.call('PUBLISH', ARGV[6], ARGV[7]) end
if want then return removed end
return {}
"#;

/// ARGV: G, P, value key. The collector's step for a value that expired or was
/// evicted: nothing if it was set again or its links are gone already; else removes
/// its links.
const COLLECT: &str = r#"#!lua flags=allow-oom
local v = ARGV[3]
if redis.call('EXISTS', v) == 1 then return 0 end
if redis.call('HEXISTS', LINKS, v) == 0 then return 0 end
unlink(v)
return 1
"#;

/// ARGV: G, P, value keys. Repairs forward links: without its value, an entry's
/// links go (counted first); if a node's reverse set lacks the entry (an invalidation
/// of that node would miss it), the entry goes, value and links (counted second).
const REPAIR_LINKS: &str = r#"#!lua flags=allow-oom
local lonely, broken = 0, 0
for i = 3, #ARGV do
  local v = ARGV[i]
  local links = redis.call('HGET', LINKS, v)
  if links then
    if redis.call('EXISTS', v) == 0 then
      unlink(v)
      lonely = lonely + 1
    else
      for node in string.gmatch(links, '[^%z]+') do
        if redis.call('SISMEMBER', G .. 'rev:' .. node, v) == 0 then
          redis.call('DEL', v)
          unlink(v)
          broken = broken + 1
          break
        end
      end
    end
  end
end
return {lonely, broken}
"#;

/// ARGV: G, P, node, value keys. Removes from the node's reverse set the entries
/// whose value is gone or whose links do not name the node; returns how many.
const REPAIR_REV: &str = r#"#!lua flags=allow-oom
local node = ARGV[3]
local n = 0
for i = 4, #ARGV do
  local v = ARGV[i]
  local links = redis.call('HGET', LINKS, v)
  if redis.call('EXISTS', v) == 0 or not links
    or not string.find('\0' .. links .. '\0', '\0' .. node .. '\0', 1, true) then
    n = n + 1
    forget(node, v)
  end
end
if string.sub(node, 1, 2) == 'e:' and redis.call('EXISTS', G .. 'rev:' .. node) == 1 then
  redis.call('SADD', PARENTS, P .. string.sub(node, 3))
end
return n
"#;

/// ARGV: G, P, dependency. Removes a cascade set nothing depends on any more.
const REPAIR_CASCADE: &str = r#"#!lua flags=allow-oom
if redis.call('EXISTS', G .. 'rev:d:' .. ARGV[3]) == 0 then
  return redis.call('DEL', G .. 'cascade:' .. ARGV[3])
end
return 0
"#;

/// ARGV: G, P, value keys. Removes from the parents the entries nothing depends on.
const REPAIR_PARENTS: &str = r#"#!lua flags=allow-oom
local n = 0
for i = 3, #ARGV do
  local key = string.sub(ARGV[i], #P + 1)
  if string.sub(ARGV[i], 1, #P) ~= P or redis.call('EXISTS', G .. 'rev:e:' .. key) == 0 then
    n = n + redis.call('SREM', PARENTS, ARGV[i])
  end
end
return n
"#;

/// A script, sent by its hash (`EVALSHA`), so that its text travels and is hashed by
/// the server only when the server does not have it yet.
#[derive(Clone, Debug)]
pub(crate) struct Hashed {
    text: String,
    sha: String,
}

impl Hashed {
    fn new(script: &str) -> Self {
        let text = script_text(script);
        let sha = redis::Script::new(&text).get_hash().to_owned();
        Hashed { text, sha }
    }
}

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

    fn repair_links(&self, keys: &[String]) -> redis::Cmd {
        let mut cmd = self.evalsha(&self.repair_links);
        cmd.arg(keys);
        cmd
    }

    fn repair_parents(&self, keys: &[String]) -> redis::Cmd {
        let mut cmd = self.evalsha(&self.repair_parents);
        cmd.arg(keys);
        cmd
    }

    fn repair_rev(&self, node: &str, keys: &[String]) -> redis::Cmd {
        let mut cmd = self.evalsha(&self.repair_rev);
        cmd.arg(node).arg(keys);
        cmd
    }

    fn repair_cascade(&self, dependency: &str) -> redis::Cmd {
        let mut cmd = self.evalsha(&self.repair_cascade);
        cmd.arg(dependency);
        cmd
    }
}

/// What a [`full_collection`](crate::full_collection) removed.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct CollectionReport {
    /// Graph items looked at: entries' links, reverse sets, cascades.
    pub scanned: u64,
    /// Entries whose value was gone: their links went.
    pub forward_sets: u64,
    /// Entries (value and links) whose links were incomplete.
    pub broken_entries: u64,
    /// Reverse-set members whose value was gone or no longer linked to the node.
    pub reverse_members: u64,
    /// Cascade sets nothing depended on any more.
    pub cascades: u64,
    /// Entries listed as having dependents that had none.
    pub parents: u64,
}

impl CollectionReport {
    /// Everything removed.
    pub fn removed(&self) -> u64 {
        self.forward_sets
            + self.broken_entries
            + self.reverse_members
            + self.cascades
            + self.parents
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

/// How many keys one `SCAN` step asks for, and how many set members one repair
/// script checks: bounded batches, so the server is never blocked for long.
const BATCH: usize = 500;

/// Repairs every orphan of the graph under `keys`: links without a value,
/// entries whose links are incomplete, reverse-set members whose value is gone or not
/// linked back, cascade sets nothing depends on. Idempotent; safe while instances run
/// (every repair is one script that re-checks what it removes).
pub(crate) async fn collect_all(
    con: &mut redis::aio::MultiplexedConnection,
    keys: &GraphKeys,
) -> Result<CollectionReport, RemoteError> {
    let mut report = CollectionReport::default();
    let err = |e: redis::RedisError| RemoteError(e.to_string());
    let pattern = |kind: &str| format!("{}{kind}*", glob_escape(&keys.graph));
    // forward links, a page of the hash at a time
    let links = format!("{}links", keys.graph);
    let hscan = |cursor: u64| {
        let mut cmd = redis::cmd("HSCAN");
        cmd.arg(&links).arg(cursor).arg("COUNT").arg(BATCH);
        cmd
    };
    for page in pages(con, hscan).await? {
        // field, value, field, value...
        let entries: Vec<String> = page.into_iter().step_by(2).collect();
        report.scanned += entries.len() as u64;
        let (lonely, broken): (u64, u64) = keys
            .run(con, keys.repair_links(&entries))
            .await
            .map_err(err)?;
        report.forward_sets += lonely;
        report.broken_entries += broken;
    }
    // the parents set
    let parents = format!("{}parents", keys.graph);
    let sscan = |cursor: u64| {
        let mut cmd = redis::cmd("SSCAN");
        cmd.arg(&parents).arg(cursor).arg("COUNT").arg(BATCH);
        cmd
    };
    for page in pages(con, sscan).await? {
        let n: u64 = keys
            .run(con, keys.repair_parents(&page))
            .await
            .map_err(err)?;
        report.parents += n;
    }
    // reverse sets
    for key in scan(con, &pattern("rev:")).await? {
        report.scanned += 1;
        let node = &key[keys.graph.len() + "rev:".len()..];
        let sscan = |cursor: u64| {
            let mut cmd = redis::cmd("SSCAN");
            cmd.arg(&key).arg(cursor).arg("COUNT").arg(BATCH);
            cmd
        };
        for members in pages(con, sscan).await? {
            let n: u64 = keys
                .run(con, keys.repair_rev(node, &members))
                .await
                .map_err(err)?;
            report.reverse_members += n;
        }
    }
    // cascades
    for key in scan(con, &pattern("cascade:")).await? {
        report.scanned += 1;
        let dependency = &key[keys.graph.len() + "cascade:".len()..];
        let n: u64 = keys
            .run(con, keys.repair_cascade(dependency))
            .await
            .map_err(err)?;
        report.cascades += n;
    }
    Ok(report)
}

/// Every key matching `pattern`, by `SCAN` in bounded steps.
async fn scan(
    con: &mut redis::aio::MultiplexedConnection,
    pattern: &str,
) -> Result<Vec<String>, RemoteError> {
    let scan = |cursor: u64| {
        let mut cmd = redis::cmd("SCAN");
        cmd.arg(cursor)
            .arg("MATCH")
            .arg(pattern)
            .arg("COUNT")
            .arg(BATCH);
        cmd
    };
    Ok(pages(con, scan).await?.into_iter().flatten().collect())
}

/// The non-empty pages of a cursor command (`SCAN`, `SSCAN`): `page(cursor)` builds
/// the command for a cursor.
async fn pages(
    con: &mut redis::aio::MultiplexedConnection,
    page: impl Fn(u64) -> redis::Cmd,
) -> Result<Vec<Vec<String>>, RemoteError> {
    let mut cursor: u64 = 0;
    let mut out = Vec::new();
    loop {
        let (next, items): (u64, Vec<String>) = page(cursor)
            .query_async(con)
            .await
            .map_err(|e| RemoteError(e.to_string()))?;
        if !items.is_empty() {
            out.push(items);
        }
        if next == 0 {
            return Ok(out);
        }
        cursor = next;
    }
}
/// Checks the server settings the graph and its collector need; `Err` says what is
/// wrong and which `CONFIG SET` fixes it. A server that refuses `CONFIG GET`
/// (managed services often do) is accepted with a warning.
pub(crate) async fn check_settings(
    con: &mut redis::aio::MultiplexedConnection,
) -> Result<(), String> {
    let get = |name: &'static str| {
        let mut cmd = redis::cmd("CONFIG");
        cmd.arg("GET").arg(name);
        cmd
    };
    let policy: Result<Vec<String>, _> = get("maxmemory-policy").query_async(con).await;
    let events: Result<Vec<String>, _> = get("notify-keyspace-events").query_async(con).await;
    let (Ok(policy), Ok(events)) = (policy, events) else {
        tracing::warn!(target: "cache_redis", "CONFIG GET is not allowed on this server: make sure it runs with `maxmemory-policy volatile-lru` and `notify-keyspace-events Exe`, which the dependency graph and its collector need");
        return Ok(());
    };
    let policy = policy.get(1).map(String::as_str).unwrap_or("");
    let events = events.get(1).map(String::as_str).unwrap_or("");
    match policy {
        "volatile-lru" | "volatile-random" => {}
        "noeviction" => tracing::warn!(target: "cache_redis", "Redis uses `maxmemory-policy noeviction`: once full it refuses writes (the graph stays whole). `CONFIG SET maxmemory-policy volatile-lru` evicts cache entries instead"),
        other => {
            return Err(format!(
                "Redis evicts with `maxmemory-policy {other}`, which can evict the dependency graph's keys (they have no expiry): run `CONFIG SET maxmemory-policy volatile-lru` (or volatile-random)"
            ))
        }
    }
    let has = |c: char| events.contains(c) || (events.contains('A') && "xe".contains(c));
    if !(events.contains('E') || events.contains('K')) || !has('x') {
        return Err(format!(
            "Redis sends no expiry events (`notify-keyspace-events` is `{events}`), which the dependency collector needs: run `CONFIG SET notify-keyspace-events Exe` (or add `Exe` to what is set)"
        ));
    }
    if !has('e') {
        tracing::warn!(target: "cache_redis", "Redis sends no eviction events (`notify-keyspace-events` is `{events}`): the links of evicted values stay until a full collection. `CONFIG SET notify-keyspace-events Exe` adds them");
    }
    Ok(())
}
