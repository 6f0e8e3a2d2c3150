"""udpchat benchmarks: every figure printed beside its baseline, measured in the same run.

    python benches/run.py            # all of it, a few minutes on 2 cores
    python benches/run.py --quick    # shorter runs, for a smoke test

Needs udpchat installed (`pip install .`) and cargo (it builds the Rust load generator and the
kernel baseline). Servers under test, each started fresh for every measurement:

  udpchat    ChatServerUdp, in its own Python process
  udpchat-any  the same bound to 0.0.0.0: it answers each client from the address it sent to
             (IP_PKTINFO), as a server on a host with several addresses must
  baseline   benches/baseline.rs: one thread, recvmmsg/sendmmsg, nothing else (the kernel's limit)
  tutorial   the tutorial's threaded pure-Python server, copied below (prints removed)
  asyncio    the same protocol on asyncio's DatagramProtocol

The load generator (benches/loadgen.rs) registers N client sockets on 127.0.0.1, sends with a
bounded window from a few of them, and counts every broadcast every socket receives.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import json
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


def busy_loop() -> None:
    """A CPU-bound Python loop, as a host program's main thread might run."""
    x = 0
    while True:
        x += 1


def serve(kind: str, busy: bool, fanout_threads: int) -> None:
    """Runs one server in this process, prints its address, serves until killed."""
    if kind in ("udpchat", "udpchat-any"):
        from udpchat import ChatServerUdp

        ip = "0.0.0.0" if kind == "udpchat-any" else "127.0.0.1"
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
        loop.run_forever()
        return
    else:
        raise SystemExit(f"unknown server {kind}")
    print("{}:{}".format(*address), flush=True)
    if busy:
        busy_loop()
    threading.Event().wait()


# --- running things --------------------------------------------------------------------------


@contextmanager
def server(kind: str, busy: bool = False, fanout_threads: int = 1) -> Iterator[str]:
    if kind == "baseline":
        cmd = [str(EXAMPLES / "baseline"), "127.0.0.1:0"]
    else:
        cmd = [sys.executable, __file__, "serve", kind, "--fanout-threads", str(fanout_threads)]
        cmd += ["--busy"] if busy else []
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
def cpu_burner() -> Iterator[None]:
    """The same CPU load as `busy_loop`, in a separate process: only the GIL differs."""
    proc = subprocess.Popen([sys.executable, "-c", "x = 0\nwhile True: x += 1"])
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


def ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}x" if b else "n/a"


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


