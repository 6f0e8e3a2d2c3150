"""A message that fits `max_datagram` but whose broadcast, with its `ack:` line, would be longer
than UDP carries (65,507 bytes over IPv4) is refused once, at the receiver, and counted in
`dropped_oversize`, instead of failing at every client's send; `send()` and `broadcast()` of
one that can never be relayed raise ValueError saying the limit."""

from __future__ import annotations

import socket
import subprocess
import sys
from collections.abc import Callable

import pytest
import udpchat
from conftest import ack, assert_silent, recv, register, wait_until
from udpchat import ChatClientUdp, ChatServerUdp

MAX_BROADCAST = 65_507
# The shortest `ack:` line a server writes: "ack: ::2 1\n" and the final newline.
MAX_MESSAGE = MAX_BROADCAST - 12


def ack_line(sender: tuple[str, int]) -> int:
    return len(ack(sender, b"")) - 1


def test_a_message_whose_broadcast_would_be_too_long_is_dropped_once_and_counted(
    server: ChatServerUdp, make_peer: Callable[..., socket.socket]
) -> None:
    assert server.address is not None
    talker, listener = make_peer(), make_peer()
    register(listener, server)
    me = talker.getsockname()
    fits = MAX_BROADCAST - ack_line(me) - 1
    talker.sendto(b"x" * (fits + 1), server.address)  # under max_datagram, over with its ack
    assert_silent(listener)
    assert_silent(talker)
    stats = server.stats()
    assert stats["dropped_oversize"] == 1
    assert stats["send_errors"] == 0
    assert stats["broadcasts"] == 0
    talker.sendto(b"y" * fits, server.address)  # exactly 65,507 with its ack: relayed
    got = recv(listener)
    assert got == ack(me, b"y" * fits)
    assert len(got) == MAX_BROADCAST


def test_send_refuses_a_message_no_server_could_relay_and_says_the_limit(
    server: ChatServerUdp, make_client: Callable[..., ChatClientUdp]
) -> None:
    assert server.address is not None
    client = make_client(server.address, interval=30)
    with pytest.raises(ValueError, match=f"at most {MAX_MESSAGE} bytes"):
        client.send(b"x" * (MAX_MESSAGE + 1))
    with pytest.raises(ValueError, match=f"at most {MAX_MESSAGE} bytes"):
        client.send("é" * (MAX_MESSAGE // 2 + 1))  # counted in UTF-8 bytes
    # Whitespace the server strips does not count; what is left can be sent.
    client.send(b"\n" + b"x" * MAX_MESSAGE + b" \n")
    client.send(b"x" * 100)
    msg = client.recv(timeout=2.0)
    assert msg is not None and msg.payload == b"x" * 100


def test_the_limit_is_exported() -> None:
    assert udpchat.MAX_MESSAGE == MAX_MESSAGE


def test_broadcast_refuses_a_payload_too_long_for_its_ack_line(
    server: ChatServerUdp, make_peer: Callable[..., socket.socket]
) -> None:
    assert server.address is not None
    peer = make_peer()
    register(peer, server)
    fits = MAX_BROADCAST - ack_line(server.address) - 1
    with pytest.raises(ValueError, match=f"at most {MAX_BROADCAST} bytes"):
        server.broadcast(b"z" * (fits + 1))
    assert_silent(peer)
    assert server.stats()["send_errors"] == 0
    server.broadcast(b"z" * fits)
    assert len(recv(peer)) == MAX_BROADCAST


def test_chat_says_a_line_is_too_long_and_goes_on(server: ChatServerUdp) -> None:
    """`udpchat chat`: a line no server could relay is refused with the limit, and the lines
    after it are still sent."""
    assert server.address is not None
    lines = "x" * (MAX_MESSAGE + 1) + "\nhello\n"
    out = subprocess.run(
        [sys.executable, "-m", "udpchat", "chat", "--port", str(server.address[1])],
        input=lines,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.returncode == 0, out.stderr
    assert f"at most {MAX_MESSAGE} bytes" in out.stderr
    assert wait_until(lambda: server.stats()["broadcasts"] == 1)  # hello
