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

use crate::error::{Error, Result};
use crate::net;
use crate::protocol::{self, Datagram};
use crate::registry::{Clock, Member, Registry};
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
}

impl ServerConfig {
    /// How often silent clients are swept out: often enough that the table never lists one for
    /// long past its interval, rarely enough to cost nothing.
    fn sweep_period(&self) -> Duration {
        (self.interval / 4).clamp(Duration::from_millis(10), Duration::from_millis(250))
    }
}

/// Counters, all monotonic but `clients`.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Stats {
    pub received: u64,
    pub broadcasts: u64,
    pub deliveries: u64,
    pub send_errors: u64,
    pub dropped_oversize: u64,
    pub expired: u64,
    pub clients: u64,
}

#[derive(Default)]
struct Counters {
    received: AtomicU64,
    broadcasts: AtomicU64,
    deliveries: AtomicU64,
    send_errors: AtomicU64,
    dropped_oversize: AtomicU64,
    expired: AtomicU64,
}

struct Shared {
    socket: UdpSocket,
    local: SocketAddr,
    config: ServerConfig,
    registry: Mutex<Registry>,
    counters: Counters,
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

    fn touch(&self, from: SocketAddr, now: Instant) {
        let joined = lock(&self.registry).touch(from, now);
        if joined {
            info!("{from} joined");
        }
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
        let socket = net::bind(config.addr)
            .map_err(|e| Error::io(format!("cannot bind {}", config.addr), e))?;
        let local = socket
            .local_addr()
            .map_err(|e| Error::io("cannot read bound address", e))?;
        let shared = Arc::new(Shared {
            socket,
            local,
            registry: Mutex::new(Registry::new(config.interval)),
            config,
            counters: Counters::default(),
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
                    oversize: Throttle::default(),
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
        info!("serving on {local}, interval {:?}", shared.config.interval);
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

    pub fn stats(&self) -> Stats {
        let c = &self.shared.counters;
        Stats {
            received: c.received.load(Relaxed),
            broadcasts: c.broadcasts.load(Relaxed),
            deliveries: c.deliveries.load(Relaxed),
            send_errors: c.send_errors.load(Relaxed),
            dropped_oversize: c.dropped_oversize.load(Relaxed),
            expired: c.expired.load(Relaxed),
            clients: lock(&self.shared.registry).len() as u64,
        }
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
        for (addr, _) in self.clients() {
            match net::send(&shared.socket, protocol::END, Some(addr), None) {
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
    oversize: Throttle,
    icmp: Throttle,
}

impl net::Handler for Receive<'_> {
    fn datagram(&mut self, data: &[u8], from: SocketAddr, cut: bool) {
        let shared = self.shared;
        shared.counters.received.fetch_add(1, Relaxed);
        if cut {
            shared.counters.dropped_oversize.fetch_add(1, Relaxed);
            let max = shared.config.max_datagram;
            throttled!(
                self.oversize,
                warn,
                "dropped a datagram from {from}: more than {max} bytes"
            );
            return;
        }
        let now = Instant::now();
        match protocol::classify(data) {
            Datagram::Empty => {}
            Datagram::Register | Datagram::Heartbeat => shared.touch(from, now),
            Datagram::Quit => {
                if lock(&shared.registry).remove(from) {
                    info!("{from} left");
                }
            }
            Datagram::Message(payload) => {
                shared.touch(from, now);
                let mut datagram = Vec::new();
                protocol::write_ack(&mut datagram, from, payload);
                self.job.push(datagram);
            }
        }
    }

    fn batch_done(&mut self) {
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
            addr: "127.0.0.1:0".parse().unwrap(),
            interval: Duration::from_secs(10),
            max_datagram,
            fanout_threads: 1,
        })
        .unwrap()
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
        let stats = server.stats();
        assert_eq!(
            (stats.received, stats.broadcasts, stats.deliveries),
            (2, 1, 2)
        );
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
        assert_eq!(server.stats().dropped_oversize, 1);
        server.stop();
    }
}
