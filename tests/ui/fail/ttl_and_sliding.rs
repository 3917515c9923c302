use cache_runtime::cached;

#[cached(ttl = "10m", sliding = "2m")]
async fn f(id: u64) -> u64 { id }

fn main() {}
