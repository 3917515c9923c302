use cache_runtime::invalidate_cache;

#[invalidate_cache()]
pub async fn rename_product(id: u64) -> Result<(), String> { let _ = id; Ok(()) }

fn main() {}
