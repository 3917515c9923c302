use cache_runtime::cached;

#[cached]
async fn f(id: u64, log: &mut Vec<u64>) -> u64 { log.push(id); id }

fn main() {}
