"""Start, stop, restart, bad arguments, expiry, threads and Ctrl-C."""

from __future__ import annotations

import errno
import math
import signal
import socket
import statistics
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable

import pytest
from conftest import (
    assert_silent,
    fd_count,
    main_thread_asleep,
    recv,
    register,
    thread_count,
    wait_until,
)
from udpchat import ChatClientUdp, ChatServerUdp

MakePeer = Callable[..., socket.socket]
Figure = Callable[[str], None]


def test_port_zero_binds_a_free_port_and_address_is_reported() -> None:
    server = ChatServerUdp(port=0)
    assert server.address is None
    server.start()
    try:
        assert server.address is not None
        ip, port = server.address
        assert ip == "127.0.0.1" and port != 0
        assert server.port == 0 and server.ip == "127.0.0.1"
    finally:
        server.stop()
    assert server.address is None


def test_defaults_are_the_tutorials() -> None:
    server, client = ChatServerUdp(), ChatClientUdp()
    assert (server.ip, server.port, server.interval) == ("127.0.0.1", 9998, 10)
    assert (client.ip, client.port, client.interval) == ("127.0.0.1", 9998, 5)
    assert not server.running and not client.running


def test_port_in_use_raises_oserror_with_errno(server: ChatServerUdp) -> None:
    ip, port = server.address
    other = ChatServerUdp(ip, port)
    with pytest.raises(OSError) as info:
        other.start()
    assert info.value.errno == errno.EADDRINUSE
    assert str(port) in str(info.value)
    assert not other.running


def test_start_twice_raises_and_restart_after_stop_works(make_peer: MakePeer) -> None:
    server = ChatServerUdp(port=0)
    server.start()
    try:
        with pytest.raises(RuntimeError, match="already running"):
            server.start()
        server.stop()
        server.stop()
        server.start()
        a = make_peer()
        a.sendto(b"again", server.address)
        assert recv(a).endswith(b"\nagain\n")
    finally:
        server.stop()
    client = ChatClientUdp(port=9)
    client.start()
    with pytest.raises(RuntimeError, match="already running"):
        client.start()
    client.stop()


