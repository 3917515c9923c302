//! The test harness itself: a private server that can be stopped, restarted, paused.

use std::time::{Duration, Instant};

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
