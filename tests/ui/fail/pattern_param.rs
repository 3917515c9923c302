use cache_runtime::cached;

#[cached]
async fn f((a, b): (u64, u64)) -> u64 { a + b }

fn main() {}
