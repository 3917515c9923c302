//! A small product catalog: cached reads, invalidation when data changes, the
//! imperative forms, and dependencies between cached values. Each line printed says
//! which calls ran their body.
//!
//! Run: `cargo run -p examples --example catalog`

use std::collections::BTreeMap;
use std::sync::Mutex;

use cache_runtime::{add_dependency, cached, invalidate_cache, invalidate_dependency};
use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Product {
    pub id: u64,
    pub name: String,
    pub category: String,
    pub price_cents: u64,
}

/// The "database".
static PRODUCTS: Mutex<BTreeMap<u64, Product>> = Mutex::new(BTreeMap::new());

fn ran(what: &str) {
    println!("    ran {what}");
}

/// A product carries its price: it depends on `prices` too.
#[cached]
pub async fn get_product(id: u64) -> Option<Product> {
    ran(&format!("get_product({id})"));
    add_dependency("prices");
    PRODUCTS.lock().ok()?.get(&id).cloned()
}

#[cached]
pub async fn products_in(category: &str) -> Vec<u64> {
    ran(&format!("products_in({category:?})"));
    let products = PRODUCTS.lock().map(|p| p.clone()).unwrap_or_default();
    products
        .values()
        .filter(|p| p.category == category)
        .map(|p| p.id)
        .collect()
}

/// A page built from other cached functions: it depends on their entries, and through
/// them on `prices`.
#[cached]
pub async fn category_page(category: &str) -> String {
    ran(&format!("category_page({category:?})"));
    let mut lines = Vec::new();
    for id in products_in(category).await {
        if let Some(p) = get_product(id).await {
            lines.push(format!(
                "{} ({}.{:02})",
                p.name,
                p.price_cents / 100,
                p.price_cents % 100
            ));
        }
    }
    lines.join(", ")
}

/// By name: `get_product`'s `id` is this function's `id`.
#[invalidate_cache(get_product)]
pub async fn rename_product(id: u64, name: String) -> Result<(), String> {
    let mut products = PRODUCTS.lock().map_err(|e| e.to_string())?;
    let product = products.get_mut(&id).ok_or("no such product")?;
    product.name = name;
    Ok(())
}

/// Explicit arguments: the product and both category lists.
#[invalidate_cache(get_product(id), products_in(&to), products_in(&from))]
pub async fn move_product(id: u64, from: String, to: String) -> Result<(), String> {
    let mut products = PRODUCTS.lock().map_err(|e| e.to_string())?;
    let product = products.get_mut(&id).ok_or("no such product")?;
    product.category = to;
    Ok(())
}

/// A dependency, for a change that touches many entries.
#[invalidate_cache(dependency = "prices")]
pub async fn apply_discount(percent: u64) {
    if let Ok(mut products) = PRODUCTS.lock() {
        for p in products.values_mut() {
            p.price_cents = p.price_cents * (100 - percent) / 100;
        }
    }
}

fn seed() {
    let mut products = PRODUCTS.lock().expect("not poisoned");
    for (id, name, category, price_cents) in [
        (1, "Kettle", "kitchen", 2999),
        (2, "Teapot", "kitchen", 1999),
        (3, "Rake", "garden", 1499),
    ] {
        products.insert(
            id,
            Product {
                id,
                name: name.into(),
                category: category.into(),
                price_cents,
            },
        );
    }
}

async fn show(step: &str) {
    println!("{step}");
    println!("  kitchen: {}", category_page("kitchen").await);
}

#[tokio::main]
async fn main() -> Result<(), String> {
    seed();

    show("first visit: everything runs").await;
    show("second visit: nothing runs").await;

    rename_product(1, "Electric kettle".into()).await?;
    show("after renaming product 1: get_product(1) and the page that used it run").await;

    move_product(3, "garden".into(), "kitchen".into()).await?;
    show("after moving product 3 to the kitchen: both lists, product 3 and the page").await;

    apply_discount(10).await;
    show("after a discount (dependency \"prices\"): the products and the page that read them")
        .await;

    println!("imperative forms");
    cache_runtime::invalidate!(get_product(2)).await;
    println!(
        "  peek!(get_product(2)) after invalidate!: {:?}",
        cache_runtime::peek!(get_product(2))
            .await
            .map(|p| p.map(|p| p.name))
    );
    let fresh = cache_runtime::refresh!(get_product(2)).await;
    println!("  refresh!(get_product(2)) -> {:?}", fresh.map(|p| p.name));
    invalidate_dependency("prices").await;
    show("after invalidate_dependency(\"prices\")").await;

    let stats = cache_runtime::stats();
    for (name, s) in &stats.functions {
        println!(
            "{name}: {} hits, {} misses, {} runs, {} invalidated",
            s.hits, s.misses, s.executions, s.invalidations
        );
    }
    Ok(())
}
