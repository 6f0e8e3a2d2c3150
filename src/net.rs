//! Socket plumbing shared by the server and the client: non-blocking UDP sockets driven by
//! `poll(2)` together with the stop pipe, so a blocked receiver wakes the moment `stop()` fires.

mod errqueue;
mod pktinfo;

use std::io::{self, ErrorKind};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, UdpSocket};
use std::os::fd::{AsFd, AsRawFd};
use std::time::{Duration, Instant};

use socket2::{Domain, Protocol, SockAddr, SockAddrStorage, Socket, Type};

use crate::throttle::{throttled, Throttle};
use crate::worker::Stop;
use pktinfo::Control;

/// How long a send waits for room in the socket's buffer before it gives up on that datagram.
pub const SEND_WAIT: Duration = Duration::from_millis(200);
/// Pause after an unexpected receive error, so a persistent one cannot spin a core.
const ERROR_BACKOFF: Duration = Duration::from_millis(10);
/// How often a send waiting for room looks again while poll reports only an error (see
/// `wait_for_room`).
const ERROR_PAUSE: Duration = Duration::from_millis(1);
/// How long one datagram is tried again while its sends fail with ICMP errors (see `Retry`):
/// far longer than the receive loop takes to read a full error queue, which re-arms the error
/// once per entry (90 failures in a row were seen when 100 clients died at once, so a count
/// would have to guess), and short enough that forged errors cannot hold a sender.
const ICMP_RETRY_FOR: Duration = Duration::from_millis(50);
/// Host or network unreachable this many times in a row is the datagram's own error (see
/// `Retry`), not the pending error of an ICMP report.
const OWN_UNREACHABLE: u32 = 8;
/// The longest the receive loop goes on reading datagrams without reading the error queue: its
/// entries are charged to the socket's receive buffer (a full queue made a socket drop 99 of
/// 100 datagrams), and poll, which tells of them, is only called once no datagram is waiting.
const ERROR_QUEUE_EVERY: Duration = Duration::from_millis(10);

/// Binds a non-blocking UDP socket; `rcvbuf` asks for a kernel receive buffer of that many
/// bytes (the kernel may cap it at net.core.rmem_max).
pub fn bind(addr: SocketAddr, rcvbuf: Option<usize>) -> io::Result<UdpSocket> {
    let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    if let Some(bytes) = rcvbuf {
        socket.set_recv_buffer_size(bytes)?;
    }
    socket.bind(&addr.into())?;
    socket.set_nonblocking(true)?;
    Ok(socket.into())
}

/// Makes the receive loop report, with each datagram, the local address it was sent to, so a
/// socket bound to a wildcard address can answer from it (see `pktinfo`).
pub fn report_local_addresses(socket: &UdpSocket) -> io::Result<()> {
    pktinfo::enable(socket, socket.local_addr()?.is_ipv6())
}

/// Makes the socket learn which destinations are unreachable (a client's process died), from
/// the ICMP errors their datagrams draw: the receive loop hands each to
/// [`Handler::unreachable`]. Without it, Linux reports ICMP errors to a connected socket only.
/// With it, each error also fails the socket's next send; [`send_each`] and [`send`] (to an
/// address) try that datagram again.
pub fn report_unreachable(socket: &UdpSocket) -> io::Result<()> {
    errqueue::enable(socket, socket.local_addr()?.is_ipv6())
}

/// Sets a socket option that is an int flag to 1.
fn turn_on(socket: &UdpSocket, level: libc::c_int, name: libc::c_int) -> io::Result<()> {
    let on: libc::c_int = 1;
    // SAFETY: setsockopt reads an int from `on`, of the length given.
    let r = unsafe {
        libc::setsockopt(
            socket.as_fd().as_raw_fd(),
            level,
            name,
            (&on as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Hands each control message `recvmsg` wrote for `hdr` to `visit`: its header and a pointer to
/// its payload, which `visit` may read only as far as the header's `cmsg_len` covers.
///
/// # Safety
/// `hdr.msg_control` is null or points at `hdr.msg_controllen` readable bytes of control
/// messages, as recvmsg (or a test) leaves them.
unsafe fn each_control_message(
    hdr: &libc::msghdr,
    mut visit: impl FnMut(libc::cmsghdr, *const u8),
) {
    if hdr.msg_control.is_null() || hdr.msg_controllen < std::mem::size_of::<libc::cmsghdr>() {
        return;
    }
    // SAFETY: per the contract, the CMSG_* functions walk those bytes within their bounds, and
    // each header they give is inside them.
    unsafe {
        let mut cmsg = libc::CMSG_FIRSTHDR(hdr);
        while !cmsg.is_null() {
            visit(std::ptr::read_unaligned(cmsg), libc::CMSG_DATA(cmsg));
            cmsg = libc::CMSG_NXTHDR(hdr, cmsg);
        }
    }
}

/// Every address of this host's interfaces (getifaddrs(3)), for a server bound to a wildcard
/// address to know which sources are itself.
pub fn local_ips() -> io::Result<Vec<IpAddr>> {
    let mut list: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills `list` with a linked list we free below.
    if unsafe { libc::getifaddrs(&mut list) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let mut ips = Vec::new();
    let mut entry = list;
    while !entry.is_null() {
        // SAFETY: a node of the list getifaddrs returned, not yet freed.
        let ifa = unsafe { &*entry };
        if !ifa.ifa_addr.is_null() {
            // SAFETY: ifa_addr points at a sockaddr whose family says which struct it is.
            unsafe {
                match i32::from((*ifa.ifa_addr).sa_family) {
                    libc::AF_INET => {
                        let sin = &*(ifa.ifa_addr as *const libc::sockaddr_in);
                        ips.push(Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr)).into());
                    }
                    libc::AF_INET6 => {
                        let sin6 = &*(ifa.ifa_addr as *const libc::sockaddr_in6);
                        ips.push(Ipv6Addr::from(sin6.sin6_addr.s6_addr).into());
                    }
                    _ => {}
                }
            }
        }
        entry = ifa.ifa_next;
    }
    // SAFETY: the list getifaddrs returned, freed once; no reference into it outlives this.
    unsafe { libc::freeifaddrs(list) };
    Ok(ips)
}

/// SO_MEMINFO from asm-generic/socket.h (x86, arm, riscv); the libc crate names only its fields.
const SO_MEMINFO: libc::c_int = 55;

/// How many datagrams the kernel has dropped on this socket for want of receive buffer space.
pub fn kernel_drops(socket: &UdpSocket) -> io::Result<u64> {
    let mut info = [0u32; libc::SK_MEMINFO_DROPS as usize + 1];
    let mut len = std::mem::size_of_val(&info) as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `info` and updates `len`.
    let r = unsafe {
        libc::getsockopt(
            socket.as_fd().as_raw_fd(),
            libc::SOL_SOCKET,
            SO_MEMINFO,
            info.as_mut_ptr().cast(),
            &mut len,
        )
    };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(u64::from(info[libc::SK_MEMINFO_DROPS as usize]))
}

enum Ready {
    /// What poll reported for the socket: some of the events asked for, or POLLERR, which it
    /// reports whether asked or not, or both.
    Socket(libc::c_short),
    Stopped,
    TimedOut,
}

/// Waits until `socket` is ready for `events` or has an error pending (POLLERR: its ICMP error
/// not yet reported by a call, or entries in its error queue), `stop` fires, or `timeout` passes.
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
            return Ok(Ready::Socket(fds[0].revents));
        }
        if deadline.is_some_and(|d| Instant::now() >= d) {
            return Ok(Ready::TimedOut);
        }
    }
}

