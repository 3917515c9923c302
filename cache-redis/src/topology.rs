//! A Redis Cluster's topology: which master serves which slots, and its nodes, from
//! `CLUSTER SLOTS`.

use crate::node_con::ClusterConnection;
use redis::cluster_routing::{RoutingInfo, SingleNodeRoutingInfo};
use redis::{RedisResult, Value};

/// A node: its address and its id.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Node {
    pub(crate) host: String,
    pub(crate) port: u16,
    pub(crate) id: String,
}

/// Which master serves which slots, and every node seen.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct Topology {
    /// Slot ranges (inclusive) and the id of their master, sorted.
    pub(crate) ranges: Vec<(u16, u16, String)>,
    pub(crate) masters: Vec<Node>,
    /// Every node, masters and replicas.
    pub(crate) nodes: Vec<(String, u16)>,
    /// How many replicas each range's master has (by the range's index).
    pub(crate) replicas: Vec<usize>,
}

impl Topology {
    /// How many replicas the master of `slot` has (0 if no master serves it).
    pub(crate) fn replicas_of(&self, slot: u16) -> usize {
        self.ranges
            .iter()
            .position(|(start, end, _)| (*start..=*end).contains(&slot))
            .map_or(0, |i| self.replicas[i])
    }
}

/// Reads the topology from any node (`CLUSTER SLOTS`).
pub(crate) async fn topology(con: &ClusterConnection) -> RedisResult<Topology> {
    let mut con = con.clone();
    let reply = con
        .route_command(
            redis::cmd("CLUSTER").arg("SLOTS").clone(),
            RoutingInfo::SingleNode(SingleNodeRoutingInfo::Random),
        )
        .await?;
    Ok(parse_slots(&reply))
}

pub(crate) fn parse_slots(reply: &Value) -> Topology {
    let node = |v: &Value| -> Option<Node> {
        let Value::Array(parts) = v else { return None };
        Some(Node {
            host: redis::from_redis_value_ref(parts.first()?).ok()?,
            port: redis::from_redis_value_ref(parts.get(1)?).ok()?,
            id: redis::from_redis_value_ref(parts.get(2)?).ok()?,
        })
    };
    let mut t = Topology::default();
    let Value::Array(ranges) = reply else {
        return t;
    };
    for range in ranges {
        let Value::Array(parts) = range else { continue };
        let (Some(start), Some(end), Some(master)) = (
            parts
                .first()
                .and_then(|v| redis::from_redis_value_ref::<u16>(v).ok()),
            parts
                .get(1)
                .and_then(|v| redis::from_redis_value_ref::<u16>(v).ok()),
            parts.get(2).and_then(node),
        ) else {
            continue;
        };
        t.ranges.push((start, end, master.id.clone()));
        t.replicas.push(parts.len().saturating_sub(3));
        for n in parts[2..].iter().filter_map(node) {
            if !t.nodes.contains(&(n.host.clone(), n.port)) {
                t.nodes.push((n.host.clone(), n.port));
            }
        }
        if !t.masters.contains(&master) {
            t.masters.push(master);
        }
    }
    let mut order: Vec<usize> = (0..t.ranges.len()).collect();
    order.sort_by(|&a, &b| t.ranges[a].cmp(&t.ranges[b]));
    t.replicas = order.iter().map(|&i| t.replicas[i]).collect();
    t.ranges = order.iter().map(|&i| t.ranges[i].clone()).collect();
    t
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(host: &str, port: i64, id: &str) -> Value {
        Value::Array(vec![
            Value::BulkString(host.into()),
            Value::Int(port),
            Value::BulkString(id.into()),
        ])
    }

    #[test]
    fn slots_are_read() {
        let reply = Value::Array(vec![
            Value::Array(vec![
                Value::Int(5461),
                Value::Int(16383),
                node("127.0.0.1", 7001, "b"),
                node("127.0.0.1", 7003, "d"),
            ]),
            Value::Array(vec![
                Value::Int(0),
                Value::Int(5460),
                node("127.0.0.1", 7000, "a"),
            ]),
        ]);
        let t = parse_slots(&reply);
        assert_eq!(
            t.ranges,
            vec![(0, 5460, "a".into()), (5461, 16383, "b".into())]
        );
        assert_eq!((t.replicas_of(0), t.replicas_of(6000)), (0, 1));
        assert_eq!(t.masters.len(), 2);
        assert_eq!(t.nodes.len(), 3);
    }
}
