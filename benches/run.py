"""udpchat benchmarks: every figure printed beside its baseline, measured in the same run.

    python benches/run.py            # all of it, a few minutes on 2 cores
    python benches/run.py --quick    # shorter runs, for a smoke test
    python benches/run.py --only busy --only latency   # some steps only

Needs udpchat installed (`pip install .`) and cargo (it builds the Rust load generator and the
kernel baseline). Servers under test, each started fresh for every measurement:

  udpchat    ChatServerUdp, in its own Python process
  udpchat-any  the same bound to 0.0.0.0: it answers each client from the address it sent to
             (IP_PKTINFO), as a server on a host with several addresses must
  baseline   benches/baseline.rs: one thread, recvmmsg/sendmmsg, nothing else (the kernel's limit)
  tutorial   the tutorial's threaded pure-Python server, copied below (prints removed)
  asyncio    the same protocol on asyncio's DatagramProtocol
  udpchat-events-full  udpchat with its presence events never read and their queue full
  before     udpchat as installed for another Python (`--before PYTHON`): an earlier build

The asyncio step measures the clients' `async for`, `arecv` and `arecv_many` against what a
program writes without udpchat, a DatagramProtocol that feeds an asyncio.Queue, on asyncio's own
loop and on uvloop (if installed): each measurement in a process of its own, against a
ChatServerUdp in a child process that it drives over a pipe.

The load generator (benches/loadgen.rs) registers N client sockets on 127.0.0.1, sends with a
bounded window from a few of them, and counts every broadcast every socket receives.

Wherever two figures are compared, the runs are interleaved (A B A B A B, each against a fresh
server) and each figure is the median of its runs, so a slow spell of a shared machine falls on
both sides alike. Every loop is bounded in count and in time, and every process this starts
ends by itself within LIFETIME seconds even if this script is killed.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import importlib.util
import json
import logging
import os
import platform
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Coroutine, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar, cast

if TYPE_CHECKING:
    from udpchat import ChatClientUdp, ChatServerUdp

T = TypeVar("T")

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "target" / "release" / "examples"
# How long a server or CPU burner started here lives at most, if nobody kills it first.
LIFETIME = 600.0
# The steps of a full run, in order; `--only` picks some.
STEPS = (
    "fanout",
    "busy",
    "cores",
    "latency",
    "ingest",
    "registry",
    "presence",
    "asyncio",
    "cluster",
)
# The Python whose udpchat the presence step compares against (`--before`).
BEFORE: str | None = None


# --- the servers under test -----------------------------------------------------------------


class TutorialServer:
    """The tutorial's ver2 ChatServerUdp, as written there (indentation restored, prints and the
    per-message logging.info dropped, recvfrom buffer raised from 1024 so 1,200-byte payloads
    are not cut)."""

    def __init__(self, ip: str = "127.0.0.1", port: int = 9998, interval: int = 10) -> None:
        self.sock = socket.socket(type=socket.SOCK_DGRAM)
        self.addr = (ip, port)
        self.event = threading.Event()
        self.clients: dict[tuple[str, int], float] = {}
        self.interval = interval

    def start(self) -> None:
        self.sock.bind(self.addr)
        threading.Thread(target=self._recv, name="recv", daemon=True).start()

    def _recv(self) -> None:
        while not self.event.is_set():
            lostset = set()
            data, client = self.sock.recvfrom(65536)
            text = data.strip().decode()
            current = datetime.datetime.now().timestamp()
            if text == "^hb^" or text == "reg":
                self.clients[client] = current
                continue
            elif text == "quit":
                self.clients.pop(client, None)
                continue
            self.clients[client] = current
            msg = "ack: {} {}\n{}\n".format(*client, text)
            for c, stamp in self.clients.items():
                if current - stamp > self.interval:
                    lostset.add(c)
                else:
                    self.sock.sendto(msg.encode(), c)
            for c in lostset:
                self.clients.pop(c)


class AsyncioServer(asyncio.DatagramProtocol):
    """The same protocol on asyncio's DatagramProtocol."""

    interval = 10.0

    def __init__(self) -> None:
        self.clients: dict[tuple[str, int], float] = {}

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # The selector loop's datagram transport does not subclass DatagramTransport.
        self.transport = cast(asyncio.DatagramTransport, transport)

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        data = data.strip()
        now = time.monotonic()
        if data in (b"reg", b"^hb^"):
            self.clients[addr] = now
            return
        if data == b"quit":
            self.clients.pop(addr, None)
            return
        if not data:
            return
        self.clients[addr] = now
        msg = b"ack: %s %d\n%s\n" % (addr[0].encode(), addr[1], data)
        for c, seen in list(self.clients.items()):
            if now - seen > self.interval:
                del self.clients[c]
            else:
                self.transport.sendto(msg, c)


def busy_loop(seconds: float = LIFETIME) -> None:
    """A CPU-bound Python loop, as a host program's main thread might run; ends after `seconds`."""
    end = time.monotonic() + seconds
    x = 0
    while time.monotonic() < end:
        for _ in range(100_000):
            x += 1


def churn(address: str, pairs_per_s: int = 1000, seconds: float = LIFETIME) -> None:
    """Joins and leaves: `pairs_per_s` a second, each a `reg` then a `quit` from one of 100
    sockets in turn, so a server logs two INFO records for each pair; ends after `seconds`."""
    ip, port = address.rsplit(":", 1)
    target = (ip, int(port))
    socks = [socket.socket(type=socket.SOCK_DGRAM) for _ in range(100)]
    for sock in socks:
        sock.bind(("127.0.0.1", 0))
    start = time.monotonic()
    sent = 0
    while (elapsed := time.monotonic() - start) < seconds:
        due = int(elapsed * pairs_per_s)
        while sent < due:
            sock = socks[sent % len(socks)]
            sock.sendto(b"reg", target)
            sock.sendto(b"quit", target)
            sent += 1
        time.sleep(0.001)


def serve(kind: str, busy: bool, fanout_threads: int, log_info: bool = False) -> None:
    """Runs one server in this process, prints its address, serves until killed. With
    `log_info`, logging at INFO to a file (/dev/null), as a service would log to its own."""
    if log_info:
        logging.basicConfig(level=logging.INFO, filename=os.devnull)
    if kind in ("udpchat", "udpchat-any", "udpchat-events-full"):
        from udpchat import ChatServerUdp

        ip = "0.0.0.0" if kind == "udpchat-any" else "127.0.0.1"
        if kind == "udpchat-events-full":
            # Events are never read: the clients' joins fill a queue of 16, and every later
            # event is dropped and counted.
            server = ChatServerUdp(ip, 0, fanout_threads=fanout_threads, event_queue=16)
        else:  # no option a build from before presence does not know (`--before`)
            server = ChatServerUdp(ip, 0, fanout_threads=fanout_threads)
        server.start()
        assert server.address is not None
        address = ("127.0.0.1", server.address[1])
    elif kind == "tutorial":
        tutorial = TutorialServer(port=0)
        tutorial.start()
        address = tutorial.sock.getsockname()
    elif kind == "asyncio":
        loop = asyncio.new_event_loop()
        transport, _ = loop.run_until_complete(
            loop.create_datagram_endpoint(AsyncioServer, local_addr=("127.0.0.1", 0))
        )
        print("{}:{}".format(*transport.get_extra_info("sockname")), flush=True)
        loop.call_later(LIFETIME, loop.stop)
        loop.run_forever()
        return
    else:
        raise SystemExit(f"unknown server {kind}")
    print("{}:{}".format(*address), flush=True)
    if busy:
        busy_loop()
    else:
        threading.Event().wait(LIFETIME)


# --- running things --------------------------------------------------------------------------


@contextmanager
def server(
    kind: str, busy: bool = False, fanout_threads: int = 1, log_info: bool = False
) -> Iterator[str]:
    if kind == "baseline":
        cmd = [str(EXAMPLES / "baseline"), "127.0.0.1:0"]
    elif kind == "before":
        assert BEFORE is not None
        cmd = [BEFORE, __file__, "serve", "udpchat", "--fanout-threads", str(fanout_threads)]
    else:
        cmd = [sys.executable, __file__, "serve", kind, "--fanout-threads", str(fanout_threads)]
        cmd += ["--busy"] if busy else []
        cmd += ["--log-info"] if log_info else []
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        address = proc.stdout.readline().strip()
        if not address:
            raise RuntimeError(f"{kind} server did not start")
        yield address
    finally:
        proc.kill()
        proc.wait(10)


@contextmanager
def background(*args: str) -> Iterator[None]:
    """This script run as `args` in another process, for as long as the block lasts."""
    proc = subprocess.Popen([sys.executable, __file__, *args])
    try:
        time.sleep(0.2)
        yield
    finally:
        proc.kill()
        proc.wait(10)


def loadgen(*args: object) -> dict[str, float]:
    out = subprocess.run(
        [str(EXAMPLES / "loadgen"), *map(str, args)],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    result: dict[str, float] = json.loads(out.stdout)
    return result


def build() -> None:
    subprocess.run(
        ["cargo", "build", "--release", "--quiet", "--examples"], cwd=ROOT, check=True, timeout=1200
    )


def sysctl(name: str) -> str:
    """A kernel setting as `sysctl NAME` prints it ("?" where it cannot be read)."""
    try:
        return Path("/proc/sys", *name.split(".")).read_text().strip()
    except OSError:
        return "?"


def ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}x" if b else "n/a"


def spread(a: list[dict[str, float]], b: list[dict[str, float]], key: str) -> str:
    """The ratio of each interleaved round, A against the B run right after it."""
    return " ".join(
        f"{x[key] / y[key]:.2f}" if y[key] else "n/a" for x, y in zip(a, b, strict=True)
    )


