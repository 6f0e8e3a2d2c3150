"""Fixtures: servers on 127.0.0.1 port 0 and plain-socket peers, all cleaned up."""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import pty
import resource
import select
import socket
import struct
import subprocess
import sys
import termios
import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import udpchat
from redis_server import INSTALL_HINT, RedisServer, find_redis_server
from udpchat import ChatClientUdp, ChatServerUdp

Addr = tuple[str, int]
TIMEOUT = 2.0


def ack(sender: Addr, payload: bytes) -> bytes:
    """The broadcast the tutorial's server sends for `payload` from `sender`."""
    return b"ack: %s %d\n%s\n" % (sender[0].encode(), sender[1], payload)


def recv(sock: socket.socket, timeout: float = TIMEOUT) -> bytes:
    sock.settimeout(timeout)
    data, _ = sock.recvfrom(70_000)
    return data


def assert_silent(sock: socket.socket, wait: float = 0.2) -> None:
    """Nothing arrives within `wait` seconds."""
    sock.settimeout(wait)
    with pytest.raises(socket.timeout):
        data = sock.recvfrom(70_000)
        pytest.fail(f"unexpected datagram {data!r}")


def wait_until(predicate: Callable[[], bool], timeout: float = TIMEOUT, step: float = 0.01) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(step)
    return predicate()


def rcvbuf(sock: socket.socket) -> int:
    """The receive buffer the kernel granted `sock`, as SO_RCVBUF reads it back: twice what was
    asked, capped at twice net.core.rmem_max (212,992 bytes on a stock kernel), or
    net.core.rmem_default for a socket that never asked."""
    return int(sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF))


def default_rcvbuf() -> int:
    """The receive buffer of a socket that never asks for one (a server without `rcvbuf`)."""
    with socket.socket(type=socket.SOCK_DGRAM) as sock:
        return rcvbuf(sock)


def granted_for(request: int) -> int:
    """The receive buffer a socket (a server's `rcvbuf=request`) is granted on this host."""
    with socket.socket(type=socket.SOCK_DGRAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, request)
        return rcvbuf(sock)


_ROOM: dict[tuple[int, int], int] = {}


