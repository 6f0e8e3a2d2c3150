"""The command line under what a user throws at it (issue 9, item 12): input that is not UTF-8,
a line too long for a datagram, log records while a line is being typed, signals in a row, an
address that cannot be bound. Each: a clear message, no traceback, the session goes on where it
can, and the exit code the README gives."""

from __future__ import annotations

import contextlib
import os
import select
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator

import pyte
import pytest
from conftest import read_terminal, spawn_in_terminal

ENV = {**os.environ, "PYTHONUNBUFFERED": "1"}
QUIT = b"quit"


def udpchat(*args: str) -> list[str]:
    return [sys.executable, "-m", "udpchat", *args]


@pytest.fixture
def fake_server() -> Iterator[socket.socket]:
    """A plain socket in the server's place, to see the exact bytes `chat` sends."""
    with socket.socket(type=socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        sock.settimeout(0.2)
        yield sock


def received_until_quit(sock: socket.socket, timeout: float = 10.0) -> list[bytes]:
    """Stripped datagrams (heartbeats left out) until `quit`, or `timeout` seconds."""
    got: list[bytes] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            data = sock.recv(70_000).strip()
        except TimeoutError:
            continue
        if data != b"^hb^":
            got.append(data)
        if data == QUIT:
            break
    return got


def run_chat(port: int, stdin: bytes, env: dict[str, str]) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(
        udpchat("chat", "--port", str(port)),
        input=stdin,
        capture_output=True,
        env={**ENV, **env},
        timeout=20,
    )


@pytest.mark.parametrize(
    "env",
    [{"LC_ALL": "C.UTF-8"}, {"PYTHONIOENCODING": "utf-8:strict"}, {"LC_ALL": "C"}],
    ids=["C.UTF-8", "strict-utf-8", "C"],
)
def test_chat_sends_input_that_is_not_utf8_as_the_bytes_it_is(
    fake_server: socket.socket, env: dict[str, str]
) -> None:
    # 0.1: a TypeError traceback at the first such line, exit 1, the rest of the input lost.
    proc = run_chat(fake_server.getsockname()[1], b"\xff\xfe\ncaf\xc3\xa9\nafter\n", env)
    got = received_until_quit(fake_server)
    assert b"Traceback" not in proc.stderr, proc.stderr.decode(errors="replace")
    assert proc.returncode == 0, proc.stderr
    assert got == [b"reg", b"\xff\xfe", "café".encode(), b"after", QUIT], got


def test_a_line_too_long_for_a_datagram_is_reported_and_the_chat_goes_on(
    fake_server: socket.socket,
) -> None:
    # 0.1: OSError, exit 1, and every later line dropped.
    long = b"x" * 70_000
    proc = run_chat(fake_server.getsockname()[1], long + b"\nafter\n", {})
    got = received_until_quit(fake_server)
    assert proc.returncode == 0, proc.stderr
    assert got == [b"reg", b"after", QUIT], [g[:20] for g in got]
    err = proc.stderr.decode()
    assert "not sent: the line is 70,000 bytes, more than one datagram carries (65,507)" in err
    assert "Traceback" not in err


def test_log_records_go_above_the_line_being_typed() -> None:
    # 0.1 wrote them where the cursor was: in the middle of the line being typed.
    with socket.socket(type=socket.SOCK_DGRAM) as gone:
        gone.bind(("127.0.0.1", 0))
        port = gone.getsockname()[1]  # closed: every heartbeat brings an ICMP error, logged
    columns, rows = 100, 30
    env = {k: v for k, v in ENV.items() if k not in ("COLUMNS", "LINES")}
    chat, primary = spawn_in_terminal(
        udpchat("chat", "--port", str(port), "--interval", "0.2"), columns, rows, env
    )
    try:
        out = read_terminal(primary, time.monotonic() + 10, stop=b"> ")
        assert b"> " in out, out
        os.write(primary, b"partial")
        typed = len(out)
        # Records are throttled to one a second: wait for one after the typing.
        out += read_terminal(primary, time.monotonic() + 5, stop=b"WARNING")
        assert b"WARNING" in out[typed:], out
        os.write(primary, b"\x15quit\n")  # Ctrl-U empties the line; then leave
        assert chat.wait(timeout=10) == 0
    finally:
        chat.kill()
        os.close(primary)
    terminal = pyte.Screen(columns, rows)
    pyte.ByteStream(terminal).feed(out)
    shown = [line.rstrip() for line in terminal.display]
    assert shown[terminal.cursor.y] == "> partial", shown
    records = [line for line in shown if "WARNING" in line]
    assert records, shown
    assert all(line.startswith("udpchat.client WARNING server unreachable") for line in records), (
        shown
    )


class Serve:
    """`udpchat serve` on a free port, up and serving."""

    def __init__(self) -> None:
        self.popen = subprocess.Popen(
            udpchat("serve", "--port", "0"),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            env=ENV,
        )
        assert self.popen.stderr is not None
        os.set_blocking(self.popen.stderr.fileno(), False)
        self.err = b""
        deadline = time.monotonic() + 10
        while b"serving on" not in self.err and time.monotonic() < deadline:
            select.select([self.popen.stderr], [], [], 0.1)
            self.err += self.popen.stderr.read() or b""
        assert b"serving on" in self.err, self.err

    def finish(self) -> tuple[int, str]:
        try:
            code = self.popen.wait(timeout=10)
        finally:
            self.popen.kill()
        assert self.popen.stderr is not None
        os.set_blocking(self.popen.stderr.fileno(), True)
        self.err += self.popen.stderr.read()
        return code, self.err.decode(errors="replace")


PAIRS = [
    (signal.SIGINT, signal.SIGINT),
    (signal.SIGINT, signal.SIGTERM),
    (signal.SIGTERM, signal.SIGTERM),
    (signal.SIGTERM, signal.SIGINT),
]


def test_serve_stops_cleanly_on_two_signals_in_a_row() -> None:
    # 0.1: the second signal landed in stop() and printed a traceback, 14 runs in 20.
    failures = []
    for run in range(12):
        first, second = PAIRS[run % len(PAIRS)]
        serve = Serve()
        serve.popen.send_signal(first)
        serve.popen.send_signal(second)
        code, err = serve.finish()
        if code != 0 or "Traceback" in err or "stopped serving on" not in err:
            failures.append((run, first.name, second.name, code, err[-600:]))
    assert failures == []


def test_chat_leaves_cleanly_on_two_signals_in_a_row(fake_server: socket.socket) -> None:
    # SIGTERM leaves like Ctrl-C (0.1: killed by it, exit -15); a second signal changes nothing.
    failures = []
    for run in range(8):
        first, second = PAIRS[run % len(PAIRS)]
        chat = subprocess.Popen(
            udpchat("chat", "--port", str(fake_server.getsockname()[1])),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=ENV,
        )
        try:
            got = b""
            deadline = time.monotonic() + 10
            while got != b"reg" and time.monotonic() < deadline:
                with contextlib.suppress(TimeoutError):
                    got = fake_server.recv(100).strip()
            assert got == b"reg"
            time.sleep(0.1)  # past start-up, into the reading loop
            chat.send_signal(first)
            chat.send_signal(second)
            _, err = chat.communicate(timeout=10)
        finally:
            chat.kill()
        left = received_until_quit(fake_server, timeout=2)
        if chat.returncode != 0 or b"Traceback" in err or QUIT not in left:
            failures.append((run, first.name, second.name, chat.returncode, err[-600:], left))
    assert failures == []


def test_serve_says_it_cannot_bind_without_warning_about_validate_first() -> None:
    # 192.0.2.1 (TEST-NET-1) is no address of this host: binding it fails, nothing is sent.
    # 0.1 warned "serving 192.0.2.1 without --validate" before failing to bind.
    proc = subprocess.run(
        udpchat("serve", "--ip", "192.0.2.1", "--port", "0"),
        capture_output=True,
        text=True,
        env=ENV,
        timeout=20,
    )
    assert proc.returncode == 1, proc.stderr
    assert "without --validate" not in proc.stderr
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1] == (
        "udpchat: cannot serve on 192.0.2.1:0: Cannot assign requested address"
    ), proc.stderr


