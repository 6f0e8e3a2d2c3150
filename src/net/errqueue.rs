//! Which destinations turned out unreachable: the ICMP errors an unconnected UDP socket queues
//! once `IP_RECVERR` (and `IPV6_RECVERR`) is on.
//!
//! Without the option, Linux tells a UDP socket of an ICMP error only if it is connected, for
//! the one peer it has. With it, each error is queued on the socket's error queue, read with
//! `recvmsg(MSG_ERRQUEUE)`: a `sock_extended_err` control message says what happened, and
//! `msg_name` holds the destination of the datagram that drew it, in the form `recvmmsg` gives
//! that peer's address (IPv4-mapped on a dual-stack socket), so it can be looked up as is.
//!
//! The option has a second effect that `net` deals with: each error also becomes the socket's
//! pending error, which fails its next send or receive (see `Outbox::flush`).

use std::io::{self, ErrorKind};
use std::mem::size_of;
use std::net::{SocketAddr, UdpSocket};
use std::os::fd::{AsFd, AsRawFd};

use socket2::{SockAddr, SockAddrStorage};

/// The most entries one [`read`] takes, so a flood of ICMP errors cannot hold the receiver.
const MAX_READ: usize = 1024;

/// Control space for one entry: the `sock_extended_err` with the offender's `sockaddr_in6`
/// (64 bytes with its header), plus the pktinfo message the kernel adds when the socket reports
/// local addresses, with room to spare. Were it short, the kernel would cut the last message,
/// which is the error itself.
const SPACE: usize = 256;

/// Aligned as `cmsghdr` must be.
#[repr(C, align(8))]
struct Control([u8; SPACE]);

const _: () = assert!(std::mem::align_of::<Control>() >= std::mem::align_of::<libc::cmsghdr>());

/// Turns on `IP_RECVERR`, and on an IPv6 socket `IPV6_RECVERR` too: the kernel reports errors
/// for IPv4 peers of a dual-stack socket through the IPv4 option, and for IPv6 peers through
/// the IPv6 one.
pub fn enable(socket: &UdpSocket, ipv6: bool) -> io::Result<()> {
    turn_on(socket, libc::IPPROTO_IP, libc::IP_RECVERR)?;
    if ipv6 {
        turn_on(socket, libc::IPPROTO_IPV6, libc::IPV6_RECVERR)?;
    }
    Ok(())
}

