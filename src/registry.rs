//! The server's client table: who is registered and when each was last heard from. No I/O.
//!
//! Built for a fan-out that never waits on it: a heartbeat from a known client is one hash
//! lookup and an atomic store; the fan-out thread takes the member list as a shared snapshot (an
//! `Arc` clone, rebuilt only after someone joined or left) and checks each member's last-seen
//! stamp without the lock, so expiry applies at broadcast time even between sweeps. A chat
//! message or heartbeat from a member bumps its counters (atomics, like the stamp) and nothing
//! else.

use std::borrow::Borrow;
use std::collections::{HashMap, HashSet};
use std::hash::{Hash, Hasher};
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// A registered client.
#[derive(Debug)]
pub struct Member {
    pub addr: SocketAddr,
    /// The address of this host it last sent to, which every reply to it is sent from (a
    /// client's connected socket discards datagrams from any other); None where the socket does
    /// not report it (bound to one address, which is then the only source there is).
    pub local: Option<IpAddr>,
    /// Nanoseconds since the registry's epoch when it was last heard from.
    last_seen: AtomicU64,
    /// ... and when it joined.
    joined: u64,
    /// Chat messages received from it, and the sum of their payloads' lengths as relayed.
    messages: AtomicU64,
    bytes: AtomicU64,
    /// `^hb^` datagrams received from it.
    heartbeats: AtomicU64,
    /// When it was last paused (a stamp), with `PAUSED` set until it is heard from again (see
    /// [`Registry::pause`]); 0 if never.
    pause: AtomicU64,
}

impl Member {
    fn new(addr: SocketAddr, local: Option<IpAddr>, stamp: u64) -> Member {
        Member {
            addr,
            local,
            last_seen: AtomicU64::new(stamp),
            joined: stamp,
            messages: AtomicU64::new(0),
            bytes: AtomicU64::new(0),
            heartbeats: AtomicU64::new(0),
            pause: AtomicU64::new(0),
        }
    }

    /// Marks it heard from at `stamp`, doing `activity`.
    fn heard(&self, stamp: u64, activity: Activity) {
        self.last_seen.store(stamp, Ordering::Relaxed);
        match activity {
            Activity::Heartbeat => {
                self.heartbeats.fetch_add(1, Ordering::Relaxed);
            }
            Activity::Message { bytes } => {
                self.messages.fetch_add(1, Ordering::Relaxed);
                self.bytes.fetch_add(bytes as u64, Ordering::Relaxed);
            }
            Activity::Register | Activity::Validated => {}
        }
        // Only ever set by an ICMP error, so a store that changes nothing is not worth its
        // cache-line write on every message.
        if self.pause.load(Ordering::Relaxed) & PAUSED != 0 {
            self.pause.fetch_and(!PAUSED, Ordering::Relaxed);
        }
    }

    /// Whether sends to it are paused at `now` (a stamp).
    pub fn is_paused(&self, now: u64) -> bool {
        let pause = self.pause.load(Ordering::Relaxed);
        pause & PAUSED != 0 && now.saturating_sub(pause & !PAUSED) < MAX_PAUSE
    }
}

/// What a datagram from a client did, which its counters (and a join's reason) say.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Activity {
    /// `reg`.
    Register,
    /// `^hb^`.
    Heartbeat,
    /// A chat message whose payload, as relayed, is `bytes` long.
    Message { bytes: usize },
    /// Validated mode's handshake, completed.
    Validated,
}

/// One registered client's figures, as [`Registry::peers`] reads them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Peer {
    pub addr: SocketAddr,
    pub joined: Instant,
    pub last_seen: Instant,
    pub messages: u64,
    pub bytes: u64,
    pub heartbeats: u64,
}

/// A member in the table, found by its address: the address is stored once, in the member,
/// rather than again as the key (a third of the table's memory at 100,000 clients).
#[derive(Debug)]
struct Entry(Arc<Member>);

impl Borrow<SocketAddr> for Entry {
    fn borrow(&self) -> &SocketAddr {
        &self.0.addr
    }
}

impl Hash for Entry {
    fn hash<H: Hasher>(&self, state: &mut H) {
        self.0.addr.hash(state);
    }
}

impl PartialEq for Entry {
    fn eq(&self, other: &Entry) -> bool {
        self.0.addr == other.0.addr
    }
}

impl Eq for Entry {}

