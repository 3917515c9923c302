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
