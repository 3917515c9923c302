use cache_runtime::cached;

#[cached(ttl = "10 minutes")]
async fn f(id: u64) -> u64 { id }

#[cached(sliding = "5")]
async fn g(id: u64) -> u64 { id }

fn main() {}
