"""The cluster against a Redis that misbehaves as a network or a hostile host can: a stand-in
Redis on loopback (no redis-server needed) that splits messages across slow reads, never
answers, or stops answering publications."""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Callable, Iterator

import pytest
from conftest import ack, assert_silent, recv, register, wait_until
from udpchat import ChatServerUdp


def bulk(data: bytes) -> bytes:
    return b"$%d\r\n%s\r\n" % (len(data), data)


def pubsub_message(channel: bytes, payload: bytes) -> bytes:
    return b"*3\r\n" + bulk(b"message") + bulk(channel) + bulk(payload)


def envelope(origin: tuple[str, int], payload: bytes, server: int = 7) -> bytes:
    """An envelope as another server writes it (README, "Several servers")."""
    ip = socket.inet_aton(origin[0])
    return (
        b"\x01" + server.to_bytes(8, "big") + b"\x04" + ip + origin[1].to_bytes(2, "big") + payload
    )


def read_command(conn: socket.socket, buf: bytearray) -> list[bytes] | None:
    """One command (a RESP array of bulk strings) from `conn`; None once it is closed."""

    def line() -> bytes | None:
        while b"\r\n" not in buf:
            data = conn.recv(65536)
            if not data:
                return None
            buf.extend(data)
        end = buf.index(b"\r\n")
        out = bytes(buf[:end])
        del buf[: end + 2]
        return out

    head = line()
    if head is None:
        return None
    assert head.startswith(b"*"), head
    args = []
    for _ in range(int(head[1:])):
        size = line()
        if size is None:
            return None
        n = int(size[1:])
        while len(buf) < n + 2:
            data = conn.recv(65536)
            if not data:
                return None
            buf.extend(data)
        args.append(bytes(buf[:n]))
        del buf[: n + 2]
    return args


class StandIn:
    """A Redis stand-in on 127.0.0.1: `subscribed` holds the connections that subscribed, for a
    test to write messages to; `publish_answer` says whether PUBLISH commands are answered;
    `mute` answers nothing at all. Connections are served on daemon threads, each bounded by a
    socket timeout."""

    def __init__(
        self,
        publish_answer: bool = True,
        mute: bool = False,
        idle_close: float | None = None,
        drop_subscribers: bool = False,
    ) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.publish_answer = publish_answer
        self.mute = mute
        # Closes a connection quiet for this many seconds, as Redis's `timeout` or a NAT does.
        self.idle_close = idle_close
        # Closes each connection once it has subscribed, as Redis does to a subscriber over its
        # output buffer limit.
        self.drop_subscribers = drop_subscribers
        self.subscribed: list[socket.socket] = []
        self.published: list[bytes] = []
        self.connections: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}"

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            conn.settimeout(self.idle_close or 30)
            self.connections.append(conn)
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        buf = bytearray()
        try:
            while (command := read_command(conn, buf)) is not None:
                name = command[0].upper()
                if self.mute:
                    continue
                if name == b"SUBSCRIBE":
                    conn.sendall(b"*3\r\n" + bulk(b"subscribe") + bulk(command[1]) + b":1\r\n")
                    self.subscribed.append(conn)
                    if self.drop_subscribers:
                        conn.close()
                        return
                elif name == b"PUBLISH":
                    self.published.append(command[2])
                    if self.publish_answer:
                        conn.sendall(b":0\r\n")
                else:
                    conn.sendall(b"+OK\r\n")
        except OSError:  # a timeout included: closed for idleness
            conn.close()

    def subscriber(self) -> socket.socket:
        """The one connection subscribed, once it is."""
        assert wait_until(lambda: len(self.subscribed) == 1, timeout=5), self.subscribed
        return self.subscribed[0]

    def close(self) -> None:
        self.listener.close()
        for conn in self.connections:
            conn.close()


@pytest.fixture
def stand_in() -> Iterator[Callable[..., StandIn]]:
    made: list[StandIn] = []

    def make(**kwargs: object) -> StandIn:
        made.append(StandIn(**kwargs))  # type: ignore[arg-type]
        return made[-1]

    yield make
    for s in made:
        s.close()


def connected(server: ChatServerUdp) -> bool:
    return bool(server.stats()["cluster_connected"])


