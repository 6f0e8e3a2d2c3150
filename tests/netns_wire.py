"""Wire cases that need a network of their own, run inside a network namespace (`unshare -rn`):
a host with two IPv6 addresses, and a loopback whose queue drains at a trickle (a `tbf` qdisc).
Prints one JSON object of results.

Not a test module: tests/test_wildcard_bind.py and tests/test_stop_at_scale.py run it and
check what it prints.

    python netns_wire.py two-addresses
    python netns_wire.py full-buffer
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
from typing import Any

from netns_attacks import wait_until
from udpchat import ChatServerUdp

# Two addresses of this host, besides loopback's.
FIRST, SECOND = "fd00::1", "fd00::2"


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True)


def two_addresses() -> dict[str, Any]:
    """A server bound to `::`; a client bound to one of the host's addresses talks to the other,
    through a connected socket (`nc -u -s fd00::1 fd00::2 port` does the same)."""
    ip("link", "set", "lo", "up")
    for address in (FIRST, SECOND):
        ip("-6", "addr", "add", f"{address}/128", "dev", "lo", "nodad")
    result: dict[str, Any] = {}
    with ChatServerUdp("::", 0, interval=30) as server:
        assert server.address is not None
        port = server.address[1]
        client = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
        client.bind((FIRST, 0))
        client.connect((SECOND, port))
        client.settimeout(2.0)
        me = client.getsockname()[:2]
        # Sent again, as a client's heartbeats would be, should a loaded machine be slow to
        # read it: what is tested is the answer's source, not one datagram's luck.
        for _ in range(5):
            client.send(b"reg")
            if wait_until(lambda: me in server.clients, timeout=1.0):
                break
        result["registered"] = me in server.clients
        client.send(b"hello")
        try:
            data, source = client.recvfrom(70_000)
            result["ack"] = [data.decode(), source[0]]
        except TimeoutError:
            result["ack"] = None
    try:
        data, source = client.recvfrom(70_000)
        result["end"] = [data.decode(), source[0]]
    except TimeoutError:
        result["end"] = None
    client.close()
    return result


def full_buffer() -> dict[str, Any]:
    """Clients registered, then loopback slowed to a trickle (8 kbit/s, a queue of 10 MB): the
    server's socket buffer fills with `end`s and stays full. Sized so that it fills: about 560
    bytes of buffer a queued `end`."""
    ip("link", "set", "lo", "up")
    with open("/proc/sys/net/core/wmem_default") as f:
        sndbuf = int(f.read())
    count = min(sndbuf // 512 + 50, 5_000)
    server = ChatServerUdp("127.0.0.1", 0, interval=60, max_per_ip=count)
    server.start()
    assert server.address is not None
    peers = []
    for _ in range(count):
        peer = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        peer.bind(("127.0.0.1", 0))
        peers.append(peer)
    for _ in range(20):  # again for any registration the kernel dropped in a burst
        registered = server.clients
        for peer in peers:
            if peer.getsockname() not in registered:
                peer.sendto(b"reg", server.address)
                time.sleep(0.0002)
        if wait_until(lambda: len(server.clients) == count, 0.5):
            break
    registered_count = len(server.clients)
    qdisc = ["tc", "qdisc", "add", "dev", "lo", "root", "tbf", "rate", "8kbit"]
    subprocess.run([*qdisc, "burst", "1600", "limit", "10000000"], check=True)
    t0 = time.monotonic()
    server.stop()
    stop_s = time.monotonic() - t0
    for peer in peers:
        peer.close()
    return {"clients": registered_count, "wanted": count, "sndbuf": sndbuf, "stop_s": stop_s}


if __name__ == "__main__":
    case = {"two-addresses": two_addresses, "full-buffer": full_buffer}[sys.argv[1]]
    print(json.dumps(case()))
