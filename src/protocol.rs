//! The wire protocol of the tutorial (version 0): pure functions, no I/O.
//!
//! Client → server datagrams are compared after stripping the ASCII whitespace that Python's
//! `bytes.strip()` strips, so `nc -u` lines and the tutorial's own client both work.
//! Server → client: `ack: {ip} {port}\n{payload}\n` for every chat message, `end` on stop.
//!
//! Validated mode adds a handshake and a token (see README, "Validated mode"):
//! `reg` padded → `challenge {cookie}` → `reg {cookie}` → `welcome {token}`, then every
//! datagram from the client is `{token} {body}`, padded, where body is as in the open protocol.

use std::net::{IpAddr, SocketAddr};

/// Register: the sender counts as alive from now on.
pub const REG: &[u8] = b"reg";
/// Heartbeat: the sender counts as alive now.
pub const HEARTBEAT: &[u8] = b"^hb^";
/// Leave: the sender is removed.
pub const QUIT: &[u8] = b"quit";
/// Sent by the server to every client when it stops.
pub const END: &[u8] = b"end";
/// Validated mode's `end`: followed by the client's token, so a forged `end` cannot close it.
pub const END_KEYED: &[u8] = b"end ";

const ACK_PREFIX: &[u8] = b"ack: ";

/// Validated mode: the server's answer to a `reg`, carrying a cookie.
pub const CHALLENGE: &[u8] = b"challenge ";
/// Validated mode: the server's answer to a returned cookie, carrying the client's token.
pub const WELCOME: &[u8] = b"welcome ";
/// Length of a cookie or token on the wire: 16 bytes, hex-encoded.
pub const TOKEN_LEN: usize = 32;
/// Everything a validated-mode client sends is padded with spaces to this length, so the server
/// may answer with a challenge (42 bytes) and still send no more than it received. The open
/// protocol strips the padding, so servers of either kind read it.
pub const PADDED_LEN: usize = 64;
/// The size of a challenge: the server sends one only in reply to a datagram at least this long.
pub const CHALLENGE_LEN: usize = CHALLENGE.len() + TOKEN_LEN;
// A padded datagram is always long enough to be answered with a challenge.
const _: () = assert!(CHALLENGE_LEN <= PADDED_LEN);

/// False for addresses a server must never register or send to: port 0, the unspecified
/// address, broadcast and multicast (as themselves or as IPv4-mapped IPv6). A datagram "from"
/// one of them is forged, and answering it would reach no one or everyone.
pub fn is_valid_peer(addr: SocketAddr) -> bool {
    if addr.port() == 0 {
        return false;
    }
    match addr.ip().to_canonical() {
        IpAddr::V4(ip) => !(ip.is_unspecified() || ip.is_broadcast() || ip.is_multicast()),
        IpAddr::V6(ip) => !(ip.is_unspecified() || ip.is_multicast()),
    }
}

/// A datagram received by a validated-mode server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Validated<'a> {
    /// `reg` (padded or not): asks for a challenge.
    Hello,
    /// `reg {cookie}`: answers a challenge.
    Answer(&'a [u8]),
    /// `{token} {body}`: a registered client's datagram; the body is read as in open mode.
    Tokened { token: &'a [u8], body: &'a [u8] },
    /// Anything else: nothing a validated server accepts.
    Other,
}

fn is_hex_token(t: &[u8]) -> bool {
    t.len() == TOKEN_LEN && t.iter().all(u8::is_ascii_hexdigit)
}

/// Classifies a datagram received by a validated-mode server.
pub fn classify_validated(data: &[u8]) -> Validated<'_> {
    let data = strip(data);
    if data == REG {
        return Validated::Hello;
    }
    if let Some(cookie) = data.strip_prefix(b"reg ") {
        if is_hex_token(cookie) {
            return Validated::Answer(cookie);
        }
    }
    if data.len() > TOKEN_LEN && data[TOKEN_LEN] == b' ' && is_hex_token(&data[..TOKEN_LEN]) {
        return Validated::Tokened {
            token: &data[..TOKEN_LEN],
            body: &data[TOKEN_LEN + 1..],
        };
    }
    Validated::Other
}

