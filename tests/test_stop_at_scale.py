"""`stop()` at scale: `end` goes out to every client through batched `sendmmsg` calls within one
overall deadline (half a second), not one blocking send per client that may each wait for room
in the socket buffer. What a client costs at stop is measured here and printed."""

from __future__ import annotations

import socket
import time
from collections.abc import Callable

import pytest
from conftest import register_all, run_in_namespace, wait_until
from udpchat import ChatServerUdp

CLIENTS = 10_000
VALIDATED_CLIENTS = 2_000
# What stop() may take with 10,000 clients on a loaded 2-core machine (it takes tens of ms).
STOP_BOUND = 2.0
# The deadline for sending `end`, plus generous slack.
FULL_BUFFER_BOUND = 0.5 + 1.5


def validate_all(server: ChatServerUdp, socks: list[socket.socket]) -> None:
    """Validated mode's handshake from every socket, as ChatClientUdp does it, in bursts."""
    assert server.address is not None
    for start in range(0, len(socks), 200):
        burst = socks[start : start + 200]
        for sock in burst:
            sock.sendto(b"reg".ljust(64), server.address)
        for sock in burst:
            sock.settimeout(2.0)
            challenge = sock.recv(100).split()
            assert challenge[0] == b"challenge"
            sock.sendto(b"reg " + challenge[1].ljust(60), server.address)
        for sock in burst:
            assert sock.recv(100).startswith(b"welcome ")
    assert wait_until(lambda: len(server.clients) == len(socks))


def ended(socks: list[socket.socket], validate: bool) -> int:
    """How many sockets got `end` (with a token, in validated mode)."""
    count = 0
    for sock in socks:
        sock.setblocking(False)
        try:
            data = sock.recv(100)
        except BlockingIOError:
            continue
        count += data.startswith(b"end ") if validate else data == b"end"
    return count


def timed_stop(server: ChatServerUdp) -> float:
    t0 = time.perf_counter()
    server.stop()
    return time.perf_counter() - t0


@pytest.mark.timeout(180)
@pytest.mark.parametrize(("validate", "count"), [(False, CLIENTS), (True, VALIDATED_CLIENTS)])
def test_stop_sends_end_to_every_client_in_batches(
    many_sockets: Callable[[int], list[socket.socket]],
    figure: Callable[[str], None],
    validate: bool,
    count: int,
) -> None:
    idle = ChatServerUdp("127.0.0.1", 0, validate=validate)
    idle.start()
    idle_s = timed_stop(idle)
    server = ChatServerUdp("127.0.0.1", 0, interval=60, max_per_ip=count, validate=validate)
    server.start()
    try:
        socks = many_sockets(count)
        if validate:
            validate_all(server, socks)
        else:
            register_all(server, socks)
    finally:
        stop_s = timed_stop(server)
    got = ended(socks, validate)
    mode = "validated" if validate else "open"
    per_client_us = max(stop_s - idle_s, 0.0) / count * 1e6
    figure(
        f"stop() with {count:,} {mode} clients: {stop_s * 1e3:.1f} ms "
        f"({per_client_us:.2f} us a client over an idle stop's {idle_s * 1e3:.2f} ms); "
        f"end received by {got:,}"
    )
    assert got == count
    assert stop_s < STOP_BOUND


@pytest.mark.timeout(120)
def test_stop_is_bounded_when_the_socket_buffer_stays_full(
    user_namespaces: None, figure: Callable[[str], None]
) -> None:
    """In a namespace whose loopback drains at 8 kbit/s: the `end`s fill the server's socket
    buffer and it stays full. 0.1 waited up to 200 ms for each client past that point."""
    result = run_in_namespace("netns_wire.py", 100, "full-buffer")
    figure(
        f"stop() with {result['clients']} clients and a full socket buffer "
        f"({result['sndbuf']:,} bytes): {result['stop_s'] * 1e3:.0f} ms"
    )
    assert result["clients"] == result["wanted"]
    assert result["stop_s"] < FULL_BUFFER_BOUND
