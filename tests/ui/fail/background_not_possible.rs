use cache_runtime::cached;

#[cached(ttl = "1m", fail_safe = "1h", soft_timeout = "100ms")]
async fn borrows(name: &str) -> Result<u64, String> { Ok(name.len() as u64) }

#[cached(ttl = "1m", eager_refresh = 0.8)]
fn blocking(id: u64) -> Result<u64, String> { Ok(id) }

#[cached(ttl = "1m", eager_refresh = 0.8)]
async fn generic<T: cache_runtime::CacheKey + Send + 'static>(id: T) -> Result<u64, String> { let _ = id; Ok(1) }

fn main() {}
