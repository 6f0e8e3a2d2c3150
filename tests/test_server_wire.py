"""The server's wire protocol, checked byte for byte with plain `socket` peers."""

from __future__ import annotations

import socket
import time
from collections.abc import Callable

import pytest
from conftest import (
    HAS_IPV6,
    ack,
    assert_silent,
    default_rcvbuf,
    rcvbuf,
    recv,
    register,
    room,
    wait_until,
)
from udpchat import ChatServerUdp

MakePeer = Callable[..., socket.socket]


def test_message_is_broadcast_to_every_client_including_the_sender(
    server: ChatServerUdp, make_peer: MakePeer
) -> None:
    a, b, c = make_peer(), make_peer(), make_peer()
    register(b, server)
    register(c, server)
    a.sendto(b"hello", server.address)
    expected = ack(a.getsockname(), b"hello")
    assert recv(a) == expected
    assert recv(b) == expected
    assert recv(c) == expected
    # A message registers its sender: a is now listed and hears the next one.
    assert a.getsockname() in server.clients
    b.sendto(b"second", server.address)
    assert recv(a) == ack(b.getsockname(), b"second")


def test_control_words_get_no_reply(server: ChatServerUdp, make_peer: MakePeer) -> None:
    a = make_peer()
    for word in (b"reg", b"^hb^", b"quit", b"reg\n", b" ^hb^ \r\n"):
        a.sendto(word, server.address)
    assert_silent(a)


def test_heartbeat_registers_and_refreshes(server: ChatServerUdp, make_peer: MakePeer) -> None:
    a, b = make_peer(), make_peer()
    a.sendto(b"^hb^", server.address)
    me = a.getsockname()
    assert wait_until(lambda: me in server.clients)
    first = server.clients[me]
    time.sleep(0.05)
    a.sendto(b"^hb^", server.address)
    assert wait_until(lambda: server.clients[me] > first)
    assert abs(server.clients[me] - time.time()) < 1.0
    b.sendto(b"x", server.address)
    assert recv(a) == ack(b.getsockname(), b"x")


def test_quit_removes_the_sender(server: ChatServerUdp, make_peer: MakePeer) -> None:
    a, b = make_peer(), make_peer()
    me = register(a, server)
    a.sendto(b"quit\n", server.address)
    assert wait_until(lambda: me not in server.clients)
    b.sendto(b"after quit", server.address)
    assert recv(b) == ack(b.getsockname(), b"after quit")
    assert_silent(a)


def test_empty_and_whitespace_datagrams_are_ignored(
    server: ChatServerUdp, make_peer: MakePeer
) -> None:
    a, b = make_peer(), make_peer()
    register(b, server)
    for blank in (b"", b" ", b"\n", b" \t\r\n\x0b\x0c"):
        a.sendto(blank, server.address)
    assert_silent(b)
    assert a.getsockname() not in server.clients
    assert wait_until(lambda: server.stats()["received"] == 5)


def test_nc_style_lines_are_stripped_like_the_tutorial(
    server: ChatServerUdp, make_peer: MakePeer
) -> None:
    a = make_peer()
    a.sendto(b"  123abc\n", server.address)
    assert recv(a) == ack(a.getsockname(), b"123abc")


def test_stop_sends_end_to_every_client_and_nothing_after(
    make_server: Callable[..., ChatServerUdp], make_peer: MakePeer
) -> None:
    server = make_server()
    peers = [make_peer() for _ in range(3)]
    for p in peers:
        register(p, server)
    server.stop()
    for p in peers:
        assert recv(p) == b"end"
    for p in peers:
        assert_silent(p, 0.1)
    server.stop()  # idempotent: no second `end`
    for p in peers:
        assert_silent(p, 0.1)


def test_non_utf8_and_nul_bytes_are_relayed_unchanged(
    server: ChatServerUdp, make_peer: MakePeer
) -> None:
    a = make_peer()
    payload = bytes(range(256)).strip()
    a.sendto(payload, server.address)
    assert recv(a) == ack(a.getsockname(), payload)
    a.sendto(b"\xff\xfe\xc3\x28", server.address)
    assert recv(a) == ack(a.getsockname(), b"\xff\xfe\xc3\x28")


def test_a_60000_byte_payload_is_relayed_intact(server: ChatServerUdp, make_peer: MakePeer) -> None:
    a, b = make_peer(), make_peer()
    register(b, server)
    payload = bytes((i * 7 + 1) % 251 + 1 for i in range(60_000)).replace(b"\n", b"n")
    payload = b"<" + payload[1:-1] + b">"
    a.sendto(payload, server.address)
    assert recv(b) == ack(a.getsockname(), payload)


def test_oversize_datagram_is_dropped_and_counted_never_cut(
    make_server: Callable[..., ChatServerUdp], make_peer: MakePeer
) -> None:
    server = make_server(max_datagram=1024)
    a, b = make_peer(), make_peer()
    register(b, server)
    a.sendto(b"x" * 1025, server.address)
    a.sendto(b"y" * 1024, server.address)
    # The first datagram relayed is the one that fitted: nothing was cut and sent.
    assert recv(b) == ack(a.getsockname(), b"y" * 1024)
    assert server.stats()["dropped_oversize"] == 1
    assert server.stats()["broadcasts"] == 1


def test_server_broadcast_comes_from_the_server_address(
    server: ChatServerUdp, make_peer: MakePeer
) -> None:
    a, b = make_peer(), make_peer()
    register(a, server)
    register(b, server)
    server.broadcast("from the server")
    server.broadcast(b"\x00bytes too")
    for p in (a, b):
        assert recv(p) == ack(server.address, b"from the server")
        assert recv(p) == ack(server.address, b"\x00bytes too")


