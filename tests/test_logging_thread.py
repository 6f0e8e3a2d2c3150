"""Logging never reaches into a call or a core thread: records go to Python from one logging
thread, so a failing handler cannot change what a call returns, a busy Python program cannot
stall the server through its log, and levels set by the application take effect by themselves."""

from __future__ import annotations

import logging
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
import udpchat
from conftest import Collect, register, wait_until
from udpchat import ChatClientUdp, ChatServerUdp


@pytest.fixture
def logger(
    udpchat_logger: tuple[logging.Logger, Collect],
) -> tuple[logging.Logger, Collect]:
    """The `udpchat` logger at INFO with a handler of its own; restored after."""
    udpchat_logger[0].setLevel(logging.INFO)
    udpchat.reset_log_cache()
    return udpchat_logger


class Interrupting(logging.Filter):
    """A filter that raises, as a Ctrl-C landing inside a handler does."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def filter(self, record: logging.LogRecord) -> bool:
        self.calls += 1
        raise KeyboardInterrupt


def test_a_raising_log_handler_never_changes_the_outcome_of_a_call(
    logger: tuple[logging.Logger, Collect], monkeypatch: pytest.MonkeyPatch
) -> None:
    _, handler = logger
    interrupting = Interrupting()
    handler.addFilter(interrupting)
    reported: list[Any] = []
    monkeypatch.setattr(sys, "unraisablehook", reported.append)
    try:
        for _ in range(100):
            server = ChatServerUdp(port=0)
            server.start()  # logs "serving on ..." at INFO
            assert server.running and server.address is not None
            client = ChatClientUdp(*server.address)
            client.start()
            assert client.running
            client.stop()  # logs "... stopped"
            server.stop()  # logs "stopped serving ..."
            assert not client.running and not server.running
    finally:
        handler.removeFilter(interrupting)
    assert interrupting.calls >= 100  # the records did reach the raising filter...
    assert reported  # ...and what it raised was reported, not lost


def test_levels_set_by_the_application_take_effect_without_its_help(
    logger: tuple[logging.Logger, Collect], make_peer: Callable[..., socket.socket]
) -> None:
    log, handler = logger
    log.setLevel(logging.WARNING)
    with ChatServerUdp(port=0) as server:
        quiet = make_peer()
        register(quiet, server)
        log.setLevel(logging.INFO)  # no reset_log_cache(): read again within a fraction of 1 s
        time.sleep(0.5)
        loud = make_peer()
        me = register(loud, server)
        assert wait_until(lambda: any(r.getMessage() == "{}:{} joined".format(*me)
                                      for r in handler.records))  # fmt: skip
    joined = [r.getMessage() for r in handler.records if r.getMessage().endswith("joined")]
    assert joined == ["{}:{} joined".format(*me)]


CHURN = r"""
import socket, sys, time
server = (sys.argv[1], int(sys.argv[2]))
me = socket.socket(type=socket.SOCK_DGRAM)
me.bind(("127.0.0.1", 0))
me.settimeout(20)
me.sendto(b"reg", server)
time.sleep(0.2)
for i in range(20):  # 20 joins and leaves, each a log record at INFO
    s = socket.socket(type=socket.SOCK_DGRAM)
    s.bind(("127.0.0.1", 0))
    s.sendto(b"reg", server)
    s.sendto(b"quit", server)
    s.close()
t0 = time.perf_counter()
me.sendto(b"probe", server)
while not me.recv(70000).endswith(b"\nprobe\n"):
    pass
print((time.perf_counter() - t0) * 1000)
"""


class Slow(logging.Handler):
    """A handler that takes 100 ms a record, as a busy Python program or a slow sink does."""

    def emit(self, record: logging.LogRecord) -> None:
        time.sleep(0.1)


@pytest.mark.timeout(60)
def test_a_slow_log_handler_does_not_slow_the_relay(
    logger: tuple[logging.Logger, Collect], figure: Callable[[str], None]
) -> None:
    log, _ = logger
    slow = Slow()
    log.addHandler(slow)
    try:
        with ChatServerUdp(port=0) as server:
            assert server.address is not None
            churn = subprocess.Popen(
                [sys.executable, "-c", CHURN, *map(str, server.address)],
                stdout=subprocess.PIPE,
                text=True,
            )
            out, _ = churn.communicate(timeout=30)
    finally:
        log.removeHandler(slow)
    relayed_ms = float(out)
    figure(f"20 joins and leaves, 100 ms a log record: next message relayed in {relayed_ms:.1f} ms")
    # 0.1 logged from the receiving thread, which waited for each record: 40 of them, 4 s. The
    # bound leaves a loaded 2-core machine plenty of room.
    assert relayed_ms < 250


def test_a_handler_may_stop_the_server_it_hears_from(
    logger: tuple[logging.Logger, Collect],
    make_peer: Callable[..., socket.socket],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Handlers run on udpchat's logging thread, never on a thread stop() must join.
    _, handler = logger
    server = ChatServerUdp(port=0)
    peer = make_peer()
    joined = "{}:{} joined".format(*peer.getsockname())
    stopped = threading.Event()

    class StopOnJoin(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            if record.getMessage() == joined:
                server.stop()
                stopped.set()
            return True

    reported: list[Any] = []
    monkeypatch.setattr(sys, "unraisablehook", reported.append)
    handler.addFilter(StopOnJoin())
    with server:
        assert server.address is not None
        peer.sendto(b"reg", server.address)
        assert stopped.wait(5)
        assert not server.running
    assert reported == []
    assert any(r.getMessage().startswith("stopped serving") for r in handler.records)
