//! Configuring a service: [`CachingServiceBuilder`] and the [`Backend`] it stores
//! entries in.

use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;

use crate::bus::{new_instance_id, BusReceiver, InvalidationBus, Receive, SyncCounters};
use crate::deps::{DependencyGraph, MemoryGraph};
use crate::flight::Flights;
use crate::held::Held;
use crate::inner::{CachingService, Inner, RemoteCounters};
use crate::memory::MemoryBackend;
use crate::profile::{ConfigError, Profile};
use crate::registry::FnTable;
use crate::remote::{RateLimitedWarn, RemoteStore};

impl CachingService {
    /// Starts configuring a service.
    pub fn builder() -> CachingServiceBuilder {
        CachingServiceBuilder {
            backend: MemoryBackend::new().into(),
            profiles: Vec::new(),
            max_key_length: 1024,
        }
    }
}

/// What the service stores entries in: an in-process tier, a remote store, or a
/// remote store with an in-process tier in front. Built from a [`MemoryBackend`], or by
/// a remote store's crate (`cache-redis`) with [`Backend::remote`].
#[derive(Clone)]
pub struct Backend {
    pub(crate) memory: Option<MemoryBackend>,
    pub(crate) remote: Option<Arc<dyn RemoteStore>>,
    pub(crate) bus: Option<Arc<dyn InvalidationBus>>,
    /// The remote store publishes on `bus` itself, along with its removals.
    pub(crate) store_publishes: bool,
}

impl Backend {
    /// A remote store, with `l1` in front of it (or none).
    pub fn remote(store: impl RemoteStore, l1: Option<MemoryBackend>) -> Self {
        Backend {
            memory: l1,
            remote: Some(Arc::new(store)),
            bus: None,
            store_publishes: false,
        }
    }

    /// Publishes this backend's invalidations on `bus`, and applies the other
    /// instances' ones to its in-process tier (see [`InvalidationBus`]).
    pub fn with_bus(mut self, bus: impl InvalidationBus) -> Self {
        self.bus = Some(Arc::new(bus));
        self.store_publishes = false;
        self
    }

    /// Like [`Backend::with_bus`], for a bus the remote store can publish on itself:
    /// an invalidation's message is handed to the store with the removal
    /// ([`RemoteStore::remove`], [`RemoteGraph::invalidate`](crate::RemoteGraph::invalidate)),
    /// which publishes it once the entries are gone, in the same round trip. If that
    /// fails, the message is published on `bus`.
    pub fn with_store_bus(mut self, bus: impl InvalidationBus) -> Self {
        self.bus = Some(Arc::new(bus));
        self.store_publishes = true;
        self
    }
}

impl fmt::Debug for Backend {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Backend")
            .field("memory", &self.memory)
            .field("remote", &self.remote.is_some())
            .field("bus", &self.bus.is_some())
            .finish()
    }
}

impl From<MemoryBackend> for Backend {
    fn from(memory: MemoryBackend) -> Self {
        Backend {
            memory: Some(memory),
            remote: None,
            bus: None,
            store_publishes: false,
        }
    }
}

/// Why [`CachingServiceBuilder::install`] failed.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum InstallError {
    /// A service is already installed (by an earlier `install`, or the default one a
    /// cached call installed because none was).
    #[error("a caching service is already installed; call `install` once, at the start of `main`, before any cached call")]
    AlreadyInstalled,
    /// The configuration is invalid.
    #[error(transparent)]
    Config(#[from] ConfigError),
}

/// Configures a [`CachingService`].
#[derive(Debug)]
#[must_use = "call `.install()` or `.build()`"]
pub struct CachingServiceBuilder {
    backend: Backend,
    profiles: Vec<Profile>,
    max_key_length: usize,
}

impl CachingServiceBuilder {
    /// Where entries are stored. Default: `MemoryBackend::new()`.
    pub fn backend(mut self, backend: impl Into<Backend>) -> Self {
        self.backend = backend.into();
        self
    }

