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
import json
import logging
import os
import platform
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import cast

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "target" / "release" / "examples"
# How long a server or CPU burner started here lives at most, if nobody kills it first.
LIFETIME = 600.0
# The steps of a full run, in order; `--only` picks some.
STEPS = ("fanout", "busy", "cores", "latency", "ingest", "registry", "presence")
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
