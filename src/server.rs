//! The chat server: a receiver thread that classifies datagrams and keeps the client table, and
//! a fan-out thread that sends each broadcast to every live client, joined by a bounded channel.
//!
//! A small fan-out with nothing queued ahead of it is sent by the receiver itself: handing it to
//! the other thread would cost more in wake-ups than the send (on 2 cores, about a quarter of the
//! message rate). Every send happens under one lock, and the receiver sends only when the queue
//! is empty, so broadcasts leave in the order their messages arrived.

use crossbeam_channel::{select, Receiver, Select, Sender};
use log::{debug, info};
use std::net::{SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use crate::auth::Keys;
use crate::error::{Error, Result};
use crate::net;
use crate::protocol::{self, Datagram, Validated};
use crate::ratelimit::RateLimiter;
use crate::registry::{Clock, Limits, Member, Registry, Touch};
use crate::throttle::{throttled, Throttle};
use crate::worker::{lock, Stop, Workers};

/// Broadcast datagrams, built once, in the order their messages arrived.
type Job = Vec<Vec<u8>>;

/// Jobs (one per received batch) waiting for the fan-out thread. When it falls this far behind,
/// the receiver waits, and new datagrams queue in the kernel (which drops and counts them)
/// instead of in memory.
const FANOUT_QUEUE: usize = 64;
/// Jobs sent out together in one round of `sendmmsg` calls.
const FANOUT_ROUND: usize = 16;
/// Datagrams read per `recvmmsg` call.
const RECV_BATCH: usize = 32;
/// Deliveries (broadcasts times live clients) the receiver sends itself rather than hand over.
const INLINE_FANOUT: usize = 256;
/// Deliveries in one round worth splitting between `fanout_threads` threads.
const PARALLEL_FANOUT: usize = 1024;
/// The largest UDP payload over IPv4, the default for `max_datagram`.
pub const MAX_DATAGRAM: usize = 65_507;

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
        }
    }

    /// How often silent clients are swept out: often enough that the table never lists one for
    /// long past its interval, rarely enough to cost nothing.
    fn sweep_period(&self) -> Duration {
        (self.interval / 4).clamp(Duration::from_millis(10), Duration::from_millis(250))
    }
}

