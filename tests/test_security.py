"""Validated mode, limits and hostile input: amplification, spoofing, caps, rate limits, junk."""

from __future__ import annotations

import random
import resource
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import pytest
from conftest import (
    ack,
    assert_silent,
    default_rcvbuf,
    granted_for,
    recv,
    room,
    run_in_namespace,
    wait_until,
)
from udpchat import ChatClientUdp, ChatServerUdp

MakePeer = Callable[..., socket.socket]
MakeClient = Callable[..., ChatClientUdp]
MakeServer = Callable[..., ChatServerUdp]


@pytest.fixture(scope="module")
def attacks(user_namespaces: None) -> dict[str, Any]:
    """Runs tests/netns_attacks.py in a network namespace of its own, once. Skips where user
    namespaces are refused, except in CI, where that fails (see conftest.py)."""
    return run_in_namespace("netns_attacks.py", timeout=60)


def test_forged_reg_amplification(attacks: dict[str, Any], figure: Callable[[str], None]) -> None:
    open_, padded, validated = attacks["open"], attacks["open_padded"], attacks["validated"]
    figure(
        f"amplification of a forged reg, 100 messages: open mode {open_['factor']:.0f}x "
        f"({open_['victim_bytes']} bytes for a {open_['forged_bytes']}-byte reg; "
        f"{padded['factor']:.0f}x for a padded one), validated mode {validated['factor']:.2f}x "
        f"({validated['victim_datagrams']} datagram, {validated['victim_bytes']} bytes)"
    )
    # Open mode is the tutorial's protocol: the victim gets every broadcast.
    assert open_["victim_datagrams"] == 100
    # Validated mode: at most one challenge, never more bytes than were forged.
    assert validated["challenges"] <= 1
    assert validated["victim_datagrams"] <= 1
    assert validated["victim_bytes"] <= validated["forged_bytes"]


def test_forged_heartbeat_and_quit_change_nothing(attacks: dict[str, Any]) -> None:
    result = attacks["forged_control"]
    assert result["witness_relayed"]  # every forgery was read before the checks
    assert result["client_registered"]
    assert not result["client_left"]  # not even for a moment
    assert result["client_still_served"]
    assert not result["stranger_registered"]
    # A guessed token is unvalidated; a bare `quit` or `^hb^` is not even tokened.
    assert result["dropped_unvalidated"] == 2
    assert result["dropped_malformed"] == 5


def test_forged_sources_are_never_registered(attacks: dict[str, Any]) -> None:
    result = attacks["bad_sources"]
    # Only the listener and the talker: nothing from port 0, broadcast or multicast (the kernel
    # drops some of those itself; udpchat drops and counts the rest).
    assert len(result["registered"]) == 2
    assert all(port != 0 for _, port in result["registered"])
    assert result["listener_got_all"]
    assert result["dropped_bad_source"] >= 2


def test_validated_clients_chat_and_lose_nothing_to_the_handshake(
    make_server: MakeServer, make_client: MakeClient
) -> None:
    server = make_server(validate=True)
    assert server.validate
    alice = make_client(server.address, interval=0.2)
    # Sent before the handshake is done: the server drops it, the client sends it again.
    alice.send("first")
    msg = alice.recv(2)
    assert msg is not None and msg.text == "first" and msg.sender == alice.address
    assert alice.validated
    bob = make_client(server.address, interval=0.2)
    assert wait_until(lambda: bob.validated and bob.address in server.clients)
    bob.send(b"\xffhi")
    for client in (alice, bob):
        got = client.recv(2)
        assert got is not None and got.raw == ack(bob.address, b"\xffhi")
    assert server.stats()["challenges"] >= 2
    assert alice.last_heard is not None and abs(alice.last_heard - time.time()) < 5
    server.stop()
    assert alice.recv(2) is None and not alice.running  # the keyed `end`


