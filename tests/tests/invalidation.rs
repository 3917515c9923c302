//! `#[invalidate_cache]` and the imperative forms, counting body runs.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use cache_runtime::{cached, invalidate_cache, CacheKey, CachingService};
use tests::Runs;

fn service() -> CachingService {
    CachingService::builder().build().unwrap()
}

/// A tiny database: product id → (name, category).
static DB: Mutex<Option<HashMap<u64, (String, String)>>> = Mutex::new(None);

fn db_get(id: u64) -> Option<(String, String)> {
    DB.lock()
        .unwrap()
        .get_or_insert_with(HashMap::new)
        .get(&id)
        .cloned()
}
fn db_put(id: u64, name: &str, category: &str) {
    DB.lock()
        .unwrap()
        .get_or_insert_with(HashMap::new)
        .insert(id, (name.into(), category.into()));
}

pub mod catalog {
    use super::*;

    pub static GET: Runs = Runs::new();
    pub static LIST: Runs = Runs::new();

    #[cached]
    pub async fn get_product(id: u64) -> Option<String> {
        GET.hit();
        super::db_get(id).map(|(name, _)| name)
    }

    #[cached]
    pub async fn products_in(category: &str) -> Vec<u64> {
        LIST.hit();
        let db = super::DB.lock().unwrap();
        let mut ids: Vec<u64> = db
            .iter()
            .flatten()
            .filter(|(_, (_, c))| c == category)
            .map(|(id, _)| *id)
            .collect();
        ids.sort();
        ids
    }
}

use catalog::get_product;

/// Serializes the tests that count runs of the catalog functions.
static SHARED: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

/// By name: `get_product`'s `id` is this function's `id`.
#[invalidate_cache(get_product)]
async fn rename_product(id: u64, name: String) -> Result<(), String> {
    if name.is_empty() {
        return Err("empty name".into());
    }
    let category = db_get(id).map(|(_, c)| c).unwrap_or_default();
    db_put(id, &name, &category);
    Ok(())
}

/// Explicit arguments, two targets, one through a module path.
#[invalidate_cache(get_product(id), crate::catalog::products_in(&category), catalog::products_in(&old))]
async fn move_product(id: u64, category: String, old: String) -> Result<(), String> {
    let name = db_get(id).map(|(n, _)| n).unwrap_or_default();
    db_put(id, &name, &category);
    Ok(())
}

#[invalidate_cache(get_product)]
async fn rename_then_panic(id: u64, name: String) -> Result<(), String> {
    db_put(id, &name, "");
    panic!("failed after writing");
}

#[tokio::test]
async fn by_name_after_ok_and_before_the_caller_continues() {
    let _serial = SHARED.lock().await;
    let svc = service();
    svc.scope(async {
        db_put(1, "kettle", "kitchen");
        let before = catalog::GET.get();
        assert_eq!(get_product(1).await.as_deref(), Some("kettle"));
        assert_eq!(get_product(1).await.as_deref(), Some("kettle"));
        assert_eq!(catalog::GET.get() - before, 1);

        rename_product(1, "teapot".into()).await.unwrap();
        // the entry is gone as soon as the call returns
        assert_eq!(get_product(1).await.as_deref(), Some("teapot"));
        assert_eq!(catalog::GET.get() - before, 2);

        // after Err: no invalidation
        assert!(rename_product(1, String::new()).await.is_err());
        get_product(1).await;
        assert_eq!(catalog::GET.get() - before, 2);
    })
    .await;
    assert_eq!(
        svc.stats()
            .function("invalidation::catalog::get_product")
            .invalidations,
        1
    );
}

#[tokio::test]
async fn no_invalidation_after_a_panic() {
    let _serial = SHARED.lock().await;
    let svc = service();
    let before = catalog::GET.get();
    svc.scope(async {
        db_put(2, "cup", "kitchen");
        get_product(2).await;
    })
    .await;
    let r = tokio::spawn(svc.scope(rename_then_panic(2, "mug".into()))).await;
    assert!(r.unwrap_err().is_panic());
    svc.scope(async {
        assert_eq!(
            get_product(2).await.as_deref(),
            Some("cup"),
            "still the cached value"
        );
    })
    .await;
    assert_eq!(catalog::GET.get() - before, 1);
}

