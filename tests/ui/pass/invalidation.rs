use cache_runtime::{add_dependency, cached, invalidate_cache, CacheKey};

pub mod catalog {
    use cache_runtime::cached;

    #[cached]
    pub async fn get_product(id: u64) -> String { id.to_string() }

    #[cached]
    pub async fn products_in(category: &str, page: u32) -> Vec<u64> { vec![u64::from(page); category.len()] }

    #[cached]
    pub fn setting(name: &str) -> usize { name.len() }
}

use catalog::get_product;

#[invalidate_cache(get_product)]
pub async fn by_name(id: u64, unrelated: String) -> Result<(), String> { let _ = unrelated; Ok(()) }

#[invalidate_cache(crate::catalog::get_product, catalog::products_in(&category, 1), dependency = format!("category:{category}"))]
pub async fn many(id: u64, category: String) { let _ = (id, category); }

#[invalidate_cache(catalog::setting)]
pub fn plain(name: &str) -> bool { !name.is_empty() }

#[derive(CacheKey)]
pub struct Repo { pub shard: u8 }

impl Repo {
    #[cached]
    pub async fn get_by_id(&self, id: u64) -> Result<String, String> {
        add_dependency(format!("repo:{}", self.shard));
        Ok(id.to_string())
    }

    #[invalidate_cache(Self::get_by_id(self, id), self.get_by_id(id + 1))]
    pub async fn update(&self, id: u64) -> Result<(), String> { let _ = id; Ok(()) }
}

pub async fn imperative(repo: &Repo) {
    cache_runtime::invalidate!(get_product(1)).await;
    cache_runtime::invalidate!(catalog::products_in("a", 2)).await;
    cache_runtime::invalidate!(repo.get_by_id(3)).await;
    cache_runtime::invalidate!(Repo::get_by_id(repo, 3)).await;
    let _: String = cache_runtime::refresh!(get_product(1)).await;
    let _: Result<String, String> = cache_runtime::refresh!(repo.get_by_id(4)).await;
    let _: usize = cache_runtime::refresh!(catalog::setting("x"));
    let _: Option<String> = cache_runtime::peek!(get_product(1)).await;
    let _: Option<Result<String, String>> = cache_runtime::peek!(repo.get_by_id(5)).await;
    cache_runtime::invalidate_dependency("repo:1").await;
}

fn main() {
    let _ = (by_name, many, plain, imperative);
}