/// The server's counters by name, in a fixed order; all monotonic but `clients`.
pub type Stats = Vec<(&'static str, u64)>;

/// Declares the counters once: the struct of atomics and the names `stats()` reports them by.
macro_rules! counters {
    ($($(#[doc = $doc:literal])* $name:ident,)*) => {
        #[derive(Default)]
        struct Counters {
            $($(#[doc = $doc])* $name: AtomicU64,)*
        }

        impl Counters {
            fn snapshot(&self) -> Stats {
                vec![$((stringify!($name), self.$name.load(Relaxed)),)*]
            }
        }
    };
}

counters! {
    /// Datagrams read from the socket.
    received,
    /// Messages relayed (each once, however many clients it went to).
    broadcasts,
    /// Datagrams sent to clients by broadcasts.
    deliveries,
    /// Deliveries that failed.
    send_errors,
    /// Longer than `max_datagram`.
    dropped_oversize,
    /// From a new client while `max_clients` or `max_per_ip` were reached.
    dropped_over_cap,
    /// Over a source's `rate_limit`.
    dropped_rate_limited,
    /// Validated mode: a cookie or token that is not valid for its source.
    dropped_unvalidated,
    /// Validated mode: neither a handshake step nor a tokened datagram.
    dropped_malformed,
    /// From port 0, or an unspecified, broadcast or multicast address: forged.
    dropped_bad_source,
    /// Validated mode: challenges sent.
    challenges,
    /// Clients dropped for silence.
    expired,
}

struct Shared {
    socket: UdpSocket,
    local: SocketAddr,
    config: ServerConfig,
    registry: Mutex<Registry>,
    counters: Counters,
    /// Validated mode's keys.
    keys: Option<Keys>,
    /// Held for every fan-out, by whichever thread sends it: this is what keeps order.
    sending: Mutex<Sending>,
}

/// What a fan-out needs besides the socket: reused `sendmmsg` buffers, the error log's throttle.
#[derive(Default)]
struct Sending {
    outbox: net::Outbox,
    errors: Throttle,
}

impl Shared {
    /// Sends every datagram of `jobs` to every live client. Expiry applies here, per member,
    /// even between sweeps. Call it holding `sending`. A large round is split between
    /// `fanout_threads` threads by client, so each client still gets its datagrams in order.
    fn fan_out<'a>(
        &self,
        sending: &mut Sending,
        jobs: impl Iterator<Item = &'a Vec<u8>>,
        stop: &Stop,
    ) {
        let (members, clock) = {
            let mut registry = lock(&self.registry);
            (registry.members(), registry.clock())
        };
        let datagrams: Vec<&[u8]> = jobs.map(Vec::as_slice).collect();
        self.counters
            .broadcasts
            .fetch_add(datagrams.len() as u64, Relaxed);
        let now = clock.stamp(Instant::now());
        let threads = self.config.fanout_threads;
        if threads < 2 || members.len() * datagrams.len() < PARALLEL_FANOUT {
            return self.send_to_part(sending, &datagrams, &members, (clock, now), stop);
        }
        let mut parts = members.chunks(members.len().div_ceil(threads));
        let first = parts.next().unwrap_or_default();
        std::thread::scope(|scope| {
            for part in parts {
                let datagrams = &datagrams;
                scope.spawn(move || {
                    self.send_to_part(&mut Sending::default(), datagrams, part, (clock, now), stop)
                });
            }
            self.send_to_part(sending, &datagrams, first, (clock, now), stop);
        });
    }

    fn send_to_part(
        &self,
        sending: &mut Sending,
        datagrams: &[&[u8]],
        part: &[Arc<Member>],
        (clock, now): (Clock, u64),
        stop: &Stop,
    ) {
        let pairs = datagrams.iter().flat_map(|d| {
            part.iter()
                .filter(move |m| clock.is_live(m, now))
                .map(move |m| (*d, m.addr))
        });
        let errors = &mut sending.errors;
        let sent = net::send_each(&self.socket, &mut sending.outbox, pairs, stop, |addr, e| {
            throttled!(errors, warn, "cannot send to {addr}: {e}");
        });
        self.counters.deliveries.fetch_add(sent.delivered, Relaxed);
        self.counters.send_errors.fetch_add(sent.failed, Relaxed);
    }

    /// Drops silent clients and logs them. The lock is released before logging: a log record
    /// may wait for the GIL, and a Python thread holding the GIL may be waiting for this lock.
    fn expire(&self, now: Instant, expired: &mut Vec<SocketAddr>) {
        expired.clear();
        lock(&self.registry).expire(now, expired);
        self.counters
            .expired
            .fetch_add(expired.len() as u64, Relaxed);
        for addr in expired.iter() {
            info!("{addr} expired after {:?} of silence", self.config.interval);
        }
    }
}

pub struct Server {
    shared: Arc<Shared>,
    workers: Workers,
    fanout: Sender<Job>,
}

impl Server {
    /// Binds and starts the receiver and fan-out threads.
    pub fn start(config: ServerConfig) -> Result<Server> {
        let socket = net::bind(config.addr, config.rcvbuf)
            .map_err(|e| Error::io(format!("cannot bind {}", config.addr), e))?;
        let keys = match config.validate {
            true => Some(Keys::new().map_err(|e| Error::io("cannot make a secret key", e))?),
            false => None,
        };
        let local = socket
            .local_addr()
            .map_err(|e| Error::io("cannot read bound address", e))?;
        let shared = Arc::new(Shared {
            socket,
            local,
            registry: Mutex::new(Registry::new(config.interval, config.limits)),
            config,
            counters: Counters::default(),
            keys,
            sending: Mutex::default(),
        });
        let workers = Workers::new()?;
        let (fanout, jobs) = crossbeam_channel::bounded::<Job>(FANOUT_QUEUE);
        let server = Server {
            shared: Arc::clone(&shared),
            workers,
            fanout: fanout.clone(),
        };
        {
            let (shared, stop) = (Arc::clone(&shared), Arc::clone(server.workers.stop()));
            server.workers.spawn("udpchat-srv-rx", move || {
                let mut inbox = net::Inbox::new(RECV_BATCH, shared.config.max_datagram);
                let mut handler = Receive {
                    shared: &shared,
                    stop: &stop,
                    fanout: &fanout,
                    job: Job::new(),
                    limiter: shared.config.rate_limit.map(|rate| {
                        let sources = shared.config.limits.max_clients.max(1024);
                        (RateLimiter::new(rate, sources), Instant::now())
                    }),
                    reply: Vec::new(),
                    warnings: Throttle::default(),
                    icmp: Throttle::default(),
                };
                net::receive_loop(&shared.socket, &mut inbox, &stop, &mut handler);
            })?;
        }
        {
            let (shared, stop) = (Arc::clone(&shared), Arc::clone(server.workers.stop()));
            server
                .workers
                .spawn("udpchat-srv-tx", move || fan_out(&shared, &stop, &jobs))?;
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

    pub fn local_addr(&self) -> SocketAddr {
        self.shared.local
    }

    pub fn running(&self) -> bool {
        self.workers.running()
    }

    /// Live clients with the wall-clock time each was last heard from.
    pub fn clients(&self) -> Vec<(SocketAddr, SystemTime)> {
        let now = Instant::now();
        let wall = SystemTime::now();
        lock(&self.shared.registry)
            .snapshot(now)
            .into_iter()
            .map(|(addr, seen)| (addr, wall - now.saturating_duration_since(seen)))
            .collect()
    }

    /// Sends `payload` to every live client as a message from the server's own address.
    pub fn broadcast(&self, payload: &[u8]) -> Result<()> {
        self.workers.check()?;
        let mut datagram = Vec::new();
        protocol::write_ack(&mut datagram, self.shared.local, payload);
        let stop = self.workers.stop();
        select! {
            send(self.fanout, vec![datagram]) -> sent => sent.map_err(|_| Error::NotRunning),
            recv(stop.channel()) -> _ => Err(Error::NotRunning),
        }?;
        Ok(())
    }

    /// The counters, the kernel's count of datagrams it dropped for want of buffer space, and
    /// the clients registered now.
    pub fn stats(&self) -> Stats {
        let mut stats = self.shared.counters.snapshot();
        stats.push((
            "kernel_drops",
            net::kernel_drops(&self.shared.socket).unwrap_or(0),
        ));
        stats.push(("clients", lock(&self.shared.registry).len() as u64));
        stats
    }

    /// `Err` if a core thread panicked.
    pub fn failure(&self) -> Result<()> {
        self.workers.failure()
    }

    /// Ends both threads, then sends `end` to every live client. Idempotent; call it with the
    /// GIL released.
    pub fn stop(&self) {
        if !self.workers.stop_and_join() {
            return;
        }
        // Both threads are gone, so nothing can follow the `end`.
        let shared = &self.shared;
        let mut ended = 0;
        let mut end = Vec::new();
        for (addr, _) in self.clients() {
            end.clear();
            match &shared.keys {
                Some(keys) => {
                    protocol::write_keyed(&mut end, protocol::END_KEYED, &keys.token(addr))
                }
                None => end.extend_from_slice(protocol::END),
            }
            match net::send(&shared.socket, &end, Some(addr), None) {
                Ok(()) => ended += 1,
                Err(e) => debug!("cannot send end to {addr}: {e}"),
            }
        }
        info!(
            "stopped serving on {}; sent end to {ended} clients",
            shared.local
        );
    }
}

/// The receiver: control words update the table; each batch's messages go to the fan-out thread
/// as one job, their broadcast datagrams built once.
struct Receive<'a> {
    shared: &'a Shared,
    stop: &'a Stop,
    fanout: &'a Sender<Job>,
    job: Job,
    /// The per-source rate limiter and when it was last swept.
    limiter: Option<(RateLimiter, Instant)>,
    /// Validated mode's replies, built here.
    reply: Vec<u8>,
    warnings: Throttle,
    icmp: Throttle,
}

impl Receive<'_> {
    /// A datagram in the open protocol (or the body of a tokened one).
    fn open(&mut self, data: &[u8], from: SocketAddr, now: Instant) {
        match protocol::classify(data) {
            Datagram::Empty => {}
            Datagram::Register | Datagram::Heartbeat => {
                self.touch(from, now);
            }
            Datagram::Quit => {
                if lock(&self.shared.registry).remove(from) {
                    info!("{from} left");
                }
            }
            Datagram::Message(payload) => {
                // A source the table turns away is not relayed either.
                if self.touch(from, now) {
                    let mut datagram = Vec::new();
                    protocol::write_ack(&mut datagram, from, payload);
                    self.job.push(datagram);
                }
            }
        }
    }

    /// Marks `from` alive, registering it if the limits allow; false if they did not.
    fn touch(&mut self, from: SocketAddr, now: Instant) -> bool {
        let touch = lock(&self.shared.registry).touch(from, now);
        match touch {
            Touch::Refreshed => true,
            Touch::Joined => {
                info!("{from} joined");
                true
            }
            Touch::Full | Touch::IpFull => {
                self.shared.counters.dropped_over_cap.fetch_add(1, Relaxed);
                let limits = self.shared.config.limits;
                let why = match touch {
                    Touch::Full => format!("max_clients ({}) reached", limits.max_clients),
                    _ => format!(
                        "max_per_ip ({}) reached for {}",
                        limits.max_per_ip,
                        from.ip()
                    ),
                };
                throttled!(self.warnings, warn, "refused {from}: {why}");
                false
            }
        }
    }

    /// A datagram to a validated-mode server.
    fn validated(&mut self, keys: &Keys, data: &[u8], from: SocketAddr, now: Instant) {
        match protocol::classify_validated(data) {
            Validated::Hello => self.challenge(keys, data.len(), from, now),
            Validated::Answer(cookie) if keys.check_cookie(from, cookie, now) => {
                if self.touch(from, now) {
                    self.reply.clear();
                    protocol::write_keyed(&mut self.reply, protocol::WELCOME, &keys.token(from));
                    self.send_reply(from);
                }
            }
            Validated::Tokened { token, body } if keys.check_token(from, token) => {
                self.open(body, from, now)
            }
            other => {
                let counters = &self.shared.counters;
                let counter = match other {
                    Validated::Other => &counters.dropped_malformed,
                    _ => &counters.dropped_unvalidated,
                };
                counter.fetch_add(1, Relaxed);
                // A client whose token is stale (the server restarted) learns so and registers
                // again; the challenge is never longer than what came in.
                self.challenge(keys, data.len(), from, now);
            }
        }
    }

    /// Sends a challenge, keeping no state, and only in reply to at least as many bytes.
    fn challenge(&mut self, keys: &Keys, received: usize, from: SocketAddr, now: Instant) {
        if received < protocol::CHALLENGE_LEN {
            return;
        }
        self.reply.clear();
        protocol::write_keyed(
            &mut self.reply,
            protocol::CHALLENGE,
            &keys.cookie(from, now),
        );
        self.shared.counters.challenges.fetch_add(1, Relaxed);
        self.send_reply(from);
    }

    fn send_reply(&mut self, to: SocketAddr) {
        if let Err(e) = net::send(&self.shared.socket, &self.reply, Some(to), Some(self.stop)) {
            self.shared.counters.send_errors.fetch_add(1, Relaxed);
            throttled!(self.warnings, warn, "cannot answer {to}: {e}");
        }
    }
}

impl net::Handler for Receive<'_> {
    fn datagram(&mut self, data: &[u8], from: SocketAddr, cut: bool) {
        let shared = self.shared;
        let counters = &shared.counters;
        counters.received.fetch_add(1, Relaxed);
        if !protocol::is_valid_peer(from) {
            counters.dropped_bad_source.fetch_add(1, Relaxed);
            throttled!(
                self.warnings,
                warn,
                "dropped a datagram from {from}: not an address to answer"
            );
            return;
        }
        let now = Instant::now();
        if let Some((limiter, _)) = &mut self.limiter {
            if !limiter.allow(from.ip(), now) {
                counters.dropped_rate_limited.fetch_add(1, Relaxed);
                return;
            }
        }
        if cut {
            counters.dropped_oversize.fetch_add(1, Relaxed);
            let max = shared.config.max_datagram;
            throttled!(
                self.warnings,
                warn,
                "dropped a datagram from {from}: more than {max} bytes"
            );
            return;
        }
        match &shared.keys {
            None => self.open(data, from, now),
            Some(keys) => self.validated(keys, data, from, now),
        }
    }

    fn batch_done(&mut self) {
        if let Some((limiter, swept)) = &mut self.limiter {
            if swept.elapsed() >= Duration::from_secs(1) {
                *swept = Instant::now();
                limiter.sweep(*swept);
            }
        }
        if self.job.is_empty() {
            return;
        }
        let shared = self.shared;
        let small = self.job.len() * lock(&shared.registry).len() <= INLINE_FANOUT;
        if small && self.fanout.is_empty() {
            if let Ok(mut sending) = shared.sending.try_lock() {
                // Checked again under the lock: the fan-out thread empties the queue only while
                // holding it, so nothing queued can be overtaken.
                if self.fanout.is_empty() {
                    shared.fan_out(&mut sending, self.job.iter(), self.stop);
                    self.job.clear();
                    return;
                }
            }
        }
        let job = std::mem::take(&mut self.job);
        // Blocks while the fan-out queue is full (the kernel then queues and drops new
        // datagrams, and counts them), but never past stop.
        select! {
            send(self.fanout, job) -> _ => {},
            recv(self.stop.channel()) -> _ => {},
        }
    }

    fn icmp(&mut self, e: &std::io::Error) {
        throttled!(self.icmp, debug, "ICMP error on the server socket: {e}");
    }
}

/// The fan-out thread: sends each broadcast to every live client and sweeps out silent ones.
fn fan_out(shared: &Shared, stop: &Stop, jobs: &Receiver<Job>) {
    let sweep = crossbeam_channel::tick(shared.config.sweep_period());
    let mut round: Vec<Job> = Vec::new();
    let mut expired = Vec::new();
    let mut select = Select::new();
    let (on_jobs, on_sweep) = (select.recv(jobs), select.recv(&sweep));
    select.recv(stop.channel());
    loop {
        // Wait without taking: jobs are taken under the sending lock, which keeps their order
        // against the receiver's own sends.
        match select.ready() {
            i if i == on_jobs => {
                let mut sending = lock(&shared.sending);
                match jobs.try_recv() {
                    Ok(job) => round.push(job),
                    Err(e) if e.is_disconnected() => return,
                    Err(_) => continue,
                }
                // Whatever else is already queued goes out in the same system calls.
                round.extend(jobs.try_iter().take(FANOUT_ROUND));
                shared.fan_out(&mut sending, round.iter().flatten(), stop);
                round.clear();
            }
            i if i == on_sweep => {
                let _ = sweep.try_recv();
                shared.expire(Instant::now(), &mut expired);
            }
            _ => return, // stop
        }
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
