"""One forged datagram must not start a loop (the Loop DoS class, CVE-2024-2169): between a
server and itself, or between two servers of either mode; and the replies a validated server
sends without relaying are rate-limited without refusing a real burst of clients."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import pytest
from conftest import run_in_namespace, wait_until
from udpchat import ChatClientUdp, ChatServerUdp

# The reply limit the README states per address (challenges and welcomes): a burst of 4, then one
# every 2 seconds. The total limit is tested in the Rust unit tests.
REPLY_BURST, REPLIES_PER_SECOND = 4, 0.5
# Fewer than this many datagrams from the other server after a forged trigger: no loop.
NO_LOOP = 10


@pytest.fixture(scope="module")
def loops(user_namespaces: None) -> dict[str, Any]:
    """Runs tests/netns_loops.py in a network namespace of its own, once."""
    return run_in_namespace("netns_loops.py", timeout=120)


def test_a_datagram_forged_from_the_servers_own_address_starts_nothing(
    loops: dict[str, Any], figure: Callable[[str], None]
) -> None:
    cases = loops["self"]
    assert len(cases) == 10  # five triggers, both modes
    received = [
        f"{c['trigger']}/{'validated' if c['validate'] else 'open'} {c['received'][0]}"
        for c in cases
    ]
    figure(f"forged from the server's own address, datagrams received: {', '.join(received)}")
    for case in cases:
        assert not case["registered_itself"], case
        assert case["received"] == [1], case  # the forgery itself, nothing after it
        assert case["still_going"] == [0], case
        assert case["copies"] == [0], case  # dropped, so not even relayed once
        assert case["dropped_loop"] == 1, case


def test_no_pairing_of_two_servers_loops_on_any_forged_datagram(
    loops: dict[str, Any], figure: Callable[[str], None]
) -> None:
    cases = loops["pairings"]
    assert len(cases) == 4 * 5 * 3  # pairings x triggers x directions
    most = max(max(c["received"]) for c in cases)
    figure(f"two servers, 60 forged triggers: at most {most} datagrams received by either")
    for case in cases:
        forged_to = {"b to a": [1, 0], "a to b": [0, 1], "both ways": [1, 1]}[case["direction"]]
        from_the_other = [r - f for r, f in zip(case["received"], forged_to, strict=True)]
        assert all(n < NO_LOOP for n in from_the_other), case
        assert case["still_going"] == [0, 0], case  # traffic stopped within a second
        assert all(c <= 1 for c in case["copies"]), case  # at most the trigger's own relay


def test_a_wildcard_server_refuses_a_reg_forged_from_any_local_address_with_its_port(
    loops: dict[str, Any],
) -> None:
    result = loops["wildcard"]
    assert result["registered"] == [result["client"]]
    assert result["dropped_loop"] == len(result["forged"]) == 3


def test_a_flood_of_forged_regs_gets_challenges_at_no_more_than_the_limit(
    loops: dict[str, Any], figure: Callable[[str], None]
) -> None:
    result = loops["reply_flood"]
    figure(
        f"reply flood from one forged address: {result['received']} padded regs read in "
        f"{result['seconds']:.2f} s, {result['challenges']} challenges, "
        f"{result['replies_limited']} refused by the reply limit"
    )
    limit = REPLY_BURST + REPLIES_PER_SECOND * result["seconds"]
    assert result["received"] > limit  # the limit was reached
    assert result["challenges"] <= limit
    assert result["replies_limited"] == result["received"] - result["challenges"]


@pytest.mark.timeout(120)
def test_a_thousand_clients_behind_one_address_all_validate_at_once(
    make_server: Callable[..., ChatServerUdp], figure: Callable[[str], None]
) -> None:
    # As behind a NAT: one IP, 1,000 clients starting together. The reply limit must not refuse
    # them; a stock-sized socket buffer may drop some `reg`s, which the clients' heartbeats send
    # again.
    server = make_server(validate=True)
    clients = [ChatClientUdp(*server.address, interval=0.5) for _ in range(1000)]
    try:
        t0 = time.monotonic()
        for client in clients:
            client.start()
        validated = wait_until(lambda: all(c.validated for c in clients), timeout=5, step=0.05)
        took = time.monotonic() - t0
        figure(f"1,000 validated clients from one IP: all validated after {took:.2f} s")
        assert validated, sum(c.validated for c in clients)
        assert wait_until(lambda: len(server.clients) == 1000)
        assert server.stats()["replies_limited"] == 0
    finally:
        for client in clients:
            client.stop()
