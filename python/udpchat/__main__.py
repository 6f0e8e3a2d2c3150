"""The ``udpchat`` command: ``udpchat serve`` runs a server, ``udpchat chat`` joins one."""

from __future__ import annotations

import argparse
import contextlib
import io
import ipaddress
import json
import logging
import os
import select
import signal
import sys
import threading
import time
import unicodedata
from collections.abc import Iterable, Sequence
from types import FrameType
from typing import TextIO

from ._udpchat import MAX_DATAGRAM, ChatClientUdp, ChatServerUdp, Event, Message, __version__

PROMPT = "> "
# How long `serve --events` waits for events (or for its output to take what it has) at a time
# before it looks for a signal and for a closed standard output: the most either can wait to be
# noticed.
EVENT_SLICE = 0.1
# `serve --events` holds at most about this many bytes of lines its output has not taken yet:
# past it, it takes no more events from the server, whose own bounded queue then fills and counts
# what it drops.
EVENT_BACKLOG = 64 * 1024
# Events taken from the server at a time.
EVENT_BATCH = 256
# After a stop, how long `serve --events` goes on writing what is left before it drops it.
EVENT_LAST_WRITE = 2.0
# Sent by `chat`'s printing thread to its main thread when the server ends the chat.
WAKE_SIGNAL = signal.SIGUSR1


class _ServerEnded(Exception):
    """Raised in `chat`'s main thread, waiting for input, when the server has ended the chat."""


# Exit codes (the README's "The command line" lists them).
EXIT_OK = 0  # left as asked: quit, end of input, the server's `end`, Ctrl-C or SIGTERM
EXIT_FAILED = 1  # could not start (e.g. the address cannot be bound), or failed while running
EXIT_USAGE = 2  # bad arguments: argparse's own code
EXIT_INTERRUPTED = 130  # interrupted before a server or client was started (128 + SIGINT)


class _Failed(Exception):
    """Ends the command with EXIT_FAILED and this message, without a traceback."""