def median_run(kind: str, runs: int, *args: object, fanout_threads: int = 1) -> dict[str, float]:
    """The run with the median `deliveries_per_s` of `runs`, each against a fresh server: this
    machine's spread from one run to the next is ±15%."""
    results = []
    for _ in range(runs):
        with server(kind, fanout_threads=fanout_threads) as address:
            results.append(loadgen("throughput", address, *args))
    return sorted(results, key=lambda r: r["deliveries_per_s"])[len(results) // 2]


def fan_out(seconds: float) -> None:
    """Targets 1 and 2: deliveries/s by clients and payload size, each server fresh. udpchat (on
    127.0.0.1 and on 0.0.0.0) and the baseline (the ratios that matter) take the median of three
    runs."""
    configs = [(100, 4, 64), (100, 4, 1200), (1000, 4, 64), (1000, 4, 1200), (2, 2, 64)]
    rows = []
    for clients, senders, size in configs:
        got = {}
        for kind in SERVERS:
            runs = 3 if kind in ("udpchat", "udpchat-any", "baseline") else 1
            got[kind] = median_run(kind, runs, clients, senders, size, seconds)
        key = "messages_per_s" if clients == 2 else "deliveries_per_s"
        rows.append(
            [
                f"{clients} clients, {size} B" + (" (messages/s)" if clients == 2 else ""),
                *(f"{got[k][key]:,.0f}" for k in SERVERS),
                ratio(got["udpchat"][key], got["baseline"][key]),
                ratio(got["udpchat-any"][key], got["udpchat"][key]),
                ratio(got["udpchat"][key], got["tutorial"][key]),
                f"{got['udpchat']['delivery_ratio']:.3f}",
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
        ],
        rows,
    )


def busy_host(seconds: float) -> None:
    """Target 3: the host's main thread runs a Python loop vs the same load in another process."""
    rows = []
    for kind in ["udpchat", "tutorial"]:
        same, other = [], []
        for _ in range(3 if kind == "udpchat" else 1):  # interleaved, medians compared
            with server(kind, busy=True) as address:
                same.append(loadgen("throughput", address, 100, 4, 64, seconds)["deliveries_per_s"])
            with cpu_burner(), server(kind) as address:
                other.append(
                    loadgen("throughput", address, 100, 4, 64, seconds)["deliveries_per_s"]
                )
        same, other = statistics.median(same), statistics.median(other)
        rows.append([kind, f"{same:,.0f}", f"{other:,.0f}", ratio(same, other)])
    table(
        "Busy host: deliveries/s, 100 clients, 64 B, while a CPU-bound Python loop runs",
        ["server", "loop in the server's process", "loop in another process", "ratio"],
        rows,
    )


def cores(seconds: float) -> None:
    """Target 7: one fan-out thread against several, where a round is large enough to split."""
    rows = []
    base = None
    for threads in [1, 2, 4]:
        runs = []
        for _ in range(3):  # the median of three: this machine's run-to-run spread is wide
            with server("udpchat", fanout_threads=threads) as address:
                runs.append(
                    loadgen("throughput", address, 1000, 4, 64, seconds)["deliveries_per_s"]
                )
        got = sorted(runs)[1]
        base = base or got
        rows.append([str(threads), f"{got:,.0f}", ratio(got, base)])
    table(
        f"Fan-out threads: deliveries/s, 1000 clients, 64 B, {os.cpu_count()} cores",
        ["fanout_threads", "deliveries/s", "vs 1"],
        rows,
    )


def latency(seconds: float) -> None:
    """Target 6: round trip of a client's own message, 1,000 messages/s, 100 clients."""
    rows = []
    for kind in ["udpchat", "baseline", "tutorial"]:
        with server(kind) as address:
            r = loadgen("latency", address, 100, 1000, 64, seconds)
        rows.append(
            [
                kind,
                f"{r['p50_us']:.0f}",
                f"{r['p99_us']:.0f}",
                f"{r['max_us']:.0f}",
                f"{r['answered']:.0f}/{r['sent']:.0f}",
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
                    while True:
                        sock.recv(65536)
                        received += 1
        else:
            from udpchat import ChatClientUdp

            with ChatClientUdp(ip, int(port), interval=60) as client:
                if mode == "recv":
                    assert client.recv(5) is not None
                    first, received = time.perf_counter(), 1
                    while client.recv(0.5) is not None:
                        received += 1
                else:
                    batch = client.recv_many(1024, 5)
                    first, received = time.perf_counter(), len(batch)
                    while batch := client.recv_many(1024, 0.5):
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
                    while True:
                        sock.recv(65536)
                        taken += 1
            elif mode == "recv":
                while client.recv(0) is not None:
                    taken += 1
            else:
                while batch := client.recv_many(1024, 0):
                    taken += len(batch)
            elapsed += time.perf_counter() - t0
    return taken / elapsed


def ingest(count: int, rounds: int) -> None:
    """Target 4: a Python loop consuming messages, udpchat's client vs plain recv."""
    rows = []
    backlog = {m: consume_backlog(m, rounds) for m in ["socket", "recv", "recv_many"]}
    flood = {m: consume_flood(m, count) for m in ["socket", "recv", "recv_many"]}
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


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command")
    s = sub.add_parser("serve", help="(internal) run one server")
    s.add_argument("kind")
    s.add_argument("--busy", action="store_true")
    s.add_argument("--fanout-threads", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="shorter runs")
    args = parser.parse_args()
    if args.command == "serve":
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        serve(args.kind, args.busy, args.fanout_threads)
        return
    seconds = 1.0 if args.quick else 1.5
    build()
    print(f"# udpchat benchmarks, {datetime.date.today()}")
    print(f"{platform.platform()}, {os.cpu_count()} cores, Python {platform.python_version()}")
    steps: list[Callable[[], None]] = [
        lambda: fan_out(seconds),
        lambda: busy_host(seconds),
        lambda: cores(seconds),
        lambda: latency(seconds),
        lambda: ingest(100_000 if args.quick else 300_000, 5 if args.quick else 20),
        registry_scale,
    ]
    for step in steps:
        step()


if __name__ == "__main__":
    main()
