//! `soak`: the cache under load and faults, across processes, with figures.
//!
//! Starts its own `redis-server` for the cache (or, with `--cluster`, a Redis Cluster
//! of 3 masters and 3 replicas) and a second one as the database,
//! then instance processes (`cache_instance`, next to this binary) running the soak
//! load (`cache_instance`'s `soak` command), injects faults on a schedule, and
//! reports what users ask: failed calls, wrong values, how stale other instances'
//! reads get (outside and inside fault periods), how fast Redis hits come back after
//! a restart, and orphans left in the dependency graph.

use std::io::{BufRead, BufReader, Write};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use tests::redis_cluster::RedisCluster;
use tests::redis_server::RedisServer;

const HELP: &str = "\
soak: the cache under load and faults, across processes

USAGE:
    cargo run --release -p tests --bin soak -- [OPTIONS]

OPTIONS:
    --seconds <S>      how long the load runs (default 60)
    --instances <N>    instance processes (default 3)
    --mode <MODE>      l1-deps (RedisBackend with an L1 and dependencies, and a
                       dependency collector; default), l1 (with an L1, rows
                       without dependencies, so stored in Redis), redis
                       (RedisBackend alone), sync (memory caches with RedisSync)
    --cluster          a Redis Cluster of 3 masters and 3 replicas for the cache
    --no-faults        no faults
    --fault <NAME>     only this fault (repeatable): redis-restart, pause,
                       kill-pubsub, evictions, instance-restart, collector-stop;
                       with --cluster: master-kill (a failover, then the old
                       master back as a replica), takeover (CLUSTER FAILOVER
                       TAKEOVER on a replica), reshard (1,000 slots moved), pause,
                       kill-pubsub, evictions, instance-restart, collector-stop
    --source-faults    the database fails (2 s) and stalls (400 ms a read, 2 s)
                       every 10 s; rows are read with fail-safe and a soft
                       timeout, and the result counts the fallbacks served, those
                       served after their invalidation (must be 0) and the
                       database's reads
    --single-flight    the instances' RedisBackend with distributed_single_flight
    --seed <N>         the load's seed (default 1)
    --json             print the result as one JSON object, on the last line
    -h, --help         print this help

Every fault runs once, at evenly spaced times. SOAK_DEBUG=1 prints each stale
read outside fault periods, with how long after each fault it came. The instances read rows and nested
views of a database (about 90%) and write them, then invalidate by key or by
dependency (about 10%), over 400 rows (their L1 holds 100).";

const CLUSTER_FAULTS: [&str; 8] = [
    "master-kill",
    "pause",
    "takeover",
    "kill-pubsub",
    "reshard",
    "evictions",
    "instance-restart",
    "collector-stop",
];

const FAULTS: [&str; 6] = [
    "redis-restart",
    "pause",
    "kill-pubsub",
    "evictions",
    "instance-restart",
    "collector-stop",
];

struct Args {
    seconds: u64,
    instances: usize,
    mode: String,
    faults: Vec<String>,
    seed: u64,
    json: bool,
    cluster: bool,
    source_faults: bool,
    single_flight: bool,
}

