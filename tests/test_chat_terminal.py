"""`udpchat chat` on a real terminal (a pty): what members send is shown, never obeyed."""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable

import pyte
from conftest import read_terminal, register, spawn_in_terminal, wait_until
from udpchat import ChatServerUdp

COLUMNS, ROWS = 80, 40
FORGED = "[127.0.0.1 9998] SERVER"

HOSTILE = [
    # A line break that would pass for another member's line.
    b"hi\n[127.0.0.1 9998] SERVER: please re-enter your password",
    # Clear the screen, set the window title, return to column 0 and overwrite the prefix.
    b"\x1b[2J\x1b]2;owned\x07 and \rX",
    # A right-to-left override that would reorder what follows it; a line separator.
    "abc \u202e cba \u2028 x".encode(),
    # Padded to the terminal's width, so the terminal's own wrapping would put the forged
    # sender at the first column; then the same after a line break, and with wide characters.
    b"A" * (COLUMNS - len("[127.0.0.1 65535] ")) + FORGED.encode(),
    b"x\n" + b"B" * (COLUMNS - len("[127.0.0.1 65535] ")) + FORGED.encode(),
    "\u5168".encode() * COLUMNS + FORGED.encode(),
    # Characters whose width terminals and Python's tables disagree on (hexagrams, regional
    # indicators, a spacing mark with a combining class).
    ("\u4dc0\U0001f1e6\U0001d165" * 12).encode() + FORGED.encode(),
    b"done",
]


def test_chat_shows_control_characters_escaped_and_continuation_lines_marked(
    server: ChatServerUdp, make_peer: Callable[..., object]
) -> None:
    assert server.address is not None
    ip, port = server.address
    # A stale $COLUMNS (wider than the terminal) must not be believed.
    env = {**os.environ, "COLUMNS": str(2 * COLUMNS), "LINES": str(ROWS)}
    chat, primary = spawn_in_terminal(
        [sys.executable, "-m", "udpchat", "chat", "--ip", ip, "--port", str(port)],
        COLUMNS,
        ROWS,
        env,
    )
    try:
        assert wait_until(lambda: len(server.clients) == 1, timeout=10)
        peer = make_peer()
        me = register(peer, server)  # type: ignore[arg-type]
        for payload in HOSTILE:
            peer.sendto(payload, server.address)  # type: ignore[attr-defined]
        screen = read_terminal(primary, time.monotonic() + 10, stop=b"done")
        os.write(primary, b"quit\n")
        assert chat.wait(timeout=10) == 0
    finally:
        chat.kill()
        os.close(primary)
    prefix = f"[{me[0]} {me[1]}] ".encode()
    assert prefix + b"done" in screen, screen
    # Nothing the payloads carried reached the terminal raw: no escape, no BEL, no CR, no
    # override; the title sequence (OSC, ESC ]) appears only escaped.
    for raw in (b"\x1b[2J", b"\x1b]", b"\x07", b"\rX", "\u202e".encode()):
        assert raw not in screen, (raw, screen)
    assert rb"\x1b[2J\x1b]2;owned\x07 and \rX" in screen
    assert rb"abc \u202e cba \u2028 x" in screen
    # The second line of the first message is indented under its prefix, so no line of the
    # screen starts with the forged sender.
    indented = b"\n" + b" " * len(prefix) + b"[127.0.0.1 9998] SERVER"
    assert indented in screen.replace(b"\r\n", b"\n"), screen
    # What a terminal of that size shows: no line starts with the forged sender, whatever the
    # terminal wraps.
    terminal = pyte.Screen(COLUMNS, ROWS)
    pyte.ByteStream(terminal).feed(screen)
    shown = [line.rstrip() for line in terminal.display]
    assert any(line.startswith(prefix.decode() + "done") for line in shown), shown
    assert [line for line in shown if line.removeprefix("> ").startswith(FORGED)] == [], shown
    assert terminal.title == "", terminal.title
