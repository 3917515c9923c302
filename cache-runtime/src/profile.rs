//! Profiles: run-time settings shared by cached functions, and the configuration
//! errors a service refuses.

use std::time::Duration;

/// How an entry expires.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Expiration {
    /// Kept until evicted or invalidated.
    #[default]
    Never,
    /// Removed this long after it was stored.
    Absolute(Duration),
    /// Removed when not read for this long.
    Sliding(Duration),
}

/// Run-time settings shared by the cached functions that name it with
/// `#[cached(profile = "...")]`. Values given on the attribute win over the profile's.
///
/// ```
/// use cache_runtime::Profile;
/// use std::time::Duration;
///
/// let catalog = Profile::new("catalog").ttl(Duration::from_secs(600));
/// let sessions = Profile::new("sessions").sliding(Duration::from_secs(120));
/// let off = Profile::new("reports").enabled(false);
/// ```
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Profile {
    pub(crate) name: String,
    pub(crate) ttl: Option<Duration>,
    pub(crate) sliding: Option<Duration>,
    pub(crate) enabled: bool,
    pub(crate) lock_timeout: Duration,
}

impl Profile {
    /// The name of the profile used when the attribute names none.
    pub const DEFAULT: &'static str = "default";
    /// How long a caller waits for another call of the same key before running the
    /// body itself, unless the profile says otherwise.
    pub const DEFAULT_LOCK_TIMEOUT: Duration = Duration::from_secs(30);

    /// A profile with no expiration, enabled, with the default lock timeout.
    pub fn new(name: impl Into<String>) -> Self {
        Profile {
            name: name.into(),
            ttl: None,
            sliding: None,
            enabled: true,
            lock_timeout: Self::DEFAULT_LOCK_TIMEOUT,
        }
    }

    /// Absolute expiration: entries are removed this long after they are stored.
    /// Cannot be combined with [`sliding`](Self::sliding).
    pub fn ttl(mut self, ttl: Duration) -> Self {
        self.ttl = Some(ttl);
        self
    }

    /// Sliding expiration: entries are removed when not read for this long.
    /// Cannot be combined with [`ttl`](Self::ttl).
    pub fn sliding(mut self, sliding: Duration) -> Self {
        self.sliding = Some(sliding);
        self
    }

    /// `false` turns caching off for the functions of this profile: they run every time.
    pub fn enabled(mut self, enabled: bool) -> Self {
        self.enabled = enabled;
        self
    }

    /// How long a call waits for a concurrent call of the same key before it runs the
    /// body itself.
    pub fn lock_timeout(mut self, timeout: Duration) -> Self {
        self.lock_timeout = timeout;
        self
    }

    /// The profile's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    pub(crate) fn expiration(&self) -> Expiration {
        match (self.ttl, self.sliding) {
            (Some(d), _) => Expiration::Absolute(d),
            (None, Some(d)) => Expiration::Sliding(d),
            (None, None) => Expiration::Never,
        }
    }

    pub(crate) fn validate(&self) -> Result<(), ConfigError> {
        let problem = if self.ttl.is_some() && self.sliding.is_some() {
            "sets both `ttl` and `sliding`; choose one"
        } else if self.ttl == Some(Duration::ZERO) || self.sliding == Some(Duration::ZERO) {
            "has a zero expiration, which would never serve a hit; use `enabled(false)` to turn caching off"
        } else {
            return Ok(());
        };
        Err(ConfigError::Profile {
            name: self.name.clone(),
            problem,
        })
    }
}

/// A configuration the service refuses.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    /// A profile's settings contradict each other.
    #[error("profile `{name}` {problem}")]
    Profile {
        /// The profile.
        name: String,
        /// What is wrong with it.
        problem: &'static str,
    },
    /// Two profiles have the same name.
    #[error("profile `{0}` is configured twice")]
    DuplicateProfile(String),
    /// The key length limit is too small to hold a function name and a hash.
    #[error("max_key_length must be at least 64 bytes, got {0}")]
    KeyLength(usize),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn profile_expiration() {
        assert_eq!(Profile::new("a").expiration(), Expiration::Never);
        let d = Duration::from_secs(3);
        assert_eq!(
            Profile::new("a").ttl(d).expiration(),
            Expiration::Absolute(d)
        );
        assert_eq!(
            Profile::new("a").sliding(d).expiration(),
            Expiration::Sliding(d)
        );
    }
}
