"""Soak test, run by hand (not in CI): steady chat while clients join, leave and expire.

    python benches/soak.py [SECONDS]        # default 600; prints a sample every 10 s

One process holds a server (validated mode), 20 chatting clients that read everything they
get (5 of them send on each 20 ms tick: about 240 messages a second in all, each relayed to
some 55 clients), and churn: every second 3 clients join and 3 leave, and 3 more join and go
silent (their heartbeat is a minute away) to expire after the server's 2 s. Memory (RSS),
threads and file descriptors should stay flat; the closing lines sum them up after the first
minute's warm-up.
"""

from __future__ import annotations

import os
import sys
import time
from collections import deque

from udpchat import ChatClientUdp, ChatServerUdp


def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def main() -> None:
    seconds = float(sys.argv[1]) if len(sys.argv) > 1 else 600.0
    server = ChatServerUdp(port=0, interval=2.0, validate=True)
    server.start()
    chatters = [ChatClientUdp(*server.address, interval=0.5) for _ in range(20)]
    for c in chatters:
        c.start()
    churn: deque[ChatClientUdp] = deque()
    silent: deque[ChatClientUdp] = deque()
    received = sent = 0
    samples: list[tuple[float, float, int, int]] = []  # (t, rss, threads, fds)
    print("   t(s)  rss(MiB) threads  fds  clients  expired  sent  received  deliveries")
    start = time.monotonic()
    next_sample = next_churn = start
    while (now := time.monotonic()) - start < seconds:
        for i, c in enumerate(chatters):
            if i % 4 == int(now * 50) % 4:  # 5 of the 20 on each tick
                c.send(f"soak {sent}")
                sent += 1
            received += len(c.recv_many(1024, 0))
        if now >= next_churn:
            next_churn += 1.0
            for _ in range(3):
                joiner = ChatClientUdp(*server.address, interval=0.5)
                joiner.start()
                churn.append(joiner)
                quiet = ChatClientUdp(*server.address, interval=60)
                quiet.start()
                silent.append(quiet)
            while len(churn) > 30:
                churn.popleft().stop()
            while len(silent) > 30:
                silent.popleft().stop()
        if now >= next_sample:
            next_sample += 10.0
            stats = server.stats()
            threads, fds = len(os.listdir("/proc/self/task")), len(os.listdir("/proc/self/fd"))
            samples.append((now - start, rss_mib(), threads, fds))
            print(
                f"{now - start:7.0f} {rss_mib():9.1f} {threads:7d} "
                f"{fds:4d} {stats['clients']:8d} {stats['expired']:8d} "
                f"{sent:5d} {received:9d} {stats['deliveries']:11d}",
                flush=True,
            )
        time.sleep(0.02)
    elapsed = time.monotonic() - start
    for c in chatters + list(churn) + list(silent):
        c.stop()
    stats = server.stats()
    server.stop()
    warm = [x for x in samples if x[0] >= 60] or samples
    rss = [x[1] for x in warm]
    print(
        f"\n{elapsed:.0f} s: {sent} sent ({sent / elapsed:.0f}/s), {received} received, "
        f"{stats['deliveries']} deliveries, {stats['expired']} expired, "
        f"{stats['kernel_drops']} kernel drops, {stats['send_errors']} send errors"
    )
    print(
        f"after {warm[0][0]:.0f} s: RSS {rss[0]:.1f} -> {rss[-1]:.1f} MiB "
        f"(min {min(rss):.1f}, max {max(rss):.1f}); "
        f"threads {min(x[2] for x in warm)}-{max(x[2] for x in warm)}, "
        f"fds {min(x[3] for x in warm)}-{max(x[3] for x in warm)}"
    )


if __name__ == "__main__":
    main()
