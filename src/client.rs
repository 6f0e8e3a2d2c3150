//! The chat client: registers with `reg`, heartbeats every `interval` from its own thread, and
//! hands every datagram from the server to the caller through a queue of at most `max_queue`
//! messages, whose memory follows what it holds.
//!
//! It follows a validated-mode server without being told: its `reg`, heartbeats and `quit` are
//! padded (open servers strip the padding), so such a server can answer with a challenge; the
//! client returns the cookie, receives its token, and from then on every datagram carries it.
//! Messages sent before the token came are sent again with it.

use crossbeam_channel::{select, Receiver, Sender};
use log::{info, warn};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::error::{Error, Result};
use crate::lifecycle::Core;
use crate::net;
use crate::protocol::{self, TOKEN_LEN};
use crate::throttle::{throttled, Throttle};
use crate::wakeup::Wakeup;
use crate::worker::{lock, Stop, Workers};

/// The largest datagram UDP can carry (IPv6's limit); nothing from the server is ever cut.
const RECV_BUFFER: usize = 65_536;
/// Datagrams read per `recvmmsg` call.
const RECV_BATCH: usize = 16;
/// Messages sent this soon after start, before any token, are kept to send again once one comes:
/// a validated-mode server dropped them.
const HANDSHAKE_GRACE: Duration = Duration::from_secs(2);
const UNSENT_MAX: usize = 64;
/// How long after answering a challenge a welcome is taken.
const WELCOME_WAIT: Duration = Duration::from_secs(10);

#[derive(Debug, Clone)]
pub struct ClientConfig {
    /// The server's address.
    pub server: SocketAddr,
    /// Seconds between heartbeats.
    pub interval: Duration,
    /// Messages held for the caller; past this, new ones are dropped and counted. The queue
    /// takes memory for what it holds, not for this bound.
    pub max_queue: usize,
}

struct Shared {
    /// Connected to the server: the kernel drops datagrams from anyone else.
    socket: UdpSocket,
    started: Instant,
    /// Set when the server said `end`: the client then stops without sending `quit`.
    ended: AtomicBool,
    dropped: AtomicU64,
    /// When the server was last heard from, in nanoseconds since the Unix epoch; 0: never.
    last_heard: AtomicU64,
    /// Validated mode: the token, and what was sent before it came. One lock for both, so a
    /// message is either sent with the token or kept to be sent again when it comes.
    validation: Mutex<Validation>,
}

#[derive(Default)]
struct Validation {
    /// This client's token, once a validated-mode server has given one.
    token: Option<[u8; TOKEN_LEN]>,
    /// Messages sent before a token came, within `HANDSHAKE_GRACE` of start: a validated server
    /// dropped them, so they go again with the token. Emptied when the grace period ends (an open
    /// server never sends a token).
    unsent: Vec<Vec<u8>>,
    /// When this client last answered a challenge: a welcome is taken only within
    /// `WELCOME_WAIT` after that, so a forged welcome cannot swap in a bogus token at any time.
    answered: Option<Instant>,
}

impl Validation {
    /// `body` as this client sends it: with its token, padded, once it has one; control words
    /// padded before that (so a validated server may challenge them); messages as they are.
    fn frame(&self, body: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        if let Some(token) = self.token {
            out.extend_from_slice(&token);
            out.push(b' ');
            out.extend_from_slice(body);
            protocol::pad(&mut out);
        } else {
            out.extend_from_slice(body);
            if matches!(body, protocol::REG | protocol::HEARTBEAT | protocol::QUIT) {
                protocol::pad(&mut out);
            }
        }
        out
    }

    /// Forgets what was kept once the grace period that began at `started` has ended.
    fn forget_after_grace(&mut self, started: Instant) {
        if !self.unsent.is_empty() && started.elapsed() >= HANDSHAKE_GRACE {
            self.unsent = Vec::new();
        }
    }
}

