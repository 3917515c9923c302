use cache_runtime::invalidate_cache;

pub async fn get_product(id: u64) -> String { id.to_string() }

#[invalidate_cache(get_product(id))]
pub async fn rename_product(id: u64) -> Result<(), String> { let _ = id; Ok(()) }

fn main() {}
