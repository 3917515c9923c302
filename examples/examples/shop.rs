//! The shop: a web service over a SQL database, with the cache in front of it.
//!
//! Run: `cargo run -p examples --example shop`, then for example
//! `curl localhost:8080/products/7`. Settings, from the environment:
//!
//! - `DATABASE_URL`: `sqlite://shop.db?mode=rwc` by default (a file in the current
//!   folder, created), or `postgres://user@host/db`;
//! - `REDIS_URL`: unset, the cache is in memory in this process; set, it is Redis with
//!   an in-process tier in front, dependencies in Redis and a dependency collector,
//!   shared with every instance on the same Redis (with Redis down at start, the shop
//!   starts anyway and reads the database until Redis answers);
//! - `LISTEN`: the address to listen on, `127.0.0.1:8080` by default (`:0` picks a
//!   free port; the address is printed: `listening on http://...`);
//! - `SHOP_CACHE=off`: the `shop` profile is disabled: every request reads the
//!   database (to compare);
//! - `RUST_LOG`: what to log (`info` by default); `RUST_LOG=info,cache_runtime=debug`
//!   also shows every hit, and each miss as a span `cache_miss` (function, key, the
//!   tier that served it, whether it waited for another caller) closed with its time,
//!   the database's spans inside it.
//!
//! `GET /metrics` serves the cache's counters by function in Prometheus's format.
//!
//! `cargo run --release -p examples --example shop -- --load [seconds]` measures the
//! service instead: it starts two instances of itself on one database, one with the
//! cache and one with `SHOP_CACHE=off`, drives both with the same keep-alive clients
//! (`examples::load`), alternating, and prints requests per second and latencies.
//!
//! The handlers are an application's: the cache is in `#[cached]` and
//! `#[invalidate_cache]` on the functions that read and write the database.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use cache_redis::{DependencyCollector, RedisBackend, RedisBackendError};
use cache_runtime::{cached, invalidate_cache, CachingService, MemoryBackend, Profile};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use serde::{Deserialize, Serialize};
use sqlx::any::AnyPoolOptions;
use sqlx::{AnyPool, Row};

#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Product {
    pub id: u64,
    pub name: String,
    pub category: String,
    pub price_cents: u64,
}

/// The body of `PUT /products/{id}`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProductUpdate {
    pub name: String,
    pub price_cents: u64,
}

/// A database failure, answered with 503.
#[derive(Debug)]
pub struct DbError(String);

impl From<sqlx::Error> for DbError {
    fn from(e: sqlx::Error) -> Self {
        DbError(e.to_string())
    }
}

/// The connection pool.
#[derive(Clone)]
pub struct Db(AnyPool);

const PRODUCTS: u64 = 1000;

impl Db {
    async fn connect(url: &str) -> Result<Db, sqlx::Error> {
        sqlx::any::install_default_drivers();
        let pool = AnyPoolOptions::new()
            .max_connections(16)
            .acquire_timeout(Duration::from_secs(5))
            .connect(url)
            .await?;
        Ok(Db(pool))
    }

    /// Creates the table and the sample products if they are missing. Instances that
    /// start together insert the same rows; the database keeps one of each.
    async fn prepare(&self) -> Result<(), sqlx::Error> {
        sqlx::query(
            "CREATE TABLE IF NOT EXISTS products (
                id BIGINT PRIMARY KEY,
                name TEXT NOT NULL,
                category TEXT NOT NULL,
                price_cents BIGINT NOT NULL)",
        )
        .execute(&self.0)
        .await?;
        let count: i64 = sqlx::query("SELECT COUNT(*) FROM products")
            .fetch_one(&self.0)
            .await?
            .try_get(0)?;
        if count > 0 {
            return Ok(());
        }
        let mut tx = self.0.begin().await?;
        for id in 1..=PRODUCTS as i64 {
            sqlx::query(
                "INSERT INTO products (id, name, category, price_cents) VALUES ($1, $2, $3, $4)
                 ON CONFLICT (id) DO NOTHING",
            )
            .bind(id)
            .bind(format!("Product {id}"))
            .bind(format!("c{}", id % 10))
            .bind(100 * id)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await
    }
}

