"""The ``udpchat`` command: ``udpchat serve`` runs a server, ``udpchat chat`` joins one."""

from __future__ import annotations

import argparse
import contextlib
import ipaddress
import logging
import shutil
import signal
import sys
import threading
import unicodedata
from collections.abc import Sequence
from types import FrameType
from typing import TextIO

from ._udpchat import ChatClientUdp, ChatServerUdp, Message, __version__

PROMPT = "> "
# Sent by `chat`'s printing thread to its main thread when the server ends the chat.
WAKE_SIGNAL = signal.SIGUSR1


class _ServerEnded(Exception):
    """Raised in `chat`'s main thread, waiting for input, when the server has ended the chat."""


def _interval(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds, got {text}")
    return value


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="udpchat", description=__doc__)
    parser.add_argument("--version", action="version", version=f"udpchat {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="run a chat server until Ctrl-C")
    serve.add_argument("--ip", default="127.0.0.1", help="address to bind (default: %(default)s)")
    serve.add_argument(
        "--port", type=int, default=9998, help="port to bind, 0 for any (default: %(default)s)"
    )
    serve.add_argument(
        "--interval",
        type=_interval,
        default=10.0,
        help="drop clients silent for this many seconds (default: %(default)s)",
    )
    serve.add_argument(
        "--validate",
        action="store_true",
        help="validated mode: clients prove their address before they are served",
    )
    serve.add_argument(
        "--rate-limit",
        type=float,
        metavar="PER_SECOND",
        help="datagrams per second each source IP may send (default: no limit)",
    )
    chat = commands.add_parser("chat", help="join a chat server: type lines to send them")
    chat.add_argument("--ip", default="127.0.0.1", help="server address (default: %(default)s)")
    chat.add_argument("--port", type=int, default=9998, help="server port (default: %(default)s)")
    chat.add_argument(
        "--interval",
        type=_interval,
        default=5.0,
        help="seconds between heartbeats (default: %(default)s)",
    )
    return parser


def _raise_interrupt(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt


def serve(ip: str, port: int, interval: float, validate: bool, rate_limit: float | None) -> int:
    """Run a server until SIGINT or SIGTERM, logging joins, leaves and expiries."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    server = ChatServerUdp(ip, port, interval, validate=validate, rate_limit=rate_limit)
    if not validate and not ipaddress.ip_address(ip).is_loopback:
        logging.getLogger("udpchat").warning(
            "serving %s without --validate: anyone who can reach it can register a forged "
            "address and turn it into a flood against a third party",
            ip,
        )
    signal.signal(signal.SIGTERM, _raise_interrupt)
    # An untimed wait is interruptible on POSIX: SIGINT and SIGTERM land in it, and leaving the
    # `with` sends `end` to every client.
    with server, contextlib.suppress(KeyboardInterrupt):
        threading.Event().wait()
    return 0


def _typed_so_far() -> str:
    try:
        import readline
    except ImportError:
        return ""
    return readline.get_line_buffer()


def _escaped(text: str) -> str:
    """`text` with every control and format character (C0, DEL, C1, bidi overrides...), line and
    paragraph separator and backslash written as Python's `repr` writes it, so a payload cannot
    move the cursor, clear the screen, set the terminal's title, reorder or break what is shown,
    nor pass text for an escape."""
    return "".join(
        repr(ch)[1:-1] if ch == "\\" or (unicodedata.category(ch)[0] in "CZ" and ch != " ") else ch
        for ch in text
    )


def _columns(ch: str) -> int:
    """The columns a terminal gives `ch`: 2 for East Asian wide, 0 for combining marks."""
    if unicodedata.combining(ch) or unicodedata.category(ch) == "Me":
        return 0
    return 2 if unicodedata.east_asian_width(ch) in "WF" else 1


def _wrap(line: str, width: int) -> list[str]:
    """`line` cut into pieces of at most `width` columns (at least one character each)."""
    pieces, piece, used = [], "", 0
    for ch in line:
        w = _columns(ch)
        if piece and used + w > width:
            pieces.append(piece)
            piece, used = "", 0
        piece, used = piece + ch, used + w
    return [*pieces, piece]


def _format(msg: Message, width: int | None = None) -> str:
    """A message as the terminal shows it: `[ip port] text`, each further line of the message
    indented under the first, so a line break in a payload cannot pass for another sender. On a
    terminal `width` columns wide, lines are wrapped here, each piece indented, rather than left
    for the terminal to wrap: a payload padded to the width could otherwise start a line of its
    own at the first column."""
    prefix = f"[{msg.sender[0]} {msg.sender[1]}] " if msg.sender is not None else "[server] "
    lines = [_escaped(line) for line in msg.text.split("\n")]
    indent = len(prefix)
    if width is not None:
        # The last column stays empty: some terminals wrap on writing it.
        indent = min(indent, width // 2)
        head = _wrap(lines[0], max(width - 1 - len(prefix), 1))[0]
        tail = lines[0][len(head) :]
        rest = ([tail] if tail else []) + lines[1:]
        lines = [head, *(piece for line in rest for piece in _wrap(line, width - 1 - indent))]
    return prefix + ("\n" + " " * indent).join(lines)


def _show(msg: Message, out: TextIO, interactive: bool) -> None:
    line = _format(msg, shutil.get_terminal_size().columns if out.isatty() else None)
    if interactive:
        # Print above the prompt and redraw it with what was typed so far.
        out.write(f"\r\x1b[K{line}\n{PROMPT}{_typed_so_far()}")
    else:
        out.write(line + "\n")
    out.flush()


def chat(ip: str, port: int, interval: float) -> int:
    """The tutorial's interactive client: each line typed is sent, broadcasts print as they come."""
    logging.basicConfig(level=logging.WARNING, format="%(name)s %(levelname)s %(message)s")
    interactive = sys.stdin.isatty() and sys.stdout.isatty()
    if interactive:
        with contextlib.suppress(ImportError):  # not on every platform: only line editing is lost
            import readline  # noqa: F401  (once imported, input() edits lines with it)
    client = ChatClientUdp(ip, port, interval)
    client.start()
    ended = threading.Event()
    # Set while the main thread waits in input(): only then does the server's `end` interrupt it.
    reading = threading.Event()

    def wake(signum: int, frame: FrameType | None) -> None:
        if reading.is_set():
            raise _ServerEnded

    def show_messages() -> None:
        for msg in client:
            _show(msg, sys.stdout, interactive)
        if not ended.is_set():
            # A real signal, so the main thread's blocking read returns EINTR and sees it; its
            # own (not SIGINT), so it works where SIGINT is ignored and nobody mistakes it for
            # Ctrl-C.
            main_thread = threading.main_thread().ident
            assert main_thread is not None
            signal.pthread_kill(main_thread, WAKE_SIGNAL)

    signal.signal(WAKE_SIGNAL, wake)
    printer = threading.Thread(target=show_messages, name="udpchat-chat-print", daemon=True)
    try:
        printer.start()
        while client.running and not ended.is_set():
            reading.set()
            try:
                line = input(PROMPT if interactive else "")
            except EOFError:
                break
            finally:
                reading.clear()
            if line.strip() == "quit":
                break
            if line.strip():
                try:
                    client.send(line)
                except ValueError as e:  # too long for any server to relay: said, and go on
                    print(f"udpchat: not sent: {e}", file=sys.stderr)
    except (KeyboardInterrupt, _ServerEnded):
        pass
    finally:
        ended.set()
        # Not running before stop(): the server ended the chat (or a thread died, logged).
        by_server = not client.running
        client.stop()
        printer.join(timeout=1.0)
    if by_server:
        sys.stdout.write(("\r\x1b[K" if interactive else "") + "the server ended the chat\n")
        sys.stdout.flush()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        if args.command == "serve":
            return serve(args.ip, args.port, args.interval, args.validate, args.rate_limit)
        return chat(args.ip, args.port, args.interval)
    except ValueError as e:  # a bad --ip or --port, as the constructors judge it
        parser.error(str(e))
    except OSError as e:  # e.g. the port is in use
        print(f"udpchat: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
