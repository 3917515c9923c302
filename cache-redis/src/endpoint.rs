//! Where a backend connects: a standalone server, or a Redis Cluster reached from any
//! of its nodes. Which one is found out at the first connection (`INFO cluster`), by
//! trying the URL given and then the seed nodes in turn; the answer is kept.
//!
//! On a cluster, commands go through redis-rs's cluster connection, which routes each
//! by its key's slot and follows `MOVED` and `ASK`. A pipeline, which Redis runs on one
//! node, is split by slot here: [`cluster_pipeline`].

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, OnceLock, PoisonError};
use std::time::{Duration, Instant};

use crate::node_con::ClusterConnection;
use redis::aio::{ConnectionLike, MultiplexedConnection};
use redis::cluster::{ClusterClient, ClusterClientBuilder};
use redis::cluster_routing::{Route, SingleNodeRoutingInfo, SlotAddr};

use crate::topology::Topology;
use redis::{
    AsyncConnectionConfig, Client, Cmd, ConnectionAddr, ConnectionInfo, RedisError, RedisFuture,
    RedisResult, Value,
};

/// A connection to a standalone server, or to a cluster (to each of its nodes).
#[derive(Clone)]
pub(crate) enum Conn {
    Node(MultiplexedConnection),
    Cluster(ClusterConnection),
}

impl ConnectionLike for Conn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Conn::Node(c) => c.req_packed_command(cmd),
            Conn::Cluster(c) => c.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipe: &'a redis::Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Conn::Node(c) => c.req_packed_commands(pipe, offset, count),
            Conn::Cluster(c) => Box::pin(async move {
                let replies = cluster_pipeline(c, pipe, &|_| 0, &|_| SlotNow::Up).await?;
                Ok(replies.into_iter().skip(offset).take(count).collect())
            }),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Conn::Node(c) => c.get_db(),
            Conn::Cluster(_) => 0,
        }
    }
}

/// A standalone server or a cluster.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Kind {
    Node,
    Cluster,
}

/// Where to connect: the URL given and the seed nodes, and once found out, whether
/// they are one server or a cluster.
pub(crate) struct Endpoint {
    /// The URL given, then the seed nodes: tried in this order.
    seeds: Vec<Client>,
    root_certificate: Option<Vec<u8>>,
    kind: OnceLock<Kind>,
    /// The cluster's nodes as last seen, then the seeds: where a subscriber connects,
    /// and where a cluster connection starts from (redis-rs recovers a connection
    /// whose every node is lost from these only).
    nodes: Mutex<Vec<Client>>,
    /// The cluster's topology as last seen.
    topology: Mutex<Option<Topology>>,
    /// By master id: the most replicas seen listed for it, and when last: a replica
    /// the cluster stops listing while it fails (or a node's view that lags) still
    /// counts for [`REPLICAS_REMEMBERED`], since it may come back and take over.
    replicas_seen: Mutex<HashMap<String, (usize, Instant)>>,
    /// What the watcher's last look found wrong with some slots (see
    /// [`Endpoint::set_trouble`]), and whether anything is.
    trouble: Mutex<Trouble>,
    any_trouble: AtomicBool,
}

/// Slot ranges (inclusive) the watcher found in trouble.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct Trouble {
    /// Served by no master, or by one that did not answer.
    pub(crate) down: Vec<(u16, u16)>,
    /// Served by a master none of whose replicas is online (one syncing, one that
    /// dropped out): a `WAIT 1` there cannot be acknowledged.
    pub(crate) unacked: Vec<(u16, u16)>,
}

impl Trouble {
    pub(crate) fn is_empty(&self) -> bool {
        self.down.is_empty() && self.unacked.is_empty()
    }
}

/// A slot as the watcher last saw it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum SlotNow {
    Up,
    /// See [`Trouble::down`].
    Down,
    /// See [`Trouble::unacked`].
    Unacked,
}

/// The error a command for a slot without an answering master gets, unsent.
pub(crate) const SLOT_DOWN: &str =
    "MASTERDOWN the slot's master did not answer the last ping (a failover?); not sent";

