//! On a Redis Cluster: the topology as this instance sees it, the watch for its
//! changes, and the replay of this instance's recent removals after one.
//!
//! Replication is asynchronous: a replica promoted when its master died may never
//! have seen a `DEL` the master acknowledged, and would serve the old value again.
//! So each instance keeps the keys it removed in the last `replay_window`
//! ([`Recent`]). A watcher reads the topology (`CLUSTER SLOTS`) and pings every
//! master a few times a second. From the first sign of trouble (a master that does
//! not answer, slots without a master, a topology that changed) until the cluster is
//! whole again and the removals of the window have been applied again, this instance
//! reads none of those keys from Redis (the call runs its body): a failover takes
//! at least the cluster's node timeout, so the sign comes before any replica can be
//! promoted. Then the in-process tier is cleared, since it may hold values read
//! from a promoted replica before another instance replayed its own removals.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::time::{Duration, Instant};

use crate::node_con::ClusterConnection;
use redis::cluster_routing::{RoutingInfo, SingleNodeRoutingInfo};
use redis::RedisResult;

use crate::endpoint::{Conn, SlotNow, Trouble};
use crate::link::Link;
use crate::topology::{topology, Node, Topology};

/// How often the watcher reads the topology and pings the masters.
pub(crate) const WATCH_EVERY: Duration = Duration::from_millis(250);
/// How long the topology may go unread before the cluster connection is made again.
const REDIAL_AFTER: Duration = Duration::from_secs(2);

/// What a master answered the watcher.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Answer {
    /// `INFO replication`, with how many of its replicas are online.
    Online(usize),
    /// Another answer (a refusal, a reply not understood): it is there.
    Alive,
    /// A connection error at once (refused, reset): it is gone.
    Gone,
    /// Nothing within the timeout: gone, or only slow.
    Silent,
}

/// What each master (by its index in `t.masters`) answered `INFO replication` with
/// within `timeout`.
async fn masters_answer(con: &ClusterConnection, t: &Topology, timeout: Duration) -> Vec<Answer> {
    let asks = t.masters.iter().map(|m| {
        let mut con = con.clone();
        let route = RoutingInfo::SingleNode(SingleNodeRoutingInfo::ByAddress {
            host: m.host.clone(),
            port: m.port,
        });
        let info = redis::cmd("INFO").arg("replication").clone();
        async move {
            match tokio::time::timeout(timeout, con.route_command(info, route)).await {
                Ok(Ok(reply)) => match redis::from_redis_value::<String>(reply) {
                    Ok(text) => Answer::Online(online_replicas(&text)),
                    Err(_) => Answer::Alive,
                },
                Ok(Err(e)) if e.code().is_some() => Answer::Alive,
                Ok(Err(_)) => Answer::Gone,
                Err(_) => Answer::Silent,
            }
        }
    });
    futures_util::future::join_all(asks).await
}

/// A master silent this many looks in a row is taken for down: one silent look
/// may be a master only slow (a loaded machine), whose commands would still be
/// answered within the operation timeout.
const SILENT_LOOKS: u32 = 2;

/// Which masters (by id) were silent in the last looks, and how many in a row.
#[derive(Default)]
struct Silences(HashMap<String, u32>);

impl Silences {
    /// What to make of `answers` (by index in `t.masters`): a master is down if it
    /// is gone, or silent [`SILENT_LOOKS`] in a row; `None` where it is not known.
    fn judge(&mut self, t: &Topology, answers: &[Answer]) -> Vec<Option<Option<usize>>> {
        let mut seen = HashMap::new();
        let judged = t
            .masters
            .iter()
            .zip(answers)
            .map(|(m, a)| match a {
                Answer::Online(n) => Some(Some(*n)),
                Answer::Alive => None,
                Answer::Gone => Some(None),
                Answer::Silent => {
                    let looks = self.0.get(&m.id).copied().unwrap_or(0) + 1;
                    seen.insert(m.id.clone(), looks);
                    (looks >= SILENT_LOOKS).then_some(None)
                }
            })
            .collect();
        self.0 = seen;
        judged
    }
}

