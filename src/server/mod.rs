//! The chat server: a receiver thread that classifies datagrams and keeps the client table, and
//! a fan-out thread that sends each broadcast to every live client, joined by a bounded channel.
//!
//! `mod.rs` holds the public `Server`, its configuration and its stop; each concern has a file:
//! `receive` (the receiver thread), `fanout` (sending broadcasts, the sweep), `validated` (the
//! handshake of validated mode), `events` (presence: joins, leaves, refusals), `unreachable`
//! (clients the kernel reports unreachable), `stats` (the counters), `cluster` (the Redis
//! channel several servers share).

mod cluster;
mod events;
mod fanout;
#[cfg(test)]
mod forged_tests;
mod loops;
mod receive;
mod stats;
mod unreachable;
mod validated;

use crossbeam_channel::{select, Receiver, Sender};
use log::{debug, info};
use std::net::{SocketAddr, UdpSocket};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use crate::auth::Keys;
use crate::error::{Error, Result};
use crate::lifecycle::Core;
use crate::net;
use crate::protocol;
use crate::registry::{Limits, Peer, Registry};
use crate::throttle::{throttled, Throttle};
use crate::wakeup::Wakeup;
use crate::worker::{lock, Workers};
use cluster::Cluster;
pub use cluster::{ClusterConfig, DEFAULT_CHANNEL};
use events::Presence;
pub use events::{Event, Kind, Reason};
use fanout::{Job, Sending, FANOUT_QUEUE};
use receive::{Receive, RECV_BATCH};
use stats::Counters;
pub use stats::Stats;

/// Python's logger for every record of the server's files: `udpchat.server`.
const LOG_TARGET: &str = "udpchat::server";

/// The largest UDP payload over IPv4, the default for `max_datagram`.
pub const MAX_DATAGRAM: usize = 65_507;

/// How long `stop()` may spend sending `end`, however many clients there are and however long
/// the socket buffer stays full: what is not sent by then is not sent.
pub const END_DEADLINE: Duration = Duration::from_millis(500);

#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub addr: SocketAddr,
    /// A client silent for more than this is dropped.
    pub interval: Duration,
    /// A datagram longer than this is dropped and counted, never relayed cut.
    pub max_datagram: usize,
    /// Threads that share a large fan-out. One is right for 2 cores (see BENCHMARKS.md).
    pub fanout_threads: usize,
    /// Clients registered at most, in all and per IP address.
    pub limits: Limits,
    /// Datagrams per second each source IP may send (bursts of one second's worth); None: any.
    pub rate_limit: Option<f64>,
    /// The kernel receive buffer to ask for (SO_RCVBUF), in bytes; None: the system default.
    pub rcvbuf: Option<usize>,
    /// Validated mode: a source registers only after proving it receives at its address, and
    /// every datagram it sends after that carries its token.
    pub validate: bool,
    /// Presence events queued at most, unread; past that they are dropped and counted.
    pub event_queue: usize,
    /// Act on the kernel's reports (ICMP) that a client is unreachable: drop it in open mode,
    /// pause sends to it in validated mode. Off for networks whose firewalls send spurious ones.
    pub drop_unreachable: bool,
    /// One chat with the other servers on this Redis channel; None: this server alone.
    pub cluster: Option<ClusterConfig>,
}

impl ServerConfig {
    /// The tutorial's interval and this library's defaults for everything else.
    pub const fn default_for(addr: SocketAddr) -> ServerConfig {
        ServerConfig {
            addr,
            interval: Duration::from_secs(10),
            max_datagram: MAX_DATAGRAM,
            fanout_threads: 1,
            limits: Limits {
                max_clients: 100_000,
                max_per_ip: 1024,
            },
            rate_limit: None,
            rcvbuf: None,
            validate: false,
            event_queue: 4096,
            drop_unreachable: true,
            cluster: None,
        }
    }