fn product_of(row: &sqlx::any::AnyRow) -> Result<Product, sqlx::Error> {
    let int = |i: usize| -> Result<u64, sqlx::Error> {
        let v: i64 = row.try_get(i)?;
        u64::try_from(v).map_err(|e| sqlx::Error::Decode(Box::new(e)))
    };
    Ok(Product {
        id: int(0)?,
        name: row.try_get(1)?,
        category: row.try_get(2)?,
        price_cents: int(3)?,
    })
}

/// A product, or `None` for an unknown id (cached too: a miss costs a query).
#[cached(name = "shop.product", profile = "shop", skip(db))]
pub async fn get_product(id: u64, db: &Db) -> Result<Option<Product>, DbError> {
    let row = sqlx::query("SELECT id, name, category, price_cents FROM products WHERE id = $1")
        .bind(id as i64)
        .fetch_optional(&db.0)
        .await?;
    Ok(row.as_ref().map(product_of).transpose()?)
}

/// The products of a category, by id. Each one is read through `get_product`, so the
/// list depends on each of them: changing one invalidates the list, in every instance.
#[cached(name = "shop.category", profile = "shop", skip(db))]
pub async fn category_products(name: &str, db: &Db) -> Result<Vec<Product>, DbError> {
    let ids = sqlx::query("SELECT id FROM products WHERE category = $1 ORDER BY id")
        .bind(name)
        .fetch_all(&db.0)
        .await?;
    let mut products = Vec::with_capacity(ids.len());
    for row in ids {
        let id: i64 = row.try_get(0).map_err(DbError::from)?;
        if let Some(p) = get_product(id as u64, db).await? {
            products.push(p);
        }
    }
    Ok(products)
}

/// Writes a product's name and price; `get_product(id)` is invalidated once the
/// write succeeded (and with it every category list that holds the product).
#[invalidate_cache(get_product)]
pub async fn update_product(
    id: u64,
    update: &ProductUpdate,
    db: &Db,
) -> Result<Option<Product>, DbError> {
    let row = sqlx::query(
        "UPDATE products SET name = $1, price_cents = $2 WHERE id = $3
         RETURNING id, name, category, price_cents",
    )
    .bind(&update.name)
    .bind(i64::try_from(update.price_cents).map_err(|_| DbError("price out of range".into()))?)
    .bind(id as i64)
    .fetch_optional(&db.0)
    .await?;
    Ok(row.as_ref().map(product_of).transpose()?)
}

/// An error answered as JSON: `{"error": "..."}`.
struct ApiError(StatusCode, String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, Json(serde_json::json!({ "error": self.1 }))).into_response()
    }
}

impl From<DbError> for ApiError {
    fn from(e: DbError) -> Self {
        tracing::warn!("database: {}", e.0);
        ApiError(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("the database failed: {}", e.0),
        )
    }
}

fn parse_id(id: &str) -> Result<u64, ApiError> {
    match id.parse::<u64>() {
        Ok(id) if i64::try_from(id).is_ok() => Ok(id),
        _ => Err(ApiError(
            StatusCode::BAD_REQUEST,
            format!("`{id}` is not a product id (a positive integer)"),
        )),
    }
}

fn not_found(id: u64) -> ApiError {
    ApiError(StatusCode::NOT_FOUND, format!("no product {id}"))
}

async fn show_product(
    State(db): State<Db>,
    Path(id): Path<String>,
) -> Result<Json<Product>, ApiError> {
    let id = parse_id(&id)?;
    get_product(id, &db)
        .await?
        .map(Json)
        .ok_or_else(|| not_found(id))
}

async fn change_product(
    State(db): State<Db>,
    Path(id): Path<String>,
    body: Bytes,
) -> Result<Json<Product>, ApiError> {
    let id = parse_id(&id)?;
    let bad = |why: String| {
        ApiError(
            StatusCode::BAD_REQUEST,
            format!("expected {{\"name\": string, \"price_cents\": integer}}: {why}"),
        )
    };
    let update: ProductUpdate = serde_json::from_slice(&body).map_err(|e| bad(e.to_string()))?;
    // the column is a signed 64-bit integer
    if i64::try_from(update.price_cents).is_err() {
        return Err(bad(format!(
            "price_cents {} is too large",
            update.price_cents
        )));
    }
    update_product(id, &update, &db)
        .await?
        .map(Json)
        .ok_or_else(|| not_found(id))
}

