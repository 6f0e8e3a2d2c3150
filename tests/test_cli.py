"""The command line: `udpchat serve` and `udpchat chat` as subprocesses exchanging lines."""

from __future__ import annotations

import os
import queue
import re
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

ENV = {**os.environ, "PYTHONUNBUFFERED": "1"}


class Proc:
    """A `python -m udpchat` subprocess whose output lines are read by threads, so a test can
    wait for a line with a timeout."""

    def __init__(self, *args: str) -> None:
        self.popen = subprocess.Popen(
            [sys.executable, "-m", "udpchat", *args],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=ENV,
        )
        self.lines: dict[str, queue.Queue[str]] = {"stdout": queue.Queue(), "stderr": queue.Queue()}
        for name, stream in (("stdout", self.popen.stdout), ("stderr", self.popen.stderr)):
            pump = threading.Thread(target=self._pump, args=(stream, self.lines[name]), daemon=True)
            pump.start()

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
