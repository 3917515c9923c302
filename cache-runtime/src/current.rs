//! The current service: the global one (installed in `main`, or the default one the
//! first cached call installs) or, inside [`CachingService::scope`], the scoped one.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::OnceLock;

use crate::builder::{CachingServiceBuilder, InstallError};
use crate::inner::CachingService;

static GLOBAL: OnceLock<CachingService> = OnceLock::new();

tokio::task_local! {
    static SCOPED: CachingService;
}

/// How many scopes are running in the process: while none is, a call skips the
/// task-local lookup and goes straight to the global service.
static SCOPES: AtomicUsize = AtomicUsize::new(0);

/// Runs `f` with the current service: the one of the enclosing
/// [`CachingService::scope`], else the global one (installed with defaults if needed).
#[inline]
pub(crate) fn with_current<R>(f: impl FnOnce(&CachingService) -> R) -> R {
    if in_scope() {
        with_scoped(f)
    } else {
        f(global())
    }
}

/// Whether a call here runs inside [`CachingService::scope`] (checked only while some
/// scope exists).
#[inline(always)]
pub(crate) fn in_scope() -> bool {
    SCOPES.load(Ordering::Relaxed) != 0 && SCOPED.try_with(|_| ()).is_ok()
}

/// Runs `f` with the enclosing scope's service; only after [`in_scope`].
pub(crate) fn with_scoped<R>(f: impl FnOnce(&CachingService) -> R) -> R {
    SCOPED.with(f)
}

/// Whether `service` is the global one.
pub(crate) fn is_global(service: &CachingService) -> bool {
    GLOBAL
        .get()
        .is_some_and(|g| std::sync::Arc::ptr_eq(&g.inner, &service.inner))
}

/// The global service, installed with defaults if none was.
#[inline]
pub(crate) fn global() -> &'static CachingService {
    GLOBAL.get_or_init(|| {
        tracing::debug!(target: "cache_runtime", "no caching service installed: using the default in-memory service");
        CachingService::builder()
            .build()
            .unwrap_or_else(|_| unreachable!("the default configuration is valid"))
    })
}

impl CachingServiceBuilder {
    /// Builds the service and makes it the global one, used by every cached call that
    /// does not run inside [`CachingService::scope`]. Fails if a service is already
    /// installed.
    pub fn install(self) -> Result<(), InstallError> {
        let service = self.build()?;
        let mut installed = false;
        GLOBAL.get_or_init(|| {
            installed = true;
            service
        });
        if installed {
            Ok(())
        } else {
            Err(InstallError::AlreadyInstalled)
        }
    }
}

/// Runs `future` with `service` as the task-local current one (see
/// [`CachingService::scope`]).
pub(crate) async fn scoped<F: std::future::Future>(
    service: CachingService,
    future: F,
) -> F::Output {
    let _live = crate::deps::Live::enter(&SCOPES);
    SCOPED.scope(service, future).await
}

/// Runs `f` with `service` as the current one, on this thread.
pub(crate) fn scoped_sync<R>(service: CachingService, f: impl FnOnce() -> R) -> R {
    let _live = crate::deps::Live::enter(&SCOPES);
    SCOPED.sync_scope(service, f)
}
