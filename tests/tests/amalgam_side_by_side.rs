//! Where `#[cached]` and `amalgam-cache` 0.4 (a port of FusionCache) behave
//! differently, each side measured on a private Redis (the README's table).

use std::sync::Arc;
use std::time::Duration;

use amalgam::provider::{
    Backplane, DistributedCache, DistributedLocker, DistributedSerializer, MessagePackSerializer,
    RedisBackplane, RedisDistributedCache, RedisDistributedLocker,
};
use amalgam::{Cache, EntryOptions, FactoryContext, FactoryError};
use cache_redis::RedisBackend;
use cache_runtime::{cached, CachingService};

use tests::redis_server::RedisServer;

/// The commands clients send to `server` while `MONITOR` runs: started by
/// [`Monitor::start`], counted by [`Monitor::stop`] (not those a script runs inside).
struct Monitor(std::process::Child, std::path::PathBuf);

impl Monitor {
    fn start(server: &RedisServer) -> Monitor {
        let path =
            std::env::temp_dir().join(format!("monitor-{}-{}", std::process::id(), server.port()));
        let out = std::fs::File::create(&path).unwrap();
        let child = std::process::Command::new("redis-cli")
            .args(["-p", &server.port().to_string(), "monitor"])
            .stdout(out)
            .spawn()
            .expect("redis-cli");
        std::thread::sleep(Duration::from_millis(300));
        Monitor(child, path)
    }

    /// The commands seen, by name (`EVALSHA`, `SET`, ...), clients' only.
    fn stop(mut self) -> Vec<String> {
        std::thread::sleep(Duration::from_millis(300));
        let _ = self.0.kill();
        let _ = self.0.wait();
        let text = std::fs::read_to_string(&self.1).unwrap();
        let _ = std::fs::remove_file(&self.1);
        text.lines()
            .filter(|l| !l.contains(" lua] ") && l.contains("] \""))
            .filter_map(|l| l.split("] \"").nth(1)?.split('"').next())
            .map(|c| c.to_ascii_uppercase())
            .filter(|c| c != "PING" && c != "INFO")
            .collect()
    }
}

#[cached(name = "side.row", ttl = "1h")]
async fn row(id: u64) -> u64 {
    id
}

/// An amalgam cache on `url`: Redis as L2 (MessagePack), a backplane, and with
/// `locker` its distributed locker.
async fn theirs(url: &str, locker: bool, memory: bool) -> Cache<u64> {
    let l2 = RedisDistributedCache::connect(url.to_owned())
        .await
        .unwrap();
    let backplane = RedisBackplane::connect(url.to_owned()).await.unwrap();
    let mut builder = Cache::builder()
        .default_options(
            EntryOptions::new(Duration::from_secs(3600)).with_skip_memory(!memory, !memory),
        )
        .distributed(Arc::new(l2) as Arc<dyn DistributedCache>)
        .serializer(Arc::new(MessagePackSerializer) as Arc<dyn DistributedSerializer<u64>>)
        .backplane(Arc::new(backplane) as Arc<dyn Backplane>);
    if locker {
        let locker = RedisDistributedLocker::connect(url.to_owned())
            .await
            .unwrap();
        builder = builder.distributed_locker(Arc::new(locker) as Arc<dyn DistributedLocker>);
    }
    builder.try_build_ready().await.unwrap()
}

/// One body per key across instances: the commands Redis runs for a miss, on the
/// call's path and in all. Ours takes the lock in the read's script; amalgam's
/// distributed locker takes and releases it in commands of its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commands_per_miss_with_single_flight_across_instances() {
    const MISSES: u64 = 200;
    let server = RedisServer::start();
    let backend = RedisBackend::builder(server.url())
        .key_prefix("side")
        .distributed_single_flight(true)
        .build()
        .await
        .unwrap();
    let svc = CachingService::builder().backend(backend).build().unwrap();
    svc.scope(row(0)).await;
    svc.shutdown().await;
    let monitor = Monitor::start(&server);
    for id in 1..=MISSES {
        assert_eq!(svc.scope(row(id)).await, id);
    }
    svc.shutdown().await;
    let ours = monitor.stop();

    let cache = theirs(&server.url(), true, false).await;
    let factory = |id: u64| {
        move |ctx: FactoryContext<u64>| async move { Ok::<_, FactoryError>(ctx.value(id)) }
    };
    cache.get_or_set("t:0", factory(0)).await.unwrap();
    let monitor = Monitor::start(&server);
    for id in 1..=MISSES {
        assert_eq!(
            cache
                .get_or_set(format!("t:{id}"), factory(id))
                .await
                .unwrap(),
            id
        );
    }
    let theirs = monitor.stop();
    let per_miss = |c: &[String]| c.len() as f64 / MISSES as f64;
    let kinds = |c: &[String]| {
        let mut k: Vec<String> = c.to_vec();
        k.sort();
        k.dedup();
        k.join(" ")
    };
    eprintln!(
        "commands sent a miss, one body per key across instances: ours {:.2} ({}), amalgam-cache {:.2} ({})",
        per_miss(&ours),
        kinds(&ours),
        per_miss(&theirs),
        kinds(&theirs)
    );
    // the read (the lock in its script), the write, the release
    assert_eq!(ours.len() as u64, 3 * MISSES, "{ours:?}");
    assert!(
        theirs.len() > ours.len(),
        "amalgam's locker sends commands of its own: {theirs:?}"
    );
    let _ = cache.shutdown().await;
}

/// An entry invalidated on another instance is never a fallback for ours (tested
/// across processes in `fail_safe_processes.rs`); amalgam's `expire` (FusionCache's
/// `Expire`) keeps it as one on purpose, its `remove` does not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn amalgam_expire_keeps_an_invalidated_value_as_a_fallback() {
    let server = RedisServer::start();
    let options = EntryOptions::new(Duration::from_secs(3600)).with_fail_safe(
        true,
        Some(Duration::from_secs(3600)),
        Some(Duration::from_secs(1)),
    );
    let a = theirs(&server.url(), false, true).await;
    let b = theirs(&server.url(), false, true).await;
    for key in ["expired", "removed"] {
        let o = options.clone();
        let v = a
            .get_or_set(key, |ctx: FactoryContext<u64>| async move {
                Ok::<_, FactoryError>(ctx.value(1))
            })
            .options(move |_| o)
            .await
            .unwrap();
        assert_eq!(v, 1);
    }
    b.expire("expired").await.unwrap();
    b.remove("removed").await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await; // the backplane's messages
    let mut answers = Vec::new();
    for key in ["expired", "removed"] {
        let o = options.clone();
        let answer = a
            .get_or_set(key, |ctx: FactoryContext<u64>| async move {
                Err::<u64, _>(ctx.fail("database down"))
            })
            .options(move |_| o)
            .await;
        answers.push(answer.ok());
    }
    eprintln!("amalgam after B's expire, then remove, with the database down: {answers:?}");
    assert_eq!(
        answers,
        vec![Some(1), None],
        "expire keeps the fallback; remove does not"
    );
    let _ = a.shutdown().await;
    let _ = b.shutdown().await;
}