def table(title: str, header: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    print(f"\n## {title}\n")
    print("| " + " | ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)) + " |")
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for r in rows:
        print("| " + " | ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)) + " |")
    sys.stdout.flush()


# --- the benchmarks --------------------------------------------------------------------------

SERVERS = ["udpchat", "udpchat-any", "baseline", "tutorial", "asyncio"]


def interleaved(
    kinds: list[str], runs: int, measure: Callable[[str], dict[str, float]]
) -> dict[str, list[dict[str, float]]]:
    """`measure(kind)` for every kind in turn, `runs` rounds (A B A B A B): on this shared
    machine the spread from one run to the next is about ±15%, and a slow spell must fall on
    every side of a ratio alike."""
    results: dict[str, list[dict[str, float]]] = {kind: [] for kind in kinds}
    for _ in range(runs):
        for kind in kinds:
            results[kind].append(measure(kind))
    return results


def median_by(results: list[dict[str, float]], key: str) -> dict[str, float]:
    """The run with the median `key` (the lower middle of an even count)."""
    return sorted(results, key=lambda r: r[key])[(len(results) - 1) // 2]


def medians(results: list[dict[str, float]]) -> dict[str, float]:
    """Each figure's median over the runs."""
    return {k: statistics.median(r[k] for r in results) for k in results[0]}


def fan_out(seconds: float, runs: int) -> None:
    """Targets 1 and 2: deliveries/s by clients and payload size, each server fresh, the servers
    interleaved, the median of `runs` runs each. udpchat runs twice: on 127.0.0.1, and on 0.0.0.0,
    where it answers each client from the address it sent to (IP_PKTINFO)."""
    configs = [(100, 4, 64), (100, 4, 1200), (1000, 4, 64), (1000, 4, 1200), (2, 2, 64)]
    rows = []
    for clients, senders, size in configs:
        key = "messages_per_s" if clients == 2 else "deliveries_per_s"

        def measure(
            kind: str, clients: int = clients, senders: int = senders, size: int = size
        ) -> dict[str, float]:
            with server(kind) as address:
                return loadgen("throughput", address, clients, senders, size, seconds)

        results = interleaved(SERVERS, runs, measure)
        got = {kind: median_by(results[kind], key) for kind in SERVERS}
        rows.append(
            [
                f"{clients} clients, {size} B" + (" (messages/s)" if clients == 2 else ""),
                *(f"{got[k][key]:,.0f}" for k in SERVERS),
                ratio(got["udpchat"][key], got["baseline"][key]),
                ratio(got["udpchat-any"][key], got["udpchat"][key]),
                ratio(got["udpchat"][key], got["tutorial"][key]),
                f"{got['udpchat']['delivery_ratio']:.3f}",
                spread(results["udpchat"], results["baseline"], key),
            ]
        )
    table(
        "Fan-out: deliveries per second (2 clients: messages per second)",
        [
            "load",
            *SERVERS,
            "udpchat/baseline",
            "any/udpchat",
            "udpchat/tutorial",
            "udpchat delivered",
            "udpchat/baseline per round",
        ],
        rows,
    )


def busy_host(seconds: float, runs: int) -> None:
    """Target 3: the host's main thread runs a Python loop vs the same load in another process,
    the two interleaved, the median of `runs` each. The last case logs at INFO while 1,000
    clients a second join and leave: the records go through udpchat's logging thread, and the
    fan-out must not wait for the GIL because of them."""

    def measure(case: str) -> dict[str, float]:
        kind, where = case.split()[:2]
        churning = case.endswith("churn")
        burner = background("burn") if where == "other" else contextlib.nullcontext()
        with (
            burner,
            server(kind, busy=where == "same", log_info=churning) as address,
            background("churn", address) if churning else contextlib.nullcontext(),
        ):
            return loadgen("throughput", address, 100, 4, 64, seconds)

    kinds = ["udpchat", "tutorial", "udpchat INFO+churn"]
    cases = [f"{kind.split()[0]} {where} {kind}" for kind in kinds for where in ["same", "other"]]
    results = interleaved(cases, runs, measure)
    rows = []
    for kind in kinds:
        key = "deliveries_per_s"
        name = kind.split()[0]
        same = statistics.median(r[key] for r in results[f"{name} same {kind}"])
        other = statistics.median(r[key] for r in results[f"{name} other {kind}"])
        label = kind.replace("INFO+churn", "(INFO logging, 1,000 joins+leaves/s)")
        rows.append([label, f"{same:,.0f}", f"{other:,.0f}", ratio(same, other)])
    table(
        "Busy host: deliveries/s, 100 clients, 64 B, while a CPU-bound Python loop runs",
        ["server", "loop in the server's process", "loop in another process", "ratio"],
        rows,
    )


def cores(seconds: float, runs: int) -> None:
    """Target 7: one fan-out thread against several, where a round is large enough to split;
    1, 2 and 4 threads interleaved, the median of `runs` each."""

    def measure(threads: str) -> dict[str, float]:
        with server("udpchat", fanout_threads=int(threads)) as address:
            return loadgen("throughput", address, 1000, 4, 64, seconds)

    counts = ["1", "2", "4"]
    results = interleaved(counts, runs, measure)
    got = {t: statistics.median(r["deliveries_per_s"] for r in results[t]) for t in counts}
    rows = [[t, f"{got[t]:,.0f}", ratio(got[t], got["1"])] for t in counts]
    table(
        f"Fan-out threads: deliveries/s, 1000 clients, 64 B, {os.cpu_count()} cores",
        ["fanout_threads", "deliveries/s", "vs 1"],
        rows,
    )


def latency(seconds: float, runs: int) -> None:
    """Target 6: round trip of a client's own message, 1,000 messages/s, 100 clients; the
    servers interleaved, each figure the median of `runs` runs."""

    def measure(kind: str) -> dict[str, float]:
        with server(kind) as address:
            return loadgen("latency", address, 100, 1000, 64, seconds)

    kinds = ["udpchat", "baseline", "tutorial"]
    results = interleaved(kinds, runs, measure)
    rows = []
    for kind in kinds:
        r = medians(results[kind])
        answered = sum(x["answered"] for x in results[kind])
        sent = sum(x["sent"] for x in results[kind])
        rows.append(
            [
                kind,
                f"{r['p50_us']:.0f}",
                f"{r['p99_us']:.0f}",
                f"{r['max_us']:.0f}",
                f"{answered:.0f}/{sent:.0f}",
                f"{r['all_p50_us']:.0f}",
                f"{r['all_p99_us']:.0f}",
            ]
        )
    table(
        "Latency: 1,000 messages/s, 100 clients, 64 B (microseconds, kernel receive timestamps)",
        ["server", "own p50", "own p99", "own max", "answered", "all copies p50", "all p99"],
        rows,
    )


def consume_flood(mode: str, count: int) -> float:
    """Messages/s a Python loop takes in while the Rust blaster sends as fast as it can. On 2
    cores the blaster's side of the kernel path is the limit, so this mostly measures it."""
    blaster = subprocess.Popen(
        [str(EXAMPLES / "loadgen"), "blast", "127.0.0.1:0", str(count), "64"],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert blaster.stdout is not None
    ip, port = blaster.stdout.readline().strip().rsplit(":", 1)
    received, first, last = 0, 0.0, 0.0
    try:
        if mode == "socket":
            with socket.socket(type=socket.SOCK_DGRAM) as sock:
                sock.connect((ip, int(port)))
                sock.settimeout(0.5)
                sock.send(b"reg")
                sock.recv(65536)
                first, received = time.perf_counter(), 1
                with contextlib.suppress(TimeoutError):
                    for _ in range(count):
                        sock.recv(65536)
                        received += 1
        else:
            from udpchat import ChatClientUdp

            with ChatClientUdp(ip, int(port), interval=60) as client:
                if mode == "recv":
                    assert client.recv(5) is not None
                    first, received = time.perf_counter(), 1
                    for _ in range(count):
                        if client.recv(0.5) is None:
                            break
                        received += 1
                else:
                    batch = client.recv_many(1024, 5)
                    first, received = time.perf_counter(), len(batch)
                    for _ in range(count):
                        if not (batch := client.recv_many(1024, 0.5)):
                            break
                        received += len(batch)
        last = time.perf_counter() - 0.5
    finally:
        blaster.kill()
        blaster.wait(10)
    return received / max(last - first, 1e-9)


def consume_backlog(mode: str, rounds: int, burst: int = 4000) -> float:
    """Messages/s a Python loop takes in when messages are already waiting: bursts of `burst`
    datagrams are sent, left to settle, then drained against the clock."""
    server = socket.socket(type=socket.SOCK_DGRAM)
    server.bind(("127.0.0.1", 0))
    datagram = b"ack: 127.0.0.1 4242\n" + b"x" * 64 + b"\n"
    elapsed, taken = 0.0, 0
    with contextlib.ExitStack() as stack:
        stack.enter_context(server)
        if mode == "socket":
            sock = stack.enter_context(socket.socket(type=socket.SOCK_DGRAM))
            # Room for the whole burst in the kernel, as udpchat's queue has in user space.
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
            sock.connect(server.getsockname())
            sock.setblocking(False)
            sock.send(b"reg")
        else:
            from udpchat import ChatClientUdp

            client = stack.enter_context(
                ChatClientUdp(*server.getsockname(), interval=60, max_queue=2 * burst)
            )
        _, peer = server.recvfrom(100)
        for _ in range(rounds):
            for _ in range(burst):
                server.sendto(datagram, peer)
            time.sleep(0.05)
            t0 = time.perf_counter()
            if mode == "socket":
                with contextlib.suppress(BlockingIOError):
                    for _ in range(burst):
                        sock.recv(65536)
                        taken += 1
            elif mode == "recv":
                for _ in range(burst):
                    if client.recv(0) is None:
                        break
                    taken += 1
            else:
                for _ in range(burst):
                    if not (batch := client.recv_many(1024, 0)):
                        break
                    taken += len(batch)
            elapsed += time.perf_counter() - t0
    return taken / elapsed


def ingest(count: int, rounds: int, runs: int) -> None:
    """Target 4: a Python loop consuming messages, udpchat's client vs plain recv; the three
    consumers interleaved, the median of `runs` each."""
    rows = []
    modes = ["socket", "recv", "recv_many"]
    backlog_runs = interleaved(modes, runs, lambda m: {"rate": consume_backlog(m, rounds)})
    flood_runs = interleaved(modes, runs, lambda m: {"rate": consume_flood(m, count)})
    backlog = {m: statistics.median(r["rate"] for r in backlog_runs[m]) for m in modes}
    flood = {m: statistics.median(r["rate"] for r in flood_runs[m]) for m in modes}
    names = {
        "socket": "plain socket.recv loop",
        "recv": "ChatClientUdp.recv",
        "recv_many": "ChatClientUdp.recv_many",
    }
    for m in ["socket", "recv", "recv_many"]:
        rows.append(
            [
                names[m],
                f"{backlog[m]:,.0f}",
                ratio(backlog[m], backlog["socket"]),
                f"{flood[m]:,.0f}",
                ratio(flood[m], flood["socket"]),
            ]
        )
    table(
        "Client ingest: messages/s a Python loop consumes (64 B payloads)",
        ["consumer", "messages waiting", "vs plain", "live flood", "vs plain"],
        rows,
    )


def registry_scale() -> None:
    """Target 5: the client table at 100,000 clients."""
    out = subprocess.run(
        [str(EXAMPLES / "registry_memory"), "100000"],
        capture_output=True,
        text=True,
        check=True,
        timeout=120,
    )
    r = json.loads(out.stdout)
    table(
        "Client table at 100,000 clients (requested heap bytes, counting allocator)",
        ["figure", "value"],
        [
            ["bytes per client", f"{r['bytes_per_client']:.0f}"],
            [
                "bytes per client with the fan-out snapshot",
                f"{r['bytes_per_client_with_fanout_snapshot']:.0f}",
            ],
            ["register (ns per client)", f"{r['register_ns']:.0f}"],
            ["heartbeat (ns per client)", f"{r['heartbeat_ns']:.0f}"],
            [
                "fan-out snapshot rebuild after a join or leave (ms)",
                f"{r['snapshot_rebuild_ms']:.2f}",
            ],
            ["fan-out snapshot when nobody joined or left (ns)", f"{r['snapshot_cached_ns']}"],
            ["sweep expiring all of them (ms)", f"{r['expire_all_ms']:.1f}"],
        ],
    )


def presence(seconds: float, runs: int) -> None:
    """Presence costs nothing per message: fan-out with 100 clients, events never read (the
    queue full, so every event past it is dropped), against the build given by `--before`."""
    if BEFORE is None:
        print("\n(presence: skipped; give --before PYTHON, a Python with the earlier udpchat)")
        return
    before = subprocess.run(
        [BEFORE, "-c", "import udpchat; print(udpchat.__version__, udpchat.__file__)"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    print(f"\nbefore: {before}")
    kinds = ["before", "udpchat", "udpchat-events-full"]
    rows = []
    for size in (64, 1200):

        def measure(kind: str, size: int = size) -> dict[str, float]:
            with server(kind) as address:
                return loadgen("throughput", address, 100, 4, size, seconds)

        key = "deliveries_per_s"
        results = interleaved(kinds, runs, measure)
        got = {kind: median_by(results[kind], key) for kind in kinds}
        rows.append(
            [
                f"100 clients, {size} B",
                *(f"{got[k][key]:,.0f}" for k in kinds),
                ratio(got["udpchat-events-full"][key], got["before"][key]),
                spread(results["udpchat-events-full"], results["before"], key),
            ]
        )
    table(
        "Presence: deliveries per second, events unread",
        ["load", *kinds, "events-full/before", "per round"],
        rows,
    )


# --- asyncio: the clients' async methods against a DatagramProtocol ---------------------------

# The event loops the asyncio step runs on: asyncio's own (the selector loop, epoll) and uvloop.
LOOPS = ("asyncio", "uvloop")
# The payload of every broadcast in the asyncio step, in bytes, as in `ingest`.
AIO_PAYLOAD = 64
# The receive buffer the DatagramProtocol client asks for where messages wait in its kernel
# buffer (`ingest` asks the same of its plain socket); the kernel caps it at twice rmem_max.
AIO_RCVBUF = 8 << 20


def aio_server() -> None:
    """(internal) A ChatServerUdp for the asyncio step in this process, driven by one command a
    line on stdin, one answer a line on stdout. It ends at the end of its input (the measuring
    process gone) or after LIFETIME seconds, whichever comes first."""
    from udpchat import ChatServerUdp

    signal.alarm(int(LIFETIME))
    # The DatagramProtocol client sends no heartbeats: an interval that outlives the run. A
    # large buffer, so a `reg` from each of 1,000 clients started together is not lost.
    server = ChatServerUdp("127.0.0.1", 0, interval=LIFETIME, rcvbuf=AIO_RCVBUF)
    server.start()
    assert server.address is not None
    print("{}:{}".format(*server.address), flush=True)
    filler = b"x" * AIO_PAYLOAD
    for line in sys.stdin:
        command, *args = line.split()
        if command == "clients":  # waits (10 s at most) until N clients are registered
            deadline = time.monotonic() + 10
            while server.stats()["clients"] < int(args[0]) and time.monotonic() < deadline:
                time.sleep(0.005)
            answer = str(server.stats()["clients"])
        elif command == "burst":  # N broadcasts, 100 at a time; answers once all are sent
            n = int(args[0])
            before = server.stats()
            expected = before["deliveries"] + n * before["clients"]
            for i in range(n):
                server.broadcast(filler)
                if i % 100 == 99:  # room for the client's receiver: this is not a flood
                    time.sleep(0.001)
            deadline = time.monotonic() + 10
            while server.stats()["deliveries"] < expected and time.monotonic() < deadline:
                time.sleep(0.001)
            answer = str((server.stats()["deliveries"] - before["deliveries"]) // before["clients"])
        elif command == "paced":  # N broadcasts GAP seconds apart, each carrying its send time
            n, gap = int(args[0]), float(args[1])
            start = time.perf_counter()
            for i in range(n):
                if (delay := start + i * gap - time.perf_counter()) > 0:
                    time.sleep(delay)
                server.broadcast(f"{i:08d} {time.monotonic_ns():020d} ".ljust(AIO_PAYLOAD, "x"))
            answer = str(n)
        elif command == "stats":
            answer = json.dumps(server.stats())
        else:
            raise SystemExit(f"aio-server: unknown command {line!r}")
        print(answer, flush=True)
    server.stop()


class AioServer:
    """`aio-server` in a child process, with its address: `ask` waits for the answer blocking
    the caller (an event loop included), `aask` waits for it in the running event loop. Its
    answers are read from the pipe's fd directly: uvloop leaves an fd it watched non-blocking."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, __file__, "aio-server"], stdin=subprocess.PIPE, stdout=subprocess.PIPE
        )
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.stdin, self.fd = self.proc.stdin, self.proc.stdout.fileno()
        self.pending = b""
        ip, port = self._line(block=True).rsplit(":", 1)
        self.address = (ip, int(port))

    def _line(self, block: bool) -> str:
        """The answer once all of it is read, else "" (never, if `block`)."""
        os.set_blocking(self.fd, block)
        while not self.pending.endswith(b"\n"):
            try:
                chunk = os.read(self.fd, 4096)
            except BlockingIOError:
                return ""
            if not chunk:
                raise RuntimeError("aio-server ended")
            self.pending += chunk
        line, self.pending = self.pending.decode().strip(), b""
        return line

    def ask(self, command: str) -> str:
        self.stdin.write(command.encode() + b"\n")
        self.stdin.flush()
        return self._line(block=True)

    async def aask(self, command: str) -> str:
        self.stdin.write(command.encode() + b"\n")
        self.stdin.flush()
        loop = asyncio.get_running_loop()
        while True:
            readable: asyncio.Future[None] = loop.create_future()
            loop.add_reader(self.fd, resolve, readable)
            try:
                await readable
            finally:
                loop.remove_reader(self.fd)
            if answer := self._line(block=False):
                return answer

    def close(self) -> None:
        self.stdin.close()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)


def resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


class QueueProtocol(asyncio.DatagramProtocol):
    """The asyncio step's baseline, what a program writes without udpchat: each datagram from
    the server put into an asyncio.Queue, for a coroutine to `await queue.get()`."""

    def __init__(self, queue: asyncio.Queue[bytes | None]) -> None:
        self.queue = queue

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.queue.put_nowait(data)


async def open_protocol(
    address: tuple[str, int], rcvbuf: int | None
) -> tuple[asyncio.DatagramTransport, asyncio.Queue[bytes | None], int]:
    """The baseline client, registered with `reg` as ChatClientUdp registers: its transport, its
    queue and the receive buffer the kernel granted it (after asking for `rcvbuf`, if given)."""
    sock = socket.socket(type=socket.SOCK_DGRAM)
    if rcvbuf is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.bind(("127.0.0.1", 0))
    sock.connect(address)
    granted = sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
    queue: asyncio.Queue[bytes | None] = asyncio.Queue()
    transport, _ = await asyncio.get_running_loop().create_datagram_endpoint(
        lambda: QueueProtocol(queue), sock=sock
    )
    transport.sendto(b"reg")
    return transport, queue, granted


def run_on(loop_name: str, main: Coroutine[object, object, T]) -> T:
    """`main` on a new event loop of that name; tasks still running at its end are cancelled."""
    if loop_name == "uvloop":
        import uvloop

        loop: asyncio.AbstractEventLoop = uvloop.new_event_loop()
    else:
        loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    try:
        return loop.run_until_complete(main)
    finally:
        tasks = asyncio.all_tasks(loop)
        for task in tasks:
            task.cancel()
        loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
        loop.close()


def room(request: int, size: int) -> tuple[int, int]:
    """How many datagrams of `size` bytes a socket that asks for a `request`-byte receive buffer
    holds unread before the kernel drops one, and the buffer granted. Measured, as
    tests/conftest.py does: the kernel charges each datagram more than its length."""
    with (
        socket.socket(type=socket.SOCK_DGRAM) as probe,
        socket.socket(type=socket.SOCK_DGRAM) as sender,
    ):
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, request)
        probe.bind(("127.0.0.1", 0))
        granted = probe.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
        data = b"x" * size
        sent = granted // 512 + 64  # none is charged less than 512 bytes
        for _ in range(sent):
            sender.sendto(data, probe.getsockname())
        time.sleep(0.01)
        probe.setblocking(False)
        fitted = 0
        with contextlib.suppress(BlockingIOError):
            for _ in range(sent):
                probe.recv(65536)
                fitted += 1
    return fitted, granted


async def drain_aiter(client: ChatClientUdp, n: int, got: list[int]) -> None:
    count = 0
    try:
        async for _ in client:
            count += 1
            if count >= n:
                break
    finally:
        got[0] = count


async def drain_many(client: ChatClientUdp, n: int, got: list[int]) -> None:
    count = 0
    try:
        while count < n:
            count += len(await client.arecv_many(1024))
    finally:
        got[0] = count


async def drain_queue(queue: asyncio.Queue[bytes | None], n: int, got: list[int]) -> None:
    count = 0
    try:
        while count < n:
            await queue.get()
            count += 1
    finally:
        got[0] = count


def udp_socket(port: int, peer_port: int) -> tuple[int, int]:
    """The bytes waiting in the receive buffer of the UDP socket bound to `port` and connected
    to `peer_port`, and the datagrams the kernel dropped for want of room in it, from
    /proc/net/udp ((0, 0) if there is no such socket)."""
    for line in Path("/proc/net/udp").read_text().splitlines()[1:]:
        f = line.split()
        if int(f[1].rsplit(":", 1)[1], 16) == port and int(f[2].rsplit(":", 1)[1], 16) == peer_port:
            return int(f[4].split(":")[1], 16), int(f[-1])
    return 0, 0


async def aio_waiting(kind: str, busy: bool, burst: int, rounds: int) -> dict[str, float]:
    """Messages waiting: `rounds` bursts of `burst` broadcasts, each left to settle, then drained
    against the clock by `kind` (`aiter`: `async for`; `many`: `arecv_many(1024)`; `protocol`:
    the DatagramProtocol's queue). `busy`: the event loop was blocked while they came (as by a
    long callback), so the baseline's wait in its socket's buffer; otherwise the loop idled and
    the baseline's are in its asyncio.Queue already. udpchat's are in its own queue either way.
    What the kernel dropped for want of room in the consumer's socket is counted, and not
    waited for. CPU is the whole process's (every thread), from the burst's first datagram to
    the drain's end: it counts the reading the drain does not see."""
    from udpchat import ChatClientUdp

    server = AioServer()
    client: ChatClientUdp | None = None
    transport: asyncio.DatagramTransport | None = None
    granted = 0
    try:
        if kind == "protocol":
            transport, queue, granted = await open_protocol(server.address, AIO_RCVBUF)
            local = transport.get_extra_info("sockname")[1]
        else:
            client = ChatClientUdp(*server.address, interval=60, max_queue=2 * burst)
            client.start()
            assert client.address is not None
            local = client.address[1]
        assert server.ask("clients 1") == "1", "the consumer did not register"
        sent = taken = lost = timeouts = 0
        elapsed = cpu = 0.0
        for _ in range(rounds):
            cpu0 = time.process_time()
            _, drops0 = udp_socket(local, server.address[1])
            n = int(server.ask(f"burst {burst}") if busy else await server.aask(f"burst {burst}"))
            # Until the reader (udpchat's thread, or the idle loop) has taken all from the
            # kernel; a blocked loop's DatagramProtocol leaves them there.
            deadline = time.monotonic() + 5
            for pause in [0.002] * 2500 + [0.05]:
                queued, drops = udp_socket(local, server.address[1])
                if not queued or (busy and client is None) or time.monotonic() > deadline:
                    pause = 0.05
                if busy:
                    time.sleep(pause)
                else:
                    await asyncio.sleep(pause)
                if pause == 0.05:
                    break
            _, drops = udp_socket(local, server.address[1])
            n -= drops - drops0
            lost += drops - drops0
            got = [0]
            if client is None:
                drain = drain_queue(queue, n, got)
            elif kind == "aiter":
                drain = drain_aiter(client, n, got)
            else:
                drain = drain_many(client, n, got)
            t0 = time.perf_counter()
            try:
                await asyncio.wait_for(drain, 2.0)
            except asyncio.TimeoutError:
                timeouts += 1  # fewer than counted: the round does not count for the rate
            else:
                elapsed += time.perf_counter() - t0
                taken += got[0]
            cpu += time.process_time() - cpu0
            sent += n + drops - drops0
        return {
            "rate": taken / max(elapsed, 1e-9),
            "sent": sent,
            "taken": taken,
            "lost": lost,
            "cpu_us": cpu / max(taken, 1) * 1e6,
            "rcvbuf": granted,
            "timeouts": timeouts,
        }
    finally:
        if client is not None:
            client.stop()
        if transport is not None:
            transport.close()
        server.close()


async def aio_flood(kind: str, seconds: float) -> dict[str, float]:
    """Live flood: the Rust load generator (one client, a window of 64 messages in flight)
    floods the server, which relays each message to it and to the consumer under test; the
    consumer's rate is over `seconds` from its first message, while the flood goes on; then it
    reads on until the flood has ended, and what it got is set against what the server relayed.
    The consumers are as a program starts them: ChatClientUdp's default queue (4,096), the
    DatagramProtocol's socket with the system's default receive buffer."""
    from udpchat import ChatClientUdp

    server = AioServer()
    client: ChatClientUdp | None = None
    transport: asyncio.DatagramTransport | None = None
    loadgen_proc: subprocess.Popen[str] | None = None
    try:
        if kind == "protocol":
            transport, queue, granted = await open_protocol(server.address, None)
        else:
            client = ChatClientUdp(*server.address, interval=60)
            client.start()
            granted = 0
        assert server.ask("clients 1") == "1", "the consumer did not register"
        address = "{}:{}".format(*server.address)
        loadgen_proc = subprocess.Popen(
            [
                *(str(EXAMPLES / "loadgen"), "throughput", address, "1", "1"),
                *(str(AIO_PAYLOAD), str(seconds + 0.5)),
            ],
            stdout=subprocess.PIPE,
            text=True,
        )
        flood = loadgen_proc

        async def end_when_flood_ends() -> None:
            while flood.poll() is None:
                await asyncio.sleep(0.05)
            await asyncio.sleep(0.3)  # the last relays land
            if client is not None:
                client.stop()  # what came before stays readable; then the iteration ends
            else:
                queue.put_nowait(None)

        ender = asyncio.ensure_future(end_when_flood_ends())
        out: dict[str, float] = {}

        async def consume() -> None:
            # (count, time, CPU time) at the window's end
            mark: tuple[int, float, float] | None = None
            if client is not None and kind == "aiter":
                await client.__anext__()
                first, cpu = time.perf_counter(), time.process_time()
                end, count = first + seconds, 1
                before = count
                async for _ in client:
                    count += 1
                    if count & 255 == 0 and mark is None and time.perf_counter() >= end:
                        mark = (count, time.perf_counter(), time.process_time())
            elif client is not None:
                count = before = len(await client.arecv_many(1024))
                first, cpu = time.perf_counter(), time.process_time()
                end = first + seconds
                while batch := await client.arecv_many(1024):
                    count += len(batch)
                    if mark is None and time.perf_counter() >= end:
                        mark = (count, time.perf_counter(), time.process_time())
            else:
                await queue.get()
                first, cpu = time.perf_counter(), time.process_time()
                end, count = first + seconds, 1
                before = count
                while await queue.get() is not None:
                    count += 1
                    if count & 255 == 0 and mark is None and time.perf_counter() >= end:
                        mark = (count, time.perf_counter(), time.process_time())
            if mark is None:  # the flood ended before the window did
                mark = (count, time.perf_counter() - 0.3, time.process_time())
            window = mark[0] - before  # what came after the first
            out.update(
                count=count,
                rate=window / (mark[1] - first),
                cpu_us=(mark[2] - cpu) / max(window, 1) * 1e6,
            )

        await asyncio.wait_for(consume(), seconds + 30)
        await ender
        relayed = json.loads(server.ask("stats"))["broadcasts"]
        stdout, _ = loadgen_proc.communicate(timeout=10)
        queue_drops = client.dropped if client is not None else 0
        return {
            "rate": out["rate"],
            "received": out["count"],
            "sent": relayed,
            "sent_per_s": json.loads(stdout)["messages_per_s"],
            "cpu_us": out["cpu_us"],
            "queue_drops": queue_drops,
            "kernel_drops": relayed - out["count"] - queue_drops,
            "rcvbuf": granted,
        }
    finally:
        if loadgen_proc is not None and loadgen_proc.poll() is None:
            loadgen_proc.kill()
            loadgen_proc.wait(10)
        if client is not None:
            client.stop()
        if transport is not None:
            transport.close()
        server.close()


def latencies(received: list[tuple[bytes, int]], sent: int) -> dict[str, float]:
    """One-way latencies from payloads `{seq:08d} {monotonic_ns:020d} ...` and the
    CLOCK_MONOTONIC time each was returned, in microseconds."""
    us = sorted((t - int(payload[9:29])) / 1e3 for payload, t in received)
    return {
        "p50_us": us[len(us) // 2] if us else 0.0,
        "p99_us": us[min(len(us) - 1, len(us) * 99 // 100)] if us else 0.0,
        "max_us": us[-1] if us else 0.0,
        "received": len(us),
        "sent": sent,
    }


async def aio_latency(kind: str, count: int, gap: float) -> dict[str, float]:
    """Wake latency: `count` broadcasts `gap` seconds apart, each stamped with the time the
    server's process called broadcast(); the time `arecv` (or the DatagramProtocol's
    `queue.get()`) returned it, on the same clock (CLOCK_MONOTONIC is the machine's)."""
    from udpchat import ChatClientUdp

    server = AioServer()
    client: ChatClientUdp | None = None
    transport: asyncio.DatagramTransport | None = None
    received: list[tuple[bytes, int]] = []
    try:
        if kind == "protocol":
            transport, queue, _ = await open_protocol(server.address, None)
        else:
            client = ChatClientUdp(*server.address, interval=60)
            client.start()
        assert server.ask("clients 1") == "1", "the consumer did not register"

        async def consume() -> None:
            if client is not None:
                while (msg := await client.arecv()) is not None:
                    t = time.monotonic_ns()
                    received.append((msg.payload, t))
            else:
                while (data := await queue.get()) is not None:
                    t = time.monotonic_ns()
                    received.append((data.split(b"\n", 2)[1], t))

        consumer = asyncio.ensure_future(consume())
        await asyncio.sleep(0.05)
        await server.aask(f"paced {count} {gap}")
        await asyncio.sleep(0.2)
        consumer.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await consumer
        return latencies(received, count)
    finally:
        if client is not None:
            client.stop()
        if transport is not None:
            transport.close()
        server.close()


def aio_latency_thread(count: int, gap: float) -> dict[str, float]:
    """The same with a blocking `recv()` in a plain thread, no event loop: what the eventfd
    path is set against."""
    from udpchat import ChatClientUdp

    server = AioServer()
    received: list[tuple[bytes, int]] = []
    done = threading.Event()
    try:
        with ChatClientUdp(*server.address, interval=60) as client:
            assert server.ask("clients 1") == "1", "the consumer did not register"

            def consume() -> None:
                while not done.is_set():
                    if (msg := client.recv(0.5)) is not None:
                        t = time.monotonic_ns()
                        received.append((msg.payload, t))

            thread = threading.Thread(target=consume)
            thread.start()
            time.sleep(0.05)
            server.ask(f"paced {count} {gap}")
            time.sleep(0.2)
            done.set()
            thread.join(5)
        return latencies(received, count)
    finally:
        server.close()


def threads_now() -> int:
    """This process's threads, as /proc/self/status counts them."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("Threads:"):
            return int(line.split()[1])
    return 0


async def aio_crowd(kind: str, n: int, rate: float, seconds: float) -> dict[str, float]:
    """`n` clients in one process, each consumed by a task in `async for` (`kind` "async"), by
    a thread blocked in `for msg in client` ("threads"), or by nobody until the end ("unread":
    their own threads' share), while the server broadcasts `rate` times a second for `seconds`,
    each broadcast to all of them, and a ticker in the event loop sleeps 10 ms at a time: how
    late it wakes, when the last client had each broadcast, the process's CPU per delivery, its
    threads with the clients started and idle, and during the run."""
    import resource

    from udpchat import ChatClientUdp

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    server = AioServer()
    clients = [ChatClientUdp(*server.address, interval=60) for _ in range(n)]
    counts = [0] * n
    consumers: list[asyncio.Future[None]] = []
    threads: list[threading.Thread] = []
    try:
        for i, client in enumerate(clients):
            client.start()
            if i % 50 == 49:
                time.sleep(0.002)  # their `reg`s, 50 at a time
        assert server.ask(f"clients {n}") == str(n), "not every client registered"
        await asyncio.sleep(0.2)
        idle = threads_now()

        # (sequence number, when a consumer had it) for every delivery: when the last of the
        # clients had each broadcast
        arrivals: list[tuple[bytes, int]] = []

        async def consume_async(i: int, client: ChatClientUdp) -> None:
            async for msg in client:
                arrivals.append((msg.payload[:29], time.monotonic_ns()))
                counts[i] += 1

        def consume_blocking(i: int, client: ChatClientUdp) -> None:
            for msg in client:
                arrivals.append((msg.payload[:29], time.monotonic_ns()))
                counts[i] += 1

        for i, client in enumerate(clients):
            if kind == "async":
                consumers.append(asyncio.ensure_future(consume_async(i, client)))
            elif kind == "threads":
                threads.append(threading.Thread(target=consume_blocking, args=(i, client)))
                threads[-1].start()
        await asyncio.sleep(0.2)  # every consumer waiting
        running = threads_now()
        lateness: list[float] = []
        ticking = True

        async def ticker() -> None:
            nonlocal running
            while ticking:
                t = time.perf_counter()
                await asyncio.sleep(0.01)
                lateness.append(time.perf_counter() - t - 0.01)
                if len(lateness) % 50 == 0:
                    running = max(running, threads_now())

        tick = asyncio.ensure_future(ticker())
        cpu = time.process_time()
        broadcasts = int(await server.aask(f"paced {round(rate * seconds)} {1 / rate}"))
        await asyncio.sleep(0.2)  # the last broadcast lands
        running = max(running, threads_now())
        ticking = False
        await tick
        cpu = time.process_time() - cpu
        if kind == "unread":
            counts = [len(client.recv_many(10 * broadcasts, 0)) for client in clients]
        delivered = sum(counts)
        lateness.sort()
        last: dict[bytes, int] = {}
        for stamp, t in arrivals:
            last[stamp] = max(last.get(stamp, 0), t)
        spans = sorted((t - int(stamp[9:29])) / 1e6 for stamp, t in last.items()) or [0.0]
        return {
            "last_p50_ms": spans[len(spans) // 2],
            "last_max_ms": spans[-1],
            "cpu_us": cpu / max(delivered, 1) * 1e6,
            "late_p99_ms": lateness[min(len(lateness) - 1, len(lateness) * 99 // 100)] * 1e3,
            "late_max_ms": lateness[-1] * 1e3,
            "ticks": len(lateness),
            "threads_idle": idle,
            "threads_running": running,
            "delivered": delivered,
            "expected": broadcasts * n,
        }
    finally:
        for client in clients:
            client.stop()  # every iteration ends
        if consumers:
            await asyncio.wait(consumers, timeout=10)
        for thread in threads:
            thread.join(10)
        server.close()


def aio_measure(test: str, kind: str, loop: str, *params: float) -> dict[str, float]:
    """One measurement of the asyncio step, in a process of its own (`run.py aio ...`)."""
    out = subprocess.run(
        [sys.executable, __file__, "aio", test, kind, loop, *map(str, params)],
        stdout=subprocess.PIPE,
        text=True,
        timeout=180,
        check=True,
    )
    result: dict[str, float] = json.loads(out.stdout.splitlines()[-1])
    return result


def aio_main(test: str, kind: str, loop: str, params: list[float]) -> None:
    """(internal) Runs one measurement of the asyncio step in this process, prints its JSON."""
    signal.alarm(int(LIFETIME))
    # glibc raises its mmap threshold once a block above it is freed, as in any process that
    # has freed a large one. Until then, asyncio's selector loop, which receives each datagram
    # into a new 256 KiB bytes, maps and unmaps memory for every datagram (about 10 µs more).
    warm = bytes(300_000)
    del warm
    result: dict[str, float]
    if test == "waiting":
        variant, burst, rounds = params
        coroutine = aio_waiting(kind, variant == 1, int(burst), int(rounds))
        result = run_on(loop, coroutine)
    elif test == "flood":
        result = run_on(loop, aio_flood(kind, params[0]))
    elif test == "latency" and kind == "thread":
        result = aio_latency_thread(int(params[0]), params[1])
    elif test == "latency":
        result = run_on(loop, aio_latency(kind, int(params[0]), params[1]))
    elif test == "crowd":
        count, rate, seconds = params
        result = run_on(loop, aio_crowd(kind, int(count), rate, seconds))
    else:
        raise SystemExit(f"unknown asyncio test {test}")
    print(json.dumps(result), flush=True)


AIO_NAMES = {
    "protocol": "DatagramProtocol + asyncio.Queue (baseline)",
    "aiter": "async for msg in client",
    "many": "await client.arecv_many(1024)",
}


def aio_step(quick: bool, runs: int) -> None:
    """The asyncio methods against what a program writes without udpchat (a DatagramProtocol
    that puts each datagram into an asyncio.Queue), on asyncio's own loop and on uvloop, every
    measurement in a process of its own, the cases interleaved, the median of `runs` each."""
    kinds = list(AIO_NAMES)
    loops = [loop for loop in LOOPS if loop != "uvloop" or importlib.util.find_spec("uvloop")]
    if loops != list(LOOPS):
        print("\n(asyncio: uvloop is not installed; asyncio's own loop only)")
    # Messages waiting: as many as the baseline's socket holds (a quarter to spare), 4,000 at most.
    datagram = len(b"ack: 127.0.0.1 65535\n") + AIO_PAYLOAD + 1
    fits, granted = room(AIO_RCVBUF, datagram)
    burst, rounds = min(4000, fits * 3 // 4), 3 if quick else 10
    cases = [f"{loop} {v} {k}" for loop in loops for v in ("blocked", "idle") for k in kinds]

    def waiting(case: str) -> dict[str, float]:
        loop, variant, kind = case.split()
        return aio_measure("waiting", kind, loop, int(variant == "blocked"), burst, rounds)

    results = interleaved(cases, runs, waiting)
    rows = []
    for loop in loops:
        got = {c: medians(results[c]) for c in cases if c.startswith(loop)}
        for kind in kinds:
            blocked, idle = got[f"{loop} blocked {kind}"], got[f"{loop} idle {kind}"]
            base_b, base_i = got[f"{loop} blocked protocol"], got[f"{loop} idle protocol"]
            taken = sum(
                r["taken"] for v in ("blocked", "idle") for r in results[f"{loop} {v} {kind}"]
            )
            sent = sum(
                r["sent"] for v in ("blocked", "idle") for r in results[f"{loop} {v} {kind}"]
            )
            rows.append(
                [
                    loop,
                    AIO_NAMES[kind],
                    f"{blocked['rate']:,.0f}",
                    ratio(blocked["rate"], base_b["rate"]),
                    spread(
                        results[f"{loop} blocked {kind}"],
                        results[f"{loop} blocked protocol"],
                        "rate",
                    ),
                    f"{idle['rate']:,.0f}",
                    ratio(idle["rate"], base_i["rate"]),
                    f"{blocked['cpu_us']:.2f} / {idle['cpu_us']:.2f}",
                    f"{taken:.0f}/{sent:.0f}",
                ]
            )
    table(
        f"asyncio ingest, messages waiting: messages/s a coroutine drains ({burst:,} broadcasts a "
        f"round, {rounds} rounds, 64 B; the baseline's socket asked for {AIO_RCVBUF:,} bytes, "
        f"granted {granted:,}, room for {fits:,} of these datagrams)",
        [
            "loop",
            "consumer",
            "loop blocked while they came",
            "vs baseline",
            "per run",
            "loop idle while they came",
            "vs baseline",
            "CPU µs/msg, whole process (blocked / idle)",
            "taken",
        ],
        rows,
    )

    seconds = 1.0 if quick else 1.5
    cases = [f"{loop} {kind}" for loop in loops for kind in kinds]

    def flood(case: str) -> dict[str, float]:
        loop, kind = case.split()
        return aio_measure("flood", kind, loop, seconds)

    results = interleaved(cases, runs, flood)
    rows = []
    for case in cases:
        loop, kind = case.split()
        r, base = medians(results[case]), medians(results[f"{loop} protocol"])
        total = {k: sum(x[k] for x in results[case]) for k in ("received", "sent", "queue_drops")}
        kernel = sum(x["kernel_drops"] for x in results[case])
        rows.append(
            [
                loop,
                AIO_NAMES[kind],
                f"{r['rate']:,.0f}",
                ratio(r["rate"], base["rate"]),
                spread(results[case], results[f"{loop} protocol"], "rate"),
                f"{total['received'] / total['sent']:.3f}",
                f"{total['queue_drops']:,.0f} / {kernel:,.0f}",
                f"{r['sent_per_s']:,.0f}",
                f"{r['cpu_us']:.2f}",
            ]
        )
    table(
        f"asyncio ingest, live flood: messages/s a coroutine consumes while the Rust load "
        f"generator floods the server ({seconds} s from the first message, 64 B)",
        [
            "loop",
            "consumer",
            "consumed/s",
            "vs baseline",
            "per run",
            "received/sent",
            "dropped: queue / kernel",
            "server relayed/s",
            "CPU µs/msg, whole process",
        ],
        rows,
    )

    count, gap = (500 if quick else 2000), 0.001
    cases = ["asyncio arecv", "uvloop arecv", "- thread", "asyncio protocol", "uvloop protocol"]
    cases = [c for c in cases if c.split()[0] in ("-", *loops)]

    def wake(case: str) -> dict[str, float]:
        loop, kind = case.split()
        return aio_measure("latency", kind, loop, count, gap)

    results = interleaved(cases, runs, wake)
    names = {
        "arecv": "await client.arecv()",
        "thread": "client.recv() in a thread",
        "protocol": "DatagramProtocol + asyncio.Queue",
    }
    blocking = medians(results["- thread"])
    rows = []
    for case in cases:
        loop, kind = case.split()
        r = medians(results[case])
        received = sum(x["received"] for x in results[case])
        sent = sum(x["sent"] for x in results[case])
        rows.append(
            [
                loop if loop != "-" else "(none)",
                names[kind],
                f"{r['p50_us']:.0f}",
                f"{r['p99_us']:.0f}",
                f"{r['max_us']:.0f}",
                f"{r['p50_us'] - blocking['p50_us']:+.0f}",
                f"{received:.0f}/{sent:.0f}",
            ]
        )
    table(
        f"asyncio wake latency: broadcast() in the server's process to the consumer's return "
        f"(µs, one way, CLOCK_MONOTONIC; {count:,} broadcasts {gap * 1e3:g} ms apart, 64 B)",
        ["loop", "consumer", "p50", "p99", "max", "p50 vs recv()", "received"],
        rows,
    )

    n, rate, period = 1000, 20.0, 1.0 if quick else 3.0
    cases = ["asyncio async", "uvloop async", "asyncio threads", "asyncio unread"]
    cases = [c for c in cases if c.split()[0] in loops]

    def crowd(case: str) -> dict[str, float]:
        loop, kind = case.split()
        return aio_measure("crowd", kind, loop, n, rate, period)

    results = interleaved(cases, runs, crowd)
    consumers = {
        "async": "a task each in `async for`",
        "threads": "a thread each in recv()",
        "unread": "none (read after the run)",
    }
    rows = []
    for case in cases:
        loop, kind = case.split()
        r = medians(results[case])
        delivered = sum(x["delivered"] for x in results[case])
        expected = sum(x["expected"] for x in results[case])
        idle_threads = sorted({int(x["threads_idle"]) for x in results[case]})
        running_threads = sorted({int(x["threads_running"]) for x in results[case]})
        rows.append(
            [
                loop,
                consumers[kind],
                f"{r['late_p99_ms']:.2f}",
                f"{r['late_max_ms']:.2f}",
                f"{r['last_p50_ms']:.1f}" if kind != "unread" else "-",
                f"{r['last_max_ms']:.1f}" if kind != "unread" else "-",
                f"{r['cpu_us']:.1f}",
                " ".join(map(str, idle_threads)),
                " ".join(map(str, running_threads)),
                f"{delivered:,.0f}/{expected:,.0f}",
            ]
        )
    table(
        f"asyncio, {n:,} clients in one process: {rate:g} broadcasts/s for {period:g} s, each "
        f"to all; a 10 ms asyncio.sleep ticker in the loop",
        [
            "loop",
            "consumers",
            "ticker late p99 (ms)",
            "ticker late worst (ms)",
            "last client served p50 (ms)",
            "worst",
            "CPU µs/delivery",
            "threads, clients idle",
            "threads, consuming",
            "delivered",
        ],
        rows,
    )


# --- cluster: servers joined through Redis pub/sub (issue 12) ---------------------------------

# The channel of every cluster here (each measurement has a Redis of its own): the default.
CHANNEL = "udpchat"
# Bytes the core's envelope adds to a message from an IPv4 client (version, server id, family,
# address, port): what Redis carries for a 64-byte message is 80 bytes.
ENVELOPE = 16
# The clients on server B in the cross-server rate: where the relay hop is the limit (1, 10)
# and where B's fan-out is (100).
CROSS_CLIENTS = (1, 10, 100)
# Messages a second in the cross-server latency, from 10 of 100 clients on A, to 100 clients
# on A and 100 on B: 100,000 deliveries a second in all, the latency step's load.
CROSS_RATE = 500
# redis-benchmark's connections and pipelining: one connection, as a server publishes on, and
# redis-benchmark's default 50; one command at a time, 32, and 256 (the most the core's
# publisher sends in one pipeline: whatever is queued when it writes, up to 256). Subscribers:
# as many servers on the channel.
REDIS_BENCH = [
    (c, p, k) for c, p in ((1, 1), (1, 32), (1, 256), (50, 1), (50, 32)) for k in (0, 1, 4)
] + [(50, 32, 16)]
# Publications per redis-benchmark run, by pipelining: about a second's worth each.
REDIS_BENCH_REQUESTS = {1: 50_000, 32: 1_000_000, 256: 1_500_000}


def die_with_parent() -> None:
    """(In a child, between fork and exec.) SIGKILL it when this script ends, however it ends:
    redis-server has no lifetime of its own."""
    import ctypes

    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def redis_call(port: int, *args: str | bytes) -> object:
    """One command to the Redis on 127.0.0.1:`port`, on a connection of its own; its answer
    (RESP2 as str, int, bytes, list or None). An error answer raises RuntimeError."""
    parts = [a.encode() if isinstance(a, str) else a for a in args]
    command = b"*%d\r\n" % len(parts) + b"".join(b"$%d\r\n%s\r\n" % (len(a), a) for a in parts)
    with socket.create_connection(("127.0.0.1", port), timeout=2) as sock:
        sock.sendall(command)
        reader = sock.makefile("rb")

        def reply() -> object:
            line = reader.readline()
            kind, rest = line[:1], line[1:].rstrip(b"\r\n")
            if kind == b"+":
                return rest.decode()
            if kind == b"-":
                raise RuntimeError(rest.decode())
            if kind == b":":
                return int(rest)
            if kind == b"$":
                return None if int(rest) < 0 else reader.read(int(rest) + 2)[:-2]
            if kind == b"*":
                return None if int(rest) < 0 else [reply() for _ in range(int(rest))]
            raise RuntimeError(f"unexpected answer from Redis: {line!r}")

        return reply()


class Redis:
    """A redis-server of this step: its port, pid and URL."""

    def __init__(self, port: int, pid: int) -> None:
        self.port, self.pid = port, pid
        self.url = f"redis://127.0.0.1:{port}"

    def publications(self) -> int:
        """PUBLISH commands it has run (INFO commandstats)."""
        info = redis_call(self.port, "INFO", "commandstats")
        assert isinstance(info, bytes)
        for line in info.decode().splitlines():
            if line.startswith("cmdstat_publish:"):
                return int(line.split("calls=")[1].split(",")[0])
        return 0

    def subscribers(self, channel: str = CHANNEL) -> int:
        answer = redis_call(self.port, "PUBSUB", "NUMSUB", channel)
        assert isinstance(answer, list)
        return int(answer[1])

    def wait_subscribers(self, count: int, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while self.subscribers() < count:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.subscribers()} of {count} servers subscribed")
            time.sleep(0.01)


@contextmanager
def redis_server() -> Iterator[Redis]:
    """A fresh redis-server on a free loopback port, no persistence, in a temporary directory;
    stopped by its pid at the end of the block, killed if this script ends first."""
    exe = shutil.which("redis-server")
    if exe is None:
        raise RuntimeError("no redis-server (Debian: apt-get install redis-server)")
    with tempfile.TemporaryDirectory(prefix="udpchat-bench-redis-") as tmp:
        for _ in range(5):  # another program may take the free port first
            with socket.socket() as probe:
                probe.bind(("127.0.0.1", 0))
                port = probe.getsockname()[1]
            proc = subprocess.Popen(
                [
                    *(exe, "--port", str(port), "--bind", "127.0.0.1"),
                    *("--save", "", "--appendonly", "no", "--dir", tmp),
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                preexec_fn=die_with_parent,
            )
            deadline, up = time.monotonic() + 5, False
            while not up and proc.poll() is None and time.monotonic() < deadline:
                with contextlib.suppress(OSError, RuntimeError):
                    up = redis_call(port, "PING") == "PONG"
                time.sleep(0 if up else 0.01)
            if up:
                break
            proc.kill()
            proc.wait(10)
        else:
            raise RuntimeError("redis-server did not start")
        try:
            yield Redis(port, proc.pid)
        finally:
            proc.terminate()  # SIGTERM: it shuts down, with nothing to save
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)


def machine_busy() -> float:
    """CPU seconds the whole machine has been busy (every core, every process: /proc/stat)."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]]
    return (sum(fields) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")


def children_cpu() -> float:
    """User and system CPU time of the children this process has waited for."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def thread_cpu(pid: int) -> dict[str, float]:
    """CPU seconds each live thread of a process has run, by name, to the nanosecond
    (/proc/PID/task/TID/schedstat; /proc's user and system times count 10 ms ticks). The
    kernel keeps 15 bytes of a name: the core's `udpchat-cluster-pub` and `-sub` both read
    `udpchat-cluster`, so they are told apart by the order they were started in (publisher
    first: `Server::start_cluster`)."""
    threads = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError):  # a thread that ended meanwhile
            name = (task / "comm").read_text().strip()
            ran = int((task / "schedstat").read_text().split()[0]) / 1e9
            threads.append((int(task.name), name, ran))
    out: dict[str, float] = {}
    cluster = iter(["cluster-pub", "cluster-sub"])
    for _, name, ran in sorted(threads):
        if name == "udpchat-cluster":
            name = next(cluster, name)
        out[name] = out.get(name, 0.0) + ran
    return out


def cpu_seconds(pid: int) -> float:
    """CPU seconds a process's live threads have run (see `thread_cpu`)."""
    return sum(thread_cpu(pid).values())


def per_thread(before: dict[str, float], after: dict[str, float], n: float) -> dict[str, float]:
    """µs of CPU each thread ran between two `thread_cpu`s, per one of `n` things."""
    return {k: (v - before.get(k, 0.0)) / max(n, 1) * 1e6 for k, v in after.items()}


class PythonRelay:
    """The pure-Python baseline of the cross-server figures: what a user of udpchat 0.1 writes
    to join servers through Redis with redis-py, on udpchat's public API only, in each server's
    own process. 0.1's server has no hook for the messages it relays, so the process listens to
    its own server as one more client (a bridge) and publishes each message it hears, once; and
    a thread subscribed to the channel hands each other server's message to `broadcast()`.
    Its own broadcasts come back to the bridge too: they have the server itself as sender and
    are not published again; its own publications come back from Redis: they carry this
    process's id and are not broadcast again. The origin is lost on the way: B's clients see B
    as the sender (the core keeps it). One `publish()` a message, one round trip to Redis each,
    as redis-py's documentation shows it; or, `batched`, what the bridge has queued taken at once
    (`recv_many`, also in 0.1) and published in one pipeline, as a user who measured would.
    redis-py's subscriber hands out one message at a time, and 0.1 broadcasts one at a time."""

    def __init__(
        self, server: ChatServerUdp, url: str, channel: str = CHANNEL, batched: bool = False
    ) -> None:
        import redis
        from udpchat import ChatClientUdp

        assert server.address is not None
        self.server, self.channel = server, channel
        self.me = server.address  # the sender its clients see on its own broadcasts
        self.id = os.urandom(8)
        self.redis = redis.Redis.from_url(url)
        self.pubsub = self.redis.pubsub(ignore_subscribe_messages=True)
        self.pubsub.subscribe(channel)
        self.bridge = ChatClientUdp(*self.me)
        self.bridge.start()
        self.published = self.received = 0
        for target in (self.forward_batches if batched else self.forward, self.deliver):
            threading.Thread(target=target, daemon=True).start()

    def forward(self) -> None:
        """Every message this server relays, published once."""
        for msg in self.bridge:
            if msg.sender != self.me:
                self.redis.publish(self.channel, self.id + msg.payload)
                self.published += 1

    def forward_batches(self) -> None:
        """The same, a pipeline of what has come at a time (until the bridge stops)."""
        while self.bridge.running:
            pipe = self.redis.pipeline(transaction=False)
            for msg in self.bridge.recv_many(256, 1.0):
                if msg.sender != self.me:
                    pipe.publish(self.channel, self.id + msg.payload)
            if len(pipe):
                self.published += len(pipe)
                pipe.execute()

    def deliver(self) -> None:
        """Every other server's message, to this server's clients."""
        with contextlib.suppress(Exception):  # ends when stop() closes the connection
            for message in self.pubsub.listen():
                data = message["data"]
                if data[:8] != self.id:
                    self.server.broadcast(data[8:])
                    self.received += 1

    def stats(self) -> dict[str, int]:
        return {
            "relay_published": self.published,
            "relay_received": self.received,
            "relay_bridge_dropped": self.bridge.dropped,
        }

    def stop(self) -> None:
        self.bridge.stop()
        with contextlib.suppress(Exception):
            self.pubsub.close()


def node_main(kind: str, url: str | None) -> None:
    """(internal) One server of the cluster step in this process: `standalone` (ChatServerUdp),
    `cluster` (with cluster=URL; its address printed only once cluster_connected is True) or
    `relay` or `relay-batched` (standalone, with a PythonRelay beside it). Prints its address,
    then answers
    `stats` on stdin with a line of JSON; ends at the end of its input or after LIFETIME."""
    from udpchat import ChatServerUdp

    signal.alarm(int(LIFETIME))
    if kind == "cluster":
        server = ChatServerUdp("127.0.0.1", 0, cluster=url)  # type: ignore[call-arg,unused-ignore]
    else:
        server = ChatServerUdp("127.0.0.1", 0)
    server.start()
    assert server.address is not None
    relay = None
    if kind.startswith("relay"):
        relay = PythonRelay(server, str(url), batched=kind == "relay-batched")
    deadline = time.monotonic() + 10
    while kind == "cluster" and not server.stats().get("cluster_connected"):
        if time.monotonic() > deadline:
            raise SystemExit("node: not connected to Redis within 10 s")
        time.sleep(0.005)
    print("{}:{}".format(*server.address), flush=True)
    for line in sys.stdin:
        if line.strip() != "stats":
            raise SystemExit(f"node: unknown command {line!r}")
        stats = dict(server.stats())
        if relay is not None:
            stats.update(relay.stats())
        print(json.dumps(stats), flush=True)
    if relay is not None:
        relay.stop()
    server.stop()


class Node:
    """`node KIND [URL]` in a child process: its address, pid and `stats()`."""

    def __init__(self, kind: str, url: str | None = None) -> None:
        cmd = [sys.executable, __file__, "node", kind, *([url] if url else [])]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.stdin, self.stdout = self.proc.stdin, self.proc.stdout
        self.address = self.stdout.readline().strip()
        if not self.address:
            self.close()
            raise RuntimeError(f"{kind} node did not start")

    def stats(self) -> dict[str, float]:
        self.stdin.write("stats\n")
        self.stdin.flush()
        result: dict[str, float] = json.loads(self.stdout.readline())
        return result

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.stdin.close()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)


@contextmanager
def cluster_of(kind: str, count: int) -> Iterator[tuple[list[Node], Redis | None]]:
    """`count` servers of `kind` (standalone ones share no Redis; the others a fresh one, every
    server subscribed before the block starts), and their Redis."""
    with contextlib.ExitStack() as stack:
        redis = None if kind == "standalone" else stack.enter_context(redis_server())
        nodes: list[Node] = []
        stack.callback(lambda: [node.close() for node in nodes])
        for _ in range(count):
            nodes.append(Node(kind, redis.url if redis else None))
        if redis is not None:
            redis.wait_subscribers(count)
        yield nodes, redis


def has_cluster() -> bool:
    """Whether the installed udpchat has the cluster option."""
    from udpchat import ChatServerUdp

    try:
        ChatServerUdp("127.0.0.1", 0, cluster="redis://127.0.0.1:1")  # type: ignore[call-arg,unused-ignore]
    except TypeError:
        return False
    return True


def cluster_fanout(seconds: float, runs: int) -> float:
    """The cost of being in a cluster: the fan-out step's load (100 clients, 4 senders, 64 B)
    on a standalone server, on the same server with cluster= on a live Redis (alone on the
    channel: Redis sends each publication back to it alone, and it drops its own), and with a
    second server on the channel (no clients), whose work shares the 2 cores."""
    kinds = ["standalone", "cluster", "cluster+peer"]

    threads: dict[str, list[dict[str, float]]] = {kind: [] for kind in kinds}

    def measure(kind: str) -> dict[str, float]:
        with cluster_of(kind.split("+")[0], 2 if "peer" in kind else 1) as (nodes, redis):
            published0 = redis.publications() if redis else 0
            relayed0 = nodes[0].stats()["broadcasts"]
            cpu0 = thread_cpu(nodes[0].proc.pid)
            redis0 = cpu_seconds(redis.pid) if redis else 0.0
            peer0 = cpu_seconds(nodes[1].proc.pid) if len(nodes) > 1 else 0.0
            result = loadgen("throughput", nodes[0].address, 100, 4, 64, seconds)
            stats = nodes[0].stats()
            result["relayed"] = relayed = stats["broadcasts"] - relayed0
            # Per message relayed: each thread of the server, and Redis and the peer.
            cpu = per_thread(cpu0, thread_cpu(nodes[0].proc.pid), relayed)
            if redis:
                cpu["Redis"] = (cpu_seconds(redis.pid) - redis0) / max(relayed, 1) * 1e6
            if len(nodes) > 1:
                cpu["peer"] = (cpu_seconds(nodes[1].proc.pid) - peer0) / max(relayed, 1) * 1e6
            threads[kind].append(cpu)
            result["cpu_us"] = sum(v for k, v in cpu.items() if k not in ("Redis", "peer"))
            result["published"] = redis.publications() - published0 if redis else 0
            result["dropped"] = stats.get("cluster_dropped", 0)
            return result

    key = "deliveries_per_s"
    results = interleaved(kinds, runs, measure)
    got = {kind: median_by(results[kind], key) for kind in kinds}
    fanout = got["standalone"][key]
    total = {k: sum(r[k] for r in results["cluster"]) for k in ("relayed", "published", "dropped")}
    table(
        "Cluster: fan-out with cluster= on, deliveries/s, 100 clients, 4 senders, 64 B",
        [
            "load",
            *kinds,
            "cluster/standalone",
            "per round",
            "+peer/standalone",
            "per round",
            "cluster: published/relayed (dropped)",
        ],
        [
            [
                "100 clients, 64 B",
                *(f"{got[k][key]:,.0f}" for k in kinds),
                ratio(got["cluster"][key], got["standalone"][key]),
                spread(results["cluster"], results["standalone"], key),
                ratio(got["cluster+peer"][key], got["standalone"][key]),
                spread(results["cluster+peer"], results["standalone"], key),
                f"{total['published']:,.0f}/{total['relayed']:,.0f} ({total['dropped']:,.0f})",
            ]
        ],
    )
    names = ["udpchat-srv-rx", "udpchat-srv-tx", "cluster-pub", "cluster-sub"]
    rows = []
    for kind in kinds:
        cpu = {k: statistics.median(r.get(k, 0.0) for r in threads[kind]) for k in threads[kind][0]}
        server = sum(v for k, v in cpu.items() if k not in ("Redis", "peer"))
        rest = server - sum(cpu.get(n, 0.0) for n in names)
        rows.append(
            [
                kind,
                *(f"{cpu[n]:.2f}" if n in cpu else "-" for n in names),
                f"{rest:.2f}",
                f"{server:.1f}",
                f"{cpu['Redis']:.2f}" if "Redis" in cpu else "-",
                f"{cpu['peer']:.2f}" if "peer" in cpu else "-",
                " ".join(f"{r['cpu_us']:.1f}" for r in results[kind]),
            ]
        )
    table(
        "Cluster: the fan-out's CPU, µs per message relayed (each thread's run time, medians; "
        "a message is 100 deliveries)",
        [
            "server",
            "receiver (srv-rx)",
            "fan-out (srv-tx)",
            "cluster publisher",
            "cluster subscriber",
            "other threads",
            "server in all",
            "Redis",
            "peer server",
            "server in all, per run",
        ],
        rows,
    )
    return fanout


def cluster_cross(seconds: float, runs: int, kinds: list[str]) -> None:
    """The cross-server rate: 4 clients of server A send, every delivery to the clients of
    server B is counted (the load generator's `cross`), for 1, 10 and 100 clients on B. "same
    server": the same load generator with A and B one standalone server (the fan-out is to the
    4 senders and B's clients alike), what one server does without the hop. CPU: each process's
    over the run (`thread_cpu`; the load generator's user + system), per message that reached
    B."""

    rows, cpu_rows = [], []
    CPU_OF = ["A", "B", "Redis", "loadgen"]
    threads: dict[tuple[int, str], list[dict[str, float]]] = {
        (nb, kind): [] for nb in CROSS_CLIENTS for kind in ["same server", *kinds]
    }
    relays = [k for k in kinds if k.startswith("relay") and "cluster" in kinds]
    for nb in CROSS_CLIENTS:

        def measure(kind: str, nb: int = nb) -> dict[str, float]:
            count = 1 if kind == "same server" else 2
            with cluster_of("standalone" if count == 1 else kind, count) as (nodes, redis):
                a, b = nodes[0], nodes[-1]
                pids = {"A": a.proc.pid, "B": b.proc.pid} if count == 2 else {"A": a.proc.pid}
                if redis is not None:
                    pids["Redis"] = redis.pid
                cpu0 = {name: cpu_seconds(pid) for name, pid in pids.items()}
                threads0 = [thread_cpu(node.proc.pid) for node in nodes]
                published0 = redis.publications() if redis else 0
                children0, busy0, t0 = children_cpu(), machine_busy(), time.monotonic()
                result = loadgen("cross", a.address, b.address, nb, 4, 64, seconds)
                wall, busy = time.monotonic() - t0, machine_busy() - busy0
                time.sleep(0.2)  # what was in flight when the load generator ended
                cpu = {name: cpu_seconds(pid) - cpu0[name] for name, pid in pids.items()}
                cpu["loadgen"] = children_cpu() - children0
                result["cores"] = sum(cpu.values()) / wall
                result["others"] = max(0.0, busy / wall - result["cores"])
                result["published"] = redis.publications() - published0 if redis else 0
                arrived = max(result["delivered_total"] / nb, 1)
                for name, used in cpu.items():
                    result[f"cpu_{name}"] = used / arrived * 1e6
                threads[(nb, kind)].append(
                    {
                        f"{side} {thread}": us
                        for side, node, before in zip("AB", nodes, threads0, strict=False)
                        for thread, us in per_thread(
                            before, thread_cpu(node.proc.pid), arrived
                        ).items()
                    }
                )
                sa, sb = a.stats(), b.stats()
                result["dropped"] = sa.get("cluster_dropped", 0) + sa.get("relay_bridge_dropped", 0)
                result["received"] = sb.get("cluster_received", sb.get("relay_received", 0))
                return result

        cases = ["same server", *kinds]
        key = "messages_per_s"
        results = interleaved(cases, runs, measure)
        got = {kind: median_by(results[kind], key) for kind in cases}
        row = [f"{nb} on B", *(f"{got[k][key]:,.0f}" for k in cases)]
        for relay in relays:
            row += [
                ratio(got["cluster"][key], got[relay][key]),
                spread(results["cluster"], results[relay], key),
            ]
        if "cluster" in kinds:
            row.append(ratio(got["cluster"][key], got["same server"][key]))
        for kind in kinds:
            sent = sum(r["sent_total"] for r in results[kind])
            published = sum(r["published"] for r in results[kind])
            dropped = sum(r["dropped"] for r in results[kind])
            ratio_ = statistics.median(r["delivery_ratio"] for r in results[kind])
            row.append(f"{ratio_:.3f}; {published / max(sent, 1):.3f} ({dropped:,.0f})")
        rows.append(row)
        for kind in cases:
            r = medians(results[kind])
            cpu_rows.append(
                [
                    f"{nb} on B",
                    kind,
                    *(f"{r[f'cpu_{n}']:.1f}" if f"cpu_{n}" in r else "-" for n in CPU_OF),
                    f"{sum(r.get(f'cpu_{n}', 0) for n in CPU_OF):.1f}",
                    f"{r['cores']:.2f}",
                    f"{r['others']:.2f}",
                ]
            )
    header = ["clients on B", "same server", *kinds]
    for relay in relays:
        header += [f"cluster/{relay}", "per round"]
    if "cluster" in kinds:
        header.append("cluster/same server")
    header += [f"{k}: delivered; published/sent (dropped)" for k in kinds]
    table(
        "Cluster: cross-server rate, messages/s from 4 clients of A delivered to every client "
        "of B (64 B)",
        header,
        rows,
    )
    if "cluster" in kinds:
        names = [
            "A udpchat-srv-rx",
            "A udpchat-srv-tx",
            "A cluster-pub",
            "A cluster-sub",
            "B cluster-sub",
            "B udpchat-srv-tx",
            "B udpchat-srv-rx",
        ]
        thread_rows = []
        for nb in CROSS_CLIENTS:
            runs_ = threads[(nb, "cluster")]
            thread_rows.append(
                [
                    f"{nb} on B",
                    *(f"{statistics.median(r.get(n, 0.0) for r in runs_):.2f}" for n in names),
                ]
            )
        table(
            "Cluster: the cross-server path's threads, µs of CPU per message that crossed "
            "(run time, medians)",
            ["clients on B", *names],
            thread_rows,
        )
    table(
        "Cluster: CPU per message that crossed (µs: the run time of all the threads of A, B and "
        "Redis, the load generator's user + system; cores busy: all four's CPU over the load "
        "generator's run, registration and warm-up included; others': the rest of the machine's, "
        "other engineers' work)",
        ["clients on B", "server", *CPU_OF, "in all", "cores busy", "others' cores"],
        cpu_rows,
    )


def redis_bench_one(clients: int, pipeline: int, subscribers: int) -> dict[str, float]:
    """redis-benchmark publishing 80-byte messages (a 64-byte message's envelope) to the
    channel, with `subscribers` connections subscribed to it that read everything (loadgen
    `redis-sub`): publications/s, and the share of the deliveries owed that were read."""
    requests = REDIS_BENCH_REQUESTS[pipeline] * (2 if clients > 1 else 1)
    requests //= 1 + subscribers // 4
    data = "x" * (64 + ENVELOPE)
    with redis_server() as redis, contextlib.ExitStack() as stack:
        sub: subprocess.Popen[str] | None = None
        if subscribers:
            sub = subprocess.Popen(
                [
                    *(str(EXAMPLES / "loadgen"), "redis-sub", f"127.0.0.1:{redis.port}"),
                    *(CHANNEL, str(subscribers), str(len(data)), "60"),
                ],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
            )
            stack.callback(lambda: (sub.kill(), sub.wait(10)))
            assert sub.stdout is not None and sub.stdin is not None
            if sub.stdout.readline().strip() != "subscribed":
                raise RuntimeError("redis-sub did not subscribe")
        cpu0 = cpu_seconds(redis.pid)
        out = subprocess.run(
            [
                *("redis-benchmark", "-p", str(redis.port), "-c", str(clients)),
                *("-P", str(pipeline), "-n", str(requests), "--csv", "PUBLISH", CHANNEL, data),
            ],
            capture_output=True,
            text=True,
            timeout=120,
            check=True,
        )
        rps = float(out.stdout.strip().splitlines()[-1].split(",")[1].strip('"'))
        read = 1.0
        if sub is not None:
            time.sleep(0.2)  # what Redis still has to write
            stdout, _ = sub.communicate(timeout=10)
            read = json.loads(stdout.splitlines()[-1])["messages"] / (requests * subscribers)
        cpu = (cpu_seconds(redis.pid) - cpu0) / requests * 1e6
        return {"rate": rps, "read": read, "cpu_us": cpu}


def redis_bench(runs: int) -> dict[tuple[int, int, int], dict[str, float]]:
    """Redis's own ceiling on this machine: redis-benchmark's PUBLISH by connections,
    pipelining and subscribers, interleaved; returns the medians (rate, Redis's CPU µs a
    publication)."""
    names = [f"{c} {p} {k}" for c, p, k in REDIS_BENCH]
    results = interleaved(names, runs, lambda n: redis_bench_one(*map(int, n.split())))
    got = {}
    rows = []
    for (c, p, k), name in zip(REDIS_BENCH, names, strict=True):
        got[(c, p, k)] = r = medians(results[name])
        rates = " ".join(f"{r['rate']:,.0f}" for r in results[name])
        read = min(r["read"] for r in results[name])
        rows.append(
            [
                *(str(c), str(p), str(k), f"{r['rate']:,.0f}", f"{r['rate'] * k:,.0f}", rates),
                f"{r['cpu_us']:.2f}",
                f"{read:.3f}",
            ]
        )
    table(
        f"Redis PUBLISH of {64 + ENVELOPE} bytes (a 64-byte message's envelope), redis-benchmark",
        [
            "connections",
            "pipeline (-P)",
            "subscribers",
            "publications/s",
            "deliveries/s",
            "per run",
            "Redis CPU µs a publication",
            "read by subscribers (worst run)",
        ],
        rows,
    )
    return got


def cluster_latency(seconds: float, runs: int, kinds: list[str]) -> None:
    """Cross-server latency: 10 of 100 clients of A send CROSS_RATE messages a second, 100
    clients on B; every copy timed with the kernel's receive timestamp (loadgen
    `cross-latency`). "same server" is every copy at A's clients, "own" a sender's own copy,
    "cross-server" every copy at B's; standalone is one server with A's 100 clients."""
    cases = ["standalone", *kinds]

    def measure(kind: str) -> dict[str, float]:
        with cluster_of(kind, 1 if kind == "standalone" else 2) as (nodes, _):
            b = nodes[1].address if len(nodes) > 1 else "-"
            nb = 100 if len(nodes) > 1 else 0
            return loadgen("cross-latency", nodes[0].address, b, 100, nb, CROSS_RATE, 64, seconds)

    results = interleaved(cases, runs, measure)
    rows = []
    for kind in cases:
        r = medians(results[kind])
        local = sum(x["local"] for x in results[kind])
        local_expected = sum(x["local_expected"] for x in results[kind])
        remote = sum(x["remote"] for x in results[kind])
        remote_expected = sum(x["remote_expected"] for x in results[kind])
        cross = kind != "standalone"
        rows.append(
            [
                kind,
                f"{r['local_p50_us']:.0f}",
                f"{r['local_p99_us']:.0f}",
                f"{r['own_p50_us']:.0f}",
                f"{r['own_p99_us']:.0f}",
                f"{r['remote_p50_us']:.0f}" if cross else "-",
                f"{r['remote_p99_us']:.0f}" if cross else "-",
                f"{r['remote_max_us']:.0f}" if cross else "-",
                " ".join(f"{x['remote_p50_us']:.0f}" for x in results[kind]) if cross else "-",
                f"{local / max(local_expected, 1):.3f}"
                + (f" / {remote / max(remote_expected, 1):.3f}" if cross else ""),
            ]
        )
    table(
        f"Cluster: latency, {CROSS_RATE} messages/s from 10 of 100 clients on A, 100 clients on "
        f"B, 64 B (µs, one way, kernel receive timestamps)",
        [
            "servers",
            "same server p50",
            "p99",
            "own copy p50",
            "p99",
            "cross-server p50",
            "p99",
            "max",
            "cross p50 per run",
            "received: A / B",
        ],
        rows,
    )


def least_squares(points: list[tuple[float, float]]) -> tuple[float, float]:
    """(intercept, slope) of the straight line nearest `points` (x, y)."""
    mean_x = statistics.mean(x for x, _ in points)
    mean_y = statistics.mean(y for _, y in points)
    slope = sum((x - mean_x) * (y - mean_y) for x, y in points) / sum(
        (x - mean_x) ** 2 for x, _ in points
    )
    return mean_y - slope * mean_x, slope


def redis_capacity(
    rates: dict[tuple[int, int, int], dict[str, float]], fanout: float | None
) -> None:
    """On paper: Redis's CPU time a publication and for each subscribed server, fitted to the
    redis-benchmark runs with 0, 1, 4 (and 16) subscribers: pipelined (50 connections, -P 32:
    Redis reads many publications a wake-up and writes each subscriber once for all of them, as
    under load) and one at a time (1 connection, -P 1: a read and a write per subscriber for
    each, as at a low rate). Redis runs commands and I/O on one thread, so one core carries at
    most 1 / that publications a second; a chat whose every message goes to every server costs
    it that for each message. With `fanout` (one server's deliveries a second, measured above):
    how many members a server can serve at each message rate, and so in all."""
    fits = {}
    for name, config in (("pipelined", (50, 32)), ("one at a time", (1, 1))):
        points = [(float(k), r["cpu_us"]) for (c, p, k), r in rates.items() if (c, p) == config]
        if len(points) >= 2:
            fits[name] = least_squares(points)
            base, slope = fits[name]
            print(
                f"\nRedis's CPU, {name} (-c {config[0]} -P {config[1]}): {base:.2f} µs a "
                f"publication + {slope:.2f} µs for each subscribed server"
            )
    if not fits:
        return
    rows = []
    for rate in (100, 1_000, 10_000, 100_000):
        servers = {name: max(0.0, (1e6 / rate - a) / b) for name, (a, b) in fits.items()}
        row = [f"{rate:,}", *(f"{n:,.0f}" for n in servers.values())]
        if fanout:
            per_server = fanout / rate
            row += [f"{per_server:,.0f}", *(f"{n * per_server:,.0f}" for n in servers.values())]
        rows.append(row)
    header = ["messages/s in the chat", *(f"servers one Redis core carries, {n}" for n in fits)]
    if fanout:
        header += [
            f"members a server serves ({fanout:,.0f} deliveries/s)",
            *(f"members in all, {n}" for n in fits),
        ]
    table("Cluster, on paper: one chat on one Redis", header, rows)


def cluster_step(seconds: float, runs: int) -> None:
    """Issue 12's figures, each beside its baselines in the same run."""
    missing = [exe for exe in ("redis-server", "redis-benchmark") if shutil.which(exe) is None]
    if missing:
        print(f"\n(cluster: skipped; no {' or '.join(missing)}: apt-get install redis-server)")
        return
    kinds = []
    if has_cluster():
        kinds.append("cluster")
    else:
        print("\n(cluster: this udpchat has no cluster option; the baselines only)")
    if importlib.util.find_spec("redis"):
        kinds += ["relay", "relay-batched"]
    else:
        print("\n(cluster: no redis-py for the Python relay: pip install --group bench)")
    rates = redis_bench(runs)
    fanout = cluster_fanout(seconds, runs) if "cluster" in kinds else None
    cluster_cross(seconds, runs, kinds)
    cluster_latency(2 * seconds, runs, [k for k in kinds if k != "relay-batched"])
    redis_capacity(rates, fanout)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command")
    s = sub.add_parser("serve", help="(internal) run one server")
    s.add_argument("kind")
    s.add_argument("--busy", action="store_true")
    s.add_argument("--fanout-threads", type=int, default=1)
    s.add_argument("--log-info", action="store_true")
    sub.add_parser("burn", help="(internal) the CPU-bound loop of the busy-host benchmark")
    c = sub.add_parser("churn", help="(internal) joins and leaves against a server")
    c.add_argument("address")
    sub.add_parser("aio-server", help="(internal) the asyncio step's server, driven on stdin")
    a = sub.add_parser("aio", help="(internal) one measurement of the asyncio step")
    a.add_argument("test")
    a.add_argument("kind")
    a.add_argument("loop")
    a.add_argument("params", type=float, nargs="*")
    n = sub.add_parser("node", help="(internal) one server of the cluster step, driven on stdin")
    n.add_argument("kind", choices=["standalone", "cluster", "relay", "relay-batched"])
    n.add_argument("url", nargs="?")
    parser.add_argument("--quick", action="store_true", help="shorter runs, one of each")
    parser.add_argument("--runs", type=int, help="interleaved runs per figure (default 3)")
    parser.add_argument(
        "--only", choices=list(STEPS), action="append", help="run only these steps (repeatable)"
    )
    parser.add_argument(
        "--before", metavar="PYTHON", help="a Python with an earlier udpchat, for `presence`"
    )
    args = parser.parse_args()
    global BEFORE
    BEFORE = args.before
    if args.command == "serve":
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        serve(args.kind, args.busy, args.fanout_threads, args.log_info)
        return
    if args.command == "churn":
        churn(args.address)
        return
    if args.command == "burn":
        busy_loop()
        return
    if args.command == "aio-server":
        aio_server()
        return
    if args.command == "aio":
        aio_main(args.test, args.kind, args.loop, args.params)
        return
    if args.command == "node":
        node_main(args.kind, args.url)
        return
    seconds = 1.0 if args.quick else 1.5
    runs = args.runs or (1 if args.quick else 3)
    build()
    started = time.monotonic()
    print(f"# udpchat benchmarks, {datetime.datetime.now():%Y-%m-%d %H:%M}")
    print(f"{platform.platform()}, {os.cpu_count()} cores, Python {platform.python_version()}")
    rmem, wmem = sysctl("net.core.rmem_max"), sysctl("net.core.wmem_max")
    print(f"sysctl net.core.rmem_max = {rmem}, net.core.wmem_max = {wmem}")
    print(f"{runs} interleaved run(s) per compared figure, medians shown")
    steps: dict[str, Callable[[], None]] = {
        "fanout": lambda: fan_out(seconds, runs),
        "busy": lambda: busy_host(seconds, runs),
        "cores": lambda: cores(seconds, runs),
        "latency": lambda: latency(seconds, runs),
        "ingest": lambda: ingest(100_000 if args.quick else 300_000, 5 if args.quick else 20, runs),
        "registry": registry_scale,
        "presence": lambda: presence(seconds, runs),
        "asyncio": lambda: aio_step(args.quick, runs),
        "cluster": lambda: cluster_step(seconds, runs),
    }
    assert list(steps) == list(STEPS)
    for name in args.only or STEPS:
        load_before, t0 = os.getloadavg()[0], time.monotonic()
        steps[name]()
        print(
            f"\n(load average, 1 min: {load_before:.2f} before, {os.getloadavg()[0]:.2f} after; "
            f"{time.monotonic() - t0:.0f} s)"
        )
    print(f"\nTotal {time.monotonic() - started:.0f} s")


if __name__ == "__main__":
    main()
