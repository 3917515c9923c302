use cache_runtime::cached;

#[cached]
fn items(n: u64) -> impl Iterator<Item = u64> { 0..n }

fn main() {}