/// Waits for room in `socket`'s send buffer, up to `timeout` or until `stop` fires.
///
/// poll also wakes for a pending error (POLLERR), room or not. A pending ICMP error is reported
/// by the next send anyway; but entries in the error queue (`report_unreachable`) keep POLLERR
/// up until the receive loop reads them, so while poll reports nothing else, this looks again
/// every `ERROR_PAUSE` rather than spin.
fn wait_for_room(socket: &UdpSocket, stop: Option<&Stop>, timeout: Duration) -> io::Result<Ready> {
    let deadline = Instant::now() + timeout;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match wait(socket, libc::POLLOUT, stop, Some(left))? {
            Ready::Socket(revents) if revents & libc::POLLOUT == 0 => {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return Ok(Ready::TimedOut);
                }
                std::thread::sleep(ERROR_PAUSE.min(left));
            }
            ready => return Ok(ready),
        }
    }
}

/// Sends one datagram, to `to` or (None) to the connected peer. If the socket buffer is full it
/// waits for room, up to `SEND_WAIT` or until `stop` fires, then fails with `WouldBlock`.
///
/// An ICMP error is returned to a connected socket's caller: it is about the one peer, which
/// the caller wants to know. Sent to an address, the datagram is tried again instead, as
/// [`send_each`] does (see `Retry`): the error concerns some earlier datagram.
pub fn send(
    socket: &UdpSocket,
    data: &[u8],
    to: Option<SocketAddr>,
    stop: Option<&Stop>,
) -> io::Result<()> {
    let mut retry = Retry::default();
    loop {
        let result = match to {
            Some(addr) => socket.send_to(data, addr),
            None => socket.send(data),
        };
        match result {
            Ok(_) => return Ok(()),
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                match wait_for_room(socket, stop, SEND_WAIT)? {
                    Ready::Socket(_) => {}
                    Ready::Stopped | Ready::TimedOut => return Err(e),
                }
            }
            Err(e) if to.is_some() && retry.again(&e) => {}
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

/// Tells a send that failed for the socket's pending ICMP error from one that failed for its own
/// datagram.
///
/// With [`report_unreachable`] on, each ICMP error becomes the socket's pending error, which fails
/// its next send, whatever the datagram, and is consumed by that failure: the same datagram, sent
/// again as it is, goes out. Which peer the error was about is the receive loop's to learn, from
/// the error queue; the sender need not read it. `ECONNREFUSED` only ever comes that way. Host
/// and network unreachable also come at once for the datagram's own sake, when no route leads
/// to its destination (or from its source address): failing `OWN_UNREACHABLE` times in a row,
/// it is taken to be that (not twice: a flood of ICMP errors, even of kinds nobody acts on,
/// fails sends that often, and cost live clients broadcasts). Errors forged fast enough to fail
/// every try could hold the sender, so a datagram that has failed for `ICMP_RETRY_FOR` is not
/// tried again.
#[derive(Default)]
struct Retry {
    /// When this datagram first failed with an ICMP error.
    since: Option<Instant>,
    /// The tries of this datagram that failed with host or network unreachable in a row.
    unreachable: u32,
}

impl Retry {
    /// Whether a send that failed with `e` should be tried again as it is.
    fn again(&mut self, e: &io::Error) -> bool {
        let unreachable = matches!(
            e.kind(),
            ErrorKind::HostUnreachable | ErrorKind::NetworkUnreachable
        );
        self.unreachable = if unreachable { self.unreachable + 1 } else { 0 };
        let again = is_icmp_error(e) && !self.exhausted() && self.unreachable < OWN_UNREACHABLE;
        if again {
            self.since.get_or_insert_with(Instant::now);
        }
        again
    }

    fn exhausted(&self) -> bool {
        self.since.is_some_and(|t| t.elapsed() >= ICMP_RETRY_FOR)
    }

    /// Whether `e`, not to be tried again as it is, may be the datagram's own error (its source
    /// address gone, say); not an ICMP error once forged ones have used up the retries.
    fn may_be_own(&self, e: &io::Error) -> bool {
        !is_icmp_error(e) || !self.exhausted()
    }

    /// Something went out.
    fn progress(&mut self) {
        *self = Retry::default();
    }

    /// The next datagram is tried, this one given up.
    fn next_datagram(&mut self) {
        *self = Retry::default();
    }
}

/// The most messages one `sendmmsg` / `recvmmsg` call takes (the kernel's UIO_MAXIOV).
const MAX_BATCH: usize = 1024;

/// Memory mapped straight from the kernel for receive buffers (up to 64 KiB a datagram, so
/// megabytes a socket): only the pages datagrams fill become resident, and all of it goes back
/// on drop. From malloc, a buffer this size lands in the heap once glibc's mmap threshold has
/// risen, and a process that starts and stops clients sees its memory creep (a 10-minute soak
/// grew 120 to 146 MiB that way; with these, it stays flat).
struct Pages {
    ptr: std::ptr::NonNull<u8>,
    len: usize,
}

impl Pages {
    fn new(len: usize) -> Pages {
        // SAFETY: an anonymous private mapping of `len` bytes, checked below.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len.max(1),
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        assert!(
            ptr != libc::MAP_FAILED,
            "cannot map {len} bytes: {}",
            io::Error::last_os_error()
        );
        Pages {
            ptr: std::ptr::NonNull::new(ptr.cast()).expect("mmap never returns null"),
            len,
        }
    }
}

impl std::ops::Deref for Pages {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        // SAFETY: the mapping is `len` bytes, zero-filled, alive until drop.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

impl std::ops::DerefMut for Pages {
    fn deref_mut(&mut self) -> &mut [u8] {
        // SAFETY: as for `deref`, and `&mut self` is unique.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl Drop for Pages {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly what `new` mapped.
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len.max(1)) };
    }
}

/// Buffers for `recvmmsg`: up to `batch` datagrams of up to `size` bytes per system call, with
/// room for each one's control message (its local address, where the socket reports it).
pub struct Inbox {
    size: usize,
    buf: Pages,
    names: Vec<SockAddrStorage>,
    /// Never read, only kept alive: the headers point into it.
    _iovs: Vec<libc::iovec>,
    controls: Vec<Control>,
    hdrs: Vec<libc::mmsghdr>,
    received: usize,
}

impl Inbox {
    pub fn new(batch: usize, size: usize) -> Inbox {
        let batch = batch.clamp(1, MAX_BATCH);
        let mut buf = Pages::new(batch * size);
        let mut names: Vec<SockAddrStorage> =
            (0..batch).map(|_| SockAddrStorage::zeroed()).collect();
        let mut iovs: Vec<libc::iovec> = buf
            .chunks_exact_mut(size)
            .map(|chunk| libc::iovec {
                iov_base: chunk.as_mut_ptr().cast(),
                iov_len: size,
            })
            .collect();
        let mut controls = vec![Control::default(); batch];
        let hdrs = iovs
            .iter_mut()
            .zip(names.iter_mut())
            .zip(controls.iter_mut())
            .map(|((iov, name), control)| {
                // SAFETY: mmsghdr is plain old data; all-zero is a valid value.
                let mut hdr: libc::mmsghdr = unsafe { std::mem::zeroed() };
                hdr.msg_hdr.msg_name = (name as *mut SockAddrStorage).cast();
                hdr.msg_hdr.msg_iov = iov;
                hdr.msg_hdr.msg_iovlen = 1;
                control.attach_for_receive(&mut hdr.msg_hdr);
                hdr
            })
            .collect();
        // The pointers above point into the heap blocks of `buf`, `names`, `iovs` and
        // `controls`, which never move or grow for as long as the Inbox lives.
        Inbox {
            size,
            buf,
            names,
            _iovs: iovs,
            controls,
            hdrs,
            received: 0,
        }
    }

    /// Receives as many datagrams as are waiting, up to the batch, without blocking.
    fn recv(&mut self, socket: &UdpSocket) -> io::Result<usize> {
        let name_len = SockAddrStorage::zeroed().size_of();
        for (hdr, control) in self.hdrs.iter_mut().zip(&mut self.controls) {
            hdr.msg_hdr.msg_namelen = name_len;
            hdr.msg_hdr.msg_flags = 0;
            // The kernel shrinks it to what it wrote.
            control.attach_for_receive(&mut hdr.msg_hdr);
        }
        // SAFETY: every header points at live buffers of the sizes it claims (see `new`).
        let n = unsafe {
            libc::recvmmsg(
                socket.as_fd().as_raw_fd(),
                self.hdrs.as_mut_ptr(),
                self.hdrs.len() as libc::c_uint,
                0,
                std::ptr::null_mut(),
            )
        };
        self.received = usize::try_from(n).map_err(|_| io::Error::last_os_error())?;
        Ok(self.received)
    }

    /// The datagrams of the last `recv`: bytes, sender, the local address it was sent to (if the
    /// socket reports it), and whether it was longer than the buffer (and so cut by the kernel).
    fn datagrams(&self) -> impl Iterator<Item = Received<'_>> {
        self.hdrs[..self.received]
            .iter()
            .zip(&self.names)
            .enumerate()
            .map(|(i, (hdr, name))| {
                let len = (hdr.msg_len as usize).min(self.size);
                let data = &self.buf[i * self.size..i * self.size + len];
                // SAFETY: the kernel wrote a socket address of `msg_namelen` bytes into `name`, which is
                // plain bytes (no Drop), so a bitwise copy is a valid one.
                let from = unsafe { SockAddr::new(std::ptr::read(name), hdr.msg_hdr.msg_namelen) }
                    .as_socket();
                Received {
                    data,
                    from,
                    local: pktinfo::local_address(&hdr.msg_hdr),
                    cut: hdr.msg_hdr.msg_flags & libc::MSG_TRUNC != 0,
                }
            })
    }
}

