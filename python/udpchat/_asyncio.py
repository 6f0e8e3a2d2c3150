"""The asyncio side of ChatServerUdp and ChatClientUdp: ``async with``, ``async for`` and the
awaitable methods, on the classes udpchat exports.

No thread waits for a coroutine. The core queues messages (and events) on its own threads and
writes an eventfd when it queues one for a consumer that said it was about to wait, when the
queue closes, and when a core thread ends. A coroutine takes what is waiting without waiting;
when nothing is, it waits for that eventfd, which the event loop watches (``add_reader``) while
at least one coroutine waits.
A message leaves the queue only in the coroutine that returns it, after its last ``await``, so a
cancelled receive has taken nothing.

A write wakes one waiting coroutine, the longest waiting; each coroutine that leaves a receive,
however it leaves (with a message, at the close, timed out, cancelled), wakes the next one, which
looks at the queue and waits again if it finds nothing. So a backlog, a close, or a wake-up that
fell to a cancelled coroutine reaches every waiter, one after another, and a message wakes two
coroutines, not all of them.
"""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import Callable
from types import TracebackType
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from . import _udpchat
from ._udpchat import Event, Message, _PendingSend, _seconds, _Wakeup

if TYPE_CHECKING:
    from typing_extensions import Self

T = TypeVar("T")

# Items a receive may take, without waiting, before the next receive yields to the loop once.
_YIELD_AFTER = 256
# Added to the wait of a pending send for the time a blocking send() would wait: uvloop's
# timers count whole milliseconds and can fire up to one early, and a wait that ends before
# its time only tries again, and again, until it is.
_TIMER_SLACK = 0.001


class _Queue(Protocol[T]):
    """One run's queue (``_MessageQueue``, ``_EventQueue``): what a coroutine waits on."""

    def fileno(self) -> int: ...
    def wakeup(self) -> _Wakeup: ...
    def take(self, max: int) -> list[T] | _Queue[T] | None: ...


class _Waiters:
    """The coroutines of one event loop waiting on one run's queue, whose eventfd the loop
    watches for as long as one of them waits. The eventfd (alone: not the run, whose socket
    would stay open) is held so the fd stays open until then."""

    __slots__ = ("fd", "futures", "loop", "wakeup")

    def __init__(self, loop: asyncio.AbstractEventLoop, wakeup: _Wakeup) -> None:
        self.loop = loop
        self.wakeup = wakeup
        self.fd = wakeup.fileno()
        # In the order they came: a dict keeps it.
        self.futures: dict[asyncio.Future[None], None] = {}
        loop.add_reader(self.fd, self._woken)

    def _woken(self) -> None:
        self.wakeup.drain()
        self.wake_one()

    def wake_one(self) -> None:
        """Wakes the coroutine that has waited longest, if any. Futures done already (woken by
        their timer, cancelled) are dropped on the way, so each is passed over once."""
        futures = self.futures
        while futures:
            future = next(iter(futures))
            del futures[future]
            if not future.done():
                future.set_result(None)
                return

    def close(self) -> None:
        if not self.loop.is_closed():
            self.loop.remove_reader(self.fd)


