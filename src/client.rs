//! The chat client: registers with `reg`, heartbeats every `interval` from its own thread, and
//! hands every datagram from the server to the caller through a bounded channel.

use crossbeam_channel::{select, Receiver, Sender, TrySendError};
use log::{info, warn};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::error::{Error, Result};
use crate::net;
use crate::protocol;
use crate::throttle::{throttled, Throttle};
use crate::worker::{Stop, Workers};

/// The largest datagram UDP can carry (IPv6's limit); nothing from the server is ever cut.
const RECV_BUFFER: usize = 65_536;
/// Datagrams read per `recvmmsg` call.
const RECV_BATCH: usize = 16;

#[derive(Debug, Clone)]
pub struct ClientConfig {
    /// The server's address.
    pub server: SocketAddr,
    /// Seconds between heartbeats.
    pub interval: Duration,
    /// Messages held for the caller; past this, new ones are dropped and counted.
    pub max_queue: usize,
}

struct Shared {
    /// Connected to the server: the kernel drops datagrams from anyone else.
    socket: UdpSocket,
    /// Set when the server said `end`: the client then stops without sending `quit`.
    ended: AtomicBool,
    dropped: AtomicU64,
}

pub struct Client {
    shared: Arc<Shared>,
    local: SocketAddr,
    workers: Workers,
    messages: Receiver<Vec<u8>>,
}

impl Client {
    /// Binds an ephemeral port, connects to the server, sends `reg` and starts the receiver and
    /// heartbeat threads.
    pub fn start(config: ClientConfig) -> Result<Client> {
        let any: IpAddr = match config.server {
            SocketAddr::V4(_) => Ipv4Addr::UNSPECIFIED.into(),
            SocketAddr::V6(_) => Ipv6Addr::UNSPECIFIED.into(),
        };
        let socket = net::bind(SocketAddr::new(any, 0))
            .map_err(|e| Error::io("cannot bind a client socket", e))?;
        socket
            .connect(config.server)
            .map_err(|e| Error::io(format!("cannot connect to {}", config.server), e))?;
        let local = socket
            .local_addr()
            .map_err(|e| Error::io("cannot read local address", e))?;
        net::send(&socket, protocol::REG, None, None)
            .map_err(|e| Error::io(format!("cannot register with {}", config.server), e))?;
        let shared = Arc::new(Shared {
            socket,
            ended: AtomicBool::new(false),
            dropped: AtomicU64::new(0),
        });
        let workers = Workers::new()?;
        let (tx, messages) = crossbeam_channel::bounded(config.max_queue);
        {
            let (shared, stop) = (Arc::clone(&shared), Arc::clone(workers.stop()));
            workers.spawn("udpchat-cli-rx", move || {
                let mut inbox = net::Inbox::new(RECV_BATCH, RECV_BUFFER);
                let mut handler = Receive {
                    shared: &shared,
                    stop: &stop,
                    tx,
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
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.local
    }

    /// True until stopped, closed by the server's `end`, or a thread panicked.
    pub fn running(&self) -> bool {
        self.workers.running()
    }

    /// Datagrams from the server, in arrival order; disconnected once the client has stopped and
    /// the queue is drained.
    pub fn messages(&self) -> &Receiver<Vec<u8>> {
        &self.messages
    }

    /// Messages dropped because the caller did not keep up.
    pub fn dropped(&self) -> u64 {
        self.shared.dropped.load(Ordering::Relaxed)
    }

    /// `Err` if a core thread panicked.
    pub fn failure(&self) -> Result<()> {
        self.workers.failure()
    }

    /// Sends one datagram to the server.
    pub fn send(&self, data: &[u8]) -> Result<()> {
        self.workers.check()?;
        send_to_server(&self.shared, data, Some(self.workers.stop()))
            .map_err(|e| Error::io("cannot send to the server", e))
    }

    /// Sends `quit` (unless the server already ended the chat) and ends both threads.
    /// Idempotent; call it with the GIL released.
    pub fn stop(&self) {
        let was_running = self.workers.running();
        if !self.workers.stop_and_join() {
            return;
        }
        if was_running && !self.shared.ended.load(Ordering::Acquire) {
            if let Err(e) = send_to_server(&self.shared, protocol::QUIT, None) {
                warn!("{} could not send quit: {e}", self.local);
            }
        }
        info!("{} stopped", self.local);
    }
}

/// A connected UDP socket reports an ICMP error for an earlier datagram on the next call. It says
/// the server was unreachable then, not that this datagram failed, so the send is tried once more.
fn send_to_server(shared: &Shared, data: &[u8], stop: Option<&Stop>) -> std::io::Result<()> {
    match net::send(&shared.socket, data, None, stop) {
        Err(e) if net::is_icmp_error(&e) => net::send(&shared.socket, data, None, stop),
        other => other,
    }
}

/// The receiver: hands every datagram from the server to the caller, until `end`.
struct Receive<'a> {
    shared: &'a Shared,
    stop: &'a Stop,
    tx: Sender<Vec<u8>>,
    full: Throttle,
    icmp: Throttle,
}

impl net::Handler for Receive<'_> {
    fn datagram(&mut self, data: &[u8], from: SocketAddr, _cut: bool) {
        let shared = self.shared;
        if shared.ended.load(Ordering::Relaxed) {
            return; // the rest of the batch that brought `end`
        }
        if protocol::strip(data) == protocol::END {
            info!("the server at {from} ended the chat");
            shared.ended.store(true, Ordering::Release);
            self.stop.fire();
            return;
        }
        match self.tx.try_send(data.to_vec()) {
            Ok(()) => {}
            Err(TrySendError::Full(_)) => {
                shared.dropped.fetch_add(1, Ordering::Relaxed);
                throttled!(
                    self.full,
                    warn,
                    "message queue full ({} held): dropped a message",
                    self.tx.len()
                );
            }
            // The caller's side is never dropped while this thread runs.
            Err(TrySendError::Disconnected(_)) => {}
        }
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
                if let Err(e) = send_to_server(shared, protocol::HEARTBEAT, Some(stop)) {
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
    use crate::server::{Server, ServerConfig, MAX_DATAGRAM};

    #[test]
    fn a_client_hears_itself_and_closes_on_end() {
        let server = Server::start(ServerConfig {
            addr: "127.0.0.1:0".parse().unwrap(),
            interval: Duration::from_secs(10),
            max_datagram: MAX_DATAGRAM,
            fanout_threads: 1,
        })
        .unwrap();
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
}
