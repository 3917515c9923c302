//! Dependencies: collected in bodies, propagated through nested cached calls (hits and
//! misses), invalidated transitively.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use cache_runtime::{
    add_dependency, cached, invalidate_dependency, untracked, CacheDependency, CachingService,
    Dependency,
};
use tests::Runs;

fn service() -> CachingService {
    CachingService::builder().build().unwrap()
}

/// Serializes the tests that count runs of `inner`, `middle` and `outer`.
static SHARED: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

static INNER: Runs = Runs::new();
static MIDDLE: Runs = Runs::new();
static OUTER: Runs = Runs::new();

#[cached]
async fn inner(id: u64) -> u64 {
    INNER.hit();
    add_dependency(format!("row:{id}"));
    id
}

#[cached]
async fn middle(id: u64) -> u64 {
    MIDDLE.hit();
    inner(id).await + 100
}

#[cached]
async fn outer(id: u64) -> u64 {
    OUTER.hit();
    middle(id).await + 1000
}

fn runs() -> (usize, usize, usize) {
    (OUTER.get(), MIDDLE.get(), INNER.get())
}

fn minus(a: (usize, usize, usize), b: (usize, usize, usize)) -> (usize, usize, usize) {
    (a.0 - b.0, a.1 - b.1, a.2 - b.2)
}

#[tokio::test]
async fn outer_intermediate_inner() {
    let _serial = SHARED.lock().await;
    let svc = service();
    svc.scope(async {
        let start = runs();
        assert_eq!(outer(1).await, 1101);
        assert_eq!(outer(1).await, 1101);
        assert_eq!(minus(runs(), start), (1, 1, 1));
        // invalidating the inner entry re-runs all three
        cache_runtime::invalidate!(inner(1)).await;
        outer(1).await;
        assert_eq!(minus(runs(), start), (2, 2, 2));
        // and so does invalidating the inner entry's dependency
        invalidate_dependency("row:1").await;
        outer(1).await;
        assert_eq!(minus(runs(), start), (3, 3, 3));
        // invalidating the middle leaves the inner entry
        cache_runtime::invalidate!(middle(1)).await;
        outer(1).await;
        assert_eq!(minus(runs(), start), (4, 4, 3));
    })
    .await;
}

#[tokio::test]
async fn inner_hits_link_too() {
    let _serial = SHARED.lock().await;
    // 2 and 3 are ids no other test uses
    let svc = service();
    svc.scope(async {
        let start = runs();
        inner(2).await; // cached before any outer call
        middle(2).await; // a hit on inner inside middle's body
        assert_eq!(minus(runs(), start), (0, 1, 1));
        invalidate_dependency("row:2").await;
        middle(2).await;
        assert_eq!(
            minus(runs(), start),
            (0, 2, 2),
            "the dependency reached middle through the hit"
        );
        // the same through a waiter: concurrent callers of inner share one run
        let (a, b) = tokio::join!(middle(3), inner(3));
        assert_eq!((a, b), (103, 3));
        invalidate_dependency("row:3").await;
        middle(3).await;
        assert_eq!(minus(runs(), start), (0, 4, 4));
    })
    .await;
}

#[tokio::test]
async fn imperative_invalidation_inside_a_cached_body() {
    let _serial = SHARED.lock().await;
    static RUNS: Runs = Runs::new();
    #[cached]
    async fn report(id: u64) -> u64 {
        RUNS.hit();
        // invalidating from inside another cached function's body
        cache_runtime::invalidate!(inner(id)).await;
        inner(id).await
    }
    let svc = service();
    svc.scope(async {
        let start = INNER.get();
        report(40).await;
        report(40).await;
        assert_eq!(RUNS.get(), 1);
        assert_eq!(INNER.get() - start, 1);
        invalidate_dependency("row:40").await;
        report(40).await;
        assert_eq!(RUNS.get(), 2, "report depends on the inner entry it read");
    })
    .await;
}

#[tokio::test]
async fn refresh_is_shallow_and_reaches_dependents() {
    static VERSION: AtomicU64 = AtomicU64::new(1);
    static LEAF: Runs = Runs::new();
    static TOP: Runs = Runs::new();
    #[cached]
    async fn leaf(id: u64) -> u64 {
        LEAF.hit();
        id * 10 + VERSION.load(Ordering::SeqCst)
    }
    #[cached]
    async fn top(id: u64) -> u64 {
        TOP.hit();
        leaf(id).await + 1000
    }
    let svc = service();
    svc.scope(async {
        assert_eq!(top(1).await, 1011);
        // refreshing the outer function re-runs its body only: the leaf stays cached
        VERSION.store(2, Ordering::SeqCst);
        assert_eq!(cache_runtime::refresh!(top(1)).await, 1011);
        assert_eq!((TOP.get(), LEAF.get()), (2, 1));
        // refreshing the inner one stores its new value, and the outer entry, computed
        // from the old one, is invalidated
        assert_eq!(cache_runtime::refresh!(leaf(1)).await, 12);
        assert_eq!((TOP.get(), LEAF.get()), (2, 2));
        assert_eq!(top(1).await, 1012);
        assert_eq!((TOP.get(), LEAF.get()), (3, 2));
    })
    .await;
}

/// A chain A → B → … → H: each calls the next.
mod chain {
    use super::*;
    pub static RUNS: Runs = Runs::new();

    #[cached]
    pub async fn h(id: u64) -> u64 {
        RUNS.hit();
        add_dependency(format!("h:{id}"));
        id
    }
    macro_rules! link {
        ($name:ident, $next:ident) => {
            #[cached]
            pub async fn $name(id: u64) -> u64 {
                RUNS.hit();
                $next(id).await + 1
            }
        };
    }
    link!(g, h);
    link!(f, g);
    link!(e, f);
    link!(d, e);
    link!(c, d);
    link!(b, c);
    link!(a, b);
}

