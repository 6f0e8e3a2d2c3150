"""A real redis-server for the cluster tests, and a raw RESP client to talk to it.

`RedisServer` runs Debian's `redis-server` on a free loopback port, without persistence, in a
directory of the test's, stopped by its pid; `kill()` and `restart()` make an outage on the same
port. `Resp` speaks RESP over a plain socket (no redis-py): `publish()` puts arbitrary bytes on
a channel (foreign and malformed envelopes), `numsub()` counts a channel's subscribers.
"""

from __future__ import annotations

import contextlib
import os
import random
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

# How long redis-server may take to answer PING after it is started, and to exit after SIGTERM
# before it gets SIGKILL. It takes a few milliseconds; a loaded machine can take far longer.
START_TIMEOUT = 10.0
STOP_TIMEOUT = 5.0

INSTALL_HINT = (
    "redis-server is not on PATH: install Debian's package (`apt-get install redis-server`, "
    "as root) to run the cluster tests"
)


def find_redis_server() -> str | None:
    """The redis-server on PATH, or None."""
    return shutil.which("redis-server")


def _ephemeral_range() -> tuple[int, int]:
    try:
        low, high = Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()
        return int(low), int(high)
    except (OSError, ValueError):
        return 32768, 60999


def free_tcp_port() -> int:
    """A TCP port free on 127.0.0.1 now, below the ephemeral range when there is room: no
    client socket (a udpchat server reconnecting to it, say) is given it as its own port while
    Redis is down, so `restart()` finds it free, and a reconnect can never connect to itself."""
    low, _ = _ephemeral_range()
    for _ in range(200):
        port = random.randrange(10_000, low) if low > 11_000 else 0
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                continue
            bound: int = probe.getsockname()[1]
            return bound
    raise RuntimeError("no free TCP port found on 127.0.0.1 in 200 tries")


class RespError(Exception):
    """An error reply (`-ERR ...`) from Redis."""


class Resp:
    """One RESP connection to Redis over a plain socket: commands in, replies out. Enough RESP2
    for PING, AUTH, PUBLISH, PUBSUB, CLIENT and CONFIG."""

    def __init__(
        self, port: int, password: str | None = None, host: str = "127.0.0.1", timeout: float = 5.0
    ) -> None:
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.file = self.sock.makefile("rb")
        if password is not None:
            self.command("AUTH", password)

    def close(self) -> None:
        self.file.close()
        self.sock.close()

    def __enter__(self) -> Resp:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @staticmethod
    def encode(*args: bytes | str | int) -> bytes:
        out = [b"*%d\r\n" % len(args)]
        for arg in args:
            data = arg if isinstance(arg, bytes) else str(arg).encode()
            out.append(b"$%d\r\n%s\r\n" % (len(data), data))
        return b"".join(out)

    def command(self, *args: bytes | str | int) -> Any:
        """Sends one command and returns its reply: bytes, int, list or None; an error reply is
        raised as RespError."""
        self.sock.sendall(self.encode(*args))
        return self._reply()

    def _line(self) -> bytes:
        line = self.file.readline()
        if not line.endswith(b"\r\n"):
            raise ConnectionError(f"Redis closed the connection (read {line!r})")
        return line[:-2]

    def _reply(self) -> Any:
        line = self._line()
        kind, rest = line[:1], line[1:]
        if kind == b"+":
            return rest
        if kind == b"-":
            raise RespError(rest.decode(errors="replace"))
        if kind == b":":
            return int(rest)
        if kind == b"$":
            size = int(rest)
            if size < 0:
                return None
            data = self.file.read(size + 2)
            if len(data) != size + 2:
                raise ConnectionError("Redis closed the connection in a bulk reply")
            return data[:-2]
        if kind == b"*":
            count = int(rest)
            return None if count < 0 else [self._reply() for _ in range(count)]
        raise ConnectionError(f"not a RESP reply: {line!r}")