/// The flag of `Member::pause` that says it has not been heard from since.
const PAUSED: u64 = 1 << 63;
/// How long a pause lasts at most, in nanoseconds, if the client is not heard from before: a
/// forged report can cost a live client no more, and a dead one is paused again by the report
/// the next send to it draws.
const MAX_PAUSE: u64 = 1_000_000_000;

/// The list of members the fan-out sends to; shared, never copied per broadcast.
pub type Members = Arc<[Arc<Member>]>;

/// Decides who is alive, without the registry's lock.
#[derive(Debug, Clone, Copy)]
pub struct Clock {
    epoch: Instant,
    interval: u64,
}

impl Clock {
    /// Stamps for `now`: monotonic nanoseconds since the epoch.
    pub fn stamp(&self, now: Instant) -> u64 {
        u64::try_from(now.saturating_duration_since(self.epoch).as_nanos()).unwrap_or(u64::MAX)
    }

    /// The tutorial drops a client at `now - seen > interval`: exactly `interval` is still alive.
    pub fn is_live(&self, member: &Member, now: u64) -> bool {
        now.saturating_sub(member.last_seen.load(Ordering::Relaxed)) <= self.interval
    }

    /// When a stamp was taken.
    pub fn instant(&self, stamp: u64) -> Instant {
        self.epoch + Duration::from_nanos(stamp)
    }
}

/// How many clients the table takes: in all, and from one IP address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    pub max_clients: usize,
    pub max_per_ip: usize,
}

/// What a datagram from an address did to the table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Touch {
    /// A registered client, now marked alive.
    Refreshed,
    /// A new client, now registered.
    Joined,
    /// A new client turned away: the table holds `max_clients` already.
    Full,
    /// A new client turned away: its IP address holds `max_per_ip` already.
    IpFull,
}

#[derive(Debug)]
pub struct Registry {
    clock: Clock,
    limits: Limits,
    members: HashSet<Entry>,
    /// Registered clients per IP address, for `max_per_ip`.
    per_ip: HashMap<IpAddr, usize>,
    /// The member list as the fan-out last took it; None after a join or a leave.
    snapshot: Option<Members>,
}

// An `Entry` is hashed and compared by its member's address, which never changes; what
// changes inside it (atomics) is not part of the key.
#[allow(clippy::mutable_key_type)]
impl Registry {
    /// A client not heard from for more than `interval` is expired.
    pub fn new(interval: Duration, limits: Limits) -> Self {
        Registry {
            clock: Clock {
                epoch: Instant::now(),
                interval: u64::try_from(interval.as_nanos()).unwrap_or(u64::MAX),
            },
            limits,
            members: HashSet::new(),
            per_ip: HashMap::new(),
            snapshot: None,
        }
    }

    fn forget(per_ip: &mut HashMap<IpAddr, usize>, ip: IpAddr) {
        if let Some(n) = per_ip.get_mut(&ip) {
            *n -= 1;
            if *n == 0 {
                per_ip.remove(&ip);
            }
        }
    }

    pub fn clock(&self) -> Clock {
        self.clock
    }

    /// Marks `addr` alive at `now`, having sent to `local` and done `activity`, registering it
    /// if the limits allow. Nothing already registered is disturbed by a refusal.
    pub fn touch(
        &mut self,
        addr: SocketAddr,
        local: Option<IpAddr>,
        now: Instant,
        activity: Activity,
    ) -> Touch {
        let stamp = self.clock.stamp(now);
        if let Some(Entry(member)) = self.members.get(&addr) {
            if member.local == local {
                member.heard(stamp, activity);
                return Touch::Refreshed;
            }
            // Rare (a client that changed the server address it sends to): the member is
            // replaced, figures and all, and the fan-out's list rebuilt, as for a join.
            let moved = Member {
                joined: member.joined,
                messages: AtomicU64::new(member.messages.load(Ordering::Relaxed)),
                bytes: AtomicU64::new(member.bytes.load(Ordering::Relaxed)),
                heartbeats: AtomicU64::new(member.heartbeats.load(Ordering::Relaxed)),
                pause: AtomicU64::new(member.pause.load(Ordering::Relaxed) & !PAUSED),
                ..Member::new(addr, local, stamp)
            };
            moved.heard(stamp, activity);
            self.members.replace(Entry(Arc::new(moved)));
            self.snapshot = None;
            return Touch::Refreshed;
        }
        if self.members.len() >= self.limits.max_clients {
            return Touch::Full;
        }
        let from_ip = self.per_ip.entry(addr.ip()).or_default();
        if *from_ip >= self.limits.max_per_ip {
            return Touch::IpFull;
        }
        *from_ip += 1;
        let member = Member::new(addr, local, stamp);
        member.heard(stamp, activity);
        self.members.insert(Entry(Arc::new(member)));
        self.snapshot = None;
        Touch::Joined
    }

