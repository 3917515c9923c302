use cache_runtime::cached;

#[cached]
#[cached(ttl = "1m")]
async fn f(id: u64) -> u64 { id }

fn main() {}