    /// How often silent clients are swept out: often enough that the table never lists one for
    /// long past its interval, rarely enough to cost nothing.
    fn sweep_period(&self) -> Duration {
        (self.interval / 4).clamp(Duration::from_millis(10), Duration::from_millis(250))
    }
}

/// What the server's threads and its Python object share.
struct Shared {
    socket: UdpSocket,
    local: SocketAddr,
    config: ServerConfig,
    /// The client table, and the events its changes make.
    presence: Mutex<Presence>,
    counters: Counters,
    /// Validated mode's keys.
    keys: Option<Keys>,
    /// Held for every fan-out, by whichever thread sends it: this is what keeps order.
    sending: Mutex<Sending>,
    /// Written when an event is queued for a waiting event loop, when the events queue closes,
    /// and as each thread ends, its panic kept (waiting loops then find the server dead).
    wakeup: Arc<Wakeup>,
    /// The Redis channel shared with other servers, if any: its threads hold it and nothing
    /// else of the server's, since a stop may leave them ending after the socket is closed.
    cluster: Option<Arc<Cluster>>,
}

pub struct Server {
    shared: Arc<Shared>,
    workers: Workers,
    fanout: Sender<Job>,
    events: Receiver<Event>,
    /// Set by the stop that said goodbye (`end`, the `stop` leaves); held through it, so a
    /// second stop returns only once the first is done.
    ended: Mutex<bool>,
}

impl Shared {
    /// Binds the socket and makes validated mode's keys: all a server is before its threads;
    /// the end of the events queue applications read; and the cluster publisher's queue.
    fn bind(
        config: ServerConfig,
    ) -> Result<(Shared, Receiver<Event>, Option<Receiver<cluster::Batch>>)> {
        let socket = net::bind(config.addr, config.rcvbuf)
            .map_err(|e| Error::io(format!("cannot bind {}", config.addr), e))?;
        // Bound to a wildcard address, the server answers each client from the address it
        // sent to. Bound to one address, that is the only source there is.
        if config.addr.ip().is_unspecified() {
            net::report_local_addresses(&socket)
                .map_err(|e| Error::io("cannot ask for datagrams' local addresses", e))?;
        }
        // Dead clients are found at the next send to them, not an interval later.
        if config.drop_unreachable {
            net::report_unreachable(&socket)
                .map_err(|e| Error::io("cannot ask for ICMP errors (IP_RECVERR)", e))?;
        }
        let keys = match config.validate {
            true => Some(Keys::new().map_err(|e| Error::io("cannot make a secret key", e))?),
            false => None,
        };
        let local = socket
            .local_addr()
            .map_err(|e| Error::io("cannot read bound address", e))?;
        let registry = Registry::new(config.interval, config.limits);
        let wakeup = Arc::new(Wakeup::new().map_err(|e| Error::io("cannot create an eventfd", e))?);
        let (presence, events) = Presence::new(registry, config.event_queue, Arc::clone(&wakeup));
        let (cluster, publications) = match config.cluster.clone() {
            Some(cluster) => {
                let (cluster, publications) = Cluster::new(cluster)?;
                (Some(Arc::new(cluster)), Some(publications))
            }
            None => (None, None),
        };
        let shared = Shared {
            socket,
            local,
            presence: Mutex::new(presence),
            config,
            counters: Counters::default(),
            keys,
            sending: Mutex::default(),
            wakeup,
            cluster,
        };
        Ok((shared, events, publications))
    }

    /// The `end` that closes `addr`'s membership: keyed with its token in validated mode, so a
    /// forged `end` cannot close anyone.
    fn end(&self, addr: SocketAddr) -> Vec<u8> {
        let mut end = Vec::new();
        match &self.keys {
            Some(keys) => protocol::write_keyed(&mut end, protocol::END_KEYED, &keys.token(addr)),
            None => end.extend_from_slice(protocol::END),
        }
        end
    }
}

