"""Attacks with forged source addresses, run inside a network namespace of their own
(`unshare -rn`, where raw sockets are allowed). Prints one JSON object of results.

Not a test module: tests/test_security.py runs it and checks what it prints.
"""

from __future__ import annotations

import json
import logging
import socket
import struct
import subprocess
import sys
import time

import udpchat
from udpchat import ChatClientUdp, ChatServerUdp

SERVER_IP = "127.0.0.1"


def forge(src: tuple[str, int], dst: tuple[str, int], payload: bytes) -> None:
    """Sends a UDP datagram with any source address, through a raw socket."""
    udp = struct.pack("!HHHH", src[1], dst[1], 8 + len(payload), 0) + payload  # checksum 0: none
    ip = struct.pack(
        "!BBHHHBBH4s4s",
        0x45, 0, 20 + len(udp), 0, 0, 64, socket.IPPROTO_UDP, 0,
        socket.inet_aton(src[0]), socket.inet_aton(dst[0]),
    )  # fmt: skip
    with socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW) as raw:
        raw.sendto(ip + udp, dst)


def drain(sock: socket.socket) -> list[bytes]:
    got = []
    sock.setblocking(False)
    try:
        while True:
            got.append(sock.recv(70000))
    except BlockingIOError:
        return got


class Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.NOTSET)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def wait_until(predicate, timeout: float = 3.0) -> bool:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.01)
    return bool(predicate())


def amplification(validate: bool, forged: bytes) -> dict[str, float]:
    """A forged `reg` from a victim while a real client chats 100 messages."""
    with ChatServerUdp(SERVER_IP, 0, validate=validate) as server, \
         ChatClientUdp(*server.address, interval=0.2) as client:  # fmt: skip
        assert wait_until(lambda: client.address in server.clients)
        victim = socket.socket(type=socket.SOCK_DGRAM)
        victim.bind(("127.0.0.2", 0))
        forge(victim.getsockname(), server.address, forged)
        time.sleep(0.1)
        for i in range(100):
            client.send(f"message {i}")
            time.sleep(0.002)
        # Every broadcast sent to every member (the client, and in open mode the victim), then
        # a moment for the last datagrams to land.
        members = len(server.clients)
        assert wait_until(lambda: server.stats()["deliveries"] >= 100 * members, timeout=10)
        time.sleep(0.1)
        got = drain(victim)
        return {
            "forged_bytes": len(forged),
            "victim_datagrams": len(got),
            "victim_bytes": sum(map(len, got)),
            "challenges": sum(d.startswith(b"challenge ") for d in got),
            "factor": sum(map(len, got)) / len(forged),
        }


def forged_control() -> dict[str, object]:
    """Forged `^hb^` and `quit` for a validated client's address, and from a new address."""
    # Heartbeats every 5 s: a forged quit that worked would still show when it is checked.
    with ChatServerUdp(SERVER_IP, 0, interval=10.0, validate=True) as server, \
         ChatClientUdp(*server.address, interval=5.0) as client, \
         ChatClientUdp(*server.address, interval=5.0) as witness:  # fmt: skip
        assert wait_until(
            lambda: all(c.validated and c.address in server.clients for c in (client, witness))
        )
        # What the server logs from here on: a forged quit that worked would log "left", even
        # if the client registered again at once (a forged padded datagram gets it challenged,
        # and it answers).
        log = Collect()
        logging.getLogger("udpchat").addHandler(log)
        token_guess = b"0" * 32
        for body in (b"quit", b"quit".ljust(64), token_guess + b" quit", b"^hb^", b"reg"):
            forge(client.address, server.address, body)
        stranger = ("127.0.0.3", 4444)
        for body in (b"^hb^", b"reg", token_guess + b" ^hb^", b"hello"):
            forge(stranger, server.address, body)
        # The witness's message reaches the server after the forgeries: once it is relayed, they
        # have all been read, however slow the machine.
        witness.send("after the forgeries")
        relayed = witness.recv(5)
        still_there = client.address in server.clients
        me = "{}:{}".format(*client.address)
        left = [m for m in log.messages if m == f"{me} left"]
        client.send("still served")
        echoed = None
        for _ in range(10):  # the witness's message first, then its own
            echoed = client.recv(2)
            if echoed is None or echoed.text == "still served":
                break
        return {
            "witness_relayed": relayed is not None and relayed.text == "after the forgeries",
            "client_registered": still_there,
            "client_left": bool(left),
            "client_still_served": echoed is not None and echoed.text == "still served",
            "stranger_registered": stranger in server.clients,
            "dropped_unvalidated": server.stats()["dropped_unvalidated"],
            "dropped_malformed": server.stats()["dropped_malformed"],
        }


def bad_sources() -> dict[str, object]:
    """Datagrams "from" port 0, broadcast, multicast and unspecified addresses."""
    with ChatServerUdp(SERVER_IP, 0) as server:
        listener = socket.socket(type=socket.SOCK_DGRAM)
        listener.bind(("127.0.0.1", 0))
        listener.settimeout(2)
        listener.sendto(b"reg", server.address)
        assert wait_until(lambda: len(server.clients) == 1)
        # (0.0.0.0 cannot be forged this way: the kernel fills in a zero source address.)
        forged = [("127.0.0.5", 0), ("255.255.255.255", 5000), ("224.0.0.1", 5000)]
        for src in forged:
            forge(src, server.address, b"reg")
            forge(src, server.address, b"forged message")
        time.sleep(0.2)
        talker = socket.socket(type=socket.SOCK_DGRAM)
        talker.bind(("127.0.0.1", 0))
        for i in range(20):
            talker.sendto(b"real %d" % i, server.address)
        got = [listener.recv(100) for _ in range(20)]
        return {
            "registered": sorted(map(list, server.clients)),
            "listener_got_all": all(g.endswith(b"\nreal %d\n" % i) for i, g in enumerate(got)),
            "dropped_bad_source": server.stats()["dropped_bad_source"],
        }


def main() -> None:
    logging.getLogger("udpchat").setLevel(logging.INFO)
    udpchat.reset_log_cache()
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    results = {
        # The tutorial's own `reg`, and the padded one a validated-mode client sends.
        "open": amplification(validate=False, forged=b"reg"),
        "open_padded": amplification(validate=False, forged=b"reg".ljust(64)),
        "validated": amplification(validate=True, forged=b"reg".ljust(64)),
        "forged_control": forged_control(),
        "bad_sources": bad_sources(),
    }
    json.dump(results, sys.stdout)


if __name__ == "__main__":
    main()