def test_exit_codes() -> None:
    def code(*args: str) -> tuple[int, str]:
        proc = subprocess.run(
            udpchat(*args),
            capture_output=True,
            text=True,
            env=ENV,
            timeout=20,
            stdin=subprocess.DEVNULL,
        )
        assert "Traceback" not in proc.stderr, proc.stderr
        return proc.returncode, proc.stderr

    # 2: bad arguments, judged by argparse or by the constructors, with the subcommand's usage.
    for args, says in [
        (("serve", "--interval", "1e-9"), "interval must be a positive number of seconds in"),
        (("chat", "--interval", "100000"), "interval must be a positive number of seconds in"),
        (("serve", "--port", "70000"), "port must be in 0..65535"),
        (("chat", "--port", "0"), "port must be in 1..65535"),
        (("serve", "--rate-limit", "0"), "rate_limit must be in"),
        (("serve", "--interval", "soon"), "not a number of seconds"),
    ]:
        got, err = code(*args)
        assert got == 2 and says in err and f"usage: udpchat {args[0]}" in err, (args, err)
    # 1: could not start.
    with socket.socket(type=socket.SOCK_DGRAM) as taken:
        taken.bind(("127.0.0.1", 0))
        port = str(taken.getsockname()[1])
        got, err = code("serve", "--port", port)
        assert got == 1 and "Address already in use" in err, err
    # 0: left as asked (end of input here; quit, Ctrl-C, SIGTERM and the server's end above).
    with socket.socket(type=socket.SOCK_DGRAM) as plain:
        plain.bind(("127.0.0.1", 0))
        assert code("chat", "--port", str(plain.getsockname()[1]))[0] == 0
