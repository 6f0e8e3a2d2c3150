"""Clusters (issue 12): servers that share one chat through a real Redis's pub/sub.

Each test starts its own redis-server (tests/redis_server.py) on a free loopback port; servers
run in this process or, where the issue asks for processes, in processes of their own
(tests/cluster_node.py). Clients are plain UDP sockets (`Inbox`, read by a thread of its own, so
nothing waits unread in a stock kernel's socket buffer) or `ChatClientUdp`.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import logging
import os
import queue
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import udpchat
from conftest import HAS_IPV6, Collect, ack, fd_count, register, thread_count, wait_until
from redis_server import RedisServer
from test_cli import ENV, Proc
from udpchat import MAX_DATAGRAM, ChatClientUdp, ChatServerUdp

Addr = tuple[str, int]
Figure = Callable[[str], None]
MakeRedis = Callable[..., RedisServer]
MakeServer = Callable[..., ChatServerUdp]

NODE_SCRIPT = Path(__file__).with_name("cluster_node.py")
CLUSTER_KEYS = {
    "cluster_published",
    "cluster_received",
    "cluster_dropped",
    "cluster_malformed",
    "cluster_errors",
    "cluster_connected",
}
# How long a server may take to be connected (both connections up, subscribed) once Redis is
# there: the bound for a reconnect; the first connect takes milliseconds.
CONNECT_TIMEOUT = 5.0
# How long to wait for a datagram that should come (a slow machine takes milliseconds), and to
# watch for one that should not.
ARRIVE = 5.0
SILENCE = 0.3
# An 8-byte server id no udpchat server has (ids are random per run; this one is ours).
FOREIGN_ID = b"\xf0reign\x00\x01"
# What a validated server sends a client it has validated: a server's output, never relayed.
WELCOME = b"welcome 0123456789abcdef0123456789abcdef"


# --- the envelope, as /work/cluster-contract.md and the README give it -----------------------


def envelope(
    origin: Addr, payload: bytes, server_id: bytes = FOREIGN_ID, version: int = 1
) -> bytes:
    """version (1 byte), server id (8), family (1: 4 or 6), origin ip (4 or 16), origin port
    (2, big-endian), payload."""
    ip = ipaddress.ip_address(origin[0])
    family = 4 if ip.version == 4 else 6
    return (
        bytes([version])
        + server_id
        + bytes([family])
        + ip.packed
        + origin[1].to_bytes(2, "big")
        + payload
    )


def parse_envelope(data: bytes) -> tuple[int, bytes, Addr, bytes]:
    """(version, server id, origin, payload) of a well-formed envelope."""
    version, server_id, family = data[0], data[1:9], data[9]
    size = {4: 4, 6: 16}[family]
    ip = str(ipaddress.ip_address(data[10 : 10 + size]))
    port = int.from_bytes(data[10 + size : 12 + size], "big")
    return version, server_id, (ip, port), data[12 + size :]


def parse_ack(data: bytes) -> tuple[Addr, bytes]:
    """(sender, payload) of `ack: ip port\\npayload\\n`."""
    head, _, rest = data.partition(b"\n")
    word, ip, port = head.split(b" ")
    assert word == b"ack:" and rest.endswith(b"\n"), data[:100]
    return (ip.decode(), int(port)), rest[:-1]


# --- clients ------------------------------------------------------------------------------


class Inbox:
    """A plain UDP socket (as `nc -u` or the tutorial's client) whose datagrams a thread of its
    own reads as they come and keeps, in order of arrival."""

    def __init__(self, family: socket.AddressFamily = socket.AF_INET) -> None:
        self.sock = socket.socket(family, socket.SOCK_DGRAM)
        self.sock.bind(("::1" if family == socket.AF_INET6 else "127.0.0.1", 0))
        self.sock.settimeout(0.05)
        self.address: Addr = self.sock.getsockname()[:2]
        self.received: list[bytes] = []
        self._cond = threading.Condition()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        deadline = time.monotonic() + 600  # longer than any test may run
        while not self._stop.is_set() and time.monotonic() < deadline:
            try:
                data = self.sock.recv(70_000)
            except TimeoutError:
                continue
            except OSError:
                return
            with self._cond:
                self.received.append(data)
                self._cond.notify_all()

    def send(self, data: bytes, to: Addr) -> None:
        self.sock.sendto(data, to)

    def wait(self, count: int, timeout: float = ARRIVE) -> bool:
        """Whether `count` datagrams (in all) have come within `timeout` seconds."""
        with self._cond:
            return self._cond.wait_for(lambda: len(self.received) >= count, timeout)

    def got(self) -> list[bytes]:
        with self._cond:
            return list(self.received)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.sock.close()


@pytest.fixture
def make_inbox() -> Iterator[Callable[..., Inbox]]:
    made: list[Inbox] = []

    def make(family: socket.AddressFamily = socket.AF_INET) -> Inbox:
        inbox = Inbox(family)
        made.append(inbox)
        return inbox

    yield make
    for inbox in made:
        inbox.close()


MakeInbox = Callable[..., Inbox]


def join(inbox: Inbox, server: ChatServerUdp) -> Addr:
    """Registers `inbox` with an in-process server and waits until the server lists it."""
    return register(inbox.sock, server)


def assert_quiet(*inboxes: Inbox, counts: list[int] | None = None) -> None:
    """No inbox gets anything more for SILENCE seconds (beyond `counts`, or what it has now)."""
    before = counts if counts is not None else [len(i.got()) for i in inboxes]
    time.sleep(SILENCE)
    after = [len(i.got()) for i in inboxes]
    assert after == before, [i.got()[n:][:5] for i, n in zip(inboxes, before, strict=True)]


# --- servers in this process ---------------------------------------------------------------


@pytest.fixture
def make_member(make_server: MakeServer) -> Callable[..., ChatServerUdp]:
    """A started server of the cluster at `url`; clients expire after 30 s (plain sockets send
    no heartbeats)."""

    def make(url: str, **kwargs: Any) -> ChatServerUdp:
        kwargs.setdefault("interval", 30)
        return make_server(cluster=url, **kwargs)

    return make


MakeMember = Callable[..., ChatServerUdp]


def connected(server: ChatServerUdp) -> bool:
    return bool(server.stats()["cluster_connected"])


def wait_connected(*servers: ChatServerUdp, timeout: float = CONNECT_TIMEOUT) -> float:
    """Waits until every server is connected to Redis; how long that took, in seconds."""
    t0 = time.monotonic()
    ok = wait_until(lambda: all(connected(s) for s in servers), timeout=timeout)
    assert ok, [s.stats() for s in servers]
    return time.monotonic() - t0


def cluster_stats(server: ChatServerUdp) -> dict[str, int]:
    return {k: v for k, v in server.stats().items() if k.startswith("cluster_")}


Pair = tuple[ChatServerUdp, ChatServerUdp, Inbox, Inbox]


@pytest.fixture
def make_pair(make_member: MakeMember, make_inbox: MakeInbox) -> Callable[..., Pair]:
    """Two members of the cluster at `url` (the second at `url_b` if given), both connected,
    with a plain-socket client joined to each: `a, b, ia, ib`."""

    def make(url: str, url_b: str | None = None) -> Pair:
        a, b = make_member(url), make_member(url_b or url)
        wait_connected(a, b)
        ia, ib = make_inbox(), make_inbox()
        join(ia, a)
        join(ib, b)
        return a, b, ia, ib

    return make


MakePair = Callable[..., Pair]


# --- servers in processes of their own -----------------------------------------------------


class Node:
    """tests/cluster_node.py: one clustered server in a process of its own."""

    def __init__(self, url: str, log: Path, *args: str) -> None:
        self.log_path = log
        with open(log, "wb") as stderr:
            self.proc = subprocess.Popen(
                [sys.executable, str(NODE_SCRIPT), url, *args],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=stderr,
                text=True,
                env=ENV,
            )
        self._lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._pump, daemon=True).start()
        first = self._reply(timeout=10.0)
        self.address: Addr = (first["address"][0], first["address"][1])

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self._lines.put(line)

    def _reply(self, timeout: float) -> Any:
        try:
            line = self._lines.get(timeout=timeout)
        except queue.Empty:
            pytest.fail(f"no answer from {NODE_SCRIPT.name} in {timeout} s; its log:\n{self.log()}")
        return json.loads(line)

    def request(self, command: str, timeout: float = 5.0) -> Any:
        assert self.proc.stdin is not None
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        return self._reply(timeout)

    def stats(self) -> dict[str, int]:
        stats: dict[str, int] = self.request("stats")
        return stats

    def clients(self) -> set[Addr]:
        return {(ip, port) for ip, port in self.request("clients")}

    def join(self, inbox: Inbox) -> None:
        inbox.send(b"reg", self.address)
        assert wait_until(lambda: inbox.address in self.clients(), timeout=ARRIVE), self.log()

    def wait_connected(self, timeout: float = CONNECT_TIMEOUT) -> None:
        ok = wait_until(lambda: bool(self.stats()["cluster_connected"]), timeout, step=0.02)
        assert ok, (self.stats(), self.log())

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait(10)

    def close(self) -> None:
        """Closes its stdin (it stops its server and exits), or kills it after 10 s."""
        if self.proc.poll() is None:
            with contextlib.suppress(OSError):
                assert self.proc.stdin is not None
                self.proc.stdin.close()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:]


@pytest.fixture
def make_node(tmp_path: Path) -> Iterator[Callable[..., Node]]:
    made: list[Node] = []

    def make(url: str, *args: str) -> Node:
        node = Node(url, tmp_path / f"node-{len(made)}.log", *args)
        made.append(node)
        return node

    yield make
    for i, node in enumerate(made):
        node.close()
        print(f"--- node {i} (exit {node.proc.returncode}) log:\n{node.log()}")  # on failure


MakeNode = Callable[..., Node]


# --- many servers, one chat ----------------------------------------------------------------


def test_three_servers_in_three_processes_share_one_chat(
    redis: RedisServer, make_node: MakeNode, make_inbox: MakeInbox, figure: Figure
) -> None:
    nodes = [make_node(redis.url) for _ in range(3)]
    for node in nodes:
        node.wait_connected()
    # Connected means subscribed: Redis counts the three subscribers.
    assert redis.numsub("udpchat") == 3
    members = [(node, make_inbox()) for node in nodes for _ in range(2)]
    for node, inbox in members:
        node.join(inbox)
    everyone = [inbox for _, inbox in members]
    rounds = 10
    sent: list[bytes] = []  # the ack every client should get for each message, in order sent
    t0 = time.monotonic()
    for r in range(rounds):
        # One message from every client per round, then every client must have all of them:
        # at most 6 datagrams wait in a socket buffer at a time. Bytes, not text: not UTF-8.
        for i, (node, inbox) in enumerate(members):
            payload = b"round %d from %d \xff\xfe\x00 ok" % (r, i)
            inbox.send(payload, node.address)
            sent.append(ack(inbox.address, payload))
        for inbox in everyone:
            assert inbox.wait(len(sent)), (r, len(inbox.got()), len(sent))
    took = time.monotonic() - t0
    # Nothing more comes: no copy twice, on the origin's server or any other.
    assert_quiet(*everyone)
    for inbox in everyone:
        got = inbox.got()
        # Every message exactly once, bytes identical to what a single server sends its
        # clients (conftest.ack, which the single-server tests check on the wire).
        assert Counter(got) == Counter(sent)
        # Per origin, in the order the origin sent them.
        for _, origin in members:
            mine = [d for d in got if parse_ack(d)[0] == origin.address]
            assert mine == [d for d in sent if parse_ack(d)[0] == origin.address]
    for node in nodes:
        stats = node.stats()
        assert stats["cluster_published"] == 2 * rounds, stats
        assert stats["cluster_received"] == 4 * rounds, stats
        assert stats["cluster_dropped"] == stats["cluster_malformed"] == 0, stats
        assert stats["cluster_errors"] == 0, stats
        assert stats["cluster_connected"] is True, stats
    figure(
        f"cluster, 3 server processes x 2 clients: {len(sent)} messages, each to all 6 clients, "
        f"in {took * 1000:.0f} ms (rounds of 6, each waited for)"
    )


def test_per_origin_order_across_servers(
    redis: RedisServer, make_node: MakeNode, make_inbox: MakeInbox, figure: Figure
) -> None:
    nodes = [make_node(redis.url) for _ in range(3)]
    for node in nodes:
        node.wait_connected()
    # A talker on the first two servers, a listener on each of the three.
    talkers = [make_inbox(), make_inbox()]
    listeners = [make_inbox() for _ in nodes]
    for talker, node in zip(talkers, nodes[:2], strict=True):
        node.join(talker)
    for listener, node in zip(listeners, nodes, strict=True):
        node.join(listener)
    count, burst = 200, 20
    t0 = time.monotonic()
    for start in range(0, count, burst):
        for n in range(start, start + burst):
            for t, (talker, node) in enumerate(zip(talkers, nodes[:2], strict=True)):
                talker.send(b"talker %d says %03d" % (t, n), node.address)
        # Every client has every message so far before the next burst: at most 2 x 20 wait
        # unread anywhere, whatever the socket buffers.
        for inbox in [*listeners, *talkers]:
            assert inbox.wait(2 * (start + burst)), (start, len(inbox.got()))
    took = time.monotonic() - t0
    assert_quiet(*listeners, *talkers)
    for listener in [*listeners, *talkers]:
        got = [parse_ack(d) for d in listener.got()]
        for t, talker in enumerate(talkers):
            theirs = [payload for origin, payload in got if origin == talker.address]
            assert theirs == [b"talker %d says %03d" % (t, n) for n in range(count)]
    figure(
        f"cluster order: {count} messages from each of 2 clients on 2 servers, in order at all "
        f"5 clients of 3 servers, in {took * 1000:.0f} ms (bursts of {burst})"
    )


def test_a_killed_server_process_leaves_the_others_chatting(
    redis: RedisServer, make_node: MakeNode, make_inbox: MakeInbox
) -> None:
    a, b, c = (make_node(redis.url) for _ in range(3))
    for node in (a, b, c):
        node.wait_connected()
    ia, ib, ic = make_inbox(), make_inbox(), make_inbox()
    for inbox, node in ((ia, a), (ib, b), (ic, c)):
        node.join(inbox)
    ia.send(b"before", a.address)
    for inbox in (ia, ib, ic):
        assert inbox.wait(1)
    c.kill()
    assert c.proc.returncode == -signal.SIGKILL
    # Redis sees its connections close.
    assert wait_until(lambda: redis.numsub("udpchat") == 2, timeout=ARRIVE), redis.numsub("udpchat")
    ia.send(b"after from a", a.address)
    ib.send(b"after from b", b.address)
    want = {ack(ia.address, b"after from a"), ack(ib.address, b"after from b")}
    for inbox in (ia, ib):
        assert inbox.wait(3)
    assert_quiet(ia, ib, ic)
    for inbox in (ia, ib):
        assert set(inbox.got()[1:]) == want and len(inbox.got()) == 3
    assert ic.got() == [ack(ia.address, b"before")]
    for node in (a, b):
        stats = node.stats()
        assert stats["cluster_connected"] is True, stats
        assert stats["cluster_dropped"] == stats["cluster_errors"] == 0, stats
        assert stats["cluster_published"] == (2 if node is a else 1), stats


def test_a_servers_own_publication_is_not_delivered_twice(
    redis: RedisServer, make_member: MakeMember, make_inbox: MakeInbox
) -> None:
    a, b = make_member(redis.url), make_member(redis.url)
    wait_connected(a, b)
    ia1, ia2, ib = make_inbox(), make_inbox(), make_inbox()
    for inbox, server in ((ia1, a), (ia2, a), (ib, b)):
        join(inbox, server)
    # Listen on the channel ourselves: the envelope a publishes is the contract's.
    with redis.connect() as spy:
        spy.command("SUBSCRIBE", "udpchat")
        payload = b"once only \xff"
        ia1.send(payload, a.address)
        kind, channel, published = spy._reply()
    assert (kind, channel) == (b"message", b"udpchat")
    version, a_id, origin, carried = parse_envelope(published)
    assert (version, origin, carried) == (1, ia1.address, payload)
    assert len(published) == 16 + len(payload)  # the IPv4 overhead
    want = ack(ia1.address, payload)
    for inbox in (ia1, ia2, ib):
        assert inbox.wait(1)
    assert_quiet(ia1, ia2, ib)
    assert ia1.got() == ia2.got() == ib.got() == [want]
    assert cluster_stats(a)["cluster_received"] == 0
    assert cluster_stats(b)["cluster_received"] == 1
    # The same envelope again, a's id in it: b delivers it (a replay is a message from a),
    # a does not, as it never delivers its own publications.
    assert redis.publish("udpchat", published) == 2
    assert ib.wait(2)
    assert_quiet(ia1, ia2, ib)
    assert ia1.got() == ia2.got() == [want]
    assert ib.got() == [want, want]
    sa, sb = cluster_stats(a), cluster_stats(b)
    assert (sa["cluster_received"], sa["cluster_malformed"]) == (0, 0), sa
    assert (sb["cluster_received"], sb["cluster_malformed"]) == (2, 0), sb
    # Ids are per server run: b's differs from a's.
    with redis.connect() as spy:
        spy.command("SUBSCRIBE", "udpchat")
        ib.send(b"from b", b.address)
        b_id = parse_envelope(spy._reply()[2])[1]
    assert len(a_id) == len(b_id) == 8 and a_id != b_id


def test_only_what_a_server_relays_is_published(redis: RedisServer, make_pair: MakePair) -> None:
    a, b, ia, ib = make_pair(redis.url)
    # Control words, blanks and a server's output (which a server never relays: the loop
    # rules) are not chat messages: nothing goes on the channel for them.
    for data in [b"reg", b"^hb^", b"  \n", b"end", b"ack: 10.0.0.1 5\nforged\n", WELCOME]:
        ia.send(data, a.address)
    # A message is relayed stripped of its leading and trailing whitespace, here and there.
    ia.send(b" \t padded \r\n", a.address)
    assert ia.wait(1) and ib.wait(1)
    assert_quiet(ia, ib)
    assert ia.got() == ib.got() == [ack(ia.address, b"padded")]
    assert cluster_stats(a)["cluster_published"] == 1
    assert cluster_stats(b)["cluster_received"] == 1
    assert ia.address in a.clients  # `quit` is not published either: it leaves a, alone
    ia.send(b"quit", a.address)
    assert wait_until(lambda: ia.address not in a.clients)
    assert_quiet(ia, ib)
    assert cluster_stats(a)["cluster_published"] == 1


def test_a_publishing_connection_killed_while_quiet_loses_nothing(
    redis: RedisServer, make_pair: MakePair
) -> None:
    # CLIENT KILL (or Redis's `timeout`) closes the publishing connection between messages: the
    # publisher checks a connection quiet for 100 ms before it writes, and the message goes out
    # on a new one rather than being dropped.
    a, _, ia, ib = make_pair(redis.url)
    for i in range(3):
        redis.command("CLIENT", "KILL", "TYPE", "normal")  # not the subscribed connections
        time.sleep(0.2)  # past the 100 ms check, well before the 1 s keepalive's PING
        ia.send(b"after a kill %d" % i, a.address)
        assert ib.wait(i + 1), (ib.got(), cluster_stats(a))
    assert ib.got() == [ack(ia.address, b"after a kill %d" % i) for i in range(3)]
    assert cluster_stats(a)["cluster_dropped"] == 0


def test_presence_stays_per_server(redis: RedisServer, make_pair: MakePair) -> None:
    a, b, ia, ib = make_pair(redis.url)
    ia.send(b"hello", a.address)
    assert ib.wait(1)
    assert set(a.clients) == set(a.peers()) == {ia.address}
    assert set(b.clients) == set(b.peers()) == {ib.address}
    assert b.peers()[ib.address].messages == 0
    assert [(e.kind, e.addr) for e in b.events(timeout=0)] == [("join", ib.address)]
    assert a.stats()["clients"] == b.stats()["clients"] == 1

    # A server's other counters are its own, what came from the channel included (README).
    # Waited for: a delivery is counted once its sendmmsg has returned, which may be after the
    # client has read it.
    def counts() -> tuple[int, int, int]:
        stats = b.stats()
        return stats["broadcasts"], stats["deliveries"], stats["received"]

    assert wait_until(lambda: counts() == (1, 1, 1)), counts()


def test_stop_closes_the_redis_connections_and_a_restart_is_a_new_member(
    redis: RedisServer, make_member: MakeMember, make_inbox: MakeInbox
) -> None:
    # Warm up once: one-time allocations (logging caches, the module) are not counted.
    warm = ChatServerUdp("127.0.0.1", 0, cluster=redis.url)
    warm.start()
    wait_connected(warm)
    warm.stop()
    assert wait_until(lambda: redis.numsub("udpchat") == 0)
    threads, fds = thread_count(), fd_count()
    a = ChatServerUdp("127.0.0.1", 0, 30, cluster=redis.url)
    ids = set()
    for _ in range(5):
        a.start()
        wait_connected(a)
        assert redis.numsub("udpchat") == 1
        with redis.connect() as spy:
            spy.command("SUBSCRIBE", "udpchat")
            a.broadcast("who am i")
            ids.add(parse_envelope(spy._reply()[2])[1])
        a.stop()
        # Both its connections are closed: Redis has no subscriber left, nor any client but
        # the one asking.
        assert wait_until(lambda: redis.numsub("udpchat") == 0), redis.numsub("udpchat")
        assert wait_until(lambda: redis.command("CLIENT", "LIST").count(b"\n") == 1)
        assert not connected(a)
    assert len(ids) == 5  # a new server id every run
    assert wait_until(lambda: thread_count() == threads), (thread_count(), threads)
    assert fd_count() == fds
    # And a run after these is a member like any other.
    a.start()
    try:
        b = make_member(redis.url)
        wait_connected(a, b)
        ib = make_inbox()
        join(ib, b)
        a.broadcast("back again")
        assert ib.wait(1)
        assert ib.got() == [ack(a.address, b"back again")]
    finally:
        a.stop()


def test_broadcast_crosses_servers_with_the_origin_servers_ack_line(
    redis: RedisServer, make_pair: MakePair
) -> None:
    a, b, ia, ib = make_pair(redis.url)
    a.broadcast("from server a")
    b.broadcast(b"from server b \xff")
    want = {ack(a.address, b"from server a"), ack(b.address, b"from server b \xff")}
    for inbox in (ia, ib):
        assert inbox.wait(2)
    assert_quiet(ia, ib)
    assert set(ia.got()) == set(ib.got()) == want and len(ia.got()) == len(ib.got()) == 2
    for server in (a, b):
        stats = cluster_stats(server)
        assert (stats["cluster_published"], stats["cluster_received"]) == (1, 1), stats


def malformed_messages() -> dict[str, bytes]:
    """What may come on the channel that is not an envelope, by what is wrong with it."""
    good = envelope(("127.0.0.1", 40000), b"payload")
    good6 = envelope(("::1", 40000), b"payload")
    # Just too long: an ack line of 65,508 bytes, one more than a datagram carries.
    longest = MAX_DATAGRAM - len(ack(("127.0.0.1", 40000), b""))
    longest6 = MAX_DATAGRAM - len(ack(("::1", 40000), b""))
    return {
        "foreign text": b"hello",
        "version 0": bytes([0]) + good[1:],
        "version 2": envelope(("127.0.0.1", 40000), b"payload", version=2),
        "version 255": bytes([255]) + good[1:],
        "no family": good[:9],
        "ipv4 address cut": good[:12],
        "ipv4 port cut": good[:15],
        "ipv6 address cut": good6[:20],
        "ipv6 port cut": good6[:27],
        "family 0": good[:9] + b"\x00" + good[10:],
        "family 5": good[:9] + b"\x05" + good[10:],
        "family 46": good[:9] + b"\x2e" + good[10:],
        "ack too long": envelope(("127.0.0.1", 40000), b"x" * (longest + 1)),
        "ack too long, ipv6": envelope(("::1", 40000), b"x" * (longest6 + 1)),
    }


def test_foreign_and_malformed_messages_are_counted_and_ignored(
    redis: RedisServer, figure: Figure, make_pair: MakePair
) -> None:
    a, b, ia, ib = make_pair(redis.url)
    bad = malformed_messages()
    for name, data in bad.items():
        # Both servers are subscribed and get each one.
        assert redis.publish("udpchat", data) == 2, name
    ok = wait_until(
        lambda: all(s.stats()["cluster_malformed"] == len(bad) for s in (a, b)), timeout=ARRIVE
    )
    assert ok, (cluster_stats(a), cluster_stats(b))
    assert_quiet(ia, ib, counts=[0, 0])
    for server in (a, b):
        stats = cluster_stats(server)
        assert stats["cluster_received"] == 0 and stats["cluster_connected"] is True, stats
        assert server.running
    # Both still serve, locally and across.
    ia.send(b"still here", a.address)
    ib.send(b"me too", b.address)
    want = {ack(ia.address, b"still here"), ack(ib.address, b"me too")}
    for inbox in (ia, ib):
        assert inbox.wait(2)
    assert_quiet(ia, ib)
    assert set(ia.got()) == set(ib.got()) == want
    figure(f"cluster: {len(bad)} malformed messages on the channel: each counted, none relayed")


def test_well_formed_envelopes_from_elsewhere_are_fanned_out(
    redis: RedisServer, make_member: MakeMember, make_inbox: MakeInbox
) -> None:
    # Whatever a server of another run, another build or another language publishes in the
    # format the README gives, byte for byte.
    server = make_member(redis.url)
    wait_connected(server)
    inbox = make_inbox()
    join(inbox, server)
    longest = MAX_DATAGRAM - len(ack(("127.0.0.1", 40000), b""))
    cases = [
        (("10.1.2.3", 4567), b"from a server far away"),
        (("2001:db8::7", 65535), b"over ipv6 \xff\x00"),
        (("127.0.0.1", 40000), b"L" * longest),  # its ack line is 65,507 bytes: the most
    ]
    for origin, payload in cases:
        assert redis.publish("udpchat", envelope(origin, payload)) == 1
    assert inbox.wait(len(cases))
    assert_quiet(inbox)
    assert inbox.got() == [ack(origin, payload) for origin, payload in cases]
    assert len(inbox.got()[-1]) == MAX_DATAGRAM
    stats = cluster_stats(server)
    assert (stats["cluster_received"], stats["cluster_malformed"]) == (len(cases), 0), stats


def test_the_longest_message_crosses_byte_identical(
    redis: RedisServer, make_pair: MakePair
) -> None:
    a, b, ia, ib = make_pair(redis.url)
    longest = MAX_DATAGRAM - len(ack(ia.address, b""))
    payload = bytes(range(256)) * (longest // 256) + b"z" * (longest % 256)
    ia.send(payload, a.address)
    for inbox in (ia, ib):
        assert inbox.wait(1)
    assert ia.got() == ib.got() == [ack(ia.address, payload)]
    assert len(ib.got()[0]) == MAX_DATAGRAM
    # One byte more: a drops it on arrival; nothing is published.
    ia.send(payload + b"z", a.address)
    assert wait_until(lambda: a.stats()["dropped_oversize"] == 1)
    assert_quiet(ia, ib)
    assert cluster_stats(a)["cluster_published"] == 1
    assert cluster_stats(b)["cluster_received"] == 1


@pytest.mark.skipif(not HAS_IPV6, reason="no IPv6 loopback (::1) here")
def test_an_ipv6_origin_crosses_to_an_ipv4_server(
    redis: RedisServer, make_member: MakeMember, make_inbox: MakeInbox
) -> None:
    six, four = make_member(redis.url, ip="::1"), make_member(redis.url)
    wait_connected(six, four)
    i6, i4 = make_inbox(socket.AF_INET6), make_inbox()
    join(i6, six)
    join(i4, four)
    with redis.connect() as spy:
        spy.command("SUBSCRIBE", "udpchat")
        i6.send(b"over six", six.address)
        published = spy._reply()[2]
    assert parse_envelope(published)[2:] == (i6.address, b"over six")
    assert len(published) == 28 + len(b"over six")  # the IPv6 overhead
    i4.send(b"over four", four.address)
    want = {ack(i6.address, b"over six"), ack(i4.address, b"over four")}
    for inbox in (i6, i4):
        assert inbox.wait(2)
    assert_quiet(i6, i4)
    assert set(i6.got()) == set(i4.got()) == want
    assert ack(i6.address, b"over six").startswith(b"ack: ::1 ")


@pytest.mark.skipif(not HAS_IPV6, reason="no IPv6 loopback (::1) here")
def test_an_ipv4_client_of_a_dual_stack_server_crosses_as_its_neighbours_see_it(
    redis: RedisServer, make_member: MakeMember, make_inbox: MakeInbox
) -> None:
    # A server bound to `::` names an IPv4 client `::ffff:a.b.c.d`: so do the other servers.
    dual, other = make_member(redis.url, ip="::"), make_member(redis.url)
    wait_connected(dual, other)
    assert dual.address is not None
    talker, neighbour, remote = make_inbox(), make_inbox(), make_inbox()
    to_dual = ("127.0.0.1", dual.address[1])
    for inbox in (talker, neighbour):
        inbox.send(b"reg", to_dual)
    mapped = ("::ffff:127.0.0.1", talker.address[1])
    assert wait_until(lambda: mapped in dual.clients and len(dual.clients) == 2), dual.clients
    join(remote, other)
    talker.send(b"dual stack", to_dual)
    for inbox in (talker, neighbour, remote):
        assert inbox.wait(1)
    assert_quiet(talker, neighbour, remote)
    assert talker.got() == neighbour.got() == remote.got() == [ack(mapped, b"dual stack")]


# --- Redis going away ----------------------------------------------------------------------


def test_redis_killed_mid_chat_then_restarted(
    redis: RedisServer, make_member: MakeMember, make_inbox: MakeInbox, figure: Figure
) -> None:
    a, b = make_member(redis.url), make_member(redis.url)
    wait_connected(a, b)
    talker, local, remote = make_inbox(), make_inbox(), make_inbox()
    join(talker, a)
    join(local, a)
    join(remote, b)
    count, kill_at = 300, 100
    down_after: dict[str, float] = {}
    t_kill = 0.0
    for n in range(count):
        if n == kill_at:
            redis.kill()
            t_kill = time.monotonic()
        talker.send(b"n%03d" % n, a.address)
        if n >= kill_at:
            for name, server in (("a", a), ("b", b)):
                if name not in down_after and not connected(server):
                    down_after[name] = time.monotonic() - t_kill
        time.sleep(0.005)  # a steady chat, not a flood
    for name, server in (("a", a), ("b", b)):
        if name not in down_after:
            assert wait_until(lambda s=server: not connected(s), timeout=CONNECT_TIMEOUT), name
            down_after[name] = time.monotonic() - t_kill
    # Local delivery went on with no gap: the sender and its neighbour got every message, in
    # order, through the outage.
    numbered = [ack(talker.address, b"n%03d" % n) for n in range(count)]
    for inbox in (talker, local):
        assert inbox.wait(count), len(inbox.got())
    # What crossed before the kill: a prefix, in order; nothing after.
    got = remote.got()
    crossed = len(got)
    assert got == numbered[:crossed]
    assert kill_at // 2 <= crossed <= kill_at, crossed
    # Every publication was made or counted as dropped: those of the outage, and any still
    # queued when Redis went.
    sa: dict[str, int] = {}

    def settled() -> bool:
        sa.update(cluster_stats(a))
        return sa["cluster_published"] + sa["cluster_dropped"] == count

    assert wait_until(settled, timeout=CONNECT_TIMEOUT), sa
    assert crossed <= sa["cluster_published"] <= kill_at, (crossed, sa)
    assert sa["cluster_dropped"] >= count - kill_at, sa
    assert sa["cluster_connected"] is False and sa["cluster_errors"] >= 1, sa
    sb = cluster_stats(b)
    assert sb["cluster_received"] == crossed and sb["cluster_connected"] is False, sb

    # Redis back on the same port: both reconnect and resubscribe within 5 s.
    redis.restart()
    t_back = time.monotonic()
    took = wait_connected(a, b, timeout=10.0)
    assert took < 5.0, took
    assert redis.numsub("udpchat") == 2
    # Nothing from the outage comes late.
    assert_quiet(remote, counts=[crossed])
    talker.send(b"after the outage", a.address)
    remote.send(b"and back", b.address)
    assert remote.wait(crossed + 2)
    assert talker.wait(count + 2) and local.wait(count + 2)
    assert_quiet(talker, local, remote)
    after = {ack(talker.address, b"after the outage"), ack(remote.address, b"and back")}
    assert set(remote.got()[crossed:]) == after and len(remote.got()) == crossed + 2
    for inbox in (talker, local):
        assert set(inbox.got()[count:]) == after and len(inbox.got()) == count + 2
    figure(
        f"cluster, Redis SIGKILLed mid-chat: cluster_connected False after "
        f"{down_after['a'] * 1000:.0f} ms (a, publishing) / {down_after['b'] * 1000:.0f} ms "
        f"(b, only subscribed); {crossed} of {kill_at} messages sent before the kill crossed, "
        f"{sa['cluster_dropped']} publications dropped; both reconnected "
        f"{took * 1000:.0f} ms after the restart ({(time.monotonic() - t_back) * 1000:.0f} ms "
        f"to the end of the check)"
    )


def test_the_first_message_after_an_idle_outage_crosses(
    redis: RedisServer, make_pair: MakePair
) -> None:
    # Redis goes and comes back while nobody talks: both connections of each server must be
    # up again once it says so, the publishing one included (which had nothing to send when
    # Redis went), so the very first message after it crosses.
    a, b, ia, ib = make_pair(redis.url)
    redis.kill()
    assert wait_until(lambda: not connected(a) and not connected(b), timeout=CONNECT_TIMEOUT)
    time.sleep(0.5)
    redis.restart()
    wait_connected(a, b, timeout=10.0)
    ia.send(b"first after", a.address)
    ib.send(b"and the reply", b.address)
    assert ia.wait(2) and ib.wait(2), (ia.got(), ib.got(), cluster_stats(a), cluster_stats(b))
    assert_quiet(ia, ib)
    want = {ack(ia.address, b"first after"), ack(ib.address, b"and the reply")}
    assert set(ia.got()) == set(ib.got()) == want
    for server in (a, b):
        stats = cluster_stats(server)
        assert (stats["cluster_published"], stats["cluster_dropped"]) == (1, 0), stats


def cluster_records(records: list[logging.LogRecord], level: int) -> list[str]:
    return [r.getMessage() for r in records if r.name == "udpchat.cluster" and r.levelno == level]


def test_an_outage_is_logged_once_and_retried_with_backoff(
    redis: RedisServer,
    make_member: MakeMember,
    udpchat_logger: tuple[logging.Logger, Collect],
    figure: Figure,
) -> None:
    logger, handler = udpchat_logger
    logger.setLevel(logging.INFO)
    udpchat.reset_log_cache()
    server = make_member(redis.url)
    wait_connected(server)
    # The first connect's INFO, if any, is not the outage's.
    time.sleep(0.2)
    handler.records.clear()
    redis.kill()
    assert wait_until(lambda: not connected(server), timeout=CONNECT_TIMEOUT)
    assert wait_until(lambda: cluster_records(handler.records, logging.WARNING), timeout=2.0)
    errors_at_outage = server.stats()["cluster_errors"]
    outage = 3.0
    time.sleep(outage)
    retries = server.stats()["cluster_errors"] - errors_at_outage
    warnings = cluster_records(handler.records, logging.WARNING)
    redis.restart()
    took = wait_connected(server, timeout=10.0)
    assert wait_until(lambda: cluster_records(handler.records, logging.INFO), timeout=2.0)
    time.sleep(0.2)
    infos = cluster_records(handler.records, logging.INFO)
    # Backoff from 0.1 s doubling to 2 s: a handful of attempts for each of the two
    # connections in 3 s (about 5 each), not a tight loop, and not none.
    assert 2 <= retries <= 30, retries
    # Each change logged once (once per connection at most), not once per attempt.
    assert 1 <= len(warnings) <= 2, warnings
    assert cluster_records(handler.records, logging.WARNING) == warnings
    assert 1 <= len(infos) <= 2, infos
    assert took < 5.0, took
    figure(
        f"cluster outage of {outage:.0f} s: {retries} failed attempts counted in cluster_errors; "
        f"logged {warnings!r} then {infos!r}; reconnected {took * 1000:.0f} ms after the restart"
    )


def test_redis_down_at_start(
    make_redis: MakeRedis,
    make_member: MakeMember,
    make_inbox: MakeInbox,
    udpchat_logger: tuple[logging.Logger, Collect],
    figure: Figure,
) -> None:
    _, handler = udpchat_logger
    redis = make_redis(start=False)  # its port is chosen, nothing listens on it yet
    t0 = time.perf_counter()
    a = make_member(redis.url)  # no error
    started = time.perf_counter() - t0
    assert a.running and not connected(a)
    assert wait_until(lambda: cluster_records(handler.records, logging.WARNING), timeout=2.0)
    # The chat works locally; the publication is counted as dropped.
    i1, i2 = make_inbox(), make_inbox()
    join(i1, a)
    join(i2, a)
    i1.send(b"local only", a.address)
    for inbox in (i1, i2):
        assert inbox.wait(1)
    assert i1.got() == i2.got() == [ack(i1.address, b"local only")]
    assert wait_until(lambda: a.stats()["cluster_dropped"] == 1, timeout=CONNECT_TIMEOUT)
    stats = cluster_stats(a)
    assert stats["cluster_published"] == 0 and stats["cluster_errors"] >= 1, stats
    # Redis comes up: a connects by itself, and the chat crosses.
    time.sleep(0.5)
    redis.start()
    took = wait_connected(a)
    b = make_member(redis.url)
    wait_connected(b)
    ib = make_inbox()
    join(ib, b)
    i1.send(b"now across", a.address)
    assert ib.wait(1) and i1.wait(2) and i2.wait(2)
    assert_quiet(i1, i2, ib)
    assert ib.got() == i1.got()[1:] == i2.got()[1:] == [ack(i1.address, b"now across")]
    figure(
        f"cluster, Redis down at start(): start() took {started * 1000:.1f} ms; connected "
        f"{took * 1000:.0f} ms after Redis came up"
    )


@contextlib.contextmanager
def blackhole() -> Iterator[int]:
    """A TCP port that accepts connections (the kernel completes the handshake) and never
    answers a byte: a Redis that hangs."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(256)
        yield listener.getsockname()[1]


def resume(redis: RedisServer) -> None:
    """SIGCONT to a Redis that SIGSTOP froze."""
    if redis.proc is not None and redis.proc.poll() is None:
        os.kill(redis.proc.pid, signal.SIGCONT)


STOP_CASES = ["refused", "accepts but never answers", "frozen (SIGSTOP)", "killed just now"]


@pytest.mark.parametrize("case", STOP_CASES)
def test_stop_is_fast_with_redis_down(
    case: str,
    make_redis: MakeRedis,
    make_inbox: MakeInbox,
    figure: Figure,
) -> None:
    redis = make_redis(start=case in ("frozen (SIGSTOP)", "killed just now"))
    inbox = make_inbox()
    # Warm up once: one-time threads (the logging thread) are not counted.
    with ChatServerUdp("127.0.0.1", 0):
        pass
    threads = thread_count()
    stops, starts = [], []
    with contextlib.ExitStack() as stack:
        port = redis.port
        if case == "accepts but never answers":
            port = stack.enter_context(blackhole())
        if case == "frozen (SIGSTOP)":
            stack.callback(resume, redis)  # at the end, or should an assertion fail
        for round_ in range(5):
            if case == "killed just now" and not redis.running:
                redis.restart()
            if case == "frozen (SIGSTOP)":
                resume(redis)
            server = ChatServerUdp("127.0.0.1", 0, 30, cluster=f"redis://127.0.0.1:{port}")
            t0 = time.perf_counter()
            server.start()
            starts.append(time.perf_counter() - t0)
            try:
                join(inbox, server)
                if case in ("frozen (SIGSTOP)", "killed just now"):
                    wait_connected(server)
                if case == "frozen (SIGSTOP)":
                    assert redis.proc is not None
                    os.kill(redis.proc.pid, signal.SIGSTOP)
                elif case == "killed just now":
                    redis.kill()
                # A publication under way (the publisher waits on a Redis that will not
                # answer), and the connections mid-attempt or in their backoff; local
                # delivery does not wait for any of it.
                seen = len(inbox.got())
                inbox.send(b"into the void", server.address)
                assert inbox.wait(seen + 1)
                time.sleep(0.05 + 0.1 * round_)
            finally:
                t0 = time.perf_counter()
                server.stop()
                stops.append(time.perf_counter() - t0)
            stopped = time.monotonic()
            assert not server.running
            if case in ("refused", "accepts but never answers"):
                assert server.stats()["cluster_connected"] is False
        # A thread a stop left waiting on a Redis that does not answer ends on its own (the
        # last round's while Redis is still frozen): none is stuck for good.
        ended = wait_until(lambda: thread_count() == threads, timeout=10.0, step=0.005)
        assert ended, (thread_count(), threads)
        lingered = time.monotonic() - stopped
    figure(
        f"cluster stop() with Redis {case}, 5 rounds: median "
        f"{statistics.median(stops) * 1000:.2f} ms, max {max(stops) * 1000:.2f} ms; start() "
        f"median {statistics.median(starts) * 1000:.2f} ms, max {max(starts) * 1000:.2f} ms; "
        f"the last round's threads all ended {lingered * 1000:.0f} ms after its stop()"
    )
    # Pass/fail on the median, as the other stop tests: a loaded machine delays a few rounds;
    # a stop that waited on Redis (a connect or read timeout) would take its timeout every time.
    assert statistics.median(stops) < 0.1, stops
    assert max(stops) < 1.0, stops
    # Connecting is asynchronous: start() does not wait for Redis either.
    assert statistics.median(starts) < 0.1, starts


# --- options and arguments -----------------------------------------------------------------


def test_a_standalone_server_has_no_cluster_stats(make_server: MakeServer) -> None:
    server = make_server()
    assert not CLUSTER_KEYS & set(server.stats())
    assert not [k for k in server.stats() if k.startswith("cluster")]


def test_a_clustered_server_has_every_cluster_stat(
    redis: RedisServer, make_member: MakeMember
) -> None:
    server = make_member(redis.url)
    wait_connected(server)
    stats = server.stats()
    assert set(stats) >= CLUSTER_KEYS, stats
    assert stats["cluster_connected"] is True
    for key in CLUSTER_KEYS - {"cluster_connected"}:
        assert type(stats[key]) is int and stats[key] == 0, (key, stats[key])
    server.stop()
    # Counters outlive stop(), as the others do; it is no longer connected.
    stats = server.stats()
    assert set(stats) >= CLUSTER_KEYS and stats["cluster_connected"] is False, stats


@pytest.mark.parametrize(
    "kwargs",
    [
        {"cluster": "http://x"},
        {"cluster": "http://127.0.0.1:6379"},
        {"cluster": "redis://:badport"},
        {"cluster": "redis://127.0.0.1:badport"},
        {"cluster": "redis://127.0.0.1:99999"},
        {"cluster": "garbage"},
        {"cluster": ""},
        {"cluster": "127.0.0.1:6379"},
        {"cluster_channel": "udpchat"},
        {"cluster_channel": "other"},
        {"cluster": "redis://127.0.0.1:6379", "cluster_channel": ""},
    ],
    ids=repr,
)
def test_bad_cluster_arguments_are_value_errors(kwargs: dict[str, str]) -> None:
    with pytest.raises(ValueError, match="cluster"):
        ChatServerUdp("127.0.0.1", 0, **kwargs)


@pytest.mark.parametrize(
    "kwargs", [{"cluster": 6379}, {"cluster": b"redis://127.0.0.1:6379"}], ids=repr
)
def test_a_cluster_url_that_is_not_a_str_is_a_type_error(kwargs: dict[str, Any]) -> None:
    with pytest.raises(TypeError):
        ChatServerUdp("127.0.0.1", 0, **kwargs)


@pytest.mark.parametrize(
    "url",
    [
        "redis://127.0.0.1:6379",
        "redis://127.0.0.1:6379/0",
        "redis://127.0.0.1:6379/15",
        "redis://localhost:6379",
        "redis://:password@127.0.0.1:6379",
        "redis://user:password@127.0.0.1:6379/1",
        "redis://[::1]:6379",
        "redis+unix:///tmp/redis.sock",
        "unix:///tmp/redis.sock",
    ],
)
def test_good_cluster_urls_construct_without_connecting(url: str) -> None:
    # Construction only parses: nothing listens at most of these.
    server = ChatServerUdp("127.0.0.1", 0, cluster=url, cluster_channel="some channel")
    assert not server.running


def test_a_tls_url_works_or_says_the_build_cannot() -> None:
    # `rediss://` only where the build has TLS: either it constructs, or it is a ValueError.
    try:
        server = ChatServerUdp("127.0.0.1", 0, cluster="rediss://127.0.0.1:6379")
    except ValueError as e:
        assert "cluster" in str(e), e
    else:
        assert not server.running


def test_channels_are_separate_chats(
    redis: RedisServer, make_member: MakeMember, make_inbox: MakeInbox
) -> None:
    a = make_member(redis.url, cluster_channel="room-a")
    b = make_member(redis.url, cluster_channel="room-b")
    a2 = make_member(redis.url, cluster_channel="room-a")
    wait_connected(a, b, a2)
    assert (redis.numsub("room-a"), redis.numsub("room-b"), redis.numsub("udpchat")) == (2, 1, 0)
    ia, ib, ia2 = make_inbox(), make_inbox(), make_inbox()
    for inbox, server in ((ia, a), (ib, b), (ia2, a2)):
        join(inbox, server)
    ia.send(b"for room a", a.address)
    ib.send(b"for room b", b.address)
    assert ia2.wait(1) and ia.wait(1) and ib.wait(1)
    assert_quiet(ia, ib, ia2)
    assert ia.got() == ia2.got() == [ack(ia.address, b"for room a")]
    assert ib.got() == [ack(ib.address, b"for room b")]


@pytest.mark.parametrize(
    "paths",
    [("/0", "/1"), ("/0", "/99"), ("/0?protocol=resp3", "/1")],
    ids=["0-and-1", "a-database-redis-does-not-have", "resp3-asked-for"],
)
def test_database_numbers_share_one_chat(
    paths: tuple[str, str], redis: RedisServer, make_pair: MakePair
) -> None:
    # Pub/sub ignores the database number: /0 and /1 on one channel are one chat, and none is
    # selected (Redis has 16 by default). Messages are read as RESP2's whatever the URL asks.
    a, b, ia, ib = make_pair(redis.url + paths[0], redis.url + paths[1])
    ia.send(b"from db 0", a.address)
    ib.send(b"from db 1", b.address)
    assert ia.wait(2) and ib.wait(2)
    assert_quiet(ia, ib)
    want = {ack(ia.address, b"from db 0"), ack(ib.address, b"from db 1")}
    assert set(ia.got()) == set(ib.got()) == want


def test_a_password_in_the_url(
    make_redis: MakeRedis,
    make_member: MakeMember,
    make_inbox: MakeInbox,
    udpchat_logger: tuple[logging.Logger, Collect],
) -> None:
    logger, handler = udpchat_logger
    logger.setLevel(logging.INFO)
    udpchat.reset_log_cache()
    redis = make_redis(password="s3cret")
    port = redis.port
    a = make_member(f"redis://:s3cret@127.0.0.1:{port}")
    b = make_member(f"redis://default:s3cret@127.0.0.1:{port}/1")  # the ACL user form
    wrong = make_member(f"redis://:wrong@127.0.0.1:{port}")
    wait_connected(a, b)
    ia, ib, iw = make_inbox(), make_inbox(), make_inbox()
    join(ia, a)
    join(ib, b)
    join(iw, wrong)
    ia.send(b"with the password", a.address)
    assert ib.wait(1)
    assert ib.got() == [ack(ia.address, b"with the password")]
    # A wrong password never connects: each attempt fails and is counted.
    assert wait_until(lambda: wrong.stats()["cluster_errors"] >= 2, timeout=3.0), wrong.stats()
    assert not connected(wrong) and wrong.running, cluster_stats(wrong)
    assert redis.numsub("udpchat") == 2  # a and b only
    assert cluster_records(handler.records, logging.WARNING)
    # No log line shows a password, right or wrong.
    lines = [r.getMessage() for r in handler.records]
    assert not [line for line in lines if "wrong" in line or "s3cret" in line], lines
    # The chat of the server without Redis stays local; its message goes nowhere else.
    iw.send(b"not across", wrong.address)
    assert iw.wait(1)
    assert_quiet(ia, ib, counts=[1, 1])
    assert wait_until(lambda: wrong.stats()["cluster_dropped"] == 1)


@pytest.mark.parametrize(
    "who", ["no password", "a user barred from the channel", "a user who may not publish"]
)
def test_a_subscription_redis_refuses_is_not_connected(
    who: str, make_redis: MakeRedis, make_member: MakeMember
) -> None:
    # Redis accepts the connection but refuses SUBSCRIBE (NOAUTH without the password, NOPERM
    # for an ACL user whose channels exclude this one): the server is not in the chat, so it
    # must not say it is; it counts the failure and tries again.
    redis = make_redis(password="s3cret")
    redis.command(
        "ACL", "SETUSER", "barred", "on", ">pw", "~*", "resetchannels", "&elsewhere", "+@all"
    )
    # May subscribe and PING, not PUBLISH: the publishing connection is refused at its check.
    redis.command("ACL", "SETUSER", "mute", "on", ">pw", "~*", "allchannels", "+@all", "-publish")
    port = redis.port
    url = {
        "no password": f"redis://127.0.0.1:{port}",
        "a user barred from the channel": f"redis://barred:pw@127.0.0.1:{port}",
        "a user who may not publish": f"redis://mute:pw@127.0.0.1:{port}",
    }[who]
    refused = make_member(url)
    good = make_member(redis.url)
    wait_connected(good)
    time.sleep(1.0)  # the first attempt and a few retries
    subscribed = 2 if who == "a user who may not publish" else 1
    assert redis.numsub("udpchat") == subscribed
    stats = cluster_stats(refused)
    assert stats["cluster_connected"] is False and stats["cluster_errors"] >= 2, stats


def test_validated_servers_relay_between_validated_clients(
    redis: RedisServer,
    make_member: MakeMember,
    make_client: Callable[..., ChatClientUdp],
) -> None:
    # Each server validates its own clients; envelopes carry no tokens, so an open server in
    # the same cluster gets the chat too.
    a = make_member(redis.url, validate=True)
    b = make_member(redis.url, validate=True)
    c = make_member(redis.url)
    wait_connected(a, b, c)
    ca, cb = make_client(a.address, interval=1), make_client(b.address, interval=1)
    cc = make_client(c.address, interval=1)
    assert wait_until(lambda: ca.validated and cb.validated, timeout=ARRIVE)
    assert wait_until(lambda: cc.address in c.clients)
    assert a.peers()[ca.address].validated and b.peers()[cb.address].validated
    ca.send("hello from a validated client")
    cb.send(b"and from b \xff")
    want = {
        ack(ca.address, b"hello from a validated client"),
        ack(cb.address, b"and from b \xff"),
    }
    for client in (ca, cb, cc):
        got = set()
        for _ in range(2):
            msg = client.recv(timeout=ARRIVE)
            assert msg is not None
            got.add(msg.raw)
        assert got == want
        assert client.recv(timeout=SILENCE) is None
    # No token ever left a validated server on the channel: the clients' tokens are not in
    # what the others relayed (their payloads are exactly what was typed).
    for server, n in ((a, 1), (b, 1), (c, 0)):
        stats = cluster_stats(server)
        assert (stats["cluster_published"], stats["cluster_received"]) == (n, 2 - n), stats


# --- the command line ----------------------------------------------------------------------


def test_cli_serve_with_a_cluster(
    redis: RedisServer, make_member: MakeMember, make_inbox: MakeInbox
) -> None:
    proc = Proc(
        "serve",
        "--port",
        "0",
        "--interval",
        "30",
        "--cluster",
        redis.url,
        "--cluster-channel",
        "cli chat",
    )
    try:
        port = int(proc.expect("stderr", r"serving on 127\.0\.0\.1:(\d+)").group(1))
        cli: Addr = ("127.0.0.1", port)
        other = make_member(redis.url, cluster_channel="cli chat")
        wait_connected(other)
        assert wait_until(lambda: redis.numsub("cli chat") == 2, timeout=CONNECT_TIMEOUT)
        mine, theirs = make_inbox(), make_inbox()
        mine.send(b"reg", cli)
        proc.expect("stderr", r"joined")
        join(theirs, other)
        # The command line shows no stats: until its publishing connection is up too, a
        # message may not cross. Try a few times, each waited for.
        crossed = False
        for attempt in range(50):
            mine.send(b"probe %d" % attempt, cli)
            if theirs.wait(1, timeout=0.1):
                crossed = True
                break
        assert crossed, mine.got()
        # An earlier probe, slower, may come after the first one seen: let them all land.
        assert mine.wait(attempt + 1)
        time.sleep(SILENCE)
        seen_mine, seen_theirs = len(mine.got()), len(theirs.got())
        mine.send(b"from the command line", cli)
        theirs.send(b"to the command line", other.address)
        assert mine.wait(seen_mine + 2) and theirs.wait(seen_theirs + 2)
        assert_quiet(mine, theirs)
        want = {
            ack(mine.address, b"from the command line"),
            ack(theirs.address, b"to the command line"),
        }
        assert set(mine.got()[seen_mine:]) == want and len(mine.got()) == seen_mine + 2
        assert set(theirs.got()[seen_theirs:]) == want and len(theirs.got()) == seen_theirs + 2
        proc.popen.send_signal(signal.SIGINT)
        assert proc.popen.wait(10) == 0
        err = "".join(proc.rest("stderr"))
        assert "Traceback" not in err, err
        assert wait_until(lambda: redis.numsub("cli chat") == 1, timeout=CONNECT_TIMEOUT)
    finally:
        proc.close()


@pytest.mark.parametrize(
    "args",
    [
        ["--cluster", "http://x"],
        ["--cluster", "garbage"],
        ["--cluster-channel", "chat"],
        ["--cluster", "redis://127.0.0.1:6379", "--cluster-channel", ""],
    ],
    ids=repr,
)
def test_cli_bad_cluster_arguments(args: list[str]) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "udpchat", "serve", "--port", "0", *args],
        capture_output=True,
        text=True,
        timeout=30,
        env=ENV,
        stdin=subprocess.DEVNULL,
    )
    assert out.returncode == 2, out
    assert "cluster" in out.stderr and "Traceback" not in out.stderr, out.stderr


def test_cli_help_names_the_cluster_options() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "udpchat", "serve", "--help"],
        capture_output=True,
        text=True,
        timeout=30,
        env=ENV,
    )
    assert out.returncode == 0
    assert "--cluster" in out.stdout and "--cluster-channel" in out.stdout
