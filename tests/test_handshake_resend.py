"""A validated-mode client sends again what it sent before its token came, once, and only within
its first two seconds. The server here is a plain socket, so the test decides when the welcome
comes."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable

from conftest import recv
from udpchat import ChatClientUdp

TOKEN = b"0123456789abcdef0123456789abcdef"
COOKIE = b"fedcba9876543210fedcba9876543210"
MESSAGES = 500


def _bodies(datagrams: list[bytes]) -> list[tuple[bool, bytes]]:
    """(tokened, body) of each datagram, padding stripped."""
    out = []
    for d in datagrams:
        d = d.strip()
        tokened = d.startswith(TOKEN + b" ")
        out.append((tokened, d[len(TOKEN) + 1 :].strip() if tokened else d))
    return out


def _challenge(fake: socket.socket, client: ChatClientUdp) -> None:
    """Plays a validated server: a challenge, then the client's answer (a bounded wait)."""
    fake.sendto(b"challenge " + COOKIE, client.address)
    for _ in range(100):
        if recv(fake).strip() == b"reg " + COOKIE:
            return
    raise AssertionError("the client did not answer the challenge")


def _collect(sock: socket.socket, seconds: float) -> list[bytes]:
    """Every datagram that reaches `sock` in the next `seconds`."""
    got = []
    deadline = time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0:
        sock.settimeout(left)
        try:
            got.append(sock.recv(70_000))
        except TimeoutError:
            break
    return got


def test_a_message_is_never_sent_twice_with_the_token(
    make_peer: Callable[..., socket.socket],
) -> None:
    fake = make_peer()
    with ChatClientUdp(*fake.getsockname()) as client:
        assert recv(fake).strip() == b"reg"
        _challenge(fake, client)
        # The welcome lands while the client is sending: each message must go out with the
        # token at most once (a tokenless copy before the welcome is what a validated server
        # drops; the one kept is then sent again with the token).
        fake.sendto(b"welcome " + TOKEN, client.address)
        # Read while the client sends, so no datagram is lost to a full socket buffer.
        got: list[bytes] = []
        reader = threading.Thread(target=lambda: got.extend(_collect(fake, 2.0)))
        reader.start()
        for i in range(MESSAGES):
            client.send(b"m%d" % i)
            if i % 10 == 9:
                time.sleep(0.001)  # paced, so the reader keeps up with a stock-sized buffer
        reader.join()
        bodies = _bodies(got)
    tokened = [b for t, b in bodies if t and b.startswith(b"m")]
    assert len(tokened) == len(set(tokened)), "a message went out twice with the token"
    tokenless = {b for t, b in bodies if not t and b.startswith(b"m")}
    assert tokenless <= set(tokened), "a message sent before the token was not sent again"
    assert len(set(tokened)) == MESSAGES


def test_what_was_kept_is_forgotten_when_the_grace_period_ends(
    make_peer: Callable[..., socket.socket],
) -> None:
    fake = make_peer()  # an open server, as far as the client can tell: it never sends a token
    with ChatClientUdp(*fake.getsockname(), interval=0.5) as client:
        client.send("early")
        time.sleep(2.5)  # past the two-second grace period
        _collect(fake, 0.1)
        # A handshake now (late) must not bring back what was sent 2.5 s ago.
        _challenge(fake, client)
        fake.sendto(b"welcome " + TOKEN, client.address)
        bodies = _bodies(_collect(fake, 0.8))
    assert (True, b"early") not in bodies, bodies


def test_a_welcome_that_answers_nothing_is_ignored(make_peer: Callable[..., socket.socket]) -> None:
    # A forged welcome (the source is easy to forge: the server's address) must not swap in a
    # bogus token and mute the client: only a welcome after the client answered a challenge counts.
    fake = make_peer()
    with ChatClientUdp(*fake.getsockname(), interval=0.2) as client:
        assert recv(fake).strip() == b"reg"
        fake.sendto(b"welcome " + TOKEN, client.address)
        client.send("after the forged welcome")
        bodies = _bodies(_collect(fake, 0.5))
        assert not client.validated
    assert (False, b"after the forged welcome") in bodies, bodies
    assert not any(tokened for tokened, _ in bodies), bodies