impl Server {
    /// Binds and starts the receiver and fan-out threads.
    pub fn start(config: ServerConfig) -> Result<Server> {
        let (shared, events, publications) = Shared::bind(config)?;
        let shared = Arc::new(shared);
        let local = shared.local;
        let workers = Workers::new(Self::NAME, Arc::clone(&shared.wakeup))?;
        let (fanout, jobs) = crossbeam_channel::bounded::<Job>(FANOUT_QUEUE);
        let server = Server {
            shared: Arc::clone(&shared),
            workers,
            fanout: fanout.clone(),
            events,
            ended: Mutex::new(false),
        };
        fanout::start_helpers(&shared, &server.workers)?;
        {
            let (shared, stop) = (Arc::clone(&shared), Arc::clone(server.workers.stop()));
            server.workers.spawn("udpchat-srv-rx", move || {
                let mut inbox = net::Inbox::new(RECV_BATCH, shared.config.max_datagram);
                let mut handler = Receive::new(&shared, &stop, &fanout);
                net::receive_loop(&shared.socket, &mut inbox, &stop, &mut handler);
            })?;
        }
        {
            let (shared, stop) = (Arc::clone(&shared), Arc::clone(server.workers.stop()));
            server
                .workers
                .spawn("udpchat-srv-tx", move || fanout::run(&shared, &stop, &jobs))?;
        }
        if let (Some(cluster), Some(publications)) = (&shared.cluster, publications) {
            Self::start_cluster(
                cluster,
                &server.workers,
                publications,
                server.fanout.clone(),
            )?;
        }
        let mode = if shared.keys.is_some() {
            "validated"
        } else {
            "open"
        };
        info!(
            "serving on {local}, interval {:?}, {mode} mode",
            shared.config.interval
        );
        Ok(server)
    }

    /// The cluster's publisher and subscriber threads. They may be blocked in a connection
    /// attempt or a command for up to a second, so a stop does not wait for them to end: they
    /// hold no socket of the server's, which a new run may bind again at once.
    fn start_cluster(
        cluster: &Arc<Cluster>,
        workers: &Workers,
        publications: Receiver<cluster::Batch>,
        fanout: Sender<Job>,
    ) -> Result<()> {
        let (c, stop) = (Arc::clone(cluster), Arc::clone(workers.stop()));
        workers.spawn_lingering("udpchat-cluster-pub", move || {
            cluster::publish(&c, &stop, &publications);
        })?;
        let (c, stop) = (Arc::clone(cluster), Arc::clone(workers.stop()));
        workers.spawn_lingering("udpchat-cluster-sub", move || {
            cluster::subscribe(&c, &stop, &fanout);
        })
    }

    /// Live clients with the wall-clock time each was last heard from.
    pub fn clients(&self) -> Vec<(SocketAddr, SystemTime)> {
        self.peers()
            .into_iter()
            .map(|(peer, _, seen)| (peer.addr, seen))
            .collect()
    }

    /// Every live client's figures, in one consistent snapshot, with wall-clock times (joined,
    /// last seen).
    pub fn peers(&self) -> Vec<(Peer, SystemTime, SystemTime)> {
        let now = Instant::now();
        let wall = SystemTime::now();
        let at = |t: Instant| wall - now.saturating_duration_since(t);
        let peers = lock(&self.shared.presence).registry.peers(now);
        peers
            .into_iter()
            .map(|p| {
                let (joined, seen) = (at(p.joined), at(p.last_seen));
                (p, joined, seen)
            })
            .collect()
    }

    /// The events of this run, as they are queued: join, leave and refused. Closed (once read
    /// to the end) when the server has stopped.
    pub fn events(&self) -> &Receiver<Event> {
        &self.events
    }

    /// Written when an event is queued for a consumer that armed it, when the events queue
    /// closes, and when the server dies.
    pub fn wakeup(&self) -> &Arc<Wakeup> {
        &self.shared.wakeup
    }

