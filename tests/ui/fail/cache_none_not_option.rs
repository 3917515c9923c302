use cache_runtime::cached;

#[cached(cache_none = false)]
async fn f(id: u64) -> u64 { id }

fn main() {}
