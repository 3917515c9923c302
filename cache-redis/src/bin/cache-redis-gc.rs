//! `cache-redis-gc`: the dependency collector of `cache-redis` as a service of its own.

use std::process::ExitCode;

use cache_redis::{full_collection, DependencyCollector};

const HELP: &str = "\
cache-redis-gc: keeps the dependency graph of cache-redis clean in Redis

USAGE:
    cache-redis-gc --url <URL> --prefix <PREFIX> [--full]

OPTIONS:
    --url <URL>        the Redis server, or any node of a Redis Cluster, as given to
                       RedisBackend (redis://host:port/db)
    --prefix <PREFIX>  the key prefix, as given to RedisBackend::key_prefix
    --full             run one full collection, print its report, and exit
    -h, --help         print this help

Without --full it runs a collector until SIGINT or SIGTERM: it removes the links of
values that expire or are evicted (from keyspace notifications), and runs a full
collection at start and after a lost subscription (on a cluster: on every master,
and again when the masters change). Several may run at once.
The server needs `maxmemory-policy volatile-lru` and `notify-keyspace-events Exe`.
Logs go to stderr; RUST_LOG sets the level (default: info).";

struct Args {
    url: String,
    prefix: String,
    full: bool,
}

fn parse(mut args: impl Iterator<Item = String>) -> Result<Option<Args>, String> {
    let (mut url, mut prefix, mut full) = (None, None, false);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "-h" | "--help" => return Ok(None),
            "--url" => url = Some(args.next().ok_or("--url needs a value")?),
            "--prefix" => prefix = Some(args.next().ok_or("--prefix needs a value")?),
            "--full" => full = true,
            other => return Err(format!("unknown argument `{other}`")),
        }
    }
    Ok(Some(Args {
        url: url.ok_or("--url is required")?,
        prefix: prefix.ok_or("--prefix is required")?,
        full,
    }))
}

#[tokio::main]
async fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()))
        .init();
    let args = match parse(std::env::args().skip(1)) {
        Ok(Some(args)) => args,
        Ok(None) => {
            println!("{HELP}");
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            eprintln!("cache-redis-gc: {e}\n\n{HELP}");
            return ExitCode::from(2);
        }
    };
    if args.full {
        return match full_collection(&args.url, &args.prefix).await {
            Ok(report) => {
                println!(
                    "scanned {} graph keys; removed the links of {} entries without a value, {} entries with incomplete links, {} reverse-set members, {} cascades, {} parents; left {} entries linked too recently to judge (a cluster's)",
                    report.scanned, report.forward_sets, report.broken_entries, report.reverse_members, report.cascades, report.parents, report.recent
                );
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("cache-redis-gc: {e}");
                ExitCode::FAILURE
            }
        };
    }
    let collector = match DependencyCollector::builder(&args.url)
        .key_prefix(&args.prefix)
        .start()
        .await
    {
        Ok(c) => c,
        Err(e) => {
            eprintln!("cache-redis-gc: {e}");
            return ExitCode::FAILURE;
        }
    };
    tracing::info!(
        "collecting the dependency graph of prefix `{}`",
        args.prefix
    );
    wait_for_signal().await;
    tracing::info!(
        collected = collector.collected(),
        full_collections = collector.full_collections(),
        repaired = collector.repaired(),
        "stopping"
    );
    collector.stop().await;
    ExitCode::SUCCESS
}

async fn wait_for_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = tokio::signal::ctrl_c() => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
    #[cfg(not(unix))]
    {
        let _ = tokio::signal::ctrl_c().await;
    }
}