/// Pads `out` with spaces to `PADDED_LEN`.
pub fn pad(out: &mut Vec<u8>) {
    if out.len() < PADDED_LEN {
        out.resize(PADDED_LEN, b' ');
    }
}

/// `{prefix}{token}`, e.g. a challenge or a welcome; `token` is hex.
pub fn write_keyed(out: &mut Vec<u8>, prefix: &[u8], token: &[u8]) {
    out.extend_from_slice(prefix);
    out.extend_from_slice(token);
}

/// The hex token after `prefix` in a datagram from the server (a challenge or a welcome).
pub fn parse_keyed<'a>(datagram: &'a [u8], prefix: &[u8]) -> Option<&'a [u8]> {
    strip(datagram)
        .strip_prefix(prefix)
        .filter(|t| is_hex_token(t))
}

/// What a datagram received by the server means.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Datagram<'a> {
    Register,
    Heartbeat,
    Quit,
    /// A chat message; the payload is the datagram with surrounding whitespace stripped.
    Message(&'a [u8]),
    /// Nothing but whitespace: ignored.
    Empty,
}

/// The whitespace of Python's `bytes.strip()`: space, \t, \n, \r, \x0b, \x0c.
/// (`u8::is_ascii_whitespace` leaves out \x0b, so the tutorial's server would disagree with it.)
fn is_python_space(b: u8) -> bool {
    matches!(b, b' ' | b'\t' | b'\n' | b'\r' | 0x0b | 0x0c)
}

/// `data.strip()` as the tutorial's server does it.
pub fn strip(data: &[u8]) -> &[u8] {
    let start = data
        .iter()
        .position(|&b| !is_python_space(b))
        .unwrap_or(data.len());
    let end = data
        .iter()
        .rposition(|&b| !is_python_space(b))
        .map_or(start, |i| i + 1);
    &data[start..end]
}

/// Classifies a datagram received by the server.
pub fn classify(data: &[u8]) -> Datagram<'_> {
    match strip(data) {
        b"" => Datagram::Empty,
        REG => Datagram::Register,
        HEARTBEAT => Datagram::Heartbeat,
        QUIT => Datagram::Quit,
        payload => Datagram::Message(payload),
    }
}

/// The most bytes `write_ack` adds around a payload: "ack: ", the longest IPv6 address (45),
/// " ", the longest port (5), and two newlines.
pub const ACK_MAX_OVERHEAD: usize = ACK_PREFIX.len() + 45 + 1 + 5 + 2;

/// The longest broadcast datagram, `ack:` line included: the most UDP carries over IPv4
/// (65,535 less the IPv4 and UDP headers). A message whose broadcast would be longer cannot be
/// relayed to IPv4 clients, so it is relayed to none.
pub const MAX_BROADCAST: usize = 65_507;

/// The fewest bytes `write_ack` adds around a payload: "ack: ", the shortest address a server
/// writes for a peer it answers (three characters, `::2`; `::` is never a peer), " ", a
/// one-digit port, and two newlines.
pub const ACK_MIN_OVERHEAD: usize = ACK_PREFIX.len() + 3 + 1 + 1 + 2;

/// The longest message any server can relay, once stripped of leading and trailing whitespace:
/// 65,495 bytes. A longer one makes a broadcast over `MAX_BROADCAST` whoever sent it.
pub const MAX_MESSAGE: usize = MAX_BROADCAST - ACK_MIN_OVERHEAD;

/// The length of the broadcast `write_ack` writes for a payload of `payload_len` bytes from
/// `sender`, without writing it.
pub fn ack_len(sender: SocketAddr, payload_len: usize) -> usize {
    use std::fmt::Write;
    struct Count(usize);
    impl Write for Count {
        fn write_str(&mut self, s: &str) -> std::fmt::Result {
            self.0 += s.len();
            Ok(())
        }
    }
    let mut count = Count(0);
    // Counting cannot fail.
    let _ = writeln!(count, "ack: {} {}", sender.ip(), sender.port());
    count.0 + payload_len + 1
}