def room(granted: int, size: int) -> int:
    """How many datagrams of `size` bytes a receive buffer of `granted` bytes (as `rcvbuf`
    reads it back) holds unread before the kernel drops one. Measured, once per pair: the kernel
    charges each datagram its allocation's true size (832 bytes for a small one here, 16 KiB for
    9,000 bytes), not its length. Anything that upsets the measurement makes it smaller, never
    larger."""
    key = (granted, size)
    if key not in _ROOM:
        with (
            socket.socket(type=socket.SOCK_DGRAM) as probe,
            socket.socket(type=socket.SOCK_DGRAM) as sender,
        ):
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, max(granted // 2, 1))
            probe.bind(("127.0.0.1", 0))
            assert rcvbuf(probe) <= granted, (rcvbuf(probe), granted)
            data = b"x" * size
            # None is charged less than its length, nor less than 512 bytes: this is enough.
            sent = granted // max(size, 512) + 64
            for _ in range(sent):
                sender.sendto(data, probe.getsockname())
            time.sleep(0.01)
            probe.setblocking(False)
            fitted = 0
            with contextlib.suppress(BlockingIOError):
                for _ in range(sent):
                    probe.recv(70_000)
                    fitted += 1
        assert fitted < sent, (granted, size, "all fitted: send more")
        assert fitted > 0, (granted, size)
        _ROOM[key] = fitted
    return _ROOM[key]


def in_forked_child(body: Callable[[], object]) -> None:
    """Runs `body` in a child of os.fork(), which reports a failure's traceback through a pipe
    and leaves with os._exit (none of the parent's cleanup runs there); fails the test, with
    that traceback, if `body` raised."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child
        status = 0
        try:
            body()
        except BaseException:
            os.write(write, traceback.format_exc().encode())
            status = 1
        os._exit(status)
    os.close(write)
    _, status = os.waitpid(pid, 0)
    with os.fdopen(read) as report:
        assert os.waitstatus_to_exitcode(status) == 0, report.read()


def main_thread_asleep(pid: int) -> bool:
    """Whether process `pid`'s main thread is asleep (state S: blocked, as in a recv or an
    input(); a thread waiting for a CPU on a loaded machine shows R)."""
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0] == "S"


def thread_count() -> int:
    """Every thread of this process, Rust ones included (threading only sees Python's)."""
    return len(os.listdir("/proc/self/task"))


def fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.fixture
def make_server() -> Iterator[Callable[..., ChatServerUdp]]:
    servers: list[ChatServerUdp] = []

    def make(**kwargs: Any) -> ChatServerUdp:
        kwargs.setdefault("port", 0)
        server = ChatServerUdp(**kwargs)
        server.start()
        servers.append(server)
        return server

    yield make
    for server in servers:
        server.stop()


@pytest.fixture
def server(make_server: Callable[..., ChatServerUdp]) -> ChatServerUdp:
    return make_server()


@pytest.fixture
def make_peer() -> Iterator[Callable[..., socket.socket]]:
    """Plain UDP sockets, as `nc -u` or the tutorial's client would use."""
    peers: list[socket.socket] = []

    def make(family: socket.AddressFamily = socket.AF_INET) -> socket.socket:
        sock = socket.socket(family, socket.SOCK_DGRAM)
        sock.bind(("::1" if family == socket.AF_INET6 else "127.0.0.1", 0))
        sock.settimeout(TIMEOUT)
        peers.append(sock)
        return sock

    yield make
    for sock in peers:
        sock.close()


@pytest.fixture
def make_client() -> Iterator[Callable[..., ChatClientUdp]]:
    clients: list[ChatClientUdp] = []

    def make(address: Addr, **kwargs: Any) -> ChatClientUdp:
        client = ChatClientUdp(*address, **kwargs)
        client.start()
        clients.append(client)
        return client

    yield make
    for client in clients:
        client.stop()


def _has_ipv6() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as s:
            s.bind(("::1", 0))
        return True
    except OSError:
        return False


# Whether this machine has IPv6 loopback (::1), for tests to skip without it.
HAS_IPV6 = _has_ipv6()


def register(sock: socket.socket, server: ChatServerUdp) -> Addr:
    """Registers a plain peer and waits until the server lists it."""
    assert server.address is not None
    sock.sendto(b"reg", server.address)
    me: Addr = sock.getsockname()[:2]
    assert wait_until(lambda: me in server.clients), server.clients
    return me


def _user_namespaces_refused() -> str | None:
    """Why `unshare -rn` (a user and network namespace of our own) fails here, or None."""
    try:
        out = subprocess.run(["unshare", "-rn", "true"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError) as e:
        return f"cannot run `unshare -rn`: {e}"
    if out.returncode != 0:
        return f"`unshare -rn` exits {out.returncode}: {out.stderr.strip() or 'no message'}"
    return None


@pytest.fixture(scope="session")
def user_namespaces() -> None:
    """Every test that needs a namespace of its own (to forge source addresses from raw sockets)
    asks for this fixture. Where unprivileged user namespaces are refused (Docker's defaults,
    Ubuntu 24.04's AppArmor) it skips with the reason; in CI it fails instead (below)."""
    reason = _user_namespaces_refused()
    if reason is not None:
        pytest.skip(f"unprivileged user namespaces are refused here, {reason}")


def _in_ci() -> bool:
    return os.environ.get("CI", "").lower() == "true"


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Any:
    """In CI (CI=true), a namespace test that skips, for whatever reason, is a failure: CI must
    not stay green with the forged-source guarantees untested."""
    report = yield
    if (
        report.skipped
        and not hasattr(report, "wasxfail")
        and _in_ci()
        and "user_namespaces" in getattr(item, "fixturenames", ())
    ):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else report.longrepr
        report.outcome = "failed"
        report.longrepr = f"CI=true: a test that needs user namespaces may not skip: {reason}"
    return report


def run_in_namespace(script: str, timeout: float, *args: str) -> dict[str, Any]:
    """Runs tests/`script` (with `args`) in a network namespace of its own (`unshare -rn`,
    where raw sockets may forge sources and addresses may be added) and returns the JSON object
    it prints. Use it from a test or fixture that takes `user_namespaces`, so it skips where
    namespaces are refused (and fails in CI)."""
    out = subprocess.run(
        ["unshare", "-rn", sys.executable, str(Path(__file__).with_name(script)), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert out.returncode == 0, out.stderr
    result: dict[str, Any] = json.loads(out.stdout)
    return result


@pytest.fixture
def many_sockets() -> Iterator[Callable[[int], list[socket.socket]]]:
    """Plain sockets on 127.0.0.1, the file descriptor limit raised for them if need be."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    made: list[socket.socket] = []

    def make(count: int) -> list[socket.socket]:
        needed = count + len(made) + 256
        if needed > soft:
            if hard != resource.RLIM_INFINITY and hard < needed:
                pytest.skip(f"{needed} file descriptors needed, the hard limit is {hard}")
            resource.setrlimit(resource.RLIMIT_NOFILE, (needed, hard))
        socks = []
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            sock.bind(("127.0.0.1", 0))
            socks.append(sock)
        made.extend(socks)
        return socks

    yield make
    for sock in made:
        sock.close()
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def register_all(server: ChatServerUdp, socks: list[socket.socket]) -> None:
    """`reg` from every socket, in bursts the server's receive buffer holds, again for any the
    kernel dropped; bounded in rounds."""
    assert server.address is not None
    for _ in range(20):
        registered = server.clients
        missing = [s for s in socks if s.getsockname() not in registered]
        if not missing:
            return
        for i, sock in enumerate(missing):
            sock.sendto(b"reg", server.address)
            if i % 100 == 99:
                time.sleep(0.002)
        wait_until(lambda: len(server.clients) == len(socks), timeout=1.0)
    assert len(server.clients) == len(socks)


def spawn_in_terminal(
    args: list[str], columns: int, rows: int, env: dict[str, str]
) -> tuple[subprocess.Popen[bytes], int]:
    """Runs `args` with a new pseudo-terminal of `columns` x `rows` as its stdin, stdout and
    stderr (TERM=xterm); returns the process and the terminal's other end, to read and type on."""
    primary, secondary = pty.openpty()
    fcntl.ioctl(secondary, termios.TIOCSWINSZ, struct.pack("HHHH", rows, columns, 0, 0))
    proc = subprocess.Popen(
        args, stdin=secondary, stdout=secondary, stderr=secondary, env={**env, "TERM": "xterm"}
    )
    os.close(secondary)
    return proc, primary


def read_terminal(fd: int, until: float, stop: bytes | None = None, after: int = 0) -> bytes:
    """What a program writes to the terminal `fd` until `until` (monotonic), or until `stop`
    appears past offset `after` of what was read."""
    out = b""
    while (left := until - time.monotonic()) > 0:
        if stop is not None and stop in out[after:]:
            break
        ready, _, _ = select.select([fd], [], [], left)
        if ready:
            try:
                out += os.read(fd, 65536)
            except OSError:  # the program closed the terminal
                break
    return out


class Collect(logging.Handler):
    """Keeps every record it is handed: level NOTSET, so it filters nothing itself."""

    def __init__(self) -> None:
        super().__init__(logging.NOTSET)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


@pytest.fixture
def udpchat_logger() -> Iterator[tuple[logging.Logger, Collect]]:
    """The `udpchat` logger with a handler of its own that filters nothing, so what reaches the
    handler is what the Rust side chose to emit: a level set on the logger is applied by the
    Rust side only (pyo3-log asks `isEnabledFor` and caches the answer; `Logger.handle`, which
    it calls, checks no level). caplog cannot show this: its handler filters by level too."""
    logger = logging.getLogger("udpchat")
    handler, level = Collect(), logger.level
    logger.addHandler(handler)
    try:
        yield logger, handler
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
        udpchat.reset_log_cache()


# Figures the fault and attack tests measure (amplification, false expiries, stop latency...):
# printed at the end of every run, so CI's log carries them.
FIGURES: list[str] = []


@pytest.fixture
def figure() -> Callable[[str], None]:
    return FIGURES.append


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if FIGURES:
        terminalreporter.section("udpchat figures")
        for line in FIGURES:
            terminalreporter.write_line(line)


@pytest.fixture(scope="session")
def redis_executable() -> str:
    """Debian's redis-server, for the tests that need a real Redis (the cluster tests). Missing,
    it fails the test when CI=true (.ci/run installs it), and skips it elsewhere, saying how to
    install it."""
    path = find_redis_server()
    if path is None:
        if _in_ci():
            pytest.fail(f"CI=true: a test that needs Redis may not skip: {INSTALL_HINT}")
        pytest.skip(INSTALL_HINT)
    return path


@pytest.fixture
def make_redis(redis_executable: str, tmp_path: Path) -> Iterator[Callable[..., RedisServer]]:
    """Redis servers of the test's own, each on a free loopback port, without persistence, in a
    directory under `tmp_path`; stopped by pid (SIGTERM, then SIGKILL) when the test ends.
    `make(password=None, start=True)`: `start=False` picks the port without starting it."""
    made: list[RedisServer] = []

    def make(*, password: str | None = None, start: bool = True) -> RedisServer:
        redis = RedisServer(redis_executable, tmp_path / f"redis-{len(made)}", password=password)
        made.append(redis)
        if start:
            redis.start()
        return redis

    yield make
    for redis in made:
        redis.stop()


@pytest.fixture
def redis(make_redis: Callable[..., RedisServer]) -> RedisServer:
    """One running Redis server of the test's own."""
    server: RedisServer = make_redis()
    return server