/// One datagram of a batch.
struct Received<'a> {
    data: &'a [u8],
    from: Option<SocketAddr>,
    local: Option<IpAddr>,
    cut: bool,
}

/// What the receive loop hands datagrams to.
pub trait Handler {
    /// One datagram from `from`; `local` is the address of this host it was sent to, where the
    /// socket reports it ([`report_local_addresses`]); `cut` if it was longer than the receive
    /// buffer.
    fn datagram(&mut self, data: &[u8], from: SocketAddr, local: Option<IpAddr>, cut: bool);
    /// Called after each batch, so work can be handed on in one piece.
    fn batch_done(&mut self) {}
    /// An ICMP error reported on the socket (see [`is_icmp_error`]) with nothing in its error
    /// queue to say which peer it concerns: a connected socket's, or one without
    /// [`report_unreachable`].
    fn icmp(&mut self, _error: &io::Error) {}
    /// A datagram to `to` drew an ICMP "port unreachable" (`ConnectionRefused`) from `to`'s own
    /// host, read from the error queue of a socket with [`report_unreachable`] (see
    /// `errqueue::read` for what is not reported). `to` has the form the socket gives that
    /// peer's datagrams (IPv4-mapped on a dual-stack socket). Each error queued is reported
    /// once; but hosts rate-limit the ICMP errors they send, so not every datagram to a dead
    /// peer draws one.
    fn unreachable(&mut self, _to: SocketAddr, _error: &io::Error) {}
}

/// Hands each unreachable destination in `socket`'s error queue to `handler`; returns how many.
fn read_error_queue(
    socket: &UdpSocket,
    handler: &mut impl Handler,
    errors: &mut Throttle,
) -> usize {
    match errqueue::read(socket, |to, e| handler.unreachable(to, &e)) {
        Ok(n) => n,
        Err(e) => {
            throttled!(errors, error, "reading the error queue failed: {e}");
            std::thread::sleep(ERROR_BACKOFF);
            0
        }
    }
}