def test_a_validated_client_registers_again_with_a_restarted_server(
    make_client: MakeClient,
) -> None:
    # The first server runs in a process of its own, so it can die without a word (SIGKILL).
    first = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import time\n"
            "from udpchat import ChatServerUdp\n"
            "s = ChatServerUdp(port=0, validate=True, interval=1.0)\n"
            "s.start()\n"
            "print('%s %d' % s.address, flush=True)\n"
            "time.sleep(60)\n",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert first.stdout is not None
        ip, port = first.stdout.readline().split()
        address = (ip, int(port))
        client = make_client(address, interval=0.1)
        assert wait_until(lambda: client.validated)
    finally:
        first.kill()
        first.wait(5)
    assert client.running  # no `end` came: it heartbeats on, with a token nobody knows now
    again = ChatServerUdp(*address, validate=True, interval=1.0)
    again.start()
    try:
        # A new secret: the stale token is refused and challenged, and the client earns a new one.
        assert wait_until(lambda: client.address in again.clients)
        assert again.stats()["dropped_unvalidated"] >= 1
        client.send("back")
        got = client.recv(2)
        assert got is not None and got.text == "back"
    finally:
        again.stop()


def test_an_unvalidated_message_is_never_relayed(
    make_server: MakeServer,
    make_client: MakeClient,
    make_peer: MakePeer,
    figure: Callable[[str], None],
) -> None:
    server = make_server(validate=True)
    clients = [make_client(server.address, interval=1) for _ in range(50)]
    assert wait_until(lambda: len(server.clients) == 50, timeout=5)
    before = server.stats()["deliveries"]
    stranger = make_peer()
    for payload in (b"hello everyone", b"x" * 100, b"0" * 32 + b" forged token message"):
        stranger.sendto(payload, server.address)
    # All three read and refused (however long a loaded machine takes to get to them)...
    assert wait_until(
        lambda: server.stats()["dropped_unvalidated"] + server.stats()["dropped_malformed"] >= 3
    )
    assert server.stats()["dropped_unvalidated"] == 1  # the token-shaped one
    assert server.stats()["dropped_malformed"] == 2
    # ...and none relayed: a validated message sent after them is the first thing every client
    # hears (broadcasts keep the order their messages arrived in).
    clients[0].send("after the stranger")
    for c in clients:
        got = c.recv(5)
        assert got is not None and got.text == "after the stranger", got
    copies = server.stats()["deliveries"] - before - len(clients)
    figure(f"copies sent per unvalidated datagram (50 validated clients): {copies / 3:.0f}")
    assert copies == 0
    # Only a challenge went back, to the stale-token-shaped one: a validated server answers
    # nothing else that is not a handshake step or a heartbeat (no loop with a chatty service).
    assert recv(stranger).startswith(b"challenge ")
    assert_silent(stranger)


def test_caps_stop_registrations_and_disturb_nobody(make_server: MakeServer) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < 2000:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, 4096), hard))
    server = make_server(max_clients=250, max_per_ip=100)
    socks = []
    try:
        for ip in ("127.0.0.1", "127.0.0.2", "127.0.0.3"):
            for _ in range(1000 if ip == "127.0.0.1" else 100):
                s = socket.socket(type=socket.SOCK_DGRAM)
                s.bind((ip, 0))
                socks.append(s)
        # One IP tries 1,000 ports, two more 100 each: 1,200 registrations, in bursts that fit
        # in the server's receive buffer (a quarter of what it holds), each read before the next.
        burst = room(default_rcvbuf(), len(b"reg")) // 4
        for first in range(0, len(socks), burst):
            for s in socks[first : first + burst]:
                s.sendto(b"reg", server.address)
            sent = min(first + burst, len(socks))
            assert wait_until(lambda sent=sent: server.stats()["received"] == sent, timeout=5)
        stats = server.stats()
        per_ip: dict[str, int] = {}
        for ip, _ in server.clients:
            per_ip[ip] = per_ip.get(ip, 0) + 1
        assert per_ip["127.0.0.1"] == 100
        assert stats["clients"] == 250  # max_clients
        assert stats["dropped_over_cap"] == 1200 - 250
        # Those registered are still served; a message from a refused one is not relayed.
        refused = next(s for s in socks if s.getsockname() not in server.clients)
        refused.sendto(b"let me in", server.address)
        member = next(s for s in socks if s.getsockname() in server.clients)
        member.sendto(b"still here", server.address)
        member.settimeout(2)
        assert member.recv(100) == ack(member.getsockname(), b"still here")
        assert server.stats()["broadcasts"] == 1
    finally:
        for s in socks:
            s.close()