/// How long a replica no longer listed still counts (see `Endpoint::replicas_of`).
const REPLICAS_REMEMBERED: Duration = Duration::from_secs(30);

impl Endpoint {
    pub(crate) fn new(seeds: Vec<Client>, root_certificate: Option<Vec<u8>>) -> Endpoint {
        Endpoint {
            nodes: Mutex::new(seeds.clone()),
            seeds,
            root_certificate,
            kind: OnceLock::new(),
            topology: Mutex::new(None),
            replicas_seen: Mutex::default(),
            trouble: Mutex::default(),
            any_trouble: AtomicBool::new(false),
        }
    }

    /// Records what the watcher found wrong (nothing once every master answers and has
    /// a replica online). Until its next look, a read or a write of a key of a slot
    /// without an answering master fails at once, where it would wait the operation
    /// timeout for a master that is gone (the call runs its body, a removal is held
    /// and sent again): the other slots keep their throughput through a failover. A
    /// removal on a slot whose master has no replica online is sent without `WAIT`
    /// and answered `NOREPLICAS` at once (held and sent again, as after a `WAIT`
    /// that timed out), where each would hold up the writer for the `WAIT`'s 100 ms:
    /// a replica that rejoins syncs in full, which takes seconds (a diskless sync
    /// waits 5 s for more replicas by default).
    pub(crate) fn set_trouble(&self, trouble: Trouble) {
        let mut t = self.trouble.lock().unwrap_or_else(PoisonError::into_inner);
        self.any_trouble
            .store(!trouble.is_empty(), Ordering::Release);
        *t = trouble;
    }

    /// `slot` as the watcher last saw it.
    pub(crate) fn slot_now(&self, slot: u16) -> SlotNow {
        if !self.any_trouble.load(Ordering::Acquire) {
            return SlotNow::Up;
        }
        let t = self.trouble.lock().unwrap_or_else(PoisonError::into_inner);
        let within = |ranges: &[(u16, u16)]| ranges.iter().any(|(a, b)| (*a..=*b).contains(&slot));
        if within(&t.down) {
            SlotNow::Down
        } else if within(&t.unacked) {
            SlotNow::Unacked
        } else {
            SlotNow::Up
        }
    }

    /// The first address given (without credentials), for errors.
    pub(crate) fn addr(&self) -> String {
        self.seeds[0].get_connection_info().addr().to_string()
    }

    /// The first URL's client (its user, its settings).
    pub(crate) fn first(&self) -> &Client {
        &self.seeds[0]
    }

    /// What the endpoint is, if found out already.
    pub(crate) fn kind(&self) -> Option<Kind> {
        self.kind.get().copied()
    }

