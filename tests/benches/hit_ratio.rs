//! The in-process hit, built as an application is built (`[profile.hit]`: release,
//! `lto = "thin"`, `codegen-units = 1`), against its peers in one run:
//! - a raw `quick_cache::sync::Cache::get` of a pre-built `(u64, String)` key, and of a
//!   pre-built `String` key (the readable key, as `benches/hit.rs` has it);
//! - `#[cached]` on an async function, and on a plain `fn`;
//! - the `cached` crate's async `#[cached]` hit, and `moka::future::Cache::get`;
//! - `#[cached]` on an async function with owned parameters `(u64, String)`, plain
//!   (`ours_owned`) and with `fail_safe` and `eager_refresh` set (`ours_resilient`,
//!   whose wrapper has the background path): the cost of those options on a hit.
//!
//! Every function takes `(u64, &str)` and returns a ~100-byte value, as in
//! `benches/hit.rs`. Each is timed in a loop of awaited calls inside one `block_on` on
//! a current-thread runtime (the raw get and the plain `fn` too, so that the loop costs
//! the same). The runs alternate, each first in turn, and the medians are printed.
//! Then, if `valgrind` is installed, the instructions per call of each, counted by
//! callgrind (this binary runs itself under it twice per function, with two call
//! counts, and takes the difference, so set-up is not counted).
//!
//! Run: `cargo bench --profile hit -p tests --bench hit_ratio`

use std::hint::black_box;
use std::process::Command;
use std::time::Instant;

use tests::{median, product, Product};

#[path = "common/hit_fns.rs"]
mod hit_fns;
use hit_fns::{ours, ours_plain, theirs};

/// Bodies of ours run by `Peers::new` (one per function): every later call hits.
const OURS_WARMED: u64 = 4;

const NAMES: [&str; 8] = [
    "raw",
    "raw_string",
    "ours",
    "ours_plain",
    "cached",
    "moka",
    "ours_owned",
    "ours_resilient",
];

#[cache_runtime::cached(ttl = "1h")]
async fn ours_owned(id: u64, region: String) -> Result<Product, String> {
    let _ = region;
    Ok(product(id))
}

#[cache_runtime::cached(ttl = "1h", fail_safe = "1h", eager_refresh = 0.8)]
async fn ours_resilient(id: u64, region: String) -> Result<Product, String> {
    let _ = region;
    Ok(product(id))
}

struct Peers {
    rt: tokio::runtime::Runtime,
    region: String,
    key: (u64, String),
    raw: quick_cache::sync::Cache<(u64, String), Product>,
    text: String,
    raw_string: quick_cache::sync::Cache<String, Product>,
    moka: moka::future::Cache<(u64, String), Product>,
}

impl Peers {
    fn new() -> Self {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let region = String::from("eu-west");
        let key = (42, region.clone());
        let raw = quick_cache::sync::Cache::new(10_000);
        raw.insert(key.clone(), product(42));
        let text = format!("get_product:v1(42,{region:?})");
        let raw_string = quick_cache::sync::Cache::new(10_000);
        raw_string.insert(text.clone(), product(42));
        let moka = moka::future::Cache::new(10_000);
        rt.block_on(moka.insert(key.clone(), product(42)));
        rt.block_on(ours(42, &region));
        rt.block_on(theirs(42, &region));
        ours_plain(42, &region);
        rt.block_on(ours_owned(42, region.clone())).unwrap();
        rt.block_on(ours_resilient(42, region.clone())).unwrap();
        Peers {
            rt,
            region,
            key,
            raw,
            text,
            raw_string,
            moka,
        }
    }

