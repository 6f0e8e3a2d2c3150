"""The Redis fixture the cluster tests stand on: start, PING, publish, kill, restart, stop."""

from __future__ import annotations

import os
import signal
import socket
import time
from collections.abc import Callable

import pytest
from redis_server import RedisServer, Resp, RespError

MakeRedis = Callable[..., RedisServer]


def refused(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1.0):
            return False
    except ConnectionRefusedError:
        return True


def test_a_redis_of_its_own_without_persistence(redis: RedisServer) -> None:
    assert redis.ping()
    assert redis.command("CONFIG", "GET", "save") == [b"save", b""]
    assert redis.command("CONFIG", "GET", "appendonly") == [b"appendonly", b"no"]
    assert redis.command("CONFIG", "GET", "bind")[1] == b"127.0.0.1"
    assert redis.command("CONFIG", "GET", "dir")[1] == str(redis.directory).encode()
    assert int(redis.command("CONFIG", "GET", "port")[1]) == redis.port
    assert redis.url == f"redis://127.0.0.1:{redis.port}"


def test_publish_any_bytes_and_count_subscribers(redis: RedisServer) -> None:
    assert redis.numsub("udpchat") == 0
    assert redis.publish("udpchat", b"nobody listens") == 0
    with redis.connect() as sub:
        assert sub.command("SUBSCRIBE", "udpchat") == [b"subscribe", b"udpchat", 1]
        assert redis.numsub("udpchat") == 1
        assert redis.numsub("other") == 0
        data = bytes(range(256)) + b"\r\n$3\r\n*1\r\n"  # binary, and RESP's own markers
        assert redis.publish("udpchat", data) == 1
        assert sub._reply() == [b"message", b"udpchat", data]
    # The subscriber's connection is closed: Redis forgets it.
    deadline = time.monotonic() + 2
    while redis.numsub("udpchat") and time.monotonic() < deadline:
        time.sleep(0.01)
    assert redis.numsub("udpchat") == 0


def test_kill_then_restart_on_the_same_port(redis: RedisServer) -> None:
    port, pid = redis.port, redis.pid
    assert pid is not None
    redis.kill()
    assert not redis.running
    assert refused(port)
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    redis.restart()
    assert redis.port == port and redis.pid != pid
    assert redis.ping()
    redis.stop()
    assert not redis.running and refused(port)
    redis.stop()  # idempotent


def test_a_port_chosen_before_it_starts(make_redis: MakeRedis) -> None:
    redis = make_redis(start=False)
    assert not redis.running and refused(redis.port)
    redis.start()
    assert redis.ping()


def test_a_password(make_redis: MakeRedis) -> None:
    redis = make_redis(password="s3cret")
    assert redis.url == f"redis://:s3cret@127.0.0.1:{redis.port}"
    assert redis.ping()
    with Resp(redis.port) as anonymous, pytest.raises(RespError, match="NOAUTH"):
        anonymous.command("PING")
    with pytest.raises(RespError):
        Resp(redis.port, password="wrong")


def test_stop_ends_a_redis_that_ignores_sigterm(redis: RedisServer) -> None:
    # A Redis that does not exit on SIGTERM is killed after the bounded wait.
    assert redis.proc is not None
    redis.stop_timeout = 0.3
    os.kill(redis.proc.pid, signal.SIGSTOP)  # stopped: SIGTERM waits, SIGKILL does not
    t0 = time.monotonic()
    redis.stop()
    took = time.monotonic() - t0
    assert not redis.running
    assert redis.proc.returncode == -signal.SIGKILL
    assert 0.3 <= took < 5, took
