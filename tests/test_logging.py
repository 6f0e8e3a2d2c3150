"""Log records reach Python's logging under udpchat.* loggers."""

from __future__ import annotations

import logging
import socket
from collections.abc import Callable

import pytest
import udpchat
from conftest import Collect, recv, wait_until
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


def _join_drop_and_leave(make_peer: Callable[..., socket.socket]) -> None:
    """A server that logs a join and a leave (INFO) and a dropped datagram (WARNING)."""
    with ChatServerUdp(port=0, max_datagram=10) as server:
        a = make_peer()
        a.sendto(b"hello", server.address)
        recv(a)
        a.sendto(b"x" * 11, server.address)
        a.sendto(b"quit", server.address)
        me = a.getsockname()
        assert wait_until(
            lambda: server.stats()["dropped_oversize"] == 1 and me not in server.clients
        )
    # stop() has joined the server's threads: everything it logged has been handed over.


def _levels(handler: Collect) -> set[int]:
    return {r.levelno for r in handler.records if r.name.startswith("udpchat")}


def test_the_logger_level_is_applied_on_the_rust_side(
    udpchat_logger: tuple[logging.Logger, Collect], make_peer: Callable[..., socket.socket]
) -> None:
    logger, handler = udpchat_logger
    logger.setLevel(logging.WARNING)
    udpchat.reset_log_cache()
    _join_drop_and_leave(make_peer)
    # The warning comes through (the handler does see what is emitted); the joins and leaves
    # at INFO were never emitted.
    assert _levels(handler) == {logging.WARNING}, [r.getMessage() for r in handler.records]


def test_disabled_levels_emit_nothing(
    udpchat_logger: tuple[logging.Logger, Collect], make_peer: Callable[..., socket.socket]
) -> None:
    logger, handler = udpchat_logger
    logger.setLevel(logging.ERROR)
    udpchat.reset_log_cache()
    _join_drop_and_leave(make_peer)
    assert handler.records == []


def test_reset_log_cache_makes_a_new_level_count(
    udpchat_logger: tuple[logging.Logger, Collect], make_peer: Callable[..., socket.socket]
) -> None:
    logger, handler = udpchat_logger
    logger.setLevel(logging.ERROR)
    udpchat.reset_log_cache()
    _join_drop_and_leave(make_peer)  # the Rust side filters at ERROR
    assert handler.records == []
    logger.setLevel(logging.INFO)
    udpchat.reset_log_cache()
    _join_drop_and_leave(make_peer)
    assert _levels(handler) == {logging.INFO, logging.WARNING}


def test_each_kind_of_warning_has_its_own_once_a_second(
    udpchat_logger: tuple[logging.Logger, Collect], make_peer: Callable[..., socket.socket]
) -> None:
    # Three kinds, one right after the other: a flood of one kind must not hide the others.
    logger, handler = udpchat_logger
    logger.setLevel(logging.WARNING)
    udpchat.reset_log_cache()
    with ChatServerUdp(port=0, max_datagram=10, max_clients=1) as server:
        assert server.address is not None
        a, b = make_peer(), make_peer()
        a.sendto(b"reg", server.address)
        assert wait_until(lambda: len(server.clients) == 1)
        for _ in range(3):
            a.sendto(b"x" * 11, server.address)  # oversize
            a.sendto(b"end", server.address)  # a server's output: a loop
            b.sendto(b"reg", server.address)  # refused: max_clients
        assert wait_until(lambda: server.stats()["dropped_over_cap"] == 3)
    warnings = [r.getMessage() for r in handler.records if r.levelno == logging.WARNING]
    assert sum("more than 10 bytes" in w for w in warnings) == 1, warnings
    assert sum("server's output" in w for w in warnings) == 1, warnings
    assert sum("max_clients (1) reached" in w for w in warnings) == 1, warnings
