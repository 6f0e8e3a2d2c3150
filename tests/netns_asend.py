"""asend against a socket buffer that is really full, run by test_asyncio.py inside a network
namespace of its own (`unshare -rn`): the namespace's loopback drains at 8 kbit/s through a tbf
qdisc, so a client's datagrams wait in the qdisc, charged to its socket, and its sends find no
room. Prints one JSON object with what it saw.

    unshare -rn python tests/netns_asend.py asyncio|uvloop
"""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import sys
import time

from udpchat import ChatClientUdp

subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
subprocess.run(
    [
        "tc",
        "qdisc",
        "add",
        "dev",
        "lo",
        "root",
        "tbf",
        "rate",
        "8kbit",
        "burst",
        "1600",
        "limit",
        "100000000",
    ],
    check=True,
)


async def main() -> dict[str, object]:
    server = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    server.bind(("127.0.0.1", 0))
    client = ChatClientUdp(*server.getsockname(), interval=3600)
    client.start()
    loop = asyncio.get_running_loop()
    late: list[float] = []

    async def ticker() -> None:
        while True:
            before = loop.time()
            await asyncio.sleep(0.005)
            late.append(loop.time() - before - 0.005)

    ticking = asyncio.ensure_future(ticker())
    # Fill the socket's buffer: send until a send finds no room (bounded).
    filled = 0
    for _ in range(100_000):
        if client._try_send(b"f" * 1000) is not None:
            break
        filled += 1
    else:
        raise AssertionError("the buffer never filled")
    out: dict[str, object] = {"filled": filled}

    # A blocking send gives up after its wait; asend after as long, with the same error.
    began = time.monotonic()
    try:
        client.send(b"blocking")
        out["send"] = "sent"
    except OSError as e:
        out["send"] = f"OSError {e.errno}"
    out["send_took"] = time.monotonic() - began
    began = time.monotonic()
    try:
        await asyncio.wait_for(client.asend(b"gives up"), 5)
        out["asend"] = "sent"
    except OSError as e:
        out["asend"] = f"OSError {e.errno}"
    out["asend_took"] = time.monotonic() - began

    # Waiting asends: the loop runs meanwhile; stop() ends them at once.
    late.clear()
    sends = [asyncio.ensure_future(client.asend(b"waits %d" % i)) for i in range(20)]
    await asyncio.sleep(0.05)
    out["waiting"] = sum(not s.done() for s in sends)
    out["ticker_late_max"] = max(late)
    began = time.monotonic()
    client.stop()  # its `quit` finds no room either: it waits as long as a send does
    stopped = time.monotonic()
    out["stop_took"] = stopped - began
    done, pending = await asyncio.wait(sends, timeout=5)
    out["ended_after_stop"] = time.monotonic() - stopped
    out["still_waiting"] = len(pending)
    out["errors"] = sorted({f"{type(s.exception()).__name__}: {s.exception()}" for s in done})
    ticking.cancel()
    server.close()
    return out


if __name__ == "__main__":
    if sys.argv[1] == "uvloop":
        import uvloop

        print(json.dumps(uvloop.run(main())))
    else:
        print(json.dumps(asyncio.run(main())))
