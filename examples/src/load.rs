//! The shop's load driver (`shop --load`): concurrent HTTP/1.1 keep-alive clients
//! (`reqwest`, one connection each) that read `GET /products/{id}` over a spread of
//! ids for a while, and report requests per second and latency percentiles.

use std::time::{Duration, Instant};

/// What one run measured.
#[derive(Debug, Clone)]
pub struct Figures {
    /// Requests answered 200.
    pub requests: u64,
    /// Requests that failed or were not answered 200.
    pub failed: u64,
    /// The run's length.
    pub elapsed: Duration,
    /// Latencies, sorted.
    latencies: Vec<Duration>,
}

impl Figures {
    /// Requests answered per second.
    pub fn per_second(&self) -> f64 {
        self.requests as f64 / self.elapsed.as_secs_f64()
    }

    /// The latency below which a fraction `q` (0 to 1) of the requests were answered.
    pub fn percentile(&self, q: f64) -> Duration {
        if self.latencies.is_empty() {
            return Duration::ZERO;
        }
        let at = ((self.latencies.len() - 1) as f64 * q).round() as usize;
        self.latencies[at]
    }
}

/// Drives `base` (`http://host:port`) with `clients` concurrent keep-alive clients for
/// `length`, each reading products `1..=ids` in its own order.
pub async fn drive(base: &str, clients: usize, ids: u64, length: Duration) -> Figures {
    let start = Instant::now();
    let deadline = start + length;
    let tasks: Vec<_> = (0..clients)
        .map(|c| {
            let base = base.to_owned();
            tokio::spawn(async move {
                // one connection per client, kept alive
                let client = reqwest::Client::builder()
                    .pool_max_idle_per_host(1)
                    .build()
                    .expect("an HTTP client");
                let (mut ok, mut failed, mut latencies) = (0u64, 0u64, Vec::new());
                // a different walk over the ids for each client (a stride prime to ids)
                let mut id = (c as u64 * 7919) % ids;
                while Instant::now() < deadline {
                    id = (id + 104_729) % ids;
                    let sent = Instant::now();
                    let answer = client
                        .get(format!("{base}/products/{}", id + 1))
                        .send()
                        .await;
                    let good = match answer {
                        Ok(r) if r.status().is_success() => r.bytes().await.is_ok(),
                        _ => false,
                    };
                    latencies.push(sent.elapsed());
                    if good {
                        ok += 1;
                    } else {
                        failed += 1;
                    }
                }
                (ok, failed, latencies)
            })
        })
        .collect();
    let mut figures = Figures {
        requests: 0,
        failed: 0,
        elapsed: Duration::ZERO,
        latencies: Vec::new(),
    };
    for t in tasks {
        let (ok, failed, latencies) = t.await.expect("a client");
        figures.requests += ok;
        figures.failed += failed;
        figures.latencies.extend(latencies);
    }
    figures.elapsed = start.elapsed();
    figures.latencies.sort_unstable();
    figures
}
