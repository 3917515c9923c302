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

use crate::deadline::{maybe_within, within, Deadline};

/// A cluster connection whose node connections count redirections, and whose
/// requests, with `deadline` set, end after it by [`crate::deadline`] (the cluster
/// client then has no overall timeout of its own, which is a tokio timer on every
/// request); without, the cluster client's overall timeout ends them.
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

/// The longest operation timeout a cluster client of this process was built with
/// (milliseconds): how long a command redis-rs sends by itself may wait.
static OWN_BOUND_MS: AtomicU64 = AtomicU64::new(0);

/// Bounds the commands redis-rs sends by itself by `within` or more (the longest
/// of what the process's cluster clients give).
pub(crate) fn bound_own_commands(within: Duration) {
    OWN_BOUND_MS.fetch_max(within.as_millis() as u64, Ordering::Relaxed);
}

/// One node's connection within a cluster connection. It has no response timeout:
/// the requests of the crate's cluster connections are bounded as a whole (by the
/// link's deadline or the cluster client's overall timeout), and a tokio timer on
/// each node request as well cost 850 instructions an L2 hit. The commands redis-rs
/// sends by itself, which nothing bounds as a whole, are bounded here
/// ([`redis_rs_own`]): among them the slot map's read, which redis-rs makes under
/// its topology lock, one node after another.
#[derive(Clone)]
pub(crate) struct NodeCon {
    con: MultiplexedConnection,
    own: Duration,
}

/// Whether `cmd` is one that redis-rs's cluster client sends by itself: the read of
/// the slot map (`CLUSTER SLOTS`), the checks of a connection (`PING`, `READONLY`),
/// `ASKING` before a redirected request, and the subscriptions it makes again on a
/// new connection.
fn redis_rs_own(cmd: &Cmd) -> bool {
    const OWN: [&[u8]; 7] = [
        b"CLUSTER",
        b"PING",
        b"READONLY",
        b"ASKING",
        b"SUBSCRIBE",
        b"SSUBSCRIBE",
        b"PSUBSCRIBE",
    ];
    match cmd.args_iter().next() {
        Some(redis::Arg::Simple(name)) => OWN.iter().any(|own| name.eq_ignore_ascii_case(own)),
        _ => false,
    }
}

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

/// `reply`, its redirection counted.
fn counted(reply: RedisResult<Value>) -> RedisResult<Value> {
    match &reply {
        Ok(v) => count(redirected(v) as usize),
        Err(e) => count(is_redirection(e.kind()) as usize),
    }
    reply
}

impl ConnectionLike for NodeCon {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        if redis_rs_own(cmd) {
            let own = self.own;
            return Box::pin(async move {
                counted(within(own, self.con.send_packed_command(cmd)).await)
            });
        }
        // a future of its own, not the one above with no deadline: wrapping the
        // send's future copies it once more (570 instructions an L2 hit)
        Box::pin(async move { counted(self.con.send_packed_command(cmd).await) })
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        pipe: &'a redis::Pipeline,
        offset: usize,
        count_of: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        Box::pin(async move {
            let replies = self.con.send_packed_commands(pipe, offset, count_of).await;
            match &replies {
                // redis-rs sends the whole pipeline again for its first redirection
                Ok(vs) => count(vs.iter().any(redirected) as usize),
                Err(e) => count(is_redirection(e.kind()) as usize),
            }
            replies
        })
    }

    fn get_db(&self) -> i64 {
        self.con.get_db()
    }
}

impl Connect for NodeCon {
    fn connect_with_config<'a, T>(info: T, config: AsyncConnectionConfig) -> RedisFuture<'a, Self>
    where
        T: IntoConnectionInfo + Send + 'a,
    {
        let own = match OWN_BOUND_MS.load(Ordering::Relaxed) {
            0 => Duration::from_secs(1),
            ms => Duration::from_millis(ms),
        };
        Box::pin(async move {
            let config = config.set_response_timeout(None);
            let con = MultiplexedConnection::connect_with_config(info, config).await?;
            Ok(NodeCon { con, own })
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

    #[test]
    fn the_commands_redis_rs_sends_by_itself_are_told_from_the_crates() {
        for own in [
            "CLUSTER",
            "PING",
            "READONLY",
            "ASKING",
            "SSUBSCRIBE",
            "subscribe",
        ] {
            assert!(redis_rs_own(&redis::cmd(own)), "{own}");
        }
        let mut slots = redis::cmd("CLUSTER");
        slots.arg("SLOTS");
        assert!(redis_rs_own(&slots));
        for crates in [
            "GET", "EVALSHA", "SET", "DEL", "PUBLISH", "SPUBLISH", "SCAN",
        ] {
            assert!(!redis_rs_own(&redis::cmd(crates)), "{crates}");
        }
    }
}