def test_rate_limit_drops_the_excess_per_source(
    make_server: MakeServer, make_peer: MakePeer
) -> None:
    rcvbuf = 1 << 20
    server = make_server(rate_limit=50, rcvbuf=rcvbuf)
    # One burst, sent faster than the server reads it: it must fit in the buffer the server was
    # granted (a stock kernel caps it at 425,984 bytes, 512 small datagrams): up to 3/4 of that.
    burst = min(500, room(granted_for(rcvbuf), len(b"^hb^")) * 3 // 4)
    assert burst >= 200, burst
    flooder, other = make_peer(), make_peer()
    other.close()
    other = socket.socket(type=socket.SOCK_DGRAM)
    other.bind(("127.0.0.2", 0))  # the limit is per source IP
    other.settimeout(2)
    for _ in range(burst):
        flooder.sendto(b"^hb^", server.address)
    assert wait_until(lambda: server.stats()["received"] == burst), server.stats()
    passed = burst - server.stats()["dropped_rate_limited"]
    assert 50 <= passed <= 100, passed  # a burst of 50, then 50 a second
    other.sendto(b"unaffected", server.address)
    assert recv(other) == ack(other.getsockname(), b"unaffected")
    other.close()


def test_bad_options_raise_value_error() -> None:
    for kwargs in (
        {"max_clients": 0},
        {"max_per_ip": 0},
        {"rate_limit": 0},
        {"rate_limit": float("nan")},
        {"rcvbuf": 10},
        {"fanout_threads": 0},
    ):
        with pytest.raises(ValueError):
            ChatServerUdp(**kwargs)  # type: ignore[arg-type]


@pytest.mark.parametrize("validate", [False, True])
def test_100000_random_datagrams_leave_the_server_serving(
    make_server: MakeServer, make_peer: MakePeer, figure: Callable[[str], None], validate: bool
) -> None:
    rng = random.Random(20261125)
    server = make_server(validate=validate, rcvbuf=4 << 20)
    attacker = make_peer()
    prefixes = [
        b"",
        b"reg",
        b"reg ",
        b"^hb^",
        b"quit",
        b"ack: ",
        b"end",
        b"\x00",
        b"\xff\xfe",
        b" \n",
    ]
    prefixes.append(b"0123456789abcdef0123456789abcdef ")  # shaped like a token
    # The server must read them, not the kernel drop them: they go out in bursts that fit in
    # the buffer the server was granted (a stock kernel caps the 4 MiB asked at 425,984 bytes),
    # each read before the next. A datagram is charged what the kernel charges the largest of
    # its size class.
    granted = granted_for(4 << 20)
    classes = [(size, granted / room(granted, size)) for size in (233, 9033, 65507)]

    def read_or_dropped() -> int:
        stats = server.stats()
        return stats["received"] + stats["kernel_drops"]

    sent = 0
    charged = 0.0
    for _ in range(100_000):
        r = rng.random()
        size = (
            rng.randrange(0, 200)
            if r < 0.9
            else rng.randrange(0, 9000)
            if r < 0.99
            else rng.randrange(0, 65508)
        )
        data = (rng.choice(prefixes) + rng.randbytes(size))[:65507]
        charge = next(c for limit, c in classes if len(data) <= limit)
        if charged + charge > granted / 2:
            assert wait_until(lambda n=sent: read_or_dropped() >= n, timeout=10, step=0.0005)
            charged = 0.0
        attacker.sendto(data, server.address)
        sent += 1
        charged += charge
    assert wait_until(lambda: read_or_dropped() >= sent, timeout=30)
    with ChatClientUdp(*server.address, interval=0.2) as client:
        client.send("probe")
        got = None
        deadline = time.monotonic() + 5
        while got is None and time.monotonic() < deadline:
            msg = client.recv(0.5)
            if msg is not None and msg.text == "probe":
                got = msg
        assert got is not None
    assert server.running
    stats = server.stats()
    figure(
        f"100,000 random datagrams, validate={validate}: {stats['received']:,} read, "
        f"{stats['kernel_drops']:,} dropped by the kernel"
    )
    assert stats["received"] > 90_000
