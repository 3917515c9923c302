use cache_runtime::cached;

#[cached(name = "my key(1)", version = -1, profile = "")]
async fn f(id: u64) -> u64 { id }

fn main() {}
