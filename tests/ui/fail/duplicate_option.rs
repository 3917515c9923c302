use cache_runtime::cached;

#[cached(ttl = "1m", ttl = "2m")]
async fn f(id: u64) -> u64 { id }

fn main() {}
