"""Type stubs for the Rust extension module. Keep in step with src/python/."""

from collections.abc import Iterator
from types import TracebackType
from typing import Literal, final

from typing_extensions import Self, disjoint_base

__all__ = [
    "MAX_DATAGRAM",
    "MAX_MESSAGE",
    "ChatClientUdp",
    "ChatServerUdp",
    "Event",
    "Message",
    "Peer",
    "_EventQueue",
    "_MessageQueue",
    "_PendingSend",
    "_Wakeup",
    "__version__",
    "_seconds",
    "reset_log_cache",
]

__version__: str
MAX_DATAGRAM: int
"""The largest UDP payload over IPv4 (65,507 bytes), ``ChatServerUdp``'s default
``max_datagram``."""
MAX_MESSAGE: int
"""The longest message any server can relay (65,495 bytes), not counting leading and trailing
whitespace, which the server strips: its broadcast, ``ack:`` line included, must fit in 65,507
bytes, and the shortest ``ack:`` line takes 12. ``ChatClientUdp.send`` refuses a longer one."""

def reset_log_cache() -> None:
    """Make udpchat read the levels of its ``udpchat.*`` loggers now.

    It reads them again by itself a few times a second (a disabled level then costs nothing on
    the hot path); call this for a change to take effect at once.
    """

def _seconds(timeout: float | None) -> float | None:
    """``timeout`` checked as the blocking methods check it: seconds, or None for no end."""

@final
class _Wakeup:
    """A run's eventfd alone: what the event loop holds while it watches the fd, so the fd
    cannot close (and its number be reused) under the loop, without keeping the run's socket
    open."""

    def fileno(self) -> int: ...
    def drain(self) -> None:
        """Resets the eventfd, before looking at the queue again."""

@final
class _MessageQueue:
    """One client run's message queue, for a coroutine to wait on: its eventfd, readable when
    a message may be there or the run has ended, and ``take`` from that run only."""

    def fileno(self) -> int: ...
    def wakeup(self) -> _Wakeup:
        """Its eventfd alone, for the event loop to hold while it watches it."""

    def take(self, max: int) -> list[Message] | _MessageQueue | None:
        """Up to ``max`` messages already waiting; else this queue, its eventfd armed; None
        once it is closed and read."""

@final
class _EventQueue:
    """One server run's events queue, for a coroutine to wait on, as ``_MessageQueue``."""

    def fileno(self) -> int: ...
    def wakeup(self) -> _Wakeup:
        """Its eventfd alone, for the event loop to hold while it watches it."""

    def take(self, max: int) -> list[Event] | _EventQueue | None:
        """Up to ``max`` events already queued; else this queue, its eventfd armed; None once
        it is closed and read, or its server died."""

@final
class _PendingSend:
    """A message the socket had no room for, framed, to be sent once the socket is writable,
    for as long as a blocking ``send()`` would wait. ``fileno()`` is a duplicate of the
    client's socket, to wait on for writing; ``stop_fileno()`` a duplicate of its stop signal,
    readable once the client has stopped."""

    def fileno(self) -> int: ...
    def stop_fileno(self) -> int: ...
    def left(self) -> float:
        """Seconds left before a retry that finds no room gives up."""

    def retry(self) -> bool:
        """Tries to send it again: False if there is still no room. Raises as ``send`` does:
        RuntimeError if the client has stopped meanwhile, OSError (EAGAIN) once ``left()`` is
        0."""

@final
class Message:
    """One datagram received from the server."""

    def __new__(cls, raw: bytes | bytearray | memoryview) -> Self:
        """Parse a datagram as the client does. Raises TypeError for anything not bytes-like."""

    @property
    def sender(self) -> tuple[str, int] | None:
        """``(ip, port)`` from the ``ack: ip port`` line, or None if the datagram is not of
        that form."""

    @property
    def payload(self) -> bytes:
        """The message's bytes: what follows the ``ack:`` line, without its final newline; the
        whole datagram if it is not of that form."""

    @property
    def text(self) -> str:
        """``payload`` decoded as UTF-8, invalid bytes replaced (never an exception)."""

    @property
    def raw(self) -> bytes:
        """The datagram's exact bytes."""

    def __eq__(self, value: object, /) -> bool: ...
    def __hash__(self) -> int: ...

