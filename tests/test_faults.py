"""Faults: a killed client, expiry timing, a lossy network, floods, stop under load."""

from __future__ import annotations

import contextlib
import math
import random
import signal
import socket
import statistics
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable

import pytest
from conftest import (
    ack,
    default_rcvbuf,
    fd_count,
    rcvbuf,
    register,
    room,
    thread_count,
    wait_until,
)
from udpchat import ChatClientUdp, ChatServerUdp

MakePeer = Callable[..., socket.socket]
MakeServer = Callable[..., ChatServerUdp]
Figure = Callable[[str], None]


def big_buffer(sock: socket.socket) -> socket.socket:
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    return sock


def collect(sock: socket.socket, want: int, match: bytes, timeout: float = 5.0) -> list[bytes]:
    """Datagrams containing `match`, until `want` have come or `timeout` seconds have passed."""
    got: list[bytes] = []
    deadline = time.monotonic() + timeout
    while len(got) < want and (left := deadline - time.monotonic()) > 0:
        sock.settimeout(left)
        try:
            data = sock.recv(70_000)
        except TimeoutError:
            break
        if match in data:
            got.append(data)
    return got


def test_a_killed_client_costs_the_others_nothing_and_expires_on_time(
    make_server: MakeServer, make_peer: MakePeer, figure: Figure
) -> None:
    interval = 1.0
    # Expiry, as on a network that sends no ICMP errors: by default the port unreachable its
    # next broadcast draws drops it at once (tests/test_unreachable.py).
    server = make_server(interval=interval, drop_unreachable=False)
    listeners = [big_buffer(make_peer()) for _ in range(3)]
    for p in listeners:
        register(p, server)
    talker = listeners[0]
    me = talker.getsockname()
    # 1,000 messages go out in bursts, each read by every listener before the next is sent. A
    # burst must fit, unread, in a listener's receive buffer and in the server's (a stock kernel
    # grants 212,992 bytes, about 256 small datagrams): a quarter of the smaller, at most 100.
    burst = min(
        100,
        room(rcvbuf(listeners[0]), len(ack(me, b"m999"))) // 4,
        room(default_rcvbuf(), len(b"m999")) // 4,
    )
    assert burst >= 10, burst
    victim = subprocess.Popen(
        [
            sys.executable,
            "-c",
            textwrap.dedent(
                f"""
                import sys, time
                from udpchat import ChatClientUdp
                client = ChatClientUdp(*{server.address!r}, interval=0.2)
                client.start()
                print("%s %d" % client.address, flush=True)
                time.sleep(60)
                """
            ),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    alive = threading.Event()

    def heartbeats() -> None:  # the listeners are live clients too
        while not alive.wait(0.2):
            for p in listeners:
                p.sendto(b"^hb^", server.address)

    keeper = threading.Thread(target=heartbeats)
    keeper.start()
    # When the victim leaves `clients`, and when the server last heard from it before that.
    unlisted: dict[str, float] = {}

    def watch(addr: tuple[str, int]) -> None:
        deadline = time.monotonic() + 20
        while not alive.is_set() and time.monotonic() < deadline:
            seen = server.clients.get(addr)
            if seen is None:
                unlisted["at"] = time.time()
                return
            unlisted["last_seen"] = seen
            time.sleep(0.005)

    watcher = None
    try:
        assert victim.stdout is not None
        ip, port = victim.stdout.readline().split()
        victim_addr = (ip, int(port))
        assert wait_until(lambda: victim_addr in server.clients)
        watcher = threading.Thread(target=watch, args=(victim_addr,))
        watcher.start()
        killed_at = 0.0
        got: list[list[bytes]] = [[] for _ in listeners]
        for first in range(0, 1000, burst):
            last = min(first + burst, 1000)
            for i in range(first, last):
                talker.sendto(b"m%d" % i, server.address)
                if i == 300:
                    victim.send_signal(signal.SIGKILL)
                    killed_at = time.time()
            for p, kept in zip(listeners, got, strict=True):
                kept += collect(p, last - first, b"\nm")
        # Every listener got every message, in order, while the server was still sending to a
        # dead port.
        for kept in got:
            assert kept == [ack(me, b"m%d" % i) for i in range(1000)]
        watcher.join(20)
        assert "at" in unlisted, "the killed client was never dropped"
        silence = unlisted["at"] - unlisted["last_seen"]
        gone = unlisted["at"] - killed_at
        figure(
            f"killed client, interval {interval:.0f} s, heartbeat 0.2 s: unlisted {gone:.3f} s "
            f"after the kill, {silence:.3f} s after it was last heard; bursts of {burst}"
        )
        # Never before `interval` of silence (exact: seen from here, only ever later). Its last
        # heartbeat was at most 0.2 s before the kill, so it goes by `interval` after the kill:
        # half a second of slack for a loaded machine, short of a 2 x interval mistake.
        assert silence >= interval - 0.005, silence
        assert gone <= interval + 0.5, gone
        assert wait_until(lambda: server.stats()["expired"] == 1)
        assert len(server.clients) == 3
    finally:
        alive.set()
        keeper.join()
        if watcher is not None:
            watcher.join()
        victim.kill()
        victim.wait(5)


def test_expiry_timing_at_one_second(
    make_server: MakeServer, make_peer: MakePeer, figure: Figure
) -> None:
    interval = 1.0
    server = make_server(interval=interval)
    silent = make_peer()
    me = silent.getsockname()
    silent.sendto(b"reg", server.address)
    assert wait_until(lambda: me in server.clients)
    last_seen = server.clients[me]  # the server's own stamp, as Unix time
    # `clients` leaves it out from the moment its silence passes the interval...
    assert wait_until(lambda: me not in server.clients, timeout=3, step=0.005)
    listed_for = time.time() - last_seen
    # ...and the sweep (every 250 ms at this interval) removes it from the table.
    assert wait_until(lambda: server.stats()["expired"] == 1, timeout=3, step=0.005)
    swept_after = time.time() - last_seen
    figure(
        f"silent client, interval 1 s: unlisted {listed_for:.3f} s after it was last heard, "
        f"swept after {swept_after:.3f} s"
    )
    # Never early: seen from here, only later (a loaded machine polls late).
    assert listed_for >= interval - 0.005, listed_for
    # On time, give or take half a second of a loaded machine; the figure above is the measure.
    assert listed_for <= interval + 0.5, listed_for
    assert swept_after <= interval + 0.25 + 0.5, swept_after


def test_clients_heartbeating_every_third_of_the_interval_are_never_expired(
    make_server: MakeServer,
) -> None:
    # Each client-interval is one chance of a false expiry. This test used to watch one client
    # for 100 intervals of 1 s (100 s; 100 client-intervals, 300 heartbeats). Now 10 clients
    # heartbeat in parallel for 20 intervals of 0.5 s each (10 s; 200 client-intervals, 600
    # heartbeats): twice the chances in a tenth of the time. Heartbeats stay at a third of the
    # interval, so a false expiry still takes a silence of more than three heartbeat periods
    # (heartbeats lost in a row, or one more than 333 ms late).
    interval, clients, intervals = 0.5, 10, 20
    server = make_server(interval=interval)
    running = [ChatClientUdp(*server.address, interval=interval / 3) for _ in range(clients)]
    try:
        for c in running:
            c.start()
        addresses = [c.address for c in running]
        assert wait_until(lambda: all(a in server.clients for a in addresses))
        deadline = time.monotonic() + intervals * interval
        checks = 0
        while time.monotonic() < deadline:
            listed = server.clients
            assert all(a in listed for a in addresses), (checks, listed)
            checks += 1
            time.sleep(0.05)
        assert checks >= intervals  # it looked at least once an interval
        assert server.stats()["expired"] == 0
    finally:
        for c in running:
            c.stop()


class LossyRelay:
    """A user-space stand-in for `tc netem`: clients talk to the relay, which talks to the server
    from one socket per client (as a NAT does), dropping, duplicating and reordering datagrams
    in both directions with a seeded random generator. It counts what it does, by direction."""

    def __init__(self, server: tuple[str, int], drop: float, dup: float, reorder: float, seed: int):
        self.server, self.drop, self.dup, self.reorder = server, drop, dup, reorder
        self.rng = random.Random(seed)
        self.front = socket.socket(type=socket.SOCK_DGRAM)
        self.front.bind(("127.0.0.1", 0))
        self.address = self.front.getsockname()
        self.upstream: dict[tuple[str, int], socket.socket] = {}
        self.held: dict[int, tuple[socket.socket, bytes, tuple[str, int]]] = {}
        # "up" (clients to the server) and "down": datagrams in, dropped, sent (copies included).
        self.counts = {way: {"in": 0, "dropped": 0, "sent": 0} for way in ("up", "down")}
        self.upstream_addresses: set[tuple[str, int]] = set()  # filled in by close()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _forward(self, way: str, out: socket.socket, data: bytes, to: tuple[str, int]) -> None:
        """Sends with the faults applied; a reordered datagram waits for the next one."""
        counts = self.counts[way]
        counts["in"] += 1
        key = out.fileno()
        if self.rng.random() < self.drop:
            counts["dropped"] += 1
            return
        if self.rng.random() < self.reorder and key not in self.held:
            self.held[key] = (out, data, to)
            return
        copies = 2 if self.rng.random() < self.dup else 1
        for _ in range(copies):
            out.sendto(data, to)
            counts["sent"] += 1
        if key in self.held:
            h_out, h_data, h_to = self.held.pop(key)
            h_out.sendto(h_data, h_to)
            counts["sent"] += 1

    def _run(self) -> None:
        import selectors

        sel = selectors.DefaultSelector()
        sel.register(self.front, selectors.EVENT_READ, None)
        while not self.stop.is_set():
            for key, _ in sel.select(0.05):
                sock = key.fileobj
                assert isinstance(sock, socket.socket)
                data, source = sock.recvfrom(70_000)
                if key.data is None:  # from a client: to the server, through its own socket
                    up = self.upstream.get(source)
                    if up is None:
                        up = socket.socket(type=socket.SOCK_DGRAM)
                        up.bind(("127.0.0.1", 0))
                        self.upstream[source] = up
                        sel.register(up, selectors.EVENT_READ, source)
                    self._forward("up", up, data, self.server)
                else:  # from the server: back to the client it belongs to
                    self._forward("down", self.front, data, key.data)

    def close(self) -> None:
        self.stop.set()
        self.thread.join(5)
        # The addresses the server saw, one per client.
        self.upstream_addresses = {s.getsockname() for s in self.upstream.values()}
        for s in [self.front, *self.upstream.values()]:
            s.close()


@pytest.mark.parametrize("drop", [0.10, 0.30])
def test_loss_expires_live_clients_no_more_than_predicted(
    make_server: MakeServer, figure: Figure, drop: float
) -> None:
    # 3.5 heartbeats per interval: only three lost in a row leave a gap longer than the interval.
    interval, heartbeat, clients, intervals = 0.35, 0.1, 10, 30
    dup, reorder = 0.05, 0.25
    server = make_server(interval=interval)
    relay = LossyRelay(server.address, drop, dup, reorder, seed=int(drop * 100))
    running = [ChatClientUdp(*relay.address, interval=heartbeat) for _ in range(clients)]
    seen: set[tuple[str, int]] = set()  # every address the server listed
    listed = []  # how many were listed, at each tick
    ticks = 0
    try:
        for c in running:
            c.start()
        # The server broadcasts now and then, so the way down carries traffic too; a broadcast
        # does not make anyone alive, so the expiries are the heartbeats' alone.
        deadline = time.monotonic() + intervals * interval
        while time.monotonic() < deadline:
            now_listed = server.clients.keys()
            seen |= now_listed
            listed.append(len(now_listed))
            server.broadcast(b"tick %d" % ticks)
            ticks += 1
            time.sleep(0.25)
        heard = [len(c.recv_many(timeout=0)) for c in running]
        for c in running:
            c.stop()
        expired = server.stats()["expired"]
    finally:
        for c in running:
            c.stop()
        relay.close()
    up, down = relay.counts["up"], relay.counts["down"]
    listed_share = sum(listed) / (len(listed) * clients)
    heartbeats = clients * intervals * interval / heartbeat
    # A false expiry needs three heartbeats lost in a row. A reordered one arrives a heartbeat
    # late, which counts against the gap like a loss, so it bounds the rate from above.
    predicted = heartbeats * drop**3
    bound = heartbeats * (drop + (1 - drop) * reorder) ** 3
    figure(
        f"lossy relay, drop {drop:.0%} dup {dup:.0%} reorder {reorder:.0%}: {expired} false "
        f"expiries in {heartbeats:.0f} heartbeats; predicted {predicted:.1f} from loss, "
        f"{bound:.1f} counting reordering as loss; relayed up {up['sent']} of {up['in']}, "
        f"down {down['sent']} of {down['in']}; {sum(heard)} of {ticks * clients} ticks heard; "
        f"clients listed {listed_share:.1%} of the time"
    )
    # The traffic went through, with the loss asked for: every client reached the server through
    # its own relay socket and was listed, the server read all the relay sent it, and what came
    # back reached every client.
    assert len(relay.upstream_addresses) == clients
    assert seen == relay.upstream_addresses
    assert up["in"] >= heartbeats / 2, up  # a loaded machine may delay heartbeats, not halve them
    assert abs(up["dropped"] / up["in"] - drop) < 0.07, up
    assert wait_until(
        lambda: server.stats()["received"] + server.stats()["kernel_drops"] == up["sent"]
    ), (server.stats(), up)
    assert down["in"] > 0 and abs(down["dropped"] / down["in"] - drop) < 0.1, down
    assert all(n > 0 for n in heard), heard
    # Live clients stay listed: a false expiry lasts until the next heartbeat gets through.
    assert listed_share > 0.5, listed_share
    assert sum(heard) >= ticks * clients * (1 - drop) / 2, heard
    # Registrations that were themselves lost can only lower the count; +3 absorbs the noise
    # of a few dozen events.
    assert expired <= 1.5 * bound + 3


def test_a_flood_is_read_or_counted_and_the_server_answers_after(
    make_server: MakeServer, make_peer: MakePeer, figure: Figure
) -> None:
    server = make_server()
    listeners = [make_peer() for _ in range(50)]
    for p in listeners:
        p.sendto(b"reg", server.address)
    assert wait_until(lambda: len(server.clients) == 50)
    flood = subprocess.run(
        [
            sys.executable,
            "-c",
            textwrap.dedent(
                f"""
                import socket, threading
                def send():
                    s = socket.socket(type=socket.SOCK_DGRAM)
                    data = b"flood " + b"x" * 58
                    for _ in range(100_000):
                        s.sendto(data, {server.address!r})
                threads = [threading.Thread(target=send) for _ in range(8)]
                for t in threads: t.start()
                for t in threads: t.join()
                """
            ),
        ],
        timeout=120,
    )
    assert flood.returncode == 0
    sent = 50 + 8 * 100_000

    def settled() -> bool:
        s = server.stats()
        return s["received"] + s["kernel_drops"] == sent

    assert wait_until(settled, timeout=30)
    # Every message read has begun its fan-out (`broadcasts` counts each as its fan-out starts,
    # with the list of clients taken): the probe, registered after, hears only its own.
    assert wait_until(
        lambda: server.stats()["broadcasts"] == server.stats()["received"] - 50, timeout=30
    ), server.stats()
    probe = make_peer()
    t0 = time.perf_counter()
    probe.sendto(b"probe", server.address)
    assert probe.recv(200).endswith(b"\nprobe\n")
    rtt = time.perf_counter() - t0
    stats = server.stats()
    figure(
        f"flood of 8 x 100,000 with 50 clients: {stats['received']:,} read, "
        f"{stats['kernel_drops']:,} dropped by the kernel, {stats['broadcasts']:,} relayed; "
        f"probe round trip after: {rtt * 1000:.1f} ms"
    )
    # Answered at once, not after a backlog: well under a second even on a loaded machine (the
    # figure above is the measure: under a millisecond here).
    assert rtt < 1.0, rtt


def nearest_rank(values: list[float], p: float) -> float:
    return sorted(values)[math.ceil(p * len(values)) - 1]


@pytest.mark.timeout(120)
def test_stop_is_fast_exact_and_clean_over_100_cycles(make_peer: MakePeer, figure: Figure) -> None:
    with ChatServerUdp(port=0) as first:  # a port to reuse, and warm-up for the counts below
        ip, port = first.address
    threads, fds = thread_count(), fd_count()
    clients = [big_buffer(make_peer()) for _ in range(3)]
    flooder = big_buffer(make_peer())
    peers = [*clients, flooder]
    # A flooded cycle floods the server with heartbeats as fast as one thread can send, which
    # keep its receiver busy and cost no fan-out, and mixes in chat messages, each relayed to
    # the four peers. Nobody reads the peers until stop() has returned, so those messages and
    # the `end` after them must fit unread in a peer's receive buffer: as many as half of what
    # the granted buffer holds (256 on a stock kernel). stop() comes once half of them are sent.
    flood_ack = ack(flooder.getsockname(), b"flood")
    budget = room(rcvbuf(flooder), len(flood_ack)) // 2
    assert budget >= 100, budget
    latencies: dict[str, list[float]] = {"idle": [], "flooded": []}

    def flood(stop: threading.Event, half: threading.Event) -> None:
        messages = 0
        deadline = time.monotonic() + 10
        for i in range(10_000_000):
            if stop.is_set() or time.monotonic() > deadline:
                break
            flooder.sendto(b"^hb^", (ip, port))
            if i % 4 == 0 and messages < budget:
                flooder.sendto(b"flood", (ip, port))
                messages += 1
                if messages == budget // 2:
                    half.set()
        half.set()

    relayed = 0  # flood messages the peers got before `end`
    for cycle in range(100):
        flooded = cycle % 2 == 1
        server = ChatServerUdp(ip, port)
        server.start()  # binds the same port again at once
        for c in clients:
            register(c, server)
        stop_flood, half = threading.Event(), threading.Event()
        if flooded:
            register(flooder, server)
            sender = threading.Thread(target=flood, args=(stop_flood, half))
            sender.start()
            assert half.wait(10)
        t0 = time.perf_counter()
        server.stop()
        latencies["flooded" if flooded else "idle"].append(time.perf_counter() - t0)
        if flooded:
            stop_flood.set()
            sender.join()
        # Every peer gets exactly one `end`, after the messages relayed before it...
        for c in peers if flooded else clients:
            before = []
            c.settimeout(5)
            data = b""
            with contextlib.suppress(TimeoutError):
                for _ in range(budget + 1):
                    if (data := c.recv(70_000)) == b"end":
                        break
                    before.append(data)
            assert data == b"end", (cycle, "no end", before[-3:])
            assert all(d == flood_ack for d in before), (cycle, before[-3:])
            relayed += len(before)
        # ...and nothing after it.
        time.sleep(0.05)
        for c in peers:
            c.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                late = c.recv(70_000)
                pytest.fail(f"cycle {cycle}: {late!r} after end")
    figure(f"stop() flooded: {relayed:,} flood messages reached the peers before `end`")
    assert relayed > 0  # the fan-out was busy when stop() came
    for kind, values in latencies.items():
        p50, p90 = statistics.median(values), nearest_rank(values, 0.9)
        figure(
            f"stop() {kind}, 50 cycles: p50 {p50 * 1000:.2f} ms, "
            f"p90 {p90 * 1000:.2f} ms, p99 {nearest_rank(values, 0.99) * 1000:.2f} ms, "
            f"max {max(values) * 1000:.2f} ms"
        )
        # Milliseconds (the figures above); the bounds leave room for a loaded machine.
        assert p50 < 0.05, (kind, p50)
        assert p90 < 0.5, (kind, p90)
    assert wait_until(lambda: thread_count() == threads), (thread_count(), threads)
    assert fd_count() == fds + 4  # the four sockets of this test
