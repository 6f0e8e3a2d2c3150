//! Socket plumbing shared by the server and the client: non-blocking UDP sockets driven by
//! `poll(2)` together with the stop pipe, so a blocked receiver wakes the moment `stop()` fires.

use std::io::{self, ErrorKind};
use std::net::{SocketAddr, UdpSocket};
use std::os::fd::{AsFd, AsRawFd};
use std::time::{Duration, Instant};

use crate::throttle::{throttled, Throttle};
use crate::worker::Stop;

/// How long a send waits for room in the socket's buffer before it gives up on that datagram.
const SEND_WAIT: Duration = Duration::from_millis(200);
/// Pause after an unexpected receive error, so a persistent one cannot spin a core.
const ERROR_BACKOFF: Duration = Duration::from_millis(10);

/// Binds a non-blocking UDP socket.
pub fn bind(addr: SocketAddr) -> io::Result<UdpSocket> {
    let socket = UdpSocket::bind(addr)?;
    socket.set_nonblocking(true)?;
    Ok(socket)
}

enum Ready {
    Socket,
    Stopped,
    TimedOut,
}

/// Waits until `socket` is ready for `events`, `stop` fires, or `timeout` passes.
fn wait(
    socket: &UdpSocket,
    events: libc::c_short,
    stop: Option<&Stop>,
    timeout: Option<Duration>,
) -> io::Result<Ready> {
    let deadline = timeout.map(|t| Instant::now() + t);
    let mut fds = [
        libc::pollfd {
            fd: socket.as_fd().as_raw_fd(),
            events,
            revents: 0,
        },
        libc::pollfd {
            fd: stop.map_or(-1, |s| s.fd().as_raw_fd()), // poll ignores a negative fd
            events: libc::POLLIN,
            revents: 0,
        },
    ];
    loop {
        let millis = match deadline {
            None => -1,
            Some(d) => {
                let left = d.saturating_duration_since(Instant::now());
                libc::c_int::try_from(left.as_millis().max(1)).unwrap_or(libc::c_int::MAX)
            }
        };
        // SAFETY: `fds` is a valid array of two pollfd for the duration of the call.
        let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, millis) };
        if n < 0 {
            let err = io::Error::last_os_error();
            if err.kind() == ErrorKind::Interrupted {
                continue;
            }
            return Err(err);
        }
        // Stop wins over readiness, so a flooded socket cannot delay shutdown.
        if fds[1].revents != 0 {
            return Ok(Ready::Stopped);
        }
        if fds[0].revents != 0 {
            return Ok(Ready::Socket);
        }
        if deadline.is_some_and(|d| Instant::now() >= d) {
            return Ok(Ready::TimedOut);
        }
    }
}

/// Sends one datagram, to `to` or (None) to the connected peer. If the socket buffer is full it
/// waits for room, up to `SEND_WAIT` or until `stop` fires, then fails with `WouldBlock`.
pub fn send(
    socket: &UdpSocket,
    data: &[u8],
    to: Option<SocketAddr>,
    stop: Option<&Stop>,
) -> io::Result<()> {
    loop {
        let result = match to {
            Some(addr) => socket.send_to(data, addr),
            None => socket.send(data),
        };
        match result {
            Ok(_) => return Ok(()),
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                match wait(socket, libc::POLLOUT, stop, Some(SEND_WAIT))? {
                    Ready::Socket => {}
                    Ready::Stopped | Ready::TimedOut => return Err(e),
                }
            }
            Err(e) => return Err(e),
        }
    }
}

/// ICMP errors (port unreachable and the like) that a UDP socket reports on a later call; they
/// concern an earlier datagram to some peer, never this socket, so they are never fatal.
pub fn is_icmp_error(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        ErrorKind::ConnectionRefused
            | ErrorKind::ConnectionReset
            | ErrorKind::HostUnreachable
            | ErrorKind::NetworkUnreachable
    )
}

/// Receives datagrams into `buf` and hands each to `handle` until `stop` fires. After each wake-up
/// it reads until `WouldBlock`. Errors are logged (rate-limited) and never end the loop: ICMP
/// errors are reported to `on_icmp`, anything else costs a short back-off.
pub fn receive_loop(
    socket: &UdpSocket,
    buf: &mut [u8],
    stop: &Stop,
    mut handle: impl FnMut(&[u8], SocketAddr),
    mut on_icmp: impl FnMut(&io::Error),
) {
    let mut errors = Throttle::default();
    while !stop.fired() {
        match socket.recv_from(buf) {
            Ok((n, from)) => handle(&buf[..n], from),
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                match wait(socket, libc::POLLIN, Some(stop), None) {
                    Ok(Ready::Socket) => {}
                    Ok(Ready::Stopped | Ready::TimedOut) => return,
                    Err(e) => {
                        throttled!(errors, error, "poll failed: {e}");
                        std::thread::sleep(ERROR_BACKOFF);
                    }
                }
            }
            Err(e) if is_icmp_error(&e) => on_icmp(&e),
            Err(e) => {
                throttled!(errors, error, "receive failed: {e}");
                std::thread::sleep(ERROR_BACKOFF);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn receive_loop_reads_every_datagram_then_returns_on_stop() {
        let socket = Arc::new(bind("127.0.0.1:0".parse().unwrap()).unwrap());
        let addr = socket.local_addr().unwrap();
        let stop = Arc::new(Stop::new().unwrap());
        let peer = UdpSocket::bind("127.0.0.1:0").unwrap();
        for i in 0..10u8 {
            peer.send_to(&[i], addr).unwrap();
        }
        let (tx, rx) = crossbeam_channel::unbounded();
        let thread = {
            let (socket, stop) = (Arc::clone(&socket), Arc::clone(&stop));
            std::thread::spawn(move || {
                let mut buf = [0u8; 16];
                receive_loop(
                    &socket,
                    &mut buf,
                    &stop,
                    |d, _| tx.send(d.to_vec()).unwrap(),
                    |_| {},
                );
            })
        };
        let got: Vec<Vec<u8>> = (0..10)
            .map(|_| rx.recv_timeout(Duration::from_secs(5)).unwrap())
            .collect();
        assert_eq!(got, (0..10u8).map(|i| vec![i]).collect::<Vec<_>>());
        // The thread is now blocked in poll; stop must wake it at once.
        let t0 = Instant::now();
        stop.fire();
        thread.join().unwrap();
        assert!(
            t0.elapsed() < Duration::from_millis(100),
            "{:?}",
            t0.elapsed()
        );
    }

    #[test]
    fn icmp_errors_are_reported_not_fatal() {
        // A connected socket whose peer port is closed gets ECONNREFUSED from the next call.
        let closed = UdpSocket::bind("127.0.0.1:0").unwrap();
        let closed_addr = closed.local_addr().unwrap();
        drop(closed);
        let socket = bind("127.0.0.1:0".parse().unwrap()).unwrap();
        socket.connect(closed_addr).unwrap();
        send(&socket, b"x", None, None).unwrap();
        let stop = Stop::new().unwrap();
        let mut icmp = 0;
        std::thread::sleep(Duration::from_millis(20));
        let mut buf = [0u8; 4];
        std::thread::scope(|s| {
            s.spawn(|| {
                std::thread::sleep(Duration::from_millis(100));
                stop.fire();
            });
            receive_loop(&socket, &mut buf, &stop, |_, _| {}, |_| icmp += 1);
        });
        assert_eq!(icmp, 1);
    }
}