class RedisServer:
    """A `redis-server` of the test's own: `--port N --bind 127.0.0.1 --save '' --appendonly no
    --dir DIR --daemonize no`, its output in DIR/redis.log. The port is chosen at construction
    and kept: `start()` and `restart()` use it (a first start retries another port if that one
    was taken meanwhile)."""

    def __init__(
        self,
        executable: str,
        directory: Path,
        *,
        password: str | None = None,
        port: int | None = None,
    ) -> None:
        self.executable = executable
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.password = password
        self.port = port if port is not None else free_tcp_port()
        self.log = self.directory / "redis.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.stop_timeout = STOP_TIMEOUT
        self._started_once = False

    @property
    def url(self) -> str:
        """The URL of this server, with its password if it has one."""
        auth = f":{self.password}@" if self.password is not None else ""
        return f"redis://{auth}127.0.0.1:{self.port}"

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def _args(self) -> list[str]:
        args = [
            self.executable,
            "--port",
            str(self.port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(self.directory),
            "--daemonize",
            "no",
        ]
        if self.password is not None:
            args += ["--requirepass", self.password]
        return args

    def start(self) -> RedisServer:
        """Starts it and waits until it answers PING; RuntimeError, with its log, if it does not
        within START_TIMEOUT seconds."""
        assert not self.running, "already running"
        for _ in range(5):
            if self._start_once():
                self._started_once = True
                return self
            if self._started_once or "Address already in use" not in self.log_text():
                break
            self.port = free_tcp_port()  # taken between the probe and the start: another one
        raise RuntimeError(
            f"redis-server did not answer PING on 127.0.0.1:{self.port} within {START_TIMEOUT} s;"
            f" its log:\n{self.log_text()[-4000:]}"
        )

    def _start_once(self) -> bool:
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                self._args(), stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT
            )
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                return False
            if self.ping():
                return True
            time.sleep(0.01)
        self._signal_and_wait(signal.SIGKILL, self.stop_timeout)
        return False

    def restart(self) -> RedisServer:
        """Starts it again on the same port (after `kill()` or `stop()`)."""
        return self.start()

    def ping(self) -> bool:
        """Whether it answers PING now (with its password if it has one)."""
        try:
            with Resp(self.port, self.password, timeout=1.0) as conn:
                return bool(conn.command("PING") == b"PONG")
        except (OSError, ConnectionError, RespError):
            return False

    def _signal_and_wait(self, signum: int, timeout: float) -> bool:
        """Sends `signum` to its pid, then waits up to `timeout` s for it; True once it is gone."""
        if self.proc is None or self.proc.poll() is not None:
            return True
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.proc.pid, signum)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return False
        return True

    def kill(self) -> None:
        """SIGKILL, as a crash: no goodbye to its clients beyond what the kernel does."""
        assert self.proc is not None and self.proc.poll() is None, "not running"
        if not self._signal_and_wait(signal.SIGKILL, self.stop_timeout):
            raise RuntimeError(f"redis-server pid {self.proc.pid} still alive after SIGKILL")

    def stop(self) -> None:
        """SIGTERM, and SIGKILL if it has not exited within `stop_timeout` seconds. Idempotent."""
        if not self._signal_and_wait(signal.SIGTERM, self.stop_timeout):
            self._signal_and_wait(signal.SIGKILL, self.stop_timeout)

    def log_text(self) -> str:
        try:
            return self.log.read_text(errors="replace")
        except OSError:
            return ""

    def connect(self) -> Resp:
        """A new RESP connection to it (authenticated if it has a password)."""
        return Resp(self.port, self.password)

    def command(self, *args: bytes | str | int) -> Any:
        """One command on a connection of its own."""
        with self.connect() as conn:
            return conn.command(*args)

    def publish(self, channel: str, data: bytes) -> int:
        """PUBLISH `data`, any bytes, on `channel`: the number of subscribers that got it."""
        receivers: int = self.command("PUBLISH", channel, data)
        return receivers

    def numsub(self, channel: str) -> int:
        """PUBSUB NUMSUB `channel`: how many connections are subscribed to it."""
        reply = self.command("PUBSUB", "NUMSUB", channel)
        count: int = reply[1]
        return count