@final
class Event:
    """A client joined, left, or was refused: one entry of a server's presence queue, read with
    ``ChatServerUdp.next_event`` or ``ChatServerUdp.events``. Immutable; ``==`` compares every
    field. Made by the server only (not constructible); hashable.

    Per address, events come in the order they happened (a join before its leave).
    """

    @property
    def kind(self) -> Literal["join", "leave", "refused"]:
        """``'join'``: the address is registered now; ``'leave'``: it no longer is;
        ``'refused'``: it sent a datagram but a limit kept it out."""

    @property
    def reason(
        self,
    ) -> Literal[
        "reg",
        "heartbeat",
        "message",
        "validated",
        "quit",
        "timeout",
        "kicked",
        "unreachable",
        "stop",
        "max_clients",
        "max_per_ip",
    ]:
        """Why.

        - join: ``'reg'``, ``'heartbeat'`` or ``'message'`` (the datagram that registered it:
          the protocol registers a sender on any of them), ``'validated'`` (validated mode: it
          completed the handshake, or came back with a valid token).
        - leave: ``'quit'`` (it said so), ``'timeout'`` (silent for more than ``interval``),
          ``'kicked'`` (``kick()``), ``'unreachable'`` (open mode: the kernel reported its port
          unreachable after a send to it), ``'stop'`` (the server stopped, after sending it
          ``end``).
        - refused: ``'max_clients'``, ``'max_per_ip'`` (at most one event per refused address
          per ``interval``).
        """

    @property
    def addr(self) -> tuple[str, int]:
        """The client's ``(ip, port)``, as ``ChatServerUdp.clients`` shows it."""

    @property
    def time(self) -> float:
        """When it happened, in Unix seconds."""

    @property
    def seq(self) -> int:
        """1, 2, 3... in each server run (a new ``start()`` counts from 1 again); a gap means
        events were dropped while the queue was full (``stats()['events_dropped']``)."""

    def __eq__(self, value: object, /) -> bool: ...
    def __hash__(self) -> int: ...

@final
class Peer:
    """One registered client's figures, from ``ChatServerUdp.peers()``: a snapshot, immutable;
    ``==`` compares every field. Made by the server only (not constructible); hashable."""

    @property
    def joined(self) -> float:
        """When it registered, in Unix seconds."""

    @property
    def last_seen(self) -> float:
        """When it was last heard from (any datagram that keeps it alive), in Unix seconds."""

    @property
    def messages(self) -> int:
        """Chat messages received from it (relayed to every live client)."""

    @property
    def bytes(self) -> int:
        """The sum of those messages' payloads, in bytes, as relayed (stripped of leading and
        trailing whitespace)."""

    @property
    def heartbeats(self) -> int:
        """Heartbeats (``^hb^``) received from it."""

    @property
    def validated(self) -> bool:
        """True if it proved its address (validated mode, where every client has)."""

    def __eq__(self, value: object, /) -> bool: ...
    def __hash__(self) -> int: ...

