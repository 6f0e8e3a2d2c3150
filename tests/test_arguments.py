"""Every argument of the public API has a documented range and type, checked at construction
(or at the call) in udpchat's own words: ValueError out of range, TypeError for a wrong type;
never OverflowError, PanicException, a message about PyO3's types, or a process abort."""

from __future__ import annotations

import math
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from typing import Any

import pytest
from conftest import wait_until
from udpchat import ChatClientUdp, ChatServerUdp, Message

# Each integer option's range, as the README and the stub give it.
SERVER_INTS = {
    "port": (0, 65535),
    "max_datagram": (1, 65535),
    "max_clients": (1, 100_000_000),
    "max_per_ip": (1, 100_000_000),
    "rcvbuf": (1024, 2**30),
    "fanout_threads": (1, 64),
}
CLIENT_INTS = {"port": (1, 65535), "max_queue": (1, 10_000_000)}
INTERVAL = (0.01, 86400)
RATE_LIMIT = (0.01, 1e9)
QUEUE_MAX = 10_000_000
ALLOWED = (ValueError, TypeError)
# Words from PyO3's own conversion errors, which must never reach a user.
PYO3_WORDS = ("PyString", "PyBytes", "PyBool", "Payload", "extract", "variant", "instance of")

INT_CASES = [(ChatServerUdp, name, lo, hi) for name, (lo, hi) in SERVER_INTS.items()] + [
    (ChatClientUdp, name, lo, hi) for name, (lo, hi) in CLIENT_INTS.items()
]


def _in_own_words(err: BaseException, name: str) -> None:
    text = str(err)
    assert name in text, text
    for word in PYO3_WORDS:
        assert word not in text, text


@pytest.mark.parametrize(("cls", "name", "lo", "hi"), INT_CASES)
def test_integer_options_take_their_range_and_refuse_the_rest_with_value_error(
    cls: type[Any], name: str, lo: int, hi: int
) -> None:
    cls(**{name: lo})
    cls(**{name: hi})
    for bad in (lo - 1, hi + 1, -(2**64), 2**64, 2**200, 10**5000):
        with pytest.raises(ValueError, match=rf"^{name} must be in {lo}\.\.{hi}, got ") as err:
            cls(**{name: bad})
        _in_own_words(err.value, name)


@pytest.mark.parametrize(("cls", "name", "lo", "hi"), INT_CASES)
def test_integer_options_refuse_bool_float_and_str_with_type_error(
    cls: type[Any], name: str, lo: int, hi: int
) -> None:
    for bad in (True, False, float(lo), "1", b"1"):
        with pytest.raises(TypeError, match=rf"^{name} must be an int, not ") as err:
            cls(**{name: bad})
        _in_own_words(err.value, name)


@pytest.mark.parametrize("cls", [ChatServerUdp, ChatClientUdp])
def test_interval_has_a_minimum_and_a_maximum(cls: type[Any]) -> None:
    lo, hi = INTERVAL
    assert cls(interval=lo).interval == lo
    assert cls(interval=hi).interval == hi
    assert cls(interval=1).interval == 1.0  # an int is a number of seconds too
    for bad in (1e-9, 0.0099, 0, -0.0, -1, hi + 0.5, 10**400, math.nan, math.inf, -math.inf):
        with pytest.raises(
            ValueError, match=r"^interval must be a positive number of seconds in 0\.01\.\.86400"
        ):
            cls(interval=bad)
    for wrong in (True, "5", None, b"5"):
        with pytest.raises(TypeError, match=r"^interval must be a number \(int or float\), not"):
            cls(interval=wrong)


def test_a_client_at_the_smallest_interval_sends_about_100_heartbeats_a_second() -> None:
    with socket.socket(type=socket.SOCK_DGRAM) as plain:
        plain.bind(("127.0.0.1", 0))
        plain.settimeout(0.05)
        client = ChatClientUdp(*plain.getsockname(), interval=INTERVAL[0])
        client.start()
        try:
            received, t0 = 0, time.monotonic()
            while time.monotonic() - t0 < 1.0:
                try:
                    plain.recv(1024)
                    received += 1
                except TimeoutError:
                    pass
        finally:
            client.stop()
    # reg, then one heartbeat every 10 ms: 101 in a second, with slack for a late tick.
    assert 1 <= received <= 120, received


