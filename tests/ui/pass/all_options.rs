use cache_runtime::{cached, CacheKey};
use serde::{Deserialize, Serialize};

#[derive(Clone, Serialize, Deserialize)]
pub struct Product { pub id: u64, pub name: String }

pub struct Db;

#[derive(Clone, CacheKey)]
pub struct Page { pub number: u32 }

#[cached(profile = "catalog", ttl = "1h30m", skip(db), name = "catalog.products_in", version = 2)]
pub async fn products_in(category: &str, page: Page, db: &Db) -> Vec<Product> {
    let _ = (category, page.number, db);
    Vec::new()
}

#[cached(sliding = "250ms", cache_none = false)]
pub async fn find(id: u64) -> Option<Product> {
    Some(Product { id, name: String::new() })
}

#[cached(ttl = "1m", fail_safe = "1h", fail_safe_throttle = "30s", soft_timeout = "100ms", eager_refresh = 0.8)]
pub async fn resilient(id: u64) -> Result<Product, String> {
    Ok(Product { id, name: String::new() })
}

#[derive(Clone)]
pub struct NotSerde(pub std::sync::Arc<String>);

#[cached(local)]
pub async fn local_only(id: u64) -> NotSerde {
    NotSerde(std::sync::Arc::new(id.to_string()))
}

#[cached]
pub fn plain(id: u64, tags: &[String]) -> Result<u64, std::io::Error> {
    Ok(id + tags.len() as u64)
}

#[cached]
pub async fn generic<T: CacheKey + Clone + Send + Sync + Serialize + serde::de::DeserializeOwned + 'static>(value: T) -> T {
    value
}

#[cached]
pub async fn with_impl_trait(value: impl CacheKey + Send) -> u64 {
    let _ = value;
    1
}

#[derive(CacheKey)]
pub struct Repo { pub shard: u8 }

impl Repo {
    #[cached]
    pub async fn get(&self, id: u64) -> Result<Product, String> {
        Ok(Product { id, name: self.shard.to_string() })
    }

    #[cached(skip(self, log))]
    pub async fn log_and_get(&self, id: u64, log: &mut Vec<u64>) -> u64 {
        log.push(id);
        id
    }

    // Without `self`, `Self` in the signature tells `#[cached]` it is in an `impl`.
    #[cached]
    pub fn associated(id: u64) -> u64
    where
        Self: Sized,
    {
        id
    }
}

fn main() {
    let _ = (products_in, find, local_only, plain, generic::<u64>, Repo::associated);
}