class _Loops:
    """The waits in progress on one object, by eventfd (a restart makes a new core with a new
    eventfd while waiters of the old one may not have woken yet), all in one event loop."""

    __slots__ = ("by_fd", "forks", "lock", "unyielded")

    def __init__(self) -> None:
        self.by_fd: dict[int, _Waiters] = {}
        # Items taken without a wait since the loop last ran other tasks (see `_receive`).
        self.unyielded = 0
        # For loops in other threads: the check for another loop and the registration are one.
        self.lock = threading.Lock()
        self.forks = _forks

    def forget_if_forked(self) -> None:
        """In a forked child, forgets the parent's waits (the object itself says it belongs to
        the parent, at its next use), and the lock, which a thread of the parent may have held
        at the fork."""
        if self.forks != _forks:
            self.by_fd.clear()
            self.lock = threading.Lock()
            self.forks = _forks

    def check(self, loop: asyncio.AbstractEventLoop, what: object) -> None:
        """RuntimeError if a coroutine of another event loop (not closed) waits on this object.
        Call it holding ``lock``."""
        if all(waiters.loop is loop for waiters in self.by_fd.values()):
            return
        for fd, waiters in tuple(self.by_fd.items()):
            if waiters.loop is loop:
                continue
            stale = waiters.loop.is_closed() or not (waiters.futures or waiters.loop.is_running())
            if stale:
                # Left by a loop that closed, or stopped before its next turn with nobody
                # waiting: no thread runs it, so it is let go of here (and its eventfd with it).
                del self.by_fd[fd]
                waiters.close()
            else:
                raise RuntimeError(
                    f"{what!r} is being awaited in another event loop (or was, until that "
                    "loop's next turn); an object can be awaited in one event loop at a time"
                )

    def pass_on(self) -> None:
        """For a coroutine leaving a receive: wakes the next waiter of its loop, to look at what
        is left."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return  # a coroutine closed outside its loop (its loop closed): nobody to wake
        with self.lock:
            for waiters in self.by_fd.values():
                if waiters.loop is loop:
                    waiters.wake_one()

    async def wait(self, queue: _Queue[Any], deadline: float | None, what: object) -> None:
        """Waits until ``queue``'s eventfd is written or the loop's clock reaches ``deadline``."""
        loop = asyncio.get_running_loop()
        fd = queue.fileno()
        with self.lock:
            self.check(loop, what)
            # After the check, what is registered for this fd is this loop's.
            waiters = self.by_fd.get(fd)
            if waiters is None:
                waiters = self.by_fd[fd] = _Waiters(loop, queue.wakeup())
        future: asyncio.Future[None] = loop.create_future()
        waiters.futures[future] = None
        timer = None if deadline is None else loop.call_at(deadline, _wake, future)
        try:
            await future
        finally:
            if timer is not None:
                timer.cancel()
            waiters.futures.pop(future, None)
            if not waiters.futures:
                if loop.is_closed():
                    self.release(waiters)
                else:
                    # At the loop's next turn, not now: a coroutine that goes on receiving
                    # (`async for`) waits again before that, and finds the fd still watched
                    # (add_reader and remove_reader cost a few microseconds a wait).
                    loop.call_soon(self.release, waiters)

    def release(self, waiters: _Waiters) -> None:
        """Stops watching ``waiters``' eventfd if no coroutine waits on it (any more)."""
        with self.lock:
            if not waiters.futures and self.by_fd.get(waiters.fd) is waiters:
                del self.by_fd[waiters.fd]
                waiters.close()


# Made on first use, not in ``__init__``: an ``__init__`` here would hide the constructor's
# signature (the core's ``__new__``) from ``inspect`` and ``help()``.
_made = threading.Lock()


# Forks made so far, counted in the child: a `_Loops` made before the last one is a copy of the
# parent's (os.getpid() would make a system call on every receive to find that out).
_forks = 0


def _new_lock_in_child() -> None:
    global _made, _forks
    _made = threading.Lock()  # the parent's may have been held by one of its threads
    _forks += 1


os.register_at_fork(after_in_child=_new_lock_in_child)


def _loops(obj: ChatServerUdp | ChatClientUdp) -> _Loops:
    """``obj``'s waits in progress."""
    try:
        return obj._loops
    except AttributeError:
        with _made:
            if not hasattr(obj, "_loops"):
                obj._loops = _Loops()
        return obj._loops


