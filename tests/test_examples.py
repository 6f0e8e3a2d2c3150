"""The scripts in examples/ run as the README says: the tour of the awaitable methods; the echo
bot, which answers other senders and never a reply, and leaves when the server ends the chat or
on a signal; the lobby, which greets, says who left, and stops on a signal. Each runs as a
subprocess against real sockets on 127.0.0.1.

The examples are in the clone only: where the tests run without them (the wheel's test run
copies tests/ and pyproject.toml alone), these tests skip. In the clone a missing script fails.
"""

from __future__ import annotations

import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO

import pytest
from udpchat import ChatClientUdp, ChatServerUdp, Message

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
WAIT = 10.0  # seconds: a bound for anything that takes milliseconds


def example(name: str) -> Path:
    if not EXAMPLES.is_dir():
        pytest.skip(f"no {EXAMPLES} (the tests run outside the clone, as the wheel's run does)")
    path = EXAMPLES / name
    assert path.is_file(), f"{path} is missing from the examples"
    return path


class Script:
    """An example running as `python examples/NAME ARGS...`; its output lines are read by
    threads, so a test can wait for a line with a timeout."""

    def __init__(self, name: str, *args: str) -> None:
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.popen = subprocess.Popen(
            [sys.executable, str(example(name)), *args],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        self.lines: dict[str, queue.Queue[str]] = {"stdout": queue.Queue(), "stderr": queue.Queue()}
        self.seen: dict[str, list[str]] = {"stdout": [], "stderr": []}
        self.pumps = [
            threading.Thread(target=self._pump, args=(stream, self.lines[name]), daemon=True)
            for name, stream in (("stdout", self.popen.stdout), ("stderr", self.popen.stderr))
        ]
        for pump in self.pumps:
            pump.start()

    @staticmethod
    def _pump(stream: IO[str] | None, lines: queue.Queue[str]) -> None:
        assert stream is not None
        for line in stream:
            lines.put(line)

    def expect(self, stream: str, pattern: str, timeout: float = WAIT) -> re.Match[str]:
        """Waits up to `timeout` seconds for a line of `stream` that matches `pattern`."""
        deadline = time.monotonic() + timeout
        while (left := deadline - time.monotonic()) > 0:
            try:
                line = self.lines[stream].get(timeout=left)
            except queue.Empty:
                break
            self.seen[stream].append(line)
            if m := re.search(pattern, line):
                return m
        pytest.fail(f"no {stream} line matching {pattern!r} in {self.seen[stream]!r}{self.log()}")

    def exits(self, timeout: float = WAIT) -> int:
        """Its exit status, once it has exited by itself within `timeout` seconds."""
        try:
            status = self.popen.wait(timeout)
        except subprocess.TimeoutExpired:
            pytest.fail(f"still running {timeout} s later{self.log()}")
        for pump in self.pumps:
            pump.join(WAIT)
        return status

    def log(self) -> str:
        for name, lines in self.lines.items():
            while not lines.empty():
                self.seen[name].append(lines.get())
        return "".join(
            f"\n{name}: {line.rstrip()}" for name in self.seen for line in self.seen[name]
        )

    def kill(self) -> None:
        if self.popen.poll() is None:
            self.popen.kill()
            self.popen.wait(WAIT)


def messages(client: ChatClientUdp, until: float) -> Iterator[Message]:
    while (left := until - time.monotonic()) > 0:
        msg = client.recv(timeout=left)
        if msg is None:
            return
        yield msg


def test_the_asyncio_tour_shows_what_each_awaitable_returns() -> None:
    tour = Script("asyncio_tour.py")
    try:
        assert tour.exits() == 0, tour.log()
        m = tour.expect("stdout", r"^arecv: \('127\.0\.0\.1', (\d+)\) hello$")
        client = rf"\('127\.0\.0\.1', {m[1]}\)"
        # Both sent, both relayed back on loopback within the tour's 0.1 s, as a rule: allow one.
        tour.expect("stdout", r"^arecv_many: \['one'(, 'two')?\]$")
        tour.expect("stdout", rf"^anext_event: join reg {client}$")
        tour.expect("stdout", rf"""^aevents: \["leave quit {client}"\]$""")
        assert "Traceback" not in tour.log()
    finally:
        tour.kill()


@pytest.mark.parametrize("loop", ["asyncio", "uvloop"])
def test_the_echo_bot_answers_others_never_a_reply_and_leaves_when_the_server_ends(
    loop: str,
) -> None:
    with ChatServerUdp(ip="127.0.0.1", port=0) as server:
        assert server.address is not None
        ip, port = server.address
        bot = Script(
            "echo_bot.py", "--ip", ip, "--port", str(port), *(["--uvloop"] * (loop == "uvloop"))
        )
        try:
            joined = server.next_event(timeout=WAIT)
            assert joined is not None, f"the bot did not register{bot.log()}"
            assert (joined.kind, joined.reason) == ("join", "reg")
            bot_address = joined.addr
            bot.expect(
                "stdout", rf"^echo bot \('127\.0\.0\.1', {bot_address[1]}\), server {ip} {port}$"
            )
            with ChatClientUdp(ip, port) as user:
                # A message, a text that looks like a reply (another bot's), and a message: the
                # bot answers the first and the third, and neither the second nor its own
                # answers, which come back to it as to everyone.
                from_bot: list[str] = []

                def until_the_answer_to(text: str) -> None:
                    for msg in messages(user, time.monotonic() + WAIT):
                        if msg.sender == bot_address:
                            from_bot.append(msg.text)
                            if msg.text == f"echo: {text}":
                                return
                    pytest.fail(f"no answer to {text!r}, only {from_bot}{bot.log()}")

                for text in ("hello", "echo: not to be answered", "second"):
                    user.send(text)
                until_the_answer_to("second")
                # Its own answers came back to the bot before "third" does (the server relays
                # in order): an answer to them would come before the answer to "third".
                user.send("third")
                until_the_answer_to("third")
                assert from_bot == ["echo: hello", "echo: second", "echo: third"], bot.log()
                assert server.peers()[bot_address].messages == 3
            server.stop()  # `end` to the bot: its `async for` ends, and so does the script
            assert bot.exits() == 0, bot.log()
            bot.expect("stderr", r"ended the chat")
        finally:
            bot.kill()


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_the_echo_bot_leaves_on_a_signal(signum: signal.Signals) -> None:
    with ChatServerUdp(ip="127.0.0.1", port=0) as server:
        assert server.address is not None
        ip, port = server.address
        bot = Script("echo_bot.py", "--ip", ip, "--port", str(port))
        try:
            bot.expect("stdout", r"^echo bot ")  # running, its signal handlers in place
            joined = server.next_event(timeout=WAIT)
            assert joined is not None and joined.kind == "join", bot.log()
            bot.popen.send_signal(signum)
            assert bot.exits() == 0, bot.log()
            left = server.next_event(timeout=WAIT)
            assert left is not None, f"the bot left without `quit`{bot.log()}"
            assert (left.kind, left.reason, left.addr) == ("leave", "quit", joined.addr)
            assert "Traceback" not in bot.log()
        finally:
            bot.kill()


def test_the_lobby_greets_says_who_left_and_stops_on_a_signal() -> None:
    lobby = Script("lobby.py", "--port", "0")
    try:
        ip, port = lobby.expect("stdout", r"^lobby on (\S+) (\d+)$").groups()
        server_address = (ip, int(port))

        def next_from_server(client: ChatClientUdp) -> str:
            for msg in messages(client, time.monotonic() + WAIT):
                if msg.sender == server_address:
                    return msg.text
            pytest.fail(f"nothing from the lobby{lobby.log()}")

        with ChatClientUdp(ip, int(port)) as alice:
            assert alice.address is not None
            alice_address = alice.address
            a = "{}:{}".format(*alice_address)
            assert next_from_server(alice) == f"welcome {a}"
            bob = ChatClientUdp(ip, int(port))
            bob.start()
            assert bob.address is not None
            b = "{}:{}".format(*bob.address)
            assert next_from_server(alice) == f"welcome {b}"
            bob.stop()
            assert next_from_server(alice) == f"{b} left (quit)"
            lobby.popen.send_signal(signal.SIGTERM)
            assert lobby.exits() == 0, lobby.log()
            assert alice.recv(timeout=WAIT) is None  # the lobby's `end`
            assert not alice.running
        lobby.expect(
            "stdout", rf"^\d+ leave stop {re.escape(alice_address[0])} {alice_address[1]}$"
        )
        assert "Traceback" not in lobby.log()
    finally:
        lobby.kill()
