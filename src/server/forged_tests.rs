//! Forged sources fed straight into the receiver's handler, with no threads and no raw sockets:
//! the guarantees tests/test_security.py checks from a network namespace, tested here on every
//! machine, privileged or not. What the server sends still leaves through its real socket, so
//! the victims below are real sockets on loopback.

use std::net::{SocketAddr, UdpSocket};
use std::time::Duration;

use super::fanout::{Job, FANOUT_QUEUE};
use super::receive::Receive;
use super::{Event, Reason, ServerConfig, Shared};
use crate::net::Handler;
use crate::protocol::{self, CHALLENGE, WELCOME};
use crate::worker::{lock, Stop};
use crossbeam_channel::{Receiver, Sender};

/// A server without its threads: the test is its receive loop.
struct Bench {
    shared: Shared,
    stop: Stop,
    fanout: Sender<Job>,
    _jobs: Receiver<Job>,
    events: Receiver<Event>,
}

impl Bench {
    fn new(validate: bool) -> Bench {
        let config = ServerConfig {
            validate,
            ..ServerConfig::default_for("127.0.0.1:0".parse().unwrap())
        };
        let (fanout, _jobs) = crossbeam_channel::bounded(FANOUT_QUEUE);
        let (shared, events, _) = Shared::bind(config).unwrap();
        Bench {
            shared,
            events,
            stop: Stop::new().unwrap(),
            fanout,
            _jobs,
        }
    }

    fn receiver(&self) -> Receive<'_> {
        Receive::new(&self.shared, &self.stop, &self.fanout)
    }

    fn registered(&self, addr: SocketAddr) -> bool {
        lock(&self.shared.presence)
            .registry
            .peers(std::time::Instant::now())
            .iter()
            .any(|p| p.addr == addr)
    }

    fn stat(&self, name: &str) -> u64 {
        let stats = self.shared.counters.snapshot();
        stats.into_iter().find(|(n, _)| *n == name).unwrap().1
    }
}

/// One datagram "from" `from`, as one batch.
fn feed(rx: &mut Receive<'_>, data: &[u8], from: SocketAddr) {
    rx.datagram(data, from, None, false);
    rx.batch_done();
}

/// A victim or client: `drain` reads it until it has been quiet for 30 ms.
fn socket() -> UdpSocket {
    let s = UdpSocket::bind("127.0.0.1:0").unwrap();
    s.set_read_timeout(Some(Duration::from_millis(30))).unwrap();
    s
}

fn addr(s: &UdpSocket) -> SocketAddr {
    s.local_addr().unwrap()
}

/// Everything that reached `s` until it has been quiet for 30 ms (a datagram sent on loopback is
/// queued at the receiver before `send_to` returns).
fn drain(s: &UdpSocket) -> Vec<Vec<u8>> {
    let mut got = Vec::new();
    let mut buf = [0u8; 70_000];
    while let Ok(n) = s.recv(&mut buf) {
        got.push(buf[..n].to_vec());
    }
    got
}

fn padded(body: &[u8]) -> Vec<u8> {
    let mut d = body.to_vec();
    protocol::pad(&mut d);
    d
}

/// Takes `client` through validated mode's handshake; returns its token.
fn validate(bench: &Bench, rx: &mut Receive<'_>, client: &UdpSocket) -> Vec<u8> {
    feed(rx, &padded(b"reg"), addr(client));
    let challenge = drain(client).pop().expect("a challenge");
    let cookie = protocol::parse_keyed(&challenge, CHALLENGE).unwrap();
    feed(rx, &padded(&[b"reg ", cookie].concat()), addr(client));
    let welcome = drain(client).pop().expect("a welcome");
    assert!(bench.registered(addr(client)));
    protocol::parse_keyed(&welcome, WELCOME).unwrap().to_vec()
}

fn tokened(token: &[u8], body: &[u8]) -> Vec<u8> {
    padded(&[token, b" ", body].concat())
}

#[test]
fn open_mode_relays_to_a_forged_reg_as_the_tutorial_does() {
    // The known weakness of the open protocol, kept for compatibility: the victim of a forged
    // `reg` gets every broadcast. This pins the figure the README states.
    let bench = Bench::new(false);
    let mut rx = bench.receiver();
    let (victim, talker) = (socket(), socket());
    feed(&mut rx, b"reg", addr(&victim));
    for i in 0..100 {
        feed(&mut rx, format!("message {i}").as_bytes(), addr(&talker));
    }
    assert_eq!(drain(&victim).len(), 100);
}

