"""A panic in a core thread (made on purpose by `_inject_panic()`, a hook for tests) is never
silent: the object stops running, the next call raises RuntimeError naming the panic, a blocked
receive wakes and raises, and stop() raises it once more. Never PanicException."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import pytest
from conftest import wait_until
from udpchat import ChatClientUdp, ChatServerUdp


def test_a_server_thread_panic_is_raised(make_server: Callable[..., ChatServerUdp]) -> None:
    server = make_server()
    server._inject_panic()
    assert wait_until(lambda: not server.running)
    with pytest.raises(RuntimeError, match="panicked"):
        server.broadcast("anyone?")
    with pytest.raises(RuntimeError, match="panicked"):
        server.stop()
    server.stop()  # raised once; now idempotent


def test_a_client_thread_panic_wakes_a_blocked_receive_and_is_raised(
    make_server: Callable[..., ChatServerUdp],
) -> None:
    server = make_server()
    client = ChatClientUdp(*server.address)
    client.start()
    raised: list[BaseException] = []

    def receive() -> None:
        try:
            client.recv(timeout=10)
        except BaseException as e:
            raised.append(e)

    waiter = threading.Thread(target=receive)
    waiter.start()
    time.sleep(0.1)  # blocked in recv
    client._inject_panic()
    waiter.join(timeout=5)
    assert not waiter.is_alive()
    assert len(raised) == 1 and type(raised[0]) is RuntimeError, raised
    assert "panicked" in str(raised[0])
    with pytest.raises(RuntimeError, match="panicked"):
        list(client)
    with pytest.raises(RuntimeError, match="panicked"):
        client.send("anyone?")
    with pytest.raises(RuntimeError, match="panicked"):
        client.stop()
