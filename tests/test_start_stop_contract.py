"""What `start()` and `stop()` promise, and that the README says just that (issue 9, item 14:
0.1's README called both idempotent, while a second `start()` raises RuntimeError)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from udpchat import ChatClientUdp, ChatServerUdp

README = Path(__file__).resolve().parent.parent / "README.md"


def test_start_on_a_running_object_raises_stop_is_idempotent_and_start_again_works() -> None:
    server = ChatServerUdp(port=0)
    server.stop()  # never started: nothing to do
    server.start()
    try:
        assert server.address is not None
        client = ChatClientUdp(*server.address)
        client.stop()
        client.start()
        try:
            for obj in (server, client):
                with pytest.raises(RuntimeError, match="already running"):
                    obj.start()
                assert obj.running  # the failed start() changed nothing
        finally:
            client.stop()
            client.stop()
        assert not client.running
        client.start()  # afresh, on a new socket
        assert client.running
        client.stop()
    finally:
        server.stop()
        server.stop()
    assert not server.running
    server.start()
    assert server.running
    server.stop()


def _paragraph_about_start_and_stop(text: str) -> str:
    for paragraph in re.split(r"\n\s*\n", text):
        if "`start()` / `stop()`" in paragraph:
            return " ".join(paragraph.split())
    pytest.fail("no paragraph of the README introduces `start()` / `stop()`")


def test_the_readme_says_what_start_and_stop_do() -> None:
    if not README.exists():
        pytest.skip(f"no README at {README} (tests run outside the clone)")
    paragraph = _paragraph_about_start_and_stop(README.read_text(encoding="utf-8"))
    assert "both are idempotent" not in paragraph, paragraph
    assert "`stop()` is idempotent" in paragraph, paragraph
    assert re.search(r"`start\(\)` is not: on a running object it raises `RuntimeError`", paragraph)
