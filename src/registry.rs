//! The server's client table: who is registered and when each was last heard from.
//! No I/O and no clock of its own: callers pass `now`, so expiry is testable to the nanosecond.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

/// The tutorial drops a client at `now - seen > interval`: exactly `interval` is still alive.
fn is_expired(interval: Duration, seen: Instant, now: Instant) -> bool {
    now.saturating_duration_since(seen) > interval
}

#[derive(Debug)]
pub struct Registry {
    interval: Duration,
    last_seen: HashMap<SocketAddr, Instant>,
}

impl Registry {
    /// A client not heard from for more than `interval` is expired.
    pub fn new(interval: Duration) -> Self {
        Registry {
            interval,
            last_seen: HashMap::new(),
        }
    }

    /// Marks `addr` alive at `now`. Returns true if it was not registered before.
    pub fn touch(&mut self, addr: SocketAddr, now: Instant) -> bool {
        self.last_seen.insert(addr, now).is_none()
    }

    /// Removes `addr`. Returns true if it was registered.
    pub fn remove(&mut self, addr: SocketAddr) -> bool {
        self.last_seen.remove(&addr).is_some()
    }

    /// Removes every client silent for more than `interval` at `now`; appends them to `expired`.
    pub fn expire(&mut self, now: Instant, expired: &mut Vec<SocketAddr>) {
        let interval = self.interval;
        self.last_seen.retain(|&addr, &mut seen| {
            let gone = is_expired(interval, seen, now);
            if gone {
                expired.push(addr);
            }
            !gone
        });
    }

    /// Appends every registered address to `out` (a reused buffer, so a broadcast allocates
    /// nothing once warm). Call [`Registry::expire`] first to leave out the silent.
    pub fn addresses(&self, out: &mut Vec<SocketAddr>) {
        out.extend(self.last_seen.keys().copied());
    }

    /// Every registered client with when it was last heard from. Call [`Registry::expire`] first.
    pub fn snapshot(&self) -> Vec<(SocketAddr, Instant)> {
        self.last_seen
            .iter()
            .map(|(&addr, &seen)| (addr, seen))
            .collect()
    }

    pub fn len(&self) -> usize {
        self.last_seen.len()
    }

    pub fn is_empty(&self) -> bool {
        self.last_seen.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(port: u16) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], port))
    }

    #[test]
    fn touch_registers_once_and_refreshes() {
        let t0 = Instant::now();
        let mut r = Registry::new(Duration::from_secs(10));
        assert!(r.touch(addr(1), t0));
        assert!(!r.touch(addr(1), t0 + Duration::from_secs(5)));
        assert_eq!(r.len(), 1);
        assert_eq!(r.snapshot(), vec![(addr(1), t0 + Duration::from_secs(5))]);
    }

    #[test]
    fn remove_reports_whether_registered() {
        let t0 = Instant::now();
        let mut r = Registry::new(Duration::from_secs(10));
        r.touch(addr(1), t0);
        assert!(r.remove(addr(1)));
        assert!(!r.remove(addr(1)));
        assert!(r.is_empty());
    }

    #[test]
    fn expiry_is_strictly_after_the_interval() {
        let t0 = Instant::now();
        let interval = Duration::from_secs(10);
        let mut r = Registry::new(interval);
        r.touch(addr(1), t0);
        r.touch(addr(2), t0 + Duration::from_secs(3));
        let mut expired = Vec::new();

        // Exactly `interval` of silence is still alive: the tutorial drops at `> interval`.
        r.expire(t0 + interval, &mut expired);
        assert!(expired.is_empty());

        r.expire(t0 + interval + Duration::from_nanos(1), &mut expired);
        assert_eq!(expired, vec![addr(1)]);
        let mut live = Vec::new();
        r.addresses(&mut live);
        assert_eq!(live, vec![addr(2)]);
    }

    #[test]
    fn a_refreshed_client_outlives_its_first_deadline() {
        let t0 = Instant::now();
        let mut r = Registry::new(Duration::from_secs(1));
        r.touch(addr(1), t0);
        r.touch(addr(1), t0 + Duration::from_millis(900));
        let mut expired = Vec::new();
        r.expire(t0 + Duration::from_millis(1500), &mut expired);
        assert!(expired.is_empty());
    }
}
