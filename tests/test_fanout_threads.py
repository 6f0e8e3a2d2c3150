"""`fanout_threads`: the threads that share a large fan-out start with the server and end with
its stop; none is started per fan-out, and every client still gets every broadcast in order."""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Callable

import pytest
from conftest import ack, register_all, wait_until
from udpchat import ChatServerUdp

THREADS = 4
# More clients than one fan-out round sends alone (1,024 deliveries): every round is shared.
CLIENTS = 1_100
MESSAGES = 30


def thread_ids() -> set[int]:
    return {int(t) for t in os.listdir("/proc/self/task")}


def thread_name(tid: int) -> str | None:
    try:
        with open(f"/proc/self/task/{tid}/comm") as f:
            return f.read().strip()
    except FileNotFoundError:  # ended meanwhile
        return None


@pytest.fixture
def clients(many_sockets: Callable[[int], list[socket.socket]]) -> list[socket.socket]:
    return many_sockets(CLIENTS)


def test_fan_out_threads_start_with_the_server_and_end_with_its_stop() -> None:
    # Threads are told apart by id: those of earlier tests may still be ending meanwhile.
    before = thread_ids()
    server = ChatServerUdp("127.0.0.1", 0, fanout_threads=THREADS)
    server.start()
    try:
        started = thread_ids() - before
        # The receiver, the fan-out thread and its three helpers. A new thread names itself
        # once it runs: until then it shows its parent's name.
        helpers = [f"udpchat-srv-tx{i}" for i in range(2, THREADS + 1)]
        expected = sorted(["udpchat-srv-rx", "udpchat-srv-tx", *helpers])

        def names() -> list[str]:
            return sorted(str(thread_name(tid)) for tid in started)

        assert wait_until(lambda: names() == expected), names()
    finally:
        server.stop()
    assert not started & thread_ids()


def test_no_thread_is_started_per_fan_out_and_every_client_gets_every_message_in_order(
    clients: list[socket.socket],
) -> None:
    with ChatServerUdp(
        "127.0.0.1", 0, interval=60, fanout_threads=THREADS, max_per_ip=CLIENTS
    ) as server:
        assert server.address is not None
        register_all(server, clients)
        running = thread_ids()
        talker = clients[0]
        seen: set[int] = set()
        for i in range(MESSAGES):
            talker.sendto(b"message %d" % i, server.address)
            # Threads alive while the fan-out runs: a thread started for it shows up here.
            deadline = time.monotonic() + 2.0
            while server.stats()["deliveries"] < (i + 1) * CLIENTS and time.monotonic() < deadline:
                seen |= thread_ids()
        assert server.stats()["deliveries"] == MESSAGES * CLIENTS
        assert seen <= running, f"{len(seen - running)} threads started during fan-outs"
    me = talker.getsockname()
    expected = [ack(me, b"message %d" % i) for i in range(MESSAGES)]
    for sock in clients:
        sock.settimeout(2.0)
        got = [sock.recv(100) for _ in expected]
        assert got == expected
        assert sock.recv(100) == b"end"