    /// Removes `addr`, giving back its member if it was registered.
    pub fn remove(&mut self, addr: SocketAddr) -> Option<Arc<Member>> {
        let removed = self.members.take(&addr).map(|e| e.0);
        if removed.is_some() {
            Self::forget(&mut self.per_ip, addr.ip());
            self.snapshot = None;
        }
        removed
    }

    /// Skips sends to `addr` until it is next heard from, for a second at most; unless it is
    /// paused now, or was heard from after a pause within the last `interval`: it has shown it
    /// is there, so a stream of reports (forged, say) costs it at most a second an interval.
    /// Returns true if it paused a registered client.
    pub fn pause(&self, addr: SocketAddr, now: Instant) -> bool {
        let Some(Entry(member)) = self.members.get(&addr) else {
            return false;
        };
        let stamp = self.clock.stamp(now);
        let last = member.pause.load(Ordering::Relaxed);
        let since = stamp.saturating_sub(last & !PAUSED);
        let answered = last != 0 && last & PAUSED == 0 && since < self.clock.interval;
        if member.is_paused(stamp) || answered {
            return false;
        }
        // Stamps count nanoseconds from the epoch: the top bit is free for centuries.
        member.pause.store(stamp.max(1) | PAUSED, Ordering::Relaxed);
        true
    }

    /// Removes every client silent for more than `interval` at `now`; appends them to `expired`.
    pub fn expire(&mut self, now: Instant, expired: &mut Vec<SocketAddr>) {
        let (clock, stamp, before) = (self.clock, self.clock.stamp(now), expired.len());
        let per_ip = &mut self.per_ip;
        self.members.retain(|Entry(member)| {
            let live = clock.is_live(member, stamp);
            if !live {
                expired.push(member.addr);
                Self::forget(per_ip, member.addr.ip());
            }
            live
        });
        if expired.len() > before {
            self.snapshot = None;
        }
    }

    /// Every registered member, shared. Costs an `Arc` clone unless the membership changed since
    /// the last call; the caller checks liveness with [`Clock::is_live`].
    pub fn members(&mut self) -> Members {
        let members = &self.members;
        Arc::clone(
            self.snapshot
                .get_or_insert_with(|| members.iter().map(|e| Arc::clone(&e.0)).collect()),
        )
    }

    /// Every live client's figures.
    pub fn peers(&self, now: Instant) -> Vec<Peer> {
        let (clock, stamp) = (self.clock, self.clock.stamp(now));
        self.members
            .iter()
            .map(|e| &e.0)
            .filter(|m| clock.is_live(m, stamp))
            .map(|m| Peer {
                addr: m.addr,
                joined: clock.instant(m.joined),
                last_seen: clock.instant(m.last_seen.load(Ordering::Relaxed)),
                messages: m.messages.load(Ordering::Relaxed),
                bytes: m.bytes.load(Ordering::Relaxed),
                heartbeats: m.heartbeats.load(Ordering::Relaxed),
            })
            .collect()
    }

    pub fn len(&self) -> usize {
        self.members.len()
    }