async fn list_category(
    State(db): State<Db>,
    Path(name): Path<String>,
) -> Result<Json<Vec<Product>>, ApiError> {
    Ok(Json(category_products(&name, &db).await?))
}

fn app(db: Db, metrics: PrometheusHandle) -> Router {
    Router::new()
        .route("/products/{id}", get(show_product).put(change_product))
        .route("/categories/{name}/products", get(list_category))
        // the cache's counters and the bodies' durations, by function (feature
        // `metrics` of cache-runtime), in Prometheus's text format
        .route("/metrics", get(move || async move { metrics.render() }))
        .route("/healthz", get(|| async { "ok" }))
        .with_state(db)
}

/// The dependency collector: started with the service, or, while Redis does not
/// answer, by a task that tries again until it does.
type Collector = Arc<Mutex<Option<DependencyCollector>>>;

/// The cache: in memory, or Redis with an in-process tier when `REDIS_URL` is set
/// (then also a dependency collector, to be stopped at the end). With Redis down at
/// start, the service starts anyway: calls read the database until Redis answers.
async fn install_cache() -> Result<Collector, Box<dyn std::error::Error>> {
    let enabled = std::env::var("SHOP_CACHE").map_or(true, |v| v != "off");
    let profile = Profile::new("shop")
        .ttl(Duration::from_secs(600))
        .enabled(enabled);
    let builder = CachingService::builder().profile(profile);
    let collector = Collector::default();
    let Ok(url) = std::env::var("REDIS_URL") else {
        builder
            .backend(MemoryBackend::new().max_entries(100_000))
            .install()?;
        return Ok(collector);
    };
    let backend = RedisBackend::builder(&url)
        .key_prefix("shop")
        .l1(MemoryBackend::new().max_entries(100_000))
        .dependencies(true)
        .connect_lazily(true)
        .build()
        .await?;
    builder.backend(backend).install()?;
    let start = move || {
        DependencyCollector::builder(&url)
            .key_prefix("shop")
            .start()
    };
    match start().await {
        Ok(c) => *lock(&collector) = Some(c),
        Err(RedisBackendError::Connect { addr, source }) => {
            tracing::warn!("Redis at {addr} does not answer ({source}): the shop reads the database until it does");
            let slot = collector.clone();
            tokio::spawn(async move {
                let mut delay = Duration::from_millis(250);
                loop {
                    tokio::time::sleep(delay).await;
                    match start().await {
                        Ok(c) => {
                            tracing::info!("Redis answers: the dependency collector runs");
                            *lock(&slot) = Some(c);
                            return;
                        }
                        Err(e) => tracing::debug!("the dependency collector cannot start yet: {e}"),
                    }
                    delay = (delay * 2).min(Duration::from_secs(5));
                }
            });
        }
        // a server without the settings the collector needs: said at start
        Err(e) => return Err(e.into()),
    }
    Ok(collector)
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

async fn stop_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("a SIGTERM handler");
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}

/// An instance of this program started by `--load`, stopped when dropped.
struct Instance(std::process::Child, String);

impl Instance {
    fn start(database: &str, cache: &str) -> Result<Instance, Box<dyn std::error::Error>> {
        use std::io::BufRead;
        let mut child = std::process::Command::new(std::env::current_exe()?)
            .env("LISTEN", "127.0.0.1:0")
            .env("DATABASE_URL", database)
            .env("SHOP_CACHE", cache)
            .env("RUST_LOG", "warn")
            .stdout(std::process::Stdio::piped())
            .spawn()?;
        let out = child.stdout.take().ok_or("no output")?;
        let mut lines = std::io::BufReader::new(out).lines();
        let url = loop {
            match lines.next() {
                Some(line) => match line?.strip_prefix("listening on ") {
                    Some(url) => break url.to_owned(),
                    None => continue,
                },
                None => return Err("the instance stopped before it listened".into()),
            }
        };
        Ok(Instance(child, url))
    }
}