#[tokio::test]
async fn explicit_arguments_and_several_targets() {
    let _serial = SHARED.lock().await;
    let svc = service();
    svc.scope(async {
        db_put(10, "pan", "cookware");
        db_put(11, "rake", "tools");
        assert_eq!(catalog::products_in("cookware").await, vec![10]);
        assert_eq!(catalog::products_in("tools").await, vec![11]);
        let list_runs = catalog::LIST.get();
        move_product(10, "tools".into(), "cookware".into())
            .await
            .unwrap();
        assert_eq!(catalog::products_in("tools").await, vec![10, 11]);
        assert_eq!(catalog::products_in("cookware").await, Vec::<u64>::new());
        assert_eq!(
            catalog::LIST.get() - list_runs,
            2,
            "both lists were invalidated"
        );
    })
    .await;
}

#[tokio::test]
async fn dependency_targets() {
    static RUNS: Runs = Runs::new();
    #[cached]
    async fn order_total(order_id: u64) -> u64 {
        RUNS.hit();
        cache_runtime::add_dependency(format!("order:{order_id}"));
        order_id * 10
    }
    #[invalidate_cache(dependency = format!("order:{id}"))]
    async fn cancel_order(id: u64) -> Result<(), String> {
        let _ = id;
        Ok(())
    }
    service()
        .scope(async {
            order_total(7).await;
            order_total(8).await;
            cancel_order(7).await.unwrap();
            order_total(7).await;
            order_total(8).await;
            assert_eq!(RUNS.get(), 3, "only order 7 ran again");
        })
        .await;
}

#[derive(Clone, CacheKey)]
pub struct Repo {
    pub shard: u8,
}

pub static REPO_GET: Runs = Runs::new();
pub static REPO_NAMES: Mutex<Vec<String>> = Mutex::new(Vec::new());

impl Repo {
    #[cached]
    pub async fn get_by_id(&self, id: u64) -> String {
        REPO_GET.hit();
        format!("{}/{id}/{}", self.shard, REPO_NAMES.lock().unwrap().len())
    }

    #[invalidate_cache(Self::get_by_id(self, id))]
    pub async fn update(&self, id: u64) -> Result<(), String> {
        REPO_NAMES.lock().unwrap().push(format!("{id}"));
        Ok(())
    }

    #[invalidate_cache(self.get_by_id(id))]
    pub fn update_blocking(&self, id: u64) {
        REPO_NAMES.lock().unwrap().push(format!("{id}"));
    }
}

#[tokio::test]
async fn methods_and_imperative_method_forms() {
    let svc = service();
    svc.scope(async {
        let repo = Repo { shard: 3 };
        let start = REPO_GET.get();
        let a = repo.get_by_id(1).await;
        assert_eq!(repo.get_by_id(1).await, a);
        repo.update(1).await.unwrap();
        let b = repo.get_by_id(1).await;
        assert_ne!(a, b);
        repo.update_blocking(1);
        let c = repo.get_by_id(1).await;
        assert_ne!(b, c);
        assert_eq!(REPO_GET.get() - start, 3);

        cache_runtime::invalidate!(repo.get_by_id(1)).await;
        repo.get_by_id(1).await;
        cache_runtime::invalidate!(Repo::get_by_id(&repo, 1)).await;
        repo.get_by_id(1).await;
        assert_eq!(REPO_GET.get() - start, 5);

        assert!(cache_runtime::peek!(repo.get_by_id(1)).await.is_some());
        assert!(cache_runtime::peek!(repo.get_by_id(2)).await.is_none());
        let refreshed = cache_runtime::refresh!(repo.get_by_id(2)).await;
        assert_eq!(
            cache_runtime::peek!(repo.get_by_id(2)).await,
            Some(refreshed)
        );
        assert_eq!(
            REPO_GET.get() - start,
            6,
            "peek never runs the body; refresh does"
        );
    })
    .await;
}

