use cache_runtime::{cached, invalidate_cache, CacheKey};

#[derive(CacheKey)]
pub struct Repo;

impl Repo {
    #[cached]
    pub async fn get_by_id(&self, id: u64) -> String { id.to_string() }

    #[invalidate_cache(Self::get_by_id)]
    pub async fn update(&self, id: u64) -> Result<(), String> { let _ = id; Ok(()) }
}

fn main() {}
