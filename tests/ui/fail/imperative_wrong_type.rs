use cache_runtime::cached;

#[cached]
pub async fn get_product(id: u64) -> String { id.to_string() }

async fn use_it() {
    cache_runtime::invalidate!(get_product("42")).await;
}

fn main() { let _ = use_it; }
