//! The Redis tier of `cache-runtime`.
//!
//! This crate holds what a deployment on several instances needs from Redis:
//!
//! - `RedisBackend`: Redis as the shared (L2) store behind the in-process tier, with
//!   values in MessagePack, write-behind, and a cache failure never failing a call;
//! - an in-process L1 in front of Redis, kept in sync across instances over pub/sub;
//! - `RedisSync`: pub/sub invalidation for purely in-memory caches;
//! - the dependency graph in Redis and its collector (`cache-redis-gc`).
//!
//! Server settings it relies on: `maxmemory-policy volatile-lru` (or `volatile-random`),
//! since dependency keys carry no TTL and must never be evicted, and
//! `notify-keyspace-events` with at least `Kx` and `Ex` for the collector.

#![warn(missing_docs)]

pub use cache_runtime;
pub use redis;