/// Receives datagrams and hands them to `handler` until `stop` fires. After each wake-up it reads
/// until `WouldBlock`, a batch per system call. Errors are logged (rate-limited) and never end
/// the loop: ICMP errors go to the handler (from the error queue where the socket has one),
/// anything else costs a short back-off.
pub fn receive_loop(
    socket: &UdpSocket,
    inbox: &mut Inbox,
    stop: &Stop,
    handler: &mut impl Handler,
) {
    let mut errors = Throttle::default();
    let mut queue_read = Instant::now();
    while !stop.fired() {
        match inbox.recv(socket) {
            Ok(_) => {
                for d in inbox.datagrams() {
                    if let Some(from) = d.from {
                        handler.datagram(d.data, from, d.local, d.cut);
                    }
                }
                handler.batch_done();
                if queue_read.elapsed() >= ERROR_QUEUE_EVERY {
                    read_error_queue(socket, handler, &mut errors);
                    queue_read = Instant::now();
                }
            }
            Err(e) if e.kind() == ErrorKind::Interrupted => {}
            Err(e) if e.kind() == ErrorKind::WouldBlock => {
                match wait(socket, libc::POLLIN, Some(stop), None) {
                    // poll says POLLERR for as long as the error queue holds entries, whether
                    // or not recvmmsg has anything to report (a send on another thread may
                    // have taken the pending error): read them now, or this loop would spin.
                    Ok(Ready::Socket(revents)) => {
                        if revents & libc::POLLERR != 0 {
                            read_error_queue(socket, handler, &mut errors);
                        }
                    }
                    Ok(Ready::Stopped | Ready::TimedOut) => return,
                    Err(e) => {
                        throttled!(errors, error, "poll failed: {e}");
                        std::thread::sleep(ERROR_BACKOFF);
                    }
                }
            }
            // Either the pending error of an entry in the error queue, which says whose it is,
            // or the only word: on a connected socket, or for an entry that found the queue
            // full, or one read already (the kernel queues it before it sets the error).
            Err(e) if is_icmp_error(&e) => {
                if read_error_queue(socket, handler, &mut errors) == 0 {
                    handler.icmp(&e);
                }
            }
            Err(e) => {
                throttled!(errors, error, "receive failed: {e}");
                std::thread::sleep(ERROR_BACKOFF);
            }
        }
    }
}

/// Buffers for `sendmmsg`, reused from one call to the next. The headers are built over them by
/// each `flush` and cleared after it, so nothing points into them between calls.
#[derive(Default)]
pub struct Outbox {
    names: Vec<SockAddr>,
    iovs: Vec<libc::iovec>,
    /// Each datagram's source address, if it has one (an empty control otherwise).
    controls: Vec<Control>,
    hdrs: Vec<libc::mmsghdr>,
}

// SAFETY: the raw pointers in `iovs` and `hdrs` are only set and used inside one `send_each`
// call, and the vectors are empty whenever that call is not running; what moves between threads
// is only their spare capacity.
unsafe impl Send for Outbox {}

/// What became of a [`send_each`].
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Sent {
    pub delivered: u64,
    pub failed: u64,
}

/// How long a [`send_each`] may go on. Each wait for room in the socket buffer lasts at most
/// `SEND_WAIT`, and a batch that found none is given up.
#[derive(Clone, Copy, Default)]
pub struct Until<'a> {
    /// Ends the send once fired; what is left is neither delivered nor failed.
    pub stop: Option<&'a Stop>,
    /// Ends the send at this instant; what is left counts as failed.
    pub deadline: Option<Instant>,
}

impl Until<'_> {
    fn stopped(&self) -> bool {
        self.stop.is_some_and(Stop::fired)
    }

    fn past_deadline(&self) -> bool {
        self.deadline.is_some_and(|d| Instant::now() >= d)
    }

    /// Waits for room in `socket`'s buffer, up to `SEND_WAIT` and the deadline.
    fn wait_for_room(&self, socket: &UdpSocket) -> io::Result<Ready> {
        let mut timeout = SEND_WAIT;
        if let Some(deadline) = self.deadline {
            timeout = timeout.min(deadline.saturating_duration_since(Instant::now()));
        }
        wait_for_room(socket, self.stop, timeout)
    }
}

impl Outbox {
    fn clear(&mut self) {
        self.names.clear();
        self.iovs.clear();
        self.controls.clear();
        self.hdrs.clear();
    }

    /// Sends the queued datagrams, a batch per system call. A destination that fails is counted,
    /// reported to `on_error` and skipped; the rest still go out. A datagram whose source address
    /// cannot be sent from (it left the host since the client registered) goes out once more
    /// from the address the kernel picks. A datagram refused for an ICMP error, which concerns
    /// an earlier one, is tried again as it is.
    fn flush(
        &mut self,
        socket: &UdpSocket,
        until: Until<'_>,
        sent: &mut Sent,
        on_error: &mut impl FnMut(SocketAddr, io::Error),
    ) {
        let parts = self
            .iovs
            .iter_mut()
            .zip(&self.names)
            .zip(&mut self.controls);
        for (hdr, ((iov, name), control)) in self.hdrs.iter_mut().zip(parts) {
            hdr.msg_hdr.msg_name = name.as_ptr() as *mut libc::c_void;
            hdr.msg_hdr.msg_namelen = name.len();
            hdr.msg_hdr.msg_iov = iov;
            hdr.msg_hdr.msg_iovlen = 1;
            control.attach(&mut hdr.msg_hdr);
        }
        let mut next = 0;
        let mut gave_up = None;
        let mut retry = Retry::default();
        while next < self.hdrs.len() {
            if until.stopped() {
                break;
            }
            if until.past_deadline() {
                gave_up = Some(io::Error::from(ErrorKind::TimedOut));
                break;
            }
            let rest = &mut self.hdrs[next..];
            // SAFETY: each header points at an address in `names`, an iovec in `iovs` and a
            // control message in `controls`, set just above, and each iovec at a datagram that
            // `send_each`'s caller keeps borrowed.
            let n = unsafe {
                libc::sendmmsg(
                    socket.as_fd().as_raw_fd(),
                    rest.as_mut_ptr(),
                    rest.len() as libc::c_uint,
                    0,
                )
            };
            if let Ok(n) = usize::try_from(n) {
                sent.delivered += n as u64;
                next += n.max(1); // n is never 0 for a non-empty batch; guard against a spin anyway
                retry.progress();
                continue;
            }
            let e = io::Error::last_os_error();
            match e.kind() {
                ErrorKind::Interrupted => {}
                ErrorKind::WouldBlock => match until.wait_for_room(socket) {
                    Ok(Ready::Socket(_)) => {}
                    Ok(Ready::Stopped) => break,
                    // The buffer stayed full: this batch is lost, like a datagram dropped on the wire.
                    Ok(Ready::TimedOut) | Err(_) => {
                        gave_up = Some(e);
                        break;
                    }
                },
                // The socket's pending ICMP error, for an earlier datagram, fails whichever send
                // comes next: when it is the first of this call (a later one only cuts the
                // count short, and the loop goes on from there), the same message, source
                // included, is tried again.
                _ if retry.again(&e) => {}
                _ if !self.controls[next].is_empty() && retry.may_be_own(&e) => {
                    self.controls[next] = Control::default();
                    self.controls[next].attach(&mut self.hdrs[next].msg_hdr);
                }
                _ => {
                    sent.failed += 1;
                    on_error(self.names[next].as_socket().expect("an IP address"), e);
                    next += 1;
                    retry.next_datagram();
                }
            }
        }
        if let Some(e) = gave_up {
            sent.failed += (self.hdrs.len() - next) as u64;
            on_error(self.names[next].as_socket().expect("an IP address"), e);
        }
        self.clear();
    }
}