impl Shared {
    /// Frames and sends `body`. A connected UDP socket reports an ICMP error for an earlier
    /// datagram on the next call: it says the server was unreachable then, not that this datagram
    /// failed, so the send is tried once more.
    fn send(&self, body: &[u8], stop: Option<&Stop>) -> std::io::Result<()> {
        let datagram = {
            let mut validation = lock(&self.validation);
            validation.forget_after_grace(self.started);
            validation.frame(body)
        };
        self.send_framed(&datagram, stop)
    }

    fn send_framed(&self, datagram: &[u8], stop: Option<&Stop>) -> std::io::Result<()> {
        match net::send(&self.socket, datagram, None, stop) {
            Err(e) if net::is_icmp_error(&e) => net::send(&self.socket, datagram, None, stop),
            other => other,
        }
    }

    /// A chat message as it goes on the wire. Whether it is kept for the handshake and how it
    /// is framed are decided under one lock, so a token arriving meanwhile cannot make it go out
    /// twice.
    fn frame_message(&self, body: &[u8]) -> Vec<u8> {
        let mut validation = lock(&self.validation);
        validation.forget_after_grace(self.started);
        if validation.token.is_none()
            && self.started.elapsed() < HANDSHAKE_GRACE
            && validation.unsent.len() < UNSENT_MAX
        {
            validation.unsent.push(body.to_vec());
        }
        validation.frame(body)
    }
}

pub struct Client {
    shared: Arc<Shared>,
    local: SocketAddr,
    workers: Workers,
    messages: Receiver<Vec<u8>>,
    /// Written when `messages` gets a message an event loop waits for, and when a thread ends.
    wakeup: Arc<Wakeup>,
}

impl Client {
    /// Binds an ephemeral port, connects to the server, sends `reg` and starts the receiver and
    /// heartbeat threads.
    pub fn start(config: ClientConfig) -> Result<Client> {
        let any: IpAddr = match config.server {
            SocketAddr::V4(_) => Ipv4Addr::UNSPECIFIED.into(),
            SocketAddr::V6(_) => Ipv6Addr::UNSPECIFIED.into(),
        };
        let socket = net::bind(SocketAddr::new(any, 0), None)
            .map_err(|e| Error::io("cannot bind a client socket", e))?;
        socket
            .connect(config.server)
            .map_err(|e| Error::io(format!("cannot connect to {}", config.server), e))?;
        let local = socket
            .local_addr()
            .map_err(|e| Error::io("cannot read local address", e))?;
        let shared = Arc::new(Shared {
            socket,
            started: Instant::now(),
            ended: AtomicBool::new(false),
            dropped: AtomicU64::new(0),
            last_heard: AtomicU64::new(0),
            validation: Mutex::default(),
        });
        shared
            .send(protocol::REG, None)
            .map_err(|e| Error::io(format!("cannot register with {}", config.server), e))?;
        let wakeup = Arc::new(Wakeup::new().map_err(|e| Error::io("cannot create an eventfd", e))?);
        let workers = Workers::new(Self::NAME, Arc::clone(&wakeup))?;
        // Unbounded, so nothing is allocated for slots never used; the receiver thread, its only
        // sender, keeps it to `max_queue`.
        let (tx, messages) = crossbeam_channel::unbounded();
        let max_queue = config.max_queue;
        {
            let (shared, stop) = (Arc::clone(&shared), Arc::clone(workers.stop()));
            let wakeup = Arc::clone(&wakeup);
            // Once it ends, its `tx` dropped, `Workers` writes the eventfd: a waiting event loop
            // then finds the queue closed.
            workers.spawn("udpchat-cli-rx", move || {
                let mut inbox = net::Inbox::new(RECV_BATCH, RECV_BUFFER);
                let mut handler = Receive {
                    shared: &shared,
                    stop: &stop,
                    tx,
                    wakeup: &wakeup,
                    max_queue,
                    full: Throttle::default(),
                    icmp: Throttle::default(),
                };
                net::receive_loop(&shared.socket, &mut inbox, &stop, &mut handler);
            })?;
        }
        {
            let (shared, stop) = (Arc::clone(&shared), Arc::clone(workers.stop()));
            let interval = config.interval;
            workers.spawn("udpchat-cli-hb", move || {
                heartbeat(&shared, &stop, interval)
            })?;
        }
        info!("{local} registered with {}", config.server);
        Ok(Client {
            shared,
            local,
            workers,
            messages,
            wakeup,
        })
    }

