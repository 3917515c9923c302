//! With the feature `metrics`: the counters of [`crate::stats`] and the bodies'
//! durations also go to the `metrics` crate's facade, so that any exporter
//! (Prometheus, StatsD, OpenTelemetry) shows them. Without it, the types here are
//! empty and their methods do nothing: nothing is added to a build.
//!
//! | metric | labels | counts |
//! |---|---|---|
//! | `cache_hits_total` | `function`, `tier` (`l1`, `l2`) | calls served from a tier |
//! | `cache_misses_total` | `function` | calls that found no value |
//! | `cache_executions_total` | `function` | bodies run |
//! | `cache_invalidations_total` | `function` | entries invalidated |
//! | `cache_errors_total` | `function`, `kind` (`backend`, `config`, `decode`, `background`) | failures |
//! | `cache_oversized_total` | `function` | values too large for the remote tier |
//! | `cache_local_only_total` | `function` | values kept in process only (dependencies) |
//! | `cache_fallbacks_total` | `function` | calls answered with a fail-safe fallback |
//! | `cache_soft_timeouts_total` | `function` | fallbacks served because the body was slow |
//! | `cache_eager_refreshes_total` | `function` | background refreshes started by a hit |
//! | `cache_body_duration_seconds` | `function` | histogram of the bodies' run times |
//! | `cache_sync_messages_total` | `direction` (`published`, `received`) | invalidation messages |
//!
//! A function's handles are registered when the service first resolves it: install
//! the recorder (an exporter) before the first cached call.

/// How many counters a function has (`stats::Counter`'s variants).
pub(crate) const COUNTED: usize = 14;

#[cfg(feature = "metrics")]
mod on {
    use std::time::{Duration, Instant};

    use super::COUNTED;

    /// The metric of each counter, in the order of `stats::Counter`'s numbers: its
    /// name and a label of its own, besides `function`.
    const METRICS: [(&str, Option<(&str, &str)>); COUNTED] = [
        ("cache_misses_total", None),
        ("cache_hits_total", Some(("tier", "l1"))),
        ("cache_hits_total", Some(("tier", "l2"))),
        ("cache_executions_total", None),
        ("cache_invalidations_total", None),
        ("cache_errors_total", Some(("kind", "backend"))),
        ("cache_errors_total", Some(("kind", "config"))),
        ("cache_errors_total", Some(("kind", "decode"))),
        ("cache_oversized_total", None),
        ("cache_local_only_total", None),
        ("cache_fallbacks_total", None),
        ("cache_soft_timeouts_total", None),
        ("cache_eager_refreshes_total", None),
        ("cache_errors_total", Some(("kind", "background"))),
    ];

    /// One function's metrics handles.
    pub(crate) struct FnMetrics {
        counters: [metrics::Counter; COUNTED],
        body: metrics::Histogram,
    }

    impl Default for FnMetrics {
        fn default() -> Self {
            FnMetrics {
                counters: std::array::from_fn(|_| metrics::Counter::noop()),
                body: metrics::Histogram::noop(),
            }
        }
    }

    impl FnMetrics {
        pub(crate) fn new(function: &str) -> Self {
            let labels = |own: Option<(&'static str, &'static str)>| {
                let mut labels = vec![metrics::Label::new("function", function.to_owned())];
                labels.extend(own.map(|(k, v)| metrics::Label::new(k, v)));
                labels
            };
            FnMetrics {
                counters: METRICS.map(|(name, own)| metrics::counter!(name, labels(own))),
                body: metrics::histogram!("cache_body_duration_seconds", labels(None)),
            }
        }

        /// Counts one event of the counter numbered `counter`.
        #[inline(always)]
        pub(crate) fn count(&self, counter: usize) {
            if let Some(c) = self.counters.get(counter) {
                c.increment(1);
            }
        }

        fn body(&self, d: Duration) {
            self.body.record(d.as_secs_f64());
        }
    }

    /// When a body started.
    pub(crate) struct BodyTimer(Instant);

    impl BodyTimer {
        pub(crate) fn start() -> Self {
            BodyTimer(Instant::now())
        }
        pub(crate) fn stop(self, m: &FnMetrics) {
            m.body(self.0.elapsed());
        }
    }

    pub(crate) fn sync_message(direction: &'static str) {
        metrics::counter!("cache_sync_messages_total", "direction" => direction).increment(1);
    }
}

#[cfg(not(feature = "metrics"))]
mod on {
    #[derive(Default)]
    pub(crate) struct FnMetrics;

    impl FnMetrics {
        #[inline(always)]
        pub(crate) fn new(_function: &str) -> Self {
            FnMetrics
        }
        #[inline(always)]
        pub(crate) fn count(&self, _counter: usize) {}
    }

    pub(crate) struct BodyTimer;

    impl BodyTimer {
        #[inline(always)]
        pub(crate) fn start() -> Self {
            BodyTimer
        }
        #[inline(always)]
        pub(crate) fn stop(self, _m: &FnMetrics) {}
    }

    #[inline(always)]
    pub(crate) fn sync_message(_direction: &'static str) {}
}

pub(crate) use on::{sync_message, BodyTimer, FnMetrics};