@pytest.mark.parametrize(
    "kwargs",
    [
        {"port": -1},
        {"port": 65536},
        {"port": 2**70},
        {"interval": 0},
        {"interval": -1},
        {"interval": math.nan},
        {"interval": math.inf},
        {"ip": "localhost"},
        {"ip": "999.1.1.1"},
        {"ip": ""},
    ],
)
def test_bad_arguments_raise_value_error(kwargs: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        ChatServerUdp(**kwargs)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        ChatClientUdp(**kwargs)  # type: ignore[arg-type]


def test_more_bad_arguments() -> None:
    with pytest.raises(ValueError):
        ChatClientUdp(port=0)
    with pytest.raises(ValueError):
        ChatClientUdp(max_queue=0)
    with pytest.raises(ValueError):
        ChatServerUdp(max_datagram=0)
    with pytest.raises(TypeError):
        ChatServerUdp(port="9998")  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        ChatServerUdp(port=0).broadcast(3)  # type: ignore[arg-type]
    with pytest.raises(RuntimeError, match="not running"):
        ChatServerUdp(port=0).broadcast("nobody")


def test_silent_client_expires_while_a_heartbeating_one_stays(
    make_server: Callable[..., ChatServerUdp], make_peer: MakePeer, figure: Figure
) -> None:
    interval = 1.0
    server = make_server(interval=interval)
    silent, talker = make_peer(), make_peer()
    me = register(silent, server)
    # A heartbeat every tenth of the interval: it takes 900 ms of delay to lose this client.
    with ChatClientUdp(*server.address, interval=interval / 10) as alive:
        last_seen = server.clients[me]  # the server's own stamp, as Unix time
        assert wait_until(lambda: me not in server.clients, timeout=interval + 1.5)
        gone_after = time.time() - last_seen
        figure(f"silent client, interval 1 s: unlisted {gone_after:.3f} s after last heard")
        # Never early (seen from here, only ever later); on time, with half a second of slack
        # for a loaded machine, short of a 2 x interval mistake.
        assert interval - 0.005 <= gone_after <= interval + 0.5, gone_after
        # Several intervals later, the heartbeating client is still there.
        time.sleep(interval * 2)
        assert alive.address in server.clients
        talker.sendto(b"who is here", server.address)
        assert alive.recv(2) is not None
        assert_silent(silent)
    assert server.stats()["expired"] >= 1


def test_stop_is_fast_while_receivers_are_blocked(figure: Figure) -> None:
    # Seven rounds, pass/fail on the median: a receiver that noticed stop() only at its next
    # timeout would take hundreds of milliseconds every round; a loaded machine delays a few.
    client_stops, server_stops = [], []
    for _ in range(7):
        server = ChatServerUdp(port=0)
        server.start()
        client = ChatClientUdp(*server.address)
        client.start()
        time.sleep(0.1)  # both receivers are now blocked waiting for datagrams
        t0 = time.perf_counter()
        client.stop()
        client_stops.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        server.stop()
        server_stops.append(time.perf_counter() - t0)
    for who, stops in (("client", client_stops), ("server", server_stops)):
        figure(
            f"{who}.stop() with its receiver blocked, 7 rounds: median "
            f"{statistics.median(stops) * 1000:.2f} ms, max {max(stops) * 1000:.2f} ms"
        )
        assert statistics.median(stops) < 0.1, (who, stops)


def test_fifty_start_stop_cycles_leave_no_thread_or_fd_behind() -> None:
    # Warm up once so one-time allocations (logging caches, the module) are not counted.
    with ChatServerUdp(port=0) as s, ChatClientUdp(*s.address):
        pass
    threads, fds = thread_count(), fd_count()
    server = ChatServerUdp(port=0)
    for _ in range(50):
        server.start()
        client = ChatClientUdp(*server.address)
        client.start()
        client.send("x")
        client.stop()
        server.stop()
    assert wait_until(lambda: thread_count() == threads), (thread_count(), threads)
    assert fd_count() == fds


def _run(code: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(code)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


@pytest.mark.parametrize("call", ["client.recv()", "next(iter(client))", "client.recv(timeout=60)"])
def test_ctrl_c_interrupts_a_blocking_recv(call: str, figure: Figure) -> None:
    proc = _run(
        f"""
        import time
        from udpchat import ChatClientUdp
        client = ChatClientUdp(port=9)
        client.start()
        print("ready", flush=True)
        try:
            {call}
        except KeyboardInterrupt:
            print("interrupted %.6f" % time.monotonic(), flush=True)
            client.stop()
        """
    )
    try:
        assert proc.stdout is not None
        assert proc.stdout.readline() == "ready\n"
        # Asleep after "ready": it can only be in the call (which wakes every 50 ms to check for
        # signals, so one look, not two).
        assert wait_until(lambda: main_thread_asleep(proc.pid), timeout=5, step=0.005)
        t0 = time.monotonic()  # CLOCK_MONOTONIC: the same clock in the child
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=5)
        assert out.startswith("interrupted "), (out, err)
        assert proc.returncode == 0
        latency = float(out.split()[1]) - t0
        figure(f"Ctrl-C during {call}: KeyboardInterrupt after {latency * 1000:.1f} ms")
        # It checks for signals every 50 ms; a second is slack for a loaded machine.
        assert latency < 1.0, latency
    finally:
        proc.kill()


def test_a_server_left_running_does_not_hang_interpreter_exit() -> None:
    proc = _run(
        """
        from udpchat import ChatServerUdp, ChatClientUdp
        server = ChatServerUdp(port=0)
        server.start()
        client = ChatClientUdp(*server.address, interval=0.01)
        client.start()
        client.send("bye")
        print("started", flush=True)
        """
    )
    out, err = proc.communicate(timeout=10)
    assert out == "started\n", err
    assert proc.returncode == 0, err


def test_the_port_binds_again_at_once_after_stop(make_peer: MakePeer) -> None:
    server = ChatServerUdp(port=0)
    server.start()
    ip, port = server.address
    server.stop()
    again = ChatServerUdp(ip, port)
    again.start()
    try:
        a = make_peer()
        a.sendto(b"same port", (ip, port))
        assert recv(a).endswith(b"\nsame port\n")
    finally:
        again.stop()
    assert again.stats()["deliveries"] == 1  # counters outlive the socket