    /// Runs `calls` hits of `name`; returns nanoseconds per call.
    fn run(&self, name: &str, calls: u64) -> f64 {
        let (region, key) = (self.region.as_str(), &self.key);
        let start = Instant::now();
        self.rt.block_on(async {
            match name {
                "raw" => {
                    for _ in 0..calls {
                        black_box(self.raw.get(black_box(key)));
                    }
                }
                "raw_string" => {
                    for _ in 0..calls {
                        black_box(self.raw_string.get(black_box(&self.text)));
                    }
                }
                "ours" => {
                    for _ in 0..calls {
                        black_box(ours(black_box(42), black_box(region)).await);
                    }
                }
                "ours_plain" => {
                    for _ in 0..calls {
                        black_box(ours_plain(black_box(42), black_box(region)));
                    }
                }
                "cached" => {
                    for _ in 0..calls {
                        black_box(theirs(black_box(42), black_box(region)).await);
                    }
                }
                "moka" => {
                    for _ in 0..calls {
                        black_box(self.moka.get(black_box(key)).await);
                    }
                }
                "ours_owned" => {
                    for _ in 0..calls {
                        let region = black_box(region).to_owned();
                        black_box(ours_owned(black_box(42), region).await).ok();
                    }
                }
                "ours_resilient" => {
                    for _ in 0..calls {
                        let region = black_box(region).to_owned();
                        black_box(ours_resilient(black_box(42), region).await).ok();
                    }
                }
                other => panic!("unknown function {other}"),
            }
        });
        start.elapsed().as_nanos() as f64 / calls as f64
    }
}

/// Instructions per call of `name`: this binary under callgrind with two call counts.
fn instructions(name: &str) -> Option<f64> {
    let exe = std::env::current_exe().ok()?;
    let count = |calls: u64| -> Option<f64> {
        let out = Command::new("valgrind")
            .args(["--tool=callgrind", "--callgrind-out-file=/dev/null"])
            .arg(&exe)
            .args(["--only", name, "--calls", &calls.to_string()])
            .output()
            .ok()?;
        let stderr = String::from_utf8_lossy(&out.stderr);
        let line = stderr.lines().find(|l| l.contains("Collected :"))?;
        line.rsplit(':').next()?.trim().parse().ok()
    };
    let (few, many) = (10_000, 110_000);
    Some((count(many)? - count(few)?) / (many - few) as f64)
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let arg = |flag: &str| {
        args.iter()
            .position(|a| a == flag)
            .and_then(|i| args.get(i + 1))
    };
    if let Some(name) = arg("--only") {
        let calls = arg("--calls").and_then(|c| c.parse().ok()).unwrap_or(1);
        Peers::new().run(name, calls);
        assert_eq!(
            cache_runtime::stats().total.executions,
            OURS_WARMED,
            "every measured call was a hit"
        );
        return;
    }

    let peers = Peers::new();
    let (rounds, calls) = (31, 200_000);
    let mut ns: Vec<Vec<f64>> = vec![Vec::new(); NAMES.len()];
    let mut ratios: Vec<Vec<f64>> = vec![Vec::new(); NAMES.len()];
    for round in 0..rounds {
        let mut this = [0.0; NAMES.len()];
        for i in 0..NAMES.len() {
            let which = (round + i) % NAMES.len();
            this[which] = peers.run(NAMES[which], calls);
        }
        for (which, t) in this.iter().enumerate() {
            ns[which].push(*t);
            ratios[which].push(t / this[0]);
        }
    }
    assert_eq!(
        cache_runtime::stats().total.executions,
        OURS_WARMED,
        "every measured call of ours was a hit"
    );
    println!("hit, alternating runs ({rounds} rounds of {calls} calls each), medians:");
    for (which, name) in NAMES.iter().enumerate() {
        println!(
            "  {name:<11} {:>7.1} ns a call, {:.2}x the raw get",
            median(&mut ns[which]),
            median(&mut ratios[which])
        );
    }
    if Command::new("valgrind").arg("--version").output().is_err() {
        println!("(valgrind is not installed: no instruction counts)");
        return;
    }
    println!("instructions a call (callgrind):");
    let raw = instructions("raw");
    for name in NAMES {
        match (instructions(name), raw) {
            (Some(n), Some(r)) => println!("  {name:<11} {n:>7.0}, {:.2}x the raw get", n / r),
            _ => println!("  {name:<11} (callgrind failed)"),
        }
    }
}
