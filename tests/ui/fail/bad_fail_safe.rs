use cache_runtime::cached;

#[cached(ttl = "1m", fail_safe = "x")]
async fn bad_duration(id: u64) -> Result<u64, String> { Ok(id) }

#[cached(ttl = "1m", fail_safe = "1h", eager_refresh = 1.5)]
async fn out_of_range(id: u64) -> Result<u64, String> { Ok(id) }

#[cached(ttl = "1m", eager_refresh = "0.8")]
async fn not_a_number(id: u64) -> Result<u64, String> { Ok(id) }

#[cached(sliding = "1m", fail_safe = "1h", eager_refresh = 0.5)]
async fn with_sliding(id: u64) -> Result<u64, String> { Ok(id) }

#[cached(ttl = "1m", fail_safe = "1h", soft_timeout = "0s")]
async fn zero(id: u64) -> Result<u64, String> { Ok(id) }

#[cached(ttl = "1m", fail_safe = "1h", fail_safe_throttle)]
async fn missing(id: u64) -> Result<u64, String> { Ok(id) }

fn main() {}