def _interval(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None


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
    serve.add_argument(
        "--cluster",
        metavar="URL",
        help="share the chat with every server on this Redis (redis://host:port) channel",
    )
    serve.add_argument(
        "--cluster-channel",
        metavar="NAME",
        help="the Redis channel of --cluster (default: udpchat)",
    )
    serve.add_argument(
        "--events",
        action="store_true",
        help="print each join, leave and refusal on stdout as one JSON object a line",
    )
    serve.set_defaults(subparser=serve)
    chat = commands.add_parser("chat", help="join a chat server: type lines to send them")
    chat.set_defaults(subparser=chat)
    chat.add_argument("--ip", default="127.0.0.1", help="server address (default: %(default)s)")
    chat.add_argument("--port", type=int, default=9998, help="server port (default: %(default)s)")
    chat.add_argument(
        "--interval",
        type=_interval,
        default=5.0,
        help="seconds between heartbeats (default: %(default)s)",
    )
    return parser


class _StopSignals:
    """SIGINT (unless it was ignored when the program started) and SIGTERM ask to stop: the first
    one is noted, never raised as an exception, so no signal, one or several, can interrupt a
    start or a stop half done. Later ones are counted."""

    def __init__(self) -> None:
        self.received: int | None = None
        self.count = 0
        self._read, self._write = os.pipe()
        os.set_blocking(self._read, False)
        os.set_blocking(self._write, False)
        # Python's own C handler writes each signal's number here, whichever thread the kernel
        # picked: `wait()` wakes even when the main thread was not the one interrupted.
        signal.set_wakeup_fd(self._write)
        for signum in (signal.SIGINT, signal.SIGTERM):
            if signal.getsignal(signum) is not signal.SIG_IGN:
                signal.signal(signum, self._note)

    def _note(self, signum: int, frame: FrameType | None) -> None:
        self.count += 1
        if self.received is None:
            self.received = signum

    def fileno(self) -> int:
        """Readable once a signal has come, until `drain()`: to wait on with other files."""
        return self._read

    def drain(self) -> None:
        """Reads what signals wrote to `fileno()`: (being Python code) runs their handlers."""
        with contextlib.suppress(BlockingIOError):
            os.read(self._read, 512)

    def wait(self, timeout: float) -> None:
        """Returns once a signal has come, or after `timeout` seconds."""
        if self.received is None:
            select.select([self._read], [], [], timeout)
            self.drain()


class _EventLines:
    """`serve --events`'s output: each event as one JSON object on a line of `out`, written as
    soon as `out` takes it, never waiting for it: written straight to its file descriptor (no
    Python buffer, whose flush would block), only when `poll` says it takes a write, at most
    PIPE_BUF bytes of whole lines at a time. A pipe that says so has a free page and takes such a
    write whole at once, so a pipe nobody reads gets whole lines and never blocks this thread
    (the only one: a thread blocked in a write would hold the stream's lock past exit); a file
    takes it without waiting long; a terminal, written through a non-blocking file description
    of its own, takes what it has room for. The lines `out` does not take yet wait here. Once
    `out` is closed (its reader went away) it writes nothing more."""

    def __init__(self, out: TextIO, signals: _StopSignals | None = None) -> None:
        self.out = out
        self.closed = False
        # Python's buffer stays empty from here on: its flush at exit has nothing to wait for.
        out.flush()
        self._fd = out.fileno()
        self._out = self._terminal(self._fd)
        # Whole lines `out` has not taken, the first perhaps in part (a terminal takes what it
        # has room for, a socket part of a write a signal interrupts).
        self._unwritten = bytearray()
        self._signals = signals
        # POLLERR and POLLHUP are reported whatever is asked: a pipe whose reader is gone.
        self._poll = select.poll()
        self._poll.register(self._out, select.POLLOUT)
        # The same, and a signal: what a wait for room waits for.
        self._wait = select.poll()
        self._wait.register(self._out, select.POLLOUT)
        if signals is not None:
            self._wait.register(signals.fileno(), select.POLLIN)

    @staticmethod
    def _terminal(fd: int) -> int:
        """Where to write lines for `fd`: `fd` itself, but for a terminal, one opened anew.
        A terminal says it takes a write when it has room for one byte, then takes a write in
        part and waits for room for the rest: so its lines go through a file description of
        their own, non-blocking, which leaves `fd`'s (the shell's) as it is."""
        if not os.isatty(fd):
            return fd
        flags = os.O_WRONLY | os.O_NOCTTY | os.O_NONBLOCK
        with contextlib.suppress(OSError):
            return os.open(f"/proc/self/fd/{fd}", flags)  # Linux, whatever the terminal's name
        with contextlib.suppress(OSError):
            return os.open(os.ttyname(fd), flags)
        return fd  # then a write may wait for a terminal that does not read

    @staticmethod
    def line(ev: Event) -> str:
        """One event as JSON, keys in this order:
        `{"seq": 1, "kind": "join", "reason": "reg", "addr": ["127.0.0.1", 40123], "time": ...}`"""
        fields = {
            "seq": ev.seq,
            "kind": ev.kind,
            "reason": ev.reason,
            "addr": list(ev.addr),
            "time": ev.time,
        }
        return json.dumps(fields)

    def write(self, events: Iterable[Event]) -> bool:
        """Adds `events` to what waits and writes what `out` takes now; False once it is
        closed."""
        if self.closed:
            return False
        for ev in events:
            self._unwritten += (self.line(ev) + "\n").encode()
        self.send()
        return not self.closed

    def follow(self, server: ChatServerUdp, timeout: float) -> bool:
        """One turn of serving: takes events from `server` unless `EVENT_BACKLOG` bytes wait
        here, and writes what `out` takes. With nothing waiting, waits up to `timeout` seconds
        for an event; else as long for `out` to take some (or a signal). False once `out` is
        closed."""
        if not self._unwritten:
            self.write(server.events(EVENT_BATCH, timeout=timeout))
        else:
            if len(self._unwritten) < EVENT_BACKLOG:
                self.write(server.events(EVENT_BATCH, timeout=0))
            self.send(timeout)
        return not self.reader_gone()

    def finish(self, server: ChatServerUdp, timeout: float) -> None:
        """Once `server` has stopped: writes what waits and what it still queues, for up to
        `timeout` seconds or until a further signal comes, then drops what is left, counted in
        one log line (an event written in part counts)."""
        deadline = time.monotonic() + timeout
        signals = self._signals.count if self._signals is not None else 0
        cut_short = False
        while not self.closed:
            taken = []
            if len(self._unwritten) < EVENT_BACKLOG:
                self.write(taken := server.events(EVENT_BATCH, timeout=0))
            if not taken and not self._unwritten:
                break
            cut_short = self._signals is not None and self._signals.count > signals
            left = deadline - time.monotonic()
            if cut_short or left <= 0:
                break
            self.send(left)
        unwritten = self._unwritten.count(b"\n")
        self._unwritten.clear()
        while queued := server.events(EVENT_BATCH, timeout=0):
            unwritten += len(queued)
        if unwritten and not self.closed:
            logging.getLogger("udpchat").warning(
                "stopping: %d events not written: standard output did not take them %s",
                unwritten,
                "before a second signal" if cut_short else f"within {timeout:g} s",
            )

    def send(self, timeout: float = 0.0) -> None:
        """Writes what `out` takes now; if lines are left, waits up to `timeout` seconds for
        `out` to take more (less if a signal comes) and writes that too."""
        self._send_now()
        if self._unwritten and timeout > 0 and not self.closed:
            ready = self._wait.poll(max(1, round(timeout * 1000)))
            if self._signals is not None and any(fd != self._out for fd, _ in ready):
                self._signals.drain()
            self._send_now()

    def _send_now(self) -> None:
        while self._unwritten and self._takes_a_write():
            # Whole lines up to PIPE_BUF bytes (the first alone if it is longer, which no event
            # is): what a pipe with room takes whole.
            end = self._unwritten.rfind(b"\n", 0, select.PIPE_BUF) + 1
            if end == 0:
                end = self._unwritten.find(b"\n") + 1
            try:
                written = os.write(self._out, self._unwritten[:end])
            except (BrokenPipeError, ConnectionResetError):
                self._close()
                return
            except BlockingIOError:  # a terminal with no room after all, or a non-blocking fd
                return
            del self._unwritten[:written]

    def _takes_a_write(self) -> bool:
        """`out` takes a write now; if it is gone instead, closes."""
        mask = 0
        for _, events in self._poll.poll(0):
            mask |= events
        if mask & (select.POLLERR | select.POLLHUP | select.POLLNVAL):
            self._close()
            return False
        return bool(mask & select.POLLOUT)

    def reader_gone(self) -> bool:
        """True once the output is a pipe (or socket) nobody reads any more, written to or not."""
        if not self.closed and any(
            mask & (select.POLLERR | select.POLLHUP | select.POLLNVAL)
            for _, mask in self._poll.poll(0)
        ):
            self._close()
        return self.closed

    def _close(self) -> None:
        # What could not be written is dropped, and the standard output now goes nowhere, so
        # nothing written to it later, Python's last flush at exit included, can fail.
        self.closed = True
        self._unwritten.clear()
        if self._out != self._fd:
            os.close(self._out)
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, self._fd)
        os.close(devnull)
        logging.getLogger("udpchat").info("stopping: standard output was closed")


