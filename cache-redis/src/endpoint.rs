//! Where a backend connects: a standalone server, or a Redis Cluster reached from any
//! of its nodes. Which one is found out at the first connection (`INFO cluster`), by
//! trying the URL given and then the seed nodes in turn; the answer is kept.
//!
//! On a cluster, commands go through redis-rs's cluster connection, which routes each
//! by its key's slot and follows `MOVED` and `ASK`. A pipeline, which Redis runs on one
//! node, is split by slot here: [`cluster_pipeline`].

use std::sync::{Mutex, OnceLock, PoisonError};
use std::time::Duration;

use redis::aio::{ConnectionLike, MultiplexedConnection};
use redis::cluster::{ClusterClient, ClusterClientBuilder};
use redis::cluster_async::ClusterConnection;
use redis::cluster_routing::{Route, SingleNodeRoutingInfo, SlotAddr};
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
                let replies = cluster_pipeline(c, pipe).await?;
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
}

impl Endpoint {
    pub(crate) fn new(seeds: Vec<Client>, root_certificate: Option<Vec<u8>>) -> Endpoint {
        Endpoint {
            nodes: Mutex::new(seeds.clone()),
            seeds,
            root_certificate,
            kind: OnceLock::new(),
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

    /// Records a cluster's nodes (`host`, `port`), seen in its topology.
    pub(crate) fn saw_nodes(&self, nodes: &[(String, u16)]) {
        let mut clients: Vec<Client> = nodes
            .iter()
            .filter_map(|(host, port)| self.client_at(host, *port))
            .collect();
        clients.extend(self.seeds.iter().cloned());
        *self.nodes.lock().unwrap_or_else(PoisonError::into_inner) = clients;
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
    /// connection to the server, or to the cluster.
    pub(crate) async fn connect(
        &self,
        connect_timeout: Duration,
        response_timeout: Duration,
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
                let cluster = self.cluster(connect_timeout, response_timeout)?;
                Ok(Conn::Cluster(cluster.get_async_connection().await?))
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
                self.saw_nodes(&crate::topology::parse_slots(&slots).nodes);
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
    ) -> RedisResult<ClusterClient> {
        let infos: Vec<ConnectionInfo> = self
            .subscribers()
            .iter()
            .map(|c| c.get_connection_info().clone())
            .collect();
        let mut builder = ClusterClientBuilder::new(infos)
            .connection_timeout(connect_timeout)
            .response_timeout(response_timeout)
            // a call waits for Redis at most the operation timeout, retries and
            // redirections included; a redirection is followed at once
            .overall_response_timeout(Some(response_timeout))
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

fn no_seed() -> RedisError {
    RedisError::from((redis::ErrorKind::InvalidClientConfig, "no Redis URL"))
}

/// The slot route of a command that names keys of one slot; `None` for a command
/// without a key or with keys of several slots.
fn route_of(cmd: &Cmd) -> Option<Route> {
    let args: Vec<&[u8]> = cmd
        .args_iter()
        .map(|a| match a {
            redis::Arg::Simple(b) => b,
            _ => &[][..],
        })
        .collect();
    let name = args.first()?.to_ascii_uppercase();
    let keys: &[&[u8]] = match name.as_slice() {
        b"EVAL" | b"EVALSHA" => {
            let n: usize = std::str::from_utf8(args.get(2)?).ok()?.parse().ok()?;
            args.get(3..3 + n)?
        }
        b"PUBLISH" | b"PING" | b"SCAN" | b"INFO" | b"CONFIG" | b"SCRIPT" | b"CLUSTER" => {
            return None
        }
        b"DEL" | b"UNLINK" | b"MGET" | b"EXISTS" | b"TOUCH" => args.get(1..)?,
        _ => args.get(1..2)?,
    };
    let first = redis::cluster_routing::Slot::for_key(keys.first()?);
    keys.iter()
        .all(|k| redis::cluster_routing::Slot::for_key(k) == first)
        .then(|| Route::with_slot(first, SlotAddr::Master))
}

/// Runs a pipeline on a cluster, where Redis runs a pipeline on one node only: the
/// commands of one slot go together as one pipeline, in their order, the slots' in
/// parallel; a command without a key or with keys of several slots (a `PUBLISH`, a
/// `DEL` of many keys) waits for those before it and is routed alone (the cluster
/// connection splits a multi-slot command by slot). Replies come back in the
/// pipeline's order; a failure of any part fails the whole.
pub(crate) async fn cluster_pipeline(
    con: &ClusterConnection,
    pipe: &redis::Pipeline,
) -> RedisResult<Vec<Value>> {
    let cmds: Vec<&Cmd> = pipe.cmd_iter().collect();
    let mut replies = vec![Value::Nil; cmds.len()];
    let mut i = 0;
    while i < cmds.len() {
        // the commands of one slot each, up to the next barrier
        let mut groups: Vec<(Route, Vec<usize>)> = Vec::new();
        while let Some(route) = cmds.get(i).and_then(|c| route_of(c)) {
            match groups.iter_mut().find(|(r, _)| *r == route) {
                Some((_, at)) => at.push(i),
                None => groups.push((route, vec![i])),
            }
            i += 1;
        }
        let sent = groups.iter().map(|(route, at)| {
            let mut part = redis::pipe();
            part.ignore_errors();
            for &j in at {
                part.add_command(cmds[j].clone());
            }
            let mut con = con.clone();
            let route = SingleNodeRoutingInfo::SpecificNode(*route);
            async move { con.route_pipeline(part, 0, at.len(), route).await }
        });
        let results = futures_util::future::join_all(sent).await;
        for ((_, at), result) in groups.iter().zip(results) {
            for (&j, v) in at.iter().zip(result?) {
                replies[j] = v;
            }
        }
        if let Some(cmd) = cmds.get(i) {
            let mut con = con.clone();
            replies[i] = con.req_packed_command(cmd).await?;
            i += 1;
        }
    }
    Ok(replies)
}