/// How many replicas `INFO replication` lists online (`slaveN:...,state=online,...`).
fn online_replicas(info: &str) -> usize {
    info.lines()
        .filter(|l| l.starts_with("slave") && l.contains("state=online"))
        .count()
}

/// What is wrong with the slots of `t`, given what was made of each master's
/// answer (by its index in `t.masters`: `None` unknown, `Some(None)` down,
/// `Some(Some(n))` with `n` replicas online): slots no master serves or whose
/// master is down are down; those whose master has no replica online cannot have a
/// removal acknowledged.
fn trouble(t: &Topology, judged: &[Option<Option<usize>>]) -> Trouble {
    let mut trouble = Trouble::default();
    let mut next = 0u32;
    for (start, end, id) in &t.ranges {
        if u32::from(*start) > next {
            trouble.down.push((next as u16, start - 1));
        }
        next = next.max(u32::from(*end) + 1);
        let judged = t
            .masters
            .iter()
            .position(|m| &m.id == id)
            .map_or(Some(None), |m| judged.get(m).copied().flatten());
        match judged {
            Some(None) => trouble.down.push((*start, *end)),
            // (whether a removal there waits for a replica is the pipeline's call:
            // one the cluster no longer lists may still count)
            Some(Some(0)) => trouble.unacked.push((*start, *end)),
            Some(Some(_)) | None => {}
        }
    }
    if next < 16_384 {
        trouble.down.push((next as u16, 16_383));
    }
    trouble
}

/// This instance's removals of the last `window`, and whether they must be applied
/// again before their keys are read from Redis.
pub(crate) struct Recent {
    window: Duration,
    /// Removed keys (without the prefix), with when.
    keys: Mutex<Keys>,
    /// Set from a sign of trouble until the removals were applied again.
    unsure: AtomicBool,
    pub(crate) topology_changes: AtomicU64,
    pub(crate) replayed: AtomicU64,
    /// Times the watcher found the dependency graph lost (see [`know_graph`]).
    pub(crate) graphs_lost: AtomicU64,
    /// With the dependency graph: the highest invalidation count read from the
    /// cluster (see [`crate::tombstones`]), which reads report as theirs.
    pub(crate) epoch: AtomicU64,
    /// With the dependency graph: this instance's walks.
    pub(crate) walks: crate::tombstones::Walks,
}

#[derive(Default)]
struct Keys {
    at: HashMap<String, Instant>,
    /// With the dependency graph: the nodes invalidations started from, with when.
    nodes: HashMap<String, Instant>,
    /// The last `clear` of this instance.
    cleared: Option<Instant>,
    pruned: Option<Instant>,
}

