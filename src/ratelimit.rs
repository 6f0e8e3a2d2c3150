//! Per-source token buckets: each source (an IP address, or an IP address and port) may have
//! `rate` datagrams a second, in bursts of up to one second's worth. Used by the receiver thread
//! alone, so no lock.

use std::collections::HashMap;
use std::hash::Hash;
use std::time::Instant;

/// One source's tokens: refilled at a rate, up to a burst.
#[derive(Debug)]
pub struct Bucket {
    tokens: f64,
    last: Instant,
}

impl Bucket {
    pub fn full(burst: f64, now: Instant) -> Bucket {
        Bucket {
            tokens: burst,
            last: now,
        }
    }

    /// Refills at `rate` a second up to `burst`, then takes a token; false if none is left.
    pub fn take(&mut self, rate: f64, burst: f64, now: Instant) -> bool {
        let refill = now.saturating_duration_since(self.last).as_secs_f64() * rate;
        self.tokens = (self.tokens + refill).min(burst);
        self.last = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

#[derive(Debug)]
pub struct RateLimiter<K> {
    rate: f64,
    burst: f64,
    /// Sources tracked at most, so a flood from spoofed addresses cannot grow the table without
    /// bound; what becomes of a new source past it is the caller's to say.
    max_sources: usize,
    buckets: HashMap<K, Bucket>,
}

impl<K: Hash + Eq + Copy> RateLimiter<K> {
    /// `rate` a second in bursts of one second's worth (at least one).
    pub fn new(rate: f64, max_sources: usize) -> RateLimiter<K> {
        RateLimiter::with_burst(rate, rate.max(1.0), max_sources)
    }

    pub fn with_burst(rate: f64, burst: f64, max_sources: usize) -> RateLimiter<K> {
        RateLimiter {
            rate,
            burst,
            max_sources,
            buckets: HashMap::new(),
        }
    }

    /// Takes a token for one datagram of `source`: whether it had one, or None if it is not
    /// tracked and the table is full.
    pub fn allow(&mut self, source: K, now: Instant) -> Option<bool> {
        if !self.buckets.contains_key(&source) && self.buckets.len() >= self.max_sources {
            return None;
        }
        let (rate, burst) = (self.rate, self.burst);
        Some(
            self.buckets
                .entry(source)
                .or_insert_with(|| Bucket::full(burst, now))
                .take(rate, burst, now),
        )
    }

    /// Forgets sources whose buckets have refilled: tracking them changes nothing.
    pub fn sweep(&mut self, now: Instant) {
        let (rate, burst) = (self.rate, self.burst);
        self.buckets.retain(|_, b| {
            b.tokens + now.saturating_duration_since(b.last).as_secs_f64() * rate < burst
        });
    }

    #[cfg(test)]
    fn sources(&self) -> usize {
        self.buckets.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::IpAddr;
    use std::time::Duration;

    #[test]
    fn a_burst_then_the_rate() {
        let ip: IpAddr = "127.0.0.1".parse().unwrap();
        let other: IpAddr = "127.0.0.2".parse().unwrap();
        let mut limiter = RateLimiter::<IpAddr>::new(10.0, 100);
        let t0 = Instant::now();
        let allowed = (0..30)
            .filter(|_| limiter.allow(ip, t0) == Some(true))
            .count();
        assert_eq!(allowed, 10); // one second's worth at once
        assert_eq!(limiter.allow(other, t0), Some(true)); // sources are independent
        assert_eq!(
            limiter.allow(ip, t0 + Duration::from_millis(50)),
            Some(false)
        );
        assert_eq!(
            limiter.allow(ip, t0 + Duration::from_millis(150)),
            Some(true)
        );
        limiter.sweep(t0 + Duration::from_secs(5));
        assert_eq!(limiter.sources(), 0);
    }

    #[test]
    fn the_table_of_sources_is_bounded() {
        let mut limiter = RateLimiter::<IpAddr>::new(1.0, 2);
        let t0 = Instant::now();
        assert_eq!(limiter.allow("10.0.0.1".parse().unwrap(), t0), Some(true));
        assert_eq!(limiter.allow("10.0.0.2".parse().unwrap(), t0), Some(true));
        assert_eq!(limiter.allow("10.0.0.3".parse().unwrap(), t0), None);
        assert_eq!(limiter.sources(), 2);
    }
}
