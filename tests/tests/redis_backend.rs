//! `RedisBackend` against real `redis-server` processes (one per test).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use cache_redis::{RedisBackend, RedisBackendError};
use cache_runtime::{cached, CachingService, MemoryBackend};
use tests::redis_server::RedisServer;

async fn service(server: &RedisServer, prefix: &str, l1: bool) -> CachingService {
    let mut b = RedisBackend::builder(server.url()).key_prefix(prefix);
    if l1 {
        b = b.l1(MemoryBackend::new().max_entries(1000));
    }
    CachingService::builder()
        .backend(b.build().await.expect("connect"))
        .build()
        .unwrap()
}

#[cached(name = "r.product")]
async fn product(id: u64) -> String {
    format!("product {id}")
}

#[tokio::test]
async fn a_second_instance_gets_hits_and_prefixes_are_apart() {
    let server = RedisServer::start();
    let a = service(&server, "shop", true).await;
    assert_eq!(a.scope(product(1)).await, "product 1");
    assert!(!a.shutdown().await.timed_out, "the write reached Redis");
    assert_eq!(
        server
            .command(&["EXISTS", "shop:2:r.product:v1(1)"])
            .as_deref(),
        Some(":1")
    );

    let b = service(&server, "shop", true).await;
    assert_eq!(b.scope(product(1)).await, "product 1");
    let s = b.stats().total;
    assert_eq!(
        (s.l2_hits, s.executions),
        (1, 0),
        "served by Redis, body not run"
    );

    let other = service(&server, "blog", true).await;
    other.scope(product(1)).await;
    let s = other.stats().total;
    assert_eq!(
        (s.l2_hits, s.executions),
        (0, 1),
        "another prefix sees nothing"
    );
}

#[tokio::test]
async fn shutdown_drains_every_pending_write() {
    #[cached(name = "r.item")]
    async fn item(id: u64) -> u64 {
        id
    }
    let server = RedisServer::start();
    let svc = service(&server, "drain", false).await;
    svc.scope(async {
        for i in 0..500 {
            item(i).await;
        }
    })
    .await;
    let report = svc.shutdown().await;
    assert!(!report.timed_out);
    // a fresh client sees all of them
    let client = redis::Client::open(server.url()).unwrap();
    let mut con = client.get_connection().unwrap();
    let n: u64 = redis::cmd("DBSIZE").query(&mut con).unwrap();
    assert_eq!(n, 500);
}

