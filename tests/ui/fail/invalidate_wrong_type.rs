use cache_runtime::{cached, invalidate_cache};

#[cached]
pub async fn get_product(id: u64) -> String { id.to_string() }

#[invalidate_cache(get_product)]
pub async fn rename_product(id: String) -> Result<(), String> { let _ = id; Ok(()) }

fn main() {}
