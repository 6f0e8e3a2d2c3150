"""The command line: `udpchat serve` and `udpchat chat` as subprocesses exchanging lines."""

from __future__ import annotations

import json
import os
import queue
import re
import select
import signal
import socket
import subprocess
import sys
import sysconfig
import threading
import time
from collections.abc import Iterator
from typing import IO

import pytest
from conftest import ack, main_thread_asleep, recv, wait_until
from udpchat import ChatServerUdp
from udpchat.__main__ import _EventLines

ENV = {**os.environ, "PYTHONUNBUFFERED": "1"}
# Python's own buffering, as a user's pipeline gets it: output not flushed is not seen.
BUFFERED = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}


class Proc:
    """A `python -m udpchat` subprocess whose output lines are read by threads, so a test can
    wait for a line with a timeout."""

    def __init__(self, *args: str, env: dict[str, str] = ENV, read_stdout: bool = True) -> None:
        self.popen = subprocess.Popen(
            [sys.executable, "-m", "udpchat", *args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        self.lines: dict[str, queue.Queue[str]] = {"stdout": queue.Queue(), "stderr": queue.Queue()}
        self.pumps: dict[str, threading.Thread] = {}
        streams = [("stdout", self.popen.stdout)] if read_stdout else []
        for name, stream in [*streams, ("stderr", self.popen.stderr)]:
            pump = threading.Thread(target=self._pump, args=(stream, self.lines[name]), daemon=True)
            pump.start()
            self.pumps[name] = pump

    @staticmethod
    def _pump(stream: IO[str], lines: queue.Queue[str]) -> None:
        for line in stream:
            lines.put(line)

    def expect(self, stream: str, pattern: str, timeout: float = 5.0) -> re.Match[str]:
        """Waits up to `timeout` seconds for a line of `stream` that matches `pattern`."""
        deadline = time.monotonic() + timeout
        seen = []
        while (left := deadline - time.monotonic()) > 0:
            try:
                line = self.lines[stream].get(timeout=left)
            except queue.Empty:
                break
            seen.append(line)
            if m := re.search(pattern, line):
                return m
        pytest.fail(f"no {stream} line matching {pattern!r} in {seen!r}")

    def rest(self, stream: str, timeout: float = 5.0) -> list[str]:
        """The lines of `stream` not yet taken, up to its end (the process has exited)."""
        self.pumps[stream].join(timeout)
        assert not self.pumps[stream].is_alive(), f"{stream} still open after {timeout} s"
        lines = []
        while not self.lines[stream].empty():
            lines.append(self.lines[stream].get())
        return lines

    def write(self, text: str) -> None:
        assert self.popen.stdin is not None
        self.popen.stdin.write(text)
        self.popen.stdin.flush()

    def close(self) -> None:
        self.popen.kill()
        self.popen.wait(5)


@pytest.fixture
def served() -> Iterator[tuple[Proc, tuple[str, int]]]:
    proc = Proc("serve", "--port", "0", "--interval", "5")
    try:
        m = proc.expect("stderr", r"serving on 127\.0\.0\.1:(\d+)")
        yield proc, ("127.0.0.1", int(m.group(1)))
    finally:
        proc.close()


def test_serve_and_chat_exchange_a_line(served: tuple[Proc, tuple[str, int]]) -> None:
    server, address = served
    chat = Proc("chat", "--port", str(address[1]))
    try:
        server.expect("stderr", r"joined")
        with socket.socket(type=socket.SOCK_DGRAM) as peer:
            peer.bind(("127.0.0.1", 0))
            peer.sendto(b"reg", address)
            server.expect("stderr", r"joined")
            chat.write("hello from chat\n")
            line = chat.expect("stdout", r"hello from chat").string
            data = recv(peer)
            ip, port = re.match(rb"ack: (\S+) (\d+)\n", data).groups()  # type: ignore[union-attr]
            assert data == ack((ip.decode(), int(port)), b"hello from chat")
            assert line == f"[{ip.decode()} {int(port)}] hello from chat\n"
            # A line from a plain socket reaches the chat too.
            peer.sendto(b"hi chat\n", address)
            chat.expect("stdout", r"\] hi chat$")
        chat.write("quit\n")
        assert chat.popen.wait(5) == 0
        server.expect("stderr", r"left")
        # Ctrl-C stops the server cleanly.
        server.popen.send_signal(signal.SIGINT)
        assert server.popen.wait(5) == 0
        server.expect("stderr", r"stopped serving on .*; sent end to 1 clients")
        # Without --events, logs only.
        assert server.rest("stdout") == []
    finally:
        chat.close()


def test_chat_exits_when_the_server_ends(served: tuple[Proc, tuple[str, int]]) -> None:
    server, address = served
    chat = Proc("chat", "--port", str(address[1]))
    try:
        server.expect("stderr", r"joined")
        # At its prompt: it has relayed a line, and its main thread is asleep again, which after
        # that can only be reading the next line. (An `end` before the prompt: the next test.)
        chat.write("ping\n")
        chat.expect("stdout", r"\] ping$")
        assert wait_until(lambda: main_thread_asleep(chat.popen.pid), timeout=5, step=0.005)
        server.popen.send_signal(signal.SIGTERM)
        assert server.popen.wait(5) == 0
        chat.expect("stdout", r"the server ended the chat")
        assert chat.popen.wait(5) == 0
    finally:
        chat.close()


def test_chat_says_the_server_ended_it_even_before_its_first_prompt() -> None:
    # A plain socket plays the server and answers the chat's `reg` with `end` at once.
    with socket.socket(type=socket.SOCK_DGRAM) as server:
        server.bind(("127.0.0.1", 0))
        server.settimeout(5)
        chat = Proc("chat", "--port", str(server.getsockname()[1]))
        try:
            _, addr = server.recvfrom(100)
            server.sendto(b"end", addr)
            chat.expect("stdout", r"the server ended the chat")
            assert chat.popen.wait(5) == 0
        finally:
            chat.close()


def test_chat_leaves_on_end_of_input(served: tuple[Proc, tuple[str, int]]) -> None:
    server, address = served
    chat = Proc("chat", "--port", str(address[1]))
    assert chat.popen.stdin is not None
    chat.popen.stdin.close()
    assert chat.popen.wait(5) == 0
    server.expect("stderr", r"left")


def test_bad_arguments_exit_with_usage() -> None:
    usage = Proc("serve", "--interval", "0")
    assert usage.popen.wait(5) == 2
    usage.expect("stderr", "positive number of seconds")
    bad_ip = Proc("serve", "--ip", "localhost", "--port", "0")
    assert bad_ip.popen.wait(5) == 2
    bad_ip.expect("stderr", "ip must be an IPv4 or IPv6 address")


def test_console_script_is_installed() -> None:
    # Where pip put it, whether or not that directory is on PATH here.
    exe = os.path.join(sysconfig.get_path("scripts"), "udpchat")
    assert os.access(exe, os.X_OK), exe
    out = subprocess.run([exe, "--version"], capture_output=True, text=True, timeout=10)
    assert out.returncode == 0 and out.stdout.startswith("udpchat ")


def _event(line: str) -> dict[str, object]:
    """One line of `serve --events`: a JSON object with exactly these keys, in this order."""
    assert line.endswith("\n"), line
    fields = json.loads(line)
    assert isinstance(fields, dict), line
    assert list(fields) == ["seq", "kind", "reason", "addr", "time"], line
    assert isinstance(fields["time"], float) and abs(fields["time"] - time.time()) < 60, line
    return fields


def _fields(seq: int, kind: str, reason: str, addr: tuple[str, int]) -> dict[str, object]:
    return {"seq": seq, "kind": kind, "reason": reason, "addr": list(addr)}


def test_serve_events_prints_each_event_as_a_json_line() -> None:
    # Buffered as in a real pipeline: each line must be flushed to be seen before the stop.
    server = Proc("serve", "--port", "0", "--interval", "5", "--events", env=BUFFERED)
    peers = [socket.socket(type=socket.SOCK_DGRAM) for _ in range(3)]
    try:
        m = server.expect("stderr", r"serving on 127\.0\.0\.1:(\d+)")
        address = ("127.0.0.1", int(m.group(1)))
        for peer in peers:
            peer.bind(("127.0.0.1", 0))
        a, b, c = (peer.getsockname() for peer in peers)

        def next_event() -> dict[str, object]:
            fields = _event(server.expect("stdout", r"", timeout=5).string)
            return {k: v for k, v in fields.items() if k != "time"}

        # Each event as it happens, while the server runs.
        peers[0].sendto(b"reg", address)
        assert next_event() == _fields(1, "join", "reg", a)
        peers[1].sendto(b"hello", address)
        assert next_event() == _fields(2, "join", "message", b)
        assert recv(peers[1]) == ack(b, b"hello")
        peers[0].sendto(b"quit", address)
        assert next_event() == _fields(3, "leave", "quit", a)
        peers[2].sendto(b"^hb^", address)
        assert next_event() == _fields(4, "join", "heartbeat", c)
        server.popen.send_signal(signal.SIGINT)
        assert server.popen.wait(5) == 0
        # The clients still registered got `end`, and a 'stop' leave each, printed before the
        # process exited; nothing else is on stdout.
        assert recv(peers[1]) == b"end" and recv(peers[2]) == b"end"
        rest = [_event(line) for line in server.rest("stdout")]
        assert sorted((e["seq"], e["kind"], e["reason"]) for e in rest) == [
            (5, "leave", "stop"),
            (6, "leave", "stop"),
        ]
        assert sorted(tuple(e["addr"]) for e in rest) == sorted([b, c])  # type: ignore[arg-type]
        # The logs are on stderr, and no event is.
        logs = server.rest("stderr")
        assert any(re.search(r"stopped serving on .*; sent end to 2 clients", x) for x in logs)
        assert not [x for x in logs if x.lstrip().startswith("{")], logs
    finally:
        for peer in peers:
            peer.close()
        server.close()


def test_serve_events_stops_quietly_once_stdout_is_closed() -> None:
    # `udpchat serve --events | head -1`: the reader takes one line and goes.
    server = Proc(
        "serve", "--port", "0", "--interval", "5", "--events", env=BUFFERED, read_stdout=False
    )
    try:
        m = server.expect("stderr", r"serving on 127\.0\.0\.1:(\d+)")
        address = ("127.0.0.1", int(m.group(1)))
        with socket.socket(type=socket.SOCK_DGRAM) as peer:
            peer.bind(("127.0.0.1", 0))
            peer.sendto(b"reg", address)
            stdout = server.popen.stdout
            assert stdout is not None
            assert select.select([stdout], [], [], 5)[0], "no event printed"
            assert '"kind": "join"' in stdout.readline()
            # Nothing more is sent: the server sees the pipe closed without writing to it.
            stdout.close()
            assert server.popen.wait(5) == 0
            assert recv(peer) == b"end"  # stopped as on a signal
        logs = "".join(server.rest("stderr"))
        assert "stopping: standard output was closed" in logs
        assert "stopped serving on" in logs
        assert "Traceback" not in logs and "Exception" not in logs, logs
    finally:
        server.close()


def test_event_lines_stop_quietly_when_the_reader_is_gone() -> None:
    # What `serve --events` writes with, on pipes whose reader closes: no exception, whether
    # it finds out by writing (EPIPE) or by looking (poll).
    with ChatServerUdp(port=0) as server, socket.socket(type=socket.SOCK_DGRAM) as peer:
        peer.sendto(b"reg", server.address)
        ev = server.next_event(timeout=5)
    assert ev is not None
    for find_out_by_writing in (True, False):
        r, w = os.pipe()
        with open(w, "w") as out:
            lines = _EventLines(out)
            assert lines.write([ev]) and not lines.reader_gone()
            assert select.select([r], [], [], 5)[0], "not flushed"
            assert os.read(r, 1000).decode() == _EventLines.line(ev) + "\n"
            os.close(r)
            if find_out_by_writing:
                assert not lines.write([ev])
            assert lines.reader_gone() and lines.closed
            assert not lines.write([ev])


def test_event_lines_leave_nothing_to_complain_about_at_exit() -> None:
    # A write that failed leaves its line in Python's buffer, which Python flushes again at
    # exit: the output must go nowhere by then, or that flush fails with a message on stderr.
    code = (
        "import sys, types\n"
        "from udpchat.__main__ import _EventLines\n"
        "ev = types.SimpleNamespace(seq=1, kind='join', reason='reg', addr=('::1', 1), time=1.0)\n"
        "lines = _EventLines(sys.stdout)\n"
        "assert not lines.write([ev]) and lines.closed\n"
    )
    r, w = os.pipe()
    os.close(r)
    try:
        done = subprocess.run(
            [sys.executable, "-c", code],
            stdout=w,
            stderr=subprocess.PIPE,
            text=True,
            env=BUFFERED,
            timeout=10,
        )
    finally:
        os.close(w)
    assert (done.returncode, done.stderr) == (0, "")
