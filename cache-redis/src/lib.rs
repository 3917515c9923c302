//! The Redis tier of `cache-runtime`.
//!
//! - [`RedisBackend`]: Redis as the shared (L2) store behind the in-process tier, with
//!   values in MessagePack, write-behind, and a cache failure never failing a call; its
//!   in-process L1 is kept in sync across instances over pub/sub.
//! - [`RedisSync`]: purely in-memory caches kept in sync across instances over Redis
//!   pub/sub (no values in Redis).
//! - `RedisBackend::dependencies(true)`: the dependency graph in Redis, kept clean by a
//!   [`DependencyCollector`] (also the binary `cache-redis-gc`) and repaired by
//!   [`full_collection`].
//!
//! `RedisBackend` and `RedisSync` take a standalone server or any node of a Redis
//! Cluster (found out at the first connection; `seed_nodes` gives more nodes to
//! try). On a cluster, values spread over the masters by their keys, and each
//! instance applies its recent removals again after a failover (`replay_window`);
//! the dependency graph needs a standalone server for now.
//!
//! Server settings: `maxmemory-policy volatile-lru` (or `volatile-random`): every cache
//! entry carries an expiry, so eviction removes cache entries only; with the graph,
//! `notify-keyspace-events Exe` for the collector.

#![warn(missing_docs)]
#![forbid(unsafe_code)]

mod backend;
mod bus;
mod cluster;
mod collector;
mod deadline;
mod endpoint;
mod graph;
mod link;
mod node_con;
mod probe;
mod script;
mod settings;
mod single_flight;
mod store;
mod sync;
mod tombstones;
mod topology;
mod writer;

pub use backend::{RedisBackend, RedisBackendBuilder, RedisBackendError};
pub use cache_runtime;
pub use collector::{
    full_collection, CollectionReport, DependencyCollector, DependencyCollectorBuilder,
};
pub use redis;
pub use sync::{RedisSync, RedisSyncBuilder};
pub use writer::RedisMetrics;