    /// Where a subscriber may connect: on a cluster, any node (a `PUBLISH` reaches
    /// every node); the last seen nodes first, then the seeds.
    pub(crate) fn subscribers(&self) -> Vec<Client> {
        self.nodes
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Records a cluster's topology as seen, and its nodes.
    pub(crate) fn saw(&self, topology: &Topology) {
        {
            let mut seen = self
                .replicas_seen
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            let now = Instant::now();
            for ((_, _, master), &n) in topology.ranges.iter().zip(&topology.replicas) {
                let entry = seen.entry(master.clone()).or_insert((0, now));
                if n >= entry.0 || entry.1.elapsed() > REPLICAS_REMEMBERED {
                    *entry = (n, now);
                }
            }
        }
        *self.topology.lock().unwrap_or_else(PoisonError::into_inner) = Some(topology.clone());
        let mut clients: Vec<Client> = topology
            .nodes
            .iter()
            .filter_map(|(host, port)| self.client_at(host, *port))
            .collect();
        clients.extend(self.seeds.iter().cloned());
        *self.nodes.lock().unwrap_or_else(PoisonError::into_inner) = clients;
    }

    /// How many replicas the master of `slot` had when last seen.
    pub(crate) fn replicas_of(&self, slot: u16) -> usize {
        let topology = self.topology.lock().unwrap_or_else(PoisonError::into_inner);
        let Some(t) = topology.as_ref() else { return 0 };
        let listed = t.replicas_of(slot);
        let master = t
            .ranges
            .iter()
            .find(|(a, b, _)| (*a..=*b).contains(&slot))
            .map(|(_, _, id)| id);
        let remembered = master.and_then(|id| {
            let seen = self
                .replicas_seen
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            seen.get(id)
                .filter(|(_, at)| at.elapsed() <= REPLICAS_REMEMBERED)
                .map(|(n, _)| *n)
        });
        listed.max(remembered.unwrap_or(0))
    }

    /// A client for the node at `host:port`, with the first URL's credentials and TLS.
    pub(crate) fn client_at(&self, host: &str, port: u16) -> Option<Client> {
        let info: ConnectionInfo = self.seeds[0].get_connection_info().clone();
        let addr = match info.addr() {
            ConnectionAddr::TcpTls {
                insecure,
                tls_params,
                ..
            } => ConnectionAddr::TcpTls {
                host: host.to_owned(),
                port,
                insecure: *insecure,
                tls_params: tls_params.clone(),
            },
            _ => ConnectionAddr::Tcp(host.to_owned(), port),
        };
        Client::open(info.set_addr(addr)).ok()
    }

    /// Connects: finds out what the endpoint is (the first time), then opens a
    /// connection to the server, or to the cluster. Its requests end after
    /// `response_timeout`, unless `deadlines` says the caller bounds each one (see
    /// [`crate::deadline`]).
    pub(crate) async fn connect(
        &self,
        connect_timeout: Duration,
        response_timeout: Duration,
        deadlines: Deadlines,
    ) -> RedisResult<Conn> {
        let config = AsyncConnectionConfig::new()
            .set_connection_timeout(Some(connect_timeout))
            .set_response_timeout(Some(response_timeout));
        let kind = match self.kind() {
            Some(kind) => kind,
            None => self.detect(&config).await?,
        };
        match kind {
            Kind::Node => {
                let config = match deadlines {
                    Deadlines::Connection => config,
                    Deadlines::Caller => config.set_response_timeout(None),
                };
                let mut last = None;
                for client in &self.seeds {
                    match client
                        .get_multiplexed_async_connection_with_config(&config)
                        .await
                    {
                        Ok(c) => return Ok(Conn::Node(c)),
                        Err(e) => last = Some(e),
                    }
                }
                Err(last.unwrap_or_else(no_seed))
            }
            Kind::Cluster => {
                let cluster = self.cluster(connect_timeout, response_timeout, deadlines)?;
                let deadline = match deadlines {
                    Deadlines::Connection => None,
                    Deadlines::Caller => Some(response_timeout),
                };
                Ok(Conn::Cluster(ClusterConnection::new(
                    cluster.get_async_generic_connection().await?,
                    deadline,
                )))
            }
        }
    }

    /// Asks the seeds in turn whether they are a cluster's nodes.
    async fn detect(&self, config: &AsyncConnectionConfig) -> RedisResult<Kind> {
        let mut last = None;
        for client in &self.seeds {
            // database 0 to ask: a cluster node refuses `SELECT`
            let info = client.get_connection_info().clone();
            let settings = info.redis_settings().clone().set_db(0);
            let asking = Client::open(info.set_redis_settings(settings))?;
            let mut con = match asking
                .get_multiplexed_async_connection_with_config(config)
                .await
            {
                Ok(con) => con,
                Err(e) => {
                    last = Some(e);
                    continue;
                }
            };
            let info: String = redis::cmd("INFO")
                .arg("cluster")
                .query_async(&mut con)
                .await?;
            let kind = match info.lines().any(|l| l.trim() == "cluster_enabled:1") {
                true => Kind::Cluster,
                false => Kind::Node,
            };
            if kind == Kind::Cluster {
                if client.get_connection_info().redis_settings().db() != 0 {
                    return Err(RedisError::from((
                        redis::ErrorKind::InvalidClientConfig,
                        "a Redis Cluster has only database 0: give the node's URL with `/0` or no database",
                    )));
                }
                let slots: Value = redis::cmd("CLUSTER")
                    .arg("SLOTS")
                    .query_async(&mut con)
                    .await?;
                self.saw(&crate::topology::parse_slots(&slots));
            }
            let _ = self.kind.set(kind);
            return Ok(kind);
        }
        Err(last.unwrap_or_else(no_seed))
    }

    /// A cluster client that starts from every node last seen.
    fn cluster(
        &self,
        connect_timeout: Duration,
        response_timeout: Duration,
        deadlines: Deadlines,
    ) -> RedisResult<ClusterClient> {
        let infos: Vec<ConnectionInfo> = self
            .subscribers()
            .iter()
            .map(|c| c.get_connection_info().clone())
            .collect();
        // the node connections have no response timeout of their own: what
        // redis-rs sends by itself is bounded by them, by the longest operation
        // timeout of the process (`NodeCon`)
        crate::node_con::bound_own_commands(response_timeout);
        let mut builder = ClusterClientBuilder::new(infos)
            .connection_timeout(connect_timeout)
            // a call waits for Redis at most the operation timeout, retries and
            // redirections included (by the connection's `ClusterConnection` with
            // the caller's deadlines); a redirection is followed at once
            .overall_response_timeout(match deadlines {
                Deadlines::Connection => Some(response_timeout),
                Deadlines::Caller => None,
            })
            .min_retry_wait(5)
            .max_retry_wait(50)
            .retry_wait_formula(5, 2);
        if let Some(pem) = &self.root_certificate {
            builder = builder.certs(redis::TlsCertificates {
                client_tls: None,
                root_cert: Some(pem.clone()),
            });
        }
        builder.build()
    }
}

/// Who ends a request that gets no reply in time.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum Deadlines {
    /// The connection, after its response timeout.
    Connection,
    /// The caller: each request is sent within [`crate::deadline::within`].
    Caller,
}