#[test]
fn validated_mode_sends_a_forged_reg_one_challenge_no_larger_than_it() {
    let bench = Bench::new(true);
    let mut rx = bench.receiver();
    let (victim, talker) = (socket(), socket());
    let token = validate(&bench, &mut rx, &talker);
    let forged = padded(b"reg");
    feed(&mut rx, &forged, addr(&victim));
    for i in 0..100 {
        feed(
            &mut rx,
            &tokened(&token, format!("m{i}").as_bytes()),
            addr(&talker),
        );
    }
    assert_eq!(drain(&talker).len(), 100, "the real client is served");
    let got = drain(&victim);
    assert_eq!(got.len(), 1);
    assert!(got[0].starts_with(CHALLENGE) && got[0].len() <= forged.len());
    assert!(!bench.registered(addr(&victim)));
    // Shorter than a challenge: not even that.
    feed(&mut rx, b"reg", addr(&victim));
    assert!(drain(&victim).is_empty());
}

#[test]
fn validated_mode_ignores_forged_control_words_for_a_client_and_a_stranger() {
    let bench = Bench::new(true);
    let mut rx = bench.receiver();
    let client = socket();
    let token = validate(&bench, &mut rx, &client);
    let guess = [b'0'; 32];
    for body in [
        &b"quit"[..],
        &padded(b"quit"),
        &tokened(&guess, b"quit"),
        b"^hb^",
    ] {
        feed(&mut rx, body, addr(&client));
    }
    let stranger = socket();
    for body in [&b"^hb^"[..], &tokened(&guess, b"^hb^"), b"hello"] {
        feed(&mut rx, body, addr(&stranger));
    }
    assert!(bench.registered(addr(&client)));
    assert!(!bench.registered(addr(&stranger)));
    assert_eq!(bench.stat("dropped_unvalidated"), 2);
    assert_eq!(bench.stat("dropped_malformed"), 5);
    drain(&client);
    feed(&mut rx, &tokened(&token, b"still here"), addr(&client));
    assert!(drain(&client)[0].ends_with(b"\nstill here\n"));
}

#[test]
fn sources_no_one_can_answer_are_never_registered_or_sent_to() {
    for validate in [false, true] {
        let bench = Bench::new(validate);
        let mut rx = bench.receiver();
        let bad = [
            "127.0.0.5:0",
            "0.0.0.0:5000",
            "255.255.255.255:5000",
            "224.0.0.1:5000",
            "[::]:5000",
            "[ff02::1]:5000",
            "[::ffff:224.0.0.1]:5000",
        ];
        for from in bad {
            let from: SocketAddr = from.parse().unwrap();
            feed(&mut rx, &padded(b"reg"), from);
            feed(&mut rx, b"a forged message", from);
            assert!(!bench.registered(from), "{from} registered");
        }
        assert_eq!(bench.stat("dropped_bad_source"), 2 * bad.len() as u64);
        assert_eq!(bench.stat("challenges"), 0);
        assert_eq!(lock(&bench.shared.presence).registry.len(), 0);
    }
}

/// A registered client of `bench` (validated if the server is): a real socket.
fn client(bench: &Bench, rx: &mut Receive<'_>) -> (UdpSocket, Option<Vec<u8>>) {
    let s = socket();
    let token = match bench.shared.keys {
        Some(_) => Some(validate(bench, rx, &s)),
        None => {
            feed(rx, b"reg", addr(&s));
            None
        }
    };
    (s, token)
}