#[tokio::test]
async fn redis_stopped_and_restarted() {
    static RUNS: AtomicUsize = AtomicUsize::new(0);
    #[cached(name = "r.price")]
    async fn price(id: u64) -> u64 {
        RUNS.fetch_add(1, Ordering::SeqCst);
        id * 100
    }
    let mut server = RedisServer::start();
    let svc = service(&server, "down", false).await;
    svc.scope(price(1)).await;
    svc.shutdown().await;
    svc.scope(price(1)).await;
    assert_eq!(svc.stats().total.l2_hits, 1);

    server.stop();
    for _ in 0..5 {
        assert_eq!(
            svc.scope(price(1)).await,
            100,
            "the right value, from the body"
        );
    }
    let s = svc.stats().total;
    assert!(s.backend_errors >= 5, "{s:?}");
    assert_eq!(RUNS.load(Ordering::SeqCst), 6);

    server.restart();
    let restarted = Instant::now();
    loop {
        svc.scope(price(1)).await;
        if svc.stats().total.l2_hits > 1 {
            break;
        }
        assert!(
            restarted.elapsed() < Duration::from_secs(10),
            "no L2 hit 10 s after the restart"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    eprintln!("L2 hits again {:?} after the restart", restarted.elapsed());
}

#[tokio::test]
async fn a_paused_redis_costs_at_most_the_operation_timeout() {
    let server = RedisServer::start();
    let svc = CachingService::builder()
        .backend(
            RedisBackend::builder(server.url())
                .operation_timeout(Duration::from_millis(100))
                .build()
                .await
                .unwrap(),
        )
        .build()
        .unwrap();
    server.pause(Duration::from_secs(3));
    let started = Instant::now();
    assert_eq!(svc.scope(product(5)).await, "product 5");
    let took = started.elapsed();
    assert!(took < Duration::from_millis(600), "{took:?}");
    assert_eq!(svc.stats().total.backend_errors, 1);
}

#[tokio::test]
async fn redis_down_at_start() {
    let mut server = RedisServer::start();
    let url = server.url();
    server.stop();
    let err = RedisBackend::builder(&url).build().await.unwrap_err();
    assert!(matches!(err, RedisBackendError::Connect { .. }), "{err}");
    assert!(
        err.to_string().contains("connect_lazily"),
        "the error says what to do: {err}"
    );

    // lazily: starts without Redis, and uses it once it answers
    let svc = CachingService::builder()
        .backend(
            RedisBackend::builder(&url)
                .connect_lazily(true)
                .build()
                .await
                .unwrap(),
        )
        .build()
        .unwrap();
    assert_eq!(svc.scope(product(6)).await, "product 6");
    server.restart();
    let started = Instant::now();
    loop {
        svc.scope(product(6)).await;
        if svc.stats().total.l2_hits > 0 {
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(10));
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn bytes_that_do_not_decode_are_overwritten() {
    let server = RedisServer::start();
    server.command(&["SET", "junk:2:r.product:v1(7)", "not a cache value"]);
    let svc = service(&server, "junk", false).await;
    assert_eq!(svc.scope(product(7)).await, "product 7");
    svc.shutdown().await;
    assert_eq!(svc.stats().total.decode_errors, 1);
    svc.scope(product(7)).await;
    assert_eq!(svc.stats().total.l2_hits, 1, "the value was written again");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_body_run_and_one_set_for_a_thousand_callers() {
    static RUNS: AtomicUsize = AtomicUsize::new(0);
    #[cached(name = "r.slow")]
    async fn slow(id: u64) -> u64 {
        RUNS.fetch_add(1, Ordering::SeqCst);
        tokio::time::sleep(Duration::from_millis(100)).await;
        id
    }
    let server = RedisServer::start();
    let svc = service(&server, "flight", true).await;
    // (`build` ran each command it needs once)
    let (sets, gets) = (server.calls("set"), server.calls("get"));
    let handles: Vec<_> = (0..1000)
        .map(|_| tokio::spawn(svc.scope(slow(3))))
        .collect();
    for h in handles {
        assert_eq!(h.await.unwrap(), 3);
    }
    svc.shutdown().await;
    assert_eq!(RUNS.load(Ordering::SeqCst), 1);
    assert_eq!(server.calls("set"), sets + 1);
    assert_eq!(server.calls("get"), gets + 1);
}

#[tokio::test]
async fn expiry_in_redis() {
    #[cached(name = "r.ttl", ttl = "90s")]
    async fn with_ttl(id: u64) -> u64 {
        id
    }
    #[cached(name = "r.sliding", sliding = "2m")]
    async fn sliding(id: u64) -> u64 {
        id
    }
    #[cached(name = "r.default")]
    async fn default_ttl(id: u64) -> u64 {
        id
    }
    let server = RedisServer::start();
    let svc = service(&server, "exp", false).await;
    svc.scope(async {
        with_ttl(1).await;
        sliding(1).await;
        default_ttl(1).await;
    })
    .await;
    svc.shutdown().await;
    let pttl = |k: &str| -> i64 {
        server
            .command(&["PTTL", k])
            .unwrap()
            .trim_start_matches(':')
            .parse()
            .unwrap()
    };
    assert!((80_000..=90_000).contains(&pttl("exp:2:r.ttl:v1(1)")));
    assert!((110_000..=120_000).contains(&pttl("exp:2:r.sliding:v1(1)")));
    assert!(
        pttl("exp:2:r.default:v1(1)") > 80_000_000,
        "the default expiry (a day)"
    );
    svc.scope(sliding(1)).await;
    assert_eq!(
        server.calls("getex"),
        2,
        "sliding reads move the expiry in the same round trip"
    );
}

#[tokio::test]
async fn a_full_write_queue_drops_and_counts() {
    #[cached(name = "r.many")]
    async fn many(id: u64) -> u64 {
        id
    }
    let server = RedisServer::start();
    let backend = RedisBackend::builder(server.url())
        .write_queue(4)
        .operation_timeout(Duration::from_millis(50))
        .build()
        .await
        .unwrap();
    let metrics = backend.metrics();
    let svc = CachingService::builder().backend(backend).build().unwrap();
    // reads answer, writes hang: the queue fills while calls go on
    server.pause_writes(Duration::from_millis(1500));
    let started = Instant::now();
    svc.scope(async {
        for i in 0..200 {
            many(i).await;
        }
    })
    .await;
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "calls never wait for writes: {:?}",
        started.elapsed()
    );
    assert!(metrics.dropped() > 0, "dropped {}", metrics.dropped());
    assert_eq!(svc.scope(many(1)).await, 1);
}

#[tokio::test]
async fn a_lazy_backend_reads_redis_from_its_first_call() {
    let server = RedisServer::start();
    let filler = service(&server, "lazy", false).await;
    filler.scope(product(8)).await;
    filler.shutdown().await;

    let svc = CachingService::builder()
        .backend(
            RedisBackend::builder(server.url())
                .key_prefix("lazy")
                .connect_lazily(true)
                .build()
                .await
                .unwrap(),
        )
        .build()
        .unwrap();
    assert_eq!(svc.scope(product(8)).await, "product 8");
    let s = svc.stats().total;
    assert_eq!(
        (s.l2_hits, s.executions, s.backend_errors),
        (1, 0, 0),
        "the first call waited for the connection"
    );
}

#[tokio::test]
async fn reconnection_attempts_are_paced_while_redis_is_unreachable() {
    // Something that accepts connections and closes them at once: every attempt to
    // set up a Redis connection fails.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let accepted = std::sync::Arc::new(AtomicUsize::new(0));
    let counter = accepted.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            counter.fetch_add(1, Ordering::SeqCst);
            drop(stream);
        }
    });
    let svc = CachingService::builder()
        .backend(
            RedisBackend::builder(format!("redis://127.0.0.1:{port}/0"))
                .connect_lazily(true)
                .build()
                .await
                .unwrap(),
        )
        .build()
        .unwrap();
    let started = Instant::now();
    let mut calls = 0;
    while started.elapsed() < Duration::from_millis(300) {
        assert_eq!(svc.scope(product(calls)).await, format!("product {calls}"));
        calls += 1;
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let attempts = accepted.load(Ordering::SeqCst);
    assert!(calls > 50, "calls went on without Redis: {calls}");
    // reads and writes each back off from 25 ms: about 5 attempts each in 300 ms
    assert!(
        (1..=14).contains(&attempts),
        "{attempts} connection attempts for {calls} calls"
    );
    assert!(svc.stats().total.backend_errors > 0);
}

/// Clients connected to `server`, this one excluded.
fn clients(server: &RedisServer) -> usize {
    let client = redis::Client::open(server.url()).unwrap();
    let mut con = client.get_connection().unwrap();
    let list: String = redis::cmd("CLIENT").arg("LIST").query(&mut con).unwrap();
    list.lines().count() - 1
}

#[tokio::test]
async fn connections_end_with_their_backend() {
    let server = RedisServer::start();
    let first = service(&server, "gone", false).await;
    first
        .scope(async {
            for i in 0..10 {
                product(i).await;
            }
        })
        .await;
    first.shutdown().await;
    assert_eq!(
        clients(&server),
        2,
        "one connection for reads, one for writes"
    );
    drop(first);

    let second = service(&server, "gone", false).await;
    assert_eq!(second.scope(product(1)).await, "product 1");
    let started = Instant::now();
    while clients(&server) != 2 {
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "the dropped backend's connections stay open: {} clients",
            clients(&server)
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}