def _wake(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


async def _receive(
    loops: _Loops,
    take: Callable[[int], list[T] | _Queue[T] | None],
    max: int,
    timeout: float | None,
    what: object,
) -> list[T] | None:
    """Up to ``max`` items: waits up to ``timeout`` seconds (None: without end) for the first,
    then takes those waiting behind it. None on timeout or once the queue is closed and read.
    ``take`` looks at the object's current run; once it has to wait, it waits on that run's
    queue and takes from it only: a restart meanwhile ends the wait as the stop did."""
    seconds = None if timeout is None else _seconds(timeout)
    if loops.by_fd:
        loops.forget_if_forked()
        with loops.lock:
            loops.check(asyncio.get_running_loop(), what)
    if loops.unyielded >= _YIELD_AFTER:
        # A receive that finds items returns without yielding, so a flood would keep other
        # tasks, signal handlers and Ctrl-C out of the loop: every so often, one turn of the
        # loop first, before anything is taken (a cancellation here takes nothing).
        loops.unyielded = 0
        await asyncio.sleep(0)
    deadline = None
    try:
        got = take(max)
        while True:
            if got is None or isinstance(got, list):
                if got:
                    loops.unyielded += len(got)
                return got
            loop = asyncio.get_running_loop()
            if seconds is not None:
                if deadline is None:
                    deadline = loop.time() + seconds
                if loop.time() >= deadline:
                    return None
            await loops.wait(got, deadline, what)
            loops.unyielded = 0
            got = got.take(max)
    finally:
        if loops.by_fd:
            loops.pass_on()


class _Startable(Protocol):
    def start(self) -> None: ...
    def stop(self) -> None: ...


_S = TypeVar("_S", bound=_Startable)


class _AsyncWith:
    """``async with`` for both classes: the blocking ``start()`` on the way in, ``stop()`` on
    the way out, in the loop's thread (each returns within milliseconds)."""

    __slots__ = ()

    async def __aenter__(self: _S) -> _S:
        self.start()
        return self

    async def __aexit__(
        self: _Startable,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


class ChatServerUdp(_AsyncWith, _udpchat.ChatServerUdp):
    """A UDP chat server (see ``udpchat._udpchat.ChatServerUdp`` for all but asyncio), with
    ``async with`` and the presence events as awaitables: ``anext_event``, ``aevents``."""

    __slots__ = ("_loops",)
    _loops: _Loops

    async def anext_event(self, timeout: float | None = None) -> Event | None:
        """``next_event`` for asyncio: the next presence event, waiting up to ``timeout`` seconds
        (None: until one comes) without blocking the loop. None on timeout, or once the server
        has stopped and every event queued before has been read."""
        events = await _receive(_loops(self), self._take_events, 1, timeout, self)
        return events[0] if events else None

    async def aevents(self, max: int = 1024, timeout: float | None = None) -> list[Event]:
        """``events`` for asyncio: up to ``max`` events, waiting up to ``timeout`` seconds
        for the first. An empty list where ``anext_event`` returns None."""
        return await _receive(_loops(self), self._take_events, max, timeout, self) or []


class ChatClientUdp(_AsyncWith, _udpchat.ChatClientUdp):
    """A UDP chat client (see ``udpchat._udpchat.ChatClientUdp`` for all but asyncio), with
    ``async with``, ``async for`` and ``asend``, ``arecv``, ``arecv_many``."""

    __slots__ = ("_loops",)
    _loops: _Loops

    async def asend(self, msg: str | bytes | bytearray | memoryview = "quit") -> None:
        """``send`` for asyncio: never blocks the loop. When the socket's buffer is full, it
        waits in the loop until the socket is writable, for as long as ``send`` would (then the
        same OSError, EAGAIN); ``stop()`` meanwhile ends it with ``send``'s RuntimeError."""
        pending = self._try_send(msg)
        if pending is not None:
            await _send_when_writable(pending)

    async def arecv(self, timeout: float | None = None) -> Message | None:
        """``recv`` for asyncio: the next message, waiting up to ``timeout`` seconds (None: until
        one comes) without blocking the loop. None on timeout, or once the client is stopped or
        closed by the server and every message that arrived before has been read. Cancelled, it
        has taken nothing."""
        messages = await _receive(_loops(self), self._take, 1, timeout, self)
        return messages[0] if messages else None

    async def arecv_many(self, max: int = 1024, timeout: float | None = None) -> list[Message]:
        """``recv_many`` for asyncio: up to ``max`` messages, waiting up to ``timeout`` seconds
        for the first. An empty list where ``arecv`` returns None."""
        return await _receive(_loops(self), self._take, max, timeout, self) or []

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> Message:
        """The next message; iteration ends when the client stops or the server ends."""
        messages = await _receive(_loops(self), self._take, 1, None, self)
        if not messages:
            raise StopAsyncIteration
        return messages[0]


async def _send_when_writable(pending: _PendingSend) -> None:
    """Sends ``pending`` once its socket is writable, waiting in the loop (never in a thread) for
    as long as a blocking ``send()`` would wait; a ``stop()`` meanwhile ends the wait, and
    ``retry()`` then raises as ``send()`` would."""
    loop = asyncio.get_running_loop()
    fd, stop = pending.fileno(), pending.stop_fileno()
    while True:
        future: asyncio.Future[None] = loop.create_future()
        loop.add_writer(fd, _wake, future)
        loop.add_reader(stop, _wake, future)
        timer = loop.call_later(pending.left() + _TIMER_SLACK, _wake, future)
        try:
            await future
        finally:
            timer.cancel()
            loop.remove_writer(fd)
            loop.remove_reader(stop)
        if pending.retry():
            return
