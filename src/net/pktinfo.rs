//! The local address of a datagram: which of this host's addresses a client sent to
//! (`IP_PKTINFO` / `IPV6_RECVPKTINFO` on receive), and the source to reply from (`IP_PKTINFO` /
//! `IPV6_PKTINFO` as a control message on send), so that a socket bound to a wildcard address
//! answers from the address each client talks to. A client's connected socket discards a reply
//! from any other address of the host.
//!
//! A control message is encoded into, and decoded from, a [`Control`]: fixed-size, aligned
//! space the caller owns, one per datagram. It has room for one pktinfo message, which is all a
//! socket of ours is asked to report: a socket option that adds another kind of control message
//! on receive needs a larger one (the kernel would cut the rest and set `MSG_CTRUNC`).

use std::io;
use std::mem::size_of;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, UdpSocket};

/// Bytes for one control message carrying an `in6_pktinfo`, the larger of the two.
const SPACE: usize = {
    // SAFETY: CMSG_SPACE is arithmetic on its argument.
    let space = unsafe { libc::CMSG_SPACE(size_of::<libc::in6_pktinfo>() as libc::c_uint) };
    space as usize
};

/// Room for one pktinfo control message, aligned as `cmsghdr` must be.
#[derive(Clone, Copy)]
#[repr(C, align(8))]
pub struct Control {
    buf: [u8; SPACE],
    /// Bytes of `buf` in use: 0 for none.
    len: usize,
}

const _: () = assert!(std::mem::align_of::<Control>() >= std::mem::align_of::<libc::cmsghdr>());

impl Default for Control {
    fn default() -> Self {
        Control {
            buf: [0; SPACE],
            len: 0,
        }
    }
}

impl Control {
    /// A control message that sends from `local`: `IP_PKTINFO` for IPv4, `IPV6_PKTINFO` for
    /// IPv6 (an IPv4-mapped address included: a dual-stack socket sends to an IPv4 client so).
    /// The interface is left to routing, as for any datagram.
    pub fn source(local: IpAddr) -> Control {
        let mut control = Control::default();
        match local {
            IpAddr::V4(ip) => control.put(
                libc::IPPROTO_IP,
                libc::IP_PKTINFO,
                libc::in_pktinfo {
                    ipi_ifindex: 0,
                    ipi_spec_dst: libc::in_addr {
                        s_addr: u32::from(ip).to_be(),
                    },
                    ipi_addr: libc::in_addr { s_addr: 0 },
                },
            ),
            IpAddr::V6(ip) => control.put(
                libc::IPPROTO_IPV6,
                libc::IPV6_PKTINFO,
                libc::in6_pktinfo {
                    ipi6_addr: libc::in6_addr {
                        s6_addr: ip.octets(),
                    },
                    ipi6_ifindex: 0,
                },
            ),
        }
        control
    }

    fn put<T: Copy>(&mut self, level: libc::c_int, kind: libc::c_int, value: T) {
        // SAFETY: CMSG_LEN and CMSG_SPACE are arithmetic; SPACE fits the larger payload.
        let (len, space) = unsafe {
            (
                libc::CMSG_LEN(size_of::<T>() as libc::c_uint) as usize,
                libc::CMSG_SPACE(size_of::<T>() as libc::c_uint) as usize,
            )
        };
        assert!(space <= SPACE);
        let header = libc::cmsghdr {
            cmsg_len: len as _,
            cmsg_level: level,
            cmsg_type: kind,
        };
        let data = size_of::<libc::cmsghdr>();
        // SAFETY: `buf` is aligned for cmsghdr (the struct's alignment, asserted above) and
        // holds the header and, at CMSG_DATA's offset (the header's size on Linux), the value;
        // unaligned writes make no assumption about the value's own alignment.
        unsafe {
            std::ptr::write_unaligned(self.buf.as_mut_ptr().cast::<libc::cmsghdr>(), header);
            std::ptr::write_unaligned(self.buf.as_mut_ptr().add(data).cast::<T>(), value);
        }
        self.len = space;
    }

