use cache_runtime::cached;

#[cached]
async fn f(id: u64) { let _ = id; }

#[cached]
fn g(id: u64) -> () { let _ = id; }

fn main() {}
