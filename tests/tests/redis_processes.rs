//! Two processes on one Redis: what one stores, the other reads.

use std::process::Command;

use cache_redis::RedisBackend;
use cache_runtime::{cached, CachingService};
use tests::redis_server::RedisServer;

/// Same key name and prefix as in `src/bin/cache_filler.rs`.
#[cached(name = "p.report")]
async fn report(id: u64) -> String {
    format!("report {id}")
}

async fn service(url: &str) -> CachingService {
    CachingService::builder()
        .backend(
            RedisBackend::builder(url)
                .key_prefix("procs")
                .build()
                .await
                .unwrap(),
        )
        .build()
        .unwrap()
}

#[tokio::test]
async fn a_second_process_gets_hits() {
    let server = RedisServer::start();
    // another process (src/bin/cache_filler.rs) fills the cache
    let status = Command::new(env!("CARGO_BIN_EXE_cache_filler"))
        .arg(server.url())
        .status()
        .unwrap();
    assert!(status.success(), "the filling process failed");

    let svc = service(&server.url()).await;
    svc.scope(async {
        for id in 0..20 {
            assert_eq!(report(id).await, format!("report {id}"));
        }
    })
    .await;
    let s = svc.stats().total;
    assert_eq!(
        (s.l2_hits, s.executions),
        (20, 0),
        "every entry came from the other process"
    );
}

#[tokio::test]
async fn credentials_and_database_from_the_url() {
    let server = RedisServer::start_with(&["--requirepass", "s3cret"]);
    let url = format!("redis://:s3cret@127.0.0.1:{}/3", server.port());
    let svc = service(&url).await;
    svc.scope(report(1)).await;
    svc.shutdown().await;
    let client = redis::Client::open(url.as_str()).unwrap();
    let mut con = client.get_connection().unwrap();
    let exists: bool = redis::cmd("EXISTS")
        .arg("procs:2:p.report:v1(1)")
        .query(&mut con)
        .unwrap();
    assert!(exists, "written to database 3");
    let wrong = RedisBackend::builder(format!("redis://:wrong@127.0.0.1:{}/3", server.port()))
        .build()
        .await
        .unwrap_err();
    assert!(wrong.to_string().contains("cannot connect"), "{wrong}");
}

#[tokio::test]
async fn tls_with_rediss_urls() {
    let server = RedisServer::start_tls();
    let (url, ca) = server.tls().expect("a TLS server");
    let svc = CachingService::builder()
        .backend(
            RedisBackend::builder(&url)
                .key_prefix("tls")
                .tls_root_certificate(ca)
                .build()
                .await
                .expect("a TLS connection"),
        )
        .build()
        .unwrap();
    svc.scope(report(2)).await;
    svc.shutdown().await;
    svc.scope(report(2)).await;
    assert_eq!(svc.stats().total.l2_hits, 1, "read back over TLS");
    assert_eq!(
        server
            .command(&["EXISTS", "tls:2:p.report:v1(2)"])
            .as_deref(),
        Some(":1")
    );
    // without the CA, the server's certificate is not trusted
    let untrusted = RedisBackend::builder(&url).build().await.unwrap_err();
    assert!(
        untrusted.to_string().contains("cannot connect"),
        "{untrusted}"
    );
}