fn parse() -> Result<Option<Args>, String> {
    let mut a = Args {
        seconds: 60,
        instances: 3,
        mode: "l1-deps".into(),
        faults: FAULTS.iter().map(|f| f.to_string()).collect(),
        seed: 1,
        json: false,
        cluster: false,
        source_faults: false,
        single_flight: false,
    };
    let mut mode: Option<String> = None;
    let mut chosen: Vec<String> = Vec::new();
    let mut no_faults = false;
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = |name: &str| args.next().ok_or(format!("{name} needs a value"));
        match arg.as_str() {
            "-h" | "--help" => return Ok(None),
            "--seconds" => {
                a.seconds = value("--seconds")?
                    .parse()
                    .map_err(|_| "--seconds: a number")?
            }
            "--instances" => {
                a.instances = value("--instances")?
                    .parse()
                    .map_err(|_| "--instances: a number")?
            }
            "--mode" => mode = Some(value("--mode")?),
            "--cluster" => a.cluster = true,
            "--seed" => a.seed = value("--seed")?.parse().map_err(|_| "--seed: a number")?,
            "--fault" => chosen.push(value("--fault")?),
            "--no-faults" => no_faults = true,
            "--json" => a.json = true,
            "--source-faults" => a.source_faults = true,
            "--single-flight" => a.single_flight = true,
            other => return Err(format!("unknown argument `{other}`")),
        }
    }
    a.mode = mode.unwrap_or_else(|| "l1-deps".into());
    if !["l1-deps", "l1", "redis", "sync"].contains(&a.mode.as_str()) {
        return Err(format!("unknown mode `{}`", a.mode));
    }
    let faults: &[&str] = if a.cluster { &CLUSTER_FAULTS } else { &FAULTS };
    if let Some(bad) = chosen.iter().find(|f| !faults.contains(&f.as_str())) {
        return Err(format!("unknown fault `{bad}`"));
    }
    a.faults = faults.iter().map(|f| f.to_string()).collect();
    if !chosen.is_empty() {
        a.faults = chosen;
    }
    if no_faults {
        a.faults.clear();
    }
    if a.instances == 0 || a.seconds == 0 {
        return Err("--instances and --seconds must be positive".into());
    }
    Ok(Some(a))
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// What an instance process said.
enum Said {
    Progress(usize, [u64; 3]),
    Result(serde_json::Value),
}

struct Instance {
    child: Child,
    stdin: ChildStdin,
}

/// The instance program, `cache_instance`, next to this binary. `cargo run --bin soak`
/// builds only this binary: when the instance program is missing or older than this
/// one, it is built first, with the same profile. `CACHE_INSTANCE_PROGRAM` names it
/// instead (the test suite, which has built it).
fn instance_program() -> std::path::PathBuf {
    if let Some(exe) = std::env::var_os("CACHE_INSTANCE_PROGRAM") {
        return exe.into();
    }
    let me = std::env::current_exe().expect("this binary's path");
    let exe = me.with_file_name(format!("cache_instance{}", std::env::consts::EXE_SUFFIX));
    let modified = |p: &std::path::Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
    if modified(&exe).is_some() && modified(&exe) >= modified(&me) {
        return exe;
    }
    let profile = if cfg!(debug_assertions) {
        "dev"
    } else {
        "release"
    };
    eprintln!("building cache_instance ({profile} profile)");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let status = Command::new(cargo)
        .args([
            "build",
            "-p",
            "tests",
            "--bin",
            "cache_instance",
            "--profile",
            profile,
        ])
        .arg("--manifest-path")
        .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/../Cargo.toml"))
        .status();
    match status {
        Ok(s) if s.success() => exe,
        _ => panic!(
            "cannot build {} (build it: cargo build --release -p tests --bins)",
            exe.display()
        ),
    }
}

fn spawn(
    slot: usize,
    mode: &str,
    cache: &str,
    db: &RedisServer,
    tx: &mpsc::Sender<Said>,
    env: &[(&str, &str)],
) -> Instance {
    let exe = instance_program();
    let instance_mode = match mode {
        "l1-deps" => "deps",
        "l1" => "l1-plain",
        other => other,
    };
    let mut child = Command::new(&exe)
        .args([instance_mode, cache, &db.url()])
        .env("CACHE_INSTANCE_L1_ENTRIES", "100")
        .envs(env.iter().copied())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| {
            panic!(
                "cannot start {}: {e} (build it: cargo build --release -p tests --bins)",
                exe.display()
            )
        });
    let stdin = child.stdin.take().expect("stdin");
    let stdout = BufReader::new(child.stdout.take().expect("stdout"));
    let tx = tx.clone();
    std::thread::spawn(move || {
        for line in stdout.lines() {
            let Ok(line) = line else { break };
            if let Some(rest) = line.strip_prefix("progress ") {
                let mut n = [0u64; 3];
                for (i, kv) in rest.split(' ').enumerate().take(3) {
                    n[i] = kv
                        .split_once('=')
                        .and_then(|(_, v)| v.parse().ok())
                        .unwrap_or(0);
                }
                let _ = tx.send(Said::Progress(slot, n));
            } else if let Some(json) = line.strip_prefix("result ") {
                if let Ok(v) = serde_json::from_str(json) {
                    let _ = tx.send(Said::Result(v));
                }
            }
        }
    });
    Instance { child, stdin }
}

fn start_load(instance: &mut Instance, seconds: u64, seed: u64) {
    let _ = writeln!(instance.stdin, "soak {seconds} {seed}");
}