    /// Datagrams from the server, in arrival order; disconnected once the client has stopped and
    /// the queue is drained.
    pub fn messages(&self) -> &Receiver<Vec<u8>> {
        &self.messages
    }

    /// Written when a message is queued for a consumer that armed it, and as each thread ends
    /// (the receiver's end closes the queue).
    pub fn wakeup(&self) -> &Arc<Wakeup> {
        &self.wakeup
    }

    /// Messages dropped because the caller did not keep up.
    pub fn dropped(&self) -> u64 {
        self.shared.dropped.load(Ordering::Relaxed)
    }

    /// When the server was last heard from, if ever.
    pub fn last_heard(&self) -> Option<SystemTime> {
        match self.shared.last_heard.load(Ordering::Relaxed) {
            0 => None,
            nanos => Some(UNIX_EPOCH + Duration::from_nanos(nanos)),
        }
    }

    /// Whether a validated-mode server has given this client its token.
    pub fn validated(&self) -> bool {
        lock(&self.shared.validation).token.is_some()
    }

    /// Sends one chat message to the server, waiting for room in the socket's buffer if it
    /// must. `TooLong` if no server could relay it (see `protocol::MAX_MESSAGE`).
    pub fn send(&self, data: &[u8]) -> Result<()> {
        let datagram = self.frame(data)?;
        self.shared
            .send_framed(&datagram, Some(self.workers.stop()))
            .map_err(send_error)
    }

    /// Sends one chat message if the socket's buffer has room now; else gives back the
    /// datagram, framed, to go with [`Client::send_again`] once the socket is writable.
    pub fn try_send(&self, data: &[u8]) -> Result<Option<Vec<u8>>> {
        let datagram = self.frame(data)?; // checks the client is running
        Ok((!self.send_now(&datagram, None)?).then_some(datagram))
    }

    /// Tries once more to send what [`Client::try_send`] gave back: false if there is still no
    /// room. Past `deadline` with no room, the error a blocking [`Client::send`] gives when it
    /// has waited as long (`WouldBlock`).
    pub fn send_again(&self, datagram: &[u8], deadline: Instant) -> Result<bool> {
        self.workers.check()?;
        self.send_now(datagram, Some(deadline))
    }

    /// One non-blocking send: false if there is no room (before `deadline`, if any).
    fn send_now(&self, datagram: &[u8], deadline: Option<Instant>) -> Result<bool> {
        let mut retried = false;
        loop {
            match self.shared.socket.send(datagram) {
                Ok(_) => return Ok(true),
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    return match deadline {
                        Some(deadline) if Instant::now() >= deadline => Err(send_error(e)),
                        _ => Ok(false),
                    };
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                // An earlier datagram's ICMP error, as in `Shared::send_framed`.
                Err(e) if net::is_icmp_error(&e) && !retried => retried = true,
                Err(e) => return Err(send_error(e)),
            }
        }
    }

    /// How long [`Client::send`] waits for room before it gives up.
    pub const SEND_WAIT: Duration = net::SEND_WAIT;