fn no_seed() -> RedisError {
    RedisError::from((redis::ErrorKind::InvalidClientConfig, "no Redis URL"))
}

/// A key's cluster slot: CRC16 (XMODEM) of the key, or of its hash tag (the part
/// between the first `{` and the next `}`, if not empty), modulo 16,384.
pub(crate) fn slot_of(key: &[u8]) -> u16 {
    let tagged = key.iter().position(|&b| b == b'{').and_then(|open| {
        let rest = &key[open + 1..];
        let close = rest.iter().position(|&b| b == b'}')?;
        (close > 0).then(|| &rest[..close])
    });
    let mut crc: u16 = 0;
    for &b in tagged.unwrap_or(key) {
        crc ^= u16::from(b) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 {
                (crc << 1) ^ 0x1021
            } else {
                crc << 1
            };
        }
    }
    crc % 16_384
}

/// How a command of a pipeline goes to a cluster.
enum Part {
    /// To one slot (and whether it removes keys).
    Slot(u16, bool),
    /// A removal of keys of several slots: one command per slot, replies summed.
    Split(Vec<(u16, Cmd)>),
    /// Alone, after what was queued before it: no key (`PUBLISH`), or keys of several
    /// slots that the cluster connection splits itself.
    Alone,
}

fn part_of(cmd: &Cmd) -> Part {
    let args: Vec<&[u8]> = cmd
        .args_iter()
        .map(|a| match a {
            redis::Arg::Simple(b) => b,
            _ => &[][..],
        })
        .collect();
    let Some(name) = args.first().map(|n| n.to_ascii_uppercase()) else {
        return Part::Alone;
    };
    let removal = match name.as_slice() {
        b"DEL" | b"UNLINK" => true,
        b"EVAL" | b"EVALSHA" => args.get(1).is_some_and(|s| crate::script::removes(s)),
        _ => false,
    };
    let keys: &[&[u8]] = match name.as_slice() {
        b"EVAL" | b"EVALSHA" => {
            let n: Option<usize> = args
                .get(2)
                .and_then(|n| std::str::from_utf8(n).ok()?.parse().ok());
            match n.and_then(|n| args.get(3..3 + n)) {
                Some(keys) => keys,
                None => return Part::Alone,
            }
        }
        b"PUBLISH" | b"PING" | b"SCAN" | b"INFO" | b"CONFIG" | b"SCRIPT" | b"CLUSTER" => {
            return Part::Alone
        }
        b"DEL" | b"UNLINK" | b"MGET" | b"EXISTS" | b"TOUCH" => &args[1..],
        _ => args.get(1..2).unwrap_or(&[]),
    };
    let Some(first) = keys.first().map(|k| slot_of(k)) else {
        return Part::Alone;
    };
    if keys.iter().all(|k| slot_of(k) == first) {
        return Part::Slot(first, removal);
    }
    if !removal {
        return Part::Alone;
    }
    let mut split: Vec<(u16, Cmd)> = Vec::new();
    for k in keys {
        let slot = slot_of(k);
        match split.iter_mut().find(|(s, _)| *s == slot) {
            Some((_, c)) => {
                c.arg(*k);
            }
            None => {
                let mut c = redis::cmd(std::str::from_utf8(&name).unwrap_or("DEL"));
                c.arg(*k);
                split.push((slot, c));
            }
        }
    }
    Part::Split(split)
}

