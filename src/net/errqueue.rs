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
use std::net::{IpAddr, SocketAddr, UdpSocket};
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
    super::turn_on(socket, libc::IPPROTO_IP, libc::IP_RECVERR)?;
    if ipv6 {
        super::turn_on(socket, libc::IPPROTO_IPV6, libc::IPV6_RECVERR)?;
    }
    Ok(())
}

/// Reads `socket`'s error queue until it is empty, at most `MAX_READ` entries a call, and hands
/// each ICMP "port unreachable" sent by the destination host itself to `report`: the
/// destination of the datagram that drew it, and the error (`ECONNREFUSED`). Other entries are
/// read and dropped. Returns how many were reported.
///
/// Only port unreachable says the peer is gone (its host answers that nothing listens there);
/// host and network unreachable, or time exceeded (which Linux also names `EHOSTUNREACH`), come
/// from routers about a path that may come back. And one whose sender is not the destination is
/// forged, or from a firewall on the way: taking it would let anyone who can send ICMP from an
/// address of their own cut a client off, where a forger must now also spoof the client's own
/// address.
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
        let Some(sender) = port_unreachable(&hdr) else {
            continue;
        };
        // SAFETY: the kernel wrote a socket address of `msg_namelen` bytes into `name`, plain
        // bytes (no Drop), moved here once.
        let to = unsafe { SockAddr::new(name, hdr.msg_namelen) }.as_socket();
        if let Some(to) = to.filter(|to| to.ip().to_canonical() == sender.to_canonical()) {
            report(to, io::Error::from_raw_os_error(libc::ECONNREFUSED));
            reported += 1;
        }
    }
    Ok(reported)
}

