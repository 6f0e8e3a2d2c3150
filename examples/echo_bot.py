"""An echo bot: joins a udpchat server and answers every chat message with ``echo: {text}``.

    udpchat serve                            # a server on 127.0.0.1:9998, in one terminal
    python examples/echo_bot.py              # the bot, in another
    udpchat chat                             # say something, in a third

It runs until Ctrl-C or SIGTERM, which make it leave (it sends ``quit``), or until the server
ends the chat. ``--uvloop`` runs it on uvloop instead of asyncio's own event loop.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal

from udpchat import ChatClientUdp, Message

PREFIX = "echo: "
ECHOED = 1000  # characters echoed at most: a reply stays far below MAX_MESSAGE bytes


def wants_a_reply(msg: Message, me: tuple[str, int] | None) -> bool:
    """The server relays every message to every client, the sender included, so the bot hears
    its own replies: it answers other senders only, and never a reply. The prefix alone keeps
    two bots (or a bot and itself) from answering each other for ever, also where ``sender`` is
    not ``client.address`` for the bot's own messages: a server bound to ``::`` names an IPv4
    client ``::ffff:a.b.c.d``. A datagram without an ``ack:`` line has no sender to answer."""
    sender: tuple[str, int] | None = msg.sender
    return sender is not None and sender != me and not msg.text.startswith(PREFIX)


async def echo(client: ChatClientUdp) -> None:
    """Answers messages until the server ends the chat or ``client.stop()``."""
    async for msg in client:
        if not wants_a_reply(msg, client.address):
            continue
        try:
            await client.asend(PREFIX + msg.text[:ECHOED])
        except RuntimeError:
            if client.running:
                raise
            # Stopped since the message came (a signal, or the server's `end`): no reply. The
            # loop ends once the messages still queued are read.


async def run(client: ChatClientUdp) -> None:
    async with client:  # start(); stop() on the way out
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            # stop() sends `quit` and wakes the `async for`, which ends: the bot leaves cleanly.
            loop.add_signal_handler(signum, client.stop)
        print(f"echo bot {client.address}, server {client.ip} {client.port}", flush=True)
        await echo(client)


def main() -> None:
    parser = argparse.ArgumentParser(description="Echo every chat message of a udpchat server.")
    parser.add_argument("--ip", default="127.0.0.1", help="the server's IP (default: %(default)s)")
    parser.add_argument("--port", type=int, default=9998, help="its port (default: %(default)s)")
    parser.add_argument("--uvloop", action="store_true", help="run on uvloop")
    args = parser.parse_args()
    try:
        client = ChatClientUdp(args.ip, args.port)
    except (TypeError, ValueError) as e:
        parser.error(str(e))
    # Joins, leaves, the server's `end` or its silence: udpchat's log records, on stderr.
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    if args.uvloop:
        import uvloop

        uvloop.run(run(client))
    else:
        asyncio.run(run(client))


if __name__ == "__main__":
    main()