    pub fn is_empty(&self) -> bool {
        self.members.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(port: u16) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], port))
    }

    const ROOMY: Limits = Limits {
        max_clients: 1000,
        max_per_ip: 1000,
    };

    fn live_addrs(r: &mut Registry, now: Instant) -> Vec<SocketAddr> {
        let (clock, stamp) = (r.clock(), r.clock().stamp(now));
        let mut v: Vec<_> = r
            .members()
            .iter()
            .filter(|m| clock.is_live(m, stamp))
            .map(|m| m.addr)
            .collect();
        v.sort();
        v
    }

    #[test]
    fn touch_registers_once_and_refreshes() {
        let mut r = Registry::new(Duration::from_secs(10), ROOMY);
        let t0 = Instant::now();
        assert_eq!(
            r.touch(addr(1), None, t0, Activity::Heartbeat),
            Touch::Joined
        );
        let t5 = t0 + Duration::from_secs(5);
        assert_eq!(
            r.touch(addr(1), None, t5, Activity::Heartbeat),
            Touch::Refreshed
        );
        assert_eq!(r.len(), 1);
        let peers = r.peers(t5);
        assert_eq!(peers.len(), 1);
        assert_eq!(peers[0].addr, addr(1));
        assert!(peers[0].last_seen.duration_since(t5) < Duration::from_micros(1));
    }

    #[test]
    fn remove_reports_whether_registered() {
        let mut r = Registry::new(Duration::from_secs(10), ROOMY);
        r.touch(addr(1), None, Instant::now(), Activity::Heartbeat);
        assert!(r.remove(addr(1)).is_some());
        assert!(r.remove(addr(1)).is_none());
        assert!(r.is_empty());
    }

    #[test]
    fn expiry_is_strictly_after_the_interval() {
        let interval = Duration::from_secs(10);
        let mut r = Registry::new(interval, ROOMY);
        let t0 = Instant::now();
        r.touch(addr(1), None, t0, Activity::Heartbeat);
        r.touch(
            addr(2),
            None,
            t0 + Duration::from_secs(3),
            Activity::Heartbeat,
        );
        let mut expired = Vec::new();

        // Exactly `interval` of silence is still alive: the tutorial drops at `> interval`.
        r.expire(t0 + interval, &mut expired);
        assert!(expired.is_empty());
        assert_eq!(live_addrs(&mut r, t0 + interval), vec![addr(1), addr(2)]);

        let later = t0 + interval + Duration::from_nanos(1);
        // The fan-out leaves the silent one out before any sweep has run...
        assert_eq!(live_addrs(&mut r, later), vec![addr(2)]);
        assert_eq!(r.peers(later).len(), 1);
        // ...and the sweep removes it.
        r.expire(later, &mut expired);
        assert_eq!(expired, vec![addr(1)]);
        assert_eq!(r.len(), 1);
    }

    #[test]
    fn the_member_list_is_rebuilt_only_when_membership_changes() {
        let mut r = Registry::new(Duration::from_secs(10), ROOMY);
        let t0 = Instant::now();
        r.touch(addr(1), None, t0, Activity::Heartbeat);
        let first = r.members();
        r.touch(
            addr(1),
            None,
            t0 + Duration::from_secs(1),
            Activity::Heartbeat,
        ); // a heartbeat
        assert!(Arc::ptr_eq(&first, &r.members()));
        r.touch(addr(2), None, t0, Activity::Heartbeat);
        let second = r.members();
        assert!(!Arc::ptr_eq(&first, &second));
        assert_eq!(second.len(), 2);
        r.remove(addr(1));
        assert_eq!(r.members().len(), 1);
        // A heartbeat is seen through a snapshot taken before it.
        let held = r.members();
        r.touch(
            addr(2),
            None,
            t0 + Duration::from_secs(9),
            Activity::Heartbeat,
        );
        let clock = r.clock();
        assert!(clock.is_live(&held[0], clock.stamp(t0 + Duration::from_secs(19))));
    }

    #[test]
    fn a_member_keeps_the_local_address_it_last_sent_to() {
        let mut r = Registry::new(Duration::from_secs(10), ROOMY);
        let t0 = Instant::now();
        let (first, second) = ("127.0.0.2".parse().ok(), "127.0.0.3".parse().ok());
        assert_eq!(
            r.touch(addr(1), first, t0, Activity::Heartbeat),
            Touch::Joined
        );
        let before = r.members();
        assert_eq!(before[0].local, first);
        // The same address: nothing to rebuild.
        r.touch(addr(1), first, t0, Activity::Heartbeat);
        assert!(Arc::ptr_eq(&before, &r.members()));
        // Another one: the fan-out's list is rebuilt with it, the client still registered once.
        let t1 = t0 + Duration::from_secs(1);
        assert_eq!(
            r.touch(addr(1), second, t1, Activity::Heartbeat),
            Touch::Refreshed
        );
        let after = r.members();
        assert_eq!((after.len(), after[0].local), (1, second));
        assert!(r.peers(t1)[0].last_seen.duration_since(t1) < Duration::from_micros(1));
        assert_eq!(r.len(), 1);
    }

    #[test]
    fn caps_refuse_newcomers_and_disturb_nobody() {
        let limits = Limits {
            max_clients: 3,
            max_per_ip: 2,
        };
        let mut r = Registry::new(Duration::from_secs(10), limits);
        let t0 = Instant::now();
        let other_ip = SocketAddr::from(([127, 0, 0, 2], 1));
        assert_eq!(
            r.touch(addr(1), None, t0, Activity::Heartbeat),
            Touch::Joined
        );
        assert_eq!(
            r.touch(addr(2), None, t0, Activity::Heartbeat),
            Touch::Joined
        );
        assert_eq!(
            r.touch(addr(3), None, t0, Activity::Heartbeat),
            Touch::IpFull
        );
        assert_eq!(
            r.touch(other_ip, None, t0, Activity::Heartbeat),
            Touch::Joined
        );
        assert_eq!(
            r.touch(
                SocketAddr::from(([127, 0, 0, 3], 1)),
                None,
                t0,
                Activity::Heartbeat
            ),
            Touch::Full
        );
        // Those registered are still refreshed at the cap.
        assert_eq!(
            r.touch(addr(1), None, t0, Activity::Heartbeat),
            Touch::Refreshed
        );
        assert_eq!(r.len(), 3);
        // A leave and an expiry each free a place for that IP.
        assert!(r.remove(addr(1)).is_some());
        assert_eq!(
            r.touch(addr(3), None, t0, Activity::Heartbeat),
            Touch::Joined
        );
        let mut expired = Vec::new();
        r.expire(t0 + Duration::from_secs(11), &mut expired);
        assert_eq!(expired.len(), 3);
        assert!(r.per_ip.is_empty());
    }

    #[test]
    fn counters_follow_each_kind_of_datagram_and_a_pause_lasts_until_the_next() {
        let mut r = Registry::new(Duration::from_secs(10), ROOMY);
        let t0 = Instant::now();
        assert_eq!(
            r.touch(addr(1), None, t0, Activity::Register),
            Touch::Joined
        );
        let t1 = t0 + Duration::from_secs(1);
        r.touch(addr(1), None, t1, Activity::Heartbeat);
        r.touch(addr(1), None, t1, Activity::Message { bytes: 5 });
        r.touch(addr(1), None, t1, Activity::Message { bytes: 7 });
        r.touch(addr(1), None, t1, Activity::Register);
        // A member that moved to another local address keeps its figures.
        let t2 = t0 + Duration::from_secs(2);
        r.touch(addr(1), "127.0.0.2".parse().ok(), t2, Activity::Heartbeat);
        let peers = r.peers(t2);
        let expected = Peer {
            addr: addr(1),
            joined: t0,
            last_seen: t2,
            messages: 2,
            bytes: 12,
            heartbeats: 2,
        };
        let close =
            |a: Instant, b: Instant| a.max(b).duration_since(a.min(b)) < Duration::from_micros(1);
        assert_eq!(peers.len(), 1);
        assert!(close(peers[0].joined, t0) && close(peers[0].last_seen, t2));
        assert_eq!(
            Peer {
                joined: t0,
                last_seen: t2,
                ..peers[0].clone()
            },
            expected
        );
        // A pause holds until the member is heard from, whatever it sends.
        let clock = r.clock();
        let stamp = |t: Instant| clock.stamp(t);
        assert!(r.pause(addr(1), t2));
        assert!(!r.pause(addr(1), t2), "already paused");
        assert!(!r.pause(addr(2), t2), "not registered");
        assert!(r.members()[0].is_paused(stamp(t2)));
        r.touch(addr(1), "127.0.0.2".parse().ok(), t2, Activity::Register);
        assert!(!r.members()[0].is_paused(stamp(t2)));
        // Heard from after a pause: no other pause within the interval, moved or not.
        let t3 = t2 + Duration::from_secs(9);
        assert!(!r.pause(addr(1), t3));
        r.touch(addr(1), "127.0.0.3".parse().ok(), t3, Activity::Heartbeat);
        assert!(!r.pause(addr(1), t3));
        assert!(!r.members()[0].is_paused(stamp(t3)));
        let t4 = t2 + Duration::from_secs(10);
        assert!(r.pause(addr(1), t4));
        // A second at most; one not heard from may then be paused again at once.
        let second = Duration::from_secs(1);
        assert!(r.members()[0].is_paused(stamp(t4 + second - Duration::from_nanos(1))));
        assert!(!r.members()[0].is_paused(stamp(t4 + second)));
        assert!(r.pause(addr(1), t4 + second));
        // The silent are not peers.
        assert!(r.peers(t3 + Duration::from_secs(11)).is_empty());
    }
}