    /// For an event loop waiting until the socket is writable, or the client stopped: a
    /// duplicate of the socket, and of the stop signal's pipe (readable once stopped).
    pub fn wait_fds(&self) -> Result<(std::os::fd::OwnedFd, std::os::fd::OwnedFd)> {
        let dup = |e| Error::io("cannot duplicate a descriptor", e);
        let socket = self.shared.socket.try_clone().map_err(dup)?;
        let stop = self.workers.stop().fd().try_clone_to_owned().map_err(dup)?;
        Ok((socket.into(), stop))
    }

    /// `data` framed as it goes to the server; `TooLong` if no server could relay it.
    fn frame(&self, data: &[u8]) -> Result<Vec<u8>> {
        self.workers.check()?;
        let len = protocol::strip(data).len();
        if len > protocol::MAX_MESSAGE {
            return Err(Error::TooLong(format!(
                "a message can be at most {} bytes, not counting leading and trailing whitespace \
                 (its broadcast adds an `ack:` line, and UDP carries at most {} bytes); got {len}",
                protocol::MAX_MESSAGE,
                protocol::MAX_BROADCAST
            )));
        }
        Ok(self.shared.frame_message(data))
    }
}

fn send_error(e: std::io::Error) -> Error {
    Error::io("cannot send to the server", e)
}

impl Core for Client {
    const NAME: &'static str = "client";

    fn workers(&self) -> &Workers {
        &self.workers
    }

    fn local_addr(&self) -> SocketAddr {
        self.local
    }

    /// Sends `quit` (unless the server already ended the chat) and ends both threads.
    fn stop(&self) {
        let was_running = self.workers.running();
        if !self.workers.stop_and_join() {
            return;
        }
        if was_running && !self.shared.ended.load(Ordering::Acquire) {
            if let Err(e) = self.shared.send(protocol::QUIT, None) {
                warn!("{} could not send quit: {e}", self.local);
            }
        }
        info!("{} stopped", self.local);
    }
}

/// The receiver: answers a validated server's handshake, hands every other datagram from the
/// server to the caller, until `end`.
struct Receive<'a> {
    shared: &'a Shared,
    stop: &'a Stop,
    /// To the caller. This thread is its only sender, so once it sees room below `max_queue`
    /// the room stays until it sends: the caller can only take messages out.
    tx: Sender<Vec<u8>>,
    wakeup: &'a Wakeup,
    max_queue: usize,
    full: Throttle,
    icmp: Throttle,
}

impl Receive<'_> {
    /// `end`, or in validated mode `end {token}`: a forged plain `end` cannot close the client.
    fn is_end(&self, data: &[u8]) -> bool {
        match lock(&self.shared.validation).token {
            None => protocol::strip(data) == protocol::END,
            Some(token) => protocol::parse_keyed(data, protocol::END_KEYED) == Some(&token[..]),
        }
    }
}

