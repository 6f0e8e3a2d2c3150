//! The cluster's wire format: what a server publishes to the Redis channel for each message it
//! relays, and reads back from the other servers. Pure functions, no I/O.
//!
//! ```text
//! offset  size      field
//! 0       1         version: 1
//! 1       8         server id: random for each server run (big-endian)
//! 9       1         origin's address family: 4 or 6
//! 10      4 or 16   origin's IP address
//! 14/26   2         origin's port (big-endian)
//! 16/28   the rest  payload: the message as the `ack:` line carries it
//! ```
//!
//! The origin is the sending client's address as its own server saw it (for a server's
//! `broadcast()`, the server's own), so every server writes the same `ack:` line for it.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use crate::protocol;

/// The first byte of every envelope this version writes; anything else is not read.
pub const VERSION: u8 = 1;

/// The bytes an envelope adds to its payload, at most (an IPv6 origin).
pub const MAX_OVERHEAD: usize = 1 + 8 + 1 + 16 + 2;

/// One message as a server published it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Envelope<'a> {
    /// The publishing server's id for this run: its own are skipped.
    pub server: u64,
    pub origin: SocketAddr,
    pub payload: &'a [u8],
}

/// Why a message on the channel is not an envelope of this version.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Malformed {
    /// Not version 1: another program's message, or a newer udpchat's.
    Version,
    /// Shorter than its header says.
    Truncated,
    /// An address family other than 4 or 6.
    Family,
    /// Its `ack:` datagram would be longer than UDP carries.
    TooLong,
}

/// Appends the envelope of `payload` from `origin`, published by server `server`, to `out`.
pub fn write(out: &mut Vec<u8>, server: u64, origin: SocketAddr, payload: &[u8]) {
    out.reserve(MAX_OVERHEAD + payload.len());
    out.push(VERSION);
    out.extend_from_slice(&server.to_be_bytes());
    match origin.ip() {
        IpAddr::V4(ip) => {
            out.push(4);
            out.extend_from_slice(&ip.octets());
        }
        IpAddr::V6(ip) => {
            out.push(6);
            out.extend_from_slice(&ip.octets());
        }
    }
    out.extend_from_slice(&origin.port().to_be_bytes());
    out.extend_from_slice(payload);
}

/// Reads an envelope; its `ack:` datagram is at most `protocol::MAX_BROADCAST` bytes.
pub fn read(data: &[u8]) -> Result<Envelope<'_>, Malformed> {
    let (&version, rest) = data.split_first().ok_or(Malformed::Truncated)?;
    if version != VERSION {
        return Err(Malformed::Version);
    }
    let (server, rest) = rest.split_first_chunk::<8>().ok_or(Malformed::Truncated)?;
    let (&family, rest) = rest.split_first().ok_or(Malformed::Truncated)?;
    let (ip, rest): (IpAddr, _) = match family {
        4 => {
            let (ip, rest) = rest.split_first_chunk::<4>().ok_or(Malformed::Truncated)?;
            (Ipv4Addr::from(*ip).into(), rest)
        }
        6 => {
            let (ip, rest) = rest.split_first_chunk::<16>().ok_or(Malformed::Truncated)?;
            (Ipv6Addr::from(*ip).into(), rest)
        }
        _ => return Err(Malformed::Family),
    };
    let (port, payload) = rest.split_first_chunk::<2>().ok_or(Malformed::Truncated)?;
    let origin = SocketAddr::new(ip, u16::from_be_bytes(*port));
    if protocol::ack_len(origin, payload.len()) > protocol::MAX_BROADCAST {
        return Err(Malformed::TooLong);
    }
    Ok(Envelope {
        server: u64::from_be_bytes(*server),
        origin,
        payload,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn envelope(server: u64, origin: &str, payload: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        write(&mut out, server, origin.parse().unwrap(), payload);
        out
    }

    #[test]
    fn the_layout_is_the_documented_one() {
        let v4 = envelope(0x0102_0304_0506_0708, "10.0.0.1:9998", b"hi");
        assert_eq!(
            v4,
            [
                &[1, 1, 2, 3, 4, 5, 6, 7, 8, 4, 10, 0, 0, 1, 0x27, 0x0e][..],
                b"hi"
            ]
            .concat()
        );
        let v6 = envelope(7, "[::1]:1", b"");
        assert_eq!(v6.len(), MAX_OVERHEAD);
        assert_eq!((v6[9], v6[25], &v6[26..]), (6, 1, &[0, 1][..]));
    }

    #[test]
    fn what_is_not_an_envelope_says_why() {
        let good = envelope(1, "127.0.0.1:5", b"x");
        assert_eq!(read(b"hello"), Err(Malformed::Version));
        assert_eq!(read(b""), Err(Malformed::Truncated));
        assert_eq!(read(&[2; 40]), Err(Malformed::Version));
        for cut in 1..good.len() - 1 {
            assert_eq!(read(&good[..cut]), Err(Malformed::Truncated), "{cut}");
        }
        let mut family = good.clone();
        family[9] = 5;
        assert_eq!(read(&family), Err(Malformed::Family));
        // The longest payload that makes an `ack:` datagram UDP carries, and one byte more.
        let origin: SocketAddr = "127.0.0.1:5".parse().unwrap();
        let fits = protocol::MAX_BROADCAST - protocol::ack_len(origin, 0);
        assert!(read(&envelope(1, "127.0.0.1:5", &vec![b'a'; fits])).is_ok());
        let long = envelope(1, "127.0.0.1:5", &vec![b'a'; fits + 1]);
        assert_eq!(read(&long), Err(Malformed::TooLong));
    }

    proptest! {
        #[test]
        fn an_envelope_reads_back_as_written(
            server: u64,
            ip: IpAddr,
            port: u16,
            payload in proptest::collection::vec(any::<u8>(), 0..512),
        ) {
            let origin = SocketAddr::new(ip, port);
            let mut out = Vec::new();
            write(&mut out, server, origin, &payload);
            prop_assert!(out.len() <= payload.len() + MAX_OVERHEAD);
            let read = read(&out).unwrap();
            prop_assert_eq!(read, Envelope { server, origin, payload: &payload });
        }

        #[test]
        fn any_bytes_read_without_panicking(data in proptest::collection::vec(any::<u8>(), 0..64)) {
            let _ = read(&data);
        }
    }
}