    /// Points `hdr` at this control message (or at none, if empty), for `sendmsg`.
    pub fn attach(&mut self, hdr: &mut libc::msghdr) {
        if self.len == 0 {
            hdr.msg_control = std::ptr::null_mut();
            hdr.msg_controllen = 0;
        } else {
            hdr.msg_control = self.buf.as_mut_ptr().cast();
            hdr.msg_controllen = self.len as _;
        }
    }

    /// Points `hdr` at this space, all of it, for `recvmsg` to fill.
    pub fn attach_for_receive(&mut self, hdr: &mut libc::msghdr) {
        hdr.msg_control = self.buf.as_mut_ptr().cast();
        hdr.msg_controllen = SPACE as _;
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// The local address a received datagram was sent to, from the control messages `recvmsg`
/// wrote for `hdr`; None if there is none, or if it is not an address to send from (a broadcast
/// or multicast destination: the kernel then picks the source, as without pktinfo).
pub fn local_address(hdr: &libc::msghdr) -> Option<IpAddr> {
    let mut found = None;
    // SAFETY: `hdr` was filled by recvmsg/recvmmsg (or a test); a pktinfo message's payload is
    // the struct its type names.
    unsafe {
        super::each_control_message(hdr, |c, data| {
            if c.cmsg_level == libc::IPPROTO_IP && c.cmsg_type == libc::IP_PKTINFO {
                let info = std::ptr::read_unaligned(data.cast::<libc::in_pktinfo>());
                // ipi_spec_dst, not ipi_addr: the kernel's choice of the address to answer
                // from, which is the destination itself for a unicast datagram to this host.
                let ip = Ipv4Addr::from(u32::from_be(info.ipi_spec_dst.s_addr));
                found = Some(IpAddr::V4(ip));
            } else if c.cmsg_level == libc::IPPROTO_IPV6 && c.cmsg_type == libc::IPV6_PKTINFO {
                let info = std::ptr::read_unaligned(data.cast::<libc::in6_pktinfo>());
                found = Some(IpAddr::V6(Ipv6Addr::from(info.ipi6_addr.s6_addr)));
            }
        });
    }
    found.filter(|ip| is_source(*ip))
}

/// False for addresses a datagram may be sent to but never from.
fn is_source(ip: IpAddr) -> bool {
    match ip.to_canonical() {
        IpAddr::V4(ip) => !(ip.is_unspecified() || ip.is_broadcast() || ip.is_multicast()),
        IpAddr::V6(ip) => !(ip.is_unspecified() || ip.is_multicast()),
    }
}

/// Asks the kernel to report each datagram's local address: `IP_PKTINFO` on an IPv4 socket,
/// `IPV6_RECVPKTINFO` on an IPv6 one (which covers IPv4 clients of a dual-stack socket too,
/// as IPv4-mapped addresses).
pub fn enable(socket: &UdpSocket, ipv6: bool) -> io::Result<()> {
    let (level, name) = match ipv6 {
        false => (libc::IPPROTO_IP, libc::IP_PKTINFO),
        true => (libc::IPPROTO_IPV6, libc::IPV6_RECVPKTINFO),
    };
    super::turn_on(socket, level, name)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A msghdr whose control messages are those of `control`, as recvmsg would leave it.
    fn received(control: &mut Control) -> libc::msghdr {
        // SAFETY: msghdr is plain old data; all-zero is a valid value.
        let mut hdr: libc::msghdr = unsafe { std::mem::zeroed() };
        control.attach(&mut hdr);
        hdr
    }

    #[test]
    fn a_source_reads_back_as_the_local_address() {
        for ip in ["127.0.0.2", "::1", "::ffff:127.0.0.2", "fd00::2"] {
            let ip: IpAddr = ip.parse().unwrap();
            let mut control = Control::source(ip);
            assert!(!control.is_empty());
            assert_eq!(local_address(&received(&mut control)), Some(ip), "{ip}");
        }
    }

    #[test]
    fn no_control_message_or_a_group_address_gives_none() {
        assert_eq!(local_address(&received(&mut Control::default())), None);
        for ip in [
            "255.255.255.255",
            "224.0.0.1",
            "ff02::1",
            "::ffff:224.0.0.1",
            "0.0.0.0",
        ] {
            let mut control = Control::source(ip.parse().unwrap());
            assert_eq!(local_address(&received(&mut control)), None, "{ip}");
        }
    }
}
