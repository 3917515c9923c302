use cache_runtime::cached;

#[cached]
struct Product { id: u64 }

fn main() {}