def test_port_true_is_a_type_error_not_port_1() -> None:
    for cls in (ChatServerUdp, ChatClientUdp):
        with pytest.raises(TypeError, match=r"^port must be an int, not bool$"):
            cls(port=True)
        with pytest.raises(TypeError, match=r"^interval must be a number"):
            cls(interval=True)


def test_rate_limit_has_a_range() -> None:
    lo, hi = RATE_LIMIT
    assert ChatServerUdp(rate_limit=lo) and ChatServerUdp(rate_limit=hi)
    assert ChatServerUdp(rate_limit=None) and ChatServerUdp(rate_limit=100)
    for bad in (0, 0.001, -1, 2e9, 10**400, math.nan, math.inf):
        with pytest.raises(ValueError, match=r"^rate_limit must be in 0\.01\.\.1000000000, got"):
            ChatServerUdp(rate_limit=bad)
    with pytest.raises(TypeError, match=r"^rate_limit must be a number"):
        ChatServerUdp(rate_limit=True)


def test_optional_options_take_none_and_flags_take_only_bools() -> None:
    ChatServerUdp(rcvbuf=None, rate_limit=None, validate=True)
    for wrong in (1, 0, "yes", None):
        with pytest.raises(TypeError, match=r"^validate must be True or False, not"):
            ChatServerUdp(validate=wrong)
    for cls in (ChatServerUdp, ChatClientUdp):
        with pytest.raises(TypeError, match=r"^ip must be a str, not int$"):
            cls(ip=5)
        with pytest.raises(ValueError, match=r"^ip must be an IPv4 or IPv6 address"):
            cls(ip="\udcff")


def test_timeouts_and_recv_many_max_are_checked() -> None:
    client = ChatClientUdp(port=9)  # not started: the checks come first
    for bad in (-1, -0.001, -math.inf, math.nan):
        with pytest.raises(ValueError, match=r"^timeout must be None or a number of seconds >= 0"):
            client.recv(timeout=bad)
        with pytest.raises(ValueError, match=r"^timeout must be None or a number of seconds"):
            client.recv_many(timeout=bad)
    for wrong in (True, "1", b"1"):
        with pytest.raises(TypeError, match=r"^timeout must be a number \(int or float\)"):
            client.recv(timeout=wrong)
    for good in (0, 0.0, 1, math.inf, 10**400, None):
        assert client.recv(timeout=good) is None
    for bad_max in (0, -1, QUEUE_MAX + 1, 2**64, 10**5000):
        with pytest.raises(ValueError, match=rf"^max must be in 1\.\.{QUEUE_MAX}, got"):
            client.recv_many(max=bad_max)
    for wrong_max in (True, 1.0, "1"):
        with pytest.raises(TypeError, match=r"^max must be an int, not"):
            client.recv_many(max=wrong_max)
    assert client.recv_many(max=QUEUE_MAX, timeout=0) == []


def test_send_and_broadcast_say_what_they_take(
    server: ChatServerUdp, make_client: Callable[..., ChatClientUdp]
) -> None:
    assert server.address is not None
    client = make_client(server.address)
    assert wait_until(lambda: client.address in server.clients)
    for send in (client.send, server.broadcast):
        for wrong in (5, None, [104, 105], 1.5, object()):
            with pytest.raises(TypeError) as err:
                send(wrong)
            assert str(err.value).startswith("msg must be str or bytes, not "), err.value
            _in_own_words(err.value, "msg")
        with pytest.raises(ValueError, match=r"^msg is a str that cannot be encoded as UTF-8"):
            send("lone \udcff surrogate")
    # Bytes-like objects are bytes.
    client.send(bytearray(b"from a bytearray"))
    client.send(memoryview(b"from a memoryview"))
    texts = [client.recv(timeout=2.0) for _ in range(2)]
    assert [m.text for m in texts if m] == ["from a bytearray", "from a memoryview"]


def test_message_takes_bytes_like_only() -> None:
    with pytest.raises(TypeError, match=r"^raw must be bytes, not str$"):
        Message("ack: 1.2.3.4 5\nx\n")  # type: ignore[arg-type]
    assert Message(bytearray(b"ack: 1.2.3.4 5\nx\n")).sender == ("1.2.3.4", 5)
    assert Message(memoryview(b"end")).raw == b"end"


