//! Load generator for udpchat benchmarks: N client sockets on 127.0.0.1, a few of which send
//! messages; every socket counts the broadcasts it receives. Reads with epoll and recvmmsg so it
//! is never the bottleneck, sends within a bounded window, prints one line of JSON figures.
//!
//!   loadgen throughput SERVER CLIENTS SENDERS SIZE SECONDS
//!   loadgen latency    SERVER CLIENTS RATE SIZE SECONDS
//!   loadgen blast      LISTEN COUNT SIZE          (plays a server: waits for `reg`, then sends)

use std::collections::HashSet;
use std::net::{SocketAddr, UdpSocket};
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

const BATCH: usize = 64;
const BUF: usize = 2048;

fn raise_fd_limit() {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: plain getrlimit/setrlimit on a local struct.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 {
            lim.rlim_cur = lim.rlim_max;
            libc::setrlimit(libc::RLIMIT_NOFILE, &lim);
        }
    }
}

/// recvmmsg into fixed buffers; returns the datagrams of one call.
struct Reader {
    bufs: Vec<[u8; BUF]>,
    iovs: Vec<libc::iovec>,
    hdrs: Vec<libc::mmsghdr>,
}

impl Reader {
    fn new() -> Box<Reader> {
        let mut r = Box::new(Reader {
            bufs: vec![[0u8; BUF]; BATCH],
            iovs: Vec::new(),
            hdrs: Vec::new(),
        });
        let ptrs: Vec<*mut u8> = r.bufs.iter_mut().map(|b| b.as_mut_ptr()).collect();
        r.iovs = ptrs
            .into_iter()
            .map(|p| libc::iovec {
                iov_base: p.cast(),
                iov_len: BUF,
            })
            .collect();
        let iov_ptrs: Vec<*mut libc::iovec> = r.iovs.iter_mut().map(|i| i as *mut _).collect();
        r.hdrs = iov_ptrs
            .into_iter()
            .map(|iov| {
                // SAFETY: all-zero mmsghdr is valid.
                let mut h: libc::mmsghdr = unsafe { std::mem::zeroed() };
                h.msg_hdr.msg_iov = iov;
                h.msg_hdr.msg_iovlen = 1;
                h
            })
            .collect();
        r
    }

    /// Reads everything waiting on `fd`, calling `f` for each datagram.
    fn drain(&mut self, fd: i32, mut f: impl FnMut(&[u8])) {
        loop {
            // SAFETY: headers point at this Reader's own buffers.
            let n = unsafe {
                libc::recvmmsg(
                    fd,
                    self.hdrs.as_mut_ptr(),
                    BATCH as u32,
                    libc::MSG_DONTWAIT,
                    std::ptr::null_mut(),
                )
            };
            if n <= 0 {
                return;
            }
            for i in 0..n as usize {
                f(&self.bufs[i][..self.hdrs[i].msg_len as usize]);
            }
        }
    }
}

struct Epoll(i32);

impl Epoll {
    fn new(sockets: &[UdpSocket]) -> Epoll {
        // SAFETY: epoll calls on fds we own.
        let ep = unsafe { libc::epoll_create1(0) };
        assert!(ep >= 0);
        for (i, s) in sockets.iter().enumerate() {
            let mut ev = libc::epoll_event {
                events: libc::EPOLLIN as u32,
                u64: i as u64,
            };
            assert_eq!(
                unsafe { libc::epoll_ctl(ep, libc::EPOLL_CTL_ADD, s.as_raw_fd(), &mut ev) },
                0
            );
        }
        Epoll(ep)
    }

    fn wait(&self, events: &mut [libc::epoll_event], timeout_ms: i32) -> usize {
        // SAFETY: `events` is a valid buffer.
        let n = unsafe {
            libc::epoll_wait(self.0, events.as_mut_ptr(), events.len() as i32, timeout_ms)
        };
        n.max(0) as usize
    }
}

