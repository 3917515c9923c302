//! Hits and misses are `debug` events with the key; configuration errors are logged once.

use std::fmt::Write as _;
use std::sync::{Arc, Mutex};

use cache_runtime::{cached, CachingService};
use tracing::field::{Field, Visit};
use tracing::{Event, Level, Subscriber};
use tracing_subscriber::layer::{Context, SubscriberExt};
use tracing_subscriber::Layer;

#[derive(Clone, Default)]
struct Recorder(Arc<Mutex<Vec<(Level, String)>>>);

struct Fields(String);
impl Visit for Fields {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        let _ = write!(self.0, "{}={:?} ", field.name(), value);
    }
    fn record_str(&mut self, field: &Field, value: &str) {
        let _ = write!(self.0, "{}={} ", field.name(), value);
    }
}

impl<S: Subscriber> Layer<S> for Recorder {
    fn on_event(&self, event: &Event<'_>, _: Context<'_, S>) {
        let mut f = Fields(String::new());
        event.record(&mut f);
        self.0
            .lock()
            .unwrap()
            .push((*event.metadata().level(), f.0));
    }
}

#[cached]
async fn price(id: u64, currency: &str) -> u64 {
    id + currency.len() as u64
}

#[cached(profile = "missing")]
async fn misconfigured(id: u64) -> u64 {
    id
}

#[tokio::test]
async fn events() {
    let recorder = Recorder::default();
    let subscriber = tracing_subscriber::registry().with(recorder.clone());
    let _guard = tracing::subscriber::set_default(subscriber);

    let svc = CachingService::builder().build().unwrap();
    svc.scope(async {
        price(7, "EUR").await;
        price(7, "EUR").await;
        for _ in 0..3 {
            misconfigured(1).await;
        }
    })
    .await;

    let events = recorder.0.lock().unwrap().clone();
    let key = format!(r#"{}::price:v1(7,"EUR")"#, module_path!());
    let miss = events
        .iter()
        .find(|(l, f)| *l == Level::DEBUG && f.contains("cache miss"))
        .expect("a miss event");
    assert!(miss.1.contains(&format!("key={key}")), "{}", miss.1);
    let hit = events
        .iter()
        .find(|(l, f)| *l == Level::DEBUG && f.contains("cache hit"))
        .expect("a hit event");
    assert!(hit.1.contains(&format!("key={key}")), "{}", hit.1);

    let errors: Vec<_> = events.iter().filter(|(l, _)| *l == Level::ERROR).collect();
    assert_eq!(errors.len(), 1, "logged once: {errors:?}");
    assert!(errors[0].1.contains("profile `missing`"), "{}", errors[0].1);
    assert!(
        errors[0].1.contains(r#"Profile::new("missing")"#),
        "{}",
        errors[0].1
    );
    assert_eq!(svc.stats().total.config_errors, 3, "counted every time");
}

#[cached(name = "t.refused")]
async fn refused(id: u64) -> u64 {
    id
}

/// What Redis refuses is logged at `warn` with the command and the server's words, and
/// a subscription that cannot be made says that the in-process tier is bypassed.
#[tokio::test]
async fn refusals_are_logged_with_the_command_and_the_servers_words() {
    use cache_redis::RedisBackend;
    use cache_runtime::MemoryBackend;
    use tests::redis_server::RedisServer;

    let recorder = Recorder::default();
    let subscriber = tracing_subscriber::registry().with(recorder.clone());
    let _guard = tracing::subscriber::set_default(subscriber);
    let server = RedisServer::start();
    server.acl_user("u", &["-subscribe"]);
    let svc = CachingService::builder()
        .backend(
            RedisBackend::builder(server.url_as("u", RedisServer::PASSWORD))
                .key_prefix("log")
                .l1(MemoryBackend::new())
                .connect_lazily(true)
                .build()
                .await
                .unwrap(),
        )
        .build()
        .unwrap();
    svc.scope(refused(1)).await;
    svc.shutdown().await;
    server.acl_change("u", &["-del", "-unlink", "-set"]);
    svc.scope(cache_runtime::invalidate!(refused(1))).await;
    svc.scope(refused(1)).await;
    svc.shutdown().await;
    let warnings: Vec<String> = recorder
        .0
        .lock()
        .unwrap()
        .iter()
        .filter(|(l, _)| *l == Level::WARN)
        .map(|(_, f)| f.clone())
        .collect();
    let said = |what: &[&str]| warnings.iter().any(|w| what.iter().all(|s| w.contains(s)));
    assert!(said(&["Redis refused DEL", "NOPERM"]), "{warnings:#?}");
    assert!(
        said(&["removing `t.refused:v1(1)`", "sent again"]),
        "{warnings:#?}"
    );
    assert!(said(&["Redis refused SET", "NOPERM"]), "{warnings:#?}");
    assert!(said(&["cannot subscribe", "bypassed"]), "{warnings:#?}");
    let remote = svc.stats().remote;
    assert!(
        remote.removal_errors >= 1 && remote.write_errors >= 1,
        "{remote:?}"
    );
}