@disjoint_base
class ChatServerUdp:
    """A UDP chat server.

    Registers every sender, relays each message to every live client (the sender included) as
    ``ack: {ip} {port}\\n{payload}\\n``, and drops clients not heard from for more than
    ``interval`` seconds. ``stop()`` sends ``end`` to every client.

    Who joins, leaves and is refused is queued as ``Event``s whether or not anyone reads them
    (``next_event``, ``events``); ``peers()`` gives each live client's figures. Both, like
    ``clients``, are this server's own.
    """

    def __new__(
        cls,
        ip: str = "127.0.0.1",
        port: int = 9998,
        interval: float = 10.0,
        *,
        max_datagram: int = 65507,
        max_clients: int = 100000,
        max_per_ip: int = 1024,
        rate_limit: float | None = None,
        rcvbuf: int | None = None,
        validate: bool = False,
        fanout_threads: int = 1,
        event_queue: int = 4096,
        drop_unreachable: bool = True,
        cluster: str | None = None,
        cluster_channel: str = "udpchat",
    ) -> Self:
        """Every argument is checked here: ValueError for a value out of its range (an int of
        any size included), TypeError for a wrong type (``True`` is not a number).

        - ``ip``: an IPv4 or IPv6 address, never resolved (``'localhost'`` is not one).
        - ``port`` (0..65535): 0 picks a free port.
        - ``interval`` (0.01..86400 seconds, int or float): a client silent for longer is dropped.
        - ``max_datagram`` (1..65535): a longer datagram is dropped and counted, never relayed cut.
        - ``max_clients``, ``max_per_ip`` (1..100,000,000): registrations past either are refused
          and counted; those already registered are not disturbed.
        - ``rate_limit`` (None, or 0.01..1,000,000,000): datagrams per second each source IP may
          send, in bursts of one second's worth; the excess is dropped and counted. None (the
          default): no limit.
        - ``rcvbuf`` (None, or 1024..1,073,741,824): the kernel receive buffer to ask for
          (SO_RCVBUF), in bytes; None keeps the system's.
        - ``validate`` (True or False): validated mode. A source registers only after proving it
          receives at its address (a stateless cookie), and every datagram after that carries
          its token. ``ChatClientUdp`` follows it automatically.
        - ``fanout_threads`` (1..64): threads that share a large fan-out, by client; 1 suits
          2 cores.
        - ``event_queue`` (1..10,000,000): at most this many unread events are held; later ones
          are dropped and counted in ``stats()['events_dropped']`` (``Event.seq`` shows the gap).
          The queue takes memory for what it holds, not for this bound.
        - ``drop_unreachable`` (True or False): act on the kernel's reports (ICMP) that a
          client's port is unreachable. In open mode such a client is dropped at once (an
          ``'unreachable'`` leave); in validated mode, where anyone who knows a member's address
          can forge the report, sends to it are only paused until its next valid datagram.
          False ignores the reports, for networks whose firewalls send spurious ones.
        - ``cluster`` (None, or a Redis URL: ``redis://[[user]:password@]host[:port][/db]``,
          ``unix:///path/to/redis.sock``): one chat with every other server on the same Redis
          channel. Each message this server relays for its own clients, and each
          ``broadcast()``, is also published once to the channel; what the other servers
          publish is relayed to this server's clients with its sender's own ``ack:`` line.
          Connecting is done by the server's threads: ``start()`` does not wait for Redis, and
          serves this server's clients while Redis is away (``stats()['cluster_connected']``).
          A URL that cannot be used (``rediss://`` included: this build has no TLS) is a
          ValueError. None (the default): this server alone, no Redis needed.
        - ``cluster_channel`` (a non-empty str, default ``'udpchat'``): the Redis channel; only
          with ``cluster``. Pub/sub ignores the URL's database number.
        """

    def start(self) -> None:
        """Bind and start serving.

        Raises OSError (with ``errno``) if the address cannot be bound, RuntimeError if running.
        A server stopped starts afresh.
        """

    def stop(self) -> None:
        """End all threads, then send ``end`` to every live client. Idempotent: on a server that
        is not running it does nothing. Sending ``end`` takes a few microseconds a client and
        never more than half a second. Raises RuntimeError if a server thread had panicked."""

    def broadcast(self, msg: str | bytes | bytearray | memoryview) -> None:
        """Send ``msg`` (str as UTF-8, or bytes-like) to every live client as a message from the
        server's own address.

        Raises TypeError for another type, ValueError for a str UTF-8 cannot encode (a lone
        surrogate) or if the broadcast, ``ack:`` line included, would be longer than 65,507
        bytes, RuntimeError if the server is not running.
        """

    def stats(self) -> dict[str, int]:
        """Counters since start; they outlive ``stop()``.

        ``received`` datagrams, ``broadcasts`` (messages relayed), ``deliveries`` (datagrams
        sent for them), ``send_errors``; datagrams dropped: ``dropped_oversize`` (longer
        than ``max_datagram``, or a message whose broadcast would exceed 65,507 bytes),
        ``dropped_over_cap`` (a new client past ``max_clients`` / ``max_per_ip``),
        ``dropped_rate_limited``, ``dropped_unvalidated`` (validated mode: a cookie or token
        not valid for its source), ``dropped_malformed`` (validated mode: neither a handshake
        step nor a tokened datagram), ``dropped_bad_source`` (port 0, unspecified, broadcast or
        multicast source), ``dropped_loop`` (from the server's own address, or a server's
        output: an ``ack:`` line, ``end``, a challenge, a welcome); ``challenges`` sent and
        ``replies_limited`` (validated mode: challenges and welcomes over the reply limits,
        not sent), ``expired`` clients, ``dropped_unreachable`` (open mode: clients removed
        because the kernel reported them unreachable), ``paused_unreachable`` (validated mode:
        sends skipped to clients paused since such a report), ``events_dropped`` (events not
        queued because ``event_queue`` were already waiting unread), ``kernel_drops``
        (datagrams the kernel dropped for want of receive buffer), and ``clients`` registered
        now.

        With ``cluster``, also: ``cluster_published`` (messages Redis accepted),
        ``cluster_received`` (messages of other servers relayed here), ``cluster_dropped``
        (messages not published: Redis away, the ones queued when it went included, or the
        publishing queue full), ``cluster_malformed`` (messages on the channel that are not a
        udpchat envelope: ignored), ``cluster_errors`` (failed connections and commands), and
        ``cluster_connected``, a bool: True while both connections to Redis are up.
        """

    @property
    def clients(self) -> dict[tuple[str, int], float]:
        """``{(ip, port): last_seen_unix_timestamp}`` of the live clients; empty when stopped."""

    def next_event(self, timeout: float | None = None) -> Event | None:
        """The next presence event, waiting up to ``timeout`` seconds (None, or
        ``float('inf')``: until one comes; a negative or NaN timeout is a ValueError).

        Returns None on timeout, and once the server has stopped and every event queued
        before has been read (a thread waiting here when ``stop()`` is called gets those,
        then None); before the first ``start()``, None at once. Releases the GIL; Ctrl-C
        interrupts it.
        """

    def events(self, max: int = 1024, timeout: float | None = None) -> list[Event]:
        """Up to ``max`` (1..10,000,000) events: waits up to ``timeout`` seconds (as
        ``next_event``) for the first, then takes those already queued. Returns ``[]`` where
        ``next_event`` returns None."""

    def _take_events(self, max: int) -> list[Event] | _EventQueue | None:
        """For the asyncio methods: up to ``max`` events already queued, without waiting; else
        this run's queue to wait on, its eventfd armed; None where ``next_event`` returns
        None."""

    def peers(self) -> dict[tuple[str, int], Peer]:
        """``{(ip, port): Peer}`` for every live client, one consistent snapshot; empty when
        stopped."""

    def kick(self, addr: tuple[str, int]) -> bool:
        """Remove the client at ``addr`` (an ``(ip, port)`` as ``clients`` shows it) now and
        send it ``end`` (with its token, in validated mode): a ``'leave'`` event with reason
        ``'kicked'``; no broadcast reaches it afterwards. It can register again by sending
        again.

        Returns False if ``addr`` was not registered. Raises TypeError or ValueError for an
        ``addr`` that is not an ``(ip, port)`` pair, RuntimeError if the server is not running.
        """

    @property
    def address(self) -> tuple[str, int] | None:
        """The ``(ip, port)`` bound while running (``port=0`` picks a free one), else None."""

    @property
    def ip(self) -> str: ...
    @property
    def port(self) -> int: ...
    @property
    def interval(self) -> float: ...
    @property
    def max_datagram(self) -> int: ...
    @property
    def validate(self) -> bool: ...
    @property
    def running(self) -> bool:
        """True between ``start()`` and ``stop()``; False if a server thread died."""

    def __enter__(self) -> Self: ...
    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None: ...