/// The cache's Redis: one server, or a cluster.
enum Cache {
    One(RedisServer),
    Cluster(RedisCluster),
}

impl Cache {
    fn url(&self) -> String {
        match self {
            Cache::One(s) => s.url(),
            Cache::Cluster(c) => c.url(),
        }
    }

    /// Sends a command to the server, or to every node of the cluster.
    fn command_all(&self, args: &[&str]) {
        match self {
            Cache::One(s) => {
                s.command(args);
            }
            Cache::Cluster(c) => {
                for n in c.nodes() {
                    n.command(args);
                }
            }
        }
    }

    /// The server, or a master of the cluster now.
    fn a_master(&self) -> &RedisServer {
        match self {
            Cache::One(s) => s,
            Cache::Cluster(c) => &c.nodes()[c.masters_now()[0]],
        }
    }
}

/// A fault period: what, from when to when (unix ms).
struct Period {
    fault: String,
    from: u64,
    to: u64,
}

fn pct(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

fn main() {
    let args = match parse() {
        Ok(Some(a)) => a,
        Ok(None) => {
            println!("{HELP}");
            return;
        }
        Err(e) => {
            eprintln!("soak: {e}\n\n{HELP}");
            std::process::exit(2);
        }
    };
    let rt = tokio::runtime::Runtime::new().expect("a runtime");
    let mut cache = if args.cluster {
        Cache::Cluster(RedisCluster::start(3, 1))
    } else {
        Cache::One(RedisServer::start())
    };
    let mut reshards: Vec<Child> = Vec::new();
    let db = RedisServer::start();
    let deps = args.mode == "l1-deps";
    let start_collector = |url: String| {
        rt.block_on(async move {
            cache_redis::DependencyCollector::builder(url)
                .key_prefix("inst")
                .start()
                .await
                .expect("collector")
        })
    };
    let mut collector = deps.then(|| start_collector(cache.url()));

    let mut env = Vec::new();
    if args.source_faults {
        env.push(("CACHE_INSTANCE_SOURCE_FAULTS", "1"));
    }
    if args.single_flight {
        env.push(("CACHE_INSTANCE_SINGLE_FLIGHT", "1"));
    }
    // the database's faults: every 10 s, it fails from 5 s to 7 s, stalls to 9 s
    let mut source_state = "";
    let (tx, rx) = mpsc::channel();
    let mut instances: Vec<Instance> = (0..args.instances)
        .map(|i| spawn(i, &args.mode, &cache.url(), &db, &tx, &env))
        .collect();
    // each instance says "ready" first; give them a moment to connect
    std::thread::sleep(Duration::from_millis(500));
    for (i, inst) in instances.iter_mut().enumerate() {
        start_load(inst, args.seconds, args.seed + i as u64);
    }
    let began = Instant::now();
    let total = Duration::from_secs(args.seconds);
    let step = total / (args.faults.len() as u32 + 1);
    let mut schedule: Vec<(Duration, String)> = args
        .faults
        .iter()
        .enumerate()
        .map(|(i, f)| (step * (i as u32 + 1), f.clone()))
        .collect();
    schedule.reverse();
    let mut periods: Vec<Period> = Vec::new();
    let mut progress: Vec<[u64; 3]> = vec![[0; 3]; args.instances];
    // progress of instance processes killed by a fault, whose results are lost
    let mut lost = [0u64; 3];
    let mut results: Vec<serde_json::Value> = Vec::new();
    let mut restart_recovery_ms: Option<u64> = None;
    let mut failover_ms: Option<u64> = None;
    let mut next_line = Instant::now() + Duration::from_secs(1);
    let mut waiting = args.instances;
    let mut undo: Vec<(Instant, String)> = Vec::new();
    while waiting > 0 {
        match rx.recv_timeout(Duration::from_millis(50)) {
            Ok(Said::Progress(i, n)) => progress[i] = n,
            Ok(Said::Result(v)) => {
                results.push(v);
                waiting -= 1;
            }
            Err(_) => {}
        }
        let now = Instant::now();
        if schedule.last().is_some_and(|(at, _)| now - began >= *at) {
            let (_, fault) = schedule.pop().expect("a fault");
            let from = now_ms();
            let mut duration = Duration::from_secs(2);
            match fault.as_str() {
                "redis-restart" => {
                    if let Cache::One(server) = &mut cache {
                        // clients connected before the restart, as the instances are
                        let probes = rt.block_on(Probes::connect(&server.url()));
                        server.stop();
                        std::thread::sleep(Duration::from_millis(300));
                        server.restart();
                        let t = Instant::now();
                        restart_recovery_ms = Some(rt.block_on(probes.recovery()));
                        duration = Duration::from_millis(300) + t.elapsed();
                    }
                }
                "master-kill" => {
                    if let Cache::Cluster(cluster) = &mut cache {
                        let t = Instant::now();
                        let victim = cluster.masters_now()[0];
                        cluster.node_mut(victim).stop();
                        // a replica takes over, then the old master comes back as
                        // a replica
                        while cluster.masters_now().len() < 3
                            && t.elapsed() < Duration::from_secs(20)
                        {
                            std::thread::sleep(Duration::from_millis(50));
                        }
                        failover_ms = Some(t.elapsed().as_millis() as u64);
                        cluster.node_mut(victim).restart();
                        duration = t.elapsed() + Duration::from_secs(2);
                    }
                }
                "takeover" => {
                    if let Cache::Cluster(cluster) = &cache {
                        let replica = cluster.replicas_now()[0];
                        cluster.nodes()[replica].command(&["CLUSTER", "FAILOVER", "TAKEOVER"]);
                        duration = Duration::from_secs(3);
                    }
                }
                "reshard" => {
                    if let Cache::Cluster(cluster) = &cache {
                        let masters = cluster.masters_now();
                        reshards.push(cluster.reshard(masters[0], masters[1], 1_000));
                        duration = Duration::from_secs(5);
                    }
                }
                "pause" => cache.a_master().pause(Duration::from_secs(2)),
                "kill-pubsub" => {
                    cache.command_all(&["CLIENT", "KILL", "TYPE", "pubsub"]);
                    duration = Duration::from_secs(1);
                }
                "evictions" => {
                    cache.command_all(&["CONFIG", "SET", "maxmemory", "3mb"]);
                    duration = Duration::from_secs(3);
                    undo.push((now + duration, "maxmemory".into()));
                }
                "instance-restart" => {
                    let victim = 0;
                    let _ = instances[victim].child.kill();
                    let _ = instances[victim].child.wait();
                    for (l, p) in lost.iter_mut().zip(progress[victim]) {
                        *l += p;
                    }
                    progress[victim] = [0; 3];
                    instances[victim] = spawn(victim, &args.mode, &cache.url(), &db, &tx, &env);
                    std::thread::sleep(Duration::from_millis(300));
                    let left = total.saturating_sub(began.elapsed()).as_secs().max(1);
                    start_load(&mut instances[victim], left, args.seed + 100);
                    duration = Duration::from_secs(1);
                }
                "collector-stop" => {
                    if let Some(c) = collector.take() {
                        rt.block_on(c.stop());
                        duration = Duration::from_secs(3);
                        undo.push((now + duration, "collector".into()));
                    }
                }
                _ => {}
            }
            periods.push(Period {
                fault,
                from,
                // the bounds are measured afterwards: a second more counts as inside
                to: from + duration.as_millis() as u64 + 1_000,
            });
        }
        if args.source_faults {
            let state = match began.elapsed().as_secs() % 10 {
                5 | 6 => "db:fail",
                7 | 8 => "db:stall",
                _ => "",
            };
            if state != source_state {
                if !source_state.is_empty() {
                    db.command(&["DEL", source_state]);
                }
                if !state.is_empty() {
                    db.command(&["SET", state, "1"]);
                    let name = if state == "db:fail" {
                        "source-fail"
                    } else {
                        "source-stall"
                    };
                    let from = now_ms();
                    periods.push(Period {
                        fault: name.into(),
                        from,
                        to: from + 3_000,
                    });
                }
                source_state = state;
            }
        }
        undo.retain(|(at, what)| {
            if now < *at {
                return true;
            }
            match what.as_str() {
                "maxmemory" => cache.command_all(&["CONFIG", "SET", "maxmemory", "0"]),
                _ => collector = deps.then(|| start_collector(cache.url())),
            }
            false
        });
        if now >= next_line {
            next_line += Duration::from_secs(1);
            let sum = progress.iter().fold(lost, |mut a, p| {
                for i in 0..3 {
                    a[i] += p[i];
                }
                a
            });
            eprintln!(
                "[{:>4}s] calls {} failed {} wrong {}",
                began.elapsed().as_secs(),
                sum[0],
                sum[1],
                sum[2]
            );
        }
        if began.elapsed() > total + Duration::from_secs(60) {
            eprintln!("soak: instances did not finish");
            break;
        }
    }
    if !source_state.is_empty() {
        db.command(&["DEL", source_state]);
    }
    // faults the load outlived: put the server back as it was
    for (_, what) in undo {
        if what == "maxmemory" {
            cache.command_all(&["CONFIG", "SET", "maxmemory", "0"]);
        }
    }
    if collector.is_none() && deps {
        collector = Some(start_collector(cache.url()));
    }
    for inst in &mut instances {
        let _ = writeln!(inst.stdin, "flush");
        let _ = writeln!(inst.stdin, "quit");
    }
    // every value expires (views live 5 s) and the collector hears of it; on a
    // cluster, their links are old enough to judge (10 s)
    std::thread::sleep(Duration::from_secs(if args.cluster { 12 } else { 7 }));
    let (repaired, orphans) = if deps {
        rt.block_on(async {
            let first = cache_redis::full_collection(&cache.url(), "inst").await;
            let second = cache_redis::full_collection(&cache.url(), "inst").await;
            (
                first.map(|r| r.removed()).unwrap_or(u64::MAX),
                // (links too recent to judge would be left: none, this long after)
                second.map(|r| r.removed() + r.recent).unwrap_or(u64::MAX),
            )
        })
    } else {
        (0, 0)
    };
    if let Some(c) = collector {
        rt.block_on(c.stop());
    }
    for mut inst in instances {
        let _ = inst.child.wait();
    }
    for mut r in reshards {
        let _ = r.wait();
    }

    // totals
    let get = |v: &serde_json::Value, k: &str| v[k].as_u64().unwrap_or(0);
    let sum = |k: &str| results.iter().map(|v| get(v, k)).sum::<u64>();
    let calls = sum("calls") + lost[0];
    let failed = sum("failed_calls") + lost[1];
    let wrong = sum("wrong_values") + lost[2];
    let inside = |t: u64| periods.iter().any(|p| t >= p.from && t <= p.to);
    let (mut stale_out, mut stale_in) = (Vec::new(), Vec::new());
    for v in &results {
        for s in v["stale"].as_array().into_iter().flatten() {
            let (t, age) = (s[0].as_u64().unwrap_or(0), s[1].as_u64().unwrap_or(0));
            if inside(t) {
                stale_in.push(age)
            } else {
                if std::env::var_os("SOAK_DEBUG").is_some() {
                    let since: Vec<String> = periods
                        .iter()
                        .map(|p| {
                            format!(
                                "{} {:.1} s before",
                                p.fault,
                                (t as f64 - p.from as f64) / 1000.0
                            )
                        })
                        .collect();
                    eprintln!("stale outside faults: {age} ms; {}", since.join(", "));
                }
                stale_out.push(age)
            }
        }
    }
    stale_out.sort_unstable();
    stale_in.sort_unstable();
    let lat50 = results
        .iter()
        .map(|v| get(v, "latency_p50_us"))
        .max()
        .unwrap_or(0);
    let lat99 = results
        .iter()
        .map(|v| get(v, "latency_p99_us"))
        .max()
        .unwrap_or(0);
    let l1_clears = sum("l1_clears");
    let (fallbacks, fallbacks_late) =
        (sum("fallbacks_served"), sum("fallbacks_after_invalidation"));
    let (source_calls, source_errors) = (sum("source_calls"), sum("source_errors"));
    let dropped = sum("writes_dropped");
    println!(
        "soak: {}mode {}, {} instances, {} s, faults: {}",
        if args.cluster {
            "Redis Cluster (3 masters, 3 replicas), "
        } else {
            ""
        },
        args.mode,
        args.instances,
        args.seconds,
        if periods.is_empty() {
            "none".to_owned()
        } else {
            let mut names: Vec<&str> = Vec::new();
            for p in &periods {
                if !names.contains(&p.fault.as_str()) {
                    names.push(&p.fault);
                }
            }
            names.join(", ")
        }
    );
    println!("  {:<44} {}", "calls", calls);
    println!("  {:<44} {}", "failed calls", failed);
    println!("  {:<44} {}", "wrong values (older than own commit)", wrong);
    for (name, stale) in [
        ("stale reads outside faults", &stale_out),
        ("stale reads inside faults", &stale_in),
    ] {
        println!(
            "  {:<44} {} reads: p50 {} ms, p99 {} ms, max {} ms",
            name,
            stale.len(),
            pct(stale, 0.5),
            pct(stale, 0.99),
            pct(stale, 1.0)
        );
    }
    println!(
        "  {:<44} {}",
        "L2 hits resumed after a restart (ms)",
        restart_recovery_ms.map_or("-".into(), |m| m.to_string())
    );
    if args.cluster {
        println!(
            "  {:<44} {}",
            "a replica master after a master kill (ms)",
            failover_ms.map_or("-".into(), |m| m.to_string())
        );
    }
    if args.source_faults {
        println!("  {:<44} {}", "fallbacks served", fallbacks);
        println!(
            "  {:<44} {}",
            "fallbacks served after their invalidation", fallbacks_late
        );
        println!("  {:<44} {}", "database reads (bodies run)", source_calls);
        println!(
            "  {:<44} {}",
            "database errors returned (no fallback)", source_errors
        );
    }
    println!("  {:<44} {}", "L1 clears", l1_clears);
    println!("  {:<44} {}", "writes dropped", dropped);
    println!(
        "  {:<44} {} (the collector missed {}, repaired by a full collection)",
        "orphan graph keys after a full collection", orphans, repaired
    );
    println!(
        "  {:<44} p50 {} µs, p99 {} µs (the slowest instance)",
        "call latency", lat50, lat99
    );
    if args.json {
        let json = serde_json::json!({
            "calls": calls,
            "failed_calls": failed,
            "wrong_values": wrong,
            "stale_reads": stale_out.len() + stale_in.len(),
            "stale_p50_ms": pct(&stale_out, 0.5),
            "stale_p99_ms": pct(&stale_out, 0.99),
            "stale_max_ms": pct(&stale_out, 1.0),
            "stale_fault_p99_ms": pct(&stale_in, 0.99),
            "stale_fault_max_ms": pct(&stale_in, 1.0),
            "restart_recovery_ms": restart_recovery_ms,
            "failover_ms": failover_ms,
            "l1_clears": l1_clears,
            "writes_dropped": dropped,
            "orphan_keys": orphans,
            "orphans_repaired": repaired,
            "latency_p50_us": lat50,
            "latency_p99_us": lat99,
            "fallbacks_served": fallbacks,
            "fallbacks_after_invalidation": fallbacks_late,
            "source_calls": source_calls,
            "source_errors": source_errors,
        });
        println!("{json}");
    }
}

#[cache_runtime::cached(name = "soak.probe")]
async fn probe(n: u64) -> u64 {
    n
}

/// Two services on the cache Redis, one writing and one reading, connected before a
/// restart.
struct Probes {
    writer: cache_runtime::CachingService,
    reader: cache_runtime::CachingService,
}

impl Probes {
    async fn connect(url: &str) -> Probes {
        let service = || async {
            cache_runtime::CachingService::builder()
                .backend(
                    cache_redis::RedisBackend::builder(url)
                        .key_prefix("soak-probe")
                        .build()
                        .await
                        .expect("probe"),
                )
                .build()
                .expect("probe service")
        };
        let probes = Probes {
            writer: service().await,
            reader: service().await,
        };
        probes.writer.scope(probe(0)).await;
        probes.reader.scope(probe(0)).await;
        probes
    }

    /// Milliseconds from now until a value the writer writes to the restarted Redis
    /// is read back from it by the reader (an L2 hit).
    async fn recovery(self) -> u64 {
        let start = Instant::now();
        let hits = self.reader.stats().total.l2_hits;
        for n in 1.. {
            self.writer.scope(probe(n)).await;
            self.writer.shutdown().await;
            self.reader.scope(probe(n)).await;
            if self.reader.stats().total.l2_hits > hits || start.elapsed() > Duration::from_secs(30)
            {
                break;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        start.elapsed().as_millis() as u64
    }
}
