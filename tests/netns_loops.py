"""Loop attacks with forged source addresses (the Loop DoS class, CVE-2024-2169), run inside a
network namespace of its own (`unshare -rn`, where raw sockets are allowed). Prints one JSON
object of results.

Not a test module: tests/test_loops.py runs it and checks what it prints.
"""

from __future__ import annotations

import json
import subprocess
import time
from typing import Any

from netns_attacks import forge, wait_until
from udpchat import ChatClientUdp, ChatServerUdp

IP = "127.0.0.1"
# A second address of this host (added in main()).
OTHER_LOCAL_IP = "10.9.9.9"
# How long traffic may go on after a forgery, and how long it is then watched for more.
SETTLE, WATCH = 1.0, 0.5
# Forged datagrams in the reply flood from one address.
FLOOD = 2_000


def _ack() -> bytes:
    return b"ack: 127.0.0.1 4\nlooping\n"


TRIGGERS = {
    "reg": b"reg",
    "message": b"hello",
    "64-byte datagram": b"x" * 64,
    "ack": _ack(),
    "challenge": b"challenge " + b"a" * 32,
}


class Served:
    """A server with one real client, registered (and validated, if the server is)."""

    def __init__(self, validate: bool, ip: str = IP) -> None:
        self.server = ChatServerUdp(ip, 0, validate=validate)
        self.server.start()
        assert self.server.address is not None
        address = (IP, self.server.address[1])
        # A long interval: no heartbeat falls in the window the counters are read in.
        self.client = ChatClientUdp(*address, interval=30)
        self.client.start()
        self.validate = validate

    def ready(self) -> bool:
        return self.client.address in self.server.clients and (
            self.client.validated or not self.validate
        )

    def received(self) -> int:
        return int(self.server.stats()["received"])

    def copies(self) -> int:
        """Messages the client got since the last call."""
        return len(self.client.recv_many(timeout=0))

    def stop(self) -> None:
        self.client.stop()
        self.server.stop()


def _watch(cases: list[dict[str, Any]], sides: list[tuple[Served, int]], before: list[int]) -> None:
    """Fills each case with what each server received since `before` (the trigger included), and
    what it received in WATCH seconds after SETTLE seconds had passed."""
    time.sleep(SETTLE)
    settled = [s.received() for s, _ in sides]
    time.sleep(WATCH)
    after = [s.received() for s, _ in sides]
    for (served, case), b, s, a in zip(sides, before, settled, after, strict=True):
        entry = cases[case]
        entry.setdefault("received", []).append(s - b)
        entry.setdefault("still_going", []).append(a - s)
        entry.setdefault("copies", []).append(served.copies())


def self_forgery() -> list[dict[str, Any]]:
    """A forged datagram whose source is the server's own address, in both modes."""
    cases: list[dict[str, Any]] = []
    sides: list[tuple[Served, int]] = []
    triggers: list[bytes] = []
    for validate in (False, True):
        for name, trigger in TRIGGERS.items():
            cases.append({"validate": validate, "trigger": name})
            sides.append((Served(validate), len(cases) - 1))
            triggers.append(trigger)
    assert wait_until(lambda: all(s.ready() for s, _ in sides), timeout=10)
    for served, _ in sides:
        served.copies()
    before = [s.received() for s, _ in sides]
    for (served, _), trigger in zip(sides, triggers, strict=True):
        assert served.server.address is not None
        forge(served.server.address, served.server.address, trigger)
    _watch(cases, sides, before)
    for served, case in sides:
        cases[case]["registered_itself"] = served.server.address in served.server.clients
        cases[case]["dropped_loop"] = served.server.stats().get("dropped_loop")
        served.stop()
    return cases


def pairings() -> list[dict[str, Any]]:
    """Every pairing of two servers, every trigger, forged "from" one to the other, the other way,
    and both ways at once."""
    cases: list[dict[str, Any]] = []
    pairs: list[tuple[Served, Served, bytes]] = []
    sides: list[tuple[Served, int]] = []
    for va, vb in ((False, False), (False, True), (True, False), (True, True)):
        for name, trigger in TRIGGERS.items():
            for direction in ("b to a", "a to b", "both ways"):
                a, b = Served(va), Served(vb)
                if direction == "a to b":
                    a, b = b, a
                cases.append(
                    {"a_validate": va, "b_validate": vb, "trigger": name, "direction": direction}
                )
                pairs.append((a, b, trigger))
                sides += [(a, len(cases) - 1), (b, len(cases) - 1)]
    assert wait_until(lambda: all(s.ready() for s, _ in sides), timeout=20)
    for served, _ in sides:
        served.copies()
    before = [s.received() for s, _ in sides]
    for (target, source, trigger), case in zip(pairs, cases, strict=True):
        assert target.server.address is not None and source.server.address is not None
        forge(source.server.address, target.server.address, trigger)
        if case["direction"] == "both ways":
            forge(target.server.address, source.server.address, trigger)
    _watch(cases, sides, before)
    for served, _ in sides:
        served.stop()
    return cases


def wildcard() -> dict[str, Any]:
    """A server bound to 0.0.0.0 and `reg`s forged from each local address with its port."""
    with ChatServerUdp("0.0.0.0", 0) as server:
        assert server.address is not None
        port = server.address[1]
        sources = [(IP, port), ("127.0.0.2", port), (OTHER_LOCAL_IP, port)]
        for src in sources:
            forge(src, (IP, port), b"reg")
        with ChatClientUdp(IP, port, interval=30) as client:
            assert wait_until(lambda: client.address in server.clients)
            time.sleep(0.2)
            return {
                "registered": sorted(map(list, server.clients)),
                "client": list(client.address or ()),
                "forged": [list(s) for s in sources],
                "dropped_loop": server.stats().get("dropped_loop"),
            }


def reply_flood() -> dict[str, Any]:
    """Padded `reg`s forged from one address, as fast as this loop sends them."""
    with ChatServerUdp(IP, 0, validate=True) as server:
        assert server.address is not None
        t0 = time.monotonic()
        for i in range(FLOOD):
            forge(("127.0.0.7", 4000), server.address, b"reg".ljust(64))
            if i % 50 == 49:
                time.sleep(0.001)  # paced, so a stock-sized socket buffer keeps most of them
        time.sleep(0.2)
        stats = server.stats()
        return {
            "sent": FLOOD,
            "seconds": time.monotonic() - t0,
            "received": stats["received"],
            "challenges": stats["challenges"],
            "replies_limited": stats.get("replies_limited"),
        }


def main() -> None:
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    # Outside 127.0.0.0/8, so only the host's address list says it is this host's.
    subprocess.run(["ip", "addr", "add", f"{OTHER_LOCAL_IP}/32", "dev", "lo"], check=True)
    results = {
        "self": self_forgery(),
        "pairings": pairings(),
        "wildcard": wildcard(),
        "reply_flood": reply_flood(),
    }
    print(json.dumps(results))


if __name__ == "__main__":
    main()
