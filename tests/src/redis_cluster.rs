//! A private Redis Cluster for one test: `redis-server --cluster-enabled yes`
//! processes (see [`RedisServer`]) joined by `redis-cli --cluster create`, stopped
//! when dropped.

use std::net::TcpListener;
use std::process::Command;
use std::time::{Duration, Instant};

use crate::redis_server::RedisServer;

/// A cluster of private servers: masters first, then their replicas.
pub struct RedisCluster {
    nodes: Vec<RedisServer>,
    masters: usize,
}

impl RedisCluster {
    /// Starts `masters` masters with `replicas` replicas each, the slots spread over
    /// the masters, and a node timeout of 1 s (failovers within a few seconds).
    pub fn start(masters: usize, replicas: usize) -> RedisCluster {
        RedisCluster::start_with(masters, replicas, "1000")
    }

    /// [`RedisCluster::start`] with another `cluster-node-timeout` (milliseconds):
    /// Redis's default, 15 s, keeps a dead master's slots unanswered (and the rest
    /// of the cluster serving) that long before a failover or `CLUSTERDOWN`.
    pub fn start_with(masters: usize, replicas: usize, node_timeout_ms: &str) -> RedisCluster {
        assert!(
            masters >= 3,
            "redis-cli --cluster create needs 3 masters at least"
        );
        let nodes: Vec<RedisServer> = (0..masters * (1 + replicas))
            .map(|_| {
                RedisServer::start_on(
                    &[
                        "--cluster-enabled",
                        "yes",
                        "--cluster-config-file",
                        "nodes.conf",
                        "--cluster-node-timeout",
                        node_timeout_ms,
                        // a replica takes over whatever the age of its data: the
                        // tests' replicas have just synced
                        "--cluster-replica-validity-factor",
                        "0",
                    ],
                    cluster_port,
                )
            })
            .collect();
        let addresses: Vec<String> = nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.port()))
            .collect();
        let output = Command::new("redis-cli")
            .args(["--cluster", "create"])
            .args(&addresses)
            .args(["--cluster-replicas", &replicas.to_string(), "--cluster-yes"])
            .output()
            .unwrap_or_else(|e| {
                panic!("could not run redis-cli (it comes with redis-server): {e}")
            });
        assert!(
            output.status.success(),
            "redis-cli --cluster create failed: {}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        let cluster = RedisCluster { nodes, masters };
        cluster.wait_ok(Duration::from_secs(20));
        cluster.wait_replicas(replicas, Duration::from_secs(20));
        cluster
    }

    /// Waits until `CLUSTER SLOTS` on every master lists `replicas` replicas for each
    /// of its slot ranges: a replica is listed once it has synced, and until then
    /// clients do not know it is there (no `WAIT` for it).
    fn wait_replicas(&self, replicas: usize, within: Duration) {
        let deadline = Instant::now() + within;
        for master in self.masters() {
            let mut con = redis::Client::open(master.url())
                .and_then(|c| c.get_connection())
                .expect("connect");
            loop {
                let ranges: Vec<Vec<redis::Value>> = redis::cmd("CLUSTER")
                    .arg("SLOTS")
                    .query(&mut con)
                    .expect("CLUSTER SLOTS");
                if ranges.iter().all(|r| r.len() >= 3 + replicas) {
                    break;
                }
                assert!(
                    Instant::now() < deadline,
                    "the replicas are not listed after {within:?}"
                );
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }

    /// Waits until every node running says `cluster_state:ok`.
    pub fn wait_ok(&self, within: Duration) {
        let deadline = Instant::now() + within;
        loop {
            let ok = self.nodes.iter().all(|n| {
                n.command(&["PING"]).is_none() || n.info("cluster_state").as_deref() == Some("ok")
            });
            if ok {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "the cluster is not ok after {within:?}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Every node, masters first (as created).
    pub fn nodes(&self) -> &[RedisServer] {
        &self.nodes
    }

    /// Node `i` (masters first), to stop, restart or pause it.
    pub fn node_mut(&mut self, i: usize) -> &mut RedisServer {
        &mut self.nodes[i]
    }

    /// The masters as created.
    pub fn masters(&self) -> &[RedisServer] {
        &self.nodes[..self.masters]
    }

    /// The node that serves `key` now (the others answer `MOVED`).
    pub fn master_of(&self, key: &str) -> usize {
        self.nodes
            .iter()
            .position(|n| {
                n.command(&["GET", key])
                    .is_some_and(|r| !r.starts_with("-MOVED") && !r.starts_with("-CLUSTERDOWN"))
            })
            .unwrap_or_else(|| panic!("no node serves {key}"))
    }

    /// The nodes that are masters now (they answer `ROLE` with a master's reply).
    pub fn masters_now(&self) -> Vec<usize> {
        (0..self.nodes.len())
            .filter(|&i| self.nodes[i].command(&["ROLE"]).is_some_and(|r| r == "*3"))
            .collect()
    }

    /// The nodes that are replicas now.
    pub fn replicas_now(&self) -> Vec<usize> {
        (0..self.nodes.len())
            .filter(|&i| self.nodes[i].command(&["ROLE"]).is_some_and(|r| r == "*5"))
            .collect()
    }

    /// Node `i`'s cluster id (`CLUSTER MYID`).
    pub fn id_of(&self, i: usize) -> String {
        let client = redis::Client::open(self.nodes[i].url()).expect("url");
        let mut con = client.get_connection().expect("connect");
        redis::cmd("CLUSTER")
            .arg("MYID")
            .query(&mut con)
            .expect("CLUSTER MYID")
    }

    /// Starts moving `slots` slots from master `from` to master `to` with
    /// `redis-cli --cluster reshard`, in the background (keys move with `MIGRATE`,
    /// clients meet `ASK` and `MOVED` meanwhile); wait on the child to see it end.
    pub fn reshard(&self, from: usize, to: usize, slots: u32) -> std::process::Child {
        Command::new("redis-cli")
            .args(["--cluster", "reshard"])
            .arg(format!("127.0.0.1:{}", self.nodes[from].port()))
            .args(["--cluster-from", &self.id_of(from)])
            .args(["--cluster-to", &self.id_of(to)])
            .args(["--cluster-slots", &slots.to_string(), "--cluster-yes"])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("run redis-cli --cluster reshard")
    }

    /// A replica of node `master` (from `INFO replication`).
    pub fn replica_of(&self, master: usize) -> usize {
        self.replicas_of(master)[0]
    }

    /// The replicas of node `master` (from `INFO replication`).
    pub fn replicas_of(&self, master: usize) -> Vec<usize> {
        let port = format!("master_port:{}", self.nodes[master].port());
        let replicas: Vec<usize> = (0..self.nodes.len())
            .filter(|&i| {
                i != master
                    && redis::Client::open(self.nodes[i].url())
                        .and_then(|c| c.get_connection())
                        .and_then(|mut c| {
                            redis::cmd("INFO")
                                .arg("replication")
                                .query::<String>(&mut c)
                        })
                        .is_ok_and(|info| info.lines().any(|l| l.trim() == port))
            })
            .collect();
        assert!(!replicas.is_empty(), "node {master} has no replica");
        replicas
    }

    /// Cuts replica `replica` from its master: the master closes the replication
    /// connection (`CLIENT KILL ADDR`, the address the replica connects from), so
    /// that what the master sends afterwards does not reach it, even frozen, through
    /// its socket's buffer. The replica reconnects when it runs.
    pub fn cut_replica(&self, master: usize, replica: usize) {
        let client = redis::Client::open(self.nodes[replica].url()).expect("url");
        let mut con = client.get_connection().expect("connect");
        let list: String = redis::cmd("CLIENT")
            .arg("LIST")
            .arg("TYPE")
            .arg("master")
            .query(&mut con)
            .expect("CLIENT LIST");
        let laddr = list
            .split_whitespace()
            .find_map(|f| f.strip_prefix("laddr="))
            .expect("the replica's link to its master");
        let reply = self.nodes[master].command(&["CLIENT", "KILL", "ADDR", laddr]);
        assert_eq!(reply.as_deref(), Some("+OK"), "CLIENT KILL ADDR {laddr}");
    }

    /// The keys starting with `prefix` on node `i` (`SCAN`), and a connection to it.
    pub fn scan_on(&self, i: usize, prefix: &str) -> (Vec<String>, redis::Connection) {
        let client = redis::Client::open(self.nodes[i].url()).expect("url");
        let mut con = client.get_connection().expect("connect");
        let keys = redis::cmd("SCAN")
            .cursor_arg(0)
            .arg("MATCH")
            .arg(format!("{prefix}*"))
            .arg("COUNT")
            .arg(1000)
            .clone()
            .iter::<String>(&mut con)
            .expect("SCAN")
            .collect::<Result<_, _>>()
            .expect("SCAN");
        (keys, con)
    }

    /// How many keys starting with `prefix` node `i` holds.
    pub fn keys_on(&self, i: usize, prefix: &str) -> usize {
        self.scan_on(i, prefix).0.len()
    }

    /// How many values (not tombstones: those start with a zero byte) under `prefix`
    /// node `i` holds.
    pub fn live_on(&self, i: usize, prefix: &str) -> usize {
        let (keys, mut con) = self.scan_on(i, prefix);
        keys.iter()
            .filter(|k| {
                let v: Option<Vec<u8>> = redis::cmd("GET").arg(k).query(&mut con).expect("GET");
                v.is_some_and(|v| v.first() != Some(&0))
            })
            .count()
    }

    /// `redis://127.0.0.1:<port>/0` of the first master: any node will do.
    pub fn url(&self) -> String {
        self.nodes[0].url()
    }
}

/// A free port whose cluster bus port (the port + 10000) is free too.
fn cluster_port() -> u16 {
    loop {
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .expect("a free port");
        if port <= 55_535 && TcpListener::bind(("127.0.0.1", port + 10_000)).is_ok() {
            return port;
        }
    }
}
