//! With the feature `metrics`, the counters of `stats()` and the bodies' durations go
//! to the `metrics` facade, labelled by function. (`cargo test --workspace` builds
//! the feature: the shop example enables it.)

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use cache_runtime::{cached, invalidate_cache, CachingService};
use metrics::{
    Counter, Gauge, Histogram, HistogramFn, Key, KeyName, Metadata, Recorder, SharedString, Unit,
};

/// The metrics registered, by name and labels (`name{label=value,...}`).
#[derive(Default)]
struct Recorded {
    counters: Mutex<BTreeMap<String, Arc<AtomicU64>>>,
    histograms: Mutex<BTreeMap<String, Arc<Samples>>>,
}

#[derive(Default)]
struct Samples(Mutex<Vec<f64>>);

impl HistogramFn for Samples {
    fn record(&self, value: f64) {
        self.0.lock().unwrap().push(value);
    }
}

fn name_of(key: &Key) -> String {
    let labels: Vec<String> = key
        .labels()
        .map(|l| format!("{}={}", l.key(), l.value()))
        .collect();
    format!("{}{{{}}}", key.name(), labels.join(","))
}

struct Shared(Arc<Recorded>);

impl Recorder for Shared {
    fn describe_counter(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_gauge(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn describe_histogram(&self, _: KeyName, _: Option<Unit>, _: SharedString) {}
    fn register_counter(&self, key: &Key, _: &Metadata<'_>) -> Counter {
        let mut counters = self.0.counters.lock().unwrap();
        Counter::from_arc(counters.entry(name_of(key)).or_default().clone())
    }
    fn register_gauge(&self, _: &Key, _: &Metadata<'_>) -> Gauge {
        Gauge::noop()
    }
    fn register_histogram(&self, key: &Key, _: &Metadata<'_>) -> Histogram {
        let mut histograms = self.0.histograms.lock().unwrap();
        Histogram::from_arc(histograms.entry(name_of(key)).or_default().clone())
    }
}

#[cached(name = "metered.price")]
async fn price(id: u64) -> u64 {
    tokio::time::sleep(Duration::from_millis(20)).await;
    id * 100
}

#[invalidate_cache(price)]
async fn set_price(id: u64) {
    let _ = id;
}

#[tokio::test]
async fn counters_and_body_durations_reach_the_facade() {
    let recorded = Arc::new(Recorded::default());
    metrics::set_global_recorder(Shared(recorded.clone())).expect("the first recorder");

    let svc = CachingService::builder().build().unwrap();
    svc.scope(async {
        price(1).await; // miss, body
        price(1).await; // hit
        price(1).await; // hit
        set_price(1).await; // invalidation
        price(1).await; // miss, body
    })
    .await;

    let count = |name: &str| {
        let counters = recorded.counters.lock().unwrap();
        match counters.get(name) {
            Some(c) => c.load(Ordering::Relaxed),
            None => panic!("{name} is not registered: {:?}", counters.keys()),
        }
    };
    assert_eq!(count("cache_misses_total{function=metered.price}"), 2);
    assert_eq!(count("cache_executions_total{function=metered.price}"), 2);
    assert_eq!(count("cache_hits_total{function=metered.price,tier=l1}"), 2);
    assert_eq!(count("cache_hits_total{function=metered.price,tier=l2}"), 0);
    assert_eq!(
        count("cache_invalidations_total{function=metered.price}"),
        1
    );
    assert_eq!(
        count("cache_errors_total{function=metered.price,kind=backend}"),
        0
    );
    // the same figures as stats()
    let stats = svc.stats().functions["metered.price"];
    assert_eq!((stats.misses, stats.l1_hits), (2, 2));

    let histograms = recorded.histograms.lock().unwrap();
    let body = histograms["cache_body_duration_seconds{function=metered.price}"]
        .0
        .lock()
        .unwrap()
        .clone();
    assert_eq!(body.len(), 2, "one sample per body run");
    assert!(body.iter().all(|&s| s >= 0.019), "{body:?}");
}