/// Appends the broadcast datagram `ack: {ip} {port}\n{payload}\n` to `out`.
///
/// The ip is written as Python's socket module writes it (`127.0.0.1`, `::1`), without brackets
/// and without an IPv6 scope, so the tutorial's clients read it as they always did.
pub fn write_ack(out: &mut Vec<u8>, sender: SocketAddr, payload: &[u8]) {
    use std::io::Write;
    out.reserve(ACK_MAX_OVERHEAD + payload.len());
    // Writing into a Vec cannot fail.
    let _ = writeln!(out, "ack: {} {}", sender.ip(), sender.port());
    out.extend_from_slice(payload);
    out.push(b'\n');
}

/// A broadcast as a client reads it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ack<'a> {
    /// The original sender, from the `ack: {ip} {port}` line.
    pub sender: SocketAddr,
    /// The payload, without the one newline the server appended.
    pub payload: &'a [u8],
}

/// Parses `ack: {ip} {port}\n{payload}\n`. Returns `None` for anything else (the tutorial's
/// version 1 `ack: {data}`, `end`, or bytes from some other program).
pub fn parse_ack(datagram: &[u8]) -> Option<Ack<'_>> {
    let rest = datagram.strip_prefix(ACK_PREFIX)?;
    let newline = rest.iter().position(|&b| b == b'\n')?;
    let header = std::str::from_utf8(&rest[..newline]).ok()?;
    let (ip, port) = header.split_once(' ')?;
    let ip: IpAddr = ip.parse().ok()?;
    // u16's parser accepts a leading '+'; the server never writes one.
    if !port.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let port: u16 = port.parse().ok()?;
    let body = &rest[newline + 1..];
    let payload = body.strip_suffix(b"\n").unwrap_or(body);
    Some(Ack {
        sender: SocketAddr::new(ip, port),
        payload,
    })
}

/// What an open-mode server reads of a datagram: a validated-mode client's `{token} {body}` is
/// read as its body and its `reg {cookie}` as `reg`. So a client that believes its server
/// validates (the server restarted in open mode, or a forged challenge or welcome reached it)
/// goes on working, and its handshake is never relayed as a chat message. (A chat message that
/// starts with 32 hex digits and a space loses them.)
pub fn open_body(data: &[u8]) -> &[u8] {
    match classify_validated(data) {
        Validated::Tokened { body, .. } => body,
        Validated::Answer(_) => REG,
        Validated::Hello | Validated::Other => data,
    }
}

