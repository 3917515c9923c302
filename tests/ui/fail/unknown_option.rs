use cache_runtime::cached;

#[cached(expire = "10m", ttl = "1x")]
async fn f(id: u64) -> u64 { id }

#[cached(skip)]
async fn g(id: u64) -> u64 { id }

fn main() {}
