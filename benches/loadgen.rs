//! Load generator for udpchat benchmarks: N client sockets on 127.0.0.1, a few of which send
//! messages; every socket counts the broadcasts it receives. Reads with epoll and recvmmsg so it
//! is never the bottleneck, sends within a bounded window, prints one line of JSON figures.
//!
//!   loadgen throughput SERVER CLIENTS SENDERS SIZE SECONDS
//!   loadgen latency    SERVER CLIENTS RATE SIZE SECONDS
//!   loadgen blast      LISTEN COUNT SIZE          (plays a server: waits for `reg`, then sends)
//!
//! Two servers in one chat (a cluster through Redis, or anything else that joins them):
//!
//!   loadgen cross         A B CLIENTS_B SENDERS SIZE SECONDS [WINDOW]
//!       SENDERS clients of A send; what counts is every delivery at the CLIENTS_B clients of B
//!   loadgen cross-latency A B CLIENTS_A CLIENTS_B RATE SIZE SECONDS     (B may be `-`: none)
//!       kernel-timestamped one-way times of every copy, on A's clients and on B's
//!   loadgen redis-sub     REDIS CHANNEL K SIZE SECONDS
//!       K connections subscribed to CHANNEL that read and count what Redis sends them, until
//!       standard input ends or SECONDS pass (Redis's fan-out to K servers, without the servers)

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
        let fds: Vec<i32> = sockets.iter().map(|s| s.as_raw_fd()).collect();
        Epoll::of_fds(&fds)
    }

    /// Each fd is reported with its index in `fds`.
    fn of_fds(fds: &[i32]) -> Epoll {
        // SAFETY: epoll calls on fds we own.
        let ep = unsafe { libc::epoll_create1(0) };
        assert!(ep >= 0);
        for (i, &fd) in fds.iter().enumerate() {
            let mut ev = libc::epoll_event {
                events: libc::EPOLLIN as u32,
                u64: i as u64,
            };
            assert_eq!(
                unsafe { libc::epoll_ctl(ep, libc::EPOLL_CTL_ADD, fd, &mut ev) },
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

/// Messages from SENDERS clients of server A, counted at every one of the `nb` clients of server
/// B: the rate at which a chat crosses from one server to another. Messages in flight are
/// bounded by `window` (deliveries still owed at B, in messages); what is outstanding after
/// 100 ms without a delivery at B is given up as lost. A's own copies, which its senders get
/// back, are read and counted apart.
fn cross(
    a: SocketAddr,
    b: SocketAddr,
    nb: usize,
    senders: usize,
    size: usize,
    seconds: f64,
    window: u64,
) {
    let mut sockets = clients(b, nb);
    sockets.extend(clients(a, senders));
    let epoll = Epoll::new(&sockets);
    let mut reader = Reader::new();
    let mut events = vec![libc::epoll_event { events: 0, u64: 0 }; 1024];
    let start = Instant::now();
    let warmup = Duration::from_millis(300);
    let end = warmup + Duration::from_secs_f64(seconds);
    let n = nb as u64;
    let (mut sent, mut delivered, mut forgiven, mut local) = (0u64, 0u64, 0u64, 0u64);
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
        while (sent * n).saturating_sub(delivered + forgiven) < window * n {
            let _ = sockets[nb + next_sender].send_to(&msg, a);
            next_sender = (next_sender + 1) % senders;
            sent += 1;
        }
        let ready = epoll.wait(&mut events, 5);
        let before = delivered;
        for ev in &events[..ready] {
            let i = ev.u64 as usize;
            if i < nb {
                reader.drain(sockets[i].as_raw_fd(), |_| delivered += 1);
            } else {
                reader.drain(sockets[i].as_raw_fd(), |_| local += 1);
            }
        }
        if delivered > before {
            last_progress = Instant::now();
        } else if last_progress.elapsed() > Duration::from_millis(100) {
            forgiven = (sent * n).saturating_sub(delivered);
            last_progress = Instant::now();
        }
    }
    let secs = measured_from.map_or(0.0, |t| t.elapsed().as_secs_f64());
    let d = delivered - delivered_at_start;
    let s = sent - sent_at_start;
    println!(
        "{{\"messages_per_s\": {:.0}, \"deliveries_per_s\": {:.0}, \"sent_per_s\": {:.0}, \"sent\": {s}, \"delivered\": {d}, \"delivery_ratio\": {:.4}, \"sent_total\": {sent}, \"delivered_total\": {delivered}, \"local_total\": {local}, \"window\": {window}}}",
        d as f64 / n as f64 / secs,
        d as f64 / secs,
        s as f64 / secs,
        d as f64 / (s * n).max(1) as f64
    );
}

fn percentile(sorted: &[u64], p: f64) -> f64 {
    sorted
        .get(((sorted.len() as f64 * p) as usize).min(sorted.len().saturating_sub(1)))
        .copied()
        .unwrap_or(0) as f64
        / 1e3
}

/// One-way times through one server and across two: `na` clients on A, the first ten of which
/// take turns to send RATE messages a second, and `nb` on B (`b` None: a server alone). Every
/// copy is timed with the kernel's receive timestamp against the send time in its payload:
/// "own" is a sender's own copy, "local" every copy at A's clients, "remote" every copy at B's.
/// It waits in epoll between sends (no spinning: on 2 cores a spinning reader takes a core from
/// the servers and Redis), so a send may leave up to 1 ms late; it is stamped when it leaves.
fn cross_latency(
    a: SocketAddr,
    b: Option<SocketAddr>,
    na: usize,
    nb: usize,
    rate: f64,
    size: usize,
    seconds: f64,
) {
    let mut sockets = clients(a, na);
    if let Some(b) = b {
        sockets.extend(clients(b, nb));
    }
    let nb = if b.is_some() { nb } else { 0 };
    let chatters = 10.min(na);
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
    let total = (rate * seconds) as u64;
    let period = Duration::from_secs_f64(1.0 / rate);
    let mut own: Vec<u64> = Vec::with_capacity(total as usize);
    let mut local: Vec<u64> = Vec::with_capacity(total as usize * na);
    let mut remote: Vec<u64> = Vec::with_capacity(total as usize * nb);
    let mut sent = 0u64;
    let start = Instant::now();
    // The last copies land within a second of the last send, or are counted as lost.
    let deadline = Duration::from_secs_f64(seconds) + Duration::from_secs(1);
    let expected = |sent: u64| sent * (na + nb) as u64;
    while start.elapsed() < deadline
        && (sent < total || ((local.len() + remote.len()) as u64) < expected(sent))
    {
        let due = period * sent as u32;
        if sent < total && start.elapsed() >= due {
            let message = payload(sent, realtime_ns(), size);
            let _ = sockets[(sent % chatters as u64) as usize].send_to(&message, a);
            sent += 1;
            continue;
        }
        let wait = if sent < total {
            (due.saturating_sub(start.elapsed()).as_millis() as i32).clamp(0, 1)
        } else {
            1
        };
        let ready = epoll.wait(&mut events, wait);
        for ev in &events[..ready] {
            let i = ev.u64 as usize;
            let fd = sockets[i].as_raw_fd();
            while let Some((len, arrived)) = recv_stamped(fd, &mut buf) {
                if let Some((seq, t)) = parse(&buf[..len]) {
                    let took = arrived.saturating_sub(t);
                    if i >= na {
                        remote.push(took);
                    } else {
                        local.push(took);
                        if seq % chatters as u64 == i as u64 {
                            own.push(took);
                        }
                    }
                }
            }
        }
    }
    own.sort_unstable();
    local.sort_unstable();
    remote.sort_unstable();
    println!(
        "{{\"own_p50_us\": {:.1}, \"own_p99_us\": {:.1}, \"local_p50_us\": {:.1}, \"local_p99_us\": {:.1}, \"local_max_us\": {:.1}, \"remote_p50_us\": {:.1}, \"remote_p99_us\": {:.1}, \"remote_max_us\": {:.1}, \"sent\": {sent}, \"own\": {}, \"local\": {}, \"remote\": {}, \"local_expected\": {}, \"remote_expected\": {}}}",
        percentile(&own, 0.5),
        percentile(&own, 0.99),
        percentile(&local, 0.5),
        percentile(&local, 0.99),
        local.last().copied().unwrap_or(0) as f64 / 1e3,
        percentile(&remote, 0.5),
        percentile(&remote, 0.99),
        remote.last().copied().unwrap_or(0) as f64 / 1e3,
        own.len(),
        local.len(),
        remote.len(),
        sent * na as u64,
        sent * nb as u64,
    );
}

/// K connections to Redis subscribed to `channel`, reading everything Redis pushes to them, as
/// K servers' subscribers would, but doing nothing with it: Redis's side of a fan-out to K
/// servers. Prints `subscribed` once every subscription is confirmed, then, when standard input
/// ends or `seconds` have passed, the bytes and the messages (of a payload of `size` bytes) read.
fn redis_sub(redis: SocketAddr, channel: &str, k: usize, size: usize, seconds: f64) {
    use std::io::{Read, Write};
    let confirm = format!(
        "*3\r\n$9\r\nsubscribe\r\n${}\r\n{channel}\r\n:1\r\n",
        channel.len()
    );
    let frame = format!(
        "*3\r\n$7\r\nmessage\r\n${}\r\n{channel}\r\n${size}\r\n",
        channel.len()
    )
    .len()
        + size
        + 2;
    let mut conns: Vec<std::net::TcpStream> = (0..k)
        .map(|_| {
            let mut c = std::net::TcpStream::connect(redis).expect("connect to Redis");
            c.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            let cmd = format!(
                "*2\r\n$9\r\nSUBSCRIBE\r\n${}\r\n{channel}\r\n",
                channel.len()
            );
            c.write_all(cmd.as_bytes()).expect("SUBSCRIBE");
            let mut got = vec![0u8; confirm.len()];
            c.read_exact(&mut got)
                .expect("no confirmation of SUBSCRIBE within 5 s");
            assert_eq!(got, confirm.as_bytes(), "unexpected answer to SUBSCRIBE");
            c.set_nonblocking(true).unwrap();
            c
        })
        .collect();
    println!("subscribed");
    let mut fds: Vec<i32> = conns.iter().map(|c| c.as_raw_fd()).collect();
    fds.push(0); // standard input: its end ends the count
    let epoll = Epoll::of_fds(&fds);
    let mut events = vec![libc::epoll_event { events: 0, u64: 0 }; 64];
    let mut buf = vec![0u8; 1 << 16];
    let mut bytes = 0u64;
    let start = Instant::now();
    'outer: while start.elapsed().as_secs_f64() < seconds {
        let ready = epoll.wait(&mut events, 100);
        for ev in &events[..ready] {
            let i = ev.u64 as usize;
            if i == k {
                // SAFETY: reading into a local buffer from fd 0.
                let n = unsafe { libc::read(0, buf.as_mut_ptr().cast(), buf.len()) };
                if n <= 0 {
                    break 'outer;
                }
                continue;
            }
            loop {
                match conns[i].read(&mut buf) {
                    Ok(0) => break,
                    Ok(n) => bytes += n as u64,
                    Err(_) => break,
                }
            }
        }
    }
    println!(
        "{{\"bytes\": {bytes}, \"messages\": {}, \"frame\": {frame}, \"subscribers\": {k}}}",
        bytes / frame as u64
    );
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
        "cross" => {
            let nb: usize = arg(4).parse().unwrap();
            // Deliveries owed at B: 4,096 (the load of the fan-out step, twice over, for the
            // longer path), between 4 and 128 messages; the server's receive buffer at the
            // stock limit holds a burst of 128.
            let window = args
                .get(8)
                .map_or((4096 / nb.max(1)).clamp(4, 128) as u64, |w| {
                    w.parse().unwrap()
                });
            cross(
                server,
                arg(3).parse().expect("B as ip:port"),
                nb,
                arg(5).parse().unwrap(),
                arg(6).parse().unwrap(),
                arg(7).parse().unwrap(),
                window,
            )
        }
        "cross-latency" => cross_latency(
            server,
            if arg(3) == "-" {
                None
            } else {
                Some(arg(3).parse().expect("B as ip:port or -"))
            },
            arg(4).parse().unwrap(),
            arg(5).parse().unwrap(),
            arg(6).parse().unwrap(),
            arg(7).parse().unwrap(),
            arg(8).parse().unwrap(),
        ),
        "redis-sub" => redis_sub(
            server,
            arg(3),
            arg(4).parse().unwrap(),
            arg(5).parse().unwrap(),
            arg(6).parse().unwrap(),
        ),
        other => panic!("unknown mode {other}"),
    }
}