    /// Removes `addr` now and sends it `end` (keyed in validated mode), with a `kicked` leave.
    /// False if it was not registered. No broadcast reaches it after this returns.
    pub fn kick(&self, addr: SocketAddr) -> Result<bool> {
        let shared = &self.shared;
        // An IPv6 socket names IPv4 clients by their mapped addresses, an IPv4 socket plainly.
        let addr = match addr {
            SocketAddr::V4(v4) if shared.local.is_ipv6() => {
                SocketAddr::new(v4.ip().to_ipv6_mapped().into(), v4.port())
            }
            SocketAddr::V6(v6) if shared.local.is_ipv4() => {
                SocketAddr::new(v6.ip().to_canonical(), v6.port())
            }
            addr => addr,
        };
        // Held while no broadcast is being sent, so none that took the member list before the
        // kick can reach the client after its `end`; and held by `stop` while it says goodbye,
        // so a kick comes wholly before it or finds the server stopped.
        let mut sending = lock(&shared.sending);
        self.workers.check()?;
        let member = {
            let mut presence = lock(&shared.presence);
            let member = presence.registry.remove(addr);
            if member.is_some() {
                presence.emit(Reason::Kicked, addr);
            }
            member
        };
        let Some(member) = member else {
            return Ok(false);
        };
        let end = shared.end(addr);
        // Not cut short by a stop fired meanwhile: the client is gone from the table, so this
        // is its only `end`.
        let until = net::Until {
            stop: None,
            deadline: Some(Instant::now() + END_DEADLINE),
        };
        let outbox = sending.outbox();
        let ends = [(end.as_slice(), addr, member.local)];
        net::send_each(&shared.socket, outbox, ends, until, |addr, e| {
            debug!(target: LOG_TARGET, "cannot send end to {addr}: {e}");
        });
        drop(sending);
        info!(target: LOG_TARGET, "{addr} kicked");
        Ok(true)
    }

    /// Sends `payload` to every live client as a message from the server's own address.
    /// `TooLong` if its broadcast would be longer than `protocol::MAX_BROADCAST`.
    pub fn broadcast(&self, payload: &[u8]) -> Result<()> {
        self.workers.check()?;
        let len = protocol::ack_len(self.shared.local, payload.len());
        if len > protocol::MAX_BROADCAST {
            return Err(Error::TooLong(format!(
                "a broadcast can be at most {} bytes with its `ack:` line; this one would be {len}",
                protocol::MAX_BROADCAST
            )));
        }
        let mut datagram = Vec::new();
        protocol::write_ack(&mut datagram, self.shared.local, payload);
        let stop = self.workers.stop();
        select! {
            send(self.fanout, vec![datagram]) -> sent => sent.map_err(|_| Error::NotRunning(Self::NAME)),
            recv(stop.channel()) -> _ => Err(Error::NotRunning(Self::NAME)),
        }?;
        if let Some(cluster) = &self.shared.cluster {
            cluster.publish(vec![cluster.envelope(self.shared.local, payload)]);
        }
        Ok(())
    }

    /// The counters, the kernel's count of datagrams it dropped for want of buffer space, and
    /// the clients registered now.
    pub fn stats(&self) -> Stats {
        let mut stats = self.shared.counters.snapshot();
        let (dropped, clients) = {
            let presence = lock(&self.shared.presence);
            (presence.dropped, presence.registry.len())
        };
        stats.push(("events_dropped", dropped));
        stats.push((
            "kernel_drops",
            net::kernel_drops(&self.shared.socket).unwrap_or(0),
        ));
        stats.push(("clients", clients as u64));
        if let Some(cluster) = &self.shared.cluster {
            cluster.stats(&mut stats);
        }
        stats
    }
}

impl Core for Server {
    const NAME: &'static str = "server";

    fn workers(&self) -> &Workers {
        &self.workers
    }

