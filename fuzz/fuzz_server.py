r"""A bounded fuzz target (atheris) for everything that parses bytes from the network.

    pip install atheris
    python fuzz/fuzz_server.py -runs=200000          # bounded: stops after that many inputs
    python fuzz/fuzz_server.py -max_total_time=600   # or after ten minutes
    # steered by the protocol's words and one seed datagram of each kind; libFuzzer adds what
    # it finds to the first directory:
    python fuzz/fuzz_server.py -max_total_time=300 -keep_seed=1 -dict=fuzz/udpchat.dict \
        "$(mktemp -d)" fuzz/seeds

Each input is parsed as a client would (`Message`), and sent to a running server in each mode
(open and validated). Every 1,000 inputs a probe message must come back from both servers, and
their threads must be alive; any exception or a dead server is a crash. Every 50,000 inputs a
line on stderr gives the inputs, the probes and the servers' counters.

On a crash libFuzzer saves the input as `crash-<sha1>` in the working directory (or where
`-artifact_prefix=` says); replay it with `python fuzz/fuzz_server.py crash-<sha1>`. Such files
are git-ignored: a real one becomes a test, then goes.

Coverage guidance sees the Python side only. The Rust parsers have their own fuzz target,
`check_parsers` in src/protocol.rs, driven by proptest in `cargo test`.
"""

from __future__ import annotations

import ipaddress
import socket
import sys
import time

import atheris

with atheris.instrument_imports():
    from udpchat import ChatClientUdp, ChatServerUdp, Message

servers = [ChatServerUdp(port=0), ChatServerUdp(port=0, validate=True)]
for s in servers:
    s.start()
probes = [ChatClientUdp(*s.address, interval=0.5) for s in servers]
for p in probes:
    p.start()
attacker = socket.socket(type=socket.SOCK_DGRAM)
attacker.bind(("127.0.0.1", 0))
inputs = 0
probes_answered = 0
slowest_probe = 0.0
started = time.monotonic()


def probe() -> None:
    global probes_answered, slowest_probe
    t0 = time.monotonic()
    for server, client in zip(servers, probes, strict=True):
        if not server.running:
            raise RuntimeError(f"server died: {server.stats()}")
        # Resent until answered: the fuzz traffic may overflow the kernel's buffer.
        for attempt in range(20):
            client.send(f"probe {inputs} {attempt}")
            deadline = time.monotonic() + 0.25
            while time.monotonic() < deadline:
                msg = client.recv(0.05)
                if msg is not None and msg.text == f"probe {inputs} {attempt}":
                    break
            else:
                continue
            break
        else:
            raise RuntimeError("no answer to the probe")
        probes_answered += 1
    slowest_probe = max(slowest_probe, time.monotonic() - t0)
    if inputs % 50_000 == 0:
        report()


def report() -> None:
    keys = ["received", "broadcasts", "dropped_malformed", "challenges", "kernel_drops"]
    counters = [
        " ".join(f"{k}={v}" for k, v in s.stats().items() if k in keys and v) for s in servers
    ]
    print(
        f"#{inputs} in {time.monotonic() - started:.0f} s: {probes_answered} probes answered "
        f"(slowest {slowest_probe * 1e3:.0f} ms); open: {counters[0]}; validated: {counters[1]}",
        file=sys.stderr,
        flush=True,
    )


@atheris.instrument_func
def check_message(data: bytes) -> None:
    """`Message` as the README describes it. Its branches are also the only coverage atheris
    sees (udpchat's parsers are Rust), so inputs that reach the `ack:` path are kept."""
    msg = Message(data)
    assert msg.raw == data
    payload = msg.payload
    # Never an exception: invalid UTF-8 replaced exactly as Python's own decoder replaces it.
    assert msg.text == payload.decode("utf-8", "replace")
    if msg.sender is None:
        assert payload == data
    else:
        ip, port = msg.sender
        assert data.startswith(b"ack: ") and 0 <= port <= 65535
        assert ipaddress.ip_address(ip) is not None
        # The payload is the datagram's tail, less the one newline the server appends.
        assert data.endswith(payload + b"\n") or (data.endswith(payload) and b"\n" in data)
    assert hash(msg) == hash(data) and msg == Message(data)
    _ = repr(msg)


def test_one_input(data: bytes) -> None:
    global inputs
    check_message(data)
    for server in servers:
        attacker.sendto(data[:65507], server.address)
    inputs += 1
    if inputs % 1000 == 0:
        probe()


if __name__ == "__main__":
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()