/// The server's words for an error: its code and details.
pub(crate) fn words(e: &RedisError) -> String {
    match (e.code(), e.detail()) {
        (Some(code), Some(detail)) => format!("{code} {detail}"),
        _ => e.to_string(),
    }
}

/// A server's error reply carrying `text` (its first word the code, or `ERR`). Never
/// a success: a removal answered with it is held and sent again.
fn failed(text: &str) -> Value {
    let text = text.replace(['\r', '\n'], " ");
    let code = match text.split_whitespace().next() {
        Some(c) if c.bytes().all(|b| b.is_ascii_uppercase()) => "",
        _ => "ERR ",
    };
    match redis::parse_redis_value(format!("-{code}{text}\r\n").as_bytes()) {
        Ok(v @ Value::ServerError(_)) => v,
        // (not expected: a line that starts with `-` is an error; this one parses)
        _ => failed("ERR the command failed"),
    }
}

/// How long a removal waits for a replica to acknowledge it (`WAIT`).
const REPLICA_WAIT_MS: u64 = 100;

/// Above this many slots' pipelines that must wait for a replica, a pipeline waits
/// once per connection rather than once per slot (see [`cluster_pipeline`]).
const WAITS_PER_SLOT: usize = 8;

/// Set once a server refused `CLIENT INFO` (an ACL without it): this process's
/// pipelines then wait once per slot, whatever their size.
static CLIENT_INFO_REFUSED: AtomicBool = AtomicBool::new(false);

/// The connection a `CLIENT INFO` reply describes: the server's address as the
/// connection sees it (`laddr`) and the client's id there (`id`).
fn connection_of(reply: &Value) -> Option<(String, u64)> {
    let text = match reply {
        Value::BulkString(b) => std::str::from_utf8(b).ok()?,
        Value::VerbatimString { text, .. } => text.as_str(),
        Value::SimpleString(s) => s.as_str(),
        _ => return None,
    };
    let mut id = None;
    let mut laddr = None;
    for field in text.split_whitespace() {
        if let Some(v) = field.strip_prefix("id=") {
            id = v.parse().ok();
        } else if let Some(v) = field.strip_prefix("laddr=") {
            laddr = Some(v.to_owned());
        }
    }
    Some((laddr?, id?))
}

/// Whether a slot's pipeline is known to be on a replica.
enum Acked {
    /// Known: yes or no.
    Known(bool),
    /// Once the connection it ran on has waited (its `CLIENT INFO`).
    On((String, u64)),
}