/// A big receive buffer, so a burst is never dropped at the load generator itself.
fn set_rcvbuf(s: &UdpSocket, bytes: libc::c_int) {
    // SAFETY: setsockopt with a valid int option value.
    unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVBUF,
            (&bytes as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        );
    }
}

fn clients(server: SocketAddr, n: usize) -> Vec<UdpSocket> {
    let sockets: Vec<UdpSocket> = (0..n)
        .map(|_| {
            let s = UdpSocket::bind("127.0.0.1:0").expect("bind");
            s.set_nonblocking(true).unwrap();
            set_rcvbuf(&s, 1 << 20);
            s
        })
        .collect();
    // Register twice, paced so a burst never overflows the server's receive buffer, so one lost
    // `reg` does not matter.
    for _ in 0..2 {
        for chunk in sockets.chunks(50) {
            for s in chunk {
                let _ = s.send_to(b"reg", server);
            }
            std::thread::sleep(Duration::from_millis(2));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    sockets
}

/// A payload the server relays unchanged: sequence number and send time in hex, padded.
fn payload(seq: u64, t_ns: u64, size: usize) -> Vec<u8> {
    let mut p = format!("{seq:016x}{t_ns:016x}").into_bytes();
    p.resize(size.max(32), b'x');
    p
}

/// Sequence number and send time from a broadcast `ack: ip port\n{payload}\n`.
fn parse(datagram: &[u8]) -> Option<(u64, u64)> {
    let nl = datagram.iter().position(|&b| b == b'\n')?;
    let p = datagram.get(nl + 1..nl + 33)?;
    let p = std::str::from_utf8(p).ok()?;
    Some((
        u64::from_str_radix(&p[..16], 16).ok()?,
        u64::from_str_radix(&p[16..], 16).ok()?,
    ))
}

fn throughput(server: SocketAddr, n: usize, senders: usize, size: usize, seconds: f64) {
    let sockets = clients(server, n);
    let epoll = Epoll::new(&sockets);
    let mut reader = Reader::new();
    let mut events = vec![libc::epoll_event { events: 0, u64: 0 }; 1024];
    // Messages in flight: about 2,000 deliveries owed, enough to keep every queue busy.
    let window = (2048 / n).clamp(2, 64) as u64;
    let start = Instant::now();
    let warmup = Duration::from_millis(300);
    let end = warmup + Duration::from_secs_f64(seconds);
    let (mut sent, mut delivered, mut forgiven) = (0u64, 0u64, 0u64);
    let (mut measured_from, mut delivered_at_start, mut sent_at_start) = (None, 0, 0);
    let mut last_progress = Instant::now();
    let msg = payload(0, 0, size);
    let mut next_sender = 0;
    loop {
        let now = start.elapsed();
        if measured_from.is_none() && now >= warmup {
            measured_from = Some(Instant::now());
            delivered_at_start = delivered;
            sent_at_start = sent;
        }
        if now >= end {
            break;
        }
        // In flight: deliveries still owed for what was sent, less what was given up as lost.
        while (sent * n as u64).saturating_sub(delivered + forgiven) < window * n as u64 {
            let _ = sockets[next_sender].send_to(&msg, server);
            next_sender = (next_sender + 1) % senders;
            sent += 1;
        }
        let ready = epoll.wait(&mut events, 5);
        let before = delivered;
        for ev in &events[..ready] {
            reader.drain(sockets[ev.u64 as usize].as_raw_fd(), |_| delivered += 1);
        }
        if delivered > before {
            last_progress = Instant::now();
        } else if last_progress.elapsed() > Duration::from_millis(20) {
            // Nothing for 20 ms: what is outstanding was dropped somewhere. Forget it and go on.
            forgiven = (sent * n as u64).saturating_sub(delivered);
            last_progress = Instant::now();
        }
    }
    let secs = measured_from.map_or(0.0, |t| t.elapsed().as_secs_f64());
    let d = delivered - delivered_at_start;
    let s = sent - sent_at_start;
    println!(
        "{{\"deliveries_per_s\": {:.0}, \"messages_per_s\": {:.0}, \"sent\": {s}, \"delivered\": {d}, \"delivery_ratio\": {:.4}}}",
        d as f64 / secs,
        s as f64 / secs,
        d as f64 / (s * n as u64).max(1) as f64
    );
}

/// CLOCK_REALTIME in nanoseconds: the clock of the kernel's receive timestamps.
fn realtime_ns() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_nanos() as u64
}

/// Reads one datagram with the kernel's receive timestamp (SO_TIMESTAMPNS), so the time a
/// datagram arrived does not depend on when this loop got round to it.
fn recv_stamped(fd: i32, buf: &mut [u8]) -> Option<(usize, u64)> {
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    let mut control = [0u64; 16];
    // SAFETY: all-zero msghdr is valid; it points at `iov` and `control`, both alive here.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = std::mem::size_of_val(&control);
    // SAFETY: as above.
    let n = unsafe { libc::recvmsg(fd, &mut msg, libc::MSG_DONTWAIT) };
    if n < 0 {
        return None;
    }
    // SAFETY: walking the control messages the kernel wrote into `control`.
    let mut cmsg = unsafe { libc::CMSG_FIRSTHDR(&msg) };
    while !cmsg.is_null() {
        let c = unsafe { &*cmsg };
        if c.cmsg_level == libc::SOL_SOCKET && c.cmsg_type == libc::SCM_TIMESTAMPNS {
            let ts =
                unsafe { std::ptr::read_unaligned(libc::CMSG_DATA(cmsg) as *const libc::timespec) };
            return Some((
                n as usize,
                ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64,
            ));
        }
        cmsg = unsafe { libc::CMSG_NXTHDR(&msg, cmsg) };
    }
    Some((n as usize, realtime_ns()))
}

fn latency(server: SocketAddr, n: usize, rate: f64, size: usize, seconds: f64) {
    let sockets = clients(server, n);
    // The first ten clients take turns to send; each times its own copy of what it sent, and
    // every client times every copy it gets (the latency all recipients see).
    let chatters = 10.min(n);
    for s in &sockets {
        let on: libc::c_int = 1;
        // SAFETY: setsockopt with a valid int option value.
        unsafe {
            libc::setsockopt(
                s.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_TIMESTAMPNS,
                (&on as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            );
        }
    }
    let epoll = Epoll::new(&sockets);
    let mut buf = [0u8; BUF];
    let mut events = vec![libc::epoll_event { events: 0, u64: 0 }; 1024];
    let start = Instant::now();
    let period = Duration::from_secs_f64(1.0 / rate);
    let total = (rate * seconds) as u64;
    let mut sent = 0u64;
    let mut pending: HashSet<u64> = HashSet::new();
    let mut rtts: Vec<u64> = Vec::with_capacity(total as usize);
    let mut all: Vec<u64> = Vec::with_capacity(total as usize * n);
    let deadline = Duration::from_secs_f64(seconds) + Duration::from_secs(1);
    while start.elapsed() < deadline && (sent < total || !pending.is_empty()) {
        if sent < total && start.elapsed() >= period * sent as u32 {
            let message = payload(sent, realtime_ns(), size);
            let _ = sockets[(sent % chatters as u64) as usize].send_to(&message, server);
            pending.insert(sent);
            sent += 1;
        }
        let ready = epoll.wait(&mut events, 0);
        for ev in &events[..ready] {
            let i = ev.u64 as usize;
            let fd = sockets[i].as_raw_fd();
            while let Some((len, arrived)) = recv_stamped(fd, &mut buf) {
                if let Some((seq, t)) = parse(&buf[..len]) {
                    all.push(arrived.saturating_sub(t));
                    if seq % chatters as u64 == i as u64 && pending.remove(&seq) {
                        rtts.push(arrived.saturating_sub(t));
                    }
                }
            }
        }
        if ready == 0 {
            std::hint::spin_loop();
        }
    }
    rtts.sort_unstable();
    all.sort_unstable();
    let pct = |v: &[u64], p: f64| {
        v.get(((v.len() as f64 * p) as usize).min(v.len().saturating_sub(1)))
            .copied()
            .unwrap_or(0) as f64
            / 1e3
    };
    println!(
        "{{\"p50_us\": {:.1}, \"p99_us\": {:.1}, \"max_us\": {:.1}, \"answered\": {}, \"sent\": {sent}, \"all_p50_us\": {:.1}, \"all_p99_us\": {:.1}, \"copies\": {}}}",
        pct(&rtts, 0.5),
        pct(&rtts, 0.99),
        rtts.last().copied().unwrap_or(0) as f64 / 1e3,
        rtts.len(),
        pct(&all, 0.5),
        pct(&all, 0.99),
        all.len()
    );
}

/// Plays a server for a client ingest benchmark: waits for `reg`, then sends COUNT broadcasts in
/// `sendmmsg` batches, faster than any Python loop can read them.
fn blast(listen: SocketAddr, count: u64, size: usize) {
    let socket = UdpSocket::bind(listen).expect("bind");
    println!("{}", socket.local_addr().unwrap());
    // Bounded: no `reg` within 30 s, or sends failing for 60 s, end it.
    socket
        .set_read_timeout(Some(Duration::from_secs(30)))
        .expect("SO_RCVTIMEO");
    let mut buf = [0u8; 128];
    let client = loop {
        let (n, from) = socket.recv_from(&mut buf).expect("no reg within 30 s");
        if buf[..n].trim_ascii() == b"reg" {
            break socket2::SockAddr::from(from);
        }
    };
    let mut datagram = b"ack: 127.0.0.1 4242\n".to_vec();
    datagram.extend(payload(0, 0, size));
    datagram.push(b'\n');
    let mut iov = libc::iovec {
        iov_base: datagram.as_mut_ptr().cast(),
        iov_len: datagram.len(),
    };
    let mut hdrs: Vec<libc::mmsghdr> = (0..BATCH)
        .map(|_| {
            // SAFETY: all-zero mmsghdr is valid; the pointers set here outlive every call below.
            let mut h: libc::mmsghdr = unsafe { std::mem::zeroed() };
            h.msg_hdr.msg_name = client.as_ptr() as *mut _;
            h.msg_hdr.msg_namelen = client.len();
            h.msg_hdr.msg_iov = &mut iov;
            h.msg_hdr.msg_iovlen = 1;
            h
        })
        .collect();
    let mut sent = 0u64;
    let deadline = Instant::now() + Duration::from_secs(60);
    while sent < count && Instant::now() < deadline {
        let n = (count - sent).min(BATCH as u64) as u32;
        // SAFETY: headers point at `client`, `iov` and `datagram`, all alive.
        let r = unsafe { libc::sendmmsg(socket.as_raw_fd(), hdrs.as_mut_ptr(), n, 0) };
        sent += r.max(0) as u64;
    }
}

fn main() {
    raise_fd_limit();
    let args: Vec<String> = std::env::args().collect();
    let arg = |i: usize| {
        args.get(i)
            .unwrap_or_else(|| panic!("missing argument {i}; see the source's header"))
    };
    let server: SocketAddr = arg(2).parse().expect("SERVER as ip:port");
    match arg(1).as_str() {
        "throughput" => throughput(
            server,
            arg(3).parse().unwrap(),
            arg(4).parse().unwrap(),
            arg(5).parse().unwrap(),
            arg(6).parse().unwrap(),
        ),
        "latency" => latency(
            server,
            arg(3).parse().unwrap(),
            arg(4).parse().unwrap(),
            arg(5).parse().unwrap(),
            arg(6).parse().unwrap(),
        ),
        "blast" => blast(server, arg(3).parse().unwrap(), arg(4).parse().unwrap()),
        other => panic!("unknown mode {other}"),
    }
}