def test_a_message_split_across_slow_reads_arrives_whole(
    stand_in: Callable[..., StandIn], make_server: Callable[..., ChatServerUdp], make_peer
) -> None:
    # Larger than a read, and cut where the subscriber's 20 ms waits for a message time out
    # halfway through one: the reads resume where they stopped.
    origin = ("127.0.0.9", 4242)
    payloads = [b"short", b"x" * 60_000]

    standin = stand_in()
    server = make_server(cluster=standin.url)
    peer = make_peer()
    register(peer, server)
    conn = standin.subscriber()
    for payload in payloads:
        message = pubsub_message(b"udpchat", envelope(origin, payload))
        for i in range(0, len(message), 7_001):
            conn.sendall(message[i : i + 7_001])
            time.sleep(0.06)
    for payload in payloads:
        assert recv(peer, timeout=5) == ack(origin, payload)
    stats = server.stats()
    assert (stats["cluster_received"], stats["cluster_malformed"]) == (2, 0)


def test_a_redis_that_never_answers_costs_the_chat_nothing(
    stand_in: Callable[..., StandIn], make_peer, figure
) -> None:
    standin = stand_in(mute=True)
    server = ChatServerUdp(port=0, cluster=standin.url)
    t0 = time.monotonic()
    server.start()
    started = time.monotonic() - t0
    try:
        port = server.address[1]
        a, b = make_peer(), make_peer()
        register(b, server)
        a.sendto(b"hello", server.address)
        assert recv(b) == ack(a.getsockname(), b"hello")
        assert not connected(server)
    finally:
        # Both connections are blocked in their handshake, waiting for an answer.
        t0 = time.monotonic()
        server.stop()
        stopped = time.monotonic() - t0
    figure(
        f"cluster, a Redis that never answers: start {started * 1e3:.1f} ms, "
        f"stop {stopped * 1e3:.1f} ms"
    )
    assert started < 0.1 and stopped < 0.1, (started, stopped)
    assert not connected(server)
    # The threads still waiting for Redis hold nothing of the server's: its port can be bound
    # again at once, by this object or another.
    again = ChatServerUdp(port=port, cluster=standin.url)
    again.start()
    again.stop()


def test_a_redis_that_stops_answering_publications_never_holds_the_receiver(
    stand_in: Callable[..., StandIn], make_server: Callable[..., ChatServerUdp], make_peer, figure
) -> None:
    standin = stand_in(publish_answer=False)
    server = make_server(cluster=standin.url)
    assert wait_until(lambda: connected(server), timeout=5)
    a, b = make_peer(), make_peer()
    register(b, server)
    # The first pipeline waits for its answers for a second; the queue behind it fills and
    # overflows meanwhile. Every message still reaches the local client at once.
    n = 2_000
    t0 = time.monotonic()
    got = 0
    for i in range(n):
        a.sendto(b"m%d" % i, server.address)
        if i % 50 == 49:  # in steps a stock kernel's socket buffers hold
            while got < i + 1 - 10:
                recv(b)
                got += 1
    while got < n:
        recv(b)
        got += 1
    elapsed = time.monotonic() - t0
    figure(
        f"cluster, publications unanswered: {n} local messages relayed in {elapsed * 1e3:.0f} ms"
    )
    assert elapsed < 1.0, elapsed

    # What the stand-in took but never answered is dropped too, once the wait for its answers
    # gives up: nothing is counted twice or lost.
    def accounted() -> bool:
        stats = server.stats()
        return stats["cluster_published"] + stats["cluster_dropped"] == n

    assert wait_until(accounted, timeout=5), {
        k: v for k, v in server.stats().items() if "cluster" in k
    }
    stats = server.stats()
    assert stats["cluster_dropped"] > 0 and stats["cluster_errors"] >= 1, stats


def test_foreign_and_malformed_messages_on_the_channel_are_counted_and_ignored(
    stand_in: Callable[..., StandIn],
    make_server: Callable[..., ChatServerUdp],
    make_peer,
    udpchat_logger,
) -> None:
    _, handler = udpchat_logger
    good = envelope(("127.0.0.9", 1), b"ok")
    bad = [
        b"hello",  # another program's
        b"",  # empty
        b"\x02" + good[1:],  # a newer version
        good[:12],  # truncated in the address
        good[:9] + b"\x05" + good[10:],  # no such family
        envelope(("127.0.0.9", 1), b"x" * 65_490),  # its ack: line would not fit a datagram
    ]

    standin = stand_in()
    server = make_server(cluster=standin.url)
    peer = make_peer()
    register(peer, server)
    conn = standin.subscriber()
    for payload in [*bad, good]:
        conn.sendall(pubsub_message(b"udpchat", payload))
    # Only the good one arrives, after the bad ones: they were read and dropped, in order.
    assert recv(peer, timeout=5) == ack(("127.0.0.9", 1), b"ok")
    assert_silent(peer)
    stats = server.stats()
    assert (stats["cluster_malformed"], stats["cluster_received"]) == (len(bad), 1), stats
    assert server.running
    warnings = [
        r for r in handler.records if r.name == "udpchat.cluster" and r.levelno == logging.WARNING
    ]
    assert any("not a udpchat envelope" in r.getMessage() for r in warnings), warnings


