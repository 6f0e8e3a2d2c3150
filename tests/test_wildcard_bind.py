"""A server bound to a wildcard address (`0.0.0.0`, `::`) on a host with several addresses
answers each client from the address that client sent to: a client's connected socket (as
`ChatClientUdp`'s, or `nc -u`'s) discards a datagram from any other address of the host.
127.0.0.0/8 gives every host many IPv4 addresses; two IPv6 ones need a namespace."""

from __future__ import annotations

import socket
from collections.abc import Callable

import pytest
from conftest import TIMEOUT, Addr, run_in_namespace, wait_until
from udpchat import ChatClientUdp, ChatServerUdp


def connected(server: ChatServerUdp, target: str) -> socket.socket:
    """A plain socket connected to `target` and the server's port, registered."""
    assert server.address is not None
    family = socket.AF_INET6 if ":" in target else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_DGRAM)
    sock.connect((target, server.address[1]))
    sock.settimeout(TIMEOUT)
    sock.send(b"reg")
    return sock


def wait_registered(server: ChatServerUdp, count: int) -> None:
    assert wait_until(lambda: len(server.clients) == count), server.clients


def ends(client: ChatClientUdp) -> bool:
    """True once the client has closed on the server's `end` (it stops on nothing else)."""
    return wait_until(lambda: not client.running)


@pytest.mark.parametrize(
    ("bind", "target"),
    [
        ("0.0.0.0", "127.0.0.2"),
        ("::", "::1"),
        ("::", "127.0.0.2"),  # an IPv4 client of a dual-stack server: it sees ::ffff:127.0.0.1
        ("::", "::ffff:127.0.0.2"),  # an IPv6 client socket through a v4-mapped address
    ],
)
def test_a_chat_client_of_a_wildcard_server_hears_its_broadcasts_and_end(
    make_server: Callable[..., ChatServerUdp],
    make_client: Callable[..., ChatClientUdp],
    bind: str,
    target: str,
) -> None:
    server = make_server(ip=bind)
    assert server.address is not None
    client = make_client((target, server.address[1]), interval=30)
    wait_registered(server, 1)
    client.send("hello")
    msg = client.recv(timeout=TIMEOUT)
    assert msg is not None, "the broadcast never reached the client"
    assert msg.text == "hello"
    assert msg.sender in server.clients
    server.broadcast("from the server")
    msg = client.recv(timeout=TIMEOUT)
    assert msg is not None and msg.text == "from the server"
    server.stop()
    assert ends(client), "the client never got `end`"


def test_each_client_gets_every_datagram_from_the_address_it_sent_to(
    make_server: Callable[..., ChatServerUdp],
) -> None:
    server = make_server(ip="0.0.0.0")
    assert server.address is not None
    port = server.address[1]
    targets = ["127.0.0.1", "127.0.0.2", "127.0.0.3"]
    socks = [connected(server, t) for t in targets]
    wait_registered(server, len(socks))
    socks[1].send(b"hi")
    for sock, target in zip(socks, targets, strict=True):
        data, source = sock.recvfrom(70_000)
        assert data.endswith(b"\nhi\n")
        assert source[0] == target
    server.stop()
    for sock, target in zip(socks, targets, strict=True):
        assert sock.recvfrom(100) == (b"end", (target, port))
        sock.close()


def test_a_client_that_moves_to_another_address_is_answered_from_the_new_one(
    make_server: Callable[..., ChatServerUdp], make_peer: Callable[..., socket.socket]
) -> None:
    """An unconnected socket (the tutorial's client) that sends to 127.0.0.2, then to
    127.0.0.3, is answered from each in turn, and stays one client."""
    server = make_server(ip="0.0.0.0")
    assert server.address is not None
    peer = make_peer()
    port = server.address[1]
    for target in ["127.0.0.2", "127.0.0.3"]:
        peer.sendto(b"here", (target, port))
        data, source = peer.recvfrom(70_000)
        assert data.endswith(b"\nhere\n")
        assert source == (target, port)
    assert list(server.clients) == [peer.getsockname()]


def test_a_validated_client_of_a_wildcard_server_is_challenged_and_welcomed_from_its_address(
    make_server: Callable[..., ChatServerUdp], make_client: Callable[..., ChatClientUdp]
) -> None:
    server = make_server(ip="0.0.0.0", validate=True)
    assert server.address is not None
    client = make_client(("127.0.0.2", server.address[1]), interval=30)
    assert wait_until(lambda: client.validated), "no challenge or welcome reached the client"
    client.send("hello")
    msg = client.recv(timeout=TIMEOUT)
    assert msg is not None and msg.text == "hello"
    server.stop()
    assert ends(client)


def test_a_server_on_ipv6_wildcard_answers_from_the_second_address(
    user_namespaces: None, figure: Callable[[str], None]
) -> None:
    """A host with fd00::1 and fd00::2: a client on fd00::1 talks to fd00::2. Asked for a
    source, the kernel picks fd00::1 (the destination itself), which the client discards."""
    result = run_in_namespace("netns_wire.py", 60, "two-addresses")
    figure(f"IPv6 wildcard bind, client on fd00::1 to fd00::2: {result}")
    assert result["registered"]
    assert result["ack"] is not None, "the broadcast never reached the client"
    ack: list[str] = result["ack"]
    assert ack[0].endswith("\nhello\n") and ack[1] == "fd00::2"
    assert result["end"] == ["end", "fd00::2"]


def test_a_specific_bind_still_answers_from_its_address(
    make_server: Callable[..., ChatServerUdp],
) -> None:
    server = make_server(ip="127.0.0.1")
    sock = connected(server, "127.0.0.1")
    me: Addr = sock.getsockname()
    assert wait_until(lambda: me in server.clients)
    sock.send(b"x")
    assert sock.recvfrom(100)[1] == server.address
    sock.close()
