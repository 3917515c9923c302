//! The instance that invalidates never reads the old value back, from any tier, while
//! a write of the old value is queued or in flight: thousands of rounds per
//! configuration against a real `redis-server`, then what Redis holds.

use std::time::Duration;

use tests::redis_server::RedisServer;
use tests::rounds::{rounds, Stale};

const ROUNDS: u64 = 2_000;

/// Runs the rounds on one configuration, with a stall of writes now and then:
/// removals wait behind them.
async fn run(server: &RedisServer, prefix: &str, l1: bool, base: u64) -> Stale {
    rounds(&server.url(), false, prefix, l1, (base, ROUNDS), |i| {
        if i % 500 == 250 {
            server.pause_writes(Duration::from_millis(50));
        }
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_stale_read_back_without_l1() {
    let server = RedisServer::start();
    assert_eq!(run(&server, "nol1", false, 0).await, Stale::default());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_stale_read_back_with_l1() {
    let server = RedisServer::start();
    assert_eq!(
        run(&server, "withl1", true, 1_000_000).await,
        Stale::default()
    );
}
