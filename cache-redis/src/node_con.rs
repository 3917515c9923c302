//! The connection to one node inside redis-rs's cluster connection: a multiplexed
//! connection that counts the redirections (`MOVED`, `ASK`) its node answers with.
//! redis-rs follows them itself (it sends the command again to the node named, and
//! after `MOVED` refreshes its slot map) and offers no other way to see them.
//!
//! The count is the process's: redis-rs makes node connections from the type alone,
//! with nothing that says which backend they belong to, so every cluster backend of
//! the process reports the same count.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use redis::aio::{ConnectionLike, MultiplexedConnection};
use redis::cluster_async::Connect;
use redis::cluster_routing::{RoutingInfo, SingleNodeRoutingInfo};
use redis::{
    AsyncConnectionConfig, Cmd, ErrorKind, IntoConnectionInfo, Pipeline, RedisFuture, RedisResult,
    ServerErrorKind, Value,
};

use crate::deadline::{maybe_within, Deadline};

/// A cluster connection whose node connections count redirections, and whose
/// requests, with `deadline` set, end after it by [`crate::deadline`] (the cluster
/// client then has no overall timeout of its own: that was a second tokio timer on
/// every request, besides the node connection's).
#[derive(Clone)]
pub(crate) struct ClusterConnection {
    con: redis::cluster_async::ClusterConnection<NodeCon>,
    deadline: Option<Duration>,
}

impl ClusterConnection {
    pub(crate) fn new(
        con: redis::cluster_async::ClusterConnection<NodeCon>,
        deadline: Option<Duration>,
    ) -> ClusterConnection {
        ClusterConnection { con, deadline }
    }

    pub(crate) async fn route_command(
        &mut self,
        cmd: Cmd,
        routing: RoutingInfo,
    ) -> RedisResult<Value> {
        maybe_within(self.deadline, self.con.route_command(cmd, routing)).await
    }

    pub(crate) async fn route_pipeline(
        &mut self,
        pipeline: Pipeline,
        offset: usize,
        count: usize,
        route: SingleNodeRoutingInfo,
    ) -> RedisResult<Vec<Value>> {
        let sent = self.con.route_pipeline(pipeline, offset, count, route);
        maybe_within(self.deadline, sent).await
    }

    /// One command, routed by its key: `ConnectionLike::req_packed_command` without
    /// boxing the cluster client's boxed future again (the read path).
    pub(crate) fn send<'a>(&'a mut self, cmd: &'a Cmd) -> Deadline<RedisFuture<'a, Value>> {
        maybe_within(self.deadline, self.con.req_packed_command(cmd))
    }
}

impl ConnectionLike for ClusterConnection {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        Box::pin(self.send(cmd))
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipe: &'a redis::Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        let deadline = self.deadline;
        Box::pin(maybe_within(
            deadline,
            self.con.req_packed_commands(pipe, offset, count),
        ))
    }

    fn get_db(&self) -> i64 {
        0
    }
}

static REDIRECTIONS: AtomicU64 = AtomicU64::new(0);

/// Redirections the node connections of this process's cluster connections answered
/// with, and that redis-rs followed.
pub(crate) fn redirections() -> u64 {
    REDIRECTIONS.load(Ordering::Relaxed)
}

/// One node's connection within a cluster connection.
#[derive(Clone)]
pub(crate) struct NodeCon(MultiplexedConnection);

fn is_redirection(kind: ErrorKind) -> bool {
    matches!(
        kind,
        ErrorKind::Server(ServerErrorKind::Moved) | ErrorKind::Server(ServerErrorKind::Ask)
    )
}

fn redirected(value: &Value) -> bool {
    match value {
        Value::ServerError(e) => matches!(
            e.kind(),
            Some(ServerErrorKind::Moved) | Some(ServerErrorKind::Ask)
        ),
        _ => false,
    }
}

fn count(redirections: usize) {
    if redirections > 0 {
        REDIRECTIONS.fetch_add(redirections as u64, Ordering::Relaxed);
    }
}

impl ConnectionLike for NodeCon {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        Box::pin(async move {
            let reply = self.0.send_packed_command(cmd).await;
            match &reply {
                Ok(v) => count(redirected(v) as usize),
                Err(e) => count(is_redirection(e.kind()) as usize),
            }
            reply
        })
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipe: &'a redis::Pipeline,
        offset: usize,
        count_of: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        Box::pin(async move {
            let replies = self.0.send_packed_commands(pipe, offset, count_of).await;
            match &replies {
                // redis-rs sends the whole pipeline again for its first redirection
                Ok(vs) => count(vs.iter().any(redirected) as usize),
                Err(e) => count(is_redirection(e.kind()) as usize),
            }
            replies
        })
    }

    fn get_db(&self) -> i64 {
        self.0.get_db()
    }
}

impl Connect for NodeCon {
    fn connect_with_config<'a, T>(info: T, config: AsyncConnectionConfig) -> RedisFuture<'a, Self>
    where
        T: IntoConnectionInfo + Send + 'a,
    {
        Box::pin(async move {
            MultiplexedConnection::connect_with_config(info, config)
                .await
                .map(NodeCon)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn moved_and_ask_are_redirections_other_errors_are_not() {
        let reply = |text: &str| redis::parse_redis_value(text.as_bytes()).unwrap();
        assert!(redirected(&reply("-MOVED 3999 127.0.0.1:6381\r\n")));
        assert!(redirected(&reply("-ASK 3999 127.0.0.1:6381\r\n")));
        assert!(!redirected(&reply("-TRYAGAIN Multiple keys\r\n")));
        assert!(!redirected(&reply("-ERR unknown command\r\n")));
        assert!(!redirected(&reply("$1\r\nx\r\n")));
    }
}
