"""After os.fork(): an object started in the parent belongs to the parent. In the child it is
not running, its stop() does nothing (no `quit` or `end` through the parent's socket), and any
other use raises RuntimeError; the child can start objects of its own, logging included."""

from __future__ import annotations

import logging
import socket
import sys
from collections.abc import Callable

import pytest
from conftest import assert_silent, in_forked_child, register, wait_until
from udpchat import ChatClientUdp, ChatServerUdp


def _in_child(server: ChatServerUdp, client: ChatClientUdp) -> None:
    """What the child checks; any failure is an AssertionError."""
    assert not server.running and not client.running
    assert server.address is None and client.address is None
    calls: list[Callable[[], object]] = [
        lambda: server.broadcast("from the child"),
        lambda: server.clients,
        server.stats,
        lambda: client.send("from the child"),
        lambda: client.recv(0),
        lambda: client.recv_many(timeout=0),
        lambda: next(iter(client)),
        lambda: client.dropped,
    ]
    for call in calls:
        with pytest.raises(RuntimeError, match="parent process"):
            call()
    client.stop()  # nothing on the wire: the parent checks
    server.stop()
    assert not server.running and not client.running
    # The child's own objects work, and log (the child starts a logging thread of its own).
    seen: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: seen.append(record.getMessage())  # type: ignore[method-assign]
    logging.getLogger("udpchat").addHandler(handler)
    logging.getLogger("udpchat").setLevel(logging.INFO)
    with ChatServerUdp(port=0) as own, ChatClientUdp(*own.address) as mine:
        mine.send("hello from the child")
        got = mine.recv(5)
        assert got is not None and got.text == "hello from the child"
    assert any(m.startswith("serving on") for m in seen), seen


@pytest.mark.skipif(sys.platform != "linux", reason="fork semantics tested on Linux")
def test_an_object_started_before_fork_belongs_to_the_parent(
    make_server: Callable[..., ChatServerUdp],
    make_client: Callable[..., ChatClientUdp],
    make_peer: Callable[..., socket.socket],
) -> None:
    server = make_server()
    peer = make_peer()
    register(peer, server)
    client = make_client(server.address)
    assert wait_until(lambda: client.address in server.clients)
    in_forked_child(lambda: _in_child(server, client))
    # The child sent neither `end` nor `quit`: the parent's objects are untouched.
    assert_silent(peer, 0.3)
    assert server.running and client.running and client.address in server.clients
    client.send("after the fork")
    got = client.recv(5)
    assert got is not None and got.text == "after the fork"