#[tokio::test]
async fn imperative_forms_on_functions() {
    static RUNS: Runs = Runs::new();
    static VALUE: Mutex<u64> = Mutex::new(1);
    #[cached]
    async fn current(key: &str) -> u64 {
        RUNS.hit();
        *VALUE.lock().unwrap() + key.len() as u64
    }
    let svc = service();
    svc.scope(async {
        assert_eq!(cache_runtime::peek!(current("k")).await, None);
        assert_eq!(RUNS.get(), 0, "peek never runs the body");
        assert_eq!(current("k").await, 2);
        assert_eq!(cache_runtime::peek!(current("k")).await, Some(2));
        *VALUE.lock().unwrap() = 5;
        assert_eq!(current("k").await, 2, "still cached");
        assert_eq!(cache_runtime::refresh!(current("k")).await, 6);
        assert_eq!(current("k").await, 6, "refresh stored the new value");
        assert_eq!(RUNS.get(), 2);
        *VALUE.lock().unwrap() = 9;
        cache_runtime::invalidate!(current("k")).await;
        assert_eq!(current("k").await, 10);
        assert_eq!(RUNS.get(), 3);
    })
    .await;
}

#[test]
fn plain_functions_invalidate_too() {
    static RUNS: Runs = Runs::new();
    static VALUE: Mutex<u64> = Mutex::new(1);
    #[cached]
    fn setting(name: &str) -> u64 {
        RUNS.hit();
        *VALUE.lock().unwrap() + name.len() as u64
    }
    #[invalidate_cache(setting)]
    fn set(name: &str, value: u64) {
        *VALUE.lock().unwrap() = value;
    }
    let svc = service();
    svc.scope_sync(|| {
        assert_eq!(setting("a"), 2);
        set("a", 10);
        assert_eq!(setting("a"), 11);
        assert_eq!(RUNS.get(), 2);
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_computation_that_straddles_an_invalidation_is_not_served() {
    static RUNS: Runs = Runs::new();
    static STOCK: Mutex<u64> = Mutex::new(5);
    #[cached]
    async fn stock(id: u64) -> u64 {
        RUNS.hit();
        let value = *STOCK.lock().unwrap();
        // a slow query: the value it read is already old when it returns
        tokio::time::sleep(Duration::from_millis(200)).await;
        value + id
    }
    #[invalidate_cache(stock)]
    async fn set_stock(id: u64, value: u64) {
        let _ = id;
        *STOCK.lock().unwrap() = value;
    }
    let svc = service();
    let slow = tokio::spawn(svc.scope(stock(0)));
    tokio::time::sleep(Duration::from_millis(50)).await;
    svc.scope(set_stock(0, 9)).await;
    // the instance that changed the data never reads the old value afterwards
    assert_eq!(
        svc.scope(stock(0)).await,
        9,
        "not joined to the old computation"
    );
    assert_eq!(
        slow.await.unwrap(),
        5,
        "the old caller gets what it computed"
    );
    assert_eq!(svc.scope(stock(0)).await, 9, "and it was not stored");
    assert_eq!(RUNS.get(), 2);
}

#[tokio::test]
async fn clear_and_invalidation_stats() {
    static RUNS: Runs = Runs::new();
    #[cached]
    async fn item(id: u64) -> u64 {
        RUNS.hit();
        id
    }
    let svc = service();
    svc.scope(async {
        for i in 0..5 {
            item(i).await;
        }
        cache_runtime::invalidate!(item(1)).await;
        cache_runtime::invalidate!(item(1)).await; // already gone: nothing counted
        CachingService::clear().await;
        for i in 0..5 {
            item(i).await;
        }
    })
    .await;
    assert_eq!(RUNS.get(), 10);
    assert_eq!(svc.stats().function("invalidation::item").invalidations, 1);
}
