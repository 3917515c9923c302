//! The shop (`examples/examples/shop.rs`) as its users run it: instances as OS
//! processes on one database and one private Redis, driven over HTTP by a real client.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tests::redis_server::RedisServer;

/// The example's program, which `cargo test` builds with the package's tests.
fn shop_program() -> PathBuf {
    let exe = std::env::current_exe().expect("the test's path");
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("target/<profile>/deps");
    let program = profile_dir
        .join("examples")
        .join(format!("shop{}", std::env::consts::EXE_SUFFIX));
    let built = |p: &Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
    let source = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/shop.rs");
    // `cargo test --workspace` builds it; `cargo test --test shop` alone does not
    match (built(&program), built(&source)) {
        (Some(program_time), Some(source_time)) if program_time >= source_time => {}
        _ => panic!(
            "{} is missing or older than its source: build it with \
             `cargo build -p examples --example shop`",
            program.display()
        ),
    }
    program
}

/// One instance of the shop, stopped when dropped.
struct Shop {
    child: Child,
    url: String,
}

impl Shop {
    fn start(dir: &Path, database: &str, redis: Option<&str>) -> Shop {
        let mut cmd = Command::new(shop_program());
        cmd.current_dir(dir)
            .env("LISTEN", "127.0.0.1:0")
            .env("DATABASE_URL", database)
            .env("RUST_LOG", "warn")
            .env_remove("REDIS_URL")
            .env_remove("SHOP_CACHE")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        if let Some(url) = redis {
            cmd.env("REDIS_URL", url);
        }
        let mut child = cmd.spawn().expect("start the shop");
        let stdout = child.stdout.take().expect("its output");
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if let Some(url) = line.strip_prefix("listening on ") {
                    let _ = tx.send(url.to_owned());
                }
            }
        });
        let url = rx
            .recv_timeout(Duration::from_secs(60))
            .expect("the shop printed the address it listens on");
        Shop { child, url }
    }
}

