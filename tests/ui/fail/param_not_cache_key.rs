use cache_runtime::cached;

pub struct Filter { pub min: u64 }

#[cached]
async fn f(id: u64, filter: Filter) -> u64 { id + filter.min }

fn main() {}