impl Drop for Instance {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `--load [seconds]`: the service with and without its cache, same run.
async fn load(seconds: u64) -> Result<(), Box<dyn std::error::Error>> {
    const CLIENTS: usize = 32;
    const ROUNDS: usize = 4;
    let dir = std::env::temp_dir().join(format!("shop-load-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let database = std::env::var("DATABASE_URL")
        .unwrap_or_else(|_| format!("sqlite://{}?mode=rwc", dir.join("shop.db").display()));
    // one after the other: the first creates the rows
    let cached = Instance::start(&database, "on")?;
    let uncached = Instance::start(&database, "off")?;
    let cache = match std::env::var("REDIS_URL") {
        Ok(url) => format!("Redis at {url} with an in-process tier"),
        Err(_) => "in memory".to_owned(),
    };
    println!(
        "{CLIENTS} keep-alive clients reading GET /products/{{1..{PRODUCTS}}}, {ROUNDS} \
         alternating rounds of {seconds} s each side; database {database}; cache {cache}"
    );
    // the cache filled, the database warm
    let warm = Duration::from_secs(1);
    for i in [&cached, &uncached] {
        examples::load::drive(&i.1, CLIENTS, PRODUCTS, warm).await;
    }
    let mut runs: [Vec<examples::load::Figures>; 2] = [Vec::new(), Vec::new()];
    for round in 0..ROUNDS {
        for side in [round % 2, 1 - round % 2] {
            let url = if side == 0 { &cached.1 } else { &uncached.1 };
            let f =
                examples::load::drive(url, CLIENTS, PRODUCTS, Duration::from_secs(seconds)).await;
            runs[side].push(f);
        }
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let mut summary = Vec::new();
    for (name, side) in [("cache on", &runs[0]), ("SHOP_CACHE=off", &runs[1])] {
        let mut rps: Vec<f64> = side.iter().map(|f| f.per_second()).collect();
        let mut p50: Vec<f64> = side
            .iter()
            .map(|f| f.percentile(0.5).as_secs_f64())
            .collect();
        let mut p99: Vec<f64> = side
            .iter()
            .map(|f| f.percentile(0.99).as_secs_f64())
            .collect();
        let failed: u64 = side.iter().map(|f| f.failed).sum();
        let (rps, p50, p99) = (median(&mut rps), median(&mut p50), median(&mut p99));
        println!(
            "{name:>15}: {rps:>8.0} requests/s, p50 {:.2} ms, p99 {:.2} ms, {failed} failed",
            p50 * 1e3,
            p99 * 1e3
        );
        summary.push((rps, p99));
    }
    println!(
        "with the cache: {:.2}x the requests per second, p99 {:.2}x (medians of {ROUNDS} rounds)",
        summary[0].0 / summary[1].0,
        summary[0].1 / summary[1].1
    );
    drop((cached, uncached));
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    if let Some(at) = args.iter().position(|a| a == "--load") {
        let seconds = match args.get(at + 1) {
            Some(s) => s
                .parse()
                .map_err(|_| format!("--load {s}: a number of seconds"))?,
            None => 5,
        };
        return load(seconds).await;
    }
    tracing_subscriber::fmt()
        .with_env_filter(std::env::var("RUST_LOG").unwrap_or_else(|_| "info,sqlx=warn".into()))
        .with_span_events(tracing_subscriber::fmt::format::FmtSpan::CLOSE)
        .init();
    let database =
        std::env::var("DATABASE_URL").unwrap_or_else(|_| "sqlite://shop.db?mode=rwc".into());
    let listen: SocketAddr = std::env::var("LISTEN")
        .unwrap_or_else(|_| "127.0.0.1:8080".into())
        .parse()
        .map_err(|e| format!("LISTEN: {e}"))?;

    // before the first cached call: a function's metrics are registered with it
    let metrics = PrometheusBuilder::new().install_recorder()?;
    let db = Db::connect(&database)
        .await
        .map_err(|e| format!("cannot open the database {database}: {e}"))?;
    // instances that start together on an empty PostgreSQL can collide creating the
    // table (it reports a duplicate type): the one that lost tries again
    let mut tries = 0;
    while let Err(e) = db.prepare().await {
        tries += 1;
        if tries == 5 {
            return Err(format!("cannot create the sample products: {e}").into());
        }
        tokio::time::sleep(Duration::from_millis(200 * tries)).await;
    }
    let collector = install_cache().await?;

    let listener = tokio::net::TcpListener::bind(listen).await?;
    println!("listening on http://{}", listener.local_addr()?);
    axum::serve(listener, app(db, metrics))
        .with_graceful_shutdown(stop_signal())
        .await?;

    let running = lock(&collector).take();
    if let Some(collector) = running {
        collector.stop().await;
    }
    cache_runtime::shutdown().await;
    Ok(())
}