fn turn_on(socket: &UdpSocket, level: libc::c_int, name: libc::c_int) -> io::Result<()> {
    let on: libc::c_int = 1;
    // SAFETY: setsockopt reads an int from `on`, of the length given.
    let r = unsafe {
        libc::setsockopt(
            socket.as_fd().as_raw_fd(),
            level,
            name,
            (&on as *const libc::c_int).cast(),
            size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if r != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Reads `socket`'s error queue until it is empty, at most `MAX_READ` entries a call, and hands
/// each ICMP "unreachable" to `report`: the destination of the datagram that drew it, and the
/// error. Other entries are read and dropped. Returns how many were reported.
pub fn read(
    socket: &UdpSocket,
    mut report: impl FnMut(SocketAddr, io::Error),
) -> io::Result<usize> {
    let mut control = Control([0; SPACE]);
    let mut reported = 0;
    let mut read = 0;
    while read < MAX_READ {
        let mut name = SockAddrStorage::zeroed();
        // SAFETY: msghdr is plain old data; all-zero is a valid value (no data wanted: the
        // entry's copy of the datagram is cut and dropped).
        let mut hdr: libc::msghdr = unsafe { std::mem::zeroed() };
        hdr.msg_name = (&mut name as *mut SockAddrStorage).cast();
        hdr.msg_namelen = name.size_of();
        hdr.msg_control = control.0.as_mut_ptr().cast();
        hdr.msg_controllen = SPACE as _;
        // SAFETY: `hdr` points at `name` and `control`, live and of the sizes it claims.
        let n = unsafe {
            libc::recvmsg(
                socket.as_fd().as_raw_fd(),
                &mut hdr,
                libc::MSG_ERRQUEUE | libc::MSG_DONTWAIT,
            )
        };
        if n < 0 {
            let e = io::Error::last_os_error();
            match e.kind() {
                ErrorKind::Interrupted => continue,
                ErrorKind::WouldBlock => break,
                _ => return Err(e),
            }
        }
        read += 1;
        let Some(error) = unreachable(&hdr) else {
            continue;
        };
        // SAFETY: the kernel wrote a socket address of `msg_namelen` bytes into `name`, plain
        // bytes (no Drop), moved here once.
        let to = unsafe { SockAddr::new(name, hdr.msg_namelen) }.as_socket();
        if let Some(to) = to {
            report(to, error);
            reported += 1;
        }
    }
    Ok(reported)
}

/// The error an error-queue entry reports, from the control messages `recvmsg` wrote for `hdr`,
/// if it is an ICMP or ICMPv6 "unreachable": port (`ECONNREFUSED`), host or network. Local
/// errors and the other ICMP errors (fragmentation needed: `EMSGSIZE`) say nothing about
/// whether the peer is there, so they give None.
fn unreachable(hdr: &libc::msghdr) -> Option<io::Error> {
    if hdr.msg_control.is_null() || hdr.msg_controllen < size_of::<libc::cmsghdr>() {
        return None;
    }
    let mut found = None;
    // SAFETY: msg_control points at msg_controllen bytes of control messages (written by
    // recvmsg, or by a test), which the CMSG_* functions walk within those bounds; a payload is
    // read only if the message's length covers it.
    unsafe {
        let mut cmsg = libc::CMSG_FIRSTHDR(hdr);
        while !cmsg.is_null() {
            let c = std::ptr::read_unaligned(cmsg);
            let is_error = (c.cmsg_level == libc::IPPROTO_IP && c.cmsg_type == libc::IP_RECVERR)
                || (c.cmsg_level == libc::IPPROTO_IPV6 && c.cmsg_type == libc::IPV6_RECVERR);
            let whole = c.cmsg_len as usize
                >= libc::CMSG_LEN(size_of::<libc::sock_extended_err>() as libc::c_uint) as usize;
            if is_error && whole {
                let data = libc::CMSG_DATA(cmsg).cast::<libc::sock_extended_err>();
                found = Some(std::ptr::read_unaligned(data));
            }
            cmsg = libc::CMSG_NXTHDR(hdr, cmsg);
        }
    }
    let err = found?;
    let icmp = matches!(
        err.ee_origin,
        libc::SO_EE_ORIGIN_ICMP | libc::SO_EE_ORIGIN_ICMP6
    );
    let errno = libc::c_int::try_from(err.ee_errno).ok()?;
    let unreachable = matches!(
        errno,
        libc::ECONNREFUSED | libc::EHOSTUNREACH | libc::ENETUNREACH
    );
    (icmp && unreachable).then(|| io::Error::from_raw_os_error(errno))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Appends one control message to `buf` at `*at`, as the kernel lays them out.
    fn put<T: Copy>(
        buf: &mut Control,
        at: &mut usize,
        level: libc::c_int,
        kind: libc::c_int,
        value: T,
    ) {
        // SAFETY: CMSG_LEN and CMSG_SPACE are arithmetic.
        let (len, space) = unsafe {
            (
                libc::CMSG_LEN(size_of::<T>() as libc::c_uint) as usize,
                libc::CMSG_SPACE(size_of::<T>() as libc::c_uint) as usize,
            )
        };
        assert!(*at + space <= SPACE);
        let header = libc::cmsghdr {
            cmsg_len: len as _,
            cmsg_level: level,
            cmsg_type: kind,
        };
        // SAFETY: within `buf` (asserted above), whose start is aligned for cmsghdr, as is every
        // CMSG_SPACE step; the value sits at CMSG_DATA's offset, the header's size on Linux.
        unsafe {
            let p = buf.0.as_mut_ptr().add(*at);
            std::ptr::write_unaligned(p.cast::<libc::cmsghdr>(), header);
            std::ptr::write_unaligned(p.add(size_of::<libc::cmsghdr>()).cast::<T>(), value);
        }
        *at += space;
    }

    fn error(origin: u8, errno: libc::c_int) -> libc::sock_extended_err {
        libc::sock_extended_err {
            ee_errno: errno as u32,
            ee_origin: origin,
            ee_type: 3,
            ee_code: 3,
            ee_pad: 0,
            ee_info: 0,
            ee_data: 0,
        }
    }

    /// The errno `unreachable` finds in a buffer holding `messages`, as recvmsg would leave it.
    fn parse(fill: impl FnOnce(&mut Control, &mut usize)) -> Option<i32> {
        let mut buf = Control([0; SPACE]);
        let mut len = 0;
        fill(&mut buf, &mut len);
        // SAFETY: msghdr is plain old data; all-zero is a valid value.
        let mut hdr: libc::msghdr = unsafe { std::mem::zeroed() };
        hdr.msg_control = buf.0.as_mut_ptr().cast();
        hdr.msg_controllen = len as _;
        unreachable(&hdr).map(|e| e.raw_os_error().unwrap())
    }

    #[test]
    fn icmp_unreachable_entries_give_their_error() {
        for (level, kind, origin, errno) in [
            (
                libc::IPPROTO_IP,
                libc::IP_RECVERR,
                libc::SO_EE_ORIGIN_ICMP,
                libc::ECONNREFUSED,
            ),
            (
                libc::IPPROTO_IP,
                libc::IP_RECVERR,
                libc::SO_EE_ORIGIN_ICMP,
                libc::EHOSTUNREACH,
            ),
            (
                libc::IPPROTO_IPV6,
                libc::IPV6_RECVERR,
                libc::SO_EE_ORIGIN_ICMP6,
                libc::ENETUNREACH,
            ),
            // An IPv4 peer of a dual-stack socket: ICMP origin, IPv6 level.
            (
                libc::IPPROTO_IPV6,
                libc::IPV6_RECVERR,
                libc::SO_EE_ORIGIN_ICMP,
                libc::ECONNREFUSED,
            ),
        ] {
            let got = parse(|buf, at| put(buf, at, level, kind, error(origin, errno)));
            assert_eq!(got, Some(errno), "{level} {kind} {origin} {errno}");
        }
    }

    #[test]
    fn the_error_is_found_after_a_pktinfo_message() {
        let info = libc::in_pktinfo {
            ipi_ifindex: 1,
            ipi_spec_dst: libc::in_addr {
                s_addr: 0x0100_007f,
            },
            ipi_addr: libc::in_addr {
                s_addr: 0x0100_007f,
            },
        };
        let got = parse(|buf, at| {
            put(buf, at, libc::IPPROTO_IP, libc::IP_PKTINFO, info);
            let err = error(libc::SO_EE_ORIGIN_ICMP, libc::ECONNREFUSED);
            put(buf, at, libc::IPPROTO_IP, libc::IP_RECVERR, err);
        });
        assert_eq!(got, Some(libc::ECONNREFUSED));
    }

    #[test]
    fn local_errors_and_other_icmp_errors_give_none() {
        assert_eq!(parse(|_, _| {}), None);
        for (origin, errno) in [
            (libc::SO_EE_ORIGIN_LOCAL, libc::EMSGSIZE),
            (libc::SO_EE_ORIGIN_LOCAL, libc::ECONNREFUSED),
            (libc::SO_EE_ORIGIN_NONE, libc::EHOSTUNREACH),
            (libc::SO_EE_ORIGIN_ICMP, libc::EMSGSIZE), // fragmentation needed
            (libc::SO_EE_ORIGIN_ICMP6, libc::EMSGSIZE), // packet too big
            (libc::SO_EE_ORIGIN_ICMP, libc::ENOPROTOOPT), // protocol unreachable
        ] {
            let got = parse(|buf, at| {
                put(
                    buf,
                    at,
                    libc::IPPROTO_IP,
                    libc::IP_RECVERR,
                    error(origin, errno),
                )
            });
            assert_eq!(got, None, "{origin} {errno}");
        }
        // An error message cut short (MSG_CTRUNC): not read past its end.
        let got = parse(|buf, at| {
            let err = error(libc::SO_EE_ORIGIN_ICMP, libc::ECONNREFUSED);
            put(buf, at, libc::IPPROTO_IP, libc::IP_RECVERR, err);
            // SAFETY: CMSG_LEN is arithmetic, and `buf` starts with the header just written.
            unsafe {
                let p = buf.0.as_mut_ptr().cast::<libc::cmsghdr>();
                let mut header = std::ptr::read_unaligned(p);
                header.cmsg_len = libc::CMSG_LEN(4) as _;
                std::ptr::write_unaligned(p, header);
            }
        });
        assert_eq!(got, None);
        // Not an error message: a pktinfo alone.
        let got = parse(|buf, at| put(buf, at, libc::IPPROTO_IP, libc::IP_PKTINFO, [0u8; 12]));
        assert_eq!(got, None);
    }
}