/// True for what a udpchat server sends and a client never does: an `ack:` line, `end` (plain
/// or keyed), a challenge or a welcome. A server that receives one is talking to another server
/// (or to itself, through a forged source), and answering it could start a loop.
pub fn is_server_output(data: &[u8]) -> bool {
    let data = strip(data);
    data == END
        || parse_ack(data).is_some()
        || [END_KEYED, CHALLENGE, WELCOME]
            .iter()
            .any(|prefix| parse_keyed(data, prefix).is_some())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn control_words_are_recognised_after_stripping() {
        assert_eq!(classify(b"reg"), Datagram::Register);
        assert_eq!(classify(b"reg\n"), Datagram::Register);
        assert_eq!(classify(b" ^hb^\r\n"), Datagram::Heartbeat);
        assert_eq!(classify(b"\x0bquit\x0c"), Datagram::Quit);
        assert_eq!(classify(b"regs"), Datagram::Message(b"regs"));
        assert_eq!(classify(b"REG"), Datagram::Message(b"REG"));
    }

    #[test]
    fn empty_and_whitespace_datagrams_are_ignored() {
        assert_eq!(classify(b""), Datagram::Empty);
        assert_eq!(classify(b" \t\r\n\x0b\x0c"), Datagram::Empty);
    }

    #[test]
    fn message_payload_keeps_inner_bytes_and_non_utf8() {
        assert_eq!(classify(b"  a b\n c \n"), Datagram::Message(b"a b\n c"));
        assert_eq!(
            classify(b"\xff\x00\xfe"),
            Datagram::Message(b"\xff\x00\xfe")
        );
        // NUL and 0x85/0xa0 are not whitespace for bytes.strip().
        assert_eq!(classify(b"\x00hi\xa0"), Datagram::Message(b"\x00hi\xa0"));
    }

    #[test]
    fn ack_matches_the_tutorial_format() {
        let mut out = Vec::new();
        write_ack(&mut out, addr("127.0.0.1:5555"), b"hello");
        assert_eq!(out, b"ack: 127.0.0.1 5555\nhello\n");
        out.clear();
        write_ack(&mut out, addr("[::1]:9"), b"x");
        assert_eq!(out, b"ack: ::1 9\nx\n");
    }

    #[test]
    fn parse_ack_reads_sender_and_payload() {
        let ack = parse_ack(b"ack: 10.1.2.3 80\nhi there\n").unwrap();
        assert_eq!(ack.sender, addr("10.1.2.3:80"));
        assert_eq!(ack.payload, b"hi there");
        let ack = parse_ack(b"ack: ::1 65535\n\xff\n\n").unwrap();
        assert_eq!(ack.sender, addr("[::1]:65535"));
        assert_eq!(ack.payload, b"\xff\n");
    }

    #[test]
    fn parse_ack_rejects_other_forms() {
        for bad in [
            &b"end"[..],
            b"ack: hello",
            b"ack: 1.2.3.4\nx\n",
            b"ack: 1.2.3.4 +80\nx\n",
            b"ack: 1.2.3.4 65536\nx\n",
            b"ack: nothost 80\nx\n",
            b"ack:1.2.3.4 80\nx\n",
            b"ack: 1.2.3.4 80 extra\nx\n",
        ] {
            assert_eq!(parse_ack(bad), None, "{:?}", String::from_utf8_lossy(bad));
        }
    }

    #[test]
    fn the_shortest_ack_line_sets_the_longest_relayable_message() {
        assert_eq!(ack_len(addr("[::2]:1"), 0), ACK_MIN_OVERHEAD);
        assert_eq!(ack_len(addr("[::1]:9"), MAX_MESSAGE), MAX_BROADCAST);
        assert_eq!(MAX_MESSAGE, 65_495);
        // A typical IPv4 client leaves less room.
        assert_eq!(ack_len(addr("127.0.0.1:40000"), 65_486), MAX_BROADCAST + 1);
    }

    proptest! {
        #[test]
        fn classify_never_panics_and_payload_is_stripped(data in proptest::collection::vec(any::<u8>(), 0..512)) {
            if let Datagram::Message(p) = classify(&data) {
                prop_assert!(!p.is_empty());
                prop_assert!(!is_python_space(p[0]) && !is_python_space(p[p.len() - 1]));
                // The payload is a slice of the datagram: bytes pass through unchanged.
                let start = p.as_ptr() as usize - data.as_ptr() as usize;
                prop_assert_eq!(&data[start..start + p.len()], p);
            }
        }

        #[test]
        fn ack_round_trips(ip in any::<IpAddr>(), port in any::<u16>(), payload in proptest::collection::vec(any::<u8>(), 0..512)) {
            let sender = SocketAddr::new(ip, port);
            let mut out = Vec::new();
            write_ack(&mut out, sender, &payload);
            prop_assert!(out.len() <= ACK_MAX_OVERHEAD + payload.len());
            prop_assert_eq!(out.len(), ack_len(sender, payload.len()));
            if is_valid_peer(sender) {
                prop_assert!(out.len() >= ACK_MIN_OVERHEAD + payload.len());
            }
            let ack = parse_ack(&out).unwrap();
            prop_assert_eq!(ack.sender, sender);
            prop_assert_eq!(ack.payload, &payload[..]);
        }

        #[test]
        fn parse_ack_never_panics(data in proptest::collection::vec(any::<u8>(), 0..256)) {
            let _ = parse_ack(&data);
        }
    }

    #[test]
    fn server_output_is_told_from_what_clients_send() {
        let token = [b'a'; TOKEN_LEN];
        let mut ack = Vec::new();
        write_ack(&mut ack, addr("[::1]:9998"), b"hello");
        let mut outputs = vec![ack, END.to_vec(), b" end\n".to_vec()];
        for prefix in [END_KEYED, CHALLENGE, WELCOME] {
            let mut keyed = Vec::new();
            write_keyed(&mut keyed, prefix, &token);
            outputs.push(keyed);
        }
        for out in &outputs {
            assert!(is_server_output(out), "{:?}", String::from_utf8_lossy(out));
        }
        let mut tokened = token.to_vec();
        tokened.extend_from_slice(b" ack: 1.2.3.4 5\nx\n");
        let mut sent = vec![tokened];
        for body in [
            REG,
            HEARTBEAT,
            QUIT,
            b"reg 0123",
            b"hello",
            b"ending",
            b"ack: hi",
            b"welcome",
        ] {
            let mut padded = body.to_vec();
            pad(&mut padded);
            sent.extend([body.to_vec(), padded]);
        }
        for client in &sent {
            assert!(
                !is_server_output(client),
                "{:?}",
                String::from_utf8_lossy(client)
            );
        }
    }

    #[test]
    fn an_open_server_reads_a_validated_clients_datagrams() {
        let token = "0123456789abcdef0123456789ABCDEF";
        let cases: [(String, &[u8]); 5] = [
            (format!("{token} ^hb^                         "), HEARTBEAT),
            (format!("{token} hello there"), b"hello there"),
            (format!("reg {}", token.to_lowercase()), REG),
            ("reg".to_owned(), REG),
            ("1234 not a token".to_owned(), b"1234 not a token"),
        ];
        for (datagram, read) in cases {
            assert_eq!(
                classify(open_body(datagram.as_bytes())),
                classify(read),
                "{datagram}"
            );
        }
    }

    #[test]
    fn forged_looking_sources_are_not_peers() {
        for bad in [
            "127.0.0.1:0",
            "0.0.0.0:5",
            "255.255.255.255:5",
            "224.0.0.1:5",
            "[::]:5",
            "[ff02::1]:5",
            "[::ffff:255.255.255.255]:5",
            "[::ffff:239.1.1.1]:5",
        ] {
            assert!(!is_valid_peer(addr(bad)), "{bad}");
        }
        for good in [
            "127.0.0.1:5",
            "10.1.2.3:65535",
            "[::1]:5",
            "[::ffff:127.0.0.1]:5",
        ] {
            assert!(is_valid_peer(addr(good)), "{good}");
        }
    }

    #[test]
    fn validated_datagrams_are_told_apart() {
        let token = [b'a'; TOKEN_LEN];
        let mut padded = b"reg".to_vec();
        pad(&mut padded);
        assert_eq!(padded.len(), PADDED_LEN);
        assert_eq!(classify_validated(&padded), Validated::Hello);
        assert_eq!(classify(&padded), Datagram::Register); // open servers read it too
        let mut answer = b"reg ".to_vec();
        answer.extend_from_slice(&token);
        assert_eq!(classify_validated(&answer), Validated::Answer(&token));
        let mut tokened = token.to_vec();
        tokened.extend_from_slice(b" ^hb^");
        pad(&mut tokened);
        assert_eq!(
            classify_validated(&tokened),
            Validated::Tokened {
                token: &token,
                body: b"^hb^"
            }
        );
        for other in [&b"^hb^"[..], b"quit", b"hello", b"reg 123", &token] {
            assert_eq!(
                classify_validated(other),
                Validated::Other,
                "{:?}",
                String::from_utf8_lossy(other)
            );
        }
        let mut challenge = Vec::new();
        write_keyed(&mut challenge, CHALLENGE, &token);
        assert_eq!(challenge.len(), CHALLENGE_LEN);
        assert_eq!(parse_keyed(&challenge, CHALLENGE), Some(&token[..]));
        assert_eq!(parse_keyed(&challenge, WELCOME), None);
    }

    proptest! {
        #[test]
        fn classify_validated_never_panics(data in proptest::collection::vec(any::<u8>(), 0..256)) {
            let _ = classify_validated(&data);
        }
    }
}
