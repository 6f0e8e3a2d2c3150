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
    // `{token} {body}`. A blank body (the client sent an empty or all-space message) leaves the
    // token alone once the padding is stripped: it is still tokened, and ignored as in the open
    // protocol, not counted as malformed and answered with a challenge.
    if data.len() >= TOKEN_LEN && is_hex_token(&data[..TOKEN_LEN]) {
        match data.get(TOKEN_LEN) {
            None => {
                return Validated::Tokened {
                    token: data,
                    body: &data[TOKEN_LEN..],
                }
            }
            Some(b' ') => {
                return Validated::Tokened {
                    token: &data[..TOKEN_LEN],
                    body: &data[TOKEN_LEN + 1..],
                }
            }
            Some(_) => {}
        }
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
        // A blank message from a validated client: tokened, with nothing after the token.
        let mut blank = token.to_vec();
        blank.push(b' ');
        pad(&mut blank);
        for tokened in [&blank[..], &token] {
            assert_eq!(
                classify_validated(tokened),
                Validated::Tokened {
                    token: &token,
                    body: b""
                }
            );
        }
        assert_eq!(classify(b""), Datagram::Empty); // what the body then reads as
        for other in [&b"^hb^"[..], b"quit", b"hello", b"reg 123", &token[1..]] {
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

    // --- The fuzz target -----------------------------------------------------------------
    //
    // What `cargo fuzz` would run, on stable and in `cargo test`: `check_parsers` feeds one
    // input to every parser here and asserts each one's invariants against a reference written
    // apart from the code under test; proptest drives it with arbitrary bytes and with near
    // misses built from the protocol's own words, whitespace and tokens (random bytes almost
    // never spell `reg` or a 32-digit hex token). A long run:
    // `PROPTEST_CASES=1000000 cargo test --release --lib fuzz_`.

    /// The bytes Python's `bytes.strip()` removes, as Python lists them:
    /// `[b for b in range(256) if bytes([b]).strip() == b""]` is `[9, 10, 11, 12, 13, 32]`.
    const PY_STRIPPED: [u8; 6] = [9, 10, 11, 12, 13, 32];

    fn py_strip(mut d: &[u8]) -> &[u8] {
        while let [first, rest @ ..] = d {
            if !PY_STRIPPED.contains(first) {
                break;
            }
            d = rest;
        }
        while let [rest @ .., last] = d {
            if !PY_STRIPPED.contains(last) {
                break;
            }
            d = rest;
        }
        d
    }

    fn is_hex(t: &[u8]) -> bool {
        t.len() == 32 && t.iter().all(|b| b"0123456789abcdefABCDEF".contains(b))
    }

    /// The validated-mode grammar of the README, over Python's strip.
    fn expected_validated(data: &[u8]) -> Validated<'_> {
        let s = py_strip(data);
        if s == b"reg" {
            Validated::Hello
        } else if s.len() == 36 && s.starts_with(b"reg ") && is_hex(&s[4..]) {
            Validated::Answer(&s[4..])
        } else if s.len() >= 32 && is_hex(&s[..32]) && s.get(32).is_none_or(|&b| b == b' ') {
            // `{token} {body}`: a blank body leaves the token alone once stripped.
            Validated::Tokened {
                token: &s[..32],
                body: s.get(33..).unwrap_or_default(),
            }
        } else {
            Validated::Other
        }
    }

    /// Where `part` starts in `whole`, of which it must be a slice.
    fn offset(whole: &[u8], part: &[u8]) -> usize {
        let start = (part.as_ptr() as usize).wrapping_sub(whole.as_ptr() as usize);
        assert!(
            start + part.len() <= whole.len(),
            "not a slice of the input"
        );
        start
    }

    /// One input through every parser; panics (a "crash") where an invariant does not hold.
    fn check_parsers(data: &[u8]) {
        let stripped = strip(data);
        assert_eq!(stripped, py_strip(data), "strip is bytes.strip()");
        let expected = match stripped {
            b"" => Datagram::Empty,
            b"reg" => Datagram::Register,
            b"^hb^" => Datagram::Heartbeat,
            b"quit" => Datagram::Quit,
            payload => Datagram::Message(payload),
        };
        assert_eq!(classify(data), expected);

        let validated = classify_validated(data);
        assert_eq!(validated, expected_validated(data));
        match validated {
            Validated::Answer(t) => assert_eq!(offset(data, t), offset(data, stripped) + 4),
            Validated::Tokened { token, body } => {
                assert_eq!(offset(data, token), offset(data, stripped));
                offset(data, body);
            }
            Validated::Hello | Validated::Other => {}
        }

        for prefix in [CHALLENGE, WELCOME, END_KEYED] {
            let expected = stripped.strip_prefix(prefix).filter(|t| is_hex(t));
            assert_eq!(parse_keyed(data, prefix), expected);
        }

        if let Some(ack) = parse_ack(data) {
            assert!(data.starts_with(b"ack: "));
            // The payload is the datagram's tail, less at most the one newline the server adds.
            let end = offset(data, ack.payload) + ack.payload.len();
            assert!(end == data.len() || (end + 1 == data.len() && data[end] == b'\n'));
            // The sender line is one `{ip} {port}` line: written out again as a server writes
            // it, the datagram reads back the same.
            let line = &data[5..offset(data, ack.payload)];
            assert_eq!(line.iter().filter(|&&b| b == b'\n').count(), 1);
            assert_eq!(line.iter().filter(|&&b| b == b' ').count(), 1);
            let mut again = Vec::new();
            write_ack(&mut again, ack.sender, ack.payload);
            assert_eq!(parse_ack(&again), Some(ack));
        }
    }

    fn hex_token() -> impl Strategy<Value = Vec<u8>> {
        proptest::collection::vec(
            proptest::sample::select(b"0123456789abcdefABCDEF".to_vec()),
            TOKEN_LEN,
        )
    }

    /// A piece of a near miss: a protocol word or a near miss of one, whitespace (with bytes
    /// that are whitespace to `str.strip()` but not to `bytes.strip()`), a token of 31 to 33
    /// hex digits, or a few arbitrary bytes.
    fn piece() -> impl Strategy<Value = Vec<u8>> {
        let words: Vec<&[u8]> = vec![
            b"reg",
            b"^hb^",
            b"quit",
            b"end",
            b"end ",
            b"reg ",
            b"ack:",
            b"ack: ",
            b"challenge ",
            b"welcome ",
            b"REG",
            b"re",
            b"eg",
            b"^hb",
            b"hb^",
            b"qui",
            b"Quit",
            b"127.0.0.1",
            b"::1",
            b"80",
            b"65535",
            b"65536",
            b"+1",
            b"\n",
            b" ",
        ];
        let spaces = b" \t\n\r\x0b\x0c\x00\x1c\x1f\x85\xa0".to_vec();
        prop_oneof![
            proptest::sample::select(words).prop_map(<[u8]>::to_vec),
            proptest::collection::vec(proptest::sample::select(spaces), 1..4),
            proptest::collection::vec(
                proptest::sample::select(b"0123456789abcdefABCDEFg".to_vec()),
                TOKEN_LEN - 1..=TOKEN_LEN + 1
            ),
            proptest::collection::vec(any::<u8>(), 1..8),
        ]
    }

    fn near_miss() -> impl Strategy<Value = Vec<u8>> {
        proptest::collection::vec(piece(), 0..6).prop_map(|p| p.concat())
    }

    /// `ack: {ip} {port}\n{payload}\n` with each part right or nearly right.
    /// With the sender it must be read as, `Some(None)` if it must not be read, `None` if either.
    fn ack_near_miss() -> impl Strategy<Value = (Vec<u8>, Option<Option<SocketAddr>>)> {
        let ip = prop_oneof![
            4 => any::<IpAddr>().prop_map(|ip| (ip.to_string(), Some(ip))),
            1 => any::<IpAddr>().prop_map(|ip| (ip.to_string().to_uppercase(), Some(ip))),
            1 => any::<std::net::Ipv6Addr>().prop_map(|ip| (format!("[{ip}]"), None)),
            1 => any::<std::net::Ipv6Addr>().prop_map(|ip| (format!("{ip}%1"), None)),
            1 => any::<[u8; 4]>().prop_map(|o| (format!("{}.{}.{}.0{}", o[0], o[1], o[2], o[3]), None)),
            1 => "[0-9a-f.:]{0,12}".prop_map(|s| {
                let ip = s.parse().ok();
                (s, ip)
            }),
        ];
        let port = prop_oneof![
            4 => any::<u16>().prop_map(|p| (p.to_string(), Some(p))),
            1 => any::<u16>().prop_map(|p| (format!("00{p}"), Some(p))),
            1 => any::<u16>().prop_map(|p| (format!("+{p}"), None)),
            1 => (65536u32..10_000_000).prop_map(|p| (p.to_string(), None)),
            1 => Just((String::new(), None)),
        ];
        // (prefix, separator, end of line, read as an ack?): `Some(false)` never is, `None`
        // depends on the payload (with no newline here, the payload's first one ends the line).
        let framing = proptest::sample::select(vec![
            ("ack: ", " ", "\n", Some(true)),
            ("ack: ", "  ", "\n", Some(false)),
            ("ack: ", "\t", "\n", Some(false)),
            ("ack: ", " ", "\r\n", Some(false)),
            ("ack: ", " ", " \n", Some(false)),
            ("ack: ", " ", "", None),
            ("ack:", " ", "\n", Some(false)),
            ("ACK: ", " ", "\n", Some(false)),
            (" ack: ", " ", "\n", Some(false)),
        ]);
        let payload = prop_oneof![near_miss(), proptest::collection::vec(any::<u8>(), 0..64)];
        (framing, ip, port, payload).prop_map(
            |((prefix, sep, eol, good), (ip, ip_ok), (port, port_ok), payload)| {
                let datagram = [
                    prefix.as_bytes(),
                    ip.as_bytes(),
                    sep.as_bytes(),
                    port.as_bytes(),
                    eol.as_bytes(),
                    &payload,
                ]
                .concat();
                let sender = match (good, ip_ok, port_ok) {
                    (Some(true), Some(ip), Some(port)) => Some(Some(SocketAddr::new(ip, port))),
                    (None, _, _) => None,
                    _ => Some(None),
                };
                (datagram, sender)
            },
        )
    }

    fn fuzz_config() -> ProptestConfig {
        let cases = std::env::var("PROPTEST_CASES")
            .ok()
            .and_then(|c| c.parse().ok());
        ProptestConfig::with_cases(cases.unwrap_or(4096))
    }

    proptest! {
        #![proptest_config(fuzz_config())]

        #[test]
        fn fuzz_parsers_on_arbitrary_bytes(data in proptest::collection::vec(any::<u8>(), 0..600)) {
            check_parsers(&data);
        }

        #[test]
        fn fuzz_parsers_on_near_misses(data in near_miss()) {
            check_parsers(&data);
        }

        #[test]
        fn fuzz_parse_ack_on_near_misses((data, sender) in ack_near_miss()) {
            check_parsers(&data);
            if let Some(sender) = sender {
                prop_assert_eq!(parse_ack(&data).map(|a| a.sender), sender);
            }
        }

        /// What a validated client sends, `{token} {body}` padded, is read by the server as
        /// `body` in the open protocol, whatever the body (blank included).
        #[test]
        fn fuzz_a_tokened_body_reads_as_in_open_mode(token in hex_token(), body in near_miss()) {
            let mut datagram = token.clone();
            datagram.push(b' ');
            datagram.extend_from_slice(&body);
            pad(&mut datagram);
            check_parsers(&datagram);
            match classify_validated(&datagram) {
                Validated::Tokened { token: t, body: b } => {
                    prop_assert_eq!(t, &token[..]);
                    prop_assert_eq!(classify(b), classify(&body));
                }
                other => prop_assert!(false, "{:?}", other),
            }
        }

        /// Keyed server datagrams and the client's answer read back, whitespace around them or
        /// not; and nothing a server sends is accepted by a validated server, so two servers
        /// cannot keep each other busy.
        #[test]
        fn fuzz_keyed_datagrams_round_trip(
            token in hex_token(),
            before in proptest::collection::vec(proptest::sample::select(PY_STRIPPED.to_vec()), 0..3),
            after in proptest::collection::vec(proptest::sample::select(PY_STRIPPED.to_vec()), 0..3),
            sender in any::<SocketAddr>(),
            payload in near_miss(),
        ) {
            for prefix in [CHALLENGE, WELCOME, END_KEYED] {
                let mut datagram = before.clone();
                write_keyed(&mut datagram, prefix, &token);
                datagram.extend_from_slice(&after);
                check_parsers(&datagram);
                prop_assert_eq!(parse_keyed(&datagram, prefix), Some(&token[..]));
                prop_assert_eq!(classify_validated(&datagram), Validated::Other);
            }
            let mut answer = b"reg ".to_vec();
            answer.extend_from_slice(&token);
            pad(&mut answer);
            prop_assert_eq!(classify_validated(&answer), Validated::Answer(&token));
            let mut ack = Vec::new();
            write_ack(&mut ack, sender, &payload);
            prop_assert_eq!(classify_validated(&ack), Validated::Other);
        }
    }

    #[test]
    fn strip_removes_what_bytes_strip_removes_and_nothing_else() {
        for b in 0..=255u8 {
            let alone = [b];
            assert_eq!(
                strip(&alone).is_empty(),
                PY_STRIPPED.contains(&b),
                "{b:#04x}"
            );
            let framed = [b, b'x', b];
            assert_eq!(strip(&framed), py_strip(&framed), "{b:#04x}");
        }
    }

    /// `crash-78b819b…` (0a 7a 8f), committed at the root by the first atheris run: every
    /// parser reads it as an ordinary message; it never crashed anything here.
    #[test]
    fn the_atheris_artifact_is_an_ordinary_message() {
        let data = b"\nz\x8f";
        check_parsers(data);
        assert_eq!(classify(data), Datagram::Message(b"z\x8f"));
        assert_eq!(classify_validated(data), Validated::Other);
        assert_eq!(parse_ack(data), None);
    }
}