/// One slot's pipeline: its commands, where each reply goes (the pipeline's index,
/// and whether it adds to a split removal's sum), and whether it removes keys.
struct Group {
    slot: u16,
    cmds: Vec<Cmd>,
    to: Vec<usize>,
    removes: bool,
}

/// Runs a pipeline on a cluster, where Redis runs a pipeline on one node only: the
/// commands of one slot go together as one pipeline, in their order, the slots' in
/// parallel. A removal of keys of several slots is split by slot (its reply is the
/// sum). A command without a key, or with keys of several slots that is not a
/// removal, waits for those before it and is routed alone.
///
/// A slot's pipeline that removes keys ends with `WAIT 1` when the slot's master has
/// a replica (per `replicas`): replication is asynchronous, and a replica promoted
/// before it saw a removal would serve the old value again. If no replica
/// acknowledges within [`REPLICA_WAIT_MS`], the pipeline's removals are answered
/// with a `NOREPLICAS` error, so that the caller holds their keys and sends them
/// again, as for any removal that failed. Replies come back in the pipeline's order.
///
/// With more than [`WAITS_PER_SLOT`] such pipelines (an invalidation's tombstones,
/// a collection's removals: a slot each), a `WAIT` each would queue on the server:
/// it runs one connection's commands in order, and each `WAIT` holds the connection
/// (the reads behind it included) until a replica acknowledges. So each ends with
/// `CLIENT INFO` instead, which names the connection it ran on (a redirected one
/// ran on another node's), and once they are all answered, each connection named
/// gets one `CLIENT INFO` and `WAIT 1`, routed by a slot of its pipelines: a `WAIT`
/// covers every write its connection made before it. If that `CLIENT INFO` names
/// another connection (the slot moved, the connection was made again), its
/// pipelines count as not acknowledged.
///
/// A slot's pipeline that fails (its master gone, the operation timeout) answers each
/// of its commands with the error: the other slots' commands stand. As `now` says
/// of a slot (see [`Endpoint::set_trouble`]): without an answering master, its
/// pipeline is not sent and its commands get [`SLOT_DOWN`]; without a replica
/// online, a removal's pipeline is sent without `WAIT` and answered `NOREPLICAS`.
/// A command routed alone that fails fails the whole.
pub(crate) async fn cluster_pipeline(
    con: &ClusterConnection,
    pipe: &redis::Pipeline,
    replicas: &(dyn Fn(u16) -> usize + Sync),
    now: &(dyn Fn(u16) -> SlotNow + Sync),
) -> RedisResult<Vec<Value>> {
    let cmds: Vec<&Cmd> = pipe.cmd_iter().collect();
    let mut replies = vec![Value::Nil; cmds.len()];
    // indexes of split removals, whose replies are sums
    let mut summed = vec![false; cmds.len()];
    let mut i = 0;
    while i < cmds.len() {
        // the commands of each slot, up to the next command sent alone
        let mut groups: Vec<Group> = Vec::new();
        let add = |groups: &mut Vec<Group>, slot: u16, cmd: Cmd, to: usize, removes: bool| {
            let at = match groups.iter().position(|g| g.slot == slot) {
                Some(at) => at,
                None => {
                    groups.push(Group {
                        slot,
                        cmds: Vec::new(),
                        to: Vec::new(),
                        removes: false,
                    });
                    groups.len() - 1
                }
            };
            let g = &mut groups[at];
            g.cmds.push(cmd);
            g.to.push(to);
            g.removes |= removes;
        };
        let mut alone = None;
        while i < cmds.len() {
            match part_of(cmds[i]) {
                Part::Slot(slot, removes) => add(&mut groups, slot, cmds[i].clone(), i, removes),
                Part::Split(parts) => {
                    summed[i] = true;
                    replies[i] = Value::Int(0);
                    for (slot, cmd) in parts {
                        add(&mut groups, slot, cmd, i, true);
                    }
                }
                Part::Alone => {
                    alone = Some(i);
                    i += 1;
                    break;
                }
            }
            i += 1;
        }
        let must_wait = |g: &Group| g.removes && replicas(g.slot) > 0;
        let waits = groups
            .iter()
            .filter(|g| must_wait(g) && now(g.slot) == SlotNow::Up)
            .count();
        let by_connection = waits > WAITS_PER_SLOT && !CLIENT_INFO_REFUSED.load(Ordering::Relaxed);
        let sent = groups.iter().map(|g| {
            let mut part = redis::pipe();
            part.ignore_errors();
            for cmd in &g.cmds {
                part.add_command(cmd.clone());
            }
            let slot = now(g.slot);
            let must_wait = must_wait(g);
            let wait = must_wait && slot != SlotNow::Unacked;
            match (wait, by_connection) {
                (false, _) => {}
                (true, false) => {
                    part.cmd("WAIT").arg(1).arg(REPLICA_WAIT_MS);
                }
                (true, true) => {
                    part.cmd("CLIENT").arg("INFO");
                }
            }
            let n = g.cmds.len() + usize::from(wait);
            let mut con = con.clone();
            let route = SingleNodeRoutingInfo::SpecificNode(Route::new(g.slot, SlotAddr::Master));
            async move {
                if slot == SlotNow::Down {
                    // already refused: `NOREPLICAS` must not replace `SLOT_DOWN`
                    return Ok((vec![failed(SLOT_DOWN); g.cmds.len()], Acked::Known(true)));
                }
                let mut values = con.route_pipeline(part, 0, n, route).await?;
                // the reply of the `WAIT` or `CLIENT INFO` appended
                let last = if wait { values.pop() } else { None };
                let acked = match (wait, by_connection) {
                    (false, _) => Acked::Known(!must_wait),
                    (true, false) => Acked::Known(matches!(last, Some(Value::Int(n)) if n >= 1)),
                    (true, true) => match last.as_ref().and_then(connection_of) {
                        Some(on) => Acked::On(on),
                        None => {
                            // not allowed (`NOPERM`), or unknown (before 6.2)
                            if let Some(Value::ServerError(e)) = &last {
                                if matches!(e.code(), "NOPERM" | "ERR") {
                                    CLIENT_INFO_REFUSED.store(true, Ordering::Relaxed);
                                }
                            }
                            Acked::Known(false)
                        }
                    },
                };
                Ok::<_, RedisError>((values, acked))
            }
        });
        let mut results = futures_util::future::join_all(sent).await;
        if by_connection {
            waited_by_connection(con, &groups, &mut results).await;
        }
        for (g, result) in groups.iter().zip(results) {
            let values = match result {
                Ok((mut values, acked)) => {
                    if !matches!(acked, Acked::Known(true)) {
                        let refused = failed("NOREPLICAS no replica acknowledged the removal");
                        for v in &mut values {
                            *v = refused.clone();
                        }
                    }
                    values
                }
                Err(e) => vec![failed(&words(&e)); g.cmds.len()],
            };
            for (&j, v) in g.to.iter().zip(values) {
                replies[j] = match (summed[j], &replies[j], v) {
                    (true, Value::Int(sum), Value::Int(n)) => Value::Int(sum + n),
                    (true, Value::ServerError(_), _) => continue,
                    (_, _, v) => v,
                };
            }
        }
        if let Some(at) = alone {
            let mut con = con.clone();
            replies[at] = con.req_packed_command(cmds[at]).await?;
        }
    }
    Ok(replies)
}

