"""Forged ICMP "port unreachable" errors, run inside a network namespace of their own
(`unshare -rn`, where raw sockets are allowed). Prints one JSON object of results.

Anyone can send a server an ICMP error whose embedded header says "your datagram from
server:port to victim:port could not be delivered". The kernel queues it on the server's socket
(`IP_RECVERR`) as if the victim were gone. In validated mode that must only pause sends to the
victim until its next valid datagram; in open mode it drops the victim (accepted: anyone can
forge a `quit` there); with `drop_unreachable=False` it does nothing.

Not a test module: tests/test_unreachable.py runs it and checks what it prints.
"""

from __future__ import annotations

import json
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

from udpchat import ChatClientUdp, ChatServerUdp, Event

SERVER_IP = "127.0.0.1"
Addr = tuple[str, int]


def wait_until(predicate: Callable[[], bool], timeout: float = 3.0, step: float = 0.005) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(step)
    return predicate()


def checksum(data: bytes) -> int:
    """The Internet checksum (RFC 1071)."""
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    total = (total >> 16) + (total & 0xFFFF)
    total += total >> 16
    return int(~total & 0xFFFF)


def icmp_error(server: Addr, victim: Addr, kind: tuple[int, int] = (3, 3)) -> bytes:
    """An ICMP type 3 code 3 (port unreachable; or another `kind`) about a datagram the server
    sent from its address to `victim`: the embedded IP and UDP headers say server -> victim (the
    UDP checksum 0: none)."""
    inner_udp = struct.pack("!HHHH", server[1], victim[1], 8 + 16, 0)
    inner_ip = struct.pack(
        "!BBHHHBBH4s4s",
        0x45, 0, 20 + 8 + 16, 0, 0, 64, socket.IPPROTO_UDP, 0,
        socket.inet_aton(server[0]), socket.inet_aton(victim[0]),
    )  # fmt: skip
    inner_ip = inner_ip[:10] + struct.pack("!H", checksum(inner_ip)) + inner_ip[12:]
    icmp = struct.pack("!BBHI", *kind, 0, 0) + inner_ip + inner_udp
    return icmp[:2] + struct.pack("!H", checksum(icmp)) + icmp[4:]


def raw_icmp(sender: str | None = None) -> socket.socket:
    """A raw ICMP socket, which builds the outer IP header itself: from `sender` if given (else
    the address the kernel picks: the victim's own, 127.0.0.1, in this namespace)."""
    raw = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
    if sender is not None:
        raw.bind((sender, 0))
    return raw


def forge_port_unreachable(
    server: Addr, victim: Addr, sender: str | None = None, kind: tuple[int, int] = (3, 3)
) -> None:
    """Sends `server` the ICMP error `icmp_error` makes, from `sender` (see `raw_icmp`)."""
    with raw_icmp(sender) as raw:
        raw.sendto(icmp_error(server, victim, kind), (server[0], 0))


def texts(client: ChatClientUdp, wait: float, count: int = 1000) -> list[str]:
    """The messages `client` receives within `wait` seconds, at most `count`."""
    got: list[str] = []
    deadline = time.monotonic() + wait
    for _ in range(count):
        msg = client.recv(max(deadline - time.monotonic(), 0.0))
        if msg is None:
            break
        got.append(msg.text)
    return got


def heartbeats(server: ChatServerUdp, addr: Addr) -> int:
    peer = server.peers().get(addr)
    return -1 if peer is None else int(peer.heartbeats)


def next_heartbeat(server: ChatServerUdp, addr: Addr, timeout: float = 2.0) -> bool:
    """Waits for the server to count a heartbeat more from `addr`."""
    seen = heartbeats(server, addr)
    return wait_until(lambda: heartbeats(server, addr) > seen, timeout)


def counter_above(server: ChatServerUdp, name: str, value: int, timeout: float) -> int:
    """The counter `name` once it is above `value`, or as it is after `timeout` seconds."""
    wait_until(lambda: int(server.stats()[name]) > value, timeout)
    return int(server.stats()[name])


def address(server: ChatServerUdp) -> Addr:
    assert server.address is not None
    return server.address


def event_list(events: list[Event]) -> list[list[Any]]:
    return [[e.kind, e.reason, list(e.addr)] for e in events]


def validated() -> dict[str, Any]:
    """A forged error for a live validated client: paused, not removed, served again after its
    next heartbeat. Each attempt starts just after a heartbeat (every 0.2 s), so the forgery and
    the broadcast after it fall before the next; a heartbeat that still comes between them ends
    the pause early, and the attempt is made again (at most 5)."""
    result: dict[str, Any] = {}
    server = ChatServerUdp(SERVER_IP, 0, interval=10.0, validate=True)
    with server, ChatClientUdp(*address(server), interval=0.2) as victim, \
         ChatClientUdp(*address(server), interval=5.0) as witness:  # fmt: skip
        assert victim.address is not None
        me = victim.address
        assert wait_until(
            lambda: all(c.validated and c.address in server.clients for c in (victim, witness))
        )
        server.events(1024, 0.1)  # the joins
        sent = 0
        witness_got: list[str] = []
        attempts: list[dict[str, Any]] = []
        for attempt in range(5):
            assert next_heartbeat(server, me)  # just after one
            before = server.stats()["paused_unreachable"]
            forge_port_unreachable(address(server), me)
            time.sleep(0.02)  # for the receiver to read its error queue
            registered_while_paused = me in server.clients
            server.broadcast(f"while paused {attempt}")
            sent += 1
            # broadcast() hands the message to the fan-out thread: once the witness has it, the
            # send to the victim was made or skipped (and counted just after).
            witness_got.extend(texts(witness, 2.0, count=1))
            paused = counter_above(server, "paused_unreachable", before, 0.3) - before
            attempts.append({"paused": paused, "registered": registered_while_paused})
            if paused > 0:
                break
        result["attempts"] = attempts
        result["skipped_text"] = f"while paused {len(attempts) - 1}"
        result["stats_paused"] = server.stats()
        # The next heartbeat ends the pause; another forgery within the interval pauses nothing.
        result["heartbeat_after"] = next_heartbeat(server, me)
        forge_port_unreachable(address(server), me)
        time.sleep(0.02)
        server.broadcast("after its heartbeat")
        sent += 1
        victim.send("the victim speaks")
        sent += 1
        result["victim_got"] = texts(victim, 1.0)
        result["witness_got"] = witness_got + texts(witness, 0.3)
        result["sent"] = sent
        result["registered"] = me in server.clients
        result["events"] = event_list(server.events(1024, 0.1))
        result["stats"] = server.stats()
    return result