    /// Keeps this instance's in-process tier in sync with other instances over `bus`:
    /// every invalidation is published on it, and the other instances' ones are
    /// applied here (see [`InvalidationBus`]; `cache_redis::RedisSync` is the Redis
    /// one). Replaces the bus a backend brings with it.
    pub fn sync(mut self, bus: impl InvalidationBus) -> Self {
        self.backend.bus = Some(Arc::new(bus));
        self.backend.store_publishes = false;
        self
    }

    /// Adds a profile. A profile named `"default"` replaces the built-in default.
    pub fn profile(mut self, profile: Profile) -> Self {
        self.profiles.push(profile);
        self
    }

    /// Readable keys longer than this many bytes keep their function part and have the
    /// arguments replaced by a 128-bit hash. Default: 1024.
    pub fn max_key_length(mut self, bytes: usize) -> Self {
        self.max_key_length = bytes;
        self
    }

    /// Builds a service without installing it; run code against it with
    /// [`CachingService::scope`].
    pub fn build(self) -> Result<CachingService, ConfigError> {
        if self.max_key_length < 64 {
            return Err(ConfigError::KeyLength(self.max_key_length));
        }
        let mut profiles = HashMap::new();
        profiles.insert(Profile::DEFAULT.to_owned(), Profile::new(Profile::DEFAULT));
        let mut seen = std::collections::HashSet::new();
        for p in self.profiles {
            p.validate()?;
            if !seen.insert(p.name.clone()) {
                return Err(ConfigError::DuplicateProfile(p.name));
            }
            profiles.insert(p.name.clone(), p);
        }
        let graph: Arc<dyn DependencyGraph> = Arc::new(MemoryGraph::default());
        let bus = self.backend.bus;
        let index = bus.is_some();
        let inner = Arc::new(Inner {
            memory: match &self.backend.memory {
                Some(m) => m.build(graph.clone(), index),
                None => MemoryBackend::build_disabled(graph.clone()),
            },
            graph,
            remote: self.backend.remote,
            bus: bus.clone(),
            store_publishes: self.backend.store_publishes,
            instance_id: new_instance_id(),
            sync_stats: SyncCounters::default(),
            warn: RateLimitedWarn::default(),
            profiles,
            max_key_length: self.max_key_length,
            flights: Flights::default(),
            retries: Default::default(),
            held: Held::default(),
            remote_stats: RemoteCounters::default(),
            functions: FnTable::default(),
            epoch: AtomicU64::new(0),
            settled: AtomicU64::new(0),
            log: parking_lot::Mutex::default(),
            background: parking_lot::Mutex::default(),
        });
        if let Some(bus) = bus {
            let receiver: std::sync::Weak<dyn Receive> =
                Arc::downgrade(&inner) as std::sync::Weak<Inner>;
            bus.attach(BusReceiver::new(receiver));
        }
        Ok(CachingService { inner })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn rejects_contradictory_profiles() {
        let err = CachingService::builder()
            .profile(
                Profile::new("p")
                    .ttl(Duration::from_secs(1))
                    .sliding(Duration::from_secs(1)),
            )
            .build()
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "profile `p` sets both `ttl` and `sliding`; choose one"
        );
        let err = CachingService::builder()
            .profile(Profile::new("p").ttl(Duration::ZERO))
            .build()
            .unwrap_err();
        assert!(err.to_string().contains("zero expiration"), "{err}");
        let err = CachingService::builder()
            .profile(Profile::new("p"))
            .profile(Profile::new("p"))
            .build()
            .unwrap_err();
        assert_eq!(err, ConfigError::DuplicateProfile("p".into()));
        assert_eq!(
            CachingService::builder()
                .max_key_length(10)
                .build()
                .unwrap_err(),
            ConfigError::KeyLength(10)
        );
    }
}
