//! Rate limits: per client IP before authentication, per signing key after it (GCRA via `governor`).
//!
//! A rejection carries the exact time until the next request would pass, which becomes the
//! `Retry-After` header. Key cardinality is bounded: past [`MAX_TRACKED`] distinct keys, new keys
//! share one overflow bucket, so a spoofing flood cannot grow memory without bound. Stale entries
//! are dropped by [`RateLimits::retain_recent`], which the node calls on a timer.

use std::hash::Hash;
use std::net::IpAddr;
use std::num::NonZeroU32;
use std::time::Duration;

use governor::clock::{Clock, DefaultClock};
use governor::{Quota, RateLimiter};

use crate::identity::KeyId;

/// Most distinct IPs or keys tracked individually. At ~64 bytes an entry this is a few MiB at worst.
pub const MAX_TRACKED: usize = 50_000;

type Keyed<K> = RateLimiter<
    K,
    governor::state::keyed::DefaultKeyedStateStore<K>,
    DefaultClock,
    governor::middleware::NoOpMiddleware,
>;

/// One keyed limiter with an overflow bucket (the mesh keys it by sender address and key).
pub struct Limiter<K: Hash + Eq + Clone> {
    keyed: Keyed<Option<K>>,
    clock: DefaultClock,
}

impl<K: Hash + Eq + Clone> Limiter<K> {
    /// A limiter allowing `rate` per second with bursts of `burst`.
    pub fn new(rate: u32, burst: u32) -> Self {
        let rate = NonZeroU32::new(rate).unwrap_or(NonZeroU32::MIN);
        let burst = NonZeroU32::new(burst).unwrap_or(rate);
        Limiter {
            keyed: RateLimiter::keyed(Quota::per_second(rate).allow_burst(burst)),
            clock: DefaultClock::default(),
        }
    }

    /// Checks and counts one event for `key`.
    ///
    /// # Errors
    /// How long to wait before retrying.
    pub fn check(&self, key: &K) -> Result<(), Duration> {
        let k = Some(key.clone());
        // The overflow bucket (`None`) is shared by every key beyond the cap.
        let k = if self.keyed.len() >= MAX_TRACKED {
            None
        } else {
            k
        };
        self.keyed
            .check_key(&k)
            .map_err(|not_until| not_until.wait_time_from(self.clock.now()))
    }
}

impl<K: Hash + Eq + Clone> Limiter<K> {
    /// Forgets buckets that are full again.
    pub fn retain_recent(&self) {
        self.keyed.retain_recent();
        self.keyed.shrink_to_fit();
    }
}

/// The node's limits.
pub struct RateLimits {
    per_ip: Limiter<IpAddr>,
    per_key: Limiter<KeyId>,
}

impl std::fmt::Debug for RateLimits {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RateLimits")
    }
}

impl RateLimits {
    /// The per-IP and per-key limits of `[security]`.
    pub fn from_config(s: &crate::config::SecurityConfig) -> Self {
        Self::new(
            s.per_ip_rate,
            s.per_ip_burst,
            s.per_key_rate,
            s.per_key_burst,
        )
    }

    /// Limits with the given rates (requests per second) and bursts.
    pub fn new(ip_rate: u32, ip_burst: u32, key_rate: u32, key_burst: u32) -> Self {
        RateLimits {
            per_ip: Limiter::new(ip_rate, ip_burst),
            per_key: Limiter::new(key_rate, key_burst),
        }
    }

    /// Checks and counts one request from `ip`.
    ///
    /// # Errors
    /// How long to wait before retrying.
    pub fn check_ip(&self, ip: IpAddr) -> Result<(), Duration> {
        self.per_ip.check(&ip)
    }

    /// Checks and counts one request signed by `key`.
    ///
    /// # Errors
    /// How long to wait before retrying.
    pub fn check_key(&self, key: &KeyId) -> Result<(), Duration> {
        self.per_key.check(key)
    }

    /// Forgets buckets that are full again (idle keys).
    pub fn retain_recent(&self) {
        self.per_ip.keyed.retain_recent();
        self.per_ip.keyed.shrink_to_fit();
        self.per_key.keyed.retain_recent();
        self.per_key.keyed.shrink_to_fit();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_key_flooding_does_not_limit_another() {
        let l = RateLimits::new(1000, 1000, 1, 5);
        let a = KeyId([1; 32]);
        let b = KeyId([2; 32]);
        for _ in 0..5 {
            assert!(l.check_key(&a).is_ok());
        }
        let wait = l.check_key(&a).unwrap_err();
        assert!(wait <= Duration::from_secs(1) && !wait.is_zero());
        assert!(l.check_key(&b).is_ok());
    }

    #[test]
    fn ips_are_limited_separately() {
        let l = RateLimits::new(1, 2, 1000, 1000);
        let a: IpAddr = "10.0.0.1".parse().unwrap();
        let b: IpAddr = "10.0.0.2".parse().unwrap();
        assert!(l.check_ip(a).is_ok());
        assert!(l.check_ip(a).is_ok());
        assert!(l.check_ip(a).is_err());
        assert!(l.check_ip(b).is_ok());
        l.retain_recent();
    }
}