/// Everything that reaches the servers' sockets is handed to their receivers, round after
/// round, until all are quiet for 30 ms or `ROUNDS` rounds have passed. Returns how many
/// datagrams each server received.
fn pump(servers: &mut [(&Bench, Receive<'_>)]) -> Vec<usize> {
    const ROUNDS: usize = 300;
    let mut received = vec![0; servers.len()];
    let mut buf = [0u8; 70_000];
    let mut quiet = 0;
    for _ in 0..ROUNDS {
        let mut moved = 0;
        for (i, (bench, rx)) in servers.iter_mut().enumerate() {
            while let Ok((n, from)) = bench.shared.socket.recv_from(&mut buf) {
                feed(rx, &buf[..n], from);
                received[i] += 1;
                moved += 1;
            }
        }
        quiet = if moved == 0 { quiet + 1 } else { 0 };
        if quiet == 3 {
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    received
}

/// What a forger can send to start a loop, "from" a server's address.
fn triggers() -> Vec<(&'static str, Vec<u8>)> {
    let mut ack = Vec::new();
    protocol::write_ack(&mut ack, "127.0.0.1:4".parse().unwrap(), b"looping");
    let mut challenge = Vec::new();
    protocol::write_keyed(&mut challenge, CHALLENGE, &[b'a'; protocol::TOKEN_LEN]);
    vec![
        ("reg", b"reg".to_vec()),
        ("padded reg", padded(b"reg")),
        ("message", b"hello".to_vec()),
        ("64-byte datagram", vec![b'x'; 64]),
        ("ack", ack),
        ("challenge", challenge),
    ]
}

#[test]
fn a_datagram_forged_from_the_servers_own_address_starts_nothing() {
    for validate in [false, true] {
        for (name, trigger) in triggers() {
            let bench = Bench::new(validate);
            let mut rx = bench.receiver();
            let (member, _) = client(&bench, &mut rx);
            drain(&member);
            let own = bench.shared.local;
            feed(&mut rx, &trigger, own);
            let received = pump(&mut [(&bench, rx)])[0];
            let case = format!("validate={validate}, {name}");
            assert_eq!(received, 0, "{case}: the server sent itself datagrams");
            assert!(
                !bench.registered(own),
                "{case}: the server registered itself"
            );
            assert!(
                drain(&member).is_empty(),
                "{case}: its client got the forgery"
            );
            assert_eq!(bench.stat("dropped_loop"), 1, "{case}");
        }
    }
}

#[test]
fn no_pairing_of_two_servers_loops_on_any_forged_datagram() {
    for (validate_a, validate_b) in [(false, false), (false, true), (true, false), (true, true)] {
        for (name, trigger) in triggers() {
            for (to_a, to_b) in [(true, false), (false, true), (true, true)] {
                let (a, b) = (Bench::new(validate_a), Bench::new(validate_b));
                let (mut rx_a, mut rx_b) = (a.receiver(), b.receiver());
                let (member_a, _) = client(&a, &mut rx_a);
                let (member_b, _) = client(&b, &mut rx_b);
                drain(&member_a);
                drain(&member_b);
                // The forgery reaches one server "from" the other, or each from the other.
                if to_a {
                    feed(&mut rx_a, &trigger, b.shared.local);
                }
                if to_b {
                    feed(&mut rx_b, &trigger, a.shared.local);
                }
                let received = pump(&mut [(&a, rx_a), (&b, rx_b)]);
                let case = format!(
                    "a validate={validate_a}, b validate={validate_b}, {name} to a {to_a} to b {to_b}"
                );
                assert!(received.iter().all(|&n| n < 10), "{case}: {received:?}");
                for member in [&member_a, &member_b] {
                    let copies = drain(member).len();
                    assert!(copies <= 1, "{case}: a client got {copies} copies");
                }
            }
        }
    }
}

#[test]
fn a_validated_server_never_loops_with_a_service_that_answers_everything() {
    // Services of the kind Loop DoS pairs up: each answers every datagram, with at least as many
    // bytes as a challenge. One forged padded `reg` "from" the service starts the exchange.
    // With each, the most challenges it may get: one, but for a reply that reads as a stale
    // token, which is challenged until the per-address reply budget ends it.
    type Answer = fn(&[u8]) -> Vec<u8>;
    let burst = super::loops::REPLY_BURST_PER_ADDRESS as usize;
    let services: [(&str, Answer, usize); 4] = [
        ("echo", |d| d.to_vec(), 1),
        ("echo with a prefix", |d| [b"ack: ", d].concat(), 1),
        (
            "echo with a hex tag",
            |d| [&b"0123456789abcdef0123456789abcdef "[..], d].concat(),
            burst,
        ),
        (
            "chargen",
            |_| {
                b"!\"#$%&'()*+,-./0123456789:;<=>?@ABCDEFGHIJKLMNOPQRSTUVWXYZ[\\]^_`abcdefgh\r\n"
                    .to_vec()
            },
            1,
        ),
    ];
    for (name, answer, most) in services {
        let bench = Bench::new(true);
        let mut rx = bench.receiver();
        let service = socket();
        feed(&mut rx, &padded(b"reg"), addr(&service));
        let mut exchanged = 0;
        let mut buf = [0u8; 70_000];
        for _ in 0..100 {
            let Ok(n) = service.recv(&mut buf) else {
                break; // the server has stopped answering
            };
            exchanged += 1;
            feed(&mut rx, &answer(&buf[..n]), addr(&service));
        }
        assert!(
            exchanged <= most,
            "{name}: {exchanged} datagrams to the service"
        );
    }
}

#[test]
fn an_open_server_takes_a_bogus_token_as_its_client_meant_it() {
    // A forged challenge or welcome can make a client of an open server answer a challenge or
    // prefix a token: the server still reads its heartbeats, quit and messages as meant.
    let bench = Bench::new(false);
    let mut rx = bench.receiver();
    let (member, _) = client(&bench, &mut rx);
    let confused = socket();
    let bogus = [b'0'; protocol::TOKEN_LEN];
    feed(
        &mut rx,
        &padded(&[b"reg ", &bogus[..]].concat()),
        addr(&confused),
    );
    feed(&mut rx, &tokened(&bogus, b"^hb^"), addr(&confused));
    assert!(bench.registered(addr(&confused)));
    assert!(
        drain(&member).is_empty(),
        "a handshake or heartbeat was relayed"
    );
    feed(&mut rx, &tokened(&bogus, b"hi"), addr(&confused));
    assert!(drain(&member)[0].ends_with(b"\nhi\n"));
    feed(&mut rx, &tokened(&bogus, b"quit"), addr(&confused));
    assert!(!bench.registered(addr(&confused)));
}

impl Bench {
    /// The events queued so far, as (reason, address).
    fn events(&self) -> Vec<(Reason, SocketAddr)> {
        self.events.try_iter().map(|e| (e.reason, e.addr)).collect()
    }
}

#[test]
fn a_forged_unreachable_report_only_pauses_a_validated_client_until_it_is_heard_from() {
    let bench = Bench::new(true);
    let mut rx = bench.receiver();
    let (victim, victim_token) = client(&bench, &mut rx);
    let (talker, token) = client(&bench, &mut rx);
    let (victim_token, token) = (victim_token.unwrap(), token.unwrap());
    // Anyone who saw the victim's address in an `ack:` line can forge an ICMP error for it.
    rx.unreachable(addr(&victim), &std::io::ErrorKind::ConnectionRefused.into());
    assert!(bench.registered(addr(&victim)));
    feed(&mut rx, &tokened(&token, b"while paused"), addr(&talker));
    assert!(drain(&victim).is_empty(), "sent to a paused client");
    assert_eq!(drain(&talker).len(), 1);
    assert_eq!(bench.stat("paused_unreachable"), 1);
    assert_eq!(bench.stat("dropped_unreachable"), 0);
    // Its next valid datagram ends the pause.
    feed(&mut rx, &tokened(&victim_token, b"^hb^"), addr(&victim));
    feed(&mut rx, &tokened(&token, b"after"), addr(&talker));
    assert_eq!(drain(&victim).len(), 1);
    assert_eq!(bench.stat("paused_unreachable"), 1);
    let joins = vec![
        (Reason::Validated, addr(&victim)),
        (Reason::Validated, addr(&talker)),
    ];
    assert_eq!(bench.events(), joins, "a pause is not a leave");
}

#[test]
fn an_unreachable_report_drops_an_open_client_at_once_and_nothing_else() {
    let bench = Bench::new(false);
    let mut rx = bench.receiver();
    let ((gone, _), (talker, _)) = (client(&bench, &mut rx), client(&bench, &mut rx));
    let stranger: SocketAddr = "127.0.0.1:9".parse().unwrap();
    rx.unreachable(stranger, &std::io::ErrorKind::ConnectionRefused.into());
    rx.unreachable(addr(&gone), &std::io::ErrorKind::ConnectionRefused.into());
    rx.unreachable(addr(&gone), &std::io::ErrorKind::ConnectionRefused.into());
    assert!(!bench.registered(addr(&gone)));
    assert_eq!(bench.stat("dropped_unreachable"), 1);
    feed(&mut rx, b"hi", addr(&talker));
    assert!(drain(&gone).is_empty());
    let expected = vec![
        (Reason::Reg, addr(&gone)),
        (Reason::Reg, addr(&talker)),
        (Reason::Unreachable, addr(&gone)),
    ];
    assert_eq!(bench.events(), expected);
}

#[test]
fn with_drop_unreachable_off_a_report_changes_nothing() {
    let mut bench = Bench::new(false);
    bench.shared.config.drop_unreachable = false;
    let mut rx = bench.receiver();
    let (gone, _) = client(&bench, &mut rx);
    rx.unreachable(addr(&gone), &std::io::ErrorKind::ConnectionRefused.into());
    assert!(bench.registered(addr(&gone)));
    assert_eq!(bench.stat("dropped_unreachable"), 0);
}
