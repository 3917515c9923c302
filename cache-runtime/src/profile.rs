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
#[derive(Clone, Debug, PartialEq)]
pub struct Profile {
    pub(crate) name: String,
    pub(crate) ttl: Option<Duration>,
    pub(crate) sliding: Option<Duration>,
    pub(crate) enabled: bool,
    pub(crate) lock_timeout: Duration,
    pub(crate) fail_safe: Option<Duration>,
    pub(crate) fail_safe_throttle: Duration,
    pub(crate) soft_timeout: Option<Duration>,
    pub(crate) eager_refresh: Option<f64>,
}

impl Profile {
    /// The name of the profile used when the attribute names none.
    pub const DEFAULT: &'static str = "default";
    /// How long a caller waits for another call of the same key before running the
    /// body itself, unless the profile says otherwise.
    pub const DEFAULT_LOCK_TIMEOUT: Duration = Duration::from_secs(30);
    /// How long a fallback served after a failure counts as fresh, unless the profile
    /// says otherwise (see [`fail_safe_throttle`](Self::fail_safe_throttle)).
    pub const DEFAULT_FAIL_SAFE_THROTTLE: Duration = Duration::from_secs(30);

    /// A profile with no expiration, enabled, with the default lock timeout, without
    /// fail-safe, soft timeout or eager refresh.
    pub fn new(name: impl Into<String>) -> Self {
        Profile {
            name: name.into(),
            ttl: None,
            sliding: None,
            enabled: true,
            lock_timeout: Self::DEFAULT_LOCK_TIMEOUT,
            fail_safe: None,
            fail_safe_throttle: Self::DEFAULT_FAIL_SAFE_THROTTLE,
            soft_timeout: None,
            eager_refresh: None,
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

    /// Fail-safe: an entry is kept for `max` after it expires, in every tier, as a
    /// fallback. It is never returned as fresh: a call that finds only an expired
    /// entry runs the body, and if the body returns `Err`, the caller gets the expired
    /// value instead, which then counts as fresh for
    /// [`fail_safe_throttle`](Self::fail_safe_throttle). Invalidation removes
    /// fallbacks as it removes entries. Needs `ttl` (or no expiration), not `sliding`.
    ///
    /// ```
    /// use cache_runtime::Profile;
    /// use std::time::Duration;
    ///
    /// let catalog = Profile::new("catalog")
    ///     .ttl(Duration::from_secs(60))
    ///     .fail_safe(Duration::from_secs(3600));
    /// ```
    pub fn fail_safe(mut self, max: Duration) -> Self {
        self.fail_safe = Some(max);
        self
    }

    /// After a failure answered with a fallback, how long that fallback counts as
    /// fresh in this instance, so that a failing source is not called on every call
    /// (default 30 s).
    pub fn fail_safe_throttle(mut self, throttle: Duration) -> Self {
        self.fail_safe_throttle = throttle;
        self
    }

    /// With a fallback present (see [`fail_safe`](Self::fail_safe)), a body that has
    /// not finished after `timeout` lets the caller return the fallback; the body goes
    /// on in the background and its value is stored when it finishes, unless an
    /// invalidation reached it meanwhile.
    pub fn soft_timeout(mut self, timeout: Duration) -> Self {
        self.soft_timeout = Some(timeout);
        self
    }

    /// A hit on an entry older than `fraction` (between 0 and 1, exclusive) of its
    /// `ttl` returns the value at once and starts one background refresh of the key,
    /// which replaces the entry when it finishes. Needs `ttl`.
    pub fn eager_refresh(mut self, fraction: f64) -> Self {
        self.eager_refresh = Some(fraction);
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
        } else if let Some(problem) = self.resilience().problem(self.expiration()) {
            problem
        } else {
            return Ok(());
        };
        Err(ConfigError::Profile {
            name: self.name.clone(),
            problem,
        })
    }
}

/// What the attribute says of fail-safe, soft timeout and eager refresh (`None`
/// defers to the profile). Used by the generated code.
#[doc(hidden)]
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Overrides {
    pub fail_safe: Option<Duration>,
    pub fail_safe_throttle: Option<Duration>,
    pub soft_timeout: Option<Duration>,
    pub eager_refresh: Option<f64>,
}

impl Overrides {
    /// The attribute sets none of them.
    pub const NONE: Overrides = Overrides {
        fail_safe: None,
        fail_safe_throttle: None,
        soft_timeout: None,
        eager_refresh: None,
    };
}

/// A function's fail-safe, soft timeout and eager refresh, as resolved from its
/// attribute and its profile.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub(crate) struct Resilience {
    /// How long an expired entry is kept as a fallback.
    pub(crate) fail_safe: Option<Duration>,
    pub(crate) fail_safe_throttle: Duration,
    pub(crate) soft_timeout: Option<Duration>,
    pub(crate) eager_refresh: Option<f64>,
}

impl Profile {
    /// The profile's own settings.
    pub(crate) fn resilience(&self) -> Resilience {
        Resilience {
            fail_safe: self.fail_safe,
            fail_safe_throttle: self.fail_safe_throttle,
            soft_timeout: self.soft_timeout,
            eager_refresh: self.eager_refresh,
        }
    }
}

impl Resilience {
    /// The attribute's settings over the profile's.
    pub(crate) fn with(self, o: &Overrides) -> Resilience {
        Resilience {
            fail_safe: o.fail_safe.or(self.fail_safe),
            fail_safe_throttle: o.fail_safe_throttle.unwrap_or(self.fail_safe_throttle),
            soft_timeout: o.soft_timeout.or(self.soft_timeout),
            eager_refresh: o.eager_refresh.or(self.eager_refresh),
        }
    }

    /// What is wrong with these settings for entries that expire as `expiration`.
    pub(crate) fn problem(&self, expiration: Expiration) -> Option<&'static str> {
        let sliding = matches!(expiration, Expiration::Sliding(_));
        Some(if self.fail_safe == Some(Duration::ZERO) {
            "has a zero `fail_safe`, which would keep no fallback; remove it to turn fail-safe off"
        } else if self.fail_safe_throttle == Duration::ZERO {
            "has a zero `fail_safe_throttle`: a failing source would be called on every call; give it at least a second"
        } else if self.soft_timeout == Some(Duration::ZERO) {
            "has a zero `soft_timeout`, which would never wait for the body; remove it, or give it the time a fast answer takes"
        } else if self.eager_refresh.is_some_and(|f| !(f > 0.0 && f < 1.0)) {
            "has an `eager_refresh` outside 0 to 1 (exclusive): it is the fraction of the ttl after which a hit refreshes the entry, as in 0.8"
        } else if sliding && self.fail_safe.is_some() {
            "sets `fail_safe` with `sliding`: fail-safe keeps entries past a fixed expiry; use `ttl`"
        } else if sliding && self.eager_refresh.is_some() {
            "sets `eager_refresh` with `sliding`: it refreshes entries before a fixed expiry; use `ttl`"
        } else if self.eager_refresh.is_some() && !matches!(expiration, Expiration::Absolute(_)) {
            "sets `eager_refresh` without a `ttl`: it refreshes an entry after a fraction of its ttl; give the profile a `ttl`"
        } else if self.soft_timeout.is_some() && self.fail_safe.is_none() {
            "sets `soft_timeout` without `fail_safe`: a soft timeout answers with a fallback, and only fail-safe keeps one; add `fail_safe`"
        } else {
            return None;
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
