//! What keeps one forged datagram from starting a loop (the Loop DoS class, CVE-2024-2169):
//! the server never answers itself or another server, and the replies it sends without relaying
//! (challenges, welcomes) are rate-limited per source address and in total, so that a loop some
//! future change might allow is still bounded by construction.
//!
//! The budget is per address (IP and port), not per IP: a loop runs between two fixed
//! addresses, so that bounds it as well, while a per-IP budget would let anyone forging a NAT's
//! IP from many ports spend it and lock out every real client behind that NAT.

use std::net::{IpAddr, SocketAddr};
use std::time::{Duration, Instant};

use crate::net;
use crate::protocol;
use crate::ratelimit::{Bucket, RateLimiter};

/// Replies (challenges and welcomes) to one address: a burst of 4, then one every 2 seconds. A
/// client's handshake takes two; a service that keeps answering challenges (an echo that puts
/// a hex tag first reads as a stale token) gets four, then one every 2 seconds.
pub const REPLY_BURST_PER_ADDRESS: f64 = 4.0;
pub const REPLIES_PER_ADDRESS: f64 = 0.5;
/// Replies a second in all, in bursts of as many: 1,000 clients registering at once (behind one
/// NAT or not) take 2,000.
pub const REPLIES_TOTAL: f64 = 20_000.0;
/// Addresses whose reply budget is tracked at most. Past it, a new address is held to the total
/// budget alone until the table is swept (a second later): a flood of forged sources can
/// neither grow the table without bound nor, by filling it, lock real clients out.
const REPLY_SOURCES: usize = 65_536;
/// How long a reading of the host's addresses is trusted.
const ADDRESSES_TTL: Duration = Duration::from_secs(1);

/// Why a datagram was dropped as the start of a loop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Loop {
    /// Its source is one of this server's own addresses.
    Own,
    /// It is what a server sends (`ack:`, `end`, a challenge or a welcome): no client sends it.
    ServerOutput,
}

/// Tells datagrams that could start a loop. Reading the host's addresses costs a system call, so
/// it happens only for a datagram from this server's own port, at most once a second.
pub(super) struct LoopGuard {
    bound: SocketAddr,
    /// The host's addresses and when they were read, for a wildcard bind.
    host: Option<(Vec<IpAddr>, Instant)>,
}

impl LoopGuard {
    pub(super) fn new(bound: SocketAddr) -> Self {
        LoopGuard { bound, host: None }
    }

    pub(super) fn check(&mut self, data: &[u8], from: SocketAddr, now: Instant) -> Option<Loop> {
        if from.port() == self.bound.port() && self.is_own_ip(from.ip(), now) {
            Some(Loop::Own)
        } else if protocol::is_server_output(data) {
            Some(Loop::ServerOutput)
        } else {
            None
        }
    }

    /// True if a datagram from `ip` and this server's port could have come from this server's
    /// socket: its bound address, or with a wildcard bind, any address of the host (all of
    /// 127.0.0.0/8 and ::1 included, which reach a wildcard socket without being listed).
    fn is_own_ip(&mut self, ip: IpAddr, now: Instant) -> bool {
        let (ip, bound) = (ip.to_canonical(), self.bound.ip().to_canonical());
        if !bound.is_unspecified() {
            return ip == bound;
        }
        if ip.is_loopback() {
            return true;
        }
        let stale = self
            .host
            .as_ref()
            .is_none_or(|(_, read)| now.saturating_duration_since(*read) >= ADDRESSES_TTL);
        if stale {
            // Unreadable, the host is taken to have no other address: loopback is still covered.
            let ips = net::local_ips().unwrap_or_default();
            self.host = Some((ips.into_iter().map(|ip| ip.to_canonical()).collect(), now));
        }
        self.host.as_ref().is_some_and(|(ips, _)| ips.contains(&ip))
    }
}

/// The budget of replies that are not relays.
pub(super) struct ReplyLimit {
    per_address: RateLimiter<SocketAddr>,
    total: Bucket,
}

impl ReplyLimit {
    pub(super) fn new(now: Instant) -> Self {
        ReplyLimit {
            per_address: RateLimiter::with_burst(
                REPLIES_PER_ADDRESS,
                REPLY_BURST_PER_ADDRESS,
                REPLY_SOURCES,
            ),
            total: Bucket::full(REPLIES_TOTAL, now),
        }
    }

    /// Takes one reply to `to` from the budget; false if there is none left.
    pub(super) fn allow(&mut self, to: SocketAddr, now: Instant) -> bool {
        self.per_address.allow(to, now) != Some(false)
            && self.total.take(REPLIES_TOTAL, REPLIES_TOTAL, now)
    }

    pub(super) fn sweep(&mut self, now: Instant) {
        self.per_address.sweep(now);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_addresses_for_a_specific_and_a_wildcard_bind() {
        let now = Instant::now();
        let mut specific = LoopGuard::new("127.0.0.1:9998".parse().unwrap());
        let mut wildcard = LoopGuard::new("[::]:9998".parse().unwrap());
        let own = |g: &mut LoopGuard, from: &str| g.check(b"reg", from.parse().unwrap(), now);
        assert_eq!(own(&mut specific, "127.0.0.1:9998"), Some(Loop::Own));
        assert_eq!(
            own(&mut specific, "[::ffff:127.0.0.1]:9998"),
            Some(Loop::Own)
        );
        assert_eq!(own(&mut specific, "127.0.0.2:9998"), None);
        assert_eq!(own(&mut specific, "127.0.0.1:9999"), None);
        for from in [
            "127.0.0.1:9998",
            "127.9.8.7:9998",
            "[::1]:9998",
            "[::ffff:127.0.0.2]:9998",
        ] {
            assert_eq!(own(&mut wildcard, from), Some(Loop::Own), "{from}");
        }
        assert_eq!(own(&mut wildcard, "[::1]:9999"), None);
        assert_eq!(own(&mut wildcard, "192.0.2.1:9998"), None); // TEST-NET-1: never local
    }

    #[test]
    fn replies_are_limited_per_address_and_in_total() {
        let t0 = Instant::now();
        let mut limit = ReplyLimit::new(t0);
        let one: SocketAddr = "10.0.0.1:5000".parse().unwrap();
        let granted = (0..100).filter(|_| limit.allow(one, t0)).count();
        assert_eq!(granted, REPLY_BURST_PER_ADDRESS as usize);
        // Other ports of the same IP, as behind a NAT, have budgets of their own.
        let neighbour: SocketAddr = "10.0.0.1:5001".parse().unwrap();
        assert!(limit.allow(neighbour, t0));
        let mut granted_total = granted + 1;
        for i in 0..30_000u32 {
            let to = SocketAddr::new(std::net::Ipv4Addr::from(0x0b00_0000 + i).into(), 9);
            granted_total += usize::from(limit.allow(to, t0));
        }
        assert_eq!(granted_total, REPLIES_TOTAL as usize);
        assert!(!limit.allow(one, t0 + Duration::from_secs(1)));
        assert!(limit.allow(one, t0 + Duration::from_secs(2)));
    }

    #[test]
    fn a_full_table_leaves_new_addresses_to_the_total_budget() {
        let t0 = Instant::now();
        let mut limit = ReplyLimit::new(t0);
        for i in 0..REPLY_SOURCES as u32 {
            let to = SocketAddr::new(std::net::Ipv4Addr::from(0x0b00_0000 + i).into(), 9);
            limit.per_address.allow(to, t0);
        }
        let late: SocketAddr = "10.9.9.9:9".parse().unwrap();
        assert!(limit.allow(late, t0 + Duration::from_secs(1)));
    }
}