@disjoint_base
class ChatClientUdp:
    """A UDP chat client.

    ``start()`` registers (``reg``), then a thread sends ``^hb^`` every ``interval`` seconds;
    what the server sends arrives through ``recv()`` or iteration.
    """

    def __new__(
        cls,
        ip: str = "127.0.0.1",
        port: int = 9998,
        interval: float = 5.0,
        *,
        max_queue: int = 4096,
    ) -> Self:
        """Every argument is checked here: ValueError for a value out of its range (an int of
        any size included), TypeError for a wrong type (``True`` is not a number).

        - ``ip``, ``port`` (1..65535): the server's; ``ip`` is an IPv4 or IPv6 address.
        - ``interval`` (0.01..86400 seconds, int or float): time between heartbeats.
        - ``max_queue`` (1..10,000,000): at most this many unread messages are held; later ones
          are dropped and counted in ``dropped``. The queue takes memory for what it holds, not
          for this bound.
        """

    def start(self) -> None:
        """Register with the server and start the heartbeat and receiver threads.

        Raises OSError if no socket can be opened, RuntimeError if already running. A client
        stopped, or whose chat the server ended, starts afresh.
        """

    def stop(self) -> None:
        """Send ``quit`` and end all threads; returns in milliseconds. Idempotent: on a client
        that is not running it does nothing. Raises RuntimeError if a client thread had
        panicked."""

    def send(self, msg: str | bytes | bytearray | memoryview = "quit") -> None:
        """Send ``msg`` (str as UTF-8, or bytes-like) to the server.

        Raises TypeError for another type, ValueError for a str UTF-8 cannot encode (a lone
        surrogate) or that no server could relay (longer than ``MAX_MESSAGE`` bytes once
        stripped of leading and trailing whitespace), RuntimeError if the client is not running,
        OSError if the send fails (``EMSGSIZE`` for a datagram longer than the socket carries:
        65,507 bytes over IPv4, a validated client's 33-byte token prefix included).
        """

    def recv(self, timeout: float | None = None) -> Message | None:
        """The next message, waiting up to ``timeout`` seconds (None, or ``float('inf')``: until
        one comes; a negative or NaN timeout is a ValueError).

        Returns None on timeout, or once the client is stopped or the server said ``end`` and
        every message before it has been read (messages that arrived before ``stop()`` can
        still be read after it). Releases the GIL; Ctrl-C interrupts it.
        """

    def recv_many(self, max: int = 1024, timeout: float | None = None) -> list[Message]:
        """Up to ``max`` (1..10,000,000) messages: waits up to ``timeout`` seconds (as ``recv``)
        for the first, then takes those already waiting. Returns ``[]`` where ``recv`` returns
        None.

        Cheaper per message than ``recv`` when messages come in bursts.
        """

    def _take(self, max: int) -> list[Message] | _MessageQueue | None:
        """For the asyncio methods: up to ``max`` messages already waiting, without waiting;
        else this run's queue to wait on, its eventfd armed; None where ``recv`` returns
        None."""

    def _try_send(self, msg: str | bytes | bytearray | memoryview) -> _PendingSend | None:
        """For ``asend``: sends ``msg`` if the socket has room now (None), else gives back what
        to send once it is writable. Raises as ``send`` does."""

    def __iter__(self) -> Iterator[Message]: ...
    def __next__(self) -> Message:
        """Blocks for the next message; iteration ends when the client stops or the server ends."""

    @property
    def address(self) -> tuple[str, int] | None:
        """The local ``(ip, port)`` while running, else None."""

    @property
    def dropped(self) -> int:
        """Messages dropped because ``max_queue`` were already waiting unread."""

    @property
    def last_heard(self) -> float | None:
        """When the server last sent anything, as a Unix timestamp; None if it never has.

        A server that is gone without ``end`` shows here as silence (and in the log as
        ``server unreachable``); the client keeps heartbeating, and is registered again when
        the server comes back.
        """

    @property
    def validated(self) -> bool:
        """True once a validated-mode server has given this client its token."""

    @property
    def ip(self) -> str: ...
    @property
    def port(self) -> int: ...
    @property
    def interval(self) -> float: ...
    @property
    def running(self) -> bool:
        """True between ``start()`` and ``stop()``, unless the server ended the chat or a
        thread died."""

    def __enter__(self) -> Self: ...
    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None: ...
