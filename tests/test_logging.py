"""Log records reach Python's logging under udpchat.* loggers."""

from __future__ import annotations

import logging
import socket
from collections.abc import Callable

import pytest
import udpchat
from conftest import recv, wait_until
from udpchat import ChatClientUdp, ChatServerUdp


def test_joins_leaves_and_drops_are_logged(
    caplog: pytest.LogCaptureFixture, make_peer: Callable[..., socket.socket]
) -> None:
    caplog.set_level(logging.INFO, logger="udpchat")
    udpchat.reset_log_cache()  # the levels are cached on the Rust side
    with ChatServerUdp(port=0, max_datagram=10) as server:
        a = make_peer()
        a.sendto(b"hello", server.address)
        recv(a)
        a.sendto(b"x" * 11, server.address)
        a.sendto(b"quit", server.address)
        me = "{}:{}".format(*a.getsockname())
        assert wait_until(lambda: any("left" in r.getMessage() for r in caplog.records))
    records = [(r.name, r.levelno, r.getMessage()) for r in caplog.records]
    assert ("udpchat.server", logging.INFO, f"{me} joined") in records
    assert ("udpchat.server", logging.INFO, f"{me} left") in records
    assert (
        "udpchat.server",
        logging.WARNING,
        f"dropped a datagram from {me}: more than 10 bytes",
    ) in records
    assert any(
        name == "udpchat.server" and msg.startswith("stopped serving") for name, _, msg in records
    )


def test_expiry_and_client_lifecycle_are_logged(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="udpchat")
    udpchat.reset_log_cache()
    with (
        ChatServerUdp(port=0, interval=0.1) as server,
        ChatClientUdp(*server.address, interval=10) as client,
    ):
        me = "{}:{}".format(*client.address)
        assert wait_until(lambda: client.address in server.clients)
        # `clients` leaves it out at once; the sweep that logs it follows within 25 ms.
        assert wait_until(lambda: server.stats()["expired"] == 1, timeout=2)
    messages = [(r.name, r.getMessage()) for r in caplog.records]
    assert ("udpchat.server", f"{me} expired after 100ms of silence") in messages
    assert any(name == "udpchat.client" and msg == f"{me} stopped" for name, msg in messages)


def test_disabled_levels_emit_nothing(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.ERROR, logger="udpchat")
    udpchat.reset_log_cache()
    with ChatServerUdp(port=0):
        pass
    assert [r for r in caplog.records if r.name.startswith("udpchat")] == []