/// Sends each `(datagram, destination, source)` through `sendmmsg`, up to 1024 per system call,
/// from the source address where one is given (else from the address the kernel picks).
pub fn send_each<'a>(
    socket: &UdpSocket,
    outbox: &mut Outbox,
    pairs: impl IntoIterator<Item = (&'a [u8], SocketAddr, Option<IpAddr>)>,
    until: Until<'_>,
    mut on_error: impl FnMut(SocketAddr, io::Error),
) -> Sent {
    let mut sent = Sent::default();
    // Empty already, unless a send panicked half-way: its pointers must never be used.
    outbox.clear();
    let mut pairs = pairs.into_iter();
    for (data, to, local) in pairs.by_ref() {
        outbox.names.push(SockAddr::from(to));
        outbox.iovs.push(libc::iovec {
            iov_base: data.as_ptr() as *mut libc::c_void,
            iov_len: data.len(),
        });
        outbox
            .controls
            .push(local.map(Control::source).unwrap_or_default());
        // SAFETY: mmsghdr is plain old data; `flush` fills in the pointers.
        outbox.hdrs.push(unsafe { std::mem::zeroed() });
        if outbox.hdrs.len() == MAX_BATCH {
            outbox.flush(socket, until, &mut sent, &mut on_error);
            if until.stopped() || until.past_deadline() {
                break;
            }
        }
    }
    // Every datagram is still borrowed here, so every pointer is valid while it is sent.
    outbox.flush(socket, until, &mut sent, &mut on_error);
    if !until.stopped() {
        // Past the deadline: what was never tried failed too.
        sent.failed += pairs.count() as u64;
    }
    sent
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    /// Collects what the receive loop hands over.
    #[derive(Default)]
    struct Collect {
        datagrams: Vec<(Vec<u8>, bool)>,
        local: Option<IpAddr>,
        batches: usize,
        icmp: usize,
        tx: Option<crossbeam_channel::Sender<(Vec<u8>, bool)>>,
    }

    impl Handler for Collect {
        fn datagram(&mut self, data: &[u8], _: SocketAddr, local: Option<IpAddr>, cut: bool) {
            self.local = local;
            self.datagrams.push((data.to_vec(), cut));
            if let Some(tx) = &self.tx {
                tx.send((data.to_vec(), cut)).unwrap();
            }
        }
        fn batch_done(&mut self) {
            self.batches += 1;
        }
        fn icmp(&mut self, _error: &io::Error) {
            self.icmp += 1;
        }
    }

    fn local() -> SocketAddr {
        "127.0.0.1:0".parse().unwrap()
    }

    #[test]
    fn receive_loop_reads_every_datagram_in_batches_then_returns_on_stop() {
        let socket = Arc::new(bind(local(), None).unwrap());
        let addr = socket.local_addr().unwrap();
        let stop = Arc::new(Stop::new().unwrap());
        let peer = UdpSocket::bind(local()).unwrap();
        for i in 0..10u8 {
            peer.send_to(&[i], addr).unwrap();
        }
        peer.send_to(&[7; 17], addr).unwrap();
        let (tx, rx) = crossbeam_channel::unbounded();
        let thread = {
            let (socket, stop) = (Arc::clone(&socket), Arc::clone(&stop));
            std::thread::spawn(move || {
                let mut handler = Collect {
                    tx: Some(tx),
                    ..Collect::default()
                };
                receive_loop(&socket, &mut Inbox::new(4, 16), &stop, &mut handler);
                handler
            })
        };
        let got: Vec<(Vec<u8>, bool)> = (0..11)
            .map(|_| rx.recv_timeout(Duration::from_secs(5)).unwrap())
            .collect();
        let mut expected: Vec<(Vec<u8>, bool)> = (0..10u8).map(|i| (vec![i], false)).collect();
        expected.push((vec![7; 16], true)); // longer than the buffer: flagged as cut
        assert_eq!(got, expected);
        // The thread is now blocked in poll; stop must wake it at once.
        let t0 = Instant::now();
        stop.fire();
        let handler = thread.join().unwrap();
        assert!(
            t0.elapsed() < Duration::from_millis(100),
            "{:?}",
            t0.elapsed()
        );
        assert!((3..=11).contains(&handler.batches), "{}", handler.batches);
    }

    #[test]
    fn local_ips_include_loopback() {
        let ips = local_ips().unwrap();
        assert!(ips.contains(&IpAddr::from(Ipv4Addr::LOCALHOST)), "{ips:?}");
    }

    #[test]
    fn icmp_errors_are_reported_not_fatal() {
        // A connected socket whose peer port is closed gets ECONNREFUSED from the next call.
        let closed = UdpSocket::bind(local()).unwrap();
        let closed_addr = closed.local_addr().unwrap();
        drop(closed);
        let socket = bind(local(), None).unwrap();
        socket.connect(closed_addr).unwrap();
        send(&socket, b"x", None, None).unwrap();
        let stop = Stop::new().unwrap();
        let mut handler = Collect::default();
        std::thread::sleep(Duration::from_millis(20));
        std::thread::scope(|s| {
            s.spawn(|| {
                std::thread::sleep(Duration::from_millis(100));
                stop.fire();
            });
            receive_loop(&socket, &mut Inbox::new(4, 16), &stop, &mut handler);
        });
        assert_eq!(handler.icmp, 1);
    }

    #[test]
    fn send_each_delivers_every_pair_across_batches() {
        let socket = bind(local(), None).unwrap();
        let stop = Stop::new().unwrap();
        // Few enough per peer to fit its receive buffer.
        let peers: Vec<UdpSocket> = (0..6).map(|_| UdpSocket::bind(local()).unwrap()).collect();
        let datagrams: Vec<Vec<u8>> = (0..200u32).map(|i| i.to_be_bytes().to_vec()).collect();
        let pairs = datagrams.iter().flat_map(|d| {
            peers
                .iter()
                .map(move |p| (d.as_slice(), p.local_addr().unwrap(), None))
        });
        let until = Until {
            stop: Some(&stop),
            deadline: None,
        };
        let sent = send_each(&socket, &mut Outbox::default(), pairs, until, |a, e| {
            panic!("{a}: {e}")
        });
        // 1200 pairs: two system calls of up to 1024.
        assert_eq!(
            sent,
            Sent {
                delivered: 1200,
                failed: 0
            }
        );
        for peer in &peers {
            peer.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            let mut buf = [0u8; 8];
            for d in &datagrams {
                let n = peer.recv(&mut buf).unwrap();
                assert_eq!(&buf[..n], &d[..]);
            }
        }
    }

    #[test]
    fn a_wildcard_socket_learns_and_replies_from_the_address_it_was_sent_to() {
        for (any, target) in [
            ("0.0.0.0:0", "127.0.0.2"),
            ("[::]:0", "::1"),
            ("[::]:0", "127.0.0.3"), // an IPv4 client of a dual-stack socket
        ] {
            let socket = bind(any.parse().unwrap(), None).unwrap();
            report_local_addresses(&socket).unwrap();
            let port = socket.local_addr().unwrap().port();
            let target: IpAddr = target.parse().unwrap();
            let peer = UdpSocket::bind(SocketAddr::new(
                match target {
                    IpAddr::V4(_) => Ipv4Addr::LOCALHOST.into(),
                    IpAddr::V6(_) => Ipv6Addr::LOCALHOST.into(),
                },
                0,
            ))
            .unwrap();
            peer.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            peer.connect(SocketAddr::new(target, port)).unwrap();
            peer.send(b"hi").unwrap();
            let stop = Stop::new().unwrap();
            let mut handler = Collect::default();
            let mut inbox = Inbox::new(4, 16);
            while handler.datagrams.is_empty() {
                wait(&socket, libc::POLLIN, None, Some(Duration::from_secs(5))).unwrap();
                inbox.recv(&socket).unwrap();
                for d in inbox.datagrams() {
                    handler.datagram(d.data, d.from.unwrap(), d.local, d.cut);
                }
            }
            let local = handler.local.expect("a local address");
            assert_eq!(local.to_canonical(), target, "{any}");
            // The reply goes out from it: the connected peer accepts nothing else.
            let to = peer.local_addr().unwrap();
            let to = match (socket.local_addr().unwrap(), to) {
                (SocketAddr::V6(_), SocketAddr::V4(v4)) => {
                    SocketAddr::new(v4.ip().to_ipv6_mapped().into(), v4.port())
                }
                (_, to) => to,
            };
            let until = Until {
                stop: Some(&stop),
                deadline: None,
            };
            let sent = send_each(
                &socket,
                &mut Outbox::default(),
                [(&b"back"[..], to, Some(local))],
                until,
                |a, e| panic!("{a}: {e}"),
            );
            assert_eq!(sent.delivered, 1);
            let mut buf = [0u8; 8];
            assert_eq!(peer.recv(&mut buf).unwrap(), 4, "{any} {target}");
        }
    }

    #[test]
    fn a_source_the_host_does_not_have_falls_back_to_the_kernels_choice() {
        let socket = bind("0.0.0.0:0".parse().unwrap(), None).unwrap();
        let peer = UdpSocket::bind(local()).unwrap();
        peer.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        // TEST-NET-1: never an address of this host.
        let gone = Some("192.0.2.77".parse().unwrap());
        let sent = send_each(
            &socket,
            &mut Outbox::default(),
            [(&b"x"[..], peer.local_addr().unwrap(), gone)],
            Until::default(),
            |a, e| panic!("{a}: {e}"),
        );
        assert_eq!(sent.delivered, 1);
        let mut buf = [0u8; 8];
        let (_, from) = peer.recv_from(&mut buf).unwrap();
        assert_eq!(from.ip(), IpAddr::from(Ipv4Addr::LOCALHOST));
    }

    #[test]
    fn past_the_deadline_nothing_more_is_sent_and_the_rest_counts_as_failed() {
        let socket = bind(local(), None).unwrap();
        let peer = UdpSocket::bind(local()).unwrap();
        let to = peer.local_addr().unwrap();
        let pairs = (0..3000).map(|_| (&b"end"[..], to, None));
        let until = Until {
            stop: None,
            deadline: Some(Instant::now()),
        };
        let mut errors = 0;
        let sent = send_each(&socket, &mut Outbox::default(), pairs, until, |_, _| {
            errors += 1
        });
        assert_eq!(
            sent,
            Sent {
                delivered: 0,
                failed: 3000
            }
        );
        assert_eq!(errors, 1); // reported once, not per datagram
    }

    #[test]
    fn kernel_drops_are_counted() {
        let socket = bind(local(), Some(4096)).unwrap();
        let addr = socket.local_addr().unwrap();
        let peer = UdpSocket::bind(local()).unwrap();
        // A tiny buffer overflows at once; the kernel counts what it drops.
        for _ in 0..200 {
            peer.send_to(&[1u8; 512], addr).unwrap();
        }
        let mut buf = [0u8; 600];
        let mut received = 0;
        while socket.recv(&mut buf).is_ok() {
            received += 1;
        }
        let dropped = kernel_drops(&socket).unwrap();
        assert!(dropped > 0);
        assert_eq!(dropped + received, 200);
    }

    /// What the receive loop reports of a socket with `report_unreachable`, as it happens.
    #[derive(Debug, PartialEq)]
    enum Report {
        Datagram(SocketAddr),
        Unreachable(SocketAddr, Option<i32>),
    }

    struct Reports {
        tx: crossbeam_channel::Sender<Report>,
        icmp: usize,
        /// How long each datagram keeps the loop busy.
        work: Duration,
    }

    impl Handler for Reports {
        fn datagram(&mut self, _: &[u8], from: SocketAddr, _: Option<IpAddr>, _: bool) {
            std::thread::sleep(self.work);
            self.tx.send(Report::Datagram(from)).unwrap();
        }
        fn icmp(&mut self, _error: &io::Error) {
            self.icmp += 1;
        }
        fn unreachable(&mut self, to: SocketAddr, error: &io::Error) {
            self.tx
                .send(Report::Unreachable(to, error.raw_os_error()))
                .unwrap();
        }
    }

    /// Runs the receive loop on `socket` in a thread until the returned stop fires, each
    /// datagram taking it `work`; the thread gives back its handler and the CPU time it used.
    fn spawn_receiver(
        socket: &Arc<UdpSocket>,
        work: Duration,
    ) -> (
        Arc<Stop>,
        crossbeam_channel::Receiver<Report>,
        std::thread::JoinHandle<(Reports, Duration)>,
    ) {
        let stop = Arc::new(Stop::new().unwrap());
        let (tx, rx) = crossbeam_channel::unbounded();
        let thread = {
            let (socket, stop) = (Arc::clone(socket), Arc::clone(&stop));
            std::thread::spawn(move || {
                let mut handler = Reports { tx, icmp: 0, work };
                receive_loop(&socket, &mut Inbox::new(4, 64), &stop, &mut handler);
                (handler, thread_cpu())
            })
        };
        (stop, rx, thread)
    }

    /// CPU time (user and system) the calling thread has used.
    fn thread_cpu() -> Duration {
        // SAFETY: rusage is plain old data; all-zero is a valid value.
        let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
        // SAFETY: getrusage writes one rusage into `usage`.
        let r = unsafe { libc::getrusage(libc::RUSAGE_THREAD, &mut usage) };
        assert_eq!(r, 0, "{}", io::Error::last_os_error());
        let time = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
        time(usage.ru_utime) + time(usage.ru_stime)
    }

    /// An address on `ip` where no socket listens: a client whose process died. For IPv4
    /// loopback it is on 127.42.0.1, which no other test binds: the port freed here may be bound
    /// at once by a test running beside this one, which would then get the datagrams sent to
    /// the "dead" port (a client in the two-server loop test once got 1,456).
    fn dead_port(ip: IpAddr) -> SocketAddr {
        let ip = match ip {
            IpAddr::V4(v4) if v4 == Ipv4Addr::LOCALHOST => Ipv4Addr::new(127, 42, 0, 1).into(),
            ip => ip,
        };
        UdpSocket::bind(SocketAddr::new(ip, 0))
            .unwrap()
            .local_addr()
            .unwrap()
    }

    /// Waits (up to 5 s) until poll says `socket` has an error pending.
    fn wait_for_error(socket: &UdpSocket) {
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if let Ready::Socket(revents) =
                wait(socket, libc::POLLIN, None, Some(Duration::from_millis(100))).unwrap()
            {
                if revents & libc::POLLERR != 0 {
                    return;
                }
            }
        }
        panic!("no ICMP error reported on {:?}", socket.local_addr());
    }

    #[test]
    fn an_unreachable_peer_is_reported_at_once_and_the_loop_then_sleeps() {
        let socket = Arc::new(bind(local(), None).unwrap());
        report_unreachable(&socket).unwrap();
        let refused = Some(libc::ECONNREFUSED);

        // The error comes in before the loop runs, and a send takes the pending error first (as
        // the fan-out thread may): recvmmsg has nothing to say, only poll's POLLERR tells.
        let first = dead_port(Ipv4Addr::LOCALHOST.into());
        socket.send_to(b"x", first).unwrap();
        wait_for_error(&socket);
        let taken = socket.take_error().unwrap();
        assert_eq!(taken.map(|e| e.kind()), Some(ErrorKind::ConnectionRefused));
        let t0 = Instant::now();
        let (stop, rx, thread) = spawn_receiver(&socket, Duration::ZERO);
        let got = rx.recv_timeout(Duration::from_secs(1));
        let first_after = t0.elapsed();

        // The loop is asleep in poll when the next one comes.
        let second = dead_port(Ipv4Addr::LOCALHOST.into());
        std::thread::sleep(Duration::from_millis(20));
        let t1 = Instant::now();
        send(&socket, b"y", Some(second), None).unwrap();
        let got_second = rx.recv_timeout(Duration::from_secs(1));
        let second_after = t1.elapsed();

        // Quiet now. All along, the loop must sleep in poll, not spin on a POLLERR it leaves be.
        std::thread::sleep(Duration::from_millis(200));
        stop.fire();
        let (handler, cpu) = thread.join().unwrap();
        let lifetime = t0.elapsed();
        eprintln!(
            "reported after {first_after:?} and {second_after:?}; the loop used {cpu:?} of CPU \
             in {lifetime:?}; icmp() calls: {}",
            handler.icmp
        );
        assert_eq!(got, Ok(Report::Unreachable(first, refused)));
        assert_eq!(got_second, Ok(Report::Unreachable(second, refused)));
        assert!(first_after < Duration::from_millis(100), "{first_after:?}");
        assert!(
            second_after < Duration::from_millis(100),
            "{second_after:?}"
        );
        assert!(cpu < Duration::from_millis(50), "{cpu:?} in {lifetime:?}");
        assert!(rx.try_recv().is_err(), "each error is reported once");
    }

    /// A socket bound to `any` with `IP_RECVERR` on, and nothing reading its error queue, sends
    /// to a dead port and to a live one (on `loopback`, from `source`) by turns: each datagram
    /// to the dead port draws an ICMP error that fails the socket's next send. Every datagram
    /// to the live port must still arrive, from `source`. Returns how many errors were queued.
    fn send_by_turns(any: &str, loopback: IpAddr, source: Option<IpAddr>) -> usize {
        let socket = bind(any.parse().unwrap(), None).unwrap();
        report_unreachable(&socket).unwrap();
        let live = UdpSocket::bind(SocketAddr::new(loopback, 0)).unwrap();
        live.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        let to = live.local_addr().unwrap();
        let dead = dead_port(loopback);
        let case = format!("from {any} to {loopback} via {source:?}");
        let mut failed_live = Vec::new();
        let mut on_error = |addr: SocketAddr, e: io::Error| {
            if addr == to {
                failed_live.push(e.to_string());
            }
        };
        let rounds = 200u32;
        let datagrams: Vec<[u8; 4]> = (0..rounds).map(u32::to_be_bytes).collect();
        let expect_all = |how: &str| {
            let mut buf = [0u8; 8];
            for d in &datagrams {
                let (n, from) = live
                    .recv_from(&mut buf)
                    .unwrap_or_else(|e| panic!("{case}, {how}: {d:?} lost: {e}"));
                let from_ip = source.unwrap_or(loopback);
                assert_eq!((&buf[..n], from.ip()), (&d[..], from_ip), "{case}, {how}");
            }
        };
        let mut send_all = |pairs: &[(&[u8], SocketAddr, Option<IpAddr>)]| {
            let pairs = pairs.iter().copied();
            send_each(
                &socket,
                &mut Outbox::default(),
                pairs,
                Until::default(),
                &mut on_error,
            )
        };

        // A call per datagram: each one to the live port is the first of its call.
        let mut live_sent = Sent::default();
        for d in &datagrams {
            send_all(&[(b"dead", dead, source)]);
            let sent = send_all(&[(d, to, source)]);
            live_sent.delivered += sent.delivered;
            live_sent.failed += sent.failed;
        }
        let all = Sent {
            delivered: rounds.into(),
            failed: 0,
        };
        assert_eq!(live_sent, all, "{case}");
        expect_all("a call each");

        // All in one call. On loopback each error comes in during the call: it fails the
        // next message, which only cuts the call's count short, and the loop goes on from there.
        let pairs: Vec<_> = datagrams
            .iter()
            .flat_map(|d| [(&b"dead"[..], dead, source), (&d[..], to, source)])
            .collect();
        let sent = send_all(&pairs);
        eprintln!("{case}, one call: {sent:?}");
        expect_all("one call");
        assert_eq!(failed_live, Vec::<String>::new(), "{case}");

        // Proof that the traps were there: the errors the dead port drew (as many as the
        // socket's receive buffer holds).
        errqueue::read(&socket, |to, _| assert_eq!(to, dead)).unwrap()
    }

    #[test]
    fn a_pending_icmp_error_costs_no_live_peer_its_datagram() {
        let v4 = IpAddr::from(Ipv4Addr::LOCALHOST);
        // From 127.0.0.2, which a datagram sent again without its source would not come from.
        for (any, source) in [
            ("127.0.0.1:0", None),
            ("0.0.0.0:0", Some(Ipv4Addr::new(127, 0, 0, 2).into())),
        ] {
            let queued = send_by_turns(any, v4, source);
            eprintln!("{any}: {queued} ICMP errors queued for 400 datagrams to a dead port");
            assert!(queued > 0);
        }
        let v6 = IpAddr::from(Ipv6Addr::LOCALHOST);
        if UdpSocket::bind(SocketAddr::new(v6, 0)).is_err() {
            eprintln!("skipped IPv6: ::1 is not available");
            return;
        }
        for (any, source) in [("[::1]:0", None), ("[::]:0", Some(v6))] {
            let queued = send_by_turns(any, v6, source);
            eprintln!("{any}: {queued} ICMP errors queued for 400 datagrams to a dead port");
            assert!(queued > 0);
        }
    }

    #[test]
    fn a_datagram_sent_to_an_address_goes_out_despite_a_pending_icmp_error() {
        let socket = bind(local(), None).unwrap();
        report_unreachable(&socket).unwrap();
        send(
            &socket,
            b"x",
            Some(dead_port(Ipv4Addr::LOCALHOST.into())),
            None,
        )
        .unwrap();
        wait_for_error(&socket);
        let live = UdpSocket::bind(local()).unwrap();
        live.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
        send(&socket, b"live", Some(live.local_addr().unwrap()), None).unwrap();
        let mut buf = [0u8; 8];
        assert_eq!(live.recv(&mut buf).unwrap(), 4);
    }

    #[test]
    fn a_dual_stack_socket_names_an_unreachable_ipv4_peer_as_it_names_its_datagrams() {
        let Ok(socket) = bind("[::]:0".parse().unwrap(), None) else {
            eprintln!("skipped: no IPv6");
            return;
        };
        if socket2::SockRef::from(&socket).only_v6().unwrap() {
            eprintln!("skipped: IPv6 sockets are IPv6-only here (net.ipv6.bindv6only)");
            return;
        }
        let socket = Arc::new(socket);
        report_unreachable(&socket).unwrap();
        let (stop, rx, thread) = spawn_receiver(&socket, Duration::ZERO);
        // How recvmmsg names an IPv4 peer on this socket: the server keys its clients so.
        let peer = UdpSocket::bind(local()).unwrap();
        let port = socket.local_addr().unwrap().port();
        peer.send_to(b"hi", (Ipv4Addr::LOCALHOST, port)).unwrap();
        let got = rx.recv_timeout(Duration::from_secs(5));
        let Ok(Report::Datagram(from)) = got else {
            panic!("{got:?}");
        };
        // A client on that same address whose process is gone, answered as the server would.
        let gone = dead_port(Ipv4Addr::LOCALHOST.into());
        let to = SocketAddr::new(from.ip(), gone.port());
        send(&socket, b"x", Some(to), None).unwrap();
        let got = rx.recv_timeout(Duration::from_secs(1));
        stop.fire();
        thread.join().unwrap();
        assert_eq!(got, Ok(Report::Unreachable(to, Some(libc::ECONNREFUSED))));
        let mapped = SocketAddr::new(Ipv4Addr::LOCALHOST.to_ipv6_mapped().into(), gone.port());
        assert_eq!(to, mapped);
    }

    #[test]
    fn a_busy_receive_loop_still_reads_the_error_queue() {
        let socket = Arc::new(bind(local(), None).unwrap());
        report_unreachable(&socket).unwrap();
        let peer = UdpSocket::bind(local()).unwrap();
        let waiting = 200;
        for i in 0..waiting {
            peer.send_to(&[i as u8], socket.local_addr().unwrap())
                .unwrap();
        }
        // The error's entry is queued, and a send takes the pending error (the fan-out thread
        // does so at once when the ICMP error comes in during its own sendmmsg).
        let gone = dead_port(Ipv4Addr::LOCALHOST.into());
        socket.send_to(b"x", gone).unwrap();
        wait_for_error(&socket);
        assert!(socket.take_error().unwrap().is_some());
        // A millisecond a datagram: the loop finds one waiting each time for 200 ms.
        let (stop, rx, thread) = spawn_receiver(&socket, Duration::from_millis(1));
        let mut before = 0;
        let report = loop {
            match rx.recv_timeout(Duration::from_secs(5)).unwrap() {
                Report::Datagram(_) => before += 1,
                report => break report,
            }
        };
        stop.fire();
        thread.join().unwrap();
        eprintln!("reported after {before} of {waiting} datagrams");
        assert_eq!(report, Report::Unreachable(gone, Some(libc::ECONNREFUSED)));
        assert!(before < waiting, "reported only once the loop was idle");
    }
}
