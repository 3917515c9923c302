//! Support code for the integration tests.

pub mod redis_server;

use std::sync::atomic::{AtomicUsize, Ordering};

/// Counts how many times a function body ran.
#[derive(Debug, Default)]
pub struct Runs(AtomicUsize);

impl Runs {
    /// A counter at zero.
    pub const fn new() -> Self {
        Runs(AtomicUsize::new(0))
    }
    /// Counts one run.
    pub fn hit(&self) {
        self.0.fetch_add(1, Ordering::SeqCst);
    }
    /// Runs so far.
    pub fn get(&self) -> usize {
        self.0.load(Ordering::SeqCst)
    }
}

/// The README's Rust examples, compiled and run as doc tests.
#[doc = include_str!("../../README.md")]
#[cfg(doctest)]
pub struct Readme;
