use cache_runtime::{cached, invalidate_cache};

#[cached]
pub async fn get_product(id: u64, region: &str) -> String { format!("{id}{region}") }

#[invalidate_cache(get_product)]
pub async fn rename_product(id: u64, name: String) -> Result<(), String> { let _ = (id, name); Ok(()) }

fn main() {}