def udp_no_ports() -> int:
    """The kernel's count of UDP datagrams that found no socket at their port (this network
    namespace, every process in it: it can only rise faster than a test makes it)."""
    with open("/proc/net/snmp") as f:
        names, values = (line.split() for line in f if line.startswith("Udp:"))
    return int(values[names.index("NoPorts")])


def test_sends_to_a_closed_client_port_do_not_disturb_the_broadcast(
    server: ChatServerUdp, make_peer: MakePeer
) -> None:
    # A registered client whose port has closed: the kernel answers the first broadcast to it
    # with ICMP port unreachable, which the server reads from its error queue (IP_RECVERR) and
    # drops it at once. Meanwhile that error is pending on the socket and fails its next send,
    # whichever client that is for: the send is retried, so nobody else loses a broadcast.
    a, b = make_peer(), make_peer()
    gone = socket.socket(type=socket.SOCK_DGRAM)
    gone.bind(("127.0.0.1", 0))
    register(gone, server)
    gone.close()
    register(b, server)
    no_ports = udp_no_ports()
    for i in range(20):
        a.sendto(b"m%d" % i, server.address)
        assert recv(b) == ack(a.getsockname(), b"m%d" % i)
    # The first message went to the closed port too (and to b, and to a, registered by it);
    # the other 19 only to a and b.
    assert wait_until(lambda: server.stats()["deliveries"] == 3 + 2 * 19), server.stats()
    assert udp_no_ports() - no_ports >= 1
    stats = server.stats()
    assert (stats["dropped_unreachable"], stats["send_errors"]) == (1, 0)
    assert set(server.clients) == {a.getsockname(), b.getsockname()}
    assert server.running


def test_stats_count_what_happened(server: ChatServerUdp, make_peer: MakePeer) -> None:
    a, b = make_peer(), make_peer()
    register(a, server)
    b.sendto(b"hi", server.address)
    recv(a)
    recv(b)
    assert wait_until(lambda: server.stats()["deliveries"] == 2)
    stats = server.stats()
    assert stats == {
        "received": 2,
        "broadcasts": 1,
        "deliveries": 2,
        "send_errors": 0,
        "dropped_oversize": 0,
        "dropped_over_cap": 0,
        "dropped_rate_limited": 0,
        "dropped_unvalidated": 0,
        "dropped_malformed": 0,
        "dropped_bad_source": 0,
        "dropped_loop": 0,
        "challenges": 0,
        "replies_limited": 0,
        "expired": 0,
        "dropped_unreachable": 0,
        "paused_unreachable": 0,
        "events_dropped": 0,
        "kernel_drops": 0,
        "clients": 2,
    }


@pytest.mark.skipif(not HAS_IPV6, reason="no IPv6 loopback here")
def test_ipv6_server_carries_the_ipv6_address(
    make_server: Callable[..., ChatServerUdp], make_peer: MakePeer
) -> None:
    server = make_server(ip="::1")
    assert server.address is not None and server.address[0] == "::1"
    a = make_peer(socket.AF_INET6)
    a.sendto(b"six", server.address)
    host, port = a.getsockname()[:2]
    assert recv(a) == b"ack: ::1 %d\nsix\n" % port
    assert (host, port) in server.clients
    server.stop()
    assert recv(a) == b"end"


def test_random_datagrams_leave_the_server_serving(
    make_server: Callable[..., ChatServerUdp], make_peer: MakePeer
) -> None:
    import random

    rng = random.Random(1234)
    server = make_server(max_datagram=4096)
    attacker, probe = make_peer(), make_peer()
    words = [b"reg", b"^hb^", b"quit", b"ack: ", b"end", b"\x00", b"\xff", b" ", b"\n"]
    for _ in range(300):
        size = rng.choice([0, 1, 4, 100, 4096, 4097, 9000])
        data = rng.choice(words) + rng.randbytes(size)
        attacker.sendto(data, server.address)
    # The flood may overflow the kernel's receive buffer, which drops datagrams (the probe too):
    # that is UDP. The probe is resent until answered, a bounded number of times.
    for _ in range(20):
        probe.sendto(b"probe", server.address)
        try:
            if recv(probe, 0.25) == ack(probe.getsockname(), b"probe"):
                break
        except TimeoutError:
            continue
    else:
        pytest.fail("probe not answered")
    assert server.running
    assert server.stats()["dropped_oversize"] > 0


def test_broadcasts_keep_the_order_messages_arrived_in(
    server: ChatServerUdp, make_peer: MakePeer
) -> None:
    # Small fan-outs go out from the receiving thread, large ones from the fan-out thread; the
    # order must hold across both. 40 clients x 200 messages crosses between them.
    listeners = [make_peer() for _ in range(40)]
    for p in listeners:
        p.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        register(p, server)
    sender = listeners[0]
    me = sender.getsockname()
    # Sent in one go and read only after: they must fit unread in the listeners' buffers and in
    # the server's, as granted here (a stock kernel holds 256 small datagrams in the server's).
    n = min(
        200,
        room(rcvbuf(sender), len(ack(me, b"199"))) * 3 // 4,
        room(default_rcvbuf(), len(b"199")) * 3 // 4,
    )
    assert n >= 100, n
    for i in range(n):
        sender.sendto(b"%d" % i, server.address)
    for p in (listeners[0], listeners[-1]):
        got = [recv(p) for _ in range(n)]
        assert got == [ack(me, b"%d" % i) for i in range(n)]