def serve(server: ChatServerUdp, stop: _StopSignals, events: bool = False) -> int:
    """Run a server until SIGINT or SIGTERM, logging joins, leaves and expiries; with `events`,
    print each event on stdout too, until stdout is closed, which stops it as a signal does."""
    if not events:
        return _serve(server, stop, None)
    lines = _EventLines(sys.stdout, stop)
    # The events alone go to the standard output: anything else printed goes to the logs'.
    with contextlib.redirect_stdout(sys.stderr):
        return _serve(server, stop, lines)


def _serve(server: ChatServerUdp, stop: _StopSignals, lines: _EventLines | None) -> int:
    ip = server.ip
    try:
        server.start()
    except OSError as e:
        raise _Failed(f"cannot serve on {_host_port(ip, server.port)}: {_reason(e)}") from None
    try:
        # Only a server that did bind is worth the warning.
        if not server.validate and not ipaddress.ip_address(ip).is_loopback:
            logging.getLogger("udpchat").warning(
                "serving %s without --validate: anyone who can reach it can register a forged "
                "address and turn it into a flood against a third party",
                ip,
            )
        # Until a signal, or a server thread died (stop() then raises, and the exit code is 1).
        while stop.received is None and server.running:
            if lines is None:
                stop.wait(timeout=1.0)
            # A signal that comes while `events` waits is seen when the slice ends.
            elif not lines.follow(server, EVENT_SLICE):
                break
    finally:
        try:
            # Sends `end` to every client, whatever the output does; further signals are only
            # noted.
            server.stop()
        finally:
            if lines is not None:
                # The events before the stop, and a 'stop' leave for each client sent `end`: all
                # queued by now, and nothing is queued after them.
                lines.finish(server, EVENT_LAST_WRITE)
                dropped = 0
                with contextlib.suppress(RuntimeError):  # not to hide why a server thread died
                    dropped = server.stats()["events_dropped"]
                if dropped:
                    logging.getLogger("udpchat").warning(
                        "%d events dropped: the event queue was full (standard output not read "
                        "fast enough)",
                        dropped,
                    )
    return EXIT_OK