def test_a_redis_gone_quiet_is_found_out_without_a_message(
    stand_in: Callable[..., StandIn], make_server: Callable[..., ChatServerUdp], figure
) -> None:
    # A Redis that froze, or a network that broke without a FIN or RST: the connections stay
    # open and nothing comes. A server with nothing to publish finds out by its keepalive.
    standin = stand_in()
    server = make_server(cluster=standin.url)
    assert wait_until(lambda: connected(server), timeout=5)
    standin.mute = True
    t0 = time.monotonic()
    assert wait_until(lambda: not connected(server), timeout=10), server.stats()
    figure(
        f"cluster, a Redis gone quiet: cluster_connected False after {time.monotonic() - t0:.2f} s"
    )
    assert server.stats()["cluster_errors"] >= 1


def test_connections_kept_quiet_stay_up(
    stand_in: Callable[..., StandIn], make_server: Callable[..., ChatServerUdp], make_peer
) -> None:
    # Redis's `timeout`, a NAT or a load balancer closes a connection quiet for a while: each
    # connection pings when quiet, so the first message after a pause still crosses.
    standin = stand_in(idle_close=1.5)
    server = make_server(cluster=standin.url)
    assert wait_until(lambda: connected(server), timeout=5)
    peer = make_peer()
    register(peer, server)
    time.sleep(3.5)
    peer.sendto(b"after a pause", server.address)
    recv(peer)
    assert wait_until(lambda: len(standin.published) == 1, timeout=2), server.stats()
    assert envelope(peer.getsockname(), b"after a pause", 0)[9:] == standin.published[0][9:]
    stats = server.stats()
    assert stats["cluster_errors"] == 0 and stats["cluster_connected"], stats


def test_the_publishing_queue_is_bounded_in_bytes(
    stand_in: Callable[..., StandIn], make_server: Callable[..., ChatServerUdp], make_peer
) -> None:
    # Publications wait while Redis does not answer (a second at most); what they may take
    # meanwhile is bounded in bytes (4 MiB queued, 1 MiB in the pipeline), not only in batches
    # of up to 32 messages of up to 64 KB each.
    standin = stand_in(publish_answer=False)
    server = make_server(cluster=standin.url)
    assert wait_until(lambda: connected(server), timeout=5)
    a = make_peer()
    register(a, server)
    n, size = 150, 60_000
    t0 = time.monotonic()
    for i in range(n):
        a.sendto(b"%06d" % i + b"x" * (size - 6), server.address)
        recv(a)  # relayed locally at once, one at a time: the socket buffer never overflows
    elapsed = time.monotonic() - t0
    dropped = server.stats()["cluster_dropped"]
    # Dropped at the queue, before the wait for Redis's answers gave up: at most about
    # (4 + 1) MiB / 60 KB = 87 of them could wait.
    assert elapsed < 0.9, elapsed  # else the timeout, not the bound, may have dropped them
    assert dropped >= n - 90, (dropped, server.stats())


def test_a_connection_lost_as_soon_as_made_is_retried_ever_more_slowly(
    stand_in: Callable[..., StandIn], make_server: Callable[..., ChatServerUdp], figure
) -> None:
    # The wait between attempts goes 0.1, 0.2, 0.4, 0.8, 1.6 s, and starts again from 0.1 only
    # after a connection that stayed up: one Redis drops at once is not made ten times a second.
    standin = stand_in(drop_subscribers=True)
    server = make_server(cluster=standin.url)
    time.sleep(3.0)
    attempts = len(standin.subscribed)
    figure(f"cluster, a subscriber dropped as soon as it subscribes: {attempts} attempts in 3 s")
    # 0 + 0.1 + 0.2 + 0.4 + 0.8 + 1.6 = 3.1 s: six attempts, and loaded machines make fewer.
    assert 2 <= attempts <= 7, attempts
    assert not connected(server)
