use cache_runtime::cached;

#[cached(skip(db))]
async fn f(id: u64, dbase: &str) -> u64 { id + dbase.len() as u64 }

fn main() {}