impl net::Handler for Receive<'_> {
    fn datagram(&mut self, data: &[u8], from: SocketAddr, _: Option<IpAddr>, _cut: bool) {
        let shared = self.shared;
        if shared.ended.load(Ordering::Relaxed) {
            return; // the rest of the batch that brought `end`
        }
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        shared
            .last_heard
            .store(now.as_nanos() as u64, Ordering::Relaxed);
        if let Some(cookie) = protocol::parse_keyed(data, protocol::CHALLENGE) {
            let mut answer = b"reg ".to_vec();
            answer.extend_from_slice(cookie);
            protocol::pad(&mut answer);
            lock(&shared.validation).answered = Some(Instant::now());
            if let Err(e) = net::send(&shared.socket, &answer, None, Some(self.stop)) {
                warn!("cannot answer the server's challenge: {e}");
            }
            return;
        }
        if let Some(token) = protocol::parse_keyed(data, protocol::WELCOME) {
            let token: [u8; TOKEN_LEN] = token.try_into().expect("parse_keyed checks the length");
            // Never log holding the lock: a Python thread may wait for it with the GIL held.
            let (first, unsent) = {
                let mut validation = lock(&shared.validation);
                let expected = validation
                    .answered
                    .take()
                    .is_some_and(|at| at.elapsed() < WELCOME_WAIT);
                if !expected {
                    return; // not in reply to this client's answer: forged, or far too late
                }
                validation.forget_after_grace(shared.started);
                let first = validation.token.replace(token).is_none();
                (first, std::mem::take(&mut validation.unsent))
            };
            if first {
                info!("validated by the server at {from}");
            }
            for body in unsent {
                if let Err(e) = shared.send(&body, Some(self.stop)) {
                    warn!("cannot send a message again after validation: {e}");
                }
            }
            return;
        }
        if self.is_end(data) {
            info!("the server at {from} ended the chat");
            shared.ended.store(true, Ordering::Release);
            self.stop.fire();
            return;
        }
        let held = self.tx.len();
        if held >= self.max_queue {
            shared.dropped.fetch_add(1, Ordering::Relaxed);
            throttled!(
                self.full,
                warn,
                "message queue full ({held} held): dropped a message"
            );
            return;
        }
        // The caller's side is never dropped while this thread runs, so this cannot fail.
        let _ = self.tx.send(data.to_vec());
    }

    fn batch_done(&mut self) {
        self.wakeup.notify();
    }

    fn icmp(&mut self, e: &std::io::Error) {
        throttled!(self.icmp, warn, "server unreachable: {e}");
    }
}

fn heartbeat(shared: &Shared, stop: &Stop, interval: Duration) {
    let ticks = crossbeam_channel::tick(interval);
    let mut errors = Throttle::default();
    loop {
        select! {
            recv(ticks) -> _ => {
                if let Err(e) = shared.send(protocol::HEARTBEAT, Some(stop)) {
                    throttled!(errors, warn, "heartbeat failed: {e}");
                }
            },
            recv(stop.channel()) -> _ => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::server::{Server, ServerConfig};

    #[test]
    fn a_client_hears_itself_and_closes_on_end() {
        let server =
            Server::start(ServerConfig::default_for("127.0.0.1:0".parse().unwrap())).unwrap();
        let client = Client::start(ClientConfig {
            server: server.local_addr(),
            interval: Duration::from_millis(50),
            max_queue: 16,
        })
        .unwrap();
        client.send(b"hello").unwrap();
        let got = client
            .messages()
            .recv_timeout(Duration::from_secs(5))
            .unwrap();
        let ack = protocol::parse_ack(&got).unwrap();
        assert_eq!(
            (ack.sender, ack.payload),
            (client.local_addr(), &b"hello"[..])
        );
        server.stop();
        // `end` disconnects the queue and stops the client without a `quit`.
        assert!(client
            .messages()
            .recv_timeout(Duration::from_secs(5))
            .is_err());
        assert!(!client.running());
        client.stop();
        assert!(client.failure().is_ok());
    }

    #[test]
    fn the_queue_holds_at_most_max_queue_and_makes_room_as_it_is_read() {
        let server =
            Server::start(ServerConfig::default_for("127.0.0.1:0".parse().unwrap())).unwrap();
        let client = Client::start(ClientConfig {
            server: server.local_addr(),
            interval: Duration::from_secs(5),
            max_queue: 2,
        })
        .unwrap();
        let wait_for = |what: &dyn Fn() -> bool| {
            let deadline = Instant::now() + Duration::from_secs(5);
            while !what() && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(5));
            }
            what()
        };
        for i in 0..5 {
            client.send(format!("a{i}").as_bytes()).unwrap();
        }
        assert!(wait_for(&|| client.dropped() == 3));
        assert_eq!(client.messages().len(), 2);
        let first = client.messages().try_recv().unwrap();
        assert!(first.ends_with(b"\na0\n"));
        client.send(b"b").unwrap();
        assert!(wait_for(&|| client.messages().len() == 2));
        assert_eq!(client.dropped(), 3);
        client.stop();
        server.stop();
    }
}