# Odd values for every argument: each call returns, or raises ValueError or TypeError.
ODD: list[object] = [
    True,
    None,
    0,
    -1,
    2**31,
    2**40,
    2**62,
    2**64,
    -(2**64),
    10**5000,
    0.5,
    1e-9,
    math.nan,
    math.inf,
    "1",
    b"1",
    "\udcff",
    [],
    object(),
]
SERVER_OPTIONS = ["ip", "port", "interval", *SERVER_INTS, "rate_limit", "validate"]
CLIENT_OPTIONS = ["ip", "port", "interval", "max_queue"]


def test_only_value_and_type_errors_leave_for_any_argument() -> None:
    calls: list[tuple[str, Callable[[object], object]]] = []
    for name in SERVER_OPTIONS:
        calls.append((f"ChatServerUdp({name}=)", lambda v, n=name: ChatServerUdp(**{n: v})))
    for name in CLIENT_OPTIONS:
        calls.append((f"ChatClientUdp({name}=)", lambda v, n=name: ChatClientUdp(**{n: v})))
    client = ChatClientUdp(port=9)  # never started: a valid wait returns None at once
    calls += [
        ("recv(timeout=)", lambda v: client.recv(timeout=v)),  # type: ignore[arg-type]
        ("recv_many(max=)", lambda v: client.recv_many(max=v, timeout=0)),  # type: ignore[arg-type]
        ("recv_many(timeout=)", lambda v: client.recv_many(timeout=v)),  # type: ignore[arg-type]
        ("Message()", lambda v: Message(v)),  # type: ignore[arg-type]
    ]
    escaped = []
    for label, call in calls:
        for value in ODD:
            try:
                call(value)
            except ALLOWED:
                pass
            except BaseException as e:  # what must never happen
                escaped.append(f"{label} {type(value).__name__}: {type(e).__name__}: {e}")
    assert escaped == []


def _run(code: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_a_huge_max_queue_is_a_value_error_at_construction_not_an_abort() -> None:
    # 0.1 accepted both, then aborted the interpreter at start() (2**40 slots of 32 bytes)
    # or raised PanicException (2**62): in a subprocess, so this test survives either.
    proc = _run(
        """
        from udpchat import ChatClientUdp
        for max_queue in (2**40, 2**62, 10_000_001):
            try:
                ChatClientUdp('127.0.0.1', 9, max_queue=max_queue).start()
                print('accepted', max_queue)
            except BaseException as e:
                print(type(e).__name__, e)
        """
    )
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines == [
        f"ValueError max_queue must be in 1..10000000, got {n}" for n in (2**40, 2**62, 10_000_001)
    ], proc.stdout + proc.stderr


def test_the_queue_takes_memory_for_what_it_holds_not_for_max_queue() -> None:
    # 0.1 allocated every slot at start: 10**7 slots took 305 MB before a message came.
    proc = _run(
        """
        import socket
        from udpchat import ChatClientUdp

        def rss():
            with open('/proc/self/status') as f:
                for line in f:
                    if line.startswith('VmRSS:'):
                        return int(line.split()[1]) * 1024
            raise RuntimeError('no VmRSS')

        plain = socket.socket(type=socket.SOCK_DGRAM)
        plain.bind(('127.0.0.1', 0))
        warm = ChatClientUdp(*plain.getsockname(), max_queue=1)
        warm.start(); warm.stop()
        before = rss()
        client = ChatClientUdp(*plain.getsockname(), max_queue=10_000_000)
        client.start()
        print(rss() - before)
        client.stop()
        """
    )
    assert proc.returncode == 0, proc.stderr
    grown = int(proc.stdout)
    print(f"RSS grown by start() with max_queue=10,000,000: {grown / 2**20:.1f} MiB")
    assert grown < 32 * 2**20, grown


def test_the_bound_holds_and_room_comes_back_as_messages_are_read(
    server: ChatServerUdp, make_client: Callable[..., ChatClientUdp]
) -> None:
    assert server.address is not None
    client = make_client(server.address, max_queue=2)
    for i in range(5):
        client.send(f"a{i}")
    assert wait_until(lambda: client.dropped == 3)
    assert [m.text for m in client.recv_many(timeout=1.0)] == ["a0", "a1"]
    for i in range(2):
        client.send(f"b{i}")
    assert wait_until(lambda: server.stats()["deliveries"] == 7)
    got: list[str] = []
    deadline = time.monotonic() + 2.0
    while len(got) < 2 and time.monotonic() < deadline:
        got += [m.text for m in client.recv_many(timeout=0.5)]
    assert got == ["b0", "b1"]
    assert client.dropped == 3
