use cache_runtime::cached;

#[cached]
fn name(id: &str) -> &str { id }

fn main() {}
