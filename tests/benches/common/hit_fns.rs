//! The functions whose hits `benches/hit.rs` and `benches/hit_ratio.rs` time: each
//! takes `(u64, &str)` and returns a ~100-byte `Product` (two integers, two short
//! strings).

use tests::{product, Product};

#[cache_runtime::cached]
pub async fn ours(id: u64, region: &str) -> Product {
    let _ = region;
    product(id)
}

#[cache_runtime::cached]
pub fn ours_plain(id: u64, region: &str) -> Product {
    let _ = region;
    product(id)
}

#[cached::proc_macro::cached(key = "(u64, String)", convert = r#"{ (id, region.to_owned()) }"#)]
pub async fn theirs(id: u64, region: &str) -> Product {
    let _ = region;
    product(id)
}
