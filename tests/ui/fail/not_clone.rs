use cache_runtime::cached;

pub struct Conn;

#[cached(local)]
async fn open(id: u64) -> Conn { let _ = id; Conn }

fn main() {}
