//! Locking a std mutex.

/// Locks a std mutex, ignoring poisoning (the data behind it stays consistent: no
/// lock is held across code that can panic halfway through a change).
pub(crate) fn lock<T>(m: &std::sync::Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}