    fn local_addr(&self) -> SocketAddr {
        self.shared.local
    }

    /// Ends every thread, then sends `end` to every live client, from the address it sends to,
    /// through `sendmmsg`, within `END_DEADLINE`.
    fn stop(&self) {
        let mut ended = lock(&self.ended);
        // Joined here, or earlier by whatever made a thread panic; the goodbye is said once,
        // either way.
        self.workers.stop_and_join();
        if let Some(cluster) = &self.shared.cluster {
            cluster.disconnected();
        }
        if std::mem::replace(&mut *ended, true) {
            return;
        }
        // Every thread is gone, so nothing can follow the `end`. Those already silent leave as
        // at a sweep; every other member is sent its `end`, then leaves with reason `stop`.
        let shared = &self.shared;
        let _sending = lock(&shared.sending);
        shared.expire(Instant::now(), &mut Vec::new());
        let members = lock(&shared.presence).registry.members();
        let ends: Vec<Vec<u8>> = members.iter().map(|m| shared.end(m.addr)).collect();
        let ends = members
            .iter()
            .zip(&ends)
            .map(|(m, end)| (end.as_slice(), m.addr, m.local));
        let until = net::Until {
            stop: None,
            deadline: Some(Instant::now() + END_DEADLINE),
        };
        let mut errors = Throttle::default();
        let sent = net::send_each(
            &shared.socket,
            &mut net::Outbox::default(),
            ends,
            until,
            |addr, e| throttled!(errors, debug, target: LOG_TARGET, "cannot send end to {addr}: {e}"),
        );
        {
            let mut presence = lock(&shared.presence);
            for m in members.iter() {
                presence.registry.remove(m.addr);
                presence.emit(Reason::Stop, m.addr);
            }
            presence.close();
        }
        let unsent = match (members.len() as u64).saturating_sub(sent.delivered) {
            0 => String::new(),
            n => format!(" ({n} more could not be sent)"),
        };
        info!(
            "stopped serving on {}; sent end to {} clients{unsent}",
            shared.local, sent.delivered
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn peer() -> UdpSocket {
        let s = UdpSocket::bind("127.0.0.1:0").unwrap();
        s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        s
    }

    fn recv(s: &UdpSocket) -> Vec<u8> {
        let mut buf = [0u8; 70_000];
        let n = s.recv(&mut buf).unwrap();
        buf[..n].to_vec()
    }

    fn server(max_datagram: usize) -> Server {
        Server::start(ServerConfig {
            max_datagram,
            ..ServerConfig::default_for("127.0.0.1:0".parse().unwrap())
        })
        .unwrap()
    }

    fn stat(server: &Server, name: &str) -> u64 {
        server
            .stats()
            .into_iter()
            .find(|(n, _)| *n == name)
            .unwrap()
            .1
    }

    #[test]
    fn relays_to_every_client_and_ends_them_on_stop() {
        let server = server(MAX_DATAGRAM);
        let addr = server.local_addr();
        let (a, b) = (peer(), peer());
        b.send_to(b"reg", addr).unwrap();
        a.send_to(b" hi \n", addr).unwrap();
        let from = a.local_addr().unwrap();
        let expected = format!("ack: {} {}\nhi\n", from.ip(), from.port());
        assert_eq!(recv(&a), expected.as_bytes());
        assert_eq!(recv(&b), expected.as_bytes());
        assert_eq!(server.clients().len(), 2);
        server.stop();
        assert!(!server.running());
        assert_eq!(recv(&a), b"end");
        assert_eq!(recv(&b), b"end");
        let counts = ["received", "broadcasts", "deliveries"].map(|n| stat(&server, n));
        assert_eq!(counts, [2, 1, 2]);
    }

    #[test]
    fn a_message_too_long_to_relay_is_refused_once_and_counted() {
        let server = server(MAX_DATAGRAM);
        let addr = server.local_addr();
        let (a, b) = (peer(), peer());
        b.send_to(b"reg", addr).unwrap();
        let from = a.local_addr().unwrap();
        // The longest payload that fits with this sender's `ack:` line, and one byte more.
        let head = format!("ack: {} {}\n", from.ip(), from.port()).len();
        let fits = protocol::MAX_BROADCAST - head - 1;
        a.send_to(&vec![b'x'; fits + 1], addr).unwrap();
        a.send_to(&vec![b'y'; fits], addr).unwrap();
        let got = recv(&b);
        assert_eq!((got.len(), got[head]), (protocol::MAX_BROADCAST, b'y'));
        assert_eq!(stat(&server, "dropped_oversize"), 1);
        assert_eq!(stat(&server, "send_errors"), 0);
        // The server's own broadcast is refused at the call.
        let own = protocol::ack_len(addr, 0);
        let long = vec![b'z'; protocol::MAX_BROADCAST - own + 1];
        assert!(matches!(server.broadcast(&long), Err(Error::TooLong(_))));
        server.broadcast(&long[1..]).unwrap();
        assert_eq!(recv(&b).len(), protocol::MAX_BROADCAST);
        server.stop();
    }

    #[test]
    fn a_wildcard_server_answers_from_the_address_each_client_sent_to() {
        let server =
            Server::start(ServerConfig::default_for("0.0.0.0:0".parse().unwrap())).unwrap();
        let port = server.local_addr().port();
        // Connected sockets, as ChatClientUdp's: the kernel drops datagrams from anyone else.
        let clients: Vec<UdpSocket> = ["127.0.0.1", "127.0.0.2", "127.0.0.3"]
            .iter()
            .map(|ip| {
                let s = peer();
                s.connect((*ip, port)).unwrap();
                s.send(b"reg").unwrap();
                s
            })
            .collect();
        for _ in 0..500 {
            if server.clients().len() == clients.len() {
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        clients[2].send(b"hi").unwrap();
        for c in &clients {
            assert!(recv(c).ends_with(b"\nhi\n"));
        }
        server.stop();
        for c in &clients {
            assert_eq!(recv(c), b"end");
        }
    }

    #[test]
    fn stop_sends_end_in_batches_to_many_clients() {
        let mut config = ServerConfig::default_for("127.0.0.1:0".parse().unwrap());
        config.limits.max_per_ip = 10_000;
        let server = Server::start(config).unwrap();
        let addr = server.local_addr();
        let peers: Vec<UdpSocket> = (0..2500).map(|_| peer()).collect();
        // In bursts the receive buffer can hold; again for any the kernel dropped.
        for _ in 0..20 {
            let registered: Vec<SocketAddr> = server.clients().iter().map(|c| c.0).collect();
            if registered.len() == peers.len() {
                break;
            }
            for burst in peers.chunks(100) {
                for p in burst {
                    if !registered.contains(&p.local_addr().unwrap()) {
                        p.send_to(b"reg", addr).unwrap();
                    }
                }
                std::thread::sleep(Duration::from_millis(2));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        assert_eq!(server.clients().len(), peers.len());
        let t0 = Instant::now();
        server.stop();
        assert!(
            t0.elapsed() < END_DEADLINE + Duration::from_secs(1),
            "{:?}",
            t0.elapsed()
        );
        for p in &peers {
            assert_eq!(recv(p), b"end");
        }
    }

    #[test]
    fn oversize_datagrams_are_dropped_and_counted() {
        let server = server(100);
        let addr = server.local_addr();
        let a = peer();
        a.send_to(&[b'x'; 101], addr).unwrap();
        a.send_to(&[b'y'; 100], addr).unwrap();
        let mut expected = [b'y'; 101];
        expected[100] = b'\n';
        assert!(recv(&a).ends_with(&expected));
        assert_eq!(stat(&server, "dropped_oversize"), 1);
        server.stop();
    }
}