def _host_port(ip: str, port: int) -> str:
    return f"[{ip}]:{port}" if ":" in ip else f"{ip}:{port}"


def _reason(e: OSError) -> str:
    """The OS's words for an error (`Address already in use`), without udpchat's prefix."""
    return os.strerror(e.errno) if e.errno else str(e)


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
    """The most columns a terminal may give `ch`: 1 for ASCII, 2 for anything else. Terminals
    disagree with each other and with Python's Unicode tables about widths (emoji, hexagrams,
    spacing marks, ambiguous widths), so the count errs wide: a line wrapped early is only
    shorter, one wrapped late lets the terminal start a line of the payload's own."""
    return 1 if ch < "\x80" else 2


def _width(out: TextIO) -> int | None:
    """The terminal's width now, from the terminal itself (not $COLUMNS, which can be stale);
    None if `out` is not a terminal."""
    try:
        return os.get_terminal_size(out.fileno()).columns
    except (OSError, ValueError):
        return None


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


class _Screen:
    """Where `chat` writes. On a terminal every line goes above the prompt, which is then redrawn
    with what was typed so far, so neither a message nor a log record lands in the middle of the
    line being typed; elsewhere, plain lines. One lock: nothing written interleaves."""

    def __init__(self, interactive: bool) -> None:
        self.interactive = interactive
        self._lock = threading.Lock()

    def write(self, text: str, out: TextIO) -> None:
        with self._lock:
            if self.interactive and out.isatty():
                out.write(f"\r\x1b[K{text}\n{PROMPT}{_typed_so_far()}")
            else:
                out.write(text + "\n")
            out.flush()


class _ScreenLog(logging.Handler):
    """Log records (a server unreachable, a full queue...) written through the screen."""

    def __init__(self, screen: _Screen) -> None:
        super().__init__()
        self.screen = screen

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.screen.write(self.format(record), sys.stderr)
        except Exception:
            self.handleError(record)


def _show(msg: Message, screen: _Screen) -> None:
    out = sys.stdout
    screen.write(_format(msg, _width(out)), out)


def _tolerant_streams() -> None:
    """Bytes that are not text in the input are sent as they are (`surrogateescape` keeps them),
    and text the output's encoding lacks is shown escaped: neither is an error."""
    for stream, errors in (
        (sys.stdin, "surrogateescape"),
        (sys.stdout, "backslashreplace"),
        (sys.stderr, "backslashreplace"),
    ):
        if isinstance(stream, io.TextIOWrapper):
            stream.reconfigure(errors=errors)


def _send(client: ChatClientUdp, line: str, screen: _Screen) -> bool:
    """Sends one line as the bytes it came as. A line that cannot be sent is reported and the
    chat goes on; False if the client is no longer running."""
    data = line.encode("utf-8", "surrogateescape")
    if len(data) > MAX_DATAGRAM:
        screen.write(
            f"udpchat: not sent: the line is {len(data):,} bytes, more than one datagram "
            f"carries ({MAX_DATAGRAM:,})",
            sys.stderr,
        )
        return True
    try:
        client.send(data)
    except (ValueError, OSError) as e:
        screen.write(f"udpchat: not sent: {e}", sys.stderr)
    except RuntimeError:  # ended by the server meanwhile, or a thread died: stop() says which
        return False
    return True


