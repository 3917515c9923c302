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

/// A span seen: its name, its parent's name, and its fields as recorded.
struct SpanSeen {
    id: tracing::span::Id,
    name: &'static str,
    parent: Option<&'static str>,
    fields: String,
}

#[derive(Clone, Default)]
struct Spans(Arc<Mutex<Vec<SpanSeen>>>);

impl<S> Layer<S> for Spans
where
    S: Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
{
    fn on_new_span(
        &self,
        attrs: &tracing::span::Attributes<'_>,
        id: &tracing::span::Id,
        ctx: Context<'_, S>,
    ) {
        let mut f = Fields(String::new());
        attrs.record(&mut f);
        let parent = ctx.span(id).and_then(|s| s.parent()).map(|p| p.name());
        self.0.lock().unwrap().push(SpanSeen {
            id: id.clone(),
            name: attrs.metadata().name(),
            parent,
            fields: f.0,
        });
    }

    fn on_record(
        &self,
        id: &tracing::span::Id,
        values: &tracing::span::Record<'_>,
        _: Context<'_, S>,
    ) {
        let mut spans = self.0.lock().unwrap();
        if let Some(s) = spans.iter_mut().find(|s| s.id == *id) {
            let mut f = Fields(std::mem::take(&mut s.fields));
            values.record(&mut f);
            s.fields = f.0;
        }
    }
}

#[cached(name = "traced.product")]
async fn traced(id: u64) -> u64 {
    // the body's own span (a query's, in an application)
    tracing::info_span!("db_query").in_scope(|| ());
    tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    id
}

/// Each miss is a span with the function, the key, the tier that served it and
/// whether it waited for another caller; the body's own spans are inside it.
#[tokio::test]
async fn a_span_per_miss() {
    let spans = Spans::default();
    let subscriber = tracing_subscriber::registry().with(spans.clone());
    let _guard = tracing::subscriber::set_default(subscriber);

    let svc = CachingService::builder().build().unwrap();
    svc.scope(async {
        // two callers of one key: one runs the body, the other waits for it
        let (a, b) = tokio::join!(traced(1), traced(1));
        assert_eq!((a, b), (1, 1));
        // a hit: no span
        traced(1).await;
    })
    .await;

    let spans = spans.0.lock().unwrap();
    let misses: Vec<&SpanSeen> = spans.iter().filter(|s| s.name == "cache_miss").collect();
    assert_eq!(misses.len(), 2, "one span per miss, none for the hit");
    for m in &misses {
        assert!(
            m.fields.contains("function=traced.product "),
            "{}",
            m.fields
        );
        assert!(
            m.fields.contains("key=traced.product:v1(1) "),
            "{}",
            m.fields
        );
    }
    let ran: Vec<_> = misses
        .iter()
        .filter(|m| m.fields.contains("tier=body ") && m.fields.contains("waited=false"))
        .collect();
    let waited: Vec<_> = misses
        .iter()
        .filter(|m| m.fields.contains("tier=flight ") && m.fields.contains("waited=true"))
        .collect();
    assert_eq!(
        (ran.len(), waited.len()),
        (1, 1),
        "{:?}",
        misses.iter().map(|m| &m.fields).collect::<Vec<_>>()
    );
    let query = spans
        .iter()
        .find(|s| s.name == "db_query")
        .expect("the body's span");
    assert_eq!(
        query.parent,
        Some("cache_miss"),
        "the body runs inside the miss's span"
    );
}
