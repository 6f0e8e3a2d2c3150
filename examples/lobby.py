"""A lobby: a udpchat server that greets whoever joins and tells everyone who left, and why.

    python examples/lobby.py                 # a server on 127.0.0.1:9998
    udpchat chat                             # join it, in another terminal

It prints each presence event as it reads it, and runs until Ctrl-C or SIGTERM, which stop the
server: every client gets ``end``. ``--uvloop`` runs it on uvloop.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys

from udpchat import ChatServerUdp, Event


async def announce(server: ChatServerUdp) -> None:
    """Reads the server's events until it has stopped and the last of them is read."""
    while True:
        events: list[Event] = await server.aevents()
        if not events:
            return  # stopped, every event read
        for ev in events:
            ip, port = ev.addr
            print(ev.seq, ev.kind, ev.reason, ip, port, flush=True)
            if not server.running:
                continue  # stopped: its `stop` leaves, and what came before, go unannounced
            if ev.kind == "join":
                server.broadcast(f"welcome {ip}:{port}")
            elif ev.kind == "leave":
                server.broadcast(f"{ip}:{port} left ({ev.reason})")


async def run(server: ChatServerUdp) -> None:
    async with server:  # start(); stop() on the way out
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            # stop() sends `end` to every client and wakes `aevents()`, which returns the `stop`
            # leaves, then [].
            loop.add_signal_handler(signum, server.stop)
        address: tuple[str, int] | None = server.address
        assert address is not None  # running
        print("lobby on", *address, flush=True)
        await announce(server)


def main() -> None:
    parser = argparse.ArgumentParser(description="A udpchat server that greets and says bye.")
    parser.add_argument("--ip", default="127.0.0.1", help="where to bind (default: %(default)s)")
    parser.add_argument("--port", type=int, default=9998, help="0 picks a free one (default: 9998)")
    parser.add_argument("--uvloop", action="store_true", help="run on uvloop")
    args = parser.parse_args()
    try:
        server = ChatServerUdp(args.ip, args.port)
    except (TypeError, ValueError) as e:
        parser.error(str(e))
    # Joins, leaves and expiries: udpchat's log records, on stderr.
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    try:
        if args.uvloop:
            import uvloop

            uvloop.run(run(server))
        else:
            asyncio.run(run(server))
    except OSError as e:  # cannot bind: the port is taken, the address is not this host's
        sys.exit(f"lobby: {e}")


if __name__ == "__main__":
    main()
