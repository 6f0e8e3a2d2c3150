"""A bounded fuzz target (atheris) for everything that parses bytes from the network.

    pip install atheris
    python fuzz/fuzz_server.py -runs=200000          # bounded: stops after that many inputs
    python fuzz/fuzz_server.py -max_total_time=600   # or after ten minutes

Each input is parsed as a client would (`Message`), and sent to a running server in each mode
(open and validated). Every 1,000 inputs a probe message must come back from both servers, and
their threads must be alive; any exception or a dead server is a crash. Coverage guidance sees
the Python side only; the Rust parsers are also covered by `cargo test`'s property tests.
"""

from __future__ import annotations

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


def probe() -> None:
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


def test_one_input(data: bytes) -> None:
    global inputs
    msg = Message(data)
    assert msg.raw == data
    _ = (msg.sender, msg.text, msg.payload, repr(msg), hash(msg))
    for server in servers:
        attacker.sendto(data[:65507], server.address)
    inputs += 1
    if inputs % 1000 == 0:
        probe()


if __name__ == "__main__":
    atheris.Setup(sys.argv, test_one_input)
    atheris.Fuzz()