impl Recent {
    pub(crate) fn new(window: Duration) -> Recent {
        Recent {
            window,
            keys: Mutex::default(),
            unsure: AtomicBool::new(false),
            topology_changes: AtomicU64::new(0),
            replayed: AtomicU64::new(0),
            graphs_lost: AtomicU64::new(0),
            epoch: AtomicU64::new(0),
            walks: crate::tombstones::Walks::new(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Keys> {
        self.keys.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Records removed keys.
    pub(crate) fn removed(&self, keys: &[String]) {
        self.invalidated(&[], keys);
    }

    /// Records an invalidation of the graph: the nodes it started from, the keys it
    /// removed.
    pub(crate) fn invalidated(&self, nodes: &[String], keys: &[String]) {
        let now = Instant::now();
        let mut k = self.lock();
        for key in keys {
            k.at.insert(key.clone(), now);
        }
        for node in nodes {
            k.nodes.insert(node.clone(), now);
        }
        if k.pruned
            .is_none_or(|t| now.duration_since(t) >= self.window)
        {
            let window = self.window;
            k.at.retain(|_, t| now.duration_since(*t) < window);
            k.nodes.retain(|_, t| now.duration_since(*t) < window);
            k.pruned = Some(now);
        }
    }

    /// Records a clear of every key.
    pub(crate) fn cleared(&self) {
        self.lock().cleared = Some(Instant::now());
    }

    /// Whether reads may have to be held (a cheap check before [`Recent::holds`]).
    #[inline]
    pub(crate) fn unsure(&self) -> bool {
        self.unsure.load(Ordering::Acquire)
    }

    /// Whether a read of `key` must not be served from Redis now: a removal of it
    /// within the window may not be on the node that would answer.
    #[inline]
    pub(crate) fn holds(&self, key: &str) -> bool {
        if !self.unsure.load(Ordering::Acquire) {
            return false;
        }
        let k = self.lock();
        let recent = |t: &Instant| t.elapsed() < self.window;
        k.cleared.as_ref().is_some_and(recent) || k.at.get(key).is_some_and(recent)
    }

    fn suspect(&self) {
        if !self.unsure.swap(true, Ordering::AcqRel) {
            tracing::info!(target: "cache_redis", "the cluster is changing: this instance's recent removals will be applied again once it is whole");
        }
    }

    /// The removals of the window, and whether a clear is among them.
    fn window(&self) -> Window {
        let k = self.lock();
        let recent = |t: &Instant| t.elapsed() < self.window;
        let within = |m: &HashMap<String, Instant>| {
            m.iter()
                .filter(|(_, t)| recent(t))
                .map(|(key, _)| key.clone())
                .collect()
        };
        Window {
            keys: within(&k.at),
            nodes: within(&k.nodes),
            cleared: k.cleared.as_ref().is_some_and(recent),
        }
    }
}

/// The removals of the window.
struct Window {
    keys: Vec<String>,
    nodes: Vec<String>,
    cleared: bool,
}

/// What the watcher applies again: the backend's removals under `prefix`; and whom
/// it tells that the in-process tiers may hold stale values.
pub(crate) struct Replayer {
    pub(crate) prefix: String,
    /// With the dependency graph.
    pub(crate) graph: Option<crate::graph::GraphKeys>,
    pub(crate) endpoint: Arc<crate::endpoint::Endpoint>,
    pub(crate) receivers: Arc<crate::bus::Receivers>,
}

impl Replayer {
    async fn replay(
        &self,
        link: &Arc<Link>,
        con: &ClusterConnection,
        w: &Window,
        masters: &[Node],
        recent: &Recent,
    ) -> RedisResult<()> {
        let replicas = |slot| self.endpoint.replicas_of(slot);
        match &self.graph {
            // the graph's changes may be lost too: the walk runs again from the
            // nodes of the window, and every key of the window is buried again
            Some(graph) => {
                let failed = |e: cache_runtime::RemoteError| {
                    redis::RedisError::from((redis::ErrorKind::Io, "replay", e.0))
                };
                let mut walked = crate::tombstones::walk(link, graph, &recent.walks, &w.nodes)
                    .await
                    .map_err(failed)?;
                let keys = &mut walked.keys;
                keys.extend(w.keys.iter().map(|k| format!("{}{k}", self.prefix)));
                keys.append(&mut walked.others);
                let (count, counts) = (walked.count, &walked.counts);
                let published = crate::tombstones::bury(link, graph, count, keys, counts)
                    .await
                    .map_err(failed)?;
                recent.epoch.fetch_max(published, Ordering::AcqRel);
            }
            None => remove_keys(con, &self.prefix, &w.keys, &replicas).await?,
        }
        if w.cleared {
            let pattern = format!("{}*", crate::graph::glob_escape(&self.prefix));
            unlink_matching(con, masters, &pattern, &replicas).await?;
        }
        Ok(())
    }
}

/// The watcher: ends when the backend is dropped (`recent` and `replay` are gone).
pub(crate) async fn watch(
    link: Arc<Link>,
    recent: Weak<Recent>,
    replay: Weak<Replayer>,
    timeout: Duration,
) {
    let mut stable: Option<Topology> = None;
    let mut silences = Silences::default();
    // since when the topology could not be read
    let mut blind: Option<Instant> = None;
    let mut ticks = tokio::time::interval(WATCH_EVERY);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        let Some(recent) = recent.upgrade() else {
            return;
        };
        let con = match link.conn() {
            Some(Conn::Cluster(con)) => con,
            Some(Conn::Node(_)) => return,
            None => {
                // not connected: whatever happens meanwhile is unseen
                if stable.is_some() {
                    recent.suspect();
                }
                continue;
            }
        };
        let seen = match tokio::time::timeout(timeout, topology(&con)).await {
            Ok(Ok(t)) => t,
            _ => {
                recent.suspect();
                // a cluster connection recovers from the nodes it started from only:
                // after a while, start again from the nodes last seen
                if blind.get_or_insert_with(Instant::now).elapsed() > REDIAL_AFTER {
                    tracing::info!(target: "cache_redis", "the cluster does not answer; connecting again from the nodes last seen");
                    link.redial();
                    blind = None;
                }
                continue;
            }
        };
        blind = None;
        link.endpoint().saw(&seen);
        let answers = masters_answer(&con, &seen, timeout).await;
        let found = trouble(&seen, &silences.judge(&seen, &answers));
        let whole = found.down.is_empty()
            && answers
                .iter()
                .all(|a| matches!(a, Answer::Online(_) | Answer::Alive));
        link.endpoint().set_trouble(found);
        if !whole {
            recent.suspect();
            continue;
        }
        let changed = stable
            .as_ref()
            .is_some_and(|s| s.ranges != seen.ranges || s.masters != seen.masters);
        if changed {
            recent.suspect();
        }
        let Some(replay) = replay.upgrade() else {
            return;
        };
        if let Some(graph) = &replay.graph {
            // the count reads report (see `crate::tombstones`), and the graph's
            // identity (see `know_graph`)
            let mut get = redis::cmd("MGET");
            get.arg(format!("{}epoch", graph.g()))
                .arg(format!("{}gen", graph.g()));
            if let Ok(Ok((n, gen))) =
                tokio::time::timeout(timeout, link.query::<(Option<u64>, Option<String>)>(&get))
                    .await
            {
                // stored, not raised: a count that went down (a clear, a failover
                // that lost invalidations) must go down here too
                recent.epoch.store(n.unwrap_or(0), Ordering::Release);
                if gen.as_deref() != Some(graph.gen().as_str()) {
                    // (with none known yet, this is the first start under the prefix:
                    // the tick came before the build's own look)
                    let lost = !graph.gen().is_empty();
                    let replicas = |slot| replay.endpoint.replicas_of(slot);
                    match know_graph(&link, &con, graph, &seen.masters, &replicas).await {
                        Ok(true) if !lost => {}
                        Ok(true) => {
                            replay.receivers.stale();
                            recent.graphs_lost.fetch_add(1, Ordering::Relaxed);
                            tracing::warn!(target: "cache_redis", "the dependency graph was lost (its master restarted or failed over without it) or cleared: the values under the prefix were removed, in-process tier cleared");
                        }
                        Ok(false) => {}
                        Err(e) => {
                            tracing::debug!(target: "cache_redis", error = %e, "catching up with the dependency graph failed; trying again");
                        }
                    }
                }
            }
        }
        if recent.unsure.load(Ordering::Acquire) {
            let w = recent.window();
            let done = replay.replay(&link, &con, &w, &seen.masters, &recent).await;
            let (keys, cleared) = (w.keys, w.cleared);
            if let Err(e) = done {
                tracing::debug!(target: "cache_redis", error = %e, "applying the recent removals again failed; trying again");
                continue;
            }
            replay.receivers.stale();
            recent.unsure.store(false, Ordering::Release);
            recent
                .replayed
                .fetch_add(keys.len() as u64 + u64::from(cleared), Ordering::Relaxed);
            if changed {
                recent.topology_changes.fetch_add(1, Ordering::Relaxed);
            }
            tracing::info!(target: "cache_redis", replayed = keys.len(), changed, "the cluster is whole: recent removals applied again, in-process tier cleared");
        }
        stable = Some(seen);
    }
}

/// On a cluster with the dependency graph: reads the graph's identity (`gen`) and
/// makes it the one `graph` knows. A graph without one is new, or was lost (its
/// master restarted or failed over without it) or cleared; one other than the one
/// known was lost and made again by another instance. Either way values under the
/// prefix may be on the masters with links the graph does not have, where no
/// invalidation would reach them: they are removed from every master first, then the
/// graph gets an identity if it has none, and that is adopted (until then, the
/// instance's graph scripts are refused: see `publish_epoch.lua`). A graph found
/// with an identity by an instance that knew none yet is adopted as it is. Returns
/// whether values were removed.
pub(crate) async fn know_graph(
    link: &Arc<Link>,
    con: &ClusterConnection,
    graph: &crate::graph::GraphKeys,
    masters: &[Node],
    replicas: &(dyn Fn(u16) -> usize + Sync),
) -> RedisResult<bool> {
    let failed = |e: cache_runtime::RemoteError| {
        redis::RedisError::from((redis::ErrorKind::Io, "the graph's identity", e.0))
    };
    let key = format!("{}gen", graph.g());
    let gen: Option<String> = link
        .query(redis::cmd("GET").arg(&key))
        .await
        .map_err(failed)?;
    let known = graph.gen();
    if let Some(gen) = &gen {
        if known.is_empty() || **known == *gen {
            graph.set_gen(gen.clone());
            return Ok(false);
        }
    }
    let pattern = format!("{}*", crate::graph::glob_escape(&graph.values));
    unlink_matching(con, masters, &pattern, replicas).await?;
    if gen.is_none() {
        let fresh = format!("{:x}", cache_runtime::new_instance_id());
        let _: Option<String> = link
            .query(redis::cmd("SET").arg(&key).arg(fresh).arg("NX"))
            .await
            .map_err(failed)?;
    }
    let gen: Option<String> = link
        .query(redis::cmd("GET").arg(&key))
        .await
        .map_err(failed)?;
    graph.set_gen(gen.unwrap_or_default());
    Ok(true)
}

/// Removes every key matching `pattern` on every master: `SCAN` on each, `UNLINK`
/// by slot.
pub(crate) async fn unlink_matching(
    con: &ClusterConnection,
    masters: &[Node],
    pattern: &str,
    replicas: &(dyn Fn(u16) -> usize + Sync),
) -> RedisResult<()> {
    for m in masters {
        let route = RoutingInfo::SingleNode(SingleNodeRoutingInfo::ByAddress {
            host: m.host.clone(),
            port: m.port,
        });
        let mut cursor: u64 = 0;
        loop {
            let mut scan = redis::cmd("SCAN");
            scan.arg(cursor)
                .arg("MATCH")
                .arg(pattern)
                .arg("COUNT")
                .arg(500);
            let reply = con.clone().route_command(scan, route.clone()).await?;
            let (next, keys): (u64, Vec<Vec<u8>>) = redis::from_redis_value(reply)?;
            if !keys.is_empty() {
                let mut pipe = redis::pipe();
                for k in keys {
                    pipe.cmd("UNLINK").arg(k);
                }
                refused(
                    crate::endpoint::cluster_pipeline(con, &pipe, replicas, &|_| SlotNow::Up)
                        .await?,
                )?;
            }
            if next == 0 {
                break;
            }
            cursor = next;
        }
    }
    Ok(())
}

/// Removes `keys` (each with `prefix`), a thousand to a pipeline.
pub(crate) async fn remove_keys(
    con: &ClusterConnection,
    prefix: &str,
    keys: &[String],
    replicas: &(dyn Fn(u16) -> usize + Sync),
) -> RedisResult<()> {
    for chunk in keys.chunks(1000) {
        let mut pipe = redis::pipe();
        for k in chunk {
            pipe.cmd("DEL").arg(crate::writer::Prefixed(prefix, k));
        }
        refused(crate::endpoint::cluster_pipeline(con, &pipe, replicas, &|_| SlotNow::Up).await?)?;
    }
    Ok(())
}

/// The first error among a pipeline's replies (a removal refused, or that no
/// replica acknowledged), as an error.
fn refused(replies: Vec<redis::Value>) -> RedisResult<()> {
    for v in replies {
        v.extract_error()?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(id: &str) -> Node {
        Node {
            host: "127.0.0.1".into(),
            port: 7000,
            id: id.into(),
        }
    }

    #[test]
    fn slots_in_trouble_are_those_of_silent_masters_of_none_and_of_lone_masters() {
        let t = Topology {
            ranges: vec![
                (0, 5460, "a".into()),
                (5461, 10922, "b".into()),
                (10923, 16383, "c".into()),
            ],
            masters: vec![node("a"), node("b"), node("c")],
            replicas: vec![1, 1, 0],
            ..Topology::default()
        };
        let up = |n: usize| Some(Some(n));
        assert!(trouble(&t, &[up(1), up(1), up(1)]).is_empty());
        assert_eq!(
            trouble(&t, &[up(1), Some(None), up(1)]).down,
            vec![(5461, 10922)]
        );
        // not known (silent once): nothing said of its slots
        assert!(trouble(&t, &[up(1), None, up(1)]).is_empty());
        // a master whose replica is syncing (or that has none)
        let syncing = trouble(&t, &[up(0), up(1), up(1)]);
        assert_eq!((syncing.down, syncing.unacked), (vec![], vec![(0, 5460)]));
        let gaps = Topology {
            ranges: vec![(100, 200, "a".into()), (300, 16_000, "b".into())],
            masters: vec![node("a"), node("b")],
            replicas: vec![0, 0],
            ..Topology::default()
        };
        assert_eq!(
            trouble(&gaps, &[up(0), up(0)]).down,
            vec![(0, 99), (201, 299), (16_001, 16_383)]
        );
        assert_eq!(trouble(&Topology::default(), &[]).down, vec![(0, 16_383)]);
    }

    #[test]
    fn a_master_is_down_when_gone_or_silent_twice_in_a_row() {
        let t = Topology {
            masters: vec![node("a"), node("b")],
            ..Topology::default()
        };
        let mut s = Silences::default();
        use Answer::*;
        assert_eq!(
            s.judge(&t, &[Online(1), Gone]),
            vec![Some(Some(1)), Some(None)]
        );
        assert_eq!(s.judge(&t, &[Silent, Online(0)]), vec![None, Some(Some(0))]);
        assert_eq!(
            s.judge(&t, &[Silent, Online(0)]),
            vec![Some(None), Some(Some(0))]
        );
        // an answer ends the silence; a refusal says it is there, not how
        assert_eq!(s.judge(&t, &[Online(1), Online(0)])[0], Some(Some(1)));
        assert_eq!(s.judge(&t, &[Alive, Online(0)])[0], None);
        assert_eq!(s.judge(&t, &[Silent, Online(0)])[0], None);
    }

    #[test]
    fn online_replicas_are_counted_from_info() {
        let info = "# Replication\r\nrole:master\r\nconnected_slaves:2\r\nslave0:ip=127.0.0.1,port=7003,state=online,offset=2339,lag=0\r\nslave1:ip=127.0.0.1,port=7004,state=wait_bgsave,offset=0,lag=0\r\nmaster_repl_offset:2339\r\n";
        assert_eq!(online_replicas(info), 1);
        assert_eq!(online_replicas("role:master\r\nconnected_slaves:0\r\n"), 0);
    }

    #[test]
    fn recent_removals_hold_reads_only_while_unsure() {
        let recent = Recent::new(Duration::from_secs(30));
        recent.removed(&["a".into()]);
        assert!(!recent.holds("a"));
        recent.suspect();
        assert!(recent.holds("a"));
        assert!(!recent.holds("b"));
        recent.cleared();
        assert!(recent.holds("b"));
        let w = recent.window();
        let (keys, cleared) = (w.keys, w.cleared);
        assert_eq!(keys, vec!["a".to_owned()]);
        assert!(cleared);
    }
}