def open_mode() -> dict[str, Any]:
    """The same forgery in open mode: the victim is dropped at once, with an `unreachable` leave,
    without any send to it; a forged error about an address that is not registered changes
    nothing."""
    result: dict[str, Any] = {}
    server = ChatServerUdp(SERVER_IP, 0, interval=10.0)
    with server, ChatClientUdp(*address(server), interval=5.0) as victim, \
         ChatClientUdp(*address(server), interval=5.0) as witness:  # fmt: skip
        assert victim.address is not None
        me = victim.address
        assert wait_until(lambda: len(server.clients) == 2)
        server.events(1024, 0.1)
        forge_port_unreachable(address(server), ("127.0.0.3", 4444))  # nobody's
        # Not the victim's own host speaking, or not a port unreachable: nothing happens.
        forge_port_unreachable(address(server), me, sender="127.0.0.2")
        forge_port_unreachable(address(server), me, kind=(11, 0))  # time exceeded
        forge_port_unreachable(address(server), me, kind=(3, 1))  # host unreachable
        result["ignored"] = server.next_event(0.3) is None and me in server.clients
        start = time.monotonic()
        forge_port_unreachable(address(server), me)
        event = server.next_event(2.0)
        result["delay_ms"] = (time.monotonic() - start) * 1000
        result["event"] = None if event is None else event_list([event])[0]
        result["registered"] = me in server.clients
        wait_until(lambda: server.stats()["dropped_unreachable"] > 0, timeout=1.0)
        server.broadcast("after the forgery")
        result["witness_got"] = texts(witness, 0.3)
        result["victim_got"] = texts(victim, 0.3)
        result["more_events"] = event_list(server.events(1024, 0.1))
        result["stats"] = server.stats()
    return result


def not_dropping() -> dict[str, Any]:
    """The same forgery against `drop_unreachable=False`: nothing happens."""
    result: dict[str, Any] = {}
    server = ChatServerUdp(SERVER_IP, 0, interval=10.0, drop_unreachable=False)
    with server, ChatClientUdp(*address(server), interval=5.0) as victim:
        assert victim.address is not None
        me = victim.address
        assert wait_until(lambda: me in server.clients)
        server.events(1024, 0.1)
        forge_port_unreachable(address(server), me)
        time.sleep(0.1)
        server.broadcast("after the forgery")
        result["victim_got"] = texts(victim, 0.5)
        result["registered"] = me in server.clients
        result["events"] = event_list(server.events(1024, 0.1))
        result["stats"] = server.stats()
    return result


def ignored_flood(kind: tuple[int, int]) -> dict[str, Any]:
    """A flood of ICMP errors the server acts on in no mode (`kind`, about one of 8 clients, from
    an address of the attacker's own) while 300 messages are relayed: each error still fails
    one of the socket's sends (IP_RECVERR makes every ICMP error the socket's pending error),
    which must be tried again, so every client gets every broadcast. Bounded: 3 s or 300,000
    packets."""
    result: dict[str, Any] = {}
    server = ChatServerUdp(SERVER_IP, 0, interval=10.0)
    with server:
        clients = [ChatClientUdp(*address(server), interval=5.0) for _ in range(8)]
        for c in clients:
            c.start()
        try:
            assert wait_until(lambda: len(server.clients) == len(clients))
            victim, talker = clients[0], clients[-1]
            assert victim.address is not None
            target = victim.address
            done = threading.Event()
            forged = [0]

            def flood() -> None:
                packet = icmp_error(address(server), target, kind)
                end = time.monotonic() + 3.0
                with raw_icmp("127.0.0.2") as raw:
                    while not done.is_set() and forged[0] < 300_000 and time.monotonic() < end:
                        raw.sendto(packet, (SERVER_IP, 0))
                        forged[0] += 1

            flooder = threading.Thread(target=flood)
            flooder.start()
            try:
                for i in range(300):
                    talker.send(f"m{i}")
                    time.sleep(0.005)
            finally:
                done.set()
                flooder.join()
            result["forged"] = forged[0]
            result["got"] = [len(texts(c, 1.0)) for c in clients]
            result["registered"] = target in server.clients
            result["stats"] = server.stats()
        finally:
            for c in clients:
                c.stop()
    return result


def main() -> None:
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    results = {
        "validated": validated(),
        "open": open_mode(),
        "not_dropping": not_dropping(),
        "time_exceeded_flood": ignored_flood((11, 0)),
        "host_unreachable_flood": ignored_flood((3, 1)),
    }
    json.dump(results, sys.stdout)


if __name__ == "__main__":
    main()
