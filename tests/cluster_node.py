"""One udpchat server in a cluster, in a process of its own, for tests/test_cluster.py.

    python cluster_node.py URL [--channel NAME] [--ip IP] [--interval S] [--validate]

Starts `ChatServerUdp(ip, 0, interval, cluster=URL, cluster_channel=NAME)`, prints
`{"address": [ip, port]}` on a line of stdout, then answers each line read on stdin with one
JSON line:

    stats         the server's stats()
    clients       its clients, [[ip, port], ...]
    broadcast T   server.broadcast(T), then {"ok": true}

It stops the server and exits 0 when stdin closes or on SIGTERM. Its logs (`udpchat.*`, INFO and
up) go to stderr.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
from types import FrameType

from udpchat import ChatServerUdp


def _terminated(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(0)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("url")
    parser.add_argument("--channel", default="udpchat")
    parser.add_argument("--ip", default="127.0.0.1")
    parser.add_argument("--interval", type=float, default=30.0)
    parser.add_argument("--validate", action="store_true")
    args = parser.parse_args()
    logging.basicConfig(
        level=logging.INFO,
        stream=sys.stderr,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
    )
    signal.signal(signal.SIGTERM, _terminated)
    server = ChatServerUdp(
        args.ip,
        0,
        args.interval,
        validate=args.validate,
        cluster=args.url,
        cluster_channel=args.channel,
    )
    server.start()
    try:
        print(json.dumps({"address": list(server.address)}), flush=True)
        for line in sys.stdin:
            command, _, rest = line.rstrip("\n").partition(" ")
            reply: object
            if command == "stats":
                reply = server.stats()
            elif command == "clients":
                reply = [list(addr) for addr in server.clients]
            elif command == "broadcast":
                server.broadcast(rest)
                reply = {"ok": True}
            else:
                reply = {"error": f"unknown command {command!r}"}
            print(json.dumps(reply), flush=True)
    finally:
        server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
