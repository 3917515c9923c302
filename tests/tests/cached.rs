//! `#[cached]` over the in-memory tier: what runs, what is stored, for how long.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use cache_runtime::{cached, CacheKey, CachingService, MemoryBackend, Profile};
use serde::{Deserialize, Serialize};
use tests::Runs;

fn service() -> CachingService {
    CachingService::builder().build().unwrap()
}

fn fn_name(f: &str) -> String {
    format!("{}::{f}", module_path!())
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Product {
    pub id: u64,
    pub name: String,
}

static GET_PRODUCT: Runs = Runs::new();

#[cached]
async fn get_product(id: u64, name: &str) -> Product {
    GET_PRODUCT.hit();
    Product {
        id,
        name: name.to_owned(),
    }
}

#[tokio::test]
async fn second_call_is_a_hit() {
    let svc = service();
    svc.scope(async {
        let a = get_product(1, "one").await;
        let b = get_product(1, "one").await;
        assert_eq!(a, b);
        let c = get_product(2, "one").await;
        assert_eq!(c.id, 2);
        get_product(1, "other").await;
    })
    .await;
    let s = svc.stats().function(&fn_name("get_product"));
    assert_eq!((s.hits, s.misses, s.executions, s.l1_hits), (1, 3, 3, 1));
    assert_eq!(svc.stats().total.hits, 1);
    // the counter is shared by every test using get_product; this service saw 3 runs
    assert!(GET_PRODUCT.get() >= 3);
}

#[tokio::test]
async fn services_do_not_share_entries() {
    static RUNS: Runs = Runs::new();
    #[cached]
    async fn square(x: u64) -> u64 {
        RUNS.hit();
        x * x
    }
    let (a, b) = (service(), service());
    a.scope(square(3)).await;
    a.scope(square(3)).await;
    b.scope(square(3)).await;
    assert_eq!(RUNS.get(), 2, "once per service");
    assert_eq!(a.stats().total.hits, 1);
    assert_eq!(b.stats().total.hits, 0);
}

#[tokio::test]
async fn pinned_keys() {
    #[cached]
    async fn search(term: &str, page: u32, tags: Vec<String>, exact: Option<bool>) -> usize {
        term.len() + page as usize + tags.len() + usize::from(exact.unwrap_or(false))
    }
    #[cached(name = "catalog.product", version = 3, skip(trace_id))]
    async fn named(id: u64, trace_id: u64) -> u64 {
        id + trace_id
    }
    let svc = service();
    svc.scope(async {
        search("say \"hi\", ok", 2, vec!["a,b".into()], None).await;
        named(7, 99).await;
    })
    .await;
    let mut keys = svc.local_keys();
    keys.sort();
    assert_eq!(
        keys,
        vec![
            format!(
                r#"{}::search:v1("say \"hi\", ok",2,["a,b"],None)"#,
                module_path!()
            ),
            "catalog.product:v3(7,*)".to_owned(),
        ]
    );
}

#[derive(Clone, CacheKey)]
pub struct Repo {
    pub shard: u8,
}

static REPO_GET: Runs = Runs::new();
static REPO_COUNT: Runs = Runs::new();

impl Repo {
    #[cached]
    pub async fn get(&self, id: u64) -> String {
        REPO_GET.hit();
        format!("{}:{id}", self.shard)
    }

    #[cached(skip(self))]
    pub fn count(&self, table: &str) -> usize {
        REPO_COUNT.hit();
        table.len() + usize::from(self.shard)
    }
}

#[tokio::test]
async fn methods_key_on_self_unless_skipped() {
    let svc = service();
    svc.scope(async {
        let (r1, r2) = (Repo { shard: 1 }, Repo { shard: 2 });
        assert_eq!(r1.get(5).await, "1:5");
        assert_eq!(r1.get(5).await, "1:5");
        assert_eq!(r2.get(5).await, "2:5", "self is part of the key");
        assert_eq!(REPO_GET.get(), 2);
    })
    .await;
    svc.scope_sync(|| {
        let (r1, r2) = (Repo { shard: 1 }, Repo { shard: 2 });
        assert_eq!(r1.count("abc"), 4);
        assert_eq!(r2.count("abc"), 4, "skip(self): the first result is served");
        assert_eq!(REPO_COUNT.get(), 1);
    });
    let mut keys = svc.local_keys();
    keys.sort();
    assert_eq!(
        keys,
        vec![
            format!(r#"{}::Repo::count:v1(*,"abc")"#, module_path!()),
            format!("{}::Repo::get:v1(Repo{{shard:1}},5)", module_path!()),
            format!("{}::Repo::get:v1(Repo{{shard:2}},5)", module_path!()),
        ]
    );
    assert_eq!(svc.stats().function(&fn_name("Repo::get")).hits, 1);
}

pub trait Catalog {
    fn price(&self, id: u64) -> impl std::future::Future<Output = u64> + Send;
}

pub struct PgCatalog;
static PRICE: Runs = Runs::new();

impl Catalog for PgCatalog {
    #[cached(skip(self))]
    async fn price(&self, id: u64) -> u64 {
        PRICE.hit();
        id * 100
    }
}

#[tokio::test]
async fn trait_impl_methods() {
    let svc = service();
    svc.scope(async {
        let c = PgCatalog;
        assert_eq!(c.price(3).await, 300);
        assert_eq!(c.price(3).await, 300);
        // the future is Send: it can be spawned
        let h = tokio::spawn(CachingService::current().scope(async { PgCatalog.price(4).await }));
        assert_eq!(h.await.unwrap(), 400);
    })
    .await;
    assert_eq!(PRICE.get(), 2);
}

static PARSE: Runs = Runs::new();

#[cached]
fn parse<T: std::str::FromStr + Clone + Send + Sync + 'static>(text: &str) -> Option<T> {
    PARSE.hit();
    text.parse().ok()
}

#[test]
fn generic_functions_key_on_type_arguments() {
    let svc = service();
    svc.scope_sync(|| {
        assert_eq!(parse::<u8>("7"), Some(7u8));
        assert_eq!(
            parse::<u64>("7"),
            Some(7u64),
            "another type is another entry"
        );
        assert_eq!(parse::<u8>("7"), Some(7u8));
        assert_eq!(parse::<u8>("x"), None);
        assert_eq!(parse::<u8>("x"), None, "None is cached by default");
    });
    assert_eq!(PARSE.get(), 3);
    assert!(svc
        .local_keys()
        .contains(&format!(r#"{}::parse::<u8>:v1("7")"#, module_path!())));
}

#[tokio::test]
async fn results_cache_only_ok() {
    static RUNS: Runs = Runs::new();
    #[cached]
    async fn fetch(id: u64) -> Result<u64, String> {
        RUNS.hit();
        if id == 0 {
            return Err("no such id".into());
        }
        let doubled: u64 = id.checked_mul(2).ok_or("overflow")?;
        Ok(doubled)
    }
    service()
        .scope(async {
            assert_eq!(fetch(0).await, Err("no such id".to_owned()));
            assert_eq!(fetch(0).await, Err("no such id".to_owned()));
            assert_eq!(RUNS.get(), 2, "errors are not cached");
            assert_eq!(fetch(4).await, Ok(8));
            assert_eq!(fetch(4).await, Ok(8));
            assert_eq!(RUNS.get(), 3);
        })
        .await;
}

#[tokio::test]
async fn cache_none_false_skips_none() {
    static RUNS: Runs = Runs::new();
    #[cached(cache_none = false)]
    async fn find(id: u64) -> Option<u64> {
        RUNS.hit();
        (id > 0).then_some(id)
    }
    service()
        .scope(async {
            assert_eq!(find(0).await, None);
            assert_eq!(find(0).await, None);
            assert_eq!(RUNS.get(), 2);
            assert_eq!(find(1).await, Some(1));
            assert_eq!(find(1).await, Some(1));
            assert_eq!(RUNS.get(), 3);
        })
        .await;
}

/// Not serializable: only `local` functions may return it.
#[derive(Clone)]
pub struct Handle(Arc<std::sync::Mutex<u32>>);

#[tokio::test]
async fn local_values_need_no_serde() {
    static RUNS: Runs = Runs::new();
    #[cached(local)]
    async fn open(id: u32) -> Handle {
        RUNS.hit();
        Handle(Arc::new(std::sync::Mutex::new(id)))
    }
    service()
        .scope(async {
            let a = open(1).await;
            let b = open(1).await;
            assert!(Arc::ptr_eq(&a.0, &b.0), "the stored Arc is handed out");
            assert_eq!(RUNS.get(), 1);
        })
        .await;
}

static VERSIONED: Runs = Runs::new();

#[tokio::test]
async fn versions_are_separate_entries() {
    mod v1 {
        #[cache_runtime::cached(name = "app.report")]
        pub async fn report(id: u32) -> String {
            super::VERSIONED.hit();
            format!("v1 {id}")
        }
    }
    mod v2 {
        #[cache_runtime::cached(name = "app.report", version = 2)]
        pub async fn report(id: u32) -> String {
            super::VERSIONED.hit();
            format!("v2 {id}")
        }
    }
    let svc = service();
    svc.scope(async {
        assert_eq!(v1::report(1).await, "v1 1");
        assert_eq!(
            v2::report(1).await,
            "v2 1",
            "version 2 never reads version 1"
        );
        assert_eq!(v2::report(1).await, "v2 1");
    })
    .await;
    assert_eq!(VERSIONED.get(), 2);
}

static CLASH: Runs = Runs::new();

#[tokio::test]
async fn same_key_name_twice_runs_uncached() {
    mod a {
        #[cache_runtime::cached(name = "clash.name")]
        pub async fn f(id: u32) -> u32 {
            super::CLASH.hit();
            id
        }
    }
    mod b {
        #[cache_runtime::cached(name = "clash.name")]
        pub async fn f(id: u32) -> String {
            super::CLASH.hit();
            id.to_string()
        }
    }
    let svc = service();
    svc.scope(async {
        assert_eq!(a::f(1).await, 1);
        assert_eq!(b::f(1).await, "1", "never the other function's value");
        assert_eq!(b::f(1).await, "1");
        assert_eq!(a::f(1).await, 1);
    })
    .await;
    assert_eq!(
        CLASH.get(),
        3,
        "the first registered stays cached, the second runs each time"
    );
    assert_eq!(svc.stats().total.config_errors, 2);
}

#[tokio::test(start_paused = true)]
async fn ttl_from_attribute_and_profile() {
    static A: Runs = Runs::new();
    static P: Runs = Runs::new();
    #[cached(profile = "short", ttl = "2s")]
    async fn attr_wins(id: u32) -> u32 {
        A.hit();
        id
    }
    #[cached(profile = "short")]
    async fn from_profile(id: u32) -> u32 {
        P.hit();
        id
    }
    let svc = CachingService::builder()
        .profile(Profile::new("short").ttl(Duration::from_secs(10)))
        .build()
        .unwrap();
    svc.scope(async {
        attr_wins(1).await;
        from_profile(1).await;
        tokio::time::advance(Duration::from_millis(1500)).await;
        attr_wins(1).await;
        from_profile(1).await;
        assert_eq!((A.get(), P.get()), (1, 1));
        tokio::time::advance(Duration::from_secs(1)).await;
        attr_wins(1).await;
        from_profile(1).await;
        assert_eq!(
            (A.get(), P.get()),
            (2, 1),
            "the attribute's 2s wins over the profile's 10s"
        );
        tokio::time::advance(Duration::from_secs(8)).await;
        from_profile(1).await;
        assert_eq!(P.get(), 2, "the profile's 10s applies");
    })
    .await;
}

#[tokio::test(start_paused = true)]
async fn sliding_expiration() {
    static RUNS: Runs = Runs::new();
    #[cached(sliding = "10s")]
    async fn session(id: u32) -> u32 {
        RUNS.hit();
        id
    }
    service()
        .scope(async {
            session(1).await;
            for _ in 0..5 {
                tokio::time::advance(Duration::from_secs(8)).await;
                session(1).await;
            }
            assert_eq!(RUNS.get(), 1, "each read keeps it alive");
            tokio::time::advance(Duration::from_secs(11)).await;
            session(1).await;
            assert_eq!(RUNS.get(), 2);
        })
        .await;
}

#[tokio::test(start_paused = true)]
async fn sliding_profile() {
    static RUNS: Runs = Runs::new();
    #[cached(profile = "sessions")]
    async fn profiled_session(id: u32) -> u32 {
        RUNS.hit();
        id
    }
    let svc = CachingService::builder()
        .profile(Profile::new("sessions").sliding(Duration::from_secs(5)))
        .build()
        .unwrap();
    svc.scope(async {
        profiled_session(1).await;
        tokio::time::advance(Duration::from_secs(4)).await;
        profiled_session(1).await;
        tokio::time::advance(Duration::from_secs(4)).await;
        profiled_session(1).await;
        assert_eq!(RUNS.get(), 1);
        tokio::time::advance(Duration::from_secs(6)).await;
        profiled_session(1).await;
        assert_eq!(RUNS.get(), 2);
    })
    .await;
}

#[tokio::test]
async fn disabled_profile_runs_every_time() {
    static RUNS: Runs = Runs::new();
    #[cached(profile = "off")]
    async fn report(id: u32) -> u32 {
        RUNS.hit();
        id
    }
    let svc = CachingService::builder()
        .profile(Profile::new("off").enabled(false))
        .build()
        .unwrap();
    svc.scope(async {
        for _ in 0..3 {
            report(1).await;
        }
    })
    .await;
    assert_eq!(RUNS.get(), 3);
    let s = svc.stats().function(&fn_name("report"));
    assert_eq!((s.executions, s.hits, s.config_errors), (3, 0, 0));
    assert!(svc.local_keys().is_empty());
}

#[tokio::test]
async fn unknown_profile_runs_uncached_and_is_counted() {
    static RUNS: Runs = Runs::new();
    #[cached(profile = "nope")]
    async fn lookup(id: u32) -> u32 {
        RUNS.hit();
        id
    }
    let svc = service();
    svc.scope(async {
        for _ in 0..3 {
            assert_eq!(lookup(1).await, 1);
        }
    })
    .await;
    assert_eq!(RUNS.get(), 3);
    let s = svc.stats().function(&fn_name("lookup"));
    assert_eq!((s.config_errors, s.executions), (3, 3));
}

#[tokio::test]
async fn bounded_by_max_entries() {
    #[cached]
    async fn ident(id: u32) -> u32 {
        id
    }
    let svc = CachingService::builder()
        .backend(MemoryBackend::new().max_entries(50))
        .build()
        .unwrap();
    svc.scope(async {
        for i in 0..1000 {
            ident(i).await;
        }
    })
    .await;
    let held = svc.local_keys().len();
    assert!((25..=50).contains(&held), "{held} entries held");
}

#[tokio::test]
async fn clear_removes_everything() {
    static RUNS: Runs = Runs::new();
    #[cached]
    async fn f(id: u32) -> u32 {
        RUNS.hit();
        id
    }
    let svc = service();
    svc.scope(async {
        f(1).await;
        f(2).await;
        CachingService::clear().await;
        f(1).await;
        f(2).await;
    })
    .await;
    assert_eq!(RUNS.get(), 4);
}

#[tokio::test]
async fn long_keys_are_hashed_after_the_function_name() {
    #[cached]
    async fn big(text: String, map: HashMap<String, u32>) -> usize {
        text.len() + map.len()
    }
    let svc = CachingService::builder()
        .max_key_length(100)
        .build()
        .unwrap();
    let long = "x".repeat(500);
    svc.scope(async {
        big(long.clone(), HashMap::new()).await;
        big("short".into(), HashMap::new()).await;
    })
    .await;
    let mut keys = svc.local_keys();
    keys.sort();
    let prefix = format!("{}::big:v1", module_path!());
    assert_eq!(keys[1], format!(r#"{prefix}("short",{{}})"#));
    assert!(keys[0].starts_with(&format!("{prefix}#")), "{}", keys[0]);
    assert_eq!(keys[0].len(), prefix.len() + 1 + 32);
}

/// Keys of every length around the size of the stack buffer a key is written in
/// (192 bytes, past which it moves to the heap): each hits its own entry, and an
/// invalidation removes exactly that one.
#[tokio::test]
async fn keys_longer_than_the_stack_buffer_hit_and_invalidate() {
    static RUNS: Runs = Runs::new();
    #[cached]
    async fn echo(prefix: u64, text: String) -> usize {
        RUNS.hit();
        text.len() + prefix as usize
    }
    service()
        .scope(async {
            let texts: Vec<String> = (150..260).map(|n| "k".repeat(n)).collect();
            for t in &texts {
                echo(7, t.clone()).await;
            }
            // One differs from another only in its last byte.
            let last = format!("{}j", "k".repeat(249));
            echo(7, last.clone()).await;
            assert_eq!(RUNS.get(), texts.len() + 1);
            for t in &texts {
                assert_eq!(echo(7, t.clone()).await, t.len() + 7);
            }
            assert_eq!(echo(7, last.clone()).await, 257);
            assert_eq!(RUNS.get(), texts.len() + 1, "every call hit");
            cache_runtime::invalidate!(echo(7, texts[50].clone())).await;
            echo(7, texts[50].clone()).await;
            echo(7, texts[51].clone()).await;
            echo(7, last).await;
            assert_eq!(
                RUNS.get(),
                texts.len() + 2,
                "only the invalidated key ran again"
            );
        })
        .await;
}

#[tokio::test]
async fn question_mark_and_early_return_in_bodies() {
    #[cached]
    async fn parse_sum(a: String, b: String) -> Result<i64, std::num::ParseIntError> {
        if a.is_empty() {
            return Ok(0);
        }
        Ok(a.parse::<i64>()? + b.parse::<i64>()?)
    }
    service()
        .scope(async {
            assert_eq!(parse_sum("1".into(), "2".into()).await, Ok(3));
            assert!(parse_sum("1".into(), "x".into()).await.is_err());
            assert_eq!(parse_sum(String::new(), "x".into()).await, Ok(0));
        })
        .await;
}

#[test]
fn plain_functions_are_cached() {
    static RUNS: Runs = Runs::new();
    #[cached(ttl = "1h")]
    fn fib(n: u64) -> u64 {
        RUNS.hit();
        if n < 2 {
            n
        } else {
            fib(n - 1) + fib(n - 2)
        }
    }
    let svc = service();
    svc.scope_sync(|| {
        assert_eq!(fib(50), 12_586_269_025);
    });
    assert_eq!(RUNS.get(), 51, "each n computed once");
}

#[tokio::test]
async fn skipped_mut_parameters() {
    static RUNS: Runs = Runs::new();
    #[cached(skip(log))]
    async fn record(id: u32, log: &mut Vec<u32>) -> u32 {
        RUNS.hit();
        log.push(id);
        id
    }
    let mut log = Vec::new();
    service()
        .scope(async {
            record(1, &mut log).await;
            record(1, &mut log).await;
        })
        .await;
    assert_eq!(log, vec![1]);
    assert_eq!(RUNS.get(), 1);
}