impl Drop for Shop {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A temporary folder for the SQLite file, removed at the end.
struct TempDir(PathBuf);

impl TempDir {
    fn new(name: &str) -> TempDir {
        let dir = std::env::temp_dir().join(format!("cache-rs-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("a temporary folder");
        TempDir(dir)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

async fn get(client: &reqwest::Client, url: &str) -> (u16, Value) {
    let r = client.get(url).send().await.expect("the shop answers");
    let status = r.status().as_u16();
    let body = r.bytes().await.expect("a body");
    (status, serde_json::from_slice(&body).unwrap_or(Value::Null))
}

async fn put(client: &reqwest::Client, url: &str, body: &str) -> (u16, Value) {
    let r = client
        .put(url)
        .body(body.to_owned())
        .send()
        .await
        .expect("the shop answers");
    let status = r.status().as_u16();
    let body = r.bytes().await.expect("a body");
    (status, serde_json::from_slice(&body).unwrap_or(Value::Null))
}

/// How long until `url` on `shop` shows `name`, polling; `None` after 5 s.
async fn until_seen(client: &reqwest::Client, url: &str, name: &str) -> Option<Duration> {
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(5) {
        let (_, body) = get(client, url).await;
        if body["name"] == name {
            return Some(start.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    None
}

/// Two instances on one database and one Redis: what one changes, the other shows.
async fn two_instances(database: &str, dir: &Path) {
    let mut redis = RedisServer::start();
    let (a, b) = (
        Shop::start(dir, database, Some(&redis.url())),
        Shop::start(dir, database, Some(&redis.url())),
    );
    let client = reqwest::Client::new();

    // the sample rows, read through both
    for shop in [&a, &b] {
        let (status, p) = get(&client, &format!("{}/products/7", shop.url)).await;
        assert_eq!(status, 200);
        assert_eq!(p["category"], "c7");
    }

    // a PUT on one instance: the writer never reads the old value; the other shows
    // the new one within the bus latency (rounds alternate the writer)
    let rounds = 200;
    let (mut writer_stale, mut other_stale, mut worst) = (0, 0, Duration::ZERO);
    // from the PUT's answer to the other instance's answer to the GET that followed
    let mut seen_after = Vec::new();
    for round in 0..rounds {
        let (w, o) = if round % 2 == 0 { (&a, &b) } else { (&b, &a) };
        let id = 1 + round % 20;
        // both instances hold the product in their L1 before the write
        get(&client, &format!("{}/products/{id}", w.url)).await;
        get(&client, &format!("{}/products/{id}", o.url)).await;
        let name = format!("round {round}");
        let body = json!({ "name": name, "price_cents": round }).to_string();
        let (status, written) = put(&client, &format!("{}/products/{id}", w.url), &body).await;
        assert_eq!(status, 200, "{written}");
        let (_, mine) = get(&client, &format!("{}/products/{id}", w.url)).await;
        if mine["name"] != name.as_str() {
            writer_stale += 1;
        }
        let put_answered = Instant::now();
        let (_, theirs) = get(&client, &format!("{}/products/{id}", o.url)).await;
        seen_after.push(put_answered.elapsed());
        if theirs["name"] != name.as_str() {
            other_stale += 1;
            let took = until_seen(&client, &format!("{}/products/{id}", o.url), &name)
                .await
                .expect("the other instance shows the change within 5 s");
            worst = worst.max(took);
        }
    }
    seen_after.sort_unstable();
    println!(
        "{rounds} PUTs: the writer read the old value {writer_stale} times; the other \
         instance's first GET after the PUT was old {other_stale} times (its answer came \
         {:?} after the PUT's, median; {:?} at most), the new value showed at most \
         {worst:?} later",
        seen_after[seen_after.len() / 2],
        seen_after[seen_after.len() - 1],
    );
    assert_eq!(
        writer_stale, 0,
        "the instance that wrote read the old value"
    );
    assert!(worst < Duration::from_secs(1), "{worst:?}");

    // a category list depends on its products: a PUT on one instance changes the
    // list on the other
    let list = format!("{}/categories/c3/products", b.url);
    let (status, before) = get(&client, &list).await;
    assert_eq!(status, 200);
    let ids: Vec<u64> = before
        .as_array()
        .expect("a list")
        .iter()
        .map(|p| p["id"].as_u64().unwrap())
        .collect();
    assert_eq!(ids.len(), 100);
    assert!(ids.windows(2).all(|w| w[0] < w[1]), "sorted by id");
    let (status, _) = put(
        &client,
        &format!("{}/products/33", a.url),
        r#"{"name":"listed","price_cents":1}"#,
    )
    .await;
    assert_eq!(status, 200);
    let start = Instant::now();
    loop {
        let (_, after) = get(&client, &list).await;
        let p = after
            .as_array()
            .and_then(|l| l.iter().find(|p| p["id"] == 33).cloned());
        if p.is_some_and(|p| p["name"] == "listed") {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "the list on the other instance still shows the old product 33"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    println!(
        "a category list on the other instance changed {:?} after the PUT",
        start.elapsed()
    );

    // bad ids and bad bodies
    for shop in [&a, &b] {
        let u = &shop.url;
        assert_eq!(get(&client, &format!("{u}/products/0")).await.0, 404);
        assert_eq!(get(&client, &format!("{u}/products/5000")).await.0, 404);
        assert_eq!(get(&client, &format!("{u}/products/abc")).await.0, 400);
        assert_eq!(get(&client, &format!("{u}/products/-1")).await.0, 400);
        let ok = r#"{"name":"x","price_cents":1}"#;
        assert_eq!(put(&client, &format!("{u}/products/5000"), ok).await.0, 404);
        for bad in [
            "",
            "{",
            "[]",
            r#"{"name":"x"}"#,
            r#"{"name":1,"price_cents":1}"#,
            r#"{"name":"x","price_cents":-1}"#,
            r#"{"name":"x","price_cents":"1"}"#,
            r#"{"name":"x","price_cents":1,"extra":true}"#,
            r#"{"name":"x","price_cents":18446744073709551615}"#,
        ] {
            let (status, error) = put(&client, &format!("{u}/products/1"), bad).await;
            assert_eq!(status, 400, "{bad}");
            assert!(error["error"].is_string(), "{bad}: {error}");
        }
    }

    // the database fails (its table is gone): a 503 with a JSON error, and the cache
    // still answers what it holds; the service is back with the table
    sqlx::any::install_default_drivers();
    let failing = sqlx::AnyPool::connect(database)
        .await
        .expect("the database");
    let rename = |from: &str, to: &str| format!("ALTER TABLE {from} RENAME TO {to}");
    sqlx::query(&rename("products", "products_away"))
        .execute(&failing)
        .await
        .expect("rename the table");
    for shop in [&a, &b] {
        let (status, error) = get(&client, &format!("{}/products/999", shop.url)).await;
        assert_eq!(status, 503, "{error}");
        assert!(error["error"].is_string(), "{error}");
        let body = r#"{"name":"x","price_cents":1}"#;
        let (status, error) = put(&client, &format!("{}/products/998", shop.url), body).await;
        assert_eq!(status, 503, "{error}");
        let (status, _) = get(&client, &format!("{}/products/7", shop.url)).await;
        assert_eq!(
            status, 200,
            "a cached product is served while the database fails"
        );
    }
    sqlx::query(&rename("products_away", "products"))
        .execute(&failing)
        .await
        .expect("rename the table back");
    failing.close().await;
    assert_eq!(
        get(&client, &format!("{}/products/999", a.url)).await.0,
        200
    );

    // the cache's metrics, by function, in Prometheus's format
    let metrics = client
        .get(format!("{}/metrics", a.url))
        .send()
        .await
        .expect("the shop answers")
        .text()
        .await
        .expect("a body");
    for line in [
        r#"cache_hits_total{function="shop.product",tier="l1"} "#,
        r#"cache_misses_total{function="shop.product"} "#,
        r#"cache_executions_total{function="shop.product"} "#,
        r#"cache_body_duration_seconds{function="shop.product",quantile="0.99"} "#,
        r#"cache_sync_messages_total{direction="received"} "#,
    ] {
        assert!(metrics.contains(line), "{line} in\n{metrics}");
    }

    // Redis stopped mid-run: every request still answers, with the database's value
    redis.stop();
    // an instance notices the lost subscription within about a second, and then
    // bypasses its L1 until it has resubscribed
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (mut answered, mut wrong) = (0, 0);
    for round in 0..50u64 {
        let (w, o) = if round % 2 == 0 { (&a, &b) } else { (&b, &a) };
        let id = 100 + round % 5;
        let name = format!("down {round}");
        let body = json!({ "name": name, "price_cents": round }).to_string();
        let (status, _) = put(&client, &format!("{}/products/{id}", w.url), &body).await;
        assert_eq!(status, 200);
        for shop in [w, o] {
            let (status, p) = get(&client, &format!("{}/products/{id}", shop.url)).await;
            assert_eq!(status, 200);
            answered += 1;
            if p["name"] != name.as_str() {
                wrong += 1;
            }
        }
    }
    println!("Redis down: {answered} GETs answered, {wrong} with an old value");
    assert_eq!(wrong, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_instances_on_sqlite() {
    let dir = TempDir::new("shop-sqlite");
    // both start at once on an empty file: the rows are created once
    let url = format!("sqlite://{}?mode=rwc", dir.0.join("shop.db").display());
    two_instances(&url, &dir.0).await;
}

/// The same on the PostgreSQL this machine runs (127.0.0.1:5432, trust), in a
/// database of the test's own; skipped, with the reason printed, when it does not
/// answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_instances_on_postgres() {
    let base = std::env::var("SHOP_TEST_POSTGRES")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432".into());
    let name = format!("shop_test_{}", std::process::id());
    let admin = |sql: String| {
        Command::new("psql")
            .args([&format!("{base}/postgres"), "-q", "-c", &sql])
            .output()
    };
    match admin(format!("CREATE DATABASE {name}")) {
        Ok(out) if out.status.success() => {}
        Ok(out) => {
            println!(
                "skipped: PostgreSQL at {base} did not create a database: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
            return;
        }
        Err(e) => {
            println!("skipped: psql cannot run ({e}); install postgresql-client to run it");
            return;
        }
    }
    let dir = TempDir::new("shop-postgres");
    two_instances(&format!("{base}/{name}"), &dir.0).await;
    let _ = admin(format!("DROP DATABASE {name} WITH (FORCE)"));
}

/// The port the late Redis of `starts_while_redis_is_down` listens on.
static LATE_PORT: std::sync::atomic::AtomicU16 = std::sync::atomic::AtomicU16::new(0);

fn late_port() -> u16 {
    LATE_PORT.load(std::sync::atomic::Ordering::Relaxed)
}

/// Redis down when the instances start: they answer from the database, and form one
/// cache on Redis once it answers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn starts_while_redis_is_down() {
    let dir = TempDir::new("shop-late-redis");
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port();
    LATE_PORT.store(port, std::sync::atomic::Ordering::Relaxed);
    let url = format!("redis://127.0.0.1:{port}");
    let database = format!("sqlite://{}?mode=rwc", dir.0.join("shop.db").display());
    let a = Shop::start(&dir.0, &database, Some(&url));
    let b = Shop::start(&dir.0, &database, Some(&url));
    let client = reqwest::Client::new();

    // no Redis: every request answered, from the database
    for round in 0..10u64 {
        let name = format!("no redis {round}");
        let body = json!({ "name": name, "price_cents": round }).to_string();
        let (status, _) = put(&client, &format!("{}/products/5", a.url), &body).await;
        assert_eq!(status, 200);
        for shop in [&a, &b] {
            let (status, p) = get(&client, &format!("{}/products/5", shop.url)).await;
            assert_eq!((status, p["name"].as_str()), (200, Some(name.as_str())));
        }
    }

    // Redis comes: the instances store what they read in it (a value read while
    // Redis was unreachable may stay in the L1 only: fresh ids each round)
    let redis = RedisServer::start_on(&[], late_port);
    let stored = || {
        redis
            .command(&[
                "EVAL",
                "return #redis.call('KEYS', 'shop:*product:v1*')",
                "0",
            ])
            .and_then(|n| n.trim_start_matches(':').parse::<u64>().ok())
            .unwrap_or(0)
    };
    let start = Instant::now();
    let mut next = 100;
    loop {
        let before = stored();
        for id in next..next + 20 {
            get(&client, &format!("{}/products/{id}", a.url)).await;
        }
        next += 20;
        // the writes are queued: give them a moment
        tokio::time::sleep(Duration::from_millis(200)).await;
        if stored() >= before + 20 {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(20),
            "the shop did not use Redis once it answered"
        );
    }
    println!("Redis started: entries in it {:?} later", start.elapsed());

    // and they are one cache: what one changes, the other shows
    let (mut writer_stale, mut seen_late) = (0, 0);
    for round in 0..50u64 {
        let (w, o) = if round % 2 == 0 { (&a, &b) } else { (&b, &a) };
        get(&client, &format!("{}/products/6", o.url)).await;
        let name = format!("with redis {round}");
        let body = json!({ "name": name, "price_cents": round }).to_string();
        assert_eq!(
            put(&client, &format!("{}/products/6", w.url), &body)
                .await
                .0,
            200
        );
        if get(&client, &format!("{}/products/6", w.url)).await.1["name"] != name.as_str() {
            writer_stale += 1;
        }
        if get(&client, &format!("{}/products/6", o.url)).await.1["name"] != name.as_str() {
            seen_late += 1;
            until_seen(&client, &format!("{}/products/6", o.url), &name)
                .await
                .expect("the other instance shows the change within 5 s");
        }
    }
    println!("after Redis came: 50 PUTs, the other instance's GET old {seen_late} times");
    assert_eq!(writer_stale, 0);
}