#[tokio::test]
async fn a_chain_is_removed_whole() {
    let svc = service();
    svc.scope(async {
        assert_eq!(chain::a(1).await, 8);
        assert_eq!(chain::RUNS.get(), 8);
        chain::a(1).await;
        chain::d(1).await;
        assert_eq!(chain::RUNS.get(), 8);
        invalidate_dependency("h:1").await;
        assert_eq!(svc.local_keys().len(), 0, "all eight entries are gone");
        chain::a(1).await;
        assert_eq!(chain::RUNS.get(), 16);
    })
    .await;
}

#[tokio::test]
async fn cycles_and_self_dependencies_terminate() {
    static RUNS: Runs = Runs::new();
    #[cached]
    async fn tagged(id: u64) -> u64 {
        RUNS.hit();
        // a dependency whose cascade names itself, and two that name each other
        add_dependency(Dependency::new("self").cascade([Dependency::new("self")]));
        add_dependency(
            Dependency::new(format!("a:{id}")).cascade([Dependency::new(format!("b:{id}"))]),
        );
        add_dependency(
            Dependency::new(format!("b:{id}")).cascade([Dependency::new(format!("a:{id}"))]),
        );
        id
    }
    let svc = service();
    svc.scope(async {
        tagged(1).await;
        tagged(2).await;
        invalidate_dependency("self").await;
        tagged(1).await;
        tagged(2).await;
        assert_eq!(RUNS.get(), 4);
        invalidate_dependency("b:1").await;
        tagged(1).await;
        tagged(2).await;
        assert_eq!(RUNS.get(), 5);
    })
    .await;
}

#[tokio::test]
async fn ten_thousand_dependents_one_call() {
    static RUNS: Runs = Runs::new();
    #[cached]
    async fn price(id: u64) -> u64 {
        RUNS.hit();
        add_dependency("price-list");
        id
    }
    let svc = CachingService::builder()
        .backend(cache_runtime::MemoryBackend::new().max_entries(20_000))
        .build()
        .unwrap();
    svc.scope(async {
        for i in 0..10_000 {
            price(i).await;
        }
        assert_eq!(svc.local_keys().len(), 10_000);
        invalidate_dependency("price-list").await;
        assert_eq!(svc.local_keys().len(), 0);
    })
    .await;
    assert_eq!(svc.stats().total.invalidations, 10_000);
}

#[tokio::test]
async fn replacing_an_entry_drops_its_old_links() {
    static RUNS: Runs = Runs::new();
    static SOURCE: Mutex<&str> = Mutex::new("old");
    #[cached]
    async fn config(id: u64) -> String {
        RUNS.hit();
        let source = *SOURCE.lock().unwrap();
        add_dependency(source);
        format!("{id} from {source}")
    }
    let svc = service();
    svc.scope(async {
        config(1).await;
        *SOURCE.lock().unwrap() = "new";
        cache_runtime::refresh!(config(1)).await;
        assert_eq!(RUNS.get(), 2);
        invalidate_dependency("old").await;
        assert_eq!(
            config(1).await,
            "1 from new",
            "not removed: it no longer depends on `old`"
        );
        assert_eq!(RUNS.get(), 2);
        invalidate_dependency("new").await;
        config(1).await;
        assert_eq!(RUNS.get(), 3);
    })
    .await;
}

#[tokio::test]
async fn spawned_tasks_and_untracked_collect_nothing() {
    let _serial = SHARED.lock().await;
    static RUNS: Runs = Runs::new();
    #[cached]
    async fn spawning(id: u64) -> u64 {
        RUNS.hit();
        // a spawned task does not run in this body's context: this does nothing
        tokio::spawn(async move { add_dependency(format!("spawned:{id}")) })
            .await
            .unwrap();
        // and a cached call made through `untracked` is not linked
        untracked(inner(id)).await
    }
    let svc = service();
    svc.scope(async {
        spawning(50).await;
        invalidate_dependency("spawned:50").await;
        invalidate_dependency("row:50").await;
        spawning(50).await;
        assert_eq!(RUNS.get(), 1, "neither dependency reached the entry");
    })
    .await;
    // outside a cached function, add_dependency does nothing either
    add_dependency("nowhere");
}

struct Order {
    id: u64,
    customer: u64,
}

impl CacheDependency for Order {
    fn dependency_key(&self) -> String {
        format!("order:{}", self.id)
    }
    fn cascade(&self) -> Vec<Dependency> {
        vec![Dependency::new(format!("customer:{}", self.customer))]
    }
}

#[tokio::test]
async fn dependency_types_with_cascades() {
    static ORDERS: Runs = Runs::new();
    static CUSTOMERS: Runs = Runs::new();
    #[cached]
    async fn order_summary(id: u64) -> String {
        ORDERS.hit();
        let order = Order { id, customer: 9 };
        add_dependency(&order);
        format!("order {}", order.id)
    }
    #[cached]
    async fn customer_page(id: u64) -> String {
        CUSTOMERS.hit();
        add_dependency(format!("customer:{id}"));
        format!("customer {id}")
    }
    let svc = service();
    svc.scope(async {
        order_summary(1).await;
        customer_page(9).await;
        // invalidating the order cascades to its customer
        invalidate_dependency(&Order { id: 1, customer: 9 }).await;
        order_summary(1).await;
        customer_page(9).await;
        assert_eq!((ORDERS.get(), CUSTOMERS.get()), (2, 2));
        // the cascade registered by the entry applies to a plain key too
        invalidate_dependency("order:1").await;
        order_summary(1).await;
        customer_page(9).await;
        assert_eq!((ORDERS.get(), CUSTOMERS.get()), (3, 3));
    })
    .await;
}