/// The host that sent an error-queue entry (its "offender"), from the control messages
/// `recvmsg` wrote for `hdr`, if the entry is an ICMP or ICMPv6 port unreachable.
fn port_unreachable(hdr: &libc::msghdr) -> Option<IpAddr> {
    let mut found = None;
    // SAFETY: `hdr` was filled by recvmsg (or a test); a payload is read only as far as its
    // message's length covers it.
    unsafe {
        super::each_control_message(hdr, |c, data| {
            let is_error = (c.cmsg_level == libc::IPPROTO_IP && c.cmsg_type == libc::IP_RECVERR)
                || (c.cmsg_level == libc::IPPROTO_IPV6 && c.cmsg_type == libc::IPV6_RECVERR);
            let covers = |len: usize| c.cmsg_len >= libc::CMSG_LEN(len as _) as usize;
            let ee = size_of::<libc::sock_extended_err>();
            if !(is_error && covers(ee + size_of::<libc::sa_family_t>())) {
                return;
            }
            let err = std::ptr::read_unaligned(data.cast::<libc::sock_extended_err>());
            // SO_EE_OFFENDER: the sender's address follows the error.
            let offender = data.add(ee);
            let family = std::ptr::read_unaligned(offender.cast::<libc::sa_family_t>());
            let sender = match i32::from(family) {
                libc::AF_INET if covers(ee + size_of::<libc::sockaddr_in>()) => {
                    let sin = std::ptr::read_unaligned(offender.cast::<libc::sockaddr_in>());
                    Some(IpAddr::from(
                        u32::from_be(sin.sin_addr.s_addr).to_be_bytes(),
                    ))
                }
                libc::AF_INET6 if covers(ee + size_of::<libc::sockaddr_in6>()) => {
                    let sin6 = std::ptr::read_unaligned(offender.cast::<libc::sockaddr_in6>());
                    Some(IpAddr::from(sin6.sin6_addr.s6_addr))
                }
                _ => None,
            };
            found = Some((err, sender));
        });
    }
    let (err, sender) = found?;
    // Destination unreachable, port unreachable: type 3 code 3 in ICMP, 1 and 4 in ICMPv6.
    let port = match err.ee_origin {
        libc::SO_EE_ORIGIN_ICMP => (err.ee_type, err.ee_code) == (3, 3),
        libc::SO_EE_ORIGIN_ICMP6 => (err.ee_type, err.ee_code) == (1, 4),
        _ => false,
    };
    sender.filter(|_| port)
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

    /// An error as the kernel queues it: the `sock_extended_err`, then its sender's address.
    #[repr(C)]
    #[derive(Clone, Copy)]
    struct Queued<A: Copy> {
        err: libc::sock_extended_err,
        offender: A,
    }

    fn queued<A: Copy>(origin: u8, (kind, code): (u8, u8), offender: A) -> Queued<A> {
        let err = libc::sock_extended_err {
            ee_errno: 0,
            ee_origin: origin,
            ee_type: kind,
            ee_code: code,
            ee_pad: 0,
            ee_info: 0,
            ee_data: 0,
        };
        Queued { err, offender }
    }

    fn v4(ip: [u8; 4]) -> libc::sockaddr_in {
        libc::sockaddr_in {
            sin_family: libc::AF_INET as libc::sa_family_t,
            sin_port: 0,
            sin_addr: libc::in_addr {
                s_addr: u32::from_be_bytes(ip).to_be(),
            },
            sin_zero: [0; 8],
        }
    }

    fn v6(ip: std::net::Ipv6Addr) -> libc::sockaddr_in6 {
        libc::sockaddr_in6 {
            sin6_family: libc::AF_INET6 as libc::sa_family_t,
            sin6_port: 0,
            sin6_flowinfo: 0,
            sin6_addr: libc::in6_addr {
                s6_addr: ip.octets(),
            },
            sin6_scope_id: 0,
        }
    }

    const PORT_UNREACHABLE: (u8, u8) = (3, 3);
    const PORT_UNREACHABLE_6: (u8, u8) = (1, 4);

    /// The sender `port_unreachable` finds in a buffer filled by `fill`, as recvmsg would leave it.
    fn parse(fill: impl FnOnce(&mut Control, &mut usize)) -> Option<IpAddr> {
        let mut buf = Control([0; SPACE]);
        let mut len = 0;
        fill(&mut buf, &mut len);
        // SAFETY: msghdr is plain old data; all-zero is a valid value.
        let mut hdr: libc::msghdr = unsafe { std::mem::zeroed() };
        hdr.msg_control = buf.0.as_mut_ptr().cast();
        hdr.msg_controllen = len as _;
        port_unreachable(&hdr)
    }

    #[test]
    fn port_unreachable_entries_give_their_sender() {
        let (ip, ip6) = ([192, 0, 2, 7], "2001:db8::7".parse().unwrap());
        let (level, kind) = (libc::IPPROTO_IP, libc::IP_RECVERR);
        let origin = libc::SO_EE_ORIGIN_ICMP;
        let err = queued(origin, PORT_UNREACHABLE, v4(ip));
        assert_eq!(parse(|b, at| put(b, at, level, kind, err)), Some(ip.into()));
        let (level6, kind6) = (libc::IPPROTO_IPV6, libc::IPV6_RECVERR);
        let err = queued(libc::SO_EE_ORIGIN_ICMP6, PORT_UNREACHABLE_6, v6(ip6));
        assert_eq!(
            parse(|b, at| put(b, at, level6, kind6, err)),
            Some(ip6.into())
        );
        // An IPv4 peer of a dual-stack socket: ICMP origin, IPv6 level, a mapped sender.
        let mapped = std::net::Ipv4Addr::from(ip).to_ipv6_mapped();
        let err = queued(origin, PORT_UNREACHABLE, v6(mapped));
        assert_eq!(
            parse(|b, at| put(b, at, level6, kind6, err)),
            Some(mapped.into())
        );
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
            let err = queued(
                libc::SO_EE_ORIGIN_ICMP,
                PORT_UNREACHABLE,
                v4([127, 0, 0, 1]),
            );
            put(buf, at, libc::IPPROTO_IP, libc::IP_RECVERR, err);
        });
        assert_eq!(got, Some(IpAddr::from([127, 0, 0, 1])));
    }

    #[test]
    fn other_errors_and_entries_without_a_sender_give_none() {
        assert_eq!(parse(|_, _| {}), None);
        let (level, kind) = (libc::IPPROTO_IP, libc::IP_RECVERR);
        let sender = v4([192, 0, 2, 7]);
        for (origin, type_code) in [
            (libc::SO_EE_ORIGIN_LOCAL, PORT_UNREACHABLE),
            (libc::SO_EE_ORIGIN_NONE, PORT_UNREACHABLE),
            (libc::SO_EE_ORIGIN_ICMP, (3, 1)), // host unreachable: a router's word
            (libc::SO_EE_ORIGIN_ICMP, (3, 0)), // network unreachable
            (libc::SO_EE_ORIGIN_ICMP, (3, 13)), // administratively prohibited
            (libc::SO_EE_ORIGIN_ICMP, (3, 4)), // fragmentation needed
            (libc::SO_EE_ORIGIN_ICMP, (11, 0)), // time exceeded (EHOSTUNREACH too)
            (libc::SO_EE_ORIGIN_ICMP6, (1, 0)), // no route
            (libc::SO_EE_ORIGIN_ICMP6, PORT_UNREACHABLE), // ICMPv6's codes differ
            (libc::SO_EE_ORIGIN_ICMP, PORT_UNREACHABLE_6),
        ] {
            let err = queued(origin, type_code, sender);
            let got = parse(|b, at| put(b, at, level, kind, err));
            assert_eq!(got, None, "{origin} {type_code:?}");
        }
        // A port unreachable whose message ends before its sender's address (MSG_CTRUNC), or
        // names no family: no sender, not reported.
        for cut in [
            size_of::<libc::sock_extended_err>(),
            size_of::<libc::sock_extended_err>() + 8,
        ] {
            let got = parse(|buf, at| {
                let err = queued(libc::SO_EE_ORIGIN_ICMP, PORT_UNREACHABLE, sender);
                put(buf, at, level, kind, err);
                // SAFETY: CMSG_LEN is arithmetic, and `buf` starts with the header just written.
                unsafe {
                    let p = buf.0.as_mut_ptr().cast::<libc::cmsghdr>();
                    let mut header = std::ptr::read_unaligned(p);
                    header.cmsg_len = libc::CMSG_LEN(cut as _) as _;
                    std::ptr::write_unaligned(p, header);
                }
            });
            assert_eq!(got, None, "cut at {cut}");
        }
        let unnamed = libc::sockaddr_in {
            sin_family: 0,
            ..sender
        };
        let err = queued(libc::SO_EE_ORIGIN_ICMP, PORT_UNREACHABLE, unnamed);
        assert_eq!(parse(|b, at| put(b, at, level, kind, err)), None);
        // Not an error message: a pktinfo alone.
        let got = parse(|buf, at| put(buf, at, libc::IPPROTO_IP, libc::IP_PKTINFO, [0u8; 12]));
        assert_eq!(got, None);
    }
}
