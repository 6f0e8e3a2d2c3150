"""The command line: `udpchat serve` and `udpchat chat` as subprocesses exchanging lines."""

from __future__ import annotations

import fcntl
import json
import os
import pty
import queue
import re
import select
import signal
import socket
import struct
import subprocess
import sys
import sysconfig
import termios
import threading
import time
from collections.abc import Callable, Iterator
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

    def __init__(
        self,
        *args: str,
        env: dict[str, str] = ENV,
        read_stdout: bool = True,
        stdout: int = subprocess.PIPE,
    ) -> None:
        self.popen = subprocess.Popen(
            [sys.executable, "-m", "udpchat", *args],
            stdin=subprocess.PIPE,
            stdout=stdout,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        self.lines: dict[str, queue.Queue[str]] = {"stdout": queue.Queue(), "stderr": queue.Queue()}
        self.pumps: dict[str, threading.Thread] = {}
        streams = [("stdout", self.popen.stdout)] if read_stdout and self.popen.stdout else []
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


def _unread(stream: IO[str]) -> int:
    """Bytes written into a pipe and not read from it yet."""
    buf = fcntl.ioctl(stream.fileno(), termios.FIONREAD, b"\0\0\0\0")
    return int(struct.unpack("i", buf)[0])


def _churn(address: tuple[str, int], socks: list[socket.socket]) -> None:
    """Each socket joins (`reg`) and leaves (`quit`): two events each, about 100 bytes of JSON."""
    for sock in socks:
        sock.sendto(b"reg", address)
    for sock in socks:
        sock.sendto(b"quit", address)
    time.sleep(0.002)  # a burst the server's receive buffer holds, then a pause


def _fill(address: tuple[str, int], socks: list[socket.socket], stdout: IO[str]) -> None:
    """Events until the pipe to `stdout` is full, and as much again for the server to hold."""
    # Full: it holds no more, however many events come. (Lines are written whole, so its pages
    # are not all filled to the last byte.)
    capacity = fcntl.fcntl(stdout.fileno(), fcntl.F_GETPIPE_SZ)
    unread, same = 0, 0
    for _ in range(1000):  # at most 100,000 events
        _churn(address, socks)
        same, unread = (same + 1 if _unread(stdout) == unread else 0), _unread(stdout)
        if unread >= capacity // 2 and same >= 10:
            break
    else:
        pytest.fail(f"the pipe never filled: {unread} of {capacity} bytes")
    for _ in range(capacity // (100 * 2 * len(socks)) + 1):
        _churn(address, socks)


def _seqs(lines: list[str]) -> list[int]:
    """The `seq` of each line, every one a whole JSON event, in increasing order."""
    seqs = []
    for line in lines:
        seq = _event(line)["seq"]
        assert isinstance(seq, int), line
        seqs.append(seq)
    assert seqs == sorted(set(seqs)), "out of order"
    return seqs


def _logged(logs: list[str], pattern: str) -> int:
    """The number in the one log line matching `pattern`, 0 if there is none."""
    found = [m for line in logs if (m := re.search(pattern, line))]
    assert len(found) <= 1, found
    return int(found[0].group(1)) if found else 0


@pytest.mark.parametrize("signals", [1, 2])
def test_serve_events_stops_at_once_when_nobody_reads_its_stdout(
    signals: int,
    many_sockets: Callable[[int], list[socket.socket]],
    figure: Callable[[str], None],
) -> None:
    # `udpchat serve --events | less`, the pager paused: the pipe fills, and SIGTERM must still
    # stop the server, end its clients' chat and exit, with whole lines in the pipe: after 2 s
    # of trying to write the rest, or at a second SIGTERM.
    server = Proc(
        "serve", "--port", "0", "--interval", "5", "--events", env=BUFFERED, read_stdout=False
    )
    stdout = server.popen.stdout
    assert stdout is not None
    try:
        m = server.expect("stderr", r"serving on 127\.0\.0\.1:(\d+)")
        address = ("127.0.0.1", int(m.group(1)))
        stayers = many_sockets(2)
        for sock in stayers:
            sock.sendto(b"reg", address)
        _fill(address, many_sockets(50), stdout)
        start = time.monotonic()
        server.popen.send_signal(signal.SIGTERM)
        if signals == 2:
            time.sleep(0.3)
            server.popen.send_signal(signal.SIGTERM)
        try:
            code = server.popen.wait(10)
        except subprocess.TimeoutExpired:
            pytest.fail("still running 10 s after SIGTERM")
        took = time.monotonic() - start
        figure(
            f"serve --events, stdout a full pipe nobody reads: SIGTERM to exit {took:.3f} s"
            + (" (a second SIGTERM 0.3 s after the first)" if signals == 2 else "")
        )
        assert code == 0
        assert took < (1.5 if signals == 2 else 10)
        assert [recv(sock, timeout=0.1) for sock in stayers] == [b"end", b"end"]
        # What did reach the pipe is whole lines, in order; the rest is counted in the logs.
        seqs = _seqs(stdout.readlines())
        logs = server.rest("stderr")
        assert _logged(logs, r"(\d+) events not written") > 0, logs
        assert ("before a second signal" in "".join(logs)) == (signals == 2), logs
        assert "Traceback" not in "".join(logs), logs
        assert len(seqs) > 400, len(seqs)
    finally:
        server.close()


def test_serve_events_gives_a_slow_reader_every_event_in_order_or_counts_it_dropped(
    many_sockets: Callable[[int], list[socket.socket]],
) -> None:
    # A reader slower than the events: the server's own queue fills and drops what does not fit
    # (a gap in seq); meanwhile, and once the reader has paused with the pipe full, SIGTERM ends
    # the clients' chat at once; the reader then reads on and gets the rest, stop leaves last.
    server = Proc(
        "serve", "--port", "0", "--interval", "5", "--events", env=BUFFERED, read_stdout=False
    )
    stdout = server.popen.stdout
    assert stdout is not None
    fd = stdout.fileno()  # read as bytes, Python's buffer bypassed
    got = bytearray()
    try:
        m = server.expect("stderr", r"serving on 127\.0\.0\.1:(\d+)")
        address = ("127.0.0.1", int(m.group(1)))
        stayers = many_sockets(2)
        for sock in stayers:
            sock.sendto(b"reg", address)
        socks = many_sockets(50)
        # 20,000 events (2 MB), 4 KB read after each 100 (10 KB): more than the queue holds.
        for _ in range(200):
            _churn(address, socks)
            got += os.read(fd, 4096)
        # The reader catches up: nothing more to read for half a second.
        while select.select([fd], [], [], 0.5)[0]:
            got += os.read(fd, 65536)
        # Paused: the pipe fills again, the server holds the rest, and SIGTERM.
        _fill(address, socks, stdout)
        server.popen.send_signal(signal.SIGTERM)
        assert [recv(sock, timeout=1.0) for sock in stayers] == [b"end", b"end"]
        while data := os.read(fd, 65536):  # reads on, to the end
            got += data
        assert server.popen.wait(5) == 0
        lines = got.decode().splitlines(keepends=True)
        seqs = _seqs(lines)
        logs = server.rest("stderr")
        dropped = _logged(logs, r"(\d+) events dropped")
        assert dropped > 0, logs  # the queue did fill
        # Every seq up to the last is here, but those the queue dropped.
        assert seqs[-1] == len(seqs) + dropped, (len(seqs), dropped, seqs[-1])
        # Last, a stop leave for each client still registered (a churning one whose `quit` was
        # lost too).
        reasons = [json.loads(line)["reason"] for line in lines]
        stops = reasons.count("stop")
        assert stops >= 2 and reasons[-stops:] == ["stop"] * stops, reasons[-5:]
        left = {tuple(json.loads(line)["addr"]) for line in lines[-stops:]}
        assert {sock.getsockname() for sock in stayers} <= left
        assert not _logged(logs, r"(\d+) events not written"), logs
    finally:
        server.close()


def test_serve_events_stops_on_a_terminal_that_takes_a_little_then_nothing(
    many_sockets: Callable[[int], list[socket.socket]], figure: Callable[[str], None]
) -> None:
    # `udpchat serve --events` on a terminal that stops showing output (its logs go elsewhere).
    # A terminal says it takes a write when it has room for one byte, then takes what fits and
    # waits for room for the rest: after SIGTERM, room for a few bytes must not let the last
    # writes wait past their 2 s.
    primary, secondary = pty.openpty()
    server = Proc(
        "serve", "--port", "0", "--interval", "5", "--events", env=BUFFERED, stdout=secondary
    )
    os.close(secondary)
    try:
        m = server.expect("stderr", r"serving on 127\.0\.0\.1:(\d+)")
        address = ("127.0.0.1", int(m.group(1)))
        stayers = many_sockets(2)
        for sock in stayers:
            sock.sendto(b"reg", address)
        socks = many_sockets(50)
        for _ in range(60):  # 6,000 events, 600 KB: far more than the terminal holds
            _churn(address, socks)
        start = time.monotonic()
        server.popen.send_signal(signal.SIGTERM)
        assert [recv(sock, timeout=1.0) for sock in stayers] == [b"end", b"end"]
        os.read(primary, 300)  # a little room, then no more
        try:
            code = server.popen.wait(10)
        except subprocess.TimeoutExpired:
            pytest.fail("still running 10 s after SIGTERM")
        took = time.monotonic() - start
        figure(f"serve --events, a terminal that stops reading: SIGTERM to exit {took:.3f} s")
        assert code == 0
        logs = server.rest("stderr")
        assert _logged(logs, r"(\d+) events not written") > 0, logs
        assert "Traceback" not in "".join(logs), logs
    finally:
        server.close()
        os.close(primary)