def chat(client: ChatClientUdp) -> int:
    """The tutorial's interactive client: each line typed is sent, broadcasts print as they come."""
    _tolerant_streams()
    interactive = sys.stdin.isatty() and sys.stdout.isatty()
    screen = _Screen(interactive)
    log = _ScreenLog(screen)
    log.setFormatter(logging.Formatter("%(name)s %(levelname)s %(message)s"))
    logging.basicConfig(level=logging.WARNING, handlers=[log])
    if interactive:
        with contextlib.suppress(ImportError):  # not on every platform: only line editing is lost
            import readline  # noqa: F401  (once imported, input() edits lines with it)
    ended = threading.Event()
    # Set while the main thread waits in input(): only then does the server's `end` interrupt it.
    reading = threading.Event()
    leaving = False

    def interrupt(signum: int, frame: FrameType | None) -> None:
        # The first Ctrl-C or SIGTERM leaves; any later one is ignored, so it cannot break into
        # the leaving.
        nonlocal leaving
        if not leaving:
            leaving = True
            raise KeyboardInterrupt

    def wake(signum: int, frame: FrameType | None) -> None:
        if reading.is_set():
            raise _ServerEnded

    def show_messages() -> None:
        with contextlib.suppress(RuntimeError, OSError):  # a thread died (stop() raises it), or
            for msg in client:  # the output is gone: either way nothing more to show
                _show(msg, screen)
        if not ended.is_set():
            # A real signal, so the main thread's blocking read returns EINTR and sees it; its
            # own (not SIGINT), so it works where SIGINT is ignored and nobody mistakes it for
            # Ctrl-C.
            main_thread = threading.main_thread().ident
            assert main_thread is not None
            signal.pthread_kill(main_thread, WAKE_SIGNAL)

    for signum in (signal.SIGINT, signal.SIGTERM):
        if signal.getsignal(signum) is not signal.SIG_IGN:
            signal.signal(signum, interrupt)
    signal.signal(WAKE_SIGNAL, wake)
    printer = threading.Thread(target=show_messages, name="udpchat-chat-print", daemon=True)
    started = False
    try:
        try:
            client.start()
        except OSError as e:
            where = _host_port(client.ip, client.port)
            raise _Failed(f"cannot join {where}: {_reason(e)}") from None
        started = True
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
            if line.strip() and not _send(client, line, screen):
                break
    except (KeyboardInterrupt, _ServerEnded):
        pass
    finally:
        leaving = True
        ended.set()
        # Not running before stop(): the server ended the chat (a thread that died makes stop()
        # raise instead).
        by_server = started and not client.running
        client.stop()
        if started:
            printer.join(timeout=1.0)
    if by_server:
        sys.stdout.write(("\r\x1b[K" if interactive else "") + "the server ended the chat\n")
        sys.stdout.flush()
    return EXIT_OK


def _run(args: argparse.Namespace) -> int:
    if args.command == "serve":
        if args.events and sys.stdout is None:  # started with its standard output closed
            args.subparser.error("--events needs a standard output to print to")
        stop = _StopSignals()  # from here on a signal is noted, never raised
        logging.basicConfig(
            level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s"
        )
        # Left out unless given, so that a channel without --cluster is refused as such.
        channel = {} if args.cluster_channel is None else {"cluster_channel": args.cluster_channel}
        try:
            server = ChatServerUdp(
                args.ip,
                args.port,
                args.interval,
                validate=args.validate,
                rate_limit=args.rate_limit,
                cluster=args.cluster,
                **channel,
            )
        except (ValueError, TypeError) as e:  # as the constructor judges the arguments
            args.subparser.error(str(e))
        return serve(server, stop, events=args.events)
    try:
        client = ChatClientUdp(args.ip, args.port, args.interval)
    except (ValueError, TypeError) as e:
        args.subparser.error(str(e))
    return chat(client)


def main(argv: Sequence[str] | None = None) -> int:
    """Runs `udpchat`; returns its exit code (EXIT_* above; argparse exits 2 by itself)."""
    try:
        return _run(_parser().parse_args(argv))
    except (_Failed, OSError, RuntimeError) as e:
        print(f"udpchat: {e}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:  # before the signal handlers were in place
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
