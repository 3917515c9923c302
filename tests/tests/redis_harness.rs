//! The test harness itself: a private server that can be stopped, restarted, paused.

use std::time::{Duration, Instant};

use tests::redis_cluster::RedisCluster;
use tests::redis_server::RedisServer;

#[test]
fn start_stop_restart_pause() {
    let mut server = RedisServer::start();
    assert_eq!(server.command(&["SET", "k", "v"]).as_deref(), Some("+OK"));
    assert_eq!(
        server
            .command(&["CONFIG", "GET", "maxmemory-policy"])
            .as_deref(),
        Some("*2")
    );
    server.stop();
    assert_eq!(server.command(&["PING"]), None, "stopped");
    server.restart();
    assert_eq!(
        server.command(&["EXISTS", "k"]).as_deref(),
        Some(":0"),
        "restarted empty"
    );
    server.pause(Duration::from_millis(300));
    let started = Instant::now();
    assert_eq!(server.command(&["SET", "k", "v"]).as_deref(), Some("+OK"));
    assert!(
        started.elapsed() >= Duration::from_millis(200),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(server.calls("set"), 1, "counted since the restart");
}

#[test]
fn servers_are_independent() {
    let a = RedisServer::start();
    let b = RedisServer::start();
    assert_ne!(a.port(), b.port());
    a.command(&["SET", "only-in-a", "1"]);
    assert_eq!(b.command(&["EXISTS", "only-in-a"]).as_deref(), Some(":0"));
}

/// A 3-master cluster: every slot assigned, the nodes know each other, and keys of
/// different slots land on different masters.
#[test]
fn a_cluster_of_three_masters() {
    let cluster = RedisCluster::start(3, 0);
    for node in cluster.nodes() {
        assert_eq!(node.info("cluster_state").as_deref(), Some("ok"));
        assert_eq!(
            node.info("cluster_slots_assigned").as_deref(),
            Some("16384")
        );
        assert_eq!(node.info("cluster_known_nodes").as_deref(), Some("3"));
    }
    // a key is stored by one master; the others redirect
    let mut owners = std::collections::HashSet::new();
    for i in 0..20 {
        let key = format!("k{i}");
        let replies: Vec<String> = cluster
            .masters()
            .iter()
            .map(|m| m.command(&["SET", &key, "v"]).unwrap_or_default())
            .collect();
        let stored: Vec<usize> = (0..replies.len())
            .filter(|&m| replies[m] == "+OK")
            .collect();
        assert_eq!(stored.len(), 1, "{key}: {replies:?}");
        assert!(
            replies.iter().any(|r| r.starts_with("-MOVED")),
            "{replies:?}"
        );
        owners.insert(stored[0]);
    }
    assert_eq!(owners.len(), 3, "20 keys spread over the 3 masters");
}

/// 3 masters with a replica each: a killed master's replica takes over, and the
/// cluster is whole again (the time it took is printed).
#[test]
fn a_replica_takes_over_a_killed_master() {
    let mut cluster = RedisCluster::start(3, 1);
    assert_eq!(
        cluster.nodes()[0].info("cluster_known_nodes").as_deref(),
        Some("6")
    );
    let started = Instant::now();
    cluster.node_mut(0).stop();
    // the cluster notices (node timeout 1 s), then the replica is promoted
    let masters = |c: &RedisCluster| {
        c.nodes()
            .iter()
            .filter(|n| n.command(&["ROLE"]).is_some_and(|r| r == "*3"))
            .count()
    };
    while masters(&cluster) < 3 {
        assert!(
            started.elapsed() < Duration::from_secs(20),
            "no replica took over"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    cluster.wait_ok(Duration::from_secs(20));
    eprintln!(
        "failover: a replica was master {:?} after the kill",
        started.elapsed()
    );
    assert_eq!(
        cluster.nodes()[1].info("cluster_slots_assigned").as_deref(),
        Some("16384")
    );
}
