//! The kernel baseline for the fan-out benchmark: the tutorial's protocol in the leanest loop
//! Rust can write. One thread, blocking `recvmmsg` for up to 64 datagrams, every broadcast of
//! the batch to every client in `sendmmsg` calls of up to 1024. No expiry, no logging, no
//! stop: it runs until killed, or for `LIFETIME` at most.
//!
//!   baseline IP:PORT        (prints the bound address, then serves)

use std::collections::HashMap;
use std::net::{SocketAddr, UdpSocket};
use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use socket2::{SockAddr, SockAddrStorage};
use udpchat::protocol::{self, Datagram};

const BATCH: usize = 64;
const BUF: usize = 65_536;
/// The longest it runs, if nobody kills it first (a benchmark's loops are all bounded).
const LIFETIME: Duration = Duration::from_secs(600);

fn main() {
    let addr: SocketAddr = std::env::args()
        .nth(1)
        .expect("IP:PORT")
        .parse()
        .expect("IP:PORT");
    let socket = UdpSocket::bind(addr).expect("bind");
    // A blocking receive wakes at least once a second, to see the end of its lifetime.
    socket
        .set_read_timeout(Some(Duration::from_secs(1)))
        .expect("SO_RCVTIMEO");
    println!("{}", socket.local_addr().unwrap());
    let end = Instant::now() + LIFETIME;
    let fd = socket.as_raw_fd();

    let mut bufs = vec![0u8; BATCH * BUF];
    let mut names: Vec<SockAddrStorage> = (0..BATCH).map(|_| SockAddrStorage::zeroed()).collect();
    let mut iovs: Vec<libc::iovec> = bufs
        .chunks_exact_mut(BUF)
        .map(|c| libc::iovec {
            iov_base: c.as_mut_ptr().cast(),
            iov_len: BUF,
        })
        .collect();
    let mut hdrs: Vec<libc::mmsghdr> = iovs
        .iter_mut()
        .zip(names.iter_mut())
        .map(|(iov, name)| {
            // SAFETY: all-zero mmsghdr is valid.
            let mut h: libc::mmsghdr = unsafe { std::mem::zeroed() };
            h.msg_hdr.msg_name = (name as *mut SockAddrStorage).cast();
            h.msg_hdr.msg_iov = iov;
            h.msg_hdr.msg_iovlen = 1;
            h
        })
        .collect();

    let mut clients: HashMap<SocketAddr, SockAddr> = HashMap::new();
    let mut acks: Vec<Vec<u8>> = Vec::new();
    let mut out_iovs: Vec<libc::iovec> = Vec::with_capacity(1024);
    let mut out_hdrs: Vec<libc::mmsghdr> = Vec::with_capacity(1024);
    while Instant::now() < end {
        for h in &mut hdrs {
            h.msg_hdr.msg_namelen = SockAddrStorage::zeroed().size_of();
        }
        // SAFETY: headers point at live buffers.
        let n = unsafe {
            libc::recvmmsg(
                fd,
                hdrs.as_mut_ptr(),
                BATCH as u32,
                libc::MSG_WAITFORONE,
                std::ptr::null_mut(),
            )
        };
        if n <= 0 {
            continue;
        }
        acks.clear();
        for i in 0..n as usize {
            let data = &bufs[i * BUF..i * BUF + hdrs[i].msg_len as usize];
            // SAFETY: the kernel wrote the sender's address; the storage is plain bytes.
            let Some(from) =
                (unsafe { SockAddr::new(std::ptr::read(&names[i]), hdrs[i].msg_hdr.msg_namelen) })
                    .as_socket()
            else {
                continue;
            };
            match protocol::classify(data) {
                Datagram::Register | Datagram::Heartbeat => {
                    clients.entry(from).or_insert_with(|| SockAddr::from(from));
                }
                Datagram::Quit => {
                    clients.remove(&from);
                }
                Datagram::Message(p) => {
                    clients.entry(from).or_insert_with(|| SockAddr::from(from));
                    let mut ack = Vec::new();
                    protocol::write_ack(&mut ack, from, p);
                    acks.push(ack);
                }
                Datagram::Empty => {}
            }
        }
        for ack in &acks {
            for to in clients.values() {
                out_iovs.push(libc::iovec {
                    iov_base: ack.as_ptr() as *mut _,
                    iov_len: ack.len(),
                });
                // SAFETY: all-zero mmsghdr is valid.
                let mut h: libc::mmsghdr = unsafe { std::mem::zeroed() };
                h.msg_hdr.msg_name = to.as_ptr() as *mut _;
                h.msg_hdr.msg_namelen = to.len();
                out_hdrs.push(h);
                if out_hdrs.len() == 1024 {
                    flush(fd, &mut out_iovs, &mut out_hdrs);
                }
            }
        }
        flush(fd, &mut out_iovs, &mut out_hdrs);
    }
}

fn flush(fd: i32, iovs: &mut Vec<libc::iovec>, hdrs: &mut Vec<libc::mmsghdr>) {
    for (h, iov) in hdrs.iter_mut().zip(iovs.iter_mut()) {
        h.msg_hdr.msg_iov = iov;
        h.msg_hdr.msg_iovlen = 1;
    }
    let mut next = 0;
    while next < hdrs.len() {
        // SAFETY: headers point at live addresses and iovecs.
        let n =
            unsafe { libc::sendmmsg(fd, hdrs[next..].as_mut_ptr(), (hdrs.len() - next) as u32, 0) };
        next += if n > 0 { n as usize } else { 1 }; // skip a destination that fails
    }
    iovs.clear();
    hdrs.clear();
}