/// The second step of waiting by connection (see [`cluster_pipeline`]): one
/// `CLIENT INFO` and `WAIT 1` for each connection the slots' pipelines name, and
/// their outcome given to those pipelines.
async fn waited_by_connection(
    con: &ClusterConnection,
    groups: &[Group],
    results: &mut [RedisResult<(Vec<Value>, Acked)>],
) {
    // each connection named, and a slot to route its `WAIT` by
    let mut connections: Vec<(&(String, u64), u16)> = Vec::new();
    for (g, result) in groups.iter().zip(results.iter()) {
        if let Ok((_, Acked::On(on))) = result {
            if !connections.iter().any(|(c, _)| *c == on) {
                connections.push((on, g.slot));
            }
        }
    }
    let waited = connections.iter().map(|&(on, slot)| {
        let mut pipe = redis::pipe();
        pipe.ignore_errors();
        pipe.cmd("CLIENT").arg("INFO");
        pipe.cmd("WAIT").arg(1).arg(REPLICA_WAIT_MS);
        let route = SingleNodeRoutingInfo::SpecificNode(Route::new(slot, SlotAddr::Master));
        let mut con = con.clone();
        async move {
            match con.route_pipeline(pipe, 0, 2, route).await.as_deref() {
                Ok([info, Value::Int(n)]) => *n >= 1 && connection_of(info).as_ref() == Some(on),
                _ => false,
            }
        }
    });
    let waited = futures_util::future::join_all(waited).await;
    let outcome: Vec<((String, u64), bool)> = connections
        .iter()
        .map(|(on, _)| (*on).clone())
        .zip(waited)
        .collect();
    for (_, acked) in results.iter_mut().flatten() {
        if let Acked::On(on) = acked {
            let ok = outcome.iter().any(|(c, ok)| c == on && *ok);
            *acked = Acked::Known(ok);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_client_info_reply_names_its_connection() {
        let line = "id=47 addr=127.0.0.1:51234 laddr=127.0.0.1:7001 fd=9 name= age=0 \
                    idle=0 flags=N db=0 sub=0 psub=0 ssub=0 multi=-1 qbuf=26 cmd=client|info";
        let on = Some(("127.0.0.1:7001".to_owned(), 47));
        assert_eq!(connection_of(&Value::BulkString(line.into())), on);
        assert_eq!(
            connection_of(&Value::VerbatimString {
                format: redis::VerbatimFormat::Text,
                text: line.into()
            }),
            on
        );
        assert_eq!(
            connection_of(&Value::BulkString(b"id=47 addr=x".to_vec())),
            None
        );
        assert_eq!(connection_of(&Value::Int(1)), None);
    }

    #[test]
    fn slots_are_redis_cluster_slots() {
        // the values `CLUSTER KEYSLOT` gives
        assert_eq!(slot_of(b"foo"), 12182);
        assert_eq!(slot_of(b"bar"), 5061);
        assert_eq!(slot_of(b"{user1000}.following"), slot_of(b"user1000"));
        assert_eq!(slot_of(b"foo{}{bar}"), slot_of(b"foo{}{bar}"));
        assert_eq!(slot_of(b"foo{}{bar}"), 8363);
        for key in [&b"a"[..], b"shop:2:row(1)", b"{x}y", b"{}z"] {
            assert_eq!(
                redis::cluster_routing::Route::with_key(key, SlotAddr::Master),
                Route::new(slot_of(key), SlotAddr::Master)
            );
        }
    }

    #[test]
    fn failures_are_error_replies() {
        for text in [
            SLOT_DOWN,
            "NOREPLICAS no replica acknowledged the removal",
            "timed out",
            "",
            "line\r\nbreak",
        ] {
            assert!(
                matches!(failed(text), Value::ServerError(_)),
                "{text:?}: {:?}",
                failed(text)
            );
        }
        let Value::ServerError(e) = failed(SLOT_DOWN) else {
            unreachable!()
        };
        assert_eq!(e.code(), "MASTERDOWN");
    }

    #[test]
    fn removals_of_several_slots_are_split() {
        let mut del = redis::cmd("DEL");
        del.arg("foo").arg("bar").arg("{foo}x");
        let Part::Split(parts) = part_of(&del) else {
            panic!("not split")
        };
        assert_eq!(parts.len(), 2);
        assert!(matches!(
            part_of(redis::cmd("PUBLISH").arg("c").arg("m")),
            Part::Alone
        ));
        assert!(matches!(
            part_of(redis::cmd("SET").arg("foo").arg("v")),
            Part::Slot(12182, false)
        ));
        assert!(matches!(
            part_of(redis::cmd("DEL").arg("foo")),
            Part::Slot(12182, true)
        ));
    }
}
